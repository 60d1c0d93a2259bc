//! The A/B update state machine ([`Updater`]): accept → (preconditions) → download (resumable) → verify → install into the inactive slot → verify the slot → (preconditions) → arm a trial → reboot → health check → commit, or revert; every transition journaled before it is reported.
//!
//! The updater does its I/O through an [`Env`] (preconditions, HTTP, link refresh, health
//! checks, reports), so the agent, the simulator and the crash tests run this same code.
//! [`Updater::drive`] is cancel-safe at every `.await`: dropping it leaves the journal, the
//! partial download and the slots consistent, and the next `drive` continues.

use super::journal::{Job, Phase, UpdateFiles};
use super::slots::{BootOutcome, SlotError, Slots};
use mooring_proto::ota::{
    self, compare_versions, reason, CancelParams, Link, Manifest, StatusReport, UpdateParams,
    UpdateState,
};
use serde_json::{json, Value};

/// Largest artifact accepted.
pub const IMAGE_BYTES_MAX: u64 = 16 * 1024 * 1024 * 1024;
/// Consecutive download attempts without a new byte before the update fails.
pub const DOWNLOAD_ATTEMPTS_MAX: u32 = 10;
/// First wait after a failed download attempt; doubled up to [`DOWNLOAD_RETRY_CAP_MS`].
pub const DOWNLOAD_RETRY_BASE_MS: u64 = 2_000;
pub const DOWNLOAD_RETRY_CAP_MS: u64 = 300_000;
/// Wait between checks of unmet preconditions.
pub const DEFERRED_RETRY_MS: u64 = 60_000;
/// Complete downloads whose hash mismatched that are downloaded again before failing.
pub const HASH_RETRIES_MAX: u32 = 1;

/// Why a download attempt stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// The token expired or was refused (401/403): ask for a new link.
    Expired(String),
    /// Network trouble: try again later from the bytes on disk.
    Transient(String),
    /// The server is busy (429, 503: it serves as many downloads as it may): wait and try
    /// again; this does not count toward giving up.
    Busy(String),
    /// 416: the bytes on disk are not a prefix of the artifact; start over.
    RangeNotSatisfiable,
    /// Not retryable (404, a link refused, ...).
    Fatal(String),
}

/// A download in progress.
#[async_trait::async_trait]
pub trait Body: Send {
    /// The artifact's full size as the server says it (`Content-Range` total or `Content-Length`).
    fn total(&self) -> Option<u64>;
    /// The next chunk; `None` at the end.
    async fn chunk(&mut self) -> Result<Option<Vec<u8>>, FetchError>;
}

/// Everything the updater needs from the outside world.
#[async_trait::async_trait]
pub trait Env: Send {
    /// `Err("<reason code>: <text>")` when an update must wait (battery, busy, window).
    async fn preconditions(&mut self) -> Result<(), String>;
    /// `GET link.url` from byte `offset`.
    async fn open(&mut self, link: &Link, offset: u64) -> Result<Box<dyn Body>, FetchError>;
    /// A fresh link for an expired one (over MQTT: `LinkRequest`).
    async fn refresh_link(
        &mut self,
        deployment_id: &str,
        artifact_id: &str,
    ) -> Result<Link, FetchError>;
    /// The checks of a trial boot; `Err(text)` when one fails.
    async fn health_check(&mut self) -> Result<(), String>;
    /// Unix ms now.
    fn now_ms(&self) -> u64;
    /// A random number in `0..n` (retry jitter; `0` when `n` is 0).
    fn random_below(&mut self, n: u64) -> u64;
    /// Queues a report durably; fills in `at` and `seq`.
    fn report(&mut self, report: StatusReport) -> std::io::Result<()>;
}

/// What the caller does after [`Updater::drive`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing to do until another command.
    Idle,
    /// Call `drive` again after this long (deferred, or a download to retry).
    RetryAfterMs(u64),
    /// Reboot the device now (the reports are queued).
    Reboot,
}

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("update storage: {0}")]
    Io(#[from] std::io::Error),
    #[error("slots: {0}")]
    Slots(#[from] SlotError),
}

/// The device's update policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateSettings {
    /// The fleet's Ed25519 update public key (pinned).
    pub public_key: [u8; 32],
    pub hw_revision: String,
    /// Take older versions from any update (otherwise only from one sent with `allow_downgrade`).
    pub allow_downgrade: bool,
}

/// The updater: owns the slots and the journal (module doc).
pub struct Updater {
    settings: UpdateSettings,
    slots: Box<dyn Slots>,
    files: Box<dyn UpdateFiles>,
    job: Option<Job>,
    booted: BootOutcome,
    /// Download attempts in a row without progress, and the next wait.
    stalled: u32,
    retry_ms: u64,
    last_pct: Option<u8>,
}

impl std::fmt::Debug for Updater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Updater")
            .field("job", &self.job)
            .field("booted", &self.booted)
            .finish_non_exhaustive()
    }
}

fn why(code: &str, text: impl std::fmt::Display) -> String {
    let mut s = format!("{code}: {text}");
    if s.len() > ota::REASON_LEN_MAX {
        let mut cut = ota::REASON_LEN_MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Checks the signature with the pinned key, then parses the manifest.
pub fn verify_manifest(
    public_key: &[u8; 32],
    signed: &ota::SignedManifest,
) -> Result<Manifest, String> {
    let sig = hex::decode(&signed.signature)
        .ok()
        .filter(|s| s.len() == 64)
        .ok_or_else(|| {
            why(
                reason::BAD_SIGNATURE,
                "the signature is not 64 bytes of hex",
            )
        })?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
        .verify(signed.manifest.as_bytes(), &sig)
        .map_err(|_| {
            why(
                reason::BAD_SIGNATURE,
                "the manifest is not signed by this fleet's update key",
            )
        })?;
    Manifest::parse(signed.manifest.as_bytes())
        .map_err(|e| why(reason::BAD_SIGNATURE, format!("signed, but {e}")))
}

fn sha256_hex(
    read: impl FnOnce(&mut dyn FnMut(&[u8])) -> Result<(), UpdateError>,
) -> Result<(String, u64), UpdateError> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut n = 0u64;
    read(&mut |c: &[u8]| {
        n += c.len() as u64;
        ctx.update(c);
    })?;
    Ok((hex::encode(ctx.finish().as_ref()), n))
}

impl Updater {
    /// What the device does at power-on: the bootloader step ([`Slots::boot`]), then the
    /// journal is read back. Call [`Updater::drive`] next.
    pub fn start(
        settings: UpdateSettings,
        mut slots: Box<dyn Slots>,
        files: Box<dyn UpdateFiles>,
    ) -> Result<Self, UpdateError> {
        let booted = slots.boot()?;
        let job = files.load_journal()?;
        if let BootOutcome::Reverted { abandoned, .. } = booted {
            tracing::warn!(
                slot = abandoned.as_str(),
                "the trial boot never committed; back on the previous slot"
            );
        }
        Ok(Self {
            settings,
            slots,
            files,
            job,
            booted,
            stalled: 0,
            retry_ms: DOWNLOAD_RETRY_BASE_MS,
            last_pct: None,
        })
    }

    pub fn booted(&self) -> BootOutcome {
        self.booted
    }

    /// The version of the slot running now.
    pub fn running_version(&self) -> Option<String> {
        let c = self.slots.control();
        c.info(c.running()).version.clone()
    }

    /// The slots as reported in the shadow ([`super::BootControl::to_reported`]).
    pub fn reported(&self) -> Value {
        self.slots.control().to_reported()
    }

    pub fn job(&self) -> Option<&Job> {
        self.job.as_ref()
    }

    pub fn slots(&self) -> &dyn Slots {
        &*self.slots
    }

    fn report_for(&self, job: &Job, state: UpdateState, reason: Option<String>) -> StatusReport {
        StatusReport {
            v: ota::SCHEMA_VERSION,
            deployment_id: job.deployment_id.clone(),
            artifact_id: job.artifact_id.clone(),
            version: job.version.clone(),
            state,
            progress_pct: None,
            reason,
            running_version: self.running_version(),
            at: 0,
            seq: 0,
        }
    }

    /// Journals `phase`, then reports it.
    fn transition(&mut self, env: &mut dyn Env, phase: Phase) -> Result<(), UpdateError> {
        let Some(mut job) = self.job.clone() else {
            return Ok(());
        };
        job.phase = phase;
        self.files.store_journal(&job)?;
        tracing::info!(deployment = %job.deployment_id, version = %job.version, phase = ?job.phase, "update");
        let state = job.phase.state();
        let reason = job.phase.reason().map(str::to_owned);
        let repeat = self.job.as_ref().is_some_and(|prev| {
            prev.phase.state() == state && prev.phase.reason() == reason.as_deref()
        }) && !job.phase.is_done();
        self.job = Some(job.clone());
        if state != UpdateState::Pending && !repeat {
            env.report(self.report_for(&job, state, reason))?;
        }
        if job.phase.is_done() {
            let mut job = job;
            job.final_reported = true;
            self.files.store_journal(&job)?;
            self.job = Some(job);
        }
        Ok(())
    }

    fn finish(
        &mut self,
        env: &mut dyn Env,
        state: UpdateState,
        reason: Option<String>,
    ) -> Result<(), UpdateError> {
        self.transition(env, Phase::Done { state, reason })?;
        Ok(self.files.clear_partial()?)
    }

    /// Refuses an update the device will not take: reported as failed for its deployment.
    fn refuse(
        &mut self,
        env: &mut dyn Env,
        params: &UpdateParams,
        manifest: Option<&Manifest>,
        text: String,
    ) -> Result<Value, Value> {
        tracing::warn!(deployment = %params.deployment_id, reason = %text, "update refused");
        // Names the artifact in the report even when its signature did not verify (identification
        // only; nothing of an unverified manifest is acted on).
        let unverified;
        let manifest = match manifest {
            Some(m) => Some(m),
            None => {
                unverified = Manifest::parse(params.signed.manifest.as_bytes()).ok();
                unverified.as_ref()
            }
        };
        let report = StatusReport {
            v: ota::SCHEMA_VERSION,
            deployment_id: params.deployment_id.clone(),
            artifact_id: manifest.map(|m| m.artifact_id.clone()).unwrap_or_default(),
            version: manifest.map(|m| m.version.clone()).unwrap_or_default(),
            state: UpdateState::Failed,
            progress_pct: None,
            reason: Some(text.clone()),
            running_version: self.running_version(),
            at: 0,
            seq: 0,
        };
        if let Err(e) = env.report(report) {
            return Err(json!({"reason": format!("{text} (and the report failed: {e})")}));
        }
        Err(json!({ "reason": text }))
    }

    /// The `mooring.update` command: checks what can be checked now (signature, hardware,
    /// downgrade, size), journals the job and answers at once. A redelivered command of the
    /// same deployment is answered with where it is; another one while an update runs is
    /// refused (`another_update_in_progress`).
    pub fn accept(&mut self, env: &mut dyn Env, params: UpdateParams) -> Result<Value, Value> {
        if let Some(job) = &self.job {
            if job.deployment_id == params.deployment_id {
                return Ok(json!({"accepted": true, "state": job.phase.state().as_str()}));
            }
            if !job.phase.is_done() {
                let text = why(
                    reason::ANOTHER_UPDATE,
                    format!(
                        "deployment {} is {}",
                        job.deployment_id,
                        job.phase.state().as_str()
                    ),
                );
                return self.refuse(env, &params, None, text);
            }
        }
        let manifest = match verify_manifest(&self.settings.public_key, &params.signed) {
            Ok(m) => m,
            Err(text) => return self.refuse(env, &params, None, text),
        };
        if !manifest.runs_on(&self.settings.hw_revision) {
            let text = why(
                reason::INCOMPATIBLE_HARDWARE,
                format!(
                    "this device is {}; the artifact runs on {}",
                    self.settings.hw_revision,
                    manifest.compatible.join(", ")
                ),
            );
            return self.refuse(env, &params, Some(&manifest), text);
        }
        let running = self.running_version();
        if let Some(running) = &running {
            if compare_versions(&manifest.version, running) == std::cmp::Ordering::Less
                && !(params.allow_downgrade || self.settings.allow_downgrade)
            {
                let text = why(
                    reason::DOWNGRADE_REFUSED,
                    format!("{} is older than the running {running}", manifest.version),
                );
                return self.refuse(env, &params, Some(&manifest), text);
            }
        }
        if manifest.size > IMAGE_BYTES_MAX {
            let text = why(
                reason::SIZE_MISMATCH,
                format!("{} bytes is more than {IMAGE_BYTES_MAX}", manifest.size),
            );
            return self.refuse(env, &params, Some(&manifest), text);
        }
        let job = Job {
            deployment_id: params.deployment_id.clone(),
            artifact_id: manifest.artifact_id.clone(),
            version: manifest.version.clone(),
            sha256: manifest.sha256.clone(),
            size: manifest.size,
            link: params.link,
            from_version: running,
            phase: Phase::Waiting { deferred: None },
            hash_failures: 0,
            final_reported: false,
        };
        let stored = self
            .files
            .clear_partial()
            .and_then(|()| self.files.store_journal(&job));
        if let Err(e) = stored {
            return Err(json!({"reason": why(reason::WRITE_FAILED, format!("journal: {e}"))}));
        }
        self.job = Some(job);
        self.stalled = 0;
        self.retry_ms = DOWNLOAD_RETRY_BASE_MS;
        self.last_pct = None;
        Ok(json!({"accepted": true, "state": "pending"}))
    }

    /// The `mooring.update.cancel` command: stops an update that has not started installing.
    pub fn cancel(&mut self, env: &mut dyn Env, params: &CancelParams) -> Result<Value, Value> {
        let Some(job) = self
            .job
            .clone()
            .filter(|j| j.deployment_id == params.deployment_id)
        else {
            return Err(
                json!({"reason": format!("no update of deployment {} on this device", params.deployment_id)}),
            );
        };
        if job.phase.is_done() {
            return Ok(json!({"state": job.phase.state().as_str()}));
        }
        if !job.phase.cancellable() {
            return Err(
                json!({"reason": format!("the update is {}; it can no longer be canceled", job.phase.state().as_str())}),
            );
        }
        self.finish(
            env,
            UpdateState::Failed,
            Some(why(reason::CANCELED, "canceled by the server")),
        )
        .map_err(|e| json!({"reason": format!("{e}")}))?;
        Ok(json!({"state": "failed", "reason": reason::CANCELED}))
    }

    /// Moves the update forward until it has to wait, reboot, or is over (module doc).
    /// `Err` is a storage failure (the journal or a slot could not be written).
    pub async fn drive(&mut self, env: &mut dyn Env) -> Result<Next, UpdateError> {
        loop {
            let Some(job) = self.job.clone() else {
                return Ok(Next::Idle);
            };
            match job.phase.clone() {
                Phase::Done { state, reason } => {
                    if !job.final_reported {
                        // The final state was journaled but maybe not queued: queue it (again).
                        self.transition(env, Phase::Done { state, reason })?;
                    }
                    return Ok(Next::Idle);
                }
                Phase::Waiting { deferred } => match env.preconditions().await {
                    Ok(()) => self.transition(env, Phase::Downloading)?,
                    Err(text) => {
                        if deferred.as_deref() != Some(text.as_str()) {
                            self.transition(
                                env,
                                Phase::Waiting {
                                    deferred: Some(text),
                                },
                            )?;
                        }
                        return Ok(Next::RetryAfterMs(DEFERRED_RETRY_MS));
                    }
                },
                Phase::Downloading => {
                    if let Some(next) = self.download(env, &job).await? {
                        return Ok(next);
                    }
                }
                Phase::Verifying => self.verify_download(env, &job)?,
                Phase::Installing => self.install(env, &job)?,
                Phase::Installed { deferred } => match env.preconditions().await {
                    Ok(()) => {
                        let control = self.slots.control();
                        let Some(slot) = control.inactive() else {
                            // A trial armed by someone else: nothing safe to do.
                            self.finish(
                                env,
                                UpdateState::Failed,
                                Some(why(reason::WRITE_FAILED, "a trial is already armed")),
                            )?;
                            continue;
                        };
                        self.transition(env, Phase::Rebooting { slot })?;
                        self.slots.arm_trial()?;
                        return Ok(Next::Reboot);
                    }
                    Err(text) => {
                        if deferred.as_deref() != Some(text.as_str()) {
                            self.transition(
                                env,
                                Phase::Installed {
                                    deferred: Some(text),
                                },
                            )?;
                        }
                        return Ok(Next::RetryAfterMs(DEFERRED_RETRY_MS));
                    }
                },
                Phase::Rebooting { slot } => {
                    let c = self.slots.control();
                    if c.trial == Some(slot) && c.trial_boots >= 1 {
                        self.transition(env, Phase::HealthChecking { slot })?;
                    } else if c.trial == Some(slot) {
                        // Armed, not booted yet (the reboot did not happen): reboot.
                        return Ok(Next::Reboot);
                    } else if c.committed == slot
                        && c.info(slot).version.as_deref() == Some(&job.version)
                    {
                        self.finish(env, UpdateState::Committed, None)?;
                    } else if c.reverted == Some(slot) {
                        self.finish(
                            env,
                            UpdateState::RolledBack,
                            Some(why(
                                reason::TRIAL_BOOT_FAILED,
                                "the trial boot never committed; back on the previous version",
                            )),
                        )?;
                    } else {
                        // The journal said rebooting but the trial was never armed.
                        self.slots.arm_trial()?;
                        return Ok(Next::Reboot);
                    }
                }
                Phase::HealthChecking { slot } => {
                    let c = self.slots.control();
                    if c.trial == Some(slot) && c.trial_boots >= 1 {
                        match env.health_check().await {
                            Ok(()) => {
                                self.slots.commit()?;
                                self.finish(env, UpdateState::Committed, None)?;
                            }
                            Err(text) => {
                                self.transition(
                                    env,
                                    Phase::RollingBack {
                                        reason: why(reason::HEALTH_CHECK_FAILED, text),
                                    },
                                )?;
                            }
                        }
                    } else if c.committed == slot
                        && c.info(slot).version.as_deref() == Some(&job.version)
                    {
                        self.finish(env, UpdateState::Committed, None)?;
                    } else {
                        self.finish(env, UpdateState::RolledBack, Some(why(reason::TRIAL_BOOT_FAILED, "the trial was interrupted before it committed; back on the previous version")))?;
                    }
                }
                Phase::RollingBack { reason } => {
                    if self.slots.control().trial.is_some() {
                        self.slots.revert()?;
                        return Ok(Next::Reboot);
                    }
                    self.finish(env, UpdateState::RolledBack, Some(reason))?;
                }
            }
        }
    }

    /// The next wait: the retry interval doubles up to [`DOWNLOAD_RETRY_CAP_MS`], and the wait
    /// is drawn between half of it and all of it ("equal jitter"). Without the jitter every
    /// device a busy server turned away comes back at the same instant, and all but a few are
    /// turned away again (the simulator showed a fleet-wide deployment using a sixth of the
    /// server's download capacity that way).
    fn backoff(&mut self, env: &mut dyn Env) -> Next {
        let interval = self.retry_ms;
        self.retry_ms = (self.retry_ms * 2).min(DOWNLOAD_RETRY_CAP_MS);
        let half = interval / 2;
        Next::RetryAfterMs(half + env.random_below(interval - half + 1))
    }

    /// One download attempt: `Some(next)` to wait (or the update ended), `None` when complete.
    async fn download(
        &mut self,
        env: &mut dyn Env,
        job: &Job,
    ) -> Result<Option<Next>, UpdateError> {
        let mut offset = self.files.partial_len()?;
        if offset > job.size {
            self.files.clear_partial()?;
            offset = 0;
        }
        if offset == job.size {
            self.transition(env, Phase::Verifying)?;
            return Ok(None);
        }
        if self.stalled >= DOWNLOAD_ATTEMPTS_MAX {
            self.finish(
                env,
                UpdateState::Failed,
                Some(why(
                    reason::DOWNLOAD_FAILED,
                    format!("no progress in {DOWNLOAD_ATTEMPTS_MAX} attempts"),
                )),
            )?;
            return Ok(Some(Next::Idle));
        }
        self.stalled += 1;
        let mut link = job.link.clone();
        if link.expires_at <= env.now_ms() {
            match self.refresh(env, job).await? {
                Ok(l) => link = l,
                Err(next) => return Ok(Some(next)),
            }
        }
        let mut body = match env.open(&link, offset).await {
            Ok(b) => b,
            Err(FetchError::Expired(_)) => {
                return Ok(Some(match self.refresh(env, job).await? {
                    Ok(_) => Next::RetryAfterMs(0),
                    Err(next) => next,
                }));
            }
            Err(e) => return self.fetch_failed(env, e).map(Some),
        };
        if let Some(total) = body.total() {
            if total != job.size {
                self.finish(
                    env,
                    UpdateState::Failed,
                    Some(why(
                        reason::SIZE_MISMATCH,
                        format!(
                            "the server has {total} bytes; the manifest says {}",
                            job.size
                        ),
                    )),
                )?;
                return Ok(Some(Next::Idle));
            }
        }
        loop {
            match body.chunk().await {
                Ok(Some(data)) => {
                    if offset + data.len() as u64 > job.size {
                        self.finish(
                            env,
                            UpdateState::Failed,
                            Some(why(
                                reason::SIZE_MISMATCH,
                                format!(
                                    "the download is longer than the manifest's {} bytes",
                                    job.size
                                ),
                            )),
                        )?;
                        return Ok(Some(Next::Idle));
                    }
                    self.files.append_partial(&data)?;
                    offset += data.len() as u64;
                    self.stalled = 0;
                    self.retry_ms = DOWNLOAD_RETRY_BASE_MS;
                    let pct = (offset.saturating_mul(100) / job.size.max(1)).min(100) as u8;
                    let step = pct / 10 * 10;
                    if self.last_pct.is_none_or(|p| step > p) {
                        self.last_pct = Some(step);
                        let mut r = self.report_for(job, UpdateState::Downloading, None);
                        r.progress_pct = Some(step);
                        env.report(r)?;
                    }
                }
                Ok(None) if offset == job.size => {
                    self.transition(env, Phase::Verifying)?;
                    return Ok(None);
                }
                Ok(None) => {
                    return self
                        .fetch_failed(
                            env,
                            FetchError::Transient(format!(
                                "the download ended at byte {offset} of {}",
                                job.size
                            )),
                        )
                        .map(Some);
                }
                Err(e) => return self.fetch_failed(env, e).map(Some),
            }
        }
    }

    fn fetch_failed(&mut self, env: &mut dyn Env, e: FetchError) -> Result<Next, UpdateError> {
        match e {
            FetchError::Transient(text) => {
                tracing::info!(error = %text, "download interrupted; resuming later");
                Ok(self.backoff(env))
            }
            FetchError::Busy(text) => {
                // A fleet-wide deployment meets the server's download bound: waiting is
                // expected, not a failure.
                self.stalled = self.stalled.saturating_sub(1);
                tracing::info!(error = %text, "the server is busy; downloading later");
                Ok(self.backoff(env))
            }
            FetchError::RangeNotSatisfiable => {
                self.files.clear_partial()?;
                Ok(self.backoff(env))
            }
            FetchError::Expired(text) | FetchError::Fatal(text) => {
                self.finish(
                    env,
                    UpdateState::Failed,
                    Some(why(reason::DOWNLOAD_FAILED, text)),
                )?;
                Ok(Next::Idle)
            }
        }
    }

    /// A new link, journaled; `Err(next)` when none came.
    async fn refresh(
        &mut self,
        env: &mut dyn Env,
        job: &Job,
    ) -> Result<Result<Link, Next>, UpdateError> {
        match env.refresh_link(&job.deployment_id, &job.artifact_id).await {
            Ok(link) => {
                let mut j = job.clone();
                j.link = link.clone();
                self.files.store_journal(&j)?;
                self.job = Some(j);
                Ok(Ok(link))
            }
            Err(FetchError::Fatal(text)) => {
                self.finish(
                    env,
                    UpdateState::Failed,
                    Some(why(
                        reason::DOWNLOAD_FAILED,
                        format!("no new download link: {text}"),
                    )),
                )?;
                Ok(Err(Next::Idle))
            }
            Err(_) => Ok(Err(self.backoff(env))),
        }
    }

    fn verify_download(&mut self, env: &mut dyn Env, job: &Job) -> Result<(), UpdateError> {
        let files = &self.files;
        let (hash, size) = sha256_hex(|sink| {
            let mut r = files.open_partial()?;
            let mut buf = vec![0u8; super::slots::COPY_CHUNK_BYTES];
            loop {
                let n = std::io::Read::read(&mut r, &mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                sink(&buf[..n]);
            }
        })?;
        if size != job.size {
            return self.finish(
                env,
                UpdateState::Failed,
                Some(why(
                    reason::SIZE_MISMATCH,
                    format!("{size} bytes downloaded; the manifest says {}", job.size),
                )),
            );
        }
        if hash != job.sha256 {
            if job.hash_failures < HASH_RETRIES_MAX {
                tracing::warn!("the download does not match its SHA-256; downloading it again");
                let mut j = job.clone();
                j.hash_failures += 1;
                self.job = Some(j);
                self.last_pct = None;
                self.transition(env, Phase::Downloading)?;
                return Ok(self.files.clear_partial()?);
            }
            return self.finish(
                env,
                UpdateState::Failed,
                Some(why(
                    reason::HASH_MISMATCH,
                    format!("SHA-256 {hash}, the manifest says {}", job.sha256),
                )),
            );
        }
        self.transition(env, Phase::Installing)
    }

    fn install(&mut self, env: &mut dyn Env, job: &Job) -> Result<(), UpdateError> {
        let mut src = self.files.open_partial()?;
        let slot = match self.slots.write_inactive(&job.version, &mut src) {
            Ok(slot) => slot,
            Err(SlotError::Refused(text)) => {
                return self.finish(
                    env,
                    UpdateState::Failed,
                    Some(why(reason::WRITE_FAILED, text)),
                );
            }
            Err(e) => return Err(e.into()),
        };
        let slots = &self.slots;
        let (hash, size) = sha256_hex(|sink| Ok(slots.read(slot, sink)?))?;
        if hash != job.sha256 || size != job.size {
            return self.finish(
                env,
                UpdateState::Failed,
                Some(why(
                    reason::WRITE_FAILED,
                    format!("slot {} does not read back as written", slot.as_str()),
                )),
            );
        }
        self.transition(env, Phase::Installed { deferred: None })?;
        Ok(self.files.clear_partial()?)
    }
}
