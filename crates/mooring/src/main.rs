//! The `mooring` command: `serve` runs the server; `device`, `cert`, `command`, `job`, `token`,
//! `user`, `audit` and `events` talk to its API.

mod client;
mod credentials;
mod ops;
mod output;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use mooring_server::config::ServerConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// The exit statuses, shown under `--help` (docs/api.md has them too).
const EXIT_STATUS_HELP: &str = "Exit status:
  0  success
  1  the server refused the call or could not be reached; with --wait-ms: the command failed,
     expired or was canceled
  2  invalid arguments
  3  with --wait-ms: the command was not final within the wait";

#[derive(Parser)]
#[command(
    name = "mooring",
    version,
    about = "Mooring: run a fleet of connected devices",
    after_help = EXIT_STATUS_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: MQTT over TLS (per-device certificates), HTTP API, telemetry store.
    Serve(ServeArgs),
    /// Run a job worker of a cluster: takes turns of the shared job queue (reports, bulk
    /// actions, rotations) with the nodes' workers; listens on nothing. Its config is a
    /// cluster node's ([store] url, [bus] url, [cluster] secret_key_file) (docs/cluster.md).
    Worker(WorkerArgs),
    /// Manage devices through the running server's API.
    #[command(after_help = EXIT_STATUS_HELP)]
    Device {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Send commands to devices and follow them.
    #[command(name = "command", after_help = EXIT_STATUS_HELP)]
    Commands {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: CommandCommand,
    },
    /// Bulk actions on a selection of devices (tag, untag, command, delete), run in the
    /// background as jobs with progress (docs/jobs.md).
    #[command(after_help = EXIT_STATUS_HELP)]
    Job {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: JobCommand,
    },
    /// Reports made in the background as jobs: the telemetry of a selection as CSV or JSON
    /// lines, with progress, then downloaded (docs/reports.md).
    #[command(after_help = EXIT_STATUS_HELP)]
    Report {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: client::ReportCommand,
    },
    /// Follow live events (presence, telemetry, commands, shadows) as JSON lines
    /// (docs/events.md); reconnects and resumes by itself.
    #[command(after_help = EXIT_STATUS_HELP)]
    Events {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(flatten)]
        args: client::EventsArgs,
    },
    /// Fleet statistics: devices, online and firmware versions of a selection; the fleet's
    /// history (docs/fleet.md).
    #[command(after_help = EXIT_STATUS_HELP)]
    Fleet {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// Fleet health per cohort (`--group-by tag:site,version`), and the cohorts whose rate of a
    /// failure signal is significantly above the rest's (docs/health.md).
    #[command(after_help = EXIT_STATUS_HELP)]
    Health {
        #[command(flatten)]
        api: client::ApiArgs,
        /// Only devices matching this selector, e.g. 'tag:site=berlin' [default: all].
        #[arg(long)]
        selector: Option<String>,
        /// Cohorts: up to 3 comma-separated keys, each tag:<key> or version.
        #[arg(long, value_name = "KEYS")]
        group_by: Option<String>,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Rules: a condition on each device's telemetry and events, and what to do when it starts
    /// to hold (raise an alert, send a command, tag the device) (docs/health.md).
    #[command(after_help = EXIT_STATUS_HELP)]
    Rule {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: client::RuleCommand,
    },
    /// Alerts raised by rules: list, show, acknowledge, resolve (docs/health.md).
    #[command(after_help = EXIT_STATUS_HELP)]
    Alert {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: client::AlertCommand,
    },
    /// Field-service tickets playbooks open: list, show, close (docs/health.md#playbooks).
    #[command(after_help = EXIT_STATUS_HELP)]
    Ticket {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: client::TicketCommand,
    },
    /// Device certificates: list a device's, list those expiring soon, revoke one
    /// (docs/provisioning.md).
    #[command(after_help = EXIT_STATUS_HELP)]
    Cert {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: client::CertCommand,
    },
    /// Manufacturer CAs: register one so devices with its certificates are trusted (and
    /// registered on their first connection with --auto-register); list, disable, enable
    /// (docs/provisioning.md).
    #[command(after_help = EXIT_STATUS_HELP)]
    Ca {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: client::CaCommand,
    },
    /// Benchmarks against a private Mosquitto on loopback, side by side (docs/benchmarks.md).
    Bench(mooring_bench::BenchArgs),
    /// Manage API tokens for apps and machines (e.g. a `service` token for a data pipeline's
    /// MQTT login, a `viewer` token for Grafana).
    #[command(after_help = EXIT_STATUS_HELP)]
    Token {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Over-the-air updates: upload, list, show and delete artifacts; keygen for an offline
    /// update key (docs/ota.md).
    #[command(after_help = EXIT_STATUS_HELP)]
    Ota {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: client::OtaCommand,
    },
    /// Staged rollouts gated on fleet health: create, list, show, watch, events, pause, resume,
    /// abort, add-devices (docs/ota.md#rollouts).
    #[command(after_help = EXIT_STATUS_HELP)]
    Rollout {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: client::RolloutCommand,
    },
    /// Claim tokens: devices enroll with their own key and a token (docs/provisioning.md).
    #[command(after_help = EXIT_STATUS_HELP)]
    Claim {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: ClaimCommand,
    },
    /// Manage the people who log in (roles admin, operator, installer, viewer, service).
    #[command(after_help = EXIT_STATUS_HELP)]
    User {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Read the audit log: every write through the API (who, what, when, from where).
    #[command(after_help = EXIT_STATUS_HELP)]
    Audit {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(flatten)]
        args: client::AuditArgs,
    },
    /// Back up a data dir (the server may be running) into one file: database snapshot, CA,
    /// server key, admin token.
    Backup(ops::BackupArgs),
    /// Restore a `mooring backup` file into a new data dir.
    Restore(ops::RestoreArgs),
    /// Print a shell completion script (packaging).
    #[command(hide = true)]
    Completions(ops::CompletionsArgs),
    /// Write man pages (packaging).
    #[command(hide = true)]
    Man(ops::ManArgs),
    /// Fleet simulator: real agents against an in-process server on virtual time.
    #[cfg(feature = "sim")]
    Sim {
        #[command(subcommand)]
        command: SimCommand,
    },
    /// Fleet simulator (not in this build: build with `--features sim`, docs/simulator.md).
    #[cfg(not(feature = "sim"))]
    #[command(disable_help_flag = true)]
    Sim {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    },
}

#[cfg(feature = "sim")]
#[derive(Subcommand)]
enum SimCommand {
    /// Run a scenario (see docs/simulator.md); exits 1 if an [expect] assertion fails.
    Run(mooring_sim::SimRunArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// TOML config file.
    #[arg(long, env = "MOORING_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory [default: ./mooring-data].
    #[arg(long, env = "MOORING_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// MQTT over TLS listen address [default: 0.0.0.0:8883].
    #[arg(long, env = "MOORING_MQTT_ADDR")]
    mqtt_addr: Option<SocketAddr>,
    /// Plain, anonymous, unrestricted MQTT for local experiments (loopback only; off by default).
    #[arg(long, env = "MOORING_MQTT_DEV_ADDR")]
    mqtt_dev_addr: Option<SocketAddr>,
    /// HTTP API listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "MOORING_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
    /// Serve the HTTP API over TLS with the server certificate.
    #[arg(long, env = "MOORING_HTTP_TLS")]
    http_tls: bool,
    /// Name or IP for the server certificate (repeatable) [default: localhost, 127.0.0.1].
    /// Used when the certificate is first created.
    #[arg(
        long = "server-name",
        env = "MOORING_SERVER_NAME",
        value_delimiter = ','
    )]
    server_names: Vec<String>,
    /// This node's name in /healthz and /metrics [default: the host name].
    #[arg(long, env = "MOORING_NODE_ID")]
    node_id: Option<String>,
    /// Serve the web dashboard's files from this directory (a checkout's web/) instead of the
    /// ones built into the binary, to edit them without rebuilding.
    #[arg(long, env = "MOORING_WEB_DIR")]
    web_dir: Option<PathBuf>,
}

#[derive(Args)]
struct WorkerArgs {
    /// TOML config file: the cluster's ([store] url, [bus] url, [cluster] secret_key_file);
    /// `[jobs] workers` sets how many jobs it runs at once.
    #[arg(long, env = "MOORING_CONFIG")]
    config: PathBuf,
    /// Data directory [default: ./mooring-data].
    #[arg(long, env = "MOORING_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// This worker's name (its jobs show `<node id>/<n>` as their worker) [default: the
    /// config's node_id, or `<host name>-worker-<pid>`].
    #[arg(long, env = "MOORING_NODE_ID")]
    node_id: Option<String>,
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Register a device and write its credentials to DIR (device.crt, device.key, ca.crt).
    Create {
        /// Device id (letters, digits, `.`, `_`, `-`; at most 64): the certificate CN and MQTT
        /// client id.
        id: String,
        /// Output directory [default: ./<ID>].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Tag as key=value (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// A certificate signing request (PEM) made on the device: the certificate is issued for
        /// its key, which never leaves the device; writes device.crt and ca.crt only. Without
        /// it the server makes the key (quick starts).
        #[arg(long, value_name = "FILE")]
        csr: Option<PathBuf>,
    },
    /// List devices (every page).
    List {
        /// Same as `--output json`.
        #[arg(long, hide = true)]
        json: bool,
        /// Only devices matching this selector, e.g. 'tag:site=berlin and online'.
        #[arg(long)]
        selector: Option<String>,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Set tags (merged into the current ones): `mooring device tag lock-1 site=berlin hw=rev-b`.
    Tag {
        /// Device id.
        id: String,
        /// key=value pairs to set.
        tags: Vec<String>,
        /// Tag keys to remove (repeatable).
        #[arg(long = "remove")]
        remove: Vec<String>,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Show one device, its installation and where it is in its provisioning pipeline.
    Show {
        /// Device id.
        id: String,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// A device's health signals: reconnects, time online, telemetry gaps, command failures,
    /// restarts and crashes, update rollbacks, battery level and trend (docs/health.md).
    Health {
        /// Device id.
        id: String,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Confirm a device is installed (role installer or above): accepted only while its
    /// telemetry is recent, so the record says it works where it was mounted.
    Install {
        /// Device id.
        id: String,
        /// Where it is installed, e.g. 'Hall 3, door 2' (at most 256 characters).
        #[arg(long)]
        location: String,
        /// Anything else worth knowing (at most 2048 characters).
        #[arg(long)]
        notes: Option<String>,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Attach a device (a child) to a gateway, which may then relay for it on its own topics
    /// (docs/edge.md): `mooring device attach lock-7 --gateway gw-1`.
    Attach {
        /// The child's device id.
        child: String,
        /// The gateway's device id.
        #[arg(long)]
        gateway: String,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Detach a device from its gateway: the gateway may no longer act for it, at once.
    Detach {
        /// The child's device id.
        child: String,
    },
    /// List a gateway's children (every page), and whether each is online through it.
    Children {
        /// The gateway's device id.
        gateway: String,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Print the key a phone app or a laptop presents to the device's local API while the cloud
    /// is unreachable (docs/edge.md). It changes when the device's certificate does; the read
    /// is audited. Needs commands.write (operator or admin).
    LocalKey {
        /// Device id.
        id: String,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Delete a device: its certificate is refused from now on and a live session closed.
    Delete {
        /// Device id.
        id: String,
    },
    /// Revoke every certificate of a device: refused at the next handshake, and a live
    /// session closed within a second, on every node (the device stays registered).
    Revoke {
        /// Device id.
        id: String,
        /// Why (kept with the certificates; at most 256 characters).
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Subcommand)]
enum FleetCommand {
    /// How many devices a selector matches, how many are online, and their firmware versions.
    Summary {
        /// Only devices matching this selector, e.g. 'tag:site=berlin and online' [default: all].
        #[arg(long)]
        selector: Option<String>,
        /// Same as `--output json`.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// The provisioning funnel: how many devices were registered, connected, sent telemetry
    /// and were installed.
    Funnel {
        /// Only devices matching this selector, e.g. 'tag:site=berlin' [default: all].
        #[arg(long)]
        selector: Option<String>,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// The fleet's history: devices, online, telemetry points and MQTT messages per interval.
    History {
        /// How far back, e.g. 30m, 24h, 7d (at most 7d).
        #[arg(long, value_name = "DURATION", default_value = "24h")]
        since: String,
        /// Same as `--output json`.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        output: output::OutputArgs,
    },
}

#[derive(Subcommand)]
enum CommandCommand {
    /// Send a command: to one device (`--to lock-1`) or to every device a selector matches
    /// (`--to 'tag:site=berlin'`, `--to d1,d2`), as a fleet command.
    ///
    /// With --wait-ms the exit status tells the outcome: 0 succeeded; 1 failed, expired or
    /// canceled; 3 not final within the wait.
    #[command(after_help = EXIT_STATUS_HELP)]
    Send {
        /// A device id or a selector.
        #[arg(long)]
        to: String,
        /// Command name, e.g. reboot.
        name: String,
        /// Parameters as JSON, e.g. '{"delay_secs":5}'.
        #[arg(long)]
        params: Option<String>,
        /// Seconds until the command expires if it has not run [default: the server's].
        #[arg(long)]
        ttl_secs: Option<u64>,
        /// Deliveries without an acknowledgement before it fails [default: the server's, 5].
        #[arg(long)]
        max_attempts: Option<u32>,
        /// Seconds an acknowledged command may wait for its result before it fails with
        /// `timeout` (0: no limit) [default: the server's, 3600].
        #[arg(long)]
        result_timeout_secs: Option<u64>,
        /// One device only: wait up to this many ms (at most 30000) for the command to finish;
        /// the exit status then tells how it ended.
        #[arg(long)]
        wait_ms: Option<u64>,
        /// One device only: the same key returns the earlier command instead of a new one.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Show a command, or a fleet command with its devices' states.
    #[command(after_help = EXIT_STATUS_HELP)]
    Show {
        /// Command id (`c...`) or fleet command id (`f...`).
        id: String,
        /// Wait up to this many ms for a device command to finish; the exit status then tells
        /// how it ended (as for `send`).
        #[arg(long)]
        wait_ms: Option<u64>,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// List a device's commands, newest first (at most 1000).
    List {
        /// Device id.
        device: String,
        /// Only commands in this state: queued, delivered, acknowledged, succeeded, failed,
        /// expired or canceled.
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Cancel a command that the device has not acknowledged yet.
    Cancel {
        /// Device id.
        device: String,
        /// Command id.
        id: String,
        #[command(flatten)]
        output: output::OutputArgs,
    },
}

#[derive(Subcommand)]
enum JobCommand {
    /// Start a job: one action (exactly one of --tag, --untag, --command, --delete) on every
    /// device the selector matches, e.g.
    /// `mooring job create --selector 'tag:site=berlin' --tag fw=2 --wait`.
    #[command(group(clap::ArgGroup::new("action").required(true).args(["tags", "untag", "command", "delete"])))]
    Create {
        /// Which devices, e.g. 'tag:site=berlin and online' or d1,d2,d3 (narrowed by your
        /// scope).
        #[arg(long)]
        selector: String,
        /// Action tag: set this tag, as key=value (repeatable); other tags are kept.
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// Action untag: remove this tag key (repeatable).
        #[arg(long = "untag", value_name = "KEY")]
        untag: Vec<String>,
        /// Action command: send this command (e.g. reboot) to every matching device, as one
        /// fleet command.
        #[arg(long, value_name = "NAME")]
        command: Option<String>,
        /// With --command: its parameters as JSON, e.g. '{"delay_secs":5}'.
        #[arg(long, requires = "command")]
        params: Option<String>,
        /// With --command: milliseconds until each device's command expires if it has not run
        /// [default: the server's].
        #[arg(long, requires = "command")]
        ttl_ms: Option<u64>,
        /// Action delete: delete the matching devices.
        #[arg(long)]
        delete: bool,
        /// Wait until the job finishes, printing its progress; exit 0 only if it succeeded on
        /// every device.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// List jobs, newest first (at most 200).
    List {
        /// Only jobs in this state: queued, running, succeeded, failed, canceled or dead (out
        /// of attempts: the dead letter list).
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Download a succeeded job's result (a report) to a file or stdout.
    Result {
        /// Job id (`job_...`).
        id: String,
        /// Write it to this file (replaced only once complete) [default: stdout].
        #[arg(short = 'o', long = "out", value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Show a job and its progress.
    Show {
        /// Job id (`job_...`).
        id: String,
        /// Wait until the job finishes, printing its progress; exit 0 only if it succeeded on
        /// every device.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Cancel a job: it stops at its next batch (what it did so far stays done).
    Cancel {
        /// Job id (`job_...`).
        id: String,
        #[command(flatten)]
        output: output::OutputArgs,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token; prints the secret once (stored hashed).
    Create {
        /// A name for the token (1-128 characters), e.g. the app that uses it.
        #[arg(
            value_name = "NAME",
            conflicts_with = "name_flag",
            required_unless_present = "name_flag"
        )]
        name: Option<String>,
        /// The name, as a flag (same as the positional NAME).
        #[arg(long = "name", value_name = "NAME")]
        name_flag: Option<String>,
        /// admin, operator, installer, viewer or service.
        #[arg(long, default_value = "service")]
        role: String,
        /// Expire after this long: e.g. 90d, 12h, 30m, 3600s.
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
        /// Limit the token to the devices matching this selector (tag: and id: terms), e.g.
        /// tag:customer=acme.
        #[arg(long, value_name = "SELECTOR")]
        scope: Option<String>,
    },
    /// List tokens (never their secrets).
    List {
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Revoke a token: refused on every node from the next request, its MQTT sessions closed.
    Revoke {
        /// Token id (`tok_...`, from `token list`).
        id: String,
    },
    /// Replace the admin token created at first start: prints the new one, revokes the old
    /// ones, and the server rewrites its `<data-dir>/admin.token`.
    RotateAdmin,
}

#[derive(Subcommand)]
enum ClaimCommand {
    /// Create a claim; prints its token once (stored hashed), then its id, uses and expiry on
    /// stderr. Devices enroll with the token over MQTT (username `claim`) or HTTPS.
    Create {
        /// How many devices (keys) may enroll with the token (1: single use).
        #[arg(long, default_value_t = 1, value_name = "N")]
        count: u32,
        /// How long the token is valid: e.g. 24h, 30d, 90m (at most 365d by default).
        #[arg(long, default_value = "24h", value_name = "DURATION")]
        ttl: String,
        /// A tag every enrolled device gets, as key=value (repeatable).
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// The server chooses device ids (d- and 12 hex digits); ids devices propose are ignored.
        #[arg(long)]
        assign_ids: bool,
        /// A name for people, e.g. the production batch.
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// List claims (never their tokens).
    List {
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Revoke a claim: no device enrolls with it from now on (enrolled devices keep their
    /// certificates).
    Revoke {
        /// Claim id (`clm_...`, from `claim list`).
        id: String,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user; prints a one-time password-set link (or reads the password from stdin).
    Create {
        /// The user's email address (their login name).
        email: String,
        /// admin, operator, installer, viewer or service.
        #[arg(long)]
        role: String,
        /// Limit the user to the devices matching this selector (tag: and id: terms).
        #[arg(long, value_name = "SELECTOR")]
        scope: Option<String>,
        /// Read the password from standard input (first line) instead of making a link.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users.
    List {
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Disable a user: its sessions end and it cannot log in.
    Disable {
        /// The user's email or id (`usr_...`).
        user: String,
    },
    /// Enable a disabled user again.
    Enable {
        /// The user's email or id (`usr_...`).
        user: String,
    },
    /// Delete a user and its sessions.
    Delete {
        /// The user's email or id (`usr_...`).
        user: String,
    },
    /// Change a user's role (its sessions end).
    SetRole {
        /// The user's email or id (`usr_...`).
        user: String,
        /// admin, operator, installer, viewer or service.
        role: String,
    },
    /// Set or remove (`--clear`) a user's scope (its sessions end).
    SetScope {
        /// The user's email or id (`usr_...`).
        user: String,
        /// A selector of tag: and id: terms, e.g. tag:customer=acme.
        #[arg(required_unless_present = "clear")]
        scope: Option<String>,
        /// Remove the scope: the user reaches every device its role allows.
        #[arg(long)]
        clear: bool,
    },
    /// Print a new one-time password-set link for a user (the previous one stops working).
    PasswordLink {
        /// The user's email or id (`usr_...`).
        user: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        // The simulator builds its own (paused-clock) runtime.
        #[cfg(feature = "sim")]
        Command::Sim {
            command: SimCommand::Run(args),
        } => match mooring_sim::run_cli(args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        },
        #[cfg(not(feature = "sim"))]
        Command::Sim { .. } => {
            eprintln!(
                "error: this mooring was built without the simulator (it needs tokio's test-util, \
                 which production builds leave out); build it with \
                 `cargo build --release -p mooring --features sim`"
            );
            ExitCode::from(2)
        }
        command => run(command),
    }
}

fn run(command: Command) -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command {
            // Handled in main, before any runtime exists (it builds its own).
            Command::Sim { .. } => Ok(client::EXIT_OK),
            Command::Serve(args) => serve(args).await.map(|()| client::EXIT_OK),
            Command::Worker(args) => worker(args).await.map(|()| client::EXIT_OK),
            Command::Device { api, command } => client::device(api, command).await,
            Command::Cert { api, command } => client::cert(api, command).await,
            Command::Ca { api, command } => client::ca(api, command).await,
            Command::Rule { api, command } => client::rule(api, command).await,
            Command::Alert { api, command } => client::alert(api, command).await,
            Command::Ticket { api, command } => client::ticket(api, command).await,
            Command::Token { api, command } => client::token(api, command).await,
            Command::Claim { api, command } => client::claim(api, command).await,
            Command::Ota { api, command } => client::ota(api, command).await,
            Command::Rollout { api, command } => client::rollout(api, command).await,
            Command::User { api, command } => client::user(api, command).await,
            Command::Audit { api, args } => client::audit(api, args).await,
            Command::Events { api, args } => client::events(api, args).await,
            Command::Fleet { api, command } => match command {
                FleetCommand::Summary {
                    selector,
                    json,
                    mut output,
                } => {
                    if json {
                        output.output = output::Format::Json;
                    }
                    client::fleet_summary(api, selector, output).await
                }
                FleetCommand::Funnel { selector, output } => {
                    client::fleet_funnel(api, selector, output).await
                }
                FleetCommand::History {
                    since,
                    json,
                    mut output,
                } => {
                    if json {
                        output.output = output::Format::Json;
                    }
                    client::fleet_history(api, &since, output).await
                }
            },
            Command::Health {
                api,
                selector,
                group_by,
                output,
            } => client::health::summary(api, selector, group_by, output).await,
            Command::Bench(args) => mooring_bench::run(args).await.map(|()| client::EXIT_OK),
            Command::Commands { api, command } => client::command(api, command).await,
            Command::Job { api, command } => client::job(api, command).await,
            Command::Report { api, command } => client::report(api, command).await,
            Command::Backup(args) => ops::backup(args).map(|()| client::EXIT_OK),
            Command::Restore(args) => ops::restore(args).map(|()| client::EXIT_OK),
            Command::Completions(args) => ops::completions(args).map(|()| client::EXIT_OK),
            Command::Man(args) => ops::man(args).map(|()| client::EXIT_OK),
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = e
                .downcast_ref::<client::UsageError>()
                .map_or(client::EXIT_FAILED, |_| client::EXIT_USAGE);
            eprintln!("error: {e:#}");
            ExitCode::from(code)
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(ops::server_log_filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut config = match &args.config {
        Some(path) => ServerConfig::load(path)?,
        None => ServerConfig::default(),
    };
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    if let Some(a) = args.mqtt_addr {
        config.mqtt_addr = a;
    }
    if let Some(a) = args.mqtt_dev_addr {
        config.mqtt_dev_addr = Some(a);
    }
    if let Some(a) = args.http_addr {
        config.http_addr = a;
    }
    if args.http_tls {
        config.http_tls = true;
    }
    if !args.server_names.is_empty() {
        config.server_names = args.server_names;
    }
    if let Some(n) = args.node_id {
        config.node_id = n;
    }
    if let Some(d) = args.web_dir {
        config.http.web_dir = Some(d);
    }
    config.validate()?;
    let listeners = mooring_server::Listeners::bind(&config).await?;
    let clock = std::sync::Arc::new(mooring_proto::SystemClock);
    let data_dir = config.data_dir.clone();
    let server = mooring_server::RunningServer::start(config, listeners, clock)
        .await
        .context("starting the server")?;
    if let Some(token) = &server.new_admin_token {
        println!(
            "admin API token (saved to {}; shown once): {token}",
            data_dir
                .join(mooring_server::auth::ADMIN_TOKEN_FILE)
                .display()
        );
    }
    tracing::info!("ready");
    let reload = reload_loop(args.config.clone(), server.app.clone());
    tokio::select! {
        () = shutdown_signal() => {}
        () = reload => {}
    }
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

/// `mooring worker`: job workers only, until SIGINT/SIGTERM (the turn in progress is handed
/// back to the queue).
async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(ops::server_log_filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut config = ServerConfig::load(&args.config)?;
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    match args.node_id {
        Some(n) => config.node_id = n,
        // Not the host's own name, which a `mooring serve` on the same host goes by: two
        // members with one id would share heartbeats and leases.
        None if config.node_id == ServerConfig::default().node_id => {
            config.node_id = format!("{}-worker-{}", config.node_id, std::process::id());
        }
        None => {}
    }
    let clock = std::sync::Arc::new(mooring_proto::SystemClock);
    let server = mooring_server::RunningServer::start_worker(config, clock)
        .await
        .context("starting the worker")?;
    tracing::info!("ready");
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

/// SIGHUP re-reads the config file's `[policy]` rules and puts them in force: every session's
/// subscriptions are checked again at once (like Mosquitto reloading its ACL file). Everything
/// else in the file needs a restart. A file that does not parse or validate changes nothing.
async fn reload_loop(config: Option<PathBuf>, app: std::sync::Arc<mooring_server::app::App>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return std::future::pending().await;
        };
        while hup.recv().await.is_some() {
            let Some(path) = &config else {
                tracing::info!("SIGHUP: no --config file; the built-in policy stays in force");
                continue;
            };
            match ServerConfig::load(path).and_then(|c| c.policy()) {
                Ok(policy) => {
                    let removed = app.set_policy(policy);
                    tracing::info!(
                        file = %path.display(),
                        subscriptions_removed = removed,
                        "SIGHUP: policy reloaded"
                    );
                }
                Err(e) => {
                    tracing::error!(
                        error = format!("{e:#}"),
                        "SIGHUP: policy not reloaded; the previous one stays in force"
                    );
                }
            }
        }
    }
    std::future::pending().await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every subcommand, option and argument says what it is for in `--help`.
    #[test]
    fn every_argument_has_a_help_line() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            if cmd.get_about().is_none() && !cmd.is_hide_set() && path.contains(' ') {
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
}
