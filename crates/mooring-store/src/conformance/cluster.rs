//! Conformance cases for [`ClusterStore`](crate::ClusterStore): leases, session holders with
//! node liveness, values created once.

use super::*;
use crate::{ClusterStore, SessionOp};

fn open(device: &str, node: &str, since_ms: u64) -> SessionOp {
    SessionOp::Open {
        device_id: device.to_owned(),
        node_id: node.to_owned(),
        since_ms,
    }
}

fn close(device: &str, node: &str) -> SessionOp {
    SessionOp::Close {
        device_id: device.to_owned(),
        node_id: node.to_owned(),
    }
}

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

pub async fn cluster_lease_is_exclusive_until_it_expires_or_is_released<
    S: ClusterStore + ?Sized,
>(
    store: &S,
) {
    assert!(store
        .acquire_lease("scheduler", "a", 1_000, 500)
        .await
        .expect("a takes"));
    assert!(!store
        .acquire_lease("scheduler", "b", 1_200, 500)
        .await
        .expect("b refused"));
    // The holder renews (extends) it.
    assert!(store
        .acquire_lease("scheduler", "a", 1_400, 500)
        .await
        .expect("a renews"));
    assert!(!store
        .acquire_lease("scheduler", "b", 1_800, 500)
        .await
        .expect("still a's"));
    // Another lease is independent.
    assert!(store
        .acquire_lease("retention", "b", 1_800, 500)
        .await
        .expect("b other"));
    // Expired (deadline 1_900 <= now): b takes it over; a no longer holds it.
    assert!(store
        .acquire_lease("scheduler", "b", 1_900, 500)
        .await
        .expect("b after expiry"));
    assert!(!store
        .acquire_lease("scheduler", "a", 1_950, 500)
        .await
        .expect("a lost it"));
    // Release by a non-holder does nothing; by the holder frees it at once.
    store
        .release_lease("scheduler", "a")
        .await
        .expect("release by non-holder");
    assert!(!store
        .acquire_lease("scheduler", "a", 2_000, 500)
        .await
        .expect("still b's"));
    store
        .release_lease("scheduler", "b")
        .await
        .expect("release");
    assert!(store
        .acquire_lease("scheduler", "a", 2_000, 500)
        .await
        .expect("free again"));
}

pub async fn cluster_lease_race_has_one_winner<S: ClusterStore + ?Sized>(store: &S) {
    let (a, b, c, d) = tokio::join!(
        store.acquire_lease("tick", "a", 5_000, 1_000),
        store.acquire_lease("tick", "b", 5_000, 1_000),
        store.acquire_lease("tick", "c", 5_000, 1_000),
        store.acquire_lease("tick", "d", 5_000, 1_000),
    );
    let won = [a, b, c, d]
        .into_iter()
        .map(|r| r.expect("acquire"))
        .filter(|w| *w)
        .count();
    assert_eq!(won, 1, "exactly one of four racing nodes gets a free lease");
}

pub async fn cluster_sessions_follow_open_close_and_node_liveness<
    S: DeviceStore + ClusterStore + ?Sized,
>(
    store: &S,
) {
    for d in ["d1", "d2", "d3"] {
        store.create_device(new_device(d)).await.expect("create");
    }
    store.heartbeat("a", 10_000).await.expect("hb a");
    store.heartbeat("b", 10_000).await.expect("hb b");
    // An older heartbeat never moves a node's back.
    store.heartbeat("a", 9_000).await.expect("hb a old");
    assert_eq!(
        store.live_nodes(10_000).await.expect("live"),
        vec![("a".to_owned(), 10_000), ("b".to_owned(), 10_000)]
    );
    store
        .apply_session_ops(vec![
            open("d1", "a", 10_000),
            open("d2", "a", 10_000),
            open("nobody", "a", 10_000),
        ])
        .await
        .expect("open");
    // d1 moves to b; a's late close of its old session does not remove b's, nor does a's
    // older open arriving after b's.
    store
        .apply_session_ops(vec![open("d1", "b", 10_100), close("d1", "a")])
        .await
        .expect("move");
    store
        .apply_session_ops(vec![open("d1", "a", 10_000), close("d1", "a")])
        .await
        .expect("late open");
    let held = store
        .session_nodes(&ids(&["d1", "d2", "d3", "nobody"]), 9_500)
        .await
        .expect("lookup");
    let want: BTreeMap<String, String> = [("d1", "b"), ("d2", "a")]
        .into_iter()
        .map(|(d, n)| (d.to_owned(), n.to_owned()))
        .collect();
    assert_eq!(held, want);
    assert_eq!(store.count_sessions(9_500).await.expect("count"), 2);

    // b stops heartbeating: its devices are offline for anyone asking after its lease.
    store.heartbeat("a", 20_000).await.expect("hb a later");
    let held = store
        .session_nodes(&ids(&["d1", "d2"]), 15_000)
        .await
        .expect("lookup later");
    assert_eq!(held.len(), 1);
    assert_eq!(held.get("d2").map(String::as_str), Some("a"));
    assert_eq!(store.count_sessions(15_000).await.expect("count later"), 1);
    let reaped = store.reap_dead_sessions(15_000, 100).await.expect("reap");
    assert_eq!(reaped, ids(&["d1"]));
    assert_eq!(
        store.live_nodes(0).await.expect("nodes").len(),
        1,
        "a dead node without sessions is forgotten"
    );
    assert!(store
        .reap_dead_sessions(15_000, 100)
        .await
        .expect("reap again")
        .is_empty());

    // Closing by the holder removes it; a node restarting clears what it held.
    store
        .apply_session_ops(vec![close("d2", "a")])
        .await
        .expect("close");
    assert_eq!(store.count_sessions(0).await.expect("count"), 0);
    store
        .apply_session_ops(vec![open("d2", "a", 20_000), open("d3", "a", 20_000)])
        .await
        .expect("reopen");
    assert_eq!(store.clear_node_sessions("a").await.expect("clear"), 2);
    assert_eq!(store.count_sessions(0).await.expect("count"), 0);

    // A session row goes with its device.
    store
        .apply_session_ops(vec![open("d3", "a", 21_000)])
        .await
        .expect("open d3");
    assert!(store.delete_device("d3").await.expect("delete"));
    assert_eq!(store.count_sessions(0).await.expect("count"), 0);

    // Lookups are bounded.
    let too_many: Vec<String> = (0..=crate::SESSION_LOOKUP_LEN_MAX)
        .map(|i| format!("d{i}"))
        .collect();
    assert!(matches!(
        store.session_nodes(&too_many, 0).await,
        Err(StoreError::InvalidInput(_))
    ));
}

pub async fn cluster_value_is_created_once<S: ClusterStore + ?Sized>(store: &S) {
    assert_eq!(store.get_value("pki").await.expect("get"), None);
    let (a, b, c) = tokio::join!(
        store.put_value_once("pki", b"from a".to_vec()),
        store.put_value_once("pki", b"from b".to_vec()),
        store.put_value_once("pki", b"from c".to_vec()),
    );
    let (a, b, c) = (a.expect("a"), b.expect("b"), c.expect("c"));
    assert_eq!(a, b, "every racer gets the one stored value");
    assert_eq!(b, c);
    assert_eq!(store.get_value("pki").await.expect("get"), Some(a.clone()));
    // Never replaced.
    assert_eq!(
        store
            .put_value_once("pki", b"later".to_vec())
            .await
            .expect("again"),
        a
    );
}

pub async fn cluster_value_is_replaced_only_from_what_it_is<S: ClusterStore + ?Sized>(store: &S) {
    assert!(
        !store
            .replace_value("cas", b"v1", b"v2".to_vec())
            .await
            .expect("absent"),
        "nothing to replace"
    );
    assert_eq!(store.get_value("cas").await.expect("get"), None);
    store
        .put_value_once("cas", b"v1".to_vec())
        .await
        .expect("put");
    let (a, b) = tokio::join!(
        store.replace_value("cas", b"v1", b"from a".to_vec()),
        store.replace_value("cas", b"v1", b"from b".to_vec()),
    );
    let (a, b) = (a.expect("a"), b.expect("b"));
    assert!(a ^ b, "exactly one racer replaces v1");
    let now = store.get_value("cas").await.expect("get").expect("stored");
    assert_eq!(
        now,
        if a {
            b"from a".to_vec()
        } else {
            b"from b".to_vec()
        }
    );
    assert!(!store
        .replace_value("cas", b"v1", b"stale".to_vec())
        .await
        .expect("stale"));
    assert_eq!(store.get_value("cas").await.expect("get"), Some(now));
}
