//! Evaluating a condition for one device, one message at a time. The caller keeps a
//! [`DeviceState`] per (rule, device) and feeds it points, events and clock ticks; a [`Change`]
//! comes back when the condition starts or stops holding. Nothing here grows with what the
//! device sends: a rate keeps at most [`RATE_POINTS_MAX`] samples, a count at most its
//! threshold plus one event times.

use crate::{Condition, Event, Op};
use std::collections::VecDeque;

/// Samples a `rate(...)` condition keeps per device (spread over its window).
pub const RATE_POINTS_MAX: usize = 32;

/// The condition started (`Fire`, with what was seen) or stopped (`Clear`) holding.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Fire { detail: String },
    Clear,
}

/// One device's progress through one rule's condition.
#[derive(Debug, Clone)]
pub struct DeviceState {
    firing: bool,
    /// When the state was made: absence and "fewer than" counts wait a full window from here.
    armed_ms: u64,
    /// A `for` condition: since when it holds (None: it does not now).
    since_ms: Option<u64>,
    /// An absence: the newest point seen (or `armed_ms`).
    last_ms: u64,
    /// A rate: (time, value) samples, oldest first; a count: event times.
    window: VecDeque<(u64, f64)>,
}

impl DeviceState {
    pub fn new(now_ms: u64) -> Self {
        Self {
            firing: false,
            armed_ms: now_ms,
            since_ms: None,
            last_ms: now_ms,
            window: VecDeque::new(),
        }
    }

    /// Whether the condition holds for this device now (an `on` condition never stays firing).
    pub fn firing(&self) -> bool {
        self.firing
    }

    /// Samples or event times kept (for tests and bounds).
    pub fn kept(&self) -> usize {
        self.window.len()
    }

    fn set(&mut self, holds: bool, detail: impl FnOnce() -> String) -> Option<Change> {
        match (holds, self.firing) {
            (true, false) => {
                self.firing = true;
                Some(Change::Fire { detail: detail() })
            }
            (false, true) => {
                self.firing = false;
                Some(Change::Clear)
            }
            _ => None,
        }
    }
}

fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

impl Condition {
    /// A telemetry point of `metric` (a number; booleans as 0/1) at `at_ms`.
    pub fn on_point(
        &self,
        st: &mut DeviceState,
        metric: &str,
        value: f64,
        at_ms: u64,
    ) -> Option<Change> {
        match self {
            Condition::Threshold {
                metric: m,
                op,
                threshold,
                for_ms,
            } if m == metric => {
                if !op.holds(value, *threshold) {
                    st.since_ms = None;
                    return st.set(false, String::new);
                }
                let since = *st.since_ms.get_or_insert(at_ms);
                let long_enough = at_ms.saturating_sub(since) >= *for_ms;
                if !long_enough {
                    return None;
                }
                st.set(true, || format!("{metric} = {} ({self})", num(value)))
            }
            Condition::Rate {
                metric: m,
                window_ms,
                op,
                threshold,
            } if m == metric => {
                if st.window.back().is_some_and(|(t, _)| at_ms < *t) {
                    return None; // out of order: a rate reads time forwards only
                }
                let horizon = at_ms.saturating_sub(*window_ms);
                while st.window.front().is_some_and(|(t, _)| *t < horizon) {
                    st.window.pop_front();
                }
                let spacing = window_ms / RATE_POINTS_MAX as u64;
                if st
                    .window
                    .back()
                    .is_none_or(|(t, _)| at_ms.saturating_sub(*t) >= spacing)
                {
                    st.window.push_back((at_ms, value));
                    if st.window.len() > RATE_POINTS_MAX {
                        st.window.pop_front();
                    }
                }
                let (t0, v0) = *st.window.front()?;
                let span = at_ms.saturating_sub(t0);
                if span.saturating_mul(2) < *window_ms || span == 0 {
                    return None; // not enough history yet: neither fire nor clear
                }
                let change = (value - v0) * (*window_ms as f64) / (span as f64);
                st.set(op.holds(change, *threshold), || {
                    format!(
                        "rate({metric}) = {} per {} ({self})",
                        num(change),
                        crate::parse::duration_text(*window_ms)
                    )
                })
            }
            Condition::Absent { metric: m, .. } if m.as_deref().is_none_or(|m| m == metric) => {
                st.last_ms = st.last_ms.max(at_ms);
                st.set(false, String::new)
            }
            _ => None,
        }
    }

    /// Something happened to the device at `at_ms`.
    pub fn on_event(&self, st: &mut DeviceState, event: Event, at_ms: u64) -> Option<Change> {
        match self {
            Condition::On { event: e } if *e == event => Some(Change::Fire {
                detail: format!("{} ({self})", event.as_str()),
            }),
            Condition::Count {
                event: e,
                threshold,
                ..
            } if *e == event => {
                st.window.push_back((at_ms, 0.0));
                // Only whether the count passes the threshold matters: keep threshold + 1.
                let keep = (*threshold as usize).saturating_add(1);
                while st.window.len() > keep {
                    st.window.pop_front();
                }
                self.count_now(st, at_ms)
            }
            _ => None,
        }
    }

    /// The clock moved to `now_ms` (call it every few seconds for the conditions that
    /// [`Condition::needs_tick`]): a `for` or an absence that ran out, a count whose events aged.
    pub fn tick(&self, st: &mut DeviceState, now_ms: u64) -> Option<Change> {
        match self {
            Condition::Threshold { for_ms, .. } if *for_ms > 0 => {
                let since = st.since_ms?;
                if st.firing || now_ms.saturating_sub(since) < *for_ms {
                    return None;
                }
                st.set(true, || {
                    format!("held since {} ms ago ({self})", now_ms - since)
                })
            }
            Condition::Absent { for_ms, .. } => {
                if now_ms.saturating_sub(st.last_ms) < *for_ms {
                    return None;
                }
                let gap_ms = now_ms - st.last_ms;
                st.set(true, || {
                    format!(
                        "nothing for {} ({self})",
                        crate::parse::duration_text(gap_ms)
                    )
                })
            }
            Condition::Count { .. } => self.count_now(st, now_ms),
            _ => None,
        }
    }

    fn count_now(&self, st: &mut DeviceState, now_ms: u64) -> Option<Change> {
        let Condition::Count {
            event,
            window_ms,
            op,
            threshold,
        } = self
        else {
            return None;
        };
        let horizon = now_ms.saturating_sub(*window_ms);
        while st.window.front().is_some_and(|(t, _)| *t < horizon) {
            st.window.pop_front();
        }
        let count = st.window.len() as f64;
        let holds = op.holds(count, *threshold);
        // "Fewer than" holds before anything happened: only once a whole window was watched.
        let watched =
            matches!(op, Op::Gt | Op::Ge) || now_ms.saturating_sub(st.armed_ms) >= *window_ms;
        if holds && !watched {
            return None;
        }
        st.set(holds, || {
            format!(
                "{} {} times in {} ({self})",
                event.as_str(),
                num(count),
                crate::parse::duration_text(*window_ms)
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    fn fires(c: Option<Change>) -> bool {
        matches!(c, Some(Change::Fire { .. }))
    }

    #[test]
    fn a_threshold_with_for_fires_after_holding_that_long_and_clears_when_it_stops() {
        let c = Condition::parse("battery < 15 for 10m").expect("parse");
        let mut st = DeviceState::new(0);
        assert_eq!(c.on_point(&mut st, "battery", 20.0, 0), None);
        assert_eq!(c.on_point(&mut st, "battery", 14.0, MIN), None);
        assert_eq!(c.on_point(&mut st, "battery", 13.0, 6 * MIN), None);
        // Another metric changes nothing.
        assert_eq!(c.on_point(&mut st, "temp", 99.0, 8 * MIN), None);
        assert!(fires(c.on_point(&mut st, "battery", 12.0, 11 * MIN)));
        assert!(st.firing());
        assert_eq!(c.on_point(&mut st, "battery", 11.0, 12 * MIN), None, "once");
        assert_eq!(
            c.on_point(&mut st, "battery", 30.0, 13 * MIN),
            Some(Change::Clear)
        );
        // A dip shorter than 10 minutes never fires, even on ticks.
        assert_eq!(c.on_point(&mut st, "battery", 10.0, 20 * MIN), None);
        assert_eq!(c.tick(&mut st, 25 * MIN), None);
        assert_eq!(c.on_point(&mut st, "battery", 50.0, 26 * MIN), None);
        assert_eq!(c.tick(&mut st, 40 * MIN), None);
    }

    #[test]
    fn a_for_runs_out_on_a_tick_when_the_device_goes_quiet_below_the_threshold() {
        let c = Condition::parse("battery < 15 for 10m").expect("parse");
        let mut st = DeviceState::new(0);
        assert_eq!(c.on_point(&mut st, "battery", 5.0, 0), None);
        assert_eq!(c.tick(&mut st, 9 * MIN), None);
        assert!(fires(c.tick(&mut st, 10 * MIN)));
        assert_eq!(c.tick(&mut st, 11 * MIN), None);
    }

    #[test]
    fn without_for_one_point_fires() {
        let c = Condition::parse("temp > 80").expect("parse");
        let mut st = DeviceState::new(0);
        assert!(fires(c.on_point(&mut st, "temp", 81.0, 1)));
        assert_eq!(c.on_point(&mut st, "temp", 80.0, 2), Some(Change::Clear));
    }

    #[test]
    fn absence_fires_after_silence_and_clears_on_the_next_point() {
        let c = Condition::parse("no telemetry for 30m").expect("parse");
        let mut st = DeviceState::new(0);
        assert_eq!(c.tick(&mut st, 29 * MIN), None);
        assert!(fires(c.tick(&mut st, 30 * MIN)));
        assert_eq!(
            c.on_point(&mut st, "anything", 1.0, 31 * MIN),
            Some(Change::Clear)
        );
        assert_eq!(c.tick(&mut st, 60 * MIN), None);
        assert!(fires(c.tick(&mut st, 61 * MIN)));
        let one = Condition::parse("no temp for 30m").expect("parse");
        let mut st = DeviceState::new(0);
        assert_eq!(one.on_point(&mut st, "battery", 1.0, 20 * MIN), None);
        assert!(
            fires(one.tick(&mut st, 30 * MIN)),
            "other metrics do not count"
        );
    }

    #[test]
    fn a_rate_fires_on_a_steady_drain_and_not_on_a_flat_or_short_history() {
        let c = Condition::parse("rate(battery, 1h) < -5").expect("parse");
        let mut st = DeviceState::new(0);
        // Flat for two hours: nothing.
        for i in 0..120 {
            assert_eq!(c.on_point(&mut st, "battery", 80.0, i * MIN), None);
        }
        // Then 10 points per hour down: fires once half an hour of the drop is in the window.
        let mut fired_at = None;
        for i in 0..60 {
            let v = 80.0 - 10.0 * (i as f64) / 60.0;
            if fires(c.on_point(&mut st, "battery", v, (120 + i) * MIN)) {
                fired_at = Some(i);
                break;
            }
        }
        let at = fired_at.expect("a drain of 10 per hour fires rate < -5");
        assert!((25..=45).contains(&at), "fired after {at} min");
        assert!(st.kept() <= RATE_POINTS_MAX);
        // A fresh device with only minutes of history does not fire, however steep.
        let mut fresh = DeviceState::new(0);
        assert_eq!(c.on_point(&mut fresh, "battery", 90.0, 0), None);
        assert_eq!(c.on_point(&mut fresh, "battery", 50.0, 5 * MIN), None);
    }

    #[test]
    fn a_count_fires_past_its_threshold_and_clears_as_events_age() {
        let c = Condition::parse("count(disconnected, 1h) > 3").expect("parse");
        let mut st = DeviceState::new(0);
        for i in 0..3 {
            assert_eq!(c.on_event(&mut st, Event::Disconnected, i * MIN), None);
        }
        assert_eq!(c.on_event(&mut st, Event::Connected, 4 * MIN), None);
        assert!(fires(c.on_event(&mut st, Event::Disconnected, 5 * MIN)));
        assert!(st.kept() <= 4);
        assert_eq!(c.tick(&mut st, 30 * MIN), None);
        assert_eq!(c.tick(&mut st, 61 * MIN), Some(Change::Clear));
        // "Fewer than" waits for a whole window of watching.
        let quiet = Condition::parse("count(connected, 1h) < 1").expect("parse");
        let mut st = DeviceState::new(0);
        assert_eq!(quiet.tick(&mut st, 30 * MIN), None);
        assert!(fires(quiet.tick(&mut st, 60 * MIN)));
    }

    #[test]
    fn on_fires_at_every_occurrence() {
        let c = Condition::parse("on update_rolled_back").expect("parse");
        let mut st = DeviceState::new(0);
        assert!(fires(c.on_event(&mut st, Event::UpdateRolledBack, 1)));
        assert!(fires(c.on_event(&mut st, Event::UpdateRolledBack, 2)));
        assert_eq!(c.on_event(&mut st, Event::CommandFailed, 3), None);
        assert!(!st.firing());
    }

    #[test]
    fn state_stays_bounded_whatever_the_device_sends() {
        let rate = Condition::parse("rate(x, 1d) > 1").expect("parse");
        let count = Condition::parse("count(command_failed, 1d) >= 1000").expect("parse");
        let mut a = DeviceState::new(0);
        let mut b = DeviceState::new(0);
        for i in 0..200_000u64 {
            rate.on_point(&mut a, "x", i as f64, i);
            count.on_event(&mut b, Event::CommandFailed, i);
        }
        assert!(a.kept() <= RATE_POINTS_MAX, "{}", a.kept());
        assert!(b.kept() <= 1001, "{}", b.kept());
        assert!(b.firing());
    }
}
