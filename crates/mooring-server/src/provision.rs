//! Provisioning (issue 16): claim tokens and enrollment, where a device's key never leaves it.
//!
//! A claim is a secret (`mct_` + 64 hex, shown once, stored as its SHA-256) that lets up to
//! `uses_max` keys enroll until it expires or is revoked. [`Provisioning::enroll`] (HTTPS) and
//! the MQTT hooks ([`Provisioning::enroll_with_claim`], for a client that connected with the
//! token) take a CSR: only its public key is used; the fleet CA issues the certificate (CN =
//! the device id) and the device is created with the claim's tags.
//!
//! Crash safety without a cross-trait transaction: the enrollment (claim, key → device id,
//! certificate) and the claim's use are stored together first
//! ([`mooring_store::ClaimStore::reserve_enrollment`]), then the device is created. A request
//! with the same claim and key finds the enrollment and finishes what is missing, or answers
//! the same certificate again (no use taken). If the device id was taken meanwhile (another
//! path created it), the reservation is released and the answer is `device_exists`. The store
//! decides who gets the last use, so this holds across the nodes of a cluster.
//!
//! Unknown, expired and revoked tokens get one answer, `claim_invalid` (the log says which), and
//! count as failures of the client's address (the login-failure counters, shared by every
//! node); over `[provisioning] enroll_failures_per_address_max` in a window the address is
//! refused with `too_many_attempts`.

use crate::access::Access;
use crate::app::Core;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::registry::{validate_tags, PinnedCert, Registry};
use mooring_proto::DeviceId;
use mooring_store::{ClaimCreate, ClaimRecord, EnrollmentRecord, EnrollmentReserve};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// Prefix of a claim token.
pub const CLAIM_TOKEN_PREFIX: &str = "mct_";
/// Default claim lifetime (`--ttl`): 24 h.
pub const CLAIM_TTL_MS_DEFAULT: u64 = 24 * 3_600_000;
/// Shortest claim lifetime: 1 min.
pub const CLAIM_TTL_MS_MIN: u64 = 60_000;
/// Longest claim lifetime the configuration may allow: 365 d.
pub const CLAIM_TTL_MS_MAX: u64 = 365 * 86_400_000;
/// Most devices one claim may enroll (`--count`).
pub const CLAIM_USES_MAX: u32 = 1_000_000;
/// Longest claim name, in characters.
pub const CLAIM_NAME_LEN_MAX: usize = 128;
/// Most claims one list call returns.
pub const CLAIM_PAGE_LEN_MAX: usize = 1000;
/// Store pages one claim listing reads at most to fill a scoped caller's page.
const CLAIM_SCAN_PAGES_MAX: usize = 20;
pub const CLAIM_PAGE_LEN_DEFAULT: usize = 100;
/// Most enrolled device ids `GET /api/v1/claims/{id}` shows.
pub const CLAIM_DEVICES_SHOWN_MAX: usize = 100;
/// Prefix of a server-assigned device id: `d-` + 12 hex digits (48 random bits).
pub const ASSIGNED_ID_PREFIX: &str = "d-";
/// Prefix of a server-assigned claim client id: `claim-` + 16 hex digits.
pub const CLAIM_CLIENT_ID_PREFIX: &str = "claim-";
/// How long a revoked or expired claim (and which devices it enrolled) is kept before pruning.
pub const CLAIM_KEEP_DEAD_MS: u64 = 7 * 86_400_000;
/// Claims one prune step deletes.
const PRUNE_ROWS_MAX: usize = 1000;
/// Clients whose request counts are kept at once; when full the counts start over.
const REQUEST_COUNTERS_LEN_MAX: usize = 100_000;

/// What a new claim asks for (the API's `POST /api/v1/claims`, validated here).
#[derive(Debug, Clone, Default)]
pub struct NewClaim {
    pub uses_max: Option<u32>,
    pub ttl_ms: Option<u64>,
    pub tags: BTreeMap<String, String>,
    pub assign_ids: bool,
    pub name: Option<String>,
}

/// An enrollment's answer.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub claim_id: String,
    pub device_id: String,
    pub certificate_pem: String,
    pub ca_pem: String,
    /// This request created the device (false: an earlier one did; the same certificate again).
    pub created: bool,
}

/// Why a claim client's CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimConnectRefusal {
    /// Unknown, expired or revoked token, or its address is throttled.
    BadToken,
    /// The client id is not a valid device-id-syntax string.
    BadClientId,
    /// Over a connection bound (per claim or on this node).
    Busy,
    /// The store failed.
    Unavailable,
}

/// MQTT claim connections on this node.
#[derive(Default)]
struct ClaimSessions {
    per_claim: HashMap<String, u32>,
    total: u32,
}

/// The provisioning service: claims and enrollment.
pub struct Provisioning {
    core: Arc<Core>,
    registry: Arc<Registry>,
    sessions: Mutex<ClaimSessions>,
    /// Each claim client's requests of the current minute.
    requests: crate::ratelimit::PerMinute,
}

fn claim_invalid() -> ServiceError {
    ServiceError::new(
        ErrorKind::Unauthorized,
        "claim_invalid",
        "the claim token is not valid (unknown, expired or revoked)",
    )
}

fn claim_not_found(id: &str) -> ServiceError {
    ServiceError::not_found("claim_not_found", format!("claim {id} not found"))
}

fn no_use_left(claim: &ClaimRecord) -> ServiceError {
    if claim.uses_max == 1 {
        ServiceError::new(
            ErrorKind::Conflict,
            "claim_used",
            "claim already used by another key",
        )
    } else {
        ServiceError::new(
            ErrorKind::Conflict,
            "claim_exhausted",
            format!(
                "every one of the claim's {} uses is taken by another key",
                claim.uses_max
            ),
        )
    }
}

fn device_exists(id: &str) -> ServiceError {
    ServiceError::new(
        ErrorKind::AlreadyExists,
        "device_exists",
        format!("device {id} already exists"),
    )
}

fn too_many_attempts(window_ms: u64) -> ServiceError {
    ServiceError::new(
        ErrorKind::TooManyRequests,
        "too_many_attempts",
        format!(
            "too many failed enrollments from this address; try again in {} minutes",
            window_ms.div_ceil(60_000)
        ),
    )
}

/// Lowercase hex SHA-256 of a key's DER SubjectPublicKeyInfo: what identifies "the same key".
fn key_sha256(key: &impl rcgen::PublicKeyData) -> String {
    hex::encode(Sha256::digest(key.subject_public_key_info()))
}

/// Whether `access` reaches the devices a claim with these tags enrolls, whatever their ids
/// (a scope with `id:` terms reaches no claim: the ids are not known in advance).
fn claim_in_scope(access: &Access, tags: &BTreeMap<String, String>) -> bool {
    access.sees_facts("", tags)
}

impl Provisioning {
    fn sessions(&self) -> std::sync::MutexGuard<'_, ClaimSessions> {
        mooring_proto::sync::lock(&self.sessions)
    }

    pub(crate) fn new(core: Arc<Core>, registry: Arc<Registry>) -> Self {
        Self {
            core,
            registry,
            sessions: Mutex::default(),
            requests: crate::ratelimit::PerMinute::new(REQUEST_COUNTERS_LEN_MAX),
        }
    }

    /// Creates a claim; returns it and its token (shown once). `created_by` is the caller's
    /// principal id (what the live-claim bound per creator counts by).
    pub async fn create_claim(
        &self,
        access: &Access,
        created_by: &str,
        req: NewClaim,
    ) -> ServiceResult<(ClaimRecord, String)> {
        let cfg = &self.core.config.provisioning;
        let uses_max = req.uses_max.unwrap_or(1);
        if uses_max == 0 || uses_max > CLAIM_USES_MAX {
            return Err(ServiceError::invalid(
                "invalid_count",
                format!("count must be between 1 and {CLAIM_USES_MAX}"),
            ));
        }
        let ttl_ms = req.ttl_ms.unwrap_or(CLAIM_TTL_MS_DEFAULT);
        if !(CLAIM_TTL_MS_MIN..=cfg.claim_ttl_max_ms).contains(&ttl_ms) {
            return Err(ServiceError::invalid(
                "invalid_ttl",
                format!(
                    "ttl must be between {CLAIM_TTL_MS_MIN} ms (1 min) and {} ms",
                    cfg.claim_ttl_max_ms
                ),
            ));
        }
        if let Some(name) = &req.name {
            if name.is_empty()
                || name.chars().count() > CLAIM_NAME_LEN_MAX
                || name.chars().any(char::is_control)
            {
                return Err(ServiceError::invalid(
                    "invalid_name",
                    format!(
                        "name must be 1-{CLAIM_NAME_LEN_MAX} characters, none a control character"
                    ),
                ));
            }
        }
        validate_tags(&req.tags)?;
        if !claim_in_scope(access, &req.tags) {
            return Err(ServiceError::new(
                ErrorKind::Forbidden,
                "outside_scope",
                "the devices this claim would enroll are outside your scope: give it the tags your scope requires (a scope with id: terms cannot create claims)",
            ));
        }
        let now_ms = self.core.now_ms();
        let token = format!(
            "{CLAIM_TOKEN_PREFIX}{}",
            hex::encode(rand::random::<[u8; 32]>())
        );
        let claim = ClaimRecord {
            id: format!("clm_{}", hex::encode(rand::random::<[u8; 8]>())),
            token_sha256: crate::auth::token_sha256(&token),
            name: req.name,
            uses_max,
            uses: 0,
            tags: req.tags,
            assign_ids: req.assign_ids,
            expires_at_ms: now_ms.saturating_add(ttl_ms),
            created_by: created_by.to_owned(),
            created_at_ms: now_ms,
            revoked_at_ms: None,
        };
        match self
            .core
            .store
            .create_claim(
                claim.clone(),
                now_ms,
                cfg.claims_per_creator_max,
                cfg.claims_max,
            )
            .await?
        {
            ClaimCreate::Created => Ok((claim, token)),
            ClaimCreate::CreatorFull => Err(ServiceError::new(
                ErrorKind::TooManyRequests,
                "too_many_claims",
                format!(
                    "you hold {} live claims, the most allowed; revoke some or wait until they expire",
                    cfg.claims_per_creator_max
                ),
            )),
            ClaimCreate::TotalFull => Err(ServiceError::new(
                ErrorKind::Unavailable,
                "too_many_claims",
                format!(
                    "the server holds {} live claims, the most allowed; revoke some or wait until they expire",
                    cfg.claims_max
                ),
            )),
        }
    }

    /// One page of claims (by id) that `access` reaches; the cursor is the last id of the
    /// previous page.
    pub async fn list_claims(
        &self,
        access: &Access,
        limit: Option<usize>,
        cursor: Option<&str>,
    ) -> ServiceResult<(Vec<ClaimRecord>, Option<String>)> {
        let limit = limit.unwrap_or(CLAIM_PAGE_LEN_DEFAULT);
        if limit == 0 || limit > CLAIM_PAGE_LEN_MAX {
            return Err(ServiceError::invalid(
                "invalid_limit",
                format!("limit must be between 1 and {CLAIM_PAGE_LEN_MAX}"),
            ));
        }
        // A scoped caller's page is filled from as many store pages as it takes (at most
        // CLAIM_SCAN_PAGES_MAX; then the cursor says where to go on), so it is not cut short
        // by claims outside the scope.
        let mut visible = Vec::with_capacity(limit);
        let mut cursor = cursor.map(str::to_owned);
        for _ in 0..CLAIM_SCAN_PAGES_MAX {
            let page = self
                .core
                .store
                .list_claims(limit, cursor.as_deref())
                .await?;
            let full = page.len() == limit;
            for c in page {
                cursor = Some(c.id.clone());
                if claim_in_scope(access, &c.tags) {
                    visible.push(c);
                    if visible.len() == limit {
                        return Ok((visible, cursor));
                    }
                }
            }
            if !full {
                return Ok((visible, None));
            }
        }
        Ok((visible, cursor))
    }

    /// The claim and the ids of the devices enrolled with it (at most
    /// [`CLAIM_DEVICES_SHOWN_MAX`]); `claim_not_found` also outside the caller's scope.
    pub async fn get_claim(
        &self,
        access: &Access,
        id: &str,
    ) -> ServiceResult<(ClaimRecord, Vec<String>)> {
        let claim = self
            .core
            .store
            .get_claim(id)
            .await?
            .filter(|c| claim_in_scope(access, &c.tags))
            .ok_or_else(|| claim_not_found(id))?;
        let devices = self
            .core
            .store
            .list_enrollments(id, CLAIM_DEVICES_SHOWN_MAX)
            .await?
            .into_iter()
            .map(|e| e.device_id)
            .collect();
        Ok((claim, devices))
    }

    /// Revokes the claim: no device enrolls with it from now on (devices it enrolled keep
    /// their certificates). Revoking a revoked claim answers it as it is.
    pub async fn revoke_claim(&self, access: &Access, id: &str) -> ServiceResult<ClaimRecord> {
        self.core
            .store
            .get_claim(id)
            .await?
            .filter(|c| claim_in_scope(access, &c.tags))
            .ok_or_else(|| claim_not_found(id))?;
        self.core
            .store
            .revoke_claim(id, self.core.now_ms())
            .await?
            .ok_or_else(|| claim_not_found(id))
    }

    /// Deletes claims revoked or expired more than [`CLAIM_KEEP_DEAD_MS`] ago, with their
    /// enrollments, in bounded steps (under the retention lease). Returns how many.
    pub async fn prune(&self) -> mooring_store::Result<u64> {
        let before = self.core.now_ms().saturating_sub(CLAIM_KEEP_DEAD_MS);
        let mut n = 0;
        loop {
            let deleted = self.core.store.prune_claims(before, PRUNE_ROWS_MAX).await?;
            n += deleted;
            if deleted < PRUNE_ROWS_MAX as u64 {
                return Ok(n);
            }
        }
    }

    fn address_key(source: &str) -> String {
        format!("enroll:{source}")
    }

    /// Refuses an address over its failure bound.
    async fn check_address(&self, source: &str) -> ServiceResult<()> {
        let window_ms = self.core.config.auth.login_window_ms;
        let n = self
            .core
            .store
            .login_failures(&Self::address_key(source), self.core.now_ms(), window_ms)
            .await?;
        if n >= self
            .core
            .config
            .provisioning
            .enroll_failures_per_address_max
        {
            return Err(too_many_attempts(window_ms));
        }
        Ok(())
    }

    async fn count_failure(&self, source: &str) {
        let window_ms = self.core.config.auth.login_window_ms;
        if let Err(e) = self
            .core
            .store
            .record_login_failure(&Self::address_key(source), self.core.now_ms(), window_ms)
            .await
        {
            tracing::warn!(error = %e, "counting a failed enrollment failed");
        }
    }

    /// The claim with this token if it is live, or expired or revoked but used (a device whose
    /// answer was lost may still ask again: [`Provisioning::enroll_claim`] then only answers
    /// again, nothing new); else `claim_invalid` (counted against `source`; the log says
    /// whether the token was unknown, expired or revoked).
    ///
    /// A live token is never throttled: the address bound only keeps unknown tokens from being
    /// tried at the database's expense (a 256-bit token cannot be guessed), so devices behind
    /// one NAT or load balancer are not locked out by a neighbour with a stale token.
    async fn live_claim(&self, token: &str, source: &str) -> ServiceResult<ClaimRecord> {
        let now_ms = self.core.now_ms();
        let found = if token.starts_with(CLAIM_TOKEN_PREFIX) && token.len() <= 128 {
            self.core
                .store
                .find_claim(&crate::auth::token_sha256(token))
                .await?
        } else {
            None
        };
        match found {
            Some(c) if c.is_live(now_ms) || c.uses > 0 => Ok(c),
            other => {
                match &other {
                    None => tracing::info!(source, "enrollment refused: unknown claim token"),
                    Some(c) if c.revoked_at_ms.is_some() => {
                        tracing::info!(source, claim = %c.id, "enrollment refused: claim revoked")
                    }
                    Some(c) => {
                        tracing::info!(source, claim = %c.id, "enrollment refused: claim expired")
                    }
                }
                self.check_address(source).await?;
                self.count_failure(source).await;
                Err(claim_invalid())
            }
        }
    }

    /// Enrolls the key of `csr_pem` with the claim whose token this is (HTTPS). `source` is the
    /// client's address (failures are counted against it).
    pub async fn enroll(
        &self,
        token: &str,
        csr_pem: &str,
        proposed_id: Option<&str>,
        source: &str,
    ) -> ServiceResult<Enrolled> {
        let claim = self.live_claim(token, source).await?;
        self.enroll_claim(claim, csr_pem, proposed_id).await
    }

    /// Enrolls with the claim `claim_id` (an MQTT client that connected with its token): the
    /// claim must still be live.
    pub async fn enroll_with_claim(
        &self,
        claim_id: &str,
        csr_pem: &str,
        proposed_id: Option<&str>,
    ) -> ServiceResult<Enrolled> {
        let claim = self.core.store.get_claim(claim_id).await?.ok_or_else(|| {
            tracing::info!(
                claim = claim_id,
                "enrollment refused: claim deleted since the client connected"
            );
            claim_invalid()
        })?;
        self.enroll_claim(claim, csr_pem, proposed_id).await
    }

    /// Why the claim's creator may no longer register `device_id` with the claim's tags
    /// (`None`: it still may): a claim acts for whoever made it, so a user disabled or deleted,
    /// a token revoked or expired, a role that lost `devices.write` or a scope that no longer
    /// covers the claim's tags ends it, as it does a job.
    async fn creator_refused(
        &self,
        claim: &ClaimRecord,
        device_id: &DeviceId,
    ) -> ServiceResult<Option<String>> {
        // The server's own claims (the simulator's) name no user or token.
        if !(claim.created_by.starts_with("usr_") || claim.created_by.starts_with("tok_")) {
            return Ok(None);
        }
        let store = &self.core.store;
        let (role, scope) = match store.get_user(&claim.created_by).await? {
            Some(u) if u.disabled => return Ok(Some(format!("user {} is disabled", u.email))),
            Some(u) => (u.role, u.scope),
            None => match store.get_token(&claim.created_by).await? {
                Some(t) if t.is_live(self.core.now_ms()) => (t.role, t.scope),
                Some(_) => return Ok(Some(format!("token {} expired", claim.created_by))),
                None => return Ok(Some(format!("{} was revoked or deleted", claim.created_by))),
            },
        };
        if !crate::access::role_allows(role, crate::access::Permission::DevicesWrite) {
            return Ok(Some(format!(
                "{} no longer may create devices (role {})",
                claim.created_by,
                role.as_str()
            )));
        }
        if let Some(scope) = scope {
            let access = Access::scoped(crate::access::parse_scope(&scope)?);
            if !access.sees_facts(device_id.as_str(), &claim.tags) {
                return Ok(Some(format!(
                    "the scope of {} no longer covers the claim's tags",
                    claim.created_by
                )));
            }
        }
        Ok(None)
    }

    async fn enroll_claim(
        &self,
        claim: ClaimRecord,
        csr_pem: &str,
        proposed_id: Option<&str>,
    ) -> ServiceResult<Enrolled> {
        let key =
            crate::pki::parse_csr(csr_pem).map_err(|m| ServiceError::invalid("invalid_csr", m))?;
        let key_sha256 = key_sha256(&key);
        let live = claim.is_live(self.core.now_ms());
        // The same key again: the same certificate (finishing a half-done enrollment).
        if let Some(e) = self
            .core
            .store
            .get_enrollment(&claim.id, &key_sha256)
            .await?
        {
            if live {
                return self.finish(&claim, e).await;
            }
            // The claim expired or was revoked since: a device that exists with this
            // enrollment's certificate gets its answer again (it was lost); nothing is created.
            return match self.registry.lookup(&e.device_id).await? {
                Some(d) if d.cert_sha256 == e.cert_sha256 => Ok(Enrolled {
                    claim_id: claim.id.clone(),
                    device_id: e.device_id.clone(),
                    certificate_pem: e.cert_pem.clone(),
                    ca_pem: self.registry.ca_pem(),
                    created: false,
                }),
                _ => {
                    tracing::info!(claim = %claim.id, "enrollment refused: claim expired or revoked before this enrollment finished");
                    Err(claim_invalid())
                }
            };
        }
        if !live {
            tracing::info!(claim = %claim.id, "enrollment refused: claim expired or revoked");
            return Err(claim_invalid());
        }
        if claim.uses >= claim.uses_max {
            return Err(no_use_left(&claim));
        }
        let device_id = if claim.assign_ids {
            DeviceId::parse(&format!(
                "{ASSIGNED_ID_PREFIX}{}",
                hex::encode(rand::random::<[u8; 6]>())
            ))
            .map_err(ServiceError::internal)?
        } else {
            let proposed = proposed_id.ok_or_else(|| {
                ServiceError::invalid(
                    "invalid_device_id",
                    "device_id is required: this claim does not assign ids",
                )
            })?;
            Registry::parse_id(proposed)?
        };
        if let Some(why) = self.creator_refused(&claim, &device_id).await? {
            tracing::info!(claim = %claim.id, reason = %why, "enrollment refused: the claim's creator may no longer create this device");
            return Err(claim_invalid());
        }
        if self.registry.lookup(device_id.as_str()).await?.is_some() {
            return Err(device_exists(device_id.as_str()));
        }
        let issued = self.registry.issue_cert_for_key(&device_id, &key)?;
        let e = EnrollmentRecord {
            claim_id: claim.id.clone(),
            key_sha256,
            device_id: device_id.into_string(),
            cert_serial: issued.serial_hex,
            cert_sha256: issued.sha256_hex,
            cert_not_after_ms: issued.not_after_ms,
            cert_pem: issued.certificate_pem,
            created_at_ms: self.core.now_ms(),
        };
        match self
            .core
            .store
            .reserve_enrollment(e.clone(), self.core.now_ms())
            .await?
        {
            EnrollmentReserve::Reserved => self.finish(&claim, e).await,
            EnrollmentReserve::Existing(earlier) => self.finish(&claim, earlier).await,
            EnrollmentReserve::ClaimInvalid => {
                tracing::info!(claim = %claim.id, "enrollment refused: claim expired or revoked meanwhile");
                Err(claim_invalid())
            }
            EnrollmentReserve::Exhausted => Err(no_use_left(&claim)),
        }
    }

    /// Creates the enrollment's device unless it exists with this certificate already. A
    /// device of that id with another certificate: the reservation goes, `device_exists`.
    async fn finish(&self, claim: &ClaimRecord, e: EnrollmentRecord) -> ServiceResult<Enrolled> {
        let enrolled = |created| Enrolled {
            claim_id: claim.id.clone(),
            device_id: e.device_id.clone(),
            certificate_pem: e.cert_pem.clone(),
            ca_pem: self.registry.ca_pem().to_owned(),
            created,
        };
        match self.registry.lookup(&e.device_id).await? {
            Some(d) if d.cert_sha256 == e.cert_sha256 => return Ok(enrolled(false)),
            Some(_) => return self.release(&e).await,
            None => {}
        }
        let pinned = PinnedCert {
            sha256_hex: e.cert_sha256.clone(),
            serial_hex: e.cert_serial.clone(),
            not_after_ms: e.cert_not_after_ms,
            // Issued when the enrollment was reserved, by whichever fleet CA issued then.
            issuer: self
                .registry
                .pki()
                .issuer_label_of(&e.cert_pem)
                .unwrap_or_else(|| mooring_store::CERT_ISSUER_FLEET.to_owned()),
        };
        match self
            .registry
            .create_device_pinned(&e.device_id, claim.tags.clone(), pinned)
            .await
        {
            Ok(_) => {
                tracing::info!(claim = %claim.id, device = %e.device_id, "device enrolled");
                Ok(enrolled(true))
            }
            Err(err) if err.code == "device_exists" => {
                match self.registry.lookup(&e.device_id).await? {
                    // A concurrent retry of this very enrollment created it.
                    Some(d) if d.cert_sha256 == e.cert_sha256 => Ok(enrolled(false)),
                    _ => self.release(&e).await,
                }
            }
            // The reservation stays: a retry finishes it.
            Err(err) => Err(err),
        }
    }

    /// The enrollment's device id was taken by someone else: its reservation (and use) goes.
    async fn release(&self, e: &EnrollmentRecord) -> ServiceResult<Enrolled> {
        self.core
            .store
            .release_enrollment(&e.claim_id, &e.key_sha256)
            .await?;
        tracing::info!(claim = %e.claim_id, device = %e.device_id, "enrollment released: the device id was taken meanwhile");
        Err(device_exists(&e.device_id))
    }

    /// An MQTT client presenting a claim token at CONNECT (`peer`: its address). On success,
    /// the claim and the client id to use (an empty one is assigned `claim-<hex>`). Connection
    /// bounds are checked here and counted by [`Provisioning::connected`].
    pub async fn authenticate_claim(
        &self,
        token: &str,
        client_id: &str,
        peer: &str,
    ) -> Result<(ClaimRecord, String), ClaimConnectRefusal> {
        let client_id = if client_id.is_empty() {
            format!(
                "{CLAIM_CLIENT_ID_PREFIX}{}",
                hex::encode(rand::random::<[u8; 8]>())
            )
        } else {
            DeviceId::parse(client_id)
                .map_err(|_| ClaimConnectRefusal::BadClientId)?
                .into_string()
        };
        let claim = match self.live_claim(token, peer).await {
            Ok(c) => c,
            // Throttled: "try again later" (a device retries), not "bad token" (it gives up).
            Err(e)
                if matches!(
                    e.kind,
                    ErrorKind::Unavailable | ErrorKind::Internal | ErrorKind::TooManyRequests
                ) =>
            {
                return Err(ClaimConnectRefusal::Unavailable)
            }
            Err(_) => return Err(ClaimConnectRefusal::BadToken),
        };
        let cfg = &self.core.config.provisioning;
        let s = self.sessions();
        if s.total >= cfg.connections_max
            || s.per_claim.get(&claim.id).copied().unwrap_or(0) >= cfg.connections_per_claim_max
        {
            tracing::info!(claim = %claim.id, "claim connection refused: over the connection bounds");
            return Err(ClaimConnectRefusal::Busy);
        }
        Ok((claim, client_id))
    }

    /// A claim client's connection is up (bounds counted).
    pub fn connected(&self, claim_id: &str) {
        let mut s = self.sessions();
        s.total = s.total.saturating_add(1);
        *s.per_claim.entry(claim_id.to_owned()).or_default() += 1;
    }

    /// A claim client's connection ended.
    pub fn disconnected(&self, claim_id: &str) {
        let mut s = self.sessions();
        s.total = s.total.saturating_sub(1);
        if let Some(n) = s.per_claim.get_mut(claim_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.per_claim.remove(claim_id);
            }
        }
    }

    /// Counts one request of a claim client; `rate_limited` over
    /// `[provisioning] requests_per_minute_max` in the current minute.
    pub fn count_request(&self, client_id: &str) -> ServiceResult<()> {
        let max = self.core.config.provisioning.requests_per_minute_max;
        match self.requests.count(client_id, self.core.now_ms(), max) {
            Ok(()) => Ok(()),
            Err(crate::ratelimit::Over::Table) => Err(ServiceError::new(
                ErrorKind::TooManyRequests,
                "rate_limited",
                "too many enrolling clients at once; try again in a minute",
            )),
            Err(crate::ratelimit::Over::Key) => Err(ServiceError::new(
                ErrorKind::TooManyRequests,
                "rate_limited",
                format!("at most {max} enrollment requests per minute per client"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assigned_ids_and_claim_client_ids_are_valid_device_ids() {
        let id = format!("{ASSIGNED_ID_PREFIX}{}", hex::encode([0xabu8; 6]));
        assert!(DeviceId::parse(&id).is_ok());
        let cid = format!("{CLAIM_CLIENT_ID_PREFIX}{}", hex::encode([1u8; 8]));
        assert!(DeviceId::parse(&cid).is_ok());
    }
}
