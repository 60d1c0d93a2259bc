//! Devices' local keys (issue 20, [`mooring_proto::local`]): what a phone app presents to a
//! device's local API while the uplink or the cloud is down.
//!
//! A key is HMAC-SHA256 of (device id, certificate SHA-256) under a server secret: nothing per
//! device is stored, every node of a cluster derives the same key (the secret comes from the
//! cluster key; an embedded server keeps `local.secret` in its data dir, 0600), and a new
//! certificate (rotation, re-provisioning) gives a new key, so a key leaves with the certificate
//! it was issued for. The device gets its key over its own TLS session
//! (`devices/<id>/local/key/request`, answered to that device only); an operator reads it with
//! `GET /api/v1/devices/<id>/local-key` (`commands.write`, audited).

use crate::access::Access;
use crate::error::{ServiceError, ServiceResult};
use crate::registry::Registry;
use mooring_api::LocalKeyView;
use mooring_proto::local::LocalKey;
use std::path::Path;
use std::sync::Arc;

/// The embedded server's secret, in its data dir.
pub const SECRET_FILE: &str = "local.secret";
/// Key requests one device may make per minute (it needs one per connection at most).
pub const KEY_REQUESTS_PER_MINUTE_MAX: u32 = 6;
/// Devices whose key requests are counted at once.
pub const KEY_REQUESTERS_MAX: usize = 200_000;

/// Local keys: derivation and the two ways to read one.
pub struct Local {
    registry: Arc<Registry>,
    secret: ring::hmac::Key,
    requests: crate::ratelimit::PerMinute,
}

/// An embedded server's secret: `<data dir>/local.secret`, created at first start.
pub fn secret_in_dir(dir: &Path) -> anyhow::Result<ring::hmac::Key> {
    let text = crate::ota::load_or_create_secret_file(dir, SECRET_FILE)?;
    let bytes = hex::decode(text).map_err(|e| anyhow::anyhow!("{SECRET_FILE}: {e}"))?;
    Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes))
}

/// A cluster node's secret: derived from the cluster key, the same on every node.
pub fn shared_secret(key: &crate::pki::SecretKey) -> ring::hmac::Key {
    key.local_key_key()
}

/// The key of `device` while it uses the certificate `cert_sha256`.
fn derive(secret: &ring::hmac::Key, device: &str, cert_sha256: &str) -> String {
    let mut msg = Vec::with_capacity(device.len() + cert_sha256.len() + 24);
    msg.extend_from_slice(b"mooring local key v1\0");
    msg.extend_from_slice(device.as_bytes());
    msg.push(0);
    msg.extend_from_slice(cert_sha256.as_bytes());
    hex::encode(ring::hmac::sign(secret, &msg).as_ref())
}

impl Local {
    pub(crate) fn new(registry: Arc<Registry>, secret: ring::hmac::Key) -> Local {
        Local {
            registry,
            secret,
            requests: crate::ratelimit::PerMinute::new(KEY_REQUESTERS_MAX),
        }
    }

    /// `GET /api/v1/devices/<id>/local-key`: the key for the certificate the device last
    /// connected with.
    pub async fn key(&self, access: &Access, id: &str) -> ServiceResult<LocalKeyView> {
        let record = self.registry.get_device(access, id).await?.record;
        if record.cert_sha256.is_empty() {
            return Err(ServiceError::not_found(
                "no_certificate",
                format!("device {id} has no certificate, so no local key"),
            ));
        }
        Ok(LocalKeyView {
            key: derive(&self.secret, record.id.as_str(), &record.cert_sha256),
            device_id: record.id.into_string(),
            cert_sha256: record.cert_sha256,
            cert_serial: record.cert_serial,
            cert_not_after: record.cert_not_after_ms,
        })
    }

    /// A device's own request (`devices/<id>/local/key/request`): its key, or `None` when it
    /// asks too often or is gone.
    pub async fn key_for_device(&self, id: &str, now_ms: u64) -> ServiceResult<Option<LocalKey>> {
        if self
            .requests
            .count(id, now_ms, KEY_REQUESTS_PER_MINUTE_MAX)
            .is_err()
        {
            return Ok(None);
        }
        let Some(record) = self.registry.lookup(id).await? else {
            return Ok(None);
        };
        if record.cert_sha256.is_empty() {
            return Ok(None);
        }
        Ok(Some(LocalKey {
            v: mooring_proto::local::SCHEMA_VERSION,
            key: derive(&self.secret, id, &record.cert_sha256),
            cert_sha256: record.cert_sha256,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::derive;

    #[test]
    fn keys_differ_per_device_certificate_and_secret() {
        let secret = |b: u8| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[b; 32]);
        let k = derive(&secret(1), "lock-1", "aa");
        assert_eq!(k.len(), 64);
        assert_eq!(k, derive(&secret(1), "lock-1", "aa"));
        assert_ne!(k, derive(&secret(1), "lock-2", "aa"));
        assert_ne!(k, derive(&secret(1), "lock-1", "bb"));
        assert_ne!(k, derive(&secret(2), "lock-1", "aa"));
    }
}
