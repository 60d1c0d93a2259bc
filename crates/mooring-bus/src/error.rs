//! [`BusError`]: every way a bus call can fail.

/// A bus call's failure. Input errors (`InvalidSubject`, `InvalidQueue`, `TooLarge`) are the
/// caller's; `Full` is a bound; `Unavailable` is the transport (retry later); `Closed` means the
/// bus was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// A subject or filter that is empty, too long, has an empty token, a space or control
    /// character, or a wildcard where none is allowed.
    #[error("invalid subject {subject:?}: {reason}")]
    InvalidSubject {
        subject: String,
        reason: &'static str,
    },
    /// A queue name (or prefix) that is empty, too long or not `[A-Za-z0-9_-]`.
    #[error("invalid queue name {queue:?}: {reason}")]
    InvalidQueue { queue: String, reason: &'static str },
    /// A payload over the bus's `payload_bytes_max`.
    #[error("payload of {bytes} bytes is over the maximum of {max_bytes}")]
    TooLarge { bytes: usize, max_bytes: usize },
    /// A bound was reached (`limit` names the config field): the queue holds `queue_len_max`
    /// messages, or the bus already has `queues_max` queues.
    #[error("{limit} ({max}) reached")]
    Full { limit: &'static str, max: usize },
    /// A configuration the bus refuses (e.g. a payload maximum above the server's).
    #[error("invalid bus configuration: {0}")]
    InvalidConfig(String),
    /// The transport failed (NATS unreachable, timed out, refused); the call may be retried.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The bus was dropped (shut down).
    #[error("bus closed")]
    Closed,
}
