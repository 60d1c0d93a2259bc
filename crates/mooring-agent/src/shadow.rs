//! The device side of the shadow: apply `shadow/delta` to the local desired state and report back; report agent and firmware versions on every connect.
//!
//! * On each new connection: queue a reported update
//!   `{"agent": {"version": <agent version>, "boots": n, "unclean_stops": n}, "version":
//!   <firmware_version, if configured>}` (the counts: `boots.rs`),
//!   plus `"ota"` (the A/B slots, [`crate::ota::BootControl::to_reported`]) with `[update]`.
//! * On a delta (`ShadowDelta {version, delta}`, retained, so one arrives after every
//!   subscribe): merge it into the local desired-state document (`<state dir>/desired.json`,
//!   JSON Merge Patch) and queue the applied keys as a reported update (a merge patch on
//!   `devices/<id>/shadow/reported`). Applying the same delta twice is harmless.
//!
//! Reported updates go through the durable outbox like everything else. Applications read
//! `desired.json` and act on it; reporting the applied keys is what lets the server clear the
//! delta.

use crate::store::Entry;
use crate::Core;
use mooring_proto::shadow::{check_depth, merge, ShadowDelta, SHADOW_SIZE_BYTES_MAX};
use mooring_proto::Topic;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// Queued shadow deltas between the connection and the shadow task.
pub const SHADOW_QUEUE_MAX: usize = 4;

/// Runs until the agent stops. Errors are store failures.
pub(crate) async fn run(core: Arc<Core>) -> anyhow::Result<()> {
    let mut rx = core.shadow_rx.lock().await;
    let mut link = core.link.subscribe();
    // A connection that exists already when (re)started is reported too.
    link.mark_changed();
    loop {
        tokio::select! {
            changed = link.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let connected = link.borrow_and_update().is_some();
                if connected {
                    report(&core, connect_report(&core))?;
                }
            }
            msg = rx.recv() => {
                let Some(msg) = msg else { return Ok(()) };
                apply(&core, &msg.payload)?;
            }
        }
    }
}

fn connect_report(core: &Core) -> Map<String, Value> {
    let mut m = Map::new();
    let mut agent = json!({"version": crate::VERSION});
    if let (Value::Object(a), Value::Object(b)) = (&mut agent, core.boots.to_json()) {
        a.extend(b);
    }
    m.insert("agent".into(), agent);
    if let Some(v) = &core.config.firmware_version {
        m.insert("version".into(), Value::String(v.clone()));
    }
    if let Some(ota) = &core.ota {
        m.insert(
            "ota".into(),
            mooring_proto::sync::lock(&ota.reported).clone(),
        );
    }
    m
}

/// Applies one delta payload; an invalid one is logged and skipped.
fn apply(core: &Core, payload: &[u8]) -> anyhow::Result<()> {
    if payload.is_empty() {
        return Ok(()); // a cleared retained delta
    }
    if payload.len() > SHADOW_SIZE_BYTES_MAX * 2 {
        tracing::warn!(bytes = payload.len(), "shadow delta too large; ignored");
        return Ok(());
    }
    let delta = match ShadowDelta::parse(payload) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "invalid shadow delta; ignored");
            return Ok(());
        }
    };
    let Value::Object(patch) = delta.delta else {
        tracing::warn!("shadow delta is not an object; ignored");
        return Ok(());
    };
    if patch.is_empty() {
        return Ok(());
    }
    if check_depth(&Value::Object(patch.clone()), 0).is_err() {
        tracing::warn!("shadow delta nests too deep; ignored");
        return Ok(());
    }
    {
        let mut store = core.store();
        let mut desired = match store.doc(crate::DESIRED_DOC)? {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        merge(&mut desired, &patch);
        store.put_doc(crate::DESIRED_DOC, &Value::Object(desired))?;
    }
    tracing::info!(
        version = delta.version,
        keys = patch.len(),
        "shadow delta applied"
    );
    report(core, patch)
}

/// Queues a reported update (merge patch) in the outbox.
pub(crate) fn report(core: &Core, patch: Map<String, Value>) -> anyhow::Result<()> {
    let payload = Value::Object(patch).to_string().into_bytes();
    let mut store = core.store();
    let seq = store.next_seq();
    store.push(vec![Entry {
        seq,
        topic: Some(Topic::shadow_reported(&core.device_id)),
        payload,
    }])?;
    drop(store);
    core.outbox_changed.notify_one();
    Ok(())
}
