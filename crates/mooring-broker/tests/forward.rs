//! Messages carried between two brokers the way a cluster's nodes carry them: what one
//! broker accepted reaches the other's subscribers and retained table through
//! `Hooks::on_routed` → `Broker::route_forwarded`, once, and never bounces back.

mod support;

use mooring_broker::test_support::AllowAll;
use mooring_broker::{
    Authenticated, Broker, BrokerConfig, ConnectRefusal, ConnectRequest, Hooks, Message,
    PublishVerdict,
};
use mooring_proto::policy::Principal;
use std::sync::Arc;
use support::*;
use tokio::sync::mpsc;

/// Allows everything, like [`AllowAll`], and hands every routed message to a channel.
struct Forwarding {
    inner: AllowAll,
    out: mpsc::UnboundedSender<Vec<u8>>,
}

#[async_trait::async_trait]
impl Hooks for Forwarding {
    async fn authenticate(&self, req: ConnectRequest<'_>) -> Result<Authenticated, ConnectRefusal> {
        self.inner.authenticate(req).await
    }
    fn may_publish(&self, p: &Principal, topic: &str) -> bool {
        self.inner.may_publish(p, topic)
    }
    fn may_subscribe(&self, p: &Principal, filter: &str) -> bool {
        self.inner.may_subscribe(p, filter)
    }
    async fn on_publish(&self, p: &Principal, client_id: &str, msg: &Message) -> PublishVerdict {
        self.inner.on_publish(p, client_id, msg).await
    }
    fn on_connected(&self, client_id: &str, p: &Principal) {
        self.inner.on_connected(client_id, p)
    }
    fn on_disconnected(&self, client_id: &str, p: &Principal) {
        self.inner.on_disconnected(client_id, p)
    }
    fn forwards(&self) -> bool {
        true
    }
    fn on_routed(&self, forwarded: Vec<u8>) {
        let _ = self.out.send(forwarded);
    }
}

/// Two brokers, each forwarding what it accepts to the other.
fn pair() -> (Broker, Broker) {
    let (to_b, mut from_a) = mpsc::unbounded_channel();
    let (to_a, mut from_b) = mpsc::unbounded_channel();
    let a = Broker::new(
        BrokerConfig::default(),
        Arc::new(Forwarding {
            inner: AllowAll::new(),
            out: to_b,
        }),
    );
    let b = Broker::new(
        BrokerConfig::default(),
        Arc::new(Forwarding {
            inner: AllowAll::new(),
            out: to_a,
        }),
    );
    let (a2, b2) = (a.clone(), b.clone());
    tokio::spawn(async move {
        while let Some(m) = from_a.recv().await {
            assert!(b2.route_forwarded(&m), "b decodes what a forwarded");
        }
    });
    tokio::spawn(async move {
        while let Some(m) = from_b.recv().await {
            assert!(a2.route_forwarded(&m), "a decodes what b forwarded");
        }
    });
    (a, b)
}

#[tokio::test]
async fn a_publish_on_one_broker_reaches_the_others_subscribers_once() {
    let (a, b) = pair();
    let mut sub_b = RawClient::open(&b, true);
    sub_b.connect("sub-b").await;
    sub_b.subscribe("t/#", 1).await;
    let mut sub_a = RawClient::open(&a, false);
    sub_a.connect("sub-a").await;
    sub_a.subscribe("t/#", 1).await;

    let mut publisher = RawClient::open(&a, true);
    publisher.connect("pub").await;
    publisher.publish("t/1", "from a", 1, false).await;
    for sub in [&mut sub_a, &mut sub_b] {
        let p = sub.next_publish().await;
        assert_eq!((p.0.as_str(), p.1.as_str(), p.2), ("t/1", "from a", 1));
    }
    // A server-originated message on b reaches a's subscriber; nothing bounces back to b
    // (the marker on b arrives next, not a second copy).
    b.publish(Message::new("t/2", "from b", 1, false));
    let p = sub_a.next_publish().await;
    assert_eq!((p.0.as_str(), p.1.as_str()), ("t/2", "from b"));
    let p = sub_b.next_publish().await;
    assert_eq!((p.0.as_str(), p.1.as_str()), ("t/2", "from b"));
    b.publish(Message::new("t/marker", "m", 0, false));
    let p = sub_b.next_publish().await;
    assert_eq!(p.0, "t/marker", "exactly one copy of t/2 on b");
    assert_eq!(b.stats().messages_in, 3, "t/1 from a, t/2 and the marker");
}

#[tokio::test]
async fn retained_messages_and_their_removal_reach_the_other_broker() {
    let (a, b) = pair();
    let mut publisher = RawClient::open(&a, true);
    publisher.connect("pub").await;
    publisher.publish("r/1", "kept", 1, true).await;
    wait_for("retained on b", || b.stats().retained == 1).await;
    let mut late = RawClient::open(&b, true);
    late.connect("late").await;
    late.subscribe("r/#", 1).await;
    let p = late.next_publish().await;
    assert_eq!((p.0.as_str(), p.1.as_str(), p.3), ("r/1", "kept", true));
    // An empty retained publish clears it on both.
    publisher.publish("r/1", "", 1, true).await;
    wait_for("cleared on b", || b.stats().retained == 0).await;
    assert_eq!(a.stats().retained, 0);
}

#[tokio::test]
async fn foreign_bytes_are_refused_without_routing() {
    let (a, _b) = pair();
    assert!(!a.route_forwarded(b""));
    assert!(!a.route_forwarded(b"\x09garbage"));
    assert!(!a.route_forwarded(&[1, 0, 0, 0, 0, 9]));
    assert_eq!(a.stats().messages_in, 0);
}
