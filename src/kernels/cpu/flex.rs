//! The CPU backend's implementation of [`FusedOps`] and [`FusedKernels`]:
//! unwrap the flex tensors into slices, run the kernels in the sibling
//! modules ([`super`], [`super::grouped`], [`super::attention`],
//! [`super::head`], [`super::norm`], [`super::adamw`]), and wrap the results.

use super::super::{FusedKernels, FusedOps, GroupedSaved};
use super::{self as cpu, adamw, attention, grouped, head, norm};
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::TensorData;

/// An f32 tensor's values, contiguous.
fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(owned(t.to_contiguous())),
    }
}

/// An integer tensor's values as i64, whatever its integer width.
fn indices(t: &FlexTensor) -> Vec<i64> {
    t.clone()
        .into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .unwrap_or_else(|e| panic!("fused kernels take integer indices: {e:?}"))
}

fn shape_of(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().to_vec()
}

fn tensor(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

impl FusedOps for Flex {
    fn cross_entropy_rows(logits: FlexTensor, targets: FlexTensor) -> FlexTensor {
        Self::cross_entropy_rows_lse(logits, targets).0
    }

    fn fused_linear(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        let (n, d_in, d_out) = linear_dims(&x, &w);
        let mut y = cpu::zeros(n * d_out);
        cpu::linear(&values(&x), &values(&w), (n, d_in, d_out), &mut y);
        tensor(y, vec![n, d_out])
    }

    fn linear_cross_entropy(
        x: FlexTensor,
        w: FlexTensor,
        targets: FlexTensor,
        weights: FlexTensor,
    ) -> FlexTensor {
        let (dims, t) = head_dims(&x, &w, &targets, &weights);
        let loss = head::loss(&values(&x), &values(&w), &t, &values(&weights), dims);
        tensor(vec![loss], vec![1])
    }

    fn linear_cross_entropy_rows(x: FlexTensor, w: FlexTensor, targets: FlexTensor) -> FlexTensor {
        let n = shape_of(&x)[0];
        let ones = tensor(vec![1.0; n], vec![n]);
        let (dims, t) = head_dims(&x, &w, &targets, &ones);
        let nll = head::row_losses(&values(&x), &values(&w), &t, dims);
        tensor(nll, vec![n])
    }

    fn adamw_update(
        param: FlexTensor,
        grad: FlexTensor,
        m: FlexTensor,
        v: FlexTensor,
        scale: FlexTensor,
        hyper: [f32; 7],
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let shape = shape_of(&param);
        let scale = values(&scale)[0];
        let (mut p, mut m, mut v) = (owned(param), owned(m), owned(v));
        adamw::adamw(&mut p, &values(&grad), &mut m, &mut v, scale, hyper);
        (
            tensor(p, shape.clone()),
            tensor(m, shape.clone()),
            tensor(v, shape),
        )
    }

    fn sum_squares(x: FlexTensor) -> FlexTensor {
        tensor(vec![adamw::sum_squares(&values(&x))], vec![1])
    }

    fn grouped_swiglu(
        x: FlexTensor,
        gate: FlexTensor,
        up: FlexTensor,
        down: FlexTensor,
        offsets: Vec<usize>,
        _fused: bool,
    ) -> FlexTensor {
        Self::grouped_swiglu_forward(x, [gate, up, down], offsets, false).0
    }

    fn causal_attention(q: FlexTensor, k: FlexTensor, v: FlexTensor) -> FlexTensor {
        Self::causal_attention_forward(q, k, v).0
    }

    fn rms_norm(x: FlexTensor, gamma: FlexTensor, eps: f32) -> FlexTensor {
        Self::rms_norm_forward(x, gamma, eps).0
    }

    fn rope(x: FlexTensor, cos: FlexTensor, sin: FlexTensor) -> FlexTensor {
        rope_apply(x, cos, sin, false)
    }

    fn combine_rows(rows: FlexTensor, index: FlexTensor, weights: FlexTensor) -> FlexTensor {
        let (t, k, d, idx) = combine_dims(&rows, &index, &weights);
        let mut out = cpu::zeros(t * d);
        grouped::combine_forward(&values(&rows), &idx, &values(&weights), k, d, &mut out);
        tensor(out, vec![t, d])
    }
}

/// `(T, k, d)` of a combine call and its indices, checked.
fn combine_dims(
    rows: &FlexTensor,
    index: &FlexTensor,
    weights: &FlexTensor,
) -> (usize, usize, usize, Vec<i64>) {
    let [_, d] = shape_of(rows)[..] else {
        panic!(
            "combine_rows: rows must be [R, d], got {:?}",
            shape_of(rows)
        )
    };
    let [t, k] = shape_of(weights)[..] else {
        panic!(
            "combine_rows: weights must be [T, k], got {:?}",
            shape_of(weights)
        )
    };
    let idx = indices(index);
    assert_eq!(
        idx.len(),
        t * k,
        "combine_rows: {} indices for {t} × {k} weights",
        idx.len()
    );
    (t, k, d, idx)
}

/// RoPE or its transpose on the CPU backend.
fn rope_apply(x: FlexTensor, cos: FlexTensor, sin: FlexTensor, inverse: bool) -> FlexTensor {
    let shape = shape_of(&x);
    let [_, s, heads, hd] = shape[..] else {
        panic!("rope: x must be [B, S, H, hd], got {shape:?}")
    };
    assert_eq!(shape_of(&cos), vec![s, hd], "rope: tables must be [S, hd]");
    assert!(hd % 2 == 0, "rope: head width {hd} is odd");
    let xv = values(&x);
    let mut y = cpu::zeros(xv.len());
    norm::rope(&xv, &values(&cos), &values(&sin), s, heads, inverse, &mut y);
    tensor(y, shape)
}

/// The dimensions of a causal attention call, checked.
fn attention_dims(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor) -> attention::Dims {
    let [b, s, h, hd] = shape_of(q)[..] else {
        panic!("causal_attention: q must be [B, S, H, hd]")
    };
    let [kb, ks, kv, khd] = shape_of(k)[..] else {
        panic!("causal_attention: k must be [B, S, KV, hd]")
    };
    assert_eq!(
        shape_of(k),
        shape_of(v),
        "causal_attention: k and v differ in shape"
    );
    assert!(
        kb == b && ks == s && khd == hd && kv > 0 && h % kv == 0,
        "causal_attention: q {:?} and k {:?} do not fit",
        shape_of(q),
        shape_of(k)
    );
    attention::Dims { b, h, kv, s, hd }
}

/// `(n, d_in, d_out)` of a linear call, checked.
fn linear_dims(x: &FlexTensor, w: &FlexTensor) -> (usize, usize, usize) {
    let (xs, ws) = (shape_of(x), shape_of(w));
    let (&[n, d], &[d_in, d_out]) = (&xs[..], &ws[..]) else {
        panic!("linear: x {xs:?} and w {ws:?} must be matrices")
    };
    assert_eq!(d, d_in, "linear: x is {d} wide, w has {d_in} rows");
    (n, d_in, d_out)
}

/// The shapes of a linear cross-entropy call and its targets, checked.
fn head_dims(
    x: &FlexTensor,
    w: &FlexTensor,
    targets: &FlexTensor,
    weights: &FlexTensor,
) -> (head::Dims, Vec<i64>) {
    let [n, d] = shape_of(x)[..] else {
        panic!(
            "linear_cross_entropy: x must be [n, d], got {:?}",
            shape_of(x)
        )
    };
    let [wd, v] = shape_of(w)[..] else {
        panic!(
            "linear_cross_entropy: w must be [d, v], got {:?}",
            shape_of(w)
        )
    };
    assert_eq!(
        wd, d,
        "linear_cross_entropy: x is {d} wide, w has {wd} rows"
    );
    let t = indices(targets);
    assert_eq!(
        t.len(),
        n,
        "linear_cross_entropy: {n} rows but {} targets",
        t.len()
    );
    assert_eq!(
        shape_of(weights),
        vec![n],
        "linear_cross_entropy: {n} rows but weights {:?}",
        shape_of(weights)
    );
    let chunk = head::chunk_rows(v);
    (head::Dims { n, d, v, chunk }, t)
}

/// The dimensions of a grouped call.
fn grouping(x: &FlexTensor, gate: &FlexTensor) -> grouped::Dims {
    let [experts, d, f] = shape_of(gate)[..] else {
        panic!("grouped_swiglu: expert weights must be [E, d, F]")
    };
    assert_eq!(
        shape_of(x)[1],
        d,
        "grouped_swiglu: x width differs from the experts'"
    );
    grouped::Dims { experts, d, f }
}

/// An f32 tensor's values as an owned vector (no copy when the tensor is
/// contiguous and not shared).
fn owned(t: FlexTensor) -> Vec<f32> {
    match t.into_data().try_into_vec::<f32>() {
        Ok(v) => v,
        Err(e) => panic!("fused kernels take f32 tensors: {e:?}"),
    }
}

// The kernels behind the autodiff steps (forward with saved state, and
// backward): `kernels.rs`.
mod kernels;
