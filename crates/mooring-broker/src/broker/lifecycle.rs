//! A session's life on the broker side: its subscriptions in the index, retirement, and the expiry and will timers.

use super::{lock, write, SessionKey, SessionRef, Shared, Target};
use crate::hooks::Message;
use crate::persist::StateOp;
use crate::session::{Session, SubOptions};
use mooring_proto::topic::is_shared_filter;
use std::sync::Arc;

impl Shared {
    /// Add or replace a subscription of `session` (whose lock the caller holds as `s`), in the
    /// session and in the index. A retired session (ended, or replaced by a clean start while
    /// its old connection is still closing) keeps it to itself: routing never sees it.
    pub(crate) fn add_subscription(
        &self,
        session: &SessionRef,
        s: &mut Session,
        filter: String,
        opts: SubOptions,
    ) {
        if !s.retired && is_shared_filter(&filter) {
            self.join_group(session, s, &filter);
        } else if !s.retired {
            let mut index = write(&self.subs);
            index.insert(
                &filter,
                s.id,
                Target {
                    session: session.clone(),
                    opts,
                },
            );
            s.subs_generation = index.generation();
        }
        s.subs.insert(filter, opts);
    }

    /// Remove a subscription of the session whose lock the caller holds; false if it had none.
    pub(crate) fn remove_subscription(&self, s: &mut Session, filter: &str) -> bool {
        if s.subs.remove(filter).is_none() {
            return false;
        }
        if !s.retired && is_shared_filter(filter) {
            self.leave_group(s, filter);
        } else if !s.retired {
            let mut index = write(&self.subs);
            index.remove(filter, &s.id);
            s.subs_generation = index.generation();
        }
        true
    }

    /// The session has left the table (ended, expired, or replaced by a clean start): drop its
    /// subscriptions from the index and mark it so none is added again. Caller holds its lock.
    pub(crate) fn retire(&self, s: &mut Session) {
        if s.retired {
            return;
        }
        if let Some(p) = s.persist.take() {
            self.detach(vec![StateOp::DeleteSession { key: p.key }]);
        }
        s.retired = true;
        if s.subs.is_empty() {
            return;
        }
        let mut index = write(&self.subs);
        for filter in s.subs.keys() {
            index.remove(filter, &s.id);
        }
        s.subs_generation = index.generation();
        drop(index);
        self.leave_all_groups(s);
        s.subs.clear();
    }

    /// End the session under `key` after `after` unless it was attached again meanwhile
    /// (`generation` moved) or replaced.
    pub(crate) fn expire_after(
        self: &Arc<Self>,
        session: SessionRef,
        key: SessionKey,
        generation: u64,
        after: std::time::Duration,
    ) {
        let shared = self.clone();
        self.spawn_timer(async move {
            tokio::time::sleep(after).await;
            let mut table = lock(&shared.sessions);
            let mut s = lock(&session);
            if s.link.is_none()
                && s.generation == generation
                && table.remove_if_same(&key, &session)
            {
                shared.retire(&mut s);
            }
            drop(s);
            drop(table);
            // What it held through shared subscriptions goes to another member.
            shared.redeliver_shared(&session);
        });
    }

    /// Publish a session's will after `after` unless the session was attached again meanwhile
    /// (`generation` moved), its principal was removed, or the policy no longer allows it. A
    /// persisted session forgets its stored will once it fired.
    pub(crate) fn will_after(
        self: &Arc<Self>,
        session: SessionRef,
        generation: u64,
        client_id: String,
        msg: Message,
        after: std::time::Duration,
    ) {
        let shared = self.clone();
        self.spawn_timer(async move {
            tokio::time::sleep(after).await;
            let (current, principal_now) = {
                let mut s = lock(&session);
                let current = s.generation == generation && !s.removed;
                if current && s.will.take().is_some() {
                    if let Some(op) = shared.session_op(&s, s.link.is_none()) {
                        shared.detach(vec![op]);
                    }
                }
                (current, s.principal.clone())
            };
            if current && shared.hooks.may_publish(&principal_now, &msg.topic) {
                shared.publish_as(&principal_now, &client_id, msg).await;
            }
        });
    }

    pub(crate) fn spawn_timer<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut timers = lock(&self.timers);
        // Reap finished timers so the set stays bounded by the live ones.
        while timers.try_join_next().is_some() {}
        timers.spawn(fut);
    }
}
