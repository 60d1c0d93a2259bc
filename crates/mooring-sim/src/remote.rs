//! Remote mode: the fleet against a running `mooring` server, in real time, over MQTT/TLS with
//! one real client certificate per device, driven and measured through the HTTP API.
//!
//! Every device of a run gets the id `<run>-<id>` and the tag `sim_run=<run>`, and every
//! selector is narrowed with `and tag:sim_run=<run>`, so runs never touch each other's (or
//! real) devices. What in-process mode reads from the store, this reads from the API.

use anyhow::Context as _;
use mooring_agent::transport::TlsConnector;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Telemetry points read per device at the end (the API's page limit).
pub const TELEMETRY_PAGE_LEN_MAX: usize = mooring_api::TELEMETRY_PAGE_LEN_MAX;
/// Commands read per device at the end (the API's page limit).
pub const COMMAND_PAGE_LEN_MAX: usize = mooring_api::COMMAND_PAGE_LEN_MAX;
/// Bound on every HTTP call.
pub const HTTP_TIMEOUT_SECS: u64 = 60;

/// The server's HTTP API with an admin token.
pub struct RemoteApi {
    api: mooring_api::Client,
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
            .with_context(|| format!("reading the token file {token_file}"))?;
        let (host, port) = mqtt
            .rsplit_once(':')
            .with_context(|| format!("server.mqtt {mqtt:?} must be host:port"))?;
        let port: u16 = port
            .parse()
            .with_context(|| format!("server.mqtt {mqtt:?}: bad port"))?;
        let api = mooring_api::Client::builder(api, &token)
            .timeout(std::time::Duration::from_secs(HTTP_TIMEOUT_SECS))
            .build()
            .context("server.api")?;
        Ok(Self {
            api,
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
        let req = mooring_api::CreateDevice {
            id: id.to_owned(),
            tags,
            csr_pem: None,
        };
        let created = self
            .api
            .create_device(&req)
            .await
            .with_context(|| format!("registering {id}"))?;
        let (cert, key, ca) = (
            dir.join(format!("{id}.crt")),
            dir.join(format!("{id}.key")),
            dir.join("ca.crt"),
        );
        std::fs::write(&cert, &created.certificate_pem)?;
        let key_pem = created
            .private_key_pem
            .as_deref()
            .context("the server returned no private key")?;
        std::fs::write(&key, key_pem)?;
        std::fs::write(&ca, &created.ca_pem)?;
        let identity = mooring_agent::transport::load_identity(&cert, &key.as_path().into(), &ca)?;
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
        let req = mooring_api::CreateFleetCommand {
            selector: self.selector(selector),
            name: name.to_owned(),
            params,
            ttl_secs,
            ..Default::default()
        };
        let f = self.api.create_fleet_command(&req).await?;
        Ok((f.id, f.total))
    }

    pub async fn delete_device(&self, id: &str) -> anyhow::Result<()> {
        Ok(self.api.delete_device(id).await?)
    }

    pub async fn is_online(&self, id: &str) -> anyhow::Result<bool> {
        Ok(self.api.get_device(id).await.is_ok_and(|d| d.online))
    }

    /// The server's `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        Ok(crate::run::parse_metrics(&self.api.metrics().await?))
    }

    /// The `sim.n` values stored for a device.
    pub async fn telemetry_values(&self, id: &str, limit: usize) -> anyhow::Result<Vec<u32>> {
        let params = mooring_api::TelemetryParams {
            metric: Some(crate::scenario::SEQ_METRIC.to_owned()),
            limit: Some(limit.clamp(1, TELEMETRY_PAGE_LEN_MAX)),
            ..Default::default()
        };
        let points = self.api.telemetry(id, &params).await?.points;
        Ok(points
            .iter()
            .filter_map(|p| p.value.as_f64())
            .map(|n| n as u32)
            .collect())
    }

    pub async fn commands(&self, id: &str) -> anyhow::Result<Vec<RemoteCommand>> {
        let params = mooring_api::CommandListParams {
            limit: Some(COMMAND_PAGE_LEN_MAX),
            ..Default::default()
        };
        let page = self.api.list_commands(id, &params).await?;
        Ok(page
            .commands
            .into_iter()
            .map(|c| RemoteCommand {
                failed_reason: c.failure_reason().map(str::to_owned),
                state: c.state,
                parent_id: c.parent_id,
                history: c.history.into_iter().map(|h| (h.state, h.at)).collect(),
            })
            .collect())
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
