//! Requests per key per minute, in memory, for principals that can send as fast as they like
//! (claim clients enrolling, devices reporting OTA states): a fixed one-minute window per key,
//! in a table of at most `keys_max` keys so the table itself is bounded whoever sends.

use std::collections::HashMap;
use std::sync::Mutex;

const MINUTE_MS: u64 = 60_000;

/// Why a request was not counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// This key sent more than its maximum in the current minute.
    Key,
    /// The table holds `keys_max` keys, all active this minute (a key new this minute is
    /// refused rather than resetting the keys being limited).
    Table,
}

/// Per-key counters of the current minute.
pub struct PerMinute {
    keys_max: usize,
    /// Key → (window start, requests in it).
    counts: Mutex<HashMap<String, (u64, u32)>>,
}

impl PerMinute {
    pub fn new(keys_max: usize) -> Self {
        Self {
            keys_max,
            counts: Mutex::default(),
        }
    }

    /// Counts one request of `key` at `now_ms`: `Err` if that makes more than `max` in its
    /// current minute (the request is still counted: a client that keeps sending stays limited).
    pub fn count(&self, key: &str, now_ms: u64, max: u32) -> Result<(), Over> {
        let mut counts = mooring_proto::sync::lock(&self.counts);
        if counts.len() >= self.keys_max && !counts.contains_key(key) {
            // Forget the counters of past minutes only: clearing them all would reset the
            // keys being limited.
            counts.retain(|_, (since, _)| now_ms < since.saturating_add(MINUTE_MS));
            if counts.len() >= self.keys_max {
                return Err(Over::Table);
            }
        }
        let entry = counts.entry(key.to_owned()).or_insert((now_ms, 0));
        if now_ms >= entry.0.saturating_add(MINUTE_MS) {
            *entry = (now_ms, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        if entry.1 > max {
            return Err(Over::Key);
        }
        Ok(())
    }

    /// Keys held now.
    #[cfg(test)]
    fn len(&self) -> usize {
        mooring_proto::sync::lock(&self.counts).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_limited_within_its_minute_and_the_table_stays_bounded() {
        let limits = PerMinute::new(2);
        assert_eq!(limits.count("a", 0, 2), Ok(()));
        assert_eq!(limits.count("a", 10, 2), Ok(()));
        assert_eq!(limits.count("a", 20, 2), Err(Over::Key));
        // The next minute starts afresh.
        assert_eq!(limits.count("a", MINUTE_MS, 2), Ok(()));
        assert_eq!(limits.count("b", MINUTE_MS, 2), Ok(()));
        // Full of keys active this minute: a new key is refused, the old ones keep counting.
        assert_eq!(limits.count("c", MINUTE_MS + 1, 2), Err(Over::Table));
        assert_eq!(limits.count("a", MINUTE_MS + 1, 2), Ok(()));
        assert_eq!(limits.len(), 2);
        // Once their minute is over, a new key takes a place.
        assert_eq!(limits.count("c", 3 * MINUTE_MS, 2), Ok(()));
        assert_eq!(limits.len(), 1);
    }
}
