//! # mooring-agent: the device runtime
//!
//! The agent turns host metrics and lines of JSON into telemetry, executes commands at most
//! once, keeps the device shadow in sync, and delivers everything it sends at least once, in
//! order, across server outages and agent restarts. It is a library first: the binary calls
//! [`run`]; the fleet simulator calls [`run_with`] with its own [`AgentDeps`] (in-memory
//! transport and flash, virtual clock, synthetic metrics), so simulated devices run this exact
//! code.
//!
//! ```text
//!  metrics child ──every interval──┐
//!  input child ──JSON obj/line─────┼─> add seq+ts ─> AgentStore outbox (durable) ─┐
//!  shadow child ──reported─────────┤                                            │
//!  commands child ──result─────────┘      outbox child: window of 32 ───────────┘
//!                                                │  publish(topic, payload, token=seq)
//!  server <── MQTT 3.1.1 over Connector ── link child (link::drive, backoff)
//!            ├── PUBACK(token) ──────────────> outbox child: AgentStore::ack
//!            ├── devices/<id>/commands/+ ───> commands child (commands::executor)
//!            └── devices/<id>/shadow/delta ─> shadow child (shadow::run)
//! ```
//!
//! * [`config`]: [`AgentConfig`] (CLI flags + the `--config` TOML file, [`config::AgentFile`]).
//! * [`enroll`]: `mooring-agent enroll`, from a claim token to a certificate for a key made
//!   here, as resumable persisted steps over the same link (username/password, no client cert).
//! * [`key`]: `--key` is a PEM file or a `pkcs11:` URI; a token key (secure element, SoftHSM2)
//!   is made in the token and signs the CSR and the TLS handshake there, never extractable.
//! * [`transport`]: the [`transport::Connector`] trait (any byte stream) and the production
//!   TCP + rustls mTLS connector; identity (device id = client certificate CN).
//! * [`link`]: our small MQTT 3.1.1 client session on the sans-IO `mqtt-protocol-core`
//!   (timers are `tokio::time`), reconnect backoff with full jitter from a seeded RNG.
//! * [`store`]: the [`store::AgentStore`] trait (outbox, seq, executed commands, JSON docs)
//!   and [`store::MemStore`] with fault injection; [`sqlite_store`]: the production store.
//! * [`supervisor`]: one-for-one / one-for-all / rest-for-one restarts with an intensity limit.
//! * [`commands`]: the executor (replay, interrupted, expired, unknown) and handlers.
//! * [`shadow`]: applies deltas to `desired.json`, reports applied keys and versions.
//! * [`diag`]: link quality, bounded rings of recent errors and log lines (`diagnostics`).
//! * [`metrics`]: the [`metrics::MetricsSource`] trait and the host sampler.
//! * [`rotate`]: certificate rotation (renewal by CSR over the live session, the swap after
//!   a successful connection with the new pair; `mooring.cert.rotate` forces it).
//! * [`ota`]: the A/B updater (`mooring.update`): slots, journal, resumable download,
//!   verification, trial boot, health check, commit or revert; the `ota` child.
//! * [`input`]: the `--input` line reader.
//! * [`gateway`]: gateway mode (`--gateway-socket`): children on a Unix socket, relayed under
//!   their own identities on `devices/<child>/...` ([`gateway::relay`]).
//!
//! ## Supervision
//!
//! [`run_with`] builds one shared [`Core`] (store behind a mutex, channels whose receivers
//! survive restarts) and runs the parts as children of a one-for-one [`supervisor::Supervisor`]
//! (at most [`RESTARTS_MAX`] restarts in [`RESTART_PERIOD_MS`]): `link`, `outbox`, `metrics`,
//! `input`, `commands`, `shadow`, and in gateway mode `gateway-socket` (the children's
//! transport) and `gateway` (the relay, [`gateway::relay`]). A failing part (a store error, a
//! panic) is restarted alone; telemetry keeps flowing while the command executor restarts.
//! Past the limit `run_with` returns the error and the binary exits non-zero, for systemd to
//! restart it.
//!
//! ## Delivery
//!
//! Every message gets a persisted, monotonic `seq` and is committed to the store before any
//! send. The outbox child publishes the oldest entries, at most [`SEND_WINDOW_MAX`] unacked,
//! in seq order, each carrying its seq as the PUBACK token; an entry is deleted only when its
//! PUBACK arrives (the server acknowledges telemetry only once it is durable). A new connection
//! restarts the window from the oldest entry; duplicates are harmless (the server dedupes
//! `(device, seq)` for telemetry; command results and reported updates are idempotent).
//!
//! Time: timers use `tokio::time` only and timestamps come from the injected
//! [`mooring_proto::Clock`]; randomness (jitter) comes from a seeded RNG. Every task the agent
//! starts belongs to the supervisor's `JoinSet` (or to a handler task the executor owns).

pub mod boots;
pub mod commands;
pub mod config;
pub mod diag;
pub mod enroll;
pub mod gateway;
pub mod input;
pub mod key;
pub mod link;
pub mod local;
pub mod metrics;
pub mod ota;
pub mod rotate;
pub mod shadow;
pub mod sqlite_store;
pub mod store;
pub mod supervisor;
pub mod transport;

pub use commands::{CommandHandler, Handlers, Outcome};
pub use config::{AgentConfig, InputSource};
pub use diag::Diagnostics;
pub use metrics::MetricsSource;
pub use store::{AgentStore, MemStore};
pub use transport::{Connector, Stream};

use anyhow::Context as _;
use mooring_proto::sync::lock;
use mooring_proto::telemetry::Telemetry;
use mooring_proto::{Clock, DeviceId, Topic};
use rand::SeedableRng as _;
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use store::Entry;
use supervisor::{Intensity, Strategy, Supervisor};
use tokio::io::AsyncRead;
use tokio::sync::{mpsc, watch, Notify};

/// The agent's version (reported in the shadow and by `diagnostics`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Most publishes awaiting PUBACK at once.
pub const SEND_WINDOW_MAX: usize = 32;
/// Parsed input lines buffered between the reader and the input child.
pub const INPUT_CHANNEL_CAP: usize = 64;
/// PUBACK tokens buffered between the connection and the outbox child.
pub const ACK_CHANNEL_CAP: usize = 128;
/// Most input lines (or PUBACKs) committed in one store transaction.
pub const PUSH_BATCH_MAX: usize = 64;
/// How long a clean shutdown waits for the DISCONNECT to be written.
pub const DISCONNECT_WAIT_MS: u64 = 2_000;
/// When the connection's request queue is full, the outbox retries after this long.
pub const FILL_RETRY_MS: u64 = 50;
/// Restart intensity of the agent's top supervisor: at most this many restarts ...
pub const RESTARTS_MAX: u32 = 5;
/// ... within this period; more and the agent exits with an error.
pub const RESTART_PERIOD_MS: u64 = 60_000;
/// Name of the local config document (`<state dir>/config.json`), written by `set_config`.
pub const CONFIG_DOC: &str = "config";
/// Name of the local desired-state document (`<state dir>/desired.json`), written by the shadow.
pub const DESIRED_DOC: &str = "desired";

/// Everything the agent gets from its environment. [`AgentDeps::production`] builds the real
/// ones from an [`AgentConfig`]; the simulator and tests build their own.
pub struct AgentDeps {
    pub device_id: DeviceId,
    /// Opens a stream to the server for each connection attempt.
    pub connector: Arc<dyn Connector>,
    /// Durable state: outbox, seq, executed commands, config and desired documents.
    pub store: Box<dyn AgentStore>,
    pub clock: Arc<dyn Clock>,
    /// Seeds reconnect jitter (the same seed gives the same delays).
    pub rng_seed: u64,
    /// Sampled every `config.interval_secs` (unless 0).
    pub metrics: Box<dyn MetricsSource>,
    /// Telemetry objects fed in memory (the simulator's); when set, `config.input` is ignored.
    pub input: Option<mpsc::Receiver<Map<String, Value>>>,
    /// Extra command handlers by name; they take precedence over built-in and config ones.
    pub handlers: Handlers,
    /// Rings and counters `diagnostics` reports; the binary also feeds its log ring from tracing.
    pub diagnostics: Diagnostics,
    /// The A/B updater (already booted: [`ota::Updater::start`]); `None`: updates are refused.
    pub ota: Option<ota::Updater>,
    /// What the device's platform does for the updater ([`ota::Platform`]); `None`: HTTPS
    /// downloads, `reboot_command` / exit 75 and the `[update]` hooks.
    pub ota_platform: Option<Arc<dyn ota::Platform>>,
    /// Gateway mode (`config.gateway` set): where children come from instead of the Unix
    /// socket (the simulator's in-memory children); `None`: the socket of `config.gateway`.
    pub child_transport: Option<Box<dyn gateway::ChildTransport>>,
}

impl std::fmt::Debug for AgentDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentDeps")
            .field("device_id", &self.device_id)
            .field("connector", &self.connector.describe())
            .field("rng_seed", &self.rng_seed)
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Metrics that produce an empty object (only `seq` and `ts`); the default for [`AgentDeps::new`].
#[derive(Debug, Default, Clone, Copy)]
pub struct NoMetrics;

impl MetricsSource for NoMetrics {
    fn sample(&mut self) -> Map<String, Value> {
        Map::new()
    }
}

impl AgentDeps {
    /// Deps with everything optional at its default: rng seed 0, [`NoMetrics`], no in-memory
    /// input, no extra handlers, fresh diagnostics.
    pub fn new(
        device_id: DeviceId,
        connector: Arc<dyn Connector>,
        store: Box<dyn AgentStore>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            device_id,
            connector,
            store,
            clock,
            rng_seed: 0,
            metrics: Box::new(NoMetrics),
            input: None,
            handlers: Handlers::new(),
            diagnostics: Diagnostics::default(),
            ota: None,
            ota_platform: None,
            child_transport: None,
        }
    }

    /// The real thing: identity from the certificate, TCP + mTLS to `server_host:server_port`,
    /// the SQLite store in `state_dir` (created if missing), host metrics, jitter seeded from
    /// `config.jitter_seed` or the OS.
    pub fn production(config: &AgentConfig, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let files = rotate::files_of(config);
        rotate::recover(&files)?;
        // The roots: the trust bundle of the last renewal if there is one, else `--ca`.
        let identity =
            transport::load_identity(&config.cert_path, &config.key, &files.roots_path())?;
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
        // A brand-new outbox starts its seq at unix-ms × 1000, so a device whose state dir was
        // wiped does not reuse seqs the server has already stored (and would dedupe away).
        let first_seq = clock.now_ms().saturating_mul(1000);
        let store =
            sqlite_store::SqliteStore::open(&config.state_dir, config.outbox_max, first_seq)
                .with_context(|| format!("opening the outbox in {}", config.state_dir.display()))?;
        // The TLS connector, able to switch to a renewed certificate (rotate.rs).
        let connector = rotate::RotatingConnector(rotate::Rotation::new(
            files,
            config.server_host.clone(),
            config.server_port,
            identity.tls,
        ));
        let rng_seed = config.jitter_seed.unwrap_or_else(rand::random);
        // `[update]`: the slots boot here, as a bootloader would at power-on.
        let ota = match &config.update {
            None => None,
            Some(u) => {
                let settings = u.settings().map_err(anyhow::Error::msg)?;
                let slots = ota::FileSlots::open(
                    &ota::slots_dir(&config.state_dir),
                    config.firmware_version.clone(),
                )?;
                let files = ota::FileUpdateFiles::open(&ota::journal_dir(&config.state_dir))?;
                Some(ota::Updater::start(
                    settings,
                    Box::new(slots),
                    Box::new(files),
                )?)
            }
        };
        Ok(Self {
            rng_seed,
            ota,
            metrics: Box::new(metrics::HostSampler::new()),
            ..Self::new(
                identity.device_id,
                Arc::new(connector),
                Box::new(store),
                clock,
            )
        })
    }
}

/// Runs the agent with production dependencies ([`AgentDeps::production`]) until `shutdown`
/// completes, or, with `exit_when_drained`, until the input is at EOF and the outbox is empty.
/// Errors are setup failures (bad certificate, unusable state dir, unreadable input file) or
/// a part failing more often than the restart intensity allows; network trouble is retried
/// forever.
pub async fn run(
    config: AgentConfig,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    config.validate()?;
    let deps = AgentDeps::production(&config, clock)?;
    run_with(deps, config, shutdown).await
}

/// State shared by the agent's parts. Receivers sit behind async mutexes so a restarted part
/// picks up the same channel.
pub(crate) struct Core {
    pub(crate) device_id: DeviceId,
    pub(crate) telemetry_topic: String,
    pub(crate) config: AgentConfig,
    pub(crate) clock: Arc<dyn Clock>,
    store: Mutex<Box<dyn AgentStore>>,
    /// Poked after every push: the outbox child looks for new entries.
    pub(crate) outbox_changed: Notify,
    /// The live connection, if any.
    pub(crate) link: watch::Sender<Option<link::LinkHandle>>,
    pub(crate) acks_rx: tokio::sync::Mutex<mpsc::Receiver<u64>>,
    pub(crate) input_rx: tokio::sync::Mutex<mpsc::Receiver<Map<String, Value>>>,
    pub(crate) input_done: AtomicBool,
    pub(crate) commands_rx: tokio::sync::Mutex<mpsc::Receiver<link::Inbound>>,
    pub(crate) shadow_rx: tokio::sync::Mutex<mpsc::Receiver<link::Inbound>>,
    pub(crate) metrics: Mutex<Box<dyn MetricsSource>>,
    pub(crate) handlers: Handlers,
    pub(crate) diag: Diagnostics,
    pub(crate) started_at: tokio::time::Instant,
    /// Set once `exit_when_drained` is satisfied.
    pub(crate) drained: watch::Sender<bool>,
    /// The certificate rotation, when the connector rotates (`rotate.rs`).
    pub(crate) rotation: Option<Arc<rotate::Rotation>>,
    /// Answers to renewal requests (`devices/<id>/cert/#`).
    pub(crate) cert_rx: tokio::sync::Mutex<mpsc::Receiver<link::Inbound>>,
    /// Poked by the `mooring.cert.rotate` command.
    pub(crate) rotate_now: Notify,
    /// Commands being run by the executor (an update waits while one runs).
    pub(crate) commands_running: std::sync::atomic::AtomicUsize,
    /// The deps' `rng_seed`: every random stream of the agent derives from it.
    pub(crate) rng_seed: u64,
    /// This start's counts (`boots.rs`), reported in the shadow.
    pub(crate) boots: boots::Boots,
    /// The updater and its channels, when `[update]` is configured.
    pub(crate) ota: Option<ota::agent::OtaParts>,
    /// The children's transport and channels, in gateway mode.
    pub(crate) gateway: Option<gateway::relay::GatewayParts>,
    /// The local API's channels and key, when `[local]` is configured.
    pub(crate) local: Option<local::LocalParts>,
}

impl Core {
    pub(crate) fn store(&self) -> MutexGuard<'_, Box<dyn AgentStore>> {
        // A part that panicked while holding the store left it consistent (every store call
        // is one transaction), so a poisoned lock is still usable.
        lock(&self.store)
    }
}

/// Runs the agent on the given dependencies until `shutdown` completes (or, with
/// `config.exit_when_drained`, the input is at EOF and the outbox is empty). Only
/// `config.interval_secs`, `input` (when `deps.input` is `None`), `exit_when_drained`,
/// `keepalive_secs` and the handler settings are read from `config`; the server address,
/// certificate paths, state dir and outbox bound are the deps' business.
pub async fn run_with(
    mut deps: AgentDeps,
    mut config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.keepalive_secs >= 5,
        "keepalive must be at least 5 seconds"
    );
    let device_id = deps.device_id.clone();
    let (acks_tx, acks_rx) = mpsc::channel(ACK_CHANNEL_CAP);
    let (commands_tx, commands_rx) = mpsc::channel(commands::COMMAND_QUEUE_MAX);
    let (shadow_tx, shadow_rx) = mpsc::channel(shadow::SHADOW_QUEUE_MAX);
    let (cert_tx, cert_rx) = mpsc::channel(rotate::REPLY_QUEUE_MAX);
    let (ota_link_tx, ota_link_rx) = mpsc::channel(ota::agent::LINK_QUEUE_MAX);
    let ota = deps.ota.take().map(|up| {
        // The running slot's version is the firmware version (shadow `reported.version`).
        if let Some(v) = up.running_version() {
            config.firmware_version = Some(v);
        }
        let (requests_tx, requests_rx) = mpsc::channel(ota::agent::REQUEST_QUEUE_MAX);
        ota::agent::OtaParts {
            reported: Mutex::new(up.reported()),
            updater: tokio::sync::Mutex::new(Some(up)),
            requests_tx,
            requests_rx: tokio::sync::Mutex::new(requests_rx),
            link_rx: tokio::sync::Mutex::new(ota_link_rx),
            platform: deps.ota_platform.take(),
        }
    });
    let ota_enabled = ota.is_some();
    let rotation = deps.connector.rotation();
    let (link_tx, _) = watch::channel(None);
    let (drained_tx, _) = watch::channel(false);

    // Input: in memory, a file, stdin, or none.
    let mut reader: Option<Box<dyn AsyncRead + Send + Unpin>> = None;
    let (input_rx, input_tx) = match deps.input {
        Some(rx) => (rx, None),
        None => {
            let (tx, rx) = mpsc::channel(INPUT_CHANNEL_CAP);
            match &config.input {
                None => {}
                Some(InputSource::Stdin) => reader = Some(Box::new(tokio::io::stdin())),
                Some(InputSource::File(path)) => {
                    let file = tokio::fs::File::open(path)
                        .await
                        .with_context(|| format!("opening input {}", path.display()))?;
                    reader = Some(Box::new(file));
                }
            }
            (rx, Some(tx))
        }
    };
    let input_done = reader.is_none() && input_tx.is_some();

    // Gateway mode: the socket is bound now, so an unusable path is a setup error.
    let (gateway, gateway_inbound) = match &config.gateway {
        None => (None, None),
        Some(g) => {
            g.validate().map_err(anyhow::Error::msg)?;
            let transport: Box<dyn gateway::ChildTransport> = match deps.child_transport.take() {
                Some(t) => t,
                None => Box::new(
                    gateway::unix::UnixTransport::bind(&g.socket, g.children_max)
                        .with_context(|| format!("gateway socket {}", g.socket.display()))?,
                ),
            };
            let (parts, inbound) = gateway::relay::parts(g.clone(), transport);
            (Some(parts), Some(inbound))
        }
    };

    let (local, local_key_tx) = match &config.local {
        None => (None, None),
        Some(l) => {
            l.validate().map_err(anyhow::Error::msg)?;
            let (parts, key_tx) = local::parts(l.clone(), &config.state_dir);
            (Some(parts), Some(key_tx))
        }
    };
    let mut store = deps.store;
    let boots = boots::record_start(store.as_mut());
    let core = Arc::new(Core {
        telemetry_topic: Topic::telemetry(&device_id),
        device_id: device_id.clone(),
        config: config.clone(),
        clock: deps.clock,
        store: Mutex::new(store),
        outbox_changed: Notify::new(),
        link: link_tx,
        acks_rx: tokio::sync::Mutex::new(acks_rx),
        input_rx: tokio::sync::Mutex::new(input_rx),
        input_done: AtomicBool::new(input_done),
        commands_rx: tokio::sync::Mutex::new(commands_rx),
        shadow_rx: tokio::sync::Mutex::new(shadow_rx),
        metrics: Mutex::new(deps.metrics),
        handlers: deps.handlers,
        diag: deps.diagnostics,
        started_at: tokio::time::Instant::now(),
        drained: drained_tx,
        rotation: rotation.clone(),
        cert_rx: tokio::sync::Mutex::new(cert_rx),
        rotate_now: Notify::new(),
        commands_running: std::sync::atomic::AtomicUsize::new(0),
        rng_seed: deps.rng_seed,
        boots,
        ota,
        gateway,
        local,
    });
    {
        let store = core.store();
        tracing::info!(
            device = %device_id,
            queued = store.len(),
            next_seq = store.next_seq(),
            "agent starting"
        );
    }
    // The first metrics sample is queued before anything else runs, so `exit_when_drained`
    // always sends at least one.
    if config.interval_secs > 0 {
        let sample = lock(&core.metrics).sample();
        enqueue_telemetry(&core, vec![sample])?;
    }

    let settings = link::LinkSettings {
        device_id: device_id.clone(),
        connector: deps.connector,
        keepalive: Duration::from_secs(config.keepalive_secs),
        routes: [
            link::Route {
                filter: Topic::commands_filter(&device_id),
                tx: commands_tx,
            },
            link::Route {
                filter: Topic::shadow_delta(&device_id),
                tx: shadow_tx,
            },
        ]
        .into_iter()
        .chain(rotation.is_some().then(|| link::Route {
            filter: format!("{}/{device_id}/cert/#", mooring_proto::topic::DEVICES_ROOT),
            tx: cert_tx,
        }))
        .chain(ota_enabled.then(|| link::Route {
            filter: mooring_proto::ota::link_filter(&device_id),
            tx: ota_link_tx,
        }))
        .chain(local_key_tx.map(|tx| link::Route {
            filter: mooring_proto::local::key_topic(&device_id),
            tx,
        }))
        .collect(),
        dynamic: gateway_inbound,
        credentials: None,
        give_up_on: None,
    };
    let outputs = link::LinkOutputs {
        state: core.link.clone(),
        acks: acks_tx,
        diag: core.diag.clone(),
    };
    let link_starts = Arc::new(AtomicU64::new(0));
    let rng_seed = deps.rng_seed;
    let reader = Arc::new(Mutex::new(reader));
    let input_tx = Arc::new(Mutex::new(input_tx));

    let diag = core.diag.clone();
    let c = || core.clone();
    let sup = Supervisor::new(
        "agent",
        Strategy::OneForOne,
        Intensity {
            restarts_max: RESTARTS_MAX,
            period_ms: RESTART_PERIOD_MS,
        },
    )
    .on_failure(Arc::new(move |child, why| {
        diag.error(format!("{child} failed: {why}"));
    }))
    .child("link", move || {
        // Each start gets its own RNG stream, derived from the seed: deterministic.
        let n = link_starts.fetch_add(1, Ordering::Relaxed);
        let rng = rand::rngs::StdRng::seed_from_u64(rng_seed.wrapping_add(n));
        let fut = link::drive(
            settings.clone(),
            link::Backoff::standard(rng),
            outputs.clone(),
        );
        async move {
            fut.await;
            Ok(())
        }
    })
    .child("outbox", {
        let core = c();
        move || drain(core.clone())
    })
    .child("metrics", {
        let core = c();
        move || sample_metrics(core.clone())
    })
    .child("input", {
        let core = c();
        move || take_input(core.clone())
    })
    .child("input-reader", move || {
        let reader = lock(&reader).take();
        let tx = lock(&input_tx).take();
        async move {
            if let (Some(reader), Some(tx)) = (reader, tx) {
                input::read_lines(reader, tx).await;
            }
            Ok(())
        }
    })
    .child("commands", {
        let core = c();
        move || commands::executor(core.clone())
    })
    .child("shadow", {
        let core = c();
        move || shadow::run(core.clone())
    })
    .child("rotation", {
        let core = c();
        move || rotate::run(core.clone())
    })
    .child("ota", {
        let core = c();
        move || ota::agent::run(core.clone())
    })
    .child("local-key", {
        let core = c();
        move || local::keep_key(core.clone())
    })
    .child("local-api", {
        let core = c();
        move || local::serve(core.clone())
    })
    .child("gateway-socket", {
        let core = c();
        move || gateway::relay::serve(core.clone())
    })
    .child("gateway", {
        let core = c();
        move || gateway::relay::run(core.clone())
    });

    let stop = {
        let core = core.clone();
        async move {
            let mut drained = core.drained.subscribe();
            tokio::select! {
                () = shutdown => {
                    tracing::info!(queued = core.store().len(), "shutting down");
                }
                _ = drained.wait_for(|d| *d) => {
                    tracing::info!("input drained and outbox empty; exiting");
                }
            }
            // Say goodbye cleanly if connected, bounded in time; the outbox child still
            // records late PUBACKs meanwhile.
            let handle = core.link.borrow().clone();
            if let Some(h) = handle {
                if h.disconnect() {
                    let mut state = core.link.subscribe();
                    let gone =
                        state.wait_for(|s| s.as_ref().is_none_or(|s| s.conn_no != h.conn_no));
                    let _ =
                        tokio::time::timeout(Duration::from_millis(DISCONNECT_WAIT_MS), gone).await;
                }
            }
        }
    };
    let result = sup.run(stop).await;
    boots::record_stop(&core);
    {
        let store = core.store();
        tracing::info!(
            queued = store.len(),
            dropped_total = store.dropped_total(),
            "agent stopped"
        );
    }
    result.map_err(Into::into)
}

/// The outbox child: publishes queued entries in seq order through the live connection, at
/// most [`SEND_WINDOW_MAX`] unacknowledged, and deletes each one when its PUBACK arrives.
async fn drain(core: Arc<Core>) -> anyhow::Result<()> {
    let mut acks = core.acks_rx.lock().await;
    let mut link_rx = core.link.subscribe();
    let mut handle = link_rx.borrow_and_update().clone();
    let mut inflight: BTreeSet<u64> = BTreeSet::new();
    let mut last_sent = 0u64;
    let mut acked: Vec<u64> = Vec::with_capacity(PUSH_BATCH_MAX);
    loop {
        let mut blocked = false;
        if let Some(h) = &handle {
            let room = SEND_WINDOW_MAX.saturating_sub(inflight.len());
            let next_seq = core.store().next_seq();
            if room > 0 && last_sent.saturating_add(1) < next_seq {
                let entries = core.store().peek_after(last_sent, room)?;
                for e in entries {
                    let topic = e.topic.as_deref().unwrap_or(&core.telemetry_topic);
                    if !h.try_publish(topic, e.payload, 1, Some(e.seq)) {
                        blocked = true;
                        break;
                    }
                    debug_assert!(e.seq > last_sent);
                    inflight.insert(e.seq);
                    last_sent = e.seq;
                }
            }
        }
        if core.config.exit_when_drained
            && core.input_done.load(Ordering::SeqCst)
            && core.store().is_empty()
        {
            core.drained.send_replace(true);
        }
        tokio::select! {
            changed = link_rx.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                handle = link_rx.borrow_and_update().clone();
                inflight.clear();
                last_sent = 0;
            }
            token = acks.recv() => {
                let Some(first) = token else { return Ok(()) };
                // Everything already waiting is acknowledged in one transaction.
                acked.push(first);
                while acked.len() < PUSH_BATCH_MAX {
                    match acks.try_recv() {
                        Ok(t) => acked.push(t),
                        Err(_) => break,
                    }
                }
                for seq in &acked {
                    inflight.remove(seq);
                }
                let result = core.store().ack(&acked);
                acked.clear();
                result?;
            }
            () = core.outbox_changed.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(FILL_RETRY_MS)), if blocked => {}
        }
    }
}

/// The metrics child: one sample every `interval_secs` (the first was queued at start).
async fn sample_metrics(core: Arc<Core>) -> anyhow::Result<()> {
    if core.config.interval_secs == 0 {
        return Ok(());
    }
    let period = Duration::from_secs(core.config.interval_secs);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let sample = lock(&core.metrics).sample();
        enqueue_telemetry(&core, vec![sample])?;
    }
}

/// The input child: commits input objects in batches until the input ends.
async fn take_input(core: Arc<Core>) -> anyhow::Result<()> {
    let mut rx = core.input_rx.lock().await;
    loop {
        let Some(first) = rx.recv().await else {
            tracing::info!("input at end");
            core.input_done.store(true, Ordering::SeqCst);
            core.outbox_changed.notify_one();
            return Ok(());
        };
        // Everything already waiting goes into the same transaction.
        let mut batch = vec![first];
        while batch.len() < PUSH_BATCH_MAX {
            match rx.try_recv() {
                Ok(obj) => batch.push(obj),
                Err(_) => break,
            }
        }
        enqueue_telemetry(&core, batch)?;
    }
}

/// Adds `seq` and `ts` to each object, keeps those that are valid v1 telemetry (others are
/// logged and skipped) and commits them in one store transaction. Only a store failure is an
/// error.
fn enqueue_telemetry(core: &Core, objs: Vec<Map<String, Value>>) -> anyhow::Result<()> {
    let now_ms = core.clock.now_ms();
    let valid: Vec<_> = objs
        .into_iter()
        .filter(|obj| {
            // The largest possible seq makes the size check conservative.
            let probe = telemetry_payload(obj.clone(), u64::MAX, now_ms);
            match Telemetry::parse(&probe) {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "message is not valid telemetry; skipped");
                    false
                }
            }
        })
        .collect();
    if valid.is_empty() {
        return Ok(());
    }
    let mut store = core.store();
    let first = store.next_seq();
    let entries = valid
        .into_iter()
        .zip(first..)
        .map(|(obj, seq)| Entry {
            seq,
            topic: None,
            payload: telemetry_payload(obj, seq, now_ms),
        })
        .collect();
    let pushed = store.push(entries)?;
    if pushed.dropped > 0 {
        tracing::warn!(
            dropped = pushed.dropped,
            dropped_total = store.dropped_total(),
            capacity = store.capacity(),
            "outbox full; oldest messages dropped"
        );
    }
    drop(store);
    core.outbox_changed.notify_one();
    Ok(())
}

/// A v1 telemetry payload: `obj` plus `seq` (always the agent's) and `ts` (kept if the line
/// carried one, else `now_ms`).
pub fn telemetry_payload(mut obj: Map<String, Value>, seq: u64, now_ms: u64) -> Vec<u8> {
    obj.insert("seq".into(), Value::from(seq));
    obj.entry("ts").or_insert_with(|| Value::from(now_ms));
    Value::Object(obj).to_string().into_bytes()
}
