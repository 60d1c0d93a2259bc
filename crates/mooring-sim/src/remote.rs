//! Remote mode: the fleet against a running `mooring` server, in real time, over MQTT/TLS with
//! one real client certificate per device, driven and measured through the HTTP API.
//!
//! Every device of a run gets the id `<run>-<id>` and the tag `sim_run=<run>`, and every
//! selector is narrowed with `and tag:sim_run=<run>`, so runs never touch each other's (or
//! real) devices. What in-process mode reads from the store, this reads from the API.

use anyhow::Context as _;
use mooring_agent::transport::TlsConnector;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Telemetry points read per device at the end (the API's page limit).
pub const TELEMETRY_PAGE_LEN_MAX: usize = 10_000;
/// Commands read per device at the end (the API's page limit).
pub const COMMAND_PAGE_LEN_MAX: usize = 1_000;
/// Bound on every HTTP call.
pub const HTTP_TIMEOUT_SECS: u64 = 60;

/// The server's HTTP API with an admin token.
pub struct RemoteApi {
    http: reqwest::Client,
    base: String,
    token: String,
    mqtt_host: String,
    mqtt_port: u16,
    /// Prefix of this run's device ids and value of its `sim_run` tag.
    pub run: String,
}

/// A command as the API shows it (the fields the report needs).
pub struct RemoteCommand {
    pub state: String,
    pub parent_id: Option<String>,
    pub failed_reason: Option<String>,
    /// (state, unix ms), oldest first.
    pub history: Vec<(String, u64)>,
}

impl RemoteApi {
    pub fn new(mqtt: &str, api: &str, token_file: &str, run: String) -> anyhow::Result<Self> {
        let token = std::fs::read_to_string(token_file)
            .with_context(|| format!("reading the token file {token_file}"))?
            .trim()
            .to_owned();
        let (host, port) = mqtt
            .rsplit_once(':')
            .with_context(|| format!("server.mqtt {mqtt:?} must be host:port"))?;
        let port: u16 = port
            .parse()
            .with_context(|| format!("server.mqtt {mqtt:?}: bad port"))?;
        // reqwest is built without a default crypto provider; ring is the one we use.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(HTTP_TIMEOUT_SECS))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            base: format!("{}/api/v1", api.trim_end_matches('/')),
            token,
            mqtt_host: host.trim_matches(['[', ']']).to_owned(),
            mqtt_port: port,
            run,
        })
    }

    /// This run's name for a scenario device id.
    pub fn device_id(&self, id: &str) -> String {
        format!("{}-{id}", self.run)
    }

    /// A scenario selector narrowed to this run's devices (ids are mapped too).
    pub fn selector(&self, selector: &str) -> String {
        let terms: Vec<String> = selector
            .split(" and ")
            .map(|t| {
                let t = t.trim();
                let ids = t.strip_prefix("id:").unwrap_or(t);
                let is_ids =
                    t.starts_with("id:") || !(t.contains(':') || t.contains('=') || t == "online");
                if is_ids {
                    let mapped: Vec<String> =
                        ids.split(',').map(|i| self.device_id(i.trim())).collect();
                    format!("id:{}", mapped.join(","))
                } else {
                    t.to_owned()
                }
            })
            .collect();
        format!("{} and tag:sim_run={}", terms.join(" and "), self.run)
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        anyhow::ensure!(status.is_success(), "{method} {url}: {status}: {text}");
        Ok(if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
        })
    }

    /// Registers a device (with the `sim_run` tag) and builds its mTLS connector from the
    /// credentials the server issued; the PEM files go to `dir`.
    pub async fn register(
        &self,
        id: &str,
        tags: &BTreeMap<String, String>,
        dir: &Path,
    ) -> anyhow::Result<TlsConnector> {
        let mut tags = tags.clone();
        tags.insert("sim_run".into(), self.run.clone());
        let created = self
            .call(
                reqwest::Method::POST,
                "/devices",
                Some(json!({"id": id, "tags": tags})),
            )
            .await?;
        let pem = |k: &str| -> anyhow::Result<String> {
            Ok(created[k]
                .as_str()
                .with_context(|| format!("device creation answered without {k}"))?
                .to_owned())
        };
        let (cert, key, ca) = (
            dir.join(format!("{id}.crt")),
            dir.join(format!("{id}.key")),
            dir.join("ca.crt"),
        );
        std::fs::write(&cert, pem("certificate_pem")?)?;
        std::fs::write(&key, pem("private_key_pem")?)?;
        std::fs::write(&ca, pem("ca_pem")?)?;
        let identity = mooring_agent::transport::load_identity(&cert, &key, &ca)?;
        Ok(TlsConnector {
            host: self.mqtt_host.clone(),
            port: self.mqtt_port,
            tls: identity.tls,
        })
    }

    /// `POST /commands`: (fleet command id, devices).
    pub async fn fleet_command(
        &self,
        selector: &str,
        name: &str,
        params: Value,
        ttl_secs: Option<u64>,
    ) -> anyhow::Result<(String, u64)> {
        let mut body = json!({"selector": self.selector(selector), "name": name, "params": params});
        if let Some(t) = ttl_secs {
            body["ttl_secs"] = json!(t);
        }
        let v = self
            .call(reqwest::Method::POST, "/commands", Some(body))
            .await?;
        Ok((
            v["id"]
                .as_str()
                .context("fleet command without id")?
                .to_owned(),
            v["total"].as_u64().unwrap_or(0),
        ))
    }

    pub async fn delete_device(&self, id: &str) -> anyhow::Result<()> {
        self.call(reqwest::Method::DELETE, &format!("/devices/{id}"), None)
            .await?;
        Ok(())
    }

    pub async fn is_online(&self, id: &str) -> anyhow::Result<bool> {
        let v = self
            .call(reqwest::Method::GET, &format!("/devices/{id}"), None)
            .await;
        Ok(v.ok().and_then(|v| v["online"].as_bool()).unwrap_or(false))
    }

    /// The server's `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        let url = format!("{}/metrics", self.base.trim_end_matches("/api/v1"));
        let text = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?
            .text()
            .await?;
        Ok(crate::run::parse_metrics(&text))
    }

    /// The `sim.n` values stored for a device.
    pub async fn telemetry_values(&self, id: &str, limit: usize) -> anyhow::Result<Vec<u32>> {
        let limit = limit.clamp(1, TELEMETRY_PAGE_LEN_MAX);
        let v = self
            .call(
                reqwest::Method::GET,
                &format!(
                    "/devices/{id}/telemetry?metric={}&limit={limit}",
                    crate::scenario::SEQ_METRIC
                ),
                None,
            )
            .await?;
        Ok(v["points"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| p["value"].as_f64())
                    .map(|n| n as u32)
                    .collect()
            })
            .unwrap_or_default())
    }

    pub async fn commands(&self, id: &str) -> anyhow::Result<Vec<RemoteCommand>> {
        let v = self
            .call(
                reqwest::Method::GET,
                &format!("/devices/{id}/commands?limit={COMMAND_PAGE_LEN_MAX}"),
                None,
            )
            .await?;
        Ok(v["commands"]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .map(|c| RemoteCommand {
                        state: c["state"].as_str().unwrap_or("").to_owned(),
                        parent_id: c["parent_id"].as_str().map(str::to_owned),
                        failed_reason: c["result"]["output"]["reason"].as_str().map(str::to_owned),
                        history: c["history"]
                            .as_array()
                            .map(|h| {
                                h.iter()
                                    .map(|e| {
                                        (
                                            e["state"].as_str().unwrap_or("").to_owned(),
                                            e["at"].as_u64().unwrap_or(0),
                                        )
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_are_narrowed_to_the_run() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let token = dir.path().join("t");
        std::fs::write(&token, "x")?;
        let api = RemoteApi::new(
            "localhost:8883",
            "http://127.0.0.1:8080",
            &token.to_string_lossy(),
            "r1".into(),
        )?;
        assert_eq!(
            api.selector("tag:hw=rev-b"),
            "tag:hw=rev-b and tag:sim_run=r1"
        );
        assert_eq!(
            api.selector("d-1,d-2 and online"),
            "id:r1-d-1,r1-d-2 and online and tag:sim_run=r1"
        );
        assert_eq!(api.selector("id:online"), "id:r1-online and tag:sim_run=r1");
        Ok(())
    }
}
