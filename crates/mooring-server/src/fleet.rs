//! Fleet statistics (issue 15): the summary of a selection (devices, online, per firmware
//! version) and the fleet's history, one sample per node per `[fleet] sample_interval_ms`.
//!
//! The summary is two store queries ([`mooring_store::DeviceStore::count_device_versions`]:
//! the selection, and the selection's online devices), the selector narrowed by the caller's
//! scope. The history is what every node's sampler ([`run_sampler`]) recorded: per interval
//! the registered devices, the device sessions on the node, and the telemetry points it stored
//! and MQTT PUBLISH packets it received since its previous sample (its counters); the store
//! sums the nodes per interval. Samples older than [`FLEET_HISTORY_WINDOW_MS_MAX`] are pruned
//! by the same task, in bounded deletes.

use crate::access::Access;
use crate::app::Core;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::registry::Registry;
use mooring_api::{FleetHistory, FleetSamplePoint, FleetSummary, VersionCount};
use mooring_proto::selector::Term;
use mooring_store::FleetSample;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The longest history window a caller may ask for, and how long samples are kept.
pub const FLEET_HISTORY_WINDOW_MS_MAX: u64 = 7 * 24 * 3600 * 1000;
/// The history window when the caller names none.
pub const FLEET_HISTORY_WINDOW_MS_DEFAULT: u64 = 24 * 3600 * 1000;
/// Most samples one history answer holds (7 days at the default minute); with a shorter
/// interval, the newest.
pub const FLEET_HISTORY_LEN_MAX: usize = 10_080;
/// Samples one prune deletes at most.
pub const FLEET_PRUNE_ROWS_MAX: usize = 1000;

/// The fleet statistics service.
pub struct Fleet {
    core: Arc<Core>,
    registry: Arc<Registry>,
}

impl Fleet {
    pub(crate) fn new(core: Arc<Core>, registry: Arc<Registry>) -> Self {
        Self { core, registry }
    }

    /// The devices `selector` matches within `access`: how many, how many online, how many
    /// per reported version (the [`mooring_api::FLEET_VERSIONS_MAX`] most common).
    pub async fn summary(
        &self,
        access: &Access,
        selector: Option<&str>,
    ) -> ServiceResult<FleetSummary> {
        let sel = access.selection(selector)?;
        let generated_ms = self.core.now_ms();
        let counts = self
            .core
            .store
            .count_device_versions(
                &self.registry.filter_of(&sel),
                mooring_api::FLEET_VERSIONS_MAX,
            )
            .await?;
        let mut online_sel = sel.clone();
        if !online_sel.terms.contains(&Term::Online) {
            online_sel.terms.push(Term::Online);
        }
        let online = self
            .core
            .store
            .count_device_versions(&self.registry.filter_of(&online_sel), 0)
            .await?
            .total;
        let listed: u64 = counts.versions.iter().map(|(_, n)| n).sum();
        Ok(FleetSummary {
            selector: selector.map(str::to_owned),
            devices: counts.total,
            online,
            versions_other: counts.total.saturating_sub(listed),
            versions: counts
                .versions
                .into_iter()
                .map(|(version, devices)| VersionCount { version, devices })
                .collect(),
            generated_ms,
        })
    }

    /// The fleet's samples in `[from_ms, to_ms)` (default: the last 24 h), summed over nodes.
    /// Fleet-wide, so a scoped caller is refused (`fleet_wide`).
    pub async fn history(
        &self,
        access: &Access,
        from_ms: Option<u64>,
        to_ms: Option<u64>,
    ) -> ServiceResult<FleetHistory> {
        if access.scope().is_some() {
            return Err(ServiceError::new(
                ErrorKind::Forbidden,
                "fleet_wide",
                "the fleet history counts every device: a caller with a scope cannot read it",
            ));
        }
        let to_ms = to_ms.unwrap_or_else(|| self.core.now_ms().saturating_add(1));
        let from_ms =
            from_ms.unwrap_or_else(|| to_ms.saturating_sub(FLEET_HISTORY_WINDOW_MS_DEFAULT));
        if from_ms > to_ms {
            return Err(ServiceError::invalid(
                "invalid_window",
                "from_ms must not be after to_ms",
            ));
        }
        if to_ms - from_ms > FLEET_HISTORY_WINDOW_MS_MAX {
            return Err(ServiceError::invalid(
                "invalid_window",
                "the window is at most 7 days (604800000 ms)",
            ));
        }
        let samples = self
            .core
            .store
            .fleet_totals(from_ms, to_ms, FLEET_HISTORY_LEN_MAX)
            .await?;
        Ok(FleetHistory {
            step_ms: self.core.config.fleet.sample_interval_ms,
            samples: samples
                .into_iter()
                .map(|t| FleetSamplePoint {
                    ts_ms: t.ts_ms,
                    devices: t.devices,
                    online: t.online,
                    points: t.points,
                    messages: t.messages,
                })
                .collect(),
        })
    }

    /// Records this node's sample for the interval starting at `ts_ms`, with the counts since
    /// `last` (the counters at the previous sample), and returns the counters now.
    async fn sample(&self, ts_ms: u64, last: (u64, u64)) -> ServiceResult<(u64, u64)> {
        let now = self.counters_now();
        let devices = self
            .core
            .store
            .count_device_versions(&mooring_store::DeviceFilter::default(), 0)
            .await?
            .total;
        self.core
            .store
            .record_fleet_sample(FleetSample {
                node_id: self.core.config.node_id.clone(),
                ts_ms,
                devices,
                online: self.registry.presence().online_count() as u64,
                points: now.0.saturating_sub(last.0),
                messages: now.1.saturating_sub(last.1),
            })
            .await?;
        Ok(now)
    }

    /// This node's counters the samples difference: telemetry points stored, MQTT PUBLISH
    /// received.
    fn counters_now(&self) -> (u64, u64) {
        let counters = &self.core.counters;
        (
            counters.telemetry_points.load(Ordering::Relaxed),
            counters.mqtt_publishes_received.load(Ordering::Relaxed),
        )
    }

    async fn prune(&self) -> ServiceResult<u64> {
        let before = self
            .core
            .now_ms()
            .saturating_sub(FLEET_HISTORY_WINDOW_MS_MAX);
        Ok(self
            .core
            .store
            .prune_fleet_samples(before, FLEET_PRUNE_ROWS_MAX)
            .await?)
    }
}

/// Every `[fleet] sample_interval_ms`, at the interval's boundaries (unix time, so every
/// node's sample of one interval has the same `ts_ms`): records this node's sample of the
/// interval that just ended, then prunes samples older than 7 days. Ends when `stop` changes.
pub(crate) async fn run_sampler(fleet: Arc<Fleet>, mut stop: watch::Receiver<bool>) {
    let period_ms = fleet.core.config.fleet.sample_interval_ms.max(1);
    let mut last = fleet.counters_now();
    let to_boundary = period_ms - fleet.core.now_ms() % period_ms;
    let start = tokio::time::Instant::now() + Duration::from_millis(to_boundary);
    let mut tick = tokio::time::interval_at(start, Duration::from_millis(period_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        // The boundary nearest now ends the interval this sample covers.
        let now = fleet.core.now_ms();
        let boundary = (now + period_ms / 2) / period_ms * period_ms;
        let ts_ms = boundary.saturating_sub(period_ms);
        match fleet.sample(ts_ms, last).await {
            Ok(now) => last = now,
            Err(e) => {
                tracing::warn!(error = %e.message, "fleet sample failed; its counts go into the next")
            }
        }
        if let Err(e) = fleet.prune().await {
            tracing::warn!(error = %e.message, "pruning old fleet samples failed");
        }
    }
}
