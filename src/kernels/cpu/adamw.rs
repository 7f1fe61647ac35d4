//! The optimizer's CPU kernels: one AdamW pass over a flat parameter and
//! its moments, the gradient's sum of squares (for the global norm), and a
//! scaling pass.

use super::CHUNK;
use rayon::prelude::*;

/// `x *= s`, element-wise.
pub fn scale(x: &mut [f32], s: f32) {
    x.par_chunks_mut(CHUNK)
        .for_each(|x| x.iter_mut().for_each(|v| *v *= s));
}

/// One AdamW step in place. `hyper` is
/// `[lr, β1, β2, eps, weight decay, 1 - β1^t, 1 - β2^t]`; the gradient is
/// multiplied by `scale` first (global-norm clipping):
/// `m ← β1 m + (1-β1) g`, `v ← β2 v + (1-β2) g²`,
/// `p ← p (1 - lr·wd) - lr · (m / bc1) / (√(v / bc2) + eps)`.
pub fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], scale: f32, hyper: [f32; 7]) {
    let [lr, b1, b2, eps, wd, bc1, bc2] = hyper;
    let decay = 1.0 - lr * wd;
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .zip(g.par_chunks(CHUNK))
        .for_each(|((p, (m, v)), g)| {
            for i in 0..p.len() {
                let g = g[i] * scale;
                let mi = m[i] * b1 + g * (1.0 - b1);
                let vi = v[i] * b2 + g * g * (1.0 - b2);
                m[i] = mi;
                v[i] = vi;
                p[i] = p[i] * decay - (mi / bc1) / ((vi / bc2).sqrt() + eps) * lr;
            }
        });
}

/// Σ x², accumulated in f64 per chunk.
pub fn sum_squares(x: &[f32]) -> f32 {
    x.par_chunks(CHUNK)
        .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
        .sum::<f64>() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_follows_the_update_rule_over_three_steps() {
        // 40 000 values (three parallel chunks), checked against the rule in f64.
        let n = 40_000;
        let (lr, b1, b2, eps, wd, scale) = (0.01f64, 0.9f64, 0.95f64, 1e-8f64, 0.1f64, 0.5f64);
        let mut p: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.001).sin()).collect();
        let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
        let mut want: Vec<(f64, f64, f64)> = p.iter().map(|&p| (p as f64, 0.0, 0.0)).collect();
        for t in 1..=3 {
            let g: Vec<f32> = (0..n).map(|i| ((i * t) as f32 * 0.37).cos()).collect();
            let (bc1, bc2) = (1.0 - b1.powi(t as i32), 1.0 - b2.powi(t as i32));
            let hyper = [lr, b1, b2, eps, wd, bc1, bc2].map(|x| x as f32);
            adamw(&mut p, &g, &mut m, &mut v, scale as f32, hyper);
            for (w, &g) in want.iter_mut().zip(&g) {
                let g = g as f64 * scale;
                w.1 = b1 * w.1 + (1.0 - b1) * g;
                w.2 = b2 * w.2 + (1.0 - b2) * g * g;
                w.0 = w.0 * (1.0 - lr * wd) - lr * (w.1 / bc1) / ((w.2 / bc2).sqrt() + eps);
            }
        }
        for i in 0..n {
            assert!((p[i] as f64 - want[i].0).abs() < 1e-5, "param {i}");
            assert!((m[i] as f64 - want[i].1).abs() < 1e-6, "m {i}");
            assert!((v[i] as f64 - want[i].2).abs() < 1e-6, "v {i}");
        }
    }

    #[test]
    fn sum_squares_matches_a_plain_sum() {
        let x: Vec<f32> = (0..50_000).map(|i| (i as f32 * 0.01).sin()).collect();
        let want: f64 = x.iter().map(|&x| (x as f64).powi(2)).sum();
        assert!((sum_squares(&x) as f64 - want).abs() < 1e-6 * want);
    }
}
