//! The command executor: at-most-once execution of `devices/<id>/commands/<cmd>` requests, built-in and user handlers, durable results.
//!
//! For each request (one at a time, in arrival order):
//!
//! 1. Known id with a result → the stored result is queued again (replay); nothing runs.
//! 2. Known id marked *started* but without a result → the agent died while running it (or
//!    between running and recording). It is **not** run again: the result is `failed`
//!    `{"reason": "interrupted"}`, recorded and queued.
//! 3. `expires_at` in the past → `failed` `{"reason": "expired"}`, recorded; nothing runs.
//! 4. Otherwise: record *started* (durable), publish the ack (`.../ack`, QoS 1, `{}`), run the
//!    handler, then record the result and queue it on `.../result` **in one durable step**
//!    ([`AgentStore::command_done`]); the outbox delivers it, across outages and restarts.
//!
//! Handlers: injected ones (from [`crate::AgentDeps`], e.g. the simulator's; they may replace a
//! built-in, `reboot` included), the built-ins
//! `ping`, `reboot`, `set_config`, `diagnostics`, then user executables from the config file.
//! Anything else is `failed` `{"reason": "unknown command <name>"}`. A handler runs in its own
//! task: a panic becomes `failed` `{"reason": "handler panicked: ..."}` and the executor, and
//! everything else in the agent, keeps going. Outputs are bounded by [`OUTPUT_BYTES_MAX`].

use crate::config::ExecHandler;
use crate::store::{CommandRecord, Entry};
use crate::Core;
use mooring_proto::command::{
    CommandRequest, CommandResult, ResultStatus, COMMAND_BODY_SIZE_BYTES_MAX,
};
use mooring_proto::Topic;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Largest handler output kept, in bytes of JSON (the result payload must stay under the
/// protocol's 64 KiB).
pub const OUTPUT_BYTES_MAX: usize = COMMAND_BODY_SIZE_BYTES_MAX - 1024;
/// Bytes of a user handler's stderr kept for a failure reason (the tail).
pub const STDERR_TAIL_BYTES_MAX: usize = 4 * 1024;
/// Bound on injected handlers (they have no timeout of their own).
pub const INJECTED_HANDLER_TIMEOUT_SECS: u64 = 300;
/// How long `reboot` waits for its result to be acknowledged before rebooting.
pub const REBOOT_RESULT_WAIT_MS: u64 = 10_000;
/// Command requests buffered between the connection and the executor.
pub const COMMAND_QUEUE_MAX: usize = 16;

/// What a handler answers: `Ok(output)` → `succeeded`, `Err(output)` → `failed`.
pub type Outcome = Result<Value, Value>;

/// A command handler. Injected through [`crate::AgentDeps::handlers`] (tests, simulator);
/// production handlers are the built-ins and [`ExecHandler`]s.
#[async_trait::async_trait]
pub trait CommandHandler: Send + Sync + 'static {
    async fn run(&self, params: Value) -> Outcome;
}

/// `{"reason": why}`.
pub fn reason(why: impl Into<String>) -> Value {
    json!({ "reason": why.into() })
}

/// Runs the executor until its input closes. Errors are store failures.
pub(crate) async fn executor(core: Arc<Core>) -> anyhow::Result<()> {
    // A local command a restart interrupted: no one will ask for it by id again from the
    // server, so it is finished now (`interrupted`, not run again) and syncs like any result.
    let unfinished = core.store().unfinished_commands()?;
    for id in unfinished.iter().filter(|id| crate::local::is_local_id(id)) {
        tracing::warn!(id = %id, "local command was interrupted by a restart; not run again");
        finish(&core, id, failed(reason("interrupted")))?;
    }
    let mut rx = core.commands_rx.lock().await;
    let Some(local) = &core.local else {
        while let Some(msg) = rx.recv().await {
            handle(&core, &msg.topic, &msg.payload).await?;
        }
        return Ok(());
    };
    // Local commands (the local API) share the executor: one at a time, in arrival order.
    let mut local_rx = local.rx.lock().await;
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { return Ok(()) };
                handle(&core, &msg.topic, &msg.payload).await?;
            }
            req = local_rx.recv() => {
                let Some(req) = req else { return Ok(()) };
                handle_local(&core, req).await?;
            }
        }
    }
}

/// A command from the local API: the same steps as one from the server, without the ack, and
/// the result goes back to the local client too.
async fn handle_local(core: &Arc<Core>, l: crate::local::LocalRequest) -> anyhow::Result<()> {
    let id = l.req.id.clone();
    let known = core.store().command(&id)?;
    let result = match known {
        // Asked again: the recorded answer (already queued for the server once).
        Some(CommandRecord::Done(bytes)) => CommandResult::parse(&bytes).ok(),
        Some(CommandRecord::Started) => {
            let r = failed(reason("interrupted"));
            finish(core, &id, r.clone())?;
            Some(r)
        }
        None if l.req.expires_at < core.clock.now_ms() => {
            crate::local::remember(core, &l.req, l.requested_at);
            let r = failed(reason("expired"));
            finish(core, &id, r.clone())?;
            Some(r)
        }
        None => {
            crate::local::remember(core, &l.req, l.requested_at);
            core.store().command_started(&id)?;
            tracing::info!(id = %id, name = %l.req.name, "running local command");
            match run_started(core, l.req).await? {
                Some(r) => Some(r),
                // `reboot` recorded its own result (when it comes back here at all).
                None => match core.store().command(&id)? {
                    Some(CommandRecord::Done(bytes)) => CommandResult::parse(&bytes).ok(),
                    _ => None,
                },
            }
        }
    };
    if let Some(r) = result {
        let _ = l.reply.send(r);
    }
    Ok(())
}

async fn handle(core: &Arc<Core>, topic: &str, payload: &[u8]) -> anyhow::Result<()> {
    let Some(Topic::Command(device, cmd_id)) = Topic::parse(topic) else {
        tracing::debug!(topic, "not a command topic; ignored");
        return Ok(());
    };
    if device != core.device_id {
        return Ok(());
    }
    if crate::local::is_local_id(&cmd_id) {
        tracing::warn!(id = %cmd_id, "a command from the server with a local command's id; ignored");
        return Ok(());
    }
    // The id decides first: a known id is never run again, whatever the payload says.
    let known = core.store().command(&cmd_id)?;
    match known {
        Some(CommandRecord::Done(result)) => {
            tracing::info!(id = %cmd_id, "command already executed; replaying its result");
            let mut store = core.store();
            let seq = store.next_seq();
            store.push(vec![Entry {
                seq,
                topic: Some(Topic::command_result(&core.device_id, &cmd_id)),
                payload: result,
            }])?;
            drop(store);
            core.outbox_changed.notify_one();
            return Ok(());
        }
        Some(CommandRecord::Started) => {
            tracing::warn!(id = %cmd_id, "command was interrupted by a restart; not run again");
            return finish(core, &cmd_id, failed(reason("interrupted")));
        }
        None => {}
    }
    let req = match CommandRequest::parse(payload) {
        Ok(req) if req.id == cmd_id => req,
        Ok(req) => {
            tracing::warn!(topic, id = %req.id, "command id does not match its topic; refused");
            return finish(
                core,
                &cmd_id,
                failed(reason("command id does not match topic")),
            );
        }
        Err(e) => {
            tracing::warn!(topic, error = %e, "invalid command payload; refused");
            return finish(
                core,
                &cmd_id,
                failed(reason(format!("invalid command: {e}"))),
            );
        }
    };
    if req.expires_at < core.clock.now_ms() {
        tracing::info!(id = %req.id, name = %req.name, "command expired; not run");
        return finish(core, &req.id, failed(reason("expired")));
    }
    core.store().command_started(&req.id)?;
    if let Some(link) = core.link.borrow().clone() {
        // Best effort: a result without an ack counts as both.
        link.try_publish(
            &Topic::command_ack(&core.device_id, &req.id),
            mooring_proto::command::ack_payload(),
            1,
            None,
        );
    }
    tracing::info!(id = %req.id, name = %req.name, "running command");
    run_started(core, req).await.map(|_| ())
}

/// Runs a command already recorded as started, records its result and queues it. The result,
/// or `None` for `reboot` (it records its own before rebooting).
async fn run_started(
    core: &Arc<Core>,
    req: CommandRequest,
) -> anyhow::Result<Option<CommandResult>> {
    if req.name == "reboot" && !core.handlers.contains_key("reboot") {
        return reboot(core, &req).await.map(|_| None);
    }
    let ota = matches!(
        req.name.as_str(),
        mooring_proto::ota::UPDATE_COMMAND | mooring_proto::ota::CANCEL_COMMAND
    );
    let result = if ota && !core.handlers.contains_key(&req.name) {
        // Answered as soon as the updater has journaled it; progress goes on `ota/status`.
        outcome_to_result(crate::ota::agent::request(core, &req.name, req.params).await)
    } else {
        core.commands_running
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let r = run_handler(core, &req.name, req.params).await;
        core.commands_running
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        r
    };
    finish(core, &req.id, result.clone())?;
    Ok(Some(result))
}

fn failed(output: Value) -> CommandResult {
    CommandResult {
        status: ResultStatus::Failed,
        output,
        local: None,
    }
}

fn outcome_to_result(outcome: Outcome) -> CommandResult {
    let (status, output) = match outcome {
        Ok(o) => (ResultStatus::Succeeded, o),
        Err(o) => (ResultStatus::Failed, o),
    };
    let size = serde_json::to_vec(&output).map(|v| v.len()).unwrap_or(0);
    if size > OUTPUT_BYTES_MAX {
        return failed(reason(format!(
            "output is {size} bytes, more than {OUTPUT_BYTES_MAX}"
        )));
    }
    CommandResult {
        status,
        output,
        local: None,
    }
}

/// Attempts at recording a result before giving up (a failed flash write changes nothing, so
/// trying again is safe; without the record the server would wait for this result forever).
pub const FINISH_ATTEMPTS_MAX: usize = 5;

/// Records the result and queues it, in one durable step (retried on a failed write).
fn finish(core: &Core, id: &str, mut result: CommandResult) -> anyhow::Result<()> {
    if result.local.is_none() && crate::local::is_local_id(id) {
        // What ran and when: the server records it as executed locally.
        result.local = Some(crate::local::execution(core, id));
        if result.to_bytes().len() > COMMAND_BODY_SIZE_BYTES_MAX {
            // The server refuses a larger result: the params go first, then the output.
            if let Some(l) = &mut result.local {
                l.params = json!({"truncated": true});
            }
        }
        if result.to_bytes().len() > COMMAND_BODY_SIZE_BYTES_MAX {
            result.status = ResultStatus::Failed;
            result.output = reason("output too large to sync");
        }
    }
    let payload = result.to_bytes();
    let topic = Topic::command_result(&core.device_id, id);
    let mut attempt = 1;
    loop {
        let mut store = core.store();
        let seq = store.next_seq();
        let done = store.command_done(
            id,
            payload.clone(),
            Entry {
                seq,
                topic: Some(topic.clone()),
                payload: payload.clone(),
            },
        );
        drop(store);
        match done {
            Ok(_) => break,
            Err(e) if attempt < FINISH_ATTEMPTS_MAX => {
                tracing::warn!(id, attempt, error = %e, "recording a command result failed; retrying");
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    core.outbox_changed.notify_one();
    Ok(())
}

/// Finds and runs the handler for `name` in its own task (panics contained, time bounded).
pub(crate) async fn run_handler(core: &Arc<Core>, name: &str, params: Value) -> CommandResult {
    let injected_timeout = Duration::from_secs(INJECTED_HANDLER_TIMEOUT_SECS);
    let task: tokio::task::JoinHandle<Outcome> = if let Some(h) = core.handlers.get(name) {
        let h = h.clone();
        tokio::spawn(async move {
            tokio::time::timeout(injected_timeout, h.run(params))
                .await
                .unwrap_or_else(|_| Err(reason("timed out")))
        })
    } else if let Some(exec) = core.config.handlers.get(name) {
        let exec = exec.clone();
        tokio::spawn(async move { run_exec(&exec, params).await })
    } else {
        match name {
            "ping" => {
                let now = core.clock.now_ms();
                return outcome_to_result(Ok(json!({"pong": true, "ts": now})));
            }
            "set_config" => return outcome_to_result(set_config(core, params)),
            "diagnostics" => return outcome_to_result(Ok(diagnostics(core))),
            crate::rotate::ROTATE_COMMAND => {
                return outcome_to_result(crate::rotate::request(core))
            }
            _ => return failed(reason(format!("unknown command {name}"))),
        }
    };
    // Owned: aborted if the executor is stopped while it runs.
    let abort = AbortOnDrop(task.abort_handle());
    let joined = task.await;
    drop(abort);
    match joined {
        Ok(outcome) => outcome_to_result(outcome),
        Err(e) if e.is_panic() => {
            let why = match e.try_into_panic() {
                Ok(p) => p
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default(),
                Err(_) => String::new(),
            };
            tracing::error!(command = name, panic = %why, "command handler panicked");
            core.diag.error(format!("handler {name} panicked: {why}"));
            failed(reason(format!("handler panicked: {why}")))
        }
        Err(_) => failed(reason("handler cancelled")),
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `set_config`: merges `params` (an object; JSON Merge Patch, `null` deletes) into the local
/// config document (`<state dir>/config.json`) and answers the new config.
fn set_config(core: &Core, params: Value) -> Outcome {
    let Value::Object(patch) = params else {
        return Err(reason("params must be a JSON object"));
    };
    let mut store = core.store();
    let mut config = match store.doc(crate::CONFIG_DOC) {
        Ok(Some(Value::Object(m))) => m,
        Ok(_) => Map::new(),
        Err(e) => return Err(reason(format!("reading config: {e}"))),
    };
    mooring_proto::shadow::merge(&mut config, &patch);
    let config = Value::Object(config);
    store
        .put_doc(crate::CONFIG_DOC, &config)
        .map_err(|e| reason(format!("writing config: {e}")))?;
    Ok(config)
}

/// `diagnostics`: version, uptime, outbox depth and drops (all, and other than telemetry), last errors, recent log lines, link quality;
/// log lines are trimmed (oldest first) to keep the output under [`OUTPUT_BYTES_MAX`].
fn diagnostics(core: &Core) -> Value {
    let (depth, dropped, precious) = {
        let store = core.store();
        (
            store.len(),
            store.dropped_total(),
            store.dropped_precious_total(),
        )
    };
    let mut logs = core.diag.logs.snapshot();
    loop {
        let v = json!({
            "agent_version": crate::VERSION,
            "firmware_version": core.config.firmware_version,
            "uptime_secs": core.started_at.elapsed().as_secs(),
            "outbox_depth": depth,
            "outbox_dropped_total": dropped,
            // Of those, results and status reports (dropped only when nothing else was left).
            "outbox_dropped_precious_total": precious,
            "errors": core.diag.errors.snapshot(),
            "logs": logs,
            "link": core.diag.link.to_json(),
        });
        let size = v.to_string().len();
        if size <= OUTPUT_BYTES_MAX || logs.is_empty() {
            return v;
        }
        let cut = logs.len().div_ceil(4);
        logs.drain(..cut);
    }
}

/// `reboot`: refused unless a reboot command is configured. Otherwise the result
/// (`succeeded`, `{"rebooting": true}`) is recorded and queued first, the agent waits (bounded)
/// until the server acknowledged it, and only then runs the reboot command: a reboot never
/// loses its own result, and a redelivered `reboot` is answered from the record, not rerun.
async fn reboot(core: &Arc<Core>, req: &CommandRequest) -> anyhow::Result<()> {
    let Some(argv) = core.config.reboot_command.clone() else {
        return finish(core, &req.id, failed(reason("reboot not configured")));
    };
    finish(
        core,
        &req.id,
        CommandResult {
            status: ResultStatus::Succeeded,
            output: json!({"rebooting": true}),
            local: None,
        },
    )?;
    let seq = core.store().next_seq().saturating_sub(1);
    let sent = async {
        loop {
            let first = core.store().peek_after(seq.saturating_sub(1), 1)?;
            if first.first().is_none_or(|e| e.seq != seq) {
                return anyhow::Ok(());
            }
            // Production-only wait on the outbox; bounded below.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    if tokio::time::timeout(Duration::from_millis(REBOOT_RESULT_WAIT_MS), sent)
        .await
        .is_err()
    {
        tracing::warn!("reboot result not acknowledged in time; rebooting anyway");
    }
    let Some((prog, args)) = argv.split_first() else {
        return Ok(());
    };
    tracing::warn!(program = %prog, "rebooting on command");
    crate::boots::record_stop(core);
    match tokio::process::Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .status()
        .await
    {
        Ok(status) if status.success() => {}
        Ok(status) => {
            crate::boots::record_running(core);
            core.diag
                .error(format!("reboot command exited with {status}"))
        }
        Err(e) => {
            crate::boots::record_running(core);
            core.diag
                .error(format!("reboot command failed to start: {e}"))
        }
    }
    Ok(())
}

/// Runs a user handler: params JSON on stdin, output JSON on stdout (bounded), killed at its
/// timeout. Non-zero exit, timeout or non-JSON output → failed with the stderr tail.
pub async fn run_exec(h: &ExecHandler, params: Value) -> Outcome {
    let mut child = tokio::process::Command::new(&h.exec)
        .args(&h.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| reason(format!("cannot start {}: {e}", h.exec.display())))?;
    let input = params.to_string().into_bytes();
    let mut stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let work = async {
        let feed = async {
            if let Some(mut s) = stdin.take() {
                // A handler that does not read its stdin is fine.
                let _ = s.write_all(&input).await;
                let _ = s.shutdown().await;
            }
        };
        let read_out = read_bounded(stdout, OUTPUT_BYTES_MAX + 1);
        let read_err = read_tail(stderr, STDERR_TAIL_BYTES_MAX);
        let ((), out, err) = tokio::join!(feed, read_out, read_err);
        let status = child.wait().await;
        (status, out, err)
    };
    let timeout = Duration::from_secs(h.timeout_secs);
    let (status, out, err) = match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => {
            // kill_on_drop reaps it when `child` goes out of scope.
            return Err(json!({"reason": format!("timed out after {} s", h.timeout_secs)}));
        }
    };
    let stderr_tail = String::from_utf8_lossy(&err).into_owned();
    let status = status.map_err(|e| reason(format!("waiting for handler: {e}")))?;
    if !status.success() {
        return Err(
            json!({"reason": format!("handler exited with {status}"), "stderr": stderr_tail}),
        );
    }
    if out.len() > OUTPUT_BYTES_MAX {
        return Err(reason(format!(
            "output larger than {OUTPUT_BYTES_MAX} bytes"
        )));
    }
    if out.trim_ascii().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&out).map_err(
        |e| json!({"reason": format!("handler output is not JSON: {e}"), "stderr": stderr_tail}),
    )
}

/// Reads everything, keeping only the first `max` bytes (the rest is drained so the writer
/// never blocks on a full pipe).
async fn read_bounded<R: tokio::io::AsyncRead + Unpin>(r: Option<R>, max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let Some(mut r) = r else { return out };
    let mut buf = [0u8; 4096];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = max.saturating_sub(out.len());
        out.extend_from_slice(&buf[..n.min(room)]);
    }
    out
}

/// Reads everything, keeping only the last `max` bytes.
async fn read_tail<R: tokio::io::AsyncRead + Unpin>(r: Option<R>, max: usize) -> Vec<u8> {
    let mut tail = Vec::new();
    let Some(mut r) = r else { return tail };
    let mut buf = [0u8; 4096];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > max {
            tail.drain(..tail.len() - max);
        }
    }
    tail
}

/// The injected handlers, by command name.
pub type Handlers = BTreeMap<String, Arc<dyn CommandHandler>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, timeout_secs: u64) -> ExecHandler {
        ExecHandler {
            exec: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            timeout_secs,
        }
    }

    #[tokio::test]
    async fn exec_handler_gets_params_on_stdin_and_answers_json() {
        let h = sh(r#"read p; printf '{"got": %s}' "$p""#, 10);
        assert_eq!(
            run_exec(&h, json!({"a": 1})).await,
            Ok(json!({"got": {"a": 1}}))
        );
    }

    #[tokio::test]
    async fn exec_handler_failure_carries_the_stderr_tail() {
        let h = sh("echo oops >&2; exit 3", 10);
        let out = run_exec(&h, Value::Null)
            .await
            .expect_err("non-zero exit fails");
        assert!(
            out["reason"].as_str().unwrap_or("").contains("exit"),
            "{out}"
        );
        assert_eq!(out["stderr"], json!("oops\n"));
        let h = sh("echo not-json", 10);
        assert!(run_exec(&h, Value::Null).await.is_err());
        let h = ExecHandler {
            exec: "/nonexistent/prog".into(),
            args: vec![],
            timeout_secs: 1,
        };
        assert!(run_exec(&h, Value::Null).await.is_err());
    }

    #[tokio::test]
    async fn exec_handler_is_killed_at_its_timeout() {
        let h = sh("sleep 30", 1);
        let out = run_exec(&h, Value::Null).await.expect_err("times out");
        assert!(
            out["reason"].as_str().unwrap_or("").contains("timed out"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn exec_handler_output_is_bounded() {
        let h = sh("head -c 200000 /dev/zero | tr '\\0' 'x'", 10);
        let out = run_exec(&h, Value::Null).await.expect_err("too large");
        assert!(
            out["reason"].as_str().unwrap_or("").contains("larger"),
            "{out}"
        );
    }
}
