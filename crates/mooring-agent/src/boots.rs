//! The agent's own record of its starts: how many times it started on this state, and how many
//! of those followed a stop that was not clean (a crash, a kill, a power loss), reported in the
//! shadow as `reported.agent.boots` / `reported.agent.unclean_stops` on every connect (the
//! server's fleet health reads them; no extra traffic).
//!
//! The record is the store document [`BOOT_DOC`] `{"boots", "unclean_stops", "running"}`:
//! `running` is set at start and cleared by a clean stop (the end of `run_with`, or just before
//! a reboot the agent asks for). A start that finds it still set counts the previous stop as
//! unclean.

use crate::store::AgentStore;
use crate::Core;
use serde_json::{json, Value};

/// The store document holding the record.
pub const BOOT_DOC: &str = "boot";

/// The counts reported in the shadow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Boots {
    /// Starts on this state, this one included.
    pub boots: u64,
    /// Starts that found the previous run not stopped cleanly.
    pub unclean_stops: u64,
}

impl Boots {
    pub fn to_json(self) -> Value {
        json!({"boots": self.boots, "unclean_stops": self.unclean_stops})
    }
}

/// Counts this start and marks the agent running. A store failure is logged and reported as
/// zero counts: the record is diagnostics, never a reason not to start.
pub fn record_start(store: &mut dyn AgentStore) -> Boots {
    let old = match store.doc(BOOT_DOC) {
        Ok(d) => d.unwrap_or(Value::Null),
        Err(e) => {
            tracing::warn!(error = %e, "reading the boot record");
            Value::Null
        }
    };
    let n = |k: &str| old[k].as_u64().unwrap_or(0);
    let b = Boots {
        boots: n("boots").saturating_add(1),
        unclean_stops: n("unclean_stops")
            .saturating_add(u64::from(old["running"].as_bool().unwrap_or(false))),
    };
    let doc = json!({"boots": b.boots, "unclean_stops": b.unclean_stops, "running": true});
    if let Err(e) = store.put_doc(BOOT_DOC, &doc) {
        tracing::warn!(error = %e, "writing the boot record");
    }
    b
}

/// Marks a clean stop (the next start does not count it as unclean).
pub(crate) fn record_stop(core: &Core) {
    set_running(core, false);
}

/// Marks the agent running again (a reboot it asked for did not happen).
pub(crate) fn record_running(core: &Core) {
    set_running(core, true);
}

fn set_running(core: &Core, running: bool) {
    let b = core.boots;
    let doc = json!({"boots": b.boots, "unclean_stops": b.unclean_stops, "running": running});
    if let Err(e) = core.store().put_doc(BOOT_DOC, &doc) {
        tracing::warn!(error = %e, "writing the boot record");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStore;

    #[test]
    fn starts_are_counted_and_a_start_after_an_unclean_stop_says_so() {
        let mut s = MemStore::new(10, 1).expect("store");
        assert_eq!(
            record_start(&mut s),
            Boots {
                boots: 1,
                unclean_stops: 0
            }
        );
        // No clean stop recorded: the next start counts an unclean one.
        assert_eq!(
            record_start(&mut s),
            Boots {
                boots: 2,
                unclean_stops: 1
            }
        );
        // A clean stop.
        s.put_doc(
            BOOT_DOC,
            &json!({"boots": 2, "unclean_stops": 1, "running": false}),
        )
        .expect("put");
        assert_eq!(
            record_start(&mut s),
            Boots {
                boots: 3,
                unclean_stops: 1
            }
        );
        // A record that is not what it should be starts over rather than failing.
        s.put_doc(BOOT_DOC, &json!("garbage")).expect("put");
        assert_eq!(record_start(&mut s).boots, 1);
    }
}
