//! The behavioural contract of every [`Bus`](crate::Bus), as async test cases plus
//! [`conformance_tests!`](crate::conformance_tests).
//!
//! Each case gets a fresh bus built with [`config`] and panics on a violation. An
//! implementation's test file runs them all with one line:
//!
//! ```ignore
//! async fn fresh_bus(config: mooring_bus::BusConfig) -> (std::sync::Arc<dyn mooring_bus::Bus>, Guard) { ... }
//! mooring_bus::conformance_tests!(fresh_bus);
//! ```
//!
//! The factory is anything callable with a [`BusConfig`] that returns a future of
//! `(Arc<dyn Bus>, guard)`; the guard (e.g. one that deletes a test's NATS streams) lives until
//! the case ends and must not hold the bus (one case drops it). The calling crate needs `tokio`
//! (with `macros` and `rt`) and `mooring-bus` with the `conformance` feature as dev-dependencies.
//!
//! The cases live in `broadcast.rs` (publish/subscribe, names, payload bound) and `queue.rs`
//! (work queues, shutdown); the helpers they share are here. No case sleeps to wait for
//! something: it waits for the event, bounded by [`WAIT`]. The only waits that run out on
//! purpose check that something does not happen within a few `ack_wait_ms`.

mod broadcast;
mod queue;

pub use broadcast::*;
pub use queue::*;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use crate::{BusConfig, Consumer, Delivery, Message, Subscription};

/// Expands to one `#[tokio::test]` per conformance case. See the [module docs](crate::conformance).
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::conformance_tests!(@cases $factory;
            broadcast_reaches_every_matching_subscriber,
            broadcast_wildcards_match_one_token_or_the_rest,
            slow_subscriber_drops_and_counts_while_a_fast_one_gets_everything,
            invalid_subjects_and_filters_are_refused,
            payload_over_the_maximum_is_refused,
            enqueued_messages_are_consumed_and_acked_per_queue,
            unacked_delivery_is_redelivered_after_ack_wait,
            unacked_delivery_goes_to_another_consumer_when_the_first_is_gone,
            consumers_of_one_queue_share_its_messages,
            full_queue_refuses_enqueue_until_a_message_is_acked,
            queues_beyond_queues_max_are_refused,
            invalid_queue_names_are_refused,
            dropped_subscriptions_and_consumers_leave_the_bus_working,
            dropping_the_bus_ends_subscriptions_and_consumers,
        );
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $case() {
            let (bus, _guard) = ($factory)($crate::conformance::config()).await;
            $crate::conformance::$case(bus).await;
        }
    )*};
}

/// The bounds every case's bus is built with (small, so bounds are reached quickly, and a short
/// ack wait, so redelivery tests take well under a second).
pub fn config() -> BusConfig {
    BusConfig {
        payload_bytes_max: 64 * 1024,
        subscription_buffer_len: 4,
        queue_len_max: 8,
        queues_max: 16,
        ack_wait_ms: 400,
    }
}

/// The longest a case waits for something that must happen (generous: CI runs other tests
/// beside these on two cores).
pub const WAIT: Duration = Duration::from_secs(10);

fn ack_wait() -> Duration {
    Duration::from_millis(config().ack_wait_ms)
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// The subscription's next message, which must come within [`WAIT`].
async fn recv(sub: &mut Subscription, what: &str) -> Message {
    match within(what, sub.next()).await {
        Some(m) => m,
        None => panic!("subscription ended waiting for {what}"),
    }
}

/// The consumer's next delivery, which must come within [`WAIT`].
async fn take(consumer: &mut Consumer, what: &str) -> Delivery {
    match within(what, consumer.next()).await {
        Ok(d) => d,
        Err(e) => panic!("consumer failed waiting for {what}: {e}"),
    }
}

/// Waits (polling, bounded by [`WAIT`]) until `cond` holds.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn text(payload: &Bytes) -> String {
    String::from_utf8_lossy(payload).into_owned()
}
