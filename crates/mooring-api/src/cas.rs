//! Registered manufacturer CAs (just-in-time registration): devices whose certificates chain to
//! an enabled one are trusted by the MQTT listener and, with `auto_register`, registered on their
//! first connection.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Longest CA certificate accepted, in bytes of PEM.
pub const CA_PEM_LEN_MAX: usize = 16 * 1024;

/// `POST /api/v1/cas`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterCa {
    /// One CA certificate (PEM): basicConstraints CA:TRUE, keyCertSign usage if it has a key
    /// usage, unexpired, at most 16 KiB.
    pub cert_pem: String,
    /// Register a device on its first connection with a certificate from this CA (CN = device
    /// id). Off: such devices are refused (and the log says why).
    #[serde(default)]
    pub auto_register: bool,
    /// Tags every device this CA registers gets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// A registered CA.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Ca {
    /// `ca_<hex>`.
    pub id: String,
    /// The certificate's subject (RFC 4514).
    pub subject: String,
    /// Lowercase hex of the SHA-256 of the certificate (DER).
    pub sha256: String,
    pub auto_register: bool,
    pub tags: BTreeMap<String, String>,
    /// Disabled: certificates from it are refused at the TLS handshake.
    pub enabled: bool,
    /// Unix ms.
    pub not_after: u64,
    /// Unix ms.
    pub created_at: u64,
    pub created_by: String,
    pub cert_pem: String,
}

/// `GET /api/v1/cas`: oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CaList {
    pub cas: Vec<Ca>,
}
