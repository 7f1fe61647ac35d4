//! The `[model]` section: plain serialisable data with documented
//! defaults, unknown keys rejected, one `validate()`.

use super::{at_most, err, limit, ConfigError};
use serde::{Deserialize, Serialize};

/// The transformer skeleton: attention, dense FFN, norms and embeddings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Vocabulary size (number of token ids). Default 4096.
    pub vocab_size: usize,
    /// Residual stream width. Default 128.
    pub d_model: usize,
    /// Number of transformer blocks. Default 4.
    pub n_layers: usize,
    /// Query heads. Default 4.
    pub n_heads: usize,
    /// Key/value heads for grouped-query attention; must divide `n_heads`. Default 4.
    pub n_kv_heads: usize,
    /// Per-head width; `None` means `d_model / n_heads`. Default none.
    pub head_dim: Option<usize>,
    /// Hidden width of the dense SwiGLU MLP used by non-MoE blocks. Default 512.
    pub d_ff: usize,
    /// Maximum sequence length (tokens per training window). Default 256.
    pub seq_len: usize,
    /// RoPE base frequency (theta). Default 10000.
    pub rope_theta: f64,
    /// RMSNorm epsilon. Default 1e-5.
    pub rms_norm_eps: f64,
    /// Add biases to the q/k/v projections (Qwen2 style). Default false.
    pub qkv_bias: bool,
    /// Add a bias to the attention output projection (with `qkv_bias`:
    /// `attention_bias` in Llama, Qwen3, OLMoE and Granite). Default false.
    pub o_bias: bool,
    /// RMSNorm of queries and keys before RoPE: "none", "per_head" (each
    /// head over its width, one weight of head_dim per projection: Qwen3-MoE,
    /// GLM-4.5) or "projection" (the whole q and k projections: OLMoE).
    /// Default "none".
    pub qk_norm: QkNorm,
    /// Clamp q, k and v to [-clip_qkv, clip_qkv] after the projections (and
    /// a "projection" q/k norm), as OLMoE does. Default none.
    pub clip_qkv: Option<f64>,
    /// Share the token embedding with the LM head. Default false.
    pub tie_embeddings: bool,
    /// Standard deviation of the normal weight initialisation. Default 0.02.
    pub init_std: f64,
    /// Multiply the token embeddings by this before the first block
    /// (Granite's muP `embedding_multiplier`). Default 1.
    pub embedding_multiplier: f64,
    /// Multiply each attention and FFN output by this before adding it to
    /// the residual stream (Granite's `residual_multiplier`). Default 1.
    pub residual_multiplier: f64,
    /// The attention-score scale; none means 1/√head_dim (Granite's
    /// `attention_multiplier`). Default none.
    pub attention_multiplier: Option<f64>,
    /// Divide the logits by this (Granite's `logits_scaling`). Default 1.
    pub logits_scaling: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            vocab_size: 4096,
            d_model: 128,
            n_layers: 4,
            n_heads: 4,
            n_kv_heads: 4,
            head_dim: None,
            d_ff: 512,
            seq_len: 256,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            qkv_bias: false,
            o_bias: false,
            qk_norm: QkNorm::None,
            clip_qkv: None,
            tie_embeddings: false,
            init_std: 0.02,
            embedding_multiplier: 1.0,
            residual_multiplier: 1.0,
            attention_multiplier: None,
            logits_scaling: 1.0,
        }
    }
}

impl ModelConfig {
    /// The per-head width actually used.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.d_model / self.n_heads.max(1))
    }

    /// Refuse a size above its ceiling (see `config::limit`), before
    /// anything is sized by it.
    pub fn check_ceilings(&self) -> Result<(), ConfigError> {
        for (key, v, max) in [
            ("model.vocab_size", self.vocab_size, limit::VOCAB),
            ("model.d_model", self.d_model, limit::WIDTH),
            ("model.n_layers", self.n_layers, limit::COUNT),
            ("model.n_heads", self.n_heads, limit::COUNT),
            ("model.n_kv_heads", self.n_kv_heads, limit::COUNT),
            ("model.d_ff", self.d_ff, limit::WIDTH),
            ("model.seq_len", self.seq_len, limit::SEQ_LEN),
            ("model.head_dim", self.head_dim.unwrap_or(0), limit::WIDTH),
        ] {
            at_most(key, v, max)?;
        }
        Ok(())
    }

    /// Check every field and cross-field constraint; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("model.vocab_size", self.vocab_size),
            ("model.d_model", self.d_model),
            ("model.n_layers", self.n_layers),
            ("model.n_heads", self.n_heads),
            ("model.n_kv_heads", self.n_kv_heads),
            ("model.d_ff", self.d_ff),
            ("model.seq_len", self.seq_len),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(err(key, "must be a positive integer"));
            }
        }
        self.check_ceilings()?;
        if self.n_kv_heads > self.n_heads || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(err(
                "model.n_kv_heads",
                format!(
                    "must divide model.n_heads = {} (got {})",
                    self.n_heads, self.n_kv_heads
                ),
            ));
        }
        match self.head_dim {
            Some(0) => return Err(err("model.head_dim", "must be positive")),
            Some(h) if h % 2 == 1 => {
                return Err(err("model.head_dim", "must be even for RoPE"));
            }
            None if !self.d_model.is_multiple_of(self.n_heads) => {
                return Err(err(
                    "model.head_dim",
                    format!(
                        "unset, so model.d_model = {} must be divisible by model.n_heads = {}",
                        self.d_model, self.n_heads
                    ),
                ));
            }
            None if (self.d_model / self.n_heads) % 2 == 1 => {
                return Err(err(
                    "model.head_dim",
                    "d_model / n_heads is odd; RoPE needs an even head width",
                ));
            }
            _ => {}
        }
        let scalars = [
            ("model.rope_theta", Some(self.rope_theta)),
            ("model.rms_norm_eps", Some(self.rms_norm_eps)),
            ("model.init_std", Some(self.init_std)),
            (
                "model.embedding_multiplier",
                Some(self.embedding_multiplier),
            ),
            ("model.residual_multiplier", Some(self.residual_multiplier)),
            ("model.attention_multiplier", self.attention_multiplier),
            ("model.logits_scaling", Some(self.logits_scaling)),
        ];
        for (key, v) in scalars {
            if let Some(v) = v {
                if !(v > 0.0 && v.is_finite()) {
                    return Err(err(key, format!("must be a finite number > 0, got {v}")));
                }
            }
        }
        if let Some(c) = self.clip_qkv {
            if !(c > 0.0 && c.is_finite()) {
                return Err(err(
                    "model.clip_qkv",
                    format!("must be a finite number > 0, got {c}"),
                ));
            }
        }
        Ok(())
    }
}

/// Where queries and keys are RMS-normalised before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QkNorm {
    /// No q/k norm.
    None,
    /// Each head over its width (Qwen3-MoE, GLM-4.5).
    PerHead,
    /// The whole q and k projections (OLMoE).
    Projection,
}
