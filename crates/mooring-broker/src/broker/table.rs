//! The session table: sessions by (namespace, client id) and by owner, and the principal keys that index them.

use crate::session::{Session, SubOptions};
use mooring_proto::policy::Principal;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// Whose a session or a retained message is. Sessions live in one namespace per kind of
/// principal, so a client id of one kind can never name, resume or take over a session of
/// another kind; within a namespace a session belongs to the principal that created it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Owner {
    Device(String),
    /// A service token, by its id (names are not unique).
    Service(String),
    /// Every anonymous client of the development listener.
    Dev,
    /// A device enrolling with a claim token, by its client id (it has no identity yet).
    Claim(String),
}

/// The session namespaces (see [`Owner`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Namespace {
    Device,
    Service,
    Dev,
    Claim,
}

/// A principal as the broker indexes its sessions and retained messages: every session is found
/// by the key of the principal it belongs to, whatever kind that is. The embedder names whose
/// sessions to act on ([`Broker::kick`], [`Broker::publish_to`], ...) with one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PrincipalKey(pub(crate) Owner);

impl PrincipalKey {
    /// The key of `principal` (its tags or permissions play no part).
    pub fn of(principal: &Principal) -> PrincipalKey {
        PrincipalKey(Owner::of(principal))
    }

    /// The key of the device `device_id` (what the `*_device` methods act on).
    pub fn device(device_id: &str) -> PrincipalKey {
        PrincipalKey(Owner::Device(device_id.to_owned()))
    }

    /// The key of the service token `token_id`.
    pub fn service(token_id: &str) -> PrincipalKey {
        PrincipalKey(Owner::Service(token_id.to_owned()))
    }

    /// The key of the development listener's (anonymous) clients.
    pub fn dev() -> PrincipalKey {
        PrincipalKey(Owner::Dev)
    }

    /// The kind and id of this principal as text (`device:<id>`, `service:<token id>`, `dev`),
    /// and back ([`PrincipalKey::parse`]): for an embedder that names a principal to another
    /// broker.
    pub fn as_text(&self) -> String {
        match &self.0 {
            Owner::Device(id) => format!("device:{id}"),
            Owner::Service(id) => format!("service:{id}"),
            Owner::Dev => "dev".to_owned(),
            Owner::Claim(id) => format!("claim:{id}"),
        }
    }

    /// Inverse of [`PrincipalKey::as_text`].
    pub fn parse(text: &str) -> Option<PrincipalKey> {
        match text.split_once(':') {
            Some(("device", id)) => Some(PrincipalKey::device(id)),
            Some(("service", id)) => Some(PrincipalKey::service(id)),
            Some(("claim", id)) => Some(PrincipalKey(Owner::Claim(id.to_owned()))),
            None if text == "dev" => Some(PrincipalKey::dev()),
            _ => None,
        }
    }
}

impl Owner {
    /// The one place a principal becomes a key: its kind and id.
    pub(crate) fn of(principal: &Principal) -> Owner {
        match principal {
            Principal::Device { id, .. } => Owner::Device(id.to_string()),
            Principal::Service { id, .. } => Owner::Service(id.clone()),
            Principal::Dev => Owner::Dev,
            // A claim session is keyed by its claim too: a holder of another claim cannot take
            // over (or receive the answers of) an enrolling device's session by its client id.
            Principal::Claim {
                client_id,
                claim_id,
            } => Owner::Claim(format!("{claim_id}/{client_id}")),
        }
    }

    pub(crate) fn namespace(&self) -> Namespace {
        match self {
            Owner::Device(_) => Namespace::Device,
            Owner::Service(_) => Namespace::Service,
            Owner::Dev => Namespace::Dev,
            Owner::Claim(_) => Namespace::Claim,
        }
    }

    /// Whether the broker's session quotas (`sessions_max`, the per-principal ones) bound this
    /// owner's sessions. A device's are bounded by the embedder instead: it gives each device
    /// one client id.
    pub(crate) fn quota_bound(&self) -> bool {
        !matches!(self, Owner::Device(_))
    }
}

pub(crate) type SessionRef = Arc<Mutex<Session>>;

/// Session id: unique per session object for the broker's lifetime (a client id can name several
/// sessions over time: clean start replaces the session).
pub(crate) type SessionId = u64;

/// One subscription as the index holds it: whom to deliver to, and how.
pub(crate) struct Target {
    pub(crate) session: SessionRef,
    pub(crate) opts: SubOptions,
}

/// A session's key in the table: its namespace and client id.
pub(crate) type SessionKey = (Namespace, String);

pub(crate) struct TableEntry {
    pub(crate) session: SessionRef,
    pub(crate) owner: Owner,
    /// Asked for a session expiry > 0 when it was attached (counts against the owner's quota).
    pub(crate) persistent: bool,
}

/// Sessions one quota-bound owner holds (the per-principal quotas).
#[derive(Default, Clone, Copy)]
struct OwnerSessions {
    /// Live or persisted.
    all: usize,
    persistent: usize,
}

/// The session table: sessions by (namespace, client id), and client ids by owner principal, so
/// every lookup on the connect, publish_to and kick paths is a hash lookup. Also counts
/// quota-bound sessions (for `sessions_max`) and, per quota-bound owner, its sessions and
/// persistent ones (see [`Owner::quota_bound`]).
#[derive(Default)]
pub(crate) struct SessionTable {
    by_key: HashMap<SessionKey, TableEntry>,
    /// Client ids (in the owner's namespace) of each owner's sessions.
    by_owner: HashMap<Owner, HashSet<String>>,
    owners: HashMap<Owner, OwnerSessions>,
    /// Quota-bound sessions.
    others: usize,
}

impl SessionTable {
    pub(crate) fn get(&self, key: &SessionKey) -> Option<&TableEntry> {
        self.by_key.get(key)
    }

    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Quota-bound sessions (what `sessions_max` bounds).
    pub(crate) fn others(&self) -> usize {
        self.others
    }

    /// Sessions (live or persisted) a quota-bound `owner` holds.
    pub(crate) fn sessions_of(&self, owner: &Owner) -> usize {
        self.owners.get(owner).map_or(0, |o| o.all)
    }

    /// Persistent sessions a quota-bound `owner` holds.
    pub(crate) fn persistent_of(&self, owner: &Owner) -> usize {
        self.owners.get(owner).map_or(0, |o| o.persistent)
    }

    /// Adjusts a quota-bound owner's counts.
    fn count(&mut self, owner: &Owner, all: isize, persistent: isize) {
        if !owner.quota_bound() {
            return;
        }
        let o = self.owners.entry(owner.clone()).or_default();
        o.all = o.all.saturating_add_signed(all);
        o.persistent = o.persistent.saturating_add_signed(persistent);
        if o.all == 0 {
            self.owners.remove(owner);
        }
    }

    /// Put `session` under `key`, owned by `owner`; returns the session it replaced.
    pub(crate) fn insert(
        &mut self,
        key: &SessionKey,
        session: SessionRef,
        owner: Owner,
        persistent: bool,
    ) -> Option<SessionRef> {
        debug_assert_eq!(key.0, owner.namespace());
        let old = self.remove_key(key);
        self.by_owner
            .entry(owner.clone())
            .or_default()
            .insert(key.1.clone());
        if owner.quota_bound() {
            self.others += 1;
        }
        self.count(&owner, 1, isize::from(persistent));
        self.by_key.insert(
            key.clone(),
            TableEntry {
                session,
                owner,
                persistent,
            },
        );
        old
    }

    /// Record whether the session under `key` is persistent now (a reconnect may change it).
    pub(crate) fn set_persistent(&mut self, key: &SessionKey, persistent: bool) {
        let Some(entry) = self.by_key.get_mut(key) else {
            return;
        };
        if entry.persistent == persistent {
            return;
        }
        entry.persistent = persistent;
        let owner = entry.owner.clone();
        self.count(&owner, 0, if persistent { 1 } else { -1 });
    }

    pub(super) fn remove_key(&mut self, key: &SessionKey) -> Option<SessionRef> {
        let e = self.by_key.remove(key)?;
        self.count(&e.owner, -1, -isize::from(e.persistent));
        if let Some(ids) = self.by_owner.get_mut(&e.owner) {
            ids.remove(&key.1);
            if ids.is_empty() {
                self.by_owner.remove(&e.owner);
            }
        }
        if e.owner.quota_bound() {
            self.others -= 1;
        }
        Some(e.session)
    }

    /// Remove `key` if it still names `session`; true if it was removed.
    pub(crate) fn remove_if_same(&mut self, key: &SessionKey, session: &SessionRef) -> bool {
        if !self
            .by_key
            .get(key)
            .is_some_and(|e| Arc::ptr_eq(&e.session, session))
        {
            return false;
        }
        self.remove_key(key);
        true
    }

    /// Keys of the sessions `owner` holds.
    pub(super) fn keys_of(&self, owner: &Owner) -> Vec<SessionKey> {
        self.by_owner
            .get(owner)
            .into_iter()
            .flatten()
            .map(|c| (owner.namespace(), c.clone()))
            .collect()
    }

    /// Sessions `owner` holds.
    pub(super) fn of_owner<'a>(
        &'a self,
        owner: &'a Owner,
    ) -> impl Iterator<Item = &'a SessionRef> + 'a {
        self.by_owner
            .get(owner)
            .into_iter()
            .flatten()
            .filter_map(|c| self.by_key.get(&(owner.namespace(), c.clone())))
            .map(|e| &e.session)
    }

    pub(super) fn sessions(&self) -> impl Iterator<Item = &SessionRef> {
        self.by_key.values().map(|e| &e.session)
    }
}
