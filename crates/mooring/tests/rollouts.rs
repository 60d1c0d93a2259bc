//! Rollouts (issue 19) end to end: the real server and real `mooring-agent`s, driven with the
//! `mooring rollout` CLI and the API. A good version rolls out wave by wave, each wave gated on
//! the updated devices' health against the control cohort, which is updated only at the end; a
//! version that fails its health check on the devices rolls back there and the rollout aborts
//! at the threshold with the rest of the fleet untouched; a version whose devices reconnect far
//! more than the control cohort's stops at the gate before the next wave; a device whose
//! precondition fails waits (never fails) until it holds.

mod support;

use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use support::agents::{agent_config, Supervised};
use support::{MqttDevice, Server};

/// Fast ticks and health flushes, so waves move in seconds.
const CONFIG: &str = "[rollouts]\ntick_ms = 200\n[health]\nflush_interval_ms = 200\n";

/// Devices `prefix-0..n` with supervised agents (a failing health check if `healthy` is false),
/// online; the agents and the update key's public half.
async fn fleet(
    server: &Server,
    dir: &Path,
    prefix: &str,
    n: usize,
    healthy: bool,
) -> Vec<Supervised> {
    let (_, key) = server.api("GET", "/api/v1/ota/update-key", None).await;
    let public_key = key["public_key"].as_str().expect("public key").to_owned();
    let health = (!healthy).then_some("/bin/false");
    let mut agents = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        let creds = server.create_device(&id, dir);
        let cfg = agent_config(dir, &id, &public_key, health);
        agents.push(Supervised::start(
            server,
            &creds,
            &dir.join(format!("{id}-state")),
            &cfg,
        ));
    }
    for i in 0..n {
        server
            .wait_for(&format!("/api/v1/devices/{prefix}-{i}"), |v| {
                v["online"] == true
            })
            .await;
    }
    agents
}

/// `id:prefix-0,...,prefix-(n-1)`.
fn ids(prefix: &str, n: usize) -> String {
    let list: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    format!("id:{}", list.join(","))
}

fn cli_ok(server: &Server, args: &[&str]) -> String {
    let out = server.cli(args);
    assert!(
        out.status.success(),
        "mooring {args:?}: {}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the rollout satisfies `pred`; returns it.
async fn wait_rollout(server: &Server, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    server
        .wait_for(&format!("/api/v1/rollouts/{id}"), pred)
        .await
}

async fn events(server: &Server, id: &str) -> Vec<Value> {
    let (status, v) = server
        .api("GET", &format!("/api/v1/rollouts/{id}/events"), None)
        .await;
    assert_eq!(status, 200, "{v}");
    v["events"].as_array().cloned().unwrap_or_default()
}

/// The new version "reconnects" a lot: each of `devices`' sessions is taken over four times
/// (its agent reconnects after each), 1.5 s apart.
async fn flap(server: &Server, dir: &Path, devices: &[String]) {
    for _ in 0..4 {
        for d in devices {
            let creds = support::Creds { dir: dir.join(d) };
            drop(MqttDevice::connect(server, &creds, d).await);
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
}

/// Every `event: rollout` frame of `GET /api/v1/rollouts/{id}/stream` until the server ends it.
async fn sse_rollouts(server: &Server, id: &str) -> Vec<Value> {
    let mut resp = reqwest::Client::new()
        .get(format!("{}/api/v1/rollouts/{id}/stream", server.url()))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.status(), 200);
    let mut text = String::new();
    while let Some(chunk) = resp.chunk().await.expect("chunk") {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text.split("\n\n")
        .filter(|block| block.lines().any(|l| l == "event: rollout"))
        .filter_map(|block| {
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            serde_json::from_str(data).ok()
        })
        .collect()
}

/// The devices of a wave (by the rollout's own listing of updates: a device has an update in
/// the rollout's deployment once started).
async fn started(server: &Server, deployment: &str, devices: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for d in devices {
        let (_, v) = server
            .api("GET", &format!("/api/v1/devices/{d}/ota"), None)
            .await;
        let has = v["updates"]
            .as_array()
            .is_some_and(|us| us.iter().any(|u| u["deployment_id"] == deployment));
        if has {
            out.push(d.clone());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_version_rolls_out_in_gated_waves_and_the_control_cohort_goes_last() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start_configured(tmp.path(), CONFIG);
    let _agents = fleet(&server, tmp.path(), "good", 6, true).await;
    let target = ids("good", 6);
    let image: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let art = server.ota_upload(&tmp.path().join("fw-2.img"), &image, "2.0.0");

    // Bad requests are refused with what is wrong, before anything is stored.
    let out = server.cli(&[
        "rollout",
        "create",
        "--artifact",
        &art,
        "--target",
        &target,
        "--waves",
        "50,10,100",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("waves"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, v) = server
        .api(
            "POST",
            "/api/v1/rollouts",
            Some(
                serde_json::json!({"artifact_id": art, "selector": target, "window": "25:00-01:00"}),
            ),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_rollout")),
        "{v}"
    );
    let (status, v) = server
        .api(
            "POST",
            "/api/v1/rollouts",
            Some(serde_json::json!({"artifact_id": "art_0000000000000000", "selector": target})),
        )
        .await;
    assert_eq!(status, 404, "{v}");

    // A gate that could never compare (2 devices in control, 2 in the first wave, fewer
    // than the default min_devices 20) is refused when the rollout is created.
    let out = server.cli(&[
        "rollout",
        "create",
        "--artifact",
        &art,
        "--target",
        &target,
        "--control",
        "34%",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("could never compare"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A target nothing matches is refused (exit 1, the server's message).
    let out = server.cli(&[
        "rollout",
        "create",
        "--artifact",
        &art,
        "--target",
        "tag:fleet=none",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no device matches"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Six devices: two in the control cohort (34 %), then two waves of two.
    let out = server.cli(&[
        "rollout",
        "create",
        "--artifact",
        &art,
        "--target",
        &target,
        "--waves",
        "50,100",
        "--control",
        "34%",
        "--min-devices",
        "1",
        "--health-window",
        "2s",
        "--seed",
        "7",
        "--max-concurrent",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(id.starts_with("rol_"), "{id}");

    // The live stream: the rollout at once, then each change, ending after it completes.
    let frames = tokio::time::timeout(support::WAIT, sse_rollouts(&server, &id))
        .await
        .expect("the stream ends once the rollout is over");
    assert!(frames.len() >= 2, "{frames:?}");
    assert_eq!(
        frames.last().map(|f| f["state"].clone()),
        Some("completed".into())
    );
    assert!(
        frames.windows(2).all(|w| w[0] != w[1]),
        "only changes are sent"
    );

    let r = wait_rollout(&server, &id, |v| v["state"] == "completed").await;
    assert_eq!(
        (r["total"].as_u64(), r["committed"].as_u64()),
        (Some(6), Some(6)),
        "{r}"
    );
    let waves = r["waves"].as_array().expect("waves");
    let sizes: Vec<u64> = waves
        .iter()
        .map(|w| w["total"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(sizes, [2, 2, 2], "two waves and the control cohort: {r}");
    assert_eq!(waves[2]["control"], true);
    assert_eq!(r["spec"]["seed"], 7);
    assert_eq!(r["gate"]["verdict"], "pass", "{r}");

    // The log tells the story in order: each wave's window and gate, the control cohort last.
    let log = events(&server, &id).await;
    let kinds: Vec<&str> = log.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "created",
            "window_started",
            "gate_passed",
            "wave_started",
            "window_started",
            "gate_passed",
            "wave_started",
            "completed"
        ],
        "{log:?}"
    );
    assert!(
        log[0]["by"].as_str().is_some_and(|b| !b.is_empty()),
        "{log:?}"
    );
    assert_eq!(log[1]["by"], "server");
    assert!(
        log[6]["detail"].as_str() == Some("the control cohort"),
        "{log:?}"
    );
    // The control cohort's updates began only after the last gate passed.
    let control_start = log[6]["at"].as_u64().expect("at");
    let (_, list) = server
        .api(
            "GET",
            &format!(
                "/api/v1/ota/deployments/{}",
                r["deployment_id"].as_str().unwrap_or("")
            ),
            None,
        )
        .await;
    assert_eq!(list["total"], 6, "{list}");
    // (command created, update final) per device: one at a time (--max-concurrent 1), each
    // started only once the one before ended.
    let mut spans = Vec::new();
    let mut control_devices = Vec::new();
    for i in 0..6 {
        let d = format!("good-{i}");
        let (_, h) = server
            .api("GET", &format!("/api/v1/devices/{d}/commands"), None)
            .await;
        let created = h["commands"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == "mooring.update"))
            .and_then(|c| c["created_at"].as_u64())
            .expect("an update command");
        let (_, u) = server
            .api("GET", &format!("/api/v1/devices/{d}/ota"), None)
            .await;
        let ended = u["updates"][0]["updated_at"].as_u64().expect("updated_at");
        spans.push((created, ended));
        if created >= control_start {
            control_devices.push(d);
        }
    }
    assert_eq!(
        control_devices.len(),
        2,
        "exactly the control cohort updated last"
    );
    spans.sort_unstable();
    assert!(
        spans.windows(2).all(|w| w[1].0 >= w[0].1),
        "one update at a time: {spans:?}"
    );

    // The CLI: show, list, events, and watch (which ends at once, completed: exit 0).
    let shown = cli_ok(&server, &["rollout", "show", &id]);
    assert!(
        shown.contains("completed") && shown.contains("control"),
        "{shown}"
    );
    assert!(cli_ok(&server, &["rollout", "list"]).contains(&id));
    assert!(cli_ok(&server, &["rollout", "events", &id]).contains("gate_passed"));
    let watched = cli_ok(&server, &["rollout", "watch", &id]);
    assert!(watched.contains("gate after wave 2: pass"), "{watched}");
    // Over: pausing is a conflict.
    let (status, v) = server
        .api("POST", &format!("/api/v1/rollouts/{id}/pause"), None)
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("rollout_over")),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_fails_on_the_devices_aborts_at_the_threshold_and_spares_the_rest() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start_configured(tmp.path(), CONFIG);
    let _agents = fleet(&server, tmp.path(), "bad", 8, false).await;
    let target = ids("bad", 8);
    let image: Vec<u8> = (0..100_000u32).map(|i| (i % 233) as u8).collect();
    let art = server.ota_upload(&tmp.path().join("fw-3.img"), &image, "3.0.0");
    // 8 devices, no control: the first wave is 2 devices; both roll back (their health check
    // fails), 2 of 2 is above 5 % once 2 devices tried.
    let id = cli_ok(
        &server,
        &[
            "rollout",
            "create",
            "--artifact",
            &art,
            "--target",
            &target,
            "--waves",
            "25,100",
            "--control",
            "0",
            "--min-devices",
            "2",
            "--health-window",
            "1s",
        ],
    )
    .trim()
    .to_owned();
    let r = wait_rollout(&server, &id, |v| v["state"] == "aborted").await;
    assert_eq!(r["rolled_back"], 2, "{r}");
    assert!(
        r["reason"]
            .as_str()
            .is_some_and(|x| x.contains("2 of 2") && x.contains("rolled back")),
        "{r}"
    );
    let devices: Vec<String> = (0..8).map(|i| format!("bad-{i}")).collect();
    let dep = r["deployment_id"].as_str().expect("deployment").to_owned();
    let touched = started(&server, &dep, &devices).await;
    assert_eq!(
        touched.len(),
        2,
        "only the first wave was started: {touched:?}"
    );
    // Nothing starts later either: the rollout is over.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(started(&server, &dep, &devices).await, touched);
    // The devices that tried run what they ran.
    for d in &touched {
        server
            .wait_for(&format!("/api/v1/devices/{d}/shadow"), |v| {
                v["reported"]["version"] == "1.0.0"
            })
            .await;
    }
    let log = events(&server, &id).await;
    assert!(
        log.iter()
            .any(|e| e["kind"] == "aborted" && e["by"] == "server"),
        "{log:?}"
    );
    // `watch` on an aborted rollout exits 1.
    let out = server.cli(&["rollout", "watch", &id]);
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_whose_devices_reconnect_far_more_stops_at_the_gate() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start_configured(tmp.path(), CONFIG);
    let _agents = fleet(&server, tmp.path(), "flap", 8, true).await;
    let target = ids("flap", 8);
    let image: Vec<u8> = (0..100_000u32).map(|i| (i % 227) as u8).collect();
    let art = server.ota_upload(&tmp.path().join("fw-4.img"), &image, "4.0.0");
    // 8 devices: 3 in the control cohort (37.5 % rounds to 3), then 3 of the other 5 in the
    // first wave (50 % rounded up), a health window of 15 s.
    let out = server.cli(&[
        "rollout",
        "create",
        "--artifact",
        &art,
        "--target",
        &target,
        "--waves",
        "50,100",
        "--control",
        "37.5%",
        "--min-devices",
        "3",
        "--health-window",
        "15s",
        "--gate",
        "reconnects",
    ]);
    assert!(
        out.status.success(),
        "{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let r = wait_rollout(&server, &id, |v| v["window_started_at"].is_u64()).await;
    let dep = r["deployment_id"].as_str().expect("deployment").to_owned();
    let devices: Vec<String> = (0..8).map(|i| format!("flap-{i}")).collect();
    let updated = started(&server, &dep, &devices).await;
    assert_eq!(updated.len(), 3, "{r}");
    flap(&server, tmp.path(), &updated).await;
    let r = wait_rollout(&server, &id, |v| v["state"] == "paused").await;
    assert!(
        r["reason"]
            .as_str()
            .is_some_and(|x| x.starts_with("gate failed") && x.contains("disconnects")),
        "{r}"
    );
    let gate = &r["gate"];
    assert_eq!(gate["verdict"], "fail", "{r}");
    let s = &gate["signals"][0];
    assert_eq!(s["signal"], "disconnects");
    assert_eq!(s["verdict"], "fail", "{s}");
    assert_eq!(
        (
            s["updated"]["devices"].as_u64(),
            s["control"]["devices"].as_u64()
        ),
        (Some(3), Some(3))
    );
    assert!(s["updated"]["events"].as_u64().unwrap_or(0) >= 8, "{s}");
    assert!(s["p_value"].as_f64().is_some_and(|p| p <= 0.01), "{s}");
    // Stopped before the next wave: still only the first wave's devices were started.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(started(&server, &dep, &devices).await, updated);
    // `show` gives the comparison; an operator aborts it, and the log says who.
    let shown = cli_ok(&server, &["rollout", "show", &id]);
    assert!(
        shown.contains("disconnects") && shown.contains("fail"),
        "{shown}"
    );
    cli_ok(
        &server,
        &["rollout", "abort", &id, "--reason", "flapping links"],
    );
    let log = events(&server, &id).await;
    let aborted = log
        .iter()
        .find(|e| e["kind"] == "aborted")
        .expect("aborted");
    assert!(
        aborted["detail"]
            .as_str()
            .is_some_and(|d| d.contains("flapping links")),
        "{aborted}"
    );
    assert_ne!(aborted["by"], "server");
    assert!(log.iter().any(|e| e["kind"] == "gate_failed"), "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmet_precondition_defers_a_device_until_it_holds_and_pause_holds_everyone() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start_configured(tmp.path(), CONFIG);
    let _agents = fleet(&server, tmp.path(), "pre", 2, true).await;
    let target = ids("pre", 2);
    let image: Vec<u8> = (0..50_000u32).map(|i| (i % 211) as u8).collect();
    let art = server.ota_upload(&tmp.path().join("fw-5.img"), &image, "5.0.0");
    // pre-0 reports a full battery, pre-1 a low one.
    for (d, pct) in [("pre-0", 90), ("pre-1", 10)] {
        let creds = support::Creds {
            dir: tmp.path().join(d),
        };
        let mut dev = MqttDevice::connect(&server, &creds, d).await;
        dev.publish(
            &format!("devices/{d}/telemetry"),
            &format!("{{\"battery\": {pct}}}"),
        )
        .await;
    }
    let id = cli_ok(
        &server,
        &[
            "rollout",
            "create",
            "--artifact",
            &art,
            "--target",
            &target,
            "--waves",
            "100",
            "--control",
            "0",
            "--min-devices",
            "1",
            "--health-window",
            "1s",
            "--require",
            "battery>=30",
            "--max-concurrent",
            "1",
        ],
    )
    .trim()
    .to_owned();
    let r = wait_rollout(&server, &id, |v| v["committed"] == 1 && v["deferred"] == 1).await;
    assert_eq!(r["failed"], 0, "deferred, never failed: {r}");
    let dep = r["deployment_id"].as_str().expect("deployment").to_owned();
    let devices = vec!["pre-0".to_owned(), "pre-1".to_owned()];
    assert_eq!(started(&server, &dep, &devices).await, ["pre-0"]);
    // Paused, a device that now qualifies still waits.
    cli_ok(&server, &["rollout", "pause", &id]);
    let creds = support::Creds {
        dir: tmp.path().join("pre-1"),
    };
    let mut dev = MqttDevice::connect(&server, &creds, "pre-1").await;
    dev.publish("devices/pre-1/telemetry", "{\"battery\": 80}")
        .await;
    drop(dev);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(started(&server, &dep, &devices).await, ["pre-0"]);
    // Resumed, it starts and the rollout completes.
    cli_ok(&server, &["rollout", "resume", &id]);
    let r = wait_rollout(&server, &id, |v| v["state"] == "completed").await;
    assert_eq!(r["committed"], 2, "{r}");
    let kinds: Vec<String> = events(&server, &id)
        .await
        .iter()
        .filter_map(|e| e["kind"].as_str().map(str::to_owned))
        .collect();
    assert!(
        kinds.contains(&"paused".to_owned()) && kinds.contains(&"resumed".to_owned()),
        "{kinds:?}"
    );
}

/// Fleet health's playbook step `pause_rollouts` (docs/health.md#playbooks): a rule alert on a
/// device pauses the running rollouts whose target holds it, and leaves the others running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_playbook_pauses_the_rollouts_that_touch_its_devices() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = format!(
        "{CONFIG}[[playbook]]\nname = \"hold\"\non = [\"rule:low-battery\"]\nsteps = [\"pause_rollouts\", \"ticket\"]\n"
    );
    let server = Server::start_configured(tmp.path(), &config);
    let p1 = server.create_device("p1", tmp.path());
    server.create_device("p2", tmp.path());
    let image: Vec<u8> = (0..10_000u32).map(|i| (i % 199) as u8).collect();
    let art = server.ota_upload(&tmp.path().join("fw-6.img"), &image, "6.0.0");
    let mut ids = Vec::new();
    for target in ["id:p1,p2", "id:p2"] {
        let (status, v) = server
            .api(
                "POST",
                "/api/v1/rollouts",
                Some(serde_json::json!({"artifact_id": art, "selector": target, "control_pct": 0})),
            )
            .await;
        assert_eq!(status, 201, "{v}");
        ids.push(v["id"].as_str().expect("id").to_owned());
    }
    let (status, v) = server
        .api(
            "POST",
            "/api/v1/rules",
            Some(serde_json::json!({"name": "low-battery", "when": "battery < 15", "then": "alert:warning"})),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let mut dev = MqttDevice::connect(&server, &p1, "p1").await;
    dev.publish("devices/p1/telemetry", r#"{"battery": 9}"#)
        .await;

    let r = wait_rollout(&server, &ids[0], |v| v["state"] == "paused").await;
    assert!(
        r["reason"]
            .as_str()
            .is_some_and(|x| x.starts_with("paused by playbook:hold")),
        "{r}"
    );
    let log = events(&server, &ids[0]).await;
    assert!(
        log.iter()
            .any(|e| e["kind"] == "paused" && e["by"] == "playbook:hold"),
        "{log:?}"
    );
    // The ticket says what the run did.
    let t = server
        .wait_for("/api/v1/tickets", |v| {
            v["tickets"].as_array().is_some_and(|t| !t.is_empty())
        })
        .await;
    let steps = t["tickets"][0]["steps"].to_string();
    assert!(
        steps.contains(&format!("paused rollout(s) {}", ids[0])),
        "{t}"
    );
    // The rollout without p1 still runs.
    let (_, other) = server
        .api("GET", &format!("/api/v1/rollouts/{}", ids[1]), None)
        .await;
    assert_eq!(other["state"], "running", "{other}");
}

/// `--auto-abort`: a gate failure aborts the rollout and rolls the devices that committed back
/// to what they ran, by a rollout of that version's artifact marked `rollback_of`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_abort_rolls_the_updated_devices_back_to_their_version() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start_configured(tmp.path(), CONFIG);
    let _agents = fleet(&server, tmp.path(), "back", 8, true).await;
    let target = ids("back", 8);
    let old: Vec<u8> = (0..60_000u32).map(|i| (i % 197) as u8).collect();
    server.ota_upload(&tmp.path().join("fw-1.img"), &old, "1.0.0");
    let new: Vec<u8> = (0..60_000u32).map(|i| (i % 193) as u8).collect();
    let art = server.ota_upload(&tmp.path().join("fw-7.img"), &new, "7.0.0");
    let id = cli_ok(
        &server,
        &[
            "rollout",
            "create",
            "--artifact",
            &art,
            "--target",
            &target,
            "--waves",
            "50,100",
            "--control",
            "37.5%",
            "--min-devices",
            "3",
            "--health-window",
            "15s",
            "--gate",
            "reconnects",
            "--auto-abort",
        ],
    )
    .trim()
    .to_owned();
    let r = wait_rollout(&server, &id, |v| v["window_started_at"].is_u64()).await;
    let dep = r["deployment_id"].as_str().expect("deployment").to_owned();
    let devices: Vec<String> = (0..8).map(|i| format!("back-{i}")).collect();
    let updated = started(&server, &dep, &devices).await;
    assert_eq!(updated.len(), 3, "{r}");
    flap(&server, tmp.path(), &updated).await;
    let r = wait_rollout(&server, &id, |v| v["state"] == "aborted").await;
    assert!(
        r["reason"]
            .as_str()
            .is_some_and(|x| x.contains("gate failed")),
        "{r}"
    );
    // The rollback: a rollout of 1.0.0 for exactly the devices that committed 7.0.0.
    let (_, list) = server.api("GET", "/api/v1/rollouts", None).await;
    let back = list["rollouts"]
        .as_array()
        .and_then(|l| l.iter().find(|x| x["rollback_of"] == id.as_str()).cloned())
        .expect("a rollback rollout");
    assert_eq!(back["version"], "1.0.0", "{back}");
    assert_eq!(back["total"], 3, "{back}");
    let back_id = back["id"].as_str().expect("id").to_owned();
    let done = wait_rollout(&server, &back_id, |v| v["state"] == "completed").await;
    assert_eq!(done["committed"], 3, "{done}");
    for d in &updated {
        server
            .wait_for(&format!("/api/v1/devices/{d}/shadow"), |v| {
                v["reported"]["version"] == "1.0.0"
            })
            .await;
    }
    let log = events(&server, &id).await;
    assert!(
        log.iter().any(|e| e["kind"] == "rollback_created"
            && e["detail"].as_str().is_some_and(|d| d.contains(&back_id))),
        "{log:?}"
    );
}

/// Live rollout streams are bounded per caller (8 on a node): a ninth is refused with 429
/// `too_many_streams`, and a place freed by a closed stream can be taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_holds_at_most_eight_rollout_streams() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start_configured(tmp.path(), CONFIG);
    server.create_device("s1", tmp.path());
    let image: Vec<u8> = (0..10_000u32).map(|i| (i % 191) as u8).collect();
    let art = server.ota_upload(&tmp.path().join("fw-8.img"), &image, "8.0.0");
    let (status, v) = server
        .api(
            "POST",
            "/api/v1/rollouts",
            Some(serde_json::json!({"artifact_id": art, "selector": "id:s1", "control_pct": 0})),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let id = v["id"].as_str().expect("id").to_owned();
    let client = reqwest::Client::new();
    let open = || {
        client
            .get(format!("{}/api/v1/rollouts/{id}/stream", server.url()))
            .bearer_auth(&server.token)
            .send()
    };
    // The device stays offline: the rollout keeps running and its streams stay open.
    let mut held = Vec::new();
    for _ in 0..8 {
        let resp = open().await.expect("stream");
        assert_eq!(resp.status(), 200);
        held.push(resp);
    }
    let refused = open().await.expect("ninth");
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["error"]["code"], "too_many_streams", "{body}");
    drop(held.pop());
    // The server notices the closed connection when it next writes to it (at most a second).
    let deadline = std::time::Instant::now() + support::WAIT;
    loop {
        let resp = open().await.expect("again");
        if resp.status() == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the place was not freed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A gate on a telemetry metric (`--gate battery.v:down`): the first wave's devices commit the
/// new version and then report a battery voltage 0.15 V below the control cohort's (the same
/// spread), so the rank-sum test fails the gate and the rollout pauses before the second wave.
/// The devices are raw MQTT clients speaking the update protocol (update command in, status
/// reports and telemetry out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_lowers_a_gated_metric_stops_at_the_gate() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start_configured(tmp.path(), CONFIG);
    let n = 18;
    let ids_: Vec<String> = (0..n).map(|i| format!("volt-{i}")).collect();
    let mut devices = Vec::new();
    for id in &ids_ {
        let creds = server.create_device(id, tmp.path());
        let mut d = MqttDevice::connect(&server, &creds, id).await;
        d.subscribe(&format!("devices/{id}/commands/+")).await;
        devices.push(d);
    }
    for id in &ids_ {
        server
            .wait_for(&format!("/api/v1/devices/{id}"), |v| v["online"] == true)
            .await;
    }
    let image: Vec<u8> = (0..50_000u32).map(|i| (i % 229) as u8).collect();
    let art = server.ota_upload(&tmp.path().join("fw-5.img"), &image, "5.0.0");
    // 18 devices: 6 in control (33.34 %), then 6 of the other 12 in the first wave.
    let created = cli_ok(
        &server,
        &[
            "rollout",
            "create",
            "--artifact",
            &art,
            "--target",
            &ids("volt", n),
            "--waves",
            "50,100",
            "--control",
            "33.34%",
            "--min-devices",
            "6",
            "--health-window",
            "10s",
            "--gate",
            "battery.v:down",
        ],
    );
    let id = created.trim().to_owned();
    let r = wait_rollout(&server, &id, |v| v["waves"][0]["waiting"] == 0).await;
    let dep = r["deployment_id"].as_str().expect("deployment").to_owned();
    assert_eq!(
        r["spec"]["gate"],
        serde_json::json!(["battery.v:down"]),
        "{r}"
    );
    let first = started(&server, &dep, &ids_).await;
    assert_eq!(first.len(), 6, "{r}");
    // The first wave commits the new version.
    for d in devices.iter_mut().filter(|d| first.contains(&d.id)) {
        let (topic, cmd) = d.next_json().await;
        assert!(
            topic.starts_with(&format!("devices/{}/commands/", d.id)),
            "{topic}"
        );
        assert_eq!(cmd["name"], "mooring.update", "{cmd}");
        for (seq, state) in [(1, "downloading"), (2, "committed")] {
            let report = serde_json::json!({
                "v": 1, "deployment_id": dep, "artifact_id": art, "version": "5.0.0",
                "state": state, "at": 1, "seq": seq, "running_version": "5.0.0",
            });
            d.publish(&format!("devices/{}/ota/status", d.id), &report.to_string())
                .await;
        }
    }
    let r = wait_rollout(&server, &id, |v| v["window_started_at"].is_u64()).await;
    let window_start = r["window_started_at"].as_u64().expect("window start");
    // Over the window every device reports its battery: the updated ones 0.15 V low.
    for round in 0..3u64 {
        for (i, d) in devices.iter_mut().enumerate() {
            let base = if first.contains(&d.id) { 3.55 } else { 3.70 };
            let volts = base + (i % 6) as f64 * 0.01 + round as f64 * 0.001;
            let payload =
                serde_json::json!({"ts": window_start + 500 + round * 1000, "battery.v": volts});
            d.publish(&format!("devices/{}/telemetry", d.id), &payload.to_string())
                .await;
        }
    }
    let r = wait_rollout(&server, &id, |v| v["state"] != "running").await;
    assert_eq!(r["state"], "paused", "{r}");
    let s = &r["gate"]["signals"][0];
    assert_eq!(
        (
            s["signal"].as_str(),
            s["kind"].as_str(),
            s["verdict"].as_str()
        ),
        (Some("battery.v:down"), Some("metric"), Some("fail")),
        "{r}"
    );
    assert_eq!(
        (
            s["updated"]["devices"].as_u64(),
            s["control"]["devices"].as_u64()
        ),
        (Some(6), Some(6)),
        "{s}"
    );
    let (mu, mc) = (
        s["updated"]["mean"].as_f64().expect("mean"),
        s["control"]["mean"].as_f64().expect("mean"),
    );
    assert!((mc - mu - 0.15).abs() < 0.02, "{s}");
    assert!(s["effect"].as_f64().is_some_and(|e| e < -0.5), "{s}");
    assert!(s["p_value"].as_f64().is_some_and(|p| p <= 0.01), "{s}");
    assert!(
        r["reason"]
            .as_str()
            .is_some_and(|x| x.contains("battery.v:down mean") && x.contains("r=-1.00")),
        "{r}"
    );
    // Stopped before the next wave, and `show` prints the comparison in means.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(started(&server, &dep, &ids_).await, first);
    let shown = cli_ok(&server, &["rollout", "show", &id]);
    assert!(
        shown.contains("battery.v:down") && shown.contains("mean 3.5") && shown.contains("r=-1.00"),
        "{shown}"
    );
    // A metric name the gate cannot take is refused with the field named.
    let out = server.cli(&[
        "rollout",
        "create",
        "--artifact",
        &art,
        "--target",
        "id:volt-0",
        "--gate",
        "battery.v:sideways",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(":down"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `battery` in a gate names `[health] battery_metric`: gating on it and on that metric by name
/// is one metric twice, refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_naming_the_battery_metric_twice_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start_configured(tmp.path(), "[health]\nbattery_metric = \"battery.v\"\n");
    let (status, v) = server
        .api(
            "POST",
            "/api/v1/rollouts",
            Some(serde_json::json!({
                "artifact_id": "art_0000000000000000",
                "selector": "all",
                "gate": ["battery", "battery.v:down"],
            })),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_rollout")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("same metric")),
        "{v}"
    );
}

/// One caller may keep at most `[rollouts] active_per_creator_max` rollouts running or paused:
/// one more is refused until one ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_may_keep_only_so_many_rollouts_going() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start_configured(
        tmp.path(),
        "[rollouts]\ntick_ms = 60000\nactive_per_creator_max = 1\n",
    );
    for i in 0..2 {
        server.create_device(&format!("cap-{i}"), tmp.path());
    }
    let image: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let art = server.ota_upload(&tmp.path().join("fw-2.img"), &image, "2.0.0");
    let body = serde_json::json!({"artifact_id": art, "selector": "cap-0,cap-1", "control_pct": 0.0, "waves": [100.0]});
    let (status, first) = server
        .api("POST", "/api/v1/rollouts", Some(body.clone()))
        .await;
    assert!(status == 200 || status == 201, "{status} {first}");
    let (status, v) = server
        .api("POST", "/api/v1/rollouts", Some(body.clone()))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (429, Some("too_many_rollouts")),
        "{v}"
    );
    // Once the first ends, there is room again.
    let id = first["id"].as_str().expect("id");
    let (status, v) = server
        .api(
            "POST",
            &format!("/api/v1/rollouts/{id}/abort"),
            Some(serde_json::json!({"reason": "test"})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = server.api("POST", "/api/v1/rollouts", Some(body)).await;
    assert!(status == 200 || status == 201, "{status} {v}");
}
