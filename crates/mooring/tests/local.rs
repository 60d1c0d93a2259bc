//! Local control (issue 20, docs/edge.md): the real `mooring-agent` serves its local API on a
//! Unix socket, spoken to with curl; the real server hands out the key and records what ran
//! locally once the device is back.

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{Creds, Server};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent with its local API on `socket` and a `slow` handler (sleeps 30 s).
fn agent(server_mqtt: &str, creds: &Creds, state: &Path, socket: &Path) -> Killed {
    let config = state.with_extension("toml");
    std::fs::write(
        &config,
        "[handlers.slow]\nexec = \"/bin/sleep\"\nargs = [\"30\"]\ntimeout_secs = 60\n",
    )
    .expect("agent config");
    Killed(
        support::agent_command_at(server_mqtt, creds, state)
            .arg("--config")
            .arg(&config)
            .arg("--local-socket")
            .arg(socket)
            .args(["--interval-secs", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mooring-agent"),
    )
}

/// `POST /v1/commands` with `body`: (status, answer).
fn run(socket: &Path, body: &str, key: &str) -> (u16, Value) {
    local(socket, "POST", "/v1/commands", Some(body), key)
}

/// An HTTP request to the local API over its Unix socket with curl: (status, JSON body).
fn local(socket: &Path, method: &str, path: &str, body: Option<&str>, key: &str) -> (u16, Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "40", "-o", "-", "-w", "\n%{http_code}"])
        .arg("--unix-socket")
        .arg(socket)
        .args(["-X", method])
        .args(["-H", &format!("Authorization: Bearer {key}")]);
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data", b]);
    }
    cmd.arg(format!("http://device{path}"));
    let out = cmd.output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("status line");
    let code: u16 = code.trim().parse().expect("status");
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Waits (bounded) for the agent to hold its key and for its local API to answer with it.
fn wait_for_key(state: &Path, socket: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let file: PathBuf = state.join("local.key");
    loop {
        if let Ok(bytes) = std::fs::read(&file) {
            let v: Value = serde_json::from_slice(&bytes).expect("key file");
            let key = v["key"].as_str().expect("key").to_owned();
            if local(socket, "GET", "/v1/status", None, &key).0 == 200 {
                return key;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the agent never got its local key"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn local_commands(list: &Value) -> Vec<&Value> {
    list["commands"]
        .as_array()
        .map(|a| a.iter().filter(|c| c["origin"] == "local").collect())
        .unwrap_or_default()
}

/// The cloud goes away: commands on the local API keep working (the same handlers, the same
/// at-most-once record by id), survive a power loss of the device once answered, and reach the
/// server exactly once, in order, marked as executed locally with the device's times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_commands_work_offline_survive_power_loss_and_sync_once_in_order() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let creds = server.create_device("lock-1", tmp.path());
    let state = tmp.path().join("state");
    let socket = tmp.path().join("local.sock");
    let mqtt = server.mqtt.to_string();
    let mut device = agent(&mqtt, &creds, &state, &socket);
    let key = wait_for_key(&state, &socket);

    // The operator reads the same key; the read is audited.
    let out = server.cli(&["device", "local-key", "lock-1"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), key);
    let audit = server
        .wait_for("/api/v1/audit?action=device.local_key", |v| {
            v["entries"].as_array().is_some_and(|a| !a.is_empty())
        })
        .await;
    assert_eq!(
        audit["entries"][0]["target"],
        "/api/v1/devices/lock-1/local-key"
    );
    let (status, body) = server
        .api("GET", "/api/v1/devices/nope/local-key", None)
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("device_not_found"))
    );

    // A wrong key or none is refused, with a JSON error.
    let (status, body) = local(&socket, "GET", "/v1/status", None, &"0".repeat(64));
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, body) = local(&socket, "GET", "/v1/status", None, "");
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );

    // The server never uses a local command's id space for its own commands.
    let (status, body) = server
        .api(
            "POST",
            "/api/v1/devices/lock-1/commands",
            Some(serde_json::json!({"name": "ping", "idempotency_key": "l-a1"})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_idempotency_key"))
    );

    // The cloud goes down.
    server.stop();
    let (status, body) = run(&socket, r#"{"id":"a1","name":"ping"}"#, &key);
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("succeeded")),
        "{body}"
    );
    let (status, body) = run(&socket, r#"{"id":"a2","name":"diagnostics"}"#, &key);
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("succeeded")),
        "{body}"
    );
    let (status, body) = run(&socket, r#"{"id":"a3","name":"no-such-handler"}"#, &key);
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("failed")),
        "{body}"
    );
    assert!(body["output"]["reason"]
        .as_str()
        .unwrap_or("")
        .contains("unknown command"));
    // Asked again with the same id: the recorded answer, nothing runs or syncs twice.
    let (status, again) = run(&socket, r#"{"id":"a3","name":"ping"}"#, &key);
    assert_eq!(
        (status, again["status"].as_str()),
        (200, Some("failed")),
        "{again}"
    );
    let (status, got) = local(&socket, "GET", "/v1/commands/a2", None, &key);
    assert_eq!((status, got["status"].as_str()), (200, Some("succeeded")));
    let (status, _) = local(&socket, "GET", "/v1/commands/zz", None, &key);
    assert_eq!(status, 404);
    for bad in [
        r#"{"name":"bad name"}"#,
        r#"{"id":"a/b","name":"ping"}"#,
        r#"{"name":"ping","other":1}"#,
        "not json",
    ] {
        let (status, body) = local(&socket, "POST", "/v1/commands", Some(bad), &key);
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].is_string(), "{bad}: {body}");
    }
    let (status, st) = local(&socket, "GET", "/v1/status", None, &key);
    assert_eq!(status, 200);
    assert_eq!(st["device_id"], "lock-1");

    // Power loss right after the answers, with one more command still running: kill -9, start
    // again, still offline.
    let mut slow = Command::new("curl")
        .args(["-sS", "--max-time", "40", "-o", "/dev/null"])
        .arg("--unix-socket")
        .arg(&socket)
        .args(["-H", &format!("Authorization: Bearer {key}")])
        .args(["-H", "Content-Type: application/json"])
        .args([
            "--data",
            r#"{"id":"s1","name":"slow"}"#,
            "http://device/v1/commands",
        ])
        .spawn()
        .expect("curl");
    let deadline = Instant::now() + Duration::from_secs(30);
    while local(&socket, "GET", "/v1/commands/s1", None, &key).0 != 202 {
        assert!(Instant::now() < deadline, "the slow command never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = device.0.kill();
    let _ = device.0.wait();
    drop(device);
    let _device = agent(&mqtt, &creds, &state, &socket);
    let key_after = wait_for_key(&state, &socket);
    assert_eq!(key_after, key, "the key is kept across a restart");
    let _ = slow.wait();
    // The interrupted one is finished, not run again.
    let (status, body) = local(&socket, "GET", "/v1/commands/s1", None, &key);
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("failed")),
        "{body}"
    );
    assert_eq!(body["output"]["reason"], "interrupted");
    let (status, body) = run(
        &socket,
        r#"{"id":"a4","name":"ping","params":{"door":2}}"#,
        &key,
    );
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("succeeded")),
        "{body}"
    );

    // The cloud comes back on the same address: everything syncs, once, in order.
    let server = Server::start_with(&data, &mqtt, "127.0.0.1:0", &[]);
    let list = server
        .wait_for("/api/v1/devices/lock-1/commands?limit=100", |v| {
            local_commands(v).len() >= 5
        })
        .await;
    // A moment for anything sent twice to arrive; then count again.
    server
        .wait_for("/api/v1/devices/lock-1", |v| v["online"] == true)
        .await;
    let (_, list2) = server
        .api("GET", "/api/v1/devices/lock-1/commands?limit=100", None)
        .await;
    assert_eq!(local_commands(&list2).len(), 5, "{list2}");
    let locals = local_commands(&list);
    // Newest first: a4, the interrupted s1 (finished at the restart), a3, a2, a1.
    let keys: Vec<&str> = locals
        .iter()
        .map(|c| c["idempotency_key"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(keys, ["l-a4", "l-s1", "l-a3", "l-a2", "l-a1"]);
    let states: Vec<&str> = locals
        .iter()
        .map(|c| c["state"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        states,
        ["succeeded", "failed", "failed", "succeeded", "succeeded"]
    );
    assert_eq!(locals[1]["result"]["output"]["reason"], "interrupted");
    let locals: Vec<&Value> = locals
        .into_iter()
        .filter(|c| c["idempotency_key"] != "l-s1")
        .collect();
    assert_eq!(locals[0]["name"], "ping");
    assert_eq!(locals[0]["params"]["door"], 2);
    assert_eq!(locals[1]["name"], "no-such-handler");
    assert_eq!(locals[2]["name"], "diagnostics");
    // The device's own times, in the order the commands were asked; synced afterwards.
    let created: Vec<u64> = locals
        .iter()
        .map(|c| c["created_at"].as_u64().expect("created_at"))
        .collect();
    assert!(created.windows(2).all(|w| w[0] >= w[1]), "{created:?}");
    for c in &locals {
        let synced = c["synced_at"].as_u64().expect("synced_at");
        assert!(synced >= c["created_at"].as_u64().expect("created"), "{c}");
        assert_eq!(c["attempts"], 0, "never sent by the server");
    }
}
