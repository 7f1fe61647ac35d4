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

/// A scratch directory under the system's temporary directory, removed
/// with everything in it when dropped, unless the test is failing: then it
/// stays, to be looked at.
pub struct Scratch(PathBuf);

impl Scratch {
    /// `sy-{tag}-{pid}-{name}`, emptied of what an earlier run left there
    /// and created.
    pub fn new(tag: &str, name: &str) -> Self {
        let d = Self::empty(tag, name);
        std::fs::create_dir_all(&d.0).unwrap();
        d
    }

    /// The path, kept after the guard is gone: for a directory the whole
    /// test process shares from a static.
    pub fn keep(self) -> PathBuf {
        let path = self.0.clone();
        std::mem::forget(self);
        path
    }

    /// The same path, emptied but not created.
    pub fn empty(tag: &str, name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("sy-{tag}-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        Self(d)
    }
}

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for Scratch {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// An empty scratch directory `sy-{tag}-{pid}-{name}` (not created),
/// removed when dropped (see [`Scratch`]).
pub fn scratch(tag: &str, name: &str) -> Scratch {
    Scratch::empty(tag, name)
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
