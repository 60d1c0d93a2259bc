//! `/api/v1` handlers for people and apps: login, logout, who am I, password links, users,
//! tokens and the audit log.

use super::{
    client_addr, ApiError, ApiJson, ApiPath, ApiQuery, ApiResult, Caller, CallerKind, ErrorBody,
};
use crate::accounts::{LoginSession, NewUser, UserChange, CSRF_COOKIE, SESSION_COOKIE};
use crate::app::App;
use crate::audit::AuditEntryIn;
use crate::auth::NewToken;
use crate::error::{ErrorKind, ServiceError};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use mooring_api::{
    AuditEntry, AuditList, AuditParams, CreateToken, CreateUser, CreatedToken, CreatedUser,
    LoginRequest, LoginResponse, Me, PageParams, PasswordLink, SetPassword, TokenInfo, TokenList,
    UpdateUser, User, UserList,
};
use mooring_store::{Role, TokenRecord, UserRecord};
use std::sync::Arc;

fn parse_role(role: &str) -> Result<Role, ApiError> {
    role.parse::<Role>()
        .map_err(|e| ApiError(ServiceError::invalid("invalid_role", e.to_string())))
}

pub(super) fn user_body(u: UserRecord) -> User {
    User {
        id: u.id,
        email: u.email,
        role: u.role.as_str().to_owned(),
        scope: u.scope,
        disabled: u.disabled,
        has_password: u.password_hash.is_some(),
        oidc: u.oidc_subject.is_some(),
        created_at: u.created_at_ms,
        updated_at: u.updated_at_ms,
    }
}

fn token_body(t: TokenRecord) -> TokenInfo {
    TokenInfo {
        id: t.id,
        name: t.name,
        role: t.role.as_str().to_owned(),
        scope: t.scope,
        created_at: t.created_at_ms,
        expires_at: t.expires_at_ms,
        last_used_at: t.last_used_at_ms,
    }
}

/// The value of one cookie in the request's `Cookie` headers.
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn secure_cookies(app: &App) -> bool {
    app.config().http_tls || app.config().public_url().starts_with("https://")
}

fn set_cookie(resp: &mut Response, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// The response of a new login: the session cookie (HttpOnly), the CSRF cookie (readable by
/// the page) and the user with the CSRF token. Shared by the password and OpenID Connect logins.
pub(crate) fn login_response(app: &App, session: LoginSession, mut resp: Response) -> Response {
    let secure = if secure_cookies(app) { "; Secure" } else { "" };
    let max_age = app.config().auth.session_absolute_ms / 1000;
    set_cookie(
        &mut resp,
        format!(
            "{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}",
            session.secret
        ),
    );
    set_cookie(
        &mut resp,
        format!(
            "{CSRF_COOKIE}={}; Path=/; SameSite=Lax; Max-Age={max_age}{secure}",
            session.csrf_token
        ),
    );
    resp
}

fn clear_cookies(app: &App, resp: &mut Response) {
    let secure = if secure_cookies(app) { "; Secure" } else { "" };
    for name in [SESSION_COOKIE, CSRF_COOKIE] {
        set_cookie(
            resp,
            format!("{name}=; Path=/; Max-Age=0; SameSite=Lax{secure}"),
        );
    }
}

#[utoipa::path(post, path = "/api/v1/auth/login", request_body = LoginRequest, security(()),
    responses((status = 200, body = LoginResponse, headers(("Set-Cookie" = String, description = "mooring_session (HttpOnly) and mooring_csrf"))),
        (status = 401, body = ErrorBody, description = "invalid_credentials"), (status = 429, body = ErrorBody, description = "too_many_attempts")))]
pub(super) async fn login(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    req: Request,
) -> ApiResult<Response> {
    let source = client_addr(&app, &req);
    let body = ApiJson::<LoginRequest>::from_request(req, &()).await?.0;
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let result = app
        .accounts
        .login_password(&body.email, &body.password, &source, user_agent)
        .await;
    // Throttled and busy answers are only counted (`/metrics`): an anonymous client must not
    // grow the log; every attempt that reached a password check is recorded.
    let recorded = match &result {
        Ok(_) => Some((200, String::new())),
        Err(e) if matches!(e.kind, ErrorKind::TooManyRequests | ErrorKind::Unavailable) => None,
        Err(e) => Some((e.kind.http_status(), e.code.to_owned())),
    };
    if let Some((status, detail)) = recorded {
        let actor = crate::accounts::normalize_email(&body.email)
            .map_or_else(|_| "anonymous".to_owned(), |e| format!("user:{e}"));
        app.audit
            .record(AuditEntryIn {
                actor,
                action: "auth.login",
                target: "/api/v1/auth/login".to_owned(),
                source,
                status,
                detail,
            })
            .await;
    }
    let session = result?;
    let body = LoginResponse {
        user: user_body(session.user.clone()),
        csrf_token: session.csrf_token.clone(),
        expires_at: session.expires_at_ms,
    };
    Ok(login_response(&app, session, Json(body).into_response()))
}

use axum::extract::FromRequest;

#[utoipa::path(post, path = "/api/v1/auth/logout",
    responses((status = 204, description = "the session ended (cookies cleared)")))]
pub(super) async fn logout(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if matches!(caller.kind, CallerKind::User { .. }) {
        if let Some(secret) = cookie(&headers, SESSION_COOKIE) {
            app.accounts.logout(secret).await?;
        }
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    clear_cookies(&app, &mut resp);
    Ok(resp)
}

#[utoipa::path(get, path = "/api/v1/auth/me", responses((status = 200, body = Me)))]
pub(super) async fn me(Extension(caller): Extension<Caller>) -> Json<Me> {
    let (kind, id) = match &caller.kind {
        CallerKind::User { id, .. } => ("user", id.clone()),
        CallerKind::Token { id } => ("token", id.clone()),
    };
    Json(Me {
        kind: kind.to_owned(),
        name: caller.name.clone(),
        id,
        role: caller.role.as_str().to_owned(),
        scope: caller.access.scope().map(|s| s.to_string()),
        permissions: super::routes::permissions_of(caller.role),
    })
}

#[utoipa::path(post, path = "/api/v1/auth/password", request_body = SetPassword, security(()),
    responses((status = 200, body = User), (status = 400, body = ErrorBody, description = "weak_password"), (status = 401, body = ErrorBody, description = "invalid_link")))]
pub(super) async fn set_password(
    State(app): State<Arc<App>>,
    req: Request,
) -> ApiResult<Json<User>> {
    let source = client_addr(&app, &req);
    let body = ApiJson::<SetPassword>::from_request(req, &()).await?.0;
    // Only a password actually set is recorded (a failed attempt names nobody; link tokens
    // are 256-bit random, so guessing is hopeless).
    let user = app
        .accounts
        .set_password(&body.token, body.password)
        .await?;
    app.audit
        .record(AuditEntryIn {
            actor: format!("user:{}", user.email),
            action: "auth.password_set",
            target: "/api/v1/auth/password".to_owned(),
            source,
            status: 200,
            detail: String::new(),
        })
        .await;
    Ok(Json(user_body(user)))
}

#[utoipa::path(post, path = "/api/v1/users", request_body = CreateUser,
    responses((status = 201, body = CreatedUser), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody, description = "user_exists")))]
pub(super) async fn create_user(
    State(app): State<Arc<App>>,
    ApiJson(req): ApiJson<CreateUser>,
) -> ApiResult<(StatusCode, Json<CreatedUser>)> {
    let role = parse_role(&req.role)?;
    let (user, link) = app
        .accounts
        .create_user(NewUser {
            email: req.email,
            role,
            scope: req.scope,
            password: req.password,
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedUser {
            user: user_body(user),
            password_link: link,
        }),
    ))
}

#[utoipa::path(get, path = "/api/v1/users", params(PageParams),
    responses((status = 200, body = UserList), (status = 400, body = ErrorBody)))]
pub(super) async fn list_users(
    State(app): State<Arc<App>>,
    ApiQuery(p): ApiQuery<PageParams>,
) -> ApiResult<Json<UserList>> {
    let (users, next_cursor) = app
        .accounts
        .list_users(p.limit, p.cursor.as_deref())
        .await?;
    Ok(Json(UserList {
        users: users.into_iter().map(user_body).collect(),
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/api/v1/users/{id}", params(("id" = String, Path, description = "user id or email")),
    responses((status = 200, body = User), (status = 404, body = ErrorBody)))]
pub(super) async fn get_user(
    State(app): State<Arc<App>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<User>> {
    Ok(Json(user_body(app.accounts.get_user(&id).await?)))
}

#[utoipa::path(patch, path = "/api/v1/users/{id}", params(("id" = String, Path, description = "user id or email")), request_body = UpdateUser,
    responses((status = 200, body = User), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn update_user(
    State(app): State<Arc<App>>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateUser>,
) -> ApiResult<Json<User>> {
    let change = UserChange {
        role: req.role.as_deref().map(parse_role).transpose()?,
        scope: req.scope,
        disabled: req.disabled,
    };
    Ok(Json(user_body(
        app.accounts.update_user(&id, change).await?,
    )))
}

#[utoipa::path(delete, path = "/api/v1/users/{id}", params(("id" = String, Path, description = "user id or email")),
    responses((status = 204, description = "deleted, with its sessions"), (status = 404, body = ErrorBody)))]
pub(super) async fn delete_user(
    State(app): State<Arc<App>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    app.accounts.delete_user(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/users/{id}/password-link", params(("id" = String, Path, description = "user id or email")),
    responses((status = 200, body = PasswordLink), (status = 404, body = ErrorBody)))]
pub(super) async fn password_link(
    State(app): State<Arc<App>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<PasswordLink>> {
    Ok(Json(PasswordLink {
        password_link: app.accounts.password_link(&id).await?,
    }))
}

#[utoipa::path(post, path = "/api/v1/tokens", request_body = CreateToken,
    responses((status = 201, body = CreatedToken), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn create_token(
    State(app): State<Arc<App>>,
    ApiJson(req): ApiJson<CreateToken>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    let role = parse_role(&req.role)?;
    let (record, secret) = app
        .tokens
        .create(NewToken {
            name: req.name,
            role,
            scope: req.scope,
            expires_in_ms: req.expires_in_ms,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(created_token(record, secret))))
}

fn created_token(record: TokenRecord, secret: String) -> CreatedToken {
    CreatedToken {
        id: record.id,
        name: record.name,
        role: record.role.as_str().to_owned(),
        token: secret,
        scope: record.scope,
        expires_at: record.expires_at_ms,
    }
}

#[utoipa::path(get, path = "/api/v1/tokens", params(PageParams),
    responses((status = 200, body = TokenList), (status = 400, body = ErrorBody)))]
pub(super) async fn list_tokens(
    State(app): State<Arc<App>>,
    ApiQuery(p): ApiQuery<PageParams>,
) -> ApiResult<Json<TokenList>> {
    let (tokens, next_cursor) = app.tokens.list(p.limit, p.cursor.as_deref()).await?;
    Ok(Json(TokenList {
        tokens: tokens.into_iter().map(token_body).collect(),
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/api/v1/tokens/{id}", params(("id" = String, Path)),
    responses((status = 200, body = TokenInfo), (status = 404, body = ErrorBody)))]
pub(super) async fn get_token(
    State(app): State<Arc<App>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<TokenInfo>> {
    Ok(Json(token_body(app.tokens.get(&id).await?)))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{id}", params(("id" = String, Path)),
    responses((status = 204, description = "revoked: refused on every node from the next request"), (status = 404, body = ErrorBody)))]
pub(super) async fn revoke_token(
    State(app): State<Arc<App>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    app.tokens.revoke(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/tokens/rotate-admin",
    responses((status = 201, body = CreatedToken, description = "the new admin token; the old ones named `admin` are revoked and this node's admin.token file replaced")))]
pub(super) async fn rotate_admin(
    State(app): State<Arc<App>>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    let (record, secret) = app.tokens.rotate_admin().await?;
    Ok((StatusCode::CREATED, Json(created_token(record, secret))))
}

#[utoipa::path(get, path = "/api/v1/audit", params(AuditParams),
    responses((status = 200, body = AuditList), (status = 400, body = ErrorBody)))]
pub(super) async fn list_audit(
    State(app): State<Arc<App>>,
    ApiQuery(p): ApiQuery<AuditParams>,
) -> ApiResult<Json<AuditList>> {
    let (entries, next_cursor) = app.audit.list(p).await?;
    Ok(Json(AuditList {
        entries: entries
            .into_iter()
            .map(|e| AuditEntry {
                id: e.id,
                at: e.at_ms,
                actor: e.actor,
                action: e.action,
                target: e.target,
                source: e.source,
                node: e.node,
                status: e.status,
                detail: e.detail,
            })
            .collect(),
        next_cursor,
    }))
}

fn oidc_off() -> ApiError {
    ApiError(ServiceError::not_found(
        "oidc_not_configured",
        "OpenID Connect login is not configured on this server ([oidc] in the config)",
    ))
}

#[utoipa::path(get, path = "/api/v1/auth/oidc/login", security(()),
    params(("return_to" = Option<String>, Query, description = "relative path to land on after the login (default /)")),
    responses((status = 302, description = "to the OpenID provider, with the sealed login state in a cookie"), (status = 404, body = ErrorBody, description = "oidc_not_configured")))]
pub(super) async fn oidc_login(
    State(app): State<Arc<App>>,
    ApiQuery(q): ApiQuery<crate::oidc::LoginQuery>,
) -> ApiResult<Response> {
    let oidc = app.oidc().ok_or_else(oidc_off)?;
    crate::oidc::login_redirect(oidc, q).await
}

#[utoipa::path(get, path = "/api/v1/auth/oidc/callback", security(()),
    params(("code" = String, Query), ("state" = String, Query)),
    responses((status = 303, description = "logged in: the session cookies are set, to return_to"), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody, description = "oidc_token_invalid, oidc_state_*"), (status = 403, body = ErrorBody, description = "oidc_no_role, user_disabled")))]
pub(super) async fn oidc_callback(
    State(app): State<Arc<App>>,
    ApiQuery(q): ApiQuery<crate::oidc::CallbackQuery>,
    parts: axum::http::request::Parts,
) -> ApiResult<Response> {
    let oidc = app.oidc().ok_or_else(oidc_off)?;
    Ok(crate::oidc::callback_response(oidc, &AccountsLogin(&app), q, &parts).await)
}

/// Turns a verified OpenID Connect identity into a session: the accounts service links or
/// creates the user; the browser goes on to `return_to` with the session cookies.
struct AccountsLogin<'a>(&'a App);

#[async_trait::async_trait]
impl crate::oidc::OidcLogin for AccountsLogin<'_> {
    async fn login(
        &self,
        id: crate::oidc::OidcIdentity,
        source: String,
        user_agent: String,
    ) -> Result<Response, ServiceError> {
        let app = self.0;
        let role = id
            .role
            .parse::<Role>()
            .map_err(|e| ServiceError::invalid("invalid_role", e.to_string()))?;
        let actor = format!("user:{}", id.email);
        let result = app
            .accounts
            .login_external(
                crate::accounts::ExternalIdentity {
                    subject: format!("{} {}", id.issuer, id.subject),
                    email: id.email,
                    email_verified: id.email_verified,
                    role,
                    scope: id.scope,
                },
                &source,
                &user_agent,
            )
            .await;
        let (status, detail) = match &result {
            Ok(_) => (303, String::new()),
            Err(e) => (e.kind.http_status(), e.code.to_owned()),
        };
        app.audit
            .record(AuditEntryIn {
                actor,
                action: "auth.oidc_login",
                target: "/api/v1/auth/oidc/callback".to_owned(),
                source,
                status,
                detail,
            })
            .await;
        let session = result?;
        let mut resp = StatusCode::SEE_OTHER.into_response();
        if let Ok(to) = HeaderValue::from_str(&id.return_to) {
            resp.headers_mut().insert(header::LOCATION, to);
        }
        Ok(login_response(app, session, resp))
    }
}
