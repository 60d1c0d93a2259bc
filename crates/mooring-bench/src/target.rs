//! The servers under test: the `mooring` binary and a private Mosquitto, each spawned with a raised fd limit, killed on drop, restartable on the same port; RSS sampling, device provisioning, backend logins and session-queue settings.
//!
//! One file (~750 lines) on purpose: `Target` is one enum-dispatched type whose every method
//! matches on the two flavours (ours, Mosquitto) side by side, so a reader sees how the two
//! servers are driven identically in one place; splitting by flavour would scatter each
//! operation over two files.

use crate::client::{Cred, Endpoint};
use crate::pki::Pki;
use anyhow::{anyhow, bail, Context};
use rustls::ClientConfig;
use serde_json::Value;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Open-file limit sought for every server process and the load generator (capped by the hard limit).
pub const FD_LIMIT: u64 = 262_144;
/// File descriptors a server needs besides client connections (listeners, database, logs).
pub const FD_RESERVE: u64 = 200;
/// Longest a server may take to report (or open) its listeners.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest one HTTP API call may take.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent `POST /api/v1/devices` calls while provisioning.
pub const PROVISION_CONCURRENCY: usize = 16;
/// Log lines kept per process for error messages.
const LOG_TAIL_LEN: usize = 50;

/// Device ids are `bench-000000`, `bench-000001`, …
pub fn device_id(i: usize) -> String {
    format!("bench-{i:06}")
}

/// Client id of the backend (the fan-out subscriber) on both targets; never a device id.
pub const BACKEND_CLIENT_ID: &str = "bench-pipeline";

/// How a backend logs in: its TLS config and, on ours, a service token as the MQTT password.
pub struct BackendLogin {
    pub tls: Arc<ClientConfig>,
    pub login: Option<(String, String)>,
}

/// Session-queue bounds a target is started with (`None`: the server's defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueBounds {
    pub len_max: usize,
    pub bytes_max: usize,
}

/// How [`Proc::spawn_with`] connects a child: where its stderr is copied, whether its stdin and
/// stdout are pipes the caller takes (a load-generator worker) or closed (a server).
#[derive(Default)]
pub(crate) struct SpawnOpts {
    /// Every stderr line is also appended to this file (a node's full log, kept in the work dir).
    pub log_file: Option<PathBuf>,
    /// Pipe stdin and stdout ([`Proc::take_stdin`], [`Proc::take_stdout`]) instead of closing them.
    pub piped_stdio: bool,
}

/// A spawned process: `sh -c 'ulimit -n …; exec …'`, stderr captured (a tail kept, warning and
/// error lines counted), SIGKILLed on drop.
pub(crate) struct Proc {
    child: Child,
    pub(crate) pid: u32,
    pub(crate) lines: mpsc::Receiver<String>,
    tail: Arc<Mutex<VecDeque<String>>>,
    /// Log lines at WARN and at ERROR level (tracing's format: `<time>  WARN target: …`).
    warnings: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    reader: JoinHandle<()>,
}

impl Proc {
    pub(crate) fn spawn(
        program: &Path,
        args: &[OsString],
        envs: &[(&str, &str)],
        fd_limit: u64,
    ) -> anyhow::Result<Proc> {
        Proc::spawn_with(program, args, envs, fd_limit, SpawnOpts::default())
    }

    pub(crate) fn spawn_with(
        program: &Path,
        args: &[OsString],
        envs: &[(&str, &str)],
        fd_limit: u64,
        opts: SpawnOpts,
    ) -> anyhow::Result<Proc> {
        let piped = || {
            if opts.piped_stdio {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            }
        };
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"ulimit -n "$0" && exec "$@""#)
            .arg(fd_limit.to_string())
            .arg(program)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(piped())
            .stdout(piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut log = match &opts.log_file {
            Some(path) => Some(std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?,
            )),
            None => None,
        };
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", program.display()))?;
        let pid = child.id().context("child pid")?;
        let stderr = child.stderr.take().context("child stderr")?;
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let (warnings, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (tx, lines) = mpsc::channel(256);
        let (tail2, warnings2, errors2) = (tail.clone(), warnings.clone(), errors.clone());
        let reader = tokio::spawn(async move {
            let mut r = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = r.next_line().await {
                match log_level(&line) {
                    Some("WARN") => warnings2.fetch_add(1, Ordering::Relaxed),
                    Some("ERROR") => errors2.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
                if let Some(f) = log.as_mut() {
                    // Best effort: a full disk must not stop the server's stderr being drained.
                    let _ = writeln!(f, "{line}").and_then(|()| f.flush());
                }
                if let Ok(mut t) = tail2.lock() {
                    if t.len() == LOG_TAIL_LEN {
                        t.pop_front();
                    }
                    t.push_back(line.clone());
                }
                let _ = tx.try_send(line);
            }
        });
        Ok(Proc {
            child,
            pid,
            lines,
            tail,
            warnings,
            errors,
            reader,
        })
    }

    pub(crate) fn log_tail(&self) -> String {
        self.tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// (WARN, ERROR) log lines so far.
    pub(crate) fn log_counts(&self) -> (u64, u64) {
        (
            self.warnings.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }

    /// The child's stdin pipe (once; only with [`SpawnOpts::piped_stdio`]).
    pub(crate) fn take_stdin(&mut self) -> Option<tokio::process::ChildStdin> {
        self.child.stdin.take()
    }

    /// The child's stdout pipe (once; only with [`SpawnOpts::piped_stdio`]).
    pub(crate) fn take_stdout(&mut self) -> Option<tokio::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// Fails if the process has exited.
    pub(crate) fn check_alive(&mut self, what: &str) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{what} exited ({status}); log:\n{}", self.log_tail());
        }
        Ok(())
    }

    pub(crate) fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(self.pid)
    }

    /// SIGKILL and reap (bounded).
    pub(crate) async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        self.reader.abort();
    }

    /// Waits (at most `timeout`) for the process to exit by itself; SIGKILLs it if it does not.
    /// Returns whether it exited by itself.
    pub(crate) async fn wait_or_kill(mut self, timeout: Duration) -> bool {
        let exited = tokio::time::timeout(timeout, self.child.wait())
            .await
            .is_ok_and(|r| r.is_ok());
        if !exited {
            let _ = self.child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        }
        // Let the reader drain what the process wrote last (bounded), then stop it.
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.reader).await;
        self.reader.abort();
        exited
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        self.reader.abort();
    }
}

/// The level of a tracing log line (`2026-…Z  WARN target: …`): its second word.
fn log_level(line: &str) -> Option<&str> {
    line.split_whitespace()
        .nth(1)
        .filter(|w| matches!(*w, "TRACE" | "DEBUG" | "INFO" | "WARN" | "ERROR"))
}

/// Resident set size of `pid` in KiB (`VmRSS` in /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    parse_vm_rss_kib(&status).context("no VmRSS line")
}

/// User + system CPU time of `pid` so far, in seconds (`/proc/<pid>/stat`, 100 ticks per second).
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_cpu_secs(&stat).context("malformed /proc/<pid>/stat")
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line, in seconds.
pub fn parse_cpu_secs(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces; the fields after it follow its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / CLOCK_TICKS_PER_SEC)
}

/// `USER_HZ`: the unit of `/proc` CPU times on Linux.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// CPU seconds so far of every process on the machine, with its `comm` (name), by pid.
pub fn all_processes_cpu_secs() -> std::collections::BTreeMap<u32, (String, f64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Default::default();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            Some((pid, (comm.trim().to_owned(), cpu_secs(pid).ok()?)))
        })
        .collect()
}

/// The whole machine's CPU time so far, all cores, from `/proc/stat`, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MachineCpu {
    /// Everything but idle and iowait (user, nice, system, irq, softirq, steal).
    pub busy: f64,
    /// Interrupt and softirq time (loopback TCP is largely softirq work).
    pub irq: f64,
    /// Time the hypervisor gave to someone else while we wanted to run.
    pub steal: f64,
}

pub fn machine_cpu_secs() -> MachineCpu {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .find(|l| l.starts_with("cpu "))
        .map(parse_machine_cpu)
        .unwrap_or_default()
}

/// The `cpu ` line of `/proc/stat`: user nice system idle iowait irq softirq steal [guest …]
/// (guest time is already inside user).
pub fn parse_machine_cpu(line: &str) -> MachineCpu {
    let t: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse::<u64>().unwrap_or(0) as f64 / CLOCK_TICKS_PER_SEC)
        .collect();
    let at = |i: usize| t.get(i).copied().unwrap_or(0.0);
    MachineCpu {
        busy: at(0) + at(1) + at(2) + at(5) + at(6) + at(7),
        irq: at(5) + at(6),
        steal: at(7),
    }
}

pub fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Ports tried for a mosquitto target when the chosen one was taken meanwhile.
const PORT_ATTEMPTS_MAX: u32 = 5;
/// How long a mosquitto that answered a connect must stay up to count as listening (one that
/// could not bind exits at once).
const PORT_CHECK_MS: u64 = 200;

/// A free loopback port (bound then released; never 1883, which is outside the ephemeral range).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn parse_addr_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let rest = rest
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    rest.split_whitespace().next()?.parse().ok()
}

/// Which server a [`Target`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Mooring,
    Mosquitto,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Mooring => "mooring",
            Kind::Mosquitto => "mosquitto",
        }
    }
}

/// One server under test with the device credentials provisioned for it.
pub struct Target {
    pub kind: Kind,
    /// `ulimit -n` of the server process.
    pub fd_limit: u64,
    proc: Option<Proc>,
    creds: Vec<Cred>,
    endpoint: Option<Endpoint>,
    flavor: Flavor,
}

enum Flavor {
    Mooring(MooringState),
    Mosquitto(MosquittoState),
}

struct MooringState {
    bin: PathBuf,
    data_dir: PathBuf,
    /// `--config` file with the `[limits]` the bench sets (written at start when there are any).
    config_file: PathBuf,
    queue_bounds: Option<QueueBounds>,
    /// Whole TOML sections appended to the `--config` file (e.g. `[telemetry]` for retention).
    extra_config: Option<String>,
    /// A `service` token created in this data dir (the fan-out subscriber's password).
    service_token: Option<String>,
    /// Device credentials already created in `data_dir` (JSON lines), reused by the next run.
    creds_file: PathBuf,
    mqtt: Option<SocketAddr>,
    http: Option<SocketAddr>,
    /// The admin-token API client, once the server runs.
    api: Option<mooring_api::Client>,
}

struct MosquittoState {
    bin: PathBuf,
    dir: PathBuf,
    conf: PathBuf,
    port: u16,
    pki: Arc<Pki>,
    files: MosquittoFiles,
    queue_bounds: Option<QueueBounds>,
    /// `persistence true` (database in `dir`, removed at each start) instead of `false`.
    persistence: bool,
}

/// The TLS files a generated Mosquitto config points at.
struct MosquittoFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Target {
    /// Our server, with its data dir (and device cache) under `dir`.
    pub fn mooring(bin: PathBuf, dir: &Path, fd_limit: u64) -> anyhow::Result<Target> {
        std::fs::create_dir_all(dir)?;
        let data_dir = dir.join("data");
        let creds_file = dir.join("devices.jsonl");
        let creds = if data_dir.join("mooring.db").exists() {
            load_creds(&creds_file)?
        } else {
            let _ = std::fs::remove_file(&creds_file);
            Vec::new()
        };
        Ok(Target {
            kind: Kind::Mooring,
            fd_limit,
            proc: None,
            creds,
            endpoint: None,
            flavor: Flavor::Mooring(MooringState {
                bin,
                data_dir,
                config_file: dir.join("mooring.toml"),
                queue_bounds: None,
                extra_config: None,
                service_token: None,
                creds_file,
                mqtt: None,
                http: None,
                api: None,
            }),
        })
    }

    /// A private Mosquitto on a free loopback port, configured under `dir`: TLS, client
    /// certificates required, identity as username, `max_connections -1`, persistence off.
    pub fn mosquitto(bin: PathBuf, dir: &Path, fd_limit: u64) -> anyhow::Result<Target> {
        std::fs::create_dir_all(dir)?;
        let pki = Arc::new(Pki::generate()?);
        let port = free_port()?;
        anyhow::ensure!(port != 1883, "refusing port 1883 (the system Mosquitto)");
        let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
            Ok(p)
        };
        let ca = write("ca.crt", &pki.ca_pem)?;
        let cert = write("server.crt", &pki.server_cert_pem)?;
        let key = write("server.key", &pki.server_key_pem)?;
        let files = MosquittoFiles { ca, cert, key };
        let conf = write("mosquitto.conf", &mosquitto_conf(port, &files, None, None))?;
        Ok(Target {
            kind: Kind::Mosquitto,
            fd_limit,
            proc: None,
            creds: Vec::new(),
            endpoint: None,
            flavor: Flavor::Mosquitto(MosquittoState {
                bin,
                dir: dir.to_owned(),
                conf,
                port,
                pki,
                files,
                queue_bounds: None,
                persistence: false,
            }),
        })
    }

    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// The MQTT/TLS endpoint (known once started).
    pub fn endpoint(&self) -> anyhow::Result<&Endpoint> {
        self.endpoint
            .as_ref()
            .ok_or_else(|| anyhow!("{} not started", self.name()))
    }

    /// The first `n` device credentials (call [`Target::ensure_devices`] first).
    pub fn creds(&self, n: usize) -> anyhow::Result<&[Cred]> {
        self.creds
            .get(..n)
            .ok_or_else(|| anyhow!("only {} devices provisioned", self.creds.len()))
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.pid)
    }

    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        self.proc
            .as_ref()
            .ok_or_else(|| anyhow!("{} not running", self.name()))?
            .rss_kib()
    }

    pub fn is_running(&self) -> bool {
        self.proc.is_some()
    }

    /// Session-queue bounds for the next start (ours: `[limits]` `mqtt_session_queue_len_max` and
    /// `…_bytes_max`; Mosquitto: `max_queued_messages` and `max_queued_bytes`); `None`: defaults.
    pub fn set_queue_bounds(&mut self, bounds: Option<QueueBounds>) {
        match &mut self.flavor {
            Flavor::Mooring(m) => m.queue_bounds = bounds,
            Flavor::Mosquitto(s) => s.queue_bounds = bounds,
        }
    }

    /// TOML sections (other than `[limits]`) for our next start; `None`: defaults. Mosquitto has
    /// no equivalent settings, so this is refused for it.
    pub fn set_extra_config(&mut self, toml: Option<String>) -> anyhow::Result<()> {
        match &mut self.flavor {
            Flavor::Mooring(m) => m.extra_config = toml,
            Flavor::Mosquitto(_) => {
                anyhow::ensure!(toml.is_none(), "mosquitto takes no mooring config")
            }
        }
        Ok(())
    }

    /// Mosquitto's `persistence true` for the next start (ours always stores what it acknowledges).
    pub fn set_persistence(&mut self, on: bool) -> anyhow::Result<()> {
        match &mut self.flavor {
            Flavor::Mosquitto(s) => s.persistence = on,
            Flavor::Mooring(_) => anyhow::ensure!(!on, "mooring has no persistence switch"),
        }
        Ok(())
    }

    /// Ours: the data directory (where the store fsyncs).
    pub fn data_dir(&self) -> Option<&Path> {
        match &self.flavor {
            Flavor::Mooring(m) => Some(&m.data_dir),
            Flavor::Mosquitto(_) => None,
        }
    }

    /// Whether the next (or current) Mosquitto start has `persistence true`.
    pub fn persistence(&self) -> bool {
        matches!(&self.flavor, Flavor::Mosquitto(s) if s.persistence)
    }

    /// How a backend logs in. Ours: TLS without a client certificate and a `service` token
    /// (created on first use, server running) as the password, as docs/server.md describes for
    /// data pipelines. Mosquitto: a client certificate of its own (CN `bench-backend`).
    pub async fn backend_login(&mut self) -> anyhow::Result<BackendLogin> {
        let endpoint = self.endpoint()?.clone();
        match &mut self.flavor {
            Flavor::Mosquitto(s) => Ok(BackendLogin {
                tls: endpoint.tls_config(&s.pki.client("bench-backend")?)?,
                login: None,
            }),
            Flavor::Mooring(m) => {
                let token = match &m.service_token {
                    Some(t) => t.clone(),
                    None => {
                        let req = mooring_api::CreateToken {
                            name: BACKEND_CLIENT_ID.to_owned(),
                            role: "service".to_owned(),
                            scope: None,
                            expires_in_ms: None,
                        };
                        let t = m.api()?.create_token(&req).await?.token;
                        m.service_token = Some(t.clone());
                        t
                    }
                };
                Ok(BackendLogin {
                    tls: endpoint.tls_config_without_cert()?,
                    login: Some((BACKEND_CLIENT_ID.to_owned(), token)),
                })
            }
        }
    }

    /// Starts the server (on the same ports as before if it ran already) and waits until it listens.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.proc.is_none(), "{} already running", self.name());
        match &mut self.flavor {
            Flavor::Mooring(m) => {
                let mqtt = m.mqtt.map_or("127.0.0.1:0".to_owned(), |a| a.to_string());
                let http = m.http.map_or("127.0.0.1:0".to_owned(), |a| a.to_string());
                let mut args: Vec<OsString> = vec![
                    "serve".into(),
                    "--data-dir".into(),
                    m.data_dir.clone().into(),
                    "--mqtt-addr".into(),
                    mqtt.into(),
                    "--http-addr".into(),
                    http.into(),
                ];
                if m.queue_bounds.is_some() || m.extra_config.is_some() {
                    let mut toml = "# Generated by mooring-bench.\n".to_owned();
                    if let Some(q) = m.queue_bounds {
                        toml.push_str(&format!(
                            "[limits]\nmqtt_session_queue_len_max = {}\nmqtt_session_queue_bytes_max = {}\n",
                            q.len_max, q.bytes_max
                        ));
                    }
                    toml.push_str(m.extra_config.as_deref().unwrap_or(""));
                    std::fs::write(&m.config_file, toml)
                        .with_context(|| format!("writing {}", m.config_file.display()))?;
                    args.extend(["--config".into(), m.config_file.clone().into()]);
                }
                let (proc, mqtt, http) =
                    spawn_mooring(&m.bin, &args, self.fd_limit, SpawnOpts::default()).await?;
                m.mqtt = Some(mqtt);
                m.http = Some(http);
                let token = std::fs::read_to_string(m.data_dir.join("admin.token"))
                    .context("reading admin.token")?;
                m.api = Some(
                    mooring_api::Client::builder(&format!("http://{http}"), &token)
                        .timeout(HTTP_TIMEOUT)
                        .build()?,
                );
                let ca = std::fs::read_to_string(m.data_dir.join("ca.crt"))?;
                self.endpoint = Some(Endpoint::new(mqtt, &ca)?);
                self.proc = Some(proc);
            }
            Flavor::Mosquitto(s) => {
                let db_dir = s.persistence.then(|| s.dir.join("db"));
                if let Some(db) = &db_dir {
                    // Every start begins empty: no sessions from an earlier run.
                    let _ = std::fs::remove_dir_all(db);
                    std::fs::create_dir_all(db)?;
                }
                // The port was free when chosen, but another process may have taken it since:
                // then mosquitto exits at once (address in use) and the next free port is tried.
                let mut attempt = 1;
                let (proc, addr) = loop {
                    let conf = mosquitto_conf(s.port, &s.files, s.queue_bounds, db_dir.as_deref());
                    std::fs::write(&s.conf, conf)
                        .with_context(|| format!("writing {}", s.conf.display()))?;
                    let args: Vec<OsString> = vec!["-c".into(), s.conf.clone().into()];
                    let mut proc = Proc::spawn(&s.bin, &args, &[], self.fd_limit)?;
                    let addr = SocketAddr::from(([127, 0, 0, 1], s.port));
                    let deadline = Instant::now() + START_TIMEOUT;
                    let listening = loop {
                        if proc.check_alive("mosquitto").is_err() {
                            break false;
                        }
                        if tokio::net::TcpStream::connect(addr).await.is_ok() {
                            // Connected, but to mosquitto? One that lost the port is gone by now.
                            tokio::time::sleep(Duration::from_millis(PORT_CHECK_MS)).await;
                            break proc.check_alive("mosquitto").is_ok();
                        }
                        if Instant::now() > deadline {
                            bail!(
                                "mosquitto did not listen on {addr} within {START_TIMEOUT:?}; log:\n{}",
                                proc.log_tail()
                            );
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    };
                    if listening {
                        break (proc, addr);
                    }
                    if attempt >= PORT_ATTEMPTS_MAX {
                        proc.check_alive("mosquitto")?;
                    }
                    attempt += 1;
                    s.port = free_port()?;
                    anyhow::ensure!(s.port != 1883, "refusing port 1883 (the system Mosquitto)");
                };
                self.endpoint = Some(Endpoint::new(addr, &s.pki.ca_pem)?);
                self.proc = Some(proc);
            }
        }
        Ok(())
    }

    /// `kill -9` and reap. No-op when not running.
    pub async fn kill(&mut self) {
        if let Some(p) = self.proc.take() {
            p.kill().await;
        }
    }

    /// Makes sure at least `n` devices exist with credentials: ours through `POST
    /// /api/v1/devices` (server must be running), Mosquitto's by signing client certificates.
    pub async fn ensure_devices(&mut self, n: usize) -> anyhow::Result<Duration> {
        let have = self.creds.len();
        if have >= n {
            return Ok(Duration::ZERO);
        }
        let started = Instant::now();
        let ids: Vec<String> = (have..n).map(device_id).collect();
        match &self.flavor {
            Flavor::Mosquitto(s) => {
                let new = s.pki.clients(ids).await?;
                self.creds.extend(new);
            }
            Flavor::Mooring(m) => {
                anyhow::ensure!(self.proc.is_some(), "mooring must run to create devices");
                let (new, _) = create_devices(&m.api()?, ids).await?;
                append_creds(&m.creds_file, &new)?;
                self.creds.extend(new);
            }
        }
        Ok(started.elapsed())
    }

    /// A Prometheus counter or gauge from ours' `/metrics` (`None` for Mosquitto).
    pub async fn metric(&self, name: &str) -> anyhow::Result<Option<f64>> {
        match &self.flavor {
            Flavor::Mosquitto(_) => Ok(None),
            Flavor::Mooring(m) => {
                let text = m.api()?.metrics().await?;
                Ok(parse_metric(&text, name))
            }
        }
    }

    /// Whether the server has a device commands API (ours: looks in its OpenAPI document).
    pub async fn has_commands_api(&self) -> anyhow::Result<bool> {
        match &self.flavor {
            Flavor::Mosquitto(_) => Ok(false),
            Flavor::Mooring(m) => {
                let doc = m.api()?.openapi().await?;
                Ok(doc["paths"]
                    .as_object()
                    .is_some_and(|p| p.contains_key("/api/v1/devices/{id}/commands")))
            }
        }
    }

    /// A client identity that is not a device (Mosquitto only: ours uses the HTTP API).
    pub fn backend_cred(&self) -> anyhow::Result<Cred> {
        match &self.flavor {
            Flavor::Mosquitto(s) => s.pki.client("bench-backend"),
            Flavor::Mooring(_) => bail!("mooring's backend is its HTTP API"),
        }
    }

    /// An HTTP API client with the admin token (ours only).
    pub fn api_client(&self) -> anyhow::Result<mooring_api::Client> {
        match &self.flavor {
            Flavor::Mosquitto(_) => bail!("mosquitto has no HTTP API"),
            Flavor::Mooring(m) => m.api(),
        }
    }
}

impl MooringState {
    fn api(&self) -> anyhow::Result<mooring_api::Client> {
        self.api.clone().context("mooring not started")
    }
}

/// Starts `mooring` with `args` (a `serve` command line) and waits, at most [`START_TIMEOUT`],
/// until it logs its MQTT/TLS and HTTP listeners; returns the process and both addresses.
pub(crate) async fn spawn_mooring(
    bin: &Path,
    args: &[OsString],
    fd_limit: u64,
    opts: SpawnOpts,
) -> anyhow::Result<(Proc, SocketAddr, SocketAddr)> {
    let mut proc = Proc::spawn_with(bin, args, &[("RUST_LOG", "info")], fd_limit, opts)?;
    let (mut mqtt, mut http) = (None, None);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let (Some(mqtt), Some(http)) = (mqtt, http) {
            return Ok((proc, mqtt, http));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, proc.lines.recv()).await {
            Ok(Some(line)) => {
                mqtt = mqtt.or(parse_addr_after(&line, "MQTT/TLS listening on "));
                http = http.or(parse_addr_after(&line, "HTTP API listening on "));
            }
            Ok(None) | Err(_) => {
                proc.check_alive("mooring serve")?;
                bail!(
                    "mooring serve did not report its listeners within {START_TIMEOUT:?}; log:\n{}",
                    proc.log_tail()
                );
            }
        }
    }
}

/// Creates `ids` through `POST /api/v1/devices` with [`PROVISION_CONCURRENCY`] requests in
/// flight; returns their credentials in order and the fleet CA the server named (`None` when
/// `ids` is empty).
pub(crate) async fn create_devices(
    api: &mooring_api::Client,
    ids: Vec<String>,
) -> anyhow::Result<(Vec<Cred>, Option<String>)> {
    let ids = Arc::new(ids);
    let next = Arc::new(AtomicUsize::new(0));
    let ca = Arc::new(Mutex::new(None::<String>));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..PROVISION_CONCURRENCY {
        let (ids, next, api, ca) = (ids.clone(), next.clone(), api.clone(), ca.clone());
        workers.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else { break };
                let req = mooring_api::CreateDevice {
                    id: id.clone(),
                    ..Default::default()
                };
                let created = match api.create_device(&req).await {
                    Ok(c) => c,
                    Err(e) if e.status() == Some(409) => bail!(
                        "device {id} already exists but its key is not cached; remove the bench work dir"
                    ),
                    Err(e) => return Err(anyhow::Error::new(e).context(format!("create {id}"))),
                };
                if let Ok(mut ca) = ca.lock() {
                    ca.get_or_insert_with(|| created.ca_pem.clone());
                }
                out.push((
                    i,
                    Cred {
                        id: id.clone(),
                        cert_pem: created.certificate_pem,
                        key_pem: created.private_key_pem.with_context(|| {
                            format!("create {id}: the server returned no private key")
                        })?,
                    },
                ));
            }
            anyhow::Ok(out)
        });
    }
    let mut all = Vec::with_capacity(ids.len());
    while let Some(r) = workers.join_next().await {
        all.extend(r.context("provisioning task")??);
    }
    all.sort_by_key(|(i, _)| *i);
    let ca = ca.lock().ok().and_then(|mut c| c.take());
    Ok((all.into_iter().map(|(_, c)| c).collect(), ca))
}

/// Appends `creds` to the JSON-lines cache at `path` (one `{"id","cert","key"}` per line) and
/// syncs it.
pub(crate) fn append_creds(path: &Path, creds: &[Cred]) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?,
    );
    for c in creds {
        let line = serde_json::json!({"id": c.id, "cert": c.cert_pem, "key": c.key_pem});
        writeln!(f, "{line}")?;
    }
    f.into_inner()
        .map_err(|e| anyhow!("writing {}: {}", path.display(), e.error()))?
        .sync_all()?;
    Ok(())
}

/// The cached credentials of `bench-000000`, `bench-000001`, … in order, up to the first line
/// that is torn or out of order (the devices after it get re-created, and a 409 says so).
pub(crate) fn load_creds(path: &Path) -> anyhow::Result<Vec<Cred>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            break; // a torn last line: the devices after it get re-created (409 → clear error)
        };
        let s = |k: &str| v[k].as_str().map(str::to_owned);
        match (s("id"), s("cert"), s("key")) {
            (Some(id), Some(cert_pem), Some(key_pem)) if id == device_id(i) => out.push(Cred {
                id,
                cert_pem,
                key_pem,
            }),
            _ => break,
        }
    }
    Ok(out)
}

/// The value of an unlabelled metric in Prometheus text.
pub fn parse_metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let value = rest.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// Mosquitto's config: `queue` sets `max_queued_messages`/`max_queued_bytes` (else its defaults,
/// 1000 messages and no byte bound); `persistence_dir` turns `persistence true` on there (saved
/// only every `autosave_interval`, 1800 s by default, and at a clean shutdown).
fn mosquitto_conf(
    port: u16,
    files: &MosquittoFiles,
    queue: Option<QueueBounds>,
    persistence_dir: Option<&Path>,
) -> String {
    // As root Mosquitto drops to user `mosquitto`, which could not read our files; `user root` keeps it.
    let user = if is_root() { "user root\n" } else { "" };
    let persistence = match persistence_dir {
        Some(dir) => format!(
            "persistence true\npersistence_location {}/\n",
            dir.display()
        ),
        None => "persistence false\n".to_owned(),
    };
    let queue = queue.map_or(String::new(), |q| {
        format!(
            "max_queued_messages {}\nmax_queued_bytes {}\n",
            q.len_max, q.bytes_max
        )
    });
    format!(
        "# Generated by mooring-bench: a private broker for the benchmark (not the system one on 1883).
{user}per_listener_settings false
{persistence}{queue}max_connections -1
set_tcp_nodelay true
allow_anonymous false
log_dest stderr
log_type error
log_type warning
connection_messages false
listener {port} 127.0.0.1
cafile {ca}
certfile {cert}
keyfile {key}
require_certificate true
use_identity_as_username true
",
        ca = files.ca.display(),
        cert = files.cert.display(),
        key = files.key.display(),
    )
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|r| r.split_whitespace().next().map(|u| u == "0"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_rss_and_metrics() {
        let status = "Name:\tmosquitto\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\n";
        assert_eq!(parse_vm_rss_kib(status), Some(12345));
        let text =
            "# HELP x\nmooring_telemetry_messages_total_x 9\nmooring_telemetry_messages_total 42\n";
        assert_eq!(
            parse_metric(text, "mooring_telemetry_messages_total"),
            Some(42.0)
        );
        assert_eq!(parse_metric(text, "absent"), None);
        let stat = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0";
        assert_eq!(parse_cpu_secs(stat), Some(3.0));
        let m = parse_machine_cpu("cpu  100 0 50 1000 20 10 30 5 0 0");
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(
            close(m.busy, 1.95) && close(m.irq, 0.4) && close(m.steal, 0.05),
            "{m:?}"
        );
    }

    #[test]
    fn mosquitto_conf_requires_client_certs_and_never_uses_1883() {
        let files = MosquittoFiles {
            ca: "/w/ca.crt".into(),
            cert: "/w/s.crt".into(),
            key: "/w/s.key".into(),
        };
        let c = mosquitto_conf(40001, &files, None, None);
        assert!(c.contains("listener 40001 127.0.0.1"));
        assert!(c.contains("require_certificate true"));
        assert!(c.contains("use_identity_as_username true"));
        assert!(c.contains("max_connections -1"));
        assert!(c.contains("persistence false"));
        assert!(!c.contains("max_queued"));
        assert!(!c.contains("listener 1883"));
        let q = QueueBounds {
            len_max: 5000,
            bytes_max: 1 << 20,
        };
        let c = mosquitto_conf(40001, &files, Some(q), Some(Path::new("/w/db")));
        assert!(c.contains("persistence true\npersistence_location /w/db/\n"));
        assert!(c.contains("max_queued_messages 5000\nmax_queued_bytes 1048576\n"));
        assert!(!c.contains("persistence false"));
    }
}
