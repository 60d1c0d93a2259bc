//! API tokens: generation, hashing (only the SHA-256 is stored) and the admin token file.

use crate::error::{ServiceError, ServiceResult};
use anyhow::Context;
use mooring_store::{Role, TokenRecord, TokenStore};
use sha2::{Digest, Sha256};
use std::path::Path;

/// Prefix that makes Mooring tokens recognisable in logs and secret scanners.
pub const TOKEN_PREFIX: &str = "mrt_";
/// File in the data dir holding the admin token created at first start (mode 0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// A new random token: `mrt_` + 64 hex characters (256 bits).
pub fn generate_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

pub fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Looks a presented token up by its hash; `None` unless it exists and has not expired at
/// `now_ms`.
pub async fn verify_token(store: &dyn TokenStore, token: &str, now_ms: u64) -> Option<TokenRecord> {
    if token.is_empty() || token.len() > 256 {
        return None;
    }
    store
        .find_token(&token_sha256(token))
        .await
        .ok()
        .flatten()
        .filter(|t| t.is_live(now_ms))
}

/// A new token record and its secret (shown once, never stored).
fn new_token(
    name: &str,
    role: Role,
    scope: Option<String>,
    expires_at_ms: Option<u64>,
    now_ms: u64,
) -> (TokenRecord, String) {
    let secret = generate_token();
    let id_bytes: [u8; 8] = rand::random();
    let record = TokenRecord {
        id: format!("tok_{}", hex::encode(id_bytes)),
        name: name.to_owned(),
        role,
        token_sha256: token_sha256(&secret),
        created_at_ms: now_ms,
        scope,
        expires_at_ms,
        last_used_at_ms: None,
    };
    (record, secret)
}

/// Creates an unscoped, unexpiring token record and returns the secret.
pub async fn create_token(
    store: &dyn TokenStore,
    name: &str,
    role: Role,
    now_ms: u64,
) -> anyhow::Result<(TokenRecord, String)> {
    let (record, secret) = new_token(name, role, None, None, now_ms);
    store
        .create_token(record.clone())
        .await
        .context("storing token")?;
    Ok((record, secret))
}

/// On first start, creates the admin token and writes it to `<data-dir>/admin.token` (0600).
/// Returns the secret if it was created now, so the caller can print it once.
pub async fn ensure_admin_token(
    store: &dyn TokenStore,
    data_dir: &Path,
    now_ms: u64,
) -> anyhow::Result<Option<String>> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    if path.exists() {
        return Ok(None);
    }
    let (_, secret) = create_token(store, "admin", Role::Admin, now_ms).await?;
    write_admin_token(data_dir, &secret)?;
    Ok(Some(secret))
}

/// Key of the cluster's "admin token created" marker among the store's values.
pub const BOOTSTRAP_MARKER_KEY: &str = "bootstrap.admin_token";

/// Cluster mode: the admin token is created once for the whole cluster, ever: by the node whose
/// random marker [`mooring_store::ClusterStore::put_value_once`] keeps. That node writes it to
/// its own data dir (0600) and prints it; every other node, and every later start (also after the
/// token was revoked), creates nothing.
pub async fn ensure_shared_admin_token(
    store: &dyn mooring_store::Store,
    data_dir: &Path,
    now_ms: u64,
) -> anyhow::Result<Option<String>> {
    let marker: [u8; 16] = rand::random();
    let kept = store
        .put_value_once(BOOTSTRAP_MARKER_KEY, marker.to_vec())
        .await
        .context("marking the cluster's admin token as created")?;
    if kept != marker {
        return Ok(None);
    }
    let (_, secret) = create_token(store, "admin", Role::Admin, now_ms).await?;
    write_admin_token(data_dir, &secret)?;
    Ok(Some(secret))
}

/// Writes the admin token file (0600) atomically: a temporary file, synced, renamed over it,
/// then the directory synced, so a crash leaves the old token or the new one, never half.
fn write_admin_token(data_dir: &Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let tmp = data_dir.join(format!("{ADMIN_TOKEN_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    writeln!(f, "{secret}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", data_dir.display()))?;
    Ok(())
}

/// Name of the admin token created at first start (and of its rotations).
pub const ADMIN_TOKEN_NAME: &str = "admin";
/// Longest token name.
pub const TOKEN_NAME_LEN_MAX: usize = 128;
/// Most tokens one list call returns.
pub const TOKEN_PAGE_LEN_MAX: usize = 1000;
pub const TOKEN_PAGE_LEN_DEFAULT: usize = 100;
/// A token's last-used time is written at most this often (per node).
pub const TOKEN_TOUCH_INTERVAL_MS: u64 = 60_000;
/// Tokens whose last write of last-used time this node remembers; beyond it the memory is
/// cleared (a token is then touched once more than needed).
const TOUCHED_REMEMBERED_MAX: usize = 10_000;

/// Which keys (token ids, session hashes) this node wrote a last-use time for, and when: the
/// write happens at most once per interval per key. Holds at most [`TOUCHED_REMEMBERED_MAX`]
/// keys; beyond that it starts over (a key is then written once more than needed).
#[derive(Default)]
pub(crate) struct TouchThrottle(std::sync::Mutex<std::collections::HashMap<String, u64>>);

impl TouchThrottle {
    /// Whether `key`'s last use should be written now; `stored_ms` is the time the store
    /// already has (for a key this node has not written yet).
    pub(crate) fn due(&self, key: &str, stored_ms: u64, now_ms: u64, interval_ms: u64) -> bool {
        let mut touched = mooring_proto::sync::lock(&self.0);
        let last = touched.get(key).copied().unwrap_or(stored_ms);
        if now_ms.saturating_sub(last) < interval_ms {
            return false;
        }
        if touched.len() >= TOUCHED_REMEMBERED_MAX {
            touched.clear();
        }
        touched.insert(key.to_owned(), now_ms);
        true
    }
}

/// What `POST /api/v1/tokens` asks for, checked.
pub struct NewToken {
    pub name: String,
    pub role: Role,
    pub scope: Option<String>,
    pub expires_in_ms: Option<u64>,
}

/// The token service: verifies presented tokens (HTTP bearer, MQTT service password), creates,
/// lists, revokes and rotates them. Owns the token store.
pub struct Tokens {
    core: std::sync::Arc<crate::app::Core>,
    /// When this node last wrote each token's last-used time.
    touched: TouchThrottle,
    /// Expiring tokens with MQTT sessions on this node: id → expiry. At most one entry per
    /// token (tokens are created by admins, not by clients).
    expiring: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl Tokens {
    pub(crate) fn new(core: std::sync::Arc<crate::app::Core>) -> Self {
        Self {
            core,
            touched: Default::default(),
            expiring: Default::default(),
        }
    }

    /// The token's record if `token` is a valid, unrevoked, unexpired token; records its use.
    pub async fn verify(&self, token: &str) -> Option<TokenRecord> {
        let now_ms = self.core.now_ms();
        let record = verify_token(self.core.store.as_ref(), token, now_ms).await?;
        let stored_ms = record.last_used_at_ms.unwrap_or(0);
        if self
            .touched
            .due(&record.id, stored_ms, now_ms, TOKEN_TOUCH_INTERVAL_MS)
        {
            if let Err(e) = self.core.store.touch_token(&record.id, now_ms).await {
                tracing::warn!(token = %record.id, error = %e, "recording a token's last use failed");
            }
        }
        Some(record)
    }

    /// Creates a token; the secret is returned once and never stored.
    pub async fn create(&self, req: NewToken) -> ServiceResult<(TokenRecord, String)> {
        if req.name.is_empty() || req.name.chars().count() > TOKEN_NAME_LEN_MAX {
            return Err(ServiceError::invalid(
                "invalid_name",
                format!("name must be 1-{TOKEN_NAME_LEN_MAX} characters"),
            ));
        }
        if req.name.chars().any(char::is_control) {
            return Err(ServiceError::invalid(
                "invalid_name",
                "name must not contain control characters",
            ));
        }
        if req.role == Role::Admin && req.scope.is_some() {
            return Err(ServiceError::invalid(
                "invalid_scope",
                "an admin token cannot be limited to a scope (it manages users and tokens); use operator",
            ));
        }
        if let Some(scope) = &req.scope {
            crate::access::parse_scope(scope)?;
        }
        let now_ms = self.core.now_ms();
        let expires_at_ms = match req.expires_in_ms {
            None => None,
            Some(0) => {
                return Err(ServiceError::invalid(
                    "invalid_expiry",
                    "expires_in_ms must be positive",
                ))
            }
            Some(ms) => Some(
                now_ms
                    .checked_add(ms)
                    .filter(|t| *t <= mooring_store::TS_MS_MAX)
                    .ok_or_else(|| {
                        ServiceError::invalid("invalid_expiry", "expires_in_ms is too large")
                    })?,
            ),
        };
        let (record, secret) = new_token(&req.name, req.role, req.scope, expires_at_ms, now_ms);
        self.core.store.create_token(record.clone()).await?;
        Ok((record, secret))
    }

    /// One page of tokens by id (secrets are never shown: only their hashes are stored).
    pub async fn list(
        &self,
        limit: Option<usize>,
        cursor: Option<&str>,
    ) -> ServiceResult<(Vec<TokenRecord>, Option<String>)> {
        let limit = limit.unwrap_or(TOKEN_PAGE_LEN_DEFAULT);
        if limit == 0 || limit > TOKEN_PAGE_LEN_MAX {
            return Err(ServiceError::invalid(
                "invalid_limit",
                format!("limit must be between 1 and {TOKEN_PAGE_LEN_MAX}"),
            ));
        }
        let page = self.core.store.list_tokens(limit, cursor).await?;
        let next = (page.len() == limit)
            .then(|| page.last().map(|t| t.id.clone()))
            .flatten();
        Ok((page, next))
    }

    pub async fn get(&self, id: &str) -> ServiceResult<TokenRecord> {
        self.core.store.get_token(id).await?.ok_or_else(|| {
            ServiceError::not_found("token_not_found", format!("token {id} not found"))
        })
    }

    /// Revokes a token: refused on every node from the next request; its MQTT sessions (a
    /// service token's) are closed here and on the other nodes.
    pub async fn revoke(&self, id: &str) -> ServiceResult<TokenRecord> {
        let record = self.get(id).await?;
        if !self.core.store.delete_token(id).await? {
            return Err(ServiceError::not_found(
                "token_not_found",
                format!("token {id} not found"),
            ));
        }
        self.close_sessions(id);
        if let Some(cluster) = self.core.cluster() {
            cluster.token_revoked(id);
        }
        Ok(record)
    }

    /// Whether the token still exists and has not expired (a store failure counts as valid:
    /// the next request checks again).
    pub async fn still_valid(&self, id: &str) -> bool {
        let now_ms = self.core.now_ms();
        match self.core.store.get_token(id).await {
            Ok(Some(t)) => t.is_live(now_ms),
            Ok(None) => false,
            Err(_) => true,
        }
    }

    /// Closes the token's MQTT sessions on this node when it expires ([`Tokens::expire_due`]).
    pub(crate) fn watch_expiry(&self, token_id: &str, expires_at_ms: u64) {
        mooring_proto::sync::lock(&self.expiring).insert(token_id.to_owned(), expires_at_ms);
    }

    /// Closes the MQTT sessions of tokens that expired by now (run every second).
    pub fn expire_due(&self) {
        let now_ms = self.core.now_ms();
        let due: Vec<String> = {
            let mut expiring = mooring_proto::sync::lock(&self.expiring);
            let due: Vec<String> = expiring
                .iter()
                .filter(|(_, at)| **at <= now_ms)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &due {
                expiring.remove(id);
            }
            due
        };
        for id in due {
            self.close_sessions(&id);
        }
    }

    /// Another node revoked `token_id`: if the store agrees it is gone, close its sessions here.
    pub(crate) async fn on_revoked_elsewhere(&self, token_id: &str) {
        match self.core.store.get_token(token_id).await {
            Ok(None) => self.close_sessions(token_id),
            Ok(Some(_)) => {}
            Err(e) => {
                tracing::warn!(token = token_id, error = %e, "re-reading a revoked token failed")
            }
        }
    }

    /// Closes the MQTT sessions of a (service) token on this node.
    pub(crate) fn close_sessions(&self, token_id: &str) {
        if let Some(broker) = self.core.broker() {
            broker.kick(
                &mooring_broker::PrincipalKey::service(token_id),
                mooring_broker::KickReason::AdministrativeAction,
            );
        }
    }

    /// Replaces the admin token created at first start: a new admin token named `admin`, every
    /// other admin token of that name revoked, and the new secret written to this node's
    /// `<data-dir>/admin.token` (0600) when that file exists. Returns the new token.
    pub async fn rotate_admin(&self) -> ServiceResult<(TokenRecord, String)> {
        let (record, secret) = self
            .create(NewToken {
                name: ADMIN_TOKEN_NAME.to_owned(),
                role: Role::Admin,
                scope: None,
                expires_in_ms: None,
            })
            .await?;
        // The file first: a failure below leaves a working token in it.
        let path = self.core.config.data_dir.join(ADMIN_TOKEN_FILE);
        if path.exists() {
            write_admin_token(&self.core.config.data_dir, &secret)
                .map_err(ServiceError::internal)?;
        }
        let mut cursor: Option<String> = None;
        loop {
            let (page, next) = self
                .list(Some(TOKEN_PAGE_LEN_MAX), cursor.as_deref())
                .await?;
            for t in page {
                // Only ones created before this one: a rotation running at the same time
                // elsewhere keeps its own new token.
                let older = t.created_at_ms <= record.created_at_ms && t.id != record.id;
                if t.name == ADMIN_TOKEN_NAME && t.role == Role::Admin && older {
                    match self.revoke(&t.id).await {
                        Ok(_) => {}
                        Err(e) if e.kind == crate::error::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            match next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        Ok((record, secret))
    }
}
