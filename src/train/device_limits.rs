//! The largest tensors a run allocates, each checked against the most a
//! GPU device allocates in one piece, before anything is built: a buffer
//! over that limit fails inside the backend's device thread (a panic), not
//! as an error. wgpu's limit is the adapter's storage-buffer binding size,
//! 128 MiB on some drivers (Mesa's llvmpipe among them), so a vocabulary
//! or an expert stack that fits any CUDA card can be refused there.
//! [`check_memory`] runs this check, then the host's (`memory.rs`).

use super::device::max_buffer_bytes;
use super::memory::{check_host_memory, gib};
use crate::config::RunConfig;
use anyhow::{bail, Result};

/// One tensor of a run: what it is, its shape, and the keys that size it.
#[derive(Debug, Clone, PartialEq)]
pub struct BigTensor {
    pub what: &'static str,
    pub shape: Vec<usize>,
    pub keys: &'static str,
}

impl BigTensor {
    /// Bytes in f32, the dtype of every weight, gradient and moment and of
    /// every activation on a device without bf16.
    pub fn bytes(&self) -> u64 {
        self.shape
            .iter()
            .fold(4u64, |p, &x| p.saturating_mul(x as u64))
    }
}

/// The tensors of one training step that grow without bound with the
/// config, each as one buffer: the weights (their gradients and AdamW
/// moments have the same shapes), and the activations of the path the
/// config takes (with the GPU kernels, or composed).
pub fn large_tensors(cfg: &RunConfig) -> Vec<BigTensor> {
    let (m, moe, t) = (&cfg.model, &cfg.moe, &cfg.train);
    let tokens = t.batch_size.saturating_mul(m.seq_len);
    let moe_layers = (0..m.n_layers).any(|l| moe.is_moe_layer(l));
    let dense_layers = (0..m.n_layers).any(|l| !moe.is_moe_layer(l));
    let mut out = vec![
        BigTensor {
            what: "the token embedding",
            shape: vec![m.vocab_size, m.d_model],
            keys: "model.vocab_size × model.d_model",
        },
        BigTensor {
            what: "the query projection",
            shape: vec![m.d_model, m.n_heads.saturating_mul(m.head_dim())],
            keys: "model.d_model × model.n_heads × model.head_dim",
        },
    ];
    if dense_layers {
        out.push(BigTensor {
            what: "a dense block's MLP projection",
            shape: vec![m.d_model, m.d_ff],
            keys: "model.d_model × model.d_ff",
        });
        out.push(BigTensor {
            what: "a dense block's MLP activations",
            shape: vec![tokens, m.d_ff],
            keys: "train.batch_size × model.seq_len × model.d_ff",
        });
    }
    if moe_layers {
        let local = moe.num_experts / t.expert_parallel.max(1);
        out.push(BigTensor {
            what: "an MoE layer's stacked expert projection",
            shape: vec![local.max(1), m.d_model, moe.d_expert],
            keys: "moe.num_experts (over train.expert_parallel) × model.d_model × moe.d_expert",
        });
        if moe.num_shared_experts > 0 {
            out.push(BigTensor {
                what: "the shared experts' projection",
                shape: vec![m.d_model, moe.shared_width()],
                keys: "model.d_model × moe.num_shared_experts × moe.d_shared_expert",
            });
        }
        // Every kept assignment is a row of the experts' hidden layer; the
        // composed path pads each expert's rows to its capacity on top.
        out.push(BigTensor {
            what: "an MoE layer's expert activations",
            shape: vec![tokens.saturating_mul(moe.top_k), moe.d_expert],
            keys: "train.batch_size × model.seq_len × moe.top_k × moe.d_expert",
        });
    }
    if !t.gpu_kernels {
        out.push(BigTensor {
            what: "the attention scores (composed path, train.gpu_kernels = false)",
            shape: vec![t.batch_size, m.n_heads, m.seq_len, m.seq_len],
            keys: "train.batch_size × model.n_heads × model.seq_len²",
        });
        out.push(BigTensor {
            what: "the logits (composed path, train.gpu_kernels = false)",
            shape: vec![tokens, m.vocab_size],
            keys: "train.batch_size × model.seq_len × model.vocab_size",
        });
    }
    out
}

/// Refuse, before anything is allocated, a run that cannot fit where it
/// runs: on a GPU a tensor over the device's largest buffer
/// ([`check_largest_tensor`]), on the CPU a step over this machine's memory
/// ([`check_host_memory`]). Returns the host check's warning, if any.
pub fn check_memory(spec: &str, cfg: &RunConfig) -> Result<Option<String>> {
    if let Some(max) = max_buffer_bytes(spec) {
        check_largest_tensor(spec, cfg, max)?;
    }
    check_host_memory(spec, cfg)
}

/// Refuse a run whose largest tensor is over `max_bytes`, the most device
/// `spec` allocates in one piece, naming the tensor and the keys to lower.
pub fn check_largest_tensor(spec: &str, cfg: &RunConfig, max_bytes: u64) -> Result<()> {
    let tensors = large_tensors(cfg);
    let Some(big) = tensors.iter().max_by_key(|t| t.bytes()) else {
        return Ok(());
    };
    if big.bytes() > max_bytes {
        let shape: Vec<String> = big.shape.iter().map(|d| d.to_string()).collect();
        bail!(
            "device `{spec}` allocates at most {} in one buffer, and {} ([{}], f32) takes {}: \
             lower {} (on wgpu the limit is the adapter's storage-buffer binding size; \
             --device cuda or flex has none this low)",
            gib(max_bytes as f64),
            big.what,
            shape.join(", "),
            gib(big.bytes() as f64),
            big.keys,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiny config's largest tensor is the embedding, 4,096 × 128 × 4
    /// bytes = 2 MiB; the composed path adds the logits, 16 × 128 × 4,096 ×
    /// 4 bytes = 32 MiB.
    #[test]
    fn the_largest_tensor_of_a_tiny_run_by_hand() {
        let mut cfg = crate::train::memory::tiny_by_hand();
        let max = |cfg: &RunConfig| large_tensors(cfg).iter().map(BigTensor::bytes).max();
        // Expert activations: 16 × 128 × 2 rows of 128: 2 MiB, as the embedding.
        assert_eq!(max(&cfg), Some(2 << 20));
        assert!(check_largest_tensor("wgpu", &cfg, 2 << 20).is_ok());
        let e = check_largest_tensor("wgpu", &cfg, (2 << 20) - 1).unwrap_err();
        assert!(e.to_string().contains("[4096, 128]"), "{e}");
        cfg.train.gpu_kernels = false;
        assert_eq!(max(&cfg), Some(32 << 20));
        let e = check_largest_tensor("wgpu", &cfg, 16 << 20).unwrap_err();
        assert!(e.to_string().contains("the logits"), "{e}");
        assert!(e.to_string().contains("model.vocab_size"), "{e}");
        // Half the experts on each of two ranks halve the stack.
        cfg.moe.num_experts = 4096;
        cfg.train.expert_parallel = 2;
        let stack = large_tensors(&cfg)
            .into_iter()
            .find(|t| t.what.contains("stacked"))
            .unwrap();
        assert_eq!(stack.shape, vec![2048, 128, 128]);
    }
}
