//! People: users, logins, sessions, and the audit log.

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::{IntoParams, ToSchema};

/// `POST /api/v1/auth/login`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

/// The answer to a login: the session cookie is set (HttpOnly); `csrf_token` (also in the
/// `mooring_csrf` cookie) goes back in `X-CSRF-Token` on every write made with the cookie.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LoginResponse {
    pub user: User,
    pub csrf_token: String,
    /// The session ends at this time at the latest (idle expiry may end it earlier).
    pub expires_at: u64,
}

/// A person.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct User {
    pub id: String,
    pub email: String,
    pub role: String,
    pub scope: Option<String>,
    pub disabled: bool,
    /// A password is set (else: a password link is outstanding, or OpenID Connect only).
    pub has_password: bool,
    /// Linked to an OpenID Connect identity.
    pub oidc: bool,
    pub created_at: u64,
    pub updated_at: u64,
}

/// `POST /api/v1/users`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    pub email: String,
    /// `admin`, `operator`, `installer`, `viewer` or `service`.
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Set the password now (at least 12 characters); absent: the answer carries a one-time
    /// password-set link instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedUser {
    pub user: User,
    /// One-time link to set the password (when none was given); valid for
    /// `auth.password_link_ttl_ms`.
    pub password_link: Option<String>,
}

fn some_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// `PATCH /api/v1/users/{id}`: absent fields stay. Changing role or scope, or disabling,
/// ends the user's sessions.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// A selector, or `null` to remove the scope.
    #[serde(
        default,
        deserialize_with = "some_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>)]
    pub scope: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
}

/// `GET /api/v1/users`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserList {
    pub users: Vec<User>,
    pub next_cursor: Option<String>,
}

/// `POST /api/v1/users/{id}/password-link`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PasswordLink {
    pub password_link: String,
}

/// `POST /api/v1/auth/password`: sets a password with the token of a password-set link.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPassword {
    /// The `token` parameter of the link.
    pub token: String,
    pub password: String,
}

/// `GET /api/v1/auth/me`: who the caller is.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Me {
    /// `user` or `token`.
    pub kind: String,
    /// The user's email or the token's name.
    pub name: String,
    pub id: String,
    pub role: String,
    pub scope: Option<String>,
    /// What the caller may do (permission names, as in docs/access.md).
    pub permissions: Vec<String>,
}

/// One audit log entry.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub id: u64,
    pub at: u64,
    /// `user:<email>`, `token:<name> (<id>)` or `anonymous`.
    pub actor: String,
    /// e.g. `device.create`, `auth.login`.
    pub action: String,
    /// The request path.
    pub target: String,
    /// Client address.
    pub source: String,
    pub node: String,
    /// HTTP status of the answer.
    pub status: u16,
    pub detail: String,
}

/// `GET /api/v1/audit`, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditList {
    pub entries: Vec<AuditEntry>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Exact actor, e.g. `user:ann@example.com`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Exact action, or a prefix ending in `.` (`device.`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Target path prefix, e.g. `/api/v1/devices/lock-1`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// From this time (unix ms, inclusive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// Before this time (unix ms, exclusive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
    /// Page size, 1..=1000 (default 100).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}
