//! The agent's side of OTA: the `[update]` config, the `ota` child that drives the [`super::Updater`], and its [`super::Env`] (preconditions, HTTPS, link refresh over MQTT, health checks, reports through the outbox).

use super::update::{Body, Env, FetchError, Next, UpdateSettings, Updater};
use crate::store::Entry;
use crate::Core;
use mooring_proto::ota::{self, reason, Link, LinkRequest, StatusReport};
use serde::Deserialize;
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Default battery level below which an update waits.
pub const BATTERY_MIN_PCT_DEFAULT: u8 = 30;
/// Default time a trial boot has to pass its checks.
pub const HEALTH_DEADLINE_SECS_DEFAULT: u64 = 300;
/// How long a hook command (battery, busy, health) may run.
pub const HOOK_TIMEOUT_SECS: u64 = 60;
/// How long a link refresh waits for the server's answer.
pub const LINK_REPLY_WAIT_MS: u64 = 30_000;
/// How long a reboot waits for the queued reports to be acknowledged.
pub const REBOOT_REPORT_WAIT_MS: u64 = 10_000;
/// Most `[update] health_handlers`.
pub const HEALTH_HANDLERS_MAX: usize = 16;
/// Built-in commands that change the device, so never run as a health check.
const NOT_HEALTH_HANDLERS: [&str; 2] = ["reboot", "set_config"];
/// Requests (update / cancel commands) buffered for the `ota` child.
pub const REQUEST_QUEUE_MAX: usize = 4;
/// Link answers buffered for the `ota` child.
pub const LINK_QUEUE_MAX: usize = 4;
/// How long a command waits for the `ota` child to take it.
pub const REQUEST_WAIT_MS: u64 = 30_000;

/// The `[update]` table of the agent config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateConfig {
    /// The fleet's update public key, 64 hex digits (`GET /api/v1/ota/update-key`).
    pub public_key: String,
    /// This device's hardware revision (matched against the manifest's `compatible`).
    pub hw_revision: String,
    #[serde(default)]
    pub allow_downgrade: bool,
    /// A file holding the battery level in percent (e.g. `/sys/class/power_supply/BAT0/capacity`).
    #[serde(default)]
    pub battery_file: Option<std::path::PathBuf>,
    /// Or a program printing it.
    #[serde(default)]
    pub battery_command: Option<Vec<String>>,
    #[serde(default = "battery_min_default")]
    pub battery_min_pct: u8,
    /// `HH:MM-HH:MM`, UTC (may wrap past midnight); none = any time.
    #[serde(default)]
    pub window: Option<String>,
    /// A veto hook: the update waits while it exits non-zero.
    #[serde(default)]
    pub busy_command: Option<Vec<String>>,
    /// Must exit 0 during a trial boot.
    #[serde(default)]
    pub health_command: Option<Vec<String>>,
    /// Command handlers (config `[handlers.*]`, built-in `ping`, ...) that must answer
    /// `succeeded` during a trial boot, each run with `{"health_check": true}`: the new
    /// version's handlers respond.
    #[serde(default)]
    pub health_handlers: Vec<String>,
    #[serde(default = "health_deadline_default")]
    pub health_deadline_secs: u64,
}

fn battery_min_default() -> u8 {
    BATTERY_MIN_PCT_DEFAULT
}
fn health_deadline_default() -> u64 {
    HEALTH_DEADLINE_SECS_DEFAULT
}

impl UpdateConfig {
    pub fn validate(&self) -> Result<(), String> {
        self.public_key()?;
        if !ota::is_valid_hw_revision(&self.hw_revision) {
            return Err(format!(
                "update.hw_revision {:?} is not a valid hardware revision",
                self.hw_revision
            ));
        }
        if self.battery_file.is_some() && self.battery_command.is_some() {
            return Err("update: give battery_file or battery_command, not both".into());
        }
        if self.battery_min_pct > 100 {
            return Err("update.battery_min_pct must be 0..=100".into());
        }
        if let Some(w) = &self.window {
            parse_window(w)?;
        }
        for (name, c) in [
            ("battery_command", &self.battery_command),
            ("busy_command", &self.busy_command),
            ("health_command", &self.health_command),
        ] {
            if c.as_ref().is_some_and(|c| c.is_empty()) {
                return Err(format!("update.{name} is empty (leave it out)"));
            }
        }
        if self.health_handlers.len() > HEALTH_HANDLERS_MAX {
            return Err(format!(
                "update.health_handlers names more than {HEALTH_HANDLERS_MAX} handlers"
            ));
        }
        for h in &self.health_handlers {
            if h.is_empty()
                || NOT_HEALTH_HANDLERS.contains(&h.as_str())
                || h.starts_with("mooring.")
            {
                return Err(format!(
                    "update.health_handlers: {h:?} cannot be a health check (it changes the device)"
                ));
            }
        }
        if self.health_deadline_secs == 0 || self.health_deadline_secs > 86_400 {
            return Err("update.health_deadline_secs must be 1..=86400".into());
        }
        Ok(())
    }

    pub fn public_key(&self) -> Result<[u8; 32], String> {
        hex::decode(&self.public_key)
            .ok()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .ok_or_else(|| "update.public_key must be 64 hex digits (an Ed25519 public key)".into())
    }

    pub fn settings(&self) -> Result<UpdateSettings, String> {
        Ok(UpdateSettings {
            public_key: self.public_key()?,
            hw_revision: self.hw_revision.clone(),
            allow_downgrade: self.allow_downgrade,
        })
    }
}

/// `HH:MM-HH:MM` → (start, end) in minutes of the day.
pub fn parse_window(w: &str) -> Result<(u32, u32), String> {
    let bad = || format!("update.window {w:?} must be HH:MM-HH:MM (UTC)");
    let hm = |s: &str| -> Option<u32> {
        let (h, m) = s.trim().split_once(':')?;
        let (h, m) = (h.parse::<u32>().ok()?, m.parse::<u32>().ok()?);
        (h < 24 && m < 60).then_some(h * 60 + m)
    };
    let (a, b) = w.split_once('-').ok_or_else(bad)?;
    let (a, b) = (hm(a).ok_or_else(bad)?, hm(b).ok_or_else(bad)?);
    if a == b {
        return Err(bad());
    }
    Ok((a, b))
}

/// Whether `now_ms` (unix, UTC) is inside the window.
pub fn in_window((start, end): (u32, u32), now_ms: u64) -> bool {
    let minute = ((now_ms / 60_000) % (24 * 60)) as u32;
    if start < end {
        (start..end).contains(&minute)
    } else {
        minute >= start || minute < end
    }
}

/// What the device's platform gives the updater beyond the config file: how a download is
/// opened, how the device reboots, its battery level and checks of a trial boot of its own.
/// `mooring-agent` itself has none ([`AgentDeps::ota_platform`](crate::AgentDeps) `None`): HTTPS
/// downloads, `reboot_command` (or an exit with [`super::EXIT_REBOOT`]) and the `[update]`
/// hooks. The simulator gives its own: downloads through the in-process server's router over
/// the device's simulated link, a reboot of the simulated device, its battery model.
#[async_trait::async_trait]
pub trait Platform: Send + Sync {
    /// `GET link.url` from byte `offset`.
    async fn open(&self, link: &Link, offset: u64) -> Result<Box<dyn Body>, FetchError>;
    /// Reboots the device. Returns only when it could not; the agent then carries on and the
    /// updater asks again later.
    async fn reboot(&self);
    /// The battery level in percent, when the platform knows it (the `[update]` battery hooks
    /// are then not asked).
    fn battery_pct(&self) -> Option<f64> {
        None
    }
    /// Checks of a trial boot of the platform's own, after the agent is connected and
    /// `health_command` passed; `Err(why)` fails the trial.
    async fn health_check(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A request from the command executor to the `ota` child.
pub(crate) struct Request {
    pub(crate) name: String,
    pub(crate) params: Value,
    pub(crate) reply: oneshot::Sender<crate::Outcome>,
}

/// The OTA channels of [`Core`].
pub(crate) struct OtaParts {
    pub(crate) updater: tokio::sync::Mutex<Option<Updater>>,
    pub(crate) requests_tx: mpsc::Sender<Request>,
    pub(crate) requests_rx: tokio::sync::Mutex<mpsc::Receiver<Request>>,
    pub(crate) link_rx: tokio::sync::Mutex<mpsc::Receiver<crate::link::Inbound>>,
    /// The slots as last reported in the shadow (`reported.ota`).
    pub(crate) reported: std::sync::Mutex<Value>,
    /// The platform's downloads, reboot, battery and checks; `None`: the agent's own.
    pub(crate) platform: Option<Arc<dyn Platform>>,
}

/// `mooring.update` / `mooring.update.cancel`: handed to the `ota` child, answered when it
/// has journaled (or refused) the request.
pub(crate) async fn request(core: &Core, name: &str, params: Value) -> crate::Outcome {
    let Some(parts) = &core.ota else {
        return Err(crate::commands::reason("updates are not configured on this device (add an [update] table to the agent config file)"));
    };
    let (tx, rx) = oneshot::channel();
    let req = Request {
        name: name.to_owned(),
        params,
        reply: tx,
    };
    if parts.requests_tx.try_send(req).is_err() {
        return Err(crate::commands::reason("the updater is busy; try again"));
    }
    match tokio::time::timeout(Duration::from_millis(REQUEST_WAIT_MS), rx).await {
        Ok(Ok(outcome)) => outcome,
        _ => Err(crate::commands::reason("the updater did not answer")),
    }
}

fn answer(up: &mut Updater, env: &mut AgentEnv, req: Request) {
    let outcome = match req.name.as_str() {
        ota::UPDATE_COMMAND => match serde_json::from_value::<ota::UpdateParams>(req.params) {
            Ok(p) => up.accept(env, p),
            Err(e) => Err(crate::commands::reason(format!(
                "invalid update parameters: {e}"
            ))),
        },
        _ => match serde_json::from_value::<ota::CancelParams>(req.params) {
            Ok(p) => up.cancel(env, &p),
            Err(e) => Err(crate::commands::reason(format!(
                "invalid cancel parameters: {e}"
            ))),
        },
    };
    let _ = req.reply.send(outcome);
}

/// The `ota` child: drives the updater, takes commands between steps, reboots when told.
pub(crate) async fn run(core: Arc<Core>) -> anyhow::Result<()> {
    let Some(parts) = &core.ota else {
        return Ok(());
    };
    let mut updater = parts.updater.lock().await;
    let Some(up) = updater.as_mut() else {
        return Ok(());
    };
    let mut requests = parts.requests_rx.lock().await;
    let mut link_rx = parts.link_rx.lock().await;
    let mut env = AgentEnv::new(core.clone(), parts.platform.clone(), &mut link_rx)?;
    let mut wait = Some(Duration::ZERO);
    loop {
        let step = async {
            match wait {
                Some(d) => {
                    tokio::time::sleep(d).await;
                    Some(up.drive(&mut env).await)
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            next = step => {
                match next {
                    Some(Ok(Next::Idle)) | None => wait = None,
                    Some(Ok(Next::RetryAfterMs(ms))) => wait = Some(Duration::from_millis(ms)),
                    Some(Ok(Next::Reboot)) => {
                        reboot(&core, parts.platform.as_deref()).await;
                        wait = Some(Duration::from_secs(60));
                    }
                    Some(Err(e)) => return Err(e.into()),
                }
            }
            req = requests.recv() => {
                let Some(req) = req else { return Ok(()) };
                answer(up, &mut env, req);
                wait = Some(Duration::ZERO);
            }
        }
        // The slots changed (written, armed, committed, reverted): say so in the shadow.
        let now = up.reported();
        let changed = {
            let mut last = mooring_proto::sync::lock(&parts.reported);
            let changed = *last != now;
            *last = now.clone();
            changed
        };
        if changed {
            let mut patch = serde_json::Map::new();
            patch.insert("ota".into(), now);
            crate::shadow::report(&core, patch)?;
        }
    }
}

/// Waits (bounded) for the queued reports to be acknowledged, then reboots: the platform's
/// reboot, the configured `reboot_command`, or an exit with [`super::EXIT_REBOOT`] for the
/// service manager.
async fn reboot(core: &Core, platform: Option<&dyn Platform>) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(REBOOT_REPORT_WAIT_MS);
    while !core.store().is_empty() && tokio::time::Instant::now() < deadline {
        // A bounded wait on the outbox (the clock may be virtual: the simulator's).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A reboot the agent asks for is a clean stop.
    crate::boots::record_stop(core);
    if let Some(p) = platform {
        tracing::warn!("rebooting for the update (platform)");
        p.reboot().await;
        return;
    }
    match &core.config.reboot_command {
        Some(argv) => {
            tracing::warn!(command = ?argv, "rebooting for the update");
            let status = match argv.split_first() {
                Some((prog, args)) => tokio::process::Command::new(prog).args(args).status().await,
                None => Err(std::io::Error::other("empty reboot_command")),
            };
            if !status.as_ref().is_ok_and(|s| s.success()) {
                tracing::error!(
                    ?status,
                    "the reboot command failed; exiting for the service manager instead"
                );
                std::process::exit(super::EXIT_REBOOT);
            }
        }
        None => {
            tracing::warn!(
                code = super::EXIT_REBOOT,
                "update: exiting so the service manager restarts the agent (no reboot_command)"
            );
            std::process::exit(super::EXIT_REBOOT);
        }
    }
}

struct AgentEnv<'a> {
    core: Arc<Core>,
    /// Retry jitter, seeded from the agent's seed (the simulator's runs repeat).
    rng: rand::rngs::StdRng,
    platform: Option<Arc<dyn Platform>>,
    http: reqwest::Client,
    link_rx: &'a mut mpsc::Receiver<crate::link::Inbound>,
}

impl<'a> AgentEnv<'a> {
    fn new(
        core: Arc<Core>,
        platform: Option<Arc<dyn Platform>>,
        link_rx: &'a mut mpsc::Receiver<crate::link::Inbound>,
    ) -> anyhow::Result<Self> {
        use rand::SeedableRng as _;
        // A stream of its own (the link's reconnect jitter uses seed + n).
        let rng = rand::rngs::StdRng::seed_from_u64(core.rng_seed ^ 0x6f74_615f_6a69_7474);
        if platform.is_some() {
            // The platform downloads: no HTTPS client (nor fleet roots) needed.
            return Ok(Self {
                rng,
                http: reqwest::Client::new(),
                core,
                platform,
                link_rx,
            });
        }
        let roots = crate::rotate::files_of(&core.config).roots_path();
        let tls = match super::fetch::fleet_tls(&roots) {
            Ok(tls) => Some(tls),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "no fleet roots for downloads; HTTPS downloads will fail");
                None
            }
        };
        Ok(Self {
            rng,
            http: super::fetch::client(tls)?,
            core,
            platform,
            link_rx,
        })
    }

    fn update_config(&self) -> Option<&UpdateConfig> {
        self.core.config.update.as_ref()
    }
}

/// Runs a hook command (bounded); `Ok(stdout)` when it exits 0.
async fn hook(argv: &[String]) -> Result<String, String> {
    let Some((prog, args)) = argv.split_first() else {
        return Err("empty command".into());
    };
    let run = tokio::process::Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(HOOK_TIMEOUT_SECS), run).await {
        Err(_) => Err(format!("{prog} timed out after {HOOK_TIMEOUT_SECS} s")),
        Ok(Err(e)) => Err(format!("{prog}: {e}")),
        Ok(Ok(out)) if out.status.success() => {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        Ok(Ok(out)) => Err(format!("{prog} exited with {}", out.status)),
    }
}

#[async_trait::async_trait]
impl Env for AgentEnv<'_> {
    async fn preconditions(&mut self) -> Result<(), String> {
        let Some(c) = self.update_config().cloned() else {
            return Ok(());
        };
        if let Some(w) = &c.window {
            let w = parse_window(w)?;
            if !in_window(w, self.core.clock.now_ms()) {
                return Err(format!(
                    "{}: outside {} UTC",
                    reason::OUTSIDE_WINDOW,
                    c.window.as_deref().unwrap_or_default()
                ));
            }
        }
        let level =
            if let Some(pct) = self.platform.as_ref().and_then(|p| p.battery_pct()) {
                Some(pct.to_string())
            } else if let Some(f) = &c.battery_file {
                Some(std::fs::read_to_string(f).map_err(|e| {
                    format!("{}: reading {}: {e}", reason::BATTERY_LOW, f.display())
                })?)
            } else if let Some(cmd) = &c.battery_command {
                Some(
                    hook(cmd)
                        .await
                        .map_err(|e| format!("{}: {e}", reason::BATTERY_LOW))?,
                )
            } else {
                None
            };
        if let Some(level) = level {
            let pct: f64 = level.trim().parse().map_err(|_| {
                format!(
                    "{}: battery level {:?} is not a number",
                    reason::BATTERY_LOW,
                    level.trim()
                )
            })?;
            if pct < f64::from(c.battery_min_pct) {
                return Err(format!(
                    "{}: {pct}% is below {}%",
                    reason::BATTERY_LOW,
                    c.battery_min_pct
                ));
            }
        }
        if self.core.commands_running.load(Ordering::SeqCst) > 0 {
            return Err(format!("{}: a command is running", reason::BUSY));
        }
        if let Some(cmd) = &c.busy_command {
            hook(cmd)
                .await
                .map_err(|e| format!("{}: vetoed by {e}", reason::BUSY))?;
        }
        Ok(())
    }

    async fn open(&mut self, link: &Link, offset: u64) -> Result<Box<dyn Body>, FetchError> {
        match &self.platform {
            Some(p) => p.open(link, offset).await,
            None => super::fetch::open(&self.http, link, offset).await,
        }
    }

    async fn refresh_link(
        &mut self,
        deployment_id: &str,
        artifact_id: &str,
    ) -> Result<Link, FetchError> {
        let Some(h) = self.core.link.borrow().clone() else {
            return Err(FetchError::Transient(
                "offline; a new download link needs the server".into(),
            ));
        };
        while self.link_rx.try_recv().is_ok() {}
        let req = LinkRequest {
            v: ota::SCHEMA_VERSION,
            deployment_id: deployment_id.into(),
            artifact_id: artifact_id.into(),
        };
        let payload = serde_json::to_vec(&req).map_err(|e| FetchError::Transient(e.to_string()))?;
        if !h.try_publish(
            &ota::link_request_topic(&self.core.device_id),
            payload,
            1,
            None,
        ) {
            return Err(FetchError::Transient("the connection is busy".into()));
        }
        let accepted = ota::link_accepted_topic(&self.core.device_id);
        let rejected = ota::link_rejected_topic(&self.core.device_id);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(LINK_REPLY_WAIT_MS);
        loop {
            // The filter also matches our own request: only the answers count.
            let Ok(Some(msg)) = tokio::time::timeout_at(deadline, self.link_rx.recv()).await else {
                return Err(FetchError::Transient(
                    "no answer to the link request".into(),
                ));
            };
            if msg.topic == accepted {
                return serde_json::from_slice::<Link>(&msg.payload)
                    .map_err(|e| FetchError::Transient(format!("invalid link: {e}")));
            }
            if msg.topic == rejected {
                let v: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
                let text = format!(
                    "link refused: {}",
                    v["message"]
                        .as_str()
                        .or(v["code"].as_str())
                        .unwrap_or("no reason")
                );
                // Refused for now (the server's per-device limit): ask again later.
                if v["code"] == ota::LINK_RATE_LIMITED {
                    return Err(FetchError::Transient(text));
                }
                return Err(FetchError::Fatal(text));
            }
        }
    }

    async fn health_check(&mut self) -> Result<(), String> {
        let deadline_secs = self
            .update_config()
            .map_or(HEALTH_DEADLINE_SECS_DEFAULT, |c| c.health_deadline_secs);
        let deadline = Duration::from_secs(deadline_secs);
        let started = tokio::time::Instant::now();
        let mut link = self.core.link.subscribe();
        if tokio::time::timeout(deadline, link.wait_for(Option::is_some))
            .await
            .is_err()
        {
            return Err(format!(
                "not connected to the server within {deadline_secs} s"
            ));
        }
        if let Some(cmd) = self.update_config().and_then(|c| c.health_command.clone()) {
            let left = deadline.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, hook(&cmd)).await {
                Err(_) => {
                    return Err(format!(
                        "health_command did not finish within {deadline_secs} s"
                    ))
                }
                Ok(Err(e)) => return Err(format!("health_command: {e}")),
                Ok(Ok(_)) => {}
            }
        }
        let handlers = self
            .update_config()
            .map(|c| c.health_handlers.clone())
            .unwrap_or_default();
        for name in handlers {
            let left = deadline.saturating_sub(started.elapsed());
            let run = crate::commands::run_handler(
                &self.core,
                &name,
                serde_json::json!({"health_check": true}),
            );
            match tokio::time::timeout(left, run).await {
                Err(_) => {
                    return Err(format!(
                        "handler {name} did not answer within {deadline_secs} s"
                    ))
                }
                Ok(r) if r.status == mooring_proto::command::ResultStatus::Succeeded => {}
                Ok(r) => {
                    return Err(format!(
                        "handler {name} failed: {}",
                        r.output["reason"].as_str().unwrap_or("no reason given")
                    ))
                }
            }
        }
        if let Some(p) = &self.platform {
            let left = deadline.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, p.health_check()).await {
                Err(_) => {
                    return Err(format!(
                        "the checks did not finish within {deadline_secs} s"
                    ))
                }
                Ok(r) => r?,
            }
        }
        Ok(())
    }

    fn now_ms(&self) -> u64 {
        self.core.clock.now_ms()
    }

    fn random_below(&mut self, n: u64) -> u64 {
        use rand::Rng as _;
        if n == 0 {
            0
        } else {
            self.rng.random_range(0..n)
        }
    }

    fn report(&mut self, mut r: StatusReport) -> std::io::Result<()> {
        let mut store = self.core.store();
        let seq = store.next_seq();
        r.seq = seq;
        r.at = self.core.clock.now_ms();
        let pushed = store.push(vec![Entry {
            seq,
            topic: Some(ota::status_topic(&self.core.device_id)),
            payload: r.to_bytes(),
        }]);
        drop(store);
        pushed.map_err(|e| std::io::Error::other(e.to_string()))?;
        self.core.outbox_changed.notify_one();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_and_wrap_past_midnight() {
        assert_eq!(parse_window("02:00-05:00"), Ok((120, 300)));
        for bad in ["2-5", "02:00", "25:00-01:00", "02:00-02:00", "02:60-03:00"] {
            assert!(parse_window(bad).is_err(), "{bad}");
        }
        let at = |h: u64, m: u64| (h * 60 + m) * 60_000 + 20_000 * 86_400_000;
        assert!(in_window((120, 300), at(2, 0)));
        assert!(!in_window((120, 300), at(5, 0)));
        assert!(in_window((22 * 60, 60), at(23, 30)));
        assert!(in_window((22 * 60, 60), at(0, 30)));
        assert!(!in_window((22 * 60, 60), at(12, 0)));
    }

    #[test]
    fn the_update_table_is_checked_at_load() {
        let key = "ab".repeat(32);
        let ok = format!("[update]\npublic_key = \"{key}\"\nhw_revision = \"rev-b\"\nwindow = \"02:00-05:00\"\nbattery_file = \"/sys/class/power_supply/BAT0/capacity\"\nhealth_command = [\"/usr/local/bin/check\"]\n");
        let f = crate::config::AgentFile::parse(&ok).expect("valid");
        let u = f.update.expect("update");
        assert_eq!(u.battery_min_pct, BATTERY_MIN_PCT_DEFAULT);
        assert_eq!(u.health_deadline_secs, HEALTH_DEADLINE_SECS_DEFAULT);
        assert!(!u.allow_downgrade);
        for bad in [
            "[update]\npublic_key = \"zz\"\nhw_revision = \"rev-b\"".to_owned(),
            format!("[update]\npublic_key = \"{key}\"\nhw_revision = \"rev b\""),
            format!("[update]\npublic_key = \"{key}\"\nhw_revision = \"r\"\nwindow = \"2-5\""),
            format!("[update]\npublic_key = \"{key}\"\nhw_revision = \"r\"\nbattery_file = \"/a\"\nbattery_command = [\"/b\"]"),
            format!("[update]\npublic_key = \"{key}\"\nhw_revision = \"r\"\nhealth_command = []"),
            format!("[update]\npublic_key = \"{key}\"\nhw_revision = \"r\"\nnope = 1"),
            "[handlers.\"mooring.update\"]\nexec = \"/bin/true\"".to_owned(),
        ] {
            assert!(crate::config::AgentFile::parse(&bad).is_err(), "{bad}");
        }
    }
}
