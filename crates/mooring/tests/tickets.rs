//! Playbooks and field-service tickets (issue 18): an alert a rule raises, a rule's `job:`
//! action and a cohort alert each run their `[[playbook]]` on the work queue; the playbook asks
//! devices for diagnostics, tags them and opens a ticket listing the devices, their sites,
//! installation records and the parts the `[[part]]` table suggests. Real devices (rumqttc over
//! mutual TLS) send the telemetry; tickets are read through the API and the CLI.

mod support;

use serde_json::{json, Value};
use support::{MqttDevice, Server};

const PLAYBOOKS: &str = r#"
[jobs]
poll_interval_ms = 100
[[playbook]]
name = "battery-visit"
on = ["rule:low-battery"]
steps = ["diagnostics", "tag:visit=due", "ticket"]
[[playbook]]
name = "check"
steps = ["ticket"]
[[playbook]]
name = "link-visit"
on = ["cohort:disconnects"]
steps = ["tag:visit=link", "ticket"]
[[part]]
part = "battery pack"
signal = "battery"
below = 20
[[part]]
part = "wireless repeater"
metric = "rssi"
below = -85
[[part]]
part = "wireless repeater"
signal = "disconnects"
above = 3
[[part]]
part = "antenna"
metric = "rssi"
above = 1000
"#;

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn tickets(server: &Server, query: &str, n: usize) -> Vec<Value> {
    let v = server
        .wait_for(&format!("/api/v1/tickets?{query}"), |v| {
            v["tickets"].as_array().is_some_and(|t| t.len() >= n)
        })
        .await;
    v["tickets"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_alert_runs_its_playbook_which_asks_tags_and_opens_a_ticket() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start_configured(tmp.path(), PLAYBOOKS);

    // A job: action must name a configured playbook.
    let (status, v) = server
        .api(
            "POST",
            "/api/v1/rules",
            Some(json!({"name": "x", "when": "rssi < -90", "then": "job:nope"})),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("unknown_playbook")),
        "{v}"
    );
    for (name, when, then) in [
        ("low-battery", "battery < 15", "alert:warning"),
        ("weak-link", "rssi < -90", "job:check"),
    ] {
        let (status, v) = server
            .api(
                "POST",
                "/api/v1/rules",
                Some(json!({"name": name, "when": when, "then": then})),
            )
            .await;
        assert_eq!(status, 201, "{v}");
    }

    let out = server.cli(&[
        "device",
        "create",
        "lock-1",
        "--tag",
        "site=berlin",
        "--out",
        tmp.path().join("lock-1").to_str().expect("utf8"),
    ]);
    ok(&out);
    let creds = support::Creds {
        dir: tmp.path().join("lock-1"),
    };
    let mut dev = MqttDevice::connect(&server, &creds, "lock-1").await;
    dev.publish(
        "devices/lock-1/telemetry",
        r#"{"battery": 50, "rssi": -70}"#,
    )
    .await;
    let (status, v) = server
        .api(
            "POST",
            "/api/v1/devices/lock-1/installation",
            Some(json!({"location": "Hall 3, door 2", "notes": "behind the shelf"})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    // Nothing is wrong yet: no ticket.
    let (_, none) = server.api("GET", "/api/v1/tickets", None).await;
    assert_eq!(none["tickets"], json!([]), "{none}");

    dev.publish(
        "devices/lock-1/telemetry",
        r#"{"battery": 10, "rssi": -95}"#,
    )
    .await;

    // The alert ran battery-visit: one ticket, for that alert.
    let visit = tickets(&server, "playbook=battery-visit", 1).await;
    assert_eq!(visit.len(), 1, "{visit:?}");
    let t = &visit[0];
    let (_, alerts) = server
        .api("GET", "/api/v1/alerts?state=open&device_id=lock-1", None)
        .await;
    let alert = &alerts["alerts"][0];
    assert_eq!(alert["rule_name"], "low-battery", "{alerts}");
    assert_eq!(t["alert_id"], alert["id"], "{t}");
    assert_eq!(t["state"], "open");
    assert!(
        t["title"]
            .as_str()
            .is_some_and(|s| s.starts_with("low-battery on lock-1: ")),
        "{t}"
    );
    assert_eq!(
        (&t["devices_total"], &t["devices_affected"]),
        (&json!(1), &json!(1))
    );
    let d = &t["devices"][0];
    assert_eq!(d["device_id"], "lock-1", "{t}");
    assert_eq!(d["site"], "berlin", "{t}");
    assert_eq!(d["installation"]["location"], "Hall 3, door 2", "{t}");
    assert_eq!(d["installation"]["notes"], "behind the shelf", "{t}");
    // The battery (10 < 20) and the latest rssi (-95 < -85) each suggest a part; the antenna
    // rule (rssi above 1000) does not.
    assert_eq!(
        d["parts"],
        json!(["battery pack", "wireless repeater"]),
        "{t}"
    );
    assert_eq!(
        t["parts"],
        json!({"battery pack": 1, "wireless repeater": 1}),
        "{t}"
    );
    assert_eq!(
        t["steps"],
        json!([
            "diagnostics requested from 1 device(s)",
            "tagged 1 device(s) visit=due",
            "ticket opened"
        ]),
        "{t}"
    );
    // What the steps did, as the device and the registry show it.
    let (_, cmds) = server
        .api("GET", "/api/v1/devices/lock-1/commands", None)
        .await;
    let diagnostics: Vec<&Value> = cmds["commands"]
        .as_array()
        .expect("commands")
        .iter()
        .filter(|c| c["name"] == "diagnostics")
        .collect();
    assert_eq!(diagnostics.len(), 1, "{cmds}");
    assert_eq!(diagnostics[0]["params"]["playbook"], "battery-visit");
    let (_, device) = server.api("GET", "/api/v1/devices/lock-1", None).await;
    assert_eq!(device["tags"]["visit"], "due", "{device}");

    // A run a rule started acts as the rule (its scope, its creator's permissions).
    let (_, jobs) = server
        .api("GET", "/api/v1/jobs?state=succeeded", None)
        .await;
    let run = jobs["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .find(|j| j["action"] == "playbook" && j["params"]["playbook"] == "battery-visit")
        .cloned()
        .expect("the playbook's job");
    assert!(
        run["created_by"]
            .as_str()
            .is_some_and(|c| c.starts_with("rule:rule_")),
        "{run}"
    );

    // The weak-link rule's job: action ran `check` for the device, with no alert.
    let check = tickets(&server, "playbook=check", 1).await;
    assert_eq!(check[0]["alert_id"], Value::Null, "{check:?}");
    assert!(
        check[0]["title"]
            .as_str()
            .is_some_and(|s| s.starts_with("weak-link on lock-1: ")),
        "{check:?}"
    );
    assert_eq!(check[0]["steps"], json!(["ticket opened"]));

    // The CLI: list, show, close.
    let id = t["id"].as_str().expect("id").to_owned();
    let list = ok(&server.cli(&["ticket", "list"]));
    assert!(
        list.contains(&id) && list.contains("battery-visit"),
        "{list}"
    );
    let show = ok(&server.cli(&["ticket", "show", &id]));
    for want in [
        "lock-1",
        "berlin",
        "Hall 3, door 2",
        "battery pack ×1",
        "visit=due",
    ] {
        assert!(show.contains(want), "{want}: {show}");
    }
    let closed = server.cli_json(&["ticket", "close", &id, "-o", "json"]);
    assert_eq!(closed["state"], "closed", "{closed}");
    assert!(closed["closed_by"].is_string(), "{closed}");
    // Closing again changes nothing.
    let again = server.cli_json(&["ticket", "close", &id, "-o", "json"]);
    assert_eq!(again["closed_at"], closed["closed_at"]);
    let open = server.cli_json(&["ticket", "list", "-o", "json"]);
    let open_ids: Vec<&str> = open["tickets"]
        .as_array()
        .expect("tickets")
        .iter()
        .filter_map(|t| t["id"].as_str())
        .collect();
    assert!(!open_ids.contains(&id.as_str()), "{open}");
    let out = server.cli(&["ticket", "show", "ticket_nope"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no ticket ticket_nope"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Bad queries are refused with a reason.
    for (query, code) in [
        ("state=bogus", "invalid_state"),
        ("limit=0", "invalid_limit"),
    ] {
        let (status, v) = server
            .api("GET", &format!("/api/v1/tickets?{query}"), None)
            .await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some(code)),
            "{v}"
        );
    }
    // A caller scoped to another site sees none of them.
    let paris = support::scoped_token(&server, "paris", "operator", "tag:site=paris");
    let r = support::call(
        &server,
        "get",
        "/api/v1/tickets",
        Some(&paris),
        None,
        &[],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["tickets"], json!([]), "{}", r.body);
    let r = support::call(
        &server,
        "get",
        &format!("/api/v1/tickets/{id}"),
        Some(&paris),
        None,
        &[],
        None,
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);
    let berlin = support::scoped_token(&server, "berlin", "operator", "tag:site=berlin");
    let r = support::call(
        &server,
        "get",
        "/api/v1/tickets",
        Some(&berlin),
        None,
        &[],
        None,
    )
    .await;
    assert_eq!(
        r.body["tickets"].as_array().map(Vec::len),
        Some(2),
        "{}",
        r.body
    );

    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains("mooring_tickets_total{outcome=\"opened\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mooring_playbook_runs_total{outcome=\"succeeded\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cohort_alert_opens_one_ticket_listing_the_cohorts_affected_devices() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = format!(
        "{PLAYBOOKS}[health]\ncohort_devices_min = 3\ncohort_group_by = [\"tag:site\"]\ncohort_interval_ms = 1000\n"
    );
    let server = Server::start_configured(tmp.path(), &config);
    let mut devices = Vec::new();
    for (id, site) in [
        ("a1", "a"),
        ("a2", "a"),
        ("a3", "a"),
        ("b1", "b"),
        ("b2", "b"),
        ("b3", "b"),
    ] {
        ok(&server.cli(&[
            "device",
            "create",
            id,
            "--tag",
            &format!("site={site}"),
            "--out",
            tmp.path().join(id).to_str().expect("utf8"),
        ]));
        devices.push((id, site));
    }
    // Site a connects once; site b's link drops 8 times per device.
    for (id, site) in &devices {
        let creds = support::Creds {
            dir: tmp.path().join(id),
        };
        let cycles = if *site == "b" { 8 } else { 1 };
        for n in 1..=cycles {
            let mut dev = MqttDevice::connect(&server, &creds, id).await;
            dev.publish(&format!("devices/{id}/telemetry"), r#"{"battery": 50}"#)
                .await;
            drop(dev);
            server
                .wait_for(&format!("/api/v1/devices/{id}/health"), |v| {
                    v["totals"]["disconnects"].as_u64() == Some(n)
                })
                .await;
        }
    }

    let list = tickets(&server, "playbook=link-visit", 1).await;
    // The sweeper counts the open alert again each second: its playbook ran once, on the
    // alert's first firing.
    server
        .wait_for("/api/v1/alerts?state=open", |v| {
            v["alerts"].as_array().is_some_and(|a| {
                a.iter().any(|a| {
                    a["rule_id"] == "cohort:tag:site:disconnects:site=b"
                        && a["count"].as_u64() >= Some(3)
                })
            })
        })
        .await;
    let (_, again) = server
        .api("GET", "/api/v1/tickets?playbook=link-visit", None)
        .await;
    assert_eq!(
        again["tickets"].as_array().map(Vec::len),
        Some(1),
        "{again}"
    );
    let t = &list[0];
    assert_eq!(t["cohort"], "site=b", "{t}");
    assert_eq!(t["signal"], "disconnects", "{t}");
    assert!(
        t["title"]
            .as_str()
            .is_some_and(|s| s.starts_with("site=b: disconnects ")),
        "{t}"
    );
    let (_, alerts) = server.api("GET", "/api/v1/alerts?state=open", None).await;
    let cohort_alert = alerts["alerts"]
        .as_array()
        .expect("alerts")
        .iter()
        .find(|a| a["rule_id"] == "cohort:tag:site:disconnects:site=b")
        .cloned()
        .expect("the cohort alert");
    assert_eq!(t["alert_id"], cohort_alert["id"], "{t}");
    assert_eq!(
        (&t["devices_total"], &t["devices_affected"]),
        (&json!(3), &json!(3)),
        "{t}"
    );
    let listed: Vec<(&str, f64, &str)> = t["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| {
            (
                d["device_id"].as_str().unwrap_or(""),
                d["value"].as_f64().unwrap_or(-1.0),
                d["site"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [("b1", 8.0, "b"), ("b2", 8.0, "b"), ("b3", 8.0, "b")],
        "{t}"
    );
    // 8 disconnects each (above 3): a repeater for each.
    assert_eq!(t["parts"], json!({"wireless repeater": 3}), "{t}");
    for (id, site) in &devices {
        let (_, d) = server
            .api("GET", &format!("/api/v1/devices/{id}"), None)
            .await;
        let want = if *site == "b" {
            json!("link")
        } else {
            Value::Null
        };
        assert_eq!(d["tags"]["visit"], want, "{d}");
    }
}

/// A playbook the server cannot run stops the start, saying why.
#[test]
fn a_bad_playbook_stops_the_start() {
    for (config, want) in [
        (
            "[[playbook]]\nname = \"p\"\nsteps = [\"reboot\"]\n",
            "unknown step \"reboot\"",
        ),
        (
            "[[playbook]]\nname = \"p\"\non = [\"cohort:mood\"]\nsteps = [\"ticket\"]\n",
            "on \"cohort:mood\"",
        ),
        (
            "[[part]]\npart = \"repeater\"\nmetric = \"rssi\"\n",
            "exactly one of below or above",
        ),
    ] {
        let stderr = support::serve_refused(config);
        assert!(stderr.contains(want), "{want}: {stderr}");
    }
}
