//! OTA on the device, end to end: the real agent (library) against the real broker over
//! in-memory streams, an in-test HTTP server with `Range` support that cuts the first
//! transfer, and the A/B slots as files in a temp dir. The test plays the server: it sends
//! `mooring.update`, answers the link refresh and watches `ota/status`; a "reboot" is stopping
//! the agent and starting a new one on the same state (the slots boot again).

mod support;

use mooring_agent::ota::agent::UpdateConfig;
use mooring_agent::ota::{self, FileSlots, FileUpdateFiles, Slot, Slots as _, Updater};
use mooring_agent::{AgentConfig, Handlers, MemStore};
use mooring_proto::command::CommandRequest;
use mooring_proto::ota::{Link, Manifest, SignedManifest, UpdateParams};
use mooring_proto::{DeviceId, Topic};
use ring::signature::KeyPair as _;
use serde_json::Value;
use std::path::Path;
use std::sync::{Arc, Mutex};
use support::{device, Agent, World, EPOCH_MS};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const TOKEN: &str = "fresh-token";

/// Serves `image` at `/a` to `Authorization: Bearer fresh-token` (401 otherwise), honouring
/// `Range: bytes=N-`; the first transfer is cut after a third of the bytes. Records each range
/// start asked for.
async fn file_server(image: Vec<u8>) -> (String, Arc<Mutex<Vec<u64>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/a", listener.local_addr().expect("addr"));
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let seen = ranges.clone();
    tokio::spawn(async move {
        let mut served = 0u32;
        while let Ok((mut s, _)) = listener.accept().await {
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&req).to_lowercase();
            let header = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_owned))
            };
            if header("authorization").as_deref()
                != Some(&format!("bearer {}", TOKEN.to_lowercase()))
            {
                let _ = s.write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                continue;
            }
            let start: u64 = header("range")
                .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
                .unwrap_or(0);
            seen.lock().expect("lock").push(start);
            let len = image.len() as u64;
            let head = if start == 0 {
                format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n")
            } else {
                format!(
                    "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {start}-{}/{len}\r\nconnection: close\r\n\r\n",
                    len - start,
                    len - 1
                )
            };
            let _ = s.write_all(head.as_bytes()).await;
            let body = &image[start as usize..];
            served += 1;
            let body = if served == 1 {
                &body[..body.len() / 3]
            } else {
                body
            };
            let _ = s.write_all(body).await;
            let _ = s.shutdown().await;
        }
    });
    (url, ranges)
}

fn key() -> ring::signature::Ed25519KeyPair {
    ring::signature::Ed25519KeyPair::from_seed_unchecked(&[9; 32]).expect("key")
}

fn params(deployment: &str, version: &str, image: &[u8], url: &str) -> Value {
    let m = Manifest {
        v: 1,
        artifact_id: "art_00112233aabbccdd".into(),
        version: version.into(),
        sha256: hex::encode(ring::digest::digest(&ring::digest::SHA256, image).as_ref()),
        size: image.len() as u64,
        compatible: vec!["rev-b".into()],
        created_at: 1,
    };
    let bytes = m.to_bytes();
    let p = UpdateParams {
        v: 1,
        deployment_id: deployment.into(),
        signed: SignedManifest {
            manifest: String::from_utf8(bytes.clone()).expect("utf8"),
            signature: hex::encode(key().sign(&bytes).as_ref()),
        },
        // Already expired: the agent must ask for a new link first.
        link: Link {
            url: url.into(),
            token: "old".into(),
            expires_at: EPOCH_MS - 1,
        },
        allow_downgrade: false,
    };
    serde_json::to_value(p).expect("json")
}

fn update_config(health: &str) -> UpdateConfig {
    UpdateConfig {
        public_key: hex::encode(key().public_key().as_ref()),
        hw_revision: "rev-b".into(),
        allow_downgrade: false,
        battery_file: None,
        battery_command: None,
        battery_min_pct: 30,
        window: None,
        busy_command: None,
        health_command: Some(vec![health.into()]),
        health_handlers: Vec::new(),
        health_deadline_secs: 30,
    }
}

/// Powers the device on: the slots boot, the agent starts.
fn power_on(world: &World, id: &DeviceId, store: &MemStore, state: &Path, health: &str) -> Agent {
    power_on_with(
        world,
        id,
        store,
        state,
        update_config(health),
        Handlers::new(),
    )
}

/// [`power_on`] with this `[update]` table and these injected handlers.
fn power_on_with(
    world: &World,
    id: &DeviceId,
    store: &MemStore,
    state: &Path,
    cfg: UpdateConfig,
    handlers: Handlers,
) -> Agent {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("mooring_agent=debug")
        .try_init();
    let slots = FileSlots::open(&ota::slots_dir(state), Some("1.0".into())).expect("slots");
    let files = FileUpdateFiles::open(&ota::journal_dir(state)).expect("journal");
    let up = Updater::start(
        cfg.settings().expect("settings"),
        Box::new(slots),
        Box::new(files),
    )
    .expect("boot");
    let mut deps = world.deps(id, store, handlers);
    deps.ota = Some(up);
    let config = AgentConfig {
        interval_secs: 0,
        reboot_command: Some(vec!["/bin/true".into()]),
        update: Some(cfg),
        ..AgentConfig::new("sim", 1, "-", "-", "-", state)
    };
    Agent::start(deps, config)
}

fn states(world: &World, id: &DeviceId) -> Vec<String> {
    world
        .on(&mooring_proto::ota::status_topic(id))
        .iter()
        .map(|r| r["state"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// Waits for the revert after a failed health check: the `rebooting` report that carries the
/// check's reason (counting `rebooting` reports is not enough: an unacknowledged one is sent
/// again by the next agent on the same outbox).
async fn wait_revert(world: &World, id: &DeviceId) {
    world
        .wait_for("the revert", |w| {
            w.on(&mooring_proto::ota::status_topic(id)).iter().any(|r| {
                r["state"] == "rebooting"
                    && r["reason"]
                        .as_str()
                        .is_some_and(|why| why.starts_with("health_check_failed: "))
            })
        })
        .await;
}

async fn wait_state(world: &World, id: &DeviceId, state: &str) -> Value {
    let topic = mooring_proto::ota::status_topic(id);
    world
        .wait_for(&format!("ota state {state}"), |w| {
            w.on(&topic).iter().any(|r| r["state"] == state)
        })
        .await;
    world
        .on(&topic)
        .into_iter()
        .rev()
        .find(|r| r["state"] == state)
        .expect("report")
}

/// Answers the agent's link request with a fresh link.
fn answer_link_requests(world: &World, id: &DeviceId, url: &str) -> tokio::task::JoinHandle<()> {
    let hooks = world.hooks.clone();
    let broker = world.broker.clone();
    let id = id.clone();
    let url = url.to_owned();
    tokio::spawn(async move {
        let request = mooring_proto::ota::link_request_topic(&id);
        let mut answered = 0;
        loop {
            let changed = hooks.changed();
            let asked = hooks
                .published()
                .iter()
                .filter(|m| m.topic == request)
                .count();
            while answered < asked {
                answered += 1;
                let link = Link {
                    url: url.clone(),
                    token: TOKEN.into(),
                    expires_at: EPOCH_MS + 3_600_000,
                };
                broker.publish(mooring_broker::Message::new(
                    mooring_proto::ota::link_accepted_topic(&id),
                    serde_json::to_vec(&link).expect("json"),
                    1,
                    false,
                ));
            }
            changed.await;
        }
    })
}

fn send_update(world: &World, id: &DeviceId, cmd: &str, params: Value) {
    let req = CommandRequest {
        id: cmd.into(),
        name: "mooring.update".into(),
        params,
        expires_at: EPOCH_MS + 3_600_000_000,
    };
    // Retained: it reaches the agent whenever it has subscribed (a redelivery to a later
    // start is answered from the executor's record, not run again).
    world.publish(&Topic::command(id, cmd), &req.to_bytes(), true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_update_downloads_with_a_resume_reboots_into_the_trial_and_commits() {
    let world = World::new();
    let id = device("ota-good");
    let store = MemStore::new(1_000, 1).expect("store");
    let state = tempfile::tempdir().expect("tempdir");
    let image: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (url, ranges) = file_server(image.clone()).await;
    let responder = answer_link_requests(&world, &id, &url);

    let agent = power_on(&world, &id, &store, state.path(), "/bin/true");
    send_update(&world, &id, "c1", params("dep_good", "2.0", &image, &url));
    let result_topic = Topic::command_result(&id, "c1");
    world
        .wait_for("the command result", |w| !w.on(&result_topic).is_empty())
        .await;
    assert_eq!(
        world.on(&result_topic)[0]["status"],
        "succeeded",
        "{:?}",
        world.on(&result_topic)
    );
    wait_state(&world, &id, "rebooting").await;
    agent.stop().await.expect("stop");
    let seen = ranges.lock().expect("lock").clone();
    assert!(
        seen.len() >= 2 && seen[0] == 0 && seen[1] > 0,
        "resumed with Range: {seen:?}"
    );
    assert!(
        !world
            .on(&mooring_proto::ota::link_request_topic(&id))
            .is_empty(),
        "the expired link was refreshed"
    );

    // "Reboot": the trial boots and passes its checks.
    let agent = power_on(&world, &id, &store, state.path(), "/bin/true");
    let done = wait_state(&world, &id, "committed").await;
    assert_eq!(done["running_version"], "2.0");
    // The shadow tells the dashboard which slot runs what.
    let reported = Topic::shadow_reported(&id);
    world
        .wait_for("the committed slots in the shadow", |w| {
            w.on(&reported).iter().any(|r| {
                r["ota"]["committed"] == "b"
                    && r["ota"]["active"] == "b"
                    && r["ota"]["slots"]["b"]["version"] == "2.0"
            })
        })
        .await;
    assert!(
        world.on(&reported).iter().any(|r| r["version"] == "2.0"),
        "the running slot's version is reported.version after the reboot"
    );
    agent.stop().await.expect("stop");
    let s = states(&world, &id);
    for want in [
        "downloading",
        "verifying",
        "installing",
        "rebooting",
        "health_checking",
        "committed",
    ] {
        assert!(s.iter().any(|x| x == want), "{want} in {s:?}");
    }
    let slots = FileSlots::open(&ota::slots_dir(state.path()), None).expect("slots");
    let c = slots.control();
    assert_eq!((c.committed, c.trial), (Slot::B, None));
    assert_eq!(
        std::fs::read(state.path().join("slots/b.img")).expect("image"),
        image
    );
    // `mooring-agent slots status` reads the same files.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mooring-agent"))
        .args(["slots", "status", "--state-dir"])
        .arg(state.path())
        .output()
        .expect("slots status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("b ") && l.contains("2.0") && l.contains("active (committed)")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("a ") && l.contains("1.0") && l.contains("inactive")),
        "{text}"
    );
    assert!(
        text.contains("dep_good") && text.contains("committed"),
        "{text}"
    );
    responder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_fails_its_health_check_is_rolled_back() {
    let world = World::new();
    let id = device("ota-bad");
    let store = MemStore::new(1_000, 1).expect("store");
    let state = tempfile::tempdir().expect("tempdir");
    let image = b"a version that does not work".to_vec();
    let (url, _) = file_server(image.clone()).await;
    let responder = answer_link_requests(&world, &id, &url);

    let agent = power_on(&world, &id, &store, state.path(), "/bin/false");
    send_update(&world, &id, "c1", params("dep_bad", "2.0", &image, &url));
    wait_state(&world, &id, "rebooting").await;
    agent.stop().await.expect("stop");
    let agent = power_on(&world, &id, &store, state.path(), "/bin/false");
    // The check fails: revert, reboot.
    wait_revert(&world, &id).await;
    agent.stop().await.expect("stop");
    let agent = power_on(&world, &id, &store, state.path(), "/bin/false");
    let done = wait_state(&world, &id, "rolled_back").await;
    assert_eq!(done["running_version"], "1.0");
    assert!(
        done["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("health_check_failed: ")),
        "{done}"
    );
    agent.stop().await.expect("stop");
    let c = FileSlots::open(&ota::slots_dir(state.path()), None)
        .expect("slots")
        .control();
    assert_eq!((c.committed, c.trial), (Slot::A, None));
    responder.abort();
}

/// A handler that answers like the new firmware's broken sensor driver: it fails, and says the
/// params it got.
struct DeadSensor;

#[async_trait::async_trait]
impl mooring_agent::CommandHandler for DeadSensor {
    async fn run(&self, params: Value) -> mooring_agent::Outcome {
        Err(serde_json::json!({"reason": format!("sensor dead (params {params})")}))
    }
}

/// `[update] health_handlers`: a handler that fails during the trial boot rolls the update back,
/// with the handler's reason, though the device connected and `health_command` passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_fails_during_the_trial_boot_rolls_the_update_back() {
    let world = World::new();
    let id = device("ota-handler");
    let store = MemStore::new(1_000, 1).expect("store");
    let state = tempfile::tempdir().expect("tempdir");
    let image = b"a version whose sensor driver is broken".to_vec();
    let (url, _) = file_server(image.clone()).await;
    let responder = answer_link_requests(&world, &id, &url);
    let cfg = UpdateConfig {
        health_handlers: vec!["ping".into(), "sensor".into()],
        ..update_config("/bin/true")
    };
    let handlers = || {
        let mut h = Handlers::new();
        let dead: Arc<dyn mooring_agent::CommandHandler> = Arc::new(DeadSensor);
        h.insert("sensor".into(), dead);
        h
    };
    let agent = power_on_with(&world, &id, &store, state.path(), cfg.clone(), handlers());
    send_update(
        &world,
        &id,
        "c1",
        params("dep_handler", "2.0", &image, &url),
    );
    wait_state(&world, &id, "rebooting").await;
    agent.stop().await.expect("stop");
    let agent = power_on_with(&world, &id, &store, state.path(), cfg.clone(), handlers());
    wait_revert(&world, &id).await;
    agent.stop().await.expect("stop");
    let agent = power_on_with(&world, &id, &store, state.path(), cfg, handlers());
    let done = wait_state(&world, &id, "rolled_back").await;
    assert_eq!(done["running_version"], "1.0");
    let why = done["reason"].as_str().unwrap_or_default();
    assert!(
        why.starts_with("health_check_failed: handler sensor failed: sensor dead (params {\"health_check\":true})"),
        "{done}"
    );
    agent.stop().await.expect("stop");
    responder.abort();
}

#[test]
fn health_handlers_that_change_the_device_are_refused_at_load() {
    for name in ["reboot", "set_config", "mooring.update", ""] {
        let cfg = UpdateConfig {
            health_handlers: vec![name.into()],
            ..update_config("/bin/true")
        };
        assert!(cfg.validate().is_err(), "{name:?}");
    }
    let ok = UpdateConfig {
        health_handlers: vec!["ping".into(), "selftest".into()],
        ..update_config("/bin/true")
    };
    assert_eq!(ok.validate(), Ok(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_download_is_never_installed() {
    let world = World::new();
    let id = device("ota-tampered");
    let store = MemStore::new(1_000, 1).expect("store");
    let state = tempfile::tempdir().expect("tempdir");
    let image = b"the real image".to_vec();
    let mut served = image.clone();
    served[3] ^= 1;
    let (url, _) = file_server(served).await;
    let responder = answer_link_requests(&world, &id, &url);
    let agent = power_on(&world, &id, &store, state.path(), "/bin/true");
    send_update(&world, &id, "c1", params("dep_t", "2.0", &image, &url));
    let done = wait_state(&world, &id, "failed").await;
    assert!(
        done["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("hash_mismatch: ")),
        "{done}"
    );
    assert_eq!(done["running_version"], "1.0");
    agent.stop().await.expect("stop");
    let c = FileSlots::open(&ota::slots_dir(state.path()), None)
        .expect("slots")
        .control();
    assert_eq!((c.committed, c.trial), (Slot::A, None));
    assert_eq!(c.info(Slot::B).version, None, "nothing written");
    responder.abort();
}
