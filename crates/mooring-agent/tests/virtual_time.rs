//! The real agent over in-memory streams against the real broker on a paused tokio clock:
//! an hour of traffic in milliseconds of wall time, keep-alive included, no sleeps.

mod support;

use mooring_agent::{AgentStore as _, MemStore, MetricsSource};
use mooring_proto::Topic;
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::{device, Agent, World, EPOCH_MS};

struct FakeMetrics(u64);

impl MetricsSource for FakeMetrics {
    fn sample(&mut self) -> Map<String, Value> {
        self.0 += 1;
        let mut m = Map::new();
        m.insert("n".into(), json!(self.0));
        m
    }
}

#[tokio::test(start_paused = true)]
async fn an_hour_of_60s_metrics_is_60_messages_on_virtual_time() -> anyhow::Result<()> {
    let world = World::new();
    let id = device("vt-1");
    let store = MemStore::new(1000, 1)?;
    let mut deps = world.deps(&id, &store, Default::default());
    deps.metrics = Box::new(FakeMetrics(0));
    let diag = deps.diagnostics.clone();
    let agent = Agent::start(deps, support::config(60));

    // Samples at 0 s, 60 s, ..., 3540 s: 60 of them before the hour is over.
    tokio::time::sleep(Duration::from_millis(3_600_000 - 500)).await;
    let msgs = world.on(&Topic::telemetry(&id));
    assert_eq!(msgs.len(), 60, "{msgs:?}");
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m["n"], json!(i + 1), "{m}");
        assert_eq!(
            m["ts"],
            json!(EPOCH_MS + 60_000 * i as u64),
            "ts from the injected clock"
        );
    }
    let seqs: Vec<u64> = msgs.iter().filter_map(|m| m["seq"].as_u64()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "increasing seqs: {seqs:?}"
    );
    // Everything acknowledged: the outbox is empty.
    assert_eq!(store.len(), 0);
    // One connection for the whole hour: keep-alive (PINGREQ every 30 s) ran on virtual time.
    assert_eq!(diag.link.connects_total.load(Ordering::Relaxed), 1);
    assert_eq!(diag.link.reconnects_total.load(Ordering::Relaxed), 0);
    assert_ne!(
        diag.link.last_rtt_ms.load(Ordering::Relaxed),
        u64::MAX,
        "a PINGRESP was timed"
    );
    agent.stop().await
}

#[tokio::test(start_paused = true)]
async fn telemetry_buffers_through_an_outage_and_drains_in_order() -> anyhow::Result<()> {
    let world = World::new();
    let id = device("vt-2");
    let store = MemStore::new(1000, 1)?;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut deps = world.deps(&id, &store, Default::default());
    deps.input = Some(rx);
    let diag = deps.diagnostics.clone();
    let agent = Agent::start(deps, support::config(0));
    let line = |i: u64| match json!({"line": i}) {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    for i in 0..5 {
        tx.send(line(i)).await?;
    }
    let topic = Topic::telemetry(&id);
    world.wait_for("5 lines", |h| h.on(&topic).len() == 5).await;

    // Outage: the link is cut and the server refuses connections for 10 virtual minutes.
    world.connector.set_online(false);
    world.connector.cut();
    for i in 5..10 {
        tx.send(line(i)).await?;
    }
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(
        world.on(&topic).len(),
        5,
        "nothing gets through while offline"
    );
    assert_eq!(store.len(), 5, "the backlog is held in the outbox");
    assert!(
        diag.link.reconnects_total.load(Ordering::Relaxed) > 1,
        "backoff retries"
    );

    world.connector.set_online(true);
    world
        .wait_for("the backlog", |h| h.on(&topic).len() >= 10)
        .await;
    let lines: Vec<u64> = world
        .on(&topic)
        .iter()
        .filter_map(|m| m["line"].as_u64())
        .collect();
    assert_eq!(lines, (0..10).collect::<Vec<_>>());
    drop(tx);
    agent.stop().await
}

#[tokio::test(start_paused = true)]
async fn same_seed_same_reconnect_schedule() -> anyhow::Result<()> {
    // Two runs of an agent that can never connect, same seed: same number of attempts in the
    // same virtual time.
    async fn attempts(seed: u64) -> anyhow::Result<u64> {
        let world = World::new();
        world.connector.set_online(false);
        let store = MemStore::new(10, 1)?;
        let mut deps = world.deps(&device("vt-3"), &store, Default::default());
        deps.rng_seed = seed;
        let diag = deps.diagnostics.clone();
        let agent = Agent::start(deps, support::config(0));
        tokio::time::sleep(Duration::from_secs(300)).await;
        let n = diag.link.reconnects_total.load(Ordering::Relaxed);
        agent.stop().await?;
        Ok(n)
    }
    let a = attempts(1).await?;
    assert_eq!(a, attempts(1).await?);
    assert!(a > 5, "{a} attempts in 5 minutes");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_part_that_keeps_failing_escalates_and_run_with_returns_an_error() -> anyhow::Result<()> {
    let world = World::new();
    let id = device("vt-flash");
    // A flash that fails every write: the input part fails on each line it tries to commit.
    let store = MemStore::new(100, 1)?.with_faults(mooring_agent::store::Faults {
        write_fail_rate: 1.0,
        unsynced_ops: 0,
        seed: 1,
    });
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut deps = world.deps(&id, &store, Default::default());
    deps.input = Some(rx);
    let diag = deps.diagnostics.clone();
    let agent = Agent::start(deps, support::config(0));
    for i in 0..=mooring_agent::RESTARTS_MAX {
        // A closed channel means the agent already gave up.
        if tx
            .send(Map::from_iter([("line".to_owned(), json!(i))]))
            .await
            .is_err()
        {
            break;
        }
    }
    let err = agent.wait().await.expect_err("escalated");
    assert!(err.to_string().contains("giving up"), "{err:#}");
    assert!(
        err.to_string().contains("injected write failure"),
        "{err:#}"
    );
    assert!(diag
        .errors
        .snapshot()
        .iter()
        .any(|e| e.contains("input failed")));
    assert!(store.writes_failed_total() > u64::from(mooring_agent::RESTARTS_MAX));
    Ok(())
}
