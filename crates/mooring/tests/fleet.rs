//! Fleet statistics against the real binary (docs/fleet.md): `GET /api/v1/fleet/summary` with
//! selectors (tags, a version a real MQTT device reports through its shadow, online), a scoped
//! caller narrowed, `GET /api/v1/fleet/history` filled by the sampler (a short interval from the
//! config file) and refused to a scoped caller, bad input, and the `mooring fleet` CLI.

mod support;

use serde_json::{json, Value};
use support::*;

async fn create_token(server: &Server, body: Value) -> String {
    let (status, v) = server.api("POST", "/api/v1/tokens", Some(body)).await;
    assert_eq!(status, 201, "{v}");
    v["token"].as_str().expect("token").to_owned()
}

fn summary_path(selector: &str) -> String {
    format!("/api/v1/fleet/summary?selector={}", url_encode(selector))
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `(devices, online, versions as (version, devices))` of a summary.
fn counts(v: &Value) -> (u64, u64, Vec<(Value, u64)>) {
    let versions = v["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|e| {
            (
                e["version"].clone(),
                e["devices"].as_u64().expect("devices"),
            )
        })
        .collect();
    (
        v["devices"].as_u64().expect("devices"),
        v["online"].as_u64().expect("online"),
        versions,
    )
}

#[tokio::test]
async fn summary_counts_selections_and_history_sums_the_samples() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let args = config_args(tmp.path(), "[fleet]\nsample_interval_ms = 200\n");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start_with(tmp.path(), "127.0.0.1:0", "127.0.0.1:0", &args);

    // b1 is a real device (certificate from the CLI); the others exist in the registry only.
    let creds = server.create_device("b1", tmp.path());
    let (status, v) = server
        .api(
            "PUT",
            "/api/v1/devices/b1/tags",
            Some(json!({"site": "berlin", "customer": "acme"})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    for (id, tags) in [
        ("b2", json!({"site": "berlin", "customer": "acme"})),
        ("b3", json!({"site": "berlin"})),
        ("p1", json!({"site": "paris"})),
    ] {
        let (status, v) = server
            .api(
                "POST",
                "/api/v1/devices",
                Some(json!({"id": id, "tags": tags})),
            )
            .await;
        assert_eq!(status, 201, "{v}");
    }

    let mut dev = MqttDevice::connect(&server, &creds, "b1").await;
    dev.publish("devices/b1/shadow/reported", r#"{"version":"1.4.0"}"#)
        .await;
    dev.publish("devices/b1/telemetry", r#"{"seq":1,"temp":21.5,"hum":40}"#)
        .await;

    // Everything: the reported version counted, the others report none.
    let all = server
        .wait_for("/api/v1/fleet/summary", |v| v["online"] == 1)
        .await;
    assert_eq!(all["selector"], Value::Null);
    assert_eq!(
        counts(&all),
        (4, 1, vec![(Value::Null, 3), (json!("1.4.0"), 1)])
    );
    assert_eq!(all["versions_other"], 0);
    assert!(all["generated_ms"].as_u64().expect("generated_ms") > 0);

    for (selector, expected) in [
        (
            "tag:site=berlin",
            (3, 1, vec![(Value::Null, 2), (json!("1.4.0"), 1)]),
        ),
        ("tag:site=paris", (1, 0, vec![(Value::Null, 1)])),
        ("online", (1, 1, vec![(json!("1.4.0"), 1)])),
        ("version=1.4.0", (1, 1, vec![(json!("1.4.0"), 1)])),
        ("version=1.4.0 and tag:site=paris", (0, 0, vec![])),
        (
            "tag:site=berlin and online",
            (1, 1, vec![(json!("1.4.0"), 1)]),
        ),
        ("b2,p1", (2, 0, vec![(Value::Null, 2)])),
    ] {
        let (status, v) = server.api("GET", &summary_path(selector), None).await;
        assert_eq!(status, 200, "{selector}: {v}");
        assert_eq!(v["selector"], selector);
        assert_eq!(counts(&v), expected, "{selector}: {v}");
    }
    // The devices page's pair: the list with the same selector agrees.
    let (status, list) = server
        .api(
            "GET",
            &format!(
                "/api/v1/devices?limit=50&selector={}",
                url_encode("tag:site=berlin and online")
            ),
            None,
        )
        .await;
    assert_eq!(status, 200, "{list}");
    let ids: Vec<&str> = list["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(ids, ["b1"]);

    // A bad selector is a 400 with a JSON error.
    let (status, v) = server.api("GET", &summary_path("tag:"), None).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_selector")),
        "{v}"
    );

    // A scoped caller sees its scope only; the fleet-wide history is refused to it.
    let viewer = create_token(
        &server,
        json!({"name": "acme-dash", "role": "viewer", "scope": "tag:customer=acme"}),
    )
    .await;
    let r = call(
        &server,
        "GET",
        "/api/v1/fleet/summary",
        Some(&viewer),
        None,
        &[],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        counts(&r.body),
        (2, 1, vec![(json!("1.4.0"), 1), (Value::Null, 1)])
    );
    let r = call(
        &server,
        "GET",
        &summary_path("tag:site=paris"),
        Some(&viewer),
        None,
        &[],
        None,
    )
    .await;
    assert_eq!(counts(&r.body), (0, 0, vec![]), "{}", r.body);
    let r = call(
        &server,
        "GET",
        "/api/v1/fleet/history",
        Some(&viewer),
        None,
        &[],
        None,
    )
    .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (403, Some("fleet_wide")),
        "{}",
        r.body
    );

    // History: the sampler's samples appear, with the point and the messages counted.
    let history = server
        .wait_for("/api/v1/fleet/history", |v| {
            let samples = v["samples"].as_array().cloned().unwrap_or_default();
            let points: u64 = samples.iter().filter_map(|s| s["points"].as_u64()).sum();
            let messages: u64 = samples.iter().filter_map(|s| s["messages"].as_u64()).sum();
            points >= 2
                && messages >= 2
                && samples
                    .iter()
                    .any(|s| s["devices"] == 4 && s["online"] == 1)
        })
        .await;
    assert_eq!(history["step_ms"], 200);
    let ts: Vec<u64> = history["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .filter_map(|s| s["ts_ms"].as_u64())
        .collect();
    assert!(
        ts.windows(2)
            .all(|w| w[0] < w[1] && (w[1] - w[0]) % 200 == 0),
        "{ts:?}"
    );
    let (status, v) = server
        .api(
            "GET",
            "/api/v1/fleet/history?from_ms=0&to_ms=700000000",
            None,
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_window")),
        "{v}"
    );
    let (status, v) = server
        .api("GET", "/api/v1/fleet/history?from_ms=0&to_ms=1000", None)
        .await;
    assert_eq!(
        (status, v["samples"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{v}"
    );

    // The CLI: JSON for scripts, a table for people.
    let out = server.cli(&[
        "fleet",
        "summary",
        "--selector",
        "tag:site=berlin",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        (v["devices"].as_u64(), v["online"].as_u64()),
        (Some(3), Some(1))
    );
    let out = server.cli(&["fleet", "summary"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1.4.0") && text.contains("(none)"), "{text}");
    let out = server.cli(&["fleet", "history", "--since", "1h", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(!v["samples"].as_array().expect("samples").is_empty(), "{v}");
    let out = server.cli(&["fleet", "history", "--since", "1h"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("POINTS/S"));
    let out = server.cli(&["fleet", "summary", "--selector", "tag:"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_selector"));
    drop(dev);
}
