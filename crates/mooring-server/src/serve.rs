//! Startup, listeners (MQTT/TLS, MQTT dev, HTTP), background jobs and graceful shutdown.

use crate::app::App;
use crate::broker_state::StorePersistence;
use crate::config::ServerConfig;
use crate::hooks::ServerHooks;
use crate::metrics::Counters;
use crate::pki::{cert_common_name, cert_sha256_hex, Pki};
use anyhow::Context;
use mooring_broker::{Broker, ConnInfo, ListenerKind};
use mooring_proto::Clock;
use mooring_store::{
    BrokerStateWriter, SqliteStore, Store, TelemetryWriter, TelemetryWriterConfig,
};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

/// Bound sockets, so the caller (binary or test) chooses addresses and ports.
pub struct Listeners {
    pub mqtt: TcpListener,
    pub mqtt_dev: Option<TcpListener>,
    pub http: TcpListener,
}

impl Listeners {
    /// Binds the addresses in `config`.
    pub async fn bind(config: &ServerConfig) -> anyhow::Result<Self> {
        let mqtt = TcpListener::bind(config.mqtt_addr)
            .await
            .with_context(|| bind_failed("MQTT/TLS", config.mqtt_addr, "mqtt-addr"))?;
        let mqtt_dev = match config.mqtt_dev_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| bind_failed("MQTT dev", addr, "mqtt-dev-addr"))?,
            ),
            None => None,
        };
        let http = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| bind_failed("HTTP API", config.http_addr, "http-addr"))?;
        Ok(Self {
            mqtt,
            mqtt_dev,
            http,
        })
    }
}

/// The context of a failed bind: which listener, and the flag (environment variable, config
/// key) that moves it, since the usual cause is a port another process holds.
fn bind_failed(listener: &str, addr: SocketAddr, flag: &str) -> String {
    let env = format!("MOORING_{}", flag.replace('-', "_").to_uppercase());
    let key = flag.replace('-', "_");
    format!(
        "cannot listen for {listener} on {addr}; choose another address with --{flag} \
         (or {env}, or {key} in the config file)"
    )
}

/// A started server: its addresses and state; stop it with [`RunningServer::shutdown`].
pub struct RunningServer {
    pub app: Arc<App>,
    pub mqtt_addr: SocketAddr,
    pub mqtt_dev_addr: Option<SocketAddr>,
    pub http_addr: SocketAddr,
    /// Set if the admin token was created by this start.
    pub new_admin_token: Option<String>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    connections: TaskTracker,
    broker: Broker,
    writer_task: tokio::task::JoinHandle<()>,
    broker_state_task: tokio::task::JoinHandle<()>,
}

/// Starts the server and runs it until `shutdown` resolves.
pub async fn run(
    config: ServerConfig,
    listeners: Listeners,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let server = RunningServer::start(config, listeners, clock).await?;
    shutdown.await;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

/// The store `config` names: PostgreSQL at `[store] url`, else SQLite in the data dir.
async fn open_store(config: &ServerConfig) -> anyhow::Result<Arc<dyn Store>> {
    match &config.store.url {
        Some(url) => {
            let store = mooring_store::PgStore::connect_sized(url, config.store.pool_size)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| {
                    format!(
                        "connecting to PostgreSQL at {}",
                        mooring_bus::redact_url(url)
                    )
                })?;
            Ok(Arc::new(store))
        }
        None => Ok(Arc::new(SqliteStore::open(&config.data_dir).with_context(
            || format!("opening store in {}", config.data_dir.display()),
        )?)),
    }
}

/// The bus `config` names: NATS at `[bus] url`, else in-process (one node on a shared store).
async fn open_bus(config: &ServerConfig) -> anyhow::Result<Arc<dyn mooring_bus::Bus>> {
    let bus_config = mooring_bus::BusConfig {
        subscription_buffer_len: config.bus.buffer_len,
        ..mooring_bus::BusConfig::default()
    };
    Ok(match &config.bus.url {
        Some(url) => {
            let mut nats = mooring_bus::NatsConfig::new(url.clone(), config.bus.prefix.clone());
            nats.bus = bus_config;
            Arc::new(mooring_bus::NatsBus::connect(nats).await.with_context(|| {
                format!("connecting to NATS at {}", mooring_bus::redact_url(url))
            })?)
        }
        None => Arc::new(mooring_bus::InProcessBus::new(bus_config)?),
    })
}

/// What a cluster node shares with the other nodes besides the store: the bus and the cluster
/// key (which seals the PKI kept in the store).
struct SharedParts {
    bus: Arc<dyn mooring_bus::Bus>,
    key: Arc<crate::pki::SecretKey>,
}

/// Joins the cluster on `bus`: this node's first heartbeat, the sessions a previous run of this
/// node left in the store cleared, and the subscription to the other nodes' notices, ready
/// before any listener accepts.
async fn start_cluster(
    config: &ServerConfig,
    store: Arc<dyn Store>,
    bus: Arc<dyn mooring_bus::Bus>,
    clock: Arc<dyn Clock>,
    bus_key: ring::hmac::Key,
) -> anyhow::Result<(Arc<crate::cluster::Cluster>, mooring_bus::Subscription)> {
    let cluster = Arc::new(crate::cluster::Cluster::new(
        config.node_id.clone(),
        bus.clone(),
        bus_key,
        store.clone(),
        clock,
        &config.cluster,
    ));
    cluster
        .heartbeat()
        .await
        .context("recording this node in the store")?;
    let cleared = store
        .clear_node_sessions(&config.node_id)
        .await
        .context("clearing this node's sessions from its previous run")?;
    if cleared > 0 {
        tracing::info!(
            sessions = cleared,
            "cleared the sessions this node held before it restarted"
        );
    }
    let inbox = bus
        .subscribe(crate::cluster::SUBJECT_ALL)
        .await
        .context("subscribing to the cluster's notices")?;
    tracing::info!(node = %config.node_id, bus = if config.bus.url.is_some() { "nats" } else { "in-process" }, "joined the cluster");
    Ok((cluster, inbox))
}

/// Creates the data dir if needed and makes it 0700 whether or not we created it (umask and
/// an existing 0755 directory notwithstanding); pre-creates the database file 0600, because
/// SQLite gives its `-wal` and `-shm` files the database file's mode.
fn prepare_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating data dir {}", dir.display()))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making data dir {} private (0700)", dir.display()))?;
    let db = dir.join(mooring_store::DB_FILE_NAME);
    if !db.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&db)
            .with_context(|| format!("creating {}", db.display()))?;
    }
    Ok(())
}

/// Makes every file in the data dir 0600 and every directory 0700 (symbolic links are left
/// alone, not followed): the database and its `-wal`/`-shm`, keys, certificates, the token.
fn restrict_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("reading data dir {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading data dir {}", dir.display()))?;
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("inspecting {}", path.display()))?;
        let mode = if meta.is_file() {
            0o600
        } else if meta.is_dir() {
            0o700
        } else {
            continue;
        };
        if meta.permissions().mode() & 0o7777 != mode {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting the mode of {} to {mode:o}", path.display()))?;
        }
    }
    Ok(())
}

impl RunningServer {
    /// Starts the server `config` describes: on SQLite in the data dir, or (`[store] url`) as a
    /// cluster node on PostgreSQL and the bus at `[bus] url`.
    pub async fn start(
        config: ServerConfig,
        listeners: Listeners,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<RunningServer> {
        config.validate()?;
        prepare_data_dir(&config.data_dir)?;
        let store = open_store(&config).await?;
        let shared = match &config.cluster.secret_key_file {
            Some(key_file) if config.is_shared() => Some(SharedParts {
                key: Arc::new(crate::pki::SecretKey::from_file(key_file)?),
                bus: open_bus(&config).await?,
            }),
            _ => None,
        };
        Self::start_on(config, Some(listeners), clock, store, shared).await
    }

    /// Starts `mooring worker`: a cluster member that only runs job workers (`[jobs]
    /// workers` of them, taking turns of the shared queue with every node's) and the cluster's
    /// heartbeat and bus; it listens on nothing. Needs a cluster's config (`[store] url`,
    /// `[bus] url`, `[cluster] secret_key_file`).
    pub async fn start_worker(
        config: ServerConfig,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<RunningServer> {
        config.validate()?;
        anyhow::ensure!(
            config.is_shared() && config.cluster.secret_key_file.is_some(),
            "`mooring worker` takes turns of a cluster's job queue: its config needs [store] url \
             (PostgreSQL), [bus] url and [cluster] secret_key_file, as the cluster's nodes have; \
             on SQLite `mooring serve` runs the jobs itself ([jobs] workers)"
        );
        anyhow::ensure!(
            config.jobs.workers > 0,
            "[jobs] workers is 0: this worker would run nothing"
        );
        prepare_data_dir(&config.data_dir)?;
        let store = open_store(&config).await?;
        let shared = match &config.cluster.secret_key_file {
            Some(key_file) => Some(SharedParts {
                key: Arc::new(crate::pki::SecretKey::from_file(key_file)?),
                bus: open_bus(&config).await?,
            }),
            None => None,
        };
        Self::start_on(config, None, clock, store, shared).await
    }

    /// Starts a cluster node on a store and a bus the caller opened (and shares with the
    /// other nodes), with the cluster key `key`: the fleet simulator runs several nodes in one
    /// process on one store and one in-process bus. `[store] url` and `[bus] url` must be unset
    /// (the store and bus are these); everything else is [`RunningServer::start`]'s.
    pub async fn start_shared(
        config: ServerConfig,
        listeners: Listeners,
        clock: Arc<dyn Clock>,
        store: Arc<dyn Store>,
        bus: Arc<dyn mooring_bus::Bus>,
        key: crate::pki::SecretKey,
    ) -> anyhow::Result<RunningServer> {
        config.validate()?;
        anyhow::ensure!(
            config.store.url.is_none() && config.bus.url.is_none(),
            "a node started on a given store and bus takes no [store] url or [bus] url"
        );
        prepare_data_dir(&config.data_dir)?;
        Self::start_on(
            config,
            Some(listeners),
            clock,
            store,
            Some(SharedParts {
                bus,
                key: Arc::new(key),
            }),
        )
        .await
    }

    /// The start itself, on an open store; `shared`: a cluster node's bus and key. Without
    /// `listeners`, a worker ([`RunningServer::start_worker`]).
    async fn start_on(
        mut config: ServerConfig,
        listeners: Option<Listeners>,
        clock: Arc<dyn Clock>,
        store: Arc<dyn Store>,
        shared: Option<SharedParts>,
    ) -> anyhow::Result<RunningServer> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // The address actually bound (port 0 picks one), for links the server hands out.
        if let Some(Ok(addr)) = listeners.as_ref().map(|l| l.http.local_addr()) {
            config.http_addr = addr;
        }
        let now =
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(clock.now_ms()) * 1_000_000)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let (pki, created) = match &shared {
            Some(parts) => {
                Pki::load_or_create_shared(store.as_ref(), &parts.key, &config.server_names, now)
                    .await?
            }
            None => Pki::load_or_create(&config.data_dir, &config.server_names, now)?,
        };
        if created {
            tracing::info!("created the fleet CA and the server certificate");
        }
        let pki_home = match &shared {
            Some(parts) => crate::registry::PkiHome::Shared(parts.key.clone()),
            None => crate::registry::PkiHome::DataDir(config.data_dir.clone()),
        };
        let new_admin_token = if shared.is_some() {
            crate::auth::ensure_shared_admin_token(store.as_ref(), &config.data_dir, clock.now_ms())
                .await?
        } else {
            crate::auth::ensure_admin_token(store.as_ref(), &config.data_dir, clock.now_ms())
                .await?
        };
        let ota_keys = match &shared {
            Some(parts) => {
                crate::ota::OtaKeys::load_or_create_shared(&config, store.as_ref(), &parts.key)
                    .await
                    .context("the OTA update key")?
            }
            None => {
                crate::ota::OtaKeys::load_or_create_in_dir(&config).context("the OTA update key")?
            }
        };
        let local_secret = match &shared {
            Some(parts) => crate::local::shared_secret(&parts.key),
            None => {
                crate::local::secret_in_dir(&config.data_dir).context("the local key secret")?
            }
        };
        restrict_data_dir(&config.data_dir)?;
        // The HTTPS listener's certificate follows the PKI (a fleet CA retirement replaces it).
        let server_cert = crate::pki::ServerCert::new(&pki)?;
        let http_tls = if config.http_tls {
            Some(TlsAcceptor::from(Pki::http_tls_config(
                server_cert.clone(),
            )?))
        } else {
            None
        };
        let (writer, writer_task) = TelemetryWriter::spawn(
            store.clone(),
            TelemetryWriterConfig {
                queue_len_max: config.telemetry.queue_len_max,
                batch_len_max: config.telemetry.batch_len_max,
                metrics_per_device_max: config.telemetry.metrics_per_device_max,
            },
        );
        let policy = config.policy()?;
        let broker_config = config.broker();
        // Retained messages and persistent sessions from the last run, restored before any
        // listener accepts.
        let mut stored_broker_state = store
            .load_broker_state()
            .await
            .context("loading the broker's retained messages and sessions")?;
        let oidc_state_key: [u8; 32] = shared
            .as_ref()
            .map_or_else(rand::random, |p| p.key.oidc_state_key());
        let cluster = match shared {
            Some(parts) => Some(
                start_cluster(
                    &config,
                    store.clone(),
                    parts.bus,
                    clock.clone(),
                    parts.key.bus_key(),
                )
                .await?,
            ),
            None => None,
        };
        if cluster.is_some() {
            // A stored persistent session may belong to a client now on another node, which
            // owns it: a node takes sessions only from the clients that connect to it.
            stored_broker_state.sessions.clear();
        }
        let (broker_state, broker_state_task) = BrokerStateWriter::spawn(store.clone());
        let persistence = Arc::new(StorePersistence::new(broker_state.clone(), clock.clone()));
        let app_clock = clock.clone();
        let webhooks = Arc::new(
            crate::webhooks::Webhooks::load(&config.webhooks, clock.clone())
                .context("[[webhook]]")?,
        );
        let emails = Arc::new(crate::emails::Emails::load(&config.emails).context("[[email]]")?);
        let app = Arc::new(App::new(
            config,
            store,
            pki,
            pki_home,
            server_cert,
            policy,
            clock,
            writer,
            broker_state,
            cluster.as_ref().map(|(c, _)| c.clone()),
            ota_keys,
            local_secret,
            webhooks,
            emails,
        ));
        if let Some(oidc_config) = &app.config().oidc {
            // Login states are sealed under a key every node derives from the cluster key; a
            // single node's is random per start (a login in flight across a restart starts over).
            let oidc = crate::oidc::Oidc::new(oidc_config, oidc_state_key, app_clock.clone())
                .await
                .context("[oidc]")?;
            app.set_oidc(Arc::new(oidc));
        }
        // The MQTT listener trusts the fleet CA and the enabled registered CAs (re-read when
        // they change: here at once, on a cluster's other nodes by `cas::run_reload`).
        app.cas
            .reload()
            .await
            .context("building the MQTT listener's TLS config")?;
        // Before any session is restored: a gateway's subscriptions for its children are
        // judged by the attachments.
        app.registry
            .load_gateways()
            .await
            .map_err(|e| anyhow::anyhow!("loading gateway attachments: {}", e.message))?;
        let broker =
            Broker::with_persistence(broker_config, Arc::new(ServerHooks::new(&app)), persistence);
        broker.restore(crate::broker_state::restored(stored_broker_state));
        app.set_broker(broker.clone());

        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let connections = TaskTracker::new();
        let conn_limit = Arc::new(Semaphore::new(app.config().limits.mqtt_connections_max));

        let worker = listeners.is_none();
        let (mqtt_addr, mqtt_dev_addr, http_addr) = match listeners {
            Some(listeners) => {
                let spawn = |tasks: &mut JoinSet<()>, listener, tls, kind| {
                    tasks.spawn(accept_mqtt(
                        listener,
                        tls,
                        kind,
                        broker.clone(),
                        app.clone(),
                        connections.clone(),
                        conn_limit.clone(),
                        stop_rx.clone(),
                    ));
                };
                let mqtt_addr = listeners.mqtt.local_addr()?;
                tracing::info!("MQTT/TLS listening on {mqtt_addr}");
                spawn(&mut tasks, listeners.mqtt, Some(MqttTls), ListenerKind::Tls);
                let mut mqtt_dev_addr = None;
                if let Some(dev) = listeners.mqtt_dev {
                    let addr = dev.local_addr()?;
                    anyhow::ensure!(
                        addr.ip().is_loopback(),
                        "the MQTT dev listener must be on a loopback address, not {addr}"
                    );
                    tracing::warn!("MQTT dev listener (plain, anonymous, unrestricted; for local experiments only) listening on {addr}");
                    mqtt_dev_addr = Some(addr);
                    spawn(&mut tasks, dev, None, ListenerKind::Dev);
                }
                let http_addr = listeners.http.local_addr()?;
                let scheme = if http_tls.is_some() { "https" } else { "http" };
                tracing::info!("HTTP API listening on {scheme}://{http_addr}");
                tasks.spawn(serve_http(
                    listeners.http,
                    http_tls,
                    app.clone(),
                    stop_rx.clone(),
                ));
                (mqtt_addr, mqtt_dev_addr, http_addr)
            }
            None => {
                tracing::info!(
                    workers = app.config().jobs.workers,
                    "job worker: listening on nothing, taking turns of the cluster's job queue"
                );
                let none = SocketAddr::from(([0, 0, 0, 0], 0));
                (none, None, none)
            }
        };
        if let Some((cluster, inbox)) = cluster {
            tasks.spawn(crate::cluster::run_inbox(
                app.clone(),
                inbox,
                stop_rx.clone(),
            ));
            tasks.spawn(crate::cluster::run_outbox(cluster, stop_rx.clone()));
            tasks.spawn(crate::cluster::run_heartbeat(app.clone(), stop_rx.clone()));
            if !worker {
                tasks.spawn(session_flush_loop(app.clone(), stop_rx.clone()));
                tasks.spawn(crate::cas::run_reload(app.clone(), stop_rx.clone()));
                tasks.spawn(crate::gateways::run_reconcile(app.clone(), stop_rx.clone()));
            }
        } else {
            // One node: the deltas it restored are the whole truth. (A cluster node restored
            // every retained message from the shared store already.)
            match app.shadows.republish_deltas().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(shadows = n, "republished retained shadow deltas"),
                Err(e) => tracing::warn!(error = %e, "republishing shadow deltas failed"),
            }
        }
        spawn_job_workers(&mut tasks, &app, &stop_rx);
        if !worker {
            spawn_node_tasks(&mut tasks, &app, &stop_rx);
        }
        Ok(RunningServer {
            app,
            mqtt_addr,
            mqtt_dev_addr,
            http_addr,
            new_admin_token,
            stop,
            tasks,
            connections,
            broker,
            writer_task,
            broker_state_task,
        })
    }

    /// Stops accepting, closes every session, flushes presence, then drops the server's state
    /// and waits for both writers to drain what was queued and stop. Nothing keeps the state
    /// alive after this (the broker's hooks hold the app weakly), so the store's connections
    /// are closed when it returns ([`RunningServer::state_probe`]).
    pub async fn shutdown(self) {
        let RunningServer {
            app,
            stop,
            mut tasks,
            connections,
            broker,
            writer_task,
            broker_state_task,
            ..
        } = self;
        let _ = stop.send(true);
        app.ota_tasks.stop().await;
        app.events.close().await;
        broker.shutdown().await;
        connections.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), connections.wait()).await;
        while tasks.join_next().await.is_some() {}
        if let Err(e) = app.presence.flush().await {
            tracing::warn!(error = %e, "final presence flush failed");
        }
        if let Err(e) = app.health.tracker().flush().await {
            tracing::warn!(error = %e, "final health flush failed");
        }
        if let Some(cluster) = app.cluster() {
            if let Err(e) = app.presence.flush_sessions().await {
                tracing::warn!(error = %e, "final session flush failed");
            }
            cluster.release_leases().await;
        }
        // The last handles of the app and the broker: the writers' senders go with them, so
        // each writer drains its queue and ends.
        drop(app);
        drop(broker);
        for (name, task) in [
            ("telemetry", writer_task),
            ("broker state", broker_state_task),
        ] {
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                tracing::warn!(writer = name, "writer did not drain within 5 s");
            }
        }
    }

    /// Stops the server at once, as `kill -9` would (the fleet simulator's `kill_node`): every
    /// task is aborted where it is, the two writers too (what they had queued and not committed
    /// is lost; none of it was acknowledged), nothing is flushed, no session is closed and no
    /// lease released. A cluster node's heartbeats stop, so the other nodes see it dead after
    /// `node_lease_ms`. Not ended here: connections (the embedder drops those it serves through
    /// `Broker::serve_connection`; TCP connections this server accepted run on, writers
    /// gone, until their peer goes) and broker timers (a will delay, a persistent session's
    /// expiry: each fires once, then ends). The simulator's devices use neither TCP nor
    /// persistent sessions nor wills.
    pub fn kill(self) {
        let RunningServer {
            app,
            mut tasks,
            writer_task,
            broker_state_task,
            ..
        } = self;
        app.ota_tasks.abort_all();
        tasks.abort_all();
        writer_task.abort();
        broker_state_task.abort();
    }

    /// A weak handle on the server's state, to check that it is freed after
    /// [`RunningServer::shutdown`] (tests; the simulator restarts servers in one process).
    pub fn state_probe(&self) -> Weak<App> {
        Arc::downgrade(&self.app)
    }
}

/// TLS on an MQTT listener, with the config in force when a connection is accepted
/// ([`crate::cas::Cas::mqtt_tls`]: the fleet CA plus the enabled registered CAs).
#[derive(Clone, Copy)]
struct MqttTls;

#[allow(clippy::too_many_arguments)]
async fn accept_mqtt(
    listener: TcpListener,
    tls: Option<MqttTls>,
    kind: ListenerKind,
    broker: Broker,
    app: Arc<App>,
    connections: TaskTracker,
    limit: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let handshake_timeout = Duration::from_millis(app.config().limits.tls_handshake_timeout_ms);
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; refusing");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let broker = broker.clone();
        let app = app.clone();
        connections.spawn(async move {
            let _permit = permit;
            match tls {
                None => {
                    let info = ConnInfo {
                        peer: Some(peer),
                        cert_identity: None,
                        cert_sha256: None,
                        cert_der: None,
                        listener: kind,
                    };
                    broker.serve_connection(tcp, info).await;
                }
                Some(MqttTls) => {
                    let Some(config) = app.cas.mqtt_tls() else {
                        tracing::warn!(%peer, "no TLS config yet; connection refused");
                        return;
                    };
                    let acceptor = TlsAcceptor::from(config);
                    // The handshake state is boxed and the stream moved to the heap once, so this
                    // task (and the broker's, which takes the stream) stays small while idle.
                    let handshake = Box::pin(acceptor.accept(tcp));
                    let stream = match tokio::time::timeout(handshake_timeout, handshake).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            Counters::inc(&app.counters().tls_handshake_failures);
                            tracing::info!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            Counters::inc(&app.counters().tls_handshake_failures);
                            tracing::info!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let leaf = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.as_ref().to_vec());
                    let (cert_identity, cert_sha256, cert_der) = match leaf {
                        Some(der) => match cert_common_name(&der) {
                            Some(cn) => (
                                Some(cn),
                                Some(cert_sha256_hex(&der)),
                                Some(Arc::<[u8]>::from(der)),
                            ),
                            None => {
                                tracing::info!(%peer, "client certificate without a single CN; refused");
                                return;
                            }
                        },
                        None => (None, None, None),
                    };
                    let info = ConnInfo {
                        peer: Some(peer),
                        cert_identity,
                        cert_sha256,
                        cert_der,
                        listener: kind,
                    };
                    broker.serve_connection(Box::new(stream), info).await;
                }
            }
        });
    }
}

/// Serves the HTTP API (HTTP/1.1, plain or TLS) with bounded connections: at most
/// `http.connections_max` at once, each closed if a request header (or, on a kept-alive
/// connection, the next request) does not arrive within `http.header_read_timeout_ms`.
async fn serve_http(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Arc<App>,
    mut stop: watch::Receiver<bool>,
) {
    let limits = app.config().http.clone();
    let handshake_timeout = Duration::from_millis(app.config().limits.tls_handshake_timeout_ms);
    let router = crate::http::router(app.clone());
    // hyper's header read timeout starts when it begins waiting for a request head: at accept
    // and again after every response on a kept-alive connection (hyper >= 1.4), so it is the
    // idle timeout too.
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms));
    let slots = Arc::new(Semaphore::new(limits.connections_max));
    let conns = TaskTracker::new();
    loop {
        // A slot first, then accept: clients over the cap wait in the kernel's backlog and
        // hold none of our file descriptors, which the MQTT listeners need for devices.
        if slots.available_permits() == 0 {
            Counters::inc(&app.counters().http_connection_cap);
        }
        let permit = tokio::select! {
            _ = stop.changed() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = stop.changed() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let tls = tls.clone();
        let http1 = http1.clone();
        let router = router.clone();
        let stop = stop.clone();
        let app = app.clone();
        conns.spawn(async move {
            let _permit = permit;
            let c = app.counters();
            match tls {
                None => serve_http_connection(&http1, tcp, router, peer, stop, c).await,
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            serve_http_connection(&http1, stream, router, peer, stop, c).await
                        }
                        Ok(Err(e)) => {
                            Counters::inc(&c.http_tls_handshake_failures);
                            tracing::debug!(%peer, error = %e, "HTTPS handshake failed")
                        }
                        Err(_) => {
                            Counters::inc(&c.http_tls_handshake_failures);
                            tracing::debug!(%peer, "HTTPS handshake timed out")
                        }
                    }
                }
            }
        });
    }
    conns.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), conns.wait()).await;
}

/// Serves one HTTP/1.1 connection until it closes; on shutdown, finishes the request in flight.
async fn serve_http_connection<I>(
    http1: &hyper::server::conn::http1::Builder,
    io: I,
    router: axum::Router,
    peer: std::net::SocketAddr,
    mut stop: watch::Receiver<bool>,
    counters: &Counters,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // The peer's address for the handlers (login throttling, the audit log), and the
    // connection's closer: an event stream whose client stopped reading closes it.
    let closer = tokio_util::sync::CancellationToken::new();
    let handle = crate::http::ConnectionCloser(closer.clone());
    let service = tower::ServiceExt::map_request(
        router,
        move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            req.extensions_mut().insert(handle.clone());
            req
        },
    );
    let service = hyper_util::service::TowerToHyperService::new(service);
    let conn = http1.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = closer.cancelled() => Ok(()),
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            Counters::inc(&counters.http_header_timeouts);
        }
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// What a node runs besides listeners and job workers (a `mooring worker` runs none of it):
/// command dispatch and scheduling, sweeps, flushes, rules, retention, the fleet sampler.
fn spawn_node_tasks(tasks: &mut JoinSet<()>, app: &Arc<App>, stop: &watch::Receiver<bool>) {
    tasks.spawn(crate::commands::run_dispatcher(
        app.commands.clone(),
        stop.clone(),
    ));
    tasks.spawn(crate::commands::run_scheduler(
        app.commands.clone(),
        stop.clone(),
    ));
    tasks.spawn(crate::registry::run_session_cert_sweep(
        app.clone(),
        stop.clone(),
    ));
    tasks.spawn(presence_flush_loop(app.clone(), stop.clone()));
    tasks.spawn(health_flush_loop(app.clone(), stop.clone()));
    tasks.spawn(health_cohort_loop(app.clone(), stop.clone()));
    tasks.spawn(crate::rules::run_rules(app.rules.clone(), stop.clone()));
    tasks.spawn(retention_loop(app.clone(), stop.clone()));
    tasks.spawn(token_expiry_loop(app.clone(), stop.clone()));
    tasks.spawn(compaction_loop(app.clone(), stop.clone()));
    tasks.spawn(ota_sweep_loop(app.clone(), stop.clone()));
    tasks.spawn(rollout_loop(app.clone(), stop.clone()));
    tasks.spawn(crate::fleet::run_sampler(app.fleet.clone(), stop.clone()));
}

/// `[jobs] workers` job workers (`<node id>/<n>`), the first also pruning finished jobs.
fn spawn_job_workers(tasks: &mut JoinSet<()>, app: &Arc<App>, stop: &watch::Receiver<bool>) {
    let node = app.config().node_id.clone();
    for n in 0..app.config().jobs.workers {
        tasks.spawn(crate::jobs::run_jobs(
            app.jobs.clone(),
            format!("{node}/{n}"),
            n == 0,
            stop.clone(),
        ));
    }
}

/// Runs `job` every `period` (the first run at once) until `stop` changes. Missed ticks are
/// delayed, not bunched: a slow pass never causes a burst of catch-up passes.
pub(crate) async fn run_every<F, Fut>(period: Duration, mut stop: watch::Receiver<bool>, mut job: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        job().await;
    }
}

async fn presence_flush_loop(app: Arc<App>, stop: watch::Receiver<bool>) {
    let period = Duration::from_secs(app.config().limits.presence_flush_interval_secs.max(1));
    run_every(period, stop, || async {
        if let Err(e) = app.presence.flush().await {
            tracing::warn!(error = %e, "presence flush failed; will retry");
        }
    })
    .await;
}

/// Fleet health: the signals this node saw reach the store every `[health] flush_interval_ms`.
async fn health_flush_loop(app: Arc<App>, stop: watch::Receiver<bool>) {
    let period = Duration::from_millis(app.health.tracker().flush_interval_ms().max(1));
    run_every(period, stop, || async {
        if let Err(e) = app.health.tracker().flush().await {
            tracing::warn!(error = %e, "health flush failed; will retry");
        }
    })
    .await;
}

/// Fleet health: the cohort sweeper every `[health] cohort_interval_ms` (0: never), under the
/// lease `health.sweeper` in a cluster.
async fn health_cohort_loop(app: Arc<App>, stop: watch::Receiver<bool>) {
    let every = app.health.cohort_interval_ms();
    if every == 0 {
        return;
    }
    run_every(Duration::from_millis(every), stop, || async {
        if !runs(&app, crate::cluster::LEASE_HEALTH).await {
            return;
        }
        match app.health.sweep_cohorts().await {
            Ok(sweep) => {
                for r in sweep.raised {
                    let kind = format!("cohort:{}", r.signal);
                    let target = crate::playbooks::Target::Cohort {
                        group_by: r.group_by,
                        cohort: r.cohort,
                        signal: r.signal,
                    };
                    app.jobs
                        .run_playbooks_on(&kind, &r.alert, target, None)
                        .await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "the cohort sweep failed; will retry"),
        }
    })
    .await;
}

/// Whether this node runs once-only work `lease` now: always on a single node; in a cluster
/// only while it holds the lease.
async fn runs(app: &App, lease: &'static str) -> bool {
    match app.cluster() {
        Some(cluster) => cluster.holds(lease).await,
        None => true,
    }
}

/// Cluster mode: this node's session opens and closes reach the store every
/// [`crate::presence::SESSION_FLUSH_INTERVAL_MS`].
async fn session_flush_loop(app: Arc<App>, stop: watch::Receiver<bool>) {
    let period = Duration::from_millis(crate::presence::SESSION_FLUSH_INTERVAL_MS);
    run_every(period, stop, || async {
        if let Err(e) = app.presence.flush_sessions().await {
            tracing::warn!(error = %e, "session flush failed; will retry");
        }
    })
    .await;
}

/// The OTA sweeper ([`crate::ota::Ota::sweep`]): at start, then every
/// `Ota::sweep_interval_ms`, under the lease `ota.sweeper` in a cluster. A pass in progress is
/// dropped at shutdown (what it left is found by the next one).
async fn ota_sweep_loop(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(app.ota.sweep_interval_ms().max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        if !runs(&app, crate::cluster::LEASE_OTA).await {
            continue;
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = app.ota.sweep() => {}
        }
    }
}

/// The rollout controller ([`crate::rollouts::Rollouts::tick`]) every `[rollouts] tick_ms`,
/// under the lease `rollouts.controller` in a cluster.
async fn rollout_loop(app: Arc<App>, stop: watch::Receiver<bool>) {
    let period = Duration::from_millis(app.rollouts.tick_ms().max(1));
    run_every(period, stop, || async {
        if !runs(&app, crate::cluster::LEASE_ROLLOUTS).await {
            return;
        }
        app.rollouts.tick().await;
    })
    .await;
}

async fn compaction_loop(app: Arc<App>, stop: watch::Receiver<bool>) {
    let period = Duration::from_secs(crate::telemetry::COMPACTION_INTERVAL_SECS);
    run_every(period, stop, || async {
        if !runs(&app, crate::cluster::LEASE_COMPACTION).await {
            return;
        }
        match app.telemetry.compaction_pass().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(rows = n, "telemetry compaction moved points into chunks"),
            Err(e) => tracing::warn!(error = %e, "telemetry compaction pass failed"),
        }
    })
    .await;
}

async fn retention_loop(app: Arc<App>, stop: watch::Receiver<bool>) {
    let period = Duration::from_secs(app.config().telemetry.retention_interval_secs.max(1));
    run_every(period, stop, || async {
        if !runs(&app, crate::cluster::LEASE_RETENTION).await {
            return;
        }
        match app.telemetry.retention_pass().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "telemetry retention removed old points"),
            Err(e) => tracing::warn!(error = %e, "telemetry retention pass failed"),
        }
        match app.audit.prune().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(entries = n, "audit retention removed old entries"),
            Err(e) => tracing::warn!(error = %e, "audit retention pass failed"),
        }
        match app.accounts.prune().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(rows = n, "ended sessions and old login failures removed"),
            Err(e) => tracing::warn!(error = %e, "session pruning failed"),
        }
        match app.jobs.playbooks().prune().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(tickets = n, "closed tickets removed"),
            Err(e) => tracing::warn!(error = %e, "ticket pruning failed"),
        }
        match app.provisioning.prune().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                claims = n,
                "claims revoked or expired over 7 days ago removed"
            ),
            Err(e) => tracing::warn!(error = %e, "claim pruning failed"),
        }
    })
    .await;
}

/// Closes the MQTT sessions of tokens as they expire (every second).
async fn token_expiry_loop(app: Arc<App>, stop: watch::Receiver<bool>) {
    run_every(Duration::from_secs(1), stop, || async {
        app.tokens.expire_due();
    })
    .await;
}
