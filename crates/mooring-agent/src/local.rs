//! Local control (issue 20, [`mooring_proto::local`]): the device's own HTTP API on its LAN
//! (`[local] listen`, `--local-listen`) and/or a Unix socket (`[local] socket`,
//! `--local-socket`), so a phone app or a technician runs commands while the uplink or the
//! cloud is down.
//!
//! - **Key.** Every request carries `Authorization: Bearer <local key>`. The key comes from the
//!   server over the device's own TLS session whenever it connects (so a rotated certificate
//!   brings a new one) and is kept in `<state dir>/local.key` (0600); an operator reads the same
//!   key with `mooring device local-key <id>`. Until the device has one, the API refuses every
//!   request (`503 no_local_key`).
//! - **Commands.** `POST /v1/commands {"id"?, "name", "params"?}` runs the command through the
//!   device's executor: the same handlers, one at a time in arrival order with cloud commands,
//!   and the same at-most-once record by id (`l-<id>` in the executor's record, so a local id
//!   never meets a cloud one). Asking again with the same id answers the recorded result and runs
//!   nothing. The result is durable before it is answered, and it is queued in the outbox with
//!   what ran and when ([`mooring_proto::local::LocalExecution`]): the server records it as
//!   executed locally once the link is back, exactly once, in order with everything else.
//! - **Bounds.** Bodies of at most [`BODY_BYTES_MAX`]; at most [`CONNECTIONS_MAX`] requests at
//!   once (`503 busy` past that; the key is checked before the body is read); at most
//!   [`QUEUE_MAX`] local commands waiting for the executor (`429` past that); an
//!   answer waits at most [`WAIT_MS`] for the result, then says `running` (ask again by id).

use crate::link::Inbound;
use crate::store::CommandRecord;
use crate::Core;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mooring_proto::command::{CommandRequest, CommandResult};
use mooring_proto::local::{LocalExecution, LocalKey};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Largest request body, in bytes.
pub const BODY_BYTES_MAX: usize = 128 * 1024;
/// Requests handled at once (more are refused, `503 busy`).
pub const CONNECTIONS_MAX: usize = 16;
/// Local commands waiting for the executor.
pub const QUEUE_MAX: usize = 16;
/// How long an answer waits for the command's result.
pub const WAIT_MS: u64 = 30_000;
/// How long a local command may wait for the executor before it is not started (`expired`).
pub const START_WITHIN_MS: u64 = 60_000;
/// The executor's id of a local command: this prefix and the client's id.
pub const ID_PREFIX: &str = mooring_proto::local::LOCAL_ID_PREFIX;
/// The file the key is kept in, in the state dir.
pub const KEY_FILE: &str = "local.key";
/// How long the agent waits for its key before asking again (the server answers at most 6
/// requests a minute).
pub const KEY_RETRY_MS: u64 = 30_000;
/// Key answers buffered from the connection.
pub const KEY_QUEUE_MAX: usize = 4;

/// `[local]` in the config file; `--local-listen` / `--local-socket` override.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// `ADDR:PORT` to serve HTTP on (the LAN, or 127.0.0.1).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// A Unix socket to serve HTTP on (created 0660; a stale one is replaced).
    #[serde(default)]
    pub socket: Option<PathBuf>,
}

impl LocalConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.listen.is_none() && self.socket.is_none() {
            return Err("[local] needs listen or socket".into());
        }
        if self
            .socket
            .as_ref()
            .is_some_and(|s| s.as_os_str().is_empty())
        {
            return Err("[local] socket is empty".into());
        }
        Ok(())
    }
}

/// One local command on its way to the executor.
pub(crate) struct LocalRequest {
    pub(crate) req: CommandRequest,
    pub(crate) requested_at: u64,
    pub(crate) reply: oneshot::Sender<CommandResult>,
}

/// The local API's channels and key.
pub(crate) struct LocalParts {
    pub(crate) config: LocalConfig,
    pub(crate) tx: mpsc::Sender<LocalRequest>,
    pub(crate) rx: tokio::sync::Mutex<mpsc::Receiver<LocalRequest>>,
    pub(crate) key_rx: tokio::sync::Mutex<mpsc::Receiver<Inbound>>,
    key: std::sync::Mutex<Option<LocalKey>>,
    key_path: PathBuf,
    /// What the executor runs now, if it is local: executor id → (name, params, asked at). One
    /// at a time (the executor is sequential), so at most one entry.
    running: std::sync::Mutex<Option<(String, LocalExecution)>>,
    /// Requests being served ([`CONNECTIONS_MAX`]).
    slots: Arc<tokio::sync::Semaphore>,
}

/// The parts, and the sender the connection routes key answers to.
pub(crate) fn parts(
    config: LocalConfig,
    state_dir: &std::path::Path,
) -> (LocalParts, mpsc::Sender<Inbound>) {
    let (tx, rx) = mpsc::channel(QUEUE_MAX);
    let (key_tx, key_rx) = mpsc::channel(KEY_QUEUE_MAX);
    let key_path = state_dir.join(KEY_FILE);
    let key = std::fs::read(&key_path)
        .ok()
        .and_then(|b| LocalKey::parse(&b));
    (
        LocalParts {
            config,
            tx,
            rx: tokio::sync::Mutex::new(rx),
            key_rx: tokio::sync::Mutex::new(key_rx),
            key: std::sync::Mutex::new(key),
            key_path,
            running: std::sync::Mutex::new(None),
            slots: Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX)),
        },
        key_tx,
    )
}

/// Whether `id` (the executor's) is a local command's.
pub fn is_local_id(id: &str) -> bool {
    id.starts_with(ID_PREFIX)
}

/// Notes what the local command `req` is, for its result ([`execution`]).
pub(crate) fn remember(core: &Core, req: &CommandRequest, requested_at: u64) {
    if let Some(local) = &core.local {
        *mooring_proto::sync::lock(&local.running) = Some((
            req.id.clone(),
            LocalExecution {
                name: req.name.clone(),
                params: req.params.clone(),
                requested_at,
                finished_at: requested_at,
            },
        ));
    }
}

/// The `local` field of local command `id`'s result. After a restart (an interrupted command)
/// what ran is no longer known: `name` reads `unknown` and both times are now.
pub(crate) fn execution(core: &Core, id: &str) -> LocalExecution {
    let now = core.clock.now_ms();
    let known = core
        .local
        .as_ref()
        .and_then(|l| mooring_proto::sync::lock(&l.running).take())
        .filter(|(running, _)| running == id);
    match known {
        Some((_, e)) => LocalExecution {
            finished_at: now,
            ..e
        },
        None => LocalExecution {
            name: "unknown".into(),
            params: Value::Null,
            requested_at: now,
            finished_at: now,
        },
    }
}

/// The key child: asks the server for the key after every connect, keeps each answer.
pub(crate) async fn keep_key(core: Arc<Core>) -> anyhow::Result<()> {
    let Some(local) = &core.local else {
        return Ok(());
    };
    let mut answers = local.key_rx.lock().await;
    let mut link_rx = core.link.subscribe();
    let topic = mooring_proto::local::key_request_topic(&core.device_id);
    // Asked on this connection and not answered yet: asked again every KEY_RETRY_MS.
    let mut waiting = link_rx.borrow_and_update().is_some();
    loop {
        if waiting {
            if let Some(h) = link_rx.borrow().clone() {
                h.try_publish(&topic, mooring_proto::local::key_request_payload(), 1, None);
            }
        }
        let retry = tokio::time::sleep(std::time::Duration::from_millis(KEY_RETRY_MS));
        tokio::select! {
            changed = link_rx.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                waiting = link_rx.borrow_and_update().is_some();
            }
            () = retry, if waiting => {}
            msg = answers.recv() => {
                let Some(msg) = msg else { return Ok(()) };
                waiting = false;
                let Some(key) = LocalKey::parse(&msg.payload) else {
                    tracing::warn!("invalid local key answer ignored");
                    continue;
                };
                let same = mooring_proto::sync::lock(&local.key).as_ref() == Some(&key);
                if !same {
                    crate::enroll::write_atomic(&local.key_path, &key.to_bytes(), 0o600)?;
                    tracing::info!(cert_sha256 = %key.cert_sha256, "local key stored");
                    *mooring_proto::sync::lock(&local.key) = Some(key);
                }
            }
        }
    }
}

/// The API child: serves the configured listeners until the agent stops.
pub(crate) async fn serve(core: Arc<Core>) -> anyhow::Result<()> {
    let Some(local) = &core.local else {
        return Ok(());
    };
    let router = Router::new()
        .route("/v1/commands", post(run_command))
        .route("/v1/commands/{id}", get(get_command))
        .route("/v1/status", get(status))
        // The key and a free slot are checked before anything reads the body.
        .route_layer(axum::middleware::from_fn_with_state(core.clone(), gate))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(core.clone());
    let mut servers = tokio::task::JoinSet::new();
    if let Some(addr) = local.config.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("local API on {addr}: {e}"))?;
        tracing::info!(addr = %listener.local_addr()?, "local API listening");
        let r = router.clone();
        servers.spawn(async move { axum::serve(listener, r).await });
    }
    if let Some(path) = &local.config.socket {
        let listener = crate::gateway::unix::bind_socket(path)
            .map_err(|e| anyhow::anyhow!("local API on {}: {e}", path.display()))?;
        tracing::info!(socket = %path.display(), "local API listening");
        servers.spawn(async move { axum::serve(listener, router).await });
    }
    while let Some(done) = servers.join_next().await {
        done??;
    }
    Ok(())
}

/// Every request: the key first, then one of [`CONNECTIONS_MAX`] slots (refused when none is
/// free: a client that holds requests open cannot queue the others behind it).
async fn gate(
    State(core): State<Arc<Core>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(r) = refusal(&core, req.headers()) {
        return r;
    }
    let Some(local) = &core.local else {
        return error(StatusCode::NOT_FOUND, "not_found", "no local API");
    };
    let Ok(_slot) = local.slots.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!("{CONNECTIONS_MAX} requests are being served; try again"),
        );
    };
    next.run(req).await
}

/// An error answer: `{"error": code, "message": ...}`.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": code, "message": message.into()})),
    )
        .into_response()
}

/// Checks `Authorization: Bearer <key>` against the device's key, in constant time: the
/// refusal to answer, if any.
fn refusal(core: &Core, headers: &HeaderMap) -> Option<Response> {
    let Some(local) = &core.local else {
        return Some(error(StatusCode::NOT_FOUND, "not_found", "no local API"));
    };
    let Some(key) = mooring_proto::sync::lock(&local.key)
        .as_ref()
        .map(|k| k.key.clone())
    else {
        return Some(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_local_key",
            "this device has not received its local key yet (it gets one when it connects to the server)",
        ));
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let same = given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        None
    } else {
        Some(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong local key: `Authorization: Bearer <key>` (mooring device local-key <id>)",
        ))
    }
}

/// `POST /v1/commands`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunCommand {
    /// The client's id for this command (its idempotency): `[A-Za-z0-9_-]`, at most 62
    /// characters; a random one when left out.
    #[serde(default)]
    id: Option<String>,
    name: String,
    #[serde(default)]
    params: Value,
}

/// A local command's answer.
#[derive(Debug, Serialize)]
struct CommandAnswer {
    id: String,
    /// `succeeded`, `failed` or `running`.
    status: &'static str,
    #[serde(skip_serializing_if = "Value::is_null")]
    output: Value,
}

fn answer(id: &str, r: &CommandResult) -> Response {
    let status = match r.status {
        mooring_proto::command::ResultStatus::Succeeded => "succeeded",
        mooring_proto::command::ResultStatus::Failed => "failed",
    };
    Json(CommandAnswer {
        id: id.to_owned(),
        status,
        output: r.output.clone(),
    })
    .into_response()
}

fn running(id: &str) -> Response {
    (
        StatusCode::ACCEPTED,
        Json(CommandAnswer {
            id: id.to_owned(),
            status: "running",
            output: Value::Null,
        }),
    )
        .into_response()
}

async fn run_command(
    State(core): State<Arc<Core>>,
    body: Result<Json<RunCommand>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()),
    };
    let client_id = body
        .id
        .unwrap_or_else(|| hex::encode(rand::random::<[u8; 12]>()));
    let id = format!("{ID_PREFIX}{client_id}");
    if !mooring_proto::command::is_valid_command_id(&id) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            "id must be 1-62 characters of [A-Za-z0-9_-]",
        );
    }
    if !mooring_proto::command::is_valid_command_name(&body.name) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_name",
            "name must be 1-64 characters of [A-Za-z0-9_.-], starting with a letter or digit",
        );
    }
    let size = serde_json::to_vec(&body.params).map_or(0, |v| v.len());
    if size > mooring_proto::command::COMMAND_BODY_SIZE_BYTES_MAX {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_params",
            "params are larger than 64 KiB",
        );
    }
    let Some(local) = &core.local else {
        return error(StatusCode::NOT_FOUND, "not_found", "no local API");
    };
    let now = core.clock.now_ms();
    let (reply, answered) = oneshot::channel();
    let request = LocalRequest {
        req: CommandRequest {
            id: id.clone(),
            name: body.name,
            params: body.params,
            expires_at: now.saturating_add(START_WITHIN_MS),
        },
        requested_at: now,
        reply,
    };
    if local.tx.try_send(request).is_err() {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "busy",
            format!("{QUEUE_MAX} local commands are waiting already; try again"),
        );
    }
    match tokio::time::timeout(std::time::Duration::from_millis(WAIT_MS), answered).await {
        Ok(Ok(r)) => answer(&client_id, &r),
        // Still running, or the agent is going down (a reboot): ask again by id.
        _ => running(&client_id),
    }
}

async fn get_command(State(core): State<Arc<Core>>, Path(client_id): Path<String>) -> Response {
    let id = format!("{ID_PREFIX}{client_id}");
    if !mooring_proto::command::is_valid_command_id(&id) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            "not a local command id",
        );
    }
    let known = core.store().command(&id);
    match known {
        Ok(Some(CommandRecord::Done(bytes))) => match CommandResult::parse(&bytes) {
            Ok(r) => answer(&client_id, &r),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        },
        Ok(Some(CommandRecord::Started)) => running(&client_id),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "command_not_found",
            format!("no local command {client_id}"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

async fn status(State(core): State<Arc<Core>>) -> Response {
    let online = core.link.borrow().is_some();
    let queued = core.store().len();
    Json(json!({
        "device_id": core.device_id.as_str(),
        "online": online,
        "outbox_len": queued,
    }))
    .into_response()
}
