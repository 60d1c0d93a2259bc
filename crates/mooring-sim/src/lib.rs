//! # mooring-sim: the fleet simulator
//!
//! `mooring sim run scenario.toml` runs N copies of the real `mooring-agent` code against a real
//! `mooring` server started in-process, on virtual time: a paused tokio clock that jumps to the
//! next timer whenever every task is idle, so a simulated day takes minutes and the same seed
//! gives the same run.
//!
//! ```text
//!  run (run.rs) ── registers devices ──> InProcessServer (harness.rs): RunningServer on the
//!   │                                    virtual clock, data dir on /dev/shm
//!   ├─ per device (device.rs): run_device task ── boots ──> mooring_agent::run_with(deps)
//!   │     telemetry {sim.n, metrics, battery.pct} ──input channel──┘   │
//!   │     faults: power loss / crash (abort + restart), battery,      SimConnector ── duplex ──>
//!   │     link drops/outages (DeviceLink::cut)                        broker.serve_connection
//!   │     LedgerStore (MemStore + record of acked sim.n), SimHandler (counts executions)
//!   ├─ events task: command (Commands::create_fleet_command), cut_link, delete_device, restart_server;
//!   │     cluster mode (N InProcessServers on one store + bus): kill_node, restart_node
//!   ├─ sampler task: online devices (per node) every sample_interval
//!   └─ at the end: stop the fleet, stop the server (writer drained), compare acked vs. stored,
//!      read command states and histories → Report (report.rs): JSON, table, HTML plots
//! ```
//!
//! * [`scenario`]: the scenario file (cohorts of device models, timed events, expectations).
//! * [`clock`]: the virtual wall clock, derived from tokio's (paused) timeline.
//! * [`harness`]: the in-process server, or the nodes of an in-process cluster (one shared
//!   store and bus).
//! * [`device`]: one simulated device: link, flash, handlers, life cycle.
//! * [`run`]: one run, start to report.
//! * [`remote`]: remote mode (a running server over TLS, real time, measured via the API).
//! * [`report`]: the run report: JSON, a human table, and an HTML page with plots.
//!
//! Everything runs on one current-thread runtime. SQLite work runs on `spawn_blocking`, which
//! keeps tokio from advancing the paused clock, so virtual time never jumps while the store is
//! busy. Every task is owned: the fleet and control tasks by `JoinSet`s, agents by a per-device
//! `JoinSet`, the broker side of connections by a `TaskTracker`.

pub mod clock;
pub mod device;
pub mod harness;
pub mod remote;
pub mod report;
pub mod run;
pub mod scenario;

use anyhow::Context as _;
use scenario::{DurationMs, Scenario};
use std::path::{Path, PathBuf};

/// `mooring sim run`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimRunArgs {
    /// The scenario file (TOML; see docs/simulator.md).
    pub scenario: PathBuf,
    /// Where report.json and report.html go [default: ./sim-report/<scenario name>].
    #[arg(long)]
    pub report_dir: Option<PathBuf>,
    /// Simulate this many devices in total instead, spread over the cohorts in proportion.
    #[arg(long)]
    pub devices: Option<usize>,
    /// Simulate this long instead (e.g. 10m, 2h); events after it are dropped.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<DurationMs>,
    /// Use this seed instead of the scenario's.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep the server's data here (created; must be empty) instead of a temporary directory
    /// on /dev/shm that is removed at the end.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<DurationMs, String> {
    DurationMs::parse(s)
}

/// The scenario at `path` with the command-line overrides applied, validated.
pub fn load_scenario(args: &SimRunArgs) -> anyhow::Result<Scenario> {
    let mut s = Scenario::load(&args.scenario)?;
    if let Some(d) = args.duration {
        s.duration = d;
        s.events.retain(|e| e.at <= d);
    }
    if let Some(seed) = args.seed {
        s.seed = seed;
    }
    if let Some(n) = args.devices {
        s = s.scaled_to(n)?;
    }
    s.validate()?;
    Ok(s)
}

/// A temporary data dir for the in-process server: on /dev/shm when there is one (SQLite's
/// fsyncs cost nothing there), else the system's temp dir.
pub fn temp_data_dir() -> anyhow::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    let mut b = tempfile::Builder::new();
    b.prefix("mooring-sim-");
    if shm.is_dir() {
        if let Ok(d) = b.tempdir_in(shm) {
            return Ok(d);
        }
    }
    b.tempdir().context("creating a temporary data dir")
}

/// Keeps injected handler panics (expected, counted) off stderr; other panics still print.
pub fn quiet_injected_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let injected = info
                .payload()
                .downcast_ref::<&str>()
                .is_some_and(|s| *s == device::INJECTED_PANIC);
            if !injected {
                previous(info);
            }
        }));
    });
}

/// Runs `args.scenario`, writes the report and prints the table. `Ok(false)` when an `[expect]`
/// assertion failed. Builds its own (current-thread, paused-clock) runtime: call it outside any
/// runtime.
pub fn run_cli(args: SimRunArgs) -> anyhow::Result<bool> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error,mooring_sim=info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    quiet_injected_panics();
    let s = load_scenario(&args)?;
    let report_dir = args
        .report_dir
        .clone()
        .unwrap_or_else(|| Path::new("sim-report").join(&s.name));
    eprintln!(
        "mooring sim: scenario {} ({} devices, {} ms simulated, seed {})",
        s.name,
        s.device_count(),
        s.duration.0,
        s.seed
    );
    let tmp;
    let data_dir = match &args.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            anyhow::ensure!(
                std::fs::read_dir(d)?.next().is_none(),
                "data dir {} is not empty",
                d.display()
            );
            d.clone()
        }
        None => {
            tmp = temp_data_dir()?;
            tmp.path().to_owned()
        }
    };
    let report = run::run_blocking(&s, &data_dir)?;
    std::fs::create_dir_all(&report_dir)
        .with_context(|| format!("creating {}", report_dir.display()))?;
    std::fs::write(
        report_dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(report_dir.join("report.html"), report.html())?;
    print!("{}", report.table());
    println!("  report: {}/report.{{json,html}}", report_dir.display());
    let passed = report.passed();
    if !passed {
        for e in report.expectations.iter().filter(|e| !e.ok) {
            eprintln!(
                "expectation failed: {} (expected {}, got {})",
                e.name, e.expected, e.actual
            );
        }
    }
    Ok(passed)
}
