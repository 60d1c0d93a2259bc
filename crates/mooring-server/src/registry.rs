//! The device registry: devices, their certificates (issued by the fleet CA), tags and the
//! selectors that address them. Presence answers `online`; the broker is told when a device's
//! tags change (its sessions are re-authorized) and when it is deleted (its sessions and
//! retained messages go).
//!
//! Invariants: a device id is valid ([`DeviceId`]) and its tags pass [`validate_tags`] before
//! anything is stored; a tag change is stored and handed to the broker in one step; a deleted
//! device's certificate is refused from then on (the hooks look the pin up here). Every
//! certificate issued to a device is in the ledger (`registry/certs.rs`): MQTT accepts only
//! active, unexpired ones, and a revocation closes the sessions that used it on every node.

use crate::access::Access;
use crate::app::Core;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::pki::{IssuedCert, Pki};
use crate::presence::Presence;
use mooring_proto::selector::{DeviceFacts, Selector, Term};
use mooring_proto::DeviceId;
use mooring_store::{DeviceFilter, DeviceRecord, NewDevice, OnlineFilter};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

mod certs;
mod rollover;
mod rotation;
pub use certs::{
    run_session_cert_sweep, CertGauges, CertVerdict, CERT_GAUGES_TTL_MS, CERT_LIST_LEN_DEFAULT,
    REVOKE_REASON_LEN_MAX, SESSION_CERT_SWEEP_INTERVAL_MS,
};
pub use rollover::{CaRollover, PkiHome, Retirement, RETIRED_REASON, RETIRE_REVOKE_MAX};
pub use rotation::{Renewed, Rotated, REPLACED_REASON, ROTATED_REASON};

/// Most devices one list call returns.
pub const DEVICE_PAGE_LEN_MAX: usize = 1000;
pub const DEVICE_PAGE_LEN_DEFAULT: usize = 100;

/// The registry service.
pub struct Registry {
    core: Arc<Core>,
    /// The fleet PKI in force; replaced whole by a CA rollover step (`registry/rollover.rs`).
    pki: std::sync::RwLock<Arc<Pki>>,
    /// Bumped at each replacement, so the MQTT listener's TLS config is rebuilt (`cas.rs`).
    pki_generation: std::sync::atomic::AtomicU64,
    /// Where the PKI lives, for rollover steps; the shared PKI as last read (cluster nodes
    /// compare it to notice a step taken on another node).
    pki_home: PkiHome,
    pki_read: std::sync::Mutex<Vec<u8>>,
    /// The server certificate the HTTPS API listener presents (follows the PKI).
    server_cert: Arc<crate::pki::ServerCert>,
    /// One rollover step at a time on this node.
    rollover_lock: tokio::sync::Mutex<()>,
    presence: Arc<Presence>,
    /// Tag changes are stored and handed to the broker in one step, so two concurrent changes
    /// cannot leave the broker with the older tags.
    tags_lock: tokio::sync::Mutex<()>,
    /// What event streams filter on: each device's current facts, read once per
    /// [`FACTS_TTL_MS`] at most, forgotten when this node changes or hears of a change.
    facts: std::sync::Mutex<std::collections::HashMap<DeviceId, CachedFacts>>,
    /// The certificate (SHA-256) each device's latest session on this node authenticated
    /// with, to close it when that certificate is revoked (`certs.rs`). One entry per device
    /// that connected here, removed with the device.
    session_certs: std::sync::Mutex<std::collections::HashMap<DeviceId, certs::SessionCert>>,
    /// Which gateway may act for which child (issue 20), and the children online through a
    /// gateway here.
    gateways: crate::gateways::GatewayMap,
    /// One re-read of attachments at a time, so the map ends as the store's last word (two
    /// attaches racing, notices handled out of order).
    gateway_refresh: tokio::sync::Mutex<()>,
    /// The certificate gauges of `/metrics` and when they were counted.
    cert_gauges: std::sync::Mutex<Option<(u64, CertGauges)>>,
    /// Renewal requests per device in the current minute (`registry/rotation.rs`): when the
    /// minute began, how many.
    renew_requests: std::sync::Mutex<std::collections::HashMap<DeviceId, (u64, u32)>>,
}

/// How long a device's cached facts (tags, online, version) serve event filters. Changes made
/// or announced (tags, deletion, presence and shadow events) drop the entry at once; this bounds
/// how stale a missed one leaves it.
pub const FACTS_TTL_MS: u64 = 10_000;
/// Devices whose facts are cached at once; when full the cache starts over.
pub const FACTS_CACHE_LEN_MAX: usize = 100_000;

/// A device's facts as of `read_ms` (`None`: no such device).
#[derive(Debug, Clone)]
struct CachedFacts {
    read_ms: u64,
    facts: Option<(BTreeMap<String, String>, bool, Option<String>)>,
}

/// A certificate issued outside this server (the simulator's devices): only its pin is stored.
#[derive(Debug, Clone)]
pub struct PinnedCert {
    pub sha256_hex: String,
    pub serial_hex: String,
    pub not_after_ms: u64,
    /// Who issued it, as the ledger names it (`mooring_store::CERT_ISSUER_FLEET` for the
    /// simulator's).
    pub issuer: String,
}

/// A device as the API shows it.
#[derive(Debug, Clone)]
pub struct DeviceView {
    pub record: DeviceRecord,
    pub online: bool,
    pub last_seen_ms: Option<u64>,
    /// The firmware version the device reports running (its shadow's `reported.version`).
    pub version: Option<String>,
}

impl Registry {
    pub(crate) fn new(
        core: Arc<Core>,
        pki: Pki,
        pki_home: PkiHome,
        server_cert: Arc<crate::pki::ServerCert>,
        presence: Arc<Presence>,
    ) -> Self {
        Self {
            server_cert,
            core,
            pki: std::sync::RwLock::new(Arc::new(pki)),
            pki_generation: std::sync::atomic::AtomicU64::new(0),
            pki_home,
            pki_read: std::sync::Mutex::default(),
            rollover_lock: tokio::sync::Mutex::new(()),
            presence,
            tags_lock: tokio::sync::Mutex::new(()),
            facts: std::sync::Mutex::default(),
            session_certs: std::sync::Mutex::default(),
            gateways: crate::gateways::GatewayMap::default(),
            gateway_refresh: tokio::sync::Mutex::new(()),
            cert_gauges: std::sync::Mutex::default(),
            renew_requests: std::sync::Mutex::default(),
        }
    }

    /// The gateway attachments this node knows (issue 20).
    pub fn gateways(&self) -> &crate::gateways::GatewayMap {
        &self.gateways
    }

    /// Reads every gateway attachment from the store (at start).
    pub(crate) async fn load_gateways(&self) -> ServiceResult<usize> {
        self.gateways.load(self.core.store.as_ref()).await
    }

    /// Re-reads `child`'s gateway from the store and follows it (see [`Self::gateway_changed`]).
    pub(crate) async fn refresh_gateway(&self, child: &DeviceId) {
        let _one = self.gateway_refresh.lock().await;
        match self.core.store.gateway_of(child.as_str()).await {
            Ok(gateway) => {
                self.gateway_changed(child, gateway.as_ref().map(|(g, _)| g.as_str()))
                    .await
            }
            Err(e) => {
                tracing::warn!(device = %child, error = %e, "re-reading a child's gateway failed")
            }
        }
    }

    /// Re-reads every attachment and follows what changed (a cluster node that missed a notice
    /// catches up). Returns how many children changed.
    pub(crate) async fn reconcile_gateways(&self) -> ServiceResult<usize> {
        let _one = self.gateway_refresh.lock().await;
        let fresh = crate::gateways::GatewayMap::default();
        fresh.load(self.core.store.as_ref()).await?;
        let changed = self.gateways.differences(&fresh);
        for (child, gateway) in &changed {
            if let Ok(child) = DeviceId::parse(child) {
                self.gateway_changed(&child, gateway.as_deref()).await;
            }
        }
        Ok(changed.len())
    }

    /// `child`'s gateway is now `gateway` in the store: this node follows. A gateway that lost
    /// it has its subscriptions for the child removed at once, and if the child was online
    /// through it here, the child goes offline.
    pub(crate) async fn gateway_changed(&self, child: &DeviceId, gateway: Option<&str>) {
        let Some((old, was_online)) = self.gateways.set(child.as_str(), gateway) else {
            return;
        };
        if was_online {
            self.session_ended(child);
        }
        self.reauthorize(&old).await;
    }

    /// One of `id`'s sessions here ended: its own MQTT session, or (a child) the word of the
    /// gateway it was online through. Presence counts it, and the offline event goes out once
    /// no session of it is left here. Returns whether none is.
    pub(crate) fn session_ended(&self, id: &DeviceId) -> bool {
        self.presence.disconnected(id.as_str(), self.core.now_ms());
        let gone = !self.presence.is_here(id.as_str());
        if gone {
            self.core.events.publish(
                Some(id),
                mooring_api::EventBody::Presence {
                    online: false,
                    node: self.core.events.node().to_owned(),
                },
            );
        }
        gone
    }

    /// Authorizes `id`'s sessions again against what is stored now (its tags, the children
    /// attached to it): what they no longer allow is removed.
    async fn reauthorize(&self, id: &str) {
        let Some(broker) = self.core.broker() else {
            return;
        };
        match self.core.store.get_device(id).await {
            Ok(Some(record)) => {
                let removed = broker.update_principal(mooring_proto::policy::Principal::Device {
                    id: record.id,
                    tags: record.tags,
                });
                if removed > 0 {
                    tracing::info!(
                        gateway = id,
                        removed,
                        "a child left the gateway: its subscriptions for it were removed"
                    );
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(gateway = id, error = %e, "re-reading a gateway failed"),
        }
    }

    /// A device was deleted: it is no one's gateway or child any more. Its gateway's sessions
    /// lose their subscriptions for it (an id created again starts with nothing), and the
    /// children online through it go offline.
    async fn forget_gateway_links(&self, id: &DeviceId) {
        let (gateway, children) = self.gateways.forget_device(id.as_str());
        for child in children {
            if let Ok(child) = DeviceId::parse(&child) {
                self.session_ended(&child);
            }
        }
        if let Some(gateway) = gateway {
            self.reauthorize(&gateway).await;
        }
    }

    /// The fleet CA certificate (PEM), for devices and clients to trust.
    /// The presence service (online anywhere in the cluster).
    pub(crate) fn presence(&self) -> &Presence {
        &self.presence
    }

    /// The fleet's trust bundle (PEM): the fleet CA, and during a CA rollover the previous one.
    pub fn ca_pem(&self) -> String {
        self.pki().ca_pem()
    }

    /// The fleet PKI in force.
    pub(crate) fn pki(&self) -> Arc<Pki> {
        mooring_proto::sync::read(&self.pki).clone()
    }

    /// Changes with every replacement of the PKI.
    pub(crate) fn pki_generation(&self) -> u64 {
        self.pki_generation
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// The MQTT listener's TLS config, trusting the fleet CA(s) and the CA certificates `extra`
    /// (DER) for client certificates.
    pub(crate) fn mqtt_tls_config(
        &self,
        extra: &[Vec<u8>],
    ) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        self.pki().mqtt_tls_config_with(extra)
    }

    /// The stored record of `id` as it is, without validating the id (the MQTT hooks look up a
    /// certificate's CN and a service's client id). Store errors are returned as they are.
    pub async fn lookup(&self, id: &str) -> mooring_store::Result<Option<DeviceRecord>> {
        self.core.store.get_device(id).await
    }

    /// Registers a device whose certificate was issued elsewhere, pinning its fingerprint (the
    /// simulator's devices, which skip the TLS handshake).
    pub async fn create_device_pinned(
        &self,
        id: &str,
        tags: BTreeMap<String, String>,
        cert: PinnedCert,
    ) -> ServiceResult<DeviceRecord> {
        let id = Self::parse_id(id)?;
        validate_tags(&tags)?;
        self.insert(NewDevice {
            id,
            tags,
            created_at_ms: self.core.now_ms(),
            cert_sha256: cert.sha256_hex,
            cert_serial: cert.serial_hex,
            cert_not_after_ms: cert.not_after_ms,
            cert_issuer: cert.issuer,
        })
        .await
    }

    async fn insert(&self, device: NewDevice) -> ServiceResult<DeviceRecord> {
        self.core
            .store
            .create_device(device)
            .await
            .map_err(|e| match e {
                mooring_store::StoreError::AlreadyExists(m) => {
                    ServiceError::new(ErrorKind::AlreadyExists, "device_exists", m)
                }
                other => other.into(),
            })
    }
}

impl Registry {
    fn now_datetime(&self) -> time::OffsetDateTime {
        let nanos = i128::from(self.core.now_ms()) * 1_000_000;
        time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    }

    /// A certificate for device `id` and the public key `key` (a CSR's), issued by the fleet CA
    /// with the server's own serial, validity and key usage (enrollment with a claim: the
    /// provisioning service stores it before the device is created).
    pub(crate) fn issue_cert_for_key(
        &self,
        id: &DeviceId,
        key: &impl rcgen::PublicKeyData,
    ) -> ServiceResult<IssuedCert> {
        self.pki()
            .issue_device_cert_for_key(
                id.as_str(),
                key,
                self.now_datetime(),
                self.core.config.certificates.device_validity_days,
            )
            .map_err(ServiceError::internal)
    }

    pub fn parse_id(id: &str) -> ServiceResult<DeviceId> {
        DeviceId::parse(id).map_err(|e| ServiceError::invalid("invalid_device_id", e.to_string()))
    }

    /// Registers device `id` with a certificate for the key in `csr_pem` (made on the device;
    /// the private key never leaves it), or, without one, for a key made here and returned
    /// once (quick starts).
    pub async fn create_device(
        &self,
        access: &Access,
        id: &str,
        tags: BTreeMap<String, String>,
        csr_pem: Option<&str>,
    ) -> ServiceResult<(DeviceRecord, IssuedCert)> {
        let id = Self::parse_id(id)?;
        validate_tags(&tags)?;
        let csr_key = csr_pem
            .map(crate::pki::parse_csr)
            .transpose()
            .map_err(|m| ServiceError::invalid("invalid_csr", m))?;
        if !access.sees_facts(id.as_str(), &tags) {
            return Err(outside_scope(id.as_str()));
        }
        if self.core.store.get_device(id.as_str()).await?.is_some() {
            return Err(ServiceError::new(
                ErrorKind::AlreadyExists,
                "device_exists",
                format!("device {id} already exists"),
            ));
        }
        let validity_days = self.core.config.certificates.device_validity_days;
        let pki = self.pki();
        let issued = match &csr_key {
            Some(key) => {
                pki.issue_device_cert_for_key(id.as_str(), key, self.now_datetime(), validity_days)
            }
            None => pki.issue_device_cert(id.as_str(), self.now_datetime(), validity_days),
        }
        .map_err(ServiceError::internal)?;
        let record = self
            .insert(NewDevice {
                id: id.clone(),
                tags,
                created_at_ms: self.core.now_ms(),
                cert_sha256: issued.sha256_hex.clone(),
                cert_serial: issued.serial_hex.clone(),
                cert_not_after_ms: issued.not_after_ms,
                cert_issuer: issued.issuer.clone(),
            })
            .await?;
        Ok((record, issued))
    }

    /// The devices as the API shows them: `online` anywhere in the cluster, `last_seen` the
    /// newer of memory and store.
    async fn views(&self, records: Vec<DeviceRecord>) -> ServiceResult<Vec<DeviceView>> {
        let online = match self.core.cluster() {
            Some(cluster) => {
                let ids: Vec<String> = records.iter().map(|r| r.id.to_string()).collect();
                let mut online = BTreeSet::new();
                for chunk in ids.chunks(mooring_store::SESSION_LOOKUP_LEN_MAX) {
                    online.extend(
                        self.presence
                            .online(chunk, cluster.alive_since_ms())
                            .await?,
                    );
                }
                Some(online)
            }
            None => None,
        };
        // The running version is the device's own report (shadow `reported.version`), one
        // read per page.
        let mut versions = std::collections::HashMap::new();
        let ids: Vec<String> = records.iter().map(|r| r.id.to_string()).collect();
        for chunk in ids.chunks(mooring_store::COMMAND_BATCH_LEN_MAX) {
            for shadow in self.core.store.get_shadows(chunk).await? {
                if let Some(v) = shadow.reported_version() {
                    versions.insert(shadow.device_id.to_string(), v);
                }
            }
        }
        Ok(records
            .into_iter()
            .map(|record| {
                let (here, mem_seen) = self.presence.get(&record.id);
                let online = online
                    .as_ref()
                    .map_or(here, |o| o.contains(record.id.as_str()));
                let last_seen_ms = match (mem_seen, record.last_seen_ms) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                DeviceView {
                    version: versions.remove(record.id.as_str()),
                    record,
                    online,
                    last_seen_ms,
                }
            })
            .collect())
    }

    async fn view(&self, record: DeviceRecord) -> ServiceResult<DeviceView> {
        let mut views = self.views(vec![record]).await?;
        views
            .pop()
            .ok_or_else(|| ServiceError::internal(anyhow::anyhow!("no view for a device")))
    }

    /// Another node changed a device (tags, certificates, or deleted it): this node's sessions
    /// of it follow what the store says now, whatever order notices arrived in (a session whose
    /// certificate was revoked is closed).
    pub(crate) async fn refresh_device(&self, id: &str) {
        let Ok(id) = DeviceId::parse(id) else {
            return;
        };
        self.forget_facts(&id);
        match self.core.store.get_device(id.as_str()).await {
            Ok(Some(record)) => {
                self.refresh_gateway(&id).await;
                if let Some(broker) = self.core.broker() {
                    broker.update_principal(mooring_proto::policy::Principal::Device {
                        id: id.clone(),
                        tags: record.tags,
                    });
                }
                self.close_sessions_if_cert_invalid(&id).await;
            }
            Ok(None) => {
                self.forget_gateway_links(&id).await;
                mooring_proto::sync::lock(&self.session_certs).remove(&id);
                if let Some(broker) = self.core.broker() {
                    let prefix = mooring_proto::topic::device_topic_prefix(&id);
                    broker.remove_device(id.as_str(), Some(&prefix));
                }
                self.presence.forget(id.as_str());
            }
            Err(e) => {
                tracing::warn!(device = %id, error = %e, "re-reading a device another node changed failed")
            }
        }
    }

    /// The device, if it exists and `access` reaches it (else `device_not_found`, the same
    /// answer either way, so a scoped caller cannot learn what exists outside its scope).
    pub async fn get_device(&self, access: &Access, id: &str) -> ServiceResult<DeviceView> {
        let id = Self::parse_id(id)?;
        let record = self
            .core
            .store
            .get_device(id.as_str())
            .await?
            .filter(|r| access.sees(r))
            .ok_or_else(|| device_not_found(id.as_str()))?;
        self.view(record).await
    }

    /// Checks a device page request; returns the page size.
    fn device_page(limit: Option<usize>, cursor: Option<&str>) -> ServiceResult<usize> {
        let limit = limit.unwrap_or(DEVICE_PAGE_LEN_DEFAULT);
        if limit == 0 || limit > DEVICE_PAGE_LEN_MAX {
            return Err(ServiceError::invalid(
                "invalid_limit",
                format!("limit must be between 1 and {DEVICE_PAGE_LEN_MAX}"),
            ));
        }
        if let Some(c) = cursor {
            Self::parse_id(c)
                .map_err(|_| ServiceError::invalid("invalid_cursor", "cursor is not valid"))?;
        }
        Ok(limit)
    }

    /// One page of devices ordered by id; the cursor is the last id of the previous page.
    pub async fn list_devices(
        &self,
        access: &Access,
        limit: Option<usize>,
        cursor: Option<&str>,
    ) -> ServiceResult<(Vec<DeviceView>, Option<String>)> {
        let limit = Self::device_page(limit, cursor)?;
        if let Some(scope) = access.scope() {
            return self.select_devices(scope, cursor, limit).await;
        }
        let records = self.core.store.list_devices(limit, cursor).await?;
        let next = if records.len() == limit {
            records.last().map(|r| r.id.to_string())
        } else {
            None
        };
        Ok((self.views(records).await?, next))
    }

    /// Devices matching `sel`, ordered by id, after `cursor`, at most `limit`; the second value
    /// is the cursor of the next page (`Some` only when the page is full). The store evaluates
    /// the selector ([`DeviceFilter::from_selector`]: ids, tags and the reported version in
    /// its query, `online` as the devices presence knows online now), so a page costs one
    /// query whatever the fleet's size; the store's conformance suite checks it selects exactly
    /// what [`Selector::matches`] does.
    pub async fn select_devices(
        &self,
        sel: &Selector,
        cursor: Option<&str>,
        limit: usize,
    ) -> ServiceResult<(Vec<DeviceView>, Option<String>)> {
        let filter = self.filter_of(sel);
        let page = self
            .core
            .store
            .select_devices(&filter, limit, cursor)
            .await?;
        let next = if page.len() == limit {
            page.last().map(|r| r.id.to_string())
        } else {
            None
        };
        Ok((self.views(page).await?, next))
    }

    /// The store filter selecting what `sel` matches now.
    pub(crate) fn filter_of(&self, sel: &Selector) -> DeviceFilter {
        let online = if sel.terms.iter().any(|t| matches!(t, Term::Online)) {
            self.online_filter()
        } else {
            OnlineFilter::default()
        };
        DeviceFilter::from_selector(sel, online)
    }

    /// Which devices are online now, for the store to intersect with.
    pub(crate) fn online_filter(&self) -> OnlineFilter {
        let alive_since_ms = self.core.cluster().map_or(0, |c| c.alive_since_ms());
        self.presence.online_filter(alive_since_ms)
    }

    /// Whether device `id` matches `sel` now, by its cached facts (see [`FACTS_TTL_MS`]); the
    /// selector is evaluated by the one evaluator, [`Selector::matches`]. A device that does
    /// not exist, or whose facts cannot be read, matches nothing.
    pub async fn matches_cached(&self, sel: &Selector, id: &DeviceId) -> bool {
        let now = self.core.now_ms();
        let cached = mooring_proto::sync::lock(&self.facts)
            .get(id)
            .filter(|c| now.saturating_sub(c.read_ms) < FACTS_TTL_MS)
            .cloned();
        let cached = match cached {
            Some(c) => c,
            None => {
                let Ok(c) = self.read_facts(id, now).await else {
                    return false;
                };
                let mut m = mooring_proto::sync::lock(&self.facts);
                if m.len() >= FACTS_CACHE_LEN_MAX {
                    m.clear();
                }
                m.insert(id.clone(), c.clone());
                c
            }
        };
        let Some((tags, online, version)) = &cached.facts else {
            return false;
        };
        sel.matches(&DeviceFacts {
            id,
            tags,
            online: *online,
            version: version.as_deref(),
        })
    }

    async fn read_facts(&self, id: &DeviceId, now: u64) -> ServiceResult<CachedFacts> {
        let Some(record) = self.core.store.get_device(id.as_str()).await? else {
            return Ok(CachedFacts {
                read_ms: now,
                facts: None,
            });
        };
        let version = self
            .core
            .store
            .get_shadows(&[id.to_string()])
            .await?
            .first()
            .and_then(mooring_store::ShadowRecord::reported_version);
        let view = self.view(record).await?;
        Ok(CachedFacts {
            read_ms: now,
            facts: Some((view.record.tags, view.online, version)),
        })
    }

    /// Drops the cached facts of `id` (it changed).
    pub fn forget_facts(&self, id: &DeviceId) {
        mooring_proto::sync::lock(&self.facts).remove(id);
    }

    /// Replaces a device's tags.
    pub async fn set_tags(
        &self,
        access: &Access,
        id: &str,
        tags: BTreeMap<String, String>,
    ) -> ServiceResult<DeviceView> {
        let id = Self::parse_id(id)?;
        validate_tags(&tags)?;
        let _serialized = self.tags_lock.lock().await;
        self.get_device(access, id.as_str()).await?;
        self.store_tags(access, id, tags).await
    }

    /// Stores a device's tags (the caller holds the tag lock and has checked it reaches the
    /// device), then tells the broker and the other nodes.
    async fn store_tags(
        &self,
        access: &Access,
        id: DeviceId,
        tags: BTreeMap<String, String>,
    ) -> ServiceResult<DeviceView> {
        if !access.sees_facts(id.as_str(), &tags) {
            return Err(outside_scope(id.as_str()));
        }
        self.write_tags(&id, tags.clone()).await?;
        self.announce_tags(&id, tags);
        self.get_device(access, id.as_str()).await
    }

    /// Changes the tags of many devices with `change` (a bulk job's batch: tag, untag): each
    /// device's tags are read, changed and stored under the tag lock, taken once, so no
    /// concurrent change is lost; the writes go to the store together, so its group commit
    /// makes them one transaction; a change that leaves a device's tags as they were stores
    /// nothing. One result per id, in order.
    pub async fn update_tags_many(
        &self,
        access: &Access,
        ids: &[DeviceId],
        change: &(dyn Fn(&mut BTreeMap<String, String>) + Sync),
    ) -> Vec<ServiceResult<()>> {
        let _serialized = self.tags_lock.lock().await;
        let mut results: Vec<ServiceResult<()>> = Vec::with_capacity(ids.len());
        let mut writes = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let changed = async {
                let current = self
                    .core
                    .store
                    .get_device(id.as_str())
                    .await?
                    .filter(|r| access.sees(r))
                    .ok_or_else(|| device_not_found(id.as_str()))?;
                let mut tags = current.tags.clone();
                change(&mut tags);
                if tags == current.tags {
                    return Ok(None);
                }
                validate_tags(&tags)?;
                if !access.sees_facts(id.as_str(), &tags) {
                    return Err(outside_scope(id.as_str()));
                }
                Ok(Some(tags))
            }
            .await;
            match changed {
                Ok(Some(tags)) => writes.push((i, id, tags)),
                Ok(None) => {}
                Err(e) => {
                    results.push(Err(e));
                    continue;
                }
            }
            results.push(Ok(()));
        }
        let stored = futures::future::join_all(
            writes
                .iter()
                .map(|(_, id, tags)| self.write_tags(id, tags.clone())),
        )
        .await;
        for ((i, id, tags), r) in writes.into_iter().zip(stored) {
            match r {
                Ok(()) => self.announce_tags(id, tags),
                Err(e) => {
                    if let Some(slot) = results.get_mut(i) {
                        *slot = Err(e);
                    }
                }
            }
        }
        results
    }

    async fn write_tags(&self, id: &DeviceId, tags: BTreeMap<String, String>) -> ServiceResult<()> {
        self.core
            .store
            .set_tags(id.as_str(), tags)
            .await
            .map_err(|e| match e {
                mooring_store::StoreError::NotFound(_) => device_not_found(id.as_str()),
                other => other.into(),
            })
    }

    /// After a tag change is stored: the cached facts, the broker and the other nodes.
    fn announce_tags(&self, id: &DeviceId, tags: BTreeMap<String, String>) {
        self.forget_facts(id);
        // Policy follows the data: the device's sessions (live and persisted) are authorized
        // against the new tags from now on, and what they no longer allow is removed.
        if let Some(broker) = self.core.broker() {
            let removed = broker.update_principal(mooring_proto::policy::Principal::Device {
                id: id.clone(),
                tags,
            });
            if removed > 0 {
                tracing::info!(device = %id, removed, "tags changed: subscriptions no longer allowed were removed");
            }
        }
        if let Some(cluster) = self.core.cluster() {
            cluster.device_changed(id.as_str());
        }
    }

    /// One page of the devices matching a selector (within `access`).
    pub async fn list_selected_devices(
        &self,
        access: &Access,
        selector: &str,
        limit: Option<usize>,
        cursor: Option<&str>,
    ) -> ServiceResult<(Vec<DeviceView>, Option<String>)> {
        let sel = crate::commands::parse_selector(selector)?;
        let limit = Self::device_page(limit, cursor)?;
        let sel = access.narrow(Some(sel)).unwrap_or(sel_all());
        self.select_devices(&sel, cursor, limit).await
    }

    /// Deletes a device: its certificate is refused from now on, a live session is closed, and
    /// its persisted sessions and retained messages (its own and everything under
    /// `devices/<id>/`) are removed, so an id created again starts with nothing.
    pub async fn delete_device(&self, access: &Access, id: &str) -> ServiceResult<()> {
        let id = Self::parse_id(id)?;
        self.get_device(access, id.as_str()).await?;
        if !self.core.store.delete_device(id.as_str()).await? {
            return Err(device_not_found(id.as_str()));
        }
        if let Some(broker) = self.core.broker() {
            let prefix = mooring_proto::topic::device_topic_prefix(&id);
            broker.remove_device(id.as_str(), Some(&prefix));
        }
        self.forget_gateway_links(&id).await;
        self.presence.forget(id.as_str());
        self.forget_facts(&id);
        mooring_proto::sync::lock(&self.session_certs).remove(&id);
        if let Some(cluster) = self.core.cluster() {
            cluster.device_changed(id.as_str());
        }
        Ok(())
    }
}

/// A selector with no terms: every device.
fn sel_all() -> Selector {
    Selector { terms: Vec::new() }
}

fn outside_scope(id: &str) -> ServiceError {
    ServiceError::new(
        ErrorKind::Forbidden,
        "outside_scope",
        format!("device {id} with these tags would be outside your scope"),
    )
}

fn device_not_found(id: &str) -> ServiceError {
    ServiceError::not_found("device_not_found", format!("device {id} not found"))
}

/// Tag keys and values: short, printable, no MQTT wildcard or separator characters.
pub fn validate_tags(tags: &BTreeMap<String, String>) -> ServiceResult<()> {
    const TAGS_MAX: usize = 64;
    const TAG_LEN_MAX: usize = 128;
    if tags.len() > TAGS_MAX {
        return Err(ServiceError::invalid(
            "invalid_tags",
            format!("at most {TAGS_MAX} tags"),
        ));
    }
    for (k, v) in tags {
        let ok = |s: &str| {
            !s.is_empty()
                && s.len() <= TAG_LEN_MAX
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'))
        };
        if !ok(k) || !ok(v) {
            return Err(ServiceError::invalid(
                "invalid_tags",
                format!("tag {k:?}={v:?}: keys and values are 1-{TAG_LEN_MAX} characters of letters, digits, '.', '_', '-', ':'"),
            ));
        }
    }
    Ok(())
}
