//! Server counters and the Prometheus text rendering behind `GET /metrics`.
//!
//! Counters are plain atomics owned by one server instance (no global recorder), so several
//! servers in one test process never mix their numbers.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Counters {
    /// Telemetry messages accepted and stored (or recognised as duplicates).
    pub telemetry_messages: AtomicU64,
    /// Telemetry points stored.
    pub telemetry_points: AtomicU64,
    /// Telemetry messages whose `(device, seq)` was already stored.
    pub telemetry_duplicates: AtomicU64,
    /// Telemetry messages dropped because the payload was invalid.
    pub telemetry_invalid: AtomicU64,
    /// Telemetry messages not acknowledged because the store failed.
    pub telemetry_store_errors: AtomicU64,
    /// CONNECTs refused by authentication.
    pub connects_refused: AtomicU64,
    /// TLS handshakes that failed (no/foreign certificate, timeouts, garbage).
    pub tls_handshake_failures: AtomicU64,
    /// Device commands created (fleet commands count once per device).
    pub commands_created: AtomicU64,
    /// Commands handed to a device session for the first time.
    pub commands_delivered: AtomicU64,
    /// Redeliveries of unacknowledged commands.
    pub commands_retried: AtomicU64,
    pub commands_succeeded: AtomicU64,
    /// Failed by the device, or after `max_attempts` deliveries without an ack.
    pub commands_failed: AtomicU64,
    pub commands_expired: AtomicU64,
    pub commands_canceled: AtomicU64,
    /// Acks / results for unknown, foreign or already-final commands, or with invalid payloads.
    pub command_replies_ignored: AtomicU64,
    /// Results that arrived after their command failed with `timeout` (kept as `late_result`).
    pub commands_late_results: AtomicU64,
    /// Shadow reported updates applied.
    pub shadow_reports: AtomicU64,
    /// HTTP connections closed because no (next) request head arrived in time.
    pub http_header_timeouts: AtomicU64,
    /// HTTP requests answered 408: the body did not arrive in time.
    pub http_body_timeouts: AtomicU64,
    /// HTTP requests answered 413: the body was too large.
    pub http_body_too_large: AtomicU64,
    /// HTTP requests answered 401: no valid token.
    pub http_unauthorized: AtomicU64,
    /// HTTP connections that waited for a slot (`[http] connections_max` reached).
    pub http_connection_cap: AtomicU64,
    /// HTTPS handshakes that failed or timed out.
    pub http_tls_handshake_failures: AtomicU64,
}

impl Counters {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Builds a Prometheus text exposition (version 0.0.4).
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.metric(name, help, "counter", value as f64)
    }

    /// One counter with a series per label value: `name{label="value"} n`.
    pub fn labeled_counters<'a>(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        series: impl IntoIterator<Item = (&'a str, u64)>,
    ) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} counter");
        for (value, n) in series {
            let _ = writeln!(self.out, "{name}{{{label}=\"{value}\"}} {n}");
        }
        self
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: f64) -> &mut Self {
        self.metric(name, help, "gauge", value)
    }

    fn metric(&mut self, name: &str, help: &str, kind: &str, value: f64) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        let _ = writeln!(self.out, "{name} {value}");
        self
    }

    pub fn finish(self) -> String {
        self.out
    }
}

pub fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}
