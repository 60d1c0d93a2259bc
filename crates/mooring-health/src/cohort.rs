//! The cohort test: each cohort's failure rate against the rest of the fleet, with FDR control.

use std::fmt;

use crate::dist::{binomial_upper_tail, hypergeometric_upper_tail, COUNT_MAX};
use crate::fdr::benjamini_hochberg;

/// The most cohorts one evaluation takes.
pub const COHORTS_MAX: usize = 100_000;

/// The most events (all cohorts together) one evaluation takes. A cohort's exact tail takes
/// at most about `4.5 * sqrt(fleet events)` steps (nine standard deviations), so at this bound
/// about 5 million, some milliseconds; a real fleet's window is orders of magnitude below it.
pub const EVENTS_MAX: u64 = 1 << 40;

/// What a signal counts, which decides the test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalKind {
    /// Events over an exposure in time (disconnects per device-hour): Poisson counts, compared
    /// with the conditional binomial test. `exposure` is any positive amount (device-hours).
    Rate,
    /// Events out of trials (updates rolled back of updates attempted): binomial counts,
    /// compared with Fisher's exact test. `exposure` is the number of trials, a whole number,
    /// and `events <= exposure`.
    Proportion,
}

/// One cohort's counts for one signal. The cohorts of one evaluation are the fleet: each device
/// is in exactly one of them (a partition, e.g. every hardware revision × firmware version).
#[derive(Debug, Clone, PartialEq)]
pub struct Cohort {
    /// How the cohort is named in findings, verbatim: `hw=rev-b on 1.4.0`.
    pub label: String,
    /// Devices in the cohort (the `n` of a finding).
    pub devices: u64,
    /// Failure events counted.
    pub events: u64,
    /// Device-hours (a [`SignalKind::Rate`]) or trials (a [`SignalKind::Proportion`]).
    pub exposure: f64,
}

/// When a cohort is flagged.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The false discovery rate Benjamini-Hochberg keeps across the cohorts tested in one
    /// evaluation: a cohort is flagged only if its q-value is <= this. In (0, 1].
    pub fdr_q: f64,
    /// Cohorts with fewer devices are not tested (and not counted in the FDR family).
    pub devices_min: u64,
    /// Cohorts with less exposure (device-hours or trials) are not tested. A cohort with no
    /// exposure is never tested, whatever this is.
    pub exposure_min: f64,
    /// A cohort is flagged only if its rate is at least this many times the rest of the
    /// fleet's, however small its p-value: a tiny difference in a huge fleet is no alert. >= 1.
    pub rate_ratio_min: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            fdr_q: 0.01,
            devices_min: 20,
            exposure_min: 0.0,
            rate_ratio_min: 1.5,
        }
    }
}

impl Config {
    /// Checks every bound; `evaluate` calls it first.
    pub fn validate(&self) -> Result<(), HealthError> {
        if !(self.fdr_q > 0.0 && self.fdr_q <= 1.0) {
            return Err(HealthError::Config(format!(
                "fdr_q must be in (0, 1], got {}",
                self.fdr_q
            )));
        }
        if !(self.exposure_min.is_finite() && self.exposure_min >= 0.0) {
            return Err(HealthError::Config(format!(
                "exposure_min must be a finite number >= 0, got {}",
                self.exposure_min
            )));
        }
        if !(self.rate_ratio_min.is_finite() && self.rate_ratio_min >= 1.0) {
            return Err(HealthError::Config(format!(
                "rate_ratio_min must be a finite number >= 1, got {}",
                self.rate_ratio_min
            )));
        }
        Ok(())
    }
}

/// Why an evaluation was refused. Nothing is evaluated when any input is invalid: a cohort
/// quietly left out could hide the very problem the evaluation looks for.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HealthError {
    #[error("invalid health test config: {0}")]
    Config(String),
    #[error("cohort {label:?}: {reason}")]
    Cohort { label: String, reason: String },
    #[error("{count} cohorts in one evaluation, over the maximum of {COHORTS_MAX}")]
    TooManyCohorts { count: usize },
    #[error("the fleet's {what}")]
    TooLarge { what: &'static str },
}

/// Why a cohort was not tested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Fewer devices than `devices_min`.
    TooFewDevices,
    /// No exposure, or less than `exposure_min`.
    TooLittleExposure,
    /// The other cohorts have no exposure: nothing to compare with.
    NoRestOfFleet,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SkipReason::TooFewDevices => "too few devices",
            SkipReason::TooLittleExposure => "too little exposure",
            SkipReason::NoRestOfFleet => "no rest of the fleet to compare with",
        })
    }
}

/// A cohort that was not tested, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    pub label: String,
    pub devices: u64,
    pub events: u64,
    pub exposure: f64,
    pub reason: SkipReason,
}

/// A tested cohort against the rest of the fleet. Its `Display` (and [`CohortTest::describe`])
/// is the alert line: `hw=rev-b on 1.4.0: disconnects 6.2× fleet rate (n=412, p<0.001)`.
#[derive(Debug, Clone, PartialEq)]
pub struct CohortTest {
    /// The signal's name, as given to [`evaluate`] (`disconnects`).
    pub signal: String,
    pub label: String,
    pub devices: u64,
    pub events: u64,
    pub exposure: f64,
    /// `events / exposure`.
    pub rate: f64,
    /// Events in all the other cohorts, pooled.
    pub rest_events: u64,
    /// Exposure of all the other cohorts, pooled (> 0).
    pub rest_exposure: f64,
    /// `rest_events / rest_exposure`.
    pub rest_rate: f64,
    /// `rate / rest_rate`; infinite when the rest of the fleet had no events and this cohort
    /// had some, 1 when neither had any.
    pub rate_ratio: f64,
    /// One-sided: the probability, if the cohort's rate were the rest's, of at least this many
    /// events in it given the fleet's total.
    pub p_value: f64,
    /// Benjamini-Hochberg adjusted p-value over the cohorts tested in this evaluation.
    pub q_value: f64,
    /// `q_value <= fdr_q` and `rate_ratio >= rate_ratio_min`.
    pub flagged: bool,
}

impl CohortTest {
    /// The alert line, e.g. `hw=rev-b on 1.4.0: disconnects 6.2× fleet rate (n=412, p<0.001)`.
    pub fn describe(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for CohortTest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ", self.label, self.signal)?;
        if self.rate_ratio.is_infinite() {
            write!(f, "{} events, none in the rest of the fleet", self.events)?;
        } else {
            write!(f, "{:.1}× fleet rate", self.rate_ratio)?;
        }
        write!(f, " (n={}, ", self.devices)?;
        if self.p_value < 0.001 {
            f.write_str("p<0.001)")
        } else {
            write!(f, "p={:.3})", self.p_value)
        }
    }
}

/// The fleet's totals for the signal (all cohorts, tested or not).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FleetTotals {
    pub devices: u64,
    pub events: u64,
    pub exposure: f64,
}

/// One evaluation of one signal over the fleet's cohorts.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub signal: String,
    pub kind: SignalKind,
    pub fleet: FleetTotals,
    /// The cohorts that were tested, in input order.
    pub tested: Vec<CohortTest>,
    /// The cohorts that were not, in input order.
    pub skipped: Vec<Skipped>,
}

impl Evaluation {
    /// The flagged cohorts, smallest p-value first (ties in input order): one alert each.
    pub fn flagged(&self) -> Vec<&CohortTest> {
        let mut flagged: Vec<&CohortTest> = self.tested.iter().filter(|t| t.flagged).collect();
        flagged.sort_by(|a, b| a.p_value.total_cmp(&b.p_value));
        flagged
    }
}

/// Compares each cohort's rate of `signal` with the rest of the fleet (every other cohort,
/// tested or not, pooled) and flags those significantly and materially worse.
///
/// A cohort is tested if it has at least `devices_min` devices, exposure > 0 and at least
/// `exposure_min`, and the rest of the fleet has exposure. Its one-sided p-value is exact:
/// the conditional binomial test for a [`SignalKind::Rate`], Fisher's exact test for a
/// [`SignalKind::Proportion`]. The p-values of the tested cohorts are adjusted together
/// (Benjamini-Hochberg); a cohort is flagged if its q-value is <= `fdr_q` and its rate is at
/// least `rate_ratio_min` times the rest's. Pure and deterministic: same input, same output.
pub fn evaluate(
    signal: &str,
    kind: SignalKind,
    cohorts: &[Cohort],
    config: &Config,
) -> Result<Evaluation, HealthError> {
    config.validate()?;
    if cohorts.len() > COHORTS_MAX {
        return Err(HealthError::TooManyCohorts {
            count: cohorts.len(),
        });
    }
    let fleet = totals(kind, cohorts)?;
    let mut tested = Vec::new();
    let mut skipped = Vec::new();
    for cohort in cohorts {
        let rest_events = fleet.events - cohort.events;
        // Exact for trials (whole numbers below 2^53); for device-hours the rounding of one
        // subtraction, and never below zero.
        let rest_exposure = (fleet.exposure - cohort.exposure).max(0.0);
        match test_against(signal, kind, cohort, rest_events, rest_exposure, config) {
            Ok(test) => tested.push(test),
            Err(skip) => skipped.push(skip),
        }
    }
    let p_values: Vec<f64> = tested.iter().map(|t| t.p_value).collect();
    for (test, q_value) in tested.iter_mut().zip(benjamini_hochberg(&p_values)) {
        test.q_value = q_value;
        test.flagged = q_value <= config.fdr_q && test.rate_ratio >= config.rate_ratio_min;
    }
    Ok(Evaluation {
        signal: signal.to_owned(),
        kind,
        fleet,
        tested,
        skipped,
    })
}

/// What [`compare`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Tested(CohortTest),
    Skipped(Skipped),
}

/// One cohort against a rest chosen by the caller, for the rollout health gate: the devices on
/// the new version against those still on the old one. The same test, minimums and minimum
/// effect as [`evaluate`], as a family of one: `q_value` is `p_value`, so `fdr_q` is the
/// significance level. `rest`'s label and devices are not used (and `rest` is never checked
/// against the minimums: only that it has exposure).
pub fn compare(
    signal: &str,
    kind: SignalKind,
    cohort: &Cohort,
    rest: &Cohort,
    config: &Config,
) -> Result<Outcome, HealthError> {
    config.validate()?;
    totals(kind, [cohort, rest])?;
    Ok(
        match test_against(signal, kind, cohort, rest.events, rest.exposure, config) {
            Ok(mut test) => {
                test.flagged =
                    test.p_value <= config.fdr_q && test.rate_ratio >= config.rate_ratio_min;
                Outcome::Tested(test)
            }
            Err(skip) => Outcome::Skipped(skip),
        },
    )
}

/// Checks every cohort and adds them up, within the bounds.
fn totals<'a>(
    kind: SignalKind,
    cohorts: impl IntoIterator<Item = &'a Cohort>,
) -> Result<FleetTotals, HealthError> {
    let mut fleet = FleetTotals {
        devices: 0,
        events: 0,
        exposure: 0.0,
    };
    for cohort in cohorts {
        check_cohort(kind, cohort)?;
        fleet.devices = fleet.devices.saturating_add(cohort.devices);
        fleet.events = fleet
            .events
            .checked_add(cohort.events)
            .filter(|&e| e <= EVENTS_MAX)
            .ok_or(HealthError::TooLarge {
                what: "events add up to more than EVENTS_MAX (2^40)",
            })?;
        fleet.exposure += cohort.exposure;
    }
    if !fleet.exposure.is_finite() {
        return Err(HealthError::TooLarge {
            what: "exposures add up to more than an f64 holds",
        });
    }
    if kind == SignalKind::Proportion && fleet.exposure > COUNT_MAX as f64 {
        return Err(HealthError::TooLarge {
            what: "trials add up to more than 2^53",
        });
    }
    Ok(fleet)
}

/// The cohort against the given rest: its p-value (q-value = p-value, not flagged yet), or why
/// it is not tested.
fn test_against(
    signal: &str,
    kind: SignalKind,
    cohort: &Cohort,
    rest_events: u64,
    rest_exposure: f64,
    config: &Config,
) -> Result<CohortTest, Skipped> {
    let skip = |reason| Skipped {
        label: cohort.label.clone(),
        devices: cohort.devices,
        events: cohort.events,
        exposure: cohort.exposure,
        reason,
    };
    if cohort.devices < config.devices_min {
        return Err(skip(SkipReason::TooFewDevices));
    }
    if cohort.exposure <= 0.0 || cohort.exposure < config.exposure_min {
        return Err(skip(SkipReason::TooLittleExposure));
    }
    if rest_exposure <= 0.0 {
        return Err(skip(SkipReason::NoRestOfFleet));
    }
    let p_value = match kind {
        SignalKind::Rate => {
            // Given k1 + k2 events, k1 ~ Binomial(k1 + k2, e1 / (e1 + e2)) if the rates are
            // equal.
            let both = cohort.exposure + rest_exposure;
            binomial_upper_tail(
                cohort.events,
                cohort.events + rest_events,
                cohort.exposure / both,
                rest_exposure / both,
            )
        }
        SignalKind::Proportion => hypergeometric_upper_tail(
            cohort.events,
            cohort.exposure as u64,
            rest_exposure as u64,
            cohort.events + rest_events,
        ),
    };
    let rate = cohort.events as f64 / cohort.exposure;
    let rest_rate = rest_events as f64 / rest_exposure;
    let rate_ratio = if rest_rate > 0.0 {
        rate / rest_rate
    } else if rate > 0.0 {
        f64::INFINITY
    } else {
        1.0
    };
    Ok(CohortTest {
        signal: signal.to_owned(),
        label: cohort.label.clone(),
        devices: cohort.devices,
        events: cohort.events,
        exposure: cohort.exposure,
        rate,
        rest_events,
        rest_exposure,
        rest_rate,
        rate_ratio,
        p_value,
        q_value: p_value,
        flagged: false,
    })
}

fn check_cohort(kind: SignalKind, cohort: &Cohort) -> Result<(), HealthError> {
    let invalid = |reason: String| HealthError::Cohort {
        label: cohort.label.clone(),
        reason,
    };
    if !(cohort.exposure.is_finite() && cohort.exposure >= 0.0) {
        return Err(invalid(format!(
            "exposure must be a finite number >= 0, got {}",
            cohort.exposure
        )));
    }
    if kind == SignalKind::Proportion {
        if cohort.exposure.fract() != 0.0 || cohort.exposure > COUNT_MAX as f64 {
            return Err(invalid(format!(
                "trials must be a whole number up to 2^53, got {}",
                cohort.exposure
            )));
        }
        if cohort.events as f64 > cohort.exposure {
            return Err(invalid(format!(
                "{} events out of {} trials",
                cohort.events, cohort.exposure
            )));
        }
    }
    Ok(())
}
