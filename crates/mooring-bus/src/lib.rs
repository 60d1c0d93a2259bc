//! # mooring-bus: what crosses nodes
//!
//! A Mooring cluster's nodes talk through one [`Bus`] (issue 13). It carries two kinds of
//! traffic:
//!
//! * **Broadcast**, best effort: [`Bus::publish`] a payload on a subject (dot-separated tokens,
//!   `presence.dev-1`); every [`Subscription`] whose filter matches gets it (NATS wildcards:
//!   `*` is one token, `>` the rest). For presence changes, session-takeover notices, cache
//!   invalidation: things a node that missed one can recover from.
//! * **Durable work queues**, at least once: [`Bus::enqueue`] returns once the message is
//!   stored; every [`Consumer`] of the queue (on any node) shares its messages, each goes to
//!   one of them as a [`Delivery`] to [`Delivery::ack`]; one not acknowledged within
//!   `ack_wait_ms` is delivered again, to whichever consumer asks next. For "deliver this
//!   command to the node holding the device".
//!
//! Every queue is bounded ([`BusConfig`]): a subscription's buffer (`subscription_buffer_len`;
//! when its reader falls behind, newer messages are dropped for it alone and counted in
//! [`Subscription::dropped`], never blocking the publisher or other subscribers), payloads
//! (`payload_bytes_max`, [`BusError::TooLarge`]), a work queue's length (`queue_len_max`,
//! [`BusError::Full`]) and the number of queues (`queues_max`). Subjects, filters and queue
//! names are checked ([`names`]) before anything is sent.
//!
//! ## Implementations
//!
//! * [`InProcessBus`]: one node. Tokio channels; a work queue lives in memory, durable only for
//!   the process's life, which is enough where the store holds the commands.
//! * [`NatsBus`]: a cluster. Core NATS subjects for broadcast, a JetStream stream per work
//!   queue with one shared durable pull consumer; every name under a configurable prefix.
//!
//! Both pass one behavioural suite, [`conformance`] (feature `conformance`, test code only),
//! expanded into tests by [`conformance_tests!`].
//!
//! Not used by the server yet.

mod bus;
mod error;
mod in_process;
pub mod names;
mod nats;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use bus::{Bus, BusConfig, Consumer, Delivery, Message, Subscription};
pub use error::BusError;
pub use in_process::InProcessBus;
pub use names::redact_url;
pub use nats::{NatsBus, NatsConfig};
