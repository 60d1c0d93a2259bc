//! What the broker counts: refusal reasons, its counters and the [`BrokerStats`] snapshot.

use super::{lock, read, Broker};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why the broker refused or removed something; each reason has its own counter
/// ([`BrokerStats::refusals`]) so operators see which bound or check was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// CONNECT refused by the embedder's authentication.
    Authentication,
    /// CONNECT refused by the embedder: a client id this principal may not use.
    ClientIdInvalid,
    /// CONNECT under a client id whose session belongs to another principal.
    ClientIdInUse,
    /// CONNECT refused: the principal holds `persistent_sessions_per_principal_max` persistent sessions.
    SessionQuota,
    /// CONNECT refused: `sessions_max` non-device sessions exist.
    SessionsFull,
    /// PUBLISH refused by the topic policy (or a will at CONNECT).
    PublishDenied,
    /// Subscription filter refused by the topic policy.
    SubscribeDenied,
    /// A held subscription removed because the policy no longer allows it (tags, policy reload,
    /// a session resumed by a principal that may not hold it).
    SubscriptionRevoked,
    /// Topic name or filter over `topic_bytes_max` / `topic_levels_max`.
    TopicTooLong,
    /// Retained message over a retained quota (per principal or broker-wide).
    RetainedQuota,
    /// Subscription over `subscriptions_per_session_max`.
    SubscriptionQuota,
    /// Message dropped: session queue full (count or bytes), QoS 0 first.
    QueueFull,
    /// Connection closed: its socket accepted no bytes for `write_stall_timeout_ms`.
    WriteStalled,
    /// Connection closed: nothing received within the keep-alive (or the server's idle cap).
    KeepaliveTimeout,
    /// Connection closed: a packet that must carry a packet id carried 0.
    MalformedPacket,
}

impl Refusal {
    pub const ALL: [Refusal; 15] = [
        Refusal::Authentication,
        Refusal::ClientIdInvalid,
        Refusal::ClientIdInUse,
        Refusal::SessionQuota,
        Refusal::SessionsFull,
        Refusal::PublishDenied,
        Refusal::SubscribeDenied,
        Refusal::SubscriptionRevoked,
        Refusal::TopicTooLong,
        Refusal::RetainedQuota,
        Refusal::SubscriptionQuota,
        Refusal::QueueFull,
        Refusal::WriteStalled,
        Refusal::KeepaliveTimeout,
        Refusal::MalformedPacket,
    ];

    /// The `reason` label in `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Authentication => "authentication",
            Refusal::ClientIdInvalid => "client_id_invalid",
            Refusal::ClientIdInUse => "client_id_in_use",
            Refusal::SessionQuota => "session_quota",
            Refusal::SessionsFull => "sessions_full",
            Refusal::PublishDenied => "publish_denied",
            Refusal::SubscribeDenied => "subscribe_denied",
            Refusal::SubscriptionRevoked => "subscription_revoked",
            Refusal::TopicTooLong => "topic_too_long",
            Refusal::RetainedQuota => "retained_quota",
            Refusal::SubscriptionQuota => "subscription_quota",
            Refusal::QueueFull => "queue_full",
            Refusal::WriteStalled => "write_stalled",
            Refusal::KeepaliveTimeout => "keepalive_timeout",
            Refusal::MalformedPacket => "malformed_packet",
        }
    }
}

/// Counters since start (monotonic) and gauges (current).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerStats {
    /// Live network connections (gauge).
    pub connections: u64,
    /// Sessions, live or persisted (gauge).
    pub sessions: u64,
    /// Subscriptions held by all sessions, shared ones included (gauge).
    pub subscriptions: u64,
    /// Shared subscription groups (gauge).
    pub shared_groups: u64,
    /// Messages moved from a shared subscription member that left to another member.
    pub shared_redelivered: u64,
    pub retained: u64,
    /// Topic + payload bytes of the retained messages clients published (gauge).
    pub retained_bytes: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    /// PUBLISH / SUBSCRIBE / CONNECT refused by policy or authentication.
    pub denied: u64,
    /// Messages dropped: full session queue, expired, too large for the client, retained table full.
    pub dropped: u64,
    /// Connection tasks that panicked (contained).
    pub panics: u64,
    /// Every refusal by reason, in [`Refusal::ALL`] order.
    pub refusals: Vec<(Refusal, u64)>,
}

impl BrokerStats {
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refusals
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }
}

/// See [`Broker::session_info`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionInfo {
    pub connected: bool,
    pub subscriptions: usize,
    pub queued: usize,
    pub inflight: usize,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) connections: AtomicU64,
    pub(crate) messages_in: AtomicU64,
    pub(crate) messages_out: AtomicU64,
    pub(crate) denied: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) panics: AtomicU64,
    pub(crate) shared_redelivered: AtomicU64,
    refusals: [AtomicU64; Refusal::ALL.len()],
}

impl Counters {
    pub(crate) fn refuse(&self, reason: Refusal) {
        // `Refusal::ALL` lists the variants in declaration order (unit-tested).
        self.refusals[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A CONNECT, PUBLISH or SUBSCRIBE refused: counted in `denied` and under its reason.
    pub(crate) fn deny(&self, reason: Refusal) {
        self.denied.fetch_add(1, Ordering::Relaxed);
        self.refuse(reason);
    }
}

impl Broker {
    pub fn stats(&self) -> BrokerStats {
        let sessions = lock(&self.shared.sessions).len() as u64;
        let subscriptions = read(&self.shared.subs).len() as u64;
        let (shared_groups, shared_members) = {
            let g = read(&self.shared.groups);
            (g.len() as u64, g.members() as u64)
        };
        let (retained, retained_bytes) = {
            let r = lock(&self.shared.retained);
            (r.len() as u64, r.client_bytes() as u64)
        };
        let c = &self.shared.counters;
        BrokerStats {
            connections: c.connections.load(Ordering::Relaxed),
            sessions,
            subscriptions: subscriptions + shared_members,
            shared_groups,
            shared_redelivered: c.shared_redelivered.load(Ordering::Relaxed),
            retained,
            retained_bytes,
            messages_in: c.messages_in.load(Ordering::Relaxed),
            messages_out: c.messages_out.load(Ordering::Relaxed),
            denied: c.denied.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            panics: c.panics.load(Ordering::Relaxed),
            refusals: Refusal::ALL
                .iter()
                .zip(&c.refusals)
                .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_all_lists_the_variants_in_declaration_order() {
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
    }
}
