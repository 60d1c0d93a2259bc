//! The exact tails against values computed exactly elsewhere, and their identities.
//!
//! Reference values: Python's exact integers, `sum(comb(n, j) * a**j * (b - a)**(n - j) for j in
//! range(k, n + 1))` as a `Fraction` over `b**n` (p = a/b), and for the hypergeometric tail
//! `sum(comb(r, j) * comb(b, n - j) for j >= x)` over `comb(r + b, n)`, each printed with 17
//! significant digits (terms below 1e-25 of the sum dropped).

use mooring_health::dist::{binomial_upper_tail, hypergeometric_upper_tail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn assert_close(got: f64, want: f64, relative: f64, what: &str) {
    let error = ((got - want) / want).abs();
    assert!(
        error <= relative,
        "{what}: got {got:e}, want {want:e} (relative error {error:e})"
    );
}

#[test]
fn binomial_tail_matches_exact_values() {
    // (k, n, p, P(X >= k))
    let cases = [
        (8, 10, 0.5, 5.46875e-02), // 56 / 1024
        (10, 10, 0.5, 9.765625e-04),
        (7, 20, 0.1, 2.386_089_408_966_116_7e-03),
        (340, 1000, 0.3, 3.482_591_878_522_824e-03),
        (290, 1000, 0.3, 7.649_625_486_437_327e-01), // below the mean: 1 - lower tail
        (1100, 10_000, 0.1, 5.299_417_355_567_867e-04),
        (50_600, 100_000, 0.5, 7.483_595_545_718_65e-05),
        (51_500, 100_000, 0.5, 1.219_213_215_671_728_6e-21), // 9.5 standard deviations out
        (49_900, 100_000, 0.5, 7.374_871_178_414_346e-01),
    ];
    for (k, n, p, want) in cases {
        let got = binomial_upper_tail(k, n, p, 1.0 - p);
        assert_close(got, want, 1e-10, &format!("P(Bin({n}, {p}) >= {k})"));
    }
}

#[test]
fn fisher_tail_matches_exact_values() {
    // Fisher's tea-tasting table [[3, 1], [1, 3]]: one-sided p = 17/70.
    assert_close(
        hypergeometric_upper_tail(3, 4, 4, 4),
        17.0 / 70.0,
        1e-14,
        "tea",
    );
    // (x, marked, unmarked, drawn, P(X >= x))
    let cases = [
        (80, 5000, 95_000, 1100, 6.272_156_388_914_505e-04),
        (10, 10, 1000, 10, 3.435_263_087_769_455e-24), // every draw marked
        (2, 50, 950, 40, 6.063_211_212_650_041e-01),   // below the mean
    ];
    for (x, r, b, n, want) in cases {
        let got = hypergeometric_upper_tail(x, r, b, n);
        assert_close(got, want, 1e-10, &format!("hyper({x}; {r}, {b}, {n})"));
    }
}

#[test]
fn tails_at_the_edges_of_the_support() {
    assert_eq!(binomial_upper_tail(0, 0, 0.5, 0.5), 1.0);
    assert_eq!(binomial_upper_tail(0, 1_000_000, 0.3, 0.7), 1.0);
    assert_eq!(binomial_upper_tail(1, 0, 0.5, 0.5), 0.0);
    assert_eq!(binomial_upper_tail(11, 10, 0.5, 0.5), 0.0);
    assert_eq!(binomial_upper_tail(1, 10, 0.0, 1.0), 0.0);
    assert_eq!(binomial_upper_tail(10, 10, 1.0, 0.0), 1.0);
    // 2^-1000 is near the smallest normal f64, still exact; 2^-2000 underflows to 0, no panic.
    assert_close(
        binomial_upper_tail(1000, 1000, 0.5, 0.5),
        0.5f64.powi(1000),
        1e-12,
        "2^-1000",
    );
    assert_eq!(binomial_upper_tail(2000, 2000, 0.5, 0.5), 0.0);
    assert_eq!(hypergeometric_upper_tail(0, 5, 5, 5), 1.0);
    assert_eq!(hypergeometric_upper_tail(6, 5, 5, 5), 0.0);
    assert_eq!(hypergeometric_upper_tail(1, 5, 5, 0), 0.0);
    assert_eq!(hypergeometric_upper_tail(5, 5, 0, 5), 1.0); // no unmarked items: x is certain
    assert_eq!(hypergeometric_upper_tail(0, 0, 10, 3), 1.0);
}

#[test]
fn huge_counts_are_exact_where_the_answer_is_known() {
    // n odd, p = 1/2: by symmetry P(X >= (n + 1) / 2) = 1/2 exactly.
    for n in [1_000_001u64, 1_000_000_001, (1u64 << 40) + 1] {
        let got = binomial_upper_tail(n / 2 + 1, n, 0.5, 0.5);
        assert_close(got, 0.5, 1e-9, &format!("n={n}"));
    }
    // A deep tail of a huge n is tiny and finite, not NaN or an overflow.
    let far = binomial_upper_tail(600_000_000, 1_000_000_000, 0.5, 0.5);
    assert!((0.0..1e-300).contains(&far), "{far:e}");
    let far = hypergeometric_upper_tail(2_000_000, 10_000_000, 990_000_000, 10_000_000);
    assert!((0.0..1e-300).contains(&far), "{far:e}");
}

#[test]
fn binomial_tail_identities_hold_on_random_inputs() {
    // P(X >= k | p) + P(X >= n - k + 1 | q) = 1 (X counts successes, n - X failures): the
    // upper-tail and lower-tail branches checked against each other, and monotonicity in k.
    let mut rng = StdRng::seed_from_u64(18);
    for _ in 0..2000 {
        let n: u64 = if rng.random_bool(0.5) {
            rng.random_range(1..200)
        } else {
            rng.random_range(1..2_000_000)
        };
        let p: f64 = rng.random_range(0.001..0.999);
        let k = rng.random_range(0..=n);
        let upper = binomial_upper_tail(k, n, p, 1.0 - p);
        let complement = binomial_upper_tail(n - k + 1, n, 1.0 - p, p);
        assert!((0.0..=1.0).contains(&upper), "n={n} k={k} p={p}: {upper}");
        assert!(
            (upper + complement - 1.0).abs() < 1e-9,
            "n={n} k={k} p={p}: {upper} + {complement}"
        );
        if k < n {
            let next = binomial_upper_tail(k + 1, n, p, 1.0 - p);
            assert!(next <= upper, "n={n} k={k} p={p}: {next} > {upper}");
        }
    }
}

#[test]
fn hypergeometric_tail_identities_hold_on_random_inputs() {
    // Swapping the roles of marked and unmarked: P(X >= x) = 1 - P(Y >= drawn - x + 1) where
    // Y counts the unmarked ones drawn.
    let mut rng = StdRng::seed_from_u64(19);
    for _ in 0..2000 {
        let scale: u64 = if rng.random_bool(0.5) { 100 } else { 1_000_000 };
        let marked = rng.random_range(0..scale);
        let unmarked = rng.random_range(0..scale);
        let drawn = rng.random_range(0..=marked + unmarked);
        let low = drawn.saturating_sub(unmarked);
        let high = marked.min(drawn);
        let x = rng.random_range(low..=high);
        let upper = hypergeometric_upper_tail(x, marked, unmarked, drawn);
        let complement = hypergeometric_upper_tail(drawn - x + 1, unmarked, marked, drawn);
        assert!((0.0..=1.0).contains(&upper));
        assert!(
            (upper + complement - 1.0).abs() < 1e-9,
            "x={x} r={marked} b={unmarked} n={drawn}: {upper} + {complement}"
        );
    }
}
