//! The real `mooring-agent` against the real `mooring` server: the outbox carries telemetry
//! across a server outage and restart, in order, each point stored once.

mod support;

use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use support::Server;

fn agent_bin() -> PathBuf {
    // `cargo test --workspace` builds every binary of the workspace into the same directory.
    let path = std::path::Path::new(support::BIN).with_file_name("mooring-agent");
    assert!(
        path.exists(),
        "{} not built; run `cargo test --workspace` (or `cargo build -p mooring-agent`)",
        path.display()
    );
    path
}

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
    let mut agent = Command::new(agent_bin())
        .args(["--server", &server.mqtt.to_string()])
        .arg("--cert")
        .arg(d.cert())
        .arg("--key")
        .arg(d.key())
        .arg("--ca")
        .arg(d.ca())
        .arg("--state-dir")
        .arg(tmp.path().join("agent-state"))
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
