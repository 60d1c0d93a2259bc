//! Presence: which devices are online now, and `last_seen` without one write per message.
//!
//! The live view is in memory (updated on connect, disconnect and every inbound message);
//! `last_seen` reaches the store in batches, every `presence_flush_interval_secs` and at
//! shutdown, through one `record_last_seen` transaction.

use mooring_store::DeviceStore;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    connections: u32,
    last_seen_ms: u64,
    dirty: bool,
}

/// The presence service: owns the in-memory online/last-seen table and its flushes to the
/// registry's `last_seen` column.
pub struct Presence {
    devices: Mutex<HashMap<String, Entry>>,
    store: Arc<dyn DeviceStore>,
}

impl Presence {
    pub(crate) fn new(store: Arc<dyn DeviceStore>) -> Self {
        Self {
            devices: Mutex::default(),
            store,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, Entry>) -> R) -> R {
        let mut guard = mooring_proto::sync::lock(&self.devices);
        f(&mut guard)
    }

    pub fn connected(&self, id: &str, now_ms: u64) {
        self.with(|m| {
            let e = m.entry(id.to_owned()).or_default();
            e.connections += 1;
            e.last_seen_ms = e.last_seen_ms.max(now_ms);
            e.dirty = true;
        });
    }

    pub fn disconnected(&self, id: &str, now_ms: u64) {
        self.with(|m| {
            if let Some(e) = m.get_mut(id) {
                e.connections = e.connections.saturating_sub(1);
                e.last_seen_ms = e.last_seen_ms.max(now_ms);
                e.dirty = true;
            }
        });
    }

    pub fn seen(&self, id: &str, now_ms: u64) {
        self.with(|m| {
            if let Some(e) = m.get_mut(id) {
                if now_ms > e.last_seen_ms {
                    e.last_seen_ms = now_ms;
                    e.dirty = true;
                }
            }
        });
    }

    pub fn forget(&self, id: &str) {
        self.with(|m| m.remove(id));
    }

    /// `(online, last_seen_ms known in memory)`.
    pub fn get(&self, id: &str) -> (bool, Option<u64>) {
        self.with(|m| match m.get(id) {
            Some(e) => (e.connections > 0, Some(e.last_seen_ms)),
            None => (false, None),
        })
    }

    pub fn online_count(&self) -> usize {
        self.with(|m| m.values().filter(|e| e.connections > 0).count())
    }

    /// Writes every changed `last_seen` to the store in one batch.
    pub async fn flush(&self) -> mooring_store::Result<usize> {
        let batch: Vec<(String, u64)> = self.with(|m| {
            m.retain(|_, e| e.connections > 0 || e.dirty);
            m.iter_mut()
                .filter(|(_, e)| e.dirty)
                .map(|(id, e)| {
                    e.dirty = false;
                    (id.clone(), e.last_seen_ms)
                })
                .collect()
        });
        if batch.is_empty() {
            return Ok(0);
        }
        let n = batch.len();
        if let Err(e) = self.store.record_last_seen(&batch).await {
            // Put them back so the next flush retries.
            self.with(|m| {
                for (id, _) in &batch {
                    if let Some(e) = m.get_mut(id) {
                        e.dirty = true;
                    }
                }
            });
            return Err(e);
        }
        Ok(n)
    }
}
