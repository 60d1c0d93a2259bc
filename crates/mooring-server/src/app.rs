//! The application: the bundle of services one running server is made of, and the small shared
//! core (store, clock, config, counters, policy, broker) they are built on.
//!
//! Each service owns its state behind private fields and is reached only through its methods;
//! HTTP handlers, MQTT hooks, the CLI and the simulator never touch the storage underneath.
//! Dependencies point one way: `Presence` ← `Registry` ← `Telemetry`, `Commands`, `Shadows`;
//! `Registry`, `Commands` ← `Jobs`; `Registry` ← `Provisioning`; `Registry`, the health
//! `Tracker` ← `Health`; `Registry`, `Commands` ← `Rules`. `Events` holds the tracker and the
//! rules' feed as observers (they hold only the store and a queue sender), so no service owns
//! a path back to itself.

use crate::accounts::Accounts;
use crate::audit::Audit;
use crate::auth::Tokens;
use crate::cluster::Cluster;
use crate::commands::Commands;
use crate::config::ServerConfig;
use crate::events::Events;
use crate::fleet::Fleet;
use crate::jobs::Jobs;
use crate::metrics::Counters;
use crate::pki::Pki;
use crate::presence::Presence;
use crate::provision::Provisioning;
use crate::registry::Registry;
use crate::shadow::Shadows;
use crate::telemetry::Telemetry;
use mooring_broker::Broker;
use mooring_proto::policy::Policy;
use mooring_proto::Clock;
use mooring_store::{BrokerStateWriter, BrokerWriterStats, Store, TelemetryWriter};
use std::sync::{Arc, OnceLock, RwLock};

pub use crate::registry::{
    validate_tags, DeviceView, DEVICE_PAGE_LEN_DEFAULT, DEVICE_PAGE_LEN_MAX,
};
pub use crate::telemetry::{TELEMETRY_QUERY_LEN_DEFAULT, TELEMETRY_QUERY_LEN_MAX};

/// What every service shares. Crate-private: only services hold it, and each reads and writes
/// the store only for the concern it owns.
pub(crate) struct Core {
    pub(crate) config: ServerConfig,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) counters: Counters,
    policy: RwLock<Arc<Policy>>,
    broker: OnceLock<Broker>,
    /// Set when nodes share the store: what this node tells the others.
    pub(crate) cluster: Option<Arc<Cluster>>,
    /// Live events: every service publishes what changed here.
    pub(crate) events: Arc<Events>,
}

impl Core {
    pub(crate) fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    pub(crate) fn broker(&self) -> Option<&Broker> {
        self.broker.get()
    }

    pub(crate) fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }
}

/// One running server's services. The fields are the services' public interfaces; what each
/// holds is private to it.
pub struct App {
    core: Arc<Core>,
    /// Devices: create (with certificates), read, list, select, tag, delete.
    pub registry: Arc<Registry>,
    /// Telemetry ingest (group commit) and queries.
    pub telemetry: Telemetry,
    /// The command model: create, deliver, retry, expire, cancel, replies, fleet commands.
    pub commands: Arc<Commands>,
    /// Device shadows and their retained deltas.
    pub shadows: Shadows,
    /// Online/offline and `last_seen`.
    pub presence: Arc<Presence>,
    /// API and service tokens.
    pub tokens: Tokens,
    /// People: users, logins, sessions.
    pub accounts: Accounts,
    /// The audit log.
    pub audit: Audit,
    /// Live events (`GET /api/v1/events`): the ring, the streams.
    pub events: Arc<Events>,
    /// Fleet statistics: summaries of selections, the sampled history.
    pub fleet: Arc<Fleet>,
    /// Background jobs: bulk actions on a selection of devices.
    pub jobs: Arc<Jobs>,
    /// Where each device is in its provisioning pipeline; installation confirmations.
    pub pipeline: crate::pipeline::Pipeline,
    /// Claim tokens and enrollment (issue 16).
    pub provisioning: Provisioning,
    /// Registered manufacturer CAs, the MQTT listener's TLS trust, just-in-time registration.
    pub cas: crate::cas::Cas,
    /// Over-the-air updates: artifacts, the update key, download links (issue 17).
    pub ota: crate::ota::Ota,
    /// Rules and alerts: evaluated on this node's events (issue 18).
    pub rules: Arc<crate::rules::Rules>,
    /// Fleet health: per-device signals, the summary per cohort (issue 18).
    pub health: Arc<crate::health::Health>,
    /// The OTA service's background tasks (downloads, deployment sends).
    pub ota_tasks: crate::ota::OtaTasks,
    pub rollouts: Arc<crate::rollouts::Rollouts>,
    /// Gateways and their children (issue 20).
    pub gateways: crate::gateways::Gateways,
    /// Devices' local keys (issue 20).
    pub local: crate::local::Local,
    /// Group commit for the broker's retained messages and persistent sessions (stats only).
    broker_state: BrokerStateWriter,
    /// OpenID Connect login, when `[oidc]` is configured.
    oidc: OnceLock<Arc<crate::oidc::Oidc>>,
}

impl App {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: ServerConfig,
        store: Arc<dyn Store>,
        pki: Pki,
        pki_home: crate::registry::PkiHome,
        server_cert: Arc<crate::pki::ServerCert>,
        policy: Policy,
        clock: Arc<dyn Clock>,
        writer: TelemetryWriter,
        broker_state: BrokerStateWriter,
        cluster: Option<Arc<Cluster>>,
        ota_keys: crate::ota::OtaKeys,
        local_secret: ring::hmac::Key,
        webhooks: Arc<crate::webhooks::Webhooks>,
        emails: Arc<crate::emails::Emails>,
    ) -> Self {
        let node = cluster.as_ref().map(|c| c.node().to_owned());
        let tracker = Arc::new(crate::health::Tracker::new(
            config.health.clone(),
            store.clone(),
        ));
        let (rule_feed, rule_rx) = crate::rules::Rules::feed(&config.rules);
        let events = Arc::new(Events::new(
            config.events.clone(),
            clock.clone(),
            config.node_id.clone(),
            cluster.clone(),
            vec![tracker.clone(), rule_feed.clone()],
        ));
        let core = Arc::new(Core {
            config,
            store,
            clock,
            counters: Counters::default(),
            policy: RwLock::new(Arc::new(policy)),
            broker: OnceLock::new(),
            cluster,
            events: events.clone(),
        });
        let presence = Arc::new(Presence::new(core.store.clone(), node));
        let registry = Arc::new(Registry::new(
            core.clone(),
            pki,
            pki_home,
            server_cert,
            presence.clone(),
        ));
        let commands = Arc::new(Commands::new(core.clone(), registry.clone()));
        // A cluster's artifacts live in the shared store (any node serves any download); the
        // embedded server's in files beside its database.
        let blobs: Arc<dyn mooring_store::ArtifactBlobs> = if core.cluster.is_some() {
            Arc::new(mooring_store::StoreBlobs(core.store.clone()))
        } else {
            Arc::new(mooring_store::FileBlobs::new(
                core.config.data_dir.join(crate::ota::ARTIFACTS_DIR),
            ))
        };
        let health = Arc::new(crate::health::Health::new(
            tracker,
            registry.clone(),
            core.store.clone(),
            core.clock.clone(),
            core.config.health.clone(),
            core.config.rules.alerts_open_max,
        ));
        let fleet = Arc::new(Fleet::new(core.clone(), registry.clone()));
        let playbooks = Arc::new(crate::playbooks::Playbooks::new(
            core.store.clone(),
            core.clock.clone(),
            registry.clone(),
            core.config.playbooks.clone(),
            core.config.parts.clone(),
        ));
        let jobs = Arc::new(Jobs::new(
            core.clone(),
            registry.clone(),
            commands.clone(),
            webhooks,
            emails,
            playbooks,
            crate::jobs::ReportSources {
                health: health.clone(),
                fleet: fleet.clone(),
            },
        ));
        let ota = crate::ota::Ota::new(
            core.clone(),
            registry.clone(),
            commands.clone(),
            blobs,
            ota_keys,
        );
        let rollouts = Arc::new(crate::rollouts::Rollouts::new(
            core.clone(),
            registry.clone(),
            ota.clone(),
            health.clone(),
        ));
        Self {
            rollouts,
            gateways: crate::gateways::Gateways::new(core.clone(), registry.clone()),
            local: crate::local::Local::new(registry.clone(), local_secret),
            rules: Arc::new(crate::rules::Rules::new(
                core.clone(),
                registry.clone(),
                commands.clone(),
                jobs.clone(),
                rule_feed,
                rule_rx,
            )),
            health,
            ota,
            ota_tasks: crate::ota::OtaTasks::default(),
            telemetry: Telemetry::new(core.clone(), registry.clone(), writer),
            jobs,
            pipeline: crate::pipeline::Pipeline::new(core.clone(), registry.clone()),
            cas: crate::cas::Cas::new(core.clone(), registry.clone()),
            commands,
            shadows: Shadows::new(core.clone(), registry.clone()),
            tokens: Tokens::new(core.clone()),
            accounts: Accounts::new(core.clone()),
            audit: Audit::new(core.clone()),
            fleet,
            provisioning: Provisioning::new(core.clone(), registry.clone()),
            registry,
            presence,
            events,
            broker_state,
            core,
            oidc: OnceLock::new(),
        }
    }

    pub fn set_oidc(&self, oidc: Arc<crate::oidc::Oidc>) {
        let _ = self.oidc.set(oidc);
    }

    /// OpenID Connect login (`None`: not configured).
    pub fn oidc(&self) -> Option<&Arc<crate::oidc::Oidc>> {
        self.oidc.get()
    }

    pub fn set_broker(&self, broker: Broker) {
        let _ = self.core.broker.set(broker);
    }

    pub fn broker(&self) -> Option<&Broker> {
        self.core.broker()
    }

    /// This node's part in a cluster (`None`: a single node on its own store).
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.core.cluster()
    }

    pub fn config(&self) -> &ServerConfig {
        &self.core.config
    }

    /// The server's counters (`/metrics`).
    pub fn counters(&self) -> &Counters {
        &self.core.counters
    }

    /// Resolves once everything submitted to the broker state writer so far is durable.
    pub(crate) fn broker_state_barrier(
        &self,
    ) -> tokio::sync::oneshot::Receiver<mooring_store::Result<()>> {
        self.broker_state.submit(Vec::new())
    }

    /// The broker state writer's queue and batches (`/metrics`).
    pub fn broker_state_stats(&self) -> BrokerWriterStats {
        self.broker_state.stats()
    }

    /// The topic policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        mooring_proto::sync::read(&self.core.policy).clone()
    }

    /// Put a new topic policy in force (a config reload): every session's subscriptions are
    /// checked against it at once and what it no longer allows is removed. Returns that number.
    pub fn set_policy(&self, policy: Policy) -> usize {
        *mooring_proto::sync::write(&self.core.policy) = Arc::new(policy);
        self.broker().map_or(0, Broker::reauthorize_all)
    }

    pub fn now_ms(&self) -> u64 {
        self.core.now_ms()
    }

    /// What the simulator measures after the server stopped: read-only views of the store. The
    /// services cannot serve these then (they hold the writers, which must drain and end at
    /// shutdown), so this hands out the store behind a type that can only read telemetry and
    /// commands.
    pub fn readback(&self) -> Readback {
        Readback {
            store: self.core.store.clone(),
        }
    }
}

/// Read-only access to stored telemetry and commands that outlives the server (see
/// [`App::readback`]). Holding one keeps the store open, not the server.
#[derive(Clone)]
pub struct Readback {
    store: Arc<dyn Store>,
}

impl Readback {
    pub async fn telemetry(
        &self,
        q: mooring_store::TelemetryQuery,
    ) -> mooring_store::Result<Vec<mooring_store::Point>> {
        self.store.query(q).await
    }

    /// A device's commands, newest first, at most `limit`.
    pub async fn commands(
        &self,
        device_id: &str,
        limit: usize,
    ) -> mooring_store::Result<Vec<mooring_store::CommandRecord>> {
        self.store.list_commands(device_id, None, limit, None).await
    }
}
