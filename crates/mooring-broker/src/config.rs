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
    /// Topic + payload bytes queued for one session; the same drop rule as `session_queue_len_max`.
    pub session_queue_bytes_max: usize,
    /// Bytes a connection moves from its session queue to its write buffer ahead of the socket;
    /// the rest waits in the (bounded) session queue, so a client that reads slowly holds at most
    /// this much (plus acks and one packet) in the write buffer.
    pub write_buffer_bytes_max: usize,
    /// A connection whose socket accepts no bytes for this long while output is waiting is
    /// closed (a peer that stopped reading). Control messages (takeover, kick, shutdown) and
    /// keep-alive are acted on while a write is blocked; the final flush before closing is
    /// bounded by `close_flush_timeout_ms`.
    pub write_stall_timeout_ms: u64,
    /// Longest wait for the last bytes (DISCONNECT, acks) to go out when a connection closes.
    pub close_flush_timeout_ms: u64,
    /// Longest topic name or filter accepted, in bytes (checked before anything is stored).
    pub topic_bytes_max: usize,
    /// Most levels (`/`-separated parts) in a topic name or filter.
    pub topic_levels_max: usize,
    /// Distinct topic filters one session may hold.
    pub subscriptions_per_session_max: usize,
    /// Keepalive the broker tolerates; a v5 client asking for more (or 0) is told Server Keep Alive.
    /// A v3.1.1 client asking for 0 or more is supervised as if it had asked for this: a
    /// connection that sends nothing for 1.5 × this is closed.
    pub keepalive_secs_max: u16,
    /// Longest session expiry granted; also the expiry of v3.1.1 `clean_session = 0` sessions.
    pub session_expiry_secs_max: u32,
    /// Time a new connection has to send CONNECT; also the bound on waiting for a taken-over
    /// connection to finish.
    pub connect_timeout_ms: u64,
    /// Retained messages published by clients, broker-wide; beyond that new retained topics
    /// are refused. Server-originated retained messages ([`crate::Broker::publish`], e.g.
    /// shadow deltas) are not counted against any retained limit and never refused.
    pub retained_messages_max: usize,
    /// Topic + payload bytes of retained messages published by clients, broker-wide.
    pub retained_bytes_max: usize,
    /// Retained messages one principal (a device, a service, the dev listener) may own.
    pub retained_per_principal_max: usize,
    /// Topic + payload bytes of the retained messages one principal may own.
    pub retained_bytes_per_principal_max: usize,
    /// Sessions (live or persisted) of services and dev-listener clients, broker-wide; beyond
    /// that their CONNECT is refused (server unavailable / v5 0x97). Device sessions are not
    /// counted: a device has one client id, so they are bounded by the registry and always
    /// admitted.
    pub sessions_max: usize,
    /// Persistent sessions (session expiry > 0) one non-device principal (a service token, the
    /// dev listener) may hold; beyond that a CONNECT asking for one is refused (v5 0x97, v3.1.1
    /// server unavailable).
    pub persistent_sessions_per_principal_max: usize,
    /// Sessions, live or persisted, one non-device principal may hold (one service token opening
    /// many clean connections cannot fill `sessions_max` for everyone); beyond that CONNECT is
    /// refused like `persistent_sessions_per_principal_max`.
    pub sessions_per_principal_max: usize,
    /// Topic Alias Maximum advertised to v5 clients for their inbound PUBLISHes.
    pub topic_alias_max: u16,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            packet_size_bytes_max: 256 * 1024,
            inflight_max: 32,
            session_queue_len_max: 1000,
            session_queue_bytes_max: 4 * 1024 * 1024,
            write_buffer_bytes_max: 64 * 1024,
            write_stall_timeout_ms: 30_000,
            close_flush_timeout_ms: 500,
            topic_bytes_max: 1024,
            topic_levels_max: 32,
            subscriptions_per_session_max: 64,
            keepalive_secs_max: 3600,
            session_expiry_secs_max: 7 * 24 * 3600,
            connect_timeout_ms: 10_000,
            retained_messages_max: 100_000,
            retained_bytes_max: 64 * 1024 * 1024,
            retained_per_principal_max: 100,
            retained_bytes_per_principal_max: 256 * 1024,
            sessions_max: 100_000,
            persistent_sessions_per_principal_max: 100,
            sessions_per_principal_max: 1000,
            topic_alias_max: 16,
        }
    }
}

impl BrokerConfig {
    /// Whether a topic name or filter is within `topic_bytes_max` and `topic_levels_max`.
    /// Counts levels without allocating, so an oversized filter costs nothing but this scan.
    pub fn topic_within_limits(&self, topic: &str) -> bool {
        topic.len() <= self.topic_bytes_max
            && topic.bytes().filter(|b| *b == b'/').count() < self.topic_levels_max
    }
}
