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

/// One fleet CA (the CA the server issues device certificates with).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FleetCa {
    /// Lowercase hex of the SHA-256 of the certificate (DER).
    pub sha256: String,
    /// The certificate's subject (RFC 4514).
    pub subject: String,
    /// Unix ms.
    pub not_before: u64,
    /// Unix ms.
    pub not_after: u64,
}

/// `GET /api/v1/cas/fleet`: the fleet CA(s) and how far a rollover is.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FleetCas {
    /// The CA that issues device certificates.
    pub issuing: FleetCa,
    /// During a rollover: the previous CA, still trusted; it signed the server certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<FleetCa>,
    /// `true` between `POST /api/v1/cas/fleet/rollover` and `POST /api/v1/cas/fleet/retire`.
    pub rolling_over: bool,
    /// During a rollover: devices' live certificates from the previous CA (the rotation moves
    /// them; retiring waits for 0).
    pub previous_certificates: u64,
    /// During a rollover: the fleet rotation moving devices to the new CA
    /// (`GET /api/v1/certificates/rotations/{id}`), if one was started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_id: Option<String>,
    /// The trust bundle devices and clients should trust (PEM): both CAs during a rollover.
    pub ca_pem: String,
}

/// Default renewal requests per minute of a rollover's rotation.
pub const ROLLOVER_ROTATIONS_PER_MINUTE_DEFAULT: u32 = 100;

/// `POST /api/v1/cas/fleet/rollover`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BeginRollover {
    /// Renewal requests per minute of the rotation that moves devices to the new CA
    /// (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_minute: Option<u32>,
    /// Only add the new CA; start no rotation (run `POST /api/v1/certificates/rotations` or
    /// rotate devices one by one later).
    #[serde(default)]
    pub no_rotation: bool,
}

/// `POST /api/v1/cas/fleet/retire`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetireCa {
    /// Retire even while devices hold live certificates from the previous CA: they are revoked
    /// (their sessions close) and those devices can no longer connect.
    #[serde(default)]
    pub force: bool,
}

/// The answer to `POST /api/v1/cas/fleet/retire`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RetiredCa {
    /// The fleet CA now (one CA and a new server certificate from it, once `retired`).
    pub fleet: FleetCas,
    /// Certificates of the previous CA revoked by this call (`force`).
    pub revoked: u64,
    /// `false`: `force` had more certificates to revoke than one call does (5,000); call again
    /// to go on (`fleet.previous_certificates` says how many are left).
    pub retired: bool,
}
