//! # mooring-health: is a cohort failing more than the rest of the fleet?
//!
//! The statistics behind fleet health's systemic detection (issue 18) and the rollout health
//! gate (issue 19). A caller counts one failure signal (disconnects, command failures, update
//! rollbacks) per cohort (devices sharing a hardware revision, firmware version, site, tag, or
//! a combination) and asks [`evaluate`] which cohorts are significantly and materially worse
//! than the rest of the fleet. One flagged cohort is one alert, rendered by
//! [`CohortTest::describe`]:
//!
//! ```text
//! hw=rev-b on 1.4.0: disconnects 6.2× fleet rate (n=412, p<0.001)
//! ```
//!
//! ```
//! use mooring_health::{evaluate, Cohort, Config, SignalKind};
//!
//! let cohort = |label: &str, devices: u64, events: u64, hours: f64| Cohort {
//!     label: label.to_owned(),
//!     devices,
//!     events,
//!     exposure: hours,
//! };
//! let cohorts = [
//!     cohort("hw=rev-a on 1.4.0", 3_000, 290, 72_000.0),
//!     cohort("hw=rev-b on 1.4.0", 412, 245, 9_888.0),
//!     cohort("hw=rev-b on 1.3.2", 1_800, 170, 43_200.0),
//! ];
//! let evaluation = evaluate("disconnects", SignalKind::Rate, &cohorts, &Config::default())?;
//! let alerts: Vec<String> = evaluation.flagged().iter().map(|t| t.describe()).collect();
//! assert_eq!(alerts, ["hw=rev-b on 1.4.0: disconnects 6.2× fleet rate (n=412, p<0.001)"]);
//! // The numbers of docs/health.md's worked example.
//! let bad = evaluation.flagged()[0];
//! assert!((bad.p_value / 7.353e-91 - 1.0).abs() < 1e-4);
//! assert!((bad.q_value / (3.0 * bad.p_value) - 1.0).abs() < 1e-12);
//! assert_eq!((bad.rest_events, bad.rest_exposure), (460, 115_200.0));
//! # Ok::<(), mooring_health::HealthError>(())
//! ```
//!
//! ## The test
//!
//! * A [`SignalKind::Rate`] (events per device-hour) is Poisson: given the `k1 + k2` events of
//!   the cohort and the rest, the cohort's `k1` is `Binomial(k1 + k2, e1 / (e1 + e2))` if the
//!   two rates are equal (`e` the exposures), so its p-value is that binomial's upper tail at
//!   `k1` (the conditional binomial test, exact).
//! * A [`SignalKind::Proportion`] (rollbacks of updates attempted) is binomial: Fisher's exact
//!   test, one-sided, the same idea (condition on the total events; the cohort's count is then
//!   hypergeometric).
//! * Cohorts under the minimums ([`Config::devices_min`], [`Config::exposure_min`]) are not
//!   tested. The p-values of those tested are adjusted together with Benjamini-Hochberg; a
//!   cohort is flagged if its q-value is <= [`Config::fdr_q`] (default 0.01) and its rate is at
//!   least [`Config::rate_ratio_min`] (default 1.5) times the rest's.
//!
//! [`compare`] is the same test for one cohort against a rest the caller chooses (the rollout
//! gate: the new version's devices against the old one's), without the FDR family.
//!
//! [`compare_values`] is the gate on a telemetry metric's values (`--gate battery.v`): one mean
//! per device, the updated devices against the control's, by the Mann-Whitney U test, failing
//! on a significant shift with a rank-biserial correlation of at least [`EFFECT_MIN_DEFAULT`]
//! the bad way ([`Worse`]).
//!
//! `dist` computes the tails exactly in log space (Loader's saddle-point masses, tails summed
//! from their largest term), so counts up to 2^53 neither overflow nor lose precision; `fdr` is
//! Benjamini-Hochberg. docs/health.md ("The cohort test") explains it all with a worked example.
//!
//! Invariants: pure (no I/O, no clock, no randomness, no threads) and deterministic: the same
//! input gives the same output, bit for bit. No input panics: invalid counts are a
//! [`HealthError`], and evaluation work is bounded ([`COHORTS_MAX`] cohorts, [`EVENTS_MAX`]
//! events, each cohort's tail at most about `4.5 * sqrt(fleet events)` steps).

mod cohort;
pub mod dist;
pub mod fdr;
mod values;

pub use cohort::{
    compare, evaluate, Cohort, CohortTest, Config, Evaluation, FleetTotals, HealthError, Outcome,
    SignalKind, SkipReason, Skipped, COHORTS_MAX, EVENTS_MAX,
};
pub use values::{
    compare_values, ValuesConfig, ValuesOutcome, ValuesTest, Worse, EFFECT_MIN_DEFAULT, VALUES_MAX,
};
