//! How the agent reaches the server: the [`Connector`] trait (any byte stream) and the production mTLS connector.
//!
//! The MQTT session ([`crate::link`]) runs over whatever a [`Connector`] returns: TCP + TLS
//! with the device certificate in production ([`TlsConnector`]), an in-memory
//! `tokio::io::duplex` in tests and in the fleet simulator. This is why the agent has its own
//! small MQTT client instead of rumqttc: rumqttc owns its transport (TCP/TLS/WebSocket only) and
//! its timers, so it cannot run over in-memory streams on a paused, virtual tokio clock.

use crate::key::{ClientCert, KeyRef, TlsKey, TokenKey};
use anyhow::Context as _;
use mooring_proto::DeviceId;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

/// A bidirectional byte stream the MQTT session can run over.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Opens a fresh connection to the server (one call per connection attempt). Timeouts are the
/// caller's: the link bounds every attempt with `tokio::time`.
#[async_trait::async_trait]
pub trait Connector: Send + Sync + 'static {
    async fn connect(&self) -> std::io::Result<Box<dyn Stream>>;
    /// Where this connects to, for logs.
    fn describe(&self) -> String;
    /// The certificate rotation behind this connector, if it rotates ([`crate::rotate`]).
    fn rotation(&self) -> Option<Arc<crate::rotate::Rotation>> {
        None
    }
}

/// TCP to `host:port`, then TLS with the device certificate (ring provider, the fleet CA as
/// the only root, server name = `host`).
#[derive(Clone)]
pub struct TlsConnector {
    pub host: String,
    pub port: u16,
    pub tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl Connector for TlsConnector {
    async fn connect(&self) -> std::io::Result<Box<dyn Stream>> {
        let name = ServerName::try_from(self.host.clone())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await?;
        Ok(Box::new(tls))
    }

    fn describe(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Who the agent is and how it proves it.
#[derive(Clone)]
pub struct Identity {
    /// The subject CN of the client certificate.
    pub device_id: DeviceId,
    pub tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

/// Loads the client certificate, key and CA, reads the device id from the certificate's CN
/// and builds the mTLS client config (ring provider, roots = only the given CA). A token key
/// ([`KeyRef::Pkcs11`]) signs the handshake in the token.
pub fn load_identity(cert_path: &Path, key: &KeyRef, ca_path: &Path) -> anyhow::Result<Identity> {
    // Other crates may have installed a provider already; either way ring is what we use.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let certs = CertificateDer::pem_file_iter(cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading client certificate {}", cert_path.display()))?;
    let leaf = certs
        .first()
        .with_context(|| format!("no certificate in {}", cert_path.display()))?;
    let device_id = device_id_from_cert(leaf)
        .with_context(|| format!("client certificate {}", cert_path.display()))?;

    let roots = load_roots(ca_path)?;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_root_certificates(roots);
    let tls = match key {
        KeyRef::File(key_path) => {
            let key = PrivateKeyDer::from_pem_file(key_path)
                .with_context(|| format!("reading private key {}", key_path.display()))?;
            builder
                .with_client_auth_cert(certs, key)
                .context("client certificate and key do not form a usable identity")?
        }
        KeyRef::Pkcs11(uri) => {
            let (token_key, _) = TokenKey::open(uri, false)?;
            let token_key = Arc::new(token_key);
            let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
                .map_err(|e| anyhow::anyhow!("client certificate: {e}"))?;
            anyhow::ensure!(
                cert.public_key().raw == rcgen::PublicKeyData::subject_public_key_info(&*token_key),
                "client certificate {} is not for the key {uri}",
                cert_path.display()
            );
            let certified = rustls::sign::CertifiedKey::new(certs, Arc::new(TlsKey(token_key)));
            builder.with_client_cert_resolver(Arc::new(ClientCert(Arc::new(certified))))
        }
    };
    Ok(Identity {
        device_id,
        tls: Arc::new(tls),
    })
}

/// The CA certificate(s) in `ca_path` as the only trusted roots.
fn load_roots(ca_path: &Path) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(ca_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading CA certificate {}", ca_path.display()))?;
    anyhow::ensure!(!cas.is_empty(), "no certificate in {}", ca_path.display());
    for ca in cas {
        roots
            .add(ca)
            .with_context(|| format!("CA certificate {}", ca_path.display()))?;
    }
    Ok(roots)
}

/// TLS that authenticates the server only (roots = only the CA in `ca_path`, no client
/// certificate): how an agent without a certificate yet reaches the enrollment endpoint.
pub fn server_auth_tls(ca_path: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let roots = load_roots(ca_path)?;
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(tls))
}

/// The certificates of a PEM bundle, as DER.
pub fn pem_certs(pem: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    CertificateDer::pem_slice_iter(pem)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("not PEM certificates: {e:?}"))
}

/// The device id carried in a certificate's subject CN.
pub fn device_id_from_cert(der: &CertificateDer<'_>) -> anyhow::Result<DeviceId> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| anyhow::anyhow!("not a valid X.509 certificate: {e}"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .context("subject has no CN (the CN is the device id)")?
        .as_str()
        .map_err(|e| anyhow::anyhow!("subject CN is not a string: {e}"))?;
    Ok(DeviceId::parse(cn)?)
}
