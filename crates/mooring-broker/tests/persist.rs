//! Durable state (`persist.rs`) against an in-memory `Persistence` that can fail, hold its
//! writes, and be "restarted" from what it holds (as after kill -9).

mod support;

use mooring_broker::{Broker, BrokerConfig, Restored};
use support::mem_persist::MemPersist;
use support::raw3::Raw3;
use support::*;

fn cfg() -> BrokerConfig {
    BrokerConfig {
        session_expiry_secs_max: 3600,
        ..BrokerConfig::default()
    }
}

/// A broker on `p`, restored from `state` (a restart).
fn start(p: &MemPersist, state: Restored) -> (Broker, mooring_broker::RestoreStats) {
    let hooks = std::sync::Arc::new(TestHooks::default());
    let broker = Broker::with_persistence(cfg(), hooks, std::sync::Arc::new(p.clone()));
    let stats = broker.restore(state);
    (broker, stats)
}

#[tokio::test]
async fn a_restored_session_keeps_its_subscriptions_and_deadline_over_a_second_restart() {
    let p = MemPersist::new(1_000_000);
    let (broker, _) = start(&p, Restored::default());
    let (mut c, present) = Raw3::connect(&broker, "keeper", false).await;
    assert!(!present);
    c.subscribe("keep/#", 1).await;
    c.disconnect().await;
    wait_for("keeper offline", || {
        broker.session_info("keeper").is_some_and(|i| !i.connected)
    })
    .await;
    // Offline at t = 1000 s with expiry 3600 s: gone at 4600 s, whatever restarts happen.
    drop(broker);

    p.set_now(2_000_000);
    let (broker, stats) = start(&p, p.snapshot());
    assert_eq!(stats.sessions, 1);
    assert_eq!(
        broker.session_info("keeper").map(|i| i.subscriptions),
        Some(1)
    );
    drop(broker);

    // A second restart, before the deadline: the subscription is still there.
    p.set_now(3_000_000);
    let (broker, stats) = start(&p, p.snapshot());
    assert_eq!(stats.sessions, 1);
    assert_eq!(
        broker.session_info("keeper").map(|i| i.subscriptions),
        Some(1),
        "the value stored at the first restore lost the subscriptions"
    );
    drop(broker);

    // After the original deadline: expired, although two restarts happened meanwhile.
    p.set_now(4_700_000);
    let (broker, stats) = start(&p, p.snapshot());
    assert_eq!(
        (stats.sessions, stats.sessions_expired),
        (0, 1),
        "a restart must not move the deadline of an offline session"
    );
    assert!(broker.session_info("keeper").is_none());
}
