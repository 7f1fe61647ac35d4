//! Group-limited routing and the routed scaling factor, by hand.

use super::*;

/// A router over 8 experts whose logits are the token itself (identity
/// weight), so each row of `scores` sets the sigmoid scores directly.
fn identity_router(moe_cfg: &MoeConfig, bias: Option<Vec<f32>>, device: &Device) -> MoeLayer {
    let e = moe_cfg.num_experts;
    let mut moe = MoeLayer::new(e, moe_cfg, 0.1, device);
    let eye: Vec<f32> = (0..e * e)
        .map(|i| if i / e == i % e { 1.0 } else { 0.0 })
        .collect();
    moe.router.weight = Param::from_tensor(Tensor::from_data(TensorData::new(eye, [e, e]), device));
    if let Some(b) = bias {
        moe.router.expert_bias = Some(
            Param::from_tensor(Tensor::from_data(TensorData::new(b, [e]), device))
                .set_require_grad(false),
        );
    }
    moe
}

/// Tokens whose sigmoid router scores are `scores`. `[1, T, E]`
fn tokens_with_scores(scores: &[[f32; 8]], device: &Device) -> Tensor<3> {
    let logits: Vec<f32> = scores
        .iter()
        .flat_map(|r| r.iter().map(|p| (p / (1.0 - p)).ln()))
        .collect();
    Tensor::from_data(TensorData::new(logits, [1, scores.len(), 8]), device)
}

#[test]
fn group_limited_routing_picks_within_the_best_groups_by_hand() {
    // Two groups, {0..3} and {4..7}; a group scores the sum of its two best.
    //   token 0: group 0 = 0.9 + 0.1 = 1.0, group 1 = 0.8 + 0.7 = 1.5
    //            → group 1 → experts 5 and 6 (globally it would be 0 and 5)
    //   token 1: group 0 = 0.6 + 0.5 = 1.1, group 1 = 0.7 + 0.1 = 0.8
    //            → group 0 → experts 0 and 1 (globally 4 and 0)
    // Weights: the chosen scores renormalised, times routed_scaling_factor.
    let device = Device::flex();
    let scores = [
        [0.9, 0.1, 0.1, 0.1, 0.2, 0.8, 0.7, 0.1],
        [0.6, 0.5, 0.1, 0.1, 0.7, 0.1, 0.1, 0.1],
    ];
    let x = tokens_with_scores(&scores, &device);
    let grouped = MoeConfig {
        score: RouterScore::Sigmoid,
        n_group: 2,
        topk_group: 1,
        routed_scaling_factor: 2.5,
        drop_policy: DropPolicy::Dropless,
        ..cfg(8, 2)
    };
    let check = |moe_cfg: &MoeConfig, bias: Option<Vec<f32>>, want: [[(i64, f32); 2]; 2]| {
        let moe = identity_router(moe_cfg, bias, &device);
        let (_, aux) = moe.forward(x.clone(), Tensor::ones([1, 2], &device), Phase::Eval);
        let idx: Vec<i64> = aux.topk_experts.into_data_as::<i64>().try_to_vec().unwrap();
        let w = vec2(aux.topk_weights);
        for t in 0..2 {
            for j in 0..2 {
                let (e, wt) = want[t][j];
                assert_eq!(idx[t * 2 + j], e, "token {t} choice {j}: {idx:?}");
                assert!((w[t * 2 + j] - wt).abs() < 1e-5, "token {t}: {w:?}");
            }
        }
    };
    check(
        &grouped,
        None,
        [
            [(5, 2.5 * 0.8 / 1.5), (6, 2.5 * 0.7 / 1.5)],
            [(0, 2.5 * 0.6 / 1.1), (1, 2.5 * 0.5 / 1.1)],
        ],
    );
    // One group (the default): the global top-2, scaling 1.
    check(
        &MoeConfig {
            n_group: 1,
            routed_scaling_factor: 1.0,
            ..grouped.clone()
        },
        None,
        [
            [(0, 0.9 / 1.7), (5, 0.8 / 1.7)],
            [(4, 0.7 / 1.3), (0, 0.6 / 1.3)],
        ],
    );
    // The selection bias counts in the group score and the choice, not in
    // the weights: +0.5 on expert 7 lifts token 1's group 1 to 0.7 + 0.6 =
    // 1.3 > 1.1, so token 1 takes experts 4 and 7 with weights 0.7 and 0.1
    // renormalised. Token 0 keeps group 1 (0.8 + 0.7 against 1.0) and
    // experts 5 and 6 (0.6 for expert 7 is below both).
    let bias = vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5];
    check(
        &MoeConfig {
            aux_free_bias: true,
            ..grouped.clone()
        },
        Some(bias),
        [
            [(5, 2.5 * 0.8 / 1.5), (6, 2.5 * 0.7 / 1.5)],
            [(4, 2.5 * 0.7 / 0.8), (7, 2.5 * 0.1 / 0.8)],
        ],
    );
}

#[test]
fn routed_scaling_factor_scales_the_routed_output_only() {
    let device = Device::flex();
    let _rng = seeded(&device, 21);
    let d = 8;
    let base = MoeConfig {
        num_shared_experts: 1,
        drop_policy: DropPolicy::Dropless,
        ..cfg(4, 2)
    };
    let x = randn3([2, 5, d], &device);
    let valid = Tensor::<2>::ones([2, 5], &device);
    let moe = MoeLayer::new(d, &base, 0.3, &device);
    let scaled_cfg = MoeConfig {
        routed_scaling_factor: 2.5,
        ..base.clone()
    };
    let mut scaled = MoeLayer::new(d, &scaled_cfg, 0.3, &device);
    scaled.router = moe.router.clone();
    scaled.experts = moe.experts.clone();
    scaled.shared_expert = moe.shared_expert.clone();
    let shared = moe
        .shared_expert
        .as_ref()
        .unwrap()
        .forward(x.clone().reshape([10, d]))
        .reshape([2, 5, d]);
    let (y1, _) = moe.forward(x.clone(), valid.clone(), Phase::Eval);
    let (y25, _) = scaled.forward(x, valid, Phase::Eval);
    let want = vec3((y1 - shared.clone()).mul_scalar(2.5) + shared);
    let got = vec3(y25);
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}
