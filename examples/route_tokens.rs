//! Load a Hugging Face MoE checkpoint and show which experts each token of a
//! sequence is routed to, layer by layer.
//!
//! ```bash
//! cargo run --release --example route_tokens -- tests/fixtures/hf-mixtral-tiny 1,2,3,4,5
//! ```

use burn::prelude::*;
use switchyard::moe::Phase;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .unwrap_or_else(|| "tests/fixtures/hf-mixtral-tiny".to_string());
    let ids: Vec<i64> = args
        .next()
        .unwrap_or_else(|| "1,2,3,4,5,6,7,8".to_string())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let device = Device::flex();
    let (arch, model) = switchyard::hf::load(std::path::Path::new(&dir), &device)?;
    let n = ids.len();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [1, n]), &device);
    let out = model.forward(tokens, None, Phase::Eval);
    println!("{arch:?}: {} MoE layers", out.moe.len());
    for (layer, aux) in out.moe.iter().enumerate() {
        let experts: Vec<i64> = aux
            .topk_experts
            .clone()
            .into_data_as::<i64>()
            .try_to_vec()?;
        let weights: Vec<f32> = aux.topk_weights.clone().into_data().try_to_vec()?;
        let k = experts.len() / n;
        println!("MoE layer {layer}:");
        for (t, id) in ids.iter().enumerate() {
            let picks: Vec<String> = (0..k)
                .map(|j| format!("e{}×{:.3}", experts[t * k + j], weights[t * k + j]))
                .collect();
            println!("  token {id:>6}: {}", picks.join("  "));
        }
    }
    Ok(())
}
