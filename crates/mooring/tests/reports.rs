//! Reports (issue 18): telemetry of a selection made in the background as a job on the work
//! queue, followed and downloaded through the API and the CLI, on SQLite. Real devices
//! (rumqttc over mutual TLS) publish the points. The PostgreSQL case, a worker killed mid-report
//! and another finishing it, is in cluster.rs.

mod support;

use serde_json::{json, Value};
use std::collections::BTreeSet;
use support::{publish_series, Server};

/// Tiny turns (7 points, so a turn often ends between two points of one timestamp) with no
/// pause between them.
const CONFIG: &str = "[jobs]\nreport_points_per_turn = 7\nbatch_pause_ms = 0\n";

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What `publish_series` stored for `id` in messages `from..to`: (device, ts, metric, value).
fn series(id: &str, t0: u64, from: u64, to: u64) -> BTreeSet<(String, u64, String, String)> {
    let mut out = BTreeSet::new();
    for i in from..to {
        let ts = t0 + i * 1000;
        for (m, v) in [
            ("temp", i.to_string()),
            ("hum", (50 + i).to_string()),
            ("on", (i % 2 == 0).to_string()),
        ] {
            out.insert((id.to_owned(), ts, m.to_owned(), v));
        }
    }
    out
}

/// `mooring device create ID --tag site=SITE`, its credentials under `root`.
fn create_tagged(server: &Server, root: &std::path::Path, id: &str, site: &str) -> support::Creds {
    let dir = root.join(id);
    let out = server.cli(&[
        "device",
        "create",
        id,
        "--out",
        dir.to_str().expect("utf8"),
        "--tag",
        &format!("site={site}"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    support::Creds { dir }
}

async fn finished(server: &Server, id: &str) -> Value {
    server
        .wait_for(&format!("/api/v1/jobs/{id}"), |j| {
            ["succeeded", "failed", "canceled", "dead"].contains(&j["state"].as_str().unwrap_or(""))
        })
        .await
}

#[tokio::test]
async fn a_telemetry_report_runs_as_a_job_and_downloads_every_point_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start_configured(tmp.path(), CONFIG);
    let t0 = (now_ms() - 3_600_000) / 1000 * 1000;
    for (id, site) in [("b1", "berlin"), ("b2", "berlin"), ("p1", "paris")] {
        let creds = create_tagged(&server, tmp.path(), id, site);
        publish_series(&server, &creds, id, t0, 40).await;
    }

    // Messages 5..35 of the Berlin devices: 2 x 30 x 3 points.
    let (status, job) = server
        .api(
            "POST",
            "/api/v1/reports",
            Some(json!({"kind": "telemetry", "selector": "tag:site=berlin",
                "from_ms": t0 + 5_000, "to_ms": t0 + 35_000, "format": "csv"})),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["action"], "report");
    assert_eq!(job["state"], "queued");
    let id = job["id"].as_str().expect("id").to_owned();
    let job = finished(&server, &id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(
        (&job["total"], &job["done"]),
        (&json!(2), &json!(2)),
        "{job}"
    );
    assert_eq!(job["result"]["points"], 180, "{job}");
    assert_eq!(job["result"]["format"], "csv");
    assert_eq!(job["attempts"], 0);
    assert_eq!(job["worker"], Value::Null);

    // The download: its media type, its length, every point once, devices in id order and
    // each device's points oldest first.
    let resp = support::http()
        .get(format!("{}/api/v1/jobs/{id}/result", server.url()))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("download");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().ok(),
        Some("text/csv; charset=utf-8")
    );
    let text = resp.text().await.expect("body");
    assert_eq!(Some(text.len() as u64), job["result"]["bytes"].as_u64());
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("device_id,ts_ms,time,metric,value"));
    let mut rows = Vec::new();
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 5, "{line}");
        rows.push((
            f[0].to_owned(),
            f[1].parse::<u64>().expect("ts"),
            f[3].to_owned(),
            f[4].to_owned(),
        ));
        assert!(f[2].ends_with('Z'), "RFC 3339 time: {line}");
    }
    assert_eq!(rows.len(), 180, "no point twice");
    assert!(
        rows.windows(2)
            .all(|w| (&w[0].0, w[0].1) <= (&w[1].0, w[1].1)),
        "device by device, oldest first"
    );
    let mut want = series("b1", t0, 5, 35);
    want.extend(series("b2", t0, 5, 35));
    assert_eq!(rows.into_iter().collect::<BTreeSet<_>>(), want);

    // The same through the CLI: one metric as JSON lines into a file.
    let out_file = tmp.path().join("temp.jsonl");
    let out = server.cli(&[
        "report",
        "telemetry",
        "--selector",
        "tag:site=berlin",
        "--from",
        &(t0 + 5_000).to_string(),
        "--to",
        &(t0 + 35_000).to_string(),
        "--format",
        "jsonl",
        "--metric",
        "temp",
        "--out",
        out_file.to_str().expect("utf8"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("60 points"), "progress on stderr: {stderr}");
    let text = std::fs::read_to_string(&out_file).expect("report file");
    let got: BTreeSet<(String, u64, String, String)> = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("a JSON line");
            (
                v["device_id"].as_str().expect("device").to_owned(),
                v["ts_ms"].as_u64().expect("ts"),
                v["metric"].as_str().expect("metric").to_owned(),
                // Numbers are stored as f64: 5 comes back as 5.0.
                v["value"]
                    .as_f64()
                    .map_or_else(|| v["value"].to_string(), |n| n.to_string()),
            )
        })
        .collect();
    assert_eq!(text.lines().count(), 60);
    let want: BTreeSet<_> = want.into_iter().filter(|r| r.2 == "temp").collect();
    assert_eq!(got, want);
    assert!(!tmp.path().join("temp.jsonl.part").exists());

    // `mooring job result` downloads it again, to stdout.
    let out = server.cli(&["job", "result", &id]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        text_of(&server, &id).await
    );
}

async fn text_of(server: &Server, id: &str) -> String {
    let (status, v) = server
        .api("GET", &format!("/api/v1/jobs/{id}/result"), None)
        .await;
    assert_eq!(status, 200, "{v}");
    v.as_str().expect("text").to_owned()
}

#[tokio::test]
async fn bad_reports_are_refused_and_results_only_come_from_succeeded_reports() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start_configured(tmp.path(), CONFIG);
    let base =
        json!({"kind": "telemetry", "selector": "tag:site=berlin", "from_ms": 1000, "to_ms": 2000});
    for (change, code) in [
        (json!({"kind": "uptime"}), "invalid_kind"),
        (json!({"format": "xml"}), "invalid_format"),
        (json!({"to_ms": 1000}), "invalid_range"),
        (json!({"metrics": ["a b"]}), "invalid_metrics"),
        (json!({"selector": "tag:"}), "invalid_selector"),
    ] {
        let mut body = base.clone();
        for (k, v) in change.as_object().expect("object") {
            body[k] = v.clone();
        }
        let (status, v) = server.api("POST", "/api/v1/reports", Some(body)).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some(code)),
            "{v}"
        );
    }
    let (status, v) = server
        .api(
            "POST",
            "/api/v1/reports",
            Some(json!({"kind": "telemetry"})),
        )
        .await;
    assert_eq!(status, 400, "{v}");

    // A tag job makes no result.
    let (status, job) = server
        .api(
            "POST",
            "/api/v1/jobs",
            Some(json!({"selector": "tag:site=none", "action": "tag", "tags": {"a": "b"}})),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("id");
    finished(&server, id).await;
    let (status, v) = server
        .api("GET", &format!("/api/v1/jobs/{id}/result"), None)
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("no_result")),
        "{v}"
    );
    let (status, v) = server
        .api("GET", "/api/v1/jobs/job_000000000000000000/result", None)
        .await;
    assert_eq!(status, 404, "{v}");

    // The dead letter list is a state filter; an unknown state is an error.
    let (status, v) = server.api("GET", "/api/v1/jobs?state=dead", None).await;
    assert_eq!((status, &v["jobs"]), (200, &json!([])), "{v}");
    let (status, v) = server.api("GET", "/api/v1/jobs?state=zombie", None).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_state")),
        "{v}"
    );
    let (status, v) = server
        .api("GET", "/api/v1/jobs?state=succeeded", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(v["jobs"].as_array().map(Vec::len), Some(1), "{v}");

    // A report of no devices succeeds, empty but for the header.
    let (status, job) = server.api("POST", "/api/v1/reports", Some(base)).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("id");
    let job = finished(&server, id).await;
    assert_eq!(
        (&job["state"], &job["result"]["points"]),
        (&json!("succeeded"), &json!(0))
    );
    assert_eq!(
        text_of(&server, id).await,
        "device_id,ts_ms,time,metric,value\n"
    );

    // The CLI refuses bad flags before calling the server (exit 2).
    for args in [
        &[
            "report",
            "telemetry",
            "--selector",
            "tag:a=b",
            "--format",
            "xml",
        ][..],
        &[
            "report",
            "telemetry",
            "--selector",
            "tag:a=b",
            "--from",
            "yesterday",
        ],
        &[
            "report",
            "telemetry",
            "--selector",
            "tag:a=b",
            "--from",
            "1h",
            "--to",
            "2h",
        ],
        &["job", "result", "nope"],
    ] {
        let out = server.cli(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
    // A viewer may export what it may read: its scope narrows the report's selector.
    let secret = support::scoped_token(&server, "analyst", "viewer", "tag:site=paris");
    let resp = support::http()
        .post(format!("{}/api/v1/reports", server.url()))
        .bearer_auth(&secret)
        .json(
            &json!({"kind": "telemetry", "selector": "tag:site=berlin", "from_ms": 1, "to_ms": 2}),
        )
        .send()
        .await
        .expect("report");
    assert_eq!(resp.status(), 202);
    let job: Value = resp.json().await.expect("job");
    let selector = job["selector"].as_str().unwrap_or("");
    assert!(
        selector.contains("tag:site=berlin") && selector.contains("tag:site=paris"),
        "{job}"
    );
}

/// `mooring worker` takes turns of a cluster's shared queue: on a single node's config
/// (SQLite) it refuses to start, saying what it needs.
#[test]
fn a_worker_refuses_a_config_without_a_cluster() {
    let tmp = tempfile::tempdir().expect("tmp");
    let args = support::config_args(tmp.path(), "[jobs]\nworkers = 2\n");
    let out = std::process::Command::new(support::BIN)
        .arg("worker")
        .args(&args)
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .output()
        .expect("run mooring worker");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("[store] url"), "{stderr}");
    let out = std::process::Command::new(support::BIN)
        .arg("worker")
        .output()
        .expect("run mooring worker");
    assert_eq!(out.status.code(), Some(2), "--config is required");
}

/// A report canceled half way keeps no partial file; the worker running it stops at its next
/// write.
#[tokio::test]
async fn a_canceled_report_keeps_no_partial_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start_configured(
        tmp.path(),
        "[jobs]\nreport_points_per_turn = 5\nbatch_pause_ms = 300\n",
    );
    let t0 = (now_ms() - 3_600_000) / 1000 * 1000;
    let creds = server.create_device("c1", tmp.path());
    publish_series(&server, &creds, "c1", t0, 20).await;
    let (status, job) = server
        .api(
            "POST",
            "/api/v1/reports",
            Some(
                json!({"kind": "telemetry", "selector": "c1", "from_ms": t0, "to_ms": t0 + 20_000}),
            ),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("id").to_owned();
    server
        .wait_for(&format!("/api/v1/jobs/{id}"), |j| {
            j["result"]["points"].as_u64().unwrap_or(0) > 0
        })
        .await;
    let (status, job) = server
        .api("POST", &format!("/api/v1/jobs/{id}/cancel"), None)
        .await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["state"], "canceled", "{job}");
    assert_eq!(job["result"]["bytes"], 0, "{job}");
    assert_eq!(job["worker"], Value::Null, "{job}");
    let (status, v) = server
        .api("GET", &format!("/api/v1/jobs/{id}/result"), None)
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("no_result")),
        "{v}"
    );
}

/// The fleet report: health per cohort, versions and open alerts in one HTML page (served so
/// a browser runs nothing in it), or the cohort table as CSV through the CLI.
#[tokio::test]
async fn a_fleet_report_shows_health_per_cohort_versions_and_open_alerts() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start_configured(tmp.path(), CONFIG);
    for (id, site) in [("f1", "berlin"), ("f2", "berlin"), ("f3", "paris")] {
        create_tagged(&server, tmp.path(), id, site);
    }
    let (status, v) = server
        .api(
            "POST",
            "/api/v1/rules",
            Some(json!({"name": "hot", "when": "temp > 50", "then": "alert:critical"})),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let creds = support::Creds {
        dir: tmp.path().join("f1"),
    };
    let mut dev = support::MqttDevice::connect(&server, &creds, "f1").await;
    dev.publish("devices/f1/shadow/reported", r#"{"version": "1.4.0"}"#)
        .await;
    dev.publish("devices/f1/telemetry", r#"{"temp": 60}"#).await;
    server
        .wait_for("/api/v1/alerts?state=open", |v| {
            v["alerts"].as_array().is_some_and(|a| a.len() == 1)
        })
        .await;

    let (status, job) = server
        .api(
            "POST",
            "/api/v1/reports",
            Some(json!({"kind": "fleet", "group_by": "tag:site"})),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["selector"], "", "every device");
    let id = job["id"].as_str().expect("id").to_owned();
    let job = finished(&server, &id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(
        (&job["total"], &job["result"]["format"]),
        (&json!(3), &json!("html"))
    );
    let resp = support::http()
        .get(format!("{}/api/v1/jobs/{id}/result", server.url()))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("download");
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert!(h["content-security-policy"]
        .to_str()
        .is_ok_and(|c| c.contains("default-src 'none'") && c.contains("sandbox")));
    assert!(h["content-disposition"]
        .to_str()
        .is_ok_and(|c| c.contains(".html")));
    let page = resp.text().await.expect("page");
    for want in [
        "<h2>Health per cohort</h2>",
        "site=berlin",
        "site=paris",
        "<h2>Firmware versions</h2>",
        "1.4.0",
        "1 critical",
        "<td>f1</td>",
    ] {
        assert!(page.contains(want), "{want} missing from:\n{page}");
    }
    assert!(!page.contains("<script"), "{page}");

    // The cohort table as CSV, through the CLI, for Berlin only.
    let out_file = tmp.path().join("fleet.csv");
    let out = server.cli(&[
        "report",
        "fleet",
        "--selector",
        "tag:site=berlin",
        "--group-by",
        "tag:site",
        "--format",
        "csv",
        "--out",
        out_file.to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = std::fs::read_to_string(&out_file).expect("csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert!(
        lines[0].starts_with("cohort,devices,online,reporting,device_hours,"),
        "{csv}"
    );
    assert_eq!(lines.len(), 2, "one cohort: {csv}");
    assert!(lines[1].starts_with("site=berlin,2,"), "{csv}");

    // Fleet reports take no range; telemetry ones no group_by.
    for (body, code) in [
        (
            json!({"kind": "fleet", "from_ms": 1, "to_ms": 2}),
            "invalid_params",
        ),
        (
            json!({"kind": "fleet", "format": "jsonl"}),
            "invalid_format",
        ),
        (
            json!({"kind": "fleet", "group_by": "colour"}),
            "invalid_group_by",
        ),
        (
            json!({"kind": "telemetry", "selector": "f1", "from_ms": 1, "to_ms": 2, "group_by": "tag:site"}),
            "invalid_params",
        ),
        (
            json!({"kind": "telemetry", "selector": "f1"}),
            "invalid_range",
        ),
    ] {
        let (status, v) = server.api("POST", "/api/v1/reports", Some(body)).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some(code)),
            "{v}"
        );
    }
}

/// A report larger than `[jobs] report_bytes_max` fails, saying so, and keeps nothing: one
/// caller's export cannot fill the store.
#[tokio::test]
async fn a_report_past_its_byte_bound_fails_and_keeps_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start_configured(
        tmp.path(),
        "[jobs]\nreport_points_per_turn = 5\nbatch_pause_ms = 0\nreport_bytes_max = 300\n",
    );
    let t0 = (now_ms() - 3_600_000) / 1000 * 1000;
    let creds = server.create_device("big1", tmp.path());
    publish_series(&server, &creds, "big1", t0, 20).await;
    let (status, job) = server
        .api(
            "POST",
            "/api/v1/reports",
            Some(json!({"kind": "telemetry", "selector": "big1", "from_ms": t0, "to_ms": t0 + 20_000})),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("id").to_owned();
    let job = finished(&server, &id).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert!(
        job["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("report_bytes_max (300 bytes)")),
        "{job}"
    );
    assert_eq!(job["result"]["bytes"], 0, "{job}");
    let (status, v) = server
        .api("GET", &format!("/api/v1/jobs/{id}/result"), None)
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("no_result")),
        "{v}"
    );
}
