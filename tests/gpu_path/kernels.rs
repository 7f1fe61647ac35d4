//! Each GPU kernel against the operation composed from Burn's tensor
//! operations on the same device, in value and in every input gradient.

use super::assert_close;
use burn::prelude::*;

/// Burn's attention on key/value heads repeated to the query heads, heads
/// first: the composed reference for the GPU kernel.
pub(super) fn composed_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    let (h, kv) = (q.dims()[2], k.dims()[2]);
    let repeat = |x: Tensor<4>| {
        let [b, s, _, hd] = x.dims();
        x.unsqueeze_dim::<5>(3)
            .expand([b, s, kv, h / kv, hd])
            .reshape([b, s, h, hd])
            .swap_dims(1, 2)
    };
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: true,
    };
    attention(q.swap_dims(1, 2), repeat(k), repeat(v), None, None, options).swap_dims(1, 2)
}

/// The GPU attention kernel (online softmax over tiles of keys, no
/// `[S, S]` tensor) against the composed attention on the same device, in
/// value and in the gradients of q, k and v: grouped and ungrouped heads,
/// one token, lengths that are not multiples of the tile (several tiles
/// per head at S = 150 and S = 300, whatever tile the device's shared
/// memory allows), and two head widths (each width compiles its own
/// kernels, which llvmpipe does slowly).
#[test]
fn gpu_attention_kernel_matches_composed_attention_and_its_gradients() {
    use burn::tensor::Distribution;
    use switchyard::kernels::{self, served_on, Op};
    let gpu = Device::wgpu(Default::default()).autodiff();
    assert!(served_on(
        Op::CausalAttention,
        &gpu,
        burn::tensor::DType::F32
    ));
    gpu.seed(11);
    for (b, h, kv, s, hd) in [
        (2, 6, 2, 37, 8),
        (2, 2, 2, 1, 8),
        (1, 4, 2, 150, 8),
        (1, 4, 1, 300, 32),
    ] {
        let r = |heads| {
            Tensor::<4>::random([b, s, heads, hd], Distribution::Normal(0.0, 1.0), &gpu)
                .require_grad()
        };
        let (q, k, v) = (r(h), r(kv), r(kv));
        let w = Tensor::<4>::random([b, s, h, hd], Distribution::Normal(0.0, 1.0), &gpu);
        let ours = kernels::causal_attention(q.clone(), k.clone(), v.clone());
        let want = composed_attention(q.clone(), k.clone(), v.clone());
        let at = format!("B = {b}, H = {h}, KV = {kv}, S = {s}, hd = {hd}");
        assert_close("values", ours.clone(), want.clone(), &at);
        let g1 = (ours * w.clone()).sum().backward();
        let g2 = (want * w).sum().backward();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            assert_close(
                &format!("gradient of {name}"),
                x.grad(&g1).unwrap(),
                x.grad(&g2).unwrap(),
                &at,
            );
        }
    }
}

/// The GPU RMSNorm and RoPE kernels against their compositions on the same
/// device, in value and in the gradients of x (and gamma): rows not a
/// multiple of the workgroup, a 3-d and a 4-d input, two head widths.
#[test]
fn gpu_norm_and_rope_kernels_match_their_compositions_and_gradients() {
    use burn::tensor::Distribution;
    use switchyard::kernels::{self, served_on, Op};
    let gpu = Device::wgpu(Default::default()).autodiff();
    for op in [Op::RmsNorm, Op::Rope] {
        assert!(served_on(op, &gpu, burn::tensor::DType::F32), "{op:?}");
    }
    gpu.seed(7);
    let normal = |std| Distribution::Normal(0.0, std);

    for (b, s, d) in [(3, 37, 24), (1, 300, 64)] {
        let x = Tensor::<3>::random([b, s, d], normal(2.0), &gpu).require_grad();
        let gamma = Tensor::<1>::random([d], normal(1.0), &gpu).require_grad();
        let w = Tensor::<3>::random([b, s, d], normal(1.0), &gpu);
        let eps = 1e-5;
        let ours = kernels::rms_norm(x.clone(), gamma.clone(), eps).expect("served");
        let rms = (x.clone().square().mean_dim(2) + eps).sqrt();
        let want = x.clone() / rms * gamma.clone().reshape([1, 1, d]);
        let at = format!("rms_norm [{b}, {s}, {d}]");
        assert_close("values", ours.clone(), want.clone(), &at);
        let g1 = (ours * w.clone()).sum().backward();
        let g2 = (want * w).sum().backward();
        assert_close(
            "gradient of x",
            x.grad(&g1).unwrap(),
            x.grad(&g2).unwrap(),
            &at,
        );
        assert_close(
            "gradient of gamma",
            gamma.grad(&g1).unwrap(),
            gamma.grad(&g2).unwrap(),
            &at,
        );
    }

    for (b, s, h, hd) in [(2, 37, 3, 8), (1, 130, 4, 32)] {
        let x = Tensor::<4>::random([b, s, h, hd], normal(1.0), &gpu).require_grad();
        let angles = Tensor::<2>::random([s, hd], Distribution::Uniform(-3.0, 3.0), &gpu);
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        let w = Tensor::<4>::random([b, s, h, hd], normal(1.0), &gpu);
        let ours = kernels::rope(x.clone(), cos.clone(), sin.clone()).expect("served");
        let half = hd / 2;
        let rotated = Tensor::cat(
            vec![
                x.clone().slice([0..b, 0..s, 0..h, half..hd]).neg(),
                x.clone().slice([0..b, 0..s, 0..h, 0..half]),
            ],
            3,
        );
        let table = |t: Tensor<2>| t.reshape([1, s, 1, hd]);
        let want = x.clone() * table(cos) + rotated * table(sin);
        let at = format!("rope [{b}, {s}, {h}, {hd}]");
        assert_close("values", ours.clone(), want.clone(), &at);
        let g1 = (ours * w.clone()).sum().backward();
        let g2 = (want * w).sum().backward();
        assert_close(
            "gradient of x",
            x.grad(&g1).unwrap(),
            x.grad(&g2).unwrap(),
            &at,
        );
    }
}

/// The GPU AdamW kernel against the update composed from tensor operations
/// on the same device, decayed and not, over a size that is not a multiple
/// of the workgroup, in new buffers and in place.
#[test]
fn gpu_adamw_kernel_matches_the_composed_update() {
    use burn::tensor::Distribution;
    use switchyard::kernels::{adamw_update, served_on, AdamWStep, Op};
    let gpu = Device::wgpu(Default::default());
    assert!(served_on(Op::AdamW, &gpu, burn::tensor::DType::F32));
    gpu.seed(9);
    let n = 1000;
    let r = |std: f64| Tensor::<1>::random([n], Distribution::Normal(0.0, std), &gpu);
    let (param, grad, m) = (r(1.0), r(0.1), r(0.01));
    let v = r(0.01).abs();
    let scale = Tensor::<1>::from_floats([0.8], &gpu);
    for weight_decay in [0.1, 0.0] {
        let step = AdamWStep {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay,
            bias_correction: (1.0 - 0.9f64.powi(3), 1.0 - 0.95f64.powi(3)),
        };
        let g = grad.clone() * scale.clone();
        let m2 = m.clone().mul_scalar(0.9) + g.clone().mul_scalar(0.1);
        let v2 = v.clone().mul_scalar(0.95) + g.square().mul_scalar(0.05);
        let update = m2.clone().div_scalar(step.bias_correction.0)
            / (v2.clone().div_scalar(step.bias_correction.1).sqrt() + 1e-8);
        let p2 = param.clone().mul_scalar(1.0 - 3e-3 * weight_decay) - update.mul_scalar(3e-3);
        // Shared inputs get new buffers; inputs no other tensor holds (new
        // copies) are updated in place.
        let copy = |t: &Tensor<1>| Tensor::<1>::from_data(t.to_data(), &gpu);
        for unique in [false, true] {
            let (p, m1, v1) = if unique {
                adamw_update(
                    copy(&param),
                    grad.clone(),
                    copy(&m),
                    copy(&v),
                    scale.clone(),
                    &step,
                )
            } else {
                adamw_update(
                    param.clone(),
                    grad.clone(),
                    m.clone(),
                    v.clone(),
                    scale.clone(),
                    &step,
                )
            };
            for (name, a, b) in [
                ("parameter", p, p2.clone()),
                ("first moment", m1, m2.clone()),
                ("second moment", v1, v2.clone()),
            ] {
                assert_close(
                    name,
                    a,
                    b,
                    &format!("weight decay {weight_decay}, unique {unique}"),
                );
            }
        }
    }
}

/// The GPU grouped experts (exact rows per expert, no padding) against the
/// SwiGLU composed expert by expert on the same device, in value and in
/// the gradients of x and the three stacks: an expert with no rows (its
/// gradients zero), one with a single row, and uneven others; both
/// kernels, CubeCL's matmuls with a separate SwiGLU pass and the SwiGLU
/// fused into switchyard's tiled matmul, at widths that are not multiples
/// of its 16-wide tiles (and experts over several row tiles).
#[test]
fn gpu_grouped_experts_match_the_composed_experts_and_their_gradients() {
    for fused in [false, true] {
        grouped_against_composed(24, 40, &[0, 5, 5, 6, 20, 57], fused);
        grouped_against_composed(33, 17, &[0, 0, 40, 41], fused);
    }
}

fn grouped_against_composed(d: usize, f: usize, offsets: &[usize], fused: bool) {
    use burn::tensor::activation::silu;
    use burn::tensor::Distribution;
    use switchyard::kernels::{grouped_swiglu_with, served_on, Op};
    let gpu = Device::wgpu(Default::default()).autodiff();
    assert!(served_on(Op::GroupedSwiglu, &gpu, burn::tensor::DType::F32));
    gpu.seed(13);
    let at = format!("d {d}, F {f}, offsets {offsets:?}, fused {fused}");
    let (e, n) = (offsets.len() - 1, offsets[offsets.len() - 1]);
    let normal = |std| Distribution::Normal(0.0, std);
    let x = Tensor::<2>::random([n, d], normal(1.0), &gpu).require_grad();
    let gate = Tensor::<3>::random([e, d, f], normal(0.2), &gpu).require_grad();
    let up = Tensor::<3>::random([e, d, f], normal(0.2), &gpu).require_grad();
    let down = Tensor::<3>::random([e, f, d], normal(0.2), &gpu).require_grad();
    let w = Tensor::<2>::random([n, d], normal(1.0), &gpu);

    let ours = grouped_swiglu_with(
        x.clone(),
        gate.clone(),
        up.clone(),
        down.clone(),
        offsets.to_vec(),
        fused,
    );
    let expert = |t: &Tensor<3>, i: usize| {
        let [_, a, b] = t.dims();
        t.clone().slice([i..i + 1, 0..a, 0..b]).reshape([a, b])
    };
    let parts: Vec<Tensor<2>> = (0..e)
        .filter(|&i| offsets[i + 1] > offsets[i])
        .map(|i| {
            let xe = x.clone().slice([offsets[i]..offsets[i + 1], 0..d]);
            let h = silu(xe.clone().matmul(expert(&gate, i))) * xe.matmul(expert(&up, i));
            h.matmul(expert(&down, i))
        })
        .collect();
    let want = Tensor::cat(parts, 0);
    assert_close("values", ours.clone(), want.clone(), &at);
    let g1 = (ours * w.clone()).sum().backward();
    let g2 = (want * w).sum().backward();
    assert_close(
        "gradient of x",
        x.grad(&g1).unwrap(),
        x.grad(&g2).unwrap(),
        &at,
    );
    let empty = (0..e).find(|&i| offsets[i + 1] == offsets[i]).unwrap();
    for (name, p) in [("gate", &gate), ("up", &up), ("down", &down)] {
        let (a, b) = (p.grad(&g1).unwrap(), p.grad(&g2).unwrap());
        let zero = a
            .clone()
            .narrow(0, empty, 1)
            .abs()
            .max()
            .into_scalar::<f32>();
        assert_eq!(
            zero, 0.0,
            "the expert with no rows has a {name} gradient at {at}"
        );
        assert_close(&format!("gradient of {name}"), a, b, &at);
    }
}

/// The GPU combine (each token's weighted sum of its rows, read in place)
/// against the gather-and-sum it replaces, in value and in the gradients of
/// the rows and the weights: dropped assignments (index R) add nothing, and
/// rows no assignment reads get a zero gradient.
#[test]
fn gpu_combine_matches_the_composed_combine_and_its_gradients() {
    use burn::tensor::{Distribution, Int, TensorData};
    use switchyard::kernels::{combine_rows, served_on, Op};
    let gpu = Device::wgpu(Default::default()).autodiff();
    assert!(served_on(Op::Combine, &gpu, burn::tensor::DType::F32));
    gpu.seed(17);
    let (t, k, d) = (37, 3, 20);
    let r = 2 * t * k; // even rows are read, odd rows never
    let index: Vec<i64> = (0..t * k)
        .map(|a| if a % 5 == 4 { r as i64 } else { 2 * a as i64 })
        .collect();
    let index = Tensor::<1, Int>::from_data(TensorData::new(index, [t * k]), &gpu);
    let normal = |std| Distribution::Normal(0.0, std);
    let rows = Tensor::<2>::random([r, d], normal(1.0), &gpu).require_grad();
    let weights = Tensor::<2>::random([t, k], normal(0.5), &gpu).require_grad();
    let w = Tensor::<2>::random([t, d], normal(1.0), &gpu);

    let ours = combine_rows(rows.clone(), index.clone(), weights.clone());
    let zero = Tensor::<2>::zeros([1, d], &gpu);
    let want = (Tensor::cat(vec![rows.clone(), zero], 0).select(0, index)
        * weights.clone().reshape([t * k, 1]))
    .reshape([t, k, d])
    .sum_dim(1)
    .reshape([t, d]);
    let at = format!("T = {t}, k = {k}, d = {d}");
    assert_close("values", ours.clone(), want.clone(), &at);
    let g1 = (ours * w.clone()).sum().backward();
    let g2 = (want * w).sum().backward();
    let (a, b) = (rows.grad(&g1).unwrap(), rows.grad(&g2).unwrap());
    let unread = a
        .clone()
        .slice([1..2, 0..d])
        .abs()
        .max()
        .into_scalar::<f32>();
    assert_eq!(unread, 0.0, "a row no assignment reads has a gradient");
    assert_close("gradient of the rows", a, b, &at);
    assert_close(
        "gradient of the weights",
        weights.grad(&g1).unwrap(),
        weights.grad(&g2).unwrap(),
        &at,
    );
}

/// The GPU sum of squares (the gradient norm's sum: strided shares per
/// cube, reduced in shared memory) against the same sum taken in f64 on the
/// host: one value, a size that is not a multiple of the block, and one
/// larger than all the cubes cover in one stride.
#[test]
fn gpu_sum_of_squares_matches_a_host_sum_in_f64() {
    use burn::tensor::Distribution;
    use switchyard::kernels::{served_on, sum_squares, Op};
    let gpu = Device::wgpu(Default::default());
    assert!(served_on(Op::SumSquares, &gpu, burn::tensor::DType::F32));
    gpu.seed(19);
    for n in [1, 1000, 300_000] {
        let x = Tensor::<1>::random([n], Distribution::Normal(0.0, 1.0), &gpu);
        let host: Vec<f32> = x.clone().into_data().try_into_vec().unwrap();
        let want: f64 = host.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let got = sum_squares(x).into_scalar::<f32>() as f64;
        let d = (got - want).abs() / want;
        assert!(d < 1e-5, "n = {n}: {got} against {want} (relative {d})");
    }
}
