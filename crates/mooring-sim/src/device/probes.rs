//! Measurement hooks inside a device: the [`LedgerStore`] of acknowledged `sim.n` values and
//! the [`SimHandler`] that counts command executions.

use super::{inc, DeviceState, Stats, INJECTED_PANIC, SIM_CMD_KEY};
use crate::clock::VirtualClock;
use mooring_agent::store::{CommandRecord, Entry, Pushed, StoreError};
use mooring_agent::{AgentStore, CommandHandler, MemStore, Outcome};
use mooring_proto::sync::lock;
use rand::rngs::StdRng;
use rand::Rng as _;
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// The agent's store as the simulator hands it over: the device's [`MemStore`], plus a ledger
/// of the `sim.n` values whose PUBACK arrived (recorded only when the deletion succeeded).
pub struct LedgerStore {
    pub(super) inner: MemStore,
    pub(super) dev: Arc<DeviceState>,
    pub(super) stats: Arc<Stats>,
    pub(super) clock: VirtualClock,
}

impl LedgerStore {
    fn surfaced<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if r.is_err() {
            inc(&self.stats.store_errors_surfaced);
        }
        r
    }
}

/// The `sim.n` value in a telemetry payload the agent built (`{"sim.n":12,...}`).
fn sim_n(payload: &[u8]) -> Option<u32> {
    let key = b"\"sim.n\":";
    let at = payload.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = payload[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&payload[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

impl AgentStore for LedgerStore {
    fn next_seq(&self) -> u64 {
        self.inner.next_seq()
    }
    fn push(&mut self, entries: Vec<Entry>) -> Result<Pushed, StoreError> {
        let r = self.inner.push(entries);
        self.surfaced(r)
    }
    fn peek_after(&self, after: u64, n: usize) -> Result<Vec<Entry>, StoreError> {
        self.inner.peek_after(after, n)
    }
    fn ack(&mut self, seqs: &[u64]) -> Result<u64, StoreError> {
        let mut ns = Vec::with_capacity(seqs.len());
        for &seq in seqs {
            if let Some(e) = self
                .inner
                .peek_after(seq.saturating_sub(1), 1)?
                .into_iter()
                .next()
            {
                if e.seq == seq && e.topic.is_none() {
                    if let Some(n) = sim_n(&e.payload) {
                        ns.push(n);
                    }
                }
            }
        }
        let r = self.inner.ack(seqs);
        let removed = self.surfaced(r)?;
        if !ns.is_empty() {
            self.stats
                .telemetry_acked
                .fetch_add(ns.len() as u64, Ordering::Relaxed);
            self.stats
                .acked_at(self.clock.elapsed_ms(), ns.len() as u64);
            lock(&self.dev.acked).extend(ns);
            if let Some(p) = &self.dev.enroll {
                p.reached(super::enroll::STEP_FIRST_TELEMETRY, self.clock.elapsed_ms());
            }
        }
        Ok(removed)
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    fn dropped_total(&self) -> u64 {
        self.inner.dropped_total()
    }
    fn dropped_precious_total(&self) -> u64 {
        self.inner.dropped_precious_total()
    }
    fn command(&self, id: &str) -> Result<Option<CommandRecord>, StoreError> {
        self.inner.command(id)
    }
    fn unfinished_commands(&self) -> Result<Vec<String>, StoreError> {
        self.inner.unfinished_commands()
    }
    fn command_started(&mut self, id: &str) -> Result<(), StoreError> {
        let r = self.inner.command_started(id);
        self.surfaced(r)
    }
    fn command_done(
        &mut self,
        id: &str,
        result: Vec<u8>,
        entry: Entry,
    ) -> Result<Pushed, StoreError> {
        let r = self.inner.command_done(id, result, entry);
        self.surfaced(r)
    }
    fn doc(&self, name: &str) -> Result<Option<Value>, StoreError> {
        self.inner.doc(name)
    }
    fn put_doc(&mut self, name: &str, value: &Value) -> Result<(), StoreError> {
        let r = self.inner.put_doc(name, value);
        self.surfaced(r)
    }
}

/// The handler injected for every command name a scenario sends: counts the execution (by
/// the `sim_cmd` param), then panics with the cohort's `command_panic_rate` or succeeds.
pub struct SimHandler {
    pub(super) dev: Arc<DeviceState>,
    pub(super) panic_rate: f64,
    pub(super) rng: Mutex<StdRng>,
    pub(super) stats: Arc<Stats>,
}

#[async_trait::async_trait]
impl CommandHandler for SimHandler {
    async fn run(&self, params: Value) -> Outcome {
        if let Some(ev) = params.get(SIM_CMD_KEY).and_then(Value::as_u64) {
            self.dev.record_execution(ev as u32);
        }
        let panic = self.panic_rate > 0.0 && {
            let mut rng = lock(&self.rng);
            rng.random_bool(self.panic_rate)
        };
        if panic {
            inc(&self.stats.handler_panics_injected);
            std::panic::panic_any(INJECTED_PANIC);
        }
        Ok(serde_json::json!({"ok": true}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::SEQ_METRIC;
    use serde_json::Map;

    #[test]
    fn sim_n_is_read_from_the_agents_payload() {
        let mut m = Map::new();
        m.insert(SEQ_METRIC.into(), Value::from(1234));
        m.insert("temp".into(), Value::from(2.5));
        let p = mooring_agent::telemetry_payload(m, 99, 5);
        assert_eq!(sim_n(&p), Some(1234));
        assert_eq!(sim_n(b"{\"seq\":1}"), None);
    }
}
