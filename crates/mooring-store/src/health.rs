//! Per-device health signals (issue 18): what the server already sees of a device, kept
//! incrementally so no evaluation scans the telemetry table.
//!
//! A node accumulates a [`HealthDelta`] per device from the events it originates (presence,
//! telemetry, command outcomes, shadow reports, update reports) and flushes them every
//! `[health] flush_interval_ms` with [`crate::HealthStore::merge_device_health`], which folds
//! each delta into the stored [`DeviceHealth`] with [`DeviceHealth::apply`] inside one
//! transaction (read, apply, write), so nodes' deltas for one device add up.
//!
//! Counts are kept twice: since the record started (`totals`) and per hour for the last
//! [`HEALTH_WINDOW_HOURS`] hours (`hours`), the window every rate is computed over. The record
//! is stored as JSON (serde here is the storage encoding, unlike the plain records of
//! [`crate::model`]); unknown fields are ignored and missing ones default, so the format can
//! grow without a migration.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Hours of per-hour counts kept: the window of every rate.
pub const HEALTH_WINDOW_HOURS: usize = 24;
/// One hour in milliseconds.
pub const HOUR_MS: u64 = 3_600_000;
/// Battery samples one delta keeps (the newest).
pub const BATTERY_SAMPLES_MAX: usize = 16;
/// The battery trend is a slope over at least this long (shorter steps wait for more).
pub const BATTERY_TREND_STEP_MS: u64 = 10 * 60 * 1000;
/// Most restarts (or crashes) one increase of the agent's reported counts adds: the counts come
/// from the device, and a device that jumps them by 2^40 must not swamp its cohort's totals.
pub const AGENT_STEP_MAX: u64 = 1000;

/// Weight of the newest slope in the battery trend (an exponentially weighted mean).
const BATTERY_TREND_WEIGHT: f64 = 0.3;

/// Counts of the failure signals (and connects), per hour or in total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HealthCounts {
    /// Sessions opened.
    pub connects: u64,
    /// Sessions closed.
    pub disconnects: u64,
    /// Telemetry resumed after more than `[health] telemetry_gap_ms` of silence.
    pub telemetry_gaps: u64,
    /// Commands that ended `failed`.
    pub command_failures: u64,
    /// Commands that ended `expired` (never answered in time).
    pub command_timeouts: u64,
    /// Agent starts beyond the first (from the shadow's `reported.agent.boots`).
    pub restarts: u64,
    /// Starts after a stop that was not clean (`reported.agent.unclean_stops`).
    pub crashes: u64,
    /// Updates the device rolled back.
    pub update_rollbacks: u64,
    /// Updates that failed before switching.
    pub update_failures: u64,
}

impl HealthCounts {
    /// Adds `o` (saturating: a count never wraps).
    pub fn add(&mut self, o: &HealthCounts) {
        let add = |a: &mut u64, b: u64| *a = a.saturating_add(b);
        add(&mut self.connects, o.connects);
        add(&mut self.disconnects, o.disconnects);
        add(&mut self.telemetry_gaps, o.telemetry_gaps);
        add(&mut self.command_failures, o.command_failures);
        add(&mut self.command_timeouts, o.command_timeouts);
        add(&mut self.restarts, o.restarts);
        add(&mut self.crashes, o.crashes);
        add(&mut self.update_rollbacks, o.update_rollbacks);
        add(&mut self.update_failures, o.update_failures);
    }

    pub fn is_zero(&self) -> bool {
        *self == HealthCounts::default()
    }
}

/// The counts of one hour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HourCounts {
    /// The hour's start (unix ms, a multiple of [`HOUR_MS`]).
    pub start_ms: u64,
    #[serde(flatten)]
    pub counts: HealthCounts,
}

/// The battery: the newest level, and its trend in level units per hour.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Battery {
    pub level: f64,
    pub at_ms: u64,
    /// Exponentially weighted mean of the slopes between samples at least
    /// [`BATTERY_TREND_STEP_MS`] apart; `None` until two such samples.
    pub trend_per_hour: Option<f64>,
    /// The sample the next slope starts from.
    pub anchor_level: f64,
    pub anchor_ms: u64,
}

impl Battery {
    fn sample(this: &mut Option<Battery>, at_ms: u64, level: f64) {
        if !level.is_finite() {
            return;
        }
        let Some(b) = this else {
            *this = Some(Battery {
                level,
                at_ms,
                trend_per_hour: None,
                anchor_level: level,
                anchor_ms: at_ms,
            });
            return;
        };
        if at_ms < b.at_ms {
            return; // older than what is known
        }
        b.level = level;
        b.at_ms = at_ms;
        let step_ms = at_ms - b.anchor_ms;
        if step_ms >= BATTERY_TREND_STEP_MS {
            let slope = (level - b.anchor_level) / (step_ms as f64 / HOUR_MS as f64);
            b.trend_per_hour = Some(match b.trend_per_hour {
                None => slope,
                Some(t) => (1.0 - BATTERY_TREND_WEIGHT) * t + BATTERY_TREND_WEIGHT * slope,
            });
            b.anchor_level = level;
            b.anchor_ms = at_ms;
        }
    }
}

/// The newest `diagnostics` command that ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiagnosticsRef {
    pub command_id: String,
    /// `succeeded`, `failed` or `expired`.
    pub state: String,
    pub at_ms: u64,
}

/// The newest update that rolled back or failed on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRef {
    pub deployment_id: String,
    pub version: String,
    /// `rolled_back` or `failed`.
    pub state: String,
    pub reason: Option<String>,
    pub at_ms: u64,
}

/// One device's health record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceHealth {
    /// When the first signal was recorded (rates count hours from here, at most the window).
    pub since_ms: u64,
    /// When a delta was last applied.
    pub updated_ms: u64,
    pub totals: HealthCounts,
    /// Per-hour counts, oldest first, at most [`HEALTH_WINDOW_HOURS`] hours before the newest.
    pub hours: Vec<HourCounts>,
    /// Time online in sessions that ended.
    pub online_ms: u64,
    /// When the open session started (`None`: no session open, as far as deltas said).
    pub online_since_ms: Option<u64>,
    /// When the newest session change applied happened (an older one from another node's
    /// late flush does not undo it).
    pub session_changed_ms: u64,
    /// When the agent's counts applied were reported.
    pub agent_at_ms: u64,
    pub last_telemetry_ms: Option<u64>,
    /// The longest silence between two telemetry messages.
    pub longest_gap_ms: u64,
    pub battery: Option<Battery>,
    /// The newest `reported.agent.boots` / `unclean_stops`.
    pub boots: Option<u64>,
    pub unclean_stops: Option<u64>,
    pub last_diagnostics: Option<DiagnosticsRef>,
    pub last_update_problem: Option<UpdateRef>,
}

/// What one node saw of one device since its last flush.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HealthDelta {
    pub device_id: String,
    /// When the first event in this delta happened.
    pub first_ms: u64,
    /// Counts per hour start.
    pub hours: BTreeMap<u64, HealthCounts>,
    /// Time online of sessions that opened and closed on this node.
    pub online_ms: u64,
    /// The newest session change: (when, opened).
    pub session: Option<(u64, bool)>,
    /// The first and newest telemetry in this delta (server time), and the longest silence
    /// between two of them.
    pub telemetry_first_ms: Option<u64>,
    pub telemetry_last_ms: Option<u64>,
    pub longest_gap_ms: u64,
    /// Battery samples (server time, level), oldest first, at most [`BATTERY_SAMPLES_MAX`].
    pub battery: Vec<(u64, f64)>,
    /// The agent's start counts (`reported.agent.boots` / `unclean_stops`): the first this
    /// delta saw (what the stored count is compared with) and the newest (the new base).
    /// Increases between the two are counted in `hours` as they are seen.
    pub boots_first: Option<u64>,
    pub boots: Option<u64>,
    pub unclean_stops_first: Option<u64>,
    pub unclean_stops: Option<u64>,
    /// When the first and the newest of those counts were reported.
    pub agent_first_ms: u64,
    pub agent_last_ms: u64,
    pub diagnostics: Option<DiagnosticsRef>,
    pub update_problem: Option<UpdateRef>,
}

/// Refuses a batch over [`crate::HEALTH_BATCH_LEN_MAX`].
pub(crate) fn check_batch(len: usize) -> crate::Result<()> {
    if len > crate::HEALTH_BATCH_LEN_MAX {
        return Err(crate::StoreError::InvalidInput(format!(
            "at most {} health records at once, got {len}",
            crate::HEALTH_BATCH_LEN_MAX
        )));
    }
    Ok(())
}

/// The start of the hour `at_ms` is in.
pub fn hour_of(at_ms: u64) -> u64 {
    at_ms - at_ms % HOUR_MS
}

impl HealthDelta {
    pub fn new(device_id: &str, at_ms: u64) -> Self {
        HealthDelta {
            device_id: device_id.to_owned(),
            first_ms: at_ms,
            ..HealthDelta::default()
        }
    }

    /// Adds counts at `at_ms`.
    pub fn count(&mut self, at_ms: u64, f: impl FnOnce(&mut HealthCounts)) {
        f(self.hours.entry(hour_of(at_ms)).or_default());
    }

    /// Telemetry stored at `at_ms`; counts a gap if the previous one in this delta was more
    /// than `gap_ms` before.
    pub fn telemetry(&mut self, at_ms: u64, gap_ms: u64) {
        if let Some(last) = self.telemetry_last_ms {
            let gap = at_ms.saturating_sub(last);
            self.longest_gap_ms = self.longest_gap_ms.max(gap);
            if gap > gap_ms {
                self.count(at_ms, |c| c.telemetry_gaps += 1);
            }
        }
        self.telemetry_first_ms.get_or_insert(at_ms);
        self.telemetry_last_ms = Some(self.telemetry_last_ms.map_or(at_ms, |t| t.max(at_ms)));
    }

    /// The agent reported its start counts at `at_ms`.
    pub fn agent_counts(&mut self, at_ms: u64, boots: Option<u64>, unclean_stops: Option<u64>) {
        if boots.is_none() && unclean_stops.is_none() {
            return;
        }
        if self.boots.is_none() && self.unclean_stops.is_none() {
            self.agent_first_ms = at_ms;
        }
        self.agent_last_ms = self.agent_last_ms.max(at_ms);
        if let Some(b) = boots {
            match self.boots {
                Some(old) if b > old => {
                    self.count(at_ms, |c| c.restarts += (b - old).min(AGENT_STEP_MAX))
                }
                Some(_) => {}
                None => self.boots_first = Some(b),
            }
            self.boots = Some(b);
        }
        if let Some(u) = unclean_stops {
            match self.unclean_stops {
                Some(old) if u > old => {
                    self.count(at_ms, |c| c.crashes += (u - old).min(AGENT_STEP_MAX))
                }
                Some(_) => {}
                None => self.unclean_stops_first = Some(u),
            }
            self.unclean_stops = Some(u);
        }
    }

    /// Folds a newer delta of the same device into this one (a failed flush's delta, put back
    /// under what arrived meanwhile).
    pub fn absorb(&mut self, newer: HealthDelta) {
        self.first_ms = self.first_ms.min(newer.first_ms);
        for (start, counts) in newer.hours {
            self.hours.entry(start).or_default().add(&counts);
        }
        self.online_ms = self.online_ms.saturating_add(newer.online_ms);
        if newer.session.is_some() {
            self.session = newer.session;
        }
        if let (Some(last), Some(first)) = (self.telemetry_last_ms, newer.telemetry_first_ms) {
            self.longest_gap_ms = self.longest_gap_ms.max(first.saturating_sub(last));
        }
        self.telemetry_first_ms = self.telemetry_first_ms.or(newer.telemetry_first_ms);
        self.telemetry_last_ms = self.telemetry_last_ms.max(newer.telemetry_last_ms);
        self.longest_gap_ms = self.longest_gap_ms.max(newer.longest_gap_ms);
        for (at, level) in newer.battery {
            self.battery(at, level);
        }
        // The newer delta's first counts, then its newest (its own increases are in its hours).
        self.agent_counts(
            newer.agent_first_ms,
            newer.boots_first,
            newer.unclean_stops_first,
        );
        self.agent_last_ms = self.agent_last_ms.max(newer.agent_last_ms);
        if newer.boots.is_some() {
            self.boots = newer.boots;
        }
        if newer.unclean_stops.is_some() {
            self.unclean_stops = newer.unclean_stops;
        }
        self.diagnostics = newer.diagnostics.or(self.diagnostics.take());
        self.update_problem = newer.update_problem.or(self.update_problem.take());
    }

    pub fn battery(&mut self, at_ms: u64, level: f64) {
        if self.battery.len() >= BATTERY_SAMPLES_MAX {
            self.battery.remove(0);
        }
        self.battery.push((at_ms, level));
    }
}

impl DeviceHealth {
    /// Folds a delta in. `gap_ms`: a silence longer than this between the stored newest
    /// telemetry and the delta's first counts as a telemetry gap.
    pub fn apply(&mut self, d: &HealthDelta, gap_ms: u64) {
        if self.since_ms == 0 || d.first_ms < self.since_ms {
            self.since_ms = d.first_ms;
        }
        let mut hours = d.hours.clone();
        if let (Some(stored), Some(first)) = (self.last_telemetry_ms, d.telemetry_first_ms) {
            let gap = first.saturating_sub(stored);
            self.longest_gap_ms = self.longest_gap_ms.max(gap);
            if gap > gap_ms {
                hours.entry(hour_of(first)).or_default().telemetry_gaps += 1;
            }
        }
        self.longest_gap_ms = self.longest_gap_ms.max(d.longest_gap_ms);
        if let Some(last) = d.telemetry_last_ms {
            self.last_telemetry_ms = Some(self.last_telemetry_ms.map_or(last, |t| t.max(last)));
        }
        // Restarts and crashes: increases of the agent's own counts (a smaller count is a new
        // state directory: a new base, nothing counted).
        // A delta reported before what is stored (another node's late flush) neither counts
        // against the stored counts nor replaces them.
        let now_hour = hour_of(d.agent_first_ms);
        if d.agent_first_ms >= self.agent_at_ms {
            if let (Some(first), Some(old)) = (d.boots_first, self.boots) {
                if first > old {
                    hours.entry(now_hour).or_default().restarts +=
                        (first - old).min(AGENT_STEP_MAX);
                }
            }
            if let (Some(first), Some(old)) = (d.unclean_stops_first, self.unclean_stops) {
                if first > old {
                    hours.entry(now_hour).or_default().crashes += (first - old).min(AGENT_STEP_MAX);
                }
            }
        }
        if (d.boots.is_some() || d.unclean_stops.is_some()) && d.agent_last_ms >= self.agent_at_ms {
            self.boots = d.boots.or(self.boots);
            self.unclean_stops = d.unclean_stops.or(self.unclean_stops);
            self.agent_at_ms = d.agent_last_ms;
        }
        for (start, counts) in hours {
            self.totals.add(&counts);
            match self.hours.binary_search_by_key(&start, |h| h.start_ms) {
                Ok(i) => self.hours[i].counts.add(&counts),
                Err(i) => self.hours.insert(
                    i,
                    HourCounts {
                        start_ms: start,
                        counts,
                    },
                ),
            }
        }
        if let Some(newest) = self.hours.last().map(|h| h.start_ms) {
            let oldest_kept = newest.saturating_sub((HEALTH_WINDOW_HOURS as u64 - 1) * HOUR_MS);
            self.hours.retain(|h| h.start_ms >= oldest_kept);
        }
        self.online_ms = self.online_ms.saturating_add(d.online_ms);
        if let Some((at, opened)) = d.session {
            if at >= self.session_changed_ms {
                self.session_changed_ms = at;
                self.online_since_ms = opened.then_some(at);
            }
        }
        for &(at, level) in &d.battery {
            Battery::sample(&mut self.battery, at, level);
        }
        if let Some(diag) = &d.diagnostics {
            if self
                .last_diagnostics
                .as_ref()
                .is_none_or(|o| o.at_ms <= diag.at_ms)
            {
                self.last_diagnostics = Some(diag.clone());
            }
        }
        if let Some(u) = &d.update_problem {
            if self
                .last_update_problem
                .as_ref()
                .is_none_or(|o| o.at_ms <= u.at_ms)
            {
                self.last_update_problem = Some(u.clone());
            }
        }
        self.updated_ms = self.updated_ms.max(d.first_ms);
    }

    /// The counts of the hours that start at or after `from_ms`.
    pub fn counts_since(&self, from_ms: u64) -> HealthCounts {
        let mut sum = HealthCounts::default();
        for h in self.hours.iter().filter(|h| h.start_ms >= from_ms) {
            sum.add(&h.counts);
        }
        sum
    }

    /// The window at `now_ms`: the counts of the last [`HEALTH_WINDOW_HOURS`] hours (this one
    /// included) and the hours of it the record covers (at least a minute's worth).
    pub fn window(&self, now_ms: u64) -> (HealthCounts, f64) {
        let from = hour_of(now_ms).saturating_sub((HEALTH_WINDOW_HOURS as u64 - 1) * HOUR_MS);
        let start = from.max(self.since_ms).min(now_ms);
        let hours = ((now_ms - start) as f64 / HOUR_MS as f64).max(1.0 / 60.0);
        (self.counts_since(from), hours)
    }

    /// Time online, the open session included.
    pub fn online_ms_at(&self, now_ms: u64) -> u64 {
        self.online_ms + self.online_since_ms.map_or(0, |t| now_ms.saturating_sub(t))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }

    /// The stored JSON; a record that cannot be read starts again (health is advisory).
    pub fn from_json(text: &str) -> DeviceHealth {
        serde_json::from_str(text).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GAP: u64 = 15 * 60 * 1000;

    #[test]
    fn deltas_add_up_per_hour_and_the_window_drops_old_hours() {
        let mut h = DeviceHealth::default();
        for hour in 0..30u64 {
            let at = 1_000 * HOUR_MS + hour * HOUR_MS + 5;
            let mut d = HealthDelta::new("d", at);
            d.count(at, |c| c.connects += 2);
            h.apply(&d, GAP);
        }
        assert_eq!(h.totals.connects, 60);
        assert_eq!(h.hours.len(), HEALTH_WINDOW_HOURS);
        let now = 1_000 * HOUR_MS + 29 * HOUR_MS + 30 * 60 * 1000;
        let (w, hours) = h.window(now);
        assert_eq!(w.connects, 48);
        assert!((hours - 23.5).abs() < 1e-9, "{hours}");
    }

    #[test]
    fn a_gap_spans_deltas_and_within_one() {
        let mut h = DeviceHealth::default();
        let mut d = HealthDelta::new("d", 0);
        d.telemetry(HOUR_MS, GAP);
        d.telemetry(HOUR_MS + 60_000, GAP);
        d.telemetry(HOUR_MS + 60_000 + GAP + 1, GAP);
        h.apply(&d, GAP);
        assert_eq!(h.totals.telemetry_gaps, 1);
        let mut d = HealthDelta::new("d", 3 * HOUR_MS);
        d.telemetry(3 * HOUR_MS, GAP);
        h.apply(&d, GAP);
        assert_eq!(h.totals.telemetry_gaps, 2);
        assert_eq!(h.longest_gap_ms, 3 * HOUR_MS - (HOUR_MS + 60_000 + GAP + 1));
        assert_eq!(h.last_telemetry_ms, Some(3 * HOUR_MS));
    }

    #[test]
    fn restarts_and_crashes_are_increases_of_the_agents_counts() {
        let mut h = DeviceHealth::default();
        let delta = |reports: &[(u64, u64)]| {
            let mut d = HealthDelta::new("d", HOUR_MS);
            for &(b, u) in reports {
                d.agent_counts(HOUR_MS, Some(b), Some(u));
            }
            d
        };
        h.apply(&delta(&[(5, 1)]), GAP);
        assert_eq!((h.totals.restarts, h.totals.crashes), (0, 0));
        h.apply(&delta(&[(8, 3)]), GAP);
        assert_eq!((h.totals.restarts, h.totals.crashes), (3, 2));
        // Several reports in one delta: each increase counts once.
        h.apply(&delta(&[(9, 3), (11, 4)]), GAP);
        assert_eq!((h.totals.restarts, h.totals.crashes), (6, 3));
        // A new state directory: a new base.
        h.apply(&delta(&[(1, 0)]), GAP);
        h.apply(&delta(&[(2, 0)]), GAP);
        assert_eq!((h.totals.restarts, h.totals.crashes), (7, 3));
        // A failed flush's delta put back under a newer one adds up the same.
        let mut older = delta(&[(3, 0), (4, 1)]);
        older.absorb(delta(&[(6, 1), (7, 2)]));
        h.apply(&older, GAP);
        assert_eq!((h.totals.restarts, h.totals.crashes), (12, 5));
        assert_eq!((h.boots, h.unclean_stops), (Some(7), Some(2)));
    }

    #[test]
    fn a_device_cannot_jump_its_counts_past_the_step() {
        let mut h = DeviceHealth::default();
        let mut d = HealthDelta::new("d", HOUR_MS);
        d.agent_counts(HOUR_MS, Some(0), Some(0));
        d.agent_counts(HOUR_MS, Some(1 << 41), Some(u64::MAX));
        h.apply(&d, GAP);
        let mut d = HealthDelta::new("d", 2 * HOUR_MS);
        d.agent_counts(2 * HOUR_MS, Some(0), Some(0));
        d.agent_counts(2 * HOUR_MS, Some(u64::MAX), Some(u64::MAX));
        h.apply(&d, GAP);
        assert_eq!(
            (h.totals.restarts, h.totals.crashes),
            (2 * AGENT_STEP_MAX, 2 * AGENT_STEP_MAX)
        );
        // A late delta from another node (reported before what is stored) changes nothing.
        let mut late = HealthDelta::new("d", HOUR_MS / 2);
        late.agent_counts(HOUR_MS / 2, Some(3), Some(3));
        h.apply(&late, GAP);
        assert_eq!(h.boots, Some(u64::MAX));
    }

    #[test]
    fn battery_trend_is_the_slope_per_hour() {
        let mut h = DeviceHealth::default();
        let mut d = HealthDelta::new("d", 0);
        for i in 0..=6u64 {
            // -2 per hour, a sample every 20 minutes.
            d.battery(i * 20 * 60 * 1000, 80.0 - 2.0 * (i as f64) / 3.0);
        }
        h.apply(&d, GAP);
        let b = h.battery.expect("battery");
        assert!((b.level - 76.0).abs() < 1e-9);
        let trend = b.trend_per_hour.expect("trend");
        assert!((trend + 2.0).abs() < 1e-9, "{trend}");
    }

    #[test]
    fn online_time_counts_the_open_session() {
        let mut h = DeviceHealth::default();
        h.apply(
            &HealthDelta {
                session: Some((1_000, true)),
                ..HealthDelta::new("d", 1_000)
            },
            GAP,
        );
        assert_eq!(h.online_ms_at(61_000), 60_000);
        h.apply(
            &HealthDelta {
                online_ms: 60_000,
                session: Some((61_000, false)),
                ..HealthDelta::new("d", 61_000)
            },
            GAP,
        );
        assert_eq!(h.online_ms_at(1_000_000), 60_000);
        assert_eq!(DeviceHealth::from_json(&h.to_json()), h);
        assert_eq!(DeviceHealth::from_json("not json"), DeviceHealth::default());
    }
}
