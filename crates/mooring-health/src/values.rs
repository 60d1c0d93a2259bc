//! A metric's values: are the new version's devices shifted the bad way from the control's?
//!
//! The rollout gate on a telemetry metric (`--gate battery.v`, issue 19). Each device gives one
//! value (its mean of the metric over the health window), so a device that reports often weighs
//! no more than one that reports rarely. The two groups are compared with the Mann-Whitney U
//! (Wilcoxon rank-sum) test: no assumption about the values' distribution (battery voltages are
//! anything but normal), only their order. Ties get their average rank and the variance its tie
//! correction; the p-value is the normal approximation with a continuity correction, which is
//! within a few percent of the exact one from about 8 devices per group (the gate's minimum is
//! the rollout's `min_devices`, 20 by default).
//!
//! A shift fails the gate only if it is significant (`p <= alpha`) and material: the
//! rank-biserial correlation `r = 2 U / (n1 n2) - 1` (the chance that an updated device's value
//! is above a control device's, ties counting half, rescaled to -1..1) is at least `effect_min`
//! (0.3 by default, about half a standard deviation for normal data) the bad way. Like the test,
//! it depends on the values' order only: one device reporting a sentinel (65.535, 0, -1) can
//! neither hide a shift nor make one, where a margin in means and standard deviations could.

use crate::HealthError;

/// Most values per group (a caller samples a wave larger than this).
pub const VALUES_MAX: usize = 1_000_000;

/// The default materiality margin: a rank-biserial correlation of 0.3 the bad way.
pub const EFFECT_MIN_DEFAULT: f64 = 0.3;

/// Which way a shift of the metric is bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Worse {
    /// Lower is worse (a battery's voltage).
    Down,
    /// Higher is worse (a temperature, a latency).
    Up,
    /// Any shift is suspect.
    Either,
}

/// The significance and the margin a shift must pass, and the devices each group needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValuesConfig {
    pub alpha: f64,
    pub effect_min: f64,
    /// At least 3.
    pub devices_min: u64,
}

/// The two groups compared.
#[derive(Debug, Clone, PartialEq)]
pub struct ValuesTest {
    pub updated_devices: u64,
    pub control_devices: u64,
    pub updated_mean: f64,
    pub control_mean: f64,
    /// The rank-biserial correlation, -1..=1: `2 P(updated > control) - 1` over every pair
    /// (ties half); negative means the updated devices' values are lower.
    pub effect: f64,
    /// The p-value of the shift the bad way (both ways for [`Worse::Either`]).
    pub p_value: f64,
    /// Significant and material the bad way.
    pub flagged: bool,
}

/// What [`compare_values`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum ValuesOutcome {
    Tested(ValuesTest),
    /// Not tested: why (a group has too few devices).
    Skipped(String),
}

/// Compares `updated` with `control` (one value per device). Errors on a config out of range, a
/// non-finite value or more than [`VALUES_MAX`] values in a group.
pub fn compare_values(
    updated: &[f64],
    control: &[f64],
    worse: Worse,
    config: &ValuesConfig,
) -> Result<ValuesOutcome, HealthError> {
    if !(config.alpha > 0.0 && config.alpha < 1.0) {
        return Err(HealthError::Config(format!(
            "alpha must be in (0, 1), not {}",
            config.alpha
        )));
    }
    if !(0.0..=1.0).contains(&config.effect_min) || config.devices_min < 3 {
        return Err(HealthError::Config(
            "effect_min must be in [0, 1], devices_min >= 3".to_owned(),
        ));
    }
    for (label, values) in [("updated", updated), ("control", control)] {
        if values.len() > VALUES_MAX {
            return Err(HealthError::TooLarge {
                what: "values: more than VALUES_MAX in a group",
            });
        }
        if values.iter().any(|v| !v.is_finite()) {
            return Err(HealthError::Cohort {
                label: label.to_owned(),
                reason: "a value is not a finite number".to_owned(),
            });
        }
        if (values.len() as u64) < config.devices_min {
            return Ok(ValuesOutcome::Skipped(format!(
                "the {label} devices have {} value(s), fewer than {}",
                values.len(),
                config.devices_min
            )));
        }
    }
    let (m1, _) = mean_var(updated);
    let (m2, _) = mean_var(control);
    let ranks = rank_sum(updated, control);
    let p_value = match worse {
        Worse::Up => ranks.p_up,
        Worse::Down => ranks.p_down,
        Worse::Either => (2.0 * ranks.p_up.min(ranks.p_down)).min(1.0),
    };
    let effect = ranks.effect;
    let material = match worse {
        Worse::Up => effect >= config.effect_min,
        Worse::Down => -effect >= config.effect_min,
        Worse::Either => effect.abs() >= config.effect_min,
    };
    Ok(ValuesOutcome::Tested(ValuesTest {
        updated_devices: updated.len() as u64,
        control_devices: control.len() as u64,
        updated_mean: m1,
        control_mean: m2,
        effect,
        p_value,
        flagged: material && p_value <= config.alpha,
    }))
}

/// Mean and sample variance (Welford's: no overflow to infinity for large finite values).
fn mean_var(values: &[f64]) -> (f64, f64) {
    let (mut mean, mut m2) = (0.0, 0.0);
    for (i, v) in values.iter().enumerate() {
        let delta = v - mean;
        mean += delta / (i + 1) as f64;
        m2 += delta * (v - mean);
    }
    let var = if values.len() > 1 {
        m2 / (values.len() - 1) as f64
    } else {
        0.0
    };
    (mean, var.max(0.0))
}

/// The Mann-Whitney U test of `a` against `b`.
struct RankSum {
    /// One-sided p-value that `a` is stochastically larger than `b`.
    p_up: f64,
    /// ... and smaller.
    p_down: f64,
    /// The rank-biserial correlation `2 U / (n1 n2) - 1`.
    effect: f64,
}

/// Average ranks for ties, the tie-corrected variance, the normal approximation with a
/// continuity correction. Both p-values are 1 when every value is the same.
fn rank_sum(a: &[f64], b: &[f64]) -> RankSum {
    let mut all: Vec<(f64, bool)> = a
        .iter()
        .map(|v| (*v, true))
        .chain(b.iter().map(|v| (*v, false)))
        .collect();
    all.sort_by(|x, y| x.0.total_cmp(&y.0));
    let n = all.len() as f64;
    let (n1, n2) = (a.len() as f64, b.len() as f64);
    let (mut rank_sum_a, mut ties) = (0.0, 0.0);
    let mut i = 0;
    while i < all.len() {
        let mut j = i + 1;
        while j < all.len() && all[j].0 == all[i].0 {
            j += 1;
        }
        let t = (j - i) as f64;
        // Ranks i+1..=j, averaged.
        let rank = (i + 1 + j) as f64 / 2.0;
        rank_sum_a += rank * all[i..j].iter().filter(|x| x.1).count() as f64;
        ties += t * t * t - t;
        i = j;
    }
    let u = rank_sum_a - n1 * (n1 + 1.0) / 2.0;
    let mu = n1 * n2 / 2.0;
    let effect = (2.0 * u / (n1 * n2) - 1.0).clamp(-1.0, 1.0);
    let var = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    if var <= 0.0 {
        return RankSum {
            p_up: 1.0,
            p_down: 1.0,
            effect,
        };
    }
    let sd = var.sqrt();
    let upper = |z: f64| (0.5 * libm::erfc(z / std::f64::consts::SQRT_2)).min(1.0);
    RankSum {
        p_up: upper((u - mu - 0.5) / sd),
        p_down: upper((mu - u - 0.5) / sd),
        effect,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    const CONFIG: ValuesConfig = ValuesConfig {
        alpha: 0.01,
        effect_min: EFFECT_MIN_DEFAULT,
        devices_min: 20,
    };

    fn normal(rng: &mut StdRng, n: usize, mean: f64, sd: f64) -> Vec<f64> {
        (0..n)
            .map(|_| {
                // Box-Muller.
                let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
                mean + sd * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
            })
            .collect()
    }

    fn run(a: &[f64], b: &[f64], worse: Worse) -> ValuesOutcome {
        compare_values(a, b, worse, &CONFIG).expect("valid input")
    }

    fn tested(o: ValuesOutcome) -> ValuesTest {
        match o {
            ValuesOutcome::Tested(t) => t,
            ValuesOutcome::Skipped(why) => panic!("skipped: {why}"),
        }
    }

    #[test]
    fn a_known_p_value() {
        // a = 1..=10, b = 11..=20: U = 0, every pair the "down" way. The normal approximation
        // of the one-sided p is Φ(-(50 - 0.5) / sqrt(175)) = 9.2e-5 (the exact one is 5.4e-6).
        let a: Vec<f64> = (1..=10).map(f64::from).collect();
        let b: Vec<f64> = (11..=20).map(f64::from).collect();
        let r = rank_sum(&a, &b);
        assert!((r.p_down / 9.2e-5 - 1.0).abs() < 0.02, "{}", r.p_down);
        assert!(r.p_up > 0.999);
        assert_eq!(r.effect, -1.0);
    }

    #[test]
    fn a_drop_of_half_a_standard_deviation_is_caught_the_bad_way_only() {
        let mut rng = StdRng::seed_from_u64(1);
        let control = normal(&mut rng, 200, 3.7, 0.1);
        let lower = normal(&mut rng, 200, 3.6, 0.1);
        let t = tested(run(&lower, &control, Worse::Down));
        assert!(t.flagged, "{t:?}");
        assert!(t.effect < -0.3, "{t:?}");
        // Higher is fine when only lower is bad; suspect when either way is.
        let higher = normal(&mut rng, 200, 3.8, 0.1);
        let t = tested(run(&higher, &control, Worse::Down));
        assert!(!t.flagged && t.p_value > 0.99, "{t:?}");
        let t = tested(run(&higher, &control, Worse::Either));
        assert!(t.flagged, "{t:?}");
    }

    #[test]
    fn identical_groups_flag_at_most_alpha_over_many_seeds() {
        let mut flagged = 0;
        for seed in 0..400 {
            let mut rng = StdRng::seed_from_u64(seed);
            let a = normal(&mut rng, 60, 20.0, 4.0);
            let b = normal(&mut rng, 60, 20.0, 4.0);
            let t = tested(run(&a, &b, Worse::Either));
            flagged += usize::from(t.flagged);
        }
        // alpha 1 % of 400 = 4 expected at most (the margin makes it fewer).
        assert!(flagged <= 6, "{flagged} of 400 identical pairs flagged");
    }

    #[test]
    fn a_significant_but_tiny_shift_is_not_material() {
        let mut rng = StdRng::seed_from_u64(3);
        let control = normal(&mut rng, 5_000, 50.0, 10.0);
        let up = normal(&mut rng, 5_000, 51.5, 10.0); // d = 0.15
        let t = tested(run(&up, &control, Worse::Up));
        assert!(t.p_value < 0.01 && !t.flagged, "{t:?}");
    }

    #[test]
    fn one_sentinel_value_neither_hides_a_shift_nor_makes_one() {
        let mut rng = StdRng::seed_from_u64(5);
        let control = normal(&mut rng, 40, 3.70, 0.05);
        let mut lower = normal(&mut rng, 40, 3.55, 0.05);
        lower[0] = 65.535; // a broken sensor on the new version
        let t = tested(run(&lower, &control, Worse::Down));
        assert!(t.flagged, "{t:?}");
        let mut same = normal(&mut rng, 40, 3.70, 0.05);
        same[0] = -1.0;
        let t = tested(run(&same, &control, Worse::Either));
        assert!(!t.flagged, "{t:?}");
    }

    #[test]
    fn constant_values_and_small_groups() {
        let same = vec![4.0; 30];
        let t = tested(run(&same, &same, Worse::Either));
        assert!(!t.flagged && t.p_value == 1.0 && t.effect == 0.0);
        let lower = vec![3.0; 30];
        let t = tested(run(&lower, &same, Worse::Down));
        assert!(t.flagged && t.effect == -1.0, "{t:?}");
        assert!(matches!(
            run(&lower[..5], &same, Worse::Down),
            ValuesOutcome::Skipped(_)
        ));
        assert!(compare_values(&[f64::NAN; 30], &same, Worse::Down, &CONFIG).is_err());
    }
}
