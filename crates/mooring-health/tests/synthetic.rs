//! Power and false positives on synthetic fleets with known effects (seeded, so every run of
//! this file sees the same fleets and the counts below are exact, not flaky).
//!
//! Each fleet is 20 cohorts of a few hundred devices observed for 24 hours. A device's
//! disconnects in the window are Poisson with mean `rate * hours`; a device's update rolls back
//! with a probability. One cohort may be worse by a known factor; the rest are identical.

use mooring_health::{evaluate, Cohort, Config, Evaluation, SignalKind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const COHORTS: usize = 20;
const HOURS: f64 = 24.0;

/// A Poisson draw by Knuth's product method: fine for a device's small mean (< 30).
fn poisson(rng: &mut StdRng, mean: f64) -> u64 {
    assert!(mean < 30.0);
    let limit = (-mean).exp();
    let mut product: f64 = rng.random();
    let mut count = 0;
    while product > limit {
        product *= rng.random::<f64>();
        count += 1;
    }
    count
}

/// Disconnects per cohort: `devices` each, `rate` per device-hour, cohort 0's rate times
/// `factor`.
fn rate_fleet(seed: u64, devices: u64, rate: f64, factor: f64) -> Vec<Cohort> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..COHORTS)
        .map(|i| {
            let device_rate = if i == 0 { rate * factor } else { rate };
            let events = (0..devices)
                .map(|_| poisson(&mut rng, device_rate * HOURS))
                .sum();
            Cohort {
                label: format!("hw=rev-{i}"),
                devices,
                events,
                exposure: devices as f64 * HOURS,
            }
        })
        .collect()
}

/// Update rollbacks per cohort: one update per device, rolled back with probability
/// `proportion` (cohort 0: times `factor`).
fn proportion_fleet(seed: u64, devices: u64, proportion: f64, factor: f64) -> Vec<Cohort> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..COHORTS)
        .map(|i| {
            let p = if i == 0 {
                proportion * factor
            } else {
                proportion
            };
            let events = (0..devices).filter(|_| rng.random_bool(p)).count() as u64;
            Cohort {
                label: format!("version=1.{i}.0"),
                devices,
                events,
                exposure: devices as f64,
            }
        })
        .collect()
}

fn flagged_labels(evaluation: &Evaluation) -> Vec<&str> {
    evaluation
        .flagged()
        .iter()
        .map(|t| t.label.as_str())
        .collect()
}

/// Over `seeds` fleets: (fleets where cohort 0 was flagged, other cohorts flagged in total).
fn power(
    seeds: u64,
    kind: SignalKind,
    fleet: impl Fn(u64) -> Vec<Cohort>,
    config: &Config,
) -> (u64, u64) {
    let mut detected = 0;
    let mut false_flags = 0;
    for seed in 0..seeds {
        let cohorts = fleet(seed);
        let evaluation = evaluate("disconnects", kind, &cohorts, config).expect("valid fleet");
        assert_eq!(evaluation.tested.len(), COHORTS);
        let flagged = flagged_labels(&evaluation);
        if flagged.contains(&cohorts[0].label.as_str()) {
            detected += 1;
        }
        false_flags += flagged.iter().filter(|l| **l != cohorts[0].label).count() as u64;
    }
    (detected, false_flags)
}

#[test]
fn known_rate_effects_are_detected_in_at_least_95_of_100_fleets() {
    let config = Config::default();
    // (devices per cohort, disconnects per device-hour, factor): each healthy cohort expects
    // 43.2, 14.4 and 4.8 disconnects in the window, the affected one 2x, 3x and 6x that.
    // The smaller the effect, the more events it takes: about 40 expected in a healthy cohort
    // for 2x, 15 for 3x, 5 for 6x (with 20 cohorts, BH needs p <= 0.01 / 20 for a lone effect).
    for (devices, rate, factor) in [(300, 0.006, 2.0), (300, 0.002, 3.0), (200, 0.001, 6.0)] {
        let (detected, false_flags) = power(
            100,
            SignalKind::Rate,
            |seed| rate_fleet(seed, devices, rate, factor),
            &config,
        );
        println!("rate {factor}x, {devices} devices, {rate}/h: detected {detected}/100, {false_flags} healthy cohorts flagged in 1900");
        assert!(detected >= 95, "{factor}x: detected in {detected} of 100");
        // BH at q = 0.01: false discoveries among discoveries <= 1 % on average.
        assert!(
            false_flags <= 2,
            "{factor}x: {false_flags} healthy cohorts flagged"
        );
    }
}

#[test]
fn known_rollback_effects_are_detected_in_at_least_95_of_100_fleets() {
    let config = Config::default();
    // (devices updated per cohort, rollback probability, factor): each healthy cohort expects
    // 40, 15 and 5 rollbacks, the affected one 2x, 3x and 6x that.
    for (devices, proportion, factor) in [(400, 0.1, 2.0), (300, 0.05, 3.0), (200, 0.025, 6.0)] {
        let (detected, false_flags) = power(
            100,
            SignalKind::Proportion,
            |seed| proportion_fleet(seed, devices, proportion, factor),
            &config,
        );
        println!("rollbacks {factor}x, {devices} devices, p={proportion}: detected {detected}/100, {false_flags} healthy cohorts flagged in 1900");
        assert!(detected >= 95, "{factor}x: detected in {detected} of 100");
        assert!(
            false_flags <= 2,
            "{factor}x: {false_flags} healthy cohorts flagged"
        );
    }
}

#[test]
fn identical_cohorts_raise_nothing_in_at_least_99_percent_of_200_fleets() {
    let config = Config::default();
    for (kind, name) in [
        (SignalKind::Rate, "rate"),
        (SignalKind::Proportion, "rollbacks"),
    ] {
        let mut fleets_with_a_flag = 0;
        let mut cohorts_flagged = 0;
        let mut p_below_5_percent = 0;
        for seed in 0..200 {
            let cohorts = match kind {
                SignalKind::Rate => rate_fleet(1000 + seed, 300, 0.002, 1.0),
                SignalKind::Proportion => proportion_fleet(1000 + seed, 300, 0.03, 1.0),
            };
            let evaluation = evaluate("x", kind, &cohorts, &config).expect("valid fleet");
            p_below_5_percent += evaluation
                .tested
                .iter()
                .filter(|t| t.p_value <= 0.05)
                .count();
            let flagged = evaluation.flagged().len();
            cohorts_flagged += flagged;
            if flagged > 0 {
                fleets_with_a_flag += 1;
            }
        }
        println!("{name}: {fleets_with_a_flag} of 200 healthy fleets raised anything, {cohorts_flagged} of 4000 cohorts flagged, {p_below_5_percent} of 4000 p-values <= 0.05");
        // Each p-value is valid on its own: P(p <= 0.05) <= 5 % when nothing differs (200 of
        // 4000, plus three standard deviations), and not degenerate (the discrete exact test
        // is conservative, but not by a factor of four).
        assert!(
            (50..=241).contains(&p_below_5_percent),
            "{name}: {p_below_5_percent} of 4000 p-values <= 0.05"
        );
        // With no effect anywhere every flag is false, and BH then bounds the chance of any
        // flag in a fleet by q = 1 %: 2 of 200 expected at most (the exact tests are
        // conservative, so fewer).
        assert!(
            fleets_with_a_flag <= 2,
            "{name}: {fleets_with_a_flag} of 200 healthy fleets raised an alert"
        );
    }
}

#[test]
fn the_same_fleet_gives_the_same_evaluation() {
    let cohorts = rate_fleet(7, 300, 0.002, 3.0);
    let config = Config::default();
    let a = evaluate("disconnects", SignalKind::Rate, &cohorts, &config).expect("valid");
    let b = evaluate("disconnects", SignalKind::Rate, &cohorts, &config).expect("valid");
    assert_eq!(a, b);
}
