//! Certificate rotation (issue 16): a device renews its certificate over its own session, and
//! the new certificate becomes its current one when it first connects with it.
//!
//! A renewal request (`devices/<id>/cert/request`, a CSR for the device's new key) gets a
//! certificate for that key, added to the ledger as active beside the old one, and remembered as
//! the device's pending renewal (at most one: a request with another key revokes the unconfirmed
//! certificate, reason [`REPLACED_REASON`]; the same key again gets the same certificate). When
//! the device authenticates with the pending certificate, on whatever node, it is confirmed: it
//! becomes the device's current certificate and every other active one is revoked (reason
//! [`ROTATED_REASON`]); the other nodes hear of it (`cluster.device`) and close sessions that
//! still use a revoked one.

use super::Registry;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use mooring_proto::DeviceId;
use mooring_store::{CertRecord, CertRenewal, CertState};
use sha2::{Digest, Sha256};

/// The revocation reason of the certificates a confirmed rotation replaced.
pub const ROTATED_REASON: &str = "rotated";
/// The revocation reason of an unconfirmed renewal replaced by a request with another key.
pub const REPLACED_REASON: &str = "renewal replaced";
/// Devices whose renewal requests are counted at once; when full the counters start over.
pub const RENEW_COUNTERS_LEN_MAX: usize = 100_000;
const MINUTE_MS: u64 = 60_000;

/// A renewal answered.
#[derive(Debug, Clone)]
pub struct Renewed {
    pub serial: String,
    pub certificate_pem: String,
    pub ca_pem: String,
    /// Issued now (false: the pending renewal for the same key, answered again).
    pub created: bool,
    /// The unconfirmed certificate this request replaced (revoked).
    pub replaced: Option<String>,
}

/// A confirmed rotation.
#[derive(Debug, Clone)]
pub struct Rotated {
    pub serial: String,
    /// The device's certificates revoked by it.
    pub revoked: Vec<String>,
}

impl Registry {
    /// Counts one renewal request of `id`; `rate_limited` over `[provisioning]
    /// requests_per_minute_max` in the current minute.
    fn count_renew_request(&self, id: &DeviceId) -> ServiceResult<()> {
        let now_ms = self.core.now_ms();
        let max = self.core.config.provisioning.requests_per_minute_max;
        let mut counters = mooring_proto::sync::lock(&self.renew_requests);
        if counters.len() >= RENEW_COUNTERS_LEN_MAX && !counters.contains_key(id) {
            counters.clear();
        }
        let entry = counters.entry(id.clone()).or_insert((now_ms, 0));
        if now_ms >= entry.0.saturating_add(MINUTE_MS) {
            *entry = (now_ms, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        if entry.1 > max {
            return Err(ServiceError::new(
                ErrorKind::TooManyRequests,
                "rate_limited",
                format!("at most {max} renewal requests per minute per device"),
            ));
        }
        Ok(())
    }

    /// Device `id` (authenticated by its certificate) asks for a certificate for the key of
    /// `csr_pem` (see the module doc). Only the CSR's key is used.
    pub async fn renew_certificate(&self, id: &DeviceId, csr_pem: &str) -> ServiceResult<Renewed> {
        self.count_renew_request(id)?;
        let key =
            crate::pki::parse_csr(csr_pem).map_err(|m| ServiceError::invalid("invalid_csr", m))?;
        let key_sha256 = hex::encode(Sha256::digest(
            rcgen::PublicKeyData::subject_public_key_info(&key),
        ));
        let store = &self.core.store;
        if let Some(pending) = store.get_renewal(id.as_str()).await? {
            let active = store
                .get_cert(&pending.serial)
                .await?
                .is_some_and(|c| c.state == CertState::Active);
            // Not one from a fleet CA since retired or rolled over (a renewal asked before a
            // rollover is made again with the CA that issues now).
            let current_ca = self.pki().issuer_label_of(&pending.cert_pem).as_deref()
                == Some(self.pki().issuer_label());
            if pending.key_sha256 == key_sha256 && active && current_ca {
                return Ok(Renewed {
                    serial: pending.serial,
                    certificate_pem: pending.cert_pem,
                    ca_pem: self.ca_pem().to_owned(),
                    created: false,
                    replaced: None,
                });
            }
        }
        let issued = self.issue_cert_for_key(id, &key)?;
        let now_ms = self.core.now_ms();
        let cert = CertRecord {
            serial: issued.serial_hex.clone(),
            device_id: id.clone(),
            sha256: issued.sha256_hex.clone(),
            not_before_ms: now_ms.saturating_sub(5 * MINUTE_MS),
            not_after_ms: issued.not_after_ms,
            issued_at_ms: now_ms,
            issuer: issued.issuer.clone(),
            state: CertState::Active,
            revoked_at_ms: None,
            revoke_reason: None,
        };
        let renewal = CertRenewal {
            device_id: id.clone(),
            key_sha256,
            serial: issued.serial_hex.clone(),
            cert_pem: issued.certificate_pem.clone(),
            requested_at_ms: now_ms,
        };
        let replaced = store
            .put_renewal(renewal, cert, REPLACED_REASON)
            .await
            .map_err(|e| match e {
                mooring_store::StoreError::NotFound(_) => {
                    ServiceError::not_found("device_not_found", format!("device {id} not found"))
                }
                e => e.into(),
            })?;
        if let Some(old) = &replaced {
            self.after_revocation(id, std::slice::from_ref(old)).await;
        }
        tracing::info!(device = %id, serial = %issued.serial_hex, replaced = ?replaced, "renewal certificate issued (pending until the device connects with it)");
        Ok(Renewed {
            serial: issued.serial_hex,
            certificate_pem: issued.certificate_pem,
            ca_pem: self.ca_pem().to_owned(),
            created: true,
            replaced,
        })
    }

    /// Device `id` authenticated with the certificate `sha256` (valid, its own) while its
    /// current certificate is `current_sha256`: if that is its pending renewal, confirms it
    /// (see the module doc). Errors are logged; the next connection tries again.
    pub async fn confirm_rotation(
        &self,
        id: &DeviceId,
        sha256: &str,
        current_sha256: &str,
    ) -> Option<Rotated> {
        if sha256 == current_sha256 {
            return None;
        }
        let store = &self.core.store;
        let confirmed = async {
            let Some(pending) = store.get_renewal(id.as_str()).await? else {
                return Ok(None);
            };
            let Some(cert) = store.find_cert_by_sha256(sha256).await? else {
                return Ok(None);
            };
            if cert.serial != pending.serial {
                return Ok(None);
            }
            let revoked = store
                .confirm_renewal(
                    id.as_str(),
                    &cert.serial,
                    self.core.now_ms(),
                    ROTATED_REASON,
                )
                .await?;
            mooring_store::Result::Ok(revoked.map(|revoked| Rotated {
                serial: cert.serial,
                revoked,
            }))
        }
        .await;
        match confirmed {
            Ok(Some(rotated)) => {
                tracing::info!(device = %id, serial = %rotated.serial, revoked = ?rotated.revoked, "certificate rotation confirmed: the device connected with its new certificate; the older ones are revoked");
                self.after_revocation(id, &rotated.revoked).await;
                Some(rotated)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(device = %id, error = %e, "confirming a certificate rotation failed; the next connection tries again");
                None
            }
        }
    }
}
