//! Certificate rotation (issue 16): the agent renews its own certificate.
//!
//! When the certificate has passed `renew_at_lifetime_fraction` of its lifetime (default 2/3),
//! or when the server sends the reserved command [`ROTATE_COMMAND`], the agent:
//!
//! 1. makes a new key beside the old one, `<state dir>/device.next.key` (0600, written
//!    atomically; kept and reused if it is already there);
//! 2. sends a CSR for it over the live session (`devices/<id>/cert/request`) and stores the
//!    answer as `<state dir>/device.next.crt` (checked: names this device, is for this key);
//! 3. reconnects with the new pair; only after a successful CONNACK with it are the files
//!    swapped: the new key replaces the old one at the key path, then the new certificate the old
//!    one at the certificate path (atomic renames; a kill between the two is finished at the next
//!    start: a `device.next.crt` without `device.next.key` means the key was already moved);
//! 4. if the new certificate is refused, the agent keeps using the old one, tries the new one
//!    again on later connections, and after [`NEXT_ATTEMPTS_MAX`] refusals drops it and renews
//!    again later (backoff).
//!
//! A kill at any point resumes: the files are the state. A forced rotation is remembered in
//! `<state dir>/rotate.requested` until a renewal was answered.
//!
//! A key in a PKCS#11 token (`--key pkcs11:...;object=L`, [`crate::key`]): the new key is made
//! in the token too, labelled `L.next` (never extractable, reused if there); at step 3
//! `<state dir>/rotate.promoting` is written first, then the old key objects are destroyed and
//! the `L.next` ones relabelled `L` (per object class, each step idempotent), then the
//! certificate is swapped and the marker removed. A start that finds the marker finishes that.

use crate::enroll::{write_atomic, DeviceKey};
use crate::key::{KeyRef, TokenKey};
use crate::link::Inbound;
use crate::transport::{self, Connector, Stream, TlsConnector};
use crate::Core;
use anyhow::Context as _;
use mooring_proto::provision::{self as p, EnrollAccepted, EnrollRejected, RenewRequest};
use mooring_proto::sync::lock;
use rcgen::PublicKeyData as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The reserved command that makes the agent renew its certificate now.
pub const ROTATE_COMMAND: &str = "mooring.cert.rotate";
/// Default share of its lifetime after which a certificate is renewed.
pub const RENEW_AT_LIFETIME_FRACTION_DEFAULT: f64 = 2.0 / 3.0;
/// The new key, in the state dir.
pub const NEXT_KEY_FILE: &str = "device.next.key";
/// The new certificate, in the state dir.
pub const NEXT_CERT_FILE: &str = "device.next.crt";
/// Marker of a forced rotation not yet answered, in the state dir.
pub const REQUESTED_FILE: &str = "rotate.requested";
/// Marker of a token key being swapped in (a PKCS#11 key), in the state dir.
pub const PROMOTING_FILE: &str = "rotate.promoting";
/// Appended to the token key's label for the renewed key.
pub const NEXT_LABEL_SUFFIX: &str = ".next";
/// How long the agent waits for the answer to a renewal request.
pub const REPLY_WAIT_MS: u64 = 30_000;
/// Retry delays after a failed renewal: from this ...
pub const RETRY_BASE_MS: u64 = 5_000;
/// ... doubling up to this.
pub const RETRY_CAP_MS: u64 = 3_600_000;
/// How often the certificate's age is looked at again at most (the clock may jump).
pub const CHECK_INTERVAL_MS: u64 = 3_600_000;
/// Connections refused with the new certificate before it is dropped and renewed again.
pub const NEXT_ATTEMPTS_MAX: u32 = 5;
/// Renewal answers buffered between the connection and the rotation child.
pub const REPLY_QUEUE_MAX: usize = 4;
/// The fleet's trust bundle the server sent with the last renewal, in the state dir: trusted
/// for the server's certificate instead of the `--ca` file from then on (a fleet CA rollover
/// reaches the device this way, before the server's certificate changes).
pub const TRUST_FILE: &str = "trust.crt";
/// Most CA certificates a trust bundle may hold.
pub const TRUST_CERTS_MAX: usize = 8;

/// The files of the device's identity.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert_path: PathBuf,
    pub key: KeyRef,
    pub ca_path: PathBuf,
    pub state_dir: PathBuf,
}

impl CertFiles {
    fn next_key(&self) -> PathBuf {
        self.state_dir.join(NEXT_KEY_FILE)
    }
    fn next_cert(&self) -> PathBuf {
        self.state_dir.join(NEXT_CERT_FILE)
    }
    fn requested(&self) -> PathBuf {
        self.state_dir.join(REQUESTED_FILE)
    }
    fn trust(&self) -> PathBuf {
        self.state_dir.join(TRUST_FILE)
    }
    /// The CA certificates trusted for the server: the bundle from the last renewal
    /// ([`TRUST_FILE`]) if there is one, else the `--ca` file.
    pub fn roots_path(&self) -> PathBuf {
        let trust = self.trust();
        if trust.exists() {
            trust
        } else {
            self.ca_path.clone()
        }
    }

    /// Stores the trust bundle `bundle_pem` of a renewal answer as [`TRUST_FILE`] if it differs
    /// from the roots in force. Refused unless it keeps at least one of them (the server this
    /// agent verified vouches for the new CA; a bundle sharing nothing with what verified it
    /// would lock the agent out). `true` if stored.
    pub fn store_trust_bundle(&self, bundle_pem: &str) -> anyhow::Result<bool> {
        let parse = transport::pem_certs;
        let new = parse(bundle_pem.as_bytes()).context("the trust bundle")?;
        anyhow::ensure!(
            !new.is_empty() && new.len() <= TRUST_CERTS_MAX,
            "the trust bundle holds {} certificates (1..={TRUST_CERTS_MAX})",
            new.len()
        );
        let roots = self.roots_path();
        let current =
            parse(&std::fs::read(&roots).with_context(|| format!("reading {}", roots.display()))?)?;
        if new == current {
            return Ok(false);
        }
        anyhow::ensure!(
            new.iter().any(|c| current.contains(c)),
            "the trust bundle shares no CA with {}; kept that",
            roots.display()
        );
        write_atomic(&self.trust(), bundle_pem.as_bytes(), 0o644)?;
        tracing::info!(cas = new.len(), file = %self.trust().display(), "stored the fleet's new trust bundle");
        Ok(true)
    }
    fn promoting(&self) -> PathBuf {
        self.state_dir.join(PROMOTING_FILE)
    }
    /// Where the renewed key is: `device.next.key`, or `L.next` in the token.
    fn next_key_ref(&self) -> KeyRef {
        match &self.key {
            KeyRef::File(_) => KeyRef::File(self.next_key()),
            KeyRef::Pkcs11(uri) => {
                KeyRef::Pkcs11(uri.with_object(&format!("{}{NEXT_LABEL_SUFFIX}", uri.object)))
            }
        }
    }
}

/// Finishes a swap a kill interrupted (step 3 of the module doc): `device.next.crt` without
/// `device.next.key` means the key is in place already and the certificate must follow.
pub fn recover(files: &CertFiles) -> anyhow::Result<()> {
    match &files.key {
        KeyRef::File(_) => swap_cert(files),
        // A waiting renewed pair is tried first; only a begun swap is finished.
        KeyRef::Pkcs11(uri) if files.promoting().exists() => promote_token_key(files, uri),
        KeyRef::Pkcs11(_) => Ok(()),
    }
}

/// Swaps in the renewed token key and its certificate (module doc); idempotent.
fn promote_token_key(files: &CertFiles, uri: &crate::key::Pkcs11Uri) -> anyhow::Result<()> {
    let KeyRef::Pkcs11(next) = files.next_key_ref() else {
        anyhow::bail!("not a token key");
    };
    crate::key::promote_key(uri, &next.object)?;
    let next_cert = files.next_cert();
    if next_cert.exists() {
        let pem = std::fs::read(&next_cert)
            .with_context(|| format!("reading {}", next_cert.display()))?;
        write_atomic(&files.cert_path, &pem, 0o644)?;
        std::fs::remove_file(&next_cert)
            .with_context(|| format!("removing {}", next_cert.display()))?;
    }
    std::fs::remove_file(files.promoting())
        .with_context(|| format!("removing {}", files.promoting().display()))?;
    tracing::info!(key = %uri, "swapped in the renewed token key");
    Ok(())
}

/// Moves `device.next.crt` (if there and its key is in place) over the certificate.
fn swap_cert(files: &CertFiles) -> anyhow::Result<()> {
    let (next_key, next_cert) = (files.next_key(), files.next_cert());
    if next_cert.exists() && !next_key.exists() {
        let pem = std::fs::read(&next_cert)
            .with_context(|| format!("reading {}", next_cert.display()))?;
        write_atomic(&files.cert_path, &pem, 0o644)?;
        std::fs::remove_file(&next_cert)
            .with_context(|| format!("removing {}", next_cert.display()))?;
        tracing::info!("finished swapping in the renewed certificate");
    }
    Ok(())
}

struct State {
    current: Arc<rustls::ClientConfig>,
    next: Option<Arc<rustls::ClientConfig>>,
    /// The last connection attempt used `next` and has not been reported up yet.
    trying_next: bool,
    /// Attempts with `next` that did not come up.
    next_failures: u32,
    /// The next attempt uses `current` (after a failed one with `next`).
    current_once: bool,
}

/// The production connector (TCP + mTLS) with a second identity to try: the renewed pair.
pub struct Rotation {
    files: CertFiles,
    host: String,
    port: u16,
    state: Mutex<State>,
}

impl Rotation {
    /// With the identity in `current`; loads the renewed pair if it is waiting in the state dir.
    pub fn new(
        files: CertFiles,
        host: String,
        port: u16,
        current: Arc<rustls::ClientConfig>,
    ) -> Arc<Self> {
        let r = Arc::new(Self {
            files,
            host,
            port,
            state: Mutex::new(State {
                current,
                next: None,
                trying_next: false,
                next_failures: 0,
                current_once: false,
            }),
        });
        if let Err(e) = r.load_next() {
            tracing::warn!(error = %format!("{e:#}"), "the renewed certificate waiting in the state dir is unusable; renewing again");
            r.drop_next();
        }
        r
    }

    /// Loads `device.next.key` + `device.next.crt` as the identity to try, if both are there.
    fn load_next(&self) -> anyhow::Result<()> {
        let (key, cert) = (self.files.next_key_ref(), self.files.next_cert());
        if !(key.file().is_none_or(Path::exists) && cert.exists()) {
            return Ok(());
        }
        let identity = transport::load_identity(&cert, &key, &self.files.roots_path())?;
        let mut s = lock(&self.state);
        s.next = Some(identity.tls);
        s.next_failures = 0;
        s.current_once = false;
        Ok(())
    }

    #[cfg(test)]
    fn pick_current_for_test(&self) -> Arc<rustls::ClientConfig> {
        lock(&self.state).current.clone()
    }

    fn has_next(&self) -> bool {
        lock(&self.state).next.is_some()
    }

    /// Forgets the renewed pair (files included): it is renewed again.
    fn drop_next(&self) {
        {
            let mut s = lock(&self.state);
            s.next = None;
            s.trying_next = false;
        }
        for path in [self.files.next_cert(), self.files.next_key()] {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(file = %path.display(), error = %e, "removing failed");
                }
            }
        }
        if let (KeyRef::Pkcs11(uri), KeyRef::Pkcs11(next)) =
            (&self.files.key, self.files.next_key_ref())
        {
            if let Err(e) = crate::key::destroy_key(uri, &next.object) {
                tracing::warn!(key = %next, error = %format!("{e:#}"), "destroying the renewed token key failed");
            }
        }
    }

    /// A connection came up (CONNACK accepted): whether it used the renewed pair.
    fn link_up(&self) -> bool {
        let mut s = lock(&self.state);
        let was_next = s.trying_next && s.next.is_some();
        s.trying_next = false;
        was_next
    }

    /// The renewed pair worked: it becomes the identity, in memory and on disk (module doc,
    /// step 3).
    fn promote(&self) -> anyhow::Result<()> {
        match &self.files.key {
            KeyRef::File(key_path) => {
                let next_key = self.files.next_key();
                let key = std::fs::read(&next_key)
                    .with_context(|| format!("reading {}", next_key.display()))?;
                write_atomic(key_path, &key, 0o600)?;
                std::fs::remove_file(&next_key)
                    .with_context(|| format!("removing {}", next_key.display()))?;
                swap_cert(&self.files)?;
            }
            KeyRef::Pkcs11(uri) => {
                write_atomic(&self.files.promoting(), b"", 0o600)?;
                promote_token_key(&self.files, uri)?;
            }
        }
        let mut s = lock(&self.state);
        if let Some(next) = s.next.take() {
            s.current = next;
        }
        s.next_failures = 0;
        Ok(())
    }

    /// When the current certificate should be renewed (unix ms).
    fn renew_at_ms(&self, fraction: f64) -> anyhow::Result<u64> {
        let pem = std::fs::read(&self.files.cert_path)
            .with_context(|| format!("reading {}", self.files.cert_path.display()))?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem)
            .map_err(|e| anyhow::anyhow!("the certificate is not PEM: {e}"))?;
        let cert = pem
            .parse_x509()
            .map_err(|e| anyhow::anyhow!("the certificate: {e}"))?;
        let ms = |t: x509_parser::time::ASN1Time| {
            u64::try_from(t.timestamp())
                .unwrap_or(0)
                .saturating_mul(1000)
        };
        let (from, to) = (
            ms(cert.validity().not_before),
            ms(cert.validity().not_after),
        );
        let life = to.saturating_sub(from) as f64;
        Ok(from.saturating_add((life * fraction.clamp(0.0, 1.0)) as u64))
    }
}

#[async_trait::async_trait]
impl Connector for Rotation {
    async fn connect(&self) -> std::io::Result<Box<dyn Stream>> {
        let tls = self.pick();
        TlsConnector {
            host: self.host.clone(),
            port: self.port,
            tls,
        }
        .connect()
        .await
    }

    fn describe(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

impl Rotation {
    /// The identity for the next connection attempt: the renewed pair if one waits (not right
    /// after it failed, and not after [`NEXT_ATTEMPTS_MAX`] failures), else the current one.
    fn pick(&self) -> Arc<rustls::ClientConfig> {
        {
            let mut s = lock(&self.state);
            if s.trying_next {
                // The last attempt with the renewed pair did not come up.
                s.trying_next = false;
                s.next_failures += 1;
                s.current_once = true;
                tracing::warn!(
                    attempts = s.next_failures,
                    "connecting with the renewed certificate failed; using the current one"
                );
            }
            match s.next.clone() {
                Some(next) if !s.current_once && s.next_failures < NEXT_ATTEMPTS_MAX => {
                    s.trying_next = true;
                    next
                }
                _ => {
                    s.current_once = false;
                    s.current.clone()
                }
            }
        }
    }
}

/// The connector handed to the link: delegates to the shared [`Rotation`].
pub struct RotatingConnector(pub Arc<Rotation>);

#[async_trait::async_trait]
impl Connector for RotatingConnector {
    async fn connect(&self) -> std::io::Result<Box<dyn Stream>> {
        self.0.connect().await
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn rotation(&self) -> Option<Arc<Rotation>> {
        Some(self.0.clone())
    }
}

/// The `mooring.cert.rotate` command: remembered (durably), then done by the rotation child.
pub(crate) fn request(core: &Core) -> Result<serde_json::Value, serde_json::Value> {
    let Some(rotation) = &core.rotation else {
        return Err(crate::commands::reason(
            "this agent does not rotate its certificate (no certificate files)",
        ));
    };
    write_atomic(&rotation.files.requested(), b"", 0o600)
        .map_err(|e| crate::commands::reason(format!("{e:#}")))?;
    core.rotate_now.notify_one();
    Ok(serde_json::json!({"renewal": "requested"}))
}

/// The rotation child (module doc).
pub(crate) async fn run(core: Arc<Core>) -> anyhow::Result<()> {
    let Some(rotation) = core.rotation.clone() else {
        return Ok(());
    };
    let mut replies = core.cert_rx.lock().await;
    let mut link_rx = core.link.subscribe();
    let mut retry_ms = RETRY_BASE_MS;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut seen_conn = 0u64;
    loop {
        let handle = link_rx.borrow_and_update().clone();
        if let Some(h) = &handle {
            if h.conn_no != seen_conn {
                seen_conn = h.conn_no;
                if rotation.link_up() {
                    rotation.promote()?;
                    tracing::info!("certificate rotated: connected with the renewed certificate; the old key is gone");
                    retry_ms = RETRY_BASE_MS;
                    retry_at = None;
                }
            }
        }
        {
            let s = lock(&rotation.state);
            if s.next.is_some() && s.next_failures >= NEXT_ATTEMPTS_MAX {
                drop(s);
                tracing::warn!(
                    "the renewed certificate keeps being refused; dropping it to renew again later"
                );
                rotation.drop_next();
                retry_at = Some(tokio::time::Instant::now() + Duration::from_millis(retry_ms));
                retry_ms = (retry_ms * 2).min(RETRY_CAP_MS);
            }
        }
        let backing_off = retry_at.is_some_and(|at| tokio::time::Instant::now() < at);
        if let (true, false, Some(h)) = (rotation.has_next(), backing_off, &handle) {
            // Connected with the old pair while a renewed one waits (its last attempt
            // failed): try it again.
            h.reconnect();
            retry_at = Some(tokio::time::Instant::now() + Duration::from_millis(retry_ms));
            retry_ms = (retry_ms * 2).min(RETRY_CAP_MS);
        }
        let forced = rotation.files.requested().exists();
        let now_ms = core.clock.now_ms();
        let renew_at_ms = rotation
            .renew_at_ms(core.config.renew_at_lifetime_fraction)
            .unwrap_or(u64::MAX);
        let backing_off = retry_at.is_some_and(|at| tokio::time::Instant::now() < at);
        let due = (forced || now_ms >= renew_at_ms) && !backing_off && !rotation.has_next();
        if let (true, Some(h)) = (due, &handle) {
            match renew(&core, &rotation, h, &mut replies).await {
                Ok(()) => {
                    let _ = std::fs::remove_file(rotation.files.requested());
                    // Reconnect with the new pair (again after a while if that fails).
                    h.reconnect();
                    retry_at =
                        Some(tokio::time::Instant::now() + Duration::from_millis(RETRY_BASE_MS));
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), retry_in_ms = retry_ms, "certificate renewal failed; retrying later");
                    core.diag
                        .error(format!("certificate renewal failed: {e:#}"));
                    retry_at = Some(tokio::time::Instant::now() + Duration::from_millis(retry_ms));
                    retry_ms = (retry_ms * 2).min(RETRY_CAP_MS);
                }
            }
            continue;
        }
        let wake_in_ms = if backing_off {
            retry_at
                .map(|at| {
                    at.saturating_duration_since(tokio::time::Instant::now())
                        .as_millis() as u64
                })
                .unwrap_or(CHECK_INTERVAL_MS)
        } else {
            renew_at_ms.saturating_sub(now_ms).min(CHECK_INTERVAL_MS)
        };
        tokio::select! {
            changed = link_rx.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            () = core.rotate_now.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(wake_in_ms.max(1))) => {}
            reply = replies.recv() => {
                if reply.is_none() {
                    return Ok(());
                }
                // A late answer to an abandoned request: ignored.
            }
        }
    }
}

/// Steps 1 and 2 of the module doc over the live connection `h`.
async fn renew(
    core: &Core,
    rotation: &Rotation,
    h: &crate::link::LinkHandle,
    replies: &mut tokio::sync::mpsc::Receiver<Inbound>,
) -> anyhow::Result<()> {
    let key = next_key(&rotation.files)?;
    let csr_pem = crate::enroll::make_csr(&key, core.device_id.as_str())?;
    // Answers to earlier requests are stale.
    while replies.try_recv().is_ok() {}
    let payload = RenewRequest {
        v: p::SCHEMA_VERSION,
        csr_pem,
    };
    let payload = serde_json::to_vec(&payload).context("encoding the request")?;
    anyhow::ensure!(
        h.try_publish(&p::renew_request_topic(&core.device_id), payload, 1, None),
        "the connection is busy or gone"
    );
    tracing::info!("certificate renewal requested");
    let reply = tokio::time::timeout(Duration::from_millis(REPLY_WAIT_MS), replies.recv())
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {REPLY_WAIT_MS} ms"))?
        .context("the connection went away")?;
    if reply.topic == p::renew_rejected_topic(&core.device_id) {
        let why: Option<EnrollRejected> = serde_json::from_slice(&reply.payload).ok();
        anyhow::bail!(
            "refused: {}",
            why.map_or_else(
                || "(unreadable answer)".to_owned(),
                |r| format!("{}: {}", r.code, r.message)
            )
        );
    }
    let accepted: EnrollAccepted =
        serde_json::from_slice(&reply.payload).context("the answer is not a certificate")?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(accepted.certificate_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("the issued certificate is not PEM: {e}"))?;
    let der = rustls::pki_types::CertificateDer::from(pem.contents.clone());
    let id = transport::device_id_from_cert(&der).context("the issued certificate")?;
    anyhow::ensure!(
        id == core.device_id,
        "the issued certificate names {id}, not this device"
    );
    let cert = pem
        .parse_x509()
        .map_err(|e| anyhow::anyhow!("the issued certificate: {e}"))?;
    anyhow::ensure!(
        cert.public_key().raw == key.subject_public_key_info(),
        "the issued certificate is not for the new key"
    );
    // The fleet's trust bundle first: the new certificate may be from a new fleet CA, whose
    // server certificate the agent must accept once the previous CA is retired.
    if !accepted.ca_pem.is_empty() {
        if let Err(e) = rotation.files.store_trust_bundle(&accepted.ca_pem) {
            tracing::warn!(error = %format!("{e:#}"), "the trust bundle sent with the renewal is unusable");
        }
    }
    write_atomic(
        &rotation.files.next_cert(),
        accepted.certificate_pem.as_bytes(),
        0o644,
    )?;
    rotation.load_next()?;
    tracing::info!("renewed certificate received; reconnecting with it");
    Ok(())
}

/// The key to renew for: a new one in `device.next.key`, or `L.next` in the token (made unless
/// there).
fn next_key(files: &CertFiles) -> anyhow::Result<DeviceKey> {
    if let KeyRef::Pkcs11(next) = files.next_key_ref() {
        return Ok(DeviceKey::Token(TokenKey::open(&next, true)?.0));
    }
    let path = files.next_key();
    Ok(DeviceKey::File(match std::fs::read_to_string(&path) {
        Ok(pem) => rcgen::KeyPair::from_pem(&pem)
            .with_context(|| format!("{} is not a usable private key", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .context("generating the new key")?;
            write_atomic(&path, key.serialize_pem().as_bytes(), 0o600)?;
            key
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }))
}

/// The files and TLS of `config`'s identity, for [`Rotation::new`].
pub fn files_of(config: &crate::AgentConfig) -> CertFiles {
    CertFiles {
        cert_path: config.cert_path.clone(),
        key: config.key.clone(),
        ca_path: config.ca_path.clone(),
        state_dir: config.state_dir.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA and a device certificate + key for `id` signed by it, in `dir` as `ca.crt`,
    /// `<name>.crt`, `<name>.key`.
    fn issue(dir: &std::path::Path, name: &str, id: &str) {
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let ca_path = dir.join("ca.crt");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        if !ca_path.exists() {
            std::fs::write(&ca_path, ca.pem()).expect("ca file");
        }
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, id);
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let cert = params.signed_by(&key, &issuer).expect("cert");
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).expect("crt");
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("key");
    }

    fn files(dir: &std::path::Path) -> CertFiles {
        CertFiles {
            cert_path: dir.join("device.crt"),
            key: KeyRef::File(dir.join("device.key")),
            ca_path: dir.join("ca.crt"),
            state_dir: dir.join("state"),
        }
    }

    fn self_signed_ca() -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).expect("ca").pem()
    }

    #[test]
    fn a_trust_bundle_is_stored_only_when_new_and_keeping_a_trusted_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = files(dir.path());
        std::fs::create_dir_all(&f.state_dir).expect("state dir");
        let (old, new, other) = (self_signed_ca(), self_signed_ca(), self_signed_ca());
        std::fs::write(&f.ca_path, &old).expect("ca");
        assert_eq!(f.roots_path(), f.ca_path, "--ca until a bundle arrives");
        // The same roots again: nothing to store.
        assert!(!f.store_trust_bundle(&old).expect("same"));
        assert_eq!(f.roots_path(), f.ca_path);
        // A CA sharing nothing with the trusted one is refused.
        let err = f.store_trust_bundle(&other).expect_err("disjoint");
        assert!(err.to_string().contains("shares no CA"), "{err:#}");
        assert!(f.store_trust_bundle("not pem").is_err());
        // A rollover's bundle (previous + new) is stored and trusted from then on ...
        assert!(f
            .store_trust_bundle(&format!("{old}{new}"))
            .expect("overlap"));
        assert_eq!(f.roots_path(), f.state_dir.join(TRUST_FILE));
        // ... and after the retirement the new CA alone (it shares the new one).
        assert!(f.store_trust_bundle(&new).expect("retired"));
        assert_eq!(std::fs::read_to_string(f.roots_path()).expect("read"), new);
        assert!(
            f.store_trust_bundle(&old).is_err(),
            "the retired CA alone is refused"
        );
    }

    fn rotation(dir: &std::path::Path) -> Arc<Rotation> {
        let f = files(dir);
        let current = transport::load_identity(&f.cert_path, &f.key, &f.ca_path)
            .expect("identity")
            .tls;
        Rotation::new(f, "localhost".into(), 1, current)
    }

    #[test]
    fn a_kill_between_the_two_renames_is_finished_at_the_next_start() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(dir.path().join("state")).expect("state");
        issue(dir.path(), "device", "d1");
        issue(dir.path(), "state/device.next", "d1");
        let f = files(dir.path());
        // Killed after the key was moved: the new key is in place, the new certificate waits.
        let next_key = std::fs::read(f.state_dir.join(NEXT_KEY_FILE)).expect("key");
        std::fs::write(f.key.file().expect("file"), &next_key).expect("key");
        std::fs::remove_file(f.state_dir.join(NEXT_KEY_FILE)).expect("rm");
        let next_cert = std::fs::read(f.state_dir.join(NEXT_CERT_FILE)).expect("crt");
        recover(&f).expect("recover");
        assert_eq!(std::fs::read(&f.cert_path).expect("crt"), next_cert);
        assert!(!f.state_dir.join(NEXT_CERT_FILE).exists());
        // The pair on the paths is usable; nothing more to do.
        transport::load_identity(&f.cert_path, &f.key, &f.ca_path).expect("identity");
        recover(&f).expect("again");
    }

    #[test]
    fn a_waiting_pair_is_tried_first_then_the_current_one_after_a_failure_and_dropped_at_last() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(dir.path().join("state")).expect("state");
        issue(dir.path(), "device", "d1");
        let r = rotation(dir.path());
        let current = r.pick();
        assert!(!r.has_next());
        // A renewed pair waiting in the state dir (an agent killed before it connected).
        issue(dir.path(), "state/device.next", "d1");
        let r = rotation(dir.path());
        assert!(r.has_next());
        let first = r.pick();
        assert!(!Arc::ptr_eq(&first, &r.pick_current_for_test()));
        // That attempt did not come up: the next one uses the current pair, then the new again.
        let second = r.pick();
        assert!(Arc::ptr_eq(&second, &r.pick_current_for_test()));
        assert!(Arc::ptr_eq(&r.pick(), &first));
        let _ = current;
        // It comes up: promoted; the files are swapped, nothing waits.
        assert!(r.link_up());
        let next_key = std::fs::read(dir.path().join("state").join(NEXT_KEY_FILE)).expect("key");
        r.promote().expect("promote");
        assert_eq!(
            std::fs::read(dir.path().join("device.key")).expect("key"),
            next_key
        );
        assert!(!dir.path().join("state").join(NEXT_KEY_FILE).exists());
        assert!(!dir.path().join("state").join(NEXT_CERT_FILE).exists());
        assert!(!r.has_next());
        assert!(Arc::ptr_eq(&r.pick(), &first));
        assert!(!r.link_up());
        // A pair refused NEXT_ATTEMPTS_MAX times is no longer tried.
        issue(dir.path(), "state/device.next", "d1");
        let r = rotation(dir.path());
        for _ in 0..NEXT_ATTEMPTS_MAX {
            let _tried = r.pick();
            let _fallback = r.pick();
        }
        let cur = r.pick_current_for_test();
        assert!(Arc::ptr_eq(&r.pick(), &cur));
        assert!(Arc::ptr_eq(&r.pick(), &cur));
    }

    #[test]
    fn renewal_is_due_at_the_share_of_the_lifetime() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(dir.path().join("state")).expect("state");
        issue(dir.path(), "device", "d1");
        let r = rotation(dir.path());
        // rcgen's default validity: 1975-01-01 to 4096-01-01.
        let start = r.renew_at_ms(0.0).expect("start");
        let end = r.renew_at_ms(1.0).expect("end");
        let two_thirds = r
            .renew_at_ms(RENEW_AT_LIFETIME_FRACTION_DEFAULT)
            .expect("2/3");
        assert!(start < two_thirds && two_thirds < end);
        let expected = start + (end - start) * 2 / 3;
        assert!(
            two_thirds.abs_diff(expected) < 1000,
            "{two_thirds} {expected}"
        );
    }
}
