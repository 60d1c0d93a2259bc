//! Accounts and access (issue 14), tested from outside against the real binary: the route ×
//! role walk, scopes, people's logins (cookies, CSRF, throttling, password links), token
//! lifecycle, the audit log, ETags and CORS.

#[path = "../../mooring-server/tests/support/oidc_provider.rs"]
mod oidc_provider;
mod support;

use mooring_server::access::{role_allows, Permission};
use mooring_server::http::route_specs;
use mooring_store::Role;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};
use support::{call, config_args, cookie_header, http, Resp, Server, BIN, WAIT};

async fn create_token(server: &Server, body: Value) -> (String, String) {
    let (status, v) = server.api("POST", "/api/v1/tokens", Some(body)).await;
    assert_eq!(status, 201, "{v}");
    (
        v["id"].as_str().expect("id").to_owned(),
        v["token"].as_str().expect("token").to_owned(),
    )
}

fn path_for(path: &str) -> String {
    path.replace("{id}", "walk-missing")
        .replace("{cmd}", "c_missing")
}

#[tokio::test]
async fn every_route_checks_its_declared_permission_for_every_role() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(tmp.path());
    let mut tokens = Vec::new();
    for role in Role::ALL {
        let (_, secret) = create_token(
            &server,
            json!({"name": format!("walk-{role}"), "role": role.as_str()}),
        )
        .await;
        tokens.push((role, secret));
    }
    let specs = route_specs();
    assert!(specs.len() >= 30, "{} routes", specs.len());
    // rotate-admin replaces the admin token the harness holds: walk it last.
    let mut ordered: Vec<_> = specs.iter().collect();
    ordered.sort_by_key(|s| s.path == "/api/v1/tokens/rotate-admin");
    let mut checked = 0;
    for spec in ordered {
        let path = path_for(spec.path);
        let body = (spec.method != "get" && spec.method != "delete").then(|| json!({}));
        if spec.permission == Permission::Public {
            let r = call(&server, spec.method, &path, None, None, &[], body.clone()).await;
            assert!(
                r.status != 401 && r.status != 403,
                "{} {} is public but answered {} {}",
                spec.method,
                spec.path,
                r.status,
                r.body
            );
            continue;
        }
        let r = call(&server, spec.method, &path, None, None, &[], body.clone()).await;
        assert_eq!(
            r.status, 401,
            "{} {} without credentials: {}",
            spec.method, spec.path, r.body
        );
        for (role, secret) in &tokens {
            let r = call(
                &server,
                spec.method,
                &path,
                Some(secret),
                None,
                &[],
                body.clone(),
            )
            .await;
            if role_allows(*role, spec.permission) {
                assert!(
                    r.status != 401 && r.status != 403,
                    "{role} may {} {} ({}) but got {} {}",
                    spec.method,
                    spec.path,
                    spec.permission.as_str(),
                    r.status,
                    r.body
                );
            } else {
                assert_eq!(
                    (r.status, r.body["error"]["code"].as_str()),
                    (403, Some("forbidden")),
                    "{role} must not {} {} ({})",
                    spec.method,
                    spec.path,
                    spec.permission.as_str()
                );
            }
            checked += 1;
        }
    }
    let guarded = specs
        .iter()
        .filter(|s| s.permission != Permission::Public)
        .count();
    assert_eq!(checked, guarded * Role::ALL.len(), "route × role checks");

    // The OpenAPI document describes exactly the API routes of the table.
    let doc = call(
        &server,
        "GET",
        "/api/v1/openapi.json",
        None,
        None,
        &[],
        None,
    )
    .await;
    let documented: std::collections::BTreeSet<String> = doc.body["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .cloned()
        .collect();
    let routed: std::collections::BTreeSet<String> = specs
        .iter()
        .filter(|s| s.path.starts_with("/api/v1/") && s.path != "/api/v1/openapi.json")
        .map(|s| s.path.to_owned())
        .collect();
    assert_eq!(documented, routed, "OpenAPI paths vs the route table");
}

#[tokio::test]
async fn a_scope_limits_what_a_token_lists_reads_and_acts_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(tmp.path());
    for (id, customer) in [
        ("acme-1", "acme"),
        ("acme-2", "acme"),
        ("globex-1", "globex"),
    ] {
        let (status, v) = server
            .api(
                "POST",
                "/api/v1/devices",
                Some(json!({"id": id, "tags": {"customer": customer}})),
            )
            .await;
        assert_eq!(status, 201, "{v}");
    }
    let (_, viewer) = create_token(
        &server,
        json!({"name": "acme-dash", "role": "viewer", "scope": "tag:customer=acme"}),
    )
    .await;
    let (_, operator) = create_token(
        &server,
        json!({"name": "acme-ops", "role": "operator", "scope": "tag:customer=acme"}),
    )
    .await;

    let list = call(
        &server,
        "GET",
        "/api/v1/devices",
        Some(&viewer),
        None,
        &[],
        None,
    )
    .await;
    let ids: Vec<&str> = list.body["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(ids, ["acme-1", "acme-2"]);
    let sel = call(
        &server,
        "GET",
        "/api/v1/devices?selector=id:acme-1,globex-1",
        Some(&viewer),
        None,
        &[],
        None,
    )
    .await;
    assert_eq!(
        sel.body["devices"].as_array().map(Vec::len),
        Some(1),
        "{}",
        sel.body
    );
    // Outside the scope looks exactly like absent.
    for path in [
        "/api/v1/devices/globex-1",
        "/api/v1/devices/globex-1/telemetry",
        "/api/v1/devices/globex-1/shadow",
        "/api/v1/devices/globex-1/commands",
    ] {
        let r = call(&server, "GET", path, Some(&viewer), None, &[], None).await;
        assert_eq!(r.status, 404, "{path}: {}", r.body);
    }
    assert_eq!(
        call(
            &server,
            "GET",
            "/api/v1/devices/acme-1",
            Some(&viewer),
            None,
            &[],
            None
        )
        .await
        .status,
        200
    );

    // Live events are filtered by the scope too: a shadow change outside it never shows.
    let mut events = support::Sse::open_as(&server, &viewer, None, None).await;
    for id in ["globex-1", "acme-2"] {
        let (status, v) = server
            .api(
                "PATCH",
                &format!("/api/v1/devices/{id}/shadow"),
                Some(json!({"desired": {"led": "on"}})),
            )
            .await;
        assert_eq!(status, 200, "{v}");
    }
    let first = events.next().await;
    assert_eq!(
        (first.event.as_str(), first.data["device_id"].as_str()),
        ("shadow", Some("acme-2")),
        "{:?}",
        first.data
    );

    // The scoped operator acts only inside its scope.
    let cmd = json!({"name": "reboot"});
    let r = call(
        &server,
        "POST",
        "/api/v1/devices/globex-1/commands",
        Some(&operator),
        None,
        &[],
        Some(cmd.clone()),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = call(
        &server,
        "POST",
        "/api/v1/devices/acme-1/commands",
        Some(&operator),
        None,
        &[],
        Some(cmd),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let fleet = call(
        &server,
        "POST",
        "/api/v1/commands",
        Some(&operator),
        None,
        &[],
        Some(json!({"selector": "id:acme-2,globex-1", "name": "reboot"})),
    )
    .await;
    assert_eq!(fleet.status, 202, "{}", fleet.body);
    assert_eq!(fleet.body["total"], 1, "{}", fleet.body);
    assert_eq!(
        fleet.body["selector"],
        "id:acme-2,globex-1 and tag:customer=acme"
    );
    let r = call(
        &server,
        "PUT",
        "/api/v1/devices/acme-1/tags",
        Some(&operator),
        None,
        &[],
        Some(json!({"customer": "globex"})),
    )
    .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (403, Some("outside_scope")),
        "{}",
        r.body
    );
    let r = call(
        &server,
        "POST",
        "/api/v1/devices",
        Some(&operator),
        None,
        &[],
        Some(json!({"id": "new-1", "tags": {"customer": "globex"}})),
    )
    .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (403, Some("outside_scope")),
        "{}",
        r.body
    );
    let r = call(
        &server,
        "DELETE",
        "/api/v1/devices/globex-1",
        Some(&operator),
        None,
        &[],
        None,
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(
        server.api("GET", "/api/v1/devices/globex-1", None).await.0,
        200,
        "untouched"
    );

    // A stream ends once its token is revoked (re-checked every second).
    let (status, v) = server.api("GET", "/api/v1/tokens", None).await;
    assert_eq!(status, 200, "{v}");
    let dash_id = v["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .find(|t| t["name"] == "acme-dash")
        .and_then(|t| t["id"].as_str())
        .expect("acme-dash")
        .to_owned();
    let revoke = format!("/api/v1/tokens/{dash_id}");
    assert_eq!(server.api("DELETE", &revoke, None).await.0, 204);
    events.wait_end().await;

    // An admin cannot be scoped (it manages users and tokens).
    let scoped_admin = json!({"name": "x", "role": "admin", "scope": "tag:customer=acme"});
    let (status, v) = server
        .api("POST", "/api/v1/tokens", Some(scoped_admin))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_scope")),
        "{v}"
    );

    // A scope may not depend on what a device reports.
    let (status, v) = server
        .api(
            "POST",
            "/api/v1/tokens",
            Some(json!({"name": "x", "role": "viewer", "scope": "online"})),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_scope")),
        "{v}"
    );
}

async fn login(server: &Server, email: &str, password: &str) -> Resp {
    call(
        server,
        "POST",
        "/api/v1/auth/login",
        None,
        None,
        &[],
        Some(json!({"email": email, "password": password})),
    )
    .await
}

#[tokio::test]
async fn people_log_in_with_a_session_cookie_that_needs_csrf_for_writes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(tmp.path());
    server.create_user("Ann@Example.com", "operator", "correct horse battery");

    let r = login(&server, "ann@example.com", "correct horse battery").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["user"]["role"], "operator");
    let session = r
        .cookies
        .iter()
        .find(|c| c.starts_with("mooring_session="))
        .expect("session cookie");
    assert!(
        session.contains("HttpOnly") && session.contains("SameSite=Lax"),
        "{session}"
    );
    assert!(!session.contains("Secure"), "plain HTTP: {session}");
    let csrf = r.body["csrf_token"].as_str().expect("csrf").to_owned();
    let cookie = cookie_header(&r.cookies);

    let me = call(
        &server,
        "GET",
        "/api/v1/auth/me",
        None,
        Some(&cookie),
        &[],
        None,
    )
    .await;
    assert_eq!(
        (me.status, me.body["name"].as_str()),
        (200, Some("ann@example.com")),
        "{}",
        me.body
    );
    let dev = json!({"id": "lock-1"});
    let r = call(
        &server,
        "POST",
        "/api/v1/devices",
        None,
        Some(&cookie),
        &[],
        Some(dev.clone()),
    )
    .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (403, Some("csrf_failed")),
        "{}",
        r.body
    );
    let r = call(
        &server,
        "POST",
        "/api/v1/devices",
        None,
        Some(&cookie),
        &[("x-csrf-token", "wrong")],
        Some(dev.clone()),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = call(
        &server,
        "POST",
        "/api/v1/devices",
        None,
        Some(&cookie),
        &[("x-csrf-token", &csrf)],
        Some(dev),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    // An operator may not manage users.
    let r = call(
        &server,
        "GET",
        "/api/v1/users",
        None,
        Some(&cookie),
        &[],
        None,
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);

    // Logout ends the session for good.
    let r = call(
        &server,
        "POST",
        "/api/v1/auth/logout",
        None,
        Some(&cookie),
        &[("x-csrf-token", &csrf)],
        None,
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(r
        .cookies
        .iter()
        .any(|c| c.starts_with("mooring_session=;") && c.contains("Max-Age=0")));
    let r = call(
        &server,
        "GET",
        "/api/v1/auth/me",
        None,
        Some(&cookie),
        &[],
        None,
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.body);

    // Disabling a user ends its sessions at once.
    let again = login(&server, "ann@example.com", "correct horse battery").await;
    let cookie = cookie_header(&again.cookies);
    let out = server.cli(&["user", "disable", "ann@example.com"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        call(
            &server,
            "GET",
            "/api/v1/auth/me",
            None,
            Some(&cookie),
            &[],
            None
        )
        .await
        .status,
        401
    );
    assert_eq!(
        login(&server, "ann@example.com", "correct horse battery")
            .await
            .status,
        401
    );

    // The user list shows what was done; the CLI refuses a bad role with exit 2.
    let out = server.cli(&["user", "list", "-o", "json"]);
    let users: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(users[0]["email"], "ann@example.com");
    assert_eq!(users[0]["disabled"], true);
    let out = server.cli(&["user", "create", "bob@example.com", "--role", "root"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_password_link_sets_the_password_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(tmp.path());
    let out = server.cli(&["user", "create", "vic@example.com", "--role", "viewer"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let link = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        link.starts_with(&format!("{}/#/set-password?token=mrp_", server.url())),
        "{link}"
    );
    let token = link.rsplit_once("token=").expect("token").1.to_owned();
    // No password yet: the login fails like a wrong one.
    assert_eq!(login(&server, "vic@example.com", "").await.status, 401);
    let weak = call(
        &server,
        "POST",
        "/api/v1/auth/password",
        None,
        None,
        &[],
        Some(json!({"token": token, "password": "short"})),
    )
    .await;
    assert_eq!(
        (weak.status, weak.body["error"]["code"].as_str()),
        (400, Some("weak_password"))
    );
    let set = call(
        &server,
        "POST",
        "/api/v1/auth/password",
        None,
        None,
        &[],
        Some(json!({"token": token, "password": "a long enough secret"})),
    )
    .await;
    assert_eq!(set.status, 200, "{}", set.body);
    let again = call(
        &server,
        "POST",
        "/api/v1/auth/password",
        None,
        None,
        &[],
        Some(json!({"token": token, "password": "another long secret"})),
    )
    .await;
    assert_eq!(
        (again.status, again.body["error"]["code"].as_str()),
        (401, Some("invalid_link"))
    );
    assert_eq!(
        login(&server, "vic@example.com", "a long enough secret")
            .await
            .status,
        200
    );
    // Stored hashed (argon2id), never in clear.
    let db = std::fs::read(tmp.path().join("mooring.db")).unwrap_or_default();
    assert!(!db.windows(20).any(|w| w == b"a long enough secret"));
}

#[tokio::test]
async fn failed_logins_are_throttled_per_account_and_per_address() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let args = config_args(
        tmp.path(),
        "[auth]\nlogin_failures_per_account_max = 3\nlogin_failures_per_address_max = 20\n",
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start_with(tmp.path(), "127.0.0.1:0", "127.0.0.1:0", &args);
    let password = "correct horse battery";
    server.create_user("ann@example.com", "viewer", password);
    server.create_user("bob@example.com", "viewer", password);
    // Attempts sent at once are counted before any password is checked: of 10 parallel
    // guesses, 3 are checked (401) and 7 refused (429).
    let guesses = (0..10).map(|_| login(&server, "ann@example.com", "wrong password!"));
    let statuses: Vec<u16> = futures::future::join_all(guesses)
        .await
        .into_iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 401).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        7,
        "{statuses:?}"
    );
    // The account is locked for the window, even with the right password...
    let r = login(&server, "ann@example.com", password).await;
    let code = r.body["error"]["code"].as_str();
    assert_eq!(
        (r.status, code),
        (429, Some("too_many_attempts")),
        "{}",
        r.body
    );
    // ...while another account still logs in from the same address (12 attempts so far).
    assert_eq!(
        login(&server, "bob@example.com", password).await.status,
        200
    );
    // Every attempt counts against the address, unknown and malformed emails too: after 20
    // it is refused outright.
    for i in 0..7 {
        let r = login(&server, &format!("nobody{i}@example.com"), "x").await;
        assert_eq!(r.status, 401, "{}", r.body);
    }
    let r = login(&server, "nobody\n@example.com", "x").await;
    assert_eq!(r.status, 401, "{}", r.body);
    let r = login(&server, "bob@example.com", password).await;
    assert_eq!(r.status, 429, "{}", r.body);
    let throttled = server
        .metric("mooring_http_refusals_total{reason=\"throttled\"}")
        .await;
    assert!(throttled >= 9.0, "{throttled}");
    // Checked attempts are in the audit log with the address; throttled ones only counted; a
    // malformed email is logged as anonymous, never verbatim.
    let (_, audit) = server
        .api("GET", "/api/v1/audit?action=auth.login&limit=100", None)
        .await;
    let entries = audit["entries"].as_array().expect("entries");
    assert!(entries.iter().all(|e| e["status"] != 429), "{audit}");
    assert!(
        entries.iter().any(|e| e["status"] == 401
            && e["source"] == "127.0.0.1"
            && e["actor"] == "user:ann@example.com"),
        "{audit}"
    );
    assert!(entries.iter().any(|e| e["actor"] == "anonymous"), "{audit}");
    assert!(!audit.to_string().contains("nobody\\n"), "{audit}");
}

#[tokio::test]
async fn tokens_are_listed_expire_and_are_revoked_at_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(tmp.path());
    let out = server.cli(&[
        "token",
        "create",
        "--name",
        "grafana",
        "--role",
        "viewer",
        "--expires",
        "90d",
        "--scope",
        "tag:site=berlin",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let grafana = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(grafana.starts_with("mrt_"));
    let out = server.cli(&["token", "create", "x", "--expires", "soon"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        call(
            &server,
            "GET",
            "/api/v1/devices",
            Some(&grafana),
            None,
            &[],
            None
        )
        .await
        .status,
        200
    );

    let out = server.cli(&["token", "list", "-o", "json"]);
    let list: Value = serde_json::from_slice(&out.stdout).expect("json");
    let row = list
        .as_array()
        .expect("rows")
        .iter()
        .find(|t| t["name"] == "grafana")
        .expect("grafana")
        .clone();
    assert_eq!(row["role"], "viewer");
    assert_eq!(row["scope"], "tag:site=berlin");
    assert!(row["expires_at"].as_u64().is_some());
    assert!(row["last_used_at"].as_u64().is_some(), "{row}");
    assert!(
        !out.stdout
            .windows(grafana.len())
            .any(|w| w == grafana.as_bytes()),
        "no secrets listed"
    );

    // A short-lived token stops working when it expires.
    let (_, short) = create_token(
        &server,
        json!({"name": "short", "role": "viewer", "expires_in_ms": 1500}),
    )
    .await;
    assert_eq!(
        call(
            &server,
            "GET",
            "/api/v1/devices",
            Some(&short),
            None,
            &[],
            None
        )
        .await
        .status,
        200
    );
    let deadline = Instant::now() + WAIT;
    while call(
        &server,
        "GET",
        "/api/v1/devices",
        Some(&short),
        None,
        &[],
        None,
    )
    .await
    .status
        != 401
    {
        assert!(Instant::now() < deadline, "the token never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Revocation holds from the next request.
    let id = row["id"].as_str().expect("id");
    let out = server.cli(&["token", "revoke", id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        call(
            &server,
            "GET",
            "/api/v1/devices",
            Some(&grafana),
            None,
            &[],
            None
        )
        .await
        .status,
        401
    );
    assert_eq!(server.cli(&["token", "revoke", id]).status.code(), Some(1));

    // rotate-admin: a new admin token, the old one refused, the file rewritten (0600).
    let old = server.token.clone();
    let out = server.cli(&["token", "rotate-admin"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_ne!(new, old);
    assert_eq!(
        call(
            &server,
            "GET",
            "/api/v1/tokens",
            Some(&old),
            None,
            &[],
            None
        )
        .await
        .status,
        401
    );
    assert_eq!(
        call(
            &server,
            "GET",
            "/api/v1/tokens",
            Some(&new),
            None,
            &[],
            None
        )
        .await
        .status,
        200
    );
    let file = tmp.path().join("admin.token");
    assert_eq!(
        std::fs::read_to_string(&file).expect("admin.token").trim(),
        new
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).expect("meta").permissions().mode() & 0o777,
        0o600
    );
}

#[tokio::test]
async fn every_write_is_in_the_audit_log_and_reads_carry_etags() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(tmp.path());
    let (_, viewer) = create_token(&server, json!({"name": "dash", "role": "viewer"})).await;
    assert_eq!(
        server
            .api("POST", "/api/v1/devices", Some(json!({"id": "lock-1"})))
            .await
            .0,
        201
    );
    assert_eq!(
        server
            .api(
                "PUT",
                "/api/v1/devices/lock-1/tags",
                Some(json!({"site": "b"}))
            )
            .await
            .0,
        200
    );
    let denied = call(
        &server,
        "DELETE",
        "/api/v1/devices/lock-1",
        Some(&viewer),
        None,
        &[],
        None,
    )
    .await;
    assert_eq!(denied.status, 403);

    let (_, all) = server.api("GET", "/api/v1/audit", None).await;
    let entries = all["entries"].as_array().expect("entries");
    let actions: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(
        actions,
        [
            "device.delete",
            "device.tag",
            "device.create",
            "token.create"
        ],
        "{all}"
    );
    assert_eq!(
        entries[0]["actor"]
            .as_str()
            .map(|a| a.starts_with("token:dash (tok_")),
        Some(true)
    );
    assert_eq!(entries[0]["status"], 403);
    assert_eq!(entries[0]["detail"], "forbidden");
    assert_eq!(entries[1]["target"], "/api/v1/devices/lock-1/tags");
    assert_eq!(entries[1]["source"], "127.0.0.1");
    let (_, page) = server.api("GET", "/api/v1/audit?limit=2", None).await;
    let cursor = page["next_cursor"].as_str().expect("cursor");
    let (_, rest) = server
        .api(
            "GET",
            &format!("/api/v1/audit?limit=2&cursor={cursor}"),
            None,
        )
        .await;
    assert_eq!(rest["entries"][0]["action"], "device.create");
    let (_, filtered) = server
        .api(
            "GET",
            "/api/v1/audit?action=device.&target=/api/v1/devices/lock-1",
            None,
        )
        .await;
    assert_eq!(
        filtered["entries"].as_array().map(Vec::len),
        Some(2),
        "{filtered}"
    );
    let out = server.cli(&["audit", "--action", "token.", "-o", "json"]);
    let cli: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(cli.as_array().map(Vec::len), Some(1));
    assert_eq!(
        call(
            &server,
            "GET",
            "/api/v1/audit",
            Some(&viewer),
            None,
            &[],
            None
        )
        .await
        .status,
        403
    );

    // Reads carry an ETag; If-None-Match answers 304 until the resource changes.
    let first = call(
        &server,
        "GET",
        "/api/v1/devices/lock-1",
        Some(&viewer),
        None,
        &[],
        None,
    )
    .await;
    let etag = first.headers["etag"].to_str().expect("etag").to_owned();
    let same = call(
        &server,
        "GET",
        "/api/v1/devices/lock-1",
        Some(&viewer),
        None,
        &[("if-none-match", &etag)],
        None,
    )
    .await;
    assert_eq!(same.status, 304);
    assert_eq!(
        server
            .api(
                "PUT",
                "/api/v1/devices/lock-1/tags",
                Some(json!({"site": "c"}))
            )
            .await
            .0,
        200
    );
    let changed = call(
        &server,
        "GET",
        "/api/v1/devices/lock-1",
        Some(&viewer),
        None,
        &[("if-none-match", &etag)],
        None,
    )
    .await;
    assert_eq!(changed.status, 200);
    assert_ne!(changed.headers["etag"], etag.as_str());
}

#[tokio::test]
async fn cors_answers_only_the_configured_origins() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let args = config_args(
        tmp.path(),
        "[auth]\ncors_origins = [\"https://fleet.example.com\"]\n",
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start_with(tmp.path(), "127.0.0.1:0", "127.0.0.1:0", &args);
    let preflight = |origin: &'static str| {
        let url = format!("{}/api/v1/devices", server.url());
        async move {
            http()
                .request(reqwest::Method::OPTIONS, url)
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header(
                    "access-control-request-headers",
                    "x-csrf-token, content-type",
                )
                .send()
                .await
                .expect("preflight")
        }
    };
    let ok = preflight("https://fleet.example.com").await;
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://fleet.example.com"
    );
    assert_eq!(ok.headers()["access-control-allow-credentials"], "true");
    let other = preflight("https://evil.example.net").await;
    assert!(other.headers().get("access-control-allow-origin").is_none());
    // A bad origin in the config is refused at start.
    let bad_dir = tmp.path().join("bad");
    std::fs::create_dir_all(&bad_dir).expect("dir");
    let bad = Command::new(BIN)
        .args(["serve", "--data-dir"])
        .arg(&bad_dir)
        .args(config_args(
            &bad_dir,
            "[auth]\ncors_origins = [\"https://x.example.com/\"]\n",
        ))
        .output()
        .expect("run");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("cors_origins"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// One browser round of an OpenID Connect login against `server` (redirects followed by hand):
/// the callback's response.
async fn oidc_round(server: &Server) -> reqwest::Response {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let begin = browser
        .get(format!(
            "{}/api/v1/auth/oidc/login?return_to=/devices",
            server.url()
        ))
        .send()
        .await
        .expect("begin");
    assert_eq!(begin.status(), 302);
    let state_cookie = begin.headers()["set-cookie"]
        .to_str()
        .expect("cookie")
        .split(';')
        .next()
        .expect("pair")
        .to_owned();
    let to_provider = begin.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    let approved = browser.get(to_provider).send().await.expect("authorize");
    let back = approved.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    let query = back.split_once('?').expect("query").1.to_owned();
    browser
        .get(format!(
            "{}/api/v1/auth/oidc/callback?{query}",
            server.url()
        ))
        .header("cookie", state_cookie)
        .send()
        .await
        .expect("callback")
}

#[tokio::test]
async fn an_openid_connect_login_becomes_a_session_and_a_tampered_id_token_is_refused() {
    let provider = oidc_provider::TestProvider::start("mooring", "provider-secret").await;
    provider.set_claims(json!({"email": "olga@example.com", "mooring_role": "fleet-ops", "mooring_scope": "tag:site=berlin"}));
    let tmp = tempfile::tempdir().expect("tempdir");
    let secret = tmp.path().join("oidc.secret");
    std::fs::write(&secret, "provider-secret").expect("secret");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let args = config_args(
        tmp.path(),
        &format!(
            "[oidc]\nissuer = \"{}\"\nclient_id = \"mooring\"\nclient_secret_file = \"{}\"\n\
             redirect_url = \"http://127.0.0.1:9/api/v1/auth/oidc/callback\"\n\
             scope_claim = \"mooring_scope\"\n[oidc.role_map]\n\"fleet-ops\" = \"operator\"\n",
            provider.issuer,
            secret.display()
        ),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start_with(tmp.path(), "127.0.0.1:0", "127.0.0.1:0", &args);

    let done = oidc_round(&server).await;
    assert_eq!(done.status(), 303);
    assert_eq!(done.headers()["location"], "/devices");
    let cookies: Vec<String> = done
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    assert!(
        cookies
            .iter()
            .any(|c| c.starts_with("mooring_session=mrs_")),
        "{cookies:?}"
    );
    let cookie = cookie_header(&cookies);
    let me = call(
        &server,
        "GET",
        "/api/v1/auth/me",
        None,
        Some(&cookie),
        &[],
        None,
    )
    .await;
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.body["name"], "olga@example.com");
    assert_eq!(me.body["role"], "operator");
    assert_eq!(me.body["scope"], "tag:site=berlin");
    let (_, users) = server.api("GET", "/api/v1/users", None).await;
    assert_eq!(users["users"][0]["oidc"], true, "{users}");

    // An existing user is linked by email only when the provider verified the address.
    let pam =
        json!({"email": "pam@example.com", "role": "viewer", "password": "pam's long password"});
    assert_eq!(server.api("POST", "/api/v1/users", Some(pam)).await.0, 201);
    provider.set_claims(json!({"sub": "pam-1", "email": "pam@example.com", "email_verified": null, "mooring_role": "fleet-ops"}));
    let r = oidc_round(&server).await;
    let status = r.status().as_u16();
    let body: Value = r.json().await.expect("json");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("identity_mismatch")),
        "{body}"
    );
    provider.set_claims(json!({"sub": "pam-1", "email": "pam@example.com", "email_verified": true, "mooring_role": "fleet-ops"}));
    assert_eq!(oidc_round(&server).await.status(), 303);

    // A tampered ID token gives no session.
    provider.set_flip_signature(true);
    let refused = oidc_round(&server).await;
    let status = refused.status().as_u16();
    let no_session = !refused.headers().get_all("set-cookie").iter().any(|v| {
        v.to_str()
            .is_ok_and(|c| c.starts_with("mooring_session=mrs_"))
    });
    let body: Value = refused.json().await.expect("json");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("oidc_token_invalid")),
        "{body}"
    );
    assert!(no_session);
    // The logins that reached the accounts service are in the audit log; the tampered one
    // was refused before it.
    let (_, audit) = server
        .api("GET", "/api/v1/audit?action=auth.oidc_login", None)
        .await;
    let outcomes: Vec<u64> = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["status"].as_u64())
        .collect();
    assert_eq!(outcomes, [303, 403, 303], "{audit}");
}
