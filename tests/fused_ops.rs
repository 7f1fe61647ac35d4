//! The fused CPU operations against the same functions composed from Burn's
//! own tensor operations, in value and in every input's gradient. Shapes are
//! chosen so that the kernels split their work across several parallel
//! tasks (the row index of a task's first row matters to RoPE's position).

// `tensor.slice([a..b])` is Burn's slicing of the first dimension.
#![allow(clippy::single_range_in_vec_init)]

use burn::prelude::*;
use burn::tensor::activation::{log_softmax, silu};
use burn::tensor::TensorData;
use switchyard::kernels::cpu::head;
use switchyard::kernels::{
    combine_rows, cross_entropy_rows, grouped_swiglu, linear, linear_cross_entropy,
};

/// Deterministic values spread over about [-scale, scale].
fn values<const D: usize>(shape: [usize; D], seed: f32, scale: f32, device: &Device) -> Tensor<D> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|i| ((i as f32 * 0.7548777 + seed).sin() * 43758.547).fract() * 2.0 * scale)
        .collect();
    Tensor::from_data(TensorData::new(data, shape), device)
}

fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}

fn autodiff() -> Device {
    Device::flex().autodiff()
}

#[test]
fn linear_matches_matmul_in_value_and_gradients() {
    let device = autodiff();
    // [3, 50, 24] rows through a [24, 40] weight.
    let x = values([3, 50, 24], 0.2, 1.0, &device).require_grad();
    let w = values([24, 40], 0.6, 0.5, &device).require_grad();
    let g = values([3, 50, 40], 1.1, 1.0, &device);
    let ours = linear(x.clone(), w.clone()).expect("fused on the CPU");
    let want = x.clone().matmul(w.clone().unsqueeze());
    assert!(max_diff(ours.clone(), want.clone()) < 1e-5);
    let g1 = (ours * g.clone()).sum().backward();
    let g2 = (want * g).sum().backward();
    let dx = max_diff(x.grad(&g1).unwrap(), x.grad(&g2).unwrap());
    let dw = max_diff(w.grad(&g1).unwrap(), w.grad(&g2).unwrap());
    assert!(
        dx < 1e-4 && dw < 1e-4,
        "gradients differ by {dx} (x) and {dw} (w)"
    );
}

#[test]
fn linear_cross_entropy_matches_matmul_and_log_softmax_in_value_and_gradients() {
    let device = autodiff();
    // 70 rows over a vocabulary of 40000: three chunks of rows, the last
    // one short.
    let (n, d, v) = (70, 8, 40_000);
    assert!(head::chunk_rows(v) < n && n % head::chunk_rows(v) != 0);
    let x = values([n, d], 0.3, 1.0, &device).require_grad();
    let w = values([d, v], 0.8, 0.5, &device).require_grad();
    let targets: Vec<i64> = (0..n as i64).map(|i| (i * 7919 + 13) % v as i64).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), &device);
    // A loss mask with some rows off and one weighted.
    let mask: Vec<f32> = (0..n)
        .map(|i| match i % 5 {
            0 => 0.0,
            1 => 2.5,
            _ => 1.0,
        })
        .collect();
    let mask = Tensor::<1>::from_data(TensorData::new(mask, [n]), &device);

    let ours = linear_cross_entropy(x.clone(), w.clone(), targets.clone(), mask.clone())
        .expect("fused on the CPU");
    let nll = log_softmax(x.clone().matmul(w.clone()), 1)
        .gather(1, targets.reshape([n, 1]))
        .reshape([n])
        .neg();
    let want = (nll * mask).sum();
    let (a, b) = (
        ours.clone().into_scalar::<f32>(),
        want.clone().into_scalar::<f32>(),
    );
    assert!((a - b).abs() < 1e-5 * b.abs(), "loss {a} vs {b}");

    // A loss gradient other than 1 reaches both inputs.
    let g1 = ours.mul_scalar(0.7).backward();
    let g2 = want.mul_scalar(0.7).backward();
    for (name, t) in [("x", &x), ("w", &w)] {
        let (a, b) = (t.grad(&g1).unwrap(), t.grad(&g2).unwrap());
        let scale = b.clone().abs().max().into_scalar::<f32>();
        let dg = max_diff(a, b) / scale;
        assert!(
            dg < 1e-5,
            "gradient of {name} differs by {dg} of its largest entry {scale}"
        );
    }
}

#[test]
fn cross_entropy_rows_matches_log_softmax_gather_in_value_and_gradient() {
    let device = autodiff();
    // 300 rows of 97: two parallel tasks of rows.
    let (n, v) = (300, 97);
    let logits = values([n, v], 0.5, 8.0, &device).require_grad();
    let targets: Vec<i64> = (0..n as i64).map(|i| (i * 37 + 11) % v as i64).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), &device);
    let w = values([n], 1.7, 1.0, &device);

    let ours = cross_entropy_rows(logits.clone(), targets.clone());
    let want = log_softmax(logits.clone(), 1)
        .gather(1, targets.reshape([n, 1]))
        .reshape([n])
        .neg();
    let d = max_diff(ours.clone(), want.clone());
    assert!(d < 1e-5, "losses differ by {d}");

    let g1 = (ours * w.clone()).sum().backward();
    let g2 = (want * w).sum().backward();
    let d = max_diff(logits.grad(&g1).unwrap(), logits.grad(&g2).unwrap());
    assert!(d < 1e-6, "gradients differ by {d}");
}

#[test]
fn fused_operations_run_without_autodiff_and_on_untracked_inputs() {
    for device in [Device::flex(), autodiff()] {
        // One expert over every row: the plain SwiGLU MLP.
        let x = values([4, 6], 0.1, 1.0, &device);
        let (gate, up) = (
            values([1, 6, 5], 0.2, 0.5, &device),
            values([1, 6, 5], 0.4, 0.5, &device),
        );
        let down = values([1, 5, 6], 0.5, 0.5, &device);
        let ours = grouped_swiglu(
            x.clone(),
            gate.clone(),
            up.clone(),
            down.clone(),
            vec![0, 4],
        );
        let two = |w: Tensor<3>, r, c| w.reshape([r, c]);
        let want = (silu(x.clone().matmul(two(gate, 6, 5))) * x.matmul(two(up, 6, 5)))
            .matmul(two(down, 5, 6));
        assert!(max_diff(ours, want) < 1e-5);
        let t = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 8, 3, 5], [4]), &device);
        let l = values([4, 9], 0.6, 3.0, &device);
        let want = log_softmax(l.clone(), 1)
            .gather(1, t.clone().reshape([4, 1]))
            .reshape([4]);
        assert!(max_diff(cross_entropy_rows(l, t), want.neg()) < 1e-5);
    }
}

#[test]
fn grouped_swiglu_matches_per_expert_matmuls_in_value_and_gradients() {
    // Expert 2 gets no rows; the others get uneven runs. Four experts, and
    // eleven: with few threads the experts run side by side, with many they
    // run in turn, each matmul split across the pool; one expert (the dense
    // MLP) always runs in turn.
    grouped_case(&[37, 5, 0, 58]);
    grouped_case(&[12, 3, 0, 40, 1, 7, 0, 25, 9, 2, 16]);
    grouped_case(&[0, 0, 0, 20]);
}

fn grouped_case(counts: &[usize]) {
    let device = autodiff();
    let (e, d, f) = (counts.len(), 24, 40);
    let n: usize = counts.iter().sum();
    let mut offsets = vec![0usize];
    for &c in counts {
        offsets.push(offsets.last().unwrap() + c);
    }
    let x = values([n, d], 0.15, 1.0, &device).require_grad();
    let gate = values([e, d, f], 0.25, 0.3, &device).require_grad();
    let up = values([e, d, f], 0.35, 0.3, &device).require_grad();
    let down = values([e, f, d], 0.45, 0.3, &device).require_grad();
    let w = values([n, d], 0.55, 1.0, &device);

    let ours = grouped_swiglu(
        x.clone(),
        gate.clone(),
        up.clone(),
        down.clone(),
        offsets.clone(),
    );
    // Composed: each expert's rows through its own slices of the stacks.
    let pick =
        |t: &Tensor<3>, i: usize, r: usize, c: usize| t.clone().slice([i..i + 1]).reshape([r, c]);
    let mut parts = Vec::new();
    for i in 0..e {
        let (r0, r1) = (offsets[i], offsets[i + 1]);
        if r0 == r1 {
            continue;
        }
        let xe = x.clone().slice([r0..r1]);
        let h = silu(xe.clone().matmul(pick(&gate, i, d, f))) * xe.matmul(pick(&up, i, d, f));
        parts.push(h.matmul(pick(&down, i, f, d)));
    }
    let want = Tensor::cat(parts, 0);
    let dv = max_diff(ours.clone(), want.clone());
    assert!(dv < 1e-5, "outputs differ by {dv}");

    let g1 = (ours * w.clone()).sum().backward();
    let g2 = (want * w).sum().backward();
    let (a, b) = (x.grad(&g1).unwrap(), x.grad(&g2).unwrap());
    let scale = b.clone().abs().max().into_scalar::<f32>();
    let dx = max_diff(a, b) / scale;
    assert!(
        dx < 1e-6,
        "gradient of x differs by {dx} of its largest entry {scale} ({counts:?})"
    );
    for (name, p) in [("gate", &gate), ("up", &up), ("down", &down)] {
        let (a, b) = (p.grad(&g1).unwrap(), p.grad(&g2).unwrap());
        // Relative to the gradient's largest entry: the sums over up to 58
        // rows run in a different order.
        let scale = b.clone().abs().max().into_scalar::<f32>();
        let dp = max_diff(a.clone(), b) / scale;
        assert!(
            dp < 1e-6,
            "gradient of {name} differs by {dp} of its largest entry {scale}"
        );
        // The idle experts' blocks are zero.
        for idle in (0..e).filter(|&i| counts[i] == 0) {
            let g = a.clone().slice([idle..idle + 1]).abs().max();
            assert_eq!(
                g.into_scalar::<f32>(),
                0.0,
                "idle expert {idle} got a {name} gradient"
            );
        }
    }
}

#[test]
fn rms_norm_matches_burns_rms_norm_in_value_and_gradients() {
    use burn::module::Param;
    use burn::nn::RmsNormConfig;
    use switchyard::kernels::rms_norm;
    let device = autodiff();
    let d = 48;
    let mut layer = RmsNormConfig::new(d).with_epsilon(1e-5).init(&device);
    layer.gamma = Param::from_tensor(
        values([d], 0.8, 1.0, &device)
            .add_scalar(1.0)
            .require_grad(),
    );
    // 3·120 rows of 48: several parallel tasks, whose dgamma partials add up.
    let x = values([3, 120, d], 0.4, 2.0, &device).require_grad();
    let w = values([3, 120, d], 1.1, 1.0, &device);
    let ours = rms_norm(x.clone(), layer.gamma.val(), layer.epsilon).expect("fused on the CPU");
    let want = layer.forward(x.clone());
    assert!(max_diff(ours.clone(), want.clone()) < 1e-5);
    let g1 = (ours * w.clone()).sum().backward();
    let g2 = (want * w).sum().backward();
    let dx = max_diff(x.grad(&g1).unwrap(), x.grad(&g2).unwrap());
    assert!(dx < 1e-5, "gradient of x differs by {dx}");
    let (a, b) = (
        layer.gamma.grad(&g1).unwrap(),
        layer.gamma.grad(&g2).unwrap(),
    );
    let scale = b.clone().abs().max().into_scalar::<f32>();
    let dg = max_diff(a, b) / scale;
    assert!(
        dg < 1e-5,
        "gradient of gamma differs by {dg} of its largest entry"
    );
}

#[test]
fn rope_matches_the_rotate_half_formula_in_value_and_gradient() {
    use switchyard::kernels::rope;
    let device = autodiff();
    let (s, hd) = (50, 16);
    let cos = values([s, hd], 0.2, 1.0, &device);
    let sin = values([s, hd], 0.6, 1.0, &device);
    // 2·50·6 rows of 16, sequence-major: several parallel tasks, each
    // position shared by the six heads that follow it.
    let x = values([2, s, 6, hd], 0.9, 2.0, &device).require_grad();
    let w = values([2, s, 6, hd], 1.4, 1.0, &device);
    let ours = rope(x.clone(), cos.clone(), sin.clone()).expect("fused on the CPU");
    let half = hd / 2;
    let x1 = x.clone().slice_dim(3, 0..half);
    let x2 = x.clone().slice_dim(3, half..hd);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    let want = x.clone() * cos.reshape([1, s, 1, hd]) + rotated * sin.reshape([1, s, 1, hd]);
    assert!(max_diff(ours.clone(), want.clone()) < 1e-5);
    let g1 = (ours * w.clone()).sum().backward();
    let g2 = (want * w).sum().backward();
    let dx = max_diff(x.grad(&g1).unwrap(), x.grad(&g2).unwrap());
    assert!(dx < 1e-5, "gradient of x differs by {dx}");
}

/// The combine composed from Burn's operations: a zero row appended for the
/// dropped assignments, one gather, the weights, a sum over k.
fn composed_combine(rows: Tensor<2>, index: Tensor<1, Int>, weights: Tensor<2>) -> Tensor<2> {
    let [_, d] = rows.dims();
    let [t, k] = weights.dims();
    let zero = Tensor::<2>::zeros([1, d], &rows.device());
    (Tensor::cat(vec![rows, zero], 0).select(0, index) * weights.reshape([t * k, 1]))
        .reshape([t, k, d])
        .sum_dim(1)
        .reshape([t, d])
}

#[test]
fn combine_rows_matches_the_composed_gather_in_value_and_gradients() {
    let device = autodiff();
    // 700 tokens of 64-wide rows: three parallel tasks, the last one short.
    let (t, k, d) = (700, 2, 64);
    // Every fifth assignment dropped (index R); the others read their own
    // row, in a shuffled order, as the grouped layout does.
    let kept: Vec<usize> = (0..t * k).filter(|a| a % 5 != 3).collect();
    let r = kept.len();
    let mut index = vec![r as i64; t * k];
    for (i, &a) in kept.iter().enumerate() {
        index[a] = ((i * 389) % r) as i64;
    }
    // The same, with two assignments reading one row (the one-thread path).
    let mut shared = index.clone();
    shared[1] = shared[0];
    for (name, index) in [("one reader per row", index), ("a shared row", shared)] {
        let index = Tensor::<1, Int>::from_data(TensorData::new(index, [t * k]), &device);
        let rows = values([r, d], 0.4, 1.0, &device).require_grad();
        let weights = values([t, k], 0.9, 1.0, &device).require_grad();
        let g = values([t, d], 1.7, 1.0, &device);
        let ours = combine_rows(rows.clone(), index.clone(), weights.clone());
        let want = composed_combine(rows.clone(), index, weights.clone());
        let dv = max_diff(ours.clone(), want.clone());
        assert!(dv < 1e-5, "{name}: values differ by {dv}");
        let g1 = (ours * g.clone()).sum().backward();
        let g2 = (want * g).sum().backward();
        let dr = max_diff(rows.grad(&g1).unwrap(), rows.grad(&g2).unwrap());
        let dw = max_diff(weights.grad(&g1).unwrap(), weights.grad(&g2).unwrap());
        assert!(
            dr < 1e-5 && dw < 1e-4,
            "{name}: gradients differ by {dr} (rows) and {dw} (weights)"
        );
        // A dropped assignment's weight gets no gradient.
        let dweights = weights.grad(&g1).unwrap().reshape([t * k]);
        let dropped = dweights.slice([3..4]).into_scalar::<f32>();
        assert_eq!(dropped, 0.0, "{name}: a dropped weight got a gradient");
    }
}
