//! Where the device's private key is: a PEM file, or an EC P-256 key inside a PKCS#11 token (secure element, HSM, SoftHSM2) that signs there and never leaves it.
//!
//! `--key` takes either a path or an RFC 7512 URI:
//!
//! ```text
//! pkcs11:token=mooring;object=device?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=1234
//! ```
//!
//! Path attributes: `token` (the token label) and `object` (the key's CKA_LABEL) are required,
//! `id` (CKA_ID, percent-encoded bytes) and `type=private` are optional. Query attributes:
//! `module-path` (else [`MODULE_ENV`]), `pin-value` or `pin-source=file:/path` (else
//! [`PIN_ENV`]; a token that needs no login may have none).
//!
//! [`TokenKey::open`] finds the key by label (and id); with `create` (enrollment) a missing key
//! is generated inside the token: CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE, not CKA_EXTRACTABLE,
//! CKA_SIGN only. The key signs the CSR (rcgen's [`rcgen::SigningKey`]) and the TLS handshake
//! ([`rustls::sign::SigningKey`], ECDSA_NISTP256_SHA256): SHA-256 here, `CKM_ECDSA` in the
//! token, the raw `r || s` answer turned into the DER `ECDSA-Sig-Value` both need.

use anyhow::Context as _;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use mooring_proto::sync::lock;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The PKCS#11 module (shared library) when the URI has no `module-path`.
pub const MODULE_ENV: &str = "MOORING_PKCS11_MODULE";
/// The user PIN when the URI has neither `pin-value` nor `pin-source`.
pub const PIN_ENV: &str = "MOORING_PKCS11_PIN";
/// Longest `--key` URI accepted.
pub const URI_LEN_MAX: usize = 4096;
/// Longest PIN file read (`pin-source`).
pub const PIN_FILE_LEN_MAX: u64 = 1024;
/// The URI scheme that selects a token key.
pub const SCHEME: &str = "pkcs11:";
/// DER of the OID of secp256r1 (P-256): the curve of the keys made and accepted.
const P256_OID_DER: [u8; 10] = [0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];
/// An uncompressed P-256 point: 0x04, x, y.
const P256_POINT_LEN: usize = 65;
/// A raw P-256 ECDSA signature: r || s.
const P256_RAW_SIG_LEN: usize = 64;

/// `--key`: a PEM file or a key in a PKCS#11 token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRef {
    File(PathBuf),
    Pkcs11(Pkcs11Uri),
}

impl KeyRef {
    /// A `pkcs11:` URI, else a path.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        if s.starts_with(SCHEME) {
            return Ok(Self::Pkcs11(Pkcs11Uri::parse(s)?));
        }
        anyhow::ensure!(
            !s.is_empty(),
            "the key is empty: give a file or a pkcs11: URI"
        );
        Ok(Self::File(PathBuf::from(s)))
    }

    /// The file, if the key is one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Self::File(p) => Some(p),
            Self::Pkcs11(_) => None,
        }
    }
}

impl std::fmt::Display for KeyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::Pkcs11(u) => write!(f, "{u}"),
        }
    }
}

impl From<PathBuf> for KeyRef {
    fn from(p: PathBuf) -> Self {
        Self::File(p)
    }
}
impl From<&Path> for KeyRef {
    fn from(p: &Path) -> Self {
        Self::File(p.to_owned())
    }
}
impl From<&str> for KeyRef {
    fn from(p: &str) -> Self {
        Self::File(PathBuf::from(p))
    }
}
impl From<String> for KeyRef {
    fn from(p: String) -> Self {
        Self::File(PathBuf::from(p))
    }
}

/// How the user PIN is given.
#[derive(Clone, PartialEq, Eq)]
pub enum PinSource {
    Value(String),
    File(PathBuf),
}

impl std::fmt::Debug for PinSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // A credential: never in logs.
            Self::Value(_) => f.write_str("Value(..)"),
            Self::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

/// The parts of an RFC 7512 `pkcs11:` URI the agent uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// The token label (`token=`).
    pub token: String,
    /// The key's CKA_LABEL (`object=`).
    pub object: String,
    /// The key's CKA_ID (`id=`), if given.
    pub id: Option<Vec<u8>>,
    /// `module-path=`.
    pub module_path: Option<PathBuf>,
    /// `pin-value=` or `pin-source=`.
    pub pin: Option<PinSource>,
}

impl Pkcs11Uri {
    pub fn parse(uri: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            uri.len() <= URI_LEN_MAX,
            "the pkcs11: URI is longer than {URI_LEN_MAX} bytes"
        );
        let rest = uri
            .strip_prefix(SCHEME)
            .with_context(|| format!("not a pkcs11: URI (it must start with {SCHEME:?})"))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (mut token, mut object, mut id) = (None, None, None);
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (name, value) = attr.split_once('=').with_context(|| {
                format!("malformed pkcs11: URI: path attribute {attr:?} is not name=value")
            })?;
            let value = percent_decode(value)
                .with_context(|| format!("malformed pkcs11: URI: attribute {name}"))?;
            let slot = match name {
                "token" => &mut token,
                "object" => &mut object,
                "id" => &mut id,
                "type" => {
                    anyhow::ensure!(
                        value == b"private",
                        "pkcs11: URI: type must be \"private\" (the device key), not {:?}",
                        String::from_utf8_lossy(&value)
                    );
                    continue;
                }
                other => anyhow::bail!(
                    "pkcs11: URI: unsupported path attribute {other:?} (supported: token, object, id, type)"
                ),
            };
            anyhow::ensure!(
                slot.is_none(),
                "pkcs11: URI: attribute {name} is given twice"
            );
            *slot = Some(value);
        }
        let (mut module_path, mut pin_value, mut pin_source) = (None, None, None);
        for attr in query.split('&').filter(|a| !a.is_empty()) {
            let (name, value) = attr.split_once('=').with_context(|| {
                format!("malformed pkcs11: URI: query attribute {attr:?} is not name=value")
            })?;
            let value = percent_decode(value)
                .with_context(|| format!("malformed pkcs11: URI: attribute {name}"))?;
            let slot = match name {
                "module-path" => &mut module_path,
                "pin-value" => &mut pin_value,
                "pin-source" => &mut pin_source,
                other => anyhow::bail!(
                    "pkcs11: URI: unsupported query attribute {other:?} (supported: module-path, pin-value, pin-source)"
                ),
            };
            anyhow::ensure!(
                slot.is_none(),
                "pkcs11: URI: attribute {name} is given twice"
            );
            *slot = Some(value);
        }
        let text = |name: &str, v: Vec<u8>| {
            String::from_utf8(v).with_context(|| format!("pkcs11: URI: {name} is not UTF-8"))
        };
        let token = text(
            "token",
            token.context("pkcs11: URI: token= is required (the token label)")?,
        )?;
        let object = text(
            "object",
            object.context("pkcs11: URI: object= is required (the key's label)")?,
        )?;
        anyhow::ensure!(!token.is_empty(), "pkcs11: URI: token= is empty");
        anyhow::ensure!(!object.is_empty(), "pkcs11: URI: object= is empty");
        let pin = match (pin_value, pin_source) {
            (Some(_), Some(_)) => {
                anyhow::bail!("pkcs11: URI: give pin-value or pin-source, not both")
            }
            (Some(v), None) => Some(PinSource::Value(text("pin-value", v)?)),
            (None, Some(s)) => {
                let s = text("pin-source", s)?;
                let path = s.strip_prefix("file:").unwrap_or(&s);
                // `file:///p` and `file:/p` both name /p.
                let path = path.strip_prefix("//").unwrap_or(path);
                anyhow::ensure!(
                    path.starts_with('/'),
                    "pkcs11: URI: pin-source must be file:/absolute/path, not {s:?}"
                );
                Some(PinSource::File(PathBuf::from(path)))
            }
            (None, None) => None,
        };
        let module_path = module_path
            .map(|m| text("module-path", m).map(PathBuf::from))
            .transpose()?;
        Ok(Self {
            token,
            object,
            id,
            module_path,
            pin,
        })
    }

    /// The same URI naming `object` instead.
    pub fn with_object(&self, object: &str) -> Self {
        Self {
            object: object.to_owned(),
            ..self.clone()
        }
    }

    /// The module to load: `module-path`, else [`MODULE_ENV`].
    fn module(&self) -> anyhow::Result<PathBuf> {
        if let Some(m) = &self.module_path {
            return Ok(m.clone());
        }
        match std::env::var_os(MODULE_ENV) {
            Some(m) if !m.is_empty() => Ok(PathBuf::from(m)),
            _ => anyhow::bail!(
                "no PKCS#11 module: add module-path=/path/to/module.so to the pkcs11: URI or set {MODULE_ENV}"
            ),
        }
    }

    /// The user PIN: `pin-value`, `pin-source`, else [`PIN_ENV`]; `None` if none is given.
    fn pin(&self) -> anyhow::Result<Option<AuthPin>> {
        let pin = match &self.pin {
            Some(PinSource::Value(v)) => Some(v.clone()),
            Some(PinSource::File(p)) => {
                use std::io::Read as _;
                use std::os::unix::fs::PermissionsExt as _;
                let f = std::fs::File::open(p)
                    .with_context(|| format!("reading the PIN file {}", p.display()))?;
                let mode = f
                    .metadata()
                    .with_context(|| format!("reading the PIN file {}", p.display()))?
                    .permissions()
                    .mode();
                anyhow::ensure!(
                    mode & 0o077 == 0,
                    "the PIN file {} is readable by others (mode {:o}); chmod 600 it",
                    p.display(),
                    mode & 0o777
                );
                let mut s = String::new();
                f.take(PIN_FILE_LEN_MAX)
                    .read_to_string(&mut s)
                    .with_context(|| format!("reading the PIN file {}", p.display()))?;
                Some(s.trim_end_matches(['\r', '\n']).to_owned())
            }
            None => std::env::var(PIN_ENV).ok().filter(|p| !p.is_empty()),
        };
        Ok(pin.map(|p| AuthPin::new(p.into())))
    }
}

impl std::fmt::Display for Pkcs11Uri {
    /// The URI for logs and errors: the PIN left out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pkcs11:token={};object={}",
            percent_encode(self.token.as_bytes()),
            percent_encode(self.object.as_bytes())
        )?;
        if let Some(id) = &self.id {
            write!(f, ";id={}", percent_encode_all(id))?;
        }
        if let Some(m) = &self.module_path {
            write!(
                f,
                "?module-path={}",
                percent_encode(m.to_string_lossy().as_bytes())
            )?;
        }
        Ok(())
    }
}

/// RFC 3986 percent-decoding (`%XX`; every other byte as is).
fn percent_decode(s: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                // Not the value itself: it may be a PIN.
                .with_context(|| format!("bad percent-escape at byte {i}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn percent_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_encode_all(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02X}")).collect()
}

/// The DER `ECDSA-Sig-Value` (SEQUENCE { r INTEGER, s INTEGER }) of a raw P-256 `r || s`.
pub fn ecdsa_raw_to_der(raw: &[u8]) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(
        raw.len() == P256_RAW_SIG_LEN,
        "the token's ECDSA signature is {} bytes, not {P256_RAW_SIG_LEN} (r || s)",
        raw.len()
    );
    let (r, s) = raw.split_at(P256_RAW_SIG_LEN / 2);
    let mut body = Vec::with_capacity(P256_RAW_SIG_LEN + 6);
    for int in [r, s] {
        // Minimal two's complement: no leading zeros, one 0x00 if the high bit is set.
        let first = int.iter().position(|&b| b != 0).unwrap_or(int.len() - 1);
        let int = &int[first..];
        let pad = int[0] & 0x80 != 0;
        body.push(0x02);
        body.push((int.len() + usize::from(pad)) as u8);
        if pad {
            body.push(0);
        }
        body.extend_from_slice(int);
    }
    let mut der = Vec::with_capacity(body.len() + 2);
    der.push(0x30);
    // At most 2 × (2 + 33) = 70 bytes: a short-form length.
    der.push(body.len() as u8);
    der.extend_from_slice(&body);
    Ok(der)
}

/// The uncompressed point in CKA_EC_POINT: a DER OCTET STRING around it (PKCS#11), or the
/// bare point (some older modules).
fn ec_point(attr: &[u8]) -> anyhow::Result<Vec<u8>> {
    let point = match attr {
        [0x04, len, rest @ ..]
            if usize::from(*len) == rest.len() && rest.len() == P256_POINT_LEN =>
        {
            rest
        }
        bare if bare.len() == P256_POINT_LEN => bare,
        _ => anyhow::bail!(
            "the token's public key (CKA_EC_POINT, {} bytes) is not an uncompressed P-256 point",
            attr.len()
        ),
    };
    anyhow::ensure!(
        point[0] == 0x04,
        "the token's public key is not an uncompressed P-256 point"
    );
    Ok(point.to_vec())
}

/// How the private key object is protected (what the token says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protection {
    /// CKA_SENSITIVE.
    pub sensitive: bool,
    /// CKA_EXTRACTABLE.
    pub extractable: bool,
    /// CKA_VALUE could be read.
    pub value_readable: bool,
}

/// An EC P-256 key in a PKCS#11 token, with a logged-in session to sign with.
pub struct TokenKey {
    uri: Pkcs11Uri,
    /// cryptoki's session is `Send`, not `Sync`: one signature at a time.
    session: Mutex<Session>,
    private: ObjectHandle,
    point: Vec<u8>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("uri", &self.uri.to_string())
            .finish_non_exhaustive()
    }
}

/// A PKCS#11 error, named for people where it is a common one.
fn ck(what: &str, e: CkError) -> anyhow::Error {
    let hint = match &e {
        CkError::Pkcs11(RvError::PinIncorrect, _) => ": wrong PIN",
        CkError::Pkcs11(RvError::PinLocked, _) => ": the PIN is locked",
        CkError::Pkcs11(RvError::PinLenRange | RvError::PinInvalid, _) => {
            ": the PIN is not valid for this token"
        }
        CkError::Pkcs11(RvError::UserNotLoggedIn, _) => {
            ": a PIN is needed (pin-value, pin-source or MOORING_PKCS11_PIN)"
        }
        _ => "",
    };
    anyhow::anyhow!("{what}{hint} ({e})")
}

impl TokenKey {
    /// Opens the key `uri` names; with `create` a missing one is generated in the token
    /// (module doc). Returns the key and whether it was made now.
    pub fn open(uri: &Pkcs11Uri, create: bool) -> anyhow::Result<(Self, bool)> {
        let session = open_session(uri)?;
        let (private, public, created) = match find_pair(&session, uri)? {
            Some((private, public)) => (private, public, false),
            None if create => {
                let (public, private) = generate(&session, uri)?;
                tracing::info!(key = %uri, "made the device key inside the token");
                (private, public, true)
            }
            None => anyhow::bail!(
                "no EC private key labelled {:?} on token {:?} (`mooring-agent enroll --key` makes it)",
                uri.object,
                uri.token
            ),
        };
        let attrs = session
            .get_attributes(public, &[AttributeType::EcParams, AttributeType::EcPoint])
            .map_err(|e| ck("reading the public key", e))?;
        let (mut params, mut point) = (None, None);
        for a in attrs {
            match a {
                Attribute::EcParams(p) => params = Some(p),
                Attribute::EcPoint(p) => point = Some(p),
                _ => {}
            }
        }
        anyhow::ensure!(
            params.as_deref() == Some(&P256_OID_DER[..]),
            "the key {:?} on token {:?} is not a P-256 key (only P-256 is supported)",
            uri.object,
            uri.token
        );
        let point = ec_point(&point.context("the token's public key has no CKA_EC_POINT")?)?;
        let key = Self {
            uri: uri.clone(),
            session: Mutex::new(session),
            private,
            point,
        };
        // A key found in the token (made elsewhere) must be as protected as one made here.
        let p = key.protection()?;
        anyhow::ensure!(
            p.sensitive && !p.extractable && !p.value_readable,
            "the key {:?} on token {:?} can be read out of the token (CKA_SENSITIVE {}, \
             CKA_EXTRACTABLE {}): refused; delete it and let `mooring-agent enroll --key` make one",
            uri.object,
            uri.token,
            p.sensitive,
            p.extractable
        );
        Ok((key, created))
    }

    /// The URI this key was opened with.
    pub fn uri(&self) -> &Pkcs11Uri {
        &self.uri
    }

    /// Signs `msg` (ECDSA P-256 over its SHA-256) in the token: the DER signature.
    pub fn sign_der(&self, msg: &[u8]) -> anyhow::Result<Vec<u8>> {
        let digest = ring::digest::digest(&ring::digest::SHA256, msg);
        let raw = lock(&self.session)
            .sign(&Mechanism::Ecdsa, self.private, digest.as_ref())
            .map_err(|e| ck("signing in the token", e))?;
        ecdsa_raw_to_der(&raw)
    }

    /// What the token says of the private key object (the never-extractable check).
    pub fn protection(&self) -> anyhow::Result<Protection> {
        let session = lock(&self.session);
        let attrs = session
            .get_attributes(
                self.private,
                &[AttributeType::Sensitive, AttributeType::Extractable],
            )
            .map_err(|e| ck("reading the key's attributes", e))?;
        let (mut sensitive, mut extractable) = (false, true);
        for a in attrs {
            match a {
                Attribute::Sensitive(v) => sensitive = v,
                Attribute::Extractable(v) => extractable = v,
                _ => {}
            }
        }
        // An unreadable attribute is left out of the answer (or refused).
        let value_readable = session
            .get_attributes(self.private, &[AttributeType::Value])
            .map(|v| v.iter().any(|a| matches!(a, Attribute::Value(_))))
            .unwrap_or(false);
        Ok(Protection {
            sensitive,
            extractable,
            value_readable,
        })
    }
}

/// Makes the key labelled `from` the one labelled `uri.object` (rotation): per object class, the
/// objects labelled `uri.object` are destroyed and those labelled `from` take the label. Each
/// step is idempotent, so an interrupted run is finished by running it again.
pub fn promote_key(uri: &Pkcs11Uri, from: &str) -> anyhow::Result<()> {
    let session = open_session(uri)?;
    for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
        let next = find_labelled(&session, uri, class, from)?;
        if next.is_empty() {
            // Done already (or never there): nothing to move for this class.
            continue;
        }
        for old in find_labelled(&session, uri, class, &uri.object)? {
            session
                .destroy_object(old)
                .map_err(|e| ck("destroying the old key", e))?;
        }
        for h in next {
            session
                .update_attributes(h, &[Attribute::Label(uri.object.as_bytes().to_vec())])
                .map_err(|e| ck("relabelling the new key", e))?;
        }
    }
    Ok(())
}

/// Destroys the key objects labelled `label` (a renewed key that was given up).
pub fn destroy_key(uri: &Pkcs11Uri, label: &str) -> anyhow::Result<()> {
    let session = open_session(uri)?;
    for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
        for h in find_labelled(&session, uri, class, label)? {
            session
                .destroy_object(h)
                .map_err(|e| ck("destroying the key", e))?;
        }
    }
    Ok(())
}

/// The EC key objects of `class` labelled `label` (and with `uri.id`).
fn find_labelled(
    session: &Session,
    uri: &Pkcs11Uri,
    class: ObjectClass,
    label: &str,
) -> anyhow::Result<Vec<ObjectHandle>> {
    let mut template = vec![
        Attribute::Class(class),
        Attribute::KeyType(KeyType::EC),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    if let Some(id) = &uri.id {
        template.push(Attribute::Id(id.clone()));
    }
    session
        .find_objects(&template)
        .map_err(|e| ck("searching the token", e))
}

/// A logged-in read/write session on the token `uri` names (module loaded, token found by
/// label, the user PIN given).
fn open_session(uri: &Pkcs11Uri) -> anyhow::Result<Session> {
    let module = uri.module()?;
    let ctx = Pkcs11::new(&module).map_err(|e| {
        anyhow::anyhow!(
            "loading the PKCS#11 module {}: {e} (is it installed? module-path= or {MODULE_ENV} names it)",
            module.display()
        )
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // Another key of this process opened the module already.
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(ck(
                &format!("initializing the PKCS#11 module {}", module.display()),
                e,
            ))
        }
    }
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| ck("listing the PKCS#11 slots", e))?;
    let mut labels = Vec::new();
    let mut found = None;
    for slot in slots {
        let info = ctx
            .get_token_info(slot)
            .map_err(|e| ck("reading a token's info", e))?;
        let label = info.label().trim_end().to_owned();
        if label == uri.token {
            found = Some((slot, info.login_required()));
            break;
        }
        labels.push(label);
    }
    let (slot, login_required) = found.with_context(|| {
        format!(
            "no PKCS#11 token labelled {:?} in {} (tokens: {labels:?})",
            uri.token,
            module.display()
        )
    })?;
    let session = ctx
        .open_rw_session(slot)
        .map_err(|e| ck(&format!("opening a session on token {:?}", uri.token), e))?;
    let pin = uri.pin()?;
    anyhow::ensure!(
        pin.is_some() || !login_required,
        "token {:?} needs its user PIN: add pin-source=file:/path (or pin-value=) to the pkcs11: URI, or set {PIN_ENV}",
        uri.token
    );
    if let Some(pin) = pin {
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => return Err(ck(&format!("logging in to token {:?}", uri.token), e)),
        }
    }
    Ok(session)
}

/// The private and public key objects labelled `uri.object` (and with `uri.id`), if any.
fn find_pair(
    session: &Session,
    uri: &Pkcs11Uri,
) -> anyhow::Result<Option<(ObjectHandle, ObjectHandle)>> {
    let find = |class| find_labelled(session, uri, class, &uri.object);
    let privates = find(ObjectClass::PRIVATE_KEY)?;
    let private = match privates.as_slice() {
        [] => return Ok(None),
        [one] => *one,
        _ => anyhow::bail!(
            "{} EC private keys are labelled {:?} on token {:?}: add id= to the URI to pick one",
            privates.len(),
            uri.object,
            uri.token
        ),
    };
    let publics = find(ObjectClass::PUBLIC_KEY)?;
    let public = match publics.as_slice() {
        [one] => *one,
        [] => anyhow::bail!(
            "the token has the private key {:?} but no public key object with that label (it is needed for the certificate)",
            uri.object
        ),
        _ => anyhow::bail!(
            "{} EC public keys are labelled {:?} on token {:?}: add id= to the URI to pick one",
            publics.len(),
            uri.object,
            uri.token
        ),
    };
    Ok(Some((private, public)))
}

/// Generates the P-256 key pair in the token: (public, private).
fn generate(session: &Session, uri: &Pkcs11Uri) -> anyhow::Result<(ObjectHandle, ObjectHandle)> {
    let label = Attribute::Label(uri.object.as_bytes().to_vec());
    let mut public = vec![
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::KeyType(KeyType::EC),
        Attribute::Verify(true),
        Attribute::EcParams(P256_OID_DER.to_vec()),
        label.clone(),
    ];
    let mut private = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::KeyType(KeyType::EC),
        label,
    ];
    if let Some(id) = &uri.id {
        public.push(Attribute::Id(id.clone()));
        private.push(Attribute::Id(id.clone()));
    }
    session
        .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
        .map_err(|e| {
            ck(
                &format!("generating a P-256 key in token {:?}", uri.token),
                e,
            )
        })
}

impl rcgen::PublicKeyData for TokenKey {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for TokenKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.sign_der(msg).map_err(|e| {
            tracing::warn!(error = %format!("{e:#}"), "signing the CSR in the token failed");
            rcgen::Error::RemoteKeyError
        })
    }
}

/// The token key as rustls' client authentication key.
#[derive(Debug)]
pub struct TlsKey(pub Arc<TokenKey>);

impl rustls::sign::SigningKey for TlsKey {
    fn choose_scheme(
        &self,
        offered: &[rustls::SignatureScheme],
    ) -> Option<Box<dyn rustls::sign::Signer>> {
        offered
            .contains(&rustls::SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| Box::new(TlsKey(self.0.clone())) as Box<dyn rustls::sign::Signer>)
    }

    fn public_key(&self) -> Option<rustls::pki_types::SubjectPublicKeyInfoDer<'_>> {
        Some(rcgen::PublicKeyData::subject_public_key_info(&*self.0).into())
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        rustls::SignatureAlgorithm::ECDSA
    }
}

impl rustls::sign::Signer for TlsKey {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.0
            .sign_der(message)
            .map_err(|e| rustls::Error::General(format!("{e:#}")))
    }

    fn scheme(&self) -> rustls::SignatureScheme {
        rustls::SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

/// Always presents one certificate chain and token key.
#[derive(Debug)]
pub struct ClientCert(pub Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "pkcs11:token=mooring;object=device?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=1234";

    #[test]
    fn uris_parse() {
        let KeyRef::Pkcs11(u) = KeyRef::parse(GOOD).expect("good") else {
            panic!("not pkcs11")
        };
        assert_eq!(u.token, "mooring");
        assert_eq!(u.object, "device");
        assert_eq!(u.id, None);
        assert_eq!(
            u.module_path.as_deref(),
            Some(Path::new("/usr/lib/softhsm/libsofthsm2.so"))
        );
        assert_eq!(u.pin, Some(PinSource::Value("1234".into())));
        // The PIN stays out of logs.
        assert!(!u.to_string().contains("1234"), "{u}");
        assert!(!format!("{u:?}").contains("1234"), "{u:?}");
        // Percent-decoding, id bytes, type, pin-source.
        let u = Pkcs11Uri::parse(
            "pkcs11:token=My%20Token;object=dev%3Bkey;id=%01%ff;type=private?pin-source=file:/run/pin",
        )
        .expect("encoded");
        assert_eq!(u.token, "My Token");
        assert_eq!(u.object, "dev;key");
        assert_eq!(u.id, Some(vec![1, 0xff]));
        assert_eq!(u.pin, Some(PinSource::File("/run/pin".into())));
        assert_eq!(u.module_path, None);
        assert_eq!(
            Pkcs11Uri::parse(&u.to_string()).expect("round trip").token,
            "My Token"
        );
        // A path is a file.
        assert_eq!(
            KeyRef::parse("/etc/mooring-agent/device.key").expect("file"),
            KeyRef::File("/etc/mooring-agent/device.key".into())
        );
    }

    #[test]
    fn bad_uris_are_refused_clearly() {
        for (uri, says) in [
            ("pkcs11:object=device", "token= is required"),
            ("pkcs11:token=mooring", "object= is required"),
            (
                "pkcs11:token=a;object=b;slot-id=1",
                "unsupported path attribute",
            ),
            (
                "pkcs11:token=a;object=b?pin=1",
                "unsupported query attribute",
            ),
            ("pkcs11:token=a;object=b;token=c", "given twice"),
            ("pkcs11:token=a%zz;object=b", "bad percent-escape"),
            ("pkcs11:token=a;object=%4", "bad percent-escape"),
            ("pkcs11:token=a;object", "not name=value"),
            ("pkcs11:token=a;object=b;type=public", "type must be"),
            (
                "pkcs11:token=a;object=b?pin-value=1&pin-source=file:/p",
                "not both",
            ),
            ("pkcs11:token=a;object=b?pin-source=relative", "absolute"),
            ("pkcs11:token=;object=b", "token= is empty"),
            ("pkcs11:token=%ff;object=b", "not UTF-8"),
        ] {
            let err = Pkcs11Uri::parse(uri).expect_err(uri);
            assert!(format!("{err:#}").contains(says), "{uri}: {err:#}");
        }
        let long = format!("pkcs11:token=a;object={}", "x".repeat(URI_LEN_MAX));
        assert!(Pkcs11Uri::parse(&long).is_err());
        assert!(KeyRef::parse("").is_err());
    }

    #[test]
    fn a_missing_module_is_named() {
        let u = Pkcs11Uri::parse("pkcs11:token=a;object=b?module-path=/nonexistent/lib.so")
            .expect("uri");
        let err = TokenKey::open(&u, false).expect_err("no module");
        assert!(
            format!("{err:#}").contains("/nonexistent/lib.so"),
            "{err:#}"
        );
    }

    #[test]
    fn raw_signatures_become_der_that_verifies() {
        use ring::signature::{self, KeyPair as _};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .expect("key");
        let key = signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .expect("key");
        let public = signature::UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_ASN1,
            key.public_key().as_ref().to_vec(),
        );
        // Enough signatures to meet r or s with the high bit set and without.
        for i in 0..64u8 {
            let msg = [i; 17];
            let raw = key.sign(&rng, &msg).expect("sign");
            let der = ecdsa_raw_to_der(raw.as_ref()).expect("der");
            public.verify(&msg, &der).expect("verifies");
        }
        // Leading zeros are dropped, a high bit gets a 0x00.
        let mut raw = [0u8; 64];
        raw[31] = 1;
        raw[32] = 0x80;
        assert_eq!(
            ecdsa_raw_to_der(&raw).expect("der"),
            [
                &[0x30, 0x26, 0x02, 0x01, 0x01, 0x02, 0x21, 0x00, 0x80][..],
                &[0u8; 31]
            ]
            .concat()
        );
        assert!(ecdsa_raw_to_der(&[0u8; 63]).is_err());
    }

    #[test]
    fn ec_points_are_unwrapped() {
        let mut point = vec![0x04];
        point.extend_from_slice(&[7u8; 64]);
        let wrapped = [&[0x04, 0x41][..], &point].concat();
        assert_eq!(ec_point(&wrapped).expect("wrapped"), point);
        assert_eq!(ec_point(&point).expect("bare"), point);
        assert!(ec_point(&point[..64]).is_err());
    }
}
