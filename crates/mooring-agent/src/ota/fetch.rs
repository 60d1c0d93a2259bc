//! Artifact downloads over HTTPS (reqwest + rustls/ring, trusting only the fleet roots): `GET` with `Authorization: Bearer` and `Range: bytes=N-`, streamed in chunks.

use super::update::{Body, FetchError};
use mooring_proto::ota::Link;
use std::time::Duration;

/// Connect timeout of a download.
pub const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// Longest wait for the next chunk before the attempt counts as a link loss.
pub const CHUNK_TIMEOUT_MS: u64 = 30_000;

/// An HTTP client for downloads. `tls`: the TLS config (the fleet roots); `None` trusts no
/// server at all (HTTPS fails; plain HTTP, for tests, works).
pub fn client(tls: Option<rustls::ClientConfig>) -> anyhow::Result<reqwest::Client> {
    let tls = match tls {
        Some(tls) => tls,
        None => rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth(),
    };
    Ok(reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
        .redirect(reqwest::redirect::Policy::none())
        .use_preconfigured_tls(tls)
        .build()?)
}

/// TLS trusting only the CA certificates in `roots_path` (the agent's fleet roots).
pub fn fleet_tls(roots_path: &std::path::Path) -> anyhow::Result<rustls::ClientConfig> {
    let cfg = crate::transport::server_auth_tls(roots_path)?;
    Ok((*cfg).clone())
}

struct HttpBody {
    resp: reqwest::Response,
    total: Option<u64>,
}

#[async_trait::async_trait]
impl Body for HttpBody {
    fn total(&self) -> Option<u64> {
        self.total
    }
    async fn chunk(&mut self) -> Result<Option<Vec<u8>>, FetchError> {
        match tokio::time::timeout(Duration::from_millis(CHUNK_TIMEOUT_MS), self.resp.chunk()).await
        {
            Err(_) => Err(FetchError::Transient("no data for 30 s".into())),
            Ok(Err(e)) => Err(FetchError::Transient(format!("{e}"))),
            Ok(Ok(c)) => Ok(c.map(|b| b.to_vec())),
        }
    }
}

/// Opens `link` from byte `offset` (module doc). Statuses: 200/206 → the body; 401/403 →
/// [`FetchError::Expired`]; 416 → [`FetchError::RangeNotSatisfiable`]; 429 and 503 (the server
/// serves as many downloads as it may) → [`FetchError::Busy`]; other 5xx and network errors →
/// [`FetchError::Transient`]; anything else → [`FetchError::Fatal`].
pub async fn open(
    http: &reqwest::Client,
    link: &Link,
    offset: u64,
) -> Result<Box<dyn Body>, FetchError> {
    let mut req = http.get(&link.url).bearer_auth(&link.token);
    if offset > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
    }
    let resp = req
        .send()
        .await
        .map_err(|e| FetchError::Transient(format!("{}: {e}", link.url)))?;
    let status = resp.status();
    let header = |name| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let total = answer(
        status.as_u16(),
        header(reqwest::header::CONTENT_RANGE).as_deref(),
        resp.content_length(),
        offset,
        &link.url,
    )?;
    Ok(Box::new(HttpBody { resp, total }))
}

/// What a download's response means for an attempt from byte `offset` (the statuses in
/// [`open`]'s doc): `Ok(total size)` when its body is the artifact from `offset` on. Shared
/// with downloads that do not go through reqwest (the simulator's).
pub fn answer(
    status: u16,
    content_range: Option<&str>,
    content_length: Option<u64>,
    offset: u64,
    url: &str,
) -> Result<Option<u64>, FetchError> {
    match status {
        200 => {
            if offset > 0 {
                // The server ignored the Range: we cannot append its bytes.
                return Err(FetchError::RangeNotSatisfiable);
            }
            Ok(content_length)
        }
        206 => {
            // Content-Range: bytes START-END/TOTAL
            let parsed = content_range
                .unwrap_or_default()
                .strip_prefix("bytes ")
                .and_then(|r| r.split_once('/'))
                .and_then(|(span, total)| {
                    let start = span.split_once('-')?.0.parse::<u64>().ok()?;
                    Some((start, total.parse::<u64>().ok()))
                });
            match parsed {
                Some((start, total)) if start == offset => Ok(total),
                _ => Err(FetchError::RangeNotSatisfiable),
            }
        }
        401 | 403 => Err(FetchError::Expired(format!("{status} from {url}"))),
        416 => Err(FetchError::RangeNotSatisfiable),
        429 | 503 => Err(FetchError::Busy(format!("{status} from {url}"))),
        500..=599 => Err(FetchError::Transient(format!("{status} from {url}"))),
        _ => Err(FetchError::Fatal(format!("{status} from {url}"))),
    }
}
