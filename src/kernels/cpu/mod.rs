//! The CPU kernels behind [`super`]: plain loops over contiguous `f32`
//! slices, split across the rayon pool in row or element chunks. Each
//! forward and backward is one pass over its data (a softmax row is read
//! three times while it sits in cache), where the composed tensor ops it
//! replaces make one full-size pass, and one allocation, per operation.
//!
//! One module per operation ([`grouped`], [`attention`], [`head`],
//! [`norm`], [`adamw`]), the matmuls in `matmul.rs`, the other shared
//! helpers here, and the CPU backend's
//! implementation of the extension in `flex.rs` (and `flex/kernels.rs`).

pub mod adamw;
pub mod attention;
mod flex;
pub mod grouped;
pub mod head;
mod matmul;
pub mod norm;

pub use matmul::{linear, linear_backward, matmul, matmul_strided, Operand};
use rayon::prelude::*;

/// Elements per parallel task of the element-wise kernels.
pub(crate) const CHUNK: usize = 16 * 1024;

/// Rows per parallel task of a row kernel whose rows hold `cols` values:
/// about [`CHUNK`] values per task, at least one row.
pub(crate) fn rows_per_task(cols: usize) -> usize {
    (CHUNK / cols.max(1)).max(1)
}

/// A zeroed f32 buffer of length `n`. Large buffers are zeroed across the
/// pool: a kernel's output allocation would otherwise be zeroed by one
/// thread while the others wait.
pub fn zeros(n: usize) -> Vec<f32> {
    if n < 4 * CHUNK {
        return vec![0.0; n];
    }
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(CHUNK)
        .for_each(|c| c.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: the first n elements were all written just above.
    unsafe { v.set_len(n) };
    v
}

/// `e^x` in single precision, written without branches or library calls so
/// that loops over it vectorise. Range reduction `x = n ln2 + r` with
/// |r| ≤ ln2 / 2 and a degree-6 polynomial for `e^r` (the Cephes `expf`
/// coefficients): relative error below 2e-7 on the whole finite range.
/// Inputs below -87.3 (including -inf) give 0, inputs above 88.3 saturate
/// at e^88.3.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let underflow = x < -87.3;
    let xc = x.clamp(-87.3, 88.3);
    // k = 1.5·2^23 + n exactly, so its bit pattern is 0x4B40_0000 + n.
    let k = xc * LOG2E + ROUND;
    let n = k - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.0e-1;
    let er = p * r * r + r + 1.0;
    // 2^n from the integer in k's bits: integer adds and a shift, which
    // vectorise (a float-to-int cast does not, with Rust's saturating `as`).
    let scale = f32::from_bits(k.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23);
    if underflow {
        0.0
    } else {
        er * scale
    }
}

/// Lanes of the reductions below. A loop that adds into one f32 cannot be
/// vectorised (the compiler may not reorder float additions); eight
/// independent accumulators can.
const LANES: usize = 8;

/// Σ f(a_i, b_i, c_i) over three equally long slices, in [`LANES`] lanes.
#[inline(always)]
pub(crate) fn lane_sum3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ac, bc, cc) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let (ar, br, cr) = (ac.remainder(), bc.remainder(), cc.remainder());
    for ((a, b), c) in ac.zip(bc).zip(cc) {
        for l in 0..LANES {
            acc[l] += f(a[l], b[l], c[l]);
        }
    }
    let tail: f32 = ar
        .iter()
        .zip(br)
        .zip(cr)
        .map(|((&a, &b), &c)| f(a, b, c))
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// Σ f(x_i) over a slice, in [`LANES`] lanes.
#[inline(always)]
pub(crate) fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        let mut v = [0.0f32; LANES];
        for l in 0..LANES {
            v[l] = f(c[l]);
        }
        for l in 0..LANES {
            acc[l] += v[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ a_i b_i, in [`LANES`] lanes.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    lane_sum3(a, b, b, |a, b, _| a * b)
}

/// The largest value of a slice (-inf when empty), in [`LANES`] lanes.
#[inline(always)]
pub(crate) fn lane_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

/// `h = silu(g) * u`, element-wise.
pub fn swiglu_forward(g: &[f32], u: &[f32], h: &mut [f32]) {
    h.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(h, (g, u))| {
            for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
                *h = g / (1.0 + exp(-g)) * u;
            }
        });
}

/// Gradients of [`swiglu_forward`]: with s = σ(g),
/// `dg = dh · u · s (1 + g (1 - s))` and `du = dh · g s`.
pub fn swiglu_backward(g: &[f32], u: &[f32], dh: &[f32], dg: &mut [f32], du: &mut [f32]) {
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .zip(dh.par_chunks(CHUNK))
        .for_each(|(((dg, du), (g, u)), dh)| {
            for i in 0..dg.len() {
                let (g, u, dh) = (g[i], u[i], dh[i]);
                let s = 1.0 / (1.0 + exp(-g));
                dg[i] = dh * u * s * (1.0 + g * (1.0 - s));
                du[i] = dh * g * s;
            }
        });
}

/// Softmax in place over the first `len` values of `row`; the values after
/// them become probability 0 (the causal mask of one attention row).
pub fn softmax_prefix(row: &mut [f32], len: usize) {
    let (live, masked) = row.split_at_mut(len);
    let max = lane_max(live);
    live.iter_mut().for_each(|p| *p = exp(*p - max));
    let inv = 1.0 / lane_sum(live, |p| p);
    live.iter_mut().for_each(|p| *p *= inv);
    masked.fill(0.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_to_2e7_relative_and_flushes_below_the_range() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn swiglu_kernels_follow_silu_and_its_derivative() {
        // 40 000 values: three parallel chunks. Checked against f64.
        let n = 40_000;
        let g: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.013).sin() * 8.0).collect();
        let u: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.029).cos() * 2.0).collect();
        let dh: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.007).sin()).collect();
        let mut h = vec![0.0; n];
        swiglu_forward(&g, &u, &mut h);
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        swiglu_backward(&g, &u, &dh, &mut dg, &mut du);
        for i in 0..n {
            let (g, u, dh) = (g[i] as f64, u[i] as f64, dh[i] as f64);
            let s = 1.0 / (1.0 + (-g).exp());
            assert!((h[i] as f64 - g * s * u).abs() < 1e-5, "h {i}");
            assert!(
                (dg[i] as f64 - dh * u * (s + g * s * (1.0 - s))).abs() < 1e-5,
                "dg {i}"
            );
            assert!((du[i] as f64 - dh * g * s).abs() < 1e-5, "du {i}");
        }
    }

    #[test]
    fn zeros_are_zero_at_every_size() {
        for n in [0, 5, 4 * CHUNK - 1, 4 * CHUNK, 9 * CHUNK + 3] {
            let z = zeros(n);
            assert_eq!(z.len(), n);
            assert!(z.iter().all(|&v| v == 0.0), "n = {n}");
        }
    }

    #[test]
    fn softmax_prefix_sums_to_one_and_masks_the_rest() {
        let x: Vec<f32> = (0..7).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        for len in 1..=7 {
            let mut p = x.clone();
            softmax_prefix(&mut p, len);
            let z: f64 = x[..len].iter().map(|&v| (v as f64).exp()).sum();
            for c in 0..7 {
                let want = if c < len {
                    (x[c] as f64).exp() / z
                } else {
                    0.0
                };
                assert!((p[c] as f64 - want).abs() < 1e-6, "len {len} col {c}");
            }
        }
    }
}
