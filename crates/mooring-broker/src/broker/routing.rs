//! Routing: one accepted message fanned out to every matching session's queue, and server-originated messages.

use super::{lock, read, Broker, Owner, PrincipalKey, Refusal, SessionId, SessionRef, Shared};
use crate::hooks::{Message, PublishVerdict};
use crate::session::{Delivery, Enqueue, Session, SubOptions};
use mooring_proto::policy::Principal;
use mooring_proto::topic::{filter_matches, is_shared_filter};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::time::Instant;

impl Broker {
    /// Publish a message originated by the server; routed (and retained) like any publish.
    /// Server-owned retained messages are never refused by the retained limits (they are
    /// bounded by what the server publishes, e.g. one shadow delta per device).
    pub fn publish(&self, msg: Message) {
        self.shared
            .counters
            .messages_in
            .fetch_add(1, Ordering::Relaxed);
        let msg = Arc::new(msg);
        if msg.retain {
            self.shared.store_retained(&msg, None, &mut false);
        }
        self.shared.route(msg.clone(), None);
        self.shared.forward(None, &msg);
    }

    /// Retains (in memory: the node that accepted it made it durable) and routes a message
    /// another node's broker accepted, as its [`crate::Hooks::on_routed`] encoded it. Retained
    /// quotas were checked where it was accepted. `false` (and nothing done) if the bytes are
    /// not a forwarded message.
    pub fn route_forwarded(&self, forwarded: &[u8]) -> bool {
        let Some((owner, msg)) = crate::persist::decode_forwarded(forwarded) else {
            return false;
        };
        self.shared
            .counters
            .messages_in
            .fetch_add(1, Ordering::Relaxed);
        let msg = Arc::new(msg);
        if msg.retain {
            self.shared.store_retained_from_peer(&msg, owner);
        }
        self.shared.route(msg, None);
        true
    }

    /// Publish a server-originated message to one principal only: enqueued if a connected
    /// session of `who` holds a subscription matching the topic (at the highest granted QoS).
    /// Sessions are found by principal, never by client id, so no other client can receive it.
    /// Returns what happened (`Refused` also when no connected session of `who` holds a
    /// matching subscription). Not retained, not routed to anyone else.
    pub fn publish_to(&self, who: &PrincipalKey, msg: Message) -> Enqueue {
        let sessions: Vec<SessionRef> = lock(&self.shared.sessions)
            .of_owner(&who.0)
            .cloned()
            .collect();
        let msg = Arc::new(msg);
        for session in sessions {
            let mut s = lock(&session);
            if s.link.is_none() {
                continue;
            }
            let grant = merge_grants(
                s.subs
                    .iter()
                    .filter(|(filter, _)| filter_matches(filter, &msg.topic))
                    .map(|(_, o)| *o),
                false,
            );
            let Some(grant) = grant else {
                continue;
            };
            let d = Delivery {
                qos: grant.qos.min(msg.qos),
                msg: msg.clone(),
                retain: false,
                expires_at: None,
                sub_ids: grant.sub_ids,
                seq: 0,
                shared: None,
            };
            let outcome = self.shared.enqueue(&mut s, d, &mut false);
            drop(s);
            if outcome.is_enqueued() {
                self.shared
                    .counters
                    .messages_in
                    .fetch_add(1, Ordering::Relaxed);
            }
            return outcome;
        }
        Enqueue::Refused
    }

    /// [`Broker::publish_to`] the device `device_id`.
    pub fn publish_to_device(&self, device_id: &str, msg: Message) -> Enqueue {
        self.publish_to(&PrincipalKey::device(device_id), msg)
    }

    /// Whether a connected session of `who` is subscribed to a filter matching `topic`.
    pub fn is_subscribed(&self, who: &PrincipalKey, topic: &str) -> bool {
        let table = lock(&self.shared.sessions);
        let subscribed = table.of_owner(&who.0).any(|session| {
            let s = lock(session);
            s.link.is_some() && s.subs.keys().any(|f| filter_matches(f, topic))
        });
        subscribed
    }

    /// Whether a connected session of this device is subscribed to a filter matching `topic`.
    pub fn device_is_subscribed(&self, device_id: &str, topic: &str) -> bool {
        self.is_subscribed(&PrincipalKey::device(device_id), topic)
    }
}

impl Shared {
    /// Route one accepted message: enqueue it to every matching session, once per session at the
    /// highest QoS its matching filters grant. (The caller stores a retained message first,
    /// through [`Shared::store_retained`].)
    ///
    /// Two phases so no broker-wide lock is held while sessions are touched: (1) under the index
    /// read lock, collect the matching `(session, options)` entries and the index generation;
    /// (2) release it and, one session at a time under that session's lock, merge its entries and
    /// enqueue. A session whose subscriptions changed after phase 1 (`subs_generation` newer than
    /// what phase 1 saw: an UNSUBSCRIBE, a new SUBSCRIBE, or its end) is judged on its current
    /// filters instead, under its lock, so a message is never delivered on a subscription that
    /// was already removed (the same per-session atomicity the single table lock used to give).
    /// What it queued for persisted sessions is submitted to the store as it goes (see
    /// `enqueue`); returns whether there was any (the caller acknowledges the message only once
    /// that is durable: [`Shared::barrier`]).
    pub(crate) fn route(&self, msg: Arc<Message>, publisher: Option<&str>) -> bool {
        let mut stored = false;
        let expires_at = expiry_instant(&msg);
        // Shared subscriptions: one member of each matching group (shared_sub.rs).
        self.route_shared(&msg, expires_at, &mut stored);
        let mut targets: Vec<(SessionId, SubOptions, SessionRef)> = Vec::new();
        let seen = {
            let index = read(&self.subs);
            index.for_each_match(&msg.topic, |id, t| {
                targets.push((*id, t.opts, t.session.clone()));
            });
            index.generation()
        };
        if targets.is_empty() {
            return stored;
        }
        // Group a session's filters together (a session can match through several).
        targets.sort_unstable_by_key(|t| t.0);
        for group in targets.chunk_by(|a, b| a.0 == b.0) {
            let session = &group[0].2;
            let mut s = lock(session);
            let own = publisher == Some(s.client_id.as_str());
            let best = if s.retired {
                // Left the table after phase 1: routing no longer reaches it.
                None
            } else if s.subs_generation > seen {
                merge_grants(
                    s.subs
                        .iter()
                        .filter(|(filter, _)| {
                            !is_shared_filter(filter) && filter_matches(filter, &msg.topic)
                        })
                        .map(|(_, o)| *o),
                    own,
                )
            } else {
                merge_grants(group.iter().map(|t| t.1), own)
            };
            if let Some(grant) = best {
                let d = Delivery {
                    msg: msg.clone(),
                    qos: grant.qos.min(msg.qos),
                    retain: msg.retain && grant.retain_as_published,
                    expires_at,
                    sub_ids: grant.sub_ids,
                    seq: 0,
                    shared: None,
                };
                self.enqueue(&mut s, d, &mut stored);
            }
        }
        stored
    }

    /// A client's accepted message: a retained one is stored within its owner's quota first
    /// (over quota it is delivered without the retain flag), then it is routed. `owner` is only
    /// asked for a retained message. Returns whether anything was submitted to the store (see
    /// `route`).
    pub(crate) fn retain_and_route(
        &self,
        mut msg: Arc<Message>,
        owner: impl FnOnce() -> Owner,
        client_id: &str,
    ) -> bool {
        let mut stored = false;
        let owner = msg.retain.then(owner);
        if msg.retain && !self.store_retained(&msg, owner.as_ref(), &mut stored) {
            Arc::make_mut(&mut msg).retain = false;
        }
        let stored = self.route(msg.clone(), Some(client_id)) || stored;
        self.forward(owner.as_ref().filter(|_| msg.retain), &msg);
        stored
    }

    /// Hands a message accepted here to the embedder for the other nodes, if it wants them.
    fn forward(&self, owner: Option<&Owner>, msg: &Message) {
        if self.hooks.forwards() {
            self.hooks
                .on_routed(crate::persist::encode_forwarded(owner, msg));
        }
    }

    /// Queue a delivery on a session (whose lock the caller holds) within the session's bounds;
    /// a drop (of this message or of older QoS 0 ones) is counted. A QoS 1/2 delivery to a
    /// persisted session gets its `seq` and is submitted to the store (`stored` is set) before
    /// the session's lock is released: once it is released, the session's connection may send
    /// the message, get it acknowledged and submit its delete, which must come after the put
    /// (a put applied after its delete would stay stored for the session's life, and come back
    /// after a restart as a second delivery).
    pub(crate) fn enqueue(&self, s: &mut Session, mut d: Delivery, stored: &mut bool) -> Enqueue {
        let online = s.link.is_some();
        let qos = d.qos;
        let op = match s.persist_key() {
            Some(key) if qos > 0 && d.seq == 0 => {
                d.seq = self.msg_seq.fetch_add(1, Ordering::Relaxed);
                Some(self.put_message(key, &d, None))
            }
            _ => None,
        };
        let outcome = s.enqueue(
            d,
            self.config.session_queue_len_max,
            self.config.session_queue_bytes_max,
        );
        let dropped = match outcome {
            Enqueue::Enqueued => false,
            Enqueue::EnqueuedDroppedOldest => true,
            // An offline session not taking QoS 0 is no drop: it never asked for it.
            Enqueue::Refused => online || qos > 0,
        };
        if dropped {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            self.counters.refuse(Refusal::QueueFull);
        }
        if let (true, Some(op)) = (outcome.is_enqueued(), op) {
            self.detach(vec![op]);
            *stored = true;
        }
        outcome
    }

    /// Run a will (or any broker-side publish on behalf of a client) through `on_publish` and route it.
    pub(crate) async fn publish_as(&self, principal: &Principal, client_id: &str, msg: Message) {
        match self.hooks.on_publish(principal, client_id, &msg).await {
            PublishVerdict::Accept => {
                self.counters.messages_in.fetch_add(1, Ordering::Relaxed);
                self.retain_and_route(Arc::new(msg), || Owner::of(principal), client_id);
            }
            PublishVerdict::Reject(code) => {
                tracing::debug!(client_id, code, topic = %msg.topic, "will rejected by on_publish");
            }
            PublishVerdict::Failed(_) | PublishVerdict::Disconnect => {
                tracing::warn!(client_id, topic = %msg.topic, "will dropped: on_publish failed");
            }
        }
    }
}

/// When a message's v5 Message Expiry Interval (if any) runs out, counted from now.
pub(super) fn expiry_instant(msg: &Message) -> Option<Instant> {
    msg.props
        .message_expiry_secs
        .map(|s| Instant::now() + std::time::Duration::from_secs(u64::from(s)))
}

/// How one message goes to one session, merged over its matching subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    qos: u8,
    retain_as_published: bool,
    /// Every matching subscription's identifier, ascending, once each.
    sub_ids: Vec<u32>,
}

/// Highest granted QoS, retain-as-published and the subscription identifiers over a session's
/// matching filters; a `no_local` filter does not count for the session's own messages.
/// `None`: nothing to deliver.
fn merge_grants(opts: impl Iterator<Item = SubOptions>, own: bool) -> Option<Grant> {
    let mut grant =
        opts.filter(|o| !(o.no_local && own))
            .fold(None, |best: Option<Grant>, o| {
                let mut g = best.unwrap_or(Grant {
                    qos: 0,
                    retain_as_published: false,
                    sub_ids: Vec::new(),
                });
                g.qos = g.qos.max(o.qos);
                g.retain_as_published |= o.retain_as_published;
                g.sub_ids.extend(o.sub_id);
                Some(g)
            })?;
    grant.sub_ids.sort_unstable();
    grant.sub_ids.dedup();
    Some(grant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_grant_is_the_highest_qos_and_skips_no_local_for_own_messages() {
        let o = |qos, no_local, retain_as_published, sub_id| SubOptions {
            qos,
            no_local,
            retain_as_published,
            sub_id,
        };
        let g = |qos, retain_as_published, sub_ids: &[u32]| {
            Some(Grant {
                qos,
                retain_as_published,
                sub_ids: sub_ids.to_vec(),
            })
        };
        let opts = [
            o(0, false, false, Some(7)),
            o(2, true, false, Some(3)),
            o(1, false, true, None),
            o(1, false, false, Some(7)),
        ];
        assert_eq!(merge_grants(opts.into_iter(), false), g(2, true, &[3, 7]));
        assert_eq!(merge_grants(opts.into_iter(), true), g(1, true, &[7]));
        assert_eq!(
            merge_grants([o(2, true, true, None)].into_iter(), true),
            None
        );
        assert_eq!(merge_grants(std::iter::empty(), false), None);
    }
}
