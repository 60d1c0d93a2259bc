//! `mooring-agent`: the device agent binary (clap flags + `--config` file → [`mooring_agent::AgentConfig`] → [`mooring_agent::run_with`]).

use clap::{CommandFactory, FromArgMatches, Parser};
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
    #[arg(long, value_name = "HOST:PORT", env = "MOORING_AGENT_SERVER")]
    server: String,
    /// Client certificate (PEM); its subject CN is the device id.
    #[arg(long, value_name = "FILE", env = "MOORING_AGENT_CERT")]
    cert: PathBuf,
    /// Private key of the client certificate (PEM).
    #[arg(long, value_name = "FILE", env = "MOORING_AGENT_KEY")]
    key: PathBuf,
    /// CA certificate (PEM) that signed the server certificate; the only trusted root.
    #[arg(long, value_name = "FILE", env = "MOORING_AGENT_CA")]
    ca: PathBuf,
    /// Directory for durable state (the outbox); created if missing.
    #[arg(long, value_name = "DIR", env = "MOORING_AGENT_STATE_DIR")]
    state_dir: PathBuf,
    /// Seconds between host-metric samples (0 disables host metrics).
    #[arg(
        long,
        value_name = "N",
        default_value_t = config::INTERVAL_SECS_DEFAULT,
        env = "MOORING_AGENT_INTERVAL_SECS"
    )]
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
    #[arg(long, value_name = "FILE", env = "MOORING_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Print a shell completion script (packaging).
    #[arg(long, value_name = "SHELL", hide = true, exclusive = true)]
    completions: Option<clap_complete::Shell>,
    /// Write the man page into DIR (packaging).
    #[arg(long, value_name = "DIR", hide = true, exclusive = true)]
    man: Option<PathBuf>,
}

/// `--completions SHELL` / `--man DIR`: generated from the clap definition for the packages.
/// Checked before the other flags are read, since those are required for a run.
fn generate(matches: &clap::ArgMatches) -> Option<ExitCode> {
    if let Some(shell) = matches.get_one::<clap_complete::Shell>("completions") {
        clap_complete::generate(
            *shell,
            &mut Cli::command(),
            "mooring-agent",
            &mut std::io::stdout(),
        );
        return Some(ExitCode::SUCCESS);
    }
    let dir = matches.get_one::<PathBuf>("man")?;
    let written =
        std::fs::create_dir_all(dir).and_then(|()| clap_mangen::generate_to(Cli::command(), dir));
    Some(match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: writing the man page to {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    })
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
    let matches = Cli::command().get_matches();
    if let Some(code) = generate(&matches) {
        return code;
    }
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
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
