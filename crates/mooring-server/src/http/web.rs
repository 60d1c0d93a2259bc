//! The dashboard's files (`web/`: `index.html`, `app/`, `vendor/`), embedded in the binary and
//! served at `/` to anyone (they hold no data: everything behind them is the API, which checks
//! the caller). Paths under `/api` never reach here. `[http] web_dir` (`MOORING_WEB_DIR`,
//! `--web-dir`) serves the same paths from a directory on disk instead, for editing the
//! dashboard without rebuilding (docs/development.md).

use super::ApiError;
use crate::app::App;
use crate::error::ServiceError;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use std::borrow::Cow;
use std::sync::Arc;

/// The embedded files. `include`s keep `web/node_modules`, `package.json` and the scripts out.
#[derive(rust_embed::Embed)]
#[folder = "../../web/"]
#[include = "index.html"]
#[include = "app/**/*"]
#[include = "vendor/*"]
struct Files;

/// The Content-Security-Policy of every file: only this origin's scripts (no inline script, no
/// eval), styles from files, API calls and event streams to this origin only, never framed.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; font-src 'self'; connect-src 'self'; \
     object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Longest file served from `web_dir` (the embedded ones are what the build put in).
const WEB_DIR_FILE_BYTES_MAX: u64 = 8 * 1024 * 1024;

/// The router's fallback: a dashboard file, or the API's JSON 404 for anything else.
pub(super) async fn fallback(State(app): State<Arc<App>>, req: Request) -> Response {
    let path = req.uri().path();
    if path == "/api" || path.starts_with("/api/") {
        return super::not_found().await.into_response();
    }
    let Some(rel) = servable(path) else {
        return super::not_found().await.into_response();
    };
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        let mut resp = super::method_not_allowed().await;
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    // The embedded files' SHA-256 is computed when the binary is built; a file from
    // `web_dir` is hashed as it is read.
    let file = match &app.config().http.web_dir {
        Some(dir) => read_from_dir(&dir.join(rel)).await.map(|bytes| {
            use sha2::Digest;
            let sha256: [u8; 32] = sha2::Sha256::digest(&bytes).into();
            (Cow::Owned(bytes), sha256)
        }),
        None => Files::get(rel).map(|f| (f.data, f.metadata.sha256_hash())),
    };
    let Some((bytes, sha256)) = file else {
        return ApiError(ServiceError::not_found("file_not_found", "no such file")).into_response();
    };
    respond(rel, &bytes, &sha256, req.headers(), head)
}

/// The file path (relative to `web/`) a request path names, if it is one that may be served:
/// `/` is `index.html`; else `app/...` or `vendor/...` made only of plain names (so no `..`,
/// no hidden files, no percent-escapes).
fn servable(path: &str) -> Option<&str> {
    if path == "/" || path == "/index.html" {
        return Some("index.html");
    }
    let rel = path.strip_prefix('/')?;
    let (top, rest) = rel.split_once('/')?;
    if top != "app" && top != "vendor" {
        return None;
    }
    let plain = |seg: &str| {
        !seg.is_empty()
            && !seg.starts_with('.')
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    rest.split('/').all(plain).then_some(rel)
}

async fn read_from_dir(path: &std::path::Path) -> Option<Vec<u8>> {
    let meta = tokio::fs::metadata(path).await.ok()?;
    if !meta.is_file() || meta.len() > WEB_DIR_FILE_BYTES_MAX {
        return None;
    }
    tokio::fs::read(path).await.ok()
}

fn content_type(rel: &str) -> &'static str {
    let ext = rel.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    match ext {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        // LICENSE-*, VERSIONS, *.txt
        _ => "text/plain; charset=utf-8",
    }
}

fn respond(
    rel: &str,
    bytes: &[u8],
    sha256: &[u8; 32],
    request: &HeaderMap,
    head: bool,
) -> Response {
    let etag = HeaderValue::from_str(&format!("\"{}\"", hex::encode(&sha256[..16])))
        .unwrap_or_else(|_| HeaderValue::from_static("\"\""));
    // The page and the app's own modules are checked on every load (a new binary takes effect
    // at once); the vendored libraries change only with their pinned versions.
    let cache = if rel.starts_with("vendor/") {
        "public, max-age=86400"
    } else {
        "no-cache"
    };
    let not_modified = super::matches_etag(request.get(header::IF_NONE_MATCH), &etag);
    let mut resp = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else if head {
        let mut r = StatusCode::OK.into_response();
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        r
    } else {
        (StatusCode::OK, bytes.to_vec()).into_response()
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(rel)),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(header::ETAG, etag);
    // nosniff is set on every response by the router's `security_headers`.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_paths_under_app_and_vendor_are_servable() {
        assert_eq!(servable("/"), Some("index.html"));
        assert_eq!(servable("/app/main.js"), Some("app/main.js"));
        assert_eq!(servable("/vendor/preact.mjs"), Some("vendor/preact.mjs"));
        for bad in [
            "/app/../Cargo.toml",
            "/app/.hidden",
            "/app//x.js",
            "/app/%2e%2e/x",
            "/node_modules/preact/package.json",
            "/package.json",
            "/app",
            "/vendor/",
        ] {
            assert_eq!(servable(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_embedded_files_include_the_page_and_the_libraries_but_not_node_modules() {
        assert!(Files::get("index.html").is_some());
        assert!(Files::get("vendor/preact.mjs").is_some());
        assert!(Files::iter().all(|p| !p.starts_with("node_modules")));
    }
}
