//! The backward of the Cube backends' causal grouped-query attention
//! ([`super::attention`]): the query gradient over tiles of keys and
//! values, then the key and value gradients over tiles of queries and
//! output gradients, each recomputing the probabilities from the saved
//! log-sum-exp. As in the forward, the tensors and tiles are in the
//! inputs' dtype and every statistic and accumulator in f32.

use super::attention::{dims, dot_tile, launch_tiles, load_tile, query_row, tile_rows};
use super::{empty_f32_like, empty_like};
use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

/// One tile of query rows per cube, as in the forward: each row's
/// gradient `dq_i = scale · Σ_j p_ij (dp_ij − δ_i) k_j` with
/// `dp_ij = do_i · v_j` and `δ_i = do_i · o_i`; also writes δ_i for the
/// key and value gradients.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn query_grad_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &Tensor<F>,
    lse: &Tensor<f32>,
    grad: &Tensor<F>,
    dq: &mut Tensor<F>,
    delta: &mut Tensor<f32>,
    scale: f32,
    #[comptime] hd: usize,
    #[comptime] tile: usize,
    #[define(F)] _dtype: ElemType,
) {
    let row = query_row::<F>(q, k, tile, hd);
    let (s, b, g, qt, i, live, q_at) = (row.s, row.b, row.g, row.qt, row.i, row.live, row.at);
    let stat = row.stat;
    let mut qr = Array::<f32>::new(hd);
    let mut gr = Array::<f32>::new(hd);
    let mut acc = Array::<f32>::new(hd);
    let mut dl = f32::new(0.0);
    #[unroll]
    for d in 0..hd {
        qr[d] = f32::cast_from(q[q_at + d]) * scale;
        gr[d] = f32::cast_from(grad[q_at + d]);
        dl += gr[d] * f32::cast_from(out[q_at + d]);
        acc[d] = f32::new(0.0);
    }
    let row_lse = lse[stat];
    let mut ks = Shared::<[F]>::new_slice(comptime!(tile * hd));
    let mut vs = Shared::<[F]>::new_slice(comptime!(tile * hd));
    for kt in 0..qt + 1 {
        let base = kt * tile;
        load_tile::<F>(k, &mut ks, b, g, base, s, tile, hd);
        load_tile::<F>(v, &mut vs, b, g, base, s, tile, hd);
        sync_cube();
        if live {
            for r in 0..tile {
                if base + r <= i {
                    let p = (dot_tile::<F>(&qr, &ks, r, hd) - row_lse).exp();
                    let ds = p * (dot_tile::<F>(&gr, &vs, r, hd) - dl);
                    #[unroll]
                    for d in 0..hd {
                        acc[d] += ds * f32::cast_from(ks[r * hd + d]);
                    }
                }
            }
        }
        sync_cube();
    }
    if live {
        #[unroll]
        for d in 0..hd {
            dq[q_at + d] = F::cast_from(acc[d] * scale);
        }
        delta[stat] = dl;
    }
}

/// One tile of key/value rows of one (batch, key/value head) per cube, one
/// unit per row: the gradients over every query head the row serves and
/// every query at or after it, `dv_j = Σ p_ij do_i` and
/// `dk_j = scale · Σ p_ij (dp_ij − δ_i) q_i`. The cube walks the query
/// tiles from the diagonal one on, loading each query and output-gradient
/// tile (and its log-sum-exp and δ) once into shared memory.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn key_value_grad_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    grad: &Tensor<F>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    scale: f32,
    #[comptime] hd: usize,
    #[comptime] tile: usize,
    #[define(F)] _dtype: ElemType,
) {
    let s = q.shape(1);
    let h = q.shape(2);
    let kv = k.shape(2);
    let kt = CUBE_POS_X as usize;
    let g = CUBE_POS_Y as usize % kv;
    let b = CUBE_POS_Y as usize / kv;
    let group = h / kv;
    let u = UNIT_POS_X as usize;
    let j = kt * tile + u;
    let live = j < s;
    let mut kj = s - 1;
    if live {
        kj = j;
    }
    let at = ((b * s + kj) * kv + g) * hd;
    let mut kr = Array::<f32>::new(hd);
    let mut vr = Array::<f32>::new(hd);
    let mut dk_acc = Array::<f32>::new(hd);
    let mut dv_acc = Array::<f32>::new(hd);
    #[unroll]
    for d in 0..hd {
        kr[d] = f32::cast_from(k[at + d]) * scale;
        vr[d] = f32::cast_from(v[at + d]);
        dk_acc[d] = f32::new(0.0);
        dv_acc[d] = f32::new(0.0);
    }
    let tiles = s.div_ceil(tile);
    let mut qs = Shared::<[F]>::new_slice(comptime!(tile * hd));
    let mut gs = Shared::<[F]>::new_slice(comptime!(tile * hd));
    let mut lse_s = Shared::<[f32]>::new_slice(tile);
    let mut delta_s = Shared::<[f32]>::new_slice(tile);
    for r in 0..group {
        let head = g * group + r;
        for qt in kt..tiles {
            let base = qt * tile;
            load_tile::<F>(q, &mut qs, b, head, base, s, tile, hd);
            load_tile::<F>(grad, &mut gs, b, head, base, s, tile, hd);
            if base + u < s {
                lse_s[u] = lse[(b * h + head) * s + base + u];
                delta_s[u] = delta[(b * h + head) * s + base + u];
            }
            sync_cube();
            if live {
                for rr in 0..tile {
                    let i = base + rr;
                    if i >= j && i < s {
                        let p = (dot_tile::<F>(&kr, &qs, rr, hd) - lse_s[rr]).exp();
                        let ds = p * (dot_tile::<F>(&vr, &gs, rr, hd) - delta_s[rr]);
                        #[unroll]
                        for d in 0..hd {
                            dv_acc[d] += p * f32::cast_from(gs[rr * hd + d]);
                            dk_acc[d] += ds * f32::cast_from(qs[rr * hd + d]);
                        }
                    }
                }
            }
            sync_cube();
        }
    }
    if live {
        #[unroll]
        for d in 0..hd {
            dk[at + d] = F::cast_from(dk_acc[d] * scale);
            dv[at + d] = F::cast_from(dv_acc[d]);
        }
    }
}

/// The gradients of q, k and v, from the inputs, the output and its
/// log-sum-exp, and the output gradient.
pub fn backward(
    [q, k, v]: [CubeTensor; 3],
    out: CubeTensor,
    lse: CubeTensor,
    grad: CubeTensor,
) -> [CubeTensor; 3] {
    let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
    let (out, lse, grad) = (
        into_contiguous(out),
        into_contiguous(lse),
        into_contiguous(grad),
    );
    let [b, s, h, kv, hd] = dims(&q, &k, &v);
    let scale = 1.0 / (hd as f32).sqrt();
    let dtype = dtype_to_storage_type(q.dtype);
    let dq = empty_like(&q, q.meta.shape().clone());
    let delta = empty_f32_like(&q, Shape::new([b, h, s]));
    let tile = tile_rows(&q, hd);
    let (count, dim) = launch_tiles(s, b * h, tile);
    query_grad_kernel::launch(
        &q.client.clone(),
        count,
        dim,
        q.clone().into_tensor_arg(),
        k.clone().into_tensor_arg(),
        v.clone().into_tensor_arg(),
        out.into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        grad.clone().into_tensor_arg(),
        dq.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        scale,
        hd,
        tile,
        dtype,
    );
    let dk = empty_like(&k, k.meta.shape().clone());
    let dv = empty_like(&v, v.meta.shape().clone());
    let (count, dim) = launch_tiles(s, b * kv, tile);
    key_value_grad_kernel::launch(
        &q.client.clone(),
        count,
        dim,
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        lse.into_tensor_arg(),
        delta.into_tensor_arg(),
        grad.into_tensor_arg(),
        dk.clone().into_tensor_arg(),
        dv.clone().into_tensor_arg(),
        scale,
        hd,
        tile,
        dtype,
    );
    [dq, dk, dv]
}
