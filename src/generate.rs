//! Sampling text from a model: temperature and top-k, seeded. Each new token
//! reruns the (short) context; the models switchyard trains on a CPU are
//! small enough that a KV cache is not needed.

use crate::data::stream::SplitMix64;
use crate::model::LanguageModel;
use crate::moe::Phase;
use burn::prelude::*;

/// Sampling settings.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// Tokens to generate.
    pub max_tokens: usize,
    /// Softmax temperature; 0 means greedy.
    pub temperature: f64,
    /// Sample among the k most likely tokens; 0 means all.
    pub top_k: usize,
    /// RNG seed.
    pub seed: u64,
    /// Stop at this token.
    pub stop: Option<u32>,
}

/// Continue `prompt`; returns only the new tokens. A prompt longer than
/// the model's context (`model.seq_len`) is cut to its last `seq_len`
/// tokens, as every later step's context is. An empty prompt or an id
/// outside the vocabulary is refused.
pub fn generate(
    model: &LanguageModel,
    prompt: &[u32],
    opts: &SampleOptions,
    device: &Device,
) -> anyhow::Result<Vec<u32>> {
    let max_ctx = model.config().seq_len;
    model.check_tokens(
        &prompt[prompt.len().saturating_sub(max_ctx)..],
        "the prompt",
    )?;
    if let Some(&id) = prompt
        .iter()
        .find(|&&id| id as usize >= model.config().vocab_size)
    {
        anyhow::bail!(
            "the prompt: token id {id} is outside the model's vocabulary of {}",
            model.config().vocab_size
        );
    }
    let mut rng = SplitMix64(opts.seed);
    let mut ids: Vec<u32> = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..opts.max_tokens {
        let ctx = &ids[ids.len().saturating_sub(max_ctx)..];
        let t = ctx.len();
        let data: Vec<i64> = ctx.iter().map(|&i| i as i64).collect();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(data, [1, t]), device);
        let logits = model.forward(tokens, None, Phase::Eval).logits; // [1, T, V]
        let [_, _, v] = logits.dims();
        let last: Vec<f32> = logits
            .slice([0..1, t - 1..t, 0..v])
            .into_data()
            .try_to_vec()
            .map_err(|e| anyhow::anyhow!("reading the logits: {e:?}"))?;
        let next = sample(&last, opts, &mut rng);
        ids.push(next);
        out.push(next);
        if Some(next) == opts.stop {
            break;
        }
    }
    Ok(out)
}

/// Draw one token from `logits`.
pub fn sample(logits: &[f32], opts: &SampleOptions, rng: &mut SplitMix64) -> u32 {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if opts.temperature <= 0.0 {
        return order[0] as u32;
    }
    if opts.top_k > 0 {
        order.truncate(opts.top_k);
    }
    let max = logits[order[0]] as f64;
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / opts.temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
    for (w, &i) in weights.iter().zip(&order) {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    order[order.len() - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_top1_pick_the_argmax() {
        let logits = [0.1f32, 2.0, -1.0, 1.9];
        let mut rng = SplitMix64(1);
        let greedy = SampleOptions {
            max_tokens: 1,
            temperature: 0.0,
            top_k: 0,
            seed: 1,
            stop: None,
        };
        assert_eq!(sample(&logits, &greedy, &mut rng), 1);
        let top1 = SampleOptions {
            temperature: 1.0,
            top_k: 1,
            ..greedy.clone()
        };
        for _ in 0..20 {
            assert_eq!(sample(&logits, &top1, &mut rng), 1);
        }
        // Top-2 only ever yields tokens 1 and 3, both of them over many draws.
        let top2 = SampleOptions {
            temperature: 1.0,
            top_k: 2,
            ..greedy
        };
        let draws: std::collections::HashSet<u32> =
            (0..200).map(|_| sample(&logits, &top2, &mut rng)).collect();
        assert_eq!(draws, [1u32, 3].into_iter().collect());
    }
}
