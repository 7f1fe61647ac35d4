//! The GPU LM head with its cross-entropy against the composed head: on
//! the same device, and on the CPU at sizes where the device's own
//! composed operations are not a reliable reference.

use super::assert_close;
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Distribution, Int};
use switchyard::kernels::{self, served_on, Op};

/// The GPU LM head (chunked logits, gradients made in the forward) against
/// the composed head on the same device, in the weighted loss, each row's
/// loss and the gradients of x and the weight (with a loss gradient of 0.7,
/// to check the backward scales them): a tied weight (a transposed view),
/// one row, a masked row, and 2,100 rows over a 4,096 vocabulary, which
/// takes three chunks.
#[test]
fn gpu_head_kernel_matches_composed_head_and_its_gradients() {
    let gpu = Device::wgpu(Default::default()).autodiff();
    assert!(served_on(
        Op::LinearCrossEntropy,
        &gpu,
        burn::tensor::DType::F32
    ));
    gpu.seed(5);
    for (n, d, v, tied) in [
        (37, 16, 50, true),
        (1, 8, 10, false),
        (2100, 16, 4096, false),
    ] {
        let x = Tensor::<2>::random([n, d], Distribution::Normal(0.0, 1.0), &gpu).require_grad();
        // The leaf the gradients are read from; each path takes its own
        // [d, V] view of it (a graph's nodes serve one backward pass).
        let shape = if tied { [v, d] } else { [d, v] };
        let leaf = Tensor::<2>::random(shape, Distribution::Normal(0.0, 0.5), &gpu).require_grad();
        let weight = || {
            if tied {
                leaf.clone().transpose()
            } else {
                leaf.clone()
            }
        };
        let ids: Vec<i64> = (0..n).map(|i| ((i * 7919 + 3) % v) as i64).collect();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(ids, [n]), &gpu);
        let mask: Vec<f32> = (0..n).map(|i| if i % 5 == 4 { 0.0 } else { 1.0 }).collect();
        let weights = Tensor::<1>::from_data(TensorData::new(mask, [n]), &gpu);
        let at = format!("n = {n}, d = {d}, V = {v}");

        let ours =
            kernels::linear_cross_entropy(x.clone(), weight(), targets.clone(), weights.clone())
                .expect("the GPU serves the head");
        let logp = log_softmax(x.clone().matmul(weight()), 1);
        let nll = logp
            .gather(1, targets.clone().reshape([n, 1]))
            .reshape([n])
            .neg();
        let want = (nll.clone() * weights).sum();
        assert_close("loss", ours.clone(), want.clone(), &at);
        let rows = kernels::linear_cross_entropy_rows(
            x.clone().detach(),
            weight().detach(),
            targets.clone(),
        )
        .expect("the GPU serves the head");
        assert_close("row losses", rows, nll.detach(), &at);

        let g1 = ours.mul_scalar(0.7).backward();
        let g2 = want.mul_scalar(0.7).backward();
        assert_close(
            "gradient of x",
            x.grad(&g1).unwrap(),
            x.grad(&g2).unwrap(),
            &at,
        );
        assert_close(
            "gradient of w",
            leaf.grad(&g1).unwrap(),
            leaf.grad(&g2).unwrap(),
            &at,
        );
    }
}

/// A vocabulary wider than 65,535, and more rows than one launch dimension
/// holds (70,000 rows of an 8-token vocabulary, one chunk), against the
/// composed head on the CPU: the weighted loss, each row's loss and the
/// gradients of x and the weight. A unit looping over a whole 70,000-wide
/// row passes llvmpipe's limit of 65,535 loop iterations per invocation
/// and is cut short without an error; the device's own log-softmax meets
/// the same limit at wide rows, hence the CPU reference.
#[test]
fn gpu_head_kernel_matches_the_cpu_at_a_wide_vocabulary_and_many_rows() {
    let gpu = Device::wgpu(Default::default()).autodiff();
    let cpu = Device::flex().autodiff();
    for (n, d, v) in [(5, 8, 70_000), (70_000, 4, 8)] {
        cpu.seed(9);
        let x = Tensor::<2>::random([n, d], Distribution::Normal(0.0, 1.0), &cpu);
        let w = Tensor::<2>::random([d, v], Distribution::Normal(0.0, 0.5), &cpu);
        let ids: Vec<i64> = (0..n).map(|i| ((i * 7919 + 3) % v) as i64).collect();
        let mask: Vec<f32> = (0..n).map(|i| if i % 5 == 4 { 0.0 } else { 1.0 }).collect();
        let on = |device: &Device| {
            (
                Tensor::<1, Int>::from_data(TensorData::new(ids.clone(), [n]), device),
                Tensor::<1>::from_data(TensorData::new(mask.clone(), [n]), device),
            )
        };
        let at = format!("n = {n}, d = {d}, V = {v}");

        let (xc, wc) = (x.clone().require_grad(), w.clone().require_grad());
        let (targets, weights) = on(&cpu);
        let nll = log_softmax(xc.clone().matmul(wc.clone()), 1)
            .gather(1, targets.reshape([n, 1]))
            .reshape([n])
            .neg();
        let want = (nll.clone() * weights).sum();

        let xg = x.to_device(&gpu).require_grad();
        let wg = w.to_device(&gpu).require_grad();
        let (targets, weights) = on(&gpu);
        let ours = kernels::linear_cross_entropy(xg.clone(), wg.clone(), targets.clone(), weights)
            .expect("the GPU serves the head");
        assert_close("loss", want.clone(), ours.clone(), &at);
        let rows =
            kernels::linear_cross_entropy_rows(xg.clone().detach(), wg.clone().detach(), targets)
                .expect("the GPU serves the head");
        assert_close("row losses", nll.detach(), rows, &at);

        let (g1, g2) = (want.backward(), ours.backward());
        assert_close(
            "gradient of x",
            xc.grad(&g1).unwrap(),
            xg.grad(&g2).unwrap(),
            &at,
        );
        assert_close(
            "gradient of w",
            wc.grad(&g1).unwrap(),
            wg.grad(&g2).unwrap(),
            &at,
        );
    }
}
