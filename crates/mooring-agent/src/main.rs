//! `mooring-agent`: the device agent binary (clap flags + `--config` file → [`mooring_agent::AgentConfig`] → [`mooring_agent::run_with`]).

use clap::Parser;
use mooring_agent::config::{self, AgentConfig, AgentFile, InputSource};
use mooring_agent::{AgentDeps, Diagnostics};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Mooring device agent: sends host metrics and JSON lines as telemetry over MQTT/mTLS, with a
/// durable outbox so nothing is lost while the server is unreachable.
#[derive(Debug, Parser)]
#[command(name = "mooring-agent", version)]
struct Cli {
    /// Mooring server MQTT/TLS endpoint, HOST:PORT ([v6addr]:PORT for IPv6).
    #[arg(long, value_name = "HOST:PORT")]
    server: String,
    /// Client certificate (PEM); its subject CN is the device id.
    #[arg(long, value_name = "FILE")]
    cert: PathBuf,
    /// Private key of the client certificate (PEM).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// CA certificate (PEM) that signed the server certificate; the only trusted root.
    #[arg(long, value_name = "FILE")]
    ca: PathBuf,
    /// Directory for durable state (the outbox); created if missing.
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// Seconds between host-metric samples (0 disables host metrics).
    #[arg(long, value_name = "N", default_value_t = config::INTERVAL_SECS_DEFAULT)]
    interval_secs: u64,
    /// Extra telemetry: a file of JSON objects, one per line, or `-` for stdin.
    #[arg(long, value_name = "FILE|-")]
    input: Option<String>,
    /// Exit (status 0) once --input is at EOF and every message has been acknowledged.
    #[arg(long)]
    exit_when_drained: bool,
    /// Most messages kept in the outbox; when full, the oldest are dropped.
    #[arg(long, value_name = "N", default_value_t = config::OUTBOX_MAX_DEFAULT)]
    outbox_max: u64,
    /// Agent config file (TOML): command handlers, reboot command, firmware version.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let diagnostics = Diagnostics::default();
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(mooring_agent::diag::log_layer(diagnostics.logs.clone()))
        .with(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let (host, port) = match config::parse_server(&cli.server) {
        Ok(hp) => hp,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut config = AgentConfig {
        interval_secs: cli.interval_secs,
        input: cli.input.as_deref().map(InputSource::from_arg),
        exit_when_drained: cli.exit_when_drained,
        outbox_max: cli.outbox_max,
        ..AgentConfig::new(host, port, cli.cert, cli.key, cli.ca, cli.state_dir)
    };
    if let Some(path) = &cli.config {
        match AgentFile::load(path) {
            Ok(file) => file.apply(&mut config),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if let Err(e) = config.validate() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let clock = Arc::new(mooring_proto::SystemClock);
    let result = runtime.block_on(async {
        let deps = AgentDeps {
            diagnostics,
            ..AgentDeps::production(&config, clock)?
        };
        mooring_agent::run_with(deps, config, shutdown_signal()).await
    });
    // A blocking stdin read cannot be cancelled; do not wait for it.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
