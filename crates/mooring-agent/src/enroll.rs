//! `mooring-agent enroll`: from a claim token to a device certificate whose private key never leaves the state dir, as a pipeline of steps each persisted before the next.
//!
//! ```text
//!  (a) key      DIR/device.key   EC P-256, made here unless present (0600, temp + fsync + rename)
//!  (b) request  DIR/enroll.json  client id, proposed device id, CSR of that key
//!  (c) exchange MQTT/TLS, server authenticated by --ca only, no client certificate,
//!               username `claim`, password = token; subscribe provision/<cid>/#,
//!               publish the request (QoS 1), wait for accepted | rejected
//!  (d) store    DIR/ca.crt, then DIR/device.crt (its presence means "enrolled")
//! ```
//!
//! With `--key pkcs11:...` ([`crate::key`]) step (a) finds the key in the token or generates it
//! there (never extractable); no key file is written and the token signs the CSR.
//!
//! A run starts at the first step whose file is missing, so an agent killed (or cut off) at any
//! point resumes where it was: the same key, the same request. Asking again is safe because the
//! server answers the same claim + the same public key with the same certificate. With
//! `DIR/device.crt` present nothing is contacted. The link is the agent's own
//! ([`crate::link::drive`] with [`crate::link::Credentials`]): reconnects with backoff and full
//! jitter; a request unanswered for [`REPLY_TIMEOUT_MS`] is sent again, with backoff too.
//!
//! A `rejected` answer is final ([`EnrollError::Rejected`]) unless its code is in
//! [`TRANSIENT_CODES`]; so is a CONNECT refused for the token ([`EnrollError::Refused`]).
//!
//! The proposed device id ([`default_device_id`]): `--device-id`, else the DMI product serial,
//! else `/etc/machine-id`; with none, no id is proposed (a claim created with `--assign-ids`
//! has the server choose) and the client id is a random `enroll-<16 hex>` kept in
//! `DIR/enroll.json`.

use crate::diag::Diagnostics;
use crate::key::{KeyRef, Pkcs11Uri, TokenKey};
use crate::link::{self, Backoff, Credentials, Inbound, LinkEnd, LinkOutputs, LinkSettings, Route};
use crate::transport::{self, Connector};
use anyhow::Context as _;
use mooring_proto::provision::{self, EnrollAccepted, EnrollRejected, EnrollRequest};
use mooring_proto::DeviceId;
use mqtt_protocol_core::mqtt::result_code::ConnectReturnCode;
use rand::SeedableRng as _;
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// The device's private key (PEM, PKCS#8), made by the agent.
pub const KEY_FILE: &str = "device.key";
/// The pending request: client id, proposed id, CSR.
pub const REQUEST_FILE: &str = "enroll.json";
/// The certificate the server issued (PEM); present = enrolled.
pub const CERT_FILE: &str = "device.crt";
/// The server's trust bundle from the answer (PEM): the roots trusted from then on.
pub const CA_FILE: &str = "ca.crt";
/// How long a sent request waits for its answer before it is sent again.
pub const REPLY_TIMEOUT_MS: u64 = 15_000;
/// Answers buffered between the connection and the enrollment (one is expected).
pub const REPLY_QUEUE_MAX: usize = 8;
/// Keep-alive of the enrollment connection.
pub const KEEPALIVE_SECS: u64 = 30;
/// Rejection codes that are worth asking again after a backoff (the server was busy or failed);
/// every other code is final.
pub const TRANSIENT_CODES: [&str; 5] = [
    "rate_limited",
    "too_many_attempts",
    "too_many_requests",
    "unavailable",
    "internal",
];
/// Test hook: `key`, `request` or `sent` parks the agent right after that step (the step's file
/// written; for `sent`, the server has the request: its PUBACK or its answer arrived, and the
/// answer is not stored), so a test can kill it exactly there.
pub const HALT_ENV: &str = "MOORING_AGENT_TEST_HALT_AFTER";
/// The random part of a generated client id, in hex digits.
const CLIENT_ID_HEX_LEN: usize = 16;

/// What `enroll` needs.
#[derive(Clone)]
pub struct EnrollConfig {
    /// PEM CA certificate(s) that signed the server certificate: the only roots trusted.
    pub ca_path: PathBuf,
    /// The claim token (the CONNECT password).
    pub claim_token: String,
    /// Where the key, the pending request and the certificate live.
    pub state_dir: PathBuf,
    /// The device id to propose; `None` uses [`default_device_id`] (if any).
    pub device_id: Option<DeviceId>,
    /// Where the key is (made there if missing); `None`: `DIR/device.key`.
    pub key: Option<KeyRef>,
}

impl std::fmt::Debug for EnrollConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a credential: never in logs.
        f.debug_struct("EnrollConfig")
            .field("ca_path", &self.ca_path)
            .field("state_dir", &self.state_dir)
            .field("device_id", &self.device_id)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// Where the enrolled identity is: what the normal run uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    pub cert_path: PathBuf,
    pub key: KeyRef,
    pub ca_path: PathBuf,
    /// `false` when the certificate was already there and nothing was contacted.
    pub fresh: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The server's final answer: `code` is stable (e.g. `claim_used`), `message` for people.
    #[error("enrollment refused: {code}: {message}")]
    Rejected { code: String, message: String },
    /// The server refused the connection itself: the token is unknown, expired or revoked.
    #[error("enrollment refused at connect ({0:?}): the claim token is unknown, expired or revoked, or this client id is not allowed")]
    Refused(ConnectReturnCode),
    /// Local trouble: unreadable CA, unwritable state dir, an answer that does not fit the key.
    #[error(transparent)]
    Local(#[from] anyhow::Error),
}

/// The paths of the enrolled identity in `state_dir` (the key file there, or `key`).
pub fn enrolled_paths(state_dir: &Path, key: Option<&KeyRef>) -> Enrolled {
    Enrolled {
        cert_path: state_dir.join(CERT_FILE),
        key: key
            .cloned()
            .unwrap_or_else(|| KeyRef::File(state_dir.join(KEY_FILE))),
        ca_path: state_dir.join(CA_FILE),
        fresh: false,
    }
}

/// The production connector: TCP + TLS to `host:port`, the server checked against `ca_path`
/// only, no client certificate.
pub fn connector(host: &str, port: u16, ca_path: &Path) -> anyhow::Result<transport::TlsConnector> {
    Ok(transport::TlsConnector {
        host: host.to_owned(),
        port,
        tls: transport::server_auth_tls(ca_path)?,
    })
}

/// Runs the pipeline from the step reached (see the module doc). `connector` makes what opens
/// streams to the enrollment endpoint (not called when already enrolled); `rng_seed` seeds
/// reconnect and retry jitter.
pub async fn enroll(
    config: &EnrollConfig,
    connector: impl FnOnce() -> anyhow::Result<Arc<dyn Connector>>,
    rng_seed: u64,
) -> Result<Enrolled, EnrollError> {
    let dir = &config.state_dir;
    let paths = enrolled_paths(dir, config.key.as_ref());
    if paths.cert_path.exists() {
        tracing::info!(cert = %paths.cert_path.display(), "already enrolled; provisioning not contacted");
        return Ok(paths);
    }
    // Settings (the CA) are checked before anything is made.
    let connector = connector()?;
    create_state_dir(dir)?;
    let key = match &config.key {
        Some(KeyRef::Pkcs11(uri)) => DeviceKey::Token(ensure_token_key(dir, uri)?),
        Some(KeyRef::File(path)) => DeviceKey::File(ensure_key_file(dir, path)?),
        None => DeviceKey::File(ensure_key(dir)?),
    };
    halt_if("key").await;
    let request = ensure_request(dir, &key, config.device_id.as_ref())?;
    halt_if("request").await;
    let accepted = exchange(config, &request, connector, rng_seed).await?;
    store_certificate(dir, &key, &accepted, &config.ca_path)?;
    tracing::info!(device = %accepted.device_id, dir = %dir.display(), "enrolled; certificate stored");
    Ok(Enrolled {
        fresh: true,
        ..paths
    })
}

/// Creates the state dir if missing (0700: the key lives there); an existing one is left as the
/// operator made it (the key file itself is 0600 either way).
fn create_state_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .with_context(|| format!("creating state dir {}", dir.display()))
}

/// The test hook ([`HALT_ENV`]): parks forever after `step`.
async fn halt_if(step: &str) {
    if std::env::var(HALT_ENV).is_ok_and(|v| v == step) {
        tracing::warn!(step, "halted after this step ({HALT_ENV})");
        std::future::pending::<()>().await;
    }
}

/// The device key enrollment made or found: a file's or a token's.
#[derive(Debug)]
pub enum DeviceKey {
    File(rcgen::KeyPair),
    Token(TokenKey),
}

impl rcgen::PublicKeyData for DeviceKey {
    fn der_bytes(&self) -> &[u8] {
        match self {
            Self::File(k) => k.der_bytes(),
            Self::Token(k) => k.der_bytes(),
        }
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Self::File(k) => k.algorithm(),
            Self::Token(k) => k.algorithm(),
        }
    }
}

impl rcgen::SigningKey for DeviceKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self {
            Self::File(k) => rcgen::SigningKey::sign(k, msg),
            Self::Token(k) => rcgen::SigningKey::sign(k, msg),
        }
    }
}

/// Step (a) with a token key: found in the token, else generated there (never extractable).
pub fn ensure_token_key(dir: &Path, uri: &Pkcs11Uri) -> anyhow::Result<TokenKey> {
    let (key, created) = TokenKey::open(uri, true)?;
    if created {
        // A request made for another key must not survive the new one.
        remove_if_present(&dir.join(REQUEST_FILE))?;
    }
    Ok(key)
}

/// Step (a): the key in `DIR/device.key`, made unless present.
pub fn ensure_key(dir: &Path) -> anyhow::Result<rcgen::KeyPair> {
    ensure_key_file(dir, &dir.join(KEY_FILE))
}

/// Step (a): the key in the file `path`, made unless present.
pub fn ensure_key_file(dir: &Path, path: &Path) -> anyhow::Result<rcgen::KeyPair> {
    let path = path.to_owned();
    match std::fs::read_to_string(&path) {
        Ok(pem) => {
            return rcgen::KeyPair::from_pem(&pem)
                .with_context(|| format!("{} is not a usable private key", path.display()));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    // A request made for another key must not survive the new one.
    remove_if_present(&dir.join(REQUEST_FILE))?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("generating the device key")?;
    write_atomic(&path, key.serialize_pem().as_bytes(), 0o600)?;
    tracing::info!(key = %path.display(), "device key generated");
    Ok(key)
}

/// The pending request, as stored in `DIR/enroll.json` (a local file, not a wire format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingRequest {
    /// The MQTT client id: the proposed device id, else a random `enroll-<hex>`.
    pub client_id: String,
    pub device_id: Option<String>,
    pub csr_pem: String,
}

/// Step (b): the request in `DIR/enroll.json`, made unless present (and made for this key).
pub fn ensure_request(
    dir: &Path,
    key: &impl rcgen::SigningKey,
    explicit_id: Option<&DeviceId>,
) -> anyhow::Result<PendingRequest> {
    let path = dir.join(REQUEST_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let stored: Option<PendingRequest> = serde_json::from_slice(&bytes).ok();
            match stored {
                Some(r) if csr_matches_key(&r.csr_pem, key) => {
                    if let Some(id) = explicit_id {
                        anyhow::ensure!(
                            r.device_id.as_deref() == Some(id.as_str()),
                            "{} holds a pending enrollment as {:?}; pass that --device-id, or delete \
                             the file to start over with {id:?}",
                            path.display(),
                            r.device_id.as_deref().unwrap_or("(no id: server-assigned)"),
                        );
                    }
                    return Ok(r);
                }
                _ => {
                    tracing::warn!(file = %path.display(), "pending request unusable; making a new one")
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let device_id = explicit_id.cloned().or_else(default_device_id);
    let client_id = match &device_id {
        Some(id) => id.to_string(),
        None => random_client_id(),
    };
    let cn = device_id
        .as_ref()
        .map_or_else(|| client_id.clone(), ToString::to_string);
    let csr_pem = make_csr(key, &cn)?;
    let request = PendingRequest {
        client_id,
        device_id: device_id.map(DeviceId::into_string),
        csr_pem,
    };
    let json = serde_json::to_vec_pretty(&request).context("encoding the request")?;
    write_atomic(&path, &json, 0o600)?;
    tracing::info!(
        client_id = %request.client_id,
        device_id = request.device_id.as_deref().unwrap_or("(assigned by the server)"),
        "enrollment request prepared"
    );
    Ok(request)
}

/// A PKCS#10 CSR for `key` (CN = `cn`; the server ignores everything but the public key).
pub fn make_csr(key: &impl rcgen::SigningKey, cn: &str) -> anyhow::Result<String> {
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).context("CSR parameters")?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .context("making the CSR")
}

fn csr_matches_key(csr_pem: &str, key: &impl rcgen::PublicKeyData) -> bool {
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes()) else {
        return false;
    };
    use x509_parser::prelude::FromDer as _;
    match x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents) {
        Ok((_, csr)) => {
            csr.certification_request_info.subject_pki.raw == key.subject_public_key_info()
        }
        Err(_) => false,
    }
}

/// `--device-id` absent: the DMI product serial (`/sys/class/dmi/id/product_serial`, readable
/// by root), else `/etc/machine-id`; the first that is a valid device id and not a placeholder.
pub fn default_device_id() -> Option<DeviceId> {
    ["/sys/class/dmi/id/product_serial", "/etc/machine-id"]
        .iter()
        .find_map(|p| {
            std::fs::read_to_string(p)
                .ok()
                .and_then(|s| usable_serial(&s))
        })
}

/// A serial read from a file, if it can be a device id (trimmed; vendor placeholders refused).
pub fn usable_serial(raw: &str) -> Option<DeviceId> {
    const PLACEHOLDERS: [&str; 5] = ["0", "none", "default", "unknown", "0123456789"];
    let s = raw.trim();
    if PLACEHOLDERS.contains(&s.to_ascii_lowercase().as_str()) || s.chars().all(|c| c == '0') {
        return None;
    }
    DeviceId::parse(s).ok()
}

fn random_client_id() -> String {
    let n: u64 = rand::random();
    format!("enroll-{n:0width$x}", width = CLIENT_ID_HEX_LEN)
}

/// CONNECT refusals that end enrollment: the token or the client id is not accepted.
fn refusal_is_final(code: ConnectReturnCode) -> bool {
    matches!(
        code,
        ConnectReturnCode::BadUserNameOrPassword
            | ConnectReturnCode::NotAuthorized
            | ConnectReturnCode::IdentifierRejected
    )
}

/// Step (c): ask until answered. Returns the accepted answer (checked against our key) or the
/// final refusal.
async fn exchange(
    config: &EnrollConfig,
    request: &PendingRequest,
    connector: Arc<dyn Connector>,
    rng_seed: u64,
) -> Result<EnrollAccepted, EnrollError> {
    let client_id = DeviceId::parse(&request.client_id)
        .map_err(|e| anyhow::anyhow!("client id in {REQUEST_FILE}: {e}"))?;
    let (replies_tx, mut replies) = mpsc::channel::<Inbound>(REPLY_QUEUE_MAX);
    let (state_tx, mut state) = watch::channel(None);
    let (acks_tx, mut acks) = mpsc::channel::<u64>(REPLY_QUEUE_MAX);
    let settings = LinkSettings {
        device_id: client_id.clone(),
        connector,
        keepalive: Duration::from_secs(KEEPALIVE_SECS),
        routes: vec![Route {
            filter: provision::subtree_filter(client_id.as_str()),
            tx: replies_tx,
        }],
        dynamic: None,
        credentials: Some(Credentials {
            username: provision::CLAIM_USERNAME.to_owned(),
            password: config.claim_token.clone(),
        }),
        give_up_on: Some(refusal_is_final),
    };
    let outputs = LinkOutputs {
        state: state_tx,
        acks: acks_tx,
        diag: Diagnostics::default(),
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(rng_seed);
    let link_rng = rand::rngs::StdRng::seed_from_u64(rand::Rng::random(&mut rng));
    // The link is ours alone: aborted when this function returns, whatever the path.
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(link::drive(settings, Backoff::standard(link_rng), outputs));
    let result = ask_until_answered(
        request,
        &mut state,
        &mut replies,
        &mut acks,
        &mut tasks,
        Backoff::standard(rng),
    )
    .await;
    let handle = state.borrow().clone();
    if let Some(h) = handle {
        h.disconnect();
        let _ = tokio::time::timeout(
            Duration::from_millis(crate::DISCONNECT_WAIT_MS),
            tasks.join_next(),
        )
        .await;
    }
    tasks.abort_all();
    result
}

/// The PUBACK token of the request (the only QoS 1 publish of the enrollment link).
const REQUEST_TOKEN: u64 = 1;

async fn ask_until_answered(
    request: &PendingRequest,
    state: &mut watch::Receiver<Option<link::LinkHandle>>,
    replies: &mut mpsc::Receiver<Inbound>,
    acks: &mut mpsc::Receiver<u64>,
    tasks: &mut tokio::task::JoinSet<LinkEnd>,
    mut retry: Backoff,
) -> Result<EnrollAccepted, EnrollError> {
    let payload = EnrollRequest::new(request.csr_pem.clone(), request.device_id.clone()).to_bytes();
    let topic = provision::request_topic(&request.client_id);
    let accepted_topic = provision::accepted_topic(&request.client_id);
    let rejected_topic = provision::rejected_topic(&request.client_id);
    // When to (re)send on the current connection; `None` while disconnected. A connection that
    // came up before this loop began asks at once (its change was already seen: no `changed()`
    // will come for it).
    let mut send_at: Option<tokio::time::Instant> = state
        .borrow_and_update()
        .is_some()
        .then(tokio::time::Instant::now);
    loop {
        let handle = state.borrow_and_update().clone();
        if let (Some(h), Some(at)) = (&handle, send_at) {
            if tokio::time::Instant::now() >= at {
                if h.try_publish(&topic, payload.clone(), 1, Some(REQUEST_TOKEN)) {
                    tracing::info!(topic, "enrollment request sent");
                }
                send_at =
                    Some(tokio::time::Instant::now() + Duration::from_millis(REPLY_TIMEOUT_MS));
            }
        }
        let wake = send_at;
        tokio::select! {
            changed = state.changed() => {
                if changed.is_err() {
                    return Err(link_ended(tasks.join_next().await));
                }
                // A new connection asks at once (the answer to the old one is lost with it).
                send_at = state.borrow().is_some().then(tokio::time::Instant::now);
            }
            end = tasks.join_next() => return Err(link_ended(end)),
            Some(_) = acks.recv() => {
                tracing::info!("enrollment request acknowledged by the server");
                halt_if("sent").await;
            }
            reply = replies.recv() => {
                let Some(msg) = reply else {
                    return Err(link_ended(tasks.join_next().await));
                };
                halt_if("sent").await;
                if msg.topic == accepted_topic {
                    match EnrollAccepted::parse(&msg.payload) {
                        Ok(a) => return Ok(a),
                        Err(e) => tracing::warn!(error = %e, "unreadable accepted answer; ignored"),
                    }
                } else if msg.topic == rejected_topic {
                    match EnrollRejected::parse(&msg.payload) {
                        Ok(r) if TRANSIENT_CODES.contains(&r.code.as_str()) => {
                            let delay = retry.next_delay();
                            tracing::warn!(code = %r.code, message = %r.message, retry_in_ms = delay.as_millis() as u64, "enrollment deferred by the server");
                            send_at = Some(tokio::time::Instant::now() + delay);
                        }
                        Ok(r) => return Err(EnrollError::Rejected { code: r.code, message: r.message }),
                        Err(e) => tracing::warn!(error = %e, "unreadable rejected answer; ignored"),
                    }
                }
            }
            () = sleep_until_opt(wake) => {}
        }
    }
}

/// The link task ended (it only does on a final refusal): why, as an error.
fn link_ended(end: Option<Result<LinkEnd, tokio::task::JoinError>>) -> EnrollError {
    match end {
        Some(Ok(LinkEnd::Refused(code))) => EnrollError::Refused(code),
        other => anyhow::anyhow!("the connection task ended: {other:?}").into(),
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Step (d): checks the answer against our key and stores `ca.crt`, then `device.crt`.
fn store_certificate(
    dir: &Path,
    key: &impl rcgen::PublicKeyData,
    accepted: &EnrollAccepted,
    ca_path: &Path,
) -> anyhow::Result<()> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(accepted.certificate_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("the issued certificate is not PEM: {e}"))?;
    let der = rustls::pki_types::CertificateDer::from(pem.contents.clone());
    let id = transport::device_id_from_cert(&der).context("the issued certificate")?;
    anyhow::ensure!(
        id.as_str() == accepted.device_id,
        "the issued certificate names {id}, the answer {:?}",
        accepted.device_id
    );
    let cert = pem
        .parse_x509()
        .map_err(|e| anyhow::anyhow!("the issued certificate: {e}"))?;
    anyhow::ensure!(
        cert.public_key().raw == key.subject_public_key_info(),
        "the issued certificate is not for this device's key"
    );
    // The trust bundle from the answer if it keeps a CA of the operator's --ca (which
    // verified this server); else --ca itself.
    let read_ca =
        || std::fs::read(ca_path).with_context(|| format!("reading {}", ca_path.display()));
    let ca_pem = if accepted.ca_pem.trim().is_empty() {
        read_ca()?
    } else {
        // (A --ca that is absent or holds no certificate verified nothing: an in-memory
        // link's, the simulator's.)
        let ca = read_ca().unwrap_or_default();
        let ours = transport::pem_certs(&ca).unwrap_or_default();
        match transport::pem_certs(accepted.ca_pem.as_bytes()) {
            Ok(theirs) if ours.is_empty() || theirs.iter().any(|c| ours.contains(c)) => {
                accepted.ca_pem.as_bytes().to_vec()
            }
            _ => {
                tracing::warn!(ca = %ca_path.display(), "the CA bundle in the answer does not include the --ca that verified the server; keeping --ca");
                ca
            }
        }
    };
    write_atomic(&dir.join(CA_FILE), &ca_pem, 0o644)?;
    write_atomic(
        &dir.join(CERT_FILE),
        accepted.certificate_pem.as_bytes(),
        0o644,
    )?;
    Ok(())
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the whole new one:
/// a temp file beside it (created with `mode`), fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let written = (|| -> std::io::Result<()> {
        // A temp file left by a crash (or planted: a file or a link) is removed first, and the
        // new one must be created here, not followed: it gets `mode` whatever was there.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            opts.mode(mode).custom_flags(libc::O_NOFOLLOW);
        }
        #[cfg(not(unix))]
        let _ = mode;
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        #[cfg(unix)]
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed CA and a certificate it issued to `id` for `key`.
    fn ca_and_cert(id: &str, key: &rcgen::KeyPair) -> (String, String) {
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, id);
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let cert = params.signed_by(key, &issuer).expect("cert");
        (ca.pem(), cert.pem())
    }

    #[test]
    fn the_answers_ca_bundle_is_kept_only_if_it_includes_the_ca_that_verified_the_server() {
        let dir = tempfile::tempdir().expect("tmp");
        let key = rcgen::KeyPair::generate().expect("key");
        let (ca, cert) = ca_and_cert("sn-1", &key);
        let (other_ca, _) = ca_and_cert("x", &key);
        let ca_path = dir.path().join("operator-ca.crt");
        std::fs::write(&ca_path, &ca).expect("ca");
        let answer = |ca_pem: String| EnrollAccepted {
            v: 1,
            device_id: "sn-1".into(),
            certificate_pem: cert.clone(),
            ca_pem,
        };
        // A rollover's bundle that keeps --ca: stored.
        let bundle = format!("{ca}{other_ca}");
        store_certificate(dir.path(), &key, &answer(bundle.clone()), &ca_path).expect("store");
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CA_FILE)).expect("ca"),
            bundle
        );
        // One without it: --ca is kept instead.
        store_certificate(dir.path(), &key, &answer(other_ca), &ca_path).expect("store");
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CA_FILE)).expect("ca"),
            ca
        );
        // None: --ca.
        store_certificate(dir.path(), &key, &answer(String::new()), &ca_path).expect("store");
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CA_FILE)).expect("ca"),
            ca
        );
    }

    #[test]
    fn key_is_made_once_private_and_reused() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = ensure_key(dir.path()).expect("key");
        let b = ensure_key(dir.path()).expect("key again");
        assert_eq!(
            a.serialize_der(),
            b.serialize_der(),
            "the stored key is reused"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // No temp file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [KEY_FILE]);
    }

    #[test]
    fn request_is_kept_for_its_key_and_remade_for_a_new_one() {
        let dir = tempfile::tempdir().expect("tmp");
        let id = DeviceId::parse("sn-0042").expect("id");
        let key = ensure_key(dir.path()).expect("key");
        let r1 = ensure_request(dir.path(), &key, Some(&id)).expect("request");
        assert_eq!(r1.client_id, "sn-0042");
        assert_eq!(r1.device_id.as_deref(), Some("sn-0042"));
        assert!(csr_matches_key(&r1.csr_pem, &key));
        // Resumed: the very same request, with or without the flag.
        assert_eq!(
            ensure_request(dir.path(), &key, Some(&id)).expect("again"),
            r1
        );
        assert_eq!(ensure_request(dir.path(), &key, None).expect("again"), r1);
        // Another --device-id for the pending request is a clear error, not a silent switch.
        let other = DeviceId::parse("sn-9").expect("id");
        let err = ensure_request(dir.path(), &key, Some(&other)).expect_err("other id");
        assert!(err.to_string().contains("sn-0042"), "{err}");
        // A new key (the old one was lost) gets a new request.
        std::fs::remove_file(dir.path().join(KEY_FILE)).expect("rm key");
        let key2 = ensure_key(dir.path()).expect("key2");
        let r2 = ensure_request(dir.path(), &key2, Some(&id)).expect("request 2");
        assert!(csr_matches_key(&r2.csr_pem, &key2));
        assert!(!csr_matches_key(&r2.csr_pem, &key));
    }

    #[test]
    fn placeholder_serials_are_not_device_ids() {
        for bad in [
            "",
            "0",
            "None",
            "000000",
            "To be filled by O.E.M.",
            "Default",
        ] {
            assert_eq!(usable_serial(bad), None, "{bad:?}");
        }
        assert_eq!(
            usable_serial("PF2X4K9A\n").map(DeviceId::into_string),
            Some("PF2X4K9A".into())
        );
        assert_eq!(
            usable_serial("4c4c4544003a3510804bb8c04f503432\n").map(DeviceId::into_string),
            Some("4c4c4544003a3510804bb8c04f503432".into())
        );
    }

    #[test]
    fn generated_client_ids_are_device_id_shaped() {
        let id = random_client_id();
        assert!(DeviceId::parse(&id).is_ok(), "{id}");
        assert_eq!(id.len(), "enroll-".len() + CLIENT_ID_HEX_LEN);
    }

    #[test]
    fn atomic_write_replaces_whole_files() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("x.crt");
        write_atomic(&p, b"one", 0o644).expect("write");
        write_atomic(&p, b"two", 0o644).expect("write");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
    }
}
