//! A gateway's children (`[cohort.gateway]`): the in-memory [`ChildTransport`] the gateway's
//! agent gets instead of its Unix socket. One task (the transport's `serve`, run by the
//! agent's `gateway-socket` part) drives all the children of one gateway on the virtual clock.

use super::{inc, Stats};
use crate::clock::VirtualClock;
use crate::scenario::{CohortGateway, SEQ_METRIC};
use mooring_agent::gateway::{ChildEvent, ChildMsg, ChildTransport, ToChild, CHILD_QUEUE_MAX};
use mooring_proto::DeviceId;
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The metric that names the child's index within its gateway.
pub const CHILD_METRIC: &str = "sim.child";

/// A gateway's children, kept across restarts of the gateway's agent.
#[derive(Debug)]
pub struct GatewayChildren {
    /// `<gateway id>-c<k>`, by k.
    pub ids: Vec<DeviceId>,
    /// Per child: telemetry messages handed to the gateway (its last seq).
    pub sent: Vec<AtomicU64>,
    pub interval_ms: u64,
    /// Children stop sending at this virtual ms (the end of the run).
    pub until_ms: u64,
}

impl GatewayChildren {
    pub fn new(gateway: &DeviceId, model: &CohortGateway, until_ms: u64) -> anyhow::Result<Self> {
        let ids = (0..model.children)
            .map(|k| DeviceId::parse(&child_id(gateway.as_str(), k)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("children of {gateway}: {e}"))?;
        Ok(Self {
            sent: ids.iter().map(|_| AtomicU64::new(0)).collect(),
            ids,
            interval_ms: model.child_telemetry_interval.0,
            until_ms,
        })
    }
}

/// The id of child `k` of `gateway`.
pub fn child_id(gateway: &str, k: usize) -> String {
    format!("{gateway}-c{k}")
}

/// What one start of the gateway's agent gets: its children connect at once, then each sends
/// telemetry every interval (all of a gateway's children on the same tick).
pub struct SimChildren {
    pub children: Arc<GatewayChildren>,
    pub stats: Arc<Stats>,
    pub clock: VirtualClock,
}

#[async_trait::async_trait]
impl ChildTransport for SimChildren {
    async fn serve(self: Box<Self>, events: mpsc::Sender<ChildEvent>) {
        let g = &self.children;
        // Held for as long as the children are connected; their lines are read and ignored.
        let mut inboxes: Vec<mpsc::Receiver<ToChild>> = Vec::with_capacity(g.ids.len());
        for (k, child) in g.ids.iter().enumerate() {
            let (tx, rx) = mpsc::channel(CHILD_QUEUE_MAX);
            let hello = ChildEvent::Connected {
                child: child.clone(),
                conn: k as u64,
                tx,
            };
            if events.send(hello).await.is_err() {
                return;
            }
            inboxes.push(rx);
        }
        let period = Duration::from_millis(g.interval_ms);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for rx in &mut inboxes {
                while rx.try_recv().is_ok() {}
            }
            if self.clock.elapsed_ms() >= g.until_ms {
                continue;
            }
            for (k, child) in g.ids.iter().enumerate() {
                let n = g.sent[k].load(Ordering::Relaxed) + 1;
                let mut obj = Map::new();
                obj.insert("seq".into(), Value::from(n));
                obj.insert(SEQ_METRIC.into(), Value::from(n));
                obj.insert(CHILD_METRIC.into(), Value::from(k as u64));
                let msg = ChildEvent::Message {
                    child: child.clone(),
                    conn: k as u64,
                    msg: ChildMsg::Telemetry(obj),
                };
                if events.send(msg).await.is_err() {
                    return; // the agent stopped: this message was never handed over
                }
                g.sent[k].store(n, Ordering::Relaxed);
                inc(&self.stats.children_telemetry_sent);
            }
        }
    }
}
