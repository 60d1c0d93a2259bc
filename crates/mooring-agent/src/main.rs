//! `mooring-agent`: the device agent binary (clap flags + `--config` file → [`mooring_agent::AgentConfig`] → [`mooring_agent::run_with`]; `enroll` first runs [`mooring_agent::enroll`]).

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use mooring_agent::config::{self, AgentConfig, AgentFile, InputSource};
use mooring_agent::gateway::GatewayConfig;
use mooring_agent::key::KeyRef;
use mooring_agent::{enroll, AgentDeps, Diagnostics};
use mooring_proto::DeviceId;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Mooring device agent: sends host metrics and JSON lines as telemetry over MQTT/mTLS, with a
/// durable outbox so nothing is lost while the server is unreachable.
///
/// Run it with a device certificate (`mooring-agent --server ... --cert ... --key ...`), or let
/// it make its own key and get its certificate with a claim token first (`mooring-agent enroll`).
#[derive(Debug, Parser)]
#[command(
    name = "mooring-agent",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    /// Mooring server MQTT/TLS endpoint, HOST:PORT ([v6addr]:PORT for IPv6).
    #[arg(
        long,
        value_name = "HOST:PORT",
        env = "MOORING_AGENT_SERVER",
        required = true
    )]
    server: Option<String>,
    /// Client certificate (PEM); its subject CN is the device id.
    #[arg(long, value_name = "FILE", env = "MOORING_AGENT_CERT", required = true)]
    cert: Option<PathBuf>,
    /// Private key of the client certificate: a PEM file, or a key in a PKCS#11 token
    /// (`pkcs11:token=LABEL;object=LABEL?module-path=/path/module.so&pin-source=file:/path`).
    #[arg(
        long,
        value_name = "FILE|URI",
        env = "MOORING_AGENT_KEY",
        required = true
    )]
    key: Option<String>,
    /// CA certificate (PEM) that signed the server certificate; the only trusted root.
    #[arg(long, value_name = "FILE", env = "MOORING_AGENT_CA", required = true)]
    ca: Option<PathBuf>,
    /// Directory for durable state (the outbox); created if missing.
    #[arg(
        long,
        value_name = "DIR",
        env = "MOORING_AGENT_STATE_DIR",
        required = true
    )]
    state_dir: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
    /// Print a shell completion script (packaging).
    #[arg(long, value_name = "SHELL", hide = true, exclusive = true)]
    completions: Option<clap_complete::Shell>,
    /// Write the man page into DIR (packaging).
    #[arg(long, value_name = "DIR", hide = true, exclusive = true)]
    man: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Enroll with a claim token, then run: make a key in the state dir (it never leaves it),
    /// get a certificate for it over MQTT/TLS, store it, and run as that device. Interrupted, it
    /// resumes from the step it reached; with a certificate in the state dir it just runs.
    Enroll(Box<EnrollArgs>),
    /// The A/B slots of over-the-air updates.
    #[command(subcommand)]
    Slots(SlotsSub),
    /// A reference child device for gateway mode: connects to a gateway's socket as ID, sends
    /// each JSON object read from stdin as its telemetry, prints every line the gateway sends,
    /// and answers each command with `succeeded` `{"echo": <params>}`.
    Child(ChildArgs),
}

#[derive(Debug, clap::Args)]
struct ChildArgs {
    /// The gateway's socket (its `--gateway-socket`).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// This child's device id (attached to the gateway on the server).
    #[arg(long, value_name = "ID")]
    id: String,
}

#[derive(Debug, Subcommand)]
enum SlotsSub {
    /// Print both slots (version, active / inactive / trial) and the update in progress.
    Status {
        /// The agent's state directory.
        #[arg(long, value_name = "DIR", env = "MOORING_AGENT_STATE_DIR")]
        state_dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
struct EnrollArgs {
    /// Mooring server MQTT/TLS endpoint, HOST:PORT ([v6addr]:PORT for IPv6).
    #[arg(long, value_name = "HOST:PORT", env = "MOORING_AGENT_SERVER")]
    server: String,
    /// CA certificate (PEM) that signed the server certificate; the only trusted root.
    #[arg(long, value_name = "FILE", env = "MOORING_AGENT_CA")]
    ca: PathBuf,
    /// Claim token from `mooring claim create` (prefer the environment variable: command lines
    /// are visible to other users).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "MOORING_AGENT_CLAIM",
        hide_env_values = true
    )]
    claim: String,
    /// Directory for the key, the certificate and durable state; created if missing.
    #[arg(long, value_name = "DIR", env = "MOORING_AGENT_STATE_DIR")]
    state_dir: PathBuf,
    /// Device id to propose [default: the DMI product serial, else /etc/machine-id; none if
    /// neither is usable, for claims whose server assigns ids].
    #[arg(long, value_name = "ID", env = "MOORING_AGENT_DEVICE_ID")]
    device_id: Option<String>,
    /// Where the device key is, made there if missing [default: DIR/device.key]: a PEM file,
    /// or a PKCS#11 token (`pkcs11:token=LABEL;object=LABEL?module-path=...&pin-value=...`):
    /// the key is generated inside the token and never leaves it. (No environment variable:
    /// MOORING_AGENT_KEY names the key of the flat invocation.)
    #[arg(long, value_name = "FILE|URI")]
    key: Option<String>,
    #[command(flatten)]
    run: RunArgs,
}

/// How the agent runs (the same for both invocations).
#[derive(Debug, clap::Args)]
struct RunArgs {
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
    /// Gateway mode: relay for child devices connecting to this Unix socket (created mode
    /// 0660; a stale socket file is replaced). Overrides `[gateway] socket` of --config.
    #[arg(long, value_name = "PATH", env = "MOORING_AGENT_GATEWAY_SOCKET")]
    gateway_socket: Option<PathBuf>,
    /// Serve the local API (docs/edge.md) over HTTP on ADDR:PORT, e.g. 0.0.0.0:8484 on the
    /// LAN. Overrides `[local] listen` of --config.
    #[arg(long, value_name = "ADDR:PORT", env = "MOORING_AGENT_LOCAL_LISTEN")]
    local_listen: Option<std::net::SocketAddr>,
    /// Serve the local API on this Unix socket (created 0660). Overrides `[local] socket`.
    #[arg(long, value_name = "PATH", env = "MOORING_AGENT_LOCAL_SOCKET")]
    local_socket: Option<PathBuf>,
}

/// Exit status of a refused enrollment (the claim, the id or the CSR was refused).
const EXIT_REFUSED: u8 = 3;

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
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match cli.command {
        Some(Sub::Enroll(args)) => enroll_then_run(*args, &runtime, diagnostics),
        Some(Sub::Slots(SlotsSub::Status { state_dir, json })) => slots_status(&state_dir, json),
        Some(Sub::Child(args)) => run_child(&args, &runtime),
        None => match flat_paths(&cli) {
            Ok((server, cert, key, ca, state_dir)) => run_agent(
                &server,
                cert,
                key,
                ca,
                state_dir,
                &cli.run,
                &runtime,
                diagnostics,
            ),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
    };
    // A blocking stdin read cannot be cancelled; do not wait for it.
    runtime.shutdown_background();
    code
}

/// `mooring-agent slots status`: reads `<state dir>/slots/bootctl.json` and the update journal
/// (never changes them).
fn slots_status(state_dir: &std::path::Path, json: bool) -> ExitCode {
    use mooring_agent::ota;
    let control = match ota::FileSlots::peek(&ota::slots_dir(state_dir)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let job = match ota::FileUpdateFiles::peek(&ota::journal_dir(state_dir)) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        let v = serde_json::json!({"slots": control, "update": job});
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    let Some(c) = control else {
        println!(
            "no slots in {} (the agent creates them at its first start with an [update] table)",
            ota::slots_dir(state_dir).display()
        );
        return ExitCode::SUCCESS;
    };
    println!("SLOT  VERSION           SIZE        STATE");
    for slot in [ota::Slot::A, ota::Slot::B] {
        let info = c.info(slot);
        println!(
            "{:<5} {:<17} {:<11} {}",
            slot.as_str(),
            info.version.as_deref().unwrap_or("-"),
            info.size,
            c.state_of(slot)
        );
    }
    if let Some(s) = c.reverted {
        println!(
            "last trial of slot {} was abandoned by the boot counter",
            s.as_str()
        );
    }
    match job {
        None => println!("update: none"),
        Some(j) => {
            println!(
                "update: deployment {} artifact {} version {} (from {}): {}{}",
                j.deployment_id,
                j.artifact_id,
                j.version,
                j.from_version.as_deref().unwrap_or("-"),
                j.phase.state().as_str(),
                j.phase
                    .reason()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            );
        }
    }
    ExitCode::SUCCESS
}

type FlatPaths = (String, PathBuf, KeyRef, PathBuf, PathBuf);

/// The flat invocation's required flags (clap enforces them; checked again, never unwrapped).
fn flat_paths(cli: &Cli) -> Result<FlatPaths, String> {
    let key = cli.key.as_deref().ok_or("--key is required")?;
    Ok((
        cli.server.clone().ok_or("--server is required")?,
        cli.cert.clone().ok_or("--cert is required")?,
        KeyRef::parse(key).map_err(|e| format!("--key: {e:#}"))?,
        cli.ca.clone().ok_or("--ca is required")?,
        cli.state_dir.clone().ok_or("--state-dir is required")?,
    ))
}

/// `mooring-agent enroll`: the enrollment pipeline ([`mooring_agent::enroll`]), then the run.
fn enroll_then_run(
    args: EnrollArgs,
    runtime: &tokio::runtime::Runtime,
    diagnostics: Diagnostics,
) -> ExitCode {
    let (host, port) = match config::parse_server(&args.server) {
        Ok(hp) => hp,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let device_id = match args.device_id.as_deref().map(DeviceId::parse).transpose() {
        Ok(id) => id,
        Err(e) => {
            eprintln!("error: --device-id: {e}");
            return ExitCode::from(2);
        }
    };
    let key = match args.key.as_deref().map(KeyRef::parse).transpose() {
        Ok(key) => key,
        Err(e) => {
            eprintln!("error: --key: {e:#}");
            return ExitCode::from(2);
        }
    };
    let config = enroll::EnrollConfig {
        ca_path: args.ca,
        claim_token: args.claim,
        state_dir: args.state_dir.clone(),
        device_id,
        key,
    };
    let result = runtime.block_on(async {
        let connector = || -> anyhow::Result<Arc<dyn mooring_agent::Connector>> {
            Ok(Arc::new(enroll::connector(&host, port, &config.ca_path)?))
        };
        tokio::select! {
            r = enroll::enroll(&config, connector, rand::random()) => r.map(Some),
            () = shutdown_signal() => Ok(None),
        }
    });
    let enrolled = match result {
        Ok(Some(e)) => e,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e @ (enroll::EnrollError::Rejected { .. } | enroll::EnrollError::Refused(_))) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_REFUSED);
        }
        Err(enroll::EnrollError::Local(e)) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    run_agent(
        &args.server,
        enrolled.cert_path,
        enrolled.key,
        enrolled.ca_path,
        args.state_dir,
        &args.run,
        runtime,
        diagnostics,
    )
}

/// The normal run with a certificate.
#[allow(clippy::too_many_arguments)]
fn run_agent(
    server: &str,
    cert: PathBuf,
    key: KeyRef,
    ca: PathBuf,
    state_dir: PathBuf,
    run: &RunArgs,
    runtime: &tokio::runtime::Runtime,
    diagnostics: Diagnostics,
) -> ExitCode {
    let (host, port) = match config::parse_server(server) {
        Ok(hp) => hp,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut config = AgentConfig {
        interval_secs: run.interval_secs,
        input: run.input.as_deref().map(InputSource::from_arg),
        exit_when_drained: run.exit_when_drained,
        outbox_max: run.outbox_max,
        ..AgentConfig::new(host, port, cert, key, ca, state_dir)
    };
    if let Some(path) = &run.config {
        match AgentFile::load(path) {
            Ok(file) => file.apply(&mut config),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(socket) = &run.gateway_socket {
        let gateway = config
            .gateway
            .take()
            .unwrap_or_else(|| GatewayConfig::new(socket.clone()));
        config.gateway = Some(GatewayConfig {
            socket: socket.clone(),
            ..gateway
        });
    }
    if run.local_listen.is_some() || run.local_socket.is_some() {
        let mut local = config
            .local
            .take()
            .unwrap_or(mooring_agent::local::LocalConfig {
                listen: None,
                socket: None,
            });
        if run.local_listen.is_some() {
            local.listen = run.local_listen;
        }
        if run.local_socket.is_some() {
            local.socket = run.local_socket.clone();
        }
        config.local = Some(local);
    }
    if let Err(e) = config.validate() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let clock = Arc::new(mooring_proto::SystemClock);
    let result = runtime.block_on(async {
        let deps = AgentDeps {
            diagnostics,
            ..AgentDeps::production(&config, clock)?
        };
        mooring_agent::run_with(deps, config, shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `mooring-agent child`: the reference child ([`mooring_agent::gateway::child`]).
fn run_child(args: &ChildArgs, runtime: &tokio::runtime::Runtime) -> ExitCode {
    let id = match DeviceId::parse(&args.id) {
        Ok(id) => id,
        Err(e) => {
            eprintln!("error: --id: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            r = mooring_agent::gateway::child::run(
                &args.socket,
                &id,
                tokio::io::stdin(),
                tokio::io::stdout(),
            ) => r,
            () = shutdown_signal() => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand, option and argument says what it is for in `--help`.
    #[test]
    fn every_argument_has_a_help_line() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            if cmd.get_about().is_none() && path.trim().contains(' ') {
                missing.push(format!("{path}: the command"));
            }
            for arg in cmd.get_arguments() {
                if arg.is_hide_set() || ["help", "version"].contains(&arg.get_id().as_str()) {
                    continue;
                }
                if arg.get_help().is_none() {
                    missing.push(format!("{path}: {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() != "help" {
                    walk(sub, &path, missing);
                }
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "no help line: {missing:#?}");
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("mooring-agent").chain(args.iter().copied()))
    }

    #[test]
    fn the_flat_invocation_is_unchanged_and_enroll_is_a_subcommand() {
        let flat = [
            "--server",
            "h:1",
            "--cert",
            "c",
            "--key",
            "k",
            "--ca",
            "a",
            "--state-dir",
            "s",
        ];
        let cli = parse(&flat).expect("flat");
        assert!(cli.command.is_none());
        assert!(flat_paths(&cli).is_ok());
        assert!(parse(&flat[..8]).is_err(), "--state-dir still required");

        let cli = parse(&[
            "enroll",
            "--server",
            "h:1",
            "--ca",
            "a",
            "--claim",
            "t",
            "--state-dir",
            "s",
            "--device-id",
            "sn-1",
            "--interval-secs",
            "0",
        ])
        .expect("enroll");
        let Some(Sub::Enroll(e)) = cli.command else {
            panic!("enroll expected")
        };
        assert_eq!(e.device_id.as_deref(), Some("sn-1"));
        assert_eq!(e.run.interval_secs, 0);
        let mut gw = flat.to_vec();
        gw.extend(["--gateway-socket", "/run/gw.sock"]);
        let cli = parse(&gw).expect("gateway");
        assert_eq!(
            cli.run.gateway_socket.as_deref(),
            Some(std::path::Path::new("/run/gw.sock"))
        );
        let cli = parse(&["child", "--socket", "/run/gw.sock", "--id", "lock-7"]).expect("child");
        let Some(Sub::Child(c)) = cli.command else {
            panic!("child expected")
        };
        assert_eq!(c.id, "lock-7");
        assert!(
            parse(&["child", "--socket", "/run/gw.sock"]).is_err(),
            "--id required"
        );
        // Flags of one form are not taken by the other.
        assert!(parse(&["--cert", "c", "enroll", "--claim", "t"]).is_err());
        assert!(parse(&[
            "enroll",
            "--server",
            "h:1",
            "--ca",
            "a",
            "--claim",
            "t",
            "--state-dir",
            "s",
            "--cert",
            "c"
        ])
        .is_err());
    }
}
