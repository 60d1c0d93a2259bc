//! Exact upper tails of the binomial and hypergeometric distributions, in log space.
//!
//! A probability mass is computed with Catherine Loader's saddle-point method ("Fast and
//! accurate computation of binomial probabilities", 2000; what R's `dbinom`/`dhyper` use): the
//! log of a mass is accurate to a few units in the last place for any `n` up to 2^53, without
//! ever forming a factorial. A tail is then summed term by term from its largest end, each term
//! got from the previous one by the exact ratio of consecutive masses, until the next term is
//! below `TAIL_EPSILON` of the sum. Past the mean every next term is smaller than the last, so
//! the sum stops after a number of terms of the order of the standard deviation (about 40 for
//! `n` = 100, about 30,000 for `n` = 10^9 near the mean, far fewer in the far tail), whatever
//! `n` is, and never overflows: the first term is `exp` of its log, the rest are ratios <= 1.
//! A tail that lies below the mean is `1 -` the other, which is then >= about one half, so no
//! precision is lost to the subtraction.

use std::f64::consts::PI;

/// A tail sum stops when its next term is below this fraction of the sum so far.
const TAIL_EPSILON: f64 = 1e-17;

/// The largest count the tails accept: every integer up to it is exact in an `f64`.
pub const COUNT_MAX: u64 = 1 << 53;

/// `ln(n!) - ln(sqrt(2 pi n) (n/e)^n)`, the error of Stirling's formula, for `n >= 1`.
fn stirling_error(n: f64) -> f64 {
    debug_assert!(n >= 1.0 && n.fract() == 0.0);
    const S0: f64 = 1.0 / 12.0;
    const S1: f64 = 1.0 / 360.0;
    const S2: f64 = 1.0 / 1260.0;
    const S3: f64 = 1.0 / 1680.0;
    const S4: f64 = 1.0 / 1188.0;
    if n <= 15.0 {
        // ln(n!) as a sum of at most 15 logs: accurate to ~1e-15 absolute, which is all the
        // mass needs (the error enters its log additively).
        let ln_factorial: f64 = (2..=n as u64).map(|i| (i as f64).ln()).sum();
        return ln_factorial - (n + 0.5) * n.ln() + n - 0.5 * (2.0 * PI).ln();
    }
    let nn = n * n;
    if n > 500.0 {
        (S0 - S1 / nn) / n
    } else if n > 80.0 {
        (S0 - (S1 - S2 / nn) / nn) / n
    } else if n > 35.0 {
        (S0 - (S1 - (S2 - S3 / nn) / nn) / nn) / n
    } else {
        (S0 - (S1 - (S2 - (S3 - S4 / nn) / nn) / nn) / nn) / n
    }
}

/// The deviance term `x ln(x / np) + np - x`, computed without cancellation when `x` is
/// close to `np`.
fn deviance(x: f64, np: f64) -> f64 {
    debug_assert!(x >= 0.0 && np > 0.0);
    if (x - np).abs() < 0.1 * (x + np) {
        // Series in v = (x - np) / (x + np): 2x (v^3/3 + v^5/5 + ...) plus the leading term.
        let mut v = (x - np) / (x + np);
        let mut sum = (x - np) * v;
        let mut power = 2.0 * x * v;
        v *= v;
        // |v| < 0.01, so each term is 100 times smaller: converges in < 10 steps.
        for j in 1..100 {
            power *= v;
            let next = sum + power / f64::from(2 * j + 1);
            if next == sum {
                return next;
            }
            sum = next;
        }
        sum
    } else {
        x * (x / np).ln() + np - x
    }
}

/// `ln P(X = x)` for `X ~ Binomial(n, p)`, given `p` and `q = 1 - p` separately (so neither
/// loses precision to a subtraction). `-inf` outside the support.
pub(crate) fn ln_binomial_mass(x: f64, n: f64, p: f64, q: f64) -> f64 {
    debug_assert!((0.0..=1.0).contains(&p) && (0.0..=1.0).contains(&q));
    if x < 0.0 || x > n {
        return f64::NEG_INFINITY;
    }
    if p == 0.0 {
        return if x == 0.0 { 0.0 } else { f64::NEG_INFINITY };
    }
    if q == 0.0 {
        return if x == n { 0.0 } else { f64::NEG_INFINITY };
    }
    if x == 0.0 {
        if n == 0.0 {
            return 0.0;
        }
        return if p < 0.1 {
            -deviance(n, n * q) - n * p
        } else {
            n * q.ln()
        };
    }
    if x == n {
        return if q < 0.1 {
            -deviance(n, n * p) - n * q
        } else {
            n * p.ln()
        };
    }
    let lc = stirling_error(n)
        - stirling_error(x)
        - stirling_error(n - x)
        - deviance(x, n * p)
        - deviance(n - x, n * q);
    let lf = (2.0 * PI).ln() + x.ln() + (-x / n).ln_1p();
    lc - 0.5 * lf
}

/// `P(X >= k)` for `X ~ Binomial(n, p)`, with `q = 1 - p` given separately.
pub fn binomial_upper_tail(k: u64, n: u64, p: f64, q: f64) -> f64 {
    assert!(
        n <= COUNT_MAX,
        "binomial_upper_tail: n = {n} is over COUNT_MAX"
    );
    debug_assert!((p + q - 1.0).abs() < 1e-9, "p + q must be 1");
    if k == 0 {
        return 1.0;
    }
    if k > n || p <= 0.0 {
        return 0.0;
    }
    if q <= 0.0 {
        return 1.0;
    }
    let (kf, nf) = (k as f64, n as f64);
    let odds = p / q;
    if kf > nf * p {
        // Upper tail from k: terms only shrink.
        let sum = sum_while_significant(k, n, |j| (nf - j) / (j + 1.0) * odds, true);
        (ln_binomial_mass(kf, nf, p, q) + sum.ln()).exp().min(1.0)
    } else {
        // 1 - P(X <= k - 1); the lower tail from k - 1 down, terms only shrink.
        let top = k - 1;
        let sum = sum_while_significant(top, 0, |j| j / ((nf - j + 1.0) * odds), false);
        let lower = (ln_binomial_mass(top as f64, nf, p, q) + sum.ln()).exp();
        (1.0 - lower).clamp(0.0, 1.0)
    }
}

/// `P(X >= x)` for `X` the number of marked items among `drawn` taken without replacement
/// from `marked + unmarked` items (the hypergeometric distribution). Fisher's exact test, one
/// sided: `x` events in a cohort of `marked` trials, `drawn` events in all the trials.
pub fn hypergeometric_upper_tail(x: u64, marked: u64, unmarked: u64, drawn: u64) -> f64 {
    let total = marked
        .checked_add(unmarked)
        .filter(|&t| t <= COUNT_MAX)
        .expect("hypergeometric_upper_tail: population is over COUNT_MAX");
    assert!(
        drawn <= total,
        "hypergeometric_upper_tail: drawn {drawn} > {total}"
    );
    let low = drawn.saturating_sub(unmarked);
    let high = marked.min(drawn);
    if x <= low {
        return 1.0;
    }
    if x > high {
        return 0.0;
    }
    let (r, b, n) = (marked as f64, unmarked as f64, drawn as f64);
    let mean = r * n / (r + b);
    if (x as f64) > mean {
        // P(j + 1) / P(j) = (r - j)(n - j) / ((j + 1)(b - n + j + 1)), shrinking past the mean.
        let sum = sum_while_significant(
            x,
            high,
            |j| (r - j) * (n - j) / ((j + 1.0) * (b - n + j + 1.0)),
            true,
        );
        (ln_hypergeometric_mass(x as f64, r, b, n) + sum.ln())
            .exp()
            .min(1.0)
    } else {
        // 1 - P(X <= x - 1); P(j - 1) / P(j) = j (b - n + j) / ((r - j + 1)(n - j + 1)).
        let top = x - 1;
        let sum = sum_while_significant(
            top,
            low,
            |j| j * (b - n + j) / ((r - j + 1.0) * (n - j + 1.0)),
            false,
        );
        let lower = (ln_hypergeometric_mass(top as f64, r, b, n) + sum.ln()).exp();
        (1.0 - lower).clamp(0.0, 1.0)
    }
}

/// `ln P(X = x)` for the hypergeometric distribution above, as R's `dhyper` computes it: a ratio
/// of three binomial masses at the same `p`, each accurate on its own.
fn ln_hypergeometric_mass(x: f64, r: f64, b: f64, n: f64) -> f64 {
    let p = n / (r + b);
    let q = (r + b - n) / (r + b);
    ln_binomial_mass(x, r, p, q) + ln_binomial_mass(n - x, b, p, q)
        - ln_binomial_mass(n, r + b, p, q)
}

/// `1 + t1 + t2 + ...` where `t(i+1) = t(i) * ratio(j)` walking `j` from `start` one step at a
/// time (up when `upward`, else down) until `end`, stopping once a term no longer counts.
/// Every ratio on the walk must be <= 1 (a tail summed from its largest end).
fn sum_while_significant(start: u64, end: u64, ratio: impl Fn(f64) -> f64, upward: bool) -> f64 {
    let mut sum = 1.0;
    let mut term = 1.0;
    let mut j = start;
    while j != end {
        term *= ratio(j as f64);
        sum += term;
        if term < sum * TAIL_EPSILON {
            break;
        }
        j = if upward { j + 1 } else { j - 1 };
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        a == b || ((a - b).abs() / b.abs().max(f64::MIN_POSITIVE)) <= rel
    }

    /// `C(n, k)` exactly, for n <= 60.
    fn choose(n: u64, k: u64) -> u128 {
        let k = k.min(n - k);
        (0..k).fold(1u128, |acc, i| acc * u128::from(n - i) / u128::from(i + 1))
    }

    #[test]
    fn stirling_error_matches_log_factorial() {
        for n in [1u64, 2, 7, 15, 16, 35, 36, 80, 81, 500, 501, 10_000] {
            let nf = n as f64;
            let ln_factorial: f64 = (2..=n).map(|i| (i as f64).ln()).sum();
            let direct = ln_factorial - (nf + 0.5) * nf.ln() + nf - 0.5 * (2.0 * PI).ln();
            // The direct form loses ~1e-16 * ln(n!) absolutely; compare at that scale.
            let tolerance = 1e-14 * ln_factorial.max(1.0);
            assert!(
                (stirling_error(nf) - direct).abs() < tolerance,
                "n={n}: {} vs {direct}",
                stirling_error(nf)
            );
        }
    }

    #[test]
    fn binomial_mass_matches_exact_small_cases() {
        for n in [1u64, 2, 5, 17, 40, 60] {
            for k in 0..=n {
                for (p, q) in [(0.5, 0.5), (0.1, 0.9), (0.25, 0.75), (0.9, 0.1)] {
                    let exact =
                        choose(n, k) as f64 * f64::powi(p, k as i32) * f64::powi(q, (n - k) as i32);
                    let got = ln_binomial_mass(k as f64, n as f64, p, q).exp();
                    assert!(
                        close(got, exact, 1e-12),
                        "n={n} k={k} p={p}: {got} vs {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn hypergeometric_tail_matches_exact_enumeration() {
        // Exact rational: sum of C(r, j) C(b, n - j) over j >= x, divided by C(r + b, n).
        for (r, b) in [(3u64, 5u64), (10, 10), (1, 30), (25, 35), (30, 1)] {
            for n in 0..=(r + b) {
                let denominator = choose(r + b, n);
                let low = n.saturating_sub(b);
                let high = r.min(n);
                for x in 0..=r + 1 {
                    let numerator: u128 = (x.max(low)..=high)
                        .map(|j| choose(r, j) * choose(b, n - j))
                        .sum();
                    let exact = numerator as f64 / denominator as f64;
                    let got = hypergeometric_upper_tail(x, r, b, n);
                    assert!(
                        close(got, exact, 1e-11) || (got - exact).abs() < 1e-15,
                        "r={r} b={b} n={n} x={x}: {got} vs {exact}"
                    );
                }
            }
        }
    }
}
