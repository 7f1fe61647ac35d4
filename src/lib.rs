//! switchyard: Mixture-of-Experts language-model training on Burn.
//!
//! - [`config`]: model and MoE configuration, validated once.
//! - [`data`]: corpus sources, tokenizers and the packed token stream.
//! - [`model`]: the decoder-only transformer (attention, RoPE, MLP, blocks).
//! - [`moe`]: the routed-expert layer with every balancing mechanism.
//! - [`hf`]: Hugging Face Mixtral / Qwen2-MoE checkpoint import.
//! - [`params`]: named access to a model's parameters.

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod export;
pub mod generate;
pub mod hf;
pub mod inspect;
pub mod metrics;
pub mod model;
pub mod moe;
pub mod params;
pub mod sweep;
pub mod train;
