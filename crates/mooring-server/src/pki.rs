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
}

/// The fleet CA plus the server's own certificate, loaded from (or created in) the data dir.
pub struct Pki {
    ca_cert_pem: String,
    ca_issuer: Issuer<'static, KeyPair>,
    server_cert_pem: String,
    server_key_pem: String,
}

/// Writes a data-dir file, 0600 (keys are secret; certificates are public, but everything in
/// the data dir is the server user's only), and syncs it. A key is created new (never
/// overwritten); a certificate `replace`s what is there.
fn write_private(path: &Path, contents: &str, replace: bool) -> anyhow::Result<()> {
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
    /// Loads the CA and server certificate from `dir`, creating them on first start.
    /// Returns the PKI and whether it was created now.
    pub fn load_or_create(
        dir: &Path,
        server_names: &[String],
        now: OffsetDateTime,
    ) -> anyhow::Result<(Pki, bool)> {
        let paths = PkiPaths::new(dir);
        let created = !paths.ca_key.exists();
        if created {
            let (ca_cert_pem, ca_key_pem) = new_ca(now)?;
            write_private(&paths.ca_key, &ca_key_pem, false)?;
            write_private(&paths.ca_cert, &ca_cert_pem, true)?;
        }
        let ca_cert_pem = std::fs::read_to_string(&paths.ca_cert)
            .with_context(|| format!("reading {}", paths.ca_cert.display()))?;
        let ca_key_pem = std::fs::read_to_string(&paths.ca_key)
            .with_context(|| format!("reading {}", paths.ca_key.display()))?;
        let ca_issuer = issuer(&ca_cert_pem, &ca_key_pem)?;
        if !paths.server_key.exists() {
            let (cert_pem, key_pem) = new_server_cert(&ca_issuer, server_names, now)?;
            write_private(&paths.server_key, &key_pem, false)?;
            write_private(&paths.server_cert, &cert_pem, true)?;
        }
        let server_cert_pem = std::fs::read_to_string(&paths.server_cert)?;
        let server_key_pem = std::fs::read_to_string(&paths.server_key)?;
        Ok((
            Pki {
                ca_cert_pem,
                ca_issuer,
                server_cert_pem,
                server_key_pem,
            },
            created,
        ))
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
                let (ca_cert_pem, ca_key_pem) = new_ca(now)?;
                let ca_issuer = issuer(&ca_cert_pem, &ca_key_pem)?;
                let (server_cert_pem, server_key_pem) =
                    new_server_cert(&ca_issuer, server_names, now)?;
                let ours = serde_json::to_vec(&SharedPki {
                    version: 1,
                    ca_cert_pem,
                    ca_key: key.seal(ca_key_pem.as_bytes(), b"ca.key")?,
                    server_cert_pem,
                    server_key: key.seal(server_key_pem.as_bytes(), b"server.key")?,
                })?;
                let stored = store
                    .put_value_once(SHARED_PKI_KEY, ours.clone())
                    .await
                    .context("storing the cluster's PKI in the database")?;
                let created = stored == ours;
                (stored, created)
            }
        };
        let shared: SharedPki = serde_json::from_slice(&bytes)
            .context("the cluster's PKI in the database is corrupt")?;
        anyhow::ensure!(
            shared.version == 1,
            "the cluster's PKI in the database has format {}, this build reads 1",
            shared.version
        );
        let ca_key_pem = key.open(&shared.ca_key, b"ca.key")?;
        let server_key_pem = key.open(&shared.server_key, b"server.key")?;
        let ca_issuer = issuer(&shared.ca_cert_pem, &ca_key_pem)?;
        Ok((
            Pki {
                ca_cert_pem: shared.ca_cert_pem,
                ca_issuer,
                server_cert_pem: shared.server_cert_pem,
                server_key_pem,
            },
            created,
        ))
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_cert_pem
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
        let cert = params.signed_by(key, &self.ca_issuer)?;
        Ok(IssuedCert {
            certificate_pem: cert.pem(),
            private_key_pem: None,
            sha256_hex: cert_sha256_hex(cert.der()),
            serial_hex,
            not_after_ms: (not_after.unix_timestamp_nanos() / 1_000_000).max(0) as u64,
        })
    }

    fn roots(&self) -> anyhow::Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_cert_pem.as_bytes()) {
            roots.add(cert.context("parsing ca.crt")?)?;
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

    /// TLS for the HTTP API (`--http-tls`): server certificate only.
    pub fn http_tls_config(&self) -> anyhow::Result<Arc<TlsServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (chain, key) = self.server_chain()?;
        let mut config = TlsServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        // HTTP/1.1 only: the API listener's bounds (header read and idle keep-alive timeout) are
        // hyper HTTP/1 settings; hyper's HTTP/2 server has no idle timeout.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// A new self-signed fleet CA: `(certificate PEM, private key PEM)`.
fn new_ca(now: OffsetDateTime) -> anyhow::Result<(String, String)> {
    let ca_key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn("Mooring fleet CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial());
    params.not_before = now - Duration::hours(1);
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
#[derive(serde::Serialize, serde::Deserialize)]
struct SharedPki {
    version: u32,
    ca_cert_pem: String,
    ca_key: String,
    server_cert_pem: String,
    server_key: String,
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
        Ok(SecretKey {
            aead: ring::aead::LessSafeKey::new(key),
            bus: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, bus_bytes.as_ref()),
            oidc_state,
        })
    }

    /// The key OpenID Connect login states are sealed with.
    pub fn oidc_state_key(&self) -> [u8; 32] {
        self.oidc_state
    }

    /// The key every node signs its bus messages with (HMAC-SHA256).
    pub fn bus_key(&self) -> ring::hmac::Key {
        self.bus.clone()
    }

    /// `plain` sealed under the key, bound to `label` (a value moved to another label does not
    /// open): hex of a random 96-bit nonce followed by the ciphertext and tag.
    fn seal(&self, plain: &[u8], label: &[u8]) -> anyhow::Result<String> {
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

    fn open(&self, sealed: &str, label: &[u8]) -> anyhow::Result<String> {
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

/// Where the PKI files live inside the data dir.
pub struct PkiPaths {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl PkiPaths {
    pub fn new(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
        }
    }
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
