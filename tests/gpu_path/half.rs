//! The GPU kernels that take f16 and bf16 tensors (attention, RoPE, the
//! grouped experts, the combine, the LM head) in f16, the half type wgpu has (on CUDA, bf16
//! takes the same kernels with another storage type): each against the f32
//! operation on the same f16-rounded inputs, in value and in every input
//! gradient, to within f16's rounding of the results.

use super::kernels::composed_attention;
use super::rel_diff;
use burn::prelude::*;
use burn::tensor::{DType, Distribution};

/// A leaf in `dtype` holding `x`'s values.
fn leaf<const D: usize>(x: &Tensor<D>, dtype: DType) -> Tensor<D> {
    x.clone().cast(dtype).require_grad()
}

/// A random tensor rounded to f16.
fn half<const D: usize>(shape: [usize; D], std: f64, device: &Device) -> Tensor<D> {
    Tensor::<D>::random(shape, Distribution::Normal(0.0, std), device).cast(DType::F16)
}

/// The attention kernel on f16 tensors (the path bf16 takes on CUDA: the
/// same kernel with another storage type; wgpu has no bf16), with f32
/// statistics and accumulators: against the composed attention in f32 on
/// the same f16-rounded inputs, in value and in the gradients of q, k and
/// v, to within f16's rounding of the results. Beside it, the composed
/// attention run in f16 itself, whose error the kernel must beat.
#[test]
fn gpu_attention_kernel_in_f16_keeps_its_statistics_in_f32() {
    use switchyard::kernels::{self, served_on, Op};
    let gpu = Device::wgpu(Default::default()).autodiff();
    assert!(
        gpu.supports_dtype(DType::F16),
        "this Vulkan driver has no f16"
    );
    assert!(served_on(Op::CausalAttention, &gpu, DType::F16));
    gpu.seed(12);
    for (b, h, kv, s, hd) in [(1, 4, 2, 150, 8), (2, 2, 1, 300, 32)] {
        let r = |heads| half([b, s, heads, hd], 1.0, &gpu);
        let (q, k, v) = (r(h), r(kv), r(kv));
        let (q16, k16, v16) = (
            leaf(&q, DType::F16),
            leaf(&k, DType::F16),
            leaf(&v, DType::F16),
        );
        let (q32, k32, v32) = (
            leaf(&q, DType::F32),
            leaf(&k, DType::F32),
            leaf(&v, DType::F32),
        );
        let (qc, kc, vc) = (
            leaf(&q, DType::F16),
            leaf(&k, DType::F16),
            leaf(&v, DType::F16),
        );
        let w = Tensor::<4>::random([b, s, h, hd], Distribution::Normal(0.0, 1.0), &gpu);
        let ours = kernels::causal_attention(q16.clone(), k16.clone(), v16.clone());
        assert_eq!(ours.dtype(), DType::F16);
        let ours = ours.cast(DType::F32);
        let want = composed_attention(q32.clone(), k32.clone(), v32.clone());
        let half = composed_attention(qc.clone(), kc.clone(), vc.clone()).cast(DType::F32);
        let at = format!("B = {b}, H = {h}, KV = {kv}, S = {s}, hd = {hd}");
        let (d, dh) = (
            rel_diff(ours.clone(), want.clone()),
            rel_diff(half.clone(), want.clone()),
        );
        println!("{at}: values: kernel {d:.2e}, composed f16 {dh:.2e}");
        assert!(d < 1e-3, "values differ by {d} (relative) at {at}");
        assert!(d <= dh, "values: kernel {d}, composed f16 {dh} at {at}");
        let g1 = (ours * w.clone()).sum().backward();
        let g2 = (want * w.clone()).sum().backward();
        let g3 = (half * w).sum().backward();
        for (name, x16, x32, xc) in [
            ("q", &q16, &q32, &qc),
            ("k", &k16, &k32, &kc),
            ("v", &v16, &v32, &vc),
        ] {
            let got = x16.grad(&g1).unwrap();
            assert_eq!(got.dtype(), DType::F16);
            let want = x32.grad(&g2).unwrap();
            let d = rel_diff(got.cast(DType::F32), want.clone());
            let dh = rel_diff(xc.grad(&g3).unwrap().cast(DType::F32), want);
            println!("{at}: gradient of {name}: kernel {d:.2e}, composed f16 {dh:.2e}");
            assert!(d < 1e-3, "gradient of {name}: {d} (relative) at {at}");
            assert!(
                d <= dh,
                "gradient of {name}: kernel {d}, composed f16 {dh} at {at}"
            );
        }
    }
}

/// The grouped experts in f16 (matmuls in f16, the SwiGLU in f32; an
/// expert with no rows and one with a single row) and the combine in f16
/// (f32 sums; dropped assignments), each against the f32 kernel on the
/// same rounded inputs, itself held to the composed operation elsewhere.
/// The bounds leave room for two f16 roundings (the incoming gradient and
/// the result, each up to 2^-11 of a value) and, for the experts, the f16
/// matmuls' own.
#[test]
fn gpu_grouped_experts_and_combine_in_f16_stay_within_f16_rounding() {
    use burn::tensor::{Int, TensorData};
    use switchyard::kernels::{combine_rows, grouped_swiglu_with, served_on, Op};
    let gpu = Device::wgpu(Default::default()).autodiff();
    for op in [Op::GroupedSwiglu, Op::Combine] {
        assert!(served_on(op, &gpu, DType::F16), "{op:?}");
    }
    gpu.seed(14);
    let (d, f) = (24, 40);
    let offsets = vec![0usize, 5, 5, 6, 20, 57];
    let (e, n) = (offsets.len() - 1, offsets[offsets.len() - 1]);
    let inputs = [
        half([n, d], 1.0, &gpu).reshape([1, n, d]),
        half([e, d, f], 0.2, &gpu),
        half([e, d, f], 0.2, &gpu),
        half([e, f, d], 0.2, &gpu),
    ];
    let w = Tensor::<2>::random([n, d], Distribution::Normal(0.0, 1.0), &gpu);
    let run = |dtype: DType, fused: bool| {
        let [x, g, u, dn] = inputs.clone().map(|t| leaf(&t, dtype));
        let y = grouped_swiglu_with(
            x.clone().reshape([n, d]),
            g.clone(),
            u.clone(),
            dn.clone(),
            offsets.clone(),
            fused,
        );
        assert_eq!(y.dtype(), dtype);
        let grads = (y.clone().cast(DType::F32) * w.clone()).sum().backward();
        let all = [&x, &g, &u, &dn].map(|p| {
            let g = p.grad(&grads).unwrap();
            assert_eq!(g.dtype(), dtype);
            g.cast(DType::F32).reshape([-1])
        });
        (y.cast(DType::F32), all)
    };
    let (want, g32) = run(DType::F32, false);
    // Both GPU kernels: CubeCL's f16 matmuls with the SwiGLU pass, and the
    // SwiGLU fused into switchyard's tiled matmul (f32 accumulators).
    for fused in [false, true] {
        let (ours, g16) = run(DType::F16, fused);
        let dv = rel_diff(ours, want.clone());
        println!("grouped experts (fused {fused}): values {dv:.2e}");
        assert!(
            dv < 3e-3,
            "grouped experts (fused {fused}): values differ by {dv} (relative)"
        );
        for (name, (a, b)) in ["x", "gate", "up", "down"]
            .iter()
            .zip(g16.into_iter().zip(g32.clone()))
        {
            let dg = rel_diff(a, b);
            println!("grouped experts (fused {fused}): gradient of {name} {dg:.2e}");
            assert!(
                dg < 3e-3,
                "grouped experts (fused {fused}): gradient of {name}: {dg} (relative)"
            );
        }
    }

    let (t, k) = (37, 3);
    let r = 2 * t * k;
    let index: Vec<i64> = (0..t * k)
        .map(|a| if a % 5 == 4 { r as i64 } else { 2 * a as i64 })
        .collect();
    let index = Tensor::<1, Int>::from_data(TensorData::new(index, [t * k]), &gpu);
    let (rows, weights) = (half([r, d], 1.0, &gpu), half([t, k], 0.5, &gpu));
    let w = Tensor::<2>::random([t, d], Distribution::Normal(0.0, 1.0), &gpu);
    let run = |dtype: DType| {
        let (rows, weights) = (leaf(&rows, dtype), leaf(&weights, dtype));
        let y = combine_rows(rows.clone(), index.clone(), weights.clone());
        assert_eq!(y.dtype(), dtype);
        let grads = (y.clone().cast(DType::F32) * w.clone()).sum().backward();
        let dr = rows.grad(&grads).unwrap().cast(DType::F32);
        let dw = weights.grad(&grads).unwrap().cast(DType::F32);
        (y.cast(DType::F32), dr, dw)
    };
    let ((y16, r16, w16), (y32, r32, w32)) = (run(DType::F16), run(DType::F32));
    for (name, a, b) in [
        ("values", y16, y32),
        ("rows' gradient", r16, r32),
        ("weights' gradient", w16, w32),
    ] {
        let dc = rel_diff(a, b);
        println!("combine: {name} {dc:.2e}");
        assert!(dc < 1.5e-3, "combine: {name} differ by {dc} (relative)");
    }
}

/// RoPE in f16 (f32 arithmetic; tables in f16, as the model casts them)
/// against the f32 kernel on the same rounded inputs, in value and in the
/// gradient of x (its transpose): within two f16 roundings.
#[test]
fn gpu_rope_in_f16_stays_within_f16_rounding() {
    use switchyard::kernels::{self, served_on, Op};
    let gpu = Device::wgpu(Default::default()).autodiff();
    assert!(served_on(Op::Rope, &gpu, DType::F16));
    gpu.seed(15);
    let (b, s, h, hd) = (2, 37, 3, 8);
    let x = half([b, s, h, hd], 1.0, &gpu);
    let angles = Tensor::<2>::random([s, hd], Distribution::Uniform(-3.0, 3.0), &gpu);
    let (cos, sin) = (
        angles.clone().cos().cast(DType::F16),
        angles.sin().cast(DType::F16),
    );
    let w = Tensor::<4>::random([b, s, h, hd], Distribution::Normal(0.0, 1.0), &gpu);
    let run = |dtype: DType| {
        let x = leaf(&x, dtype);
        let (c, sn) = (cos.clone().cast(dtype), sin.clone().cast(dtype));
        let y = kernels::rope(x.clone(), c, sn).expect("served");
        assert_eq!(y.dtype(), dtype);
        let grads = (y.clone().cast(DType::F32) * w.clone()).sum().backward();
        let dx = x.grad(&grads).unwrap();
        assert_eq!(dx.dtype(), dtype);
        (y.cast(DType::F32), dx.cast(DType::F32))
    };
    let ((y16, d16), (y32, d32)) = (run(DType::F16), run(DType::F32));
    for (name, a, b) in [("values", y16, y32), ("gradient of x", d16, d32)] {
        let d = rel_diff(a, b);
        println!("rope: {name} {d:.2e}");
        assert!(d < 1.5e-3, "rope: {name} differ by {d} (relative)");
    }
}

/// The LM head in f16 (logits and gradients in f16, the row kernel in
/// f32, the losses f32, the weight gradient summed over chunks in f32)
/// against the f32 kernel on the same rounded inputs: the loss, each row's
/// loss, and the gradients of x and the weight, with a masked row every
/// five, and 2,100 rows over 4,096 logits, which takes three chunks. The
/// loss gradient of 0.7 checks that the backward scales the f16 gradients
/// by an f32 one.
#[test]
fn gpu_head_in_f16_keeps_its_loss_in_f32() {
    use burn::tensor::{Int, TensorData};
    use switchyard::kernels::{self, served_on, Op};
    let gpu = Device::wgpu(Default::default()).autodiff();
    assert!(served_on(Op::LinearCrossEntropy, &gpu, DType::F16));
    gpu.seed(16);
    for (n, d, v) in [(37, 16, 50), (2100, 16, 4096)] {
        let x = half([n, d], 1.0, &gpu);
        let w = half([d, v], 0.5, &gpu);
        let ids: Vec<i64> = (0..n).map(|i| ((i * 7919 + 3) % v) as i64).collect();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(ids, [n]), &gpu);
        let mask: Vec<f32> = (0..n).map(|i| if i % 5 == 4 { 0.0 } else { 1.0 }).collect();
        let weights = Tensor::<1>::from_data(TensorData::new(mask, [n]), &gpu);
        let run = |dtype: DType| {
            let (x, w) = (leaf(&x, dtype), leaf(&w, dtype));
            let loss = kernels::linear_cross_entropy(
                x.clone(),
                w.clone(),
                targets.clone(),
                weights.clone(),
            )
            .expect("the GPU serves the head");
            assert_eq!(loss.dtype(), DType::F32);
            let rows = kernels::linear_cross_entropy_rows(
                x.clone().detach(),
                w.clone().detach(),
                targets.clone(),
            )
            .expect("the GPU serves the head");
            assert_eq!(rows.dtype(), DType::F32);
            let grads = (loss.clone() * 0.7).backward();
            let [dx, dw] = [&x, &w].map(|p| {
                let g = p.grad(&grads).unwrap();
                assert_eq!(g.dtype(), dtype);
                g.cast(DType::F32).reshape([-1])
            });
            (loss, rows, dx, dw)
        };
        let (a, b) = (run(DType::F16), run(DType::F32));
        let at = format!("n = {n}, d = {d}, V = {v}");
        for (name, x, y, bound) in [
            ("loss", a.0.reshape([-1]), b.0.reshape([-1]), 1e-4),
            ("row losses", a.1, b.1, 2e-3),
            ("gradient of x", a.2, b.2, 3e-3),
            ("gradient of w", a.3, b.3, 3e-3),
        ] {
            let diff = rel_diff(x, y);
            println!("{at}: head {name} {diff:.2e}");
            assert!(diff < bound, "{at}: {name} differ by {diff} (relative)");
        }
    }
}
