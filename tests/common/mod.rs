//! Helpers the Hugging Face tests share: paths in the project, scratch
//! directories, logits and their largest difference.

#![allow(dead_code)]

use burn::prelude::*;
use std::path::PathBuf;
use switchyard::model::LanguageModel;
use switchyard::moe::Phase;

/// `path` relative to the project root (`../shared/...` for the shared fixtures).
pub fn here(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// An empty scratch directory `sy-{tag}-{pid}-{name}` (not created).
pub fn scratch(tag: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sy-{tag}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The logits of `ids`, with every assignment computed (no capacity).
pub fn logits(model: &LanguageModel, ids: Tensor<2, Int>) -> Vec<f32> {
    model
        .clone()
        .without_capacity()
        .forward(ids, None, Phase::Eval)
        .logits
        .into_data()
        .try_to_vec()
        .unwrap()
}

/// The largest absolute difference of two equally long slices.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
