//! Behavioural tests of device commands: the real `mooring` binary, mosquitto_sub/mosquitto_pub
//! acting as the device, the HTTP API and the CLI.

mod support;

use serde_json::{json, Value};
use support::{config_args, Creds, MqttDevice, Server};

/// Fast retries and scheduler for tests (the defaults are seconds to minutes); fleet commands fan
/// out in pages of 64, so the 1,000-device fleet test crosses 16 pages.
const FAST: &str = "[commands]\nretry_backoff_initial_ms = 100\nretry_backoff_max_ms = 200\nscheduler_tick_ms = 50\nfleet_page_len = 64\n";

fn start_fast(tmp: &std::path::Path) -> Server {
    let args = config_args(tmp, FAST);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_with(&tmp.join("data"), "127.0.0.1:0", "127.0.0.1:0", &args)
}

fn restart(tmp: &std::path::Path) -> Server {
    start_fast(tmp)
}

async fn send(server: &Server, device: &str, body: Value) -> (u16, Value) {
    server
        .api(
            "POST",
            &format!("/api/v1/devices/{device}/commands"),
            Some(body),
        )
        .await
}

fn states(c: &Value) -> Vec<String> {
    c["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .map(|e| e["state"].as_str().unwrap_or("?").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn id_of(c: &Value) -> String {
    c["id"].as_str().expect("command id").to_owned()
}

/// Waits until the device's next command arrives; returns (command id, request JSON).
async fn next_command(dev: &mut MqttDevice) -> (String, Value) {
    let (topic, req) = dev.next_json().await;
    let id = topic.rsplit('/').next().unwrap_or("").to_owned();
    assert_eq!(req["id"], json!(id), "topic {topic} carries the command id");
    (id, req)
}

/// The device acks (`what = "ack"`) or reports the result of a command.
async fn reply(dev: &mut MqttDevice, cmd: &str, what: &str, payload: &str) {
    let topic = format!("devices/{}/commands/{cmd}/{what}", dev.id);
    dev.publish(&topic, payload).await;
}

/// Connects as `id` and subscribes to its commands.
async fn online(server: &Server, creds: &Creds, id: &str) -> MqttDevice {
    let mut dev = MqttDevice::connect(server, creds, id).await;
    dev.subscribe(&format!("devices/{id}/commands/+")).await;
    dev
}

#[tokio::test]
async fn offline_command_is_delivered_once_after_subscribe_and_result_succeeds() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start_fast(tmp.path());
    let d1 = server.create_device("d1", tmp.path());

    let (status, c) = send(
        &server,
        "d1",
        json!({"name": "reboot", "params": {"delay_secs": 1}}),
    )
    .await;
    assert_eq!(status, 202, "{c}");
    assert_eq!(c["state"], "queued");
    assert_eq!(c["attempts"], 0);
    assert_eq!(states(&c), ["queued"]);
    assert!(c["result"].is_null() && c["parent_id"].is_null());
    let id = id_of(&c);
    assert!(c["expires_at"].as_u64() > c["created_at"].as_u64());

    // The device connects and subscribes: the queued command arrives.
    let mut sub = online(&server, &d1, "d1").await;
    let (got, req) = next_command(&mut sub).await;
    assert_eq!(got, id);
    assert_eq!(req["name"], "reboot");
    assert_eq!(req["params"], json!({"delay_secs": 1}));
    assert_eq!(req["expires_at"], c["expires_at"]);
    server
        .wait_for(&format!("/api/v1/devices/d1/commands/{id}"), |v| {
            v["state"] == "delivered"
        })
        .await;

    reply(&mut sub, &id, "ack", "{}").await;
    server
        .wait_for(&format!("/api/v1/devices/d1/commands/{id}"), |v| {
            v["state"] == "acknowledged"
        })
        .await;
    reply(
        &mut sub,
        &id,
        "result",
        r#"{"status":"succeeded","output":{"uptime_secs":5}}"#,
    )
    .await;
    let (status, done) = server
        .api(
            "GET",
            &format!("/api/v1/devices/d1/commands/{id}?wait_ms=20000"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(
        states(&done),
        ["queued", "delivered", "acknowledged", "succeeded"]
    );
    let times: Vec<u64> = done["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|e| e["at"].as_u64().expect("at"))
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert_eq!(done["attempts"], 1);
    assert_eq!(
        done["result"],
        json!({"status": "succeeded", "output": {"uptime_secs": 5}})
    );

    // Exactly once: the next thing the device receives is the next command, not a redelivery.
    let (_, c2) = send(&server, "d1", json!({"name": "ping"})).await;
    let (got2, _) = next_command(&mut sub).await;
    assert_eq!(got2, id_of(&c2));
    // A result with no earlier ack counts as both.
    reply(
        &mut sub,
        &got2,
        "result",
        r#"{"status":"failed","output":{"reason":"busy"}}"#,
    )
    .await;
    let c2 = server
        .wait_for(&format!("/api/v1/devices/d1/commands/{got2}"), |v| {
            v["state"] == "failed"
        })
        .await;
    assert_eq!(
        states(&c2),
        ["queued", "delivered", "acknowledged", "failed"]
    );

    // Replies for unknown commands are ignored (counted), not fatal to the session.
    reply(&mut sub, "cnope", "result", r#"{"status":"succeeded"}"#).await;
    let (_, list) = server.api("GET", "/api/v1/devices/d1/commands", None).await;
    let ids: Vec<String> = list["commands"]
        .as_array()
        .expect("list")
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(ids, [got2.clone(), id.clone()], "newest first");
    let (_, list) = server
        .api("GET", "/api/v1/devices/d1/commands?state=succeeded", None)
        .await;
    assert_eq!(list["commands"].as_array().map(Vec::len), Some(1));
    let metrics = server.metrics_text().await;
    for line in [
        "mooring_commands_created_total 2",
        "mooring_commands_delivered_total 2",
        "mooring_commands_succeeded_total 1",
        "mooring_commands_failed_total 1",
        "mooring_command_replies_ignored_total 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }

    // Invalid input is a 400 JSON error; unknown devices and commands are 404.
    for (body, code) in [
        (json!({"name": "bad name"}), "invalid_command_name"),
        (json!({"name": "x", "ttl_secs": 0}), "invalid_ttl"),
        (
            json!({"name": "x", "max_attempts": 0}),
            "invalid_max_attempts",
        ),
        (json!({"nope": 1}), "invalid_body"),
    ] {
        let (status, e) = send(&server, "d1", body).await;
        assert_eq!(
            (status, e["error"]["code"].as_str()),
            (400, Some(code)),
            "{e}"
        );
    }
    let (status, e) = server
        .api(
            "POST",
            "/api/v1/devices/d1/commands?wait_ms=30001",
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("invalid_wait_ms"))
    );
    let (status, _) = send(&server, "ghost", json!({"name": "x"})).await;
    assert_eq!(status, 404);
    let (status, e) = server
        .api("GET", "/api/v1/devices/d1/commands/cnope", None)
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (404, Some("command_not_found"))
    );
    let (status, _) = server
        .api("GET", "/api/v1/devices/d1/commands?state=bogus", None)
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn queued_commands_survive_sigterm_and_kill9_and_arrive_in_order() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start_fast(tmp.path());
    let d1 = server.create_device("d1", tmp.path());
    let mut ids = Vec::new();
    for n in 0..2 {
        let (status, c) = send(&server, "d1", json!({"name": "step", "params": {"n": n}})).await;
        assert_eq!(status, 202);
        ids.push(id_of(&c));
    }
    server.stop();
    let server = restart(tmp.path());
    let (_, c) = send(&server, "d1", json!({"name": "step", "params": {"n": 2}})).await;
    ids.push(id_of(&c));
    server.kill9();
    let server = restart(tmp.path());
    let (_, list) = server
        .api("GET", "/api/v1/devices/d1/commands?state=queued", None)
        .await;
    assert_eq!(list["commands"].as_array().map(Vec::len), Some(3), "{list}");

    let mut sub = online(&server, &d1, "d1").await;
    for (n, want) in ids.iter().enumerate() {
        let (got, req) = next_command(&mut sub).await;
        assert_eq!(&got, want);
        assert_eq!(req["params"]["n"], n);
        reply(&mut sub, &got, "result", r#"{"status":"succeeded"}"#).await;
    }
    for id in &ids {
        server
            .wait_for(&format!("/api/v1/devices/d1/commands/{id}"), |v| {
                v["state"] == "succeeded"
            })
            .await;
    }
}

#[tokio::test]
async fn ttl_expiry_idempotency_keys_and_cancel() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start_fast(tmp.path());
    let d1 = server.create_device("d1", tmp.path());

    // TTL passes while the device is offline: expired, and never delivered later.
    let (_, c) = send(&server, "d1", json!({"name": "open", "ttl_secs": 1})).await;
    let expired_id = id_of(&c);
    let c = server
        .wait_for(&format!("/api/v1/devices/d1/commands/{expired_id}"), |v| {
            v["state"] == "expired"
        })
        .await;
    assert_eq!(states(&c), ["queued", "expired"]);
    assert_eq!(c["attempts"], 0);

    // Idempotency: same key, same device → 200 and the same command.
    let body = json!({"name": "open", "idempotency_key": "order-42"});
    let (s1, a) = send(&server, "d1", body.clone()).await;
    let (s2, b) = send(&server, "d1", body).await;
    assert_eq!((s1, s2), (202, 200));
    assert_eq!(a["id"], b["id"]);
    assert_eq!(b["idempotency_key"], "order-42");

    // Cancel while queued; a second cancel is a conflict.
    let (_, q) = send(&server, "d1", json!({"name": "close"})).await;
    let q = id_of(&q);
    let (status, c) = server
        .api(
            "POST",
            &format!("/api/v1/devices/d1/commands/{q}/cancel"),
            None,
        )
        .await;
    assert_eq!((status, c["state"].as_str()), (200, Some("canceled")));
    let (status, e) = server
        .api(
            "POST",
            &format!("/api/v1/devices/d1/commands/{q}/cancel"),
            None,
        )
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (409, Some("command_not_cancelable"))
    );

    // The device comes online: it gets the idempotent command only (not the expired or the
    // canceled one); after its ack, cancel is refused.
    let mut sub = online(&server, &d1, "d1").await;
    let (got, _) = next_command(&mut sub).await;
    assert_eq!(got, id_of(&a));
    reply(&mut sub, &got, "ack", "").await;
    server
        .wait_for(&format!("/api/v1/devices/d1/commands/{got}"), |v| {
            v["state"] == "acknowledged"
        })
        .await;
    let (status, _) = server
        .api(
            "POST",
            &format!("/api/v1/devices/d1/commands/{got}/cancel"),
            None,
        )
        .await;
    assert_eq!(status, 409);
    // A later command is the next message: nothing else was delivered in between.
    let (_, n) = send(&server, "d1", json!({"name": "ping"})).await;
    let (got, _) = next_command(&mut sub).await;
    assert_eq!(got, id_of(&n));
}

#[tokio::test]
async fn wait_ms_answers_when_an_online_device_replies_and_returns_current_state_otherwise() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start_fast(tmp.path());
    let d1 = server.create_device("d1", tmp.path());
    let mut sub = online(&server, &d1, "d1").await;

    // The device answers as soon as it gets the command.
    let device = tokio::spawn(async move {
        let (id, _) = next_command(&mut sub).await;
        reply(
            &mut sub,
            &id,
            "result",
            r#"{"status":"succeeded","output":{"pong":true}}"#,
        )
        .await;
        sub
    });
    let (status, c) = server
        .api(
            "POST",
            "/api/v1/devices/d1/commands?wait_ms=20000",
            Some(json!({"name": "ping"})),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(c["state"], "succeeded", "{c}");
    assert_eq!(c["result"]["output"], json!({"pong": true}));
    let mut sub = device.await.expect("device task");

    // No reply: the wait ends and the current state comes back.
    let (status, c) = server
        .api(
            "POST",
            "/api/v1/devices/d1/commands?wait_ms=300",
            Some(json!({"name": "ping"})),
        )
        .await;
    assert_eq!(status, 202);
    let (got, _) = next_command(&mut sub).await;
    assert_eq!(got, id_of(&c));
    assert!(c["state"] == "queued" || c["state"] == "delivered", "{c}");
}

#[tokio::test]
async fn unacknowledged_command_is_retried_until_max_attempts_then_fails() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start_fast(tmp.path());
    let d1 = server.create_device("d1", tmp.path());
    let mut sub = online(&server, &d1, "d1").await;
    let (_, c) = send(&server, "d1", json!({"name": "reboot", "max_attempts": 3})).await;
    let id = id_of(&c);
    for _ in 0..3 {
        let (got, _) = next_command(&mut sub).await;
        assert_eq!(got, id, "the same command is redelivered");
    }
    let c = server
        .wait_for(&format!("/api/v1/devices/d1/commands/{id}"), |v| {
            v["state"] == "failed"
        })
        .await;
    assert_eq!(c["attempts"], 3);
    assert_eq!(
        c["result"],
        json!({"status": "failed", "output": {"reason": "max_attempts"}})
    );
    assert_eq!(states(&c), ["queued", "delivered", "failed"]);
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains("mooring_commands_retried_total 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn fleet_command_to_1000_devices_reports_aggregate_status() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start_fast(tmp.path());
    // One device with credentials (it will answer), 999 more through the API.
    let out = server.cli(&[
        "device",
        "create",
        "b0000",
        "--tag",
        "site=berlin",
        "--out",
        tmp.path().join("b0000").to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b0 = Creds {
        dir: tmp.path().join("b0000"),
    };
    let server = std::sync::Arc::new(server);
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in (1..1000).collect::<Vec<_>>().chunks(100) {
        let chunk = chunk.to_vec();
        let server = server.clone();
        tasks.spawn(async move {
            for n in chunk {
                let (status, body) = server
                    .api(
                        "POST",
                        "/api/v1/devices",
                        Some(json!({"id": format!("b{n:04}"), "tags": {"site": "berlin"}})),
                    )
                    .await;
                assert_eq!(status, 201, "{body}");
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("create devices");
    }
    let (status, _) = server
        .api(
            "POST",
            "/api/v1/devices",
            Some(json!({"id": "p1", "tags": {"site": "paris"}})),
        )
        .await;
    assert_eq!(status, 201);

    let (status, f) = server
        .api(
            "POST",
            "/api/v1/commands",
            Some(json!({"selector": "tag:site=berlin", "name": "reboot"})),
        )
        .await;
    assert_eq!(status, 202, "{f}");
    assert_eq!(f["total"], 1000);
    assert_eq!(f["counts"]["queued"], 1000);
    assert_eq!(f["done"], false);
    let parent = id_of(&f);

    // One device answers; the aggregate follows.
    let mut sub = online(&server, &b0, "b0000").await;
    let (cmd, _) = next_command(&mut sub).await;
    let (_, child) = server
        .api("GET", &format!("/api/v1/commands/{cmd}"), None)
        .await;
    assert_eq!(child["parent_id"], json!(parent));
    reply(&mut sub, &cmd, "result", r#"{"status":"succeeded"}"#).await;
    let f = server
        .wait_for(&format!("/api/v1/commands/{parent}"), |v| {
            v["counts"]["succeeded"] == 1
        })
        .await;
    assert_eq!(f["counts"]["queued"], 999);
    assert_eq!(f["done"], false);

    // A fleet command that can finish: two offline devices by id, short TTL.
    let (status, f) = server
        .api(
            "POST",
            "/api/v1/commands",
            Some(json!({"selector": "b0001,b0002", "name": "x", "ttl_secs": 1})),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(f["total"], 2);
    let f = server
        .wait_for(&format!("/api/v1/commands/{}", id_of(&f)), |v| {
            v["done"] == true
        })
        .await;
    assert_eq!(f["counts"]["expired"], 2);

    // Selector errors are 400 invalid_selector; the CLI refuses them with exit code 2.
    let (status, e) = server
        .api(
            "POST",
            "/api/v1/commands",
            Some(json!({"selector": "tag:site", "name": "x"})),
        )
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("invalid_selector"))
    );
    let out = server.cli(&["command", "send", "--to", "tag:site=", "reboot"]);
    assert_eq!(out.status.code(), Some(2));
    // The CLI sends fleet commands too.
    let out = server.cli(&[
        "command",
        "send",
        "--to",
        "tag:site=paris",
        "reboot",
        "--params",
        r#"{"a":1}"#,
        "--output",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(printed["total"], 1);
    assert_eq!(printed["selector"], "tag:site=paris");
}

#[tokio::test]
async fn selectors_match_tags_online_and_version_and_device_tag_merges() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start_fast(tmp.path());
    let d1 = server.create_device("d1", tmp.path());
    server.create_device("d2", tmp.path());
    server.create_device("d3", tmp.path());
    for (id, tags) in [
        ("d1", &["site=berlin", "hw=rev-b"][..]),
        ("d2", &["site=berlin"][..]),
        ("d3", &["site=paris"][..]),
    ] {
        let mut args = vec!["device", "tag", id];
        args.extend(tags);
        let out = server.cli(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Merge and remove.
    let out = server.cli(&["device", "tag", "d2", "hw=rev-a", "--remove", "site"]);
    assert!(out.status.success());
    let (_, d2) = server.api("GET", "/api/v1/devices/d2", None).await;
    assert_eq!(d2["tags"], json!({"hw": "rev-a"}));
    let (status, d2) = server
        .api(
            "PUT",
            "/api/v1/devices/d2/tags",
            Some(json!({"site": "berlin"})),
        )
        .await;
    assert_eq!((status, &d2["tags"]), (200, &json!({"site": "berlin"})));
    let (status, e) = server
        .api(
            "PUT",
            "/api/v1/devices/d2/tags",
            Some(json!({"si te": "x"})),
        )
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("invalid_tags"))
    );

    // d1 comes online and reports firmware 1.3.2 in its shadow.
    let mut dev = online(&server, &d1, "d1").await;
    dev.publish("devices/d1/shadow/reported", r#"{"version":"1.3.2"}"#)
        .await;

    let select = |sel: &str| {
        let server = &server;
        let sel = sel.to_owned();
        async move {
            let q: String = sel
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            let (status, v) = server
                .api("GET", &format!("/api/v1/devices?selector={q}"), None)
                .await;
            assert_eq!(status, 200, "{sel}: {v}");
            v["devices"]
                .as_array()
                .expect("devices")
                .iter()
                .map(|d| d["id"].as_str().unwrap_or("?").to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(select("tag:site=berlin").await, ["d1", "d2"]);
    assert_eq!(select("tag:site=berlin and online").await, ["d1"]);
    assert_eq!(select("tag:site=berlin and version=1.3.2").await, ["d1"]);
    assert_eq!(select("version=1.4.0").await, Vec::<String>::new());
    assert_eq!(select("d3,d2").await, ["d2", "d3"]);
    assert_eq!(select("d1,d3 and tag:site=paris").await, ["d3"]);
    let (status, e) = server
        .api("GET", "/api/v1/devices?selector=tag%3Asite", None)
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("invalid_selector"))
    );
    // Pagination still works with a selector.
    let (_, page) = server
        .api(
            "GET",
            "/api/v1/devices?selector=tag%3Asite%3Dberlin&limit=1",
            None,
        )
        .await;
    assert_eq!(page["next_cursor"], "d1");
    // Every new route is in the OpenAPI document.
    let openapi: Value = support::get(format!("{}/api/v1/openapi.json", server.url()))
        .await
        .json()
        .await
        .expect("openapi");
    for path in [
        "/api/v1/devices/{id}/commands",
        "/api/v1/devices/{id}/commands/{cmd}",
        "/api/v1/devices/{id}/commands/{cmd}/cancel",
        "/api/v1/commands",
        "/api/v1/commands/{id}",
        "/api/v1/devices/{id}/tags",
        "/api/v1/devices/{id}/shadow",
        "/api/v1/events",
    ] {
        assert!(openapi["paths"][path].is_object(), "{path} in openapi.json");
    }
    // Query parameters are documented as query parameters (they once said `in: path`).
    for (path, name) in [
        ("/api/v1/devices", "selector"),
        ("/api/v1/devices/{id}/commands", "state"),
        ("/api/v1/devices/{id}/telemetry", "metric"),
    ] {
        let params = openapi["paths"][path]["get"]["parameters"]
            .as_array()
            .expect("parameters");
        let p = params
            .iter()
            .find(|p| p["name"] == name)
            .expect("parameter documented");
        assert_eq!(
            (p["in"].as_str(), p["required"].as_bool()),
            (Some("query"), Some(false)),
            "{path} {name}"
        );
    }
    let out = server.cli(&[
        "device",
        "list",
        "--selector",
        "tag:site=berlin and online",
        "--json",
    ]);
    let listed: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(listed["devices"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn abandoned_wait_ms_requests_leave_no_waiter_behind() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    server.create_device("d1", tmp.path());
    // Commands for an offline device: nothing will answer them.
    let mut ids = Vec::new();
    for _ in 0..20 {
        let (status, v) = server
            .api(
                "POST",
                "/api/v1/devices/d1/commands",
                Some(serde_json::json!({"name": "reboot"})),
            )
            .await;
        assert_eq!(status, 202, "{v}");
        ids.push(v["id"].as_str().expect("id").to_owned());
    }
    // Clients that ask to wait 30 s and hang up after 300 ms.
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(300))
        .build()
        .expect("client");
    let waits = ids.iter().map(|id| {
        client
            .get(format!(
                "{}/api/v1/devices/d1/commands/{id}?wait_ms=30000",
                server.url()
            ))
            .bearer_auth(&server.token)
            .send()
    });
    for r in futures::future::join_all(waits).await {
        assert!(r.is_err_and(|e| e.is_timeout()), "the client gave up");
    }
    // The server noticed the hang-ups: nobody waits any more.
    server
        .wait_metric("mooring_command_waiters", |v| v == 0.0)
        .await;
}

#[tokio::test]
async fn an_acknowledged_command_without_a_result_fails_with_timeout_and_keeps_a_late_result() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start_fast(tmp.path());
    let d1 = server.create_device("d1", tmp.path());
    let mut dev = online(&server, &d1, "d1").await;
    // Bad input is refused.
    let (status, v) = send(
        &server,
        "d1",
        json!({"name": "reboot", "result_timeout_secs": 8 * 86_400}),
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].clone()),
        (400, json!("invalid_result_timeout"))
    );

    let (status, c) = send(
        &server,
        "d1",
        json!({"name": "reboot", "result_timeout_secs": 1}),
    )
    .await;
    assert_eq!(status, 202, "{c}");
    assert_eq!(c["result_timeout_secs"], 1);
    let (id, _) = next_command(&mut dev).await;
    reply(&mut dev, &id, "ack", "").await;
    // No result: a second after the ack it fails with reason timeout.
    let done = server
        .wait_for(&format!("/api/v1/devices/d1/commands/{id}"), |c| {
            c["state"] == "failed"
        })
        .await;
    assert_eq!(done["result"]["output"]["reason"], "timeout", "{done}");
    assert_eq!(
        states(&done),
        ["queued", "delivered", "acknowledged", "failed"]
    );
    // The result that comes late is kept as late; the state does not change back.
    reply(
        &mut dev,
        &id,
        "result",
        r#"{"status":"succeeded","output":{"rebooted":true}}"#,
    )
    .await;
    let late = server
        .wait_for(&format!("/api/v1/devices/d1/commands/{id}"), |c| {
            c["result"]["output"]["late_result"].is_object()
        })
        .await;
    assert_eq!(late["state"], "failed");
    assert_eq!(
        late["result"]["output"]["late_result"],
        json!({"succeeded": true, "output": {"rebooted": true}})
    );
    // A command with result_timeout_secs 0 waits for its result as long as it takes.
    let (_, c) = send(
        &server,
        "d1",
        json!({"name": "ping", "result_timeout_secs": 0}),
    )
    .await;
    assert_eq!(c["result_timeout_secs"], 0);
}
