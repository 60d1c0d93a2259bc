//! The virtual wall clock: unix time derived from tokio's timeline, so it follows a paused clock.

use mooring_proto::Clock;

/// `now_ms = start_unix_ms + (tokio::time::Instant::now() - start)`.
///
/// Under `tokio::time::pause()` the tokio timeline only moves when the runtime is idle and jumps
/// to the next timer; this clock moves with it, so timestamps and timers never disagree.
#[derive(Debug, Clone, Copy)]
pub struct VirtualClock {
    start_unix_ms: u64,
    start: tokio::time::Instant,
    /// Added to every reading: a device model's clock skew (may be negative).
    skew_ms: i64,
}

impl VirtualClock {
    /// Starts at `start_unix_ms`, now.
    pub fn new(start_unix_ms: u64) -> Self {
        Self {
            start_unix_ms,
            start: tokio::time::Instant::now(),
            skew_ms: 0,
        }
    }

    /// The same timeline, read with a skew (for a device whose RTC is off).
    pub fn skewed(&self, skew_ms: i64) -> Self {
        Self { skew_ms, ..*self }
    }

    /// Simulated milliseconds since the start.
    pub fn elapsed_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

impl Clock for VirtualClock {
    fn now_ms(&self) -> u64 {
        let t = self.start_unix_ms + self.elapsed_ms();
        t.saturating_add_signed(self.skew_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn follows_the_paused_timeline() {
        let c = VirtualClock::new(1_000_000);
        assert_eq!(c.now_ms(), 1_000_000);
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        assert_eq!(c.now_ms(), 1_000_000 + 3_600_000);
        assert_eq!(c.skewed(-500).now_ms(), 1_000_000 + 3_600_000 - 500);
    }
}
