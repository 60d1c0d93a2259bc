//! Fuzz target: the topic policy (`Policy::with_rules`, `may_publish`, `may_subscribe`).
//!
//! Input is text, one statement per line, so seeds are readable and mutations stay meaningful:
//!
//! ```text
//! rule device both sites/{tag:site}/#     # rule <device|service> <publish|subscribe|both> <pattern>
//! as device d1 site=s1 evil=x/+           # the principal: device <id> [key=value ...] | service <name> | dev
//! pub devices/d1/telemetry                # ask may_publish
//! sub devices/+/telemetry                 # ask may_subscribe
//! ```
//!
//! Unknown lines are ignored; with no `as` line the principal is device `d1` with tag `site=s1`.
//! Invariants checked for every question:
//! * `dev` may do anything;
//! * a tag value that is empty or holds `/`, `+`, `#` or NUL grants nothing: the answers are the
//!   same with every such tag removed from the principal (no wildcard injection, so no reach into
//!   another device's topics through a tag);
//! * the same rules and the defaults with every action widened to `both`: a topic that a
//!   subscribable filter matches is publishable (subscribe grants stay within publish grants,
//!   i.e. `filter_covers` is sound, `$` topics included), and for a concrete topic both
//!   questions agree;
//! * the default rules stay in force: a device may use `devices/<its id>/#`;
//! * a shared subscription `$share/<group>/<filter>` is judged on its filter (the invariants
//!   above hold for the topics that filter reaches), and a device's allowed shared filter
//!   reaches only topics under `devices/<its id>/`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooring_proto::policy::{Action, Policy, Principal, PrincipalKind, Rule};
use mooring_proto::topic::{
    filter_matches, is_shared_filter, is_valid_filter, is_valid_topic_name, parse_shared_filter,
};
use mooring_proto::DeviceId;
use std::collections::BTreeMap;

/// Bounds the work per input (rules × questions).
const LINES_MAX: usize = 64;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut rules = Vec::new();
    let mut who = Principal::Device {
        id: DeviceId::parse("d1").expect("a valid id"),
        tags: [("site".to_owned(), "s1".to_owned())].into(),
    };
    let mut pubs = Vec::new();
    let mut subs = Vec::new();
    for line in text.lines().take(LINES_MAX) {
        let mut words = line.split(' ');
        match (words.next(), words.next()) {
            (Some("rule"), Some(kind)) => {
                let principal = match kind {
                    "device" => PrincipalKind::Device,
                    "service" => PrincipalKind::Service,
                    _ => continue,
                };
                let action = match words.next() {
                    Some("publish") => Action::Publish,
                    Some("subscribe") => Action::Subscribe,
                    Some("both") => Action::Both,
                    _ => continue,
                };
                let filter = words.collect::<Vec<_>>().join(" ");
                rules.push(Rule {
                    principal,
                    action,
                    filter,
                });
            }
            (Some("as"), Some("device")) => {
                // A principal holds a validated id (an invalid one cannot authenticate).
                let Ok(id) = DeviceId::parse(words.next().unwrap_or_default()) else {
                    continue;
                };
                let tags = words
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                who = Principal::Device { id, tags };
            }
            (Some("as"), Some("service")) => {
                let name = words.next().unwrap_or_default().to_owned();
                who = Principal::Service {
                    id: name.clone(),
                    name,
                };
            }
            (Some("as"), Some("dev")) => who = Principal::Dev,
            (Some("pub"), Some(topic)) => pubs.push(topic.to_owned()),
            (Some("sub"), Some(filter)) => subs.push(filter.to_owned()),
            _ => {}
        }
    }

    let Ok(policy) = Policy::with_rules(rules.clone()) else {
        return;
    };
    // Every grant, the defaults included, as both publish and subscribe.
    let widened_rules = rules
        .into_iter()
        .chain(Policy::default().rules().iter().cloned())
        .map(|r| Rule {
            action: Action::Both,
            ..r
        })
        .collect();
    let widened = Policy::with_rules(widened_rules).expect("the same patterns validate again");
    let safe_who = without_unsafe_tags(&who);

    for topic in &pubs {
        let allowed = policy.may_publish(&who, topic);
        if who == Principal::Dev {
            assert!(allowed);
        }
        assert_eq!(allowed, policy.may_publish(&safe_who, topic), "{topic}");
        // A topic name that looks like a shared subscription is, as a filter, a different one.
        if is_valid_topic_name(topic) && !is_shared_filter(topic) {
            assert_eq!(
                widened.may_publish(&who, topic),
                widened.may_subscribe(&who, topic),
                "{topic}"
            );
        }
    }
    for filter in &subs {
        let allowed = policy.may_subscribe(&who, filter);
        if who == Principal::Dev {
            assert!(allowed);
        }
        assert_eq!(allowed, policy.may_subscribe(&safe_who, filter), "{filter}");
        // What the subscription reaches: a shared one, the topics its inner filter matches.
        let reach = if is_shared_filter(filter) {
            parse_shared_filter(filter).map(|s| s.filter)
        } else {
            Some(filter.as_str()).filter(|f| is_valid_filter(f))
        };
        let Some(reach) = reach else {
            continue;
        };
        if widened.may_subscribe(&who, filter) {
            for topic in pubs.iter().chain(&subs) {
                // `provision/...` is the one deliberate exception: only the server (and claim
                // sessions, for their own request) publishes there, whatever the rules grant.
                let provision = topic.split('/').next() == Some("provision");
                if is_valid_topic_name(topic) && filter_matches(reach, topic) && !provision {
                    assert!(
                        widened.may_publish(&who, topic),
                        "subscribe {filter} reaches {topic}, which is not publishable"
                    );
                }
            }
        }
        if let (Principal::Device { id, .. }, true) = (&who, allowed && is_shared_filter(filter)) {
            // Its own subtree: `devices/<id>` itself (which `devices/<id>/#` matches too) and
            // everything below it.
            let root = format!("devices/{id}");
            let own = format!("{root}/");
            for topic in pubs.iter().chain(&subs) {
                if is_valid_topic_name(topic) && filter_matches(reach, topic) {
                    assert!(
                        *topic == root || topic.starts_with(&own),
                        "device {id} shares {filter}, which reaches {topic}"
                    );
                }
            }
        }
    }

    if let Principal::Device { id, .. } = &who {
        if !id.is_empty() && !id.contains(['/', '+', '#', '\0']) {
            let own = format!("devices/{id}/telemetry");
            assert!(policy.may_publish(&who, &own));
            assert!(policy.may_subscribe(&who, &format!("devices/{id}/#")));
        }
    }
});

/// The principal with every tag a substitution must refuse removed.
fn without_unsafe_tags(who: &Principal) -> Principal {
    match who {
        Principal::Device { id, tags } => Principal::Device {
            id: id.clone(),
            tags: tags
                .iter()
                .filter(|(_, v)| !v.is_empty() && !v.contains(['/', '+', '#', '\0']))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
        },
        other => other.clone(),
    }
}
