//! When a principal changes or goes: kick, removal, new tags, a policy reload, and the subscriptions they revoke.

use super::{lock, Broker, Control, Owner, PrincipalKey, Refusal, SessionRef, Shared};
use crate::persist::StateOp;
use crate::session::{Delivery, Session};
use mooring_proto::policy::Principal;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Why the embedder closes a principal's connections ([`Broker::kick`]); a v5 client is told in
/// its DISCONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickReason {
    /// v5 DISCONNECT 0x87 (Not authorized): e.g. its credentials were revoked.
    NotAuthorized,
    /// v5 DISCONNECT 0x98 (Administrative action).
    AdministrativeAction,
    /// v5 DISCONNECT 0x8E (Session taken over): the client connected again elsewhere (another
    /// node of a cluster).
    SessionTakenOver,
}

impl Broker {
    /// Disconnect every live connection of the principal `who` (a v5 client is told `reason`).
    pub fn kick(&self, who: &PrincipalKey, reason: KickReason) {
        let table = lock(&self.shared.sessions);
        for session in table.of_owner(&who.0) {
            if let Some(link) = &lock(session).link {
                let _ = link.control.try_send(Control::Kick(reason));
            }
        }
    }

    /// Disconnect every live connection whose principal is this device (v5: DISCONNECT 0x98).
    pub fn kick_device(&self, device_id: &str) {
        self.kick(
            &PrincipalKey::device(device_id),
            KickReason::AdministrativeAction,
        );
    }

    /// The principal `who` is gone: close its live connections (v5 DISCONNECT 0x98, no will),
    /// end its sessions, live or persisted (their queued messages go with them), and remove the
    /// retained messages it published plus every retained message under `topic_prefix` (the
    /// server passes `devices/<id>/` for a device, so its shadow delta goes too). A principal
    /// re-created under the same key starts with nothing. Returns the number of retained
    /// messages removed.
    pub fn remove_principal(&self, who: &PrincipalKey, topic_prefix: Option<&str>) -> usize {
        {
            let mut table = lock(&self.shared.sessions);
            self.shared.principal_epoch.fetch_add(1, Ordering::SeqCst);
            for key in table.keys_of(&who.0) {
                let Some(session) = table.remove_key(&key) else {
                    continue;
                };
                let mut s = lock(&session);
                if let Some(link) = &s.link {
                    let _ = link.control.try_send(Control::Removed);
                }
                self.shared.retire(&mut s);
                s.removed = true;
                s.clear_queue();
            }
        }
        // The deletes are submitted under the table's lock, like every retained op, so a
        // publish to one of these topics right after is stored after them.
        let mut retained = lock(&self.shared.retained);
        let topics = retained.remove_where(&who.0, topic_prefix);
        let removed = topics.len();
        self.shared.delete_retained(topics);
        removed
    }

    /// Whether this broker holds any session of `who` (connected or not).
    pub fn holds_sessions(&self, who: &PrincipalKey) -> bool {
        !lock(&self.shared.sessions).keys_of(&who.0).is_empty()
    }

    /// The principal `who` connected to another broker of a cluster, which owns its sessions
    /// from now on: close its live connections here (v5 DISCONNECT 0x8E, no will) and forget
    /// its sessions without touching their stored state (the other broker writes that now).
    /// Returns how many sessions were handed over.
    pub fn hand_over(&self, who: &PrincipalKey) -> usize {
        let mut table = lock(&self.shared.sessions);
        self.shared.principal_epoch.fetch_add(1, Ordering::SeqCst);
        let keys = table.keys_of(&who.0);
        let n = keys.len();
        for key in keys {
            self.hand_over_locked(&mut table, &key);
        }
        n
    }

    /// [`Broker::hand_over`] for the one session stored under `key`
    /// ([`crate::persist::stored_session_key`]), if it belongs to `owner`: its client connected
    /// to another broker. `false` if this broker holds no such session (another principal's
    /// session under the same client id is never touched).
    pub fn hand_over_stored(&self, key: &str, owner: &PrincipalKey) -> bool {
        let Some(key) = crate::persist::parse_session_key(key) else {
            return false;
        };
        let mut table = lock(&self.shared.sessions);
        if table.get(&key).is_none_or(|e| e.owner != owner.0) {
            return false;
        }
        self.shared.principal_epoch.fetch_add(1, Ordering::SeqCst);
        self.hand_over_locked(&mut table, &key)
    }

    /// Whether this broker holds a session of `owner` under the stored key `key`.
    pub fn holds_stored(&self, key: &str, owner: &PrincipalKey) -> bool {
        crate::persist::parse_session_key(key).is_some_and(|k| {
            lock(&self.shared.sessions)
                .get(&k)
                .is_some_and(|e| e.owner == owner.0)
        })
    }

    fn hand_over_locked(&self, table: &mut super::SessionTable, key: &super::SessionKey) -> bool {
        let Some(session) = table.remove_key(key) else {
            return false;
        };
        let mut s = lock(&session);
        if let Some(link) = &s.link {
            let _ = link
                .control
                .try_send(Control::Kick(KickReason::SessionTakenOver));
        }
        // No longer ours to write: retiring it must not delete what the new owner stores.
        s.persist = None;
        self.shared.retire(&mut s);
        s.removed = true;
        s.clear_queue();
        true
    }

    /// The device is gone: [`Broker::remove_principal`] for it.
    pub fn remove_device(&self, device_id: &str, topic_prefix: Option<&str>) -> usize {
        self.remove_principal(&PrincipalKey::device(device_id), topic_prefix)
    }

    /// The embedder's view of a principal changed (e.g. a device's tags): every session of that
    /// principal ([`PrincipalKey::of`]), live or persisted, uses it from now on (every later
    /// PUBLISH and SUBSCRIBE is checked against it), and subscriptions it no longer allows are
    /// removed at once. Returns the number of subscriptions removed.
    pub fn update_principal(&self, principal: Principal) -> usize {
        let owner = Owner::of(&principal);
        let sessions: Vec<SessionRef> = {
            let table = lock(&self.shared.sessions);
            self.shared.principal_epoch.fetch_add(1, Ordering::SeqCst);
            table.of_owner(&owner).cloned().collect()
        };
        let principal = Arc::new(principal);
        let mut removed = 0;
        for session in sessions {
            let mut s = lock(&session);
            s.principal = principal.clone();
            let offline = s.link.is_none();
            let revoked = self.shared.revoke_disallowed(&mut s, offline);
            if revoked == 0 {
                // Stored with the new principal (a revocation stores it already), which is what
                // a restored session is judged by until its client is back.
                if let Some(op) = self.shared.session_op(&s, offline) {
                    self.shared.detach(vec![op]);
                }
            }
            removed += revoked;
        }
        removed
    }

    /// The policy changed (e.g. reloaded): check every session's subscriptions again and remove
    /// what is no longer allowed. Returns the number removed.
    pub fn reauthorize_all(&self) -> usize {
        let sessions: Vec<SessionRef> = lock(&self.shared.sessions).sessions().cloned().collect();
        sessions
            .iter()
            .map(|session| {
                let mut s = lock(session);
                let offline = s.link.is_none();
                self.shared.revoke_disallowed(&mut s, offline)
            })
            .sum()
    }
}

impl Shared {
    /// Remove the subscriptions of a session (whose lock the caller holds) that its current
    /// principal may no longer hold; each is logged and counted. What they already queued goes
    /// too (a delivery stays only if a remaining filter matches it), and so do unacknowledged
    /// deliveries not yet resent when `purge_inflight` (the session is offline or being resumed:
    /// nothing of it is on the wire of a live connection). Returns how many filters were removed.
    pub(crate) fn revoke_disallowed(&self, s: &mut Session, purge_inflight: bool) -> usize {
        let principal = s.principal.clone();
        let revoked: Vec<String> = s
            .subs
            .keys()
            .filter(|f| !self.hooks.may_subscribe(&principal, f))
            .cloned()
            .collect();
        for filter in &revoked {
            self.remove_subscription(s, filter);
            self.counters.refuse(Refusal::SubscriptionRevoked);
            tracing::info!(client_id = %s.client_id, filter = %filter, "subscription no longer allowed by the policy; removed");
        }
        if !revoked.is_empty() {
            let subs: Vec<String> = s.subs.keys().cloned().collect();
            let allowed = |d: &Delivery| crate::shared_sub::still_subscribed(&subs, d);
            let mut dropped = s.retain_queue(allowed);
            let queued = dropped.len();
            if purge_inflight {
                s.inflight.retain(|i| {
                    let keep = allowed(&i.delivery);
                    if !keep {
                        dropped.push(i.delivery.seq);
                    }
                    keep
                });
            }
            if queued > 0 {
                tracing::info!(client_id = %s.client_id, dropped = queued, "queued messages of revoked subscriptions dropped");
            }
            let mut ops = Vec::new();
            if let Some(key) = s.persist_key() {
                for seq in dropped.into_iter().filter(|seq| *seq != 0) {
                    ops.push(StateOp::DeleteMessage {
                        session: key.to_owned(),
                        seq,
                    });
                }
            }
            ops.extend(self.session_op(s, s.link.is_none()));
            self.detach(ops);
        }
        revoked.len()
    }
}
