//! The API client behind `mooring device ...`, `mooring command ...` and `mooring token ...`.

use crate::{CommandCommand, DeviceCommand, TokenCommand};
use anyhow::{anyhow, bail, Context};
use clap::Args;
use mooring_proto::selector::{Selector, Term};
use mooring_proto::DeviceId;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// An error in what the user typed: exit code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

#[derive(Args)]
pub struct ApiArgs {
    /// Server API URL.
    #[arg(
        long,
        env = "MOORING_SERVER",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    server: String,
    /// API token [default: read from <data-dir>/admin.token].
    #[arg(long, env = "MOORING_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Data directory holding admin.token (and ca.crt for https).
    #[arg(
        long,
        env = "MOORING_DATA_DIR",
        default_value = "./mooring-data",
        global = true
    )]
    data_dir: PathBuf,
    /// CA certificate to trust for an https server [default: <data-dir>/ca.crt].
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
}

struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    fn new(args: &ApiArgs) -> anyhow::Result<Api> {
        let token = match &args.token {
            Some(t) => t.trim().to_owned(),
            None => {
                let path = args.data_dir.join("admin.token");
                std::fs::read_to_string(&path)
                    .with_context(|| {
                        format!(
                            "no --token given, MOORING_TOKEN unset, and cannot read {}",
                            path.display()
                        )
                    })?
                    .trim()
                    .to_owned()
            }
        };
        let base = args.server.trim_end_matches('/').to_owned();
        let mut builder = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30));
        if base.starts_with("https://") {
            let ca_path = args
                .ca
                .clone()
                .unwrap_or_else(|| args.data_dir.join("ca.crt"));
            builder = builder.use_preconfigured_tls(tls_config(&ca_path)?);
        }
        Ok(Api {
            base,
            token,
            http: builder.build()?,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| {
            format!(
                "cannot reach the Mooring server at {} (is `mooring serve` running?)",
                self.base
            )
        })?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let json: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let msg = json
                .pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| json.to_string());
            let code = json
                .pointer("/error/code")
                .and_then(Value::as_str)
                .unwrap_or("error");
            bail!("{msg} ({code}, HTTP {})", status.as_u16());
        }
        Ok(json)
    }
}

fn tls_config(ca_path: &Path) -> anyhow::Result<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_path)
        .with_context(|| format!("reading CA certificate {}", ca_path.display()))?
    {
        roots.add(cert?)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn parse_id(id: &str) -> anyhow::Result<DeviceId> {
    DeviceId::parse(id).map_err(|e| UsageError(e.to_string()).into())
}

/// The credential files `device create` writes, with their modes; the private key first.
const CREDENTIAL_FILES: [(&str, u32); 3] = [
    ("device.key", 0o600),
    ("device.crt", 0o644),
    ("ca.crt", 0o644),
];

/// The credential files of `device create`, created empty (never truncating or following
/// anything) before the device exists, so a refused write leaves no orphan device behind.
struct CredentialFiles {
    dir: PathBuf,
    created_dir: bool,
    files: Vec<(PathBuf, std::fs::File)>,
}

impl CredentialFiles {
    /// Checks `dir` (not a symbolic link; a directory if it exists) and creates every file
    /// with `O_CREAT | O_EXCL | O_NOFOLLOW` and its final mode (the key 0600). A file that
    /// exists, or is a symbolic link even to nowhere, is refused, naming it: exit code 2.
    fn create(dir: &Path) -> anyhow::Result<Self> {
        // Without a trailing slash, so a symbolic link is seen as one, not followed.
        let dir: PathBuf = dir.components().collect();
        let created_dir = match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(UsageError(format!(
                    "--out {} is a symbolic link; refusing to write credentials through it",
                    dir.display()
                ))
                .into())
            }
            Ok(m) if !m.is_dir() => {
                return Err(UsageError(format!(
                    "--out {} exists and is not a directory",
                    dir.display()
                ))
                .into())
            }
            Ok(_) => false,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                true
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("checking {}", dir.display())))
            }
        };
        let mut out = CredentialFiles {
            dir,
            created_dir,
            files: Vec::new(),
        };
        for (name, mode) in CREDENTIAL_FILES {
            let path = out.dir.join(name);
            let file = create_new_file(&path, mode)?;
            out.files.push((path, file));
        }
        Ok(out)
    }

    /// Writes each file's contents (in [`CREDENTIAL_FILES`] order) and syncs it.
    fn write(mut self, contents: [&str; 3]) -> anyhow::Result<()> {
        use std::io::Write;
        for ((path, file), text) in self.files.iter_mut().zip(contents) {
            file.write_all(text.as_bytes())
                .and_then(|()| file.sync_all())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        self.files.clear();
        self.created_dir = false;
        Ok(())
    }
}

impl Drop for CredentialFiles {
    /// Not written (the API call failed): remove the empty files and the directory we made.
    fn drop(&mut self) {
        for (path, _) in self.files.drain(..) {
            let _ = std::fs::remove_file(path);
        }
        if self.created_dir {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

/// Creates `path` with `mode`; refuses (exit code 2) if it exists or is a symbolic link.
fn create_new_file(path: &Path, mode: u32) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        // create_new (O_EXCL) already refuses a symbolic link as the last component; O_NOFOLLOW
        // keeps that true should the flags ever change.
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(path);
    match opened {
        Ok(f) => Ok(f),
        Err(e)
            if e.kind() == std::io::ErrorKind::AlreadyExists
                || e.raw_os_error() == Some(libc::ELOOP) =>
        {
            Err(UsageError(format!(
                "{} already exists (or is a symbolic link); refusing to overwrite or follow it (choose another --out)",
                path.display()
            ))
            .into())
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("creating {}", path.display()))),
    }
}

fn ms_to_text(v: &Value) -> String {
    match v.as_u64() {
        Some(ms) => format!("{ms}"),
        None => "-".into(),
    }
}

pub async fn device(args: ApiArgs, command: DeviceCommand) -> anyhow::Result<()> {
    match command {
        DeviceCommand::Create { id, out, tags } => {
            let id = parse_id(&id)?;
            let mut tag_map = serde_json::Map::new();
            for t in &tags {
                let (k, v) = t
                    .split_once('=')
                    .ok_or_else(|| UsageError(format!("--tag {t:?} must be key=value")))?;
                tag_map.insert(k.to_owned(), Value::String(v.to_owned()));
            }
            let dir = out.unwrap_or_else(|| PathBuf::from(id.as_str()));
            let api = Api::new(&args)?;
            // The files first: a refused write must not leave a device whose key is lost.
            let files = CredentialFiles::create(&dir)?;
            let created = api
                .call(
                    reqwest::Method::POST,
                    "/api/v1/devices",
                    Some(serde_json::json!({"id": id.as_str(), "tags": tag_map})),
                )
                .await?;
            let field = |name: &str| {
                created
                    .get(name)
                    .and_then(Value::as_str)
                    .ok_or_else(|| anyhow!("server response lacks {name}"))
            };
            files
                .write([
                    field("private_key_pem")?,
                    field("certificate_pem")?,
                    field("ca_pem")?,
                ])
                .with_context(|| {
                    format!("device {id} was created, but its credentials were not saved; delete it (`mooring device delete {id}`) and create it again")
                })?;
            println!(
                "created device {id}; credentials in {}/ (device.crt, device.key, ca.crt)",
                dir.display()
            );
            Ok(())
        }
        DeviceCommand::List { json, selector } => {
            if let Some(sel) = &selector {
                Selector::parse(sel).map_err(|e| UsageError(format!("invalid selector: {e}")))?;
            }
            let api = Api::new(&args)?;
            let mut all = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let mut path = "/api/v1/devices?limit=1000".to_owned();
                if let Some(c) = &cursor {
                    path.push_str(&format!("&cursor={c}"));
                }
                if let Some(sel) = &selector {
                    path.push_str(&format!("&selector={}", urlencode(sel)));
                }
                let page = api.call(reqwest::Method::GET, &path, None).await?;
                if let Some(devices) = page.get("devices").and_then(Value::as_array) {
                    all.extend(devices.iter().cloned());
                }
                match page.get("next_cursor").and_then(Value::as_str) {
                    Some(c) => cursor = Some(c.to_owned()),
                    None => break,
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                println!(
                    "{:<32} {:<7} {:>15} {:>15}",
                    "ID", "ONLINE", "LAST_SEEN_MS", "CREATED_AT_MS"
                );
                for d in &all {
                    println!(
                        "{:<32} {:<7} {:>15} {:>15}",
                        d.get("id").and_then(Value::as_str).unwrap_or("?"),
                        d.get("online").and_then(Value::as_bool).unwrap_or(false),
                        ms_to_text(d.get("last_seen").unwrap_or(&Value::Null)),
                        ms_to_text(d.get("created_at").unwrap_or(&Value::Null)),
                    );
                }
            }
            Ok(())
        }
        DeviceCommand::Show { id } => {
            let id = parse_id(&id)?;
            let api = Api::new(&args)?;
            let d = api
                .call(reqwest::Method::GET, &format!("/api/v1/devices/{id}"), None)
                .await?;
            println!("{}", serde_json::to_string_pretty(&d)?);
            Ok(())
        }
        DeviceCommand::Tag { id, tags, remove } => {
            let id = parse_id(&id)?;
            let mut set = Vec::new();
            for t in &tags {
                let (k, v) = t
                    .split_once('=')
                    .ok_or_else(|| UsageError(format!("tag {t:?} must be key=value")))?;
                set.push((k.to_owned(), v.to_owned()));
            }
            if set.is_empty() && remove.is_empty() {
                return Err(UsageError("give key=value tags to set or --remove KEY".into()).into());
            }
            let api = Api::new(&args)?;
            let path = format!("/api/v1/devices/{id}");
            let device = api.call(reqwest::Method::GET, &path, None).await?;
            let mut current = device
                .get("tags")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            for k in &remove {
                current.remove(k);
            }
            for (k, v) in set {
                current.insert(k, Value::String(v));
            }
            let d = api
                .call(
                    reqwest::Method::PUT,
                    &format!("{path}/tags"),
                    Some(Value::Object(current)),
                )
                .await?;
            println!(
                "{}",
                serde_json::to_string_pretty(d.get("tags").unwrap_or(&Value::Null))?
            );
            Ok(())
        }
        DeviceCommand::Delete { id } => {
            let id = parse_id(&id)?;
            let api = Api::new(&args)?;
            api.call(
                reqwest::Method::DELETE,
                &format!("/api/v1/devices/{id}"),
                None,
            )
            .await?;
            println!("deleted device {id}");
            Ok(())
        }
    }
}

/// Percent-encodes a query parameter value.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn command_id(id: &str) -> anyhow::Result<&str> {
    if mooring_proto::command::is_valid_command_id(id) {
        Ok(id)
    } else {
        Err(UsageError(format!("invalid command id {id:?}")).into())
    }
}

pub async fn command(args: ApiArgs, command: CommandCommand) -> anyhow::Result<()> {
    match command {
        CommandCommand::Send {
            to,
            name,
            params,
            ttl_secs,
            max_attempts,
            result_timeout_secs,
            wait_ms,
            idempotency_key,
        } => {
            if !mooring_proto::command::is_valid_command_name(&name) {
                return Err(UsageError(format!("invalid command name {name:?}")).into());
            }
            let params: Value = match params {
                Some(p) => serde_json::from_str(&p)
                    .map_err(|e| UsageError(format!("--params is not valid JSON: {e}")))?,
                None => Value::Object(serde_json::Map::new()),
            };
            let selector =
                Selector::parse(&to).map_err(|e| UsageError(format!("invalid --to: {e}")))?;
            let single = match selector.terms.as_slice() {
                [Term::Ids(ids)] if ids.len() == 1 && !to.starts_with("id:") => {
                    Some(ids[0].clone())
                }
                _ => None,
            };
            let mut body = serde_json::json!({"name": name, "params": params});
            if let Some(t) = ttl_secs {
                body["ttl_secs"] = t.into();
            }
            if let Some(m) = max_attempts {
                body["max_attempts"] = m.into();
            }
            if let Some(r) = result_timeout_secs {
                body["result_timeout_secs"] = r.into();
            }
            let api = Api::new(&args)?;
            let out = match single {
                Some(device) => {
                    if let Some(k) = idempotency_key {
                        body["idempotency_key"] = k.into();
                    }
                    let mut path = format!("/api/v1/devices/{device}/commands");
                    if let Some(w) = wait_ms {
                        path.push_str(&format!("?wait_ms={w}"));
                    }
                    api.call(reqwest::Method::POST, &path, Some(body)).await?
                }
                None => {
                    if wait_ms.is_some() || idempotency_key.is_some() {
                        return Err(UsageError(
                            "--wait-ms and --idempotency-key apply to one device; follow a fleet command with `mooring command show <id>`".into(),
                        )
                        .into());
                    }
                    body["selector"] = Value::String(to);
                    api.call(reqwest::Method::POST, "/api/v1/commands", Some(body))
                        .await?
                }
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        CommandCommand::Show { id, wait_ms } => {
            let id = command_id(&id)?;
            let api = Api::new(&args)?;
            let mut c = api
                .call(
                    reqwest::Method::GET,
                    &format!("/api/v1/commands/{id}"),
                    None,
                )
                .await?;
            if let (Some(w), Some(device)) = (wait_ms, c.get("device_id").and_then(Value::as_str)) {
                c = api
                    .call(
                        reqwest::Method::GET,
                        &format!("/api/v1/devices/{device}/commands/{id}?wait_ms={w}"),
                        None,
                    )
                    .await?;
            }
            println!("{}", serde_json::to_string_pretty(&c)?);
            Ok(())
        }
        CommandCommand::List { device, state } => {
            let device = parse_id(&device)?;
            let api = Api::new(&args)?;
            let mut path = format!("/api/v1/devices/{device}/commands?limit=1000");
            if let Some(s) = state {
                path.push_str(&format!("&state={}", urlencode(&s)));
            }
            let page = api.call(reqwest::Method::GET, &path, None).await?;
            println!(
                "{:<34} {:<16} {:<13} {:>8} {:>15}",
                "ID", "NAME", "STATE", "ATTEMPTS", "CREATED_AT_MS"
            );
            for c in page
                .get("commands")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                println!(
                    "{:<34} {:<16} {:<13} {:>8} {:>15}",
                    c.get("id").and_then(Value::as_str).unwrap_or("?"),
                    c.get("name").and_then(Value::as_str).unwrap_or("?"),
                    c.get("state").and_then(Value::as_str).unwrap_or("?"),
                    c.get("attempts").and_then(Value::as_u64).unwrap_or(0),
                    ms_to_text(c.get("created_at").unwrap_or(&Value::Null)),
                );
            }
            Ok(())
        }
        CommandCommand::Cancel { device, id } => {
            let device = parse_id(&device)?;
            let id = command_id(&id)?;
            let api = Api::new(&args)?;
            let c = api
                .call(
                    reqwest::Method::POST,
                    &format!("/api/v1/devices/{device}/commands/{id}/cancel"),
                    None,
                )
                .await?;
            println!("{}", serde_json::to_string_pretty(&c)?);
            Ok(())
        }
    }
}

pub async fn token(args: ApiArgs, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create { name, role } => {
            if role != "service" && role != "admin" {
                return Err(UsageError(format!("--role {role:?} must be service or admin")).into());
            }
            let api = Api::new(&args)?;
            let t = api
                .call(
                    reqwest::Method::POST,
                    "/api/v1/tokens",
                    Some(serde_json::json!({"name": name, "role": role})),
                )
                .await?;
            println!("{}", t.get("token").and_then(Value::as_str).unwrap_or(""));
            Ok(())
        }
    }
}
