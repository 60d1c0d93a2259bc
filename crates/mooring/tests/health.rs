//! Fleet health (issue 18): per-device signals from what the server sees of real MQTT clients
//! (rumqttc), the fleet summary per cohort with the cohort test, through the API and the CLI.

mod support;

use serde_json::{json, Value};
use support::{MqttDevice, Server};

/// Cohorts of 3 devices are tested (the default minimum is 20); the cohort sweeper tests the
/// sites every second.
const CONFIG: &str = "[health]\ncohort_devices_min = 3\ncohort_group_by = [\"tag:site\"]\ncohort_interval_ms = 1000\n";

async fn health(server: &Server, id: &str) -> Value {
    let (status, v) = server
        .api("GET", &format!("/api/v1/devices/{id}/health"), None)
        .await;
    assert_eq!(status, 200, "{v}");
    v
}

/// Waits until the server has seen `n` disconnects of `id` (a dropped client's socket is noticed
/// asynchronously).
async fn wait_disconnects(server: &Server, id: &str, n: u64) {
    server
        .wait_for(&format!("/api/v1/devices/{id}/health"), |v| {
            v["totals"]["disconnects"].as_u64() == Some(n)
        })
        .await;
}

#[tokio::test]
async fn a_devices_health_counts_what_the_server_saw() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start_configured(tmp.path(), CONFIG);
    let creds = server.create_device("d1", tmp.path());

    // Nothing seen yet: an empty record, not an error.
    let h = health(&server, "d1").await;
    assert_eq!(h["since_ms"], Value::Null);
    assert_eq!(h["totals"]["connects"], 0);

    let mut dev = MqttDevice::connect(&server, &creds, "d1").await;
    dev.subscribe("devices/d1/commands/+").await;
    dev.publish("devices/d1/telemetry", r#"{"battery": 81.5, "temp": 20}"#)
        .await;
    dev.publish(
        "devices/d1/shadow/reported",
        r#"{"agent": {"boots": 3, "unclean_stops": 1}}"#,
    )
    .await;
    // The agent started twice more, once after a crash.
    dev.publish(
        "devices/d1/shadow/reported",
        r#"{"agent": {"boots": 5, "unclean_stops": 2}}"#,
    )
    .await;
    // A diagnostics command the device answers with a failure.
    let (status, cmd) = server
        .api(
            "POST",
            "/api/v1/devices/d1/commands",
            Some(json!({"name": "diagnostics"})),
        )
        .await;
    assert_eq!(status, 202, "{cmd}");
    let cmd_id = cmd["id"].as_str().expect("command id").to_owned();
    let (topic, _) = dev.next_json().await;
    assert_eq!(topic, format!("devices/d1/commands/{cmd_id}"));
    dev.publish(
        &format!("devices/d1/commands/{cmd_id}/result"),
        r#"{"status": "failed", "output": {"error": "sensor bus timeout"}}"#,
    )
    .await;

    let h = health(&server, "d1").await;
    assert_eq!(h["online"], true, "{h}");
    assert_eq!(h["totals"]["connects"], 1, "{h}");
    assert_eq!(h["totals"]["restarts"], 2, "{h}");
    assert_eq!(h["totals"]["crashes"], 1, "{h}");
    assert_eq!(h["totals"]["command_failures"], 1, "{h}");
    assert_eq!(h["last_24h"]["command_failures"], 1, "{h}");
    assert_eq!(h["agent"], json!({"boots": 5, "unclean_stops": 2}));
    assert_eq!(h["battery"]["level"], 81.5, "{h}");
    assert_eq!(h["last_diagnostics"]["command_id"], cmd_id.as_str());
    assert_eq!(h["last_diagnostics"]["state"], "failed");
    assert!(h["telemetry"]["last_ms"].as_u64().is_some(), "{h}");
    assert!(h["reconnects_per_hour"].as_f64().is_some_and(|r| r > 0.0));

    // Gone and back: a disconnect and a second connect.
    drop(dev);
    wait_disconnects(&server, "d1", 1).await;
    let h = health(&server, "d1").await;
    assert_eq!(h["online"], false, "{h}");
    let _dev = MqttDevice::connect(&server, &creds, "d1").await;
    let h = health(&server, "d1").await;
    assert_eq!(h["totals"]["connects"], 2, "{h}");
    assert_eq!(h["totals"]["disconnects"], 1, "{h}");

    // The CLI prints the same record, as JSON and as a table.
    let cli = server.cli_json(&["device", "health", "d1", "-o", "json"]);
    assert_eq!(cli["totals"], h["totals"], "{cli}");
    let out = server.cli(&["device", "health", "d1"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("reconnects/h"), "{text}");
    assert!(text.contains("5 (2 unclean)"), "{text}");

    // Unknown device: 404 with a JSON body; the CLI says so and fails.
    let (status, body) = server.api("GET", "/api/v1/devices/nope/health", None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("device_not_found")),
        "{body}"
    );
    let out = server.cli(&["device", "health", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));

    // Deleting the device deletes its record: created again, it starts with nothing.
    let (status, _) = server.api("DELETE", "/api/v1/devices/d1", None).await;
    assert_eq!(status, 204);
    let _ = server.create_device("d1", &tmp.path().join("again"));
    let h = health(&server, "d1").await;
    assert_eq!(h["totals"]["connects"], 0, "{h}");
}

#[tokio::test]
async fn a_cohort_that_disconnects_more_than_the_rest_is_one_anomaly() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start_configured(tmp.path(), CONFIG);
    let mut devices = Vec::new();
    for (id, site) in [
        ("a1", "a"),
        ("a2", "a"),
        ("a3", "a"),
        ("b1", "b"),
        ("b2", "b"),
        ("b3", "b"),
    ] {
        let out = server.cli(&[
            "device",
            "create",
            id,
            "--tag",
            &format!("site={site}"),
            "--out",
            tmp.path().join(id).to_str().expect("utf8"),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        devices.push((
            id,
            site,
            support::Creds {
                dir: tmp.path().join(id),
            },
        ));
    }
    // Site a connects once; site b's link drops 8 times per device.
    for (id, site, creds) in &devices {
        let cycles = if *site == "b" { 8 } else { 1 };
        for n in 1..=cycles {
            let mut dev = MqttDevice::connect(&server, creds, id).await;
            dev.publish(&format!("devices/{id}/telemetry"), r#"{"battery": 50}"#)
                .await;
            drop(dev);
            wait_disconnects(&server, id, n).await;
        }
    }

    let (status, s) = server
        .api("GET", "/api/v1/health?group_by=tag:site", None)
        .await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["devices"], 6);
    assert_eq!(s["group_by"], json!(["tag:site"]));
    let groups = s["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 2, "{s}");
    let b = groups
        .iter()
        .find(|g| g["label"] == "site=b")
        .expect("site=b");
    assert_eq!(b["key"], json!({"tag:site": "b"}));
    assert_eq!(
        (b["devices"].as_u64(), b["reporting"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(b["last_24h"]["disconnects"], 24, "{b}");
    assert_eq!(b["battery_mean"], 50.0);
    let anomalies = s["anomalies"].as_array().expect("anomalies");
    assert_eq!(
        anomalies.len(),
        1,
        "one alert for the cohort, not one per device: {s}"
    );
    assert_eq!(anomalies[0]["cohort"], "site=b");
    assert_eq!(anomalies[0]["signal"], "disconnects");
    assert_eq!(anomalies[0]["events"], 24);
    let text = anomalies[0]["description"].as_str().expect("description");
    // 8× when every record covers the same time (the test takes under a minute, the least a
    // record counts); more if site a's records started earlier.
    assert!(text.starts_with("site=b: disconnects "), "{text}");
    assert!(text.contains("× fleet rate (n=3, p<"), "{text}");
    assert!(
        anomalies[0]["rate_ratio"]
            .as_f64()
            .is_some_and(|r| r >= 7.9),
        "{s}"
    );

    // The cohort sweeper raised one alert for the cohort, none for its devices.
    let cohort = server
        .wait_for("/api/v1/alerts?state=open", |v| {
            v["alerts"].as_array().is_some_and(|a| !a.is_empty())
        })
        .await;
    let open = cohort["alerts"].as_array().expect("alerts");
    assert_eq!(open.len(), 1, "{cohort}");
    assert_eq!(open[0]["device_id"], Value::Null, "{cohort}");
    assert_eq!(open[0]["rule_name"], "cohort tag:site", "{cohort}");
    assert_eq!(
        open[0]["rule_id"], "cohort:tag:site:disconnects:site=b",
        "{cohort}"
    );
    assert!(
        open[0]["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("site=b: disconnects ")),
        "{cohort}"
    );

    // Not grouped: one cohort, nothing to compare it with.
    let (_, same) = server
        .api("GET", "/api/v1/health?selector=tag:site=a", None)
        .await;
    assert_eq!(same["groups"].as_array().map(Vec::len), Some(1));
    assert_eq!(same["groups"][0]["label"], "all");
    assert_eq!(same["anomalies"], json!([]));

    // The CLI: the table and the anomaly line; bad keys refused with the reason.
    let out = server.cli(&["health", "--group-by", "tag:site"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("site=b: disconnects "), "{text}");
    let out = server.cli(&["health", "--group-by", "site"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tag:<key> or version"), "{err}");
    let (status, body) = server
        .api("GET", "/api/v1/health?group_by=version,version", None)
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_group_by")),
        "{body}"
    );
}
