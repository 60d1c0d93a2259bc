//! OTA end to end (issue 17): the real server and real `mooring-agent`s. An artifact uploaded with
//! `mooring ota upload` and deployed with `mooring ota deploy` is downloaded by each agent over the
//! server's HTTP listener with its token, verified, written into the inactive slot and tried once
//! after a "reboot" (the agent exits 75; the test restarts it, as a service manager would). A
//! healthy device commits; one whose health check fails rolls back; an artifact whose stored bytes
//! were tampered with is never installed. The server shows each device's true final state.

mod support;

use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use support::agents::{agent_config, Supervised};
use support::{Creds, Server};

/// `mooring ota upload` of `bytes` as `version`: the artifact id.
fn upload(server: &Server, dir: &Path, version: &str, bytes: &[u8]) -> String {
    server.ota_upload(&dir.join(format!("fw-{version}.img")), bytes, version)
}

fn deploy(server: &Server, artifact: &str, to: &str) {
    let out = server.cli(&["ota", "deploy", "--artifact", artifact, "--to", to]);
    assert!(
        out.status.success(),
        "ota deploy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The device's update for `version` once it is final.
async fn final_update(server: &Server, device: &str, version: &str) -> Value {
    let v = server
        .wait_for(&format!("/api/v1/devices/{device}/ota"), |v| {
            v["updates"].as_array().is_some_and(|us| {
                us.iter().any(|u| {
                    u["version"] == version
                        && matches!(
                            u["state"].as_str(),
                            Some("committed" | "rolled_back" | "failed")
                        )
                })
            })
        })
        .await;
    v["updates"]
        .as_array()
        .and_then(|us| us.iter().find(|u| u["version"] == version).cloned())
        .expect("the update")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_commit_a_good_version_roll_back_a_bad_one_and_never_install_a_tampered_one() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let _ = run(&tmp, &data, &server).await;
}

/// Over an HTTPS API (`--http-tls`): the agent downloads over TLS, trusting only the fleet CA
/// (its `--ca`), and commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_downloads_over_https_trusting_only_the_fleet_ca() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let server = Server::start_with(&data, "127.0.0.1:0", "127.0.0.1:0", &["--http-tls"]);
    let base = format!("https://localhost:{}", server.http.port());
    let ca = std::fs::read(data.join("ca.crt")).expect("ca.crt");
    // reqwest's TLS needs a process-wide crypto provider (the harness's client installs ring).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("ca"))
        .build()
        .expect("client");
    let get = |path: String| {
        let (client, url, token) = (
            client.clone(),
            format!("{base}{path}"),
            server.token.clone(),
        );
        async move {
            client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("https")
                .json::<Value>()
                .await
                .expect("json")
        }
    };
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(support::BIN)
            .args(args)
            .args(["--server", &base, "--data-dir"])
            .arg(&data)
            .env_remove("MOORING_TOKEN")
            .output()
            .expect("cli");
        assert!(
            out.status.success(),
            "mooring {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let public_key = get("/api/v1/ota/update-key".into()).await["public_key"]
        .as_str()
        .expect("public key")
        .to_owned();
    let creds_dir = tmp.path().join("ota-tls");
    cli(&[
        "device",
        "create",
        "ota-tls",
        "--out",
        creds_dir.to_str().expect("utf8"),
    ]);
    let dev = Creds { dir: creds_dir };
    let cfg = agent_config(tmp.path(), "tls", &public_key, None);
    let _agent = Supervised::start(&server, &dev, &tmp.path().join("tls-state"), &cfg);
    let image: Vec<u8> = (0..300_000u32).map(|i| (i % 239) as u8).collect();
    let file = tmp.path().join("fw-5.img");
    std::fs::write(&file, &image).expect("image");
    let art = cli(&[
        "ota",
        "upload",
        file.to_str().expect("utf8"),
        "--version",
        "5.0.0",
        "--compatible",
        "rev-b",
    ]);
    cli(&["ota", "deploy", "--artifact", &art, "--to", "id:ota-tls"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let done = loop {
        let v = get("/api/v1/devices/ota-tls/ota".into()).await;
        let u = v["updates"][0].clone();
        if u["state"] == "committed" || u["state"] == "failed" || u["state"] == "rolled_back" {
            break u;
        }
        assert!(std::time::Instant::now() < deadline, "not final: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done["state"], "committed", "{done}");
    assert_eq!(done["running_version"], "5.0.0", "{done}");
    let cmds = get("/api/v1/devices/ota-tls/commands".into()).await;
    let url = cmds["commands"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "mooring.update"))
        .and_then(|c| c["params"]["link"]["url"].as_str())
        .expect("the update's link")
        .to_owned();
    assert!(url.starts_with("https://"), "{url}");
}

async fn run(tmp: &tempfile::TempDir, data: &Path, server: &Server) {
    let (status, key) = server.api("GET", "/api/v1/ota/update-key", None).await;
    assert_eq!(status, 200, "{key}");
    let public_key = key["public_key"].as_str().expect("public key").to_owned();

    let good = server.create_device("ota-good", tmp.path());
    let bad = server.create_device("ota-bad", tmp.path());
    let good_cfg = agent_config(tmp.path(), "good", &public_key, None);
    let bad_cfg = agent_config(tmp.path(), "bad", &public_key, Some("/bin/false"));
    let good_state = tmp.path().join("good-state");
    let g = Supervised::start(server, &good, &good_state, &good_cfg);
    let b = Supervised::start(server, &bad, &tmp.path().join("bad-state"), &bad_cfg);
    for id in ["ota-good", "ota-bad"] {
        server
            .wait_for(&format!("/api/v1/devices/{id}"), |v| v["online"] == true)
            .await;
    }

    // 2.0.0 to both: the healthy device commits it, the other tries it once and rolls back.
    let image: Vec<u8> = (0..600_000u32).map(|i| (i % 241) as u8).collect();
    let v2 = upload(server, tmp.path(), "2.0.0", &image);
    deploy(server, &v2, "id:ota-good,ota-bad");
    let done = final_update(server, "ota-good", "2.0.0").await;
    assert_eq!(done["state"], "committed", "{done}");
    assert_eq!(done["running_version"], "2.0.0", "{done}");
    let rolled = final_update(server, "ota-bad", "2.0.0").await;
    assert_eq!(rolled["state"], "rolled_back", "{rolled}");
    assert_eq!(rolled["running_version"], "1.0.0", "{rolled}");
    assert!(
        rolled["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("health_check_failed")),
        "{rolled}"
    );
    assert!(
        g.reboots() >= 1 && b.reboots() >= 2,
        "a trial boot each, and the revert"
    );
    // Fleet health counts the rollback among the device's signals (docs/health.md).
    let (_, h) = server
        .api("GET", "/api/v1/devices/ota-bad/health", None)
        .await;
    assert_eq!(h["totals"]["update_rollbacks"], 1, "{h}");
    assert_eq!(h["last_update_problem"]["state"], "rolled_back", "{h}");
    assert_eq!(h["last_update_problem"]["version"], "2.0.0", "{h}");
    let (_, h) = server
        .api("GET", "/api/v1/devices/ota-good/health", None)
        .await;
    assert_eq!(h["totals"]["update_rollbacks"], 0, "{h}");
    // The running version comes from the agents, in their shadows.
    server
        .wait_for("/api/v1/devices/ota-good/shadow", |v| {
            v["reported"]["version"] == "2.0.0" && v["reported"]["ota"]["active"] == "b"
        })
        .await;
    server
        .wait_for("/api/v1/devices/ota-bad/shadow", |v| {
            v["reported"]["version"] == "1.0.0"
        })
        .await;
    // ...and the device record shows it (API and CLI), not the deployment's version.
    let (_, good) = server.api("GET", "/api/v1/devices/ota-good", None).await;
    assert_eq!(good["version"], "2.0.0", "{good}");
    let (_, bad) = server.api("GET", "/api/v1/devices/ota-bad", None).await;
    assert_eq!(bad["version"], "1.0.0", "{bad}");
    let (_, listed) = server
        .api("GET", "/api/v1/devices?selector=version%3D2.0.0", None)
        .await;
    assert_eq!(listed["devices"][0]["id"], "ota-good", "{listed}");
    assert_eq!(
        listed["devices"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    let shown = server.cli(&["device", "show", "ota-bad"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("version") && l.trim_end().ends_with("1.0.0")),
        "{shown}"
    );
    let (_, deployments) = server.api("GET", "/api/v1/ota/deployments", None).await;
    let counts = &deployments["deployments"][0]["counts"];
    assert_eq!(
        counts,
        &json!({"committed": 1, "rolled_back": 1}),
        "{deployments}"
    );

    // 2.1.0 whose stored bytes were changed after upload (same size): refused, never installed.
    let v21 = upload(server, tmp.path(), "2.1.0", &image);
    let stored = data.join("artifacts").join(&v21);
    let mut tampered = std::fs::read(&stored).expect("stored artifact");
    tampered[1000] ^= 0xff;
    std::fs::write(&stored, &tampered).expect("tamper");
    deploy(server, &v21, "id:ota-good");
    let refused = final_update(server, "ota-good", "2.1.0").await;
    assert_eq!(refused["state"], "failed", "{refused}");
    assert!(
        refused["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("hash_mismatch")),
        "{refused}"
    );
    assert_eq!(refused["running_version"], "2.0.0", "{refused}");
    // The agent's own view agrees: slot B committed with 2.0.0.
    let out = std::process::Command::new(Path::new(support::BIN).with_file_name("mooring-agent"))
        .args(["slots", "status", "--json", "--state-dir"])
        .arg(&good_state)
        .output()
        .expect("slots status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let slots: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(slots["slots"]["committed"], "b", "{slots}");
    assert_eq!(slots["slots"]["slots"][1]["version"], "2.0.0", "{slots}");
    assert_eq!(slots["update"]["phase"]["state"], "failed", "{slots}");
    drop((g, b));
}
