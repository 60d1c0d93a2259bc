//! A rollout's decisions, pure and deterministic (no I/O, no clock): which devices go in which
//! wave and which stay on the old version as the control cohort, whether a wave's health lets
//! the next one start (the fleet health issue's cohort test, updated devices against the
//! control cohort), when failures abort, and how many devices may start now.

use mooring_api::{Bp, RolloutSpec, Worse, BP_ALL};
use mooring_health::{Cohort, Config, Outcome, SignalKind, ValuesConfig, ValuesOutcome};
use sha2::{Digest, Sha256};

/// A device's place in the rollout's random order: the first 63 bits of
/// SHA-256(seed, device id) (below 2^63, so every store orders it as a signed 64-bit integer). Independent of the order devices are listed in and of the other
/// devices, so the same seed puts the same device in the same place, and a device added later
/// finds its place without moving anyone else.
pub fn rank(seed: u64, device: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(seed.to_be_bytes());
    h.update(device.as_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_be_bytes(first) >> 1
}

/// Who is in the control cohort and in each wave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Kept on the old version until every wave is done.
    pub control: Vec<String>,
    /// The devices each wave adds (not cumulative), in the rollout's order.
    pub waves: Vec<Vec<String>>,
}

/// `part` of `n` in basis points, rounded half up.
fn share(n: u64, part: Bp) -> u64 {
    (n * u64::from(part) + u64::from(BP_ALL) / 2) / u64::from(BP_ALL)
}

/// Splits the target into the control cohort (`spec.control` of it, the first devices in the
/// random order) and the waves (the rest in the same order: wave `k` brings the updated share
/// up to `spec.waves[k]` of them, rounded up so no wave is empty while devices remain).
/// `devices` may come in any order and with repeats.
pub fn assign(devices: &[String], seed: u64, spec: &RolloutSpec) -> Assignment {
    let mut ranked: Vec<(u64, &str)> = devices
        .iter()
        .map(|d| (rank(seed, d), d.as_str()))
        .collect();
    ranked.sort_unstable();
    ranked.dedup_by(|a, b| a.1 == b.1);
    let (control_n, upto) = sizes(ranked.len() as u64, spec);
    let mut order = ranked.into_iter().map(|(_, d)| d.to_owned());
    let control: Vec<String> = order.by_ref().take(control_n as usize).collect();
    let mut waves = Vec::with_capacity(spec.waves.len());
    let mut done = 0u64;
    for u in upto {
        waves.push(order.by_ref().take((u - done) as usize).collect());
        done = u;
    }
    Assignment { control, waves }
}

/// For a target of `n` devices: the control cohort's size and how many devices are updated
/// once each wave is done (cumulative), as [`assign`] splits them.
pub fn sizes(n: u64, spec: &RolloutSpec) -> (u64, Vec<u64>) {
    let control = share(n, spec.control);
    let treated = n - control;
    let mut done = 0u64;
    let upto = spec
        .waves
        .iter()
        .map(|w| {
            done = (treated * u64::from(*w))
                .div_ceil(u64::from(BP_ALL))
                .max(done);
            done
        })
        .collect();
    (control, upto)
}

/// One gate signal's counts in a group of devices over the health window: events and exposure
/// (device-hours for a rate, trials for a proportion).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Counts {
    pub devices: u64,
    pub events: u64,
    pub exposure: f64,
}

/// What the gate found for one signal.
#[derive(Debug, Clone, PartialEq)]
pub enum SignalVerdict {
    /// Tested and not worse than the control by the margin.
    Pass,
    /// Tested and worse: significantly, and by at least the margin.
    Fail,
    /// Not tested yet: too few devices or too little exposure on one side.
    Unclear(String),
}

/// One gate signal: updated devices against the control cohort.
#[derive(Debug, Clone, PartialEq)]
pub struct SignalGate {
    pub signal: String,
    pub updated: Counts,
    pub control: Counts,
    /// Events per unit of exposure on each side (`None` without exposure).
    pub updated_rate: Option<f64>,
    pub control_rate: Option<f64>,
    /// `updated_rate / control_rate`, when both are known and the control's is above 0.
    pub ratio: Option<f64>,
    /// The one-sided p-value of "the updated devices fail more", when tested.
    pub p_value: Option<f64>,
    /// A metric gate (else a rate): its means (updated, control) and its shift as the
    /// rank-biserial correlation.
    pub metric: bool,
    pub means: Option<(f64, f64)>,
    pub effect: Option<f64>,
    pub verdict: SignalVerdict,
}

/// A metric gate's input: each compared device's mean of the metric over the window, and the
/// points those means were taken of.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricValues {
    pub updated: Vec<f64>,
    pub control: Vec<f64>,
    pub updated_points: u64,
    pub control_points: u64,
}

/// The whole gate.
#[derive(Debug, Clone, PartialEq)]
pub enum GateVerdict {
    /// Every signal tested and none worse: the next wave may start.
    Pass,
    /// Some signal worse: the rollout pauses (or aborts with `auto_abort`).
    Fail,
    /// No signal worse, but some not tested yet: wait, never pass.
    Wait,
}

/// Compares the updated devices with the control cohort on each signal, with the fleet health
/// issue's test (`mooring_health::compare`, a family of one per signal): `config.fdr_q` is the
/// significance level and `config.rate_ratio_min` the margin by which the updated devices must
/// be worse to fail. Any failing signal fails the gate; otherwise any signal not tested (too few
/// devices, too little exposure) makes it wait.
pub fn gate(
    signals: &[(String, SignalKind, Counts, Counts)],
    metrics: &[(String, Worse, MetricValues)],
    config: &Config,
) -> (GateVerdict, Vec<SignalGate>) {
    let mut out = Vec::with_capacity(signals.len());
    for (signal, kind, updated, control) in signals {
        let rate = |c: &Counts| (c.exposure > 0.0).then(|| c.events as f64 / c.exposure);
        let (updated_rate, control_rate) = (rate(updated), rate(control));
        let ratio = match (updated_rate, control_rate) {
            (Some(u), Some(c)) if c > 0.0 => Some(u / c),
            _ => None,
        };
        let cohort = |label: &str, c: &Counts| Cohort {
            label: label.to_owned(),
            devices: c.devices,
            events: c.events,
            exposure: c.exposure,
        };
        let (p_value, verdict) = if control.devices < config.devices_min {
            (
                None,
                SignalVerdict::Unclear(format!(
                    "the control cohort has {} device(s), fewer than {}",
                    control.devices, config.devices_min
                )),
            )
        } else {
            match mooring_health::compare(
                signal,
                *kind,
                &cohort("updated", updated),
                &cohort("control", control),
                config,
            ) {
                Ok(Outcome::Tested(t)) if t.flagged => (Some(t.p_value), SignalVerdict::Fail),
                Ok(Outcome::Tested(t)) => (Some(t.p_value), SignalVerdict::Pass),
                Ok(Outcome::Skipped(s)) => (None, SignalVerdict::Unclear(s.reason.to_string())),
                Err(e) => (None, SignalVerdict::Unclear(e.to_string())),
            }
        };
        out.push(SignalGate {
            signal: signal.clone(),
            updated: *updated,
            control: *control,
            updated_rate,
            control_rate,
            ratio,
            p_value,
            metric: false,
            means: None,
            effect: None,
            verdict,
        });
    }
    for (metric, worse, values) in metrics {
        out.push(metric_gate(metric, *worse, values, config));
    }
    let verdict = if out.iter().any(|s| s.verdict == SignalVerdict::Fail) {
        GateVerdict::Fail
    } else if out.iter().all(|s| s.verdict == SignalVerdict::Pass) {
        GateVerdict::Pass
    } else {
        GateVerdict::Wait
    };
    (verdict, out)
}

/// One metric gate: the updated devices' means against the control's, by
/// `mooring_health::compare_values` at the same significance level, each group needing
/// `config.devices_min` devices (at least 3).
fn metric_gate(metric: &str, worse: Worse, values: &MetricValues, config: &Config) -> SignalGate {
    let counts = |v: &[f64], points: u64| Counts {
        devices: v.len() as u64,
        events: points,
        exposure: 0.0,
    };
    let worse_health = match worse {
        Worse::Down => mooring_health::Worse::Down,
        Worse::Up => mooring_health::Worse::Up,
        Worse::Either => mooring_health::Worse::Either,
    };
    let vc = ValuesConfig {
        alpha: config.fdr_q,
        effect_min: mooring_health::EFFECT_MIN_DEFAULT,
        devices_min: config.devices_min.max(3),
    };
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let mut g = SignalGate {
        signal: metric.to_owned(),
        updated: counts(&values.updated, values.updated_points),
        control: counts(&values.control, values.control_points),
        updated_rate: None,
        control_rate: None,
        ratio: None,
        p_value: None,
        metric: true,
        means: mean(&values.updated).zip(mean(&values.control)),
        effect: None,
        verdict: SignalVerdict::Pass,
    };
    match mooring_health::compare_values(&values.updated, &values.control, worse_health, &vc) {
        Ok(ValuesOutcome::Tested(t)) => {
            g.p_value = Some(t.p_value);
            g.effect = Some(t.effect);
            g.means = Some((t.updated_mean, t.control_mean));
            if t.flagged {
                g.verdict = SignalVerdict::Fail;
            }
        }
        Ok(ValuesOutcome::Skipped(why)) => g.verdict = SignalVerdict::Unclear(why),
        Err(e) => g.verdict = SignalVerdict::Unclear(e.to_string()),
    }
    g
}

/// Whether failures abort the rollout now: at least `spec.min_devices` devices tried (ended
/// their update one way or another) and more than `spec.abort_failure_rate` of them failed or
/// rolled back.
pub fn abort_due(spec: &RolloutSpec, tried: u64, failed: u64) -> bool {
    tried > 0
        && tried >= spec.min_devices
        && failed * u64::from(BP_ALL) > tried * u64::from(spec.abort_failure_rate)
}

/// How many devices may start now: at most `spec.max_concurrent` updating at once
/// (`in_flight` now) and at most `spec.max_per_minute` started in the last minute
/// (`started_last_minute`); `waiting` is how many could start.
pub fn may_start(
    spec: &RolloutSpec,
    waiting: u64,
    in_flight: u64,
    started_last_minute: u64,
) -> u64 {
    let by_concurrency = spec
        .max_concurrent
        .map_or(u64::MAX, |m| u64::from(m).saturating_sub(in_flight));
    let by_rate = spec.max_per_minute.map_or(u64::MAX, |m| {
        u64::from(m).saturating_sub(started_last_minute)
    });
    waiting.min(by_concurrency).min(by_rate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mooring_api::CreateRollout;

    fn spec(waves: &[f64], control: f64) -> RolloutSpec {
        CreateRollout {
            waves: Some(waves.to_vec()),
            control_pct: Some(control),
            ..Default::default()
        }
        .spec()
        .expect("spec")
    }

    fn fleet(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("dev-{i:05}")).collect()
    }

    #[test]
    fn waves_and_control_partition_the_target_in_their_shares() {
        let devices = fleet(10_000);
        let a = assign(&devices, 7, &spec(&[1.0, 10.0, 50.0, 100.0], 5.0));
        assert_eq!(a.control.len(), 500);
        let sizes: Vec<usize> = a.waves.iter().map(Vec::len).collect();
        // 9,500 updated: 95, then up to 950, 4,750, 9,500.
        assert_eq!(sizes, [95, 855, 3_800, 4_750]);
        let mut all: Vec<&String> = a.control.iter().chain(a.waves.iter().flatten()).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 10_000, "every device exactly once");
    }

    #[test]
    fn the_choice_is_random_reproducible_and_independent_of_input_order() {
        let devices = fleet(2_000);
        let s = spec(&[10.0, 100.0], 5.0);
        let a = assign(&devices, 1, &s);
        let mut shuffled = devices.clone();
        shuffled.reverse();
        shuffled.extend(devices[..10].iter().cloned()); // repeats count once
        assert_eq!(assign(&shuffled, 1, &s), a);
        let b = assign(&devices, 2, &s);
        assert_ne!(a.waves[0], b.waves[0], "another seed, another order");
        // Random, not the first ids: the first wave spreads over the whole id range.
        let low = a.waves[0]
            .iter()
            .filter(|d| d.as_str() < "dev-01000")
            .count();
        assert!(
            (60..=130).contains(&low),
            "{low} of 190 from the lower half"
        );
        // A device added later takes its own place; nobody else moves.
        let mut more = devices.clone();
        more.push("dev-new".into());
        let c = assign(&more, 1, &s);
        let keep = |x: &Assignment| -> Vec<String> {
            x.control
                .iter()
                .chain(x.waves.iter().flatten())
                .filter(|d| *d != "dev-new")
                .cloned()
                .collect()
        };
        assert_eq!(keep(&a), keep(&c));
    }

    #[test]
    fn small_targets_still_fill_every_wave_in_order() {
        let a = assign(&fleet(3), 9, &spec(&[1.0, 10.0, 50.0, 100.0], 5.0));
        assert!(a.control.is_empty(), "5% of 3 rounds to none");
        let sizes: Vec<usize> = a.waves.iter().map(Vec::len).collect();
        assert_eq!(sizes, [1, 0, 1, 1]);
        let a = assign(&[], 9, &spec(&[100.0], 5.0));
        assert_eq!(
            a,
            Assignment {
                control: vec![],
                waves: vec![vec![]]
            }
        );
    }

    fn counts(devices: u64, events: u64, hours: f64) -> Counts {
        Counts {
            devices,
            events,
            exposure: hours,
        }
    }

    fn signal(
        name: &str,
        updated: Counts,
        control: Counts,
    ) -> (String, SignalKind, Counts, Counts) {
        (name.to_owned(), SignalKind::Rate, updated, control)
    }

    #[test]
    fn the_gate_fails_a_version_that_doubles_reconnects() {
        // 950 updated devices over half an hour, 500 in control; control reconnects 0.4/h.
        let (v, s) = gate(
            &[
                signal(
                    "disconnects",
                    counts(950, 380, 475.0),
                    counts(500, 100, 250.0),
                ),
                signal("crashes", counts(950, 2, 475.0), counts(500, 1, 250.0)),
            ],
            &[],
            &Config::default(),
        );
        assert_eq!(v, GateVerdict::Fail);
        assert_eq!(s[0].verdict, SignalVerdict::Fail);
        assert!((s[0].ratio.expect("ratio") - 2.0).abs() < 1e-9);
        assert!(s[0].p_value.expect("p") < 1e-6);
        assert_eq!(s[1].verdict, SignalVerdict::Pass);
    }

    #[test]
    fn the_gate_passes_a_version_as_good_as_the_old_one() {
        let (v, s) = gate(
            &[signal(
                "disconnects",
                counts(950, 195, 475.0),
                counts(500, 100, 250.0),
            )],
            &[],
            &Config::default(),
        );
        assert_eq!(v, GateVerdict::Pass, "{s:?}");
    }

    #[test]
    fn too_few_devices_or_no_exposure_waits_never_passes() {
        let cfg = Config::default();
        let (v, s) = gate(
            &[signal(
                "disconnects",
                counts(5, 0, 2.5),
                counts(500, 100, 250.0),
            )],
            &[],
            &cfg,
        );
        assert_eq!(v, GateVerdict::Wait);
        assert!(
            matches!(&s[0].verdict, SignalVerdict::Unclear(r) if r.contains("too few")),
            "{s:?}"
        );
        let (v, s) = gate(
            &[signal(
                "disconnects",
                counts(950, 0, 475.0),
                counts(3, 0, 1.5),
            )],
            &[],
            &cfg,
        );
        assert_eq!(v, GateVerdict::Wait);
        assert!(
            matches!(&s[0].verdict, SignalVerdict::Unclear(r) if r.contains("control cohort")),
            "{s:?}"
        );
        let (v, _) = gate(
            &[signal(
                "disconnects",
                counts(950, 0, 0.0),
                counts(500, 0, 0.0),
            )],
            &[],
            &cfg,
        );
        assert_eq!(v, GateVerdict::Wait);
        // A failure anywhere wins over waiting elsewhere.
        let (v, _) = gate(
            &[
                signal("crashes", counts(950, 0, 0.0), counts(500, 0, 0.0)),
                signal(
                    "disconnects",
                    counts(950, 600, 475.0),
                    counts(500, 100, 250.0),
                ),
            ],
            &[],
            &cfg,
        );
        assert_eq!(v, GateVerdict::Fail);
    }

    #[test]
    fn a_metric_gate_fails_a_version_that_lowers_the_metric_and_waits_on_too_few() {
        // Control devices' battery means spread 3.60..3.79 V; the updated ones 0.15 V lower.
        let control: Vec<f64> = (0..40).map(|i| 3.6 + f64::from(i % 20) * 0.01).collect();
        let lower: Vec<f64> = control.iter().map(|v| v - 0.15).collect();
        let values = |updated: &[f64]| MetricValues {
            updated: updated.to_vec(),
            control: control.clone(),
            updated_points: updated.len() as u64 * 6,
            control_points: 240,
        };
        let cfg = Config::default();
        let down = |v: MetricValues| [("battery.v".to_owned(), Worse::Down, v)];
        let (v, s) = gate(&[], &down(values(&lower)), &cfg);
        assert_eq!(v, GateVerdict::Fail, "{s:?}");
        assert!(s[0].effect.expect("effect") < -0.9 && s[0].p_value.expect("p") < 1e-6);
        let (mu, mc) = s[0].means.expect("means");
        assert!((mc - mu - 0.15).abs() < 1e-9);
        assert_eq!((s[0].updated.events, s[0].control.devices), (240, 40));
        // The same values pass; a higher metric passes when only lower is worse.
        let (v, _) = gate(&[], &down(values(&control)), &cfg);
        assert_eq!(v, GateVerdict::Pass);
        let higher: Vec<f64> = control.iter().map(|v| v + 0.15).collect();
        let (v, _) = gate(&[], &down(values(&higher)), &cfg);
        assert_eq!(v, GateVerdict::Pass);
        // Too few updated devices with a value: wait.
        let (v, s) = gate(&[], &down(values(&lower[..5])), &cfg);
        assert_eq!(v, GateVerdict::Wait);
        assert!(matches!(&s[0].verdict, SignalVerdict::Unclear(r) if r.contains("fewer than")));
    }

    #[test]
    fn failures_abort_only_past_the_minimum_and_above_the_rate() {
        let s = spec(&[100.0], 5.0); // 5 %, 20 devices
        assert!(!abort_due(&s, 19, 10), "under the minimum");
        assert!(!abort_due(&s, 20, 1), "5 % is not above 5 %");
        assert!(abort_due(&s, 20, 2));
        assert!(!abort_due(&s, 0, 0));
    }

    #[test]
    fn throttling_takes_the_tighter_of_rate_and_concurrency() {
        let mut s = spec(&[100.0], 5.0);
        assert_eq!(may_start(&s, 500, 0, 0), 500, "no limits");
        s.max_concurrent = Some(50);
        s.max_per_minute = Some(20);
        assert_eq!(may_start(&s, 500, 0, 0), 20);
        assert_eq!(may_start(&s, 500, 45, 0), 5);
        assert_eq!(may_start(&s, 500, 0, 25), 0);
        assert_eq!(may_start(&s, 3, 0, 0), 3);
    }
}
