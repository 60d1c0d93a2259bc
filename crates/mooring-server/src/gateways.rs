//! Gateways (issue 20): a device that relays for child devices on the children's own topics
//! (`devices/<child>/...`, [`mooring_proto::gateway`]), allowed only for the children the store
//! says are attached to it.
//!
//! [`GatewayMap`] is this node's copy of the attachments (child → gateway), read by the MQTT
//! hooks on every PUBLISH and SUBSCRIBE of a device without a store read. It is loaded whole at
//! start, changed by [`Gateways::attach`] / [`Gateways::detach`] here and re-read from the store
//! for one child when another node says it changed (`Registry::refresh_device`), so it never
//! grants what the store no longer says. A detached child's subscriptions on its old gateway's
//! sessions are removed at once (`Broker::update_principal`), and the child goes offline.
//!
//! It also holds the children each gateway said are online on this node
//! (`devices/<child>/presence`): they go offline with the gateway's session.

use crate::access::Access;
use crate::app::Core;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::registry::Registry;
use mooring_api::{GatewayAttachment, GatewayChild, GatewayChildren};
use mooring_proto::policy::Principal;
use mooring_proto::{DeviceId, Topic};
use mooring_store::AttachOutcome;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// Most children one gateway has.
pub const CHILDREN_PER_GATEWAY_MAX: usize = 1_000;
/// Attachments read per store call when loading.
const LOAD_PAGE_LEN: usize = 5_000;
/// Most children per page of `GET /api/v1/devices/{id}/children`.
pub const CHILDREN_PAGE_LEN_MAX: usize = 1_000;

#[derive(Default)]
struct Inner {
    /// child → gateway.
    gateway_of: HashMap<String, String>,
    /// gateway → the children it said are online, on this node.
    online: HashMap<String, HashSet<String>>,
}

/// This node's copy of the attachments, and the children online through a gateway here.
#[derive(Default)]
pub struct GatewayMap {
    inner: Mutex<Inner>,
}

impl GatewayMap {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut mooring_proto::sync::lock(&self.inner))
    }

    /// Reads every attachment from the store (at start, before any session is restored).
    pub(crate) async fn load(&self, store: &dyn mooring_store::Store) -> ServiceResult<usize> {
        let mut after: Option<String> = None;
        let mut all = HashMap::new();
        loop {
            let page = store
                .list_attachments(after.as_deref(), LOAD_PAGE_LEN)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.0.clone());
            let full = page.len() == LOAD_PAGE_LEN;
            all.extend(page);
            if !full {
                break;
            }
        }
        let n = all.len();
        self.with(|m| m.gateway_of = all);
        Ok(n)
    }

    /// The gateway `child` is attached to.
    pub fn gateway_of(&self, child: &str) -> Option<String> {
        self.with(|m| m.gateway_of.get(child).cloned())
    }

    /// The children whose gateway differs between this map and `fresh`, with `fresh`'s.
    pub(crate) fn differences(&self, fresh: &GatewayMap) -> Vec<(String, Option<String>)> {
        let new = fresh.with(|m| m.gateway_of.clone());
        self.with(|m| {
            let mut out: Vec<(String, Option<String>)> = new
                .iter()
                .filter(|(c, g)| m.gateway_of.get(*c) != Some(*g))
                .map(|(c, g)| (c.clone(), Some(g.clone())))
                .collect();
            out.extend(
                m.gateway_of
                    .keys()
                    .filter(|c| !new.contains_key(*c))
                    .map(|c| (c.clone(), None)),
            );
            out
        })
    }

    /// Whether `child` is attached to `gateway`.
    pub fn is_attached(&self, child: &str, gateway: &str) -> bool {
        self.with(|m| m.gateway_of.get(child).is_some_and(|g| g == gateway))
    }

    /// Records `child`'s gateway now (`None`: none). Returns the gateway it had before, if it
    /// changed, with whether the child was online through it here (it no longer is).
    pub(crate) fn set(&self, child: &str, gateway: Option<&str>) -> Option<(String, bool)> {
        self.with(|m| {
            let before = match gateway {
                Some(g) => m.gateway_of.insert(child.to_owned(), g.to_owned()),
                None => m.gateway_of.remove(child),
            };
            let old = before.filter(|b| Some(b.as_str()) != gateway)?;
            let was_online = m.online.get_mut(&old).is_some_and(|set| set.remove(child));
            Some((old, was_online))
        })
    }

    /// A device was deleted: it is no one's child and no one's gateway any more. Returns the
    /// gateway it was a child of (whose sessions must drop their subscriptions for it) and the
    /// children that were online through it here (they go offline). A child that was online
    /// through its gateway is forgotten without going offline: presence forgets it whole.
    pub(crate) fn forget_device(&self, id: &str) -> (Option<String>, Vec<String>) {
        self.with(|m| {
            let gateway = m.gateway_of.remove(id);
            m.gateway_of.retain(|_, g| g != id);
            if let Some(g) = &gateway {
                if let Some(set) = m.online.get_mut(g) {
                    set.remove(id);
                }
            }
            let children = m
                .online
                .remove(id)
                .map(|s| s.into_iter().collect())
                .unwrap_or_default();
            (gateway, children)
        })
    }

    /// The gateway says `child` is online or offline. Returns whether that changed anything
    /// (online: only for a child attached to it, checked under the same lock as detaching).
    pub(crate) fn child_presence(&self, gateway: &str, child: &str, online: bool) -> bool {
        self.with(|m| {
            if online {
                if m.gateway_of.get(child).is_none_or(|g| g != gateway) {
                    return false;
                }
                m.online
                    .entry(gateway.to_owned())
                    .or_default()
                    .insert(child.to_owned())
            } else {
                let removed = m.online.get_mut(gateway).is_some_and(|s| s.remove(child));
                if m.online.get(gateway).is_some_and(HashSet::is_empty) {
                    m.online.remove(gateway);
                }
                removed
            }
        })
    }

    /// The gateway's session here ended: the children it said were online.
    pub(crate) fn gateway_gone(&self, gateway: &str) -> Vec<String> {
        self.with(|m| {
            m.online
                .remove(gateway)
                .map(|s| s.into_iter().collect())
                .unwrap_or_default()
        })
    }

    /// Whether `child` is online through `gateway` here.
    pub fn online_through(&self, gateway: &str, child: &str) -> bool {
        self.with(|m| m.online.get(gateway).is_some_and(|s| s.contains(child)))
    }

    /// May `principal` (a gateway) publish `topic` for one of its children? (Its own topics
    /// are the policy's business.)
    pub fn may_publish(&self, principal: &Principal, topic: &str) -> bool {
        let Principal::Device { id, .. } = principal else {
            return false;
        };
        Topic::parse(topic).is_some_and(|t| {
            t.device() != id
                && mooring_proto::gateway::may_relay(&t)
                && self.is_attached(t.device().as_str(), id.as_str())
        })
    }

    /// May `principal` (a gateway) subscribe to `filter` for one of its children?
    pub fn may_subscribe(&self, principal: &Principal, filter: &str) -> bool {
        let Principal::Device { id, .. } = principal else {
            return false;
        };
        mooring_proto::gateway::filter_device(filter).is_some_and(|child| {
            &child != id
                && mooring_proto::gateway::may_relay_filter(&child, filter)
                && self.is_attached(child.as_str(), id.as_str())
        })
    }

    /// The device a message on `topic` from `principal` is about: the principal itself, or a
    /// child attached to it (a gateway relaying); `None` otherwise.
    pub fn acting_for(&self, principal: &DeviceId, topic: &Topic) -> Option<DeviceId> {
        let d = topic.device();
        (d == principal || self.is_attached(d.as_str(), principal.as_str())).then(|| d.clone())
    }
}

/// The gateway attachments API: attach, detach, read.
pub struct Gateways {
    core: Arc<Core>,
    registry: Arc<Registry>,
}

impl Gateways {
    pub(crate) fn new(core: Arc<Core>, registry: Arc<Registry>) -> Self {
        Self { core, registry }
    }

    /// Attaches `child` to `gateway` (both must exist and be within `access`); moving it from
    /// another gateway ends that one's rights at once.
    pub async fn attach(
        &self,
        access: &Access,
        child: &str,
        gateway: &str,
    ) -> ServiceResult<GatewayAttachment> {
        let child = self.registry.get_device(access, child).await?.record.id;
        let gateway = self.registry.get_device(access, gateway).await?.record.id;
        if child == gateway {
            return Err(ServiceError::invalid(
                "invalid_gateway",
                "a device cannot be its own gateway",
            ));
        }
        let now = self.core.now_ms();
        let outcome = self
            .core
            .store
            .attach_child(
                child.as_str(),
                gateway.as_str(),
                now,
                CHILDREN_PER_GATEWAY_MAX,
            )
            .await
            .map_err(|e| match e {
                mooring_store::StoreError::InvalidInput(why) => {
                    ServiceError::invalid("invalid_gateway", why)
                }
                mooring_store::StoreError::NotFound(why) => {
                    ServiceError::not_found("device_not_found", why)
                }
                other => other.into(),
            })?;
        if outcome == AttachOutcome::GatewayFull {
            return Err(ServiceError::new(
                ErrorKind::Conflict,
                "gateway_full",
                format!("gateway {gateway} has {CHILDREN_PER_GATEWAY_MAX} children, the most one gateway has"),
            ));
        }
        self.changed(&child).await;
        self.gateway_of(access, child.as_str()).await
    }

    /// Detaches `child` from its gateway: the gateway may no longer act for it, at once.
    pub async fn detach(&self, access: &Access, child: &str) -> ServiceResult<()> {
        let child = self.registry.get_device(access, child).await?.record.id;
        match self.core.store.detach_child(child.as_str()).await? {
            Some(_) => {
                self.changed(&child).await;
                Ok(())
            }
            None => Err(not_attached(child.as_str())),
        }
    }

    /// The gateway `child` is attached to.
    pub async fn gateway_of(
        &self,
        access: &Access,
        child: &str,
    ) -> ServiceResult<GatewayAttachment> {
        let child = self.registry.get_device(access, child).await?.record.id;
        let (gateway, attached_at) = self
            .core
            .store
            .gateway_of(child.as_str())
            .await?
            .ok_or_else(|| not_attached(child.as_str()))?;
        // A scoped caller sees an attachment only if it sees both devices.
        if self.registry.get_device(access, &gateway).await.is_err() {
            return Err(not_attached(child.as_str()));
        }
        Ok(GatewayAttachment {
            child: child.to_string(),
            gateway,
            attached_at,
        })
    }

    /// A page of `gateway`'s children (those within `access`).
    pub async fn children(
        &self,
        access: &Access,
        gateway: &str,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> ServiceResult<GatewayChildren> {
        let gateway = self.registry.get_device(access, gateway).await?.record.id;
        let limit = limit.unwrap_or(100);
        if limit == 0 || limit > CHILDREN_PAGE_LEN_MAX {
            return Err(ServiceError::invalid(
                "invalid_limit",
                format!("limit must be 1..={CHILDREN_PAGE_LEN_MAX}"),
            ));
        }
        if let Some(c) = cursor {
            Registry::parse_id(c).map_err(|_| {
                ServiceError::invalid("invalid_cursor", "not a cursor of this list")
            })?;
        }
        let page = self
            .core
            .store
            .children_of(gateway.as_str(), cursor, limit)
            .await?;
        let next_cursor = (page.len() == limit)
            .then(|| page.last().map(|(c, _)| c.clone()))
            .flatten();
        let mut children = Vec::with_capacity(page.len());
        for (id, attached_at) in page {
            // A child outside the caller's scope (or deleted meanwhile) is not listed.
            match self.registry.get_device(access, &id).await {
                Ok(view) => children.push(GatewayChild {
                    id,
                    attached_at,
                    online: view.online,
                }),
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(GatewayChildren {
            gateway: gateway.to_string(),
            children,
            next_cursor,
        })
    }

    /// After an attachment of `child` changed in the store: this node's map, the old gateway's
    /// sessions, the child's presence, the other nodes.
    async fn changed(&self, child: &DeviceId) {
        // What the store says now, not what this call wrote: a racing attach may have
        // written after it.
        self.registry.refresh_gateway(child).await;
        if let Some(cluster) = self.core.cluster() {
            cluster.device_changed(child.as_str());
        }
    }
}

/// How often a cluster node re-reads every attachment (a notice it missed is caught up then).
pub const RECONCILE_INTERVAL_MS: u64 = 30_000;

/// A cluster node's catch-up: every [`RECONCILE_INTERVAL_MS`], the attachments as the store has
/// them, followed where this node's map differs.
pub async fn run_reconcile(
    app: Arc<crate::app::App>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let interval = std::time::Duration::from_millis(RECONCILE_INTERVAL_MS);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(interval) => {}
        }
        match app.registry.reconcile_gateways().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(children = n, "gateway attachments caught up with the store"),
            Err(e) => tracing::warn!(error = %e.message, "re-reading gateway attachments failed"),
        }
    }
}

fn not_attached(child: &str) -> ServiceError {
    ServiceError::not_found(
        "not_attached",
        format!("device {child} is not attached to a gateway"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn device(id: &str) -> Principal {
        Principal::Device {
            id: DeviceId::parse(id).expect("id"),
            tags: BTreeMap::new(),
        }
    }

    #[test]
    fn a_gateway_may_act_only_for_its_attached_children() {
        let map = GatewayMap::default();
        map.set("lock-1", Some("gw-1"));
        let (gw1, gw2) = (device("gw-1"), device("gw-2"));
        assert!(map.may_publish(&gw1, "devices/lock-1/telemetry"));
        assert!(map.may_publish(&gw1, "devices/lock-1/commands/c1/result"));
        assert!(!map.may_publish(&gw1, "devices/lock-1/commands/c1"));
        assert!(!map.may_publish(&gw1, "devices/lock-1/cert/request"));
        assert!(!map.may_publish(&gw2, "devices/lock-1/telemetry"));
        assert!(!map.may_publish(&gw1, "devices/lock-2/telemetry"));
        assert!(map.may_subscribe(&gw1, "devices/lock-1/commands/+"));
        assert!(!map.may_subscribe(&gw1, "devices/+/commands/+"));
        assert!(!map.may_subscribe(&gw2, "devices/lock-1/#"));
        // Moved to another gateway: the old one loses it, and its online child goes offline.
        assert!(map.child_presence("gw-1", "lock-1", true));
        assert_eq!(
            map.set("lock-1", Some("gw-2")),
            Some(("gw-1".to_owned(), true))
        );
        assert!(!map.may_publish(&gw1, "devices/lock-1/telemetry"));
        assert!(map.may_publish(&gw2, "devices/lock-1/telemetry"));
        // Deleting the gateway ends every attachment to it.
        assert!(map.child_presence("gw-2", "lock-1", true));
        assert!(
            !map.child_presence("gw-1", "lock-1", true),
            "not gw-1's child"
        );
        assert_eq!(map.forget_device("gw-2"), (None, vec!["lock-1".to_owned()]));
        assert!(!map.may_publish(&gw2, "devices/lock-1/telemetry"));
        // Deleting a child: its gateway is returned (its subscriptions for it go).
        map.set("lock-2", Some("gw-3"));
        assert!(map.child_presence("gw-3", "lock-2", true));
        assert_eq!(
            map.forget_device("lock-2"),
            (Some("gw-3".to_owned()), Vec::new())
        );
        assert!(!map.online_through("gw-3", "lock-2"));
    }
}
