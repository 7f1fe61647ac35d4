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
    ) -> FlexTensor {
        Self::grouped_swiglu_forward(x, [gate, up, down], offsets).0
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

impl FusedKernels for Flex {
    fn cross_entropy_rows_lse(logits: FlexTensor, targets: FlexTensor) -> (FlexTensor, FlexTensor) {
        let shape = shape_of(&logits);
        let [n, v] = shape[..] else {
            panic!("cross_entropy_rows: logits must be [n, v], got {shape:?}")
        };
        let t = indices(&targets);
        assert_eq!(
            t.len(),
            n,
            "cross_entropy_rows: {n} rows but {} targets",
            t.len()
        );
        let x = values(&logits);
        let (mut loss, mut lse) = (cpu::zeros(n), cpu::zeros(n));
        head::cross_entropy_forward(&x, &t, v, &mut loss, &mut lse);
        (tensor(loss, vec![n]), tensor(lse, vec![n]))
    }

    fn grouped_swiglu_forward(
        x: FlexTensor,
        weights: [FlexTensor; 3],
        offsets: Vec<usize>,
    ) -> (FlexTensor, GroupedSaved<Self>) {
        let (dims, offs) = (grouping(&x, &weights[0]), offsets);
        let n = shape_of(&x)[0];
        let [gate, up, down] = weights.each_ref().map(values);
        let (y, saved) = grouped::forward(&values(&x), &gate, &up, &down, &offs, dims);
        let nf = vec![n, dims.f];
        let saved = [
            tensor(saved.g, nf.clone()),
            tensor(saved.u, nf.clone()),
            tensor(saved.h, nf),
        ];
        (tensor(y, vec![n, dims.d]), saved)
    }

    fn grouped_swiglu_backward(
        x: FlexTensor,
        weights: [FlexTensor; 3],
        offsets: Vec<usize>,
        saved: GroupedSaved<Self>,
        grad: FlexTensor,
    ) -> [FlexTensor; 4] {
        let (dims, offs) = (grouping(&x, &weights[0]), offsets);
        let [gate, up, down] = weights.each_ref().map(values);
        let [g, u, h] = saved.each_ref().map(values);
        let saved = grouped::Saved {
            g: &g[..],
            u: &u[..],
            h: &h[..],
        };
        let (dx, dg, du, dd) = grouped::backward(
            &values(&x),
            &gate,
            &up,
            &down,
            &offs,
            dims,
            saved,
            &values(&grad),
        );
        let [wg_shape, wu_shape, wd_shape] = weights.each_ref().map(shape_of);
        [
            tensor(dx, shape_of(&x)),
            tensor(dg, wg_shape),
            tensor(du, wu_shape),
            tensor(dd, wd_shape),
        ]
    }

    fn rms_norm_forward(x: FlexTensor, gamma: FlexTensor, eps: f32) -> (FlexTensor, FlexTensor) {
        let shape = shape_of(&x);
        let d = shape_of(&gamma)[0];
        assert_eq!(
            shape.last(),
            Some(&d),
            "rms_norm: gamma width differs from x"
        );
        let xv = values(&x);
        let mut y = cpu::zeros(xv.len());
        let inv = norm::rms_norm_forward(&xv, &values(&gamma), eps, &mut y);
        let rows = inv.len();
        (tensor(y, shape), tensor(inv, vec![rows]))
    }

    fn rms_norm_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        inv_rms: FlexTensor,
        grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let shape = shape_of(&x);
        let xv = values(&x);
        let mut dx = cpu::zeros(xv.len());
        let dgamma = norm::rms_norm_backward(
            &xv,
            &values(&gamma),
            &values(&inv_rms),
            &values(&grad),
            &mut dx,
        );
        (tensor(dx, shape), tensor(dgamma, shape_of(&gamma)))
    }

    fn rope_backward(grad: FlexTensor, cos: FlexTensor, sin: FlexTensor) -> FlexTensor {
        rope_apply(grad, cos, sin, true)
    }

    fn causal_attention_forward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let dims = attention_dims(&q, &k, &v);
        let (o, p) = attention::forward(&values(&q), &values(&k), &values(&v), dims);
        let (b, h, s) = (dims.b, dims.h, dims.s);
        (tensor(o, shape_of(&q)), tensor(p, vec![b, h, s, s]))
    }

    fn causal_attention_backward(
        qkv: [FlexTensor; 3],
        out: FlexTensor,
        probs: FlexTensor,
        grad: FlexTensor,
    ) -> [FlexTensor; 3] {
        let [q, k, v] = &qkv;
        let dims = attention_dims(q, k, v);
        let (dq, dk, dv) = attention::backward(
            &values(q),
            &values(k),
            &values(v),
            &values(&out),
            &values(&probs),
            &values(&grad),
            dims,
        );
        [
            tensor(dq, shape_of(q)),
            tensor(dk, shape_of(k)),
            tensor(dv, shape_of(v)),
        ]
    }

    fn fused_linear_backward(x: FlexTensor, w: FlexTensor, grad: FlexTensor) -> [FlexTensor; 2] {
        let (n, d_in, d_out) = linear_dims(&x, &w);
        let (mut dx, mut dw) = (cpu::zeros(n * d_in), cpu::zeros(d_in * d_out));
        let (xv, wv, g) = (values(&x), values(&w), values(&grad));
        cpu::linear_backward(&xv, &wv, &g, (n, d_in, d_out), &mut dx, &mut dw, false);
        [tensor(dx, vec![n, d_in]), tensor(dw, vec![d_in, d_out])]
    }

    fn linear_cross_entropy_forward(
        x: FlexTensor,
        w: FlexTensor,
        targets: FlexTensor,
        weights: FlexTensor,
    ) -> [FlexTensor; 3] {
        let (dims, t) = head_dims(&x, &w, &targets, &weights);
        let (loss, dx, dw) =
            head::loss_and_grads(&values(&x), &values(&w), &t, &values(&weights), dims);
        [
            tensor(vec![loss], vec![1]),
            tensor(dx, shape_of(&x)),
            tensor(dw, shape_of(&w)),
        ]
    }

    fn linear_cross_entropy_backward(
        dx: FlexTensor,
        dw: FlexTensor,
        grad: FlexTensor,
    ) -> [FlexTensor; 2] {
        let g = values(&grad)[0];
        [dx, dw].map(|t| {
            let shape = shape_of(&t);
            let mut v = owned(t);
            adamw::scale(&mut v, g);
            tensor(v, shape)
        })
    }

    fn combine_rows_backward(
        rows: FlexTensor,
        index: FlexTensor,
        weights: FlexTensor,
        grad: FlexTensor,
    ) -> [FlexTensor; 2] {
        let (t, k, d, idx) = combine_dims(&rows, &index, &weights);
        let rv = values(&rows);
        let (mut d_rows, mut d_w) = (cpu::zeros(rv.len()), cpu::zeros(t * k));
        grouped::combine_backward(
            &rv,
            &idx,
            &values(&weights),
            k,
            d,
            &values(&grad),
            &mut d_rows,
            &mut d_w,
        );
        [tensor(d_rows, shape_of(&rows)), tensor(d_w, vec![t, k])]
    }

    fn cross_entropy_rows_backward(
        logits: FlexTensor,
        targets: FlexTensor,
        lse: FlexTensor,
        grad: FlexTensor,
    ) -> FlexTensor {
        let shape = shape_of(&logits);
        let v = shape[1];
        let (x, t, lse, g) = (
            values(&logits),
            indices(&targets),
            values(&lse),
            values(&grad),
        );
        let mut d = cpu::zeros(x.len());
        head::cross_entropy_backward(&x, &t, &lse, &g, v, &mut d);
        tensor(d, shape)
    }
}
