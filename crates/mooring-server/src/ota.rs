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
use crate::commands::{Commands, NewCommand};
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::registry::Registry;
use anyhow::Context;
use mooring_proto::ota::{
    self, CancelParams, Link, LinkRequest, Manifest, SignedManifest, StatusReport, UpdateParams,
    UpdateState,
};
use mooring_store::{
    ArtifactBlobs, ArtifactCreate, ArtifactDelete, ArtifactRecord, ArtifactState, DeploymentRecord,
    DeviceUpdateRecord, Store,
};
use ring::signature::{Ed25519KeyPair, KeyPair};
use sha2::Digest;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Largest `[ota] artifact_size_bytes_max` allowed (64 GiB).
pub const ARTIFACT_SIZE_BYTES_LIMIT: u64 = 64 * 1024 * 1024 * 1024;
/// Largest `[ota] artifacts_max` allowed.
pub const ARTIFACTS_LIMIT: u32 = 100_000;
/// Largest chunk one `PUT .../content` takes.
pub const CHUNK_SIZE_BYTES_MAX: usize = 8 * 1024 * 1024;
/// What a download reads from the blobs at a time.
pub const READ_PIECE_BYTES: usize = 1024 * 1024;
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

/// The fleet's update key as this server holds it.
pub enum UpdateKey {
    /// The server signs manifests.
    Server(Box<Ed25519KeyPair>),
    /// The private key is offline; the server verifies uploaded signatures only.
    Offline([u8; 32]),
}

impl UpdateKey {
    pub fn public_key(&self) -> [u8; 32] {
        match self {
            UpdateKey::Server(pair) => {
                let mut out = [0u8; 32];
                out.copy_from_slice(pair.public_key().as_ref());
                out
            }
            UpdateKey::Offline(pk) => *pk,
        }
    }
}

/// Parses 64 hex digits of an Ed25519 public key.
pub fn parse_public_key(text: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(text.trim()).map_err(|e| format!("not hex: {e}"))?;
    bytes
        .try_into()
        .map_err(|_| "an Ed25519 public key is 64 hex digits (32 bytes)".to_owned())
}

/// An Ed25519 key pair from 64 hex digits of its seed (the format of `update.key` and of
/// `mooring ota keygen`'s file).
pub fn key_from_seed_hex(text: &str) -> anyhow::Result<Ed25519KeyPair> {
    let seed = hex::decode(text.trim()).context("the key is not hex")?;
    anyhow::ensure!(
        seed.len() == 32,
        "the key must be 64 hex digits (an Ed25519 seed), not {} bytes",
        seed.len()
    );
    Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| anyhow::anyhow!("not an Ed25519 seed"))
}

/// A new key: (seed hex, public key hex).
pub fn generate_key() -> anyhow::Result<(String, String)> {
    let seed: [u8; 32] = rand::random();
    let pair = Ed25519KeyPair::from_seed_unchecked(&seed)
        .map_err(|_| anyhow::anyhow!("generating an Ed25519 key failed"))?;
    Ok((hex::encode(seed), hex::encode(pair.public_key().as_ref())))
}

/// Hex Ed25519 signature over `manifest` (what `--sign-key` and the server do).
pub fn sign_manifest(key: &Ed25519KeyPair, manifest: &[u8]) -> String {
    hex::encode(key.sign(manifest).as_ref())
}

/// Whether `signature_hex` is `public_key`'s signature over `manifest`.
pub fn verify_manifest(public_key: &[u8; 32], manifest: &[u8], signature_hex: &str) -> bool {
    let Ok(sig) = hex::decode(signature_hex) else {
        return false;
    };
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
        .verify(manifest, &sig)
        .is_ok()
}

/// Lowercase hex SHA-256 and size of a file (read in pieces).
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; READ_PIECE_BYTES];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// Reads a private file of 64 hex digits, refusing one others can read.
fn read_private_hex(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .permissions()
        .mode()
        & 0o777;
    anyhow::ensure!(
        mode & 0o077 == 0,
        "{} is readable by others (mode {mode:o}); chmod 600 it",
        path.display()
    );
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}

/// Reads `<dir>/<name>` (64 hex digits), creating it with fresh random bytes (0600) first if
/// it does not exist.
fn load_or_create_secret_file(dir: &Path, name: &str) -> anyhow::Result<String> {
    let path = dir.join(name);
    if !path.exists() {
        let seed: [u8; 32] = rand::random();
        crate::pki::write_private(&path, &format!("{}\n", hex::encode(seed)), false)?;
    }
    read_private_hex(&path)
}

/// The keys of OTA: the update key and the download-token key.
pub struct OtaKeys {
    pub update: UpdateKey,
    pub token: ring::hmac::Key,
}

impl OtaKeys {
    /// The embedded server's keys, in the data dir (created at first start).
    pub fn load_or_create_in_dir(config: &crate::ServerConfig) -> anyhow::Result<OtaKeys> {
        let dir = &config.data_dir;
        let update = match &config.ota.update_public_key {
            Some(pk) => UpdateKey::Offline(parse_public_key(pk).map_err(anyhow::Error::msg)?),
            None => {
                let seed = load_or_create_secret_file(dir, UPDATE_KEY_FILE)?;
                UpdateKey::Server(Box::new(
                    key_from_seed_hex(&seed)
                        .with_context(|| format!("{}", dir.join(UPDATE_KEY_FILE).display()))?,
                ))
            }
        };
        let secret = load_or_create_secret_file(dir, TOKEN_SECRET_FILE)?;
        let secret = hex::decode(secret).context("ota.secret is not hex")?;
        Ok(OtaKeys {
            update,
            token: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
        })
    }

    /// A cluster node's keys: the update key sealed in the store (one for the cluster, created
    /// by the first node), the token key derived from the cluster key.
    pub async fn load_or_create_shared(
        config: &crate::ServerConfig,
        store: &dyn Store,
        key: &crate::pki::SecretKey,
    ) -> anyhow::Result<OtaKeys> {
        let update = match &config.ota.update_public_key {
            Some(pk) => UpdateKey::Offline(parse_public_key(pk).map_err(anyhow::Error::msg)?),
            None => {
                let label = SHARED_UPDATE_KEY.as_bytes();
                let sealed = match store.get_value(SHARED_UPDATE_KEY).await? {
                    Some(v) => v,
                    None => {
                        let (seed, _) = generate_key()?;
                        let ours = key.seal(seed.as_bytes(), label)?.into_bytes();
                        store.put_value_once(SHARED_UPDATE_KEY, ours).await?
                    }
                };
                let sealed = String::from_utf8(sealed).context("the stored update key")?;
                let seed = key.open(&sealed, label)?;
                UpdateKey::Server(Box::new(key_from_seed_hex(&seed)?))
            }
        };
        Ok(OtaKeys {
            update,
            token: key.ota_token_key(),
        })
    }
}

/// What `POST /api/v1/ota/artifacts` asks for.
pub struct NewArtifact {
    pub version: String,
    pub compatible: Vec<String>,
    pub notes: Option<String>,
    pub sha256: String,
    pub size: u64,
}

/// Why a download token is refused.
fn token_refused(code: &'static str, message: &str) -> ServiceError {
    ServiceError::new(ErrorKind::Unauthorized, code, message)
}

/// Artifacts and their downloads.
pub struct Ota {
    core: Arc<Core>,
    registry: Arc<Registry>,
    commands: Arc<Commands>,
    blobs: Arc<dyn ArtifactBlobs>,
    keys: OtaKeys,
}

impl Ota {
    pub(crate) fn new(
        core: Arc<Core>,
        registry: Arc<Registry>,
        commands: Arc<Commands>,
        blobs: Arc<dyn ArtifactBlobs>,
        keys: OtaKeys,
    ) -> Self {
        Self {
            core,
            registry,
            commands,
            blobs,
            keys,
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
        self.core.store.mark_artifact_ready(id, &signature).await?;
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

    fn token_mac(&self, expires_at: u64, artifact: &str, device: &str) -> ring::hmac::Tag {
        ring::hmac::sign(
            &self.keys.token,
            format!("mooring ota download v1\n{expires_at}\n{artifact}\n{device}").as_bytes(),
        )
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
        let device = self.registry.get_device(access, device).await?.record.id;
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
        Ok(self.link_for(device.as_str(), id, ttl))
    }

    /// The link itself (no checks): what deployments hand devices.
    pub fn link_for(&self, device: &str, artifact: &str, ttl_ms: u64) -> Link {
        let expires_at = self.core.now_ms().saturating_add(ttl_ms);
        let mac = self.token_mac(expires_at, artifact, device);
        Link {
            url: format!(
                "{}/api/v1/ota/artifacts/{artifact}/download",
                self.core.config.public_url()
            ),
            token: format!("{expires_at}.{artifact}.{device}.{}", hex::encode(mac)),
            expires_at,
        }
    }

    /// Checks a download token for artifact `id`: the device it was minted for.
    pub fn verify_token(&self, token: &str, id: &str) -> ServiceResult<String> {
        let bad = || token_refused("invalid_download_token", "the download token is not valid");
        let (body, mac) = token.rsplit_once('.').ok_or_else(bad)?;
        let mut parts = body.splitn(3, '.');
        let (Some(expires), Some(artifact), Some(device)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let expires_at: u64 = expires.parse().map_err(|_| bad())?;
        let mac = hex::decode(mac).map_err(|_| bad())?;
        ring::hmac::verify(
            &self.keys.token,
            format!("mooring ota download v1\n{expires_at}\n{artifact}\n{device}").as_bytes(),
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
        Ok(device.to_owned())
    }

    /// The ready artifact a download serves.
    pub async fn downloadable(&self, id: &str) -> ServiceResult<ArtifactRecord> {
        let a = self.get_artifact(id).await?;
        if a.state != ArtifactState::Ready {
            return Err(Self::not_found(id));
        }
        Ok(a)
    }

    /// Up to `len` bytes of an artifact from `offset`.
    pub async fn read(&self, id: &str, offset: u64, len: usize) -> ServiceResult<Vec<u8>> {
        Ok(self.blobs.read_blob(id, offset, len).await?)
    }
}

/// Most devices one deployment reaches (the rollout engine, with waves, is the next issue).
pub const DEPLOYMENT_DEVICES_MAX: usize = 10_000;
/// Devices read per page when a deployment selects or cancels.
const DEPLOYMENT_PAGE_LEN: usize = 500;
/// Most entries of a device's OTA history.
pub const DEVICE_HISTORY_LEN_MAX: usize = 100;
/// Most deployments a listing shows.
pub const DEPLOYMENT_LIST_LEN_MAX: usize = 100;

/// A deployment and its devices' states.
#[derive(Debug, Clone)]
pub struct DeploymentView {
    pub deployment: DeploymentRecord,
    pub version: String,
    /// Devices per update state (`pending`, `downloading`, ..., `committed`).
    pub counts: BTreeMap<String, u64>,
    pub total: u64,
}

impl Ota {
    fn deployment_not_found(id: &str) -> ServiceError {
        ServiceError::not_found("deployment_not_found", format!("no deployment {id}"))
    }

    /// Sends `artifact_id` to every device `selector` matches (narrowed by the caller's
    /// scope): one `mooring.update` command each, tracked per device from its reports.
    pub async fn deploy(
        &self,
        access: &Access,
        created_by: &str,
        artifact_id: &str,
        selector: &str,
        allow_downgrade: bool,
    ) -> ServiceResult<DeploymentView> {
        let a = self.get_artifact(artifact_id).await?;
        if a.state != ArtifactState::Ready {
            return Err(ServiceError::new(
                ErrorKind::Conflict,
                "artifact_not_ready",
                format!("artifact {artifact_id} is still uploading"),
            ));
        }
        let given = crate::commands::parse_selector(selector)?;
        let sel = access.narrow(Some(given.clone())).unwrap_or(given);
        let mut devices = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let (page, next) = self
                .registry
                .select_devices(&sel, cursor.as_deref(), DEPLOYMENT_PAGE_LEN)
                .await?;
            devices.extend(page.into_iter().map(|d| d.record.id.to_string()));
            if devices.len() > DEPLOYMENT_DEVICES_MAX {
                return Err(ServiceError::invalid(
                    "too_many_devices",
                    format!("the selector matches more than {DEPLOYMENT_DEVICES_MAX} devices; narrow it"),
                ));
            }
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        if devices.is_empty() {
            return Err(ServiceError::invalid(
                "no_matching_devices",
                format!("no device matches {sel}"),
            ));
        }
        let now = self.core.now_ms();
        let d = DeploymentRecord {
            id: format!("dep_{:016x}", rand::random::<u64>()),
            artifact_id: a.id.clone(),
            selector: sel.to_string(),
            allow_downgrade,
            created_by: created_by.to_owned(),
            created_at_ms: now,
            canceled_at_ms: None,
        };
        let updates = devices
            .iter()
            .map(|device| DeviceUpdateRecord {
                deployment_id: d.id.clone(),
                device_id: device.clone(),
                artifact_id: a.id.clone(),
                version: a.version.clone(),
                command_id: None,
                state: UpdateState::Pending,
                reason: None,
                progress_pct: None,
                running_version: None,
                seq: None,
                updated_at_ms: now,
            })
            .collect();
        self.core
            .store
            .create_deployment(d.clone(), updates)
            .await?;
        // Stored first: a crash here leaves updates without a command, which `deploy` does not
        // resend (documented); each command is idempotent per deployment and device.
        for device in &devices {
            self.send_update(&d, &a, device).await?;
        }
        self.deployment(&d.id).await
    }

    async fn send_update(
        &self,
        d: &DeploymentRecord,
        a: &ArtifactRecord,
        device: &str,
    ) -> ServiceResult<()> {
        let params = UpdateParams {
            v: ota::SCHEMA_VERSION,
            deployment_id: d.id.clone(),
            signed: SignedManifest {
                manifest: String::from_utf8_lossy(&a.manifest).into_owned(),
                signature: a.signature.clone().unwrap_or_default(),
            },
            link: self.link_for(device, &a.id, self.core.config.ota.download_token_ttl_ms),
            allow_downgrade: d.allow_downgrade,
        };
        let (_, cmd) = self
            .commands
            .create_command(
                &Access::all(),
                device,
                NewCommand {
                    name: ota::UPDATE_COMMAND.to_owned(),
                    params: serde_json::to_value(&params).map_err(ServiceError::internal)?,
                    ttl_secs: Some(crate::commands::TTL_SECS_MAX),
                    max_attempts: None,
                    idempotency_key: Some(format!("ota:{}", d.id)),
                    result_timeout_secs: Some(0),
                },
                None,
            )
            .await?;
        self.core
            .store
            .set_update_command(&d.id, device, &cmd.id)
            .await?;
        Ok(())
    }

    /// A deployment with its counts per state.
    pub async fn deployment(&self, id: &str) -> ServiceResult<DeploymentView> {
        let d = self
            .core
            .store
            .get_deployment(id)
            .await?
            .ok_or_else(|| Self::deployment_not_found(id))?;
        let counts = self.core.store.count_updates(id).await?;
        let version = self
            .core
            .store
            .get_artifact(&d.artifact_id)
            .await?
            .map(|a| a.version)
            .unwrap_or_default();
        Ok(DeploymentView {
            total: counts.values().sum(),
            deployment: d,
            version,
            counts,
        })
    }

    /// The newest deployments.
    pub async fn list_deployments(&self) -> ServiceResult<Vec<DeploymentView>> {
        let list = self
            .core
            .store
            .list_deployments(DEPLOYMENT_LIST_LEN_MAX)
            .await?;
        let mut out = Vec::with_capacity(list.len());
        for d in list {
            out.push(self.deployment(&d.id).await?);
        }
        Ok(out)
    }

    /// Cancels a deployment: updates not yet picked up lose their command (and are `failed`,
    /// reason `canceled`); devices that started get `mooring.update.cancel` (a device that is
    /// installing already finishes and reports truthfully).
    pub async fn cancel(&self, id: &str) -> ServiceResult<DeploymentView> {
        let d = self
            .core
            .store
            .cancel_deployment(id, self.core.now_ms())
            .await?
            .ok_or_else(|| Self::deployment_not_found(id))?;
        let mut after: Option<String> = None;
        loop {
            let page = self
                .core
                .store
                .list_updates(id, after.as_deref(), DEPLOYMENT_PAGE_LEN)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.device_id.clone());
            for u in page {
                if u.state.is_final() {
                    continue;
                }
                let withdrawn = match (&u.command_id, u.state) {
                    (Some(cmd), UpdateState::Pending) => self
                        .commands
                        .cancel_command(&Access::all(), &u.device_id, cmd)
                        .await
                        .is_ok(),
                    _ => false,
                };
                if withdrawn {
                    let mut failed = u.clone();
                    failed.state = UpdateState::Failed;
                    failed.reason = Some(format!(
                        "{}: the deployment was canceled before the device picked it up",
                        ota::reason::CANCELED
                    ));
                    failed.updated_at_ms = self.core.now_ms();
                    self.core.store.apply_update_report(failed).await?;
                } else {
                    let params = CancelParams {
                        v: ota::SCHEMA_VERSION,
                        deployment_id: d.id.clone(),
                    };
                    self.commands
                        .create_command(
                            &Access::all(),
                            &u.device_id,
                            NewCommand {
                                name: ota::CANCEL_COMMAND.to_owned(),
                                params: serde_json::to_value(&params)
                                    .map_err(ServiceError::internal)?,
                                ttl_secs: None,
                                max_attempts: None,
                                idempotency_key: Some(format!("ota-cancel:{}", d.id)),
                                result_timeout_secs: None,
                            },
                            None,
                        )
                        .await?;
                }
            }
        }
        self.deployment(id).await
    }

    /// A device's updates, newest first.
    pub async fn device_history(
        &self,
        access: &Access,
        device: &str,
    ) -> ServiceResult<Vec<DeviceUpdateRecord>> {
        let id = self.registry.get_device(access, device).await?.record.id;
        Ok(self
            .core
            .store
            .device_updates(id.as_str(), DEVICE_HISTORY_LEN_MAX)
            .await?)
    }

    /// A device's status report (`devices/<id>/ota/status`): stored if newer than what is
    /// stored for its deployment. `Err(invalid)` for a malformed report.
    pub async fn on_status(&self, device: &str, payload: &[u8]) -> ServiceResult<bool> {
        let r =
            StatusReport::parse(payload).map_err(|e| ServiceError::invalid("invalid_report", e))?;
        Ok(self
            .core
            .store
            .apply_update_report(DeviceUpdateRecord {
                deployment_id: r.deployment_id,
                device_id: device.to_owned(),
                artifact_id: r.artifact_id,
                version: r.version,
                command_id: None,
                state: r.state,
                reason: r.reason,
                progress_pct: r.progress_pct,
                running_version: r.running_version,
                seq: Some(r.seq),
                updated_at_ms: self.core.now_ms(),
            })
            .await?)
    }

    /// A device's request for a new download link: the link, or why not (code + message).
    pub async fn on_link_request(&self, device: &str, payload: &[u8]) -> ServiceResult<Link> {
        let req: LinkRequest = serde_json::from_slice(payload)
            .map_err(|e| ServiceError::invalid("invalid_request", e.to_string()))?;
        let refused = || {
            ServiceError::not_found(
                "update_not_found",
                format!(
                    "no update of artifact {} in deployment {} for this device",
                    req.artifact_id, req.deployment_id
                ),
            )
        };
        let u = self
            .core
            .store
            .get_update(&req.deployment_id, device)
            .await?
            .filter(|u| u.artifact_id == req.artifact_id)
            .ok_or_else(refused)?;
        let d = self
            .core
            .store
            .get_deployment(&u.deployment_id)
            .await?
            .ok_or_else(refused)?;
        if d.canceled_at_ms.is_some() {
            return Err(ServiceError::new(
                ErrorKind::Conflict,
                "deployment_canceled",
                format!("deployment {} was canceled", d.id),
            ));
        }
        self.downloadable(&u.artifact_id).await?;
        Ok(self.link_for(
            device,
            &u.artifact_id,
            self.core.config.ota.download_token_ttl_ms,
        ))
    }
}
