//! Bulk actions as background jobs (issue 15), tested from outside against the real binary:
//! tag, untag and delete over a selection with progress, a command job reaching a real MQTT
//! device, roles, scopes, the per-creator bound, cancel, a restart mid-job, bad input, the CLI.

mod support;

use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{call, config_args, MqttDevice, Server, WAIT};

/// Creates `n` devices `<prefix>NNNN` with `tags`, ten requests at a time.
async fn create_devices(server: &Arc<Server>, prefix: &str, n: usize, tags: Value) {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}{i:04}")).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in ids.chunks(n.div_ceil(10).max(1)) {
        let chunk = chunk.to_vec();
        let server = server.clone();
        let tags = tags.clone();
        tasks.spawn(async move {
            for id in chunk {
                let (status, body) = server
                    .api(
                        "POST",
                        "/api/v1/devices",
                        Some(json!({"id": id, "tags": tags})),
                    )
                    .await;
                assert_eq!(status, 201, "{body}");
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("create devices");
    }
}

/// Every device matching `selector` (admin view).
async fn selected(server: &Server, selector: &str) -> Vec<Value> {
    let (status, v) = server
        .api(
            "GET",
            &format!("/api/v1/devices?limit=1000&selector={}", urlenc(selector)),
            None,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    v["devices"].as_array().cloned().unwrap_or_default()
}

fn urlenc(s: &str) -> String {
    s.replace('%', "%25")
        .replace(' ', "%20")
        .replace(':', "%3A")
        .replace('=', "%3D")
        .replace(',', "%2C")
}

async fn create_job(server: &Server, body: Value) -> Value {
    let (status, job) = server.api("POST", "/api/v1/jobs", Some(body)).await;
    assert_eq!(status, 202, "{job}");
    assert!(job["id"].as_str().is_some_and(|i| i.starts_with("job_")));
    job
}

/// Polls the job until it is finished (bounded).
async fn finished(server: &Server, id: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, job) = server.api("GET", &format!("/api/v1/jobs/{id}"), None).await;
        assert_eq!(status, 200, "{job}");
        if ["succeeded", "failed", "canceled"].contains(&job["state"].as_str().unwrap_or("")) {
            return job;
        }
        assert!(Instant::now() < deadline, "job never finished: {job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rate(job: &Value) -> f64 {
    let ms = job["finished_ms"].as_u64().unwrap_or(0) - job["started_ms"].as_u64().unwrap_or(0);
    job["done"].as_f64().unwrap_or(0.0) * 1000.0 / (ms.max(1) as f64)
}

#[tokio::test]
async fn bulk_tag_untag_and_delete_run_as_jobs_with_progress() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Arc::new(Server::start(tmp.path()));
    create_devices(&server, "b", 300, json!({"site": "berlin"})).await;
    create_devices(&server, "p", 2, json!({"site": "paris"})).await;

    let job = create_job(
        &server,
        json!({"selector": "tag:site=berlin", "action": "tag", "tags": {"fw": "2", "ring": "beta"}}),
    )
    .await;
    assert_eq!(job["action"], "tag");
    assert_eq!(job["selector"], "tag:site=berlin");
    assert_eq!(job["params"], json!({"tags": {"fw": "2", "ring": "beta"}}));
    assert!(
        job["created_by"]
            .as_str()
            .is_some_and(|c| c.starts_with("tok_")),
        "{job}"
    );
    let job = finished(&server, job["id"].as_str().expect("id"), WAIT).await;
    assert_eq!(
        (&job["state"], &job["total"], &job["done"], &job["failed"]),
        (&json!("succeeded"), &json!(300), &json!(300), &json!(0)),
        "{job}"
    );
    eprintln!("tag job: 300 devices at {:.0} devices/s", rate(&job));
    let tagged = selected(&server, "tag:fw=2 and tag:ring=beta").await;
    assert_eq!(tagged.len(), 300);
    assert!(
        tagged.iter().all(|d| d["tags"]["site"] == "berlin"),
        "other tags kept"
    );
    assert!(selected(&server, "tag:site=paris and tag:fw=2")
        .await
        .is_empty());

    let untag = create_job(
        &server,
        json!({"selector": "tag:site=berlin", "action": "untag", "keys": ["ring"]}),
    )
    .await;
    let untag = finished(&server, untag["id"].as_str().expect("id"), WAIT).await;
    assert_eq!(
        (&untag["done"], &untag["state"]),
        (&json!(300), &json!("succeeded"))
    );
    assert!(selected(&server, "tag:ring=beta").await.is_empty());
    assert_eq!(selected(&server, "tag:fw=2").await.len(), 300);

    let delete = create_job(
        &server,
        json!({"selector": "b0000,b0001,b0002,p0000", "action": "delete"}),
    )
    .await;
    let delete = finished(&server, delete["id"].as_str().expect("id"), WAIT).await;
    assert_eq!(
        (&delete["total"], &delete["done"], &delete["failed"]),
        (&json!(4), &json!(4), &json!(0)),
        "{delete}"
    );
    let (status, _) = server.api("GET", "/api/v1/devices/b0001", None).await;
    assert_eq!(status, 404);
    assert_eq!(selected(&server, "tag:site=berlin").await.len(), 297);

    // Newest first, pages by cursor.
    let (_, page) = server.api("GET", "/api/v1/jobs?limit=2", None).await;
    let ids: Vec<&str> = page["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter_map(|j| j["action"].as_str())
        .collect();
    assert_eq!(ids, ["delete", "untag"]);
    let cursor = page["next_cursor"].as_str().expect("cursor");
    let (_, rest) = server
        .api(
            "GET",
            &format!("/api/v1/jobs?limit=2&cursor={cursor}"),
            None,
        )
        .await;
    assert_eq!(rest["jobs"][0]["action"], "tag");
    assert_eq!(rest["next_cursor"], Value::Null);

    // The CLI: create and wait, list, show.
    let out = server.cli(&[
        "job",
        "create",
        "--selector",
        "tag:site=paris",
        "--tag",
        "fw=3",
        "--wait",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("succeeded"), "{stdout}");
    assert!(stderr.contains("1/1 done, 0 failed"), "{stderr}");
    assert_eq!(selected(&server, "tag:fw=3").await.len(), 1);
    let out = server.cli(&["job", "list"]);
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && list.contains("tag:site=paris"),
        "{list}"
    );
    let newest = list
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .expect("a job row")
        .to_owned();
    let out = server.cli(&["job", "show", &newest, "-o", "json"]);
    let shown: Value = serde_json::from_slice(&out.stdout).expect("job json");
    assert_eq!(shown["done"], 1);
    let out = server.cli(&["job", "show", "nonsense"]);
    assert_eq!(out.status.code(), Some(2));
    let out = server.cli(&["job", "show", "job_00000000000000000000"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("job_not_found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = server.cli(&["job", "create", "--selector", "tag:a=b"]);
    assert_eq!(out.status.code(), Some(2), "an action is required");
    let out = server.cli(&[
        "job",
        "create",
        "--selector",
        "tag:a=b",
        "--tag",
        "x=1",
        "--delete",
    ]);
    assert_eq!(out.status.code(), Some(2), "one action only");
}

#[tokio::test]
async fn a_command_job_creates_one_fleet_command_that_reaches_a_device() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(tmp.path());
    let out = server.cli(&[
        "device",
        "create",
        "lock-1",
        "--tag",
        "site=berlin",
        "--out",
        tmp.path().join("lock-1").to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let creds = support::Creds {
        dir: tmp.path().join("lock-1"),
    };
    let mut dev = MqttDevice::connect(&server, &creds, "lock-1").await;
    dev.subscribe("devices/lock-1/commands/+").await;

    let job = create_job(
        &server,
        json!({"selector": "tag:site=berlin", "action": "command",
               "command": {"name": "reboot", "params": {"delay_secs": 1}, "ttl_ms": 60000}}),
    )
    .await;
    let job = finished(&server, job["id"].as_str().expect("id"), WAIT).await;
    assert_eq!(
        (&job["state"], &job["total"], &job["done"]),
        (&json!("succeeded"), &json!(1), &json!(1)),
        "{job}"
    );
    let fleet = job["command_id"].as_str().expect("command_id");
    let (status, f) = server
        .api("GET", &format!("/api/v1/commands/{fleet}"), None)
        .await;
    assert_eq!(status, 200, "{f}");
    assert_eq!((&f["total"], &f["name"]), (&json!(1), &json!("reboot")));

    let (topic, payload) = dev.next_json().await;
    assert!(topic.starts_with("devices/lock-1/commands/"), "{topic}");
    assert_eq!(payload["name"], "reboot", "{payload}");
    assert_eq!(payload["params"]["delay_secs"], 1, "{payload}");
    let (_, cmds) = server
        .api("GET", "/api/v1/devices/lock-1/commands", None)
        .await;
    assert_eq!(cmds["commands"].as_array().map(Vec::len), Some(1), "{cmds}");
    assert_eq!(cmds["commands"][0]["parent_id"], json!(fleet));
}

async fn token(server: &Server, body: Value) -> String {
    let (status, v) = server.api("POST", "/api/v1/tokens", Some(body)).await;
    assert_eq!(status, 201, "{v}");
    v["token"].as_str().expect("token").to_owned()
}

#[tokio::test]
async fn roles_scopes_and_bad_input() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Arc::new(Server::start(tmp.path()));
    create_devices(
        &server,
        "acme-",
        3,
        json!({"customer": "acme", "site": "x"}),
    )
    .await;
    create_devices(
        &server,
        "globex-",
        2,
        json!({"customer": "globex", "site": "x"}),
    )
    .await;
    let viewer = token(&server, json!({"name": "v", "role": "viewer"})).await;
    let operator = token(
        &server,
        json!({"name": "acme-ops", "role": "operator", "scope": "tag:customer=acme"}),
    )
    .await;
    let body = json!({"selector": "tag:site=x", "action": "tag", "tags": {"fw": "3"}});

    let r = call(
        &server,
        "POST",
        "/api/v1/jobs",
        Some(&viewer),
        None,
        &[],
        Some(body.clone()),
    )
    .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{}",
        r.body
    );
    let r = call(
        &server,
        "GET",
        "/api/v1/jobs",
        Some(&viewer),
        None,
        &[],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // A scoped operator's job reaches only its devices.
    let r = call(
        &server,
        "POST",
        "/api/v1/jobs",
        Some(&operator),
        None,
        &[],
        Some(body),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["selector"], "tag:site=x and tag:customer=acme");
    let id = r.body["id"].as_str().expect("id").to_owned();
    let job = finished(&server, &id, WAIT).await;
    assert_eq!(
        (&job["total"], &job["done"]),
        (&json!(3), &json!(3)),
        "{job}"
    );
    assert_eq!(selected(&server, "tag:fw=3").await.len(), 3);
    assert!(selected(&server, "tag:customer=globex and tag:fw=3")
        .await
        .is_empty());
    // It cannot tag a device out of its scope: every device fails, the job still ends.
    let r = call(
        &server,
        "POST",
        "/api/v1/jobs",
        Some(&operator),
        None,
        &[],
        Some(json!({"selector": "acme-0000,globex-0000", "action": "tag", "tags": {"customer": "globex"}})),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let job = finished(&server, r.body["id"].as_str().expect("id"), WAIT).await;
    assert_eq!(
        (&job["state"], &job["total"], &job["done"], &job["failed"]),
        (&json!("succeeded"), &json!(1), &json!(0), &json!(1)),
        "{job}"
    );
    assert_eq!(job["errors"][0]["device_id"], "acme-0000");
    assert_eq!(selected(&server, "tag:customer=acme").await.len(), 3);
    // An admin's fleet-wide job is not the scoped operator's to see.
    let admin_job = create_job(
        &server,
        json!({"selector": "globex-0000", "action": "untag", "keys": ["fw"]}),
    )
    .await;
    let admin_id = admin_job["id"].as_str().expect("id");
    let r = call(
        &server,
        "GET",
        &format!("/api/v1/jobs/{admin_id}"),
        Some(&operator),
        None,
        &[],
        None,
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = call(
        &server,
        "GET",
        "/api/v1/jobs",
        Some(&operator),
        None,
        &[],
        None,
    )
    .await;
    let listed: Vec<&str> = r.body["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter_map(|j| j["id"].as_str())
        .collect();
    assert!(
        listed.contains(&id.as_str()) && !listed.contains(&admin_id),
        "{listed:?}"
    );

    // Bad input: 400 with a JSON error body.
    for (body, code) in [
        (
            json!({"selector": "tag:site=x", "action": "reboot"}),
            "invalid_action",
        ),
        (
            json!({"selector": "tag:", "action": "delete"}),
            "invalid_selector",
        ),
        (
            json!({"selector": "tag:site=x", "action": "tag"}),
            "invalid_params",
        ),
        (
            json!({"selector": "tag:site=x", "action": "tag", "tags": {}}),
            "invalid_tags",
        ),
        (
            json!({"selector": "tag:site=x", "action": "tag", "tags": {"a b": "c"}}),
            "invalid_tags",
        ),
        (
            json!({"selector": "tag:site=x", "action": "untag", "keys": []}),
            "invalid_keys",
        ),
        (
            json!({"selector": "tag:site=x", "action": "delete", "keys": ["a"]}),
            "invalid_params",
        ),
        (
            json!({"selector": "tag:site=x", "action": "command", "command": {"name": "bad name!"}}),
            "invalid_command_name",
        ),
        (json!({"selector": "tag:site=x"}), "invalid_body"),
        (
            json!({"selector": "tag:site=x", "action": "delete", "extra": 1}),
            "invalid_body",
        ),
    ] {
        let (status, v) = server.api("POST", "/api/v1/jobs", Some(body.clone())).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some(code)),
            "{body}: {v}"
        );
    }
    let (status, v) = server.api("GET", "/api/v1/jobs?limit=0", None).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_limit"))
    );
    let (status, v) = server.api("GET", "/api/v1/jobs/job_nope", None).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("job_not_found"))
    );
    let (status, v) = server
        .api("POST", "/api/v1/jobs/job_nope/cancel", None)
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("job_not_found"))
    );
}

/// Slow jobs: one device per batch and a pause after each, so jobs stay unfinished.
const SLOW: &str = "[jobs]\nbatch_len = 1\nbatch_pause_ms = 300\n";

#[tokio::test]
async fn unfinished_jobs_are_bounded_per_creator_and_cancel_stops_a_job() {
    let tmp = tempfile::tempdir().expect("tmp");
    let args = config_args(tmp.path(), SLOW);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Arc::new(Server::start_with(
        tmp.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &args,
    ));
    create_devices(&server, "d", 20, json!({"site": "x"})).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let job = create_job(
            &server,
            json!({"selector": "tag:site=x", "action": "tag", "tags": {"n": i.to_string()}}),
        )
        .await;
        ids.push(job["id"].as_str().expect("id").to_owned());
    }
    let (status, v) = server
        .api(
            "POST",
            "/api/v1/jobs",
            Some(json!({"selector": "tag:site=x", "action": "delete"})),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (429, Some("too_many_jobs")),
        "{v}"
    );
    // Another creator has its own bound.
    let other = token(&server, json!({"name": "ops", "role": "operator"})).await;
    let r = call(
        &server,
        "POST",
        "/api/v1/jobs",
        Some(&other),
        None,
        &[],
        Some(json!({"selector": "d0000", "action": "untag", "keys": ["zz"]})),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);

    // The first job is running, slowly; cancel it at once.
    let running = server
        .wait_for(&format!("/api/v1/jobs/{}", ids[0]), |j| {
            j["state"] == "running" && j["done"].as_u64().unwrap_or(0) >= 1
        })
        .await;
    assert_eq!(running["total"], 20);
    let (status, canceled) = server
        .api("POST", &format!("/api/v1/jobs/{}/cancel", ids[0]), None)
        .await;
    assert_eq!(status, 200, "{canceled}");
    assert_eq!(canceled["state"], "canceled");
    assert!(canceled["finished_ms"].as_u64().is_some());
    // Canceled jobs stay canceled and do no more: the next job starts, the first's progress
    // stops short of the total.
    server
        .wait_for(&format!("/api/v1/jobs/{}", ids[1]), |j| {
            j["state"] == "running"
        })
        .await;
    let (_, first) = server
        .api("GET", &format!("/api/v1/jobs/{}", ids[0]), None)
        .await;
    assert_eq!(first["state"], "canceled");
    assert!(first["done"].as_u64().unwrap_or(99) < 20, "{first}");
    let (status, again) = server
        .api("POST", &format!("/api/v1/jobs/{}/cancel", ids[0]), None)
        .await;
    assert_eq!((status, &again["state"]), (200, &json!("canceled")));
    // One slot is free again.
    create_job(
        &server,
        json!({"selector": "tag:site=x", "action": "delete"}),
    )
    .await;
    let (status, v) = server
        .api(
            "POST",
            "/api/v1/jobs",
            Some(json!({"selector": "tag:site=x", "action": "delete"})),
        )
        .await;
    assert_eq!(status, 429, "{v}");
    // The CLI cancels too.
    let out = server.cli(&["job", "cancel", &ids[2]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("canceled"));
}

#[tokio::test]
async fn a_restart_mid_job_resumes_from_its_cursor_and_counts_every_device_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = "[jobs]\nbatch_len = 10\nbatch_pause_ms = 100\n";
    let args = config_args(tmp.path(), config);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Arc::new(Server::start_with(
        tmp.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &args,
    ));
    create_devices(&server, "r", 120, json!({"site": "x"})).await;
    let job = create_job(
        &server,
        json!({"selector": "tag:site=x", "action": "tag", "tags": {"fw": "9"}}),
    )
    .await;
    let id = job["id"].as_str().expect("id").to_owned();
    let before = server
        .wait_for(&format!("/api/v1/jobs/{id}"), |j| {
            j["done"].as_u64().unwrap_or(0) >= 30
        })
        .await;
    assert_eq!(before["state"], "running");
    let Ok(server) = Arc::try_unwrap(server) else {
        panic!("server still shared");
    };
    server.kill9();

    let server = Server::start_with(tmp.path(), "127.0.0.1:0", "127.0.0.1:0", &args);
    let (_, resumed) = server.api("GET", &format!("/api/v1/jobs/{id}"), None).await;
    assert!(
        resumed["done"].as_u64().unwrap_or(0) >= before["done"].as_u64().unwrap_or(0),
        "progress survives: {resumed}"
    );
    let job = finished(&server, &id, WAIT).await;
    assert_eq!(
        (&job["state"], &job["total"], &job["done"], &job["failed"]),
        (&json!("succeeded"), &json!(120), &json!(120), &json!(0)),
        "every device counted once: {job}"
    );
    assert_eq!(
        job["started_ms"], before["started_ms"],
        "resumed, not restarted"
    );
    assert_eq!(selected(&server, "tag:fw=9").await.len(), 120);

    // A graceful stop mid-job resumes the same way.
    let job = create_job(
        &server,
        json!({"selector": "tag:site=x", "action": "untag", "keys": ["fw"]}),
    )
    .await;
    let id = job["id"].as_str().expect("id").to_owned();
    server
        .wait_for(&format!("/api/v1/jobs/{id}"), |j| {
            j["done"].as_u64().unwrap_or(0) >= 20
        })
        .await;
    server.stop();
    let server = Server::start_with(tmp.path(), "127.0.0.1:0", "127.0.0.1:0", &args);
    let job = finished(&server, &id, WAIT).await;
    assert_eq!(
        (&job["done"], &job["failed"]),
        (&json!(120), &json!(0)),
        "{job}"
    );
    assert!(selected(&server, "tag:fw=9").await.is_empty());
}

#[tokio::test]
async fn a_job_stops_when_its_creator_loses_the_right_to_run_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = "[jobs]\nbatch_len = 10\nbatch_pause_ms = 100\n";
    let args = config_args(tmp.path(), config);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Arc::new(Server::start_with(
        tmp.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &args,
    ));
    create_devices(&server, "v", 100, json!({"site": "x"})).await;

    // An operator token starts a tag job, then is revoked while it runs.
    let secret = token(&server, json!({"name": "ops", "role": "operator"})).await;
    let r = call(
        &server,
        "POST",
        "/api/v1/jobs",
        Some(&secret),
        None,
        &[],
        Some(json!({"selector": "tag:site=x", "action": "tag", "tags": {"by": "ops"}})),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.body["id"].as_str().expect("id").to_owned();
    let token_id = r.body["created_by"].as_str().expect("creator").to_owned();
    server
        .wait_for(&format!("/api/v1/jobs/{id}"), |j| {
            j["done"].as_u64().unwrap_or(0) >= 10
        })
        .await;
    let (status, body) = server
        .api("DELETE", &format!("/api/v1/tokens/{token_id}"), None)
        .await;
    assert_eq!(status, 204, "{body}");
    let job = finished(&server, &id, WAIT).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert!(
        job["done"].as_u64().unwrap_or(100) < 100,
        "stopped before the end: {job}"
    );
    assert!(
        job["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("revoked")),
        "{job}"
    );
    let tagged = selected(&server, "tag:by=ops").await.len() as u64;
    assert_eq!(tagged, job["done"].as_u64().unwrap_or(0), "{job}");
}

/// Attack: a scoped operator sends a selector already at the parser's bounds (16 terms); the
/// scope's terms narrowing it push it past them. The job must be refused at creation, not
/// accepted and then left failed with a selector that no longer parses (and, since its
/// selector cannot be read, hidden from its own creator, who could not see or cancel it).
#[tokio::test]
async fn a_scoped_selector_that_outgrows_the_bounds_when_narrowed_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Arc::new(Server::start(tmp.path()));
    let operator = token(
        &server,
        json!({"name": "acme-ops", "role": "operator", "scope": "tag:customer=acme"}),
    )
    .await;
    let selector = (0..16)
        .map(|i| format!("tag:k{i}=v"))
        .collect::<Vec<_>>()
        .join(" and ");
    let r = call(
        &server,
        "POST",
        "/api/v1/jobs",
        Some(&operator),
        None,
        &[],
        Some(json!({"selector": selector, "action": "tag", "tags": {"fw": "3"}})),
    )
    .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (400, Some("invalid_selector")),
        "{}",
        r.body
    );
    // Fifteen terms and the scope's one still fit, and the job is its creator's to see.
    let selector = (0..15)
        .map(|i| format!("tag:k{i}=v"))
        .collect::<Vec<_>>()
        .join(" and ");
    let r = call(
        &server,
        "POST",
        "/api/v1/jobs",
        Some(&operator),
        None,
        &[],
        Some(json!({"selector": selector, "action": "tag", "tags": {"fw": "3"}})),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.body["id"].as_str().expect("id").to_owned();
    let job = finished(&server, &id, WAIT).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let r = call(
        &server,
        "GET",
        &format!("/api/v1/jobs/{id}"),
        Some(&operator),
        None,
        &[],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Attack: an operator token creates jobs that finish at once (a selector matching nothing), as
/// fast as it can. Only unfinished jobs were bounded per creator, so its finished ones filled
/// the table (between prunes) and pushed everyone else's out of the newest 1,000 kept. Each
/// creator keeps at most its newest 100 jobs; another creator's job stays.
#[tokio::test]
async fn one_creators_finished_jobs_are_bounded_and_do_not_push_out_others() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Arc::new(Server::start(tmp.path()));
    create_devices(&server, "d", 1, json!({"site": "x"})).await;
    let admin_job = create_job(
        &server,
        json!({"selector": "d0000", "action": "tag", "tags": {"fw": "1"}}),
    )
    .await;
    let admin_id = admin_job["id"].as_str().expect("id").to_owned();
    finished(&server, &admin_id, WAIT).await;
    let flooder = token(&server, json!({"name": "flood", "role": "operator"})).await;
    let mut created = 0;
    let deadline = Instant::now() + WAIT;
    while created < 130 {
        let r = call(
            &server,
            "POST",
            "/api/v1/jobs",
            Some(&flooder),
            None,
            &[],
            Some(json!({"selector": "nothing", "action": "untag", "keys": ["zz"]})),
        )
        .await;
        match r.status {
            202 => created += 1,
            // Ten unfinished already: wait for the runner.
            429 => tokio::time::sleep(Duration::from_millis(10)).await,
            other => panic!("{other}: {}", r.body),
        }
        assert!(Instant::now() < deadline, "only {created} jobs created");
    }
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/jobs?limit=200&cursor={c}"),
            None => "/api/v1/jobs?limit=200".to_owned(),
        };
        let (status, page) = server.api("GET", &path, None).await;
        assert_eq!(status, 200, "{page}");
        all.extend(page["jobs"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let flooders = all
        .iter()
        .filter(|j| j["created_by"] != admin_job["created_by"])
        .count();
    assert!(flooders <= 110, "{flooders} of the flooder's jobs kept");
    assert!(
        all.iter().any(|j| j["id"] == admin_id.as_str()),
        "the admin's job is gone"
    );
}

#[tokio::test]
async fn one_creators_long_job_does_not_hold_up_anothers() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = "[jobs]\nbatch_len = 10\nbatch_pause_ms = 50\n";
    let args = config_args(tmp.path(), config);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Arc::new(Server::start_with(
        tmp.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &args,
    ));
    create_devices(&server, "big", 400, json!({"site": "big"})).await;
    create_devices(&server, "small", 20, json!({"site": "small"})).await;
    // The admin token starts a long job (40 batches); an operator token's short one (2
    // batches) comes after it started.
    let long = create_job(
        &server,
        json!({"selector": "tag:site=big", "action": "tag", "tags": {"long": "1"}}),
    )
    .await;
    let long_id = long["id"].as_str().expect("id").to_owned();
    server
        .wait_for(&format!("/api/v1/jobs/{long_id}"), |j| {
            j["state"] == "running"
        })
        .await;
    let secret = token(&server, json!({"name": "other", "role": "operator"})).await;
    let r = call(
        &server,
        "POST",
        "/api/v1/jobs",
        Some(&secret),
        None,
        &[],
        Some(json!({"selector": "tag:site=small", "action": "tag", "tags": {"short": "1"}})),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let short = finished(&server, r.body["id"].as_str().expect("id"), WAIT).await;
    assert_eq!(short["state"], "succeeded", "{short}");
    // Taking turns batch by batch: the short job ended while the long one was still running.
    let (_, long_now) = server
        .api("GET", &format!("/api/v1/jobs/{long_id}"), None)
        .await;
    assert_eq!(long_now["state"], "running", "{long_now}");
    assert!(long_now["done"].as_u64().unwrap_or(400) < 400, "{long_now}");
    let long = finished(&server, &long_id, WAIT).await;
    assert_eq!(
        (&long["state"], &long["done"]),
        (&json!("succeeded"), &json!(400))
    );
}
