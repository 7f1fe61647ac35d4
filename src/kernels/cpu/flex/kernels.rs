//! [`FusedKernels`] for the CPU backend: the forward passes that save what
//! their backward needs, and the backward passes.

use super::*;

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
        _fused: bool,
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
        _fused: bool,
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
