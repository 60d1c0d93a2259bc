//! Webhooks (issue 18): named HTTP endpoints in the config file (`[[webhook]]`) that rules
//! notify (`--then webhook:<name>`). A notification is a job on the work queue (`crate::jobs`,
//! action `webhook`), so it is durable, retried with backoff on any failure (a non-2xx answer,
//! a timeout, a refused connection) and `dead` after `[jobs] attempts_max` tries, in the dead
//! letter list (`GET /api/v1/jobs?state=dead`). A delivery that succeeded is deleted.
//!
//! Each request is `POST <url>` with the JSON body and
//! - `X-Mooring-Delivery`: the job id, the same on every retry (receivers deduplicate by it);
//! - `X-Mooring-Timestamp`: Unix seconds when this try was sent;
//! - `X-Mooring-Signature`: `sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">` under the
//!   webhook's secret (its `secret_file`), so a receiver can check the sender and refuse
//!   replays of old requests.
//!
//! Redirects are not followed; HTTPS trusts the system's roots.

use crate::error::{ErrorKind, ServiceError, ServiceResult};
use anyhow::Context;
use mooring_proto::Clock;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The job action of a webhook notification.
pub const WEBHOOK_ACTION: &str = "webhook";
/// Webhooks a config names at most.
pub const WEBHOOKS_MAX: usize = 64;
/// Unfinished notifications one rule has queued at most; more are dropped and counted
/// (`mooring_webhook_deliveries_total{outcome="dropped"}`), so a broken receiver never grows
/// the queue without bound.
pub const PENDING_PER_RULE_MAX: u64 = 1_000;
/// The longest body a notification carries.
pub const BODY_BYTES_MAX: usize = 64 * 1024;

/// `[[webhook]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// What rules call it (`webhook:<name>`): letters, digits, `.`, `_`, `-` (at most 64).
    pub name: String,
    /// `http://` or `https://`.
    pub url: String,
    /// A file holding the signing secret (its bytes, trailing whitespace dropped); readable
    /// by its owner only (mode 0600 or 0400).
    pub secret_file: PathBuf,
    /// How long one try may take.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    5_000
}

/// Checks `[[webhook]]` entries (the secret files are read at start).
pub fn validate(webhooks: &[WebhookConfig]) -> anyhow::Result<()> {
    anyhow::ensure!(
        webhooks.len() <= WEBHOOKS_MAX,
        "at most {WEBHOOKS_MAX} [[webhook]] entries"
    );
    let mut names = std::collections::BTreeSet::new();
    for w in webhooks {
        anyhow::ensure!(
            is_valid_name(&w.name),
            "[[webhook]] name {:?}: letters, digits, '.', '_', '-' (at most 64)",
            w.name
        );
        anyhow::ensure!(
            names.insert(w.name.as_str()),
            "[[webhook]] name {:?} is used twice",
            w.name
        );
        let url = reqwest::Url::parse(&w.url)
            .with_context(|| format!("[[webhook]] {}: url {:?}", w.name, w.url))?;
        anyhow::ensure!(
            matches!(url.scheme(), "http" | "https") && url.host().is_some(),
            "[[webhook]] {}: url {:?} is not http(s)://host/...",
            w.name,
            w.url
        );
        anyhow::ensure!(
            (100..=60_000).contains(&w.timeout_ms),
            "[[webhook]] {}: timeout_ms must be between 100 and 60000",
            w.name
        );
    }
    Ok(())
}

/// A webhook name as rules and the config write it.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// One notification, as stored with its job.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The webhook's name.
    pub webhook: String,
    /// The JSON body.
    pub body: Value,
}

impl Delivery {
    pub fn params(&self) -> Value {
        serde_json::json!({"webhook": self.webhook, "body": self.body})
    }

    pub fn from_params(v: &Value) -> Result<Self, String> {
        let webhook = v["webhook"].as_str().ok_or("no webhook name")?.to_owned();
        Ok(Delivery {
            webhook,
            body: v["body"].clone(),
        })
    }
}

/// The job action of a rule's `nats:SUBJECT` notification.
pub const NATS_ACTION: &str = "nats";

/// A rule's NATS notification, as stored with its job: `body` published on
/// `<bus prefix>.rules.<subject>` (`crate::cluster::Cluster::publish_for_rules`).
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    pub subject: String,
    pub body: Value,
}

impl Publish {
    pub fn params(&self) -> Value {
        serde_json::json!({"subject": self.subject, "body": self.body})
    }

    pub fn from_params(v: &Value) -> Result<Self, String> {
        let subject = v["subject"].as_str().ok_or("no subject")?.to_owned();
        Ok(Publish {
            subject,
            body: v["body"].clone(),
        })
    }
}

struct Endpoint {
    url: reqwest::Url,
    key: ring::hmac::Key,
    timeout: Duration,
}

/// Deliveries by outcome, for `/metrics`.
#[derive(Default)]
pub struct WebhookCounters {
    pub delivered: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
    /// Rules' NATS notifications published, and tries that failed.
    pub nats_published: AtomicU64,
    pub nats_failed: AtomicU64,
}

/// The configured webhooks and the HTTP client that calls them.
pub struct Webhooks {
    endpoints: BTreeMap<String, Endpoint>,
    http: reqwest::Client,
    clock: Arc<dyn Clock>,
    pub counters: WebhookCounters,
}

impl Webhooks {
    /// Reads every webhook's secret; a missing, empty or group/world-readable file stops the
    /// start with the reason.
    pub fn load(configs: &[WebhookConfig], clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        validate(configs)?;
        let mut endpoints = BTreeMap::new();
        for w in configs {
            let secret = read_secret(&w.secret_file, 16)
                .with_context(|| format!("[[webhook]] {}: secret_file", w.name))?;
            endpoints.insert(
                w.name.clone(),
                Endpoint {
                    url: reqwest::Url::parse(&w.url)?,
                    key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
                    timeout: Duration::from_millis(w.timeout_ms),
                },
            );
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("webhook HTTPS client")?
        .with_root_certificates(crate::oidc::system_roots())
        .with_no_client_auth();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("webhook HTTP client")?;
        Ok(Webhooks {
            endpoints,
            http,
            clock,
            counters: WebhookCounters::default(),
        })
    }

    /// Whether a webhook of this name is configured.
    pub fn has(&self, name: &str) -> bool {
        self.endpoints.contains_key(name)
    }

    /// One try: `Ok` on a 2xx answer, else an error saying what went wrong.
    pub async fn deliver(&self, delivery_id: &str, d: &Delivery) -> ServiceResult<()> {
        let Some(ep) = self.endpoints.get(&d.webhook) else {
            return Err(ServiceError::new(
                ErrorKind::Unavailable,
                "unknown_webhook",
                format!(
                    "webhook {:?} is not in the config ([[webhook]]); it may have been removed",
                    d.webhook
                ),
            ));
        };
        let body = serde_json::to_vec(&d.body)
            .map_err(|e| ServiceError::internal(format!("webhook body: {e}")))?;
        let ts = (self.clock.now_ms() / 1000).to_string();
        let mut signed = Vec::with_capacity(ts.len() + 1 + body.len());
        signed.extend_from_slice(ts.as_bytes());
        signed.push(b'.');
        signed.extend_from_slice(&body);
        let signature = hex::encode(ring::hmac::sign(&ep.key, &signed).as_ref());
        let sent = self
            .http
            .post(ep.url.clone())
            .timeout(ep.timeout)
            .header("content-type", "application/json")
            .header("x-mooring-delivery", delivery_id)
            .header("x-mooring-timestamp", &ts)
            .header("x-mooring-signature", format!("sha256={signature}"))
            .body(body)
            .send()
            .await;
        let failed = |message: String| {
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            Err(ServiceError::new(
                ErrorKind::Unavailable,
                "webhook_failed",
                message,
            ))
        };
        match sent {
            Ok(resp) if resp.status().is_success() => {
                self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(resp) => failed(format!(
                "webhook {} answered HTTP {}",
                d.webhook,
                resp.status()
            )),
            Err(e) if e.is_timeout() => failed(format!(
                "webhook {} did not answer within {} ms",
                d.webhook,
                ep.timeout.as_millis()
            )),
            Err(e) => failed(format!("webhook {}: {e}", d.webhook)),
        }
    }
}

/// The secret in `path`: owner-only, at least `len_min` bytes (trailing whitespace dropped).
pub(crate) fn read_secret(path: &std::path::Path, len_min: usize) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    anyhow::ensure!(
        meta.permissions().mode() & 0o077 == 0,
        "{} is readable by others (mode {:o}); chmod 600 it",
        path.display(),
        meta.permissions().mode() & 0o777
    );
    let mut secret = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    while secret.last().is_some_and(u8::is_ascii_whitespace) {
        secret.pop();
    }
    anyhow::ensure!(
        secret.len() >= len_min,
        "{} holds fewer than {len_min} bytes",
        path.display()
    );
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(name: &str, url: &str) -> WebhookConfig {
        WebhookConfig {
            name: name.to_owned(),
            url: url.to_owned(),
            secret_file: PathBuf::from("/nonexistent"),
            timeout_ms: 5_000,
        }
    }

    #[test]
    fn webhook_entries_are_checked() {
        assert!(validate(&[hook("ops", "https://hooks.example.com/x")]).is_ok());
        for bad in [
            vec![hook("a b", "http://h/")],
            vec![hook("ops", "ftp://h/")],
            vec![hook("ops", "not a url")],
            vec![hook("ops", "http://h/"), hook("ops", "http://g/")],
        ] {
            assert!(validate(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn deliveries_round_trip_through_storage() {
        let d = Delivery {
            webhook: "ops".into(),
            body: serde_json::json!({"rule": "hot"}),
        };
        assert_eq!(Delivery::from_params(&d.params()), Ok(d));
        assert!(Delivery::from_params(&serde_json::json!({})).is_err());
    }
}
