//! Broadcast cases: fan-out, wildcards, slow subscribers, name and payload checks.

use std::sync::Arc;

use super::{b, config, recv, text, wait_until};
use crate::{Bus, BusError};

pub async fn broadcast_reaches_every_matching_subscriber(bus: Arc<dyn Bus>) {
    let mut one = bus.subscribe("fleet.presence").await.expect("subscribe");
    let mut two = bus.subscribe("fleet.presence").await.expect("subscribe");
    for i in 0..3 {
        bus.publish("fleet.presence", b(&format!("p{i}")))
            .await
            .expect("publish");
    }
    for sub in [&mut one, &mut two] {
        for i in 0..3 {
            let m = recv(sub, "a fanned-out message").await;
            assert_eq!(m.subject, "fleet.presence");
            assert_eq!(text(&m.payload), format!("p{i}"), "in publish order");
        }
    }
    assert_eq!((one.dropped(), two.dropped()), (0, 0));
}

pub async fn broadcast_wildcards_match_one_token_or_the_rest(bus: Arc<dyn Bus>) {
    let mut star = bus.subscribe("a.*.c").await.expect("subscribe a.*.c");
    let mut rest = bus.subscribe("a.>").await.expect("subscribe a.>");
    let mut exact = bus.subscribe("x.y").await.expect("subscribe x.y");
    for subject in ["a.b.c", "a.b", "a.b.c.d", "a", "x.y.z", "b.b.c", "x"] {
        bus.publish(subject, b(subject)).await.expect("publish");
    }
    // Last, one message each subscription matches: whatever it got before that is all it gets
    // (messages of one publisher arrive in order).
    bus.publish("a.end.c", b("a.end.c")).await.expect("publish");
    bus.publish("x.y", b("x.y")).await.expect("publish");
    let cases = [
        (&mut star, vec!["a.b.c", "a.end.c"]),
        (&mut rest, vec!["a.b.c", "a.b", "a.b.c.d", "a.end.c"]),
        (&mut exact, vec!["x.y"]),
    ];
    for (sub, want) in cases {
        for subject in want {
            let m = recv(sub, subject).await;
            assert_eq!(m.subject, subject);
            assert_eq!(text(&m.payload), subject);
        }
        assert!(sub.try_next().is_none(), "nothing after the last match");
    }
}

pub async fn slow_subscriber_drops_and_counts_while_a_fast_one_gets_everything(bus: Arc<dyn Bus>) {
    let buffer_len = config().subscription_buffer_len;
    let total = buffer_len * 5;
    let mut slow = bus.subscribe("load.>").await.expect("subscribe slow");
    let mut fast = bus.subscribe("load.>").await.expect("subscribe fast");
    for i in 0..total {
        // Never blocks, however full the slow subscriber's buffer is.
        bus.publish(&format!("load.{i}"), b(&i.to_string()))
            .await
            .expect("publish");
        let m = recv(&mut fast, "the fast subscriber's copy").await;
        assert_eq!(text(&m.payload), i.to_string());
    }
    let want_dropped = (total - buffer_len) as u64;
    wait_until("the slow subscriber's drops to be counted", || {
        slow.dropped() >= want_dropped
    })
    .await;
    assert_eq!(slow.dropped(), want_dropped);
    assert_eq!(fast.dropped(), 0);
    // It kept the oldest messages; the newer ones were dropped.
    for i in 0..buffer_len {
        let m = slow.try_next().expect("a buffered message");
        assert_eq!(text(&m.payload), i.to_string());
    }
    assert!(slow.try_next().is_none());
}

pub async fn invalid_subjects_and_filters_are_refused(bus: Arc<dyn Bus>) {
    let long = "a".repeat(crate::names::SUBJECT_BYTES_MAX + 1);
    for subject in [
        "",
        "a..b",
        ".a",
        "a.",
        "a b",
        "a.*",
        "a.>",
        "a*b",
        long.as_str(),
    ] {
        let err = bus.publish(subject, b("x")).await.expect_err(subject);
        assert!(
            matches!(err, BusError::InvalidSubject { .. }),
            "{subject:?}: {err}"
        );
    }
    for filter in ["", "a..b", "a b", "a.>.b", "a.b*", long.as_str()] {
        let err = bus.subscribe(filter).await.expect_err(filter);
        assert!(
            matches!(err, BusError::InvalidSubject { .. }),
            "{filter:?}: {err}"
        );
    }
}

pub async fn payload_over_the_maximum_is_refused(bus: Arc<dyn Bus>) {
    let max = config().payload_bytes_max;
    let too_large = bytes::Bytes::from(vec![7u8; max + 1]);
    let at_max = bytes::Bytes::from(vec![7u8; max]);
    let want = BusError::TooLarge {
        bytes: max + 1,
        max_bytes: max,
    };
    assert_eq!(
        bus.publish("big", too_large.clone()).await,
        Err(want.clone())
    );
    assert_eq!(bus.enqueue("big", too_large).await, Err(want));

    let mut sub = bus.subscribe("big").await.expect("subscribe");
    bus.publish("big", at_max.clone())
        .await
        .expect("publish at the maximum");
    assert_eq!(recv(&mut sub, "the largest message").await.payload, at_max);
    bus.enqueue("big", at_max.clone())
        .await
        .expect("enqueue at the maximum");
    let mut consumer = bus.consume("big").await.expect("consume");
    let d = super::take(&mut consumer, "the largest queued message").await;
    assert_eq!(d.payload, at_max);
    d.ack().await.expect("ack");
}
