//! Causal grouped-query attention for the Cube backends (CUDA, wgpu):
//! forward and backward without the `[S, S]` score matrix.
//!
//! The forward keeps one running maximum, denominator and output row per
//! query (the online softmax) and saves each row's log-sum-exp; the
//! backward recomputes the probabilities from it. Memory is O(S) per head,
//! where the composed path holds `[B, H, S, S]` scores, probabilities and
//! their gradients. Key/value head g serves query heads
//! `g·H/KV .. (g+1)·H/KV` and is read in place, not repeated.
//!
//! One unit (thread) per query row in the forward and in the query
//! gradient, one per key row in the key and value gradients; a query row
//! stops at the diagonal and a key row starts there. Consecutive units
//! are consecutive rows of one head, so the key and value rows they read
//! at the same time are the same.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, CubeDim};

/// `q · k_j` over one head's width, q already scaled.
#[cube]
fn dot_row<F: Float>(qr: &Array<F>, keys: &Tensor<F>, at: usize, #[comptime] hd: usize) -> F {
    let mut acc = F::new(0.0);
    #[unroll]
    for d in 0..hd {
        acc += qr[d] * keys[at + d];
    }
    acc
}

/// One query row: `out = softmax(q kᵀ · scale) v` over keys `0..=i`, and
/// the row's log-sum-exp of the scaled scores.
#[cube(launch)]
fn forward_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<F>,
    scale: f32,
    #[comptime] hd: usize,
    #[define(F)] _dtype: ElemType,
) {
    let s = q.shape(1);
    let h = q.shape(2);
    let kv = k.shape(2);
    let row = ABSOLUTE_POS;
    if row >= q.shape(0) * h * s {
        terminate!();
    }
    let i = row % s;
    let head = (row / s) % h;
    let b = row / (s * h);
    let g = head / (h / kv);
    let q_at = ((b * s + i) * h + head) * hd;
    let scale = F::cast_from(scale);
    let mut qr = Array::<F>::new(hd);
    #[unroll]
    for d in 0..hd {
        qr[d] = q[q_at + d] * scale;
    }
    // Key 0 is in every causal row: start the running statistics there.
    let first = (b * s * kv + g) * hd;
    let mut m = dot_row::<F>(&qr, k, first, hd);
    let mut l = F::new(1.0);
    let mut acc = Array::<F>::new(hd);
    #[unroll]
    for d in 0..hd {
        acc[d] = v[first + d];
    }
    for j in 1..i + 1 {
        let at = ((b * s + j) * kv + g) * hd;
        let score = dot_row::<F>(&qr, k, at, hd);
        let m_new = F::max(m, score);
        let rescale = (m - m_new).exp();
        let p = (score - m_new).exp();
        l = l * rescale + p;
        #[unroll]
        for d in 0..hd {
            acc[d] = acc[d] * rescale + p * v[at + d];
        }
        m = m_new;
    }
    let inv = F::new(1.0) / l;
    #[unroll]
    for d in 0..hd {
        out[q_at + d] = acc[d] * inv;
    }
    lse[row] = m + l.ln();
}

/// One query row's gradient, `dq_i = scale · Σ_j p_ij (dp_ij − δ_i) k_j`
/// with `dp_ij = do_i · v_j` and `δ_i = do_i · o_i`; also writes δ_i for the
/// key and value gradients.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn query_grad_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &Tensor<F>,
    lse: &Tensor<F>,
    grad: &Tensor<F>,
    dq: &mut Tensor<F>,
    delta: &mut Tensor<F>,
    scale: f32,
    #[comptime] hd: usize,
    #[define(F)] _dtype: ElemType,
) {
    let s = q.shape(1);
    let h = q.shape(2);
    let kv = k.shape(2);
    let row = ABSOLUTE_POS;
    if row >= q.shape(0) * h * s {
        terminate!();
    }
    let i = row % s;
    let head = (row / s) % h;
    let b = row / (s * h);
    let g = head / (h / kv);
    let q_at = ((b * s + i) * h + head) * hd;
    let scale = F::cast_from(scale);
    let mut qr = Array::<F>::new(hd);
    let mut gr = Array::<F>::new(hd);
    let mut acc = Array::<F>::new(hd);
    let mut dl = F::new(0.0);
    #[unroll]
    for d in 0..hd {
        qr[d] = q[q_at + d] * scale;
        gr[d] = grad[q_at + d];
        dl += gr[d] * out[q_at + d];
        acc[d] = F::new(0.0);
    }
    let row_lse = lse[row];
    for j in 0..i + 1 {
        let at = ((b * s + j) * kv + g) * hd;
        let p = (dot_row::<F>(&qr, k, at, hd) - row_lse).exp();
        let dp = dot_row::<F>(&gr, v, at, hd);
        let ds = p * (dp - dl);
        #[unroll]
        for d in 0..hd {
            acc[d] += ds * k[at + d];
        }
    }
    #[unroll]
    for d in 0..hd {
        dq[q_at + d] = acc[d] * scale;
    }
    delta[row] = dl;
}

/// One key/value row's gradients over every query head it serves and
/// every query at or after it: `dv_j = Σ p_ij do_i` and
/// `dk_j = scale · Σ p_ij (dp_ij − δ_i) q_i`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn key_value_grad_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    lse: &Tensor<F>,
    delta: &Tensor<F>,
    grad: &Tensor<F>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    scale: f32,
    #[comptime] hd: usize,
    #[define(F)] _dtype: ElemType,
) {
    let s = q.shape(1);
    let h = q.shape(2);
    let kv = k.shape(2);
    let row = ABSOLUTE_POS;
    if row >= q.shape(0) * kv * s {
        terminate!();
    }
    let j = row % s;
    let g = (row / s) % kv;
    let b = row / (s * kv);
    let group = h / kv;
    let at = ((b * s + j) * kv + g) * hd;
    let scale = F::cast_from(scale);
    let mut kr = Array::<F>::new(hd);
    let mut vr = Array::<F>::new(hd);
    let mut dk_acc = Array::<F>::new(hd);
    let mut dv_acc = Array::<F>::new(hd);
    #[unroll]
    for d in 0..hd {
        kr[d] = k[at + d] * scale;
        vr[d] = v[at + d];
        dk_acc[d] = F::new(0.0);
        dv_acc[d] = F::new(0.0);
    }
    for r in 0..group {
        let head = g * group + r;
        for i in j..s {
            let q_at = ((b * s + i) * h + head) * hd;
            let stat = (b * h + head) * s + i;
            let p = (dot_row::<F>(&kr, q, q_at, hd) - lse[stat]).exp();
            let dp = dot_row::<F>(&vr, grad, q_at, hd);
            let ds = p * (dp - delta[stat]);
            #[unroll]
            for d in 0..hd {
                dv_acc[d] += p * grad[q_at + d];
                dk_acc[d] += ds * q[q_at + d];
            }
        }
    }
    #[unroll]
    for d in 0..hd {
        dk[at + d] = dk_acc[d] * scale;
        dv[at + d] = dv_acc[d];
    }
}

/// The dimensions of `q: [B, S, H, hd]` and `k, v: [B, S, KV, hd]`,
/// checked: `[B, S, H, KV, hd]`.
fn dims(q: &CubeTensor, k: &CubeTensor, v: &CubeTensor) -> [usize; 5] {
    let [b, s, h, hd] = q.meta.shape().dims::<4>();
    let [kb, ks, kv, khd] = k.meta.shape().dims::<4>();
    assert!(
        kb == b && ks == s && khd == hd && v.meta.shape().dims::<4>() == [b, s, kv, hd],
        "attention: q is [{b}, {s}, {h}, {hd}], k [{kb}, {ks}, {kv}, {khd}], v {:?}",
        v.meta.shape()
    );
    assert!(
        kv > 0 && h % kv == 0,
        "attention: {h} query heads are not a multiple of {kv} key/value heads"
    );
    [b, s, h, kv, hd]
}

fn empty_like(t: &CubeTensor, shape: Shape) -> CubeTensor {
    empty_device_dtype(t.client.clone(), t.device.clone(), shape, t.dtype)
}

fn launch_shape(t: &CubeTensor, units: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(&t.client, units);
    (calculate_cube_count_elemwise(&t.client, units, dim), dim)
}

/// The attention output `[B, S, H, hd]` and each query row's log-sum-exp
/// `[B, H, S]`.
pub fn forward(q: CubeTensor, k: CubeTensor, v: CubeTensor) -> (CubeTensor, CubeTensor) {
    let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
    let [b, s, h, _, hd] = dims(&q, &k, &v);
    let out = empty_like(&q, q.meta.shape().clone());
    let lse = empty_like(&q, Shape::new([b, h, s]));
    let (count, dim) = launch_shape(&q, b * h * s);
    let dtype = dtype_to_storage_type(q.dtype);
    forward_kernel::launch(
        &q.client.clone(),
        count,
        dim,
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        1.0 / (hd as f32).sqrt(),
        hd,
        dtype,
    );
    (out, lse)
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
    let delta = empty_like(&q, Shape::new([b, h, s]));
    let (count, dim) = launch_shape(&q, b * h * s);
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
        dtype,
    );
    let dk = empty_like(&k, k.meta.shape().clone());
    let dv = empty_like(&v, v.meta.shape().clone());
    let (count, dim) = launch_shape(&q, b * kv * s);
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
        dtype,
    );
    [dq, dk, dv]
}
