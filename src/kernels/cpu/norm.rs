//! RMSNorm and RoPE kernels on the CPU: row-wise, split across the rayon
//! pool in row chunks like the kernels in [`super`].

use super::{lane_sum, lane_sum3, rows_per_task};
use rayon::prelude::*;

/// RMSNorm of each `d`-wide row: `y = x · r · gamma` with
/// `r = 1 / √(mean(x²) + eps)`; returns the `r` of every row.
pub fn rms_norm_forward(x: &[f32], gamma: &[f32], eps: f32, y: &mut [f32]) -> Vec<f32> {
    let d = gamma.len();
    let mut inv = vec![0.0; x.len() / d];
    let per = rows_per_task(d);
    y.par_chunks_mut(per * d)
        .zip(x.par_chunks(per * d).zip(inv.par_chunks_mut(per)))
        .for_each(|(y, (x, inv))| {
            for ((y, x), r) in y.chunks_mut(d).zip(x.chunks(d)).zip(inv.iter_mut()) {
                let ms = lane_sum(x, |v| v * v) / d as f32;
                *r = 1.0 / (ms + eps).sqrt();
                for ((y, &x), &g) in y.iter_mut().zip(x).zip(gamma) {
                    *y = x * *r * g;
                }
            }
        });
    inv
}

/// Gradients of [`rms_norm_forward`] from the rows' `r`: with `g = dy · gamma`,
/// `dx = r g - x r³ (g · x) / d` and `dgamma = Σ_rows dy x r`.
pub fn rms_norm_backward(
    x: &[f32],
    gamma: &[f32],
    inv: &[f32],
    dy: &[f32],
    dx: &mut [f32],
) -> Vec<f32> {
    let d = gamma.len();
    let per = rows_per_task(d);
    dx.par_chunks_mut(per * d)
        .zip(x.par_chunks(per * d).zip(dy.par_chunks(per * d)))
        .zip(inv.par_chunks(per))
        .map(|((dx, (x, dy)), inv)| {
            let mut dgamma = vec![0.0f32; d];
            let rows = dx.chunks_mut(d).zip(x.chunks(d).zip(dy.chunks(d)));
            for ((dx, (x, dy)), &r) in rows.zip(inv) {
                let gx = lane_sum3(dy, gamma, x, |dy, g, x| dy * g * x);
                let k = r * r * r * gx / d as f32;
                for j in 0..d {
                    dx[j] = r * dy[j] * gamma[j] - x[j] * k;
                    dgamma[j] += dy[j] * x[j] * r;
                }
            }
            dgamma
        })
        .reduce(
            || vec![0.0f32; d],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                a
            },
        )
}

/// RoPE with `rotate_half`: for each `hd`-wide row at position `pos`,
/// `y = x · cos[pos] + [-x2, x1] · sin[pos]` (x1, x2 the two halves), or its
/// transpose (the backward) when `inverse`: `[dy1 c1 + dy2 s2, dy2 c2 - dy1 s1]`.
/// `x` is `[.., S, heads, hd]`: row r sits at position `(r / heads) % s`.
#[allow(clippy::too_many_arguments)]
pub fn rope(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    s: usize,
    heads: usize,
    inverse: bool,
    y: &mut [f32],
) {
    let hd = cos.len() / s;
    let half = hd / 2;
    let per = rows_per_task(hd);
    y.par_chunks_mut(per * hd)
        .zip(x.par_chunks(per * hd))
        .enumerate()
        .for_each(|(task, (y, x))| {
            for (j, (y, x)) in y.chunks_mut(hd).zip(x.chunks(hd)).enumerate() {
                let pos = ((task * per + j) / heads) % s;
                let (c, sn) = (
                    &cos[pos * hd..(pos + 1) * hd],
                    &sin[pos * hd..(pos + 1) * hd],
                );
                for i in 0..half {
                    let (a, b) = (x[i], x[i + half]);
                    if inverse {
                        y[i] = a * c[i] + b * sn[i + half];
                        y[i + half] = b * c[i + half] - a * sn[i];
                    } else {
                        y[i] = a * c[i] - b * sn[i];
                        y[i + half] = b * c[i + half] + a * sn[i + half];
                    }
                }
            }
        });
}
