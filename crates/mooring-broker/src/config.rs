//! Broker limits: every queue, table and packet the broker holds has a named maximum here.

/// Limits and timeouts of a [`crate::Broker`]. Units are last in the names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Largest MQTT packet accepted from a client (advertised to v5 clients as Maximum Packet Size).
    pub packet_size_bytes_max: u32,
    /// Unacknowledged QoS 1/2 messages per direction per connection (advertised as Receive Maximum;
    /// also the number of inbound `on_publish` futures pending at once).
    pub inflight_max: u16,
    /// Messages queued for one session (offline, or waiting for an inflight slot). When full, the
    /// oldest queued QoS 0 message is dropped first; if there is none the new message is dropped.
    pub session_queue_len_max: usize,
    /// Distinct topic filters one session may hold.
    pub subscriptions_per_session_max: usize,
    /// Keepalive the broker tolerates; a v5 client asking for more (or 0) is told Server Keep Alive.
    pub keepalive_secs_max: u16,
    /// Longest session expiry granted; also the expiry of v3.1.1 `clean_session = 0` sessions.
    pub session_expiry_secs_max: u32,
    /// Time a new connection has to send CONNECT; also the bound on waiting for a taken-over
    /// connection to finish.
    pub connect_timeout_ms: u64,
    /// Retained messages held broker-wide; beyond that new retained topics are not stored.
    pub retained_messages_max: usize,
    /// Sessions (live or persisted) broker-wide; beyond that CONNECT is refused (server unavailable).
    pub sessions_max: usize,
    /// Topic Alias Maximum advertised to v5 clients for their inbound PUBLISHes.
    pub topic_alias_max: u16,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            packet_size_bytes_max: 256 * 1024,
            inflight_max: 32,
            session_queue_len_max: 1000,
            subscriptions_per_session_max: 64,
            keepalive_secs_max: 3600,
            session_expiry_secs_max: 7 * 24 * 3600,
            connect_timeout_ms: 10_000,
            retained_messages_max: 100_000,
            sessions_max: 100_000,
            topic_alias_max: 16,
        }
    }
}
