//! Successive halving's two rules: which points go on after a rung, and
//! the step budgets of the rungs.

/// Keep the better half (rounded up) of `scores` (lower is better; missing
/// or non-finite scores rank last). Returns the kept indices, best first.
pub fn halve(scores: &[(usize, Option<f64>)]) -> Vec<usize> {
    let mut v: Vec<(usize, f64)> = scores
        .iter()
        .map(|(i, s)| (*i, s.filter(|x| x.is_finite()).unwrap_or(f64::INFINITY)))
        .collect();
    v.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    v.truncate(scores.len().div_ceil(2));
    v.into_iter().map(|(i, _)| i).collect()
}

/// Budgets (cumulative steps) of the halving rungs for `n` points and `steps`.
pub fn halving_budgets(n: usize, steps: u64) -> Vec<u64> {
    let rungs = usize::BITS - n.max(1).leading_zeros(); // floor(log2 n) + 1
    let mut b: Vec<u64> = (0..rungs)
        .map(|r| (steps >> (rungs - 1 - r)).max(1))
        .collect();
    b.dedup();
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halving_keeps_the_better_half() {
        let scores = [
            (0, Some(3.0)),
            (1, Some(1.0)),
            (2, None),
            (3, Some(2.0)),
            (4, Some(f64::NAN)),
        ];
        assert_eq!(halve(&scores), vec![1, 3, 0]);
        assert_eq!(halve(&[(7, Some(1.0))]), vec![7]);
    }

    #[test]
    fn halving_budgets_double_up_to_the_full_run() {
        assert_eq!(halving_budgets(4, 8), vec![2, 4, 8]);
        assert_eq!(halving_budgets(12, 300), vec![37, 75, 150, 300]);
        assert_eq!(halving_budgets(1, 10), vec![10]);
        assert_eq!(halving_budgets(5, 2), vec![1, 2]);
    }
}
