//! The fleet PKI: the fleet CA, the server certificate, device certificates, TLS configs.
//!
//! Files in the data dir: `ca.crt`, `ca.key` (0600), `server.crt`, `server.key` (0600). They are
//! created on first start and reused afterwards. Device certificates are issued with a random
//! 128-bit serial, our own validity and extensions (CN = device id, clientAuth only); nothing is
//! copied from a request. Devices are identified by the certificate's CN, and the registry
//! pins the certificate's SHA-256 so a deleted-then-recreated id refuses the old certificate.

use anyhow::{anyhow, Context};
use mooring_store::ClusterStore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig as TlsServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use time::{Duration, OffsetDateTime};

const CA_VALIDITY_DAYS: i64 = 365 * 20;
const SERVER_VALIDITY_DAYS: i64 = 365 * 5;

/// A certificate issued to a device, as returned once by the API.
pub struct IssuedCert {
    pub certificate_pem: String,
    /// The key the server made (`None`: the certificate is for a key from a CSR, which never
    /// left the device).
    pub private_key_pem: Option<String>,
    pub sha256_hex: String,
    pub serial_hex: String,
    pub not_after_ms: u64,
    /// The issuing fleet CA as the ledger names it (`fleet:<hash prefix>`).
    pub issuer: String,
}

/// The fleet CA plus the server's own certificate, loaded from (or created in) the data dir or
/// the cluster's database.
///
/// During a fleet CA rollover ([`Pki::begin_rollover`]) there are two CAs: the new one issues
/// every certificate, the previous one (which signed the server certificate devices still
/// verify) stays trusted. [`Pki::retire_previous`] ends the overlap: a new server certificate
/// from the new CA, and the previous CA is no longer trusted.
pub struct Pki {
    /// The CA that issues device certificates.
    ca: FleetCa,
    /// During a rollover: the previous CA, still trusted for client certificates; it signed the
    /// server certificate.
    previous: Option<FleetCa>,
    server_cert_pem: String,
    server_key_pem: String,
}

/// One fleet CA: its certificate and what signs with its key.
struct FleetCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// How the ledger names certificates it issued ([`mooring_store::cert_issuer_of_fleet_ca`]).
    label: String,
    /// Its subject (DER), which its certificates name as issuer.
    subject_der: Vec<u8>,
}

impl FleetCa {
    fn new(cert_pem: String, key_pem: &str) -> anyhow::Result<FleetCa> {
        let der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).context("parsing a fleet CA")?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| anyhow!("parsing a fleet CA: {e}"))?;
        anyhow::ensure!(
            key_matches(key_pem, cert.public_key().raw),
            "the fleet CA's private key does not belong to its certificate ({})",
            cert.subject()
        );
        let issuer = issuer(&cert_pem, key_pem)?;
        Ok(FleetCa {
            label: mooring_store::cert_issuer_of_fleet_ca(&cert_sha256_hex(der.as_ref())),
            subject_der: cert.subject().as_raw().to_vec(),
            cert_pem,
            issuer,
        })
    }

    fn der(&self) -> anyhow::Result<CertificateDer<'static>> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).context("parsing a fleet CA")
    }

    /// The rollover's facts of this CA.
    fn info(&self) -> anyhow::Result<FleetCaInfo> {
        let der = self.der()?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| anyhow!("parsing a fleet CA: {e}"))?;
        let ms = |t: x509_parser::time::ASN1Time| {
            u64::try_from(t.timestamp())
                .unwrap_or(0)
                .saturating_mul(1000)
        };
        Ok(FleetCaInfo {
            sha256: cert_sha256_hex(der.as_ref()),
            subject: cert.subject().to_string(),
            not_before_ms: ms(cert.validity().not_before),
            not_after_ms: ms(cert.validity().not_after),
        })
    }
}

/// What the API shows of a fleet CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetCaInfo {
    pub sha256: String,
    pub subject: String,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
}

/// A fleet CA's `notBefore` lies this far before its creation (clock skew between the server
/// and devices).
const CA_NOT_BEFORE_SLACK_MS: u64 = 3_600_000;

/// Writes a data-dir file, 0600 (keys are secret; certificates are public, but everything in
/// the data dir is the server user's only), and syncs it. A key is created new (never
/// overwritten); a certificate `replace`s what is there.
pub(crate) fn write_private(path: &Path, contents: &str, replace: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(0o600);
    if replace {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte
    SerialNumber::from_slice(&bytes)
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Mooring");
    dn.push(DnType::CommonName, cn);
    dn
}

/// SHA-256 of a DER certificate, lower-case hex: the registry's pin for a device certificate.
/// Longest certificate signing request accepted, in bytes of PEM.
pub const CSR_PEM_LEN_MAX: usize = 16 * 1024;

/// The public key of a PEM certificate signing request (PKCS#10), whose signature must verify
/// (the requester holds the private key). Only the key is used; the CSR's subject, extensions
/// and attributes are ignored. `Err` says what is wrong, for a 400.
pub fn parse_csr(csr_pem: &str) -> Result<rcgen::PublicKey, String> {
    if csr_pem.len() > CSR_PEM_LEN_MAX {
        return Err(format!("csr_pem is longer than {CSR_PEM_LEN_MAX} bytes"));
    }
    rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map(|csr| csr.public_key)
        .map_err(|e| match e {
            rcgen::Error::InvalidCertificationRequestSignature => {
                "the CSR's signature does not verify with its public key".to_owned()
            }
            rcgen::Error::UnsupportedSignatureAlgorithm => {
                "the CSR's key or signature algorithm is not supported (use ECDSA P-256/P-384, Ed25519 or RSA)".to_owned()
            }
            _ => "csr_pem is not a PEM certificate signing request (-----BEGIN CERTIFICATE REQUEST-----)".to_owned(),
        })
}

pub fn cert_sha256_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The CN of a DER certificate, if it has exactly one.
pub fn cert_common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut cns = cert.subject().iter_common_name();
    let cn = cns.next()?.as_str().ok()?.to_owned();
    if cns.next().is_some() {
        return None;
    }
    Some(cn)
}

impl Pki {
    /// Loads the CA and server certificate from `dir`, creating them on first start (and
    /// finishing a retirement a crash interrupted, [`Pki::retire_previous_in_dir`]).
    /// Returns the PKI and whether it was created now.
    pub fn load_or_create(
        dir: &Path,
        server_names: &[String],
        now: OffsetDateTime,
    ) -> anyhow::Result<(Pki, bool)> {
        let paths = PkiPaths::new(dir);
        paths.finish_retirement()?;
        let created = !paths.ca_key.exists();
        if created {
            let (ca_cert_pem, ca_key_pem) = new_ca(now, false)?;
            write_private(&paths.ca_key, &ca_key_pem, false)?;
            write_private(&paths.ca_cert, &ca_cert_pem, true)?;
        }
        let first = FleetCa::new(read(&paths.ca_cert)?, &read(&paths.ca_key)?)?;
        if !paths.server_key.exists() {
            let (cert_pem, key_pem) = new_server_cert(&first.issuer, server_names, now)?;
            write_private(&paths.server_key, &key_pem, false)?;
            write_private(&paths.server_cert, &cert_pem, true)?;
        }
        // A rollover in progress: both `ca.next.*` files (the new CA) are there.
        let (ca, previous) = if paths.next_ca_key.exists() && paths.next_ca_cert.exists() {
            let next = FleetCa::new(read(&paths.next_ca_cert)?, &read(&paths.next_ca_key)?)?;
            (next, Some(first))
        } else {
            (first, None)
        };
        Ok((
            Pki {
                ca,
                previous,
                server_cert_pem: read(&paths.server_cert)?,
                server_key_pem: read(&paths.server_key)?,
            },
            created,
        ))
    }

    /// Begins a rollover of the fleet CA kept in `dir`: a new CA (`ca.next.crt`, `ca.next.key`)
    /// issues from now on, the current one stays trusted and keeps signing the server
    /// certificate. `Err` if a rollover is in progress already.
    pub fn begin_rollover_in_dir(
        dir: &Path,
        server_names: &[String],
        now: OffsetDateTime,
    ) -> anyhow::Result<Pki> {
        let paths = PkiPaths::new(dir);
        anyhow::ensure!(!paths.next_ca_key.exists(), "a rollover is in progress");
        let (cert_pem, key_pem) = new_ca(now, true)?;
        // The certificate first: a crash before the key leaves a lone `ca.next.crt`, which the
        // next attempt overwrites (a rollover needs both files).
        write_private(&paths.next_ca_cert, &cert_pem, true)?;
        // The key appears whole or not at all (a torn key file would stop the next start).
        let tmp = dir.join("ca.next.key.tmp");
        write_private(&tmp, &key_pem, true)?;
        rename(&tmp, &paths.next_ca_key)?;
        sync_dir(dir)?;
        Ok(Pki::load_or_create(dir, server_names, now)?.0)
    }

    /// Ends the rollover of the CA kept in `dir`: a new server certificate from the new CA,
    /// then the new CA replaces the previous one (`ca.crt`, `ca.key`), which is no longer
    /// trusted. Each step is a rename; a crash between them is finished at the next start.
    pub fn retire_previous_in_dir(
        dir: &Path,
        server_names: &[String],
        now: OffsetDateTime,
    ) -> anyhow::Result<Pki> {
        let paths = PkiPaths::new(dir);
        anyhow::ensure!(
            paths.next_ca_key.exists() && paths.next_ca_cert.exists(),
            "no rollover is in progress"
        );
        let next = FleetCa::new(read(&paths.next_ca_cert)?, &read(&paths.next_ca_key)?)?;
        let (cert_pem, key_pem) = new_server_cert(&next.issuer, server_names, now)?;
        write_private(&paths.next_server_key, &key_pem, true)?;
        write_private(&paths.next_server_cert, &cert_pem, true)?;
        sync_dir(dir)?;
        // From here on the retirement is decided: `ca.next.crt` gone means "finish it".
        rename(&paths.next_ca_cert, &paths.ca_cert)?;
        paths.finish_retirement()?;
        Ok(Pki::load_or_create(dir, server_names, now)?.0)
    }

    /// The cluster's PKI, kept in the shared database under [`SHARED_PKI_KEY`] with both private
    /// keys encrypted under `key`, so every node presents the same server certificate and trusts
    /// the same CA. The first node to start on an empty database creates it; nodes starting
    /// together race through [`ClusterStore::put_value_once`], so exactly one CA is ever stored
    /// and every node uses it. Returns the PKI and whether this call created it.
    pub async fn load_or_create_shared(
        store: &dyn ClusterStore,
        key: &SecretKey,
        server_names: &[String],
        now: OffsetDateTime,
    ) -> anyhow::Result<(Pki, bool)> {
        let stored = store
            .get_value(SHARED_PKI_KEY)
            .await
            .context("reading the cluster's PKI from the database")?;
        let (bytes, created) = match stored {
            Some(b) => (b, false),
            None => {
                let (ca_cert_pem, ca_key_pem) = new_ca(now, false)?;
                let ca_issuer = issuer(&ca_cert_pem, &ca_key_pem)?;
                let (server_cert_pem, server_key_pem) =
                    new_server_cert(&ca_issuer, server_names, now)?;
                let ours = serde_json::to_vec(&SharedPki {
                    version: 1,
                    ca_cert_pem,
                    ca_key: key.seal(ca_key_pem.as_bytes(), b"ca.key")?,
                    server_cert_pem,
                    server_key: key.seal(server_key_pem.as_bytes(), b"server.key")?,
                    next_ca_cert_pem: None,
                    next_ca_key: None,
                })?;
                let stored = store
                    .put_value_once(SHARED_PKI_KEY, ours.clone())
                    .await
                    .context("storing the cluster's PKI in the database")?;
                let created = stored == ours;
                (stored, created)
            }
        };
        Ok((Pki::from_shared(&bytes, key)?, created))
    }

    /// The cluster's PKI as stored now (`bytes`, to compare with a later read).
    pub async fn read_shared(
        store: &dyn ClusterStore,
        key: &SecretKey,
    ) -> anyhow::Result<(Pki, Vec<u8>)> {
        let bytes = store
            .get_value(SHARED_PKI_KEY)
            .await
            .context("reading the cluster's PKI from the database")?
            .context("the cluster's PKI is not in the database")?;
        Ok((Pki::from_shared(&bytes, key)?, bytes))
    }

    /// The cluster's PKI from the stored bytes of [`SHARED_PKI_KEY`].
    pub(crate) fn from_shared(bytes: &[u8], key: &SecretKey) -> anyhow::Result<Pki> {
        let shared = SharedPki::parse(bytes)?;
        let first = FleetCa::new(shared.ca_cert_pem, &key.open(&shared.ca_key, b"ca.key")?)?;
        let (ca, previous) = match (shared.next_ca_cert_pem, shared.next_ca_key) {
            (Some(cert), Some(sealed)) => {
                let next = FleetCa::new(cert, &key.open(&sealed, b"ca.next.key")?)?;
                (next, Some(first))
            }
            _ => (first, None),
        };
        Ok(Pki {
            ca,
            previous,
            server_cert_pem: shared.server_cert_pem,
            server_key_pem: key.open(&shared.server_key, b"server.key")?,
        })
    }

    /// [`Pki::begin_rollover_in_dir`] for the cluster's PKI: the new CA is stored beside the
    /// current one by a compare-and-set, so of two nodes beginning at once one wins and the
    /// other is told a rollover is in progress.
    pub async fn begin_rollover_shared(
        store: &dyn ClusterStore,
        key: &SecretKey,
        now: OffsetDateTime,
    ) -> anyhow::Result<Result<(Pki, Vec<u8>), RolloverRefused>> {
        let (_, bytes) = Pki::read_shared(store, key).await?;
        let mut shared = SharedPki::parse(&bytes)?;
        if shared.next_ca_cert_pem.is_some() {
            return Ok(Err(RolloverRefused::InProgress));
        }
        let (cert_pem, key_pem) = new_ca(now, true)?;
        shared.next_ca_cert_pem = Some(cert_pem);
        shared.next_ca_key = Some(key.seal(key_pem.as_bytes(), b"ca.next.key")?);
        Pki::replace_shared(store, key, &bytes, &shared, RolloverRefused::InProgress).await
    }

    /// [`Pki::retire_previous_in_dir`] for the cluster's PKI, by a compare-and-set; only if
    /// the CA issuing there is still the one the caller checked (`issuer_label`: another node
    /// may have taken a step this node has not read yet).
    pub async fn retire_previous_shared(
        store: &dyn ClusterStore,
        key: &SecretKey,
        issuer_label: &str,
        server_names: &[String],
        now: OffsetDateTime,
    ) -> anyhow::Result<Result<(Pki, Vec<u8>), RolloverRefused>> {
        let (pki, bytes) = Pki::read_shared(store, key).await?;
        if !pki.rolling_over() || pki.issuer_label() != issuer_label {
            return Ok(Err(RolloverRefused::NotInProgress));
        }
        let mut shared = SharedPki::parse(&bytes)?;
        let (Some(cert), Some(sealed)) =
            (shared.next_ca_cert_pem.take(), shared.next_ca_key.take())
        else {
            return Ok(Err(RolloverRefused::NotInProgress));
        };
        let (server_cert_pem, server_key_pem) = new_server_cert(&pki.ca.issuer, server_names, now)?;
        shared.ca_cert_pem = cert;
        // Sealed again under the label of the one CA key.
        shared.ca_key = key.seal(key.open(&sealed, b"ca.next.key")?.as_bytes(), b"ca.key")?;
        shared.server_cert_pem = server_cert_pem;
        shared.server_key = key.seal(server_key_pem.as_bytes(), b"server.key")?;
        Pki::replace_shared(store, key, &bytes, &shared, RolloverRefused::NotInProgress).await
    }

    async fn replace_shared(
        store: &dyn ClusterStore,
        key: &SecretKey,
        before: &[u8],
        shared: &SharedPki,
        raced: RolloverRefused,
    ) -> anyhow::Result<Result<(Pki, Vec<u8>), RolloverRefused>> {
        let bytes = serde_json::to_vec(shared)?;
        if !store
            .replace_value(SHARED_PKI_KEY, before, bytes.clone())
            .await
            .context("storing the cluster's PKI in the database")?
        {
            // Another node changed it first.
            return Ok(Err(raced));
        }
        Ok(Ok((Pki::from_shared(&bytes, key)?, bytes)))
    }

    /// The CA that issues now, and during a rollover the previous one.
    pub fn fleet_cas(&self) -> anyhow::Result<(FleetCaInfo, Option<FleetCaInfo>)> {
        Ok((
            self.ca.info()?,
            self.previous.as_ref().map(FleetCa::info).transpose()?,
        ))
    }

    /// Whether a rollover is in progress (two CAs).
    pub fn rolling_over(&self) -> bool {
        self.previous.is_some()
    }

    /// How the ledger names certificates the issuing CA issued.
    pub fn issuer_label(&self) -> &str {
        &self.ca.label
    }

    /// The ledger's name of the fleet CA that issued the PEM certificate `cert_pem` (matched by
    /// issuer name: every fleet CA has its own), if one of this PKI's did.
    pub fn issuer_label_of(&self, cert_pem: &str) -> Option<String> {
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
        let issuer = cert.issuer().as_raw();
        std::iter::once(&self.ca)
            .chain(self.previous.as_ref())
            .find(|ca| ca.subject_der == issuer)
            .map(|ca| ca.label.clone())
    }

    /// The fleet's trust bundle (PEM): the CA, and during a rollover the previous one too.
    pub fn ca_pem(&self) -> String {
        match &self.previous {
            Some(p) => format!("{}{}", p.cert_pem, self.ca.cert_pem),
            None => self.ca.cert_pem.clone(),
        }
    }

    /// Issues a certificate and a fresh key for device `id` (the quick-start path: the key is
    /// made here and handed out once).
    pub fn issue_device_cert(
        &self,
        id: &str,
        now: OffsetDateTime,
        validity_days: u32,
    ) -> anyhow::Result<IssuedCert> {
        let key = KeyPair::generate()?;
        let mut issued = self.issue_device_cert_for_key(id, &key, now, validity_days)?;
        issued.private_key_pem = Some(key.serialize_pem());
        Ok(issued)
    }

    /// Issues a certificate for device `id` to the public key `key` (from [`parse_csr`]). The
    /// server decides everything in it: its own serial, validity, key usage (digital
    /// signature, client authentication) and CN = `id`; nothing is copied from a CSR.
    pub fn issue_device_cert_for_key(
        &self,
        id: &str,
        key: &impl rcgen::PublicKeyData,
        now: OffsetDateTime,
        validity_days: u32,
    ) -> anyhow::Result<IssuedCert> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(id);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let serial = random_serial();
        let serial_hex = hex::encode(serial.as_ref());
        params.serial_number = Some(serial);
        params.not_before = now - Duration::minutes(5);
        let not_after = now + Duration::days(i64::from(validity_days));
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(key, &self.ca.issuer)?;
        Ok(IssuedCert {
            certificate_pem: cert.pem(),
            private_key_pem: None,
            sha256_hex: cert_sha256_hex(cert.der()),
            serial_hex,
            not_after_ms: (not_after.unix_timestamp_nanos() / 1_000_000).max(0) as u64,
            issuer: self.ca.label.clone(),
        })
    }

    fn roots(&self) -> anyhow::Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der()?)?;
        if let Some(p) = &self.previous {
            roots.add(p.der()?)?;
        }
        Ok(roots)
    }

    fn server_chain(
        &self,
    ) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let chain = CertificateDer::pem_slice_iter(self.server_cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("parsing server.crt")?;
        let key = PrivateKeyDer::from_pem_slice(self.server_key_pem.as_bytes())
            .context("parsing server.key")?;
        Ok((chain, key))
    }

    /// TLS for the MQTT listener: a client certificate chained to the fleet CA is verified when
    /// presented; a client without one may still finish the handshake but must then present a
    /// service token at CONNECT (devices never get in without a certificate).
    pub fn mqtt_tls_config(&self) -> anyhow::Result<Arc<TlsServerConfig>> {
        self.mqtt_tls_config_with(&[])
    }

    /// [`Pki::mqtt_tls_config`] trusting, besides the fleet CA, the CA certificates `extra`
    /// (DER; the enabled registered CAs) for client certificates.
    pub fn mqtt_tls_config_with(&self, extra: &[Vec<u8>]) -> anyhow::Result<Arc<TlsServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = self.roots()?;
        for der in extra {
            roots.add(CertificateDer::from(der.clone()))?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()?;
        let (chain, key) = self.server_chain()?;
        let config = TlsServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        // No ALPN list: clients offering "mqtt" (or nothing) are both accepted.
        Ok(Arc::new(config))
    }

    /// The server certificate and its signing key, for [`ServerCert`].
    pub fn certified_key(&self) -> anyhow::Result<Arc<rustls::sign::CertifiedKey>> {
        let provider = rustls::crypto::ring::default_provider();
        let (chain, key) = self.server_chain()?;
        let signing = provider
            .key_provider
            .load_private_key(key)
            .context("loading server.key")?;
        Ok(Arc::new(rustls::sign::CertifiedKey::new(chain, signing)))
    }

    /// TLS for the HTTP API (`--http-tls`): server certificate only, the one `cert` holds (a
    /// fleet CA retirement replaces it without a restart).
    pub fn http_tls_config(cert: Arc<ServerCert>) -> anyhow::Result<Arc<TlsServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = TlsServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(cert);
        // HTTP/1.1 only: the API listener's bounds (header read and idle keep-alive timeout) are
        // hyper HTTP/1 settings; hyper's HTTP/2 server has no idle timeout.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The server certificate in force for the HTTPS API listener, replaced when the PKI is.
pub struct ServerCert(std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>);

impl ServerCert {
    pub fn new(pki: &Pki) -> anyhow::Result<Arc<ServerCert>> {
        Ok(Arc::new(ServerCert(std::sync::RwLock::new(
            pki.certified_key()?,
        ))))
    }

    /// Puts `pki`'s server certificate in force.
    pub fn set(&self, pki: &Pki) -> anyhow::Result<()> {
        *mooring_proto::sync::write(&self.0) = pki.certified_key()?;
        Ok(())
    }
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerCert")
    }
}

impl rustls::server::ResolvesServerCert for ServerCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(mooring_proto::sync::read(&self.0).clone())
    }
}

/// A new self-signed fleet CA: `(certificate PEM, private key PEM)`. The first is named
/// "Mooring fleet CA"; a rollover's gets the date and a random suffix, so every fleet CA has
/// its own name (certificates name their issuer by it, [`Pki::issuer_label_of`]).
fn new_ca(now: OffsetDateTime, rollover: bool) -> anyhow::Result<(String, String)> {
    let ca_key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = if rollover {
        let suffix: u16 = rand::random();
        dn(&format!(
            "Mooring fleet CA {:04}-{:02}-{:02} {suffix:04x}",
            now.year(),
            u8::from(now.month()),
            now.day()
        ))
    } else {
        dn("Mooring fleet CA")
    };
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial());
    params.not_before = now - Duration::milliseconds(CA_NOT_BEFORE_SLACK_MS as i64);
    params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
    let ca = params.self_signed(&ca_key)?;
    Ok((ca.pem(), ca_key.serialize_pem()))
}

fn issuer(ca_cert_pem: &str, ca_key_pem: &str) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let ca_key = KeyPair::from_pem(ca_key_pem).context("parsing the CA key")?;
    Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).context("parsing the CA certificate")
}

/// A new server certificate for `server_names`, signed by the CA: `(certificate PEM, key PEM)`.
fn new_server_cert(
    ca: &Issuer<'static, KeyPair>,
    server_names: &[String],
    now: OffsetDateTime,
) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(server_names.first().map_or("localhost", |s| s));
    params.subject_alt_names = server_names
        .iter()
        .map(|name| match name.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => {
                Ok(SanType::DnsName(name.clone().try_into().map_err(|e| {
                    anyhow!("invalid --server-name {name:?}: {e}")
                })?))
            }
        })
        .collect::<anyhow::Result<_>>()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.serial_number = Some(random_serial());
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(SERVER_VALIDITY_DAYS);
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, ca)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Key of the cluster's PKI in [`ClusterStore`]'s values.
pub const SHARED_PKI_KEY: &str = "pki.v1";

/// The cluster's PKI as stored: certificates in clear, private keys sealed with the cluster
/// key (hex of nonce ‖ AES-256-GCM ciphertext and tag).
/// During a rollover the new CA is stored beside it (`next_*`; absent otherwise, so a PKI
/// without one reads as before).
#[derive(serde::Serialize, serde::Deserialize)]
struct SharedPki {
    version: u32,
    ca_cert_pem: String,
    ca_key: String,
    server_cert_pem: String,
    server_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next_ca_cert_pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next_ca_key: Option<String>,
}

impl SharedPki {
    fn parse(bytes: &[u8]) -> anyhow::Result<SharedPki> {
        let shared: SharedPki = serde_json::from_slice(bytes)
            .context("the cluster's PKI in the database is corrupt")?;
        anyhow::ensure!(
            shared.version == 1,
            "the cluster's PKI in the database has format {}, this build reads 1",
            shared.version
        );
        Ok(shared)
    }
}

/// Why a rollover step was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloverRefused {
    /// Begin: one is in progress already (or began on another node just now).
    InProgress,
    /// Retire: none is in progress (or it was retired on another node just now).
    NotInProgress,
}

/// The cluster key (`[cluster] secret_key_file`): 32 bytes every node has, sealing the private
/// keys the cluster keeps in its database.
pub struct SecretKey {
    aead: ring::aead::LessSafeKey,
    /// The key the cluster's bus messages are signed with, derived from the same 32 bytes.
    bus: ring::hmac::Key,
    /// The key OpenID Connect login states are sealed with (derived likewise), so a login
    /// begun on one node finishes on any.
    oidc_state: [u8; 32],
    /// The key OTA download tokens are signed with (derived likewise).
    ota_token: ring::hmac::Key,
    /// The key devices' local keys are derived with (derived likewise).
    local: ring::hmac::Key,
}

impl SecretKey {
    /// Reads a key file: 64 hex digits (surrounding white space ignored). Refused if others can
    /// read it (mode `& 0o077`), like ssh refuses a readable private key.
    pub fn from_file(path: &Path) -> anyhow::Result<SecretKey> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path)
            .with_context(|| format!("reading the cluster key file {}", path.display()))?;
        let mode = meta.permissions().mode() & 0o777;
        anyhow::ensure!(
            mode & 0o077 == 0,
            "the cluster key file {} is readable by others (mode {mode:o}); chmod 600 it",
            path.display()
        );
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the cluster key file {}", path.display()))?;
        SecretKey::from_hex(text.trim()).with_context(|| {
            format!(
                "the cluster key file {} must hold 64 hex digits (openssl rand -hex 32)",
                path.display()
            )
        })
    }

    pub fn from_hex(text: &str) -> anyhow::Result<SecretKey> {
        let bytes = hex::decode(text).map_err(|e| anyhow!("not hex: {e}"))?;
        anyhow::ensure!(bytes.len() == 32, "{} bytes, not 32", bytes.len());
        let key = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &bytes)
            .map_err(|_| anyhow!("not an AES-256 key"))?;
        // A separate key for signing, so one key never serves two algorithms.
        let derive = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes);
        let bus_bytes = ring::hmac::sign(&derive, b"mooring cluster bus signing key v1");
        let mut oidc_state = [0u8; 32];
        oidc_state.copy_from_slice(
            &ring::hmac::sign(&derive, b"mooring oidc state key v1").as_ref()[..32],
        );
        let ota_token_bytes = ring::hmac::sign(&derive, b"mooring ota download token key v1");
        let local_bytes = ring::hmac::sign(&derive, b"mooring device local key v1");
        Ok(SecretKey {
            local: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, local_bytes.as_ref()),
            ota_token: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, ota_token_bytes.as_ref()),
            aead: ring::aead::LessSafeKey::new(key),
            bus: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, bus_bytes.as_ref()),
            oidc_state,
        })
    }

    /// The key OpenID Connect login states are sealed with.
    pub fn oidc_state_key(&self) -> [u8; 32] {
        self.oidc_state
    }

    /// The key OTA download tokens are signed with (HMAC-SHA256, derived from the cluster key),
    /// so any node verifies a token another node minted.
    pub fn ota_token_key(&self) -> ring::hmac::Key {
        self.ota_token.clone()
    }

    /// The key devices' local keys are derived with (HMAC-SHA256, derived from the cluster key),
    /// so every node hands out the same key for a device.
    pub fn local_key_key(&self) -> ring::hmac::Key {
        self.local.clone()
    }

    /// The key every node signs its bus messages with (HMAC-SHA256).
    pub fn bus_key(&self) -> ring::hmac::Key {
        self.bus.clone()
    }

    /// `plain` sealed under the key, bound to `label` (a value moved to another label does not
    /// open): hex of a random 96-bit nonce followed by the ciphertext and tag.
    pub(crate) fn seal(&self, plain: &[u8], label: &[u8]) -> anyhow::Result<String> {
        let nonce_bytes: [u8; 12] = rand::random();
        let mut buf = plain.to_vec();
        self.aead
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce_bytes),
                ring::aead::Aad::from(label),
                &mut buf,
            )
            .map_err(|_| anyhow!("sealing failed"))?;
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&buf);
        Ok(hex::encode(out))
    }

    pub(crate) fn open(&self, sealed: &str, label: &[u8]) -> anyhow::Result<String> {
        let wrong = || {
            anyhow!(
                "cannot decrypt the cluster's {} from the database: the cluster key file differs \
                 from the one the first node used (every node needs the same key)",
                String::from_utf8_lossy(label)
            )
        };
        let mut bytes = hex::decode(sealed).map_err(|_| wrong())?;
        if bytes.len() < 12 {
            return Err(wrong());
        }
        let mut body = bytes.split_off(12);
        let nonce: [u8; 12] = bytes.try_into().map_err(|_| wrong())?;
        let plain = self
            .aead
            .open_in_place(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(label),
                &mut body,
            )
            .map_err(|_| wrong())?;
        String::from_utf8(plain.to_vec()).map_err(|_| wrong())
    }
}

/// Where the PKI files live inside the data dir. `ca.next.*`: the new CA of a rollover in
/// progress; `server.next.*`: the server certificate a retirement is putting in place.
pub struct PkiPaths {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub next_ca_cert: PathBuf,
    pub next_ca_key: PathBuf,
    pub next_server_cert: PathBuf,
    pub next_server_key: PathBuf,
    dir: PathBuf,
}

impl PkiPaths {
    pub fn new(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            next_ca_cert: dir.join("ca.next.crt"),
            next_ca_key: dir.join("ca.next.key"),
            next_server_cert: dir.join("server.next.crt"),
            next_server_key: dir.join("server.next.key"),
            dir: dir.to_owned(),
        }
    }

    /// Finishes a retirement ([`Pki::retire_previous_in_dir`]) from wherever a crash left it.
    /// Its renames in order: `ca.next.crt` → `ca.crt` (the decision), `ca.next.key` → `ca.key`,
    /// `server.next.key` → `server.key`, `server.next.crt` → `server.crt`. Without the
    /// decision, leftover `server.next.*` files are an unfinished attempt and go.
    fn finish_retirement(&self) -> anyhow::Result<()> {
        if self.next_ca_cert.exists() {
            for stale in [&self.next_server_key, &self.next_server_cert] {
                if stale.exists() {
                    std::fs::remove_file(stale)
                        .with_context(|| format!("removing {}", stale.display()))?;
                }
            }
            return Ok(());
        }
        if self.next_ca_key.exists() {
            // Decided (ca.next.crt already moved to ca.crt) only if the waiting key belongs to
            // ca.crt: a lone ca.next.key otherwise (a rollover abandoned by hand) must not
            // replace the CA's key.
            let cert_pem = read(&self.ca_cert)?;
            let der =
                CertificateDer::from_pem_slice(cert_pem.as_bytes()).context("parsing ca.crt")?;
            let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
                .map_err(|e| anyhow!("parsing ca.crt: {e}"))?;
            anyhow::ensure!(
                key_matches(&read(&self.next_ca_key)?, cert.public_key().raw),
                "{} does not belong to {} and {} is missing (a rollover abandoned by hand?): \
                 remove {} or restore {} to start",
                self.next_ca_key.display(),
                self.ca_cert.display(),
                self.next_ca_cert.display(),
                self.next_ca_key.display(),
                self.next_ca_cert.display()
            );
            rename(&self.next_ca_key, &self.ca_key)?;
        }
        if self.next_server_key.exists() {
            anyhow::ensure!(
                self.next_server_cert.exists(),
                "{} without {}: remove both to keep the current server certificate",
                self.next_server_key.display(),
                self.next_server_cert.display()
            );
            rename(&self.next_server_key, &self.server_key)?;
        }
        if self.next_server_cert.exists() {
            rename(&self.next_server_cert, &self.server_cert)?;
        }
        sync_dir(&self.dir)
    }
}

/// Whether the PEM private key `key_pem` is the one of the DER SubjectPublicKeyInfo `spki`.
fn key_matches(key_pem: &str, spki: &[u8]) -> bool {
    use rcgen::PublicKeyData as _;
    KeyPair::from_pem(key_pem).is_ok_and(|k| k.subject_public_key_info() == spki)
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn rename(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::rename(from, to)
        .with_context(|| format!("renaming {} to {}", from.display(), to.display()))
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_shared_pki_is_created_once_and_opens_only_with_the_cluster_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = mooring_store::SqliteStore::open(dir.path()).expect("store");
        let key = SecretKey::from_hex(&"ab".repeat(32)).expect("key");
        let names = vec!["localhost".to_string()];
        let now = OffsetDateTime::now_utc();
        let (one, two) = tokio::join!(
            Pki::load_or_create_shared(&store, &key, &names, now),
            Pki::load_or_create_shared(&store, &key, &names, now),
        );
        let ((one, c1), (two, c2)) = (one.expect("one"), two.expect("two"));
        assert_eq!(
            one.ca_pem(),
            two.ca_pem(),
            "racing nodes end up with one CA"
        );
        assert_eq!(one.server_cert_pem, two.server_cert_pem);
        assert!(c1 || c2);
        let (again, created) = Pki::load_or_create_shared(&store, &key, &names, now)
            .await
            .expect("reload");
        assert!(!created);
        assert_eq!(again.ca_pem(), one.ca_pem());
        // The private keys are not stored in clear.
        let stored = store
            .get_value(SHARED_PKI_KEY)
            .await
            .expect("get")
            .expect("stored");
        let text = String::from_utf8_lossy(&stored);
        assert!(!text.contains("PRIVATE KEY"), "{text}");
        // Another key cannot open it, and says why.
        let other = SecretKey::from_hex(&"cd".repeat(32)).expect("key");
        let err = Pki::load_or_create_shared(&store, &other, &names, now)
            .await
            .err()
            .expect("refused");
        assert!(err.to_string().contains("cluster key"), "{err:#}");
        // Issued device certificates chain to the one CA on every node.
        one.issue_device_cert("d1", now, 30).expect("issue");
        assert!(SecretKey::from_hex("abcd").is_err());
    }

    #[test]
    fn a_cluster_key_file_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cluster.key");
        std::fs::write(&path, "ab".repeat(32)).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = SecretKey::from_file(&path).err().expect("refused");
        assert!(err.to_string().contains("chmod 600"), "{err:#}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        SecretKey::from_file(&path).expect("accepted at 0600");
    }

    /// The issuer (subject DER) of a PEM certificate and the subject of each CA in `bundle`.
    fn issuer_of(cert_pem: &str) -> Vec<u8> {
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("pem");
        let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).expect("x509");
        c.issuer().as_raw().to_vec()
    }

    fn subjects(bundle: &str) -> Vec<Vec<u8>> {
        CertificateDer::pem_slice_iter(bundle.as_bytes())
            .map(|d| {
                let d = d.expect("pem");
                let (_, c) = x509_parser::parse_x509_certificate(d.as_ref()).expect("x509");
                c.subject().as_raw().to_vec()
            })
            .collect()
    }

    fn serial_of(cert_pem: &str) -> Vec<u8> {
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("pem");
        let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).expect("x509");
        c.raw_serial().to_vec()
    }

    fn ca_serials(bundle: &str) -> Vec<Vec<u8>> {
        CertificateDer::pem_slice_iter(bundle.as_bytes())
            .map(|d| {
                let d = d.expect("pem");
                let (_, c) = x509_parser::parse_x509_certificate(d.as_ref()).expect("x509");
                c.raw_serial().to_vec()
            })
            .collect()
    }

    #[test]
    fn a_rollover_in_the_data_dir_trusts_both_then_retires_the_previous_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = OffsetDateTime::now_utc();
        let names = vec!["localhost".to_string()];
        let (before, _) = Pki::load_or_create(dir.path(), &names, now).expect("create");
        assert!(!before.rolling_over());
        let old_ca = before.ca_pem();
        let server_before = before.server_cert_pem.clone();

        let during = Pki::begin_rollover_in_dir(dir.path(), &names, now).expect("begin");
        assert!(
            Pki::begin_rollover_in_dir(dir.path(), &names, now).is_err(),
            "one at a time"
        );
        let bundle = during.ca_pem();
        assert_eq!(subjects(&bundle).len(), 2, "both CAs are trusted");
        assert!(bundle.starts_with(&old_ca));
        assert!(during.rolling_over());
        assert_ne!(during.issuer_label(), before.issuer_label());
        // Issued by the new CA; the server certificate is still the previous CA's.
        let issued = during.issue_device_cert("d1", now, 30).expect("issue");
        let (new_info, prev_info) = during.fleet_cas().expect("cas");
        assert_eq!(
            prev_info.expect("previous").sha256,
            before.fleet_cas().expect("cas").0.sha256
        );
        assert_eq!(during.server_cert_pem, server_before);
        assert_eq!(issuer_of(&issued.certificate_pem), subjects(&bundle)[1]);
        assert_eq!(issued.issuer, during.issuer_label());
        // Each CA names its own certificates.
        let old_one = before.issue_device_cert("d0", now, 30).expect("issue");
        assert_eq!(
            during.issuer_label_of(&old_one.certificate_pem).as_deref(),
            Some(before.issuer_label())
        );
        assert_eq!(
            during.issuer_label_of(&issued.certificate_pem).as_deref(),
            Some(during.issuer_label())
        );
        during.mqtt_tls_config().expect("tls trusts both");
        // A restart in the middle of the overlap finds it as it was.
        let (again, created) = Pki::load_or_create(dir.path(), &names, now).expect("reload");
        assert!(!created);
        assert_eq!(again.ca_pem(), bundle);

        let after = Pki::retire_previous_in_dir(dir.path(), &names, now).expect("retire");
        assert!(
            Pki::retire_previous_in_dir(dir.path(), &names, now).is_err(),
            "retired once"
        );
        assert_eq!(after.fleet_cas().expect("cas").0, new_info);
        assert_eq!(
            ca_serials(&after.ca_pem()),
            vec![ca_serials(&bundle)[1].clone()]
        );
        assert_ne!(
            after.server_cert_pem, server_before,
            "a new server certificate"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("ca.crt")).expect("ca.crt"),
            after.ca_pem()
        );
        assert_ne!(serial_of(&after.server_cert_pem), serial_of(&server_before));
        for f in [
            "ca.next.crt",
            "ca.next.key",
            "server.next.crt",
            "server.next.key",
        ] {
            assert!(!dir.path().join(f).exists(), "{f} is gone");
        }
    }

    #[test]
    fn a_retirement_cut_short_is_finished_at_the_next_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = OffsetDateTime::now_utc();
        let names = vec!["localhost".to_string()];
        Pki::load_or_create(dir.path(), &names, now).expect("create");
        let during = Pki::begin_rollover_in_dir(dir.path(), &names, now).expect("begin");
        let new_serial = ca_serials(&during.ca_pem())[1].clone();
        // The retirement's first steps by hand: the new server pair, then the decision.
        let paths = PkiPaths::new(dir.path());
        let (cert, key) = new_server_cert(&during.ca.issuer, &names, now).expect("server");
        write_private(&paths.next_server_key, &key, true).expect("key");
        write_private(&paths.next_server_cert, &cert, true).expect("cert");
        std::fs::rename(&paths.next_ca_cert, &paths.ca_cert).expect("decide");
        let (after, _) = Pki::load_or_create(dir.path(), &names, now).expect("finish");
        assert_eq!(ca_serials(&after.ca_pem()), vec![new_serial]);
        assert_eq!(after.server_cert_pem, cert);
        assert!(!after.rolling_over());
        after
            .issue_device_cert("d1", now, 30)
            .expect("the new CA's key is in place");
        // Without the decision, a leftover server pair is an abandoned attempt.
        let during = Pki::begin_rollover_in_dir(dir.path(), &names, now).expect("begin again");
        write_private(&paths.next_server_cert, "junk", true).expect("junk");
        let (again, _) = Pki::load_or_create(dir.path(), &names, now).expect("load");
        assert_eq!(again.ca_pem(), during.ca_pem());
        assert_eq!(again.server_cert_pem, cert);
        assert!(!paths.next_server_cert.exists());
    }

    #[test]
    fn a_stray_next_key_never_replaces_the_ca_key_and_a_wrong_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = OffsetDateTime::now_utc();
        let names = vec!["localhost".to_string()];
        let (pki, _) = Pki::load_or_create(dir.path(), &names, now).expect("create");
        let paths = PkiPaths::new(dir.path());
        let ca_key = std::fs::read_to_string(&paths.ca_key).expect("ca.key");
        // A rollover abandoned by hand: ca.next.crt removed, ca.next.key left.
        let during = Pki::begin_rollover_in_dir(dir.path(), &names, now).expect("begin");
        assert!(during.rolling_over());
        std::fs::remove_file(&paths.next_ca_cert).expect("rm");
        let err = Pki::load_or_create(dir.path(), &names, now)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("does not belong"), "{err:#}");
        assert_eq!(
            std::fs::read_to_string(&paths.ca_key).expect("ca.key"),
            ca_key,
            "the CA key is untouched"
        );
        std::fs::remove_file(&paths.next_ca_key).expect("rm");
        let (again, _) = Pki::load_or_create(dir.path(), &names, now).expect("starts");
        assert_eq!(again.ca_pem(), pki.ca_pem());
        // A CA key that is not the certificate's is refused, not used to sign.
        std::fs::remove_file(&paths.ca_key).expect("rm");
        write_private(
            &paths.ca_key,
            &KeyPair::generate().expect("key").serialize_pem(),
            false,
        )
        .expect("write");
        let err = Pki::load_or_create(dir.path(), &names, now)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("does not belong"), "{err:#}");
    }

    #[tokio::test]
    async fn a_shared_rollover_is_one_compare_and_set_per_step() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = mooring_store::SqliteStore::open(dir.path()).expect("store");
        let key = SecretKey::from_hex(&"ab".repeat(32)).expect("key");
        let names = vec!["localhost".to_string()];
        let now = OffsetDateTime::now_utc();
        let (before, _) = Pki::load_or_create_shared(&store, &key, &names, now)
            .await
            .expect("create");
        let (a, b) = tokio::join!(
            Pki::begin_rollover_shared(&store, &key, now),
            Pki::begin_rollover_shared(&store, &key, now),
        );
        let (a, b) = (a.expect("a"), b.expect("b"));
        assert!(a.is_ok() ^ b.is_ok(), "one node begins it");
        let (during, _) = a.or(b).expect("the winner");
        let (read, _) = Pki::read_shared(&store, &key).await.expect("read");
        assert_eq!(
            read.ca_pem(),
            during.ca_pem(),
            "every node reads the overlap"
        );
        assert!(during.ca_pem().starts_with(&before.ca_pem()));
        assert!(matches!(
            Pki::begin_rollover_shared(&store, &key, now)
                .await
                .expect("again"),
            Err(RolloverRefused::InProgress)
        ));
        // A node that read another CA as issuing is refused (it counted the wrong certificates).
        assert!(matches!(
            Pki::retire_previous_shared(&store, &key, before.issuer_label(), &names, now)
                .await
                .expect("stale"),
            Err(RolloverRefused::NotInProgress)
        ));
        let (after, _) =
            Pki::retire_previous_shared(&store, &key, during.issuer_label(), &names, now)
                .await
                .expect("retire")
                .expect("retired");
        assert_eq!(
            ca_serials(&after.ca_pem()),
            vec![ca_serials(&during.ca_pem())[1].clone()]
        );
        assert_ne!(after.server_cert_pem, before.server_cert_pem);
        let (read, _) = Pki::read_shared(&store, &key).await.expect("read");
        assert_eq!(read.ca_pem(), after.ca_pem());
        read.issue_device_cert("d1", now, 30)
            .expect("issues with the new CA");
        assert!(matches!(
            Pki::retire_previous_shared(&store, &key, after.issuer_label(), &names, now)
                .await
                .expect("again"),
            Err(RolloverRefused::NotInProgress)
        ));
        let stored = store
            .get_value(SHARED_PKI_KEY)
            .await
            .expect("get")
            .expect("stored");
        assert!(!String::from_utf8_lossy(&stored).contains("PRIVATE KEY"));
    }

    #[test]
    fn creates_once_and_issues_device_certs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = OffsetDateTime::now_utc();
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let (pki, created) = Pki::load_or_create(dir.path(), &names, now).expect("create");
        assert!(created);
        let ca_before = pki.ca_pem().to_owned();
        let (pki, created) = Pki::load_or_create(dir.path(), &names, now).expect("reload");
        assert!(!created);
        assert_eq!(pki.ca_pem(), ca_before);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .expect("ca.key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let issued = pki.issue_device_cert("lock-1", now, 30).expect("issue");
        let der = CertificateDer::from_pem_slice(issued.certificate_pem.as_bytes()).expect("pem");
        assert_eq!(cert_common_name(&der).as_deref(), Some("lock-1"));
        assert_eq!(cert_sha256_hex(&der), issued.sha256_hex);
        pki.mqtt_tls_config().expect("tls config");
    }
}
