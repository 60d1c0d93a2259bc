//! The topic policy evaluator: the one place that decides who may publish or subscribe where.
//!
//! A policy is a list of [`Rule`]s; each grants one kind of principal (device or service) an
//! action (publish, subscribe or both) on a topic filter pattern. Patterns may contain `{id}`
//! (the device id) and `{tag:<key>}` (the value of the device's tag `<key>`). A rule whose
//! substitution is impossible (missing tag, a tag value containing `/`, `+`, `#` or NUL) grants
//! nothing. Everything not granted is denied.
//!
//! Defaults ([`Policy::default`]): a device may publish and subscribe under `devices/{id}/#`;
//! a service may subscribe to `devices/#` (read-only). A shared subscription
//! (`$share/<group>/<filter>`) is judged on its filter, and a device may share only within its own
//! subtree.

use crate::topic::{
    filter_covers, filter_matches, is_shared_filter, is_valid_filter, parse_shared_filter,
};
use crate::DeviceId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Device {
        id: DeviceId,
        tags: BTreeMap<String, String>,
    },
    /// A backend service authenticated by an API token of role `service`: `id` is the token's
    /// (unique) id, `name` its human-readable name (not unique).
    Service { id: String, name: String },
    /// Anonymous client on the development listener: everything is allowed.
    Dev,
    /// A device enrolling with a claim token (username `claim`, no certificate yet): it may
    /// only publish `provision/<client id>/request` and subscribe within
    /// `provision/<client id>/#`, whatever the configured rules say. `claim_id` is the id of
    /// the claim whose token it presented (not the token): what its requests enroll with.
    Claim { client_id: String, claim_id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrincipalKind {
    Device,
    Service,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Publish,
    Subscribe,
    Both,
}

/// One grant, as written in the config file:
/// `{ principal = "device", action = "subscribe", filter = "sites/{tag:site}/#" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub principal: PrincipalKind,
    pub action: Action,
    pub filter: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy rule filter {0:?} is not a valid MQTT topic filter")]
    BadFilter(String),
    #[error("policy rule filter {0:?} has an unknown or unclosed substitution (use {{id}} or {{tag:<key>}})")]
    BadSubstitution(String),
}

/// An evaluated set of rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            rules: Self::default_rules(),
        }
    }
}

/// A device's own subtree, as a pattern: its default grant, and where it may share.
const DEVICE_SUBTREE: &str = "devices/{id}/#";

impl Policy {
    fn default_rules() -> Vec<Rule> {
        vec![
            Rule {
                principal: PrincipalKind::Device,
                action: Action::Both,
                filter: DEVICE_SUBTREE.into(),
            },
            Rule {
                principal: PrincipalKind::Service,
                action: Action::Subscribe,
                filter: "devices/#".into(),
            },
        ]
    }

    /// The defaults plus `extra` rules, each validated.
    pub fn with_rules(extra: Vec<Rule>) -> Result<Self, PolicyError> {
        for rule in &extra {
            validate_pattern(&rule.filter)?;
        }
        let mut rules = Self::default_rules();
        rules.extend(extra);
        Ok(Self { rules })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// May `who` publish to the concrete topic `topic`?
    pub fn may_publish(&self, who: &Principal, topic: &str) -> bool {
        if let Principal::Claim { client_id, .. } = who {
            return topic == crate::provision::request_topic(client_id);
        }
        // Only the server answers on an enrolling client's topics: no rule lets a device or a
        // service publish there (a forged `accepted` would hand an agent another trust root).
        if *who != Principal::Dev && under_provision(topic) {
            return false;
        }
        *who == Principal::Dev
            || self
                .granted(who, Action::Publish)
                .any(|filter| filter_matches(&filter, topic))
    }

    /// May `who` subscribe to `filter`? True only if an allowed pattern covers every topic the
    /// requested filter could match. A shared subscription `$share/<group>/<inner>` is judged
    /// on its inner filter; a device may share only within its own subtree `devices/{id}/#`
    /// (whatever else it may subscribe to), so its group can never pull messages away from
    /// another principal's topics. An invalid `$share/` filter is refused.
    pub fn may_subscribe(&self, who: &Principal, filter: &str) -> bool {
        if *who == Principal::Dev {
            return true;
        }
        if let Principal::Claim { client_id, .. } = who {
            return !is_shared_filter(filter)
                && filter_covers(&crate::provision::subtree_filter(client_id), filter);
        }
        let filter = if is_shared_filter(filter) {
            let Some(shared) = parse_shared_filter(filter) else {
                return false;
            };
            if let Principal::Device { .. } = who {
                let own = substitute(DEVICE_SUBTREE, who);
                if !own.is_some_and(|own| filter_covers(&own, shared.filter)) {
                    return false;
                }
            }
            shared.filter
        } else {
            filter
        };
        // Nor subscribe there by name (what may be published there and what may be subscribed
        // to there stay the same set).
        if under_provision(filter) {
            return false;
        }
        self.granted(who, Action::Subscribe)
            .any(|allowed| filter_covers(&allowed, filter))
    }

    fn granted<'a>(
        &'a self,
        who: &'a Principal,
        want: Action,
    ) -> Box<dyn Iterator<Item = String> + 'a> {
        let kind = match who {
            // Allowed everything by `may_publish` / `may_subscribe` (a `#` grant would still
            // leave out `$` topics).
            Principal::Dev | Principal::Claim { .. } => return Box::new(std::iter::empty()),
            Principal::Device { .. } => PrincipalKind::Device,
            Principal::Service { .. } => PrincipalKind::Service,
        };
        Box::new(
            self.rules
                .iter()
                .filter(move |r| {
                    r.principal == kind && (r.action == want || r.action == Action::Both)
                })
                .filter_map(move |r| substitute(&r.filter, who)),
        )
    }
}

/// Whether a topic or filter's first level is `provision` (the enrollment topics).
fn under_provision(topic: &str) -> bool {
    topic.split('/').next() == Some(crate::provision::PROVISION_ROOT)
}

fn validate_pattern(pattern: &str) -> Result<(), PolicyError> {
    // Substitute every placeholder with a harmless value to check syntax.
    let mut out = String::new();
    let mut rest = pattern;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| PolicyError::BadSubstitution(pattern.into()))?;
        let name = &rest[start + 1..start + end];
        if name != "id" && name.strip_prefix("tag:").is_none_or(|k| k.is_empty()) {
            return Err(PolicyError::BadSubstitution(pattern.into()));
        }
        out.push('x');
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    if out.contains('}') || !is_valid_filter(&out) {
        return Err(PolicyError::BadFilter(pattern.into()));
    }
    Ok(())
}

/// Substitutes `{id}` and `{tag:key}`; `None` if the rule cannot apply to `who`.
fn substitute(pattern: &str, who: &Principal) -> Option<String> {
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut rest = pattern;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}')?;
        let name = &rest[start + 1..start + end];
        let value = match (name, who) {
            ("id", Principal::Device { id, .. }) => id.as_str(),
            (n, Principal::Device { tags, .. }) => tags.get(n.strip_prefix("tag:")?)?.as_str(),
            _ => return None,
        };
        if value.is_empty() || value.contains(['/', '+', '#', '\0']) {
            return None;
        }
        out.push_str(value);
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, tags: &[(&str, &str)]) -> Principal {
        Principal::Device {
            id: DeviceId::parse(id).expect("test device id"),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn default_device_is_confined_to_its_subtree() {
        let p = Policy::default();
        let d1 = device("d1", &[]);
        assert!(p.may_publish(&d1, "devices/d1/telemetry"));
        assert!(p.may_publish(&d1, "devices/d1/a/b"));
        assert!(!p.may_publish(&d1, "devices/d2/telemetry"));
        assert!(!p.may_publish(&d1, "fleet/x"));
        assert!(p.may_subscribe(&d1, "devices/d1/#"));
        assert!(p.may_subscribe(&d1, "devices/d1/commands/+"));
        assert!(!p.may_subscribe(&d1, "devices/+/telemetry"));
        assert!(!p.may_subscribe(&d1, "#"));
    }

    #[test]
    fn a_claim_reaches_only_its_own_provisioning_topics_whatever_the_rules() {
        let everything = Rule {
            principal: PrincipalKind::Device,
            action: Action::Both,
            filter: "#".into(),
        };
        let p = Policy::with_rules(vec![everything]).expect("valid rule");
        let c = Principal::Claim {
            client_id: "sn-1".into(),
            claim_id: "clm_1".into(),
        };
        assert!(p.may_publish(&c, "provision/sn-1/request"));
        assert!(!p.may_publish(&c, "provision/sn-1/accepted"));
        assert!(!p.may_publish(&c, "provision/sn-2/request"));
        assert!(!p.may_publish(&c, "devices/sn-1/telemetry"));
        assert!(p.may_subscribe(&c, "provision/sn-1/#"));
        assert!(p.may_subscribe(&c, "provision/sn-1/accepted"));
        assert!(!p.may_subscribe(&c, "provision/+/accepted"));
        assert!(!p.may_subscribe(&c, "$share/g/provision/sn-1/#"));
        assert!(!p.may_subscribe(&c, "#"));
    }

    #[test]
    fn no_rule_lets_a_device_or_service_publish_on_provision_topics() {
        let everything = |principal| Rule {
            principal,
            action: Action::Both,
            filter: "#".into(),
        };
        let p = Policy::with_rules(vec![
            everything(PrincipalKind::Device),
            everything(PrincipalKind::Service),
        ])
        .expect("valid rules");
        let svc = Principal::Service {
            id: "t1".into(),
            name: "s".into(),
        };
        for who in [device("d1", &[]), svc] {
            assert!(!p.may_publish(&who, "provision/sn-1/accepted"));
            assert!(!p.may_publish(&who, "provision/sn-1/request"));
            assert!(p.may_publish(&who, "fleet/x"));
        }
        assert!(p.may_publish(&Principal::Dev, "provision/sn-1/accepted"));
        let svc = Principal::Service {
            id: "t1".into(),
            name: "s".into(),
        };
        for filter in ["provision", "provision/#", "$share/g/provision/+/request"] {
            assert!(!p.may_subscribe(&svc, filter), "{filter}");
        }
        assert!(p.may_subscribe(&svc, "#"));
    }

    #[test]
    fn services_read_only_by_default() {
        let p = Policy::default();
        let s = Principal::Service {
            id: "t1".into(),
            name: "pipe".into(),
        };
        assert!(p.may_subscribe(&s, "devices/+/telemetry"));
        assert!(p.may_subscribe(&s, "devices/#"));
        assert!(!p.may_subscribe(&s, "#"));
        assert!(!p.may_publish(&s, "devices/d1/commands/x"));
    }

    #[test]
    fn extra_rules_with_substitutions() {
        let p = Policy::with_rules(vec![
            Rule {
                principal: PrincipalKind::Device,
                action: Action::Subscribe,
                filter: "fleet/broadcast/#".into(),
            },
            Rule {
                principal: PrincipalKind::Device,
                action: Action::Both,
                filter: "sites/{tag:site}/#".into(),
            },
        ])
        .expect("valid rules");
        let berlin = device("d1", &[("site", "berlin")]);
        let untagged = device("d2", &[]);
        let evil = device("d3", &[("site", "#")]);
        assert!(p.may_subscribe(&berlin, "fleet/broadcast/#"));
        assert!(!p.may_publish(&berlin, "fleet/broadcast/x"));
        assert!(p.may_publish(&berlin, "sites/berlin/door"));
        assert!(!p.may_publish(&berlin, "sites/paris/door"));
        assert!(!p.may_subscribe(&untagged, "sites/berlin/#"));
        assert!(!p.may_subscribe(&evil, "sites/berlin/#"));
        assert!(!p.may_publish(&evil, "sites/berlin/x"));
    }

    #[test]
    fn shared_subscriptions_are_judged_on_their_inner_filter() {
        let p = Policy::with_rules(vec![Rule {
            principal: PrincipalKind::Device,
            action: Action::Subscribe,
            filter: "fleet/broadcast/#".into(),
        }])
        .expect("valid rules");
        let s = Principal::Service {
            id: "t1".into(),
            name: "workers".into(),
        };
        assert!(p.may_subscribe(&s, "$share/workers/devices/+/telemetry"));
        assert!(p.may_subscribe(&s, "$share/w/devices/#"));
        assert!(!p.may_subscribe(&s, "$share/w/#"));
        assert!(!p.may_subscribe(&s, "$share/w/fleet/x"));
        assert!(!p.may_subscribe(&s, "$share/w+/devices/#"));
        assert!(!p.may_subscribe(&s, "$share/w"));
        let d1 = device("d1", &[]);
        assert!(p.may_subscribe(&d1, "$share/g/devices/d1/#"));
        assert!(p.may_subscribe(&d1, "$share/g/devices/d1/jobs/+"));
        // Granted to the device, but outside its own subtree: no sharing there.
        assert!(p.may_subscribe(&d1, "fleet/broadcast/#"));
        assert!(!p.may_subscribe(&d1, "$share/g/fleet/broadcast/#"));
        assert!(!p.may_subscribe(&d1, "$share/g/devices/other/#"));
        assert!(!p.may_subscribe(&d1, "$share/g/devices/+/telemetry"));
        assert!(!p.may_subscribe(&d1, "$share/g/#"));
        assert!(p.may_subscribe(&Principal::Dev, "$share/g/#"));
    }

    #[test]
    fn invalid_rules_are_refused() {
        for filter in ["a/#/b", "sites/{tag:}/x", "sites/{nope}/x", "sites/{id"] {
            let r = Policy::with_rules(vec![Rule {
                principal: PrincipalKind::Device,
                action: Action::Both,
                filter: filter.into(),
            }]);
            assert!(r.is_err(), "{filter}");
        }
    }

    #[test]
    fn dev_principal_allows_everything() {
        let p = Policy::default();
        assert!(p.may_publish(&Principal::Dev, "anything/at/all"));
        assert!(p.may_subscribe(&Principal::Dev, "#"));
        // Found by fuzz/policy_eval: a `#` grant left out topics starting with `$`.
        assert!(p.may_publish(&Principal::Dev, "$SYS/x"));
        assert!(p.may_subscribe(&Principal::Dev, "$SYS/#"));
    }

    #[test]
    fn wildcard_grants_do_not_reach_dollar_topics() {
        // Found by fuzz/policy_eval: `+/x` granted subscribing to `$SYS/x`, a topic it does not
        // match (MQTT: a first-level wildcard never matches a `$` topic), while publishing there
        // was refused.
        let p = Policy::with_rules(vec![
            Rule {
                principal: PrincipalKind::Device,
                action: Action::Both,
                filter: "+/x".into(),
            },
            Rule {
                principal: PrincipalKind::Device,
                action: Action::Subscribe,
                filter: "{id}/#".into(),
            },
        ])
        .expect("valid rules");
        let d1 = device("d1", &[]);
        assert!(!p.may_publish(&d1, "$SYS/x"));
        assert!(!p.may_subscribe(&d1, "$SYS/x"));
        assert!(!p.may_subscribe(&d1, "$SYS/#"));
        assert!(p.may_subscribe(&d1, "+/x"));
        assert!(p.may_subscribe(&d1, "d1/#"));
    }
}
