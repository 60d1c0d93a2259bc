//! The CLI as a script uses it: exit statuses that tell how a command ended, `--output json`
//! that is the API's body (for jq), tables with human times, help on every argument.

mod support;

use serde_json::{json, Value};
use support::{MqttDevice, Server};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs the CLI off the async runtime (it blocks until the command ends).
async fn cli(server: &std::sync::Arc<Server>, args: &[&str]) -> std::process::Output {
    let server = server.clone();
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        server.cli(&args)
    })
    .await
    .expect("cli task")
}

fn looks_like_rfc3339(s: &str) -> bool {
    // e.g. 2026-11-30T08:15:02Z
    s.split_whitespace().any(|w| {
        let b = w.as_bytes();
        b.len() == 20 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b[19] == b'Z'
    })
}

#[tokio::test]
async fn command_send_wait_ms_exit_status_tells_how_the_command_ended() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = std::sync::Arc::new(Server::start(&tmp.path().join("data")));
    let d1 = server.create_device("d1", tmp.path());
    server.create_device("d2", tmp.path());
    let mut dev = MqttDevice::connect(&server, &d1, "d1").await;
    dev.subscribe("devices/d1/commands/+").await;
    // The device: the first command succeeds, the second fails.
    let device = tokio::spawn(async move {
        for outcome in ["succeeded", "failed"] {
            let (topic, _) = dev.next_json().await;
            let id = topic.rsplit('/').next().unwrap_or("").to_owned();
            let result = format!(r#"{{"status":"{outcome}","output":{{"n":1}}}}"#);
            dev.publish(&format!("devices/d1/commands/{id}/result"), &result)
                .await;
        }
        dev
    });

    let ok = cli(
        &server,
        &[
            "command",
            "send",
            "--to",
            "d1",
            "ping",
            "--wait-ms",
            "20000",
        ],
    )
    .await;
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stderr));
    let shown = text(&ok.stdout);
    assert!(shown.contains("succeeded"), "{shown}");
    assert!(looks_like_rfc3339(&shown), "human times: {shown}");

    let failed = cli(
        &server,
        &[
            "command",
            "send",
            "--to",
            "d1",
            "ping",
            "--wait-ms",
            "20000",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed.stderr));
    let c: Value = serde_json::from_slice(&failed.stdout).expect("json");
    assert_eq!(c["state"], "failed");
    let _dev = device.await.expect("device task");

    // d2 is offline: not final within the wait.
    let pending = cli(
        &server,
        &[
            "command",
            "send",
            "--to",
            "d2",
            "ping",
            "--wait-ms",
            "300",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(pending.status.code(), Some(3), "{}", text(&pending.stderr));
    let c: Value = serde_json::from_slice(&pending.stdout).expect("json");
    assert_eq!(c["state"], "queued");
    let id = c["id"].as_str().expect("id");
    let show = cli(&server, &["command", "show", id, "--wait-ms", "200"]).await;
    assert_eq!(show.status.code(), Some(3), "{}", text(&show.stderr));
    // Without --wait-ms the status says only that the call worked.
    let show = cli(&server, &["command", "show", id]).await;
    assert_eq!(show.status.code(), Some(0), "{}", text(&show.stderr));
    let cancel = cli(&server, &["command", "cancel", "d2", id]).await;
    assert_eq!(cancel.status.code(), Some(0), "{}", text(&cancel.stderr));
    let show = cli(&server, &["command", "show", id, "--wait-ms", "200"]).await;
    assert_eq!(
        show.status.code(),
        Some(1),
        "canceled: {}",
        text(&show.stdout)
    );

    // A fleet command is not waited for: --wait-ms is refused as `send` refuses it, not
    // answered with 0 (success) for a fleet command that is not done.
    let fleet = cli(
        &server,
        &["command", "send", "--to", "id:d2", "ping", "-o", "json"],
    )
    .await;
    assert_eq!(fleet.status.code(), Some(0), "{}", text(&fleet.stderr));
    let f: Value = serde_json::from_slice(&fleet.stdout).expect("json");
    assert_eq!(f["done"], false);
    let fid = f["id"].as_str().expect("fleet id");
    let show = cli(&server, &["command", "show", fid, "--wait-ms", "200"]).await;
    assert_eq!(show.status.code(), Some(2), "{}", text(&show.stdout));
    assert!(
        text(&show.stderr).contains("--wait-ms"),
        "{}",
        text(&show.stderr)
    );

    // The exit statuses are in --help.
    let help = cli(&server, &["command", "send", "--help"]).await;
    let help = text(&help.stdout);
    assert!(help.contains("3 not final within the wait"), "{help}");
}

#[tokio::test]
async fn output_json_is_the_api_body_and_tables_show_human_times() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = std::sync::Arc::new(Server::start(&tmp.path().join("data")));
    server.create_device("d1", tmp.path());
    let tag = cli(&server, &["device", "tag", "d1", "site=berlin"]).await;
    assert!(tag.status.success(), "{}", text(&tag.stderr));
    for _ in 0..2 {
        let (status, _) = server
            .api(
                "POST",
                "/api/v1/devices/d1/commands",
                Some(json!({"name": "ping"})),
            )
            .await;
        assert_eq!(status, 202);
    }

    let (_, api_device) = server.api("GET", "/api/v1/devices/d1", None).await;
    let out = cli(&server, &["device", "show", "d1", "--output", "json"]).await;
    let cli_device: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(cli_device, api_device);

    let (_, api_list) = server.api("GET", "/api/v1/devices", None).await;
    let out = cli(&server, &["device", "list", "-o", "json"]).await;
    let cli_list: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(cli_list, api_list);

    let (_, api_cmds) = server
        .api("GET", "/api/v1/devices/d1/commands?limit=1000", None)
        .await;
    let out = cli(&server, &["command", "list", "d1", "--output", "json"]).await;
    let cli_cmds: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(cli_cmds, api_cmds);

    // Tables: no raw unix milliseconds, RFC 3339 and "never" instead.
    let created_ms = api_device["created_at"].as_u64().expect("created_at");
    for args in [
        &["device", "show", "d1"][..],
        &["device", "list"][..],
        &["command", "list", "d1"][..],
    ] {
        let out = cli(&server, args).await;
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        let table = text(&out.stdout);
        assert!(looks_like_rfc3339(&table), "{args:?}: {table}");
        assert!(!table.contains(&created_ms.to_string()), "{table}");
    }
    let list = text(&cli(&server, &["device", "list"]).await.stdout);
    let row = list.lines().find(|l| l.starts_with("d1")).expect("d1 row");
    assert!(
        row.contains("never") && row.contains("site=berlin"),
        "{row}"
    );

    // A bad --output value is a usage error naming the choices.
    let bad = cli(&server, &["device", "list", "--output", "yaml"]).await;
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad.stderr).contains("table"), "{}", text(&bad.stderr));
}
