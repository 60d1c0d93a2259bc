//! The web dashboard's files, served by `mooring serve` at `/` from the binary (and from
//! `--web-dir` for development), with their headers; everything else stays a JSON 404.

mod support;

use support::{get, http, Server};

#[tokio::test(flavor = "multi_thread")]
async fn the_binary_serves_the_dashboard_with_a_strict_policy() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let base = format!("http://{}", server.http);

    let index = get(format!("{base}/")).await;
    assert_eq!(index.status(), 200);
    let h = index.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["referrer-policy"], "no-referrer");
    let csp = h["content-security-policy"].to_str().expect("csp");
    for directive in [
        "default-src 'self'",
        "script-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    let body = index.text().await.expect("body");
    assert!(
        body.contains(r#"<script type="module" src="app/main.js">"#),
        "{body}"
    );
    assert!(!body.contains("<script>"), "no inline script: {body}");

    // A vendored module: JavaScript, cacheable; then revalidated by its ETag.
    let preact = get(format!("{base}/vendor/preact.mjs")).await;
    assert_eq!(preact.status(), 200);
    assert_eq!(
        preact.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    assert!(preact.headers()["cache-control"]
        .to_str()
        .expect("cc")
        .contains("max-age"));
    let etag = preact.headers()["etag"].clone();
    let again = http()
        .get(format!("{base}/vendor/preact.mjs"))
        .header("if-none-match", etag)
        .send()
        .await
        .expect("http");
    assert_eq!(again.status(), 304);
    let main = get(format!("{base}/app/main.js")).await;
    assert_eq!(main.status(), 200);
    assert_eq!(main.headers()["cache-control"], "no-cache");

    // Missing files, paths outside app/ and vendor/, and unknown API routes: JSON 404s.
    for path in [
        "/app/missing.js",
        "/package.json",
        "/node_modules/preact/package.json",
        "/app/../Cargo.toml",
        "/api/v1/nope",
    ] {
        let resp = get(format!("{base}{path}")).await;
        assert_eq!(resp.status(), 404, "{path}");
        let v: serde_json::Value = resp.json().await.expect("json");
        assert!(v["error"]["code"].is_string(), "{path}: {v}");
    }
    // The files are public, but writing to them is not a thing.
    let post = http().post(format!("{base}/")).send().await.expect("http");
    assert_eq!(post.status(), 405);
}

#[tokio::test(flavor = "multi_thread")]
async fn web_dir_serves_the_files_from_disk() {
    let tmp = tempfile::tempdir().expect("tmp");
    let web = tmp.path().join("web");
    std::fs::create_dir_all(web.join("app")).expect("mkdir");
    std::fs::write(web.join("index.html"), "<!doctype html><p>edited</p>").expect("write");
    std::fs::write(web.join("app/x.css"), "p{}").expect("write");
    let server = Server::start_custom(&tmp.path().join("data"), |cmd| {
        cmd.arg("--data-dir")
            .arg(tmp.path().join("data"))
            .args(["--mqtt-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(["--mqtt-dev-addr", "127.0.0.1:0"])
            .env("MOORING_WEB_DIR", &web);
    });
    let base = format!("http://{}", server.http);
    let index = get(format!("{base}/")).await;
    assert_eq!(index.status(), 200);
    assert!(index.headers().contains_key("content-security-policy"));
    assert_eq!(
        index.text().await.expect("body"),
        "<!doctype html><p>edited</p>"
    );
    let css = get(format!("{base}/app/x.css")).await;
    assert_eq!(css.headers()["content-type"], "text/css; charset=utf-8");
    assert_eq!(get(format!("{base}/vendor/preact.mjs")).await.status(), 404);
}

/// Attack: a response that is not a dashboard file (an API answer, a JSON error, a missing
/// file, a refused method) loaded in a frame or sniffed as another type by a browser. Every
/// response says `nosniff` and carries a policy that forbids framing.
#[tokio::test(flavor = "multi_thread")]
async fn every_response_carries_nosniff_and_forbids_framing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let base = format!("http://{}", server.http);
    let mut responses = Vec::new();
    for path in [
        "/",
        "/app/missing.js",
        "/app/%2e%2e/Cargo.toml",
        "/api/v1/nope",
        "/api/v1/devices",
        "/api/v1/jobs",
        "/api/v1/fleet/summary?selector=%3Cscript%3E",
    ] {
        responses.push((path, get(format!("{base}{path}")).await));
    }
    responses.push((
        "POST /",
        http().post(format!("{base}/")).send().await.expect("http"),
    ));
    for (path, resp) in responses {
        let h = resp.headers();
        assert_eq!(
            h.get("x-content-type-options").map(|v| v.as_bytes()),
            Some(&b"nosniff"[..]),
            "{path}: {h:?}"
        );
        let csp = h
            .get("content-security-policy")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {h:?}");
    }
}
