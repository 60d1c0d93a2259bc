//! Fleet CA rollover (issue 16): a new fleet CA is added, both are trusted during the overlap,
//! devices are moved to certificates from the new one, then the previous one is retired.
//!
//! 1. [`Registry::begin_ca_rollover`]: a new CA is made and issues every certificate from then
//!    on (enrollments, renewals, `device create`); the previous CA stays trusted for client
//!    certificates and keeps signing the server certificate, which devices still verify with
//!    it. Every answer that carries the fleet's trust bundle (`ca_pem`) now carries both CAs, so
//!    a device renewing its certificate receives the new CA before it is needed. The caller
//!    (`mooring ca rotate-fleet`) then starts a fleet rotation of the certificates the previous
//!    CA issued (`jobs.rs`, `RotateCerts::fleet_issuer`).
//! 2. [`Registry::retire_previous_ca`]: refused while devices still hold live certificates from
//!    the previous CA, unless forced (then those are revoked first: their sessions close). A
//!    new server certificate from the new CA is put in place and the previous CA is no longer
//!    trusted.
//!
//! Which certificates are the previous CA's: the ledger names each certificate's fleet CA
//! (`fleet:<hash prefix>`; `fleet` for those issued before rollovers existed), so every active
//! fleet certificate not named after the issuing CA is one to move.
//!
//! Where the PKI lives ([`PkiHome`]): the data dir (`ca.next.*` files beside `ca.*`, renames
//! that finish after a crash, `pki.rs`), or the cluster's database (one compare-and-set per
//! step; the other nodes re-read it every [`crate::cas::CA_RELOAD_INTERVAL_MS`] with the
//! registered CAs and rebuild their TLS config).

use super::Registry;
use crate::access::Access;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::pki::{FleetCaInfo, Pki, RolloverRefused, SecretKey};
use std::path::PathBuf;
use std::sync::Arc;

/// Why certificates of the previous CA were revoked by a forced retirement.
pub const RETIRED_REASON: &str = "ca_retired";
/// Certificates revoked per store page by a forced retirement.
const RETIRE_PAGE_LEN: usize = 500;
/// Most certificates one forced retirement call revokes: a larger remainder is left for the next
/// call (the answer says how many), so one request stays short.
pub const RETIRE_REVOKE_MAX: u64 = 5_000;

/// What a retirement call did.
#[derive(Debug, Clone)]
pub struct Retirement {
    /// The fleet CA(s) now.
    pub rollover: CaRollover,
    /// Certificates of the previous CA revoked by this call (`force`).
    pub revoked: u64,
    /// Whether the previous CA is retired now; `false`: more than [`RETIRE_REVOKE_MAX`] were
    /// left, the next call goes on.
    pub retired: bool,
}

/// Where the fleet PKI is kept.
#[derive(Clone)]
pub enum PkiHome {
    /// Files in the data dir (a single node).
    DataDir(PathBuf),
    /// The cluster's database, private keys sealed with the cluster key.
    Shared(Arc<SecretKey>),
}

/// The fleet CA(s) and how far a rollover is.
#[derive(Debug, Clone)]
pub struct CaRollover {
    /// The CA that issues certificates.
    pub issuing: FleetCaInfo,
    /// During a rollover: the previous CA, still trusted.
    pub previous: Option<FleetCaInfo>,
    /// How the ledger names the issuing CA's certificates.
    pub issuer_label: String,
    /// During a rollover: live (active) certificates of the previous CA.
    pub previous_certificates: u64,
}

impl Registry {
    /// The fleet CA(s) and the rollover's progress.
    pub async fn ca_rollover(&self, access: &Access) -> ServiceResult<CaRollover> {
        unscoped(access)?;
        self.rollover_view(&self.pki()).await
    }

    async fn rollover_view(&self, pki: &Pki) -> ServiceResult<CaRollover> {
        let (issuing, previous) = pki.fleet_cas().map_err(ServiceError::internal)?;
        let issuer_label = pki.issuer_label().to_owned();
        let previous_certificates = if pki.rolling_over() {
            self.core
                .store
                .count_old_fleet_certs(&issuer_label, self.core.now_ms())
                .await?
        } else {
            0
        };
        Ok(CaRollover {
            issuing,
            previous,
            issuer_label,
            previous_certificates,
        })
    }

    /// Begins a rollover (module doc, step 1). `409 rollover_in_progress` if one is.
    pub async fn begin_ca_rollover(&self, access: &Access) -> ServiceResult<CaRollover> {
        unscoped(access)?;
        let now = self.now_datetime();
        let _one = self.rollover_lock.lock().await;
        let in_progress = || {
            ServiceError::new(
                ErrorKind::Conflict,
                "rollover_in_progress",
                "a fleet CA rollover is in progress already: retire the previous CA first \
                 (mooring ca rotate-fleet retire)",
            )
        };
        if self.pki().rolling_over() {
            return Err(in_progress());
        }
        let pki = match &self.pki_home {
            PkiHome::DataDir(dir) => {
                Pki::begin_rollover_in_dir(dir, &self.core.config.server_names, now)
                    .map_err(ServiceError::internal)?
            }
            PkiHome::Shared(key) => {
                match Pki::begin_rollover_shared(self.core.store.as_ref(), key, now)
                    .await
                    .map_err(ServiceError::internal)?
                {
                    Ok((pki, bytes)) => {
                        *mooring_proto::sync::lock(&self.pki_read) = bytes;
                        pki
                    }
                    Err(_) => return Err(in_progress()),
                }
            }
        };
        let view = self.rollover_view(&pki).await?;
        tracing::info!(new_ca = %view.issuing.sha256, "fleet CA rollover begun: the new CA issues, both are trusted");
        self.put_pki(pki, None);
        Ok(view)
    }

    /// Retires the previous CA (module doc, step 2). `409 no_rollover` without a rollover;
    /// `409 rollover_incomplete` while devices hold live (unexpired, active) certificates of
    /// the previous CA, unless `force` (they are revoked first, at most [`RETIRE_REVOKE_MAX`]
    /// per call; the CA is retired by the call that revokes the last).
    pub async fn retire_previous_ca(
        &self,
        access: &Access,
        force: bool,
    ) -> ServiceResult<Retirement> {
        unscoped(access)?;
        let _one = self.rollover_lock.lock().await;
        let no_rollover = || {
            ServiceError::new(
                ErrorKind::Conflict,
                "no_rollover",
                "no fleet CA rollover is in progress (mooring ca rotate-fleet begins one)",
            )
        };
        let pki = self.pki();
        if !pki.rolling_over() {
            return Err(no_rollover());
        }
        let current = pki.issuer_label().to_owned();
        let left = self
            .core
            .store
            .count_old_fleet_certs(&current, self.core.now_ms())
            .await?;
        let mut revoked = 0;
        if left > 0 && !force {
            return Err(ServiceError::new(
                ErrorKind::Conflict,
                "rollover_incomplete",
                format!(
                    "{left} device certificate(s) from the previous fleet CA are still live: \
                     wait until the rotation has moved them (mooring ca rotate-fleet status), or \
                     retire with --force to revoke them"
                ),
            ));
        }
        if left > 0 {
            revoked = self.revoke_previous_ca_certs(&current).await?;
            if revoked < left {
                let rollover = self.rollover_view(&pki).await?;
                if rollover.previous_certificates > 0 {
                    tracing::info!(
                        revoked,
                        left = rollover.previous_certificates,
                        "forced retirement: revoked a batch; call again to go on"
                    );
                    return Ok(Retirement {
                        rollover,
                        revoked,
                        retired: false,
                    });
                }
            }
        }
        let now = self.now_datetime();
        let names = &self.core.config.server_names;
        let pki = match &self.pki_home {
            PkiHome::DataDir(dir) => {
                Pki::retire_previous_in_dir(dir, names, now).map_err(ServiceError::internal)?
            }
            PkiHome::Shared(key) => {
                match Pki::retire_previous_shared(
                    self.core.store.as_ref(),
                    key,
                    &current,
                    names,
                    now,
                )
                .await
                .map_err(ServiceError::internal)?
                {
                    Ok((pki, bytes)) => {
                        *mooring_proto::sync::lock(&self.pki_read) = bytes;
                        pki
                    }
                    Err(RolloverRefused::NotInProgress | RolloverRefused::InProgress) => {
                        return Err(no_rollover())
                    }
                }
            }
        };
        let view = self.rollover_view(&pki).await?;
        tracing::info!(ca = %view.issuing.sha256, revoked, "previous fleet CA retired: a new server certificate, one CA trusted");
        self.put_pki(pki, None);
        Ok(Retirement {
            rollover: view,
            revoked,
            retired: true,
        })
    }

    /// Revokes every live certificate of the previous CA (their sessions close on every node).
    async fn revoke_previous_ca_certs(&self, current: &str) -> ServiceResult<u64> {
        let mut revoked = 0;
        let mut handled = 0;
        loop {
            // Revoked rows leave the selection, so the first page is always the next one.
            let page = self
                .core
                .store
                .old_fleet_certs(current, self.core.now_ms(), RETIRE_PAGE_LEN, None)
                .await?;
            if page.is_empty() || handled >= RETIRE_REVOKE_MAX {
                return Ok(revoked);
            }
            handled += page.len() as u64;
            for cert in page {
                let now_ms = self.core.now_ms();
                if self
                    .core
                    .store
                    .revoke_cert(&cert.serial, now_ms, Some(RETIRED_REASON))
                    .await?
                {
                    revoked += 1;
                }
                self.after_revocation(&cert.device_id, std::slice::from_ref(&cert.serial))
                    .await;
            }
        }
    }

    /// A cluster node: re-reads the shared PKI and, if another node took a rollover step,
    /// puts it in force here. `true` if it changed.
    pub(crate) async fn reload_shared_pki(&self) -> anyhow::Result<bool> {
        let PkiHome::Shared(key) = &self.pki_home else {
            return Ok(false);
        };
        let Some(bytes) = self
            .core
            .store
            .get_value(crate::pki::SHARED_PKI_KEY)
            .await?
        else {
            return Ok(false);
        };
        if *mooring_proto::sync::lock(&self.pki_read) == bytes {
            return Ok(false);
        }
        let pki = Pki::from_shared(&bytes, key)?;
        let first = mooring_proto::sync::lock(&self.pki_read).is_empty();
        self.put_pki(pki, Some(bytes));
        if !first {
            tracing::info!("the fleet PKI changed on another node; now in force here");
        }
        Ok(!first)
    }

    /// Puts `pki` in force: the HTTPS listener's certificate at once, the MQTT listener's TLS
    /// config at the next `Cas::reload`.
    fn put_pki(&self, pki: Pki, read: Option<Vec<u8>>) {
        if let Some(bytes) = read {
            *mooring_proto::sync::lock(&self.pki_read) = bytes;
        }
        if let Err(e) = self.server_cert.set(&pki) {
            tracing::error!(error = %format!("{e:#}"), "the new server certificate is unusable; HTTPS keeps the previous one");
        }
        *mooring_proto::sync::write(&self.pki) = Arc::new(pki);
        self.pki_generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

fn unscoped(access: &Access) -> ServiceResult<()> {
    if access.scope().is_some() {
        return Err(ServiceError::new(
            ErrorKind::Forbidden,
            "forbidden",
            "the fleet CA is fleet-wide: a caller limited to a scope cannot manage it",
        ));
    }
    Ok(())
}
