//! A typed client for `/api/v1` (feature `client`): one method per call, the crate's types in
//! and out, every failure an [`Error`] that says what the server answered.

use crate::{
    AnyCommand, AuditList, AuditParams, Claim, ClaimList, Command, CommandList, CommandListParams,
    CreateClaim, CreateCommand, CreateDevice, CreateFleetCommand, CreateJob, CreateReport,
    CreateToken, CreateUser, CreatedClaim, CreatedDevice, CreatedToken, CreatedUser, Device,
    DeviceList, EnrollRequest, EnrollResponse, ErrorBody, Event, EventsParams, FleetCommand, Job,
    JobList, JobListParams, LatestMetrics, ListDevicesParams, Me, PageParams, PasswordLink, Shadow,
    ShadowPatch, StreamItem, TelemetryParams, TelemetryPoints, TokenList, UpdateUser, User,
    UserList, WaitParams,
};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// Longest error or unexpected body kept in an [`Error`], in bytes.
const ERROR_TEXT_BYTES_MAX: usize = 2048;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error status and its JSON error body.
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// The server answered with an error status but no error body (a proxy, say).
    #[error("HTTP {status} from {url}: {text}")]
    Status {
        status: u16,
        url: String,
        text: String,
    },
    /// The server could not be reached, or the exchange broke off.
    #[error("cannot reach the Mooring server at {base}: {source}")]
    Transport {
        base: String,
        #[source]
        source: reqwest::Error,
    },
    /// A success status with a body that is not what the call returns.
    #[error("unexpected answer from {url}: {source}")]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    /// The client could not be built (a CA file, a URL).
    #[error("{0}")]
    Config(String),
    /// An event stream went silent or broke off (resume it with its last event id).
    #[error("{0}")]
    Stream(String),
}

impl Error {
    /// The HTTP status the server answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } | Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The stable error code of an [`Error::Api`] (`device_not_found`, ...).
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Builds a [`Client`].
pub struct ClientBuilder {
    base: String,
    token: String,
    timeout: Duration,
    roots: rustls::RootCertStore,
}

impl ClientBuilder {
    /// Bound on every call, from connect to the last byte (default 30 s); a call that asks the
    /// server to wait (`wait_ms`) gets the wait on top.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Trust the CA certificates in this PEM file for an `https://` server (e.g. the fleet CA,
    /// `<data-dir>/ca.crt`). Without it, no `https://` server is trusted.
    pub fn ca_file(mut self, path: &Path) -> Result<Self> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::CertificateDer;
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
            Error::Config(format!("reading CA certificate {}: {e}", path.display()))
        })?;
        for cert in certs {
            let cert = cert.map_err(|e| {
                Error::Config(format!("reading CA certificate {}: {e}", path.display()))
            })?;
            roots
                .add(cert)
                .map_err(|e| Error::Config(format!("CA certificate {}: {e}", path.display())))?;
        }
        self.roots = roots;
        Ok(self)
    }

    pub fn build(self) -> Result<Client> {
        let base = Url::parse(self.base.trim_end_matches('/'))
            .map_err(|e| Error::Config(format!("server URL {:?}: {e}", self.base)))?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            return Err(Error::Config(format!(
                "server URL {:?} must be http://host:port or https://host:port",
                self.base
            )));
        }
        // Our one crypto provider (ring), given explicitly: reqwest is built without a default.
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS: {e}")))?
            .with_root_certificates(self.roots)
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .timeout(self.timeout)
            .use_preconfigured_tls(tls)
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        Ok(Client {
            base,
            token: self.token,
            timeout: self.timeout,
            http,
        })
    }
}

/// An authenticated connection to one server's API; cheap to clone.
#[derive(Clone)]
pub struct Client {
    base: Url,
    token: String,
    timeout: Duration,
    http: reqwest::Client,
}

impl Client {
    /// `base` is the server's URL (`http://127.0.0.1:8080`), `token` an API token.
    pub fn builder(base: &str, token: &str) -> ClientBuilder {
        ClientBuilder {
            base: base.to_owned(),
            token: token.trim().to_owned(),
            timeout: Duration::from_secs(30),
            roots: rustls::RootCertStore::empty(),
        }
    }

    /// The server's URL as given.
    pub fn base(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    /// `base` + the path segments (each percent-encoded) + a query. `.` and `..` are refused:
    /// `url` would drop them, and the call would go to another resource.
    fn url(&self, segments: &[&str], query: Option<&impl Serialize>) -> Result<Url> {
        if let Some(s) = segments.iter().find(|s| matches!(**s, "." | "..")) {
            return Err(Error::Config(format!("{s:?} is not a valid id")));
        }
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| Error::Config(format!("server URL {} cannot take a path", self.base)))?
            .pop_if_empty()
            .extend(segments);
        if let Some(q) = query {
            let text =
                serde_urlencoded::to_string(q).map_err(|e| Error::Config(format!("query: {e}")))?;
            if !text.is_empty() {
                url.set_query(Some(&text));
            }
        }
        Ok(url)
    }

    /// One call; the 2xx status and the body's text. `wait_ms`: how long the server may hold
    /// the answer back (added to the timeout, or a wait that ends undecided becomes an error).
    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<&impl Serialize>,
        headers: &[(&str, String)],
        wait_ms: Option<u64>,
    ) -> Result<(StatusCode, String)> {
        let mut req = self
            .http
            .request(method, url.clone())
            .bearer_auth(&self.token);
        if let Some(w) = wait_ms {
            req = req.timeout(self.timeout.saturating_add(Duration::from_millis(w)));
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        self.answer(req, url).await
    }

    /// Sends a built request: the 2xx status and the body's text, or the error it answered.
    async fn answer(&self, req: reqwest::RequestBuilder, url: Url) -> Result<(StatusCode, String)> {
        let transport = |source| Error::Transport {
            base: self.base().to_owned(),
            source,
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let text = resp.text().await.map_err(transport)?;
        if status.is_success() {
            return Ok((status, text));
        }
        Err(api_error(status, text, &url))
    }

    /// A GET whose body is read as it comes, with no total deadline (the caller bounds the
    /// silences between its chunks): the response once it answered 2xx within the timeout.
    async fn open_stream(&self, url: Url, headers: &[(&str, &str)]) -> Result<reqwest::Response> {
        let mut req = self
            .http
            .get(url.clone())
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(365 * 24 * 3600));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let transport = |source| Error::Transport {
            base: self.base().to_owned(),
            source,
        };
        let resp = tokio::time::timeout(self.timeout, req.send())
            .await
            .map_err(|_| Error::Stream(format!("no answer from {url} in {:?}", self.timeout)))?
            .map_err(transport)?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.map_err(transport)?;
            return Err(api_error(status, text, &url));
        }
        Ok(resp)
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<&impl Serialize>,
        wait_ms: Option<u64>,
    ) -> Result<(StatusCode, T)> {
        let (status, text) = self.send(method, url.clone(), body, &[], wait_ms).await?;
        let value = serde_json::from_str(&text).map_err(|source| Error::Decode {
            url: url.to_string(),
            source,
        })?;
        Ok((status, value))
    }

    async fn get<T: DeserializeOwned>(&self, url: Url) -> Result<T> {
        Ok(self.json(Method::GET, url, None::<&()>, None).await?.1)
    }

    /// `POST /api/v1/devices`: registers a device; the answer carries its private key (only
    /// this once).
    pub async fn create_device(&self, req: &CreateDevice) -> Result<CreatedDevice> {
        let url = self.url(&["api", "v1", "devices"], None::<&()>)?;
        Ok(self.json(Method::POST, url, Some(req), None).await?.1)
    }

    /// `GET /api/v1/devices`: one page.
    pub async fn list_devices(&self, params: &ListDevicesParams) -> Result<DeviceList> {
        self.get(self.url(&["api", "v1", "devices"], Some(params))?)
            .await
    }

    /// Every device (matching `selector`), following `next_cursor` page by page.
    pub async fn list_all_devices(&self, selector: Option<&str>) -> Result<Vec<Device>> {
        let mut params = ListDevicesParams {
            limit: Some(crate::DEVICE_PAGE_LEN_MAX),
            cursor: None,
            selector: selector.map(str::to_owned),
        };
        let mut all = Vec::new();
        loop {
            let page = self.list_devices(&params).await?;
            all.extend(page.devices);
            match page.next_cursor {
                Some(c) => params.cursor = Some(c),
                None => return Ok(all),
            }
        }
    }

    /// `GET /api/v1/fleet/summary`.
    pub async fn fleet_summary(
        &self,
        params: &crate::FleetSummaryParams,
    ) -> Result<crate::FleetSummary> {
        self.get(self.url(&["api", "v1", "fleet", "summary"], Some(params))?)
            .await
    }

    /// `POST /api/v1/rules`.
    pub async fn create_rule(&self, req: &crate::CreateRule) -> Result<crate::Rule> {
        let url = self.url(&["api", "v1", "rules"], None::<&()>)?;
        Ok(self.json(Method::POST, url, Some(req), None).await?.1)
    }

    /// `GET /api/v1/rules`.
    pub async fn list_rules(&self) -> Result<crate::RuleList> {
        self.get(self.url(&["api", "v1", "rules"], None::<&()>)?)
            .await
    }

    /// `GET /api/v1/rules/{id}`.
    pub async fn get_rule(&self, id: &str) -> Result<crate::Rule> {
        self.get(self.url(&["api", "v1", "rules", id], None::<&()>)?)
            .await
    }

    /// `PATCH /api/v1/rules/{id}`.
    pub async fn update_rule(&self, id: &str, req: &crate::UpdateRule) -> Result<crate::Rule> {
        let url = self.url(&["api", "v1", "rules", id], None::<&()>)?;
        Ok(self.json(Method::PATCH, url, Some(req), None).await?.1)
    }

    /// `DELETE /api/v1/rules/{id}`.
    pub async fn delete_rule(&self, id: &str) -> Result<()> {
        let url = self.url(&["api", "v1", "rules", id], None::<&()>)?;
        self.send(Method::DELETE, url, None::<&()>, &[], None)
            .await?;
        Ok(())
    }

    /// `GET /api/v1/alerts` (one page).
    pub async fn list_alerts(&self, params: &crate::AlertListParams) -> Result<crate::AlertList> {
        self.get(self.url(&["api", "v1", "alerts"], Some(params))?)
            .await
    }

    /// `GET /api/v1/alerts/{id}`.
    pub async fn get_alert(&self, id: &str) -> Result<crate::Alert> {
        self.get(self.url(&["api", "v1", "alerts", id], None::<&()>)?)
            .await
    }

    /// `POST /api/v1/alerts/{id}/acknowledge`.
    pub async fn acknowledge_alert(&self, id: &str) -> Result<crate::Alert> {
        let url = self.url(&["api", "v1", "alerts", id, "acknowledge"], None::<&()>)?;
        Ok(self.json(Method::POST, url, None::<&()>, None).await?.1)
    }

    /// `GET /api/v1/tickets`.
    pub async fn list_tickets(
        &self,
        params: &crate::TicketListParams,
    ) -> Result<crate::TicketList> {
        self.get(self.url(&["api", "v1", "tickets"], Some(params))?)
            .await
    }

    /// `GET /api/v1/tickets/{id}`.
    pub async fn get_ticket(&self, id: &str) -> Result<crate::Ticket> {
        self.get(self.url(&["api", "v1", "tickets", id], None::<&()>)?)
            .await
    }

    /// `POST /api/v1/tickets/{id}/close`.
    pub async fn close_ticket(&self, id: &str) -> Result<crate::Ticket> {
        let url = self.url(&["api", "v1", "tickets", id, "close"], None::<&()>)?;
        Ok(self.json(Method::POST, url, None::<&()>, None).await?.1)
    }

    /// `POST /api/v1/alerts/{id}/resolve`.
    pub async fn resolve_alert(&self, id: &str) -> Result<crate::Alert> {
        let url = self.url(&["api", "v1", "alerts", id, "resolve"], None::<&()>)?;
        Ok(self.json(Method::POST, url, None::<&()>, None).await?.1)
    }

    /// `GET /api/v1/devices/{id}/health`.
    pub async fn device_health(&self, id: &str) -> Result<crate::DeviceHealth> {
        self.get(self.url(&["api", "v1", "devices", id, "health"], None::<&()>)?)
            .await
    }

    /// `GET /api/v1/health`.
    pub async fn health_summary(
        &self,
        params: &crate::HealthParams,
    ) -> Result<crate::HealthSummary> {
        self.get(self.url(&["api", "v1", "health"], Some(params))?)
            .await
    }

    /// `GET /api/v1/fleet/history`.
    pub async fn fleet_history(
        &self,
        params: &crate::FleetHistoryParams,
    ) -> Result<crate::FleetHistory> {
        self.get(self.url(&["api", "v1", "fleet", "history"], Some(params))?)
            .await
    }

    /// `GET /api/v1/devices/{id}`.
    pub async fn get_device(&self, id: &str) -> Result<Device> {
        self.get(self.url(&["api", "v1", "devices", id], None::<&()>)?)
            .await
    }

    /// `DELETE /api/v1/devices/{id}`.
    pub async fn delete_device(&self, id: &str) -> Result<()> {
        let url = self.url(&["api", "v1", "devices", id], None::<&()>)?;
        self.send(Method::DELETE, url, None::<&()>, &[], None)
            .await?;
        Ok(())
    }

    /// `PUT /api/v1/devices/{id}/tags`: replaces all tags.
    pub async fn set_tags(&self, id: &str, tags: &BTreeMap<String, String>) -> Result<Device> {
        let url = self.url(&["api", "v1", "devices", id, "tags"], None::<&()>)?;
        Ok(self.json(Method::PUT, url, Some(tags), None).await?.1)
    }

    /// `PUT /api/v1/devices/{id}/gateway`: attaches the device to a gateway.
    pub async fn attach_gateway(
        &self,
        child: &str,
        gateway: &str,
    ) -> Result<crate::GatewayAttachment> {
        let url = self.url(&["api", "v1", "devices", child, "gateway"], None::<&()>)?;
        let req = crate::AttachGateway {
            gateway: gateway.to_owned(),
        };
        Ok(self.json(Method::PUT, url, Some(&req), None).await?.1)
    }

    /// `DELETE /api/v1/devices/{id}/gateway`: detaches the device from its gateway.
    pub async fn detach_gateway(&self, child: &str) -> Result<()> {
        let url = self.url(&["api", "v1", "devices", child, "gateway"], None::<&()>)?;
        self.send(Method::DELETE, url, None::<&()>, &[], None)
            .await?;
        Ok(())
    }

    /// `GET /api/v1/devices/{id}/children`: one page of a gateway's children.
    pub async fn gateway_children(
        &self,
        gateway: &str,
        params: &crate::ChildrenParams,
    ) -> Result<crate::GatewayChildren> {
        self.get(self.url(&["api", "v1", "devices", gateway, "children"], Some(params))?)
            .await
    }

    /// `GET /api/v1/devices/{id}/local-key`: the key the device's local API accepts.
    pub async fn local_key(&self, id: &str) -> Result<crate::LocalKeyView> {
        self.get(self.url(&["api", "v1", "devices", id, "local-key"], None::<&()>)?)
            .await
    }

    /// `POST /api/v1/devices/{id}/installation`: records who installed the device, where.
    pub async fn record_installation(
        &self,
        id: &str,
        req: &crate::RecordInstallation,
    ) -> Result<Device> {
        let url = self.url(&["api", "v1", "devices", id, "installation"], None::<&()>)?;
        Ok(self.json(Method::POST, url, Some(req), None).await?.1)
    }

    /// `GET /api/v1/provisioning/funnel`: how many devices reached each provisioning step.
    pub async fn provisioning_funnel(&self, params: &crate::FunnelParams) -> Result<crate::Funnel> {
        self.get(self.url(&["api", "v1", "provisioning", "funnel"], Some(params))?)
            .await
    }

    /// `GET /api/v1/devices/{id}/provisioning`: where the device is in its pipeline.
    pub async fn provisioning(&self, id: &str) -> Result<crate::Provisioning> {
        self.get(self.url(&["api", "v1", "devices", id, "provisioning"], None::<&()>)?)
            .await
    }

    /// `GET /api/v1/devices/{id}/telemetry`.
    pub async fn telemetry(&self, id: &str, params: &TelemetryParams) -> Result<TelemetryPoints> {
        self.get(self.url(&["api", "v1", "devices", id, "telemetry"], Some(params))?)
            .await
    }

    /// `GET /api/v1/devices/{id}/telemetry/latest`.
    pub async fn latest_telemetry(&self, id: &str) -> Result<LatestMetrics> {
        let segments = ["api", "v1", "devices", id, "telemetry", "latest"];
        self.get(self.url(&segments, None::<&()>)?).await
    }

    /// `POST /api/v1/tokens` (admin tokens only).
    pub async fn create_token(&self, req: &CreateToken) -> Result<CreatedToken> {
        let url = self.url(&["api", "v1", "tokens"], None::<&()>)?;
        Ok(self.json(Method::POST, url, Some(req), None).await?.1)
    }

    /// `GET /api/v1/tokens`: one page.
    pub async fn list_tokens(&self, params: &PageParams) -> Result<TokenList> {
        self.get(self.url(&["api", "v1", "tokens"], Some(params))?)
            .await
    }

    /// Every token, following `next_cursor` page by page.
    pub async fn list_all_tokens(&self) -> Result<Vec<crate::TokenInfo>> {
        all_pages(|cursor| async move {
            let page = self.list_tokens(&page_params(cursor)).await?;
            Ok((page.tokens, page.next_cursor))
        })
        .await
    }

    /// Every user, following `next_cursor` page by page.
    pub async fn list_all_users(&self) -> Result<Vec<User>> {
        all_pages(|cursor| async move {
            let page = self.list_users(&page_params(cursor)).await?;
            Ok((page.users, page.next_cursor))
        })
        .await
    }

    /// `DELETE /api/v1/tokens/{id}`: revokes a token.
    pub async fn revoke_token(&self, id: &str) -> Result<()> {
        let url = self.url(&["api", "v1", "tokens", id], None::<&()>)?;
        self.send(Method::DELETE, url, None::<&()>, &[], None)
            .await?;
        Ok(())
    }

    /// `POST /api/v1/tokens/rotate-admin`.
    pub async fn rotate_admin_token(&self) -> Result<CreatedToken> {
        let url = self.url(&["api", "v1", "tokens", "rotate-admin"], None::<&()>)?;
        Ok(self.json(Method::POST, url, None::<&()>, None).await?.1)
    }

    /// `POST /api/v1/ota/artifacts`: announce an artifact; the answer has its manifest.
    pub async fn create_artifact(&self, req: &crate::CreateArtifact) -> Result<crate::Artifact> {
        let url = self.url(&["api", "v1", "ota", "artifacts"], None::<&()>)?;
        Ok(self.json(Method::POST, url, Some(req), None).await?.1)
    }

    /// `PUT /api/v1/ota/artifacts/{id}/content?offset=N`: one chunk of the file.
    pub async fn put_artifact_content(
        &self,
        id: &str,
        offset: u64,
        chunk: Vec<u8>,
    ) -> Result<crate::Artifact> {
        let url = self.url(
            &["api", "v1", "ota", "artifacts", id, "content"],
            Some(&[("offset", offset)]),
        )?;
        let req = self
            .http
            .put(url.clone())
            .bearer_auth(&self.token)
            .header("content-type", "application/octet-stream")
            .body(chunk);
        let (_, text) = self.answer(req, url.clone()).await?;
        serde_json::from_str(&text).map_err(|source| Error::Decode {
            url: url.to_string(),
            source,
        })
    }

    /// `POST /api/v1/ota/artifacts/{id}/complete`: check and sign (or verify `signature`).
    pub async fn complete_artifact(
        &self,
        id: &str,
        req: &crate::CompleteArtifact,
    ) -> Result<crate::Artifact> {
        let url = self.url(
            &["api", "v1", "ota", "artifacts", id, "complete"],
            None::<&()>,
        )?;
        Ok(self.json(Method::POST, url, Some(req), None).await?.1)
    }

    /// `GET /api/v1/ota/artifacts/{id}`.
    pub async fn get_artifact(&self, id: &str) -> Result<crate::Artifact> {
        self.get(self.url(&["api", "v1", "ota", "artifacts", id], None::<&()>)?)
            .await
    }

    /// `GET /api/v1/ota/artifacts`: one page.
    pub async fn list_artifacts(&self, params: &PageParams) -> Result<crate::ArtifactList> {
        self.get(self.url(&["api", "v1", "ota", "artifacts"], Some(params))?)
            .await
    }

    /// Every artifact, following `next_cursor` page by page.
    pub async fn list_all_artifacts(&self) -> Result<Vec<crate::Artifact>> {
        all_pages(|cursor| async move {
            let page = self.list_artifacts(&page_params(cursor)).await?;
            Ok((page.artifacts, page.next_cursor))
        })
        .await
    }

    /// `DELETE /api/v1/ota/artifacts/{id}`.
    pub async fn delete_artifact(&self, id: &str) -> Result<()> {
        let url = self.url(&["api", "v1", "ota", "artifacts", id], None::<&()>)?;
        self.send(Method::DELETE, url, None::<&()>, &[], None)
            .await
            .map(|_| ())
    }

    /// `POST /api/v1/ota/artifacts/{id}/links`: a download link for one device.
    pub async fn create_download_link(
        &self,
        id: &str,
        req: &crate::CreateLink,
    ) -> Result<crate::DownloadLink> {
        let url = self.url(&["api", "v1", "ota", "artifacts", id, "links"], None::<&()>)?;
        Ok(self.json(Method::POST, url, Some(req), None).await?.1)
    }

    /// `POST /api/v1/ota/deployments`.
    pub async fn create_deployment(
        &self,
        req: &crate::CreateDeployment,
    ) -> Result<crate::Deployment> {
        let url = self.url(&["api", "v1", "ota", "deployments"], None::<&()>)?;
        Ok(self.json(Method::POST, url, Some(req), None).await?.1)
    }

    /// `POST /api/v1/rollouts`.
    pub async fn create_rollout(&self, req: &crate::CreateRollout) -> Result<crate::Rollout> {
        let url = self.url(&["api", "v1", "rollouts"], None::<&()>)?;
        Ok(self.json(Method::POST, url, Some(req), None).await?.1)
    }

    /// `GET /api/v1/rollouts`.
    pub async fn list_rollouts(&self, page: &crate::PageParams) -> Result<crate::RolloutList> {
        self.get(self.url(&["api", "v1", "rollouts"], Some(page))?)
            .await
    }

    /// `GET /api/v1/rollouts/{id}`.
    pub async fn get_rollout(&self, id: &str) -> Result<crate::Rollout> {
        self.get(self.url(&["api", "v1", "rollouts", id], None::<&()>)?)
            .await
    }

    /// `GET /api/v1/rollouts/{id}/events?after=`.
    pub async fn rollout_events(&self, id: &str, after: u64) -> Result<crate::RolloutEventList> {
        self.get(self.url(
            &["api", "v1", "rollouts", id, "events"],
            Some(&[("after", after)]),
        )?)
        .await
    }

    /// `POST /api/v1/rollouts/{id}/{verb}` (`pause`, `resume`, `abort`).
    pub async fn rollout_action(
        &self,
        id: &str,
        verb: &str,
        action: &crate::RolloutAction,
    ) -> Result<crate::Rollout> {
        let url = self.url(&["api", "v1", "rollouts", id, verb], None::<&()>)?;
        Ok(self.json(Method::POST, url, Some(action), None).await?.1)
    }

    /// `POST /api/v1/rollouts/{id}/devices`.
    pub async fn add_rollout_devices(&self, id: &str, selector: &str) -> Result<crate::Rollout> {
        let url = self.url(&["api", "v1", "rollouts", id, "devices"], None::<&()>)?;
        let req = crate::AddRolloutDevices {
            selector: selector.to_owned(),
        };
        Ok(self.json(Method::POST, url, Some(&req), None).await?.1)
    }

    /// `GET /api/v1/ota/deployments/{id}`.
    pub async fn get_deployment(&self, id: &str) -> Result<crate::Deployment> {
        self.get(self.url(&["api", "v1", "ota", "deployments", id], None::<&()>)?)
            .await
    }

    /// Every deployment the caller sees, newest first (pages of 100, the most a page holds).
    pub async fn list_all_deployments(&self) -> Result<Vec<crate::Deployment>> {
        all_pages(|cursor| async move {
            let page = self
                .list_deployments(&PageParams {
                    limit: Some(100),
                    cursor,
                })
                .await?;
            Ok((page.deployments, page.next_cursor))
        })
        .await
    }

    /// `GET /api/v1/ota/deployments`: a page, newest first.
    pub async fn list_deployments(
        &self,
        page: &crate::PageParams,
    ) -> Result<crate::DeploymentList> {
        self.get(self.url(&["api", "v1", "ota", "deployments"], Some(page))?)
            .await
    }

    /// `DELETE /api/v1/ota/deployments/{id}`.
    pub async fn delete_deployment(&self, id: &str) -> Result<()> {
        let url = self.url(&["api", "v1", "ota", "deployments", id], None::<&()>)?;
        self.send(Method::DELETE, url, None::<&()>, &[], None)
            .await
            .map(|_| ())
    }

    /// `POST /api/v1/ota/deployments/{id}/cancel`.
    pub async fn cancel_deployment(&self, id: &str) -> Result<crate::Deployment> {
        let url = self.url(
            &["api", "v1", "ota", "deployments", id, "cancel"],
            None::<&()>,
        )?;
        Ok(self.json(Method::POST, url, None::<&()>, None).await?.1)
    }

    /// `GET /api/v1/devices/{id}/ota`.
    pub async fn device_updates(&self, id: &str) -> Result<crate::DeviceUpdates> {
        self.get(self.url(&["api", "v1", "devices", id, "ota"], None::<&()>)?)
            .await
    }

    /// `GET /api/v1/ota/update-key`.
    pub async fn update_key(&self) -> Result<crate::UpdateKeyInfo> {
        self.get(self.url(&["api", "v1", "ota", "update-key"], None::<&()>)?)
            .await
    }

    /// `POST /api/v1/claims`: a claim and its token (shown once).
    pub async fn create_claim(&self, req: &CreateClaim) -> Result<CreatedClaim> {
        let url = self.url(&["api", "v1", "claims"], None::<&()>)?;
        Ok(self.json(Method::POST, url, Some(req), None).await?.1)
    }

    /// `GET /api/v1/claims`: one page.
    pub async fn list_claims(&self, params: &PageParams) -> Result<ClaimList> {
        self.get(self.url(&["api", "v1", "claims"], Some(params))?)
            .await
    }

    /// Every claim, following `next_cursor` page by page.
    pub async fn list_all_claims(&self) -> Result<Vec<Claim>> {
        all_pages(|cursor| async move {
            let page = self.list_claims(&page_params(cursor)).await?;
            Ok((page.claims, page.next_cursor))
        })
        .await
    }

    /// `GET /api/v1/claims/{id}`.
    pub async fn get_claim(&self, id: &str) -> Result<Claim> {
        self.get(self.url(&["api", "v1", "claims", id], None::<&()>)?)
            .await
    }

    /// `DELETE /api/v1/claims/{id}`: revoke; the claim as it is now.
    pub async fn revoke_claim(&self, id: &str) -> Result<Claim> {
        let url = self.url(&["api", "v1", "claims", id], None::<&()>)?;
        Ok(self.json(Method::DELETE, url, None::<&()>, None).await?.1)
    }

    /// `POST /api/v1/provision/enroll` (the claim token is the credential; the client's own
    /// token is not needed).
    pub async fn enroll(&self, req: &EnrollRequest) -> Result<EnrollResponse> {
        let url = self.url(&["api", "v1", "provision", "enroll"], None::<&()>)?;
        Ok(self.json(Method::POST, url, Some(req), None).await?.1)
    }

    /// `GET /api/v1/auth/me`.
    pub async fn me(&self) -> Result<Me> {
        self.get(self.url(&["api", "v1", "auth", "me"], None::<&()>)?)
            .await
    }

    /// `POST /api/v1/users`.
    pub async fn create_user(&self, req: &CreateUser) -> Result<CreatedUser> {
        let url = self.url(&["api", "v1", "users"], None::<&()>)?;
        Ok(self.json(Method::POST, url, Some(req), None).await?.1)
    }

    /// `GET /api/v1/users`: one page.
    pub async fn list_users(&self, params: &PageParams) -> Result<UserList> {
        self.get(self.url(&["api", "v1", "users"], Some(params))?)
            .await
    }

    /// `PATCH /api/v1/users/{id or email}`.
    pub async fn update_user(&self, user: &str, req: &UpdateUser) -> Result<User> {
        let url = self.url(&["api", "v1", "users", user], None::<&()>)?;
        Ok(self.json(Method::PATCH, url, Some(req), None).await?.1)
    }

    /// `DELETE /api/v1/users/{id or email}`.
    pub async fn delete_user(&self, user: &str) -> Result<()> {
        let url = self.url(&["api", "v1", "users", user], None::<&()>)?;
        self.send(Method::DELETE, url, None::<&()>, &[], None)
            .await?;
        Ok(())
    }

    /// `POST /api/v1/users/{id or email}/password-link`.
    pub async fn password_link(&self, user: &str) -> Result<PasswordLink> {
        let url = self.url(&["api", "v1", "users", user, "password-link"], None::<&()>)?;
        Ok(self.json(Method::POST, url, None::<&()>, None).await?.1)
    }

    /// `GET /api/v1/audit`: one page, newest first.
    pub async fn audit(&self, params: &AuditParams) -> Result<AuditList> {
        self.get(self.url(&["api", "v1", "audit"], Some(params))?)
            .await
    }

    /// `POST /api/v1/devices/{id}/commands[?wait_ms=]`: `(created, command)`; `created` is
    /// false when an earlier command with the same `idempotency_key` was returned.
    pub async fn create_command(
        &self,
        device: &str,
        req: &CreateCommand,
        wait_ms: Option<u64>,
    ) -> Result<(bool, Command)> {
        let url = self.url(
            &["api", "v1", "devices", device, "commands"],
            Some(&WaitParams { wait_ms }),
        )?;
        let (status, command) = self.json(Method::POST, url, Some(req), wait_ms).await?;
        Ok((status == StatusCode::ACCEPTED, command))
    }

    /// `GET /api/v1/devices/{id}/commands`: one page, newest first.
    pub async fn list_commands(
        &self,
        device: &str,
        params: &CommandListParams,
    ) -> Result<CommandList> {
        self.get(self.url(&["api", "v1", "devices", device, "commands"], Some(params))?)
            .await
    }

    /// `GET /api/v1/devices/{id}/commands/{cmd}[?wait_ms=]`.
    pub async fn get_command(
        &self,
        device: &str,
        id: &str,
        wait_ms: Option<u64>,
    ) -> Result<Command> {
        let url = self.url(
            &["api", "v1", "devices", device, "commands", id],
            Some(&WaitParams { wait_ms }),
        )?;
        Ok(self.json(Method::GET, url, None::<&()>, wait_ms).await?.1)
    }

    /// `POST /api/v1/devices/{id}/commands/{cmd}/cancel`.
    pub async fn cancel_command(&self, device: &str, id: &str) -> Result<Command> {
        let segments = ["api", "v1", "devices", device, "commands", id, "cancel"];
        let url = self.url(&segments, None::<&()>)?;
        Ok(self.json(Method::POST, url, None::<&()>, None).await?.1)
    }

    /// `POST /api/v1/commands`: one command per device the selector matches.
    pub async fn create_fleet_command(&self, req: &CreateFleetCommand) -> Result<FleetCommand> {
        let url = self.url(&["api", "v1", "commands"], None::<&()>)?;
        Ok(self.json(Method::POST, url, Some(req), None).await?.1)
    }

    /// `GET /api/v1/commands/{id}`: a fleet command or a device command.
    pub async fn get_any_command(&self, id: &str) -> Result<AnyCommand> {
        self.get(self.url(&["api", "v1", "commands", id], None::<&()>)?)
            .await
    }

    /// `POST /api/v1/devices/{id}/certificates/rotate`: the device renews its certificate (the
    /// command carrying the request).
    pub async fn rotate_certificate(
        &self,
        id: &str,
        req: &crate::RotateRequest,
    ) -> Result<Command> {
        let url = self.url(
            &["api", "v1", "devices", id, "certificates", "rotate"],
            None::<&()>,
        )?;
        Ok(self.json(Method::POST, url, Some(req), None).await?.1)
    }

    /// `POST /api/v1/certificates/rotations`: starts a fleet rotation.
    pub async fn create_rotation(&self, req: &crate::CreateRotation) -> Result<crate::Rotation> {
        let url = self.url(&["api", "v1", "certificates", "rotations"], None::<&()>)?;
        Ok(self.json(Method::POST, url, Some(req), None).await?.1)
    }

    /// `GET /api/v1/certificates/rotations/{id}`.
    pub async fn rotation(&self, id: &str) -> Result<crate::Rotation> {
        let url = self.url(&["api", "v1", "certificates", "rotations", id], None::<&()>)?;
        Ok(self.json(Method::GET, url, None::<&()>, None).await?.1)
    }

    /// `GET /api/v1/certificates/rotations`: newest first.
    pub async fn rotations(&self) -> Result<crate::RotationList> {
        let url = self.url(&["api", "v1", "certificates", "rotations"], None::<&()>)?;
        Ok(self.json(Method::GET, url, None::<&()>, None).await?.1)
    }

    /// `POST /api/v1/devices/{id}/revoke`: revokes every active certificate of the device.
    pub async fn revoke_device(
        &self,
        id: &str,
        req: &crate::RevokeRequest,
    ) -> Result<crate::Revoked> {
        let url = self.url(&["api", "v1", "devices", id, "revoke"], None::<&()>)?;
        Ok(self.json(Method::POST, url, Some(req), None).await?.1)
    }

    /// `POST /api/v1/certificates/{serial}/revoke`.
    pub async fn revoke_certificate(
        &self,
        serial: &str,
        req: &crate::RevokeRequest,
    ) -> Result<crate::Revoked> {
        let url = self.url(
            &["api", "v1", "certificates", serial, "revoke"],
            None::<&()>,
        )?;
        Ok(self.json(Method::POST, url, Some(req), None).await?.1)
    }

    /// `GET /api/v1/devices/{id}/certificates`: newest issued first.
    pub async fn device_certificates(&self, id: &str) -> Result<crate::CertificateList> {
        self.get(self.url(&["api", "v1", "devices", id, "certificates"], None::<&()>)?)
            .await
    }

    /// `GET /api/v1/certificates`: one page of active certificates expiring soon, soonest first.
    pub async fn expiring_certificates(
        &self,
        params: &crate::ExpiringParams,
    ) -> Result<crate::CertificateList> {
        self.get(self.url(&["api", "v1", "certificates"], Some(params))?)
            .await
    }

    /// `POST /api/v1/cas`: registers a manufacturer CA.
    pub async fn register_ca(&self, req: &crate::RegisterCa) -> Result<crate::Ca> {
        let url = self.url(&["api", "v1", "cas"], None::<&()>)?;
        Ok(self.json(Method::POST, url, Some(req), None).await?.1)
    }

    /// `GET /api/v1/cas`: the registered CAs, oldest first.
    pub async fn list_cas(&self) -> Result<crate::CaList> {
        self.get(self.url(&["api", "v1", "cas"], None::<&()>)?)
            .await
    }

    /// `POST /api/v1/cas/{id}/disable` (`enable: false`) or `/enable`.
    pub async fn set_ca_enabled(&self, id: &str, enable: bool) -> Result<crate::Ca> {
        let action = if enable { "enable" } else { "disable" };
        let url = self.url(&["api", "v1", "cas", id, action], None::<&()>)?;
        Ok(self
            .json(Method::POST, url, Some(&serde_json::json!({})), None)
            .await?
            .1)
    }

    /// `GET /api/v1/cas/fleet`: the fleet CA(s) and how far a rollover is.
    pub async fn fleet_cas(&self) -> Result<crate::FleetCas> {
        self.get(self.url(&["api", "v1", "cas", "fleet"], None::<&()>)?)
            .await
    }

    /// `POST /api/v1/cas/fleet/rollover`: a new fleet CA, trusted beside the current one.
    pub async fn begin_rollover(&self, req: &crate::BeginRollover) -> Result<crate::FleetCas> {
        let url = self.url(&["api", "v1", "cas", "fleet", "rollover"], None::<&()>)?;
        Ok(self.json(Method::POST, url, Some(req), None).await?.1)
    }

    /// `POST /api/v1/cas/fleet/retire`: ends a rollover; the previous CA is no longer trusted.
    pub async fn retire_ca(&self, req: &crate::RetireCa) -> Result<crate::RetiredCa> {
        let url = self.url(&["api", "v1", "cas", "fleet", "retire"], None::<&()>)?;
        Ok(self.json(Method::POST, url, Some(req), None).await?.1)
    }

    /// `POST /api/v1/jobs`: a bulk action, run in the background.
    pub async fn create_job(&self, req: &CreateJob) -> Result<Job> {
        let url = self.url(&["api", "v1", "jobs"], None::<&()>)?;
        Ok(self.json(Method::POST, url, Some(req), None).await?.1)
    }

    /// `GET /api/v1/jobs`: one page, newest first.
    pub async fn list_jobs(&self, params: &JobListParams) -> Result<JobList> {
        self.get(self.url(&["api", "v1", "jobs"], Some(params))?)
            .await
    }

    /// `GET /api/v1/jobs/{id}`.
    pub async fn get_job(&self, id: &str) -> Result<Job> {
        self.get(self.url(&["api", "v1", "jobs", id], None::<&()>)?)
            .await
    }

    /// `POST /api/v1/jobs/{id}/cancel`.
    pub async fn cancel_job(&self, id: &str) -> Result<Job> {
        let url = self.url(&["api", "v1", "jobs", id, "cancel"], None::<&()>)?;
        Ok(self.json(Method::POST, url, None::<&()>, None).await?.1)
    }

    /// `POST /api/v1/reports`: a report, made in the background as a job.
    pub async fn create_report(&self, req: &CreateReport) -> Result<Job> {
        let url = self.url(&["api", "v1", "reports"], None::<&()>)?;
        Ok(self.json(Method::POST, url, Some(req), None).await?.1)
    }

    /// `GET /api/v1/jobs/{id}/result`: a succeeded job's result, written to `out` as it
    /// arrives; the bytes written. No total deadline (a report may be large): the call fails
    /// if the server is silent for [`EVENT_STREAM_IDLE_MAX`] or the body ends short.
    pub async fn download_job_result(
        &self,
        id: &str,
        out: &mut (impl std::io::Write + ?Sized),
    ) -> Result<u64> {
        let url = self.url(&["api", "v1", "jobs", id, "result"], None::<&()>)?;
        let mut resp = self.open_stream(url, &[]).await?;
        let expected = resp.content_length();
        let mut written = 0u64;
        loop {
            let chunk = tokio::time::timeout(EVENT_STREAM_IDLE_MAX, resp.chunk())
                .await
                .map_err(|_| {
                    Error::Stream(format!(
                        "the download was silent for {EVENT_STREAM_IDLE_MAX:?}"
                    ))
                })?
                .map_err(|e| Error::Stream(format!("the download broke off: {e}")))?;
            let Some(chunk) = chunk else { break };
            out.write_all(&chunk)
                .map_err(|e| Error::Config(format!("writing the result: {e}")))?;
            written += chunk.len() as u64;
        }
        if expected.is_some_and(|n| n != written) {
            return Err(Error::Stream(format!(
                "the download ended after {written} of {} bytes",
                expected.unwrap_or(0)
            )));
        }
        Ok(written)
    }

    /// `GET /api/v1/devices/{id}/shadow`.
    pub async fn get_shadow(&self, id: &str) -> Result<Shadow> {
        self.get(self.url(&["api", "v1", "devices", id, "shadow"], None::<&()>)?)
            .await
    }

    /// `PATCH /api/v1/devices/{id}/shadow`, only if the shadow is at `if_match` when given.
    pub async fn patch_shadow(
        &self,
        id: &str,
        patch: &ShadowPatch,
        if_match: Option<u64>,
    ) -> Result<Shadow> {
        let url = self.url(&["api", "v1", "devices", id, "shadow"], None::<&()>)?;
        let headers: Vec<(&str, String)> = if_match
            .map(|v| ("if-match", format!("\"{v}\"")))
            .into_iter()
            .collect();
        let (_, text) = self
            .send(Method::PATCH, url.clone(), Some(patch), &headers, None)
            .await?;
        serde_json::from_str(&text).map_err(|source| Error::Decode {
            url: url.to_string(),
            source,
        })
    }

    /// `GET /metrics`: the Prometheus text.
    pub async fn metrics(&self) -> Result<String> {
        let url = self.url(&["metrics"], None::<&()>)?;
        Ok(self.send(Method::GET, url, None::<&()>, &[], None).await?.1)
    }

    /// `GET /api/v1/openapi.json`.
    pub async fn openapi(&self) -> Result<serde_json::Value> {
        self.get(self.url(&["api", "v1", "openapi.json"], None::<&()>)?)
            .await
    }

    /// `GET /api/v1/events`: the live event stream (Server-Sent Events), resumed after
    /// `last_event_id` if given. The call's timeout bounds only the answer's head; then the
    /// stream runs until the server ends it, and breaks off with [`Error::Stream`] if nothing
    /// (not even a keep-alive) arrives for [`EVENT_STREAM_IDLE_MAX`].
    pub async fn events(
        &self,
        params: &EventsParams,
        last_event_id: Option<&str>,
    ) -> Result<EventStream> {
        let url = self.url(&["api", "v1", "events"], Some(params))?;
        let mut headers = vec![("accept", "text/event-stream")];
        if let Some(id) = last_event_id {
            headers.push(("last-event-id", id));
        }
        let resp = self.open_stream(url, &headers).await?;
        Ok(EventStream {
            resp,
            buf: Vec::new(),
            pending: SseFields::default(),
            last_event_id: last_event_id.map(str::to_owned),
        })
    }
}

/// Longest silence on an event stream before [`EventStream::next`] gives up (the server sends
/// a keep-alive every 15 s).
pub const EVENT_STREAM_IDLE_MAX: Duration = Duration::from_secs(45);
/// Longest line of an event stream the client accepts.
const EVENT_LINE_BYTES_MAX: usize = 4 * 1024 * 1024;

#[derive(Default)]
struct SseFields {
    event: String,
    data: String,
    id: Option<String>,
}

/// An open event stream ([`Client::events`]).
pub struct EventStream {
    resp: reqwest::Response,
    buf: Vec<u8>,
    pending: SseFields,
    last_event_id: Option<String>,
}

impl EventStream {
    /// The cursor to resume from (`Last-Event-ID`): the newest `id:` the server sent.
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_event_id.as_deref()
    }

    /// The next event or reset; `Ok(None)` when the server ended the stream. Keep-alives and
    /// events of kinds this client does not know are skipped.
    pub async fn next(&mut self) -> Result<Option<StreamItem>> {
        loop {
            while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&line[..line.len() - 1]);
                let line = line.strip_suffix('\r').unwrap_or(&line);
                if let Some(item) = self.line(line)? {
                    return Ok(Some(item));
                }
            }
            if self.buf.len() > EVENT_LINE_BYTES_MAX {
                return Err(Error::Stream(format!(
                    "an event stream line is longer than {EVENT_LINE_BYTES_MAX} bytes"
                )));
            }
            let chunk = tokio::time::timeout(EVENT_STREAM_IDLE_MAX, self.resp.chunk())
                .await
                .map_err(|_| {
                    Error::Stream(format!(
                        "the event stream was silent for {EVENT_STREAM_IDLE_MAX:?}"
                    ))
                })?
                .map_err(|e| Error::Stream(format!("the event stream broke off: {e}")))?;
            match chunk {
                Some(c) => self.buf.extend_from_slice(&c),
                None => return Ok(None),
            }
        }
    }

    /// One line of the stream; an item when it ends an event.
    fn line(&mut self, line: &str) -> Result<Option<StreamItem>> {
        if !line.is_empty() {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => value.clone_into(&mut self.pending.event),
                "data" => {
                    if !self.pending.data.is_empty() {
                        self.pending.data.push('\n');
                    }
                    self.pending.data.push_str(value);
                }
                "id" => self.pending.id = Some(value.to_owned()),
                _ => {}
            }
            return Ok(None);
        }
        let f = std::mem::take(&mut self.pending);
        if let Some(id) = &f.id {
            self.last_event_id = Some(id.clone());
        }
        if f.data.is_empty() {
            return Ok(None);
        }
        let id =
            f.id.or_else(|| self.last_event_id.clone())
                .unwrap_or_default();
        let decode = |source| Error::Decode {
            url: "event stream".to_owned(),
            source,
        };
        if f.event == crate::RESET_EVENT {
            let reset = serde_json::from_str(&f.data).map_err(decode)?;
            return Ok(Some(StreamItem::Reset { id, reset }));
        }
        match serde_json::from_str::<Event>(&f.data) {
            Ok(event) => Ok(Some(StreamItem::Event { id, event })),
            // A kind added after this client was built.
            Err(e) if e.to_string().contains("unknown variant") => Ok(None),
            Err(e) => Err(decode(e)),
        }
    }
}

/// The largest page of a list call.
fn page_params(cursor: Option<String>) -> PageParams {
    PageParams {
        limit: Some(1000),
        cursor,
    }
}

/// Every item of a paged list: `fetch(cursor)` returns one page and the next cursor.
async fn all_pages<T, F, Fut>(mut fetch: F) -> Result<Vec<T>>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, Option<String>)>>,
{
    let mut all = Vec::new();
    let mut cursor = None;
    loop {
        let (page, next) = fetch(cursor.clone()).await?;
        all.extend(page);
        match next {
            // A server that hands back the cursor it was given would never end the loop.
            Some(c) if cursor.as_deref() == Some(c.as_str()) => {
                return Err(Error::Stream(format!(
                    "the server answered the same page cursor twice ({c}); stopping"
                )))
            }
            Some(c) => cursor = Some(c),
            None => return Ok(all),
        }
    }
}

/// The error a non-2xx answer stands for: the API's JSON error, or the status and text.
fn api_error(status: StatusCode, text: String, url: &Url) -> Error {
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(b) => Error::Api {
            status: status.as_u16(),
            code: b.error.code,
            message: b.error.message,
        },
        Err(_) => Error::Status {
            status: status.as_u16(),
            url: url.to_string(),
            text: truncate(text),
        },
    }
}

fn truncate(mut text: String) -> String {
    if text.len() > ERROR_TEXT_BYTES_MAX {
        text.truncate(text.floor_char_boundary(ERROR_TEXT_BYTES_MAX));
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_escaped_and_a_base_path_is_kept() -> Result<()> {
        let c = Client::builder("https://fleet.example/mooring/", "t").build()?;
        let url = c.url(&["api", "v1", "devices", "a/b?c"], None::<&()>)?;
        assert_eq!(
            url.as_str(),
            "https://fleet.example/mooring/api/v1/devices/a%2Fb%3Fc"
        );
        let q = CommandListParams {
            state: Some("queued".into()),
            limit: Some(10),
            cursor: None,
        };
        let url = c.url(&["api", "v1", "devices", "d1", "commands"], Some(&q))?;
        assert_eq!(url.query(), Some("state=queued&limit=10"));
        let sel = ListDevicesParams {
            selector: Some("tag:site=berlin and online".into()),
            ..Default::default()
        };
        let url = c.url(&["api", "v1", "devices"], Some(&sel))?;
        assert_eq!(url.query(), Some("selector=tag%3Asite%3Dberlin+and+online"));
        Ok(())
    }

    /// A server that answers one request after `delay`, with a queued command (what the real
    /// one does when the command stays pending for the whole `wait_ms`).
    fn slow_server(delay: Duration) -> (String, std::thread::JoinHandle<()>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).expect("read");
                assert!(n > 0, "request ended early");
                request.extend_from_slice(&buf[..n]);
            }
            std::thread::sleep(delay);
            let body = r#"{"id":"c1","device_id":"d1","name":"ping","params":{},"state":"queued",
                "attempts":0,"max_attempts":5,"created_at":1,"expires_at":2,"history":[],
                "idempotency_key":null,"parent_id":null,"result":null,"result_timeout_secs":0}"#;
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        });
        (base, server)
    }

    #[tokio::test]
    async fn a_call_that_waits_is_not_cut_off_by_the_timeout_before_the_wait_is_over() -> Result<()>
    {
        // The server holds a wait_ms call for the whole wait; a timeout shorter than the wait
        // (the CLI's 30 s against --wait-ms 30000) must not turn that answer into an error.
        let (base, server) = slow_server(Duration::from_millis(600));
        let c = Client::builder(&base, "t")
            .timeout(Duration::from_millis(300))
            .build()?;
        let command = c.get_command("d1", "c1", Some(600)).await?;
        assert_eq!(command.state, "queued");
        server.join().expect("server thread");
        Ok(())
    }

    #[test]
    fn dot_segments_are_refused_not_dropped() -> Result<()> {
        // `url` drops "." and ".." pushed as segments: set_tags("..") would PUT
        // /api/v1/devices/tags, the tags of a device named "tags".
        let c = Client::builder("http://127.0.0.1:1", "t").build()?;
        for id in [".", ".."] {
            assert!(
                matches!(
                    c.url(&["api", "v1", "devices", id, "tags"], None::<&()>),
                    Err(Error::Config(_))
                ),
                "{id}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_server_url_that_is_not_http_is_refused() {
        for bad in ["127.0.0.1:8080", "mailto:x@y", "ftp://h/"] {
            assert!(
                matches!(Client::builder(bad, "t").build(), Err(Error::Config(_))),
                "{bad}"
            );
        }
    }
}
