//! Over-the-air updates (issue 17), server side: artifacts (chunked, resumable uploads checked
//! for size and SHA-256, manifests signed with the fleet's Ed25519 update key or by the user
//! offline), download links whose tokens any node verifies without a database read, and
//! deployments (one `mooring.update` command per matching device, each device's state from its
//! status reports, link refresh, cancel).
//!
//! * The update key: `<data>/update.key` (64 hex digits of the Ed25519 seed, 0600) on the
//!   embedded server; sealed under the cluster key in `cluster_values` (`ota.update_key.v1`) in
//!   a cluster, created once by whichever node starts first. With `[ota] update_public_key` the
//!   private key stays offline and the server only verifies.
//! * Download tokens: `<expires_ms>.<artifact>.<device>.<hex HMAC-SHA256>` under a secret
//!   (`<data>/ota.secret`, or derived from the cluster key), scoped to one device and one
//!   artifact, valid until `expires_ms`.
//! * The bytes live behind [`ArtifactBlobs`]: files in `<data>/artifacts/` (embedded) or the
//!   store's chunk table (a cluster: any node serves any artifact).

use crate::access::Access;
use crate::app::Core;
use crate::commands::Commands;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::registry::Registry;
use mooring_proto::ota::{self, Link, Manifest};
use mooring_store::{ArtifactBlobs, ArtifactCreate, ArtifactDelete, ArtifactRecord, ArtifactState};
use sha2::Digest;
use std::sync::Arc;

mod deploy;
mod keys;

pub(crate) use deploy::update_command_ended;
pub use deploy::{
    artifacts_unscoped, deployment_visible, DeploymentView, PendingSends, DEPLOYMENT_DEVICES_MAX,
    DEPLOYMENT_LIST_LEN_MAX, DEVICE_HISTORY_LEN_MAX,
};
pub(crate) use keys::load_or_create_secret_file;
pub use keys::{
    generate_key, key_from_seed_hex, parse_public_key, sha256_file, sign_manifest, verify_manifest,
    OtaKeys, UpdateKey,
};

/// Largest `[ota] artifact_size_bytes_max` allowed (64 GiB).
pub const ARTIFACT_SIZE_BYTES_LIMIT: u64 = 64 * 1024 * 1024 * 1024;
/// Largest `[ota] artifacts_max` allowed.
pub const ARTIFACTS_LIMIT: u32 = 100_000;
/// Largest `[ota] deployments_max` allowed.
pub const DEPLOYMENTS_LIMIT: u32 = 100_000;
/// Largest chunk one `PUT .../content` takes.
pub const CHUNK_SIZE_BYTES_MAX: usize = 8 * 1024 * 1024;
/// What a download reads from the blobs at a time.
pub const READ_PIECE_BYTES: usize = 1024 * 1024;
/// What a download hands the connection at a time: a client must take this much within
/// `[ota] download_idle_timeout_ms`, or the download ends.
pub const DOWNLOAD_FRAME_BYTES: usize = 64 * 1024;
/// Longest release notes.
pub const NOTES_LEN_MAX: usize = 4096;
/// Most artifacts one list page holds.
pub const ARTIFACT_PAGE_LEN_MAX: usize = 1000;
/// Where the cluster keeps its sealed update key.
const SHARED_UPDATE_KEY: &str = "ota.update_key.v1";
/// File names in the data dir.
pub const UPDATE_KEY_FILE: &str = "update.key";
pub const TOKEN_SECRET_FILE: &str = "ota.secret";
pub const ARTIFACTS_DIR: &str = "artifacts";

/// What `POST /api/v1/ota/artifacts` asks for.
pub struct NewArtifact {
    pub version: String,
    pub compatible: Vec<String>,
    pub notes: Option<String>,
    pub sha256: String,
    pub size: u64,
}

/// What a download token reads as in a command shown to an API or CLI caller.
pub const REDACTED_TOKEN: &str = "redacted";

/// A command's parameters as API and CLI callers see them: a `mooring.update`'s download token
/// (`params.link.token`, a bearer credential that downloads the artifact as the device) reads
/// [`REDACTED_TOKEN`]. Only the device gets the real one (over MQTT); anything else passes as is.
pub fn redacted_params(name: &str, mut params: serde_json::Value) -> serde_json::Value {
    if name == ota::UPDATE_COMMAND {
        if let Some(token) = params
            .get_mut("link")
            .and_then(|link| link.get_mut("token"))
        {
            *token = serde_json::Value::String(REDACTED_TOKEN.to_owned());
        }
    }
    params
}

/// The OTA service's background tasks (a download's feeder, a deployment's sends): owned
/// here, each holding an [`Ota`] handle (never the app), aborted at shutdown
/// ([`OtaTasks::stop`]). Finished ones are reaped at each spawn, so the set holds at most the
/// downloads and sends in progress.
#[derive(Default)]
pub struct OtaTasks(std::sync::Mutex<tokio::task::JoinSet<()>>);

impl OtaTasks {
    pub fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut set = mooring_proto::sync::lock(&self.0);
        while set.try_join_next().is_some() {}
        set.spawn(task);
    }

    /// Aborts every task (a kill: nothing waits).
    pub fn abort_all(&self) {
        mooring_proto::sync::lock(&self.0).abort_all();
    }

    /// Aborts every task and waits until they are gone (a graceful shutdown: downloads end
    /// short, a deployment's remaining sends are resumed by the next start's sweep).
    pub async fn stop(&self) {
        let mut set = std::mem::take(&mut *mooring_proto::sync::lock(&self.0));
        set.abort_all();
        while set.join_next().await.is_some() {}
    }
}

/// Why a download token is refused.
fn token_refused(code: &'static str, message: &str) -> ServiceError {
    ServiceError::new(ErrorKind::Unauthorized, code, message)
}

/// Artifacts and their downloads.
#[derive(Clone)]
pub struct Ota {
    core: Arc<Core>,
    registry: Arc<Registry>,
    commands: Arc<Commands>,
    blobs: Arc<dyn ArtifactBlobs>,
    keys: Arc<OtaKeys>,
    /// Downloads served at once by this node (`[ota] downloads_max`).
    downloads: Arc<tokio::sync::Semaphore>,
    /// Downloads in progress per device (`[ota] downloads_per_device_max`); an entry goes with
    /// its last download.
    device_downloads: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    /// Deployments whose updates this node is sending now.
    sending: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Each device's status reports and link requests of the current minute
    /// (`[ota] reports_per_minute_max`).
    reports: Arc<crate::ratelimit::PerMinute>,
}

/// Most devices whose OTA messages of the current minute are counted at once: past it, a device
/// new this minute is limited until a minute of the others is over.
pub const OTA_REPORTERS_MAX: usize = 200_000;

/// A download in progress: holds its place in the node's and the device's bounds until
/// dropped (with the response body).
pub struct DownloadSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    device: String,
    device_downloads: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl Drop for DownloadSlot {
    fn drop(&mut self) {
        let mut m = mooring_proto::sync::lock(&self.device_downloads);
        if let Some(n) = m.get_mut(&self.device) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.device);
            }
        }
    }
}

impl Ota {
    pub(crate) fn new(
        core: Arc<Core>,
        registry: Arc<Registry>,
        commands: Arc<Commands>,
        blobs: Arc<dyn ArtifactBlobs>,
        keys: OtaKeys,
    ) -> Self {
        // At most half the HTTP connections: the other half stays for the API.
        let downloads = Arc::new(tokio::sync::Semaphore::new(
            core.config
                .ota
                .downloads_max
                .min((core.config.http.connections_max / 2).max(1)),
        ));
        Self {
            core,
            registry,
            commands,
            blobs,
            keys: Arc::new(keys),
            downloads,
            device_downloads: Arc::default(),
            sending: Default::default(),
            reports: Arc::new(crate::ratelimit::PerMinute::new(OTA_REPORTERS_MAX)),
        }
    }

    /// Counts one status report or link request of `device`: `429 rate_limited` past
    /// `[ota] reports_per_minute_max` in the current minute (counted in
    /// `mooring_ota_reports_rate_limited_total`). Each costs store work, so a device that
    /// sends them in a loop is held to what a real update needs.
    fn count_report(&self, device: &str) -> ServiceResult<()> {
        let max = self.core.config.ota.reports_per_minute_max;
        match self.reports.count(device, self.core.now_ms(), max) {
            Ok(()) => Ok(()),
            Err(over) => {
                crate::metrics::Counters::inc(&self.core.counters.ota_reports_rate_limited);
                Err(ServiceError::new(
                    ErrorKind::TooManyRequests,
                    ota::LINK_RATE_LIMITED,
                    match over {
                        crate::ratelimit::Over::Key => format!(
                            "at most {max} OTA status reports and link requests per minute per device"
                        ),
                        crate::ratelimit::Over::Table => {
                            "too many devices reporting at once; try again in a minute".to_owned()
                        }
                    },
                ))
            }
        }
    }

    /// A place for one download by `device`: `429 too_many_downloads` if the device has
    /// `[ota] downloads_per_device_max` going, `503 too_many_downloads` if the node serves
    /// `downloads_max` (a device retries later, resuming with `Range`).
    pub fn download_slot(&self, device: &str) -> ServiceResult<DownloadSlot> {
        let mut m = mooring_proto::sync::lock(&self.device_downloads);
        let n = m.get(device).copied().unwrap_or(0);
        if n >= self.core.config.ota.downloads_per_device_max {
            return Err(ServiceError::new(
                ErrorKind::TooManyRequests,
                "too_many_downloads",
                format!("device {device} has {n} downloads going; finish one first"),
            ));
        }
        let permit = self.downloads.clone().try_acquire_owned().map_err(|_| {
            ServiceError::new(
                ErrorKind::Unavailable,
                "too_many_downloads",
                "this node serves as many downloads as it may; retry later (resume with Range)",
            )
        })?;
        m.insert(device.to_owned(), n + 1);
        Ok(DownloadSlot {
            _permit: permit,
            device: device.to_owned(),
            device_downloads: self.device_downloads.clone(),
        })
    }

    /// How often [`Ota::sweep`] runs (`[ota] sweep_interval_ms`).
    pub fn sweep_interval_ms(&self) -> u64 {
        self.core.config.ota.sweep_interval_ms
    }

    /// One pass of the sweeper (at start, then every [`Ota::sweep_interval_ms`]; once-only
    /// work, on the holder of the lease `ota.sweeper` in a cluster): sends what a crash left
    /// unsent, fails the updates whose command ended while the server could not say so, deletes
    /// abandoned uploads.
    pub async fn sweep(&self) {
        match self.resume_sends().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(updates = n, "resumed sending updates left unsent"),
            Err(e) => {
                tracing::warn!(error = %e.message, "resuming unsent updates failed; will retry")
            }
        }
        match self.fail_ended_updates().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(updates = n, "failed updates whose command had ended"),
            Err(e) => {
                tracing::warn!(error = %e.message, "failing updates of ended commands failed; will retry")
            }
        }
        match self.expire_uploads().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(artifacts = n, "abandoned uploads deleted"),
            Err(e) => {
                tracing::warn!(error = %e.message, "deleting abandoned uploads failed; will retry")
            }
        }
    }

    /// Deletes every artifact still `uploading` `[ota] upload_ttl_ms` after its creation, with
    /// its bytes; how many.
    pub async fn expire_uploads(&self) -> ServiceResult<usize> {
        let before = self
            .core
            .now_ms()
            .saturating_sub(self.core.config.ota.upload_ttl_ms);
        let mut n = 0;
        loop {
            let gone = self
                .core
                .store
                .expire_uploads(before, ARTIFACT_PAGE_LEN_MAX)
                .await?;
            for id in &gone {
                tracing::info!(artifact = %id, "abandoned upload deleted ([ota] upload_ttl_ms)");
                self.blobs.delete_blob(id).await?;
            }
            n += gone.len();
            if gone.len() < ARTIFACT_PAGE_LEN_MAX {
                return Ok(n);
            }
        }
    }

    /// The update key's public half, hex.
    pub fn public_key_hex(&self) -> String {
        hex::encode(self.keys.update.public_key())
    }

    /// Whether the server signs manifests itself (else uploads carry signatures).
    pub fn signs(&self) -> bool {
        matches!(self.keys.update, UpdateKey::Server(_))
    }

    fn not_found(id: &str) -> ServiceError {
        ServiceError::not_found("artifact_not_found", format!("no artifact {id}"))
    }

    /// Creates an artifact (state uploading) with its manifest, ready for its bytes.
    pub async fn create_artifact(
        &self,
        created_by: &str,
        new: NewArtifact,
    ) -> ServiceResult<ArtifactRecord> {
        let max = self.core.config.ota.artifact_size_bytes_max;
        if new.size == 0 || new.size > max {
            return Err(ServiceError::invalid(
                "invalid_size",
                format!("size must be between 1 and {max} bytes ([ota] artifact_size_bytes_max)"),
            ));
        }
        if let Some(n) = &new.notes {
            if n.chars().count() > NOTES_LEN_MAX || n.contains('\0') {
                return Err(ServiceError::invalid(
                    "invalid_notes",
                    format!("notes must be at most {NOTES_LEN_MAX} characters"),
                ));
            }
        }
        let id = format!("art_{:016x}", rand::random::<u64>());
        let manifest = Manifest {
            v: ota::SCHEMA_VERSION,
            artifact_id: id.clone(),
            version: new.version,
            sha256: new.sha256,
            size: new.size,
            compatible: new.compatible,
            created_at: self.core.now_ms(),
        };
        manifest
            .check()
            .map_err(|m| ServiceError::invalid("invalid_artifact", m))?;
        let record = ArtifactRecord {
            id,
            version: manifest.version.clone(),
            sha256: manifest.sha256.clone(),
            size: manifest.size,
            compatible: manifest.compatible.clone(),
            notes: new.notes,
            manifest: manifest.to_bytes(),
            signature: None,
            state: ArtifactState::Uploading,
            stored_bytes: 0,
            created_at_ms: manifest.created_at,
            created_by: created_by.to_owned(),
        };
        let max_count = self.core.config.ota.artifacts_max;
        match self
            .core
            .store
            .create_artifact(record.clone(), max_count)
            .await?
        {
            ArtifactCreate::Created => Ok(record),
            ArtifactCreate::VersionTaken => Err(ServiceError::new(
                ErrorKind::AlreadyExists,
                "artifact_version_exists",
                format!(
                    "an artifact with version {} exists (versions are unique; delete it first)",
                    record.version
                ),
            )),
            ArtifactCreate::Full => Err(ServiceError::new(
                ErrorKind::Unavailable,
                "too_many_artifacts",
                format!("the server holds its maximum of {max_count} artifacts ([ota] artifacts_max); delete one first"),
            )),
        }
    }

    pub async fn get_artifact(&self, id: &str) -> ServiceResult<ArtifactRecord> {
        if !ota::is_valid_artifact_id(id) {
            return Err(Self::not_found(id));
        }
        self.core
            .store
            .get_artifact(id)
            .await?
            .ok_or_else(|| Self::not_found(id))
    }

    /// One page by id; the cursor is the last id of the previous page.
    pub async fn list_artifacts(
        &self,
        limit: usize,
        after_id: Option<&str>,
    ) -> ServiceResult<Vec<ArtifactRecord>> {
        Ok(self
            .core
            .store
            .list_artifacts(limit.clamp(1, ARTIFACT_PAGE_LEN_MAX), after_id)
            .await?)
    }

    /// Stores one chunk at `offset`, which must be where the upload is (`stored_bytes`).
    pub async fn put_content(
        &self,
        id: &str,
        offset: u64,
        data: Vec<u8>,
    ) -> ServiceResult<ArtifactRecord> {
        let a = self.get_artifact(id).await?;
        if a.state != ArtifactState::Uploading {
            return Err(ServiceError::new(
                ErrorKind::Conflict,
                "artifact_not_uploading",
                format!("artifact {id} is {} already", a.state.as_str()),
            ));
        }
        if offset != a.stored_bytes {
            return Err(ServiceError::new(
                ErrorKind::Conflict,
                "offset_mismatch",
                format!(
                    "the upload of {id} is at byte {}: send the chunk at offset={}",
                    a.stored_bytes, a.stored_bytes
                ),
            ));
        }
        if data.is_empty() {
            return Err(ServiceError::invalid("empty_chunk", "the chunk is empty"));
        }
        let end = offset.saturating_add(data.len() as u64);
        if end > a.size {
            return Err(ServiceError::invalid(
                "chunk_past_size",
                format!(
                    "the chunk ends at byte {end}, past the artifact's announced size {}",
                    a.size
                ),
            ));
        }
        self.blobs.write_blob(id, offset, data).await?;
        if !self.core.store.advance_artifact(id, offset, end).await? {
            if self.core.store.get_artifact(id).await?.is_none() {
                // Deleted meanwhile (an abandoned upload expired): its bytes go too.
                self.blobs.delete_blob(id).await?;
                return Err(Self::not_found(id));
            }
            return Err(ServiceError::new(
                ErrorKind::Conflict,
                "offset_mismatch",
                format!("another upload of {id} moved it on; GET it to see where it is"),
            ));
        }
        self.get_artifact(id).await
    }

    /// Checks what is stored (size, SHA-256) and the signature (or signs), then marks the
    /// artifact ready. A hash mismatch throws the stored bytes away (upload again).
    pub async fn complete(
        &self,
        id: &str,
        signature: Option<String>,
    ) -> ServiceResult<ArtifactRecord> {
        let a = self.get_artifact(id).await?;
        if a.state == ArtifactState::Ready {
            if signature.is_none() || signature == a.signature {
                return Ok(a);
            }
            return Err(ServiceError::new(
                ErrorKind::Conflict,
                "artifact_not_uploading",
                format!("artifact {id} is ready already, with another signature"),
            ));
        }
        if a.stored_bytes != a.size {
            return Err(ServiceError::new(
                ErrorKind::Conflict,
                "upload_incomplete",
                format!(
                    "{} of {} bytes of {id} are stored; send the rest first",
                    a.stored_bytes, a.size
                ),
            ));
        }
        let mut hasher = sha2::Sha256::new();
        let mut at = 0u64;
        while at < a.size {
            let piece = self.blobs.read_blob(id, at, READ_PIECE_BYTES).await?;
            if piece.is_empty() {
                break;
            }
            at += piece.len() as u64;
            hasher.update(&piece);
        }
        let got = hex::encode(hasher.finalize());
        if at != a.size || got != a.sha256 {
            // Start over: the stored bytes are not the announced file.
            self.blobs.delete_blob(id).await?;
            self.core.store.advance_artifact(id, a.size, 0).await?;
            return Err(ServiceError::invalid(
                "sha256_mismatch",
                format!(
                    "the stored bytes hash to {got}, not the announced {}; they were discarded, upload again",
                    a.sha256
                ),
            ));
        }
        let signature = match (&self.keys.update, signature) {
            (UpdateKey::Offline(_), None) => {
                return Err(ServiceError::invalid(
                    "signature_required",
                    "the update key is kept offline ([ota] update_public_key): sign the manifest (mooring ota upload --sign-key FILE) and send its signature",
                ))
            }
            (key, Some(sig)) => {
                if !verify_manifest(&key.public_key(), &a.manifest, &sig) {
                    return Err(ServiceError::invalid(
                        "bad_signature",
                        "the signature does not verify with the fleet's update key over the manifest bytes",
                    ));
                }
                sig.to_ascii_lowercase()
            }
            (UpdateKey::Server(pair), None) => sign_manifest(pair, &a.manifest),
        };
        if self.core.store.mark_artifact_ready(id, &signature).await? {
            crate::metrics::Counters::inc(&self.core.counters.ota_artifacts_ready);
        }
        self.get_artifact(id).await
    }

    /// Deletes an artifact no deployment uses, and its bytes.
    pub async fn delete_artifact(&self, id: &str) -> ServiceResult<()> {
        if !ota::is_valid_artifact_id(id) {
            return Err(Self::not_found(id));
        }
        match self.core.store.delete_artifact(id).await? {
            ArtifactDelete::Deleted => {
                self.blobs.delete_blob(id).await?;
                Ok(())
            }
            ArtifactDelete::NotFound => Err(Self::not_found(id)),
            ArtifactDelete::InUse => Err(ServiceError::new(
                ErrorKind::Conflict,
                "artifact_in_use",
                format!("a deployment uses artifact {id}; it cannot be deleted"),
            )),
        }
    }

    /// What a download token signs: its expiry, the artifact, and the device as registered
    /// (its id and registration time, so a device deleted and created again under the same id
    /// does not inherit the old one's links).
    fn token_message(
        expires_at: u64,
        registered_at_ms: u64,
        artifact: &str,
        device: &str,
    ) -> String {
        format!("mooring ota download v2\n{expires_at}\n{registered_at_ms}\n{artifact}\n{device}")
    }

    /// A download link for `device` (in `access`) to the ready artifact `id`, valid `ttl_ms`
    /// (default `[ota] download_token_ttl_ms`).
    pub async fn mint_link(
        &self,
        access: &Access,
        device: &str,
        id: &str,
        ttl_ms: Option<u64>,
    ) -> ServiceResult<Link> {
        let record = self.registry.get_device(access, device).await?.record;
        let (device, registered_at_ms) = (record.id, record.created_at_ms);
        let a = self.get_artifact(id).await?;
        if a.state != ArtifactState::Ready {
            return Err(ServiceError::new(
                ErrorKind::Conflict,
                "artifact_not_ready",
                format!("artifact {id} is still uploading"),
            ));
        }
        let max = self.core.config.ota.download_token_ttl_ms;
        let ttl = ttl_ms.unwrap_or(max);
        if ttl == 0 || ttl > max {
            return Err(ServiceError::invalid(
                "invalid_ttl",
                format!("ttl_ms must be between 1 and {max} ([ota] download_token_ttl_ms)"),
            ));
        }
        Ok(self.link_for(device.as_str(), registered_at_ms, id, ttl))
    }

    /// The link itself (no checks): what deployments hand devices.
    pub fn link_for(
        &self,
        device: &str,
        registered_at_ms: u64,
        artifact: &str,
        ttl_ms: u64,
    ) -> Link {
        let expires_at = self.core.now_ms().saturating_add(ttl_ms);
        let mac = ring::hmac::sign(
            &self.keys.token,
            Self::token_message(expires_at, registered_at_ms, artifact, device).as_bytes(),
        );
        Link {
            url: format!(
                "{}/api/v1/ota/artifacts/{artifact}/download",
                self.core.config.public_url()
            ),
            token: format!(
                "{expires_at}.{registered_at_ms}.{artifact}.{device}.{}",
                hex::encode(mac)
            ),
            expires_at,
        }
    }

    /// Checks a download token for artifact `id`: the device it was minted for, which must still
    /// be the same registration (a deleted device's links stop working at once, and a new
    /// device under the same id does not inherit them).
    pub async fn verify_token(&self, token: &str, id: &str) -> ServiceResult<String> {
        let bad = || token_refused("invalid_download_token", "the download token is not valid");
        let (body, mac) = token.rsplit_once('.').ok_or_else(bad)?;
        let mut parts = body.splitn(4, '.');
        let (Some(expires), Some(registered), Some(artifact), Some(device)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let expires_at: u64 = expires.parse().map_err(|_| bad())?;
        let registered_at_ms: u64 = registered.parse().map_err(|_| bad())?;
        let mac = hex::decode(mac).map_err(|_| bad())?;
        ring::hmac::verify(
            &self.keys.token,
            Self::token_message(expires_at, registered_at_ms, artifact, device).as_bytes(),
            &mac,
        )
        .map_err(|_| bad())?;
        if artifact != id {
            return Err(ServiceError::new(
                ErrorKind::Forbidden,
                "wrong_artifact",
                "the download token is for another artifact",
            ));
        }
        if self.core.now_ms() >= expires_at {
            return Err(token_refused(
                "download_token_expired",
                "the download token has expired; ask for a new link",
            ));
        }
        match self.registry.lookup(device).await? {
            Some(d) if d.created_at_ms == registered_at_ms => Ok(device.to_owned()),
            _ => Err(token_refused(
                "invalid_download_token",
                "the download token is for a device that no longer exists",
            )),
        }
    }

    /// The ready artifact a download serves.
    pub async fn downloadable(&self, id: &str) -> ServiceResult<ArtifactRecord> {
        let a = self.get_artifact(id).await?;
        if a.state != ArtifactState::Ready {
            return Err(Self::not_found(id));
        }
        Ok(a)
    }

    /// Up to `len` bytes of an artifact from `offset` (counted as sent).
    pub async fn read(&self, id: &str, offset: u64, len: usize) -> ServiceResult<Vec<u8>> {
        let piece = self.blobs.read_blob(id, offset, len).await?;
        self.core
            .counters
            .ota_download_bytes
            .fetch_add(piece.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(piece)
    }

    /// Counts a download ended because its client stopped reading.
    pub fn count_download_idle(&self) {
        crate::metrics::Counters::inc(&self.core.counters.ota_downloads_idle);
    }

    /// Counts a download ended because its client read slower than the floor.
    pub fn count_download_slow(&self) {
        crate::metrics::Counters::inc(&self.core.counters.ota_downloads_slow);
    }

    /// Counts a download served, or one refused for its token.
    pub fn count_download(&self, served: bool) {
        let c = &self.core.counters;
        crate::metrics::Counters::inc(if served {
            &c.ota_downloads
        } else {
            &c.ota_downloads_refused
        });
    }
}
