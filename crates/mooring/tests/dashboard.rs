//! The web dashboard in a real browser: Debian's chromium, driven by playwright-core from
//! `web/tests/dashboard.test.mjs`, against the real `mooring serve` holding 1,000 devices, one of
//! them a live `mooring-agent`. This file prepares the server and runs the Node test; the
//! assertions about what a person sees are in the `.mjs` file.
//!
//! Needs Node.js, npm (the first run installs `web/node_modules` with `npm ci`) and chromium
//! (`apt-get install -y chromium`; another binary with `MOORING_TEST_CHROMIUM`). With
//! `SCREENSHOTS=<dir>` set, also writes every page's screenshot there
//! (`web/scripts/screenshots.sh` keeps docs/screenshots/ up to date that way).
//!
//! `rollouts_in_a_real_browser` does the same for the rollouts page on a small server of its
//! own (`web/tests/rollouts.test.mjs`), and `gateways_in_a_real_browser` for the device page's
//! Gateway section (`web/tests/gateways.test.mjs`).

mod support;

use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::Server;

const PASSWORD: &str = "correct horse battery staple";
const DEVICES: usize = 1000;
/// How long the whole browser run may take before it is killed.
const BROWSER_RUN_MAX: Duration = Duration::from_secs(300);

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web")
}

fn chromium() -> PathBuf {
    let path = std::env::var_os("MOORING_TEST_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "{} not found: the dashboard's browser tests need chromium \
         (`apt-get install -y chromium`, or set MOORING_TEST_CHROMIUM)",
        path.display()
    );
    path
}

/// `web/node_modules` with playwright-core, installed from the lockfile on first use.
fn ensure_node_modules() {
    let web = web_dir();
    if web
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        return;
    }
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&web)
        .output()
        .expect("npm not found: the dashboard's browser tests need Node.js and npm");
    assert!(
        out.status.success(),
        "npm ci in web/ failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates devices `dev-0000`.. through the API, `site` tag `s<i % 10>`, 8 requests at a time.
async fn seed_devices(server: &Server, n: usize) {
    let client = support::http();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        if set.len() >= 8 {
            let _ = set.join_next().await;
        }
        let (client, url, token) = (client.clone(), server.url(), server.token.clone());
        set.spawn(async move {
            let r = client
                .post(format!("{url}/api/v1/devices"))
                .bearer_auth(token)
                .json(
                    &json!({"id": format!("dev-{i:04}"), "tags": {"site": format!("s{}", i % 10)}}),
                )
                .send()
                .await
                .expect("http");
            assert_eq!(
                r.status().as_u16(),
                201,
                "{}",
                r.text().await.unwrap_or_default()
            );
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("seed task");
    }
}

/// Runs `web/tests/<file>` with Node's test runner against `server`: the environment every file
/// takes (MOORING_URL, MOORING_TOKEN, PASSWORD, CHROMIUM, SCREENSHOTS when set) plus `env`. A
/// run longer than [`BROWSER_RUN_MAX`] is killed. A failure is its output and the server's log
/// (returned, so the caller stops what it started before failing).
async fn run_browser_tests(
    server: &Server,
    chromium: &Path,
    file: &str,
    env: &[(&str, &str)],
) -> Result<(), String> {
    let mut node = Command::new("node");
    node.args(["--test", "--test-reporter=spec", "--test-concurrency=1"])
        .arg(web_dir().join("tests").join(file))
        .env("MOORING_URL", server.url())
        .env("MOORING_TOKEN", &server.token)
        .env("PASSWORD", PASSWORD)
        .env("CHROMIUM", chromium)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(dir) = std::env::var_os("SCREENSHOTS") {
        std::fs::create_dir_all(&dir).expect("screenshots dir");
        node.env("SCREENSHOTS", dir);
    }
    let child = node
        .spawn()
        .expect("node not found: the browser tests need Node.js");
    let pid = child.id();
    let started = Instant::now();
    let watchdog = std::thread::spawn(move || {
        // Kill a hung browser run instead of hanging CI.
        while started.elapsed() < BROWSER_RUN_MAX {
            std::thread::sleep(Duration::from_millis(200));
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
        }
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    });
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("node output");
    let _ = watchdog.join();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "browser tests failed ({}):\n{stdout}\n{}\nserver log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_real_browser() {
    let chromium = chromium();
    ensure_node_modules();
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    // A sample of the fleet's history every second (default: a minute), so the overview's
    // charts have points within the run.
    // Presence flushed every second, so the pipeline's first connect shows up within the run.
    // A playbook a rule's `job:` action runs for the live device: it tags it and opens a ticket
    // (the tickets page lists it).
    let cfg = support::config_args(
        tmp.path(),
        "[fleet]\nsample_interval_ms = 1000\n[limits]\npresence_flush_interval_secs = 1\n\
         [[playbook]]\nname = \"visit\"\nsteps = [\"tag:visit=due\", \"ticket\"]\n\
         [[part]]\npart = \"battery pack\"\nsignal = \"battery\"\nbelow = 20\n",
    );
    let cfg: Vec<&str> = cfg.iter().map(String::as_str).collect();
    let server = Server::start_with(&data, "127.0.0.1:0", "127.0.0.1:0", &cfg);
    server.create_user("admin@example.com", "admin", PASSWORD);
    server.create_user("viewer@example.com", "viewer", PASSWORD);
    server.create_user("installer@example.com", "installer", PASSWORD);
    // A manufacturer's CA, registered (the provisioning page lists it for admins).
    let acme = support::manufacturer::Manufacturer::new(tmp.path(), "Acme");
    let cert = acme.ca_cert();
    let out = server.cli(&[
        "ca",
        "register",
        "--cert",
        cert.to_str().expect("utf8"),
        "--auto-register",
        "--tag",
        "vendor=acme",
    ]);
    assert!(
        out.status.success(),
        "ca register: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 999 devices through the API plus the live one: 1,000.
    seed_devices(&server, DEVICES - 1).await;
    let live = "cart-7";
    let creds = server.create_device(live, tmp.path());
    let (status, body) = server
        .api(
            "PUT",
            &format!("/api/v1/devices/{live}/tags"),
            Some(json!({"site": "depot", "asset": "a-77"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // The live device: the real agent, host metrics every second, a `blink` handler.
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        "firmware_version = \"1.4.2\"\n\
         [handlers.blink]\n\
         exec = \"/bin/echo\"\n\
         args = ['{\"blinked\": true}']\n",
    )
    .expect("agent config");
    let mut agent = support::agent_command(&server, &creds, &tmp.path().join("agent-state"))
        .arg("--config")
        .arg(&config)
        .args(["--interval-secs", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mooring-agent");
    server
        .wait_for(&format!("/api/v1/devices/{live}"), |v| v["online"] == true)
        .await;
    // A rule whose condition every reading of the agent meets: its `job:visit` action runs the
    // playbook for the device, which opens a ticket.
    let (status, body) = server
        .api(
            "POST",
            "/api/v1/rules",
            Some(json!({
                "name": "visit-cart",
                "when": "uptime_secs > -1",
                "then": "job:visit",
                "selector": format!("id:{live}"),
            })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let tickets = server
        .wait_for("/api/v1/tickets", |v| {
            v["tickets"].as_array().is_some_and(|t| !t.is_empty())
        })
        .await;
    let ticket = tickets["tickets"][0]["id"]
        .as_str()
        .expect("ticket id")
        .to_owned();

    let run = run_browser_tests(
        &server,
        &chromium,
        "dashboard.test.mjs",
        &[
            ("ADMIN_EMAIL", "admin@example.com"),
            ("VIEWER_EMAIL", "viewer@example.com"),
            ("INSTALLER_EMAIL", "installer@example.com"),
            ("LIVE_DEVICE", live),
            ("LIVE_TAG", "asset=a-77"),
            ("BULK_SELECTOR", "tag:site=s3"),
            ("BULK_COUNT", "100"),
            ("TICKET_ID", &ticket),
        ],
    )
    .await;
    let _ = agent.kill();
    let _ = agent.wait();
    if let Err(e) = run {
        panic!("{e}");
    }
}

/// The rollouts page: three devices that stay offline (so the rollout's first wave is deferred,
/// `offline`), a rollout with a control cohort, followed by a viewer (no buttons) and an admin
/// who pauses, resumes and aborts it from the page (`web/tests/rollouts.test.mjs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_in_a_real_browser() {
    let chromium = chromium();
    ensure_node_modules();
    let tmp = tempfile::tempdir().expect("tempdir");
    // The rollout controller every 200 ms (default 5 s): deferrals show within the run.
    let server = Server::start_configured(tmp.path(), "[rollouts]\ntick_ms = 200\n");
    server.create_user("admin@example.com", "admin", PASSWORD);
    server.create_user("viewer@example.com", "viewer", PASSWORD);
    let image: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let artifact = server.ota_upload(&tmp.path().join("fw-2.img"), &image, "2.0.0");
    for id in ["d1", "d2", "d3"] {
        server.create_device(id, tmp.path());
    }
    let (status, rollout) = server
        .api(
            "POST",
            "/api/v1/rollouts",
            Some(json!({
                "artifact_id": artifact,
                "selector": "id:d1,d2,d3",
                "control_pct": 34,
                "min_devices": 1,
            })),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let id = rollout["id"].as_str().expect("rollout id").to_owned();
    assert_eq!(rollout["total"], 3, "{rollout}");
    // The devices never connect: the first wave's are deferred (offline), never started.
    let rollout = server
        .wait_for(&format!("/api/v1/rollouts/{id}"), |v| {
            v["deferred"].as_u64().is_some_and(|n| n > 0)
        })
        .await;
    println!("{rollout:#}");
    let run = run_browser_tests(
        &server,
        &chromium,
        "rollouts.test.mjs",
        &[
            ("ADMIN_EMAIL", "admin@example.com"),
            ("VIEWER_EMAIL", "viewer@example.com"),
            ("ROLLOUT_ID", &id),
        ],
    )
    .await;
    if let Err(e) = run {
        panic!("{e}");
    }
}

/// The device page's Gateway section: a gateway, a child attached to it through the API and a
/// lone device, all offline; a viewer sees the attachment and no write control, an admin follows
/// the child's link to its gateway (which lists it), attaches the lone device from its page (a
/// gateway that does not exist refused with the server's message) and detaches it again
/// (`web/tests/gateways.test.mjs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_in_a_real_browser() {
    let chromium = chromium();
    ensure_node_modules();
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    server.create_user("admin@example.com", "admin", PASSWORD);
    server.create_user("viewer@example.com", "viewer", PASSWORD);
    let (gateway, child, lone) = ("gw-1", "lock-1", "lock-2");
    for id in [gateway, child, lone] {
        server.create_device(id, tmp.path());
    }
    let (status, body) = server
        .api(
            "PUT",
            &format!("/api/v1/devices/{child}/gateway"),
            Some(json!({"gateway": gateway})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["gateway"], gateway, "{body}");
    // A device that ran a command on its local API syncs the result (docs/edge.md).
    let local = "lock-9";
    let creds = server.create_device(local, tmp.path());
    let mut device = support::MqttDevice::connect(&server, &creds, local).await;
    device
        .publish(
            &format!("devices/{local}/commands/l-door-1/result"),
            r#"{"status":"succeeded","output":{"opened":true},"local":{"name":"unlock","params":{"door":1},"requested_at":1700000000000,"finished_at":1700000000250}}"#,
        )
        .await;
    drop(device);
    server
        .wait_for(&format!("/api/v1/devices/{local}/commands"), |v| {
            v["commands"][0]["origin"] == "local"
        })
        .await;
    let run = run_browser_tests(
        &server,
        &chromium,
        "gateways.test.mjs",
        &[
            ("ADMIN_EMAIL", "admin@example.com"),
            ("VIEWER_EMAIL", "viewer@example.com"),
            ("GATEWAY", gateway),
            ("CHILD", child),
            ("LONE", lone),
            ("LOCAL_DEVICE", local),
        ],
    )
    .await;
    if let Err(e) = run {
        panic!("{e}");
    }
}
