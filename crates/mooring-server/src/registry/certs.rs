//! The certificate ledger as the registry uses it (issue 16): which certificate MQTT accepts,
//! revocation (the live sessions it concerns closed on every node), listings and the gauges.
//!
//! A device session remembers the certificate it authenticated with ([`Registry::note_session_cert`]);
//! when a device changes (a revocation here, a `cluster.device` notice from another node:
//! [`Registry::refresh_device`]) the certificate is looked up again, and a session whose
//! certificate is no longer active and unexpired is closed (v5 DISCONNECT 0x87).
//!
//! A backstop for what that misses ([`run_session_cert_sweep`], every
//! [`SESSION_CERT_SWEEP_INTERVAL_MS`]): a session whose certificate expires while it is
//! connected, and a revocation whose cluster notice was lost (the bus is at most once), are
//! found by re-reading the revocations of the last minutes from the store.

use super::Registry;
use crate::access::Access;
use crate::error::{ServiceError, ServiceResult};
use mooring_broker::{KickReason, PrincipalKey};
use mooring_proto::DeviceId;
use mooring_store::{CertRecord, CertState, CERT_PAGE_LEN_MAX};

/// Longest revocation reason, in characters.
pub const REVOKE_REASON_LEN_MAX: usize = 256;
/// Most certificates one listing returns, and the default page.
pub const CERT_LIST_LEN_DEFAULT: usize = 100;
/// How long the certificate gauges of `/metrics` are reused before counting again.
pub const CERT_GAUGES_TTL_MS: u64 = 5_000;
/// How often live sessions' certificates are swept by default (module doc;
/// `[certificates] session_sweep_interval_ms`).
pub const SESSION_CERT_SWEEP_INTERVAL_MS: u64 = 30_000;
/// How far before its last run a sweep reads revocations again (clock skew between nodes,
/// revocations committed late).
const SWEEP_OVERLAP_MS: u64 = 60_000;
/// Revocations read per sweep page, and pages per sweep at most.
const SWEEP_PAGE_LEN: usize = 1_000;
const SWEEP_PAGES_MAX: usize = 20;

/// The certificate a device's latest session on this node authenticated with.
#[derive(Debug, Clone)]
pub(crate) struct SessionCert {
    sha256: String,
    /// From the certificate presented (`None`: no certificate at hand, the simulator's pins).
    not_after_ms: Option<u64>,
}

/// What the ledger says of a certificate presented by a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertVerdict {
    /// Active, unexpired, the device's.
    Valid,
    /// Not in the ledger, or another device's.
    Unknown,
    Revoked {
        serial: String,
        at_ms: u64,
    },
    Expired {
        serial: String,
        at_ms: u64,
    },
}

/// The certificate gauges of `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CertGauges {
    /// Active certificates whose `not_after` is within `[certificates] expiring_warn_days`.
    pub expiring: u64,
    pub revoked: u64,
}

impl Registry {
    /// Whether `sha256` (lowercase hex) is an active, unexpired certificate of device `id`.
    pub async fn check_certificate(
        &self,
        id: &str,
        sha256: &str,
    ) -> mooring_store::Result<CertVerdict> {
        let cert = self.core.store.find_cert_by_sha256(sha256).await?;
        Ok(verdict(cert.as_ref(), id, self.core.now_ms()))
    }

    /// The certificate a device session authenticated with (see the module doc): its SHA-256
    /// and, from the DER presented, its expiry.
    pub fn note_session_cert(&self, id: &DeviceId, sha256: &str, der: Option<&[u8]>) {
        let not_after_ms = der
            .and_then(|d| x509_parser::parse_x509_certificate(d).ok())
            .map(|(_, c)| {
                u64::try_from(c.validity().not_after.timestamp())
                    .unwrap_or(0)
                    .saturating_mul(1000)
            });
        mooring_proto::sync::lock(&self.session_certs).insert(
            id.clone(),
            SessionCert {
                sha256: sha256.to_owned(),
                not_after_ms,
            },
        );
    }

    /// One sweep (module doc): closes this node's sessions whose certificate expired, or was
    /// revoked at or after `since_ms`. Returns how many it closed.
    pub(crate) async fn sweep_session_certs(&self, since_ms: u64) -> mooring_store::Result<usize> {
        let now_ms = self.core.now_ms();
        let mut doomed: Vec<(DeviceId, &'static str)> =
            mooring_proto::sync::lock(&self.session_certs)
                .iter()
                .filter(|(_, s)| s.not_after_ms.is_some_and(|t| t <= now_ms))
                .map(|(id, _)| (id.clone(), "expired"))
                .collect();
        let mut after: Option<(u64, String)> = None;
        for _ in 0..SWEEP_PAGES_MAX {
            let page = self
                .core
                .store
                .revoked_certs_since(
                    since_ms,
                    SWEEP_PAGE_LEN,
                    after.as_ref().map(|(t, s)| (*t, s.as_str())),
                )
                .await?;
            let full = page.len() == SWEEP_PAGE_LEN;
            if let Some(last) = page.last() {
                after = Some((last.revoked_at_ms.unwrap_or(0), last.serial.clone()));
            }
            {
                let sessions = mooring_proto::sync::lock(&self.session_certs);
                for cert in &page {
                    if sessions
                        .get(&cert.device_id)
                        .is_some_and(|s| s.sha256 == cert.sha256)
                    {
                        doomed.push((cert.device_id.clone(), "revoked"));
                    }
                }
            }
            if !full {
                break;
            }
        }
        let mut closed = 0;
        for (id, why) in doomed {
            if mooring_proto::sync::lock(&self.session_certs)
                .remove(&id)
                .is_none()
            {
                continue;
            }
            if let Some(broker) = self.core.broker() {
                broker.kick(
                    &PrincipalKey::device(id.as_str()),
                    KickReason::NotAuthorized,
                );
            }
            closed += 1;
            tracing::info!(device = %id, "closed the device's session: its certificate is {why} (sweep)");
        }
        Ok(closed)
    }

    /// Closes this node's sessions of `id` if the certificate they authenticated with is no
    /// longer valid (revoked, expired, gone).
    pub(super) async fn close_sessions_if_cert_invalid(&self, id: &DeviceId) {
        let Some(sha256) = mooring_proto::sync::lock(&self.session_certs)
            .get(id)
            .map(|s| s.sha256.clone())
        else {
            return;
        };
        match self.check_certificate(id.as_str(), &sha256).await {
            Ok(CertVerdict::Valid) => {}
            Ok(why) => {
                mooring_proto::sync::lock(&self.session_certs).remove(id);
                if let Some(broker) = self.core.broker() {
                    broker.kick(
                        &PrincipalKey::device(id.as_str()),
                        KickReason::NotAuthorized,
                    );
                }
                tracing::info!(device = %id, verdict = ?why, "closed the device's session: its certificate is no longer valid");
            }
            Err(e) => {
                tracing::warn!(device = %id, error = %e, "re-checking a live session's certificate failed")
            }
        }
    }

    /// The device's certificates, newest issued first (at most [`CERT_PAGE_LEN_MAX`]); a device
    /// outside `access` is not found.
    pub async fn device_certificates(
        &self,
        access: &Access,
        id: &str,
    ) -> ServiceResult<Vec<CertRecord>> {
        let view = self.get_device(access, id).await?;
        Ok(self
            .core
            .store
            .list_device_certs(view.record.id.as_str(), CERT_PAGE_LEN_MAX)
            .await?)
    }

    /// Revokes every active certificate of the device; its live sessions close on every node.
    /// Returns the serials revoked now (empty: all were revoked already).
    pub async fn revoke_device(
        &self,
        access: &Access,
        id: &str,
        reason: Option<&str>,
    ) -> ServiceResult<Vec<String>> {
        let reason = check_reason(reason)?;
        let view = self.get_device(access, id).await?;
        let id = view.record.id;
        let serials = self
            .core
            .store
            .revoke_device_certs(id.as_str(), self.core.now_ms(), reason)
            .await?;
        self.after_revocation(&id, &serials).await;
        Ok(serials)
    }

    /// Revokes one certificate (serial in hex, any case); its live session closes on every
    /// node. `certificate_not_found` if unknown or its device is outside `access`. Returns the
    /// serial if revoked now, nothing if it was already.
    pub async fn revoke_certificate(
        &self,
        access: &Access,
        serial: &str,
        reason: Option<&str>,
    ) -> ServiceResult<Vec<String>> {
        let reason = check_reason(reason)?;
        let cert = self.certificate(access, serial).await?;
        let changed = self
            .core
            .store
            .revoke_cert(&cert.serial, self.core.now_ms(), reason)
            .await?;
        let serials = if changed {
            vec![cert.serial]
        } else {
            Vec::new()
        };
        self.after_revocation(&cert.device_id, &serials).await;
        Ok(serials)
    }

    /// A certificate by serial, if its device is within `access`.
    async fn certificate(&self, access: &Access, serial: &str) -> ServiceResult<CertRecord> {
        let serial = serial.trim().to_ascii_lowercase();
        let not_found = || {
            ServiceError::not_found(
                "certificate_not_found",
                format!("certificate {serial} not found"),
            )
        };
        if serial.is_empty() || serial.len() > 128 || !serial.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(not_found());
        }
        let cert = self
            .core
            .store
            .get_cert(&serial)
            .await?
            .ok_or_else(not_found)?;
        let device = self.core.store.get_device(cert.device_id.as_str()).await?;
        if !device.is_some_and(|d| access.sees(&d)) {
            return Err(not_found());
        }
        Ok(cert)
    }

    /// Closes the sessions here, tells the other nodes (they re-read the device and do the same).
    pub(super) async fn after_revocation(&self, id: &DeviceId, serials: &[String]) {
        if !serials.is_empty() {
            tracing::info!(device = %id, serials = ?serials, "revoked certificates");
        }
        self.close_sessions_if_cert_invalid(id).await;
        if let Some(cluster) = self.core.cluster() {
            cluster.device_changed(id.as_str());
        }
    }

    /// One page of active certificates expiring before `now + within_ms` (expired ones
    /// included), soonest first, of devices within `access`; the cursor is
    /// `<not_after>.<serial>` of the previous page's last row.
    pub async fn expiring_certificates(
        &self,
        access: &Access,
        within_ms: u64,
        limit: Option<usize>,
        after: Option<&str>,
    ) -> ServiceResult<(Vec<CertRecord>, Option<String>)> {
        let limit = limit.unwrap_or(CERT_LIST_LEN_DEFAULT);
        if limit == 0 || limit > CERT_PAGE_LEN_MAX {
            return Err(ServiceError::invalid(
                "invalid_limit",
                format!("limit must be between 1 and {CERT_PAGE_LEN_MAX}"),
            ));
        }
        let after = after
            .map(|c| {
                c.split_once('.')
                    .and_then(|(ms, serial)| Some((ms.parse::<u64>().ok()?, serial)))
                    .ok_or_else(|| ServiceError::invalid("invalid_cursor", "cursor is not valid"))
            })
            .transpose()?;
        let before_ms = self.core.now_ms().saturating_add(within_ms);
        let page = self
            .core
            .store
            .expiring_certs(before_ms, limit, after)
            .await?;
        let next = (page.len() == limit)
            .then(|| {
                page.last()
                    .map(|c| format!("{}.{}", c.not_after_ms, c.serial))
            })
            .flatten();
        let mut shown = Vec::with_capacity(page.len());
        if access.scope().is_none() {
            shown = page;
        } else {
            for cert in page {
                let device = self.core.store.get_device(cert.device_id.as_str()).await?;
                if device.is_some_and(|d| access.sees(&d)) {
                    shown.push(cert);
                }
            }
        }
        Ok((shown, next))
    }

    /// The certificate gauges as last counted by [`Registry::cert_gauges`] (zero before).
    pub fn cached_cert_gauges(&self) -> CertGauges {
        mooring_proto::sync::lock(&self.cert_gauges)
            .map(|(_, g)| g)
            .unwrap_or_default()
    }

    /// The certificate gauges, counted at most once per [`CERT_GAUGES_TTL_MS`].
    pub async fn cert_gauges(&self) -> CertGauges {
        let now = self.core.now_ms();
        if let Some((read_ms, gauges)) = *mooring_proto::sync::lock(&self.cert_gauges) {
            if now < read_ms.saturating_add(CERT_GAUGES_TTL_MS) {
                return gauges;
            }
        }
        let warn_ms = u64::from(self.core.config.certificates.expiring_warn_days) * 86_400_000;
        let counted = async {
            let expiring = self
                .core
                .store
                .count_expiring_certs(now.saturating_add(warn_ms))
                .await?;
            let revoked = self.core.store.count_revoked_certs().await?;
            mooring_store::Result::Ok(CertGauges { expiring, revoked })
        }
        .await;
        match counted {
            Ok(gauges) => {
                *mooring_proto::sync::lock(&self.cert_gauges) = Some((now, gauges));
                gauges
            }
            Err(e) => {
                tracing::warn!(error = %e, "counting certificates for /metrics failed");
                mooring_proto::sync::lock(&self.cert_gauges)
                    .map(|(_, g)| g)
                    .unwrap_or_default()
            }
        }
    }
}

fn verdict(cert: Option<&CertRecord>, id: &str, now_ms: u64) -> CertVerdict {
    match cert {
        Some(c) if c.device_id.as_str() != id => CertVerdict::Unknown,
        None => CertVerdict::Unknown,
        Some(c) if c.state == CertState::Revoked => CertVerdict::Revoked {
            serial: c.serial.clone(),
            at_ms: c.revoked_at_ms.unwrap_or(0),
        },
        Some(c) if now_ms >= c.not_after_ms => CertVerdict::Expired {
            serial: c.serial.clone(),
            at_ms: c.not_after_ms,
        },
        Some(_) => CertVerdict::Valid,
    }
}

fn check_reason(reason: Option<&str>) -> ServiceResult<Option<&str>> {
    let reason = reason.map(str::trim).filter(|r| !r.is_empty());
    if let Some(r) = reason {
        if r.chars().count() > REVOKE_REASON_LEN_MAX || r.chars().any(char::is_control) {
            return Err(ServiceError::invalid(
                "invalid_reason",
                format!("the reason is at most {REVOKE_REASON_LEN_MAX} printable characters"),
            ));
        }
    }
    Ok(reason)
}

/// Sweeps this node's live sessions' certificates every [`SESSION_CERT_SWEEP_INTERVAL_MS`]
/// (module doc) until `stop`.
pub async fn run_session_cert_sweep(
    app: std::sync::Arc<crate::app::App>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let interval =
        std::time::Duration::from_millis(app.config().certificates.session_sweep_interval_ms);
    let mut since_ms = app.registry.core.now_ms().saturating_sub(SWEEP_OVERLAP_MS);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let started_ms = app.registry.core.now_ms();
        match app.registry.sweep_session_certs(since_ms).await {
            Ok(_) => since_ms = started_ms.saturating_sub(SWEEP_OVERLAP_MS),
            Err(e) => tracing::warn!(error = %e, "sweeping live sessions' certificates failed"),
        }
    }
}
