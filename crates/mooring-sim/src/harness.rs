//! The in-process server: a real `mooring` server on the simulator's virtual clock, whose
//! MQTT sessions are served over in-memory streams instead of TCP + TLS.
//!
//! Everything above the transport is the production code path: the broker, the hooks
//! (device lookup and certificate pin check, policy, telemetry ingest with group commit), the
//! store, presence, commands. What is skipped is the TLS handshake: each simulated device is
//! registered with a certificate fingerprint, and its in-memory connection presents that
//! identity as if the handshake had verified it. The devices' connections are opened by
//! [`crate::device::SimConnector`] against the broker of whichever server is running.

use anyhow::Context;
use mooring_proto::Clock;
use mooring_server::registry::PinnedCert;
use mooring_server::{Listeners, RunningServer, ServerConfig};
use mooring_store::Store;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A running in-process server and the data dir it was started on.
pub struct InProcessServer {
    pub server: RunningServer,
    data_dir: PathBuf,
}

/// The fingerprint a simulated device's "certificate" has.
pub fn sim_cert_sha256(device_id: &str) -> String {
    format!("sim-{device_id}")
}

/// The node id of cluster node `n` (1-based, as scenario events name nodes).
pub fn node_id(n: usize) -> String {
    format!("node-{n}")
}

/// What the nodes of an in-process cluster share, as the nodes of a real one share a
/// PostgreSQL database, a NATS server and a key file: one store (SQLite in the run's data dir,
/// which implements the whole `Store`, cluster tables included), one in-process bus and one
/// cluster key. Each node is otherwise a whole server of its own.
pub struct ClusterParts {
    pub store: Arc<dyn Store>,
    pub bus: Arc<dyn mooring_bus::Bus>,
    /// The cluster key, 64 hex digits (`[cluster] secret_key_file`'s content).
    key_hex: String,
    pub heartbeat_interval_ms: u64,
    pub node_lease_ms: u64,
}

impl ClusterParts {
    /// Opens the shared store in `data_dir` and a bus with the server's default bounds.
    pub fn open(
        data_dir: &Path,
        heartbeat_interval_ms: u64,
        node_lease_ms: u64,
    ) -> anyhow::Result<Self> {
        let store = mooring_store::SqliteStore::open(data_dir)
            .with_context(|| format!("opening the cluster's store in {}", data_dir.display()))?;
        let bus = mooring_bus::InProcessBus::new(mooring_bus::BusConfig {
            subscription_buffer_len: ServerConfig::default().bus.buffer_len,
            ..mooring_bus::BusConfig::default()
        })?;
        let key: [u8; 32] = rand::random();
        Ok(Self {
            store: Arc::new(store),
            bus: Arc::new(bus),
            key_hex: key.iter().map(|b| format!("{b:02x}")).collect(),
            heartbeat_interval_ms,
            node_lease_ms,
        })
    }
}

/// A server's configuration in the simulator: its data dir, loopback port 0 for the TCP
/// listeners (the HTTP API stays usable for inspection; devices do not use them).
fn config(data_dir: &Path, tuning: &Tuning) -> anyhow::Result<ServerConfig> {
    let mut config = ServerConfig {
        data_dir: data_dir.to_owned(),
        mqtt_addr: "127.0.0.1:0".parse()?,
        http_addr: "127.0.0.1:0".parse()?,
        ..ServerConfig::default()
    };
    config.jobs.batch_pause_ms = tuning.job_batch_pause_ms;
    if let Some(n) = tuning.job_report_points_per_turn {
        config.jobs.report_points_per_turn = n;
    }
    config.health = tuning.health.clone();
    config.rollouts = tuning.rollouts.clone();
    config.playbooks = tuning.playbooks.clone();
    config.parts = tuning.parts.clone();
    Ok(config)
}

/// What a scenario sets of the server's configuration, for every start.
#[derive(Debug, Clone, Default)]
pub struct Tuning {
    /// `[jobs] batch_pause_ms` (the scenario's `job_batch_pause`).
    pub job_batch_pause_ms: u64,
    /// `[jobs] report_points_per_turn` (the scenario's `job_report_points_per_turn`).
    pub job_report_points_per_turn: Option<usize>,
    /// `[health]` (the scenario's `[health]` table).
    pub health: mooring_server::health::HealthConfig,
    /// `[rollouts]` (the scenario's `[rollouts]` table).
    pub rollouts: mooring_server::rollouts::RolloutsConfig,
    /// `[[playbook]]` and `[[part]]` (the scenario's).
    pub playbooks: Vec<mooring_server::playbooks::PlaybookConfig>,
    pub parts: Vec<mooring_server::playbooks::PartConfig>,
}

impl Tuning {
    fn of(config: &ServerConfig) -> Tuning {
        Tuning {
            job_batch_pause_ms: config.jobs.batch_pause_ms,
            job_report_points_per_turn: Some(config.jobs.report_points_per_turn),
            health: config.health.clone(),
            rollouts: config.rollouts.clone(),
            playbooks: config.playbooks.clone(),
            parts: config.parts.clone(),
        }
    }
}

impl InProcessServer {
    /// Starts a server with its data in `data_dir` on `clock`. Devices reach it through
    /// [`crate::device::SimConnector`], not its TCP listeners.
    /// `tuning`: what the scenario sets of its configuration.
    pub async fn start(
        data_dir: &Path,
        clock: Arc<dyn Clock>,
        tuning: &Tuning,
    ) -> anyhow::Result<Self> {
        let config = config(data_dir, tuning)?;
        let listeners = Listeners::bind(&config).await?;
        let server = RunningServer::start(config, listeners, clock)
            .await
            .context("starting the in-process server")?;
        Ok(Self {
            server,
            data_dir: data_dir.to_owned(),
        })
    }

    /// Starts cluster node `n` (1-based; node id [`node_id`]) on the cluster's shared store
    /// and bus (`RunningServer::start_shared`: the production start of a cluster node, on a
    /// store and bus given instead of URLs). The nodes share the data dir, which holds the
    /// store (and the admin token the first node creates).
    pub async fn start_node(
        data_dir: &Path,
        clock: Arc<dyn Clock>,
        parts: &ClusterParts,
        n: usize,
        tuning: &Tuning,
    ) -> anyhow::Result<Self> {
        let mut config = config(data_dir, tuning)?;
        config.node_id = node_id(n);
        config.cluster.heartbeat_interval_ms = parts.heartbeat_interval_ms;
        config.cluster.node_lease_ms = parts.node_lease_ms;
        let listeners = Listeners::bind(&config).await?;
        let key = mooring_server::pki::SecretKey::from_hex(&parts.key_hex)?;
        let server = RunningServer::start_shared(
            config,
            listeners,
            clock,
            parts.store.clone(),
            parts.bus.clone(),
            key,
        )
        .await
        .with_context(|| format!("starting cluster node {}", node_id(n)))?;
        Ok(Self {
            server,
            data_dir: data_dir.to_owned(),
        })
    }

    /// Kills the server as `kill -9` would (`RunningServer::kill`); its connections must be
    /// dropped by the caller ([`crate::device::Net::kill_node`]).
    pub fn kill(self) {
        self.server.kill();
    }

    /// Stops the server gracefully (sessions closed, writer drained) and starts it again on the
    /// same data dir.
    pub async fn restart(self, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let dir = self.data_dir.clone();
        let tuning = Tuning::of(self.server.app.config());
        self.server.shutdown().await;
        Self::start(&dir, clock, &tuning).await
    }

    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }

    /// Registers a device with a simulated certificate.
    pub async fn register(&self, id: &str, tags: BTreeMap<String, String>) -> anyhow::Result<()> {
        self.server
            .app
            .registry
            .create_device_pinned(
                id,
                tags,
                PinnedCert {
                    sha256_hex: sim_cert_sha256(id),
                    // Unique, as the certificate ledger wants (its key).
                    serial_hex: sim_cert_sha256(id),
                    not_after_ms: u64::MAX / 2,
                    issuer: mooring_store::CERT_ISSUER_FLEET.to_owned(),
                },
            )
            .await
            .with_context(|| format!("registering {id}"))?;
        Ok(())
    }
}
