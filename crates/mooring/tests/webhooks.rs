//! Webhooks (issue 18): a rule's `webhook:<name>` action notifies a local receiver (an axum
//! app on port 0) through the work queue. The receiver checks every request's HMAC-SHA256
//! signature and refuses the first tries, so the delivery is retried (the same delivery id
//! each time) until it is accepted; a webhook whose receiver never answers ends in the dead
//! letter list. A real device (rumqttc over mutual TLS) publishes the telemetry that fires the
//! rules.

mod support;

use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{MqttDevice, Server, WAIT};

const SECRET: &str = "a-webhook-secret-of-some-length";

/// What the receiver got: (headers, body) per request.
type Got = Arc<Mutex<Vec<(HeaderMap, Vec<u8>)>>>;

/// A receiver that answers 500 to its first `refuse` requests, then 204.
async fn receiver(refuse: usize) -> (std::net::SocketAddr, Got) {
    let got: Got = Arc::default();
    let state = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let state = state.clone();
            async move {
                let mut got = state.lock().expect("lock");
                got.push((headers, body.to_vec()));
                if got.len() <= refuse {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, got)
}

/// What a receiver does to trust a request: HMAC-SHA256 of `<timestamp>.<body>` under the
/// shared secret, compared in constant time.
fn signature_ok(headers: &HeaderMap, body: &[u8]) -> bool {
    let (Some(ts), Some(sig)) = (
        headers
            .get("x-mooring-timestamp")
            .and_then(|v| v.to_str().ok()),
        headers
            .get("x-mooring-signature")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("sha256=")),
    ) else {
        return false;
    };
    let Ok(sig) = hex::decode(sig) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let mut signed = format!("{ts}.").into_bytes();
    signed.extend_from_slice(body);
    ring::hmac::verify(&key, &signed, &sig).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_webhook_is_signed_retried_until_accepted_and_a_dead_one_is_listed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let secret_file = tmp.path().join("webhook.secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).expect("secret");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let (addr, got) = receiver(2).await;
    let (alerts_addr, alerts_got) = receiver(0).await;
    // A port nobody listens on: every try is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let config = format!(
        "[jobs]\nretry_backoff_ms = 100\npoll_interval_ms = 100\nattempts_max = 4\n\
         [rules]\nalert_webhooks = [\"alerts\"]\n\
         [[webhook]]\nname = \"alerts\"\nurl = \"http://{alerts_addr}/hook\"\nsecret_file = \"{s}\"\n\
         [[webhook]]\nname = \"ops\"\nurl = \"http://{addr}/hook\"\nsecret_file = \"{s}\"\n\
         [[webhook]]\nname = \"broken\"\nurl = \"http://{closed}/hook\"\nsecret_file = \"{s}\"\ntimeout_ms = 500\n",
        s = secret_file.display()
    );
    let server = Server::start_configured(tmp.path(), &config);

    // Only configured webhooks may be named.
    let (status, v) = server
        .api(
            "POST",
            "/api/v1/rules",
            Some(json!({"name": "x", "when": "temp > 50", "then": "webhook:nope"})),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("unknown_webhook")),
        "{v}"
    );
    // NATS notifications need a cluster on NATS.
    let (status, v) = server
        .api(
            "POST",
            "/api/v1/rules",
            Some(json!({"name": "x", "when": "temp > 50", "then": "nats:fleet.hot"})),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("unsupported_action")),
        "{v}"
    );
    for (name, then) in [
        ("hot", "webhook:ops,alert:warning"),
        ("hot-broken", "webhook:broken"),
    ] {
        let (status, v) = server
            .api(
                "POST",
                "/api/v1/rules",
                Some(json!({"name": name, "when": "temp > 50", "then": then})),
            )
            .await;
        assert_eq!(status, 201, "{v}");
    }

    let creds = server.create_device("d1", tmp.path());
    let mut dev = MqttDevice::connect(&server, &creds, "d1").await;
    dev.publish("devices/d1/telemetry", r#"{"temp": 61}"#).await;

    // Refused twice, accepted the third time: three tries of one delivery, each signed.
    let deadline = Instant::now() + WAIT;
    while got.lock().expect("lock").len() < 3 {
        assert!(
            Instant::now() < deadline,
            "the webhook was not retried to success"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tries = got.lock().expect("lock").clone();
    let ids: Vec<&str> = tries
        .iter()
        .map(|(h, _)| {
            h.get("x-mooring-delivery")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        })
        .collect();
    assert!(ids[0].starts_with("job_"), "{ids:?}");
    assert!(ids.iter().all(|i| *i == ids[0]), "one delivery: {ids:?}");
    for (h, body) in &tries {
        assert!(signature_ok(h, body), "a bad signature: {h:?}");
        assert_eq!(h["content-type"], "application/json");
    }
    let body: Value = serde_json::from_slice(&tries[2].1).expect("JSON body");
    assert_eq!(
        (&body["event"], &body["rule"], &body["device_id"]),
        (&json!("rule.fired"), &json!("hot"), &json!("d1")),
        "{body}"
    );
    assert!(
        body["detail"].as_str().is_some_and(|d| d.contains("61")),
        "{body}"
    );
    // A body changed on the way fails the check.
    let mut forged = tries[2].1.clone();
    forged[0] = b' ';
    assert!(!signature_ok(&tries[2].0, &forged));

    // Delivered, it is gone from the queue; the broken one is dead after 4 tries.
    let dead = server
        .wait_for("/api/v1/jobs?state=dead", |v| {
            v["jobs"].as_array().is_some_and(|j| !j.is_empty())
        })
        .await;
    let job = &dead["jobs"][0];
    assert_eq!(job["action"], "webhook", "{job}");
    assert_eq!(job["params"]["webhook"], "broken", "{job}");
    assert!(
        job["created_by"]
            .as_str()
            .is_some_and(|c| c.starts_with("rule:")),
        "{job}"
    );
    assert!(
        job["last_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("4 attempts failed") && e.contains("broken")),
        "{job}"
    );
    let (status, _) = server
        .api("GET", &format!("/api/v1/jobs/{}", ids[0]), None)
        .await;
    assert_eq!(status, 404, "a delivered notification is deleted");
    assert_eq!(got.lock().expect("lock").len(), 3, "delivered once");
    // The alert the rule raised was told to the alert webhook, then its acknowledgement and
    // its resolution (each change once, signed like the rest).
    let (_, open) = server.api("GET", "/api/v1/alerts?state=open", None).await;
    let alert_id = open["alerts"][0]["id"]
        .as_str()
        .expect("an open alert")
        .to_owned();
    for verb in ["acknowledge", "resolve"] {
        let (status, v) = server
            .api("POST", &format!("/api/v1/alerts/{alert_id}/{verb}"), None)
            .await;
        assert_eq!(status, 200, "{v}");
    }
    let deadline = Instant::now() + WAIT;
    while alerts_got.lock().expect("lock").len() < 3 {
        assert!(Instant::now() < deadline, "alert changes were not all told");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let told = alerts_got.lock().expect("lock").clone();
    let mut events = Vec::new();
    for (h, body) in &told {
        assert!(signature_ok(h, body));
        let v: Value = serde_json::from_slice(body).expect("JSON");
        assert_eq!(v["alert"]["id"], alert_id.as_str(), "{v}");
        events.push(v["event"].as_str().unwrap_or("").to_owned());
    }
    events.sort();
    assert_eq!(
        events,
        ["alert.acknowledged", "alert.firing", "alert.resolved"],
        "{told:?}"
    );
    // Counted once each answer is in (the receiver saw the request a moment before).
    let deadline = Instant::now() + WAIT;
    loop {
        let metrics = server.metrics_text().await;
        if metrics.contains("mooring_webhook_deliveries_total{outcome=\"delivered\"} 4") {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A secret file others may read stops the start, saying so.
#[test]
fn a_webhook_secret_readable_by_others_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let secret_file = tmp.path().join("webhook.secret");
    std::fs::write(&secret_file, SECRET).expect("secret");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let args = support::config_args(
        tmp.path(),
        &format!(
            "[[webhook]]\nname = \"ops\"\nurl = \"http://127.0.0.1:9/hook\"\nsecret_file = \"{}\"\n",
            secret_file.display()
        ),
    );
    let out = std::process::Command::new(support::BIN)
        .arg("serve")
        .args(&args)
        .args(["--data-dir"])
        .arg(tmp.path().join("data"))
        .args(["--mqtt-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .output()
        .expect("run mooring serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("readable by others"), "{stderr}");
}

/// A rule whose receiver is down cannot grow the queue without bound: past 1,000 unfinished
/// notifications the rule's next ones are dropped and counted, and the queue holds exactly
/// 1,000 of its notifications. A real device (rumqttc) makes the rule fire 1,010 times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_past_its_pending_bound_drops_and_counts_new_notifications() {
    let tmp = tempfile::tempdir().expect("tmp");
    let secret_file = tmp.path().join("webhook.secret");
    std::fs::write(&secret_file, SECRET).expect("secret");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    // Every try is refused and the next one is an hour away: nothing leaves the queue.
    let config = format!(
        "[jobs]\nretry_backoff_ms = 3600000\nattempts_max = 5\n\
         [rules]\naction_cooldown_ms = 0\n\
         [[webhook]]\nname = \"down\"\nurl = \"http://{closed}/hook\"\nsecret_file = \"{}\"\ntimeout_ms = 500\n",
        secret_file.display()
    );
    let server = Server::start_configured(tmp.path(), &config);
    let (status, v) = server
        .api(
            "POST",
            "/api/v1/rules",
            Some(json!({"name": "hot", "when": "temp > 50", "then": "webhook:down"})),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let creds = server.create_device("d1", tmp.path());
    let mut dev = MqttDevice::connect(&server, &creds, "d1").await;
    const FIRINGS: usize = 1_010;
    for _ in 0..FIRINGS {
        dev.publish("devices/d1/telemetry", r#"{"temp": 61}"#).await;
        dev.publish("devices/d1/telemetry", r#"{"temp": 20}"#).await;
    }

    // Every firing is either queued or dropped; the queue never holds more than 1,000.
    let deadline = Instant::now() + WAIT;
    let (queued, dropped) = loop {
        let dropped = server
            .metric("mooring_webhook_deliveries_total{outcome=\"dropped\"}")
            .await as usize;
        // Nothing finishes (no try succeeds, none is retried within the test), so every job
        // listed is one of the rule's unfinished notifications.
        let mut queued = 0;
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/api/v1/jobs?limit=200&cursor={c}"),
                None => "/api/v1/jobs?limit=200".to_owned(),
            };
            let (status, page) = server.api("GET", &path, None).await;
            assert_eq!(status, 200, "{page}");
            let jobs = page["jobs"].as_array().expect("jobs");
            assert!(
                jobs.iter()
                    .all(|j| j["action"] == "webhook" && j["state"] != "dead"),
                "{page}"
            );
            queued += jobs.len();
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        if queued + dropped >= FIRINGS || Instant::now() > deadline {
            break (queued, dropped);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(queued, 1_000, "the rule's unfinished notifications");
    assert_eq!(dropped, FIRINGS - 1_000, "the rest dropped and counted");
    assert_eq!(
        server
            .metric("mooring_webhook_deliveries_total{outcome=\"delivered\"}")
            .await,
        0.0
    );
}
