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

/// A directory for what a whole test process shares from a static, which
/// is never dropped: `{name}-{pid}` in cargo's folder for test files
/// (`target/tmp`), created empty. Those that ended processes left are
/// removed first, so they do not pile up.
pub fn process_dir(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let prefix = format!("{name}-");
    for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let file = entry.file_name();
        let pid = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let dir = root.join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
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
