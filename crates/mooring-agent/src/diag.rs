//! What the `diagnostics` command reports: link quality counters, a bounded ring of recent errors and one of recent log lines (fed by a tracing layer).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Recent log lines kept for `diagnostics`.
pub const LOG_LINES_MAX: usize = 200;
/// Recent errors kept for `diagnostics`.
pub const ERRORS_MAX: usize = 32;
/// Longest kept log or error line, in bytes (longer ones are cut).
pub const LINE_BYTES_MAX: usize = 512;

/// A bounded ring of text lines; cheap to clone (clones share the ring).
#[derive(Debug, Clone)]
pub struct Ring {
    lines: Arc<Mutex<VecDeque<String>>>,
    cap: usize,
}

impl Ring {
    pub fn new(cap: usize) -> Self {
        Self {
            lines: Arc::new(Mutex::new(VecDeque::with_capacity(cap.min(64)))),
            cap: cap.max(1),
        }
    }

    pub fn push(&self, mut line: String) {
        if line.len() > LINE_BYTES_MAX {
            let mut cut = LINE_BYTES_MAX;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
        }
        let mut lines = mooring_proto::sync::lock(&self.lines);
        while lines.len() >= self.cap {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// Oldest first.
    pub fn snapshot(&self) -> Vec<String> {
        let lines = mooring_proto::sync::lock(&self.lines);
        lines.iter().cloned().collect()
    }
}

/// Link quality, updated by the connection task.
#[derive(Debug)]
pub struct LinkStats {
    pub connected: AtomicBool,
    /// Successful connections since the agent started.
    pub connects_total: AtomicU64,
    /// Failed attempts and lost connections since the agent started.
    pub reconnects_total: AtomicU64,
    /// Round trip of the last PINGREQ/PINGRESP, in ms; `u64::MAX` when none was measured.
    pub last_rtt_ms: AtomicU64,
}

impl Default for LinkStats {
    fn default() -> Self {
        Self {
            connected: AtomicBool::new(false),
            connects_total: AtomicU64::new(0),
            reconnects_total: AtomicU64::new(0),
            last_rtt_ms: AtomicU64::new(u64::MAX),
        }
    }
}

impl LinkStats {
    pub fn to_json(&self) -> serde_json::Value {
        let rtt = self.last_rtt_ms.load(Ordering::Relaxed);
        serde_json::json!({
            "connected": self.connected.load(Ordering::Relaxed),
            "connects_total": self.connects_total.load(Ordering::Relaxed),
            "reconnects_total": self.reconnects_total.load(Ordering::Relaxed),
            "last_rtt_ms": (rtt != u64::MAX).then_some(rtt),
        })
    }
}

/// Everything the agent exposes to `diagnostics`.
#[derive(Debug, Clone)]
pub struct Diagnostics {
    pub errors: Ring,
    pub logs: Ring,
    pub link: Arc<LinkStats>,
}

impl Default for Diagnostics {
    fn default() -> Self {
        Self {
            errors: Ring::new(ERRORS_MAX),
            logs: Ring::new(LOG_LINES_MAX),
            link: Arc::new(LinkStats::default()),
        }
    }
}

impl Diagnostics {
    /// Records an error line (also logged by the caller).
    pub fn error(&self, what: impl Into<String>) {
        self.errors.push(what.into());
    }
}

/// A tracing layer that copies every event at `info` or above into `ring` as
/// `LEVEL target: message key=value...`. The binary installs it next to the stderr logger.
pub fn log_layer<S>(ring: Ring) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber,
{
    RingLayer { ring }
}

struct RingLayer {
    ring: Ring,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for RingLayer {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let meta = event.metadata();
        if *meta.level() > tracing::Level::INFO {
            return;
        }
        let mut line = format!("{} {}:", meta.level(), meta.target());
        event.record(&mut LineVisitor(&mut line));
        self.ring.push(line);
    }
}

struct LineVisitor<'a>(&'a mut String);

impl tracing::field::Visit for LineVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        if self.0.len() > LINE_BYTES_MAX {
            return;
        }
        if field.name() == "message" {
            let _ = write!(self.0, " {value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt as _;

    #[test]
    fn rings_are_bounded_and_keep_the_newest() {
        let r = Ring::new(3);
        for i in 0..10 {
            r.push(format!("l{i}"));
        }
        assert_eq!(r.snapshot(), vec!["l7", "l8", "l9"]);
        r.push("x".repeat(LINE_BYTES_MAX * 2));
        assert_eq!(r.snapshot()[2].len(), LINE_BYTES_MAX);
    }

    #[test]
    fn log_layer_feeds_the_ring() {
        let ring = Ring::new(10);
        let subscriber = tracing_subscriber::registry().with(log_layer(ring.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(n = 3, "hello");
            tracing::debug!("not kept");
        });
        let lines = ring.snapshot();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("hello") && lines[0].contains("n=3"),
            "{lines:?}"
        );
    }
}
