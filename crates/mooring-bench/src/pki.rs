//! Certificates for the private Mosquitto: a CA, a server certificate for 127.0.0.1, and one ECDSA P-256 client certificate per device (CN = device id), signed in parallel.

use crate::client::Cred;
use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::sync::Arc;

/// Client certificates signed per blocking task.
const SIGN_CHUNK_LEN: usize = 1_000;

/// The CA and server identity a Mosquitto instance is configured with.
pub struct Pki {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "mooring-bench");
    dn.push(DnType::CommonName, cn);
    dn
}

impl Pki {
    /// A fresh CA (key kept in memory only) and a server certificate for `127.0.0.1`/`localhost`.
    pub fn generate() -> anyhow::Result<Pki> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name = dn("mooring-bench CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let server_key = KeyPair::generate()?;
        let mut server = CertificateParams::default();
        server.distinguished_name = dn("localhost");
        server.subject_alt_names = vec![
            SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])),
            SanType::DnsName("localhost".try_into()?),
        ];
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server.use_authority_key_identifier_extension = true;
        let server_cert = server.signed_by(&server_key, &issuer)?;
        Ok(Pki {
            ca_pem: ca_cert.pem(),
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
            issuer,
        })
    }

    /// A client certificate and fresh key with CN = `id`.
    pub fn client(&self, id: &str) -> anyhow::Result<Cred> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(id);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Cred {
            id: id.to_owned(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Client credentials for every id, signed on the blocking pool in chunks (order kept).
    pub async fn clients(self: &Arc<Self>, ids: Vec<String>) -> anyhow::Result<Vec<Cred>> {
        let mut tasks = Vec::new();
        for chunk in ids.chunks(SIGN_CHUNK_LEN) {
            let chunk = chunk.to_vec();
            let pki = self.clone();
            tasks.push(tokio::task::spawn_blocking(move || {
                chunk
                    .iter()
                    .map(|id| pki.client(id))
                    .collect::<anyhow::Result<Vec<_>>>()
            }));
        }
        let mut out = Vec::with_capacity(ids.len());
        for t in tasks {
            out.extend(t.await.context("signing task")??);
        }
        Ok(out)
    }
}
