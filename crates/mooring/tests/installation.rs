//! Installation confirmation and the provisioning pipeline view (issue 16), from outside: an
//! installer token (`mooring token create --role installer`) records an installation only once
//! the device's telemetry is recent; `GET /api/v1/devices/<id>/provisioning` and
//! `mooring device show` say where a device is (first connect, first telemetry) and why a step
//! last failed.

mod support;

use serde_json::{json, Value};
use std::process::Command;
use support::{call, MqttDevice, Server};

const BIN: &str = env!("CARGO_BIN_EXE_mooring");

/// `mooring token create --role <role> --name <name>`: the secret from its JSON output.
fn token(server: &Server, role: &str, name: &str) -> String {
    let out = server.cli(&["token", "create", "--role", role, "--name", name]);
    assert!(
        out.status.success(),
        "token create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The secret is printed alone on stdout, once.
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The CLI as the holder of `token`.
fn cli_as(server: &Server, token: &str, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .args(["--server", &server.url()])
        .env("MOORING_TOKEN", token)
        .output()
        .expect("run mooring cli")
}

fn step<'a>(p: &'a Value, name: &str) -> &'a Value {
    p["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["step"] == name))
        .unwrap_or_else(|| panic!("no step {name} in {p}"))
}

#[tokio::test]
async fn an_installation_is_accepted_only_while_the_device_reports() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = support::config_args(
        tmp.path(),
        "[installations]\nseen_within_ms = 1500\n[limits]\npresence_flush_interval_secs = 1\n",
    );
    let args: Vec<&str> = config.iter().map(String::as_str).collect();
    let server = Server::start_with(
        &tmp.path().join("data"),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &args,
    );
    let creds = server.create_device("lock-7", tmp.path());
    let installer = token(&server, "installer", "ann-installer");
    let install = |body: Value| {
        let installer = installer.clone();
        let server = &server;
        async move {
            call(
                server,
                "post",
                "/api/v1/devices/lock-7/installation",
                Some(&installer),
                None,
                &[],
                Some(body),
            )
            .await
        }
    };

    // Registered, never connected: the pipeline says so, and an installation is refused.
    let (status, p) = server
        .api("GET", "/api/v1/devices/lock-7/provisioning", None)
        .await;
    assert_eq!(status, 200, "{p}");
    let names: Vec<&str> = p["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter_map(|s| s["step"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "claimed",
            "certificate_issued",
            "registered",
            "first_connect",
            "first_telemetry"
        ]
    );
    assert_eq!(step(&p, "claimed")["state"], "skipped");
    assert_eq!(step(&p, "registered")["state"], "done");
    assert_eq!(step(&p, "first_connect")["state"], "pending");
    assert_eq!(step(&p, "first_telemetry")["state"], "pending");
    let r = install(json!({"location": "Hall 3, door 2"})).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "device_not_seen");
    let message = r.body["error"]["message"].as_str().expect("message");
    assert!(message.contains("never connected"), "{message}");
    let out = cli_as(
        &server,
        &installer,
        &["device", "install", "lock-7", "--location", "Hall 3"],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("never connected"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Connected and reporting: accepted, and the device names who installed it, where.
    let mut device = MqttDevice::connect(&server, &creds, "lock-7").await;
    // A payload that is not telemetry: refused, and the pipeline shows why.
    device
        .publish("devices/lock-7/telemetry", "not json at all")
        .await;
    let p = server
        .wait_for("/api/v1/devices/lock-7/provisioning", |p| {
            !step(p, "first_telemetry")["last_error"].is_null()
        })
        .await;
    let failure = &step(&p, "first_telemetry")["last_error"];
    assert!(
        failure["message"]
            .as_str()
            .is_some_and(|m| m.contains("payload format invalid")),
        "{failure}"
    );
    assert_eq!(step(&p, "first_telemetry")["state"], "pending");
    device
        .publish("devices/lock-7/telemetry", r#"{"battery": 97}"#)
        .await;
    let r = install(json!({"location": "Hall 3, door 2", "notes": "left of the fire exit"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["installation"]["by"], "ann-installer");
    assert_eq!(r.body["installation"]["location"], "Hall 3, door 2");
    assert_eq!(r.body["installation"]["notes"], "left of the fire exit");
    let (_, d) = server.api("GET", "/api/v1/devices/lock-7", None).await;
    assert_eq!(d["installation"], r.body["installation"]);

    // First connect and first telemetry reach the store with presence's next flush.
    let p = server
        .wait_for("/api/v1/devices/lock-7/provisioning", |p| {
            step(p, "first_telemetry")["state"] == "done"
        })
        .await;
    assert_eq!(step(&p, "first_connect")["state"], "done");
    assert_eq!(p["installation"]["location"], "Hall 3, door 2");
    let out = server.cli(&["device", "show", "lock-7"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("by ann-installer at Hall 3, door 2"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("first_telemetry") && l.contains("done")),
        "{text}"
    );

    // The funnel counts it at every step; a second device never connected stops at registered.
    server.create_device("lock-8", tmp.path());
    let out = server.cli(&["fleet", "funnel", "-o", "json"]);
    assert!(out.status.success());
    let f: Value = serde_json::from_slice(&out.stdout).expect("funnel json");
    let counts: Vec<(String, u64)> = f["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| {
            (
                s["step"].as_str().unwrap_or("").to_owned(),
                s["devices"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        counts,
        [
            ("registered".to_owned(), 2),
            ("first_connect".to_owned(), 1),
            ("first_telemetry".to_owned(), 1),
            ("installed".to_owned(), 1)
        ]
    );
    let (status, f) = server
        .api(
            "GET",
            "/api/v1/provisioning/funnel?selector=id:lock-8",
            None,
        )
        .await;
    assert_eq!(status, 200, "{f}");
    assert_eq!(f["stages"][0]["devices"], 1);
    assert_eq!(f["stages"][1]["devices"], 0);

    // Bad input is refused with a reason and changes nothing.
    for (body, code) in [
        (json!({"location": "  "}), "invalid_location"),
        (json!({"location": "x".repeat(257)}), "invalid_location"),
        (
            json!({"location": "ok", "notes": "n".repeat(2049)}),
            "invalid_notes",
        ),
        (json!({"location": "ok", "where": "typo"}), "invalid_body"),
    ] {
        let r = install(body).await;
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(r.body["error"]["code"], code, "{}", r.body);
    }
    let r = call(
        &server,
        "post",
        "/api/v1/devices/ghost/installation",
        Some(&installer),
        None,
        &[],
        Some(json!({"location": "x"})),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);
    let (_, d) = server.api("GET", "/api/v1/devices/lock-7", None).await;
    assert_eq!(d["installation"]["location"], "Hall 3, door 2");

    // An installer may do nothing else; a viewer may not install.
    let out = cli_as(&server, &installer, &["device", "create", "lock-9"]);
    assert!(!out.status.success());
    let viewer = token(&server, "viewer", "val");
    let r = call(
        &server,
        "post",
        "/api/v1/devices/lock-7/installation",
        Some(&viewer),
        None,
        &[],
        Some(json!({"location": "x"})),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);

    // Silent longer than the window: refused again, saying since when.
    drop(device);
    let deadline = std::time::Instant::now() + support::WAIT;
    let refused = loop {
        let r = install(json!({"location": "Hall 4"})).await;
        if r.status == 409 {
            break r;
        }
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(std::time::Instant::now() < deadline, "never refused");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let message = refused.body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("has not sent telemetry since"),
        "{message}"
    );
}
