//! Retained messages: the table with each owner's usage and quotas, and storing, clearing and matching them.

use super::routing::expiry_instant;
use super::{lock, Owner, Refusal, Shared};
use crate::config::BrokerConfig;
use crate::hooks::Message;
use crate::persist::{RetainedValue, StateOp};
use mooring_proto::topic::filter_matches;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::Arc;
use tokio::time::Instant;

pub(crate) struct RetainedMsg {
    pub(crate) msg: Arc<Message>,
    pub(crate) expires_at: Option<Instant>,
    /// `None`: published by the server itself (never counted, never refused).
    owner: Option<Owner>,
}

#[derive(Default, Clone, Copy)]
struct Totals {
    count: usize,
    bytes: usize,
}

/// What one owner holds in the retained table.
#[derive(Default)]
struct Usage {
    totals: Totals,
    topics: HashSet<String>,
}

/// Retained messages by topic, with what each principal owns, so quotas are checked in O(1) and
/// an owner's expired messages can be found without scanning the table.
#[derive(Default)]
pub(crate) struct RetainedTable {
    msgs: BTreeMap<String, RetainedMsg>,
    usage: HashMap<Owner, Usage>,
    /// Messages and bytes owned by clients (all owners together).
    clients: Totals,
    /// Last sweep of every expired message (rate-limited: see `make_room`).
    last_sweep: Option<Instant>,
}

/// Least time between two sweeps of the whole retained table for expired messages.
const RETAINED_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl RetainedTable {
    fn account(&mut self, owner: &Option<Owner>, topic: &str, size: usize, add: bool) {
        let Some(owner) = owner else { return };
        let u = self.usage.entry(owner.clone()).or_default();
        if add {
            u.totals.count += 1;
            u.totals.bytes += size;
            u.topics.insert(topic.to_owned());
            self.clients.count += 1;
            self.clients.bytes += size;
        } else {
            u.totals.count = u.totals.count.saturating_sub(1);
            u.totals.bytes = u.totals.bytes.saturating_sub(size);
            u.topics.remove(topic);
            self.clients.count = self.clients.count.saturating_sub(1);
            self.clients.bytes = self.clients.bytes.saturating_sub(size);
            if u.totals.count == 0 {
                self.usage.remove(owner);
            }
        }
    }

    /// Whether `owner` may store `msg` (a non-empty retained message) under the limits.
    fn fits(&self, config: &BrokerConfig, owner: Option<&Owner>, msg: &Message) -> bool {
        let Some(owner) = owner else { return true };
        let size = msg.size_bytes();
        let old = self.msgs.get(&msg.topic);
        let mine = old.filter(|o| o.owner.as_ref() == Some(owner));
        let clients_old = old.filter(|o| o.owner.is_some());
        let u = self.usage.get(owner).map(|u| u.totals).unwrap_or_default();
        let count = u.count - usize::from(mine.is_some()) + 1;
        let bytes = u.bytes - mine.map_or(0, |o| o.msg.size_bytes()) + size;
        let all_count = self.clients.count - usize::from(clients_old.is_some()) + 1;
        let all_bytes = self.clients.bytes - clients_old.map_or(0, |o| o.msg.size_bytes()) + size;
        count <= config.retained_per_principal_max
            && bytes <= config.retained_bytes_per_principal_max
            && all_count <= config.retained_messages_max
            && all_bytes <= config.retained_bytes_max
    }

    /// Like `fits`, but first gives back what has expired: the owner's own expired messages,
    /// then (at most once per [`RETAINED_SWEEP_INTERVAL`]) every expired message. The topics
    /// removed are appended to `removed` (they are deleted from the store too).
    pub(super) fn make_room(
        &mut self,
        config: &BrokerConfig,
        owner: Option<&Owner>,
        msg: &Message,
        removed: &mut Vec<String>,
    ) -> bool {
        if self.fits(config, owner, msg) {
            return true;
        }
        let Some(owner) = owner else { return true };
        let now = Instant::now();
        let expired = |m: &RetainedMsg| m.expires_at.is_some_and(|at| at <= now);
        let mine: Vec<String> = self.usage.get(owner).map_or_else(Vec::new, |u| {
            u.topics
                .iter()
                .filter(|t| self.msgs.get(*t).is_some_and(expired))
                .cloned()
                .collect()
        });
        for t in &mine {
            self.remove(t);
        }
        removed.extend(mine);
        if self.fits(config, Some(owner), msg) {
            return true;
        }
        if self
            .last_sweep
            .is_none_or(|at| now.duration_since(at) >= RETAINED_SWEEP_INTERVAL)
        {
            self.last_sweep = Some(now);
            let all: Vec<String> = self
                .msgs
                .iter()
                .filter(|(_, m)| expired(m))
                .map(|(t, _)| t.clone())
                .collect();
            for t in &all {
                self.remove(t);
            }
            removed.extend(all);
        }
        self.fits(config, Some(owner), msg)
    }

    pub(super) fn remove(&mut self, topic: &str) {
        if let Some(old) = self.msgs.remove(topic) {
            self.account(&old.owner, topic, old.msg.size_bytes(), false);
        }
    }

    pub(super) fn insert(
        &mut self,
        msg: Arc<Message>,
        expires_at: Option<Instant>,
        owner: Option<Owner>,
    ) {
        self.remove(&msg.topic);
        self.account(&owner, &msg.topic, msg.size_bytes(), true);
        self.msgs.insert(
            msg.topic.clone(),
            RetainedMsg {
                msg,
                expires_at,
                owner,
            },
        );
    }

    /// Remove what `owner` published and everything under `prefix` (if given); returns the
    /// topics removed.
    pub(super) fn remove_where(&mut self, owner: &Owner, prefix: Option<&str>) -> Vec<String> {
        let mut doomed: Vec<String> = self
            .usage
            .get(owner)
            .map_or_else(Vec::new, |u| u.topics.iter().cloned().collect());
        if let Some(p) = prefix {
            doomed.extend(
                self.msgs
                    .range::<str, _>((Bound::Included(p), Bound::Unbounded))
                    .take_while(|(t, _)| t.starts_with(p))
                    .map(|(t, _)| t.clone()),
            );
        }
        doomed.sort_unstable();
        doomed.dedup();
        doomed.retain(|t| self.msgs.contains_key(t));
        for t in &doomed {
            self.remove(t);
        }
        doomed
    }

    pub(crate) fn len(&self) -> usize {
        self.msgs.len()
    }

    /// Bytes of the retained messages clients published (all owners together).
    pub(super) fn client_bytes(&self) -> usize {
        self.clients.bytes
    }
}

impl Shared {
    /// Store (or, with an empty payload, clear) a retained message on behalf of `owner` (`None`:
    /// the server). False if a client's message was refused by a retained limit (counted).
    /// The op that makes the change durable is submitted under the table's lock (`stored` is
    /// set), so two publishers of one topic reach the store in the order the table saw them.
    pub(crate) fn store_retained(
        &self,
        msg: &Arc<Message>,
        owner: Option<&Owner>,
        stored: &mut bool,
    ) -> bool {
        let mut retained = lock(&self.retained);
        if msg.payload.is_empty() {
            retained.remove(&msg.topic);
            if self.persist.is_some() {
                self.detach(vec![StateOp::DeleteRetained {
                    topic: msg.topic.clone(),
                }]);
                *stored = true;
            }
            return true;
        }
        let mut expired = Vec::new();
        let fits = retained.make_room(&self.config, owner, msg, &mut expired);
        self.delete_retained(expired);
        if !fits {
            drop(retained);
            self.counters.refuse(Refusal::RetainedQuota);
            return false;
        }
        let expires_at = expiry_instant(msg);
        retained.insert(msg.clone(), expires_at, owner.cloned());
        if self.persist.is_some() {
            self.detach(vec![StateOp::PutRetained {
                topic: msg.topic.clone(),
                value: RetainedValue {
                    owner: owner.cloned(),
                    msg: (**msg).clone(),
                    expires_at_ms: self.wall_ms(expires_at),
                }
                .encode(),
            }]);
            *stored = true;
        }
        true
    }

    /// Whether `owner` could store this retained message now (a check before the message is
    /// accepted; [`Shared::store_retained`] decides).
    /// A retained message another node accepted (and made durable): kept in memory under its
    /// owner, replacing what was there, without a quota check or a write.
    pub(crate) fn store_retained_from_peer(&self, msg: &Arc<Message>, owner: Option<Owner>) {
        let mut retained = lock(&self.retained);
        if msg.payload.is_empty() {
            retained.remove(&msg.topic);
            return;
        }
        retained.insert(msg.clone(), expiry_instant(msg), owner);
    }

    pub(crate) fn retained_fits(&self, msg: &Message, owner: &Owner) -> bool {
        if msg.payload.is_empty() {
            return true;
        }
        let mut retained = lock(&self.retained);
        let mut expired = Vec::new();
        let fits = retained.make_room(&self.config, Some(owner), msg, &mut expired);
        self.delete_retained(expired);
        fits
    }

    /// Retained messages the table removed (expired ones given back for room, a removed
    /// device's) leave the store too. Called under the table's lock, for order.
    pub(super) fn delete_retained(&self, topics: Vec<String>) {
        if self.persist.is_some() && !topics.is_empty() {
            self.detach(
                topics
                    .into_iter()
                    .map(|topic| StateOp::DeleteRetained { topic })
                    .collect(),
            );
        }
    }

    /// Retained messages whose topic matches `filter`. Only the topics sharing the filter's
    /// literal prefix (the text before its first wildcard) are examined, so a device subscribing
    /// to `devices/<id>/shadow/delta` costs O(log retained), not a scan of every retained topic.
    /// A filter starting with a wildcard (`#`, `+/...`) still scans them all.
    pub(crate) fn retained_matching(&self, filter: &str) -> Vec<(Arc<Message>, Option<Instant>)> {
        let retained = lock(&self.retained);
        let prefix = retained_prefix(filter);
        retained
            .msgs
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(topic, _)| topic.starts_with(prefix))
            .filter(|(topic, _)| filter_matches(filter, topic))
            .map(|(_, r)| (r.msg.clone(), r.expires_at))
            .collect()
    }
}

/// Every topic `filter` matches starts with this: the text before the first wildcard, minus the
/// `/` that precedes it (`a/#` matches `a` itself).
fn retained_prefix(filter: &str) -> &str {
    let literal = filter.find(['+', '#']).map_or(filter, |i| &filter[..i]);
    literal.strip_suffix('/').unwrap_or(literal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retained_prefix_is_a_prefix_of_every_matching_topic() {
        assert_eq!(
            retained_prefix("devices/d1/shadow/delta"),
            "devices/d1/shadow/delta"
        );
        assert_eq!(
            retained_prefix("devices/d1/commands/+"),
            "devices/d1/commands"
        );
        assert_eq!(retained_prefix("devices/d1/#"), "devices/d1");
        assert_eq!(retained_prefix("#"), "");
        assert_eq!(retained_prefix("+/x"), "");
        assert_eq!(retained_prefix("a//#"), "a/");
        for (filter, topic) in [
            ("devices/d1/#", "devices/d1"),
            ("a//#", "a/"),
            ("a/+", "a/"),
            ("a/#", "a"),
        ] {
            assert!(filter_matches(filter, topic));
            assert!(
                topic.starts_with(retained_prefix(filter)),
                "{filter} {topic}"
            );
        }
    }
}
