//! # mooring-bench: our server and Mosquitto, side by side, on loopback
//!
//! `mooring-bench <suite>` (and `mooring bench <suite>`, which calls [`run`]) starts both servers
//! itself, drives them with the same load generator over real sockets on 127.0.0.0/8, and prints
//! one table per suite with both numbers and their ratio (mooring ÷ mosquitto).
//!
//! ## The two targets ([`target`])
//! - **mooring**: the `mooring` binary (`--mooring-bin`, default: next to this executable, else
//!   `target/release/mooring`) with a data dir in the work dir, MQTT/TLS and HTTP on port 0 (the
//!   addresses are read from its log). Devices are created through `POST /api/v1/devices` and their
//!   keys cached in the work dir, so a kept `--work-dir` skips provisioning next time.
//! - **mosquitto**: a private `/usr/sbin/mosquitto` on a free loopback port (never 1883) with a
//!   generated config: TLS, `require_certificate true`, `use_identity_as_username true`,
//!   `max_connections -1`, persistence off. [`pki`] makes its CA, server certificate and one
//!   client certificate per device (CN = device id), signed in parallel.
//!
//! Both run under `sh -c 'ulimit -n 262144; exec …'`, are killed on drop, and restart on the same
//! port. Both use ECDSA P-256 certificates and TLS 1.3, and every connection is a full handshake.
//!
//! ## The load generator ([`client`], [`fleet`])
//! A hand-rolled MQTT 3.1.1 client (CONNECT, PUBLISH, PUBACK, PINGREQ) over tokio-rustls: a few
//! KiB per connection. [`fleet::Fleet`] runs one task per device with bounded connect concurrency,
//! binds each socket to 127.0.0.2, .3, … (5,000 connections per address) to avoid ephemeral-port
//! exhaustion, and reconnects with full-jitter backoff when asked to.
//!
//! ## Suites ([`suites`])
//! 1. `idle-memory`: RSS delta of the server ÷ connected idle devices, and time to connect all.
//! 2. `ingest`: msg/s for QoS 0/1 from 1 and 100 publishers (QoS 1 windowed); ours is durable
//!    before PUBACK and the stored count is checked against the acks through `/metrics`.
//! 3. `connect-storm`: `kill -9` + restart with N devices online; time until all are back.
//! 4. `command-rtt`: p50/p99 of a command's round trip with 10,000 devices online (ours through
//!    the commands API, durable at each step; Mosquitto as the same exchange over plain MQTT).
//!    Against a server without the commands API it reports "not yet available".
//! 5. `fanout`: QoS 1 from 1 and 100 publishers to one backend subscriber with a persistent
//!    session (`devices/+/telemetry`; ours logs in with a service token over TLS): msg/s
//!    delivered with the subscriber online, and queued then drained with it offline.
//! 6. `telemetry-storage` and `retention` (ours only): bytes per point and a range query in
//!    the store in-process; PUBACK latency while retention expires a day of many devices.
//! 7. `cluster` (ours only; issue 13, [`suites::cluster`]): `--cluster-devices` (100,000)
//!    devices over `--cluster-nodes` (6) nodes sharing a PostgreSQL database and a NATS
//!    prefix ([`cluster`]: a database created for the run and dropped after it, a 0600
//!    cluster key, the first node's admin token copied to the others). One process cannot
//!    hold 100,000 sockets here, so the load generator is several processes of this binary
//!    (hidden suite `cluster-worker`, [`worker`]: a spec on stdin, JSON reports on stdout,
//!    stops when stdin closes), device i on node i mod N, disjoint source addresses each.
//!    Reports server RSS per connection (summed over the nodes), time to connect all, command
//!    round trip p50/p99 with the API on another node than the device's, and QoS 1 ingest and
//!    command throughput with 1, 2 and 3 nodes; every node's cluster counters (bus drops,
//!    outbox drops, takeovers) and log warnings go into the notes. Not part of `all`.
//! 8. `devices-filter` (ours only; issue 15, [`suites::devices_filter`]): 100,000 devices (1,000
//!    provisioned and connected, the rest written into the store), then p50/p99 of the devices
//!    page's request pair (list with a selector, limit 50, and the fleet summary) per selector.
//!    Not part of `all`.
//!
//! Every wait has a deadline (`--timeout-secs`), and results go to stdout as Markdown
//! ([`report`]) and, with `--json FILE`, as raw numbers.

pub mod client;
pub mod cluster;
pub mod fleet;
pub mod pki;
pub mod report;
pub mod suites;
pub mod target;
pub mod worker;

use anyhow::Context;
use client::SourceAddrs;
use report::Table;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use target::Target;

/// Which suite(s) to run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    /// RSS per idle mTLS connection (default 10,000 and 50,000 connections).
    IdleMemory,
    /// QoS 0/1 msg/s from 1 and 100 publishers.
    Ingest,
    /// Time for N devices (default 10,000) to reconnect after kill -9 and restart.
    ConnectStorm,
    /// Command round trip p50/p99 with 10,000 devices online.
    CommandRtt,
    /// QoS 1 fan-out to one persistent backend subscriber, online and offline (queue, then drain).
    Fanout,
    /// Telemetry bytes on disk per point (regular, irregular, 1 Hz) and a one-day range query
    /// p50/p99: the store in-process, no server and no peer.
    TelemetryStorage,
    /// Retention of a day of `--retention-devices` devices' telemetry while `--publishers`
    /// (the largest) devices publish: PUBACK p50/p99 during and after the pass (ours only).
    Retention,
    /// Ours only, as a cluster (issue 13): `--cluster-devices` devices (100,000) over
    /// `--cluster-nodes` nodes (6) on PostgreSQL + NATS, from several load-generator processes:
    /// server RSS per connection, connect time, command RTT across nodes; ingest and command
    /// throughput with 1, 2 and 3 nodes.
    Cluster,
    /// Ours only (issue 15): the dashboard's devices page with 100,000 devices: p50/p99 of
    /// `GET /api/v1/devices?selector=S&limit=50` + `GET /api/v1/fleet/summary?selector=S`
    /// for several selectors.
    DevicesFilter,
    /// All of the above but retention (its prefill takes minutes), cluster (it needs
    /// PostgreSQL and NATS) and devices-filter (its seeding takes minutes), in that order.
    All,
    /// One load-generator process of the cluster suite (spawned by it; spec on stdin).
    #[value(hide = true)]
    ClusterWorker,
}

impl Suite {
    fn expand(self) -> Vec<Suite> {
        match self {
            Suite::All => vec![
                Suite::IdleMemory,
                Suite::Ingest,
                Suite::ConnectStorm,
                Suite::CommandRtt,
                Suite::Fanout,
                Suite::TelemetryStorage,
            ],
            s => vec![s],
        }
    }
}

/// Which servers to benchmark.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetName {
    Mooring,
    Mosquitto,
}

/// `mooring-bench <suite>`: our server vs. a private Mosquitto, same load, one table per suite.
#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// The suite to run.
    #[arg(value_enum)]
    pub suite: Suite,
    /// Connections for idle-memory (default 10000,50000) and connect-storm (default 10000).
    #[arg(long, value_delimiter = ',')]
    pub connections: Option<Vec<usize>>,
    /// Publisher counts for ingest and fanout.
    #[arg(long, value_delimiter = ',', default_value = "1,100")]
    pub publishers: Vec<usize>,
    /// QoS levels for ingest (0 and/or 1).
    #[arg(long, value_delimiter = ',', default_value = "0,1")]
    pub qos: Vec<u8>,
    /// Messages per ingest or fanout case, split across the publishers.
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    /// Times each ingest or fanout case runs per target (the table shows the median).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// QoS 1 messages in flight per publisher.
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// fanout: also run Mosquitto with `persistence true` (extra rows; it saves only every
    /// `autosave_interval` and at a clean shutdown, so never during a run).
    #[arg(long)]
    pub mosquitto_persistence: bool,
    /// Devices online (each answering commands) during command-rtt.
    #[arg(long, default_value_t = 10_000)]
    pub command_devices: usize,
    /// Commands sent in command-rtt.
    #[arg(long, default_value_t = 1_000)]
    pub commands: usize,
    /// Commands in flight at once in command-rtt.
    #[arg(long, default_value_t = 4)]
    pub command_concurrency: usize,
    /// Devices whose day of telemetry the retention suite expires.
    #[arg(long, default_value_t = 100_000)]
    pub retention_devices: usize,
    /// Days of the regular and irregular series in telemetry-storage (at least 2).
    #[arg(long, default_value_t = 30)]
    pub storage_days: u64,
    /// Connects (TCP + TLS + CONNECT) the load generator keeps in flight.
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,
    /// Servers to run (both by default).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "mooring,mosquitto"
    )]
    pub targets: Vec<TargetName>,
    /// The `mooring` binary (default: next to this executable, else target/release/mooring).
    #[arg(long)]
    pub mooring_bin: Option<PathBuf>,
    /// The Mosquitto broker binary.
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    pub mosquitto_bin: PathBuf,
    /// Work dir for data dirs, configs and cached device keys; kept (and reused) when given,
    /// otherwise a temporary dir removed at exit.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Also write the raw numbers as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Longest any one wait (all connected, all reconnected, one ingest case) may take.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
    /// cluster: nodes the devices are spread over (device i on node i mod N).
    #[arg(long, default_value_t = 6)]
    pub cluster_nodes: usize,
    /// cluster: devices connected at once (mTLS, each answering commands).
    #[arg(long, default_value_t = 100_000)]
    pub cluster_devices: usize,
    /// cluster: node counts the ingest and command throughput rows are measured with (0: none).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub cluster_scaling: Vec<usize>,
    /// cluster: publishers (QoS 1, `--messages` in total) and command-answering devices of the
    /// throughput rows, spread over the nodes.
    #[arg(long, default_value_t = 100)]
    pub cluster_publishers: usize,
    /// cluster: commands in flight in the command throughput rows (`--commands` of them).
    #[arg(long, default_value_t = 64)]
    pub cluster_commands_in_flight: usize,
    /// cluster: most devices one load-generator process connects (each process is held to the
    /// open-file limit too).
    #[arg(long, default_value_t = 16_000)]
    pub devices_per_worker: usize,
    /// cluster: `[store] pool_size` of every node (default: PostgreSQL's free connections
    /// shared out, at most 16).
    #[arg(long)]
    pub pool_size: Option<usize>,
    /// cluster: PostgreSQL URL of a user who may create databases; the suite creates one of
    /// its own and drops it at the end (kept with `--work-dir`, for the next run).
    #[arg(
        long,
        env = "MOORING_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    pub postgres_url: String,
    /// cluster: NATS with JetStream (a random subject prefix per run).
    #[arg(
        long,
        env = "MOORING_BENCH_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,
    /// cluster: the binary the load-generator processes run (`cluster-worker`; default: this
    /// executable; a `mooring` binary is run as `mooring bench cluster-worker`).
    #[arg(long)]
    pub worker_bin: Option<PathBuf>,
}

impl BenchArgs {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    pub fn idle_connections(&self) -> Vec<usize> {
        self.connections
            .clone()
            .unwrap_or_else(|| vec![10_000, 50_000])
    }

    pub fn storm_connections(&self) -> Vec<usize> {
        self.connections.clone().unwrap_or_else(|| vec![10_000])
    }

    /// The largest connection count any selected suite asks for.
    fn connections_max(&self) -> usize {
        let suites = self.suite.expand();
        let mut n = 0;
        if suites.contains(&Suite::IdleMemory) {
            n = n.max(self.idle_connections().into_iter().max().unwrap_or(0));
        }
        if suites.contains(&Suite::ConnectStorm) {
            n = n.max(self.storm_connections().into_iter().max().unwrap_or(0));
        }
        if suites.contains(&Suite::CommandRtt) {
            n = n.max(self.command_devices + 1);
        }
        if suites.contains(&Suite::Ingest) {
            n = n.max(self.publishers.iter().copied().max().unwrap_or(0));
        }
        if suites.contains(&Suite::Fanout) {
            n = n.max(self.publishers.iter().copied().max().unwrap_or(0) + 1);
        }
        if suites.contains(&Suite::Cluster) {
            // Per node; the load generator is split into processes that each fit.
            n = n.max(self.cluster_devices.div_ceil(self.cluster_nodes.max(1)));
        }
        n
    }
}

/// State shared by the suites of one run.
pub struct Bench {
    pub args: BenchArgs,
    /// The work dir (`--work-dir`, or a temporary one removed at exit).
    pub work: PathBuf,
    /// Ours first, then Mosquitto (as selected).
    pub targets: Vec<Target>,
    pub sources: Arc<SourceAddrs>,
    /// Telemetry `seq` values start here (unique per run: the server stores a (device, seq) once).
    pub seq_base: u64,
    /// Open-file limit of the load generator and the servers.
    pub fd_limit: u64,
    cases: u64,
}

impl Bench {
    /// A fresh number per ingest case, so every case uses its own `seq` range.
    pub fn next_case(&mut self) -> u64 {
        self.cases += 1;
        self.cases
    }
}

/// The machine the numbers were measured on.
pub fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|r| r.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let ram_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    json!({ "cpu": cpu, "cpus": cpus, "ram_gib": (ram_kib as f64 / 1048576.0 * 10.0).round() / 10.0 })
}

/// Raises this process's open-file limit: the hard limit too where allowed (root with
/// CAP_SYS_RESOURCE), else the soft limit up to the hard one. Returns the limit in force, which
/// the servers get too (a child cannot exceed its parent's hard limit without the capability).
fn raise_fd_limit() -> anyhow::Result<u64> {
    use rlimit::Resource;
    let want = target::FD_LIMIT;
    if rlimit::setrlimit(Resource::NOFILE, want, want).is_err() {
        let _ = rlimit::increase_nofile_limit(want);
    }
    let (soft, _) = rlimit::getrlimit(Resource::NOFILE)?;
    Ok(soft)
}

/// The `mooring` binary the suites start (`--mooring-bin`, else [`default_mooring_bin`]).
pub(crate) fn mooring_bin(args: &BenchArgs) -> anyhow::Result<PathBuf> {
    let bin = args.mooring_bin.clone().unwrap_or_else(default_mooring_bin);
    anyhow::ensure!(
        bin.is_file(),
        "no mooring binary at {} (cargo build --release -p mooring, or --mooring-bin)",
        bin.display()
    );
    Ok(bin)
}

fn default_mooring_bin() -> PathBuf {
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(PathBuf::from))
    {
        let sibling = dir.join("mooring");
        if sibling.is_file() {
            return sibling;
        }
    }
    PathBuf::from("target/release/mooring")
}

/// Runs the selected suite(s), prints a table per suite, and writes `--json` if asked.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fd_limit = raise_fd_limit()?;
    if args.suite == Suite::ClusterWorker {
        // Spawned by the cluster suite: its stdout is the protocol, so nothing else is printed.
        return worker::run_worker().await;
    }
    let need = args.connections_max() as u64 + target::FD_RESERVE;
    if fd_limit < need {
        eprintln!(
            "note: the open-file limit is {fd_limit} (hard; raising it needs CAP_SYS_RESOURCE): \
             connection counts above {} are reported as not measured",
            fd_limit - target::FD_RESERVE
        );
    }

    let (_tmp, work) = match &args.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            (None, dir.clone())
        }
        None => {
            let tmp = tempfile::Builder::new()
                .prefix("mooring-bench-")
                .tempdir()?;
            let path = tmp.path().to_owned();
            (Some(tmp), path)
        }
    };
    let mut targets = Vec::new();
    // telemetry-storage runs the store in-process: it needs neither server.
    let needs_targets = args
        .suite
        .expand()
        .iter()
        .any(|s| !matches!(s, Suite::TelemetryStorage | Suite::Cluster));
    if needs_targets && args.targets.contains(&TargetName::Mooring) {
        let bin = mooring_bin(&args)?;
        targets.push(Target::mooring(bin, &work.join("mooring"), fd_limit)?);
    }
    if needs_targets && args.targets.contains(&TargetName::Mosquitto) {
        anyhow::ensure!(
            args.mosquitto_bin.is_file(),
            "no Mosquitto at {} (Debian package `mosquitto`, or --mosquitto-bin)",
            args.mosquitto_bin.display()
        );
        targets.push(Target::mosquitto(
            args.mosquitto_bin.clone(),
            &work.join("mosquitto"),
            fd_limit,
        )?);
    }
    anyhow::ensure!(!needs_targets || !targets.is_empty(), "no --targets");

    let machine = machine();
    let date = std::process::Command::new("date")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    println!(
        "mooring-bench {:?} on {} × {} ({} GiB RAM), {date}\n",
        args.suite, machine["cpus"], machine["cpu"], machine["ram_gib"]
    );
    let seq_base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        * 1_000_000_000;
    let mut bench = Bench {
        args: args.clone(),
        work: work.clone(),
        targets,
        sources: Arc::new(SourceAddrs::default()),
        seq_base,
        fd_limit,
        cases: 0,
    };
    let mut tables: Vec<Table> = Vec::new();
    let suites_run = async {
        for suite in args.suite.expand() {
            let r = match suite {
                Suite::IdleMemory => suites::idle_memory(&mut bench).await,
                Suite::Ingest => suites::ingest(&mut bench).await,
                Suite::ConnectStorm => suites::connect_storm(&mut bench).await,
                Suite::CommandRtt => suites::command_rtt(&mut bench).await,
                Suite::Fanout => suites::fanout(&mut bench).await,
                Suite::TelemetryStorage => suites::telemetry_storage(&mut bench).await,
                Suite::Retention => suites::retention(&mut bench).await,
                Suite::Cluster => suites::cluster(&mut bench).await,
                Suite::DevicesFilter => suites::devices_filter(&mut bench).await,
                Suite::All | Suite::ClusterWorker => unreachable!("expanded or run above"),
            };
            let table = r.with_context(|| format!("suite {suite:?}"))?;
            println!("{}", table.to_markdown());
            tables.push(table);
        }
        anyhow::Ok(())
    };
    // Ctrl-C ends the run through the normal path, so the servers are killed, not orphaned.
    let result = tokio::select! {
        r = suites_run => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    for t in bench.targets.iter_mut() {
        t.kill().await;
    }
    if let Some(path) = &args.json {
        let doc = json!({
            "date": date,
            "machine": machine,
            "suite": format!("{:?}", args.suite),
            "targets": bench.targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
            "tables": tables.iter().map(Table::to_json).collect::<Vec<_>>(),
            "completed": result.is_ok(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    result
}
