//! Work-queue cases: consume and ack, redelivery, sharing, bounds, names; and shutdown.

use std::sync::Arc;

use super::{ack_wait, b, config, recv, take, text, within};
use crate::{Bus, BusError};

pub async fn enqueued_messages_are_consumed_and_acked_per_queue(bus: Arc<dyn Bus>) {
    for i in 0..3 {
        bus.enqueue("jobs", b(&format!("j{i}")))
            .await
            .expect("enqueue");
    }
    bus.enqueue("other", b("o0")).await.expect("enqueue");
    let mut other = bus.consume("other").await.expect("consume other");
    let d = take(&mut other, "the other queue's message").await;
    assert_eq!(text(&d.payload), "o0", "queues do not mix");
    d.ack().await.expect("ack");

    let mut jobs = bus.consume("jobs").await.expect("consume jobs");
    for i in 0..3 {
        let d = take(&mut jobs, "a job").await;
        assert_eq!(text(&d.payload), format!("j{i}"), "in enqueue order");
        assert_eq!(d.delivered_count, 1);
        d.ack().await.expect("ack");
    }
    // Acknowledged messages are gone: nothing comes back after several ack waits.
    let again = tokio::time::timeout(ack_wait() * 3, jobs.next()).await;
    assert!(
        again.is_err(),
        "an acknowledged message came back: {again:?}"
    );
}

pub async fn unacked_delivery_is_redelivered_after_ack_wait(bus: Arc<dyn Bus>) {
    let mut consumer = bus.consume("retry").await.expect("consume");
    bus.enqueue("retry", b("m")).await.expect("enqueue");
    let first = take(&mut consumer, "the first delivery").await;
    assert_eq!(
        (text(&first.payload).as_str(), first.delivered_count),
        ("m", 1)
    );
    drop(first); // not acknowledged
    let second = take(&mut consumer, "the redelivery").await;
    assert_eq!(
        (text(&second.payload).as_str(), second.delivered_count),
        ("m", 2)
    );
    second.ack().await.expect("ack");
}

pub async fn unacked_delivery_goes_to_another_consumer_when_the_first_is_gone(bus: Arc<dyn Bus>) {
    let mut first = bus.consume("handoff").await.expect("consume");
    let mut second = bus.consume("handoff").await.expect("consume");
    bus.enqueue("handoff", b("m")).await.expect("enqueue");
    let d = take(&mut first, "the first delivery").await;
    assert_eq!(text(&d.payload), "m");
    drop(d);
    drop(first); // its node is gone
    let d = take(&mut second, "the delivery to the other consumer").await;
    assert_eq!((text(&d.payload).as_str(), d.delivered_count), ("m", 2));
    d.ack().await.expect("ack");
}

pub async fn consumers_of_one_queue_share_its_messages(bus: Arc<dyn Bus>) {
    let mut one = bus.consume("shared").await.expect("consume");
    let mut two = bus.consume("shared").await.expect("consume");
    bus.enqueue("shared", b("a")).await.expect("enqueue");
    bus.enqueue("shared", b("b")).await.expect("enqueue");
    // While `one` holds "a" unacknowledged, `two` gets the next message, not "a".
    let a = take(&mut one, "the first message").await;
    let bb = take(&mut two, "the second message").await;
    assert_eq!(
        (text(&a.payload), text(&bb.payload)),
        ("a".into(), "b".into())
    );
    a.ack().await.expect("ack");
    bb.ack().await.expect("ack");

    let sent: Vec<String> = (0..6).map(|i| format!("m{i}")).collect();
    for m in &sent {
        bus.enqueue("shared", b(m)).await.expect("enqueue");
    }
    let mut got = Vec::new();
    for i in 0..sent.len() {
        let consumer = if i % 2 == 0 { &mut one } else { &mut two };
        let d = take(consumer, "a shared message").await;
        assert_eq!(
            d.delivered_count, 1,
            "acknowledged promptly, never redelivered"
        );
        got.push(text(&d.payload));
        d.ack().await.expect("ack");
    }
    got.sort();
    assert_eq!(got, sent, "each message to exactly one consumer");
    let again = tokio::time::timeout(ack_wait() * 3, one.next()).await;
    assert!(again.is_err(), "a message came twice: {again:?}");
}

pub async fn full_queue_refuses_enqueue_until_a_message_is_acked(bus: Arc<dyn Bus>) {
    let len_max = config().queue_len_max;
    for i in 0..len_max {
        bus.enqueue("bounded", b(&i.to_string()))
            .await
            .expect("enqueue within the bound");
    }
    let full = BusError::Full {
        limit: "queue_len_max",
        max: len_max,
    };
    assert_eq!(bus.enqueue("bounded", b("over")).await, Err(full.clone()));
    // Delivered but unacknowledged still counts.
    let mut consumer = bus.consume("bounded").await.expect("consume");
    let d = take(&mut consumer, "the oldest message").await;
    assert_eq!(bus.enqueue("bounded", b("over")).await, Err(full));
    d.ack().await.expect("ack");
    bus.enqueue("bounded", b("room again"))
        .await
        .expect("enqueue after an ack");
}

pub async fn queues_beyond_queues_max_are_refused(bus: Arc<dyn Bus>) {
    let queues_max = config().queues_max;
    for i in 0..queues_max {
        bus.enqueue(&format!("q{i}"), b("x"))
            .await
            .expect("a queue within the bound");
    }
    let full = Err(BusError::Full {
        limit: "queues_max",
        max: queues_max,
    });
    assert_eq!(bus.enqueue("one-more", b("x")).await, full);
    assert_eq!(bus.consume("one-more").await.map(|_| ()), full);
    bus.enqueue("q0", b("y"))
        .await
        .expect("an existing queue still works");
}

pub async fn invalid_queue_names_are_refused(bus: Arc<dyn Bus>) {
    let long = "q".repeat(crate::names::QUEUE_NAME_BYTES_MAX + 1);
    for queue in ["", "a.b", "a b", "a*", ">", "é", long.as_str()] {
        let err = bus.enqueue(queue, b("x")).await.expect_err(queue);
        assert!(
            matches!(err, BusError::InvalidQueue { .. }),
            "{queue:?}: {err}"
        );
        let err = bus.consume(queue).await.expect_err(queue);
        assert!(
            matches!(err, BusError::InvalidQueue { .. }),
            "{queue:?}: {err}"
        );
    }
}

pub async fn dropped_subscriptions_and_consumers_leave_the_bus_working(bus: Arc<dyn Bus>) {
    drop(bus.subscribe("gone.>").await.expect("subscribe"));
    drop(bus.consume("work").await.expect("consume"));
    let mut live = bus.subscribe("gone.>").await.expect("subscribe");
    bus.publish("gone.x", b("still")).await.expect("publish");
    assert_eq!(text(&recv(&mut live, "the message").await.payload), "still");

    bus.enqueue("work", b("w")).await.expect("enqueue");
    let mut consumer = bus.consume("work").await.expect("consume");
    let d = take(&mut consumer, "the queued message").await;
    assert_eq!(text(&d.payload), "w");
    d.ack().await.expect("ack");
}

pub async fn dropping_the_bus_ends_subscriptions_and_consumers(bus: Arc<dyn Bus>) {
    let mut sub = bus.subscribe("bye.>").await.expect("subscribe");
    let mut consumer = bus.consume("bye").await.expect("consume");
    // A consumer waiting in `next` is woken by the drop, not left hanging.
    let waiting = tokio::spawn(async move { consumer.next().await.map(|d| d.payload) });
    drop(bus);
    assert_eq!(
        within("the subscription to end", sub.next()).await,
        None,
        "a subscription of a dropped bus ends"
    );
    let result = within("the consumer to end", waiting)
        .await
        .expect("consumer task");
    assert_eq!(result, Err(BusError::Closed));
}
