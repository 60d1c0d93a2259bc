//! Behavioural tests of device shadows: versions and If-Match over HTTP, the retained delta a
//! device receives over MQTT (also after a server restart), and reported updates.

mod support;

use serde_json::{json, Value};
use support::{MqttDevice, Server};

async fn patch(
    server: &Server,
    device: &str,
    if_match: Option<&str>,
    body: Value,
) -> (u16, Option<String>, Value) {
    let client = support::http();
    let mut req = client
        .patch(format!("{}/api/v1/devices/{device}/shadow", server.url()))
        .bearer_auth(&server.token)
        .json(&body);
    if let Some(v) = if_match {
        req = req.header("If-Match", v);
    }
    let resp = req.send().await.expect("http");
    let status = resp.status().as_u16();
    let etag = resp
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, etag, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn shadow_versions_if_match_retained_delta_and_reported_updates() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let creds = server.create_device("d1", tmp.path());

    let (status, s) = server.api("GET", "/api/v1/devices/d1/shadow", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        s,
        json!({"desired": {}, "reported": {}, "version": 0, "delta": {}})
    );

    // Unconditional patch, then a conditional one; a stale version is refused with 412.
    let (status, etag, s) = patch(
        &server,
        "d1",
        None,
        json!({"desired": {"led": "on", "fw": {"channel": "beta"}}}),
    )
    .await;
    assert_eq!((status, etag.as_deref()), (200, Some("\"1\"")), "{s}");
    assert_eq!(s["delta"], json!({"led": "on", "fw": {"channel": "beta"}}));
    let (status, _, s) = patch(
        &server,
        "d1",
        Some("\"1\""),
        json!({"desired": {"mode": "eco", "fw": null}}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(s["version"], 2);
    assert_eq!(s["desired"], json!({"led": "on", "mode": "eco"}));
    let (status, _, e) = patch(&server, "d1", Some("1"), json!({"desired": {"led": "off"}})).await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (412, Some("version_mismatch"))
    );

    // Invalid input: 400 JSON errors; unknown device: 404.
    let (status, _, e) = patch(&server, "d1", None, json!({"desired": [1]})).await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("invalid_shadow"))
    );
    let (status, _, e) = patch(&server, "d1", Some("abc"), json!({"desired": {}})).await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("invalid_if_match"))
    );
    let (status, _, e) = patch(&server, "d1", None, json!({"reported": {}})).await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("invalid_body"))
    );
    let (status, _, _) = patch(&server, "ghost", None, json!({"desired": {}})).await;
    assert_eq!(status, 404);

    // A device that subscribes after the patch gets the retained delta.
    let mut dev = MqttDevice::connect(&server, &creds, "d1").await;
    dev.subscribe("devices/d1/shadow/delta").await;
    let (topic, delta) = dev.next_json().await;
    assert_eq!(topic, "devices/d1/shadow/delta");
    assert_eq!(
        delta,
        json!({"version": 2, "delta": {"led": "on", "mode": "eco"}})
    );

    // It reports part of it: the delta shrinks (and is published again).
    dev.publish("devices/d1/shadow/reported", r#"{"led":"on","temp":21}"#)
        .await;
    let (_, delta) = dev.next_json().await;
    assert_eq!(delta, json!({"version": 3, "delta": {"mode": "eco"}}));
    // It reports the rest: in sync, the retained delta is cleared (an empty message).
    dev.publish(
        "devices/d1/shadow/reported",
        r#"{"mode":"eco","version":"1.4.0"}"#,
    )
    .await;
    let (_, raw) = dev.next_raw().await;
    assert!(
        raw.is_empty(),
        "in sync: empty retained message clears the delta"
    );
    let (_, s) = server.api("GET", "/api/v1/devices/d1/shadow", None).await;
    assert_eq!(s["version"], 4);
    assert_eq!(s["delta"], json!({}));
    assert_eq!(
        s["reported"],
        json!({"led": "on", "mode": "eco", "temp": 21, "version": "1.4.0"})
    );
    // Invalid reports are refused (QoS 1 PUBACK still comes; nothing changes).
    dev.publish("devices/d1/shadow/reported", "[1,2]").await;
    let (_, s) = server.api("GET", "/api/v1/devices/d1/shadow", None).await;
    assert_eq!(s["version"], 4);
    drop(dev);

    // Out of sync again, then a server restart: the retained delta is there for the device.
    let (status, _, _) = patch(&server, "d1", Some("4"), json!({"desired": {"led": "off"}})).await;
    assert_eq!(status, 200);
    server.kill9();
    let server = Server::start(&data);
    let mut dev = MqttDevice::connect(&server, &creds, "d1").await;
    dev.subscribe("devices/d1/shadow/delta").await;
    let (_, delta) = dev.next_json().await;
    assert_eq!(delta, json!({"version": 5, "delta": {"led": "off"}}));
    let (_, s) = server.api("GET", "/api/v1/devices/d1/shadow", None).await;
    assert_eq!(s["version"], 5);
}
