//! Live events (`GET /api/v1/events`, Server-Sent Events) seen by real clients: a hand-rolled
//! SSE reader over reqwest, a raw TCP client that stops reading, the `mooring events` CLI.

mod support;

use serde_json::{json, Value};
use std::time::Duration;
use support::{config_args, Creds, MqttDevice, Msg, Server, Sse, WAIT};

fn start_configured(dir: &std::path::Path, toml: &str) -> Server {
    let cfg = config_args(dir, toml);
    let cfg: Vec<&str> = cfg.iter().map(String::as_str).collect();
    Server::start_with(&dir.join("data"), "127.0.0.1:0", "127.0.0.1:0", &cfg)
}

fn is(m: &Msg, kind: &str, device: &str) -> bool {
    m.event == kind && m.data["kind"] == kind && m.data["device_id"] == device
}

async fn telemetry(dev: &mut MqttDevice, seq: u64) {
    let topic = format!("devices/{}/telemetry", dev.id);
    dev.publish(&topic, &format!(r#"{{"seq": {seq}, "temp": {seq}.5}}"#))
        .await;
}

fn seqs(msgs: &[Msg]) -> Vec<u64> {
    msgs.iter()
        .filter(|m| m.event == "telemetry")
        .filter_map(|m| m.data["seq"].as_u64())
        .collect()
}

async fn device(server: &Server, root: &std::path::Path, id: &str) -> (Creds, MqttDevice) {
    let creds = server.create_device(id, root);
    let dev = MqttDevice::connect(server, &creds, id).await;
    (creds, dev)
}

#[tokio::test]
async fn stream_shows_presence_telemetry_commands_and_shadow_changes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(tmp.path());
    let d1 = server.create_device("d1", tmp.path());
    let mut sse = Sse::open(&server, None, None).await;

    let mut dev = MqttDevice::connect(&server, &d1, "d1").await;
    sse.until(|m| is(m, "presence", "d1") && m.data["online"] == true)
        .await;

    telemetry(&mut dev, 1).await;
    let m = sse.until(|m| is(m, "telemetry", "d1")).await;
    let t = &m[m.len() - 1].data;
    assert_eq!(t["seq"], 1);
    assert_eq!(t["points"], json!({"temp": 1.5}));
    assert!(t["at"].as_u64().is_some_and(|at| at > 0));

    dev.subscribe("devices/d1/commands/+").await;
    let (status, c) = server
        .api(
            "POST",
            "/api/v1/devices/d1/commands",
            Some(json!({"name": "reboot"})),
        )
        .await;
    assert_eq!(status, 202, "{c}");
    let cmd = c["id"].as_str().expect("id").to_owned();
    let (topic, _) = dev.next_json().await;
    assert!(topic.ends_with(&cmd), "{topic}");
    dev.publish(&format!("devices/d1/commands/{cmd}/ack"), "{}")
        .await;
    dev.publish(
        &format!("devices/d1/commands/{cmd}/result"),
        r#"{"status": "succeeded"}"#,
    )
    .await;
    let seen = sse
        .until(|m| is(m, "command", "d1") && m.data["state"] == "succeeded")
        .await;
    let states: Vec<&str> = seen
        .iter()
        .filter(|m| m.event == "command")
        .map(|m| {
            assert_eq!(m.data["command_id"], cmd.as_str());
            assert_eq!(m.data["name"], "reboot");
            m.data["state"].as_str().unwrap_or_default()
        })
        .collect();
    assert_eq!(states, ["queued", "delivered", "acknowledged", "succeeded"]);

    let (status, _) = server
        .api(
            "PATCH",
            "/api/v1/devices/d1/shadow",
            Some(json!({"desired": {"led": "on"}})),
        )
        .await;
    assert_eq!(status, 200);
    let m = sse.until(|m| is(m, "shadow", "d1")).await;
    let s = &m[m.len() - 1].data;
    assert_eq!(s["desired"], json!({"led": "on"}));
    assert_eq!(s["reported"], json!({}));
    assert_eq!(s["version"], 1);

    drop(dev);
    sse.until(|m| is(m, "presence", "d1") && m.data["online"] == false)
        .await;
    assert_eq!(server.metric("mooring_events_streams").await, 1.0);
    drop(sse);
    server
        .wait_metric("mooring_events_streams", |v| v == 0.0)
        .await;

    // The OpenAPI document describes the route and the event schema.
    let (_, doc) = server.api("GET", "/api/v1/openapi.json", None).await;
    assert!(doc["paths"]["/api/v1/events"]["get"].is_object(), "{doc}");
    assert!(doc["components"]["schemas"]["Event"].is_object());
}

#[tokio::test]
async fn selector_filters_on_current_tags_and_bad_ones_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(tmp.path());
    let (_c1, mut d1) = device(&server, tmp.path(), "d1").await;
    let (_c2, mut d2) = device(&server, tmp.path(), "d2").await;
    for (id, site) in [("d1", "a"), ("d2", "b")] {
        let (status, v) = server
            .api(
                "PUT",
                &format!("/api/v1/devices/{id}/tags"),
                Some(json!({"site": site})),
            )
            .await;
        assert_eq!(status, 200, "{v}");
    }
    let mut sse = Sse::open(&server, Some("tag:site=a"), None).await;
    telemetry(&mut d2, 1).await;
    telemetry(&mut d1, 1).await;
    let seen = sse.until(|m| is(m, "telemetry", "d1")).await;
    assert!(seen.iter().all(|m| m.data["device_id"] == "d1"), "{seen:?}");

    // d2 moves to site a: its next events pass (the filter reads current tags).
    server
        .api("PUT", "/api/v1/devices/d2/tags", Some(json!({"site": "a"})))
        .await;
    telemetry(&mut d2, 2).await;
    let seen = sse.until(|m| is(m, "telemetry", "d2")).await;
    assert_eq!(seen[seen.len() - 1].data["seq"], 2);

    let resp = Sse::request(&server, Some("tag:"), None).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "invalid_selector", "{body}");
}

#[tokio::test]
async fn resume_with_last_event_id_loses_nothing_and_repeats_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(tmp.path());
    let (_c, mut dev) = device(&server, tmp.path(), "d1").await;
    let mut sse = Sse::open(&server, Some("d1"), None).await;
    for seq in 1..=5 {
        telemetry(&mut dev, seq).await;
    }
    let seen = sse.until(|m| m.data["seq"] == 2).await;
    assert_eq!(seqs(&seen), [1, 2]);
    let cursor = seen[seen.len() - 1].id.clone();
    drop(sse);
    for seq in 6..=10 {
        telemetry(&mut dev, seq).await;
    }
    let mut resumed = Sse::open(&server, Some("d1"), Some(&cursor)).await;
    let seen = resumed.until(|m| m.data["seq"] == 10).await;
    assert_eq!(seqs(&seen), (3..=10).collect::<Vec<_>>());
    assert!(seen.iter().all(|m| m.event != "reset"));
    // Nothing more comes: the next event is a new one.
    telemetry(&mut dev, 11).await;
    assert_eq!(resumed.next().await.data["seq"], 11);
}

#[tokio::test]
async fn a_cursor_older_than_the_window_gets_a_reset_and_streams_are_capped() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start_configured(tmp.path(), "[events]\nbuffer_len = 3\nstreams_max = 2\n");
    let (_c, mut dev) = device(&server, tmp.path(), "d1").await;
    let mut sse = Sse::open(&server, Some("d1"), None).await;
    telemetry(&mut dev, 1).await;
    let old = sse.until(|m| m.data["seq"] == 1).await[0].id.clone();
    drop(sse);
    for seq in 2..=6 {
        telemetry(&mut dev, seq).await;
    }
    server
        .wait_metric("mooring_events_streams", |v| v == 0.0)
        .await;
    let mut resumed = Sse::open(&server, Some("d1"), Some(&old)).await;
    let m = resumed.next().await;
    assert_eq!(m.event, "reset");
    assert_eq!(m.data["reason"], "cursor_too_old");
    // Then live from here, resumable from the reset's id.
    telemetry(&mut dev, 7).await;
    assert_eq!(resumed.next().await.data["seq"], 7);

    let mut garbage = Sse::open(&server, None, Some("v1-nonsense")).await;
    assert_eq!(garbage.next().await.data["reason"], "invalid_cursor");
    assert_eq!(server.metric("mooring_events_resets_total").await, 2.0);

    // Two streams are open: a third is refused, as JSON.
    let resp = Sse::request(&server, None, None).await;
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "too_many_streams", "{body}");
    assert_eq!(
        server.metric("mooring_events_streams_refused_total").await,
        1.0
    );
}

#[tokio::test]
async fn one_caller_cannot_take_every_stream_place() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start_configured(
        tmp.path(),
        "[events]\nstreams_max = 100\nstreams_per_caller_max = 2\n",
    );
    let a = Sse::open(&server, None, None).await;
    let _b = Sse::open(&server, None, None).await;
    // A third stream of the same token: 429, as JSON.
    let resp = Sse::request(&server, None, None).await;
    assert_eq!(resp.status(), 429);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "too_many_streams", "{body}");
    // Another principal still gets one.
    let other = support::service_token(&server, "dash");
    let _c = Sse::open_as(&server, &other, None, None).await;
    // The place comes back when a stream closes.
    drop(a);
    server
        .wait_metric("mooring_events_streams", |v| v == 2.0)
        .await;
    let _d = Sse::open(&server, None, None).await;
}

#[tokio::test]
async fn a_reader_that_stops_is_closed_and_counted_while_a_fast_one_keeps_up() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start_configured(tmp.path(), "[events]\nstream_queue_len = 4\n");
    server.create_device("d1", tmp.path());
    let mut fast = Sse::open(&server, None, None).await;

    // A client with a tiny receive window that sends its request and never reads again.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut slow = socket.connect(server.http).await.expect("connect");
    let req = format!(
        "GET /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        server.token
    );
    slow.write_all(req.as_bytes()).await.expect("request");
    server
        .wait_metric("mooring_events_streams", |v| v == 2.0)
        .await;

    // Big shadow changes until the slow stream's queue fills (bounded).
    let big = "x".repeat(30_000);
    let mut version = 0;
    while server.metric("mooring_events_streams_slow_total").await == 0.0 {
        version += 1;
        assert!(version <= 500, "the slow stream was never closed");
        let (status, _) = server
            .api(
                "PATCH",
                "/api/v1/devices/d1/shadow",
                Some(json!({"desired": {"big": format!("{big}{version}")}})),
            )
            .await;
        assert_eq!(status, 200);
        let m = fast.next().await;
        assert_eq!(
            (m.event.as_str(), m.data["version"].as_u64()),
            ("shadow", Some(version))
        );
    }
    // The fast stream still gets every change.
    for _ in 0..3 {
        version += 1;
        server
            .api(
                "PATCH",
                "/api/v1/devices/d1/shadow",
                Some(json!({"desired": {"n": version}})),
            )
            .await;
        assert_eq!(fast.next().await.data["version"], version);
    }
    // The slow client's connection was closed: draining it reaches the end.
    let drained = tokio::time::timeout(WAIT, async {
        let mut buf = vec![0u8; 64 * 1024];
        while slow.read(&mut buf).await.map(|n| n > 0).unwrap_or(false) {}
    })
    .await;
    assert!(drained.is_ok(), "the slow connection stayed open");
    server
        .wait_metric("mooring_events_streams", |v| v == 1.0)
        .await;
}

#[tokio::test]
async fn cli_prints_events_as_json_lines() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(tmp.path());
    let (_c, mut dev) = device(&server, tmp.path(), "d1").await;
    let url = server.url();
    let data_dir = server.data_dir.clone();
    let cli = std::thread::spawn(move || {
        std::process::Command::new(support::BIN)
            .args([
                "events",
                "--selector",
                "d1",
                "--count",
                "2",
                "--server",
                &url,
            ])
            .arg("--data-dir")
            .arg(&data_dir)
            .env_remove("MOORING_TOKEN")
            .output()
            .expect("run mooring events")
    });
    server
        .wait_metric("mooring_events_streams", |v| v == 1.0)
        .await;
    telemetry(&mut dev, 1).await;
    telemetry(&mut dev, 2).await;
    let out = tokio::task::spawn_blocking(move || cli.join().expect("cli thread"))
        .await
        .expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["kind"], "telemetry");
    assert_eq!(lines[1]["seq"], 2);
    let _ = Duration::ZERO;
}
