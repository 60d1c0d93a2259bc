//! Benjamini-Hochberg adjusted p-values (q-values) for a family of tests.

/// The Benjamini-Hochberg adjusted p-value of each p-value, in the same order: rejecting every
/// hypothesis whose q-value is <= `q` keeps the expected share of false discoveries among the
/// rejections at or below `q` (for independent or positively dependent tests).
///
/// `q_i = min over j with p_j >= p_i of (p_j * m / rank_j)`, capped at 1, where `rank_j` is the
/// 1-based position of `p_j` in ascending order. Tied p-values get the same q-value (the
/// running minimum from the largest p-value down reaches the last of a tie first).
pub fn benjamini_hochberg(p_values: &[f64]) -> Vec<f64> {
    let m = p_values.len();
    let mut order: Vec<usize> = (0..m).collect();
    // total_cmp: a NaN (never passed by this crate) would sort last instead of panicking.
    order.sort_by(|&a, &b| p_values[a].total_cmp(&p_values[b]));
    let mut q_values = vec![1.0; m];
    let mut running_min = 1.0f64;
    for (position, &index) in order.iter().enumerate().rev() {
        let rank = position + 1;
        let adjusted = p_values[index] * m as f64 / rank as f64;
        running_min = running_min.min(adjusted);
        q_values[index] = running_min;
    }
    q_values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_hand_computed_adjustments() {
        // Sorted p: 0.01, 0.02, 0.03, 0.04, 0.05 with m = 5: p * 5 / rank = 0.05 for every one.
        let q = benjamini_hochberg(&[0.05, 0.01, 0.04, 0.02, 0.03]);
        for value in q {
            assert!((value - 0.05).abs() < 1e-15, "{value}");
        }
        // 0.001 * 3 / 1 = 0.003; 0.04 * 3 / 2 = 0.06; 0.5 * 3 / 3 = 0.5.
        let q = benjamini_hochberg(&[0.5, 0.001, 0.04]);
        assert_eq!(q.len(), 3);
        assert!((q[0] - 0.5).abs() < 1e-15);
        assert!((q[1] - 0.003).abs() < 1e-15);
        assert!((q[2] - 0.06).abs() < 1e-15);
        // A later smaller adjusted value carries down: 0.03 * 2 / 1 = 0.06 but 0.031 * 2 / 2 = 0.031.
        let q = benjamini_hochberg(&[0.03, 0.031]);
        assert!((q[0] - 0.031).abs() < 1e-15 && (q[1] - 0.031).abs() < 1e-15);
    }

    #[test]
    fn ties_share_a_q_value_and_values_are_capped_at_one() {
        let q = benjamini_hochberg(&[0.01, 0.01, 0.01, 1.0]);
        // Rank 3 gives 0.01 * 4 / 3 for every tied value.
        for value in &q[..3] {
            assert!((value - 0.04 / 3.0).abs() < 1e-15, "{value}");
        }
        assert_eq!(q[3], 1.0);
        assert!(benjamini_hochberg(&[]).is_empty());
        assert_eq!(benjamini_hochberg(&[1.0, 1.0]), vec![1.0, 1.0]);
    }
}
