//! People (issue 14): users with a role and an optional scope, password logins (argon2id),
//! OpenID Connect logins, and login sessions kept in the database so every node behind a load
//! balancer accepts them.
//!
//! A session is an opaque secret in an HttpOnly cookie; the store keeps only its SHA-256, with
//! the SHA-256 of the session's CSRF token. Every request re-reads the session, so a logout,
//! a disabled user or an expiry on one node holds on every node at once. Idle expiry counts
//! from the last use (written at most once a minute per session and node), absolute expiry
//! from the login.
//!
//! Bounds: sessions per user (`auth.sessions_per_user_max`, the least recently used go);
//! failed logins per account and per source address within a window (then `429`); password
//! hashing at most [`HASHES_CONCURRENT_MAX`] at once (argon2id takes ~19 MiB each), a login
//! waiting longer than [`HASH_WAIT_MS`] for its turn gets `503`.

use crate::access::parse_scope;
use crate::app::Core;
use crate::auth::token_sha256;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use mooring_store::{Role, SessionRecord, StoreError, UserRecord};
use std::sync::Arc;
use std::time::Duration;

/// The session cookie (HttpOnly).
pub const SESSION_COOKIE: &str = "mooring_session";
/// The CSRF cookie (readable by the page's scripts, which send it back in [`CSRF_HEADER`]).
pub const CSRF_COOKIE: &str = "mooring_csrf";
/// The header a cookie-authenticated write must carry, equal to the session's CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Prefix of session secrets.
pub const SESSION_PREFIX: &str = "mrs_";
/// Prefix of password-set link tokens.
pub const PASSWORD_LINK_PREFIX: &str = "mrp_";
pub const PASSWORD_LEN_MIN: usize = 12;
pub const PASSWORD_BYTES_MAX: usize = 1024;
pub const EMAIL_LEN_MAX: usize = 254;
/// Password hashes computed at once; more logins wait for a turn.
pub const HASHES_CONCURRENT_MAX: usize = 2;
/// Longest a login waits for its turn to hash.
pub const HASH_WAIT_MS: u64 = 5_000;
/// A session's last use is written at most this often (per node).
pub const SESSION_TOUCH_INTERVAL_MS: u64 = 60_000;
/// Most users one list call returns.
pub const USER_PAGE_LEN_MAX: usize = 1000;
pub const USER_PAGE_LEN_DEFAULT: usize = 100;

/// What `mooring user create` / `POST /api/v1/users` asks for.
pub struct NewUser {
    pub email: String,
    pub role: Role,
    pub scope: Option<String>,
    /// Set now; `None`: a one-time password-set link is made instead.
    pub password: Option<String>,
}

/// Changes to a user; `None` fields stay.
#[derive(Default)]
pub struct UserChange {
    pub role: Option<Role>,
    /// `Some(None)` removes the scope.
    pub scope: Option<Option<String>>,
    pub disabled: Option<bool>,
}

/// A new login: the cookie secrets (shown to the client once, stored hashed).
pub struct LoginSession {
    pub secret: String,
    pub csrf_token: String,
    pub user: UserRecord,
    pub expires_at_ms: u64,
}

/// An identity an OpenID Connect provider vouched for, already mapped to a role.
#[derive(Debug, Clone)]
pub struct ExternalIdentity {
    /// `<issuer> <subject>`.
    pub subject: String,
    pub email: String,
    /// The provider verified the address: only then is the identity linked to an existing user
    /// with that email.
    pub email_verified: bool,
    pub role: Role,
    pub scope: Option<String>,
}

/// The accounts service.
pub struct Accounts {
    core: Arc<Core>,
    hashing: tokio::sync::Semaphore,
    /// When this node last wrote each session's last use.
    touched: crate::auth::TouchThrottle,
    /// A hash verified when the email is unknown, so both cases take as long.
    decoy_hash: String,
}

fn random_secret(prefix: &str) -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{prefix}{}", hex::encode(bytes))
}

fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes)?;
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// Normalises and checks an email address (lowercase, trimmed).
pub fn normalize_email(email: &str) -> ServiceResult<String> {
    let e = email.trim().to_lowercase();
    let valid = !e.is_empty()
        && e.len() <= EMAIL_LEN_MAX
        && !e.chars().any(|c| c.is_whitespace() || c.is_control())
        && e.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && !domain.is_empty() && !domain.contains('@')
        });
    if valid {
        Ok(e)
    } else {
        Err(ServiceError::invalid(
            "invalid_email",
            format!("{email:?} is not an email address"),
        ))
    }
}

fn check_password(password: &str) -> ServiceResult<()> {
    if password.chars().count() < PASSWORD_LEN_MIN || password.len() > PASSWORD_BYTES_MAX {
        return Err(ServiceError::invalid(
            "weak_password",
            format!("a password has {PASSWORD_LEN_MIN} to {PASSWORD_BYTES_MAX} bytes' worth of characters (at least {PASSWORD_LEN_MIN} characters)"),
        ));
    }
    Ok(())
}

/// An admin manages users, tokens and the audit log of the whole fleet, so a scope would not
/// hold it: refused.
fn check_role_scope(role: Role, scope: Option<&str>) -> ServiceResult<()> {
    if role == Role::Admin && scope.is_some() {
        return Err(ServiceError::invalid(
            "invalid_scope",
            "an admin cannot be limited to a scope (it manages users and tokens); use operator",
        ));
    }
    if let Some(s) = scope {
        parse_scope(s)?;
    }
    Ok(())
}

fn user_not_found(key: &str) -> ServiceError {
    ServiceError::not_found("user_not_found", format!("user {key} not found"))
}

fn bad_login() -> ServiceError {
    ServiceError::new(
        ErrorKind::Unauthorized,
        "invalid_credentials",
        "wrong email or password (or the account is disabled)",
    )
}

impl Accounts {
    pub(crate) fn new(core: Arc<Core>) -> Self {
        let decoy: [u8; 16] = rand::random();
        let decoy_hash = hash_password(&hex::encode(decoy)).unwrap_or_default();
        Self {
            core,
            hashing: tokio::sync::Semaphore::new(HASHES_CONCURRENT_MAX),
            touched: Default::default(),
            decoy_hash,
        }
    }

    /// Runs a password hash or check on the blocking pool, at most [`HASHES_CONCURRENT_MAX`]
    /// at once.
    async fn hashing<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> ServiceResult<T> {
        let permit =
            tokio::time::timeout(Duration::from_millis(HASH_WAIT_MS), self.hashing.acquire())
                .await
                .map_err(|_| {
                    ServiceError::new(
                        ErrorKind::Unavailable,
                        "busy",
                        "too many logins at once; retry shortly",
                    )
                })?
                .map_err(ServiceError::internal)?;
        let out = tokio::task::spawn_blocking(f)
            .await
            .map_err(ServiceError::internal)?;
        drop(permit);
        Ok(out)
    }

    async fn hash(&self, password: String) -> ServiceResult<String> {
        self.hashing(move || hash_password(&password))
            .await?
            .map_err(ServiceError::internal)
    }

    /// The user by id (`usr_...`) or email.
    pub async fn get_user(&self, key: &str) -> ServiceResult<UserRecord> {
        let found = if key.starts_with("usr_") {
            self.core.store.get_user(key).await?
        } else {
            let email = normalize_email(key).map_err(|_| user_not_found(key))?;
            self.core.store.find_user_by_email(&email).await?
        };
        found.ok_or_else(|| user_not_found(key))
    }

    /// Creates a user. Without a password, returns a one-time password-set link.
    pub async fn create_user(&self, req: NewUser) -> ServiceResult<(UserRecord, Option<String>)> {
        let email = normalize_email(&req.email)?;
        check_role_scope(req.role, req.scope.as_deref())?;
        let now_ms = self.core.now_ms();
        let (password_hash, link) = match req.password {
            Some(p) => {
                check_password(&p)?;
                (Some(self.hash(p).await?), None)
            }
            None => (None, Some(random_secret(PASSWORD_LINK_PREFIX))),
        };
        let id_bytes: [u8; 8] = rand::random();
        let user = UserRecord {
            id: format!("usr_{}", hex::encode(id_bytes)),
            email,
            role: req.role,
            scope: req.scope,
            password_hash,
            password_set_sha256: link.as_deref().map(token_sha256),
            password_set_expires_at_ms: link
                .as_ref()
                .map(|_| now_ms.saturating_add(self.core.config.auth.password_link_ttl_ms)),
            disabled: false,
            oidc_subject: None,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
        };
        self.core
            .store
            .create_user(user.clone())
            .await
            .map_err(|e| match e {
                StoreError::AlreadyExists(_) => ServiceError::new(
                    ErrorKind::AlreadyExists,
                    "user_exists",
                    format!("a user with email {} exists", user.email),
                ),
                other => other.into(),
            })?;
        Ok((user, link.map(|l| self.link_url(&l))))
    }

    fn link_url(&self, token: &str) -> String {
        format!(
            "{}/#/set-password?token={token}",
            self.core.config.public_url()
        )
    }

    /// One page of users by email.
    pub async fn list_users(
        &self,
        limit: Option<usize>,
        cursor: Option<&str>,
    ) -> ServiceResult<(Vec<UserRecord>, Option<String>)> {
        let limit = limit.unwrap_or(USER_PAGE_LEN_DEFAULT);
        if limit == 0 || limit > USER_PAGE_LEN_MAX {
            return Err(ServiceError::invalid(
                "invalid_limit",
                format!("limit must be between 1 and {USER_PAGE_LEN_MAX}"),
            ));
        }
        let page = self.core.store.list_users(limit, cursor).await?;
        let next = (page.len() == limit)
            .then(|| page.last().map(|u| u.email.clone()))
            .flatten();
        Ok((page, next))
    }

    /// Changes a user's role, scope or disabled flag. Disabling (or any change of role or
    /// scope) ends the user's sessions, so what a session may do never outlives a change.
    pub async fn update_user(&self, key: &str, change: UserChange) -> ServiceResult<UserRecord> {
        let mut user = self.get_user(key).await?;
        let role = change.role.unwrap_or(user.role);
        let scope = change.scope.clone().unwrap_or_else(|| user.scope.clone());
        check_role_scope(role, scope.as_deref())?;
        let ends_sessions = change.disabled == Some(true)
            || change.role.is_some_and(|r| r != user.role)
            || change.scope.as_ref().is_some_and(|s| *s != user.scope);
        if let Some(role) = change.role {
            user.role = role;
        }
        if let Some(scope) = change.scope {
            user.scope = scope;
        }
        if let Some(disabled) = change.disabled {
            user.disabled = disabled;
        }
        user.updated_at_ms = self.core.now_ms();
        if !self.core.store.update_user(user.clone()).await? {
            return Err(user_not_found(key));
        }
        if ends_sessions {
            self.core.store.delete_user_sessions(&user.id).await?;
        }
        Ok(user)
    }

    /// Deletes a user and its sessions.
    pub async fn delete_user(&self, key: &str) -> ServiceResult<UserRecord> {
        let user = self.get_user(key).await?;
        if !self.core.store.delete_user(&user.id).await? {
            return Err(user_not_found(key));
        }
        Ok(user)
    }

    /// A new one-time password-set link for the user (replacing an outstanding one).
    pub async fn password_link(&self, key: &str) -> ServiceResult<String> {
        let mut user = self.get_user(key).await?;
        let link = random_secret(PASSWORD_LINK_PREFIX);
        let now_ms = self.core.now_ms();
        user.password_set_sha256 = Some(token_sha256(&link));
        user.password_set_expires_at_ms =
            Some(now_ms.saturating_add(self.core.config.auth.password_link_ttl_ms));
        user.updated_at_ms = now_ms;
        if !self.core.store.update_user(user).await? {
            return Err(user_not_found(key));
        }
        Ok(self.link_url(&link))
    }

    /// Sets a password with the token of a password-set link (used once). Ends the user's
    /// other sessions.
    pub async fn set_password(
        &self,
        link_token: &str,
        password: String,
    ) -> ServiceResult<UserRecord> {
        let invalid = || {
            ServiceError::new(
                ErrorKind::Unauthorized,
                "invalid_link",
                "this password link is not valid (used, replaced or expired)",
            )
        };
        if link_token.len() > 256 || !link_token.starts_with(PASSWORD_LINK_PREFIX) {
            return Err(invalid());
        }
        check_password(&password)?;
        let now_ms = self.core.now_ms();
        let mut user = self
            .core
            .store
            .find_user_by_password_set(&token_sha256(link_token))
            .await?
            .filter(|u| u.password_set_expires_at_ms.is_some_and(|e| now_ms < e))
            .ok_or_else(invalid)?;
        user.password_hash = Some(self.hash(password).await?);
        user.password_set_sha256 = None;
        user.password_set_expires_at_ms = None;
        user.updated_at_ms = now_ms;
        if !self.core.store.update_user(user.clone()).await? {
            return Err(invalid());
        }
        self.core.store.delete_user_sessions(&user.id).await?;
        Ok(user)
    }

    /// Counts this attempt against the account and the address *before* the password is
    /// checked (so attempts sent in parallel cannot all pass a check made earlier), and refuses
    /// it when either is over its bound for the window. A successful login clears the
    /// account's count; the address keeps it until the window ends.
    async fn count_attempt(&self, keys: &[String]) -> ServiceResult<()> {
        let a = &self.core.config.auth;
        let now_ms = self.core.now_ms();
        for key in keys {
            let max = if key.starts_with("acct:") {
                a.login_failures_per_account_max
            } else {
                a.login_failures_per_address_max
            };
            let n = self
                .core
                .store
                .record_login_failure(key, now_ms, a.login_window_ms)
                .await?;
            if n > max {
                return Err(ServiceError::new(
                    ErrorKind::TooManyRequests,
                    "too_many_attempts",
                    format!(
                        "too many failed logins; try again in {} minutes",
                        a.login_window_ms.div_ceil(60_000)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Logs in with email and password. Failures count against the account (if it exists) and
    /// the source address; an unknown email takes as long as a wrong password.
    pub async fn login_password(
        &self,
        email: &str,
        password: &str,
        source: &str,
        user_agent: &str,
    ) -> ServiceResult<LoginSession> {
        // The address first, before anything else: every attempt counts, a malformed one too,
        // and an address over its bound cannot grow account counters.
        self.count_attempt(&[format!("addr:{}", throttle_address(source))])
            .await?;
        let email = normalize_email(email).map_err(|_| bad_login())?;
        if password.len() > PASSWORD_BYTES_MAX {
            return Err(bad_login());
        }
        let acct_key = format!("acct:{email}");
        self.count_attempt(std::slice::from_ref(&acct_key)).await?;
        let user = self.core.store.find_user_by_email(&email).await?;
        let phc = user
            .as_ref()
            .and_then(|u| u.password_hash.clone())
            .unwrap_or_else(|| self.decoy_hash.clone());
        let password = password.to_owned();
        let matches = self
            .hashing(move || verify_password(&password, &phc))
            .await?;
        let user = match user {
            Some(u) if matches && u.password_hash.is_some() && !u.disabled => u,
            _ => return Err(bad_login()),
        };
        self.core.store.clear_login_failures(&acct_key).await?;
        self.open_session(user, source, user_agent).await
    }

    /// Logs in a person an OpenID Connect provider vouched for: the user linked to that
    /// identity, else the user with that email (linked now), else a new user. The provider's
    /// role and scope claims are applied at every login.
    pub async fn login_external(
        &self,
        id: ExternalIdentity,
        source: &str,
        user_agent: &str,
    ) -> ServiceResult<LoginSession> {
        let email = normalize_email(&id.email)?;
        check_role_scope(id.role, id.scope.as_deref())?;
        let now_ms = self.core.now_ms();
        let existing = match self
            .core
            .store
            .find_user_by_oidc_subject(&id.subject)
            .await?
        {
            Some(u) => Some(u),
            None => match self.core.store.find_user_by_email(&email).await? {
                // Linking by email hands that user's account to whoever the provider vouches
                // for: only for an address the provider verified.
                Some(_) if !id.email_verified => {
                    return Err(ServiceError::new(
                        ErrorKind::Forbidden,
                        "identity_mismatch",
                        "a user with this email exists and the provider did not verify the address; an admin can delete that user",
                    ))
                }
                other => other,
            },
        };
        let user = match existing {
            Some(mut u) => {
                if u.disabled {
                    return Err(ServiceError::new(
                        ErrorKind::Forbidden,
                        "user_disabled",
                        "this account is disabled",
                    ));
                }
                if u.oidc_subject.as_deref().is_some_and(|s| s != id.subject) {
                    return Err(ServiceError::new(
                        ErrorKind::Forbidden,
                        "identity_mismatch",
                        "this email is linked to another OpenID Connect identity",
                    ));
                }
                u.oidc_subject = Some(id.subject.clone());
                u.role = id.role;
                u.scope = id.scope.clone();
                u.updated_at_ms = now_ms;
                self.core.store.update_user(u.clone()).await?;
                u
            }
            None => {
                let id_bytes: [u8; 8] = rand::random();
                let u = UserRecord {
                    id: format!("usr_{}", hex::encode(id_bytes)),
                    email,
                    role: id.role,
                    scope: id.scope.clone(),
                    password_hash: None,
                    password_set_sha256: None,
                    password_set_expires_at_ms: None,
                    disabled: false,
                    oidc_subject: Some(id.subject.clone()),
                    created_at_ms: now_ms,
                    updated_at_ms: now_ms,
                };
                self.core.store.create_user(u.clone()).await?;
                u
            }
        };
        self.open_session(user, source, user_agent).await
    }

    async fn open_session(
        &self,
        user: UserRecord,
        source: &str,
        user_agent: &str,
    ) -> ServiceResult<LoginSession> {
        let a = &self.core.config.auth;
        let now_ms = self.core.now_ms();
        let secret = random_secret(SESSION_PREFIX);
        let csrf_token = random_secret("");
        let expires_at_ms = now_ms.saturating_add(a.session_absolute_ms);
        let record = SessionRecord {
            id_sha256: token_sha256(&secret),
            user_id: user.id.clone(),
            csrf_sha256: token_sha256(&csrf_token),
            created_at_ms: now_ms,
            last_used_at_ms: now_ms,
            expires_at_ms,
            source: truncate(source, 64),
            user_agent: truncate(user_agent, 256),
        };
        self.core
            .store
            .create_session(record, a.sessions_per_user_max)
            .await?;
        Ok(LoginSession {
            secret,
            csrf_token,
            user,
            expires_at_ms,
        })
    }

    /// The session and its user, if `secret` names a live session of an enabled user (idle
    /// and absolute expiry checked now); records its use.
    pub async fn session(
        &self,
        secret: &str,
    ) -> ServiceResult<Option<(SessionRecord, UserRecord)>> {
        if secret.len() > 256 || !secret.starts_with(SESSION_PREFIX) {
            return Ok(None);
        }
        let now_ms = self.core.now_ms();
        let idle_ms = self.core.config.auth.session_idle_ms;
        let Some(session) = self.core.store.find_session(&token_sha256(secret)).await? else {
            return Ok(None);
        };
        if now_ms >= session.expires_at_ms
            || now_ms.saturating_sub(session.last_used_at_ms) >= idle_ms
        {
            self.core.store.delete_session(&session.id_sha256).await?;
            return Ok(None);
        }
        let Some(user) = self.core.store.get_user(&session.user_id).await? else {
            return Ok(None);
        };
        if user.disabled {
            return Ok(None);
        }
        let due = self.touched.due(
            &session.id_sha256,
            session.last_used_at_ms,
            now_ms,
            SESSION_TOUCH_INTERVAL_MS,
        );
        if due {
            self.core
                .store
                .touch_session(&session.id_sha256, now_ms)
                .await?;
        }
        Ok(Some((session, user)))
    }

    /// Whether the session (by the SHA-256 of its cookie) is still live and its user enabled
    /// (a store failure counts as live: the next request checks again).
    pub async fn session_still_valid(&self, id_sha256: &str) -> bool {
        let now_ms = self.core.now_ms();
        let idle_ms = self.core.config.auth.session_idle_ms;
        let session = match self.core.store.find_session(id_sha256).await {
            Ok(Some(s)) => s,
            Ok(None) => return false,
            Err(_) => return true,
        };
        if now_ms >= session.expires_at_ms
            || now_ms.saturating_sub(session.last_used_at_ms)
                >= idle_ms.saturating_add(SESSION_TOUCH_INTERVAL_MS)
        {
            return false;
        }
        match self.core.store.get_user(&session.user_id).await {
            Ok(Some(u)) => !u.disabled,
            Ok(None) => false,
            Err(_) => true,
        }
    }

    /// Ends the session (`false` if there was none).
    pub async fn logout(&self, secret: &str) -> ServiceResult<bool> {
        Ok(self
            .core
            .store
            .delete_session(&token_sha256(secret))
            .await?)
    }

    /// Deletes expired sessions and old login-failure counters (under the retention lease).
    pub async fn prune(&self) -> mooring_store::Result<u64> {
        let a = &self.core.config.auth;
        let now_ms = self.core.now_ms();
        let mut n = 0;
        loop {
            let deleted = self
                .core
                .store
                .delete_expired_sessions(now_ms.saturating_sub(a.session_idle_ms), now_ms, 1000)
                .await?;
            n += deleted;
            if deleted < 1000 {
                break;
            }
        }
        n += self
            .core
            .store
            .prune_login_failures(now_ms.saturating_sub(a.login_window_ms))
            .await?;
        Ok(n)
    }
}

/// The key an address is throttled under: an IPv4 address, or the /64 an IPv6 address is in
/// (one host usually holds a whole /64).
pub fn throttle_address(source: &str) -> String {
    match source.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Ok(ip) => ip.to_string(),
        Err(_) => truncate(source, 64),
    }
}

fn truncate(s: &str, chars: usize) -> String {
    s.chars().take(chars).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(
            normalize_email(" Ann@Example.COM ").ok().as_deref(),
            Some("ann@example.com")
        );
        for bad in ["", "ann", "@x", "ann@", "a b@x", "a@b@c", "a\u{0}@x"] {
            assert!(normalize_email(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_ipv6_client_is_throttled_by_its_64() {
        assert_eq!(
            throttle_address("2001:db8:1:2:aaaa::1"),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            throttle_address("2001:db8:1:2:ffff::9"),
            "2001:db8:1:2::/64"
        );
        assert_eq!(throttle_address("192.0.2.7"), "192.0.2.7");
        assert_eq!(throttle_address("unknown"), "unknown");
    }

    #[test]
    fn password_hashes_are_argon2id_and_verify() {
        let h = hash_password("correct horse battery").expect("hash");
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse batterY", &h));
        assert!(!verify_password("x", "not a phc string"));
    }
}
