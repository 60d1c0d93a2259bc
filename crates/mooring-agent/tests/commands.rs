//! Commands and shadow, device side: the real agent against the real broker over in-memory
//! streams on a paused clock; the test plays the server (publishes commands and deltas,
//! watches acks, results and reported updates).

mod support;

use mooring_agent::config::ExecHandler;
use mooring_agent::{AgentStore as _, CommandHandler, Handlers, MemStore, Outcome};
use mooring_proto::command::CommandRequest;
use mooring_proto::shadow::ShadowDelta;
use mooring_proto::{DeviceId, Topic};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::{device, Agent, World, EPOCH_MS};

/// Counts its runs; answers `{"runs": n}`.
#[derive(Default)]
struct Counting(AtomicU64);

#[async_trait::async_trait]
impl CommandHandler for Counting {
    async fn run(&self, _params: Value) -> Outcome {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(json!({ "runs": n }))
    }
}

/// Counts its runs and never finishes (the agent gets killed while it runs).
#[derive(Default)]
struct Hangs(AtomicU64);

#[async_trait::async_trait]
impl CommandHandler for Hangs {
    async fn run(&self, _params: Value) -> Outcome {
        self.0.fetch_add(1, Ordering::SeqCst);
        std::future::pending().await
    }
}

struct Panics;

#[async_trait::async_trait]
impl CommandHandler for Panics {
    async fn run(&self, _params: Value) -> Outcome {
        panic!("handler bug");
    }
}

fn send(world: &World, id: &DeviceId, cmd: &str, name: &str, params: Value, expires_at: u64) {
    let req = CommandRequest {
        id: cmd.into(),
        name: name.into(),
        params,
        expires_at,
    };
    world.publish(&Topic::command(id, cmd), &req.to_bytes(), false);
}

fn later() -> u64 {
    EPOCH_MS + 3_600_000
}

async fn results(world: &World, id: &DeviceId, cmd: &str, n: usize) -> Vec<Value> {
    let topic = Topic::command_result(id, cmd);
    world
        .wait_for(&format!("{n} result(s) of {cmd}"), |h| {
            h.on(&topic).len() >= n
        })
        .await;
    world.on(&topic)
}

fn handlers(list: Vec<(&str, Arc<dyn CommandHandler>)>) -> Handlers {
    list.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

#[tokio::test(start_paused = true)]
async fn ping_is_acked_then_answered() -> anyhow::Result<()> {
    let world = World::new();
    let id = device("cmd-ping");
    let store = MemStore::new(100, 1)?;
    let agent = Agent::start(world.deps(&id, &store, Handlers::new()), support::config(0));
    tokio::time::sleep(Duration::from_secs(1)).await; // connected and subscribed
    send(&world, &id, "c1", "ping", Value::Null, later());
    let r = results(&world, &id, "c1", 1).await;
    assert_eq!(r[0]["status"], json!("succeeded"));
    assert_eq!(r[0]["output"]["pong"], json!(true));
    assert!(r[0]["output"]["ts"]
        .as_u64()
        .is_some_and(|ts| ts >= EPOCH_MS));
    // The ack was published before the result.
    let msgs = world.hooks.published();
    let pos = |t: &str| msgs.iter().position(|m| m.topic == t);
    let ack = pos(&Topic::command_ack(&id, "c1")).expect("ack published");
    let res = pos(&Topic::command_result(&id, "c1")).expect("result published");
    assert!(ack < res);
    assert_eq!(&msgs[ack].payload[..], b"{}");
    agent.stop().await
}

#[tokio::test(start_paused = true)]
async fn a_redelivered_command_replays_its_result_and_runs_once() -> anyhow::Result<()> {
    let world = World::new();
    let id = device("cmd-replay");
    let store = MemStore::new(100, 1)?;
    let counting = Arc::new(Counting::default());
    let agent = Agent::start(
        world.deps(&id, &store, handlers(vec![("count", counting.clone())])),
        support::config(0),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    send(&world, &id, "c1", "count", json!({}), later());
    let first = results(&world, &id, "c1", 1).await;
    send(&world, &id, "c1", "count", json!({}), later());
    let both = results(&world, &id, "c1", 2).await;
    assert_eq!(both[0], first[0]);
    assert_eq!(both[1], both[0], "the stored result is replayed");
    assert_eq!(both[0]["output"], json!({"runs": 1}));
    assert_eq!(counting.0.load(Ordering::SeqCst), 1, "executed once");
    // Across an agent restart too (the executed-ids record is in the store).
    agent.stop().await?;
    let agent = Agent::start(
        world.deps(&id, &store, handlers(vec![("count", counting.clone())])),
        support::config(0),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    send(&world, &id, "c1", "count", json!({}), later());
    let all = results(&world, &id, "c1", 3).await;
    assert_eq!(all[2], first[0]);
    assert_eq!(counting.0.load(Ordering::SeqCst), 1);
    agent.stop().await
}

#[tokio::test(start_paused = true)]
async fn an_agent_killed_while_running_a_command_does_not_run_it_again() -> anyhow::Result<()> {
    let world = World::new();
    let id = device("cmd-killed");
    let store = MemStore::new(100, 1)?;
    let hangs = Arc::new(Hangs::default());
    let agent = Agent::start(
        world.deps(&id, &store, handlers(vec![("work", hangs.clone())])),
        support::config(0),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    send(&world, &id, "c9", "work", json!({}), later());
    let ack = Topic::command_ack(&id, "c9");
    world.wait_for("the ack", |h| !h.on(&ack).is_empty()).await;
    assert_eq!(hangs.0.load(Ordering::SeqCst), 1);
    agent.kill().await; // power cut while the handler runs: no result recorded

    // The server redelivers (it never got a result); the restarted agent must not run it again.
    let agent = Agent::start(
        world.deps(&id, &store, handlers(vec![("work", hangs.clone())])),
        support::config(0),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    send(&world, &id, "c9", "work", json!({}), later());
    let r = results(&world, &id, "c9", 1).await;
    assert_eq!(
        r[0],
        json!({"status": "failed", "output": {"reason": "interrupted"}})
    );
    assert_eq!(hangs.0.load(Ordering::SeqCst), 1, "no second execution");
    // And a further redelivery replays that same result.
    send(&world, &id, "c9", "work", json!({}), later());
    let r = results(&world, &id, "c9", 2).await;
    assert_eq!(r[1], r[0]);
    agent.stop().await
}

#[tokio::test(start_paused = true)]
async fn expired_and_unknown_commands_fail_without_running() -> anyhow::Result<()> {
    let world = World::new();
    let id = device("cmd-fail");
    let store = MemStore::new(100, 1)?;
    let counting = Arc::new(Counting::default());
    let agent = Agent::start(
        world.deps(&id, &store, handlers(vec![("count", counting.clone())])),
        support::config(0),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    send(&world, &id, "c-old", "count", json!({}), EPOCH_MS - 1);
    send(&world, &id, "c-what", "frobnicate", json!({}), later());
    let r = results(&world, &id, "c-old", 1).await;
    assert_eq!(
        r[0],
        json!({"status": "failed", "output": {"reason": "expired"}})
    );
    assert!(
        world.on(&Topic::command_ack(&id, "c-old")).is_empty(),
        "no ack"
    );
    let r = results(&world, &id, "c-what", 1).await;
    assert_eq!(
        r[0],
        json!({"status": "failed", "output": {"reason": "unknown command frobnicate"}})
    );
    assert_eq!(counting.0.load(Ordering::SeqCst), 0);
    agent.stop().await
}

#[tokio::test(start_paused = true)]
async fn a_panicking_handler_fails_its_command_and_telemetry_keeps_flowing() -> anyhow::Result<()> {
    let world = World::new();
    let id = device("cmd-panic");
    let store = MemStore::new(100, 1)?;
    let agent = Agent::start(
        world.deps(&id, &store, handlers(vec![("boom", Arc::new(Panics))])),
        support::config(60),
    );
    let telemetry = Topic::telemetry(&id);
    tokio::time::sleep(Duration::from_secs(90)).await;
    let before = world.on(&telemetry).len();
    assert_eq!(before, 2);
    send(&world, &id, "c1", "boom", json!({}), later());
    let r = results(&world, &id, "c1", 1).await;
    assert_eq!(r[0]["status"], json!("failed"));
    assert!(
        r[0]["output"]["reason"]
            .as_str()
            .is_some_and(|s| s.contains("handler panicked: handler bug")),
        "{}",
        r[0]
    );
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(
        world.on(&telemetry).len(),
        before + 10,
        "telemetry kept flowing"
    );
    // And the executor still works.
    send(&world, &id, "c2", "ping", json!({}), later());
    assert_eq!(
        results(&world, &id, "c2", 1).await[0]["status"],
        json!("succeeded")
    );
    agent.stop().await
}

#[tokio::test(start_paused = true)]
async fn set_config_merges_into_the_local_config_and_diagnostics_reports() -> anyhow::Result<()> {
    let world = World::new();
    let id = device("cmd-config");
    let store = MemStore::new(100, 1)?;
    let agent = Agent::start(world.deps(&id, &store, Handlers::new()), support::config(0));
    tokio::time::sleep(Duration::from_secs(1)).await;
    send(
        &world,
        &id,
        "s1",
        "set_config",
        json!({"a": 1, "b": {"c": 2}}),
        later(),
    );
    results(&world, &id, "s1", 1).await;
    send(
        &world,
        &id,
        "s2",
        "set_config",
        json!({"a": null, "b": {"d": 3}}),
        later(),
    );
    let r = results(&world, &id, "s2", 1).await;
    let want = json!({"b": {"c": 2, "d": 3}});
    assert_eq!(r[0], json!({"status": "succeeded", "output": want}));
    assert_eq!(store.doc("config")?, Some(want));
    send(&world, &id, "s3", "set_config", json!([1]), later());
    assert_eq!(
        results(&world, &id, "s3", 1).await[0]["status"],
        json!("failed")
    );

    send(&world, &id, "d1", "diagnostics", json!({}), later());
    let d = &results(&world, &id, "d1", 1).await[0];
    assert_eq!(d["status"], json!("succeeded"));
    let out = &d["output"];
    assert_eq!(out["agent_version"], json!(env!("CARGO_PKG_VERSION")));
    assert!(out["uptime_secs"].as_u64().is_some());
    assert!(out["outbox_depth"].as_u64().is_some());
    assert_eq!(out["link"]["connects_total"], json!(1));
    assert!(out["errors"].is_array() && out["logs"].is_array());
    // reboot is refused unless configured.
    send(&world, &id, "r1", "reboot", json!({}), later());
    assert_eq!(
        results(&world, &id, "r1", 1).await[0],
        json!({"status": "failed", "output": {"reason": "reboot not configured"}})
    );
    agent.stop().await
}

/// Finishes when the test opens the gate.
#[derive(Default)]
struct Gated(tokio::sync::Notify);

#[async_trait::async_trait]
impl CommandHandler for Gated {
    async fn run(&self, _params: Value) -> Outcome {
        self.0.notified().await;
        Ok(json!("done"))
    }
}

#[tokio::test(start_paused = true)]
async fn a_result_produced_while_offline_is_delivered_after_reconnect() -> anyhow::Result<()> {
    let world = World::new();
    let id = device("cmd-offline");
    let store = MemStore::new(100, 1)?;
    let gate = Arc::new(Gated::default());
    let agent = Agent::start(
        world.deps(&id, &store, handlers(vec![("gated", gate.clone())])),
        support::config(0),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    send(&world, &id, "c1", "gated", json!({}), later());
    let ack = Topic::command_ack(&id, "c1");
    world.wait_for("the ack", |h| !h.on(&ack).is_empty()).await;
    // The link drops while the command runs; it finishes offline.
    world.connector.set_online(false);
    world.connector.cut();
    gate.0.notify_one();
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(world.on(&Topic::command_result(&id, "c1")).is_empty());
    assert_eq!(store.len(), 1, "the result waits in the outbox");
    world.connector.set_online(true);
    let r = results(&world, &id, "c1", 1).await;
    assert_eq!(r[0], json!({"status": "succeeded", "output": "done"}));
    agent.stop().await
}

#[tokio::test(start_paused = true)]
async fn shadow_delta_is_applied_and_reported_and_versions_are_reported_on_connect(
) -> anyhow::Result<()> {
    let world = World::new();
    let id = device("shadow-1");
    let store = MemStore::new(100, 1)?;
    // The retained delta is waiting before the device connects.
    let delta = ShadowDelta {
        version: 3,
        delta: json!({"led": {"on": true}, "mode": "eco"}),
    };
    world.publish(&Topic::shadow_delta(&id), &delta.to_bytes(), true);
    let mut config = support::config(0);
    config.firmware_version = Some("1.4.2".into());
    let agent = Agent::start(world.deps(&id, &store, Handlers::new()), config);
    let reported = Topic::shadow_reported(&id);
    world
        .wait_for("two reported updates", |h| h.on(&reported).len() >= 2)
        .await;
    let r = world.on(&reported);
    assert!(
        r.contains(&json!({"agent": {"version": env!("CARGO_PKG_VERSION"), "boots": 1, "unclean_stops": 0}, "version": "1.4.2"})),
        "{r:?}"
    );
    assert!(
        r.contains(&json!({"led": {"on": true}, "mode": "eco"})),
        "{r:?}"
    );
    assert_eq!(
        store.doc("desired")?,
        Some(json!({"led": {"on": true}, "mode": "eco"}))
    );
    // A later delta merges (null deletes).
    let delta = ShadowDelta {
        version: 4,
        delta: json!({"mode": null, "led": {"hz": 2}}),
    };
    world.publish(&Topic::shadow_delta(&id), &delta.to_bytes(), true);
    world
        .wait_for("the second delta reported", |h| h.on(&reported).len() >= 3)
        .await;
    assert_eq!(
        store.doc("desired")?,
        Some(json!({"led": {"on": true, "hz": 2}}))
    );
    agent.stop().await
}

/// User handlers are real processes: this test runs on the real clock (bounded by a 1 s
/// handler timeout).
#[tokio::test]
async fn user_handlers_run_as_processes_with_a_timeout() -> anyhow::Result<()> {
    let world = World::new();
    let id = device("cmd-exec");
    let store = MemStore::new(100, 1)?;
    let mut config = support::config(0);
    let sh = |script: &str, timeout_secs| ExecHandler {
        exec: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        timeout_secs,
    };
    config.handlers.insert(
        "echo".into(),
        sh(r#"read p; printf '{"echo": %s}' "$p""#, 10),
    );
    config.handlers.insert("slow".into(), sh("sleep 30", 1));
    config
        .handlers
        .insert("bad".into(), sh("echo 'disk on fire' >&2; exit 2", 10));
    let agent = Agent::start(world.deps(&id, &store, Handlers::new()), config);
    let now = EPOCH_MS + 10 * 365 * 86_400_000; // the real clock is far from EPOCH_MS
    world
        .wait_for("connected", |_| {
            world
                .broker
                .session_info("cmd-exec")
                .is_some_and(|s| s.subscriptions == 2)
        })
        .await;
    send(&world, &id, "e1", "echo", json!({"x": 1}), now);
    send(&world, &id, "e2", "slow", json!({}), now);
    send(&world, &id, "e3", "bad", json!({}), now);
    assert_eq!(
        results(&world, &id, "e1", 1).await[0],
        json!({"status": "succeeded", "output": {"echo": {"x": 1}}})
    );
    let slow = &results(&world, &id, "e2", 1).await[0];
    assert_eq!(slow["status"], json!("failed"));
    assert!(
        slow["output"]["reason"]
            .as_str()
            .is_some_and(|s| s.contains("timed out")),
        "{slow}"
    );
    let bad = &results(&world, &id, "e3", 1).await[0];
    assert_eq!(bad["status"], json!("failed"));
    assert_eq!(bad["output"]["stderr"], json!("disk on fire\n"));
    agent.stop().await
}

/// The reboot command is a real process: real clock.
#[tokio::test]
async fn reboot_answers_first_then_runs_the_configured_command() -> anyhow::Result<()> {
    let world = World::new();
    let id = device("cmd-reboot");
    let store = MemStore::new(100, 1)?;
    let dir = tempfile::tempdir()?;
    let marker = dir.path().join("rebooted");
    let mut config = support::config(0);
    // The "reboot" leaves a marker file.
    let probe = format!("echo done > {}", marker.display());
    config.reboot_command = Some(vec!["/bin/sh".into(), "-c".into(), probe]);
    let agent = Agent::start(world.deps(&id, &store, Handlers::new()), config);
    world
        .wait_for("subscribed", |_| {
            world
                .broker
                .session_info("cmd-reboot")
                .is_some_and(|s| s.subscriptions == 2)
        })
        .await;
    let now = EPOCH_MS + 10 * 365 * 86_400_000;
    send(&world, &id, "r1", "reboot", json!({}), now);
    let r = results(&world, &id, "r1", 1).await;
    assert_eq!(
        r[0],
        json!({"status": "succeeded", "output": {"rebooting": true}})
    );
    support::within("the reboot command", async {
        while !marker.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await; // polling a file, bounded
        }
    })
    .await;
    agent.stop().await
}
