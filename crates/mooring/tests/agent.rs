//! The real `mooring-agent` against the real `mooring` server: the outbox carries telemetry
//! across a server outage and restart, in order, each point stored once.

mod support;

use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use support::Server;

fn seqs(v: &Value) -> Vec<f64> {
    v["points"]
        .as_array()
        .map(|p| p.iter().filter_map(|x| x["value"].as_f64()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn agent_outbox_survives_server_restart_in_order_without_duplicates() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let d = server.create_device("cart-7", tmp.path());
    let mut agent = support::agent_command(&server, &d, &tmp.path().join("agent-state"))
        .args([
            "--interval-secs",
            "0",
            "--input",
            "-",
            "--exit-when-drained",
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mooring-agent");
    let mut stdin = agent.stdin.take().expect("stdin");
    for i in 0..3 {
        writeln!(stdin, "{{\"n\":{i}}}").expect("write");
    }
    stdin.flush().expect("flush");
    server
        .wait_for("/api/v1/devices/cart-7/telemetry?metric=n", |v| {
            seqs(v).len() == 3
        })
        .await;

    // Server outage: the agent keeps accepting input into its outbox.
    let (mqtt, http) = (server.mqtt.to_string(), server.http.to_string());
    server.kill9();
    for i in 3..8 {
        writeln!(stdin, "{{\"n\":{i}}}").expect("write");
    }
    stdin.flush().expect("flush");
    let server = Server::start_with(&data, &mqtt, &http, &[]);
    drop(stdin); // end of input: the agent exits once its outbox is drained
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let status = loop {
        if let Some(status) = agent.try_wait().expect("try_wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = agent.kill();
            panic!("agent did not drain its outbox and exit");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(status.success(), "agent exit: {status}");
    let (_, v) = server
        .api("GET", "/api/v1/devices/cart-7/telemetry?metric=n", None)
        .await;
    assert_eq!(
        seqs(&v),
        vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
        "{v}"
    );
}

/// A running `mooring-agent` for device `creds` (metrics off), killed on drop.
struct Agent {
    child: std::process::Child,
}

impl Agent {
    fn start(
        server: &Server,
        creds: &support::Creds,
        state: &std::path::Path,
        config: &std::path::Path,
    ) -> Agent {
        let child = support::agent_command(server, creds, state)
            .arg("--config")
            .arg(config)
            .args(["--interval-secs", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mooring-agent");
        Agent { child }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Agent config with a `count` handler that appends a line to `runs` each time it executes,
/// sleeping `sleep_secs` before answering.
fn counting_config(dir: &std::path::Path, runs: &std::path::Path, sleep_secs: u32) -> PathBuf {
    let path = dir.join("agent.toml");
    let script = format!(
        "cat >/dev/null; echo run >> {}; sleep {sleep_secs}; echo '{{\"counted\":true}}'",
        runs.display()
    );
    std::fs::write(
        &path,
        format!(
            "[handlers.count]\nexec = \"/bin/sh\"\nargs = [\"-c\", {script:?}]\ntimeout_secs = 60\n"
        ),
    )
    .expect("write agent config");
    path
}

fn runs(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// Waits (bounded) until command `cmd` of `device` is final; returns it.
async fn wait_final(server: &Server, device: &str, cmd: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (status, v) = server
            .api(
                "GET",
                &format!("/api/v1/devices/{device}/commands/{cmd}?wait_ms=10000"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{v}");
        if matches!(
            v["state"].as_str(),
            Some("succeeded" | "failed" | "expired" | "canceled")
        ) {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "command never finished: {v}"
        );
    }
}

#[tokio::test]
async fn command_queued_while_agent_offline_runs_exactly_once_after_it_connects() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let d = server.create_device("lock-9", tmp.path());
    let runs_file = tmp.path().join("runs");
    let config = counting_config(tmp.path(), &runs_file, 0);

    let (status, cmd) = server
        .api(
            "POST",
            "/api/v1/devices/lock-9/commands",
            Some(serde_json::json!({"name": "count"})),
        )
        .await;
    assert_eq!(status, 202, "{cmd}");
    assert_eq!(cmd["state"], "queued");
    let id = cmd["id"].as_str().expect("id").to_owned();

    let state = tmp.path().join("agent-state");
    let mut agent = Agent::start(&server, &d, &state, &config);
    let done = wait_final(&server, "lock-9", &id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["result"]["output"]["counted"], true);
    let states: Vec<&str> = done["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|h| h["state"].as_str())
        .collect();
    assert_eq!(states, ["queued", "delivered", "acknowledged", "succeeded"]);

    // Restart the agent: nothing runs again. A second command (sync path) proves the agent is
    // connected and subscribed again before we count.
    agent.kill9();
    let _agent = Agent::start(&server, &d, &state, &config);
    let (status, ping) = server
        .api(
            "POST",
            "/api/v1/devices/lock-9/commands?wait_ms=20000",
            Some(serde_json::json!({"name": "ping"})),
        )
        .await;
    assert_eq!(status, 202, "{ping}");
    assert_eq!(ping["state"], "succeeded", "sync path answered: {ping}");
    assert_eq!(ping["result"]["output"]["pong"], true);
    assert_eq!(runs(&runs_file), 1, "the command ran exactly once");
}

#[tokio::test]
async fn agent_killed_mid_command_never_runs_it_twice() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let d = server.create_device("lock-10", tmp.path());
    let runs_file = tmp.path().join("runs");
    let config = counting_config(tmp.path(), &runs_file, 30);
    let state = tmp.path().join("agent-state");
    let mut agent = Agent::start(&server, &d, &state, &config);
    server
        .wait_for("/api/v1/devices/lock-10", |v| v["online"] == true)
        .await;
    let (_, cmd) = server
        .api(
            "POST",
            "/api/v1/devices/lock-10/commands",
            Some(serde_json::json!({"name": "count"})),
        )
        .await;
    let id = cmd["id"].as_str().expect("id").to_owned();

    // Kill the agent while the handler runs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while runs(&runs_file) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "handler never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    agent.kill9();

    // On reconnect the server redelivers; the agent knows it started it and reports that it
    // was interrupted instead of running it again.
    let _agent = Agent::start(&server, &d, &state, &config);
    let done = wait_final(&server, "lock-10", &id).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["result"]["output"]["reason"], "interrupted", "{done}");
    assert_eq!(runs(&runs_file), 1);
}

#[tokio::test]
async fn shadow_desired_state_reaches_the_agent_and_is_reported_back() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let d = server.create_device("lamp-1", tmp.path());
    let config = tmp.path().join("agent.toml");
    std::fs::write(&config, "firmware_version = \"1.4.0\"\n").expect("config");
    let (status, v) = server
        .api(
            "PATCH",
            "/api/v1/devices/lamp-1/shadow",
            Some(serde_json::json!({"desired": {"led": "on", "hz": 2}})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let _agent = Agent::start(&server, &d, &tmp.path().join("state"), &config);
    let shadow = server
        .wait_for("/api/v1/devices/lamp-1/shadow", |v| {
            // The connect report (versions) and the delta report are separate updates in
            // either order: wait for both.
            v["reported"]["led"] == "on"
                && v["reported"]["version"] == "1.4.0"
                && v["delta"].as_object().is_some_and(|m| m.is_empty())
        })
        .await;
    assert_eq!(shadow["reported"]["hz"], 2);
    assert_eq!(shadow["reported"]["version"], "1.4.0", "{shadow}");
    // The reported firmware version makes the device selectable by version.
    let (_, list) = server
        .api("GET", "/api/v1/devices?selector=version%3D1.4.0", None)
        .await;
    assert_eq!(list["devices"][0]["id"], "lamp-1", "{list}");
}
