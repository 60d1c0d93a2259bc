//! Shared subscriptions (`$share/<group>/<filter>`): a group of sessions that splits a filter's messages between its members.
//!
//! A session holds a shared subscription in its `subs` under the full `$share/<group>/<filter>`
//! text (so UNSUBSCRIBE, the per-session quota and re-authorization treat it like any other
//! filter); the group lives here, in [`Groups`], never in the subscription index.
//!
//! * Scope: a group is identified by its owner (the principal that holds the sessions: a device,
//!   one service token, or the dev listener) together with the subscription text. Two service
//!   tokens subscribing `$share/workers/devices/+/telemetry` form two groups, and each gets every
//!   message: a principal can never join another's group to take part of its stream.
//! * Routing: every matching group gets each message once, besides (and independently of) the
//!   ordinary subscribers. Within a group the member is chosen round robin, preferring an online
//!   member whose queue has room, then any online member, then (QoS 1/2 only) an offline
//!   persistent member, whose session queues it.
//! * Leaving: when a member's connection ends, the messages it holds through the group and has
//!   not had acknowledged move to another member ([`Shared::redeliver_shared`]): if its session
//!   ended, every queued one and every one sent but not acknowledged (QoS 1 and 2 before PUBREC)
//!   go to another member, online or not; if the session persists, only its queued ones and its
//!   unacknowledged QoS 1 ones move, and only to a member online now (otherwise the session keeps
//!   them, and QoS 2 always completes with the client it was sent to). A message moves at most
//!   once (a message that takes down every worker it reaches is not passed around for ever);
//!   moves are counted in [`crate::BrokerStats::shared_redelivered`].
//! * Bounds: a member is one subscription of its session (within
//!   `subscriptions_per_session_max`); a group is removed with its last member, so groups and
//!   members are bounded by the subscriptions sessions hold.
//!
//! Locking: `Shared::groups` is a leaf lock like the subscription index. Routing copies the
//! matching groups' member lists (one `Arc` each) under its read lock, releases it, and then
//! locks members one at a time, judging each on its current subscriptions, so a member that
//! unsubscribed or ended after the copy is skipped.

use crate::broker::{lock, read, write, Owner, SessionId, SessionRef, Shared};
use crate::hooks::Message;
use crate::index::SubIndex;
use crate::persist::StateOp;
use crate::session::{Delivery, InflightState, Session, SubOptions};
use mooring_proto::topic::{is_shared_filter, parse_shared_filter};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

/// The group a delivery came through; kept with it in the queue and the inflight window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Via {
    /// The subscription as its members hold it: `$share/<group>/<filter>`.
    pub(crate) subscription: Arc<str>,
    /// Moved here from a member that left: it is not moved again.
    pub(crate) redelivered: bool,
}

type GroupId = u64;

/// (owner, `$share/<group>/<filter>`).
type GroupKey = (Owner, Arc<str>);

#[derive(Clone)]
struct Member {
    id: SessionId,
    session: SessionRef,
}

struct Group {
    key: GroupKey,
    /// Copy on write: routing takes a snapshot (one `Arc` clone) under the read lock.
    members: Arc<Vec<Member>>,
    /// Round-robin position: moved once per message routed to the group.
    next: AtomicUsize,
}

/// Every shared-subscription group, with an index from inner filter to the groups using it.
#[derive(Default)]
pub(crate) struct Groups {
    index: SubIndex<GroupId, ()>,
    groups: HashMap<GroupId, Group>,
    ids: HashMap<GroupKey, GroupId>,
    next_id: GroupId,
    /// Members of all groups (each one subscription of one session).
    members: usize,
}

/// A snapshot of one group for delivering one message.
struct Pick {
    subscription: Arc<str>,
    members: Arc<Vec<Member>>,
    start: usize,
}

impl Groups {
    /// Number of groups.
    pub(crate) fn len(&self) -> usize {
        self.groups.len()
    }

    /// Number of members over all groups.
    pub(crate) fn members(&self) -> usize {
        self.members
    }

    fn join(&mut self, key: GroupKey, inner: &str, member: Member) {
        let id = match self.ids.get(&key) {
            Some(id) => *id,
            None => {
                let id = self.next_id;
                self.next_id += 1;
                self.index.insert(inner, id, ());
                self.ids.insert(key.clone(), id);
                self.groups.insert(
                    id,
                    Group {
                        key,
                        members: Arc::new(Vec::new()),
                        next: AtomicUsize::new(0),
                    },
                );
                id
            }
        };
        let group = self.groups.get_mut(&id).expect("ids and groups agree");
        if group.members.iter().all(|m| m.id != member.id) {
            Arc::make_mut(&mut group.members).push(member);
            self.members += 1;
        }
    }

    fn leave(&mut self, key: &GroupKey, inner: &str, member: SessionId) {
        let Some(&id) = self.ids.get(key) else {
            return;
        };
        let group = self.groups.get_mut(&id).expect("ids and groups agree");
        let Some(pos) = group.members.iter().position(|m| m.id == member) else {
            return;
        };
        Arc::make_mut(&mut group.members).remove(pos);
        self.members -= 1;
        if group.members.is_empty() {
            self.groups.remove(&id);
            self.ids.remove(key);
            self.index.remove(inner, &id);
        }
    }

    /// The groups whose filter matches `topic`, each with its next round-robin position.
    fn matching(&self, topic: &str) -> Vec<Pick> {
        let mut picks = Vec::new();
        self.index.for_each_match(topic, |id, _| {
            if let Some(g) = self.groups.get(id) {
                picks.push(g.pick());
            }
        });
        picks
    }

    fn get(&self, key: &GroupKey) -> Option<Pick> {
        self.ids
            .get(key)
            .and_then(|id| self.groups.get(id))
            .map(Group::pick)
    }
}

impl Group {
    fn pick(&self) -> Pick {
        Pick {
            subscription: self.key.1.clone(),
            members: self.members.clone(),
            start: self.next.fetch_add(1, Ordering::Relaxed),
        }
    }
}

/// Whether a queued or inflight delivery is still covered by the subscriptions `subs` (filters
/// and `$share/...` texts): one that came through a group needs that group's subscription.
pub(crate) fn still_subscribed(subs: &[String], d: &Delivery) -> bool {
    match &d.shared {
        Some(via) => subs.iter().any(|f| **f == *via.subscription),
        None => subs
            .iter()
            .any(|f| !is_shared_filter(f) && mooring_proto::topic::filter_matches(f, &d.msg.topic)),
    }
}

/// Where a group member may be taken from, in order of preference.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Online, with room in its queue.
    Room,
    /// Online.
    Online,
    /// Offline (a persistent session): QoS 1/2 only.
    Offline,
}

fn delivery(
    msg: &Arc<Message>,
    opts: SubOptions,
    expires_at: Option<Instant>,
    via: Via,
) -> Delivery {
    Delivery {
        msg: msg.clone(),
        qos: opts.qos.min(msg.qos),
        retain: msg.retain && opts.retain_as_published,
        expires_at,
        sub_ids: opts.sub_id.into_iter().collect(),
        seq: 0,
        shared: Some(via),
    }
}

impl Shared {
    /// `s` (locked by the caller; not retired) holds the shared subscription `subscription`:
    /// make it a member of that group.
    pub(crate) fn join_group(&self, session: &SessionRef, s: &Session, subscription: &str) {
        let Some(shared) = parse_shared_filter(subscription) else {
            debug_assert!(
                false,
                "invalid shared filter reached the broker: {subscription}"
            );
            return;
        };
        let key = (Owner::of(&s.principal), Arc::from(subscription));
        let member = Member {
            id: s.id,
            session: session.clone(),
        };
        write(&self.groups).join(key, shared.filter, member);
    }

    /// `s` (locked by the caller) no longer holds `subscription`.
    pub(crate) fn leave_group(&self, s: &Session, subscription: &str) {
        self.leave_groups(s, std::iter::once(subscription));
    }

    /// `s` (locked by the caller) is retired: it leaves every group it is in.
    pub(crate) fn leave_all_groups(&self, s: &Session) {
        let subs: Vec<&String> = s.subs.keys().filter(|f| is_shared_filter(f)).collect();
        if !subs.is_empty() {
            self.leave_groups(s, subs.into_iter().map(String::as_str));
        }
    }

    fn leave_groups<'a>(&self, s: &Session, subscriptions: impl Iterator<Item = &'a str>) {
        let owner = Owner::of(&s.principal);
        let mut groups = write(&self.groups);
        for subscription in subscriptions {
            let Some(shared) = parse_shared_filter(subscription) else {
                continue;
            };
            let key = (owner.clone(), Arc::from(subscription));
            groups.leave(&key, shared.filter, s.id);
        }
    }

    /// Deliver `msg` to one member of every group whose filter matches its topic.
    pub(crate) fn route_shared(
        &self,
        msg: &Arc<Message>,
        expires_at: Option<Instant>,
        stored: &mut bool,
    ) {
        let picks = {
            let groups = read(&self.groups);
            if groups.len() == 0 {
                return;
            }
            groups.matching(&msg.topic)
        };
        for pick in picks {
            let via = Via {
                subscription: pick.subscription.clone(),
                redelivered: false,
            };
            self.deliver_to_group(&pick, None, true, stored, |opts| {
                delivery(msg, opts, expires_at, via.clone())
            });
        }
    }

    /// Enqueue a delivery (made by `make` from the member's subscription options) on one member
    /// of the group, other than `exclude`, chosen round robin from `pick.start` (see [`Pass`]).
    /// False if no member took it. (`stored`: see [`Shared::enqueue`].)
    fn deliver_to_group(
        &self,
        pick: &Pick,
        exclude: Option<SessionId>,
        offline_ok: bool,
        stored: &mut bool,
        make: impl Fn(SubOptions) -> Delivery,
    ) -> bool {
        let members = &pick.members;
        let n = members.len();
        for pass in [Pass::Room, Pass::Online, Pass::Offline] {
            if pass == Pass::Offline && !offline_ok {
                break;
            }
            for i in 0..n {
                let m = &members[(pick.start + i) % n];
                if Some(m.id) == exclude {
                    continue;
                }
                let mut s = lock(&m.session);
                if s.retired {
                    continue;
                }
                let Some(opts) = s.subs.get(&*pick.subscription).copied() else {
                    continue;
                };
                let d = make(opts);
                let online = s.link.is_some();
                let take = match pass {
                    Pass::Room => {
                        online
                            && s.queue.len() < self.config.session_queue_len_max
                            && s.queue_bytes + d.size() <= self.config.session_queue_bytes_max
                    }
                    Pass::Online => online,
                    Pass::Offline => !online && d.qos > 0,
                };
                if take {
                    return self.enqueue(&mut s, d, stored).is_enqueued();
                }
            }
        }
        false
    }

    /// A member left: its connection ended, or its session ended (retired). Move what it holds
    /// through shared subscriptions and has not had acknowledged to other members of the same
    /// groups (see the module docs for what moves when). Call with no session locked.
    pub(crate) fn redeliver_shared(&self, session: &SessionRef) {
        let mut ops = Vec::new();
        self.redeliver_shared_into(session, &mut ops);
        self.detach(ops);
    }

    fn redeliver_shared_into(&self, session: &SessionRef, ops: &mut Vec<StateOp>) {
        let movable = |d: &Delivery| d.shared.as_ref().is_some_and(|v| !v.redelivered);
        let (owner, id, ended, mut wanted) = {
            let s = lock(session);
            if s.link.is_some() && !s.retired {
                // Reconnected meanwhile: it keeps what it has.
                return;
            }
            let ended = s.retired;
            let subs: HashSet<Arc<str>> = s
                .queue
                .iter()
                .chain(
                    s.inflight
                        .iter()
                        .filter(|i| inflight_moves(i, ended))
                        .map(|i| &i.delivery),
                )
                .filter(|d| movable(d))
                .filter_map(|d| d.shared.as_ref().map(|v| v.subscription.clone()))
                .collect();
            if subs.is_empty() {
                return;
            }
            (Owner::of(&s.principal), s.id, ended, subs)
        };
        if !ended {
            // A persistent member keeps its messages unless another member is online now.
            wanted.retain(|sub| self.group_has_other_online(&owner, sub, id));
            if wanted.is_empty() {
                return;
            }
        }
        let wanted_here = |d: &Delivery| {
            movable(d)
                && d.shared
                    .as_ref()
                    .is_some_and(|v| wanted.contains(&v.subscription))
        };
        let taken: Vec<Delivery> = {
            let mut s = lock(session);
            if s.link.is_some() && !s.retired {
                return;
            }
            let mut taken: Vec<Delivery> = Vec::new();
            s.inflight.retain(|i| {
                let take = inflight_moves(i, ended) && wanted_here(&i.delivery);
                if take {
                    taken.push(i.delivery.clone());
                }
                !take
            });
            let queued: Vec<Delivery> =
                s.queue.iter().filter(|d| wanted_here(d)).cloned().collect();
            if !queued.is_empty() {
                s.retain_queue(|d| !wanted_here(d));
                taken.extend(queued);
            }
            // Stored copies leave with them (a retired session's are gone with it already);
            // wherever they go next they are stored again under a new seq.
            if let Some(key) = s.persist_key() {
                for d in taken.iter().filter(|d| d.seq != 0) {
                    ops.push(StateOp::DeleteMessage {
                        session: key.to_owned(),
                        seq: d.seq,
                    });
                }
            }
            for d in &mut taken {
                d.seq = 0;
            }
            taken
        };
        let now = Instant::now();
        for d in taken {
            if d.expires_at.is_some_and(|at| at <= now) {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let Some(via) = d.shared.clone() else {
                continue;
            };
            let pick = read(&self.groups).get(&(owner.clone(), via.subscription.clone()));
            let moved = pick.is_some_and(|pick| {
                let via = Via {
                    redelivered: true,
                    ..via.clone()
                };
                self.deliver_to_group(&pick, Some(id), ended, &mut false, |opts| {
                    delivery(&d.msg, opts, d.expires_at, via.clone())
                })
            });
            if moved {
                self.counters
                    .shared_redelivered
                    .fetch_add(1, Ordering::Relaxed);
            } else if !ended {
                // The other member left meanwhile: the session keeps it after all.
                self.enqueue(&mut lock(session), d, &mut false);
            } else {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Whether the group (`owner`, `subscription`) has an online member other than `id`.
    fn group_has_other_online(
        &self,
        owner: &Owner,
        subscription: &Arc<str>,
        id: SessionId,
    ) -> bool {
        let Some(pick) = read(&self.groups).get(&(owner.clone(), subscription.clone())) else {
            return false;
        };
        pick.members.iter().any(|m| {
            let s = lock(&m.session);
            m.id != id && !s.retired && s.link.is_some() && s.subs.contains_key(&*pick.subscription)
        })
    }
}

/// Whether an unacknowledged delivery moves when its member leaves: one whose PUBREC came back
/// (QoS 2, PUBREL sent) never does; QoS 2 otherwise only when the session ended (a session that
/// persists completes QoS 2 with its own client).
fn inflight_moves(i: &crate::session::Inflight, ended: bool) -> bool {
    i.state == InflightState::AwaitAck && (ended || i.delivery.qos == 1)
}
