//! Gateway cohorts (`[cohort.gateway]`): register and attach the children before the fleet
//! boots; at the end, check that every child message handed to a gateway reached the store
//! exactly once and in order.

use super::measure::Reader;
use super::{Control, LOST_EXAMPLES_MAX};
use crate::device::DeviceState;
use crate::harness::InProcessServer;
use crate::report::GatewayReport;
use anyhow::Context as _;
use mooring_agent::AgentStore as _;
use mooring_proto::Topic;
use mooring_server::access::Access;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Registers `dev`'s children and attaches them to it (the gateway is registered already).
pub(super) async fn register_children(
    server: &InProcessServer,
    dev: &DeviceState,
) -> anyhow::Result<()> {
    let Some(g) = &dev.gateway else {
        return Ok(());
    };
    for child in &g.ids {
        server.register(child.as_str(), BTreeMap::new()).await?;
        server
            .server
            .app
            .gateways
            .attach(&Access::all(), child.as_str(), dev.id.as_str())
            .await
            .map_err(|e| anyhow::anyhow!("attaching {child} to {}: {e:?}", dev.id))?;
    }
    Ok(())
}

/// (gateways online, children online) now.
pub(super) async fn online(control: &Control, devices: &[Arc<DeviceState>]) -> (u64, u64) {
    let (mut gateways, mut children) = (0, 0);
    for d in devices {
        let Some(g) = &d.gateway else { continue };
        if control.is_online(d.id.as_str()).await {
            gateways += 1;
        }
        for child in &g.ids {
            if control.is_online(child.as_str()).await {
                children += 1;
            }
        }
    }
    (gateways, children)
}

/// The children's telemetry against the store; `None` without a gateway cohort. Run after
/// the fleet stopped (the outboxes no longer move).
pub(super) async fn report(
    reader: &Reader,
    devices: &[Arc<DeviceState>],
    deleted: &HashSet<String>,
    online: (u64, u64),
) -> anyhow::Result<Option<GatewayReport>> {
    let mut r = GatewayReport {
        gateways_online_at_end: online.0,
        children_online_at_end: online.1,
        ..GatewayReport::default()
    };
    let mut any = false;
    for d in devices {
        let Some(g) = &d.gateway else { continue };
        any = true;
        if deleted.contains(d.id.as_str()) {
            continue;
        }
        r.gateways += 1;
        // What the gateway still holds for its children: topic -> child index.
        let topics: HashMap<String, usize> = g
            .ids
            .iter()
            .enumerate()
            .map(|(k, id)| (Topic::telemetry(id), k))
            .collect();
        let mut queued: Vec<HashSet<u64>> = vec![HashSet::new(); g.ids.len()];
        let len = usize::try_from(d.flash.len()).unwrap_or(usize::MAX);
        for e in d.flash.peek_after(0, len)? {
            let Some(k) = e.topic.as_ref().and_then(|t| topics.get(t)) else {
                continue;
            };
            let seq = serde_json::from_slice::<serde_json::Value>(&e.payload)
                .ok()
                .and_then(|v| v.get("seq")?.as_u64());
            if let Some(seq) = seq {
                queued[*k].insert(seq);
            }
        }
        for (k, child) in g.ids.iter().enumerate() {
            r.children += 1;
            let sent = g.sent[k].load(Ordering::Relaxed);
            r.telemetry_sent += sent;
            let values = reader
                .telemetry_values(child.as_str(), sent as usize + 16)
                .await
                .with_context(|| format!("reading {child}'s telemetry"))?;
            let stored: HashSet<u64> = values.iter().map(|v| u64::from(*v)).collect();
            r.telemetry_stored += stored.len() as u64;
            r.telemetry_duplicated += (values.len() - stored.len()) as u64;
            r.telemetry_in_outbox_at_end +=
                queued[k].iter().filter(|n| !stored.contains(n)).count() as u64;
            for n in (1..=sent).filter(|n| !stored.contains(n) && !queued[k].contains(n)) {
                r.telemetry_lost += 1;
                if r.examples.len() < LOST_EXAMPLES_MAX {
                    r.examples.push(format!("lost: {child} seq={n}"));
                }
            }
            let in_order = values
                .iter()
                .zip(1u64..)
                .all(|(v, want)| u64::from(*v) == want);
            if !in_order {
                r.children_out_of_order += 1;
                if r.examples.len() < LOST_EXAMPLES_MAX {
                    let head: Vec<String> = values.iter().take(8).map(u32::to_string).collect();
                    r.examples.push(format!(
                        "not exactly once in order: {child} stored seqs {}...",
                        head.join(", ")
                    ));
                }
            }
        }
    }
    Ok(any.then_some(r))
}
