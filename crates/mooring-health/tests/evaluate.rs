//! `evaluate` as its callers see it: the alert line, the minimums, extreme and invalid input.

use mooring_health::dist::{binomial_upper_tail, hypergeometric_upper_tail};
use mooring_health::{
    compare, evaluate, Cohort, CohortTest, Config, HealthError, Outcome, SignalKind, SkipReason,
    COHORTS_MAX, EVENTS_MAX,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn cohort(label: &str, devices: u64, events: u64, exposure: f64) -> Cohort {
    Cohort {
        label: label.to_owned(),
        devices,
        events,
        exposure,
    }
}

/// `count` identical healthy cohorts of 300 devices with 40 events in 7200 device-hours.
fn healthy(count: usize) -> Vec<Cohort> {
    (0..count)
        .map(|i| cohort(&format!("site=s{i}"), 300, 40, 7200.0))
        .collect()
}

fn rate(cohorts: &[Cohort]) -> mooring_health::Evaluation {
    evaluate("disconnects", SignalKind::Rate, cohorts, &Config::default()).expect("valid input")
}

fn test_line(rate_ratio: f64, p_value: f64) -> CohortTest {
    CohortTest {
        signal: "disconnects".into(),
        label: "hw=rev-b on 1.4.0".into(),
        devices: 412,
        events: 245,
        exposure: 9888.0,
        rate: 0.0,
        rest_events: 0,
        rest_exposure: 1.0,
        rest_rate: 0.0,
        rate_ratio,
        p_value,
        q_value: p_value,
        flagged: true,
    }
}

#[test]
fn the_alert_line_is_rendered_exactly() {
    assert_eq!(
        test_line(6.2049, 3e-120).describe(),
        "hw=rev-b on 1.4.0: disconnects 6.2× fleet rate (n=412, p<0.001)"
    );
    assert_eq!(
        test_line(1.75, 0.0123).to_string(),
        "hw=rev-b on 1.4.0: disconnects 1.8× fleet rate (n=412, p=0.012)"
    );
    assert_eq!(
        test_line(2.0, 0.001).describe(),
        "hw=rev-b on 1.4.0: disconnects 2.0× fleet rate (n=412, p=0.001)"
    );
    assert_eq!(
        test_line(f64::INFINITY, 0.0).describe(),
        "hw=rev-b on 1.4.0: disconnects 245 events, none in the rest of the fleet (n=412, p<0.001)"
    );
}

#[test]
fn a_bad_cohort_is_flagged_with_its_numbers_and_an_exact_p_value() {
    let mut cohorts = healthy(10);
    cohorts.push(cohort("hw=rev-b on 1.4.0", 412, 160, 9888.0));
    let evaluation = rate(&cohorts);
    assert_eq!(evaluation.fleet.events, 400 + 160);
    assert_eq!(evaluation.fleet.devices, 3000 + 412);
    let flagged = evaluation.flagged();
    assert_eq!(flagged.len(), 1);
    let bad = flagged[0];
    assert_eq!(bad.label, "hw=rev-b on 1.4.0");
    assert_eq!((bad.events, bad.rest_events), (160, 400));
    assert_eq!(bad.rest_exposure, 72_000.0);
    assert!((bad.rate - 160.0 / 9888.0).abs() < 1e-15);
    assert!((bad.rest_rate - 400.0 / 72_000.0).abs() < 1e-15);
    assert!((bad.rate_ratio - (160.0 / 9888.0) / (400.0 / 72_000.0)).abs() < 1e-12);
    // The conditional binomial test: 160 of the 560 events, each in the cohort with
    // probability 9888 / 81888 = 103 / 853 if the rates were equal. Exactly (Python integers,
    // as in tests/exact.rs): P(Bin(560, 103/853) >= 160) = 1.0023656422508159e-25.
    let p = binomial_upper_tail(160, 560, 9888.0 / 81_888.0, 72_000.0 / 81_888.0);
    assert_eq!(bad.p_value, p);
    assert!((p - 1.002_365_642_250_815_9e-25).abs() < 1e-10 * p, "{p:e}");
    // BH with 11 tests, the smallest p-value: q = p * 11 / 1.
    assert!((bad.q_value - p * 11.0).abs() <= 1e-12 * bad.q_value);
    assert_eq!(
        bad.describe(),
        "hw=rev-b on 1.4.0: disconnects 2.9× fleet rate (n=412, p<0.001)"
    );
    // The healthy cohorts are tested, not flagged, and a little better than their rest.
    assert_eq!(evaluation.tested.len(), 11);
    for test in evaluation.tested.iter().filter(|t| !t.flagged) {
        assert!(test.rate_ratio < 1.0 && test.p_value > 0.5, "{test:?}");
    }
}

#[test]
fn proportions_use_fishers_exact_test() {
    // Rollbacks: 9 of 40 updates in one cohort, 10 of 400 elsewhere.
    let cohorts = [
        cohort("version=1.4.0", 40, 9, 40.0),
        cohort("version=1.3.2", 400, 10, 400.0),
    ];
    let config = Config::default();
    let evaluation =
        evaluate("rollbacks", SignalKind::Proportion, &cohorts, &config).expect("valid");
    let new = &evaluation.tested[0];
    assert_eq!(new.p_value, hypergeometric_upper_tail(9, 40, 400, 19));
    // Exactly (Python integers): sum of C(40, j) C(400, 19 - j) for j >= 9, over C(440, 19).
    assert!((new.p_value - 8.210_524_387_020_574e-6).abs() < 1e-10 * new.p_value);
    assert!((new.rate_ratio - 9.0).abs() < 1e-12); // 22.5 % vs 2.5 %
    assert!(new.flagged);
    assert_eq!(
        new.describe(),
        "version=1.4.0: rollbacks 9.0× fleet rate (n=40, p<0.001)"
    );
}

#[test]
fn cohorts_below_the_minimums_are_never_tested_or_flagged() {
    let mut cohorts = healthy(10);
    // Five devices with every event they could have: far worse, but too small to judge.
    cohorts.push(cohort("hw=proto", 5, 500, 120.0));
    let evaluation = rate(&cohorts);
    assert!(evaluation.flagged().is_empty());
    assert_eq!(evaluation.skipped.len(), 1);
    assert_eq!(evaluation.skipped[0].label, "hw=proto");
    assert_eq!(evaluation.skipped[0].reason, SkipReason::TooFewDevices);
    // An untested cohort is still part of the rest of the fleet of the others.
    assert_eq!(evaluation.tested[0].rest_events, 9 * 40 + 500);
    // And not part of the FDR family: 10 tests.
    assert_eq!(evaluation.tested.len(), 10);

    let config = Config {
        devices_min: 0,
        exposure_min: 500.0,
        ..Config::default()
    };
    let evaluation = evaluate("disconnects", SignalKind::Rate, &cohorts, &config).expect("valid");
    assert!(evaluation.flagged().is_empty());
    assert_eq!(evaluation.skipped[0].reason, SkipReason::TooLittleExposure);
}

#[test]
fn a_significant_but_tiny_difference_is_no_alert() {
    // A huge fleet: one cohort 10 % worse, which with this much data is far beyond chance.
    let mut cohorts: Vec<Cohort> = (0..9)
        .map(|i| cohort(&format!("site=s{i}"), 100_000, 1_000_000, 1e8))
        .collect();
    cohorts.push(cohort("site=big", 100_000, 1_100_000, 1e8));
    let evaluation = rate(&cohorts);
    let big = &evaluation.tested[9];
    assert!(big.p_value < 1e-100, "{}", big.p_value);
    assert!((big.rate_ratio - 1.1).abs() < 1e-3);
    assert!(!big.flagged);
    assert!(evaluation.flagged().is_empty());
    // Only the minimum effect stops it.
    let config = Config {
        rate_ratio_min: 1.0,
        ..Config::default()
    };
    let evaluation = evaluate("disconnects", SignalKind::Rate, &cohorts, &config).expect("valid");
    assert_eq!(evaluation.flagged().len(), 1);
}

#[test]
fn extreme_inputs_give_sensible_answers() {
    // Nothing happened anywhere.
    let quiet: Vec<Cohort> = (0..5)
        .map(|i| cohort(&format!("c{i}"), 100, 0, 2400.0))
        .collect();
    let evaluation = rate(&quiet);
    assert_eq!(evaluation.tested.len(), 5);
    for test in &evaluation.tested {
        assert_eq!(
            (test.p_value, test.q_value, test.rate_ratio),
            (1.0, 1.0, 1.0)
        );
        assert!(!test.flagged);
    }

    // Every event in one cohort.
    let mut lopsided = quiet.clone();
    lopsided[2].events = 30;
    let evaluation = rate(&lopsided);
    let flagged = evaluation.flagged();
    assert_eq!(flagged.len(), 1);
    assert!(flagged[0].rate_ratio.is_infinite());
    // 0.2^30: each of the 30 events in this fifth of the exposure.
    assert!((flagged[0].p_value - 0.2f64.powi(30)).abs() < 1e-12 * 0.2f64.powi(30));
    assert_eq!(
        flagged[0].describe(),
        "c2: disconnects 30 events, none in the rest of the fleet (n=100, p<0.001)"
    );

    // Exposure 0 (a cohort that was offline all window, or events with no exposure).
    let mut idle = quiet.clone();
    idle[0].exposure = 0.0;
    idle[1].exposure = 0.0;
    idle[1].events = 3;
    let evaluation = rate(&idle);
    assert_eq!(evaluation.tested.len(), 3);
    assert!(evaluation
        .skipped
        .iter()
        .all(|s| s.reason == SkipReason::TooLittleExposure));

    // One cohort is the whole fleet: nothing to compare with.
    let evaluation = rate(&quiet[..1]);
    assert_eq!(evaluation.skipped[0].reason, SkipReason::NoRestOfFleet);
    assert!(rate(&[]).tested.is_empty());

    // Every trial failed, everywhere: Fisher's test has nothing to find.
    let failing = [cohort("a", 50, 50, 50.0), cohort("b", 50, 50, 50.0)];
    let evaluation = evaluate(
        "rollbacks",
        SignalKind::Proportion,
        &failing,
        &Config::default(),
    )
    .expect("valid");
    assert!(evaluation.tested.iter().all(|t| t.p_value == 1.0));

    // Huge counts: 10^11 events over 10^14 device-hours, one cohort 3x.
    let mut huge: Vec<Cohort> = (0..20)
        .map(|i| cohort(&format!("h{i}"), 1_000_000, 5_000_000_000, 5e12))
        .collect();
    huge[7].events *= 3;
    let evaluation = rate(&huge);
    let flagged = evaluation.flagged();
    assert_eq!(flagged.len(), 1);
    assert_eq!(flagged[0].label, "h7");
    assert!((flagged[0].rate_ratio - 3.0 * 19.0 / 19.0).abs() < 1e-9);
    assert_eq!(flagged[0].p_value, 0.0); // below the smallest f64: "p<0.001"
    assert!(evaluation
        .tested
        .iter()
        .all(|t| (0.0..=1.0).contains(&t.p_value)));
    // The same huge fleet, healthy: every cohort sits near its expected count, the slowest
    // case for an exact tail (it sums about nine standard deviations, here ~600,000 terms).
    huge[7].events /= 3;
    let evaluation = rate(&huge);
    assert!(evaluation.flagged().is_empty());
    for test in &evaluation.tested {
        // P(X >= its mean) for a binomial with a standard deviation of ~69,000: just over 1/2.
        assert!((0.5..0.501).contains(&test.p_value), "{test:?}");
    }
}

#[test]
fn invalid_input_is_refused_whole() {
    let config = Config::default();
    let refused = |kind, cohorts: &[Cohort]| {
        evaluate("x", kind, cohorts, &config).expect_err("should be refused")
    };
    for exposure in [f64::NAN, -1.0, f64::INFINITY] {
        let error = refused(SignalKind::Rate, &[cohort("a", 50, 1, exposure)]);
        assert!(matches!(error, HealthError::Cohort { ref label, .. } if label == "a"));
    }
    let error = refused(SignalKind::Proportion, &[cohort("a", 50, 51, 50.0)]);
    assert_eq!(
        error.to_string(),
        "cohort \"a\": 51 events out of 50 trials"
    );
    let error = refused(SignalKind::Proportion, &[cohort("a", 50, 1, 50.5)]);
    assert!(matches!(error, HealthError::Cohort { .. }));
    let error = refused(
        SignalKind::Rate,
        &[cohort("a", 50, EVENTS_MAX, 1.0), cohort("b", 50, 1, 1.0)],
    );
    assert!(matches!(error, HealthError::TooLarge { .. }));
    let error = refused(
        SignalKind::Rate,
        &[cohort("a", 50, 1, f64::MAX), cohort("b", 50, 1, f64::MAX)],
    );
    assert!(matches!(error, HealthError::TooLarge { .. }));
    let many = vec![cohort("a", 50, 1, 1.0); COHORTS_MAX + 1];
    assert_eq!(
        refused(SignalKind::Rate, &many),
        HealthError::TooManyCohorts {
            count: COHORTS_MAX + 1
        }
    );
    for bad in [
        Config {
            fdr_q: 0.0,
            ..Config::default()
        },
        Config {
            fdr_q: f64::NAN,
            ..Config::default()
        },
        Config {
            rate_ratio_min: 0.5,
            ..Config::default()
        },
        Config {
            exposure_min: -1.0,
            ..Config::default()
        },
    ] {
        let error = evaluate("x", SignalKind::Rate, &healthy(3), &bad).expect_err("bad config");
        assert!(matches!(error, HealthError::Config(_)), "{error}");
    }
}

#[test]
fn random_fleets_never_panic_and_keep_the_invariants() {
    let mut rng = StdRng::seed_from_u64(42);
    for round in 0..300 {
        let kind = if round % 2 == 0 {
            SignalKind::Rate
        } else {
            SignalKind::Proportion
        };
        let count = rng.random_range(0..30);
        let cohorts: Vec<Cohort> = (0..count)
            .map(|i| {
                let devices = rng.random_range(0..2000);
                let trials: u64 = rng.random_range(0..5000);
                let events = match kind {
                    SignalKind::Rate => rng.random_range(0..3000),
                    SignalKind::Proportion => rng.random_range(0..=trials),
                };
                let exposure = match kind {
                    SignalKind::Rate if rng.random_bool(0.1) => 0.0,
                    SignalKind::Rate => rng.random_range(0.0..50_000.0),
                    SignalKind::Proportion => trials as f64,
                };
                cohort(&format!("c{i}"), devices, events, exposure)
            })
            .collect();
        let config = Config {
            fdr_q: rng.random_range(0.001..=1.0),
            devices_min: rng.random_range(0..100),
            exposure_min: rng.random_range(0.0..100.0),
            rate_ratio_min: rng.random_range(1.0..3.0),
        };
        let evaluation = evaluate("x", kind, &cohorts, &config).expect("valid input");
        assert_eq!(evaluation.tested.len() + evaluation.skipped.len(), count);
        for test in &evaluation.tested {
            assert!((0.0..=1.0).contains(&test.p_value), "{test:?}");
            assert!(
                test.q_value >= test.p_value && test.q_value <= 1.0,
                "{test:?}"
            );
            assert!(test.devices >= config.devices_min && test.exposure > 0.0);
            if test.flagged {
                assert!(test.q_value <= config.fdr_q && test.rate_ratio >= config.rate_ratio_min);
            }
            // One more event in the cohort never makes its p-value larger.
            let mut worse = cohorts.clone();
            let index = worse
                .iter()
                .position(|c| c.label == test.label)
                .expect("input");
            if kind == SignalKind::Rate || worse[index].events < worse[index].exposure as u64 {
                worse[index].events += 1;
                let again = evaluate("x", kind, &worse, &config).expect("valid");
                let p = again
                    .tested
                    .iter()
                    .find(|t| t.label == test.label)
                    .expect("tested");
                assert!(p.p_value <= test.p_value + 1e-12, "{test:?} -> {p:?}");
            }
        }
    }
}

#[test]
fn compare_is_the_rollout_gate_one_cohort_against_a_chosen_rest() {
    let config = Config::default();
    let old = cohort("version=1.3.2", 5000, 250, 120_000.0);
    // The canary: 200 devices on 1.4.0 crash three times as often.
    let canary = cohort("version=1.4.0", 200, 30, 4800.0);
    let Outcome::Tested(test) =
        compare("crashes", SignalKind::Rate, &canary, &old, &config).expect("valid")
    else {
        panic!("the canary is big enough to test");
    };
    assert!((test.rate_ratio - 3.0).abs() < 1e-12);
    assert_eq!(test.q_value, test.p_value); // a family of one
    let p = binomial_upper_tail(30, 280, 4800.0 / 124_800.0, 120_000.0 / 124_800.0);
    assert_eq!(test.p_value, p);
    assert!(test.flagged && p < 1e-5, "{p:e}");
    assert_eq!(
        test.describe(),
        "version=1.4.0: crashes 3.0× fleet rate (n=200, p<0.001)"
    );
    // The same p-value as the two-cohort evaluation gives it (there BH doubles its q-value).
    let evaluation = rate(&[canary.clone(), old.clone()]);
    assert_eq!(evaluation.tested[0].p_value, p);

    // As healthy as the old version: not flagged.
    let fine = cohort("version=1.4.0", 200, 10, 4800.0);
    let Outcome::Tested(test) =
        compare("crashes", SignalKind::Rate, &fine, &old, &config).expect("valid")
    else {
        panic!("tested");
    };
    assert!(!test.flagged && test.p_value > 0.3, "{test:?}");

    // Too few devices updated yet: not tested, whatever happened.
    let early = cohort("version=1.4.0", 3, 3, 12.0);
    assert!(matches!(
        compare("crashes", SignalKind::Rate, &early, &old, &config),
        Ok(Outcome::Skipped(ref s)) if s.reason == SkipReason::TooFewDevices
    ));
    // Nothing to compare with.
    let nothing = cohort("none", 0, 0, 0.0);
    assert!(matches!(
        compare("crashes", SignalKind::Rate, &canary, &nothing, &config),
        Ok(Outcome::Skipped(ref s)) if s.reason == SkipReason::NoRestOfFleet
    ));
    // Invalid counts are refused, on either side.
    let bad = cohort("version=1.3.2", 10, 11, 10.0);
    assert!(matches!(
        compare("rollbacks", SignalKind::Proportion, &canary, &bad, &config),
        Err(HealthError::Cohort { .. })
    ));
}
