//! API tokens: generation, hashing (only the SHA-256 is stored) and the admin token file.

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

/// Looks a presented token up by its hash.
pub async fn verify_token(store: &dyn TokenStore, token: &str) -> Option<TokenRecord> {
    if token.is_empty() || token.len() > 256 {
        return None;
    }
    store.find_token(&token_sha256(token)).await.ok().flatten()
}

/// Creates a token record and returns the secret (shown once, never stored).
pub async fn create_token(
    store: &dyn TokenStore,
    name: &str,
    role: Role,
    now_ms: u64,
) -> anyhow::Result<(TokenRecord, String)> {
    let secret = generate_token();
    let id_bytes: [u8; 8] = rand::random();
    let record = TokenRecord {
        id: format!("tok_{}", hex::encode(id_bytes)),
        name: name.to_owned(),
        role,
        token_sha256: token_sha256(&secret),
        created_at_ms: now_ms,
        scope: None,
        expires_at_ms: None,
        last_used_at_ms: None,
    };
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

fn write_admin_token(data_dir: &Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{secret}")?;
    f.sync_all()?;
    Ok(())
}

/// The token service: verifies presented tokens (HTTP bearer, MQTT service password) and creates
/// new ones. Owns the token store.
pub struct Tokens {
    core: std::sync::Arc<crate::app::Core>,
}

impl Tokens {
    pub(crate) fn new(core: std::sync::Arc<crate::app::Core>) -> Self {
        Self { core }
    }

    /// The token's record if `token` is a valid, unrevoked token.
    pub async fn verify(&self, token: &str) -> Option<TokenRecord> {
        verify_token(self.core.store.as_ref(), token).await
    }

    /// Creates a token; the secret is returned once and never stored.
    pub async fn create(&self, name: &str, role: Role) -> anyhow::Result<(TokenRecord, String)> {
        create_token(self.core.store.as_ref(), name, role, self.core.now_ms()).await
    }
}
