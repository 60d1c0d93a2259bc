//! Provisioning (schema v1): how a device with no certificate yet enrolls with a claim token, and
//! how an enrolled device renews its certificate.
//!
//! **Enrollment.** The device connects to the MQTT/TLS endpoint without a client certificate,
//! with username [`CLAIM_USERNAME`] and the claim token as password, and a client id of its
//! choosing (the id syntax of [`crate::DeviceId`]; an empty one is assigned by the server). It
//! may then only subscribe within `provision/<client id>/#` and publish to
//! `provision/<client id>/request`. It subscribes first, then publishes an [`EnrollRequest`]
//! (its own CSR, optionally the device id it proposes); the server answers on
//! `provision/<client id>/accepted` with an [`EnrollAccepted`] or on
//! `provision/<client id>/rejected` with an [`EnrollRejected`]. The same request over HTTPS is
//! `POST /api/v1/provision/enroll` `{claim_token, csr_pem, device_id?}`.
//!
//! Sending the same request again (same claim, same public key) answers the same certificate:
//! a device that lost the reply just asks again.
//!
//! **Renewal.** An enrolled device publishes a [`RenewRequest`] on `devices/<id>/cert/request`
//! over its own certificate session and receives an [`EnrollAccepted`] on
//! `devices/<id>/cert/accepted` or an [`EnrollRejected`] on `devices/<id>/cert/rejected`.

use crate::id::DeviceId;
use serde::{Deserialize, Serialize};

/// Schema version of every provisioning payload.
pub const SCHEMA_VERSION: u32 = 1;
/// The MQTT username of a device enrolling with a claim token (the token is the password).
pub const CLAIM_USERNAME: &str = "claim";
/// Root of the enrollment topics.
pub const PROVISION_ROOT: &str = "provision";
/// Largest request payload, in bytes (a CSR is at most [`CSR_SIZE_BYTES_MAX`]).
pub const REQUEST_SIZE_BYTES_MAX: usize = 20 * 1024;
/// Largest CSR (PEM), in bytes.
pub const CSR_SIZE_BYTES_MAX: usize = 16 * 1024;

/// `provision/<client id>/request`: device → server.
pub fn request_topic(client_id: &str) -> String {
    format!("{PROVISION_ROOT}/{client_id}/request")
}

/// `provision/<client id>/accepted`: server → device.
pub fn accepted_topic(client_id: &str) -> String {
    format!("{PROVISION_ROOT}/{client_id}/accepted")
}

/// `provision/<client id>/rejected`: server → device.
pub fn rejected_topic(client_id: &str) -> String {
    format!("{PROVISION_ROOT}/{client_id}/rejected")
}

/// `provision/<client id>/#`: everything an enrolling client may subscribe to.
pub fn subtree_filter(client_id: &str) -> String {
    format!("{PROVISION_ROOT}/{client_id}/#")
}

/// If `topic` is `provision/<client id>/request`, the client id.
pub fn parse_request_topic(topic: &str) -> Option<&str> {
    let rest = topic.strip_prefix(PROVISION_ROOT)?.strip_prefix('/')?;
    let (client_id, tail) = rest.split_once('/')?;
    (tail == "request" && DeviceId::parse(client_id).is_ok()).then_some(client_id)
}

/// `devices/<id>/cert/request`: an enrolled device asks for a new certificate.
pub fn renew_request_topic(id: &DeviceId) -> String {
    format!("{}/{id}/cert/request", crate::topic::DEVICES_ROOT)
}

/// `devices/<id>/cert/accepted`.
pub fn renew_accepted_topic(id: &DeviceId) -> String {
    format!("{}/{id}/cert/accepted", crate::topic::DEVICES_ROOT)
}

/// `devices/<id>/cert/rejected`.
pub fn renew_rejected_topic(id: &DeviceId) -> String {
    format!("{}/{id}/cert/rejected", crate::topic::DEVICES_ROOT)
}

/// Device → server on `provision/<client id>/request`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub v: u32,
    /// PKCS#10 CSR (PEM) for the device's own key; only its public key is used.
    pub csr_pem: String,
    /// The id the device proposes (e.g. its serial number). Ignored by a claim that assigns ids;
    /// required otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
}

/// Device → server on `devices/<id>/cert/request`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub v: u32,
    /// PKCS#10 CSR (PEM) for the device's new key.
    pub csr_pem: String,
}

/// Server → device: the certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollAccepted {
    pub v: u32,
    /// The device id the certificate names (its CN).
    pub device_id: String,
    /// The device certificate (PEM).
    pub certificate_pem: String,
    /// The CA certificate(s) the server's certificate chains to (PEM): the trust bundle.
    pub ca_pem: String,
}

/// Server → device: why not. `code` is stable and machine-readable (the HTTP API's error code
/// for the same refusal), `message` is for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRejected {
    pub v: u32,
    pub code: String,
    pub message: String,
}

/// A payload that is not a valid request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProvisionPayloadError {
    #[error("payload is {0} bytes; at most {REQUEST_SIZE_BYTES_MAX} are accepted")]
    TooLarge(usize),
    #[error("payload is not a valid request: {0}")]
    Invalid(String),
    #[error("unsupported schema version {0} (this server speaks {SCHEMA_VERSION})")]
    Version(u32),
}

fn parse_json<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, ProvisionPayloadError> {
    if payload.len() > REQUEST_SIZE_BYTES_MAX {
        return Err(ProvisionPayloadError::TooLarge(payload.len()));
    }
    serde_json::from_slice(payload).map_err(|e| ProvisionPayloadError::Invalid(e.to_string()))
}

fn check_version(v: u32) -> Result<(), ProvisionPayloadError> {
    if v == SCHEMA_VERSION {
        Ok(())
    } else {
        Err(ProvisionPayloadError::Version(v))
    }
}

impl EnrollRequest {
    pub fn new(csr_pem: String, device_id: Option<String>) -> Self {
        Self {
            v: SCHEMA_VERSION,
            csr_pem,
            device_id,
        }
    }

    pub fn parse(payload: &[u8]) -> Result<Self, ProvisionPayloadError> {
        let r: Self = parse_json(payload)?;
        check_version(r.v)?;
        Ok(r)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl RenewRequest {
    pub fn new(csr_pem: String) -> Self {
        Self {
            v: SCHEMA_VERSION,
            csr_pem,
        }
    }

    pub fn parse(payload: &[u8]) -> Result<Self, ProvisionPayloadError> {
        let r: Self = parse_json(payload)?;
        check_version(r.v)?;
        Ok(r)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl EnrollAccepted {
    pub fn parse(payload: &[u8]) -> Result<Self, ProvisionPayloadError> {
        serde_json::from_slice(payload).map_err(|e| ProvisionPayloadError::Invalid(e.to_string()))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl EnrollRejected {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            v: SCHEMA_VERSION,
            code: code.into(),
            message: message.into(),
        }
    }

    pub fn parse(payload: &[u8]) -> Result<Self, ProvisionPayloadError> {
        serde_json::from_slice(payload).map_err(|e| ProvisionPayloadError::Invalid(e.to_string()))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_topic_round_trips_and_refuses_others() {
        assert_eq!(
            parse_request_topic(&request_topic("sn-0042")),
            Some("sn-0042")
        );
        assert_eq!(parse_request_topic("provision/sn-1/accepted"), None);
        assert_eq!(parse_request_topic("provision/+/request"), None);
        assert_eq!(parse_request_topic("provision/a/b/request"), None);
        assert_eq!(parse_request_topic("devices/a/request"), None);
    }

    #[test]
    fn oversized_and_unknown_version_requests_are_refused() {
        let big = vec![b' '; REQUEST_SIZE_BYTES_MAX + 1];
        assert!(matches!(
            EnrollRequest::parse(&big),
            Err(ProvisionPayloadError::TooLarge(_))
        ));
        assert_eq!(
            EnrollRequest::parse(br#"{"v":2,"csr_pem":"x"}"#),
            Err(ProvisionPayloadError::Version(2))
        );
        assert!(matches!(
            EnrollRequest::parse(br#"{"v":1,"csr_pem":"x","cn":"admin"}"#),
            Err(ProvisionPayloadError::Invalid(_))
        ));
    }
}
