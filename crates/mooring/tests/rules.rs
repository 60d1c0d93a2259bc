//! Rules and alerts (issue 18): rules created with the CLI and the API, evaluated on what real
//! MQTT clients (rumqttc) send; alerts raised, counted, acknowledged and resolved by themselves;
//! command and tag actions; bad rules refused with the column of the error; a rule whose
//! creator loses the right stops acting.

mod support;

use serde_json::{json, Value};
use support::{call, scoped_token, MqttDevice, Server};

/// The evaluator reads the rules and ticks often.
const CONFIG: &str = "[rules]\nreload_interval_ms = 200\ntick_interval_ms = 100\n";

fn create(server: &Server, id: &str, tag: &str, root: &std::path::Path) -> support::Creds {
    let dir = root.join(id);
    let out = server.cli(&[
        "device",
        "create",
        id,
        "--tag",
        tag,
        "--out",
        dir.to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    support::Creds { dir }
}

async fn alerts(server: &Server, query: &str) -> Vec<Value> {
    let (status, v) = server
        .api("GET", &format!("/api/v1/alerts{query}"), None)
        .await;
    assert_eq!(status, 200, "{v}");
    v["alerts"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn a_rule_alerts_commands_and_tags_and_its_alert_resolves_when_the_condition_clears() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start_configured(tmp.path(), CONFIG);
    let b = create(&server, "lock-b", "hw=rev-b", tmp.path());
    let a = create(&server, "lock-a", "hw=rev-a", tmp.path());

    let rule = server.cli_json(&[
        "rule",
        "create",
        "--name",
        "low-battery",
        "--when",
        "battery < 15",
        "--selector",
        "tag:hw=rev-b",
        "--then",
        "alert:warning,command:diagnostics,tag:battery=low",
        "-o",
        "json",
    ]);
    assert_eq!(rule["status"], "active", "{rule}");
    assert_eq!(rule["when"], "battery < 15");
    assert_eq!(
        rule["then"],
        "alert:warning,command:diagnostics,tag:battery=low"
    );

    let mut dev_a = MqttDevice::connect(&server, &a, "lock-a").await;
    let mut dev_b = MqttDevice::connect(&server, &b, "lock-b").await;
    dev_b.subscribe("devices/lock-b/commands/+").await;
    // lock-a is not selected: its low battery raises nothing (evaluated first, in order).
    dev_a
        .publish("devices/lock-a/telemetry", r#"{"battery": 5}"#)
        .await;
    dev_b
        .publish("devices/lock-b/telemetry", r#"{"battery": 10}"#)
        .await;

    // The command action: the device is sent `diagnostics`, naming the rule.
    let (topic, cmd) = dev_b.next_json().await;
    assert!(topic.starts_with("devices/lock-b/commands/"), "{topic}");
    assert_eq!(cmd["name"], "diagnostics", "{cmd}");
    assert_eq!(cmd["params"]["rule"], "low-battery", "{cmd}");
    // The alert, once, for lock-b only.
    let open = server
        .wait_for("/api/v1/alerts?state=open", |v| {
            v["alerts"].as_array().is_some_and(|a| !a.is_empty())
        })
        .await;
    let list = open["alerts"].as_array().expect("alerts");
    assert_eq!(list.len(), 1, "{open}");
    let alert = &list[0];
    assert_eq!(alert["device_id"], "lock-b");
    assert_eq!(alert["rule_name"], "low-battery");
    assert_eq!(
        (alert["severity"].as_str(), alert["state"].as_str()),
        (Some("warning"), Some("firing"))
    );
    assert!(
        alert["detail"]
            .as_str()
            .is_some_and(|d| d.contains("battery = 10")),
        "{alert}"
    );
    let alert_id = alert["id"].as_str().expect("id").to_owned();
    // The tag action.
    server
        .wait_for("/api/v1/devices/lock-b", |v| v["tags"]["battery"] == "low")
        .await;
    let (_, dev) = server.api("GET", "/api/v1/devices/lock-a", None).await;
    assert_eq!(dev["tags"].get("battery"), None, "{dev}");

    // Still low: the same alert, no second one.
    dev_b
        .publish("devices/lock-b/telemetry", r#"{"battery": 9}"#)
        .await;
    // Someone is on it.
    let acked = server.cli_json(&["alert", "ack", &alert_id, "-o", "json"]);
    assert_eq!(acked["state"], "acknowledged", "{acked}");
    assert!(acked["acknowledged_by"].is_string(), "{acked}");
    // Charged: the condition clears and the alert resolves by itself.
    dev_b
        .publish("devices/lock-b/telemetry", r#"{"battery": 60}"#)
        .await;
    let resolved = server
        .wait_for(&format!("/api/v1/alerts/{alert_id}"), |v| {
            v["state"] == "resolved"
        })
        .await;
    assert_eq!(resolved["resolved_by"], "auto", "{resolved}");
    assert_eq!(resolved["count"], 1, "{resolved}");
    assert_eq!(alerts(&server, "?state=open").await, Vec::<Value>::new());
    assert_eq!(alerts(&server, "").await.len(), 1);
    // An acknowledged-then-resolved alert cannot be acknowledged again.
    let (status, body) = server
        .api(
            "POST",
            &format!("/api/v1/alerts/{alert_id}/acknowledge"),
            None,
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("alert_resolved")),
        "{body}"
    );

    // Low again: a new alert. Deleting the rule resolves it.
    dev_b
        .publish("devices/lock-b/telemetry", r#"{"battery": 3}"#)
        .await;
    let open = server
        .wait_for("/api/v1/alerts?state=firing", |v| {
            v["alerts"].as_array().is_some_and(|a| a.len() == 1)
        })
        .await;
    let second = open["alerts"][0]["id"].as_str().expect("id").to_owned();
    assert_ne!(second, alert_id);
    // Within the cooldown the second firing sends no second command and sets no tag again.
    server
        .wait_metric("mooring_rules_actions_suppressed_total", |v| v >= 1.0)
        .await;
    let out = server.cli(&["alert", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&second));
    let out = server.cli(&["rule", "delete", "low-battery"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, gone) = server
        .api("GET", &format!("/api/v1/alerts/{second}"), None)
        .await;
    assert_eq!(
        (gone["state"].as_str(), gone["resolved_by"].as_str()),
        (Some("resolved"), Some("rule_deleted")),
        "{gone}"
    );
    let (status, _) = server
        .api(
            "GET",
            &format!("/api/v1/rules/{}", rule["id"].as_str().unwrap_or("")),
            None,
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn an_event_rule_counts_each_occurrence_on_its_open_alert() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start_configured(tmp.path(), CONFIG);
    let creds = create(&server, "cart-1", "site=a", tmp.path());
    let (status, rule) = server
        .api(
            "POST",
            "/api/v1/rules",
            Some(
                json!({"name": "cmd-fails", "when": "on command_failed", "then": "alert:critical"}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{rule}");
    let mut dev = MqttDevice::connect(&server, &creds, "cart-1").await;
    dev.subscribe("devices/cart-1/commands/+").await;
    for n in 1..=2u64 {
        let (status, cmd) = server
            .api(
                "POST",
                "/api/v1/devices/cart-1/commands",
                Some(json!({"name": "open"})),
            )
            .await;
        assert_eq!(status, 202, "{cmd}");
        let id = cmd["id"].as_str().expect("id").to_owned();
        let _ = dev.next_json().await;
        dev.publish(
            &format!("devices/cart-1/commands/{id}/result"),
            r#"{"status": "failed", "output": {"error": "jammed"}}"#,
        )
        .await;
        server
            .wait_for("/api/v1/alerts?state=firing", |v| {
                v["alerts"][0]["count"] == n
            })
            .await;
    }
    let list = alerts(&server, "").await;
    assert_eq!(list.len(), 1, "one alert, two occurrences: {list:?}");
    assert_eq!(list[0]["severity"], "critical");
}

#[tokio::test]
async fn bad_rules_are_refused_with_the_reason_and_a_rule_stops_when_its_creator_goes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start_configured(tmp.path(), CONFIG);
    let post = |body: Value| {
        let server = &server;
        async move { server.api("POST", "/api/v1/rules", Some(body)).await }
    };
    let (status, body) =
        post(json!({"name": "x", "when": "battery << 15", "then": "alert:info"})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_rule")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("column 10")),
        "{body}"
    );
    let (status, body) =
        post(json!({"name": "x", "when": "battery < 15", "then": "alert:loud"})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_rule")),
        "{body}"
    );
    let (status, body) =
        post(json!({"name": "x", "when": "battery < 15", "then": "webhook:ops"})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("unknown_webhook")),
        "{body}"
    );
    let (status, body) =
        post(json!({"name": "x", "when": "battery < 15", "then": "job:report"})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("unknown_playbook")),
        "{body}"
    );
    let (status, body) =
        post(json!({"name": "bad name!", "when": "battery < 15", "then": "alert:info"})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_name")),
        "{body}"
    );
    let (status, body) = post(
        json!({"name": "x", "when": "battery < 15", "selector": "tag:", "then": "alert:info"}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_selector")),
        "{body}"
    );
    let (status, _) =
        post(json!({"name": "x", "when": "battery < 15", "then": "alert:info"})).await;
    assert_eq!(status, 201);
    let (status, body) =
        post(json!({"name": "x", "when": "temp > 80", "then": "alert:info"})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("rule_exists")),
        "{body}"
    );
    // The CLI says where and fails.
    let out = server.cli(&[
        "rule",
        "create",
        "--name",
        "y",
        "--when",
        "no telemetry 30m",
        "--then",
        "alert:info",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("column"), "{err}");

    // A viewer may not create rules; an operator without commands.write... operators have it:
    // a viewer token is refused outright.
    let viewer = scoped_token(&server, "viewer", "viewer", "tag:site=a");
    let r = call(
        &server,
        "POST",
        "/api/v1/rules",
        Some(&viewer),
        None,
        &[],
        Some(json!({"name": "v", "when": "battery < 15", "then": "alert:info"})),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);

    // A scoped operator's rule: it carries the scope, others with that scope see it; when the
    // token is revoked the rule is suspended, with the reason.
    let ops = scoped_token(&server, "ops", "operator", "tag:site=a");
    let r = call(&server, "POST", "/api/v1/rules", Some(&ops), None, &[],
        Some(json!({"name": "site-a-hot", "when": "temp > 80", "then": "alert:warning,command:cool"}))).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["scope"], "tag:site=a", "{}", r.body);
    let rule_id = r.body["id"].as_str().expect("id").to_owned();
    let listed = call(&server, "GET", "/api/v1/rules", Some(&ops), None, &[], None).await;
    let names: Vec<&str> = listed.body["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["site-a-hot"],
        "a scoped caller sees the rules made within its scope"
    );
    let tokens = server.cli_json(&["token", "list", "-o", "json"]);
    let token_id = tokens
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["name"] == "ops")
        .and_then(|t| t["id"].as_str())
        .expect("ops token")
        .to_owned();
    let out = server.cli(&["token", "revoke", &token_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = server
        .wait_for(&format!("/api/v1/rules/{rule_id}"), |v| {
            v["status"] == "suspended"
        })
        .await;
    assert!(
        r["status_reason"]
            .as_str()
            .is_some_and(|s| s.contains("revoked")),
        "{r}"
    );
    // Disabled by an admin: `disabled`.
    let out = server.cli_json(&["rule", "disable", "site-a-hot", "-o", "json"]);
    assert_eq!(out["status"], "disabled", "{out}");
}

#[tokio::test]
async fn an_absence_fires_after_its_duration_and_clears_on_the_next_point() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start_configured(tmp.path(), CONFIG);
    let creds = create(&server, "meter-1", "site=a", tmp.path());
    // A device that never connects at all is watched too.
    let _ = create(&server, "meter-2", "site=a", tmp.path());
    let rule = server.cli_json(&[
        "rule",
        "create",
        "--name",
        "silent",
        "--when",
        "no telemetry for 1s",
        "--then",
        "alert:info",
        "-o",
        "json",
    ]);
    assert_eq!(rule["when"], "no telemetry for 1s", "{rule}");
    let mut dev = MqttDevice::connect(&server, &creds, "meter-1").await;
    dev.publish("devices/meter-1/telemetry", r#"{"kwh": 1}"#)
        .await;
    // Silent for a second: the tick raises the alert, for the silent and the absent device.
    let open = server
        .wait_for("/api/v1/alerts?state=firing&device_id=meter-1", |v| {
            v["alerts"].as_array().is_some_and(|a| a.len() == 1)
        })
        .await;
    server
        .wait_for("/api/v1/alerts?state=firing&device_id=meter-2", |v| {
            v["alerts"].as_array().is_some_and(|a| a.len() == 1)
        })
        .await;
    assert!(
        open["alerts"][0]["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("nothing for")),
        "{open}"
    );
    dev.publish("devices/meter-1/telemetry", r#"{"kwh": 2}"#)
        .await;
    let id = open["alerts"][0]["id"].as_str().expect("id").to_owned();
    let done = server
        .wait_for(&format!("/api/v1/alerts/{id}"), |v| {
            v["state"] == "resolved"
        })
        .await;
    assert_eq!(done["resolved_by"], "auto");
}
