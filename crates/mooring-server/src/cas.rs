//! Registered manufacturer CAs and just-in-time registration (issue 16).
//!
//! An admin registers a manufacturer's CA certificate ([`Cas::register`]). The MQTT listener's
//! TLS config trusts, for client certificates, the fleet CA plus every *enabled* registered CA:
//! [`Cas::mqtt_tls`] is the config in force, rebuilt by [`Cas::reload`] whenever the enabled set
//! changes (here at once; on other nodes of a cluster by [`run_reload`], which re-reads the set
//! every [`CA_RELOAD_INTERVAL_MS`]). A disabled CA is no longer trusted: its devices fail the
//! handshake.
//!
//! A device certificate the ledger does not know but which an enabled CA issued (the handshake
//! verified the chain; [`Cas::just_in_time`] finds the CA by issuer name and signature) is
//! registered on that first connection when the CA auto-registers: device id = the
//! certificate's CN, tags = the CA's, the certificate added to the ledger with issuer `ca:<id>`
//! in the same transaction as the device. Concurrent first connections of one device register it
//! once (the store refuses the second; it then finds the certificate registered).

use crate::access::Access;
use crate::app::Core;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::registry::{validate_tags, Registry};
use mooring_proto::DeviceId;
use mooring_store::{cert_issuer_of_ca, CaRecord, CertRecord, CertState, NewDevice, StoreError};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

pub use mooring_api::CA_PEM_LEN_MAX;

/// How often a cluster node re-reads the registered CAs (a CA registered, enabled or disabled on
/// another node is trusted or refused here within about this long).
pub const CA_RELOAD_INTERVAL_MS: u64 = 1_000;

/// An enabled registered CA as the listener trusts it.
struct TrustedCa {
    record: CaRecord,
    der: Vec<u8>,
    /// Its subject (DER), which a certificate it issued names as issuer.
    subject_der: Vec<u8>,
}

/// What [`Cas::just_in_time`] decided for a certificate.
#[derive(Debug)]
pub enum Jitp {
    /// Not a certificate from an enabled registered CA: the ledger decides as for any other.
    NotApplicable,
    /// The device was registered now (or by a concurrent connection) with this certificate.
    Registered(Box<mooring_store::DeviceRecord>),
    /// Refused; the text says why (for the log and the device's pipeline).
    Refused(String),
}

/// The TLS config in force and the enabled CAs it trusts.
struct Loaded {
    tls: Arc<rustls::ServerConfig>,
    trusted: Arc<Vec<TrustedCa>>,
    /// The disabled CAs: a connection whose handshake began while one was still trusted is
    /// refused at CONNECT.
    disabled: Arc<Vec<TrustedCa>>,
    /// The enabled set as read (fingerprint, auto-register, tags), usable or not: what a
    /// reload compares with.
    read: Vec<CaKey>,
    /// The fleet PKI's generation it was built from (a CA rollover step replaces the PKI).
    pki_generation: u64,
}

/// What of an enabled CA a reload compares.
type CaKey = (String, bool, BTreeMap<String, String>);

/// The registered-CA service.
pub struct Cas {
    core: Arc<Core>,
    registry: Arc<Registry>,
    /// `None` until the first [`Cas::reload`] (the server does it before accepting).
    loaded: RwLock<Option<Loaded>>,
    /// One rebuild at a time, so an older set never replaces a newer one.
    reload_lock: tokio::sync::Mutex<()>,
    /// The registered CA whose certificate each device's latest session on this node
    /// authenticated with (none for fleet certificates), to close those sessions when the CA
    /// stops being trusted. At most one entry per device that connected here.
    session_cas: std::sync::Mutex<HashMap<DeviceId, String>>,
}

impl Cas {
    pub(crate) fn new(core: Arc<Core>, registry: Arc<Registry>) -> Self {
        Self {
            core,
            registry,
            loaded: RwLock::new(None),
            reload_lock: tokio::sync::Mutex::new(()),
            session_cas: std::sync::Mutex::default(),
        }
    }

    /// The MQTT listener's TLS config in force (each accepted connection takes the current
    /// one); `None` before the first [`Cas::reload`].
    pub fn mqtt_tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        mooring_proto::sync::read(&self.loaded)
            .as_ref()
            .map(|l| l.tls.clone())
    }

    fn trusted(&self) -> Arc<Vec<TrustedCa>> {
        mooring_proto::sync::read(&self.loaded)
            .as_ref()
            .map_or_else(|| Arc::new(Vec::new()), |l| l.trusted.clone())
    }

    /// Re-reads the registered CAs and, if the enabled set changed (or on the first call),
    /// puts a TLS config trusting it in force. A stored CA the TLS library cannot use is
    /// skipped (and logged).
    pub async fn reload(&self) -> anyhow::Result<()> {
        let _one = self.reload_lock.lock().await;
        let cas = self.core.store.list_cas().await?;
        let (mut trusted, mut disabled) = (Vec::new(), Vec::new());
        for ca in cas {
            let enabled = ca.enabled;
            match parse_stored(ca) {
                Some(t) if enabled => trusted.push(t),
                Some(t) => disabled.push(t),
                None => {}
            }
        }
        let read: Vec<CaKey> = trusted
            .iter()
            .map(|t| {
                (
                    t.record.sha256.clone(),
                    t.record.auto_register,
                    t.record.tags.clone(),
                )
            })
            .collect();
        let pki_generation = self.registry.pki_generation();
        if mooring_proto::sync::read(&self.loaded)
            .as_ref()
            .is_some_and(|l| l.read == read && l.pki_generation == pki_generation)
        {
            return Ok(());
        }
        let mut ders: Vec<Vec<u8>> = Vec::with_capacity(trusted.len());
        let mut usable = Vec::with_capacity(trusted.len());
        for t in trusted {
            // One CA the TLS library refuses must not take the others (or the fleet) down.
            match self.registry.mqtt_tls_config(std::slice::from_ref(&t.der)) {
                Ok(_) => {
                    ders.push(t.der.clone());
                    usable.push(t);
                }
                Err(e) => {
                    tracing::warn!(ca = %t.record.id, error = %e, "registered CA refused by TLS; not trusted")
                }
            }
        }
        let tls = self.registry.mqtt_tls_config(&ders)?;
        let ids: Vec<&str> = usable.iter().map(|t| t.record.id.as_str()).collect();
        tracing::info!(
            cas = ?ids,
            "MQTT listener trusts the fleet CA and {} registered CA(s)",
            ids.len()
        );
        let before: BTreeSet<String> = self.trusted().iter().map(|t| t.record.id.clone()).collect();
        let after: BTreeSet<String> = usable.iter().map(|t| t.record.id.clone()).collect();
        *mooring_proto::sync::write(&self.loaded) = Some(Loaded {
            tls,
            trusted: Arc::new(usable),
            disabled: Arc::new(disabled),
            read,
            pki_generation,
        });
        let gone: BTreeSet<&String> = before.difference(&after).collect();
        if !gone.is_empty() {
            self.close_sessions_of(&gone);
        }
        Ok(())
    }

    /// Admits device `id`'s session with certificate `der` as far as registered CAs go, and
    /// remembers which one (if any) issued it. `Err` (why, for the log) if a disabled CA issued
    /// it: its handshake began while the CA was still trusted.
    pub fn admit_session(&self, id: &DeviceId, der: Option<&[u8]>) -> Result<(), String> {
        let (trusted, disabled) = match mooring_proto::sync::read(&self.loaded).as_ref() {
            Some(l) => (l.trusted.clone(), l.disabled.clone()),
            None => (Arc::default(), Arc::default()),
        };
        let leaf = match der {
            Some(der) if !(trusted.is_empty() && disabled.is_empty()) => {
                x509_parser::parse_x509_certificate(der)
                    .ok()
                    .map(|(_, c)| c)
            }
            _ => None,
        };
        let mut sessions = mooring_proto::sync::lock(&self.session_cas);
        let Some(leaf) = leaf else {
            sessions.remove(id);
            return Ok(());
        };
        if let Some(ca) = issued_by(&trusted, &leaf) {
            sessions.insert(id.clone(), ca.id);
            return Ok(());
        }
        sessions.remove(id);
        match issued_by(&disabled, &leaf) {
            Some(ca) => Err(format!(
                "refused: certificate of {id} is from CA {}, which is disabled",
                ca.id
            )),
            None => Ok(()),
        }
    }

    /// Closes this node's device sessions that authenticated with a certificate from one of
    /// the CAs `gone` (no longer trusted: disabled).
    fn close_sessions_of(&self, gone: &BTreeSet<&String>) {
        let closing: Vec<(DeviceId, String)> = {
            let mut sessions = mooring_proto::sync::lock(&self.session_cas);
            let ids: Vec<DeviceId> = sessions
                .iter()
                .filter(|(_, ca)| gone.contains(ca))
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| sessions.remove(&id).map(|ca| (id, ca)))
                .collect()
        };
        let Some(broker) = self.core.broker() else {
            return;
        };
        for (id, ca) in closing {
            broker.kick(
                &mooring_broker::PrincipalKey::device(id.as_str()),
                mooring_broker::KickReason::NotAuthorized,
            );
            tracing::info!(device = %id, ca = %ca, "closed the device's session: its certificate's CA is no longer trusted");
        }
    }

    async fn reload_or_fail(&self) -> ServiceResult<()> {
        self.reload().await.map_err(ServiceError::internal)
    }

    /// Registers a manufacturer CA (admins, unscoped). `400 invalid_ca` says what is wrong with
    /// the certificate; the same CA twice is `409 ca_exists`.
    pub async fn register(
        &self,
        access: &Access,
        by: &str,
        cert_pem: &str,
        auto_register: bool,
        tags: BTreeMap<String, String>,
    ) -> ServiceResult<CaRecord> {
        unscoped(access)?;
        validate_tags(&tags)?;
        let now_ms = self.core.now_ms();
        let parsed =
            parse_ca(cert_pem, now_ms).map_err(|m| ServiceError::invalid("invalid_ca", m))?;
        if self.is_fleet_ca(&parsed.sha256) {
            return Err(ServiceError::invalid(
                "invalid_ca",
                "this is the fleet CA, which is trusted already",
            ));
        }
        // The TLS library must accept it as a trust anchor.
        self.registry
            .mqtt_tls_config(std::slice::from_ref(&parsed.der))
            .map_err(|e| {
                ServiceError::invalid("invalid_ca", format!("not usable as a trust anchor: {e}"))
            })?;
        let id = format!("ca_{}", hex::encode(rand::random::<[u8; 8]>()));
        let record = CaRecord {
            id,
            subject: parsed.subject,
            cert_pem: parsed.pem,
            sha256: parsed.sha256,
            auto_register,
            tags,
            enabled: true,
            created_at_ms: now_ms,
            created_by: by.to_owned(),
        };
        match self.core.store.add_ca(record.clone()).await {
            Ok(()) => {}
            Err(StoreError::AlreadyExists(_)) => {
                let existing = self
                    .core
                    .store
                    .list_cas()
                    .await?
                    .into_iter()
                    .find(|c| c.sha256 == record.sha256)
                    .map_or_else(String::new, |c| format!(" as {}", c.id));
                return Err(ServiceError::new(
                    ErrorKind::AlreadyExists,
                    "ca_exists",
                    format!("this CA is registered already{existing}"),
                ));
            }
            Err(StoreError::InvalidInput(m)) => {
                return Err(ServiceError::new(ErrorKind::Conflict, "too_many_cas", m))
            }
            Err(e) => return Err(e.into()),
        }
        self.reload_or_fail().await?;
        Ok(record)
    }

    /// Every registered CA, oldest first.
    pub async fn list(&self, access: &Access) -> ServiceResult<Vec<CaRecord>> {
        unscoped(access)?;
        Ok(self.core.store.list_cas().await?)
    }

    /// Enables or disables a CA (`404 ca_not_found`). Disabled, its certificates fail the TLS
    /// handshake from the next connection on.
    pub async fn set_enabled(
        &self,
        access: &Access,
        id: &str,
        enabled: bool,
    ) -> ServiceResult<CaRecord> {
        unscoped(access)?;
        if !self.core.store.set_ca_enabled(id, enabled).await? {
            return Err(ca_not_found(id));
        }
        self.reload_or_fail().await?;
        self.core
            .store
            .get_ca(id)
            .await?
            .ok_or_else(|| ca_not_found(id))
    }

    fn is_fleet_ca(&self, sha256: &str) -> bool {
        CertificateDer::pem_slice_iter(self.registry.ca_pem().as_bytes())
            .filter_map(Result::ok)
            .any(|der| crate::pki::cert_sha256_hex(der.as_ref()) == sha256)
    }

    /// The enabled registered CA that issued the DER certificate `leaf` (issuer name and
    /// signature), if any.
    fn issuer_of(&self, leaf: &x509_parser::certificate::X509Certificate<'_>) -> Option<CaRecord> {
        issued_by(&self.trusted(), leaf)
    }

    /// Just-in-time registration of a device presenting certificate `der` (CN `cn`, SHA-256
    /// `sha256`), which the TLS handshake verified. `Err`: the store failed.
    pub async fn just_in_time(
        &self,
        cn: &str,
        sha256: &str,
        der: &[u8],
    ) -> mooring_store::Result<Jitp> {
        if self.trusted().is_empty() {
            return Ok(Jitp::NotApplicable);
        }
        let Ok((_, leaf)) = x509_parser::parse_x509_certificate(der) else {
            return Ok(Jitp::NotApplicable);
        };
        let Some(ca) = self.issuer_of(&leaf) else {
            return Ok(Jitp::NotApplicable);
        };
        let store = &self.core.store;
        if let Some(known) = store.find_cert_by_sha256(sha256).await? {
            // Registered already (e.g. by a concurrent first connection): the ledger decides.
            return Ok(match store.get_device(known.device_id.as_str()).await? {
                Some(d) if known.device_id.as_str() == cn => Jitp::Registered(Box::new(d)),
                _ => Jitp::NotApplicable,
            });
        }
        if !ca.auto_register {
            return Ok(Jitp::Refused(format!(
                "refused: certificate of {cn} chains to registered CA {}, which does not auto-register",
                ca.id
            )));
        }
        let id = match DeviceId::parse(cn) {
            Ok(id) => id,
            Err(e) => {
                return Ok(Jitp::Refused(format!(
                    "refused: the CN {cn:?} of a certificate from registered CA {} is not a valid device id ({e})",
                    ca.id
                )))
            }
        };
        let exists = || {
            Jitp::Refused(format!(
                "refused: device {cn} exists; its certificate from CA {} is not registered",
                ca.id
            ))
        };
        if store.get_device(cn).await?.is_some() {
            return Ok(exists());
        }
        let now_ms = self.core.now_ms();
        let to_ms = |t: x509_parser::time::ASN1Time| {
            u64::try_from(t.timestamp())
                .unwrap_or(0)
                .saturating_mul(1000)
                .min(mooring_store::TS_MS_MAX)
        };
        let not_before_ms = to_ms(leaf.validity().not_before);
        let not_after_ms = to_ms(leaf.validity().not_after);
        let serial = serial_hex(leaf.raw_serial());
        let cert = CertRecord {
            serial: serial.clone(),
            device_id: id.clone(),
            sha256: sha256.to_owned(),
            not_before_ms,
            not_after_ms,
            issued_at_ms: now_ms,
            issuer: cert_issuer_of_ca(&ca.id),
            state: CertState::Active,
            revoked_at_ms: None,
            revoke_reason: None,
        };
        let device = NewDevice {
            id: id.clone(),
            tags: ca.tags.clone(),
            created_at_ms: now_ms,
            cert_sha256: sha256.to_owned(),
            cert_serial: serial,
            cert_not_after_ms: not_after_ms,
            cert_issuer: cert_issuer_of_ca(&ca.id),
        };
        match store.create_device_with_cert(device, cert).await {
            Ok(record) => {
                tracing::info!(device = cn, ca = %ca.id, "registered just in time: certificate from registered CA");
                Ok(Jitp::Registered(Box::new(record)))
            }
            Err(StoreError::AlreadyExists(_)) => {
                // A concurrent first connection won, or the id or serial is taken.
                match store.find_cert_by_sha256(sha256).await? {
                    Some(c) if c.device_id.as_str() == cn => {
                        match store.get_device(cn).await? {
                            Some(d) => Ok(Jitp::Registered(Box::new(d))),
                            None => Ok(exists()),
                        }
                    }
                    _ if store.get_device(cn).await?.is_some() => Ok(exists()),
                    _ => Ok(Jitp::Refused(format!(
                        "refused: the serial of {cn}'s certificate from CA {} is taken by another certificate",
                        ca.id
                    ))),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Whether certificate `der` was issued by an enabled registered CA; its id if so (for
    /// the refusal text of a device that exists with other certificates).
    pub fn issuing_ca_id(&self, der: &[u8]) -> Option<String> {
        let (_, leaf) = x509_parser::parse_x509_certificate(der).ok()?;
        self.issuer_of(&leaf).map(|c| c.id)
    }
}

/// Cluster nodes re-read the registered CAs and the fleet PKI every [`CA_RELOAD_INTERVAL_MS`] (a
/// change made on another node, a CA registered or disabled or a fleet CA rollover step, is in
/// force here within about that).
pub async fn run_reload(app: Arc<crate::app::App>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let interval = std::time::Duration::from_millis(CA_RELOAD_INTERVAL_MS);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(interval) => {}
        }
        if let Err(e) = app.registry.reload_shared_pki().await {
            tracing::warn!(error = %e, "re-reading the cluster's fleet PKI failed");
        }
        if let Err(e) = app.cas.reload().await {
            tracing::warn!(error = %e, "re-reading the registered CAs failed");
        }
    }
}

/// The CA of `cas` that issued `leaf`: the name first (a byte comparison), the signature only
/// for a CA of that name.
fn issued_by(
    cas: &[TrustedCa],
    leaf: &x509_parser::certificate::X509Certificate<'_>,
) -> Option<CaRecord> {
    let issuer = leaf.issuer().as_raw();
    cas.iter().find_map(|t| {
        if t.subject_der != issuer {
            return None;
        }
        let (_, ca) = x509_parser::parse_x509_certificate(&t.der).ok()?;
        leaf.verify_signature(Some(ca.public_key()))
            .is_ok()
            .then(|| t.record.clone())
    })
}

/// A stored CA parsed (`None`, logged, if it cannot be read).
fn parse_stored(ca: CaRecord) -> Option<TrustedCa> {
    let der = match CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()) {
        Ok(der) => der.as_ref().to_vec(),
        Err(e) => {
            tracing::warn!(ca = %ca.id, error = %e, "registered CA unreadable; not trusted");
            return None;
        }
    };
    let subject_der = match x509_parser::parse_x509_certificate(&der) {
        Ok((_, parsed)) => parsed.subject().as_raw().to_vec(),
        Err(e) => {
            tracing::warn!(ca = %ca.id, error = %e, "registered CA unreadable; not trusted");
            return None;
        }
    };
    Some(TrustedCa {
        record: ca,
        der,
        subject_der,
    })
}

fn unscoped(access: &Access) -> ServiceResult<()> {
    if access.scope().is_some() {
        return Err(ServiceError::new(
            ErrorKind::Forbidden,
            "forbidden",
            "registered CAs are fleet-wide: a caller limited to a scope cannot manage them",
        ));
    }
    Ok(())
}

fn ca_not_found(id: &str) -> ServiceError {
    ServiceError::not_found("ca_not_found", format!("CA {id} not found"))
}

/// Lowercase hex of a DER serial without leading zero bytes (as the fleet's serials are kept).
fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    hex::encode(&raw[start.min(raw.len())..])
}

/// A CA certificate as submitted, checked.
#[derive(Debug)]
pub struct ParsedCa {
    pub der: Vec<u8>,
    /// The PEM of the one certificate (normalized).
    pub pem: String,
    pub subject: String,
    pub sha256: String,
    pub not_after_ms: u64,
}

/// Checks that `pem` is exactly one CA certificate, usable at `now_ms`; `Err` says what is
/// wrong, for a 400.
pub fn parse_ca(pem: &str, now_ms: u64) -> Result<ParsedCa, String> {
    if pem.len() > CA_PEM_LEN_MAX {
        return Err(format!("cert_pem is longer than {CA_PEM_LEN_MAX} bytes"));
    }
    if pem.contains("PRIVATE KEY") {
        return Err("cert_pem contains a private key; send only the CA certificate".into());
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cert_pem is not valid PEM: {e}"))?;
    let der = match certs.as_slice() {
        [] => return Err("cert_pem holds no certificate (-----BEGIN CERTIFICATE-----)".to_owned()),
        [one] => one.as_ref().to_vec(),
        more => {
            return Err(format!(
                "cert_pem holds {} certificates; register one CA certificate at a time",
                more.len()
            ))
        }
    };
    let (rest, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
    if !rest.is_empty() {
        return Err("the certificate has trailing bytes".into());
    }
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => {
            return Err(
                "not a CA certificate (basicConstraints CA:TRUE is missing); this looks like a device certificate"
                    .into(),
            )
        }
        Err(e) => return Err(format!("its basicConstraints cannot be read: {e}")),
    }
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => {
            return Err("its key usage does not include keyCertSign".into())
        }
        Ok(_) => {}
        Err(e) => return Err(format!("its key usage cannot be read: {e}")),
    }
    let now_s = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
    let validity = cert.validity();
    if validity.not_after.timestamp() < now_s {
        return Err(format!("it expired at {}", validity.not_after));
    }
    if validity.not_before.timestamp() > now_s {
        return Err(format!("it is not valid before {}", validity.not_before));
    }
    let not_after_ms = u64::try_from(validity.not_after.timestamp())
        .unwrap_or(0)
        .saturating_mul(1000);
    let subject = cert.subject().to_string();
    let pem = pem_of(&der);
    Ok(ParsedCa {
        sha256: crate::pki::cert_sha256_hex(&der),
        der,
        pem,
        subject,
        not_after_ms,
    })
}

/// The PEM of a DER certificate.
fn pem_of(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or(""));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// When a stored CA certificate expires (Unix ms; 0 if unreadable), for the API.
pub fn ca_not_after_ms(pem: &str) -> u64 {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .and_then(|der| {
            let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
            u64::try_from(c.validity().not_after.timestamp()).ok()
        })
        .map_or(0, |s| s.saturating_mul(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_of_round_trips_through_the_pem_parser() {
        for len in [1usize, 2, 3, 4, 5, 64, 100] {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
            let pem = pem_of(&der);
            let back = CertificateDer::from_pem_slice(pem.as_bytes()).expect("parse");
            assert_eq!(back.as_ref(), der.as_slice(), "len {len}");
        }
    }

    #[test]
    fn serial_hex_drops_leading_zero_bytes() {
        assert_eq!(serial_hex(&[0, 0x81, 0x02]), "8102");
        assert_eq!(serial_hex(&[0x01]), "01");
        assert_eq!(serial_hex(&[0]), "00");
        assert_eq!(serial_hex(&[]), "");
    }

    #[test]
    fn parse_ca_refuses_what_is_not_one_ca_certificate() {
        assert!(parse_ca("", 0)
            .expect_err("refused")
            .contains("no certificate"));
        assert!(parse_ca("hello", 0)
            .expect_err("refused")
            .contains("no certificate"));
        let big = "x".repeat(CA_PEM_LEN_MAX + 1);
        assert!(parse_ca(&big, 0).expect_err("refused").contains("longer"));
        assert!(parse_ca("-----BEGIN PRIVATE KEY-----\n", 0)
            .expect_err("refused")
            .contains("private key"));
    }
}
