//! Local control (issue 20): a device's own API on its LAN or a Unix socket, for a phone app or
//! a technician while the uplink or the cloud is down.
//!
//! **The local key.** A device gets a per-device key from the server over its own TLS session:
//! it publishes `devices/<id>/local/key/request` (`{"v":1}`) and the server answers that device
//! only on `devices/<id>/local/key` with [`LocalKey`]. The key is derived from the certificate
//! the device is connected with, so a new certificate (rotation) means a new key: the agent asks
//! again whenever it connects with a certificate it holds no key for. An operator reads the same
//! key from `GET /api/v1/devices/<id>/local-key` and hands it to the phone app beforehand.
//!
//! **Local commands.** The local API runs a command through the device's own executor, the
//! same handlers and the same at-most-once record by command id as commands from the cloud.
//! Its result goes to the durable outbox like any result, on
//! `devices/<id>/commands/<local id>/result`, with [`LocalExecution`] in its `local` field: the
//! server, which never sent that command, records it as executed locally with the device's
//! times, once per (device, local id) whatever the number of deliveries.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The levels after `devices/<id>/` of a key request (device → server).
pub const KEY_REQUEST: &str = "local/key/request";
/// The levels after `devices/<id>/` of the answer (server → that device only).
pub const KEY: &str = "local/key";
/// Schema version of the payloads here.
pub const SCHEMA_VERSION: u32 = 1;
/// The first characters of every local command's id (on the result topic and in the server's
/// record as its idempotency key). The server never uses such an id or key for its own commands.
pub const LOCAL_ID_PREFIX: &str = "l-";
/// Hex digits of a local key (256 bits).
pub const KEY_HEX_LEN: usize = 64;

/// `devices/<id>/local/key/request`.
pub fn key_request_topic(id: &crate::DeviceId) -> String {
    format!("{}/{id}/{KEY_REQUEST}", crate::topic::DEVICES_ROOT)
}

/// `devices/<id>/local/key`.
pub fn key_topic(id: &crate::DeviceId) -> String {
    format!("{}/{id}/{KEY}", crate::topic::DEVICES_ROOT)
}

/// Server → device on `devices/<id>/local/key`: the device's local key for the certificate
/// whose SHA-256 (lowercase hex of the DER) is `cert_sha256`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalKey {
    pub v: u32,
    /// 64 lowercase hex digits; clients send it as `Authorization: Bearer <key>`.
    pub key: String,
    pub cert_sha256: String,
}

impl LocalKey {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses an answer; `None` unless it is v1 with a well-formed key.
    pub fn parse(payload: &[u8]) -> Option<LocalKey> {
        let k: LocalKey = serde_json::from_slice(payload).ok()?;
        (k.v == SCHEMA_VERSION
            && k.key.len() == KEY_HEX_LEN
            && k.key.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(k)
    }
}

/// The request payload: `{"v":1}`.
pub fn key_request_payload() -> Vec<u8> {
    format!("{{\"v\":{SCHEMA_VERSION}}}").into_bytes()
}

/// In a command result: the command was asked for on the device's local API, not by the server.
/// Times are the device's clock (unix ms).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalExecution {
    pub name: String,
    #[serde(default)]
    pub params: Value,
    /// When the local client asked.
    pub requested_at: u64,
    /// When the result was recorded.
    pub finished_at: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_only_when_well_formed() {
        let k = LocalKey {
            v: 1,
            key: "ab".repeat(32),
            cert_sha256: "00".into(),
        };
        assert_eq!(LocalKey::parse(&k.to_bytes()), Some(k.clone()));
        let short = LocalKey {
            key: "ab".into(),
            ..k.clone()
        };
        assert_eq!(LocalKey::parse(&short.to_bytes()), None);
        let v2 = LocalKey { v: 2, ..k };
        assert_eq!(LocalKey::parse(&v2.to_bytes()), None);
        assert_eq!(LocalKey::parse(b"nope"), None);
    }
}
