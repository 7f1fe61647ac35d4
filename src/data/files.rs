//! Where a source's files are: paths, directories and globs, or a dataset
//! in the local Hugging Face hub cache (resolved offline, never fetched).

use super::{SourceConfig, SourceKind};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// How to cut one file into documents.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    /// Plain UTF-8 text.
    Text {
        /// A run of at least this many blank lines ends a document (0: never).
        blank_lines: usize,
        /// A line with this prefix starts a new document.
        doc_start_prefix: Option<String>,
    },
    /// One JSON object per line; the document is the string in `field`.
    Jsonl {
        /// The text field.
        field: String,
    },
    /// Parquet; each row's string in `column` is a document.
    Parquet {
        /// The text column.
        column: String,
    },
}

/// Resolve a source's configuration to a list of files with their formats.
pub fn resolve_files(src: &SourceConfig, index: usize) -> Result<Vec<(PathBuf, Format)>> {
    let key = format!("data.sources.{index}");
    let files = match src.kind {
        SourceKind::HfCache => {
            let repo = src.repo.as_deref().unwrap_or_default();
            let root = src
                .cache_dir
                .as_ref()
                .map(PathBuf::from)
                .unwrap_or_else(hf_cache_root);
            resolve_hf_dataset(&root, repo, &src.revision, &src.pattern)?
        }
        _ => {
            let mut files = Vec::new();
            for p in &src.paths {
                let found = expand_path(p)?;
                if found.is_empty() {
                    bail!("{key}.paths: `{p}` matches no files");
                }
                files.extend(found);
            }
            files
        }
    };
    files
        .into_iter()
        .map(|f| {
            let fmt = match src.kind {
                SourceKind::Text => text_format(src),
                SourceKind::Jsonl => Format::Jsonl {
                    field: src.text_field.clone(),
                },
                SourceKind::Parquet => Format::Parquet {
                    column: src.text_field.clone(),
                },
                SourceKind::HfCache => match f.extension().and_then(|e| e.to_str()) {
                    Some("parquet") => Format::Parquet {
                        column: src.text_field.clone(),
                    },
                    Some("jsonl") | Some("json") => Format::Jsonl {
                        field: src.text_field.clone(),
                    },
                    Some("txt") => text_format(src),
                    _ => bail!(
                        "{}: unsupported file type in the Hugging Face cache (expected .parquet, .jsonl, .json or .txt)",
                        f.display()
                    ),
                },
            };
            Ok((f, fmt))
        })
        .collect()
}

fn text_format(src: &SourceConfig) -> Format {
    Format::Text {
        blank_lines: src.blank_lines,
        doc_start_prefix: src.doc_start_prefix.clone(),
    }
}

/// A file, every file under a directory (recursively, sorted), or the
/// sorted matches of a glob pattern.
pub fn expand_path(p: &str) -> Result<Vec<PathBuf>> {
    if p.contains(['*', '?', '[']) {
        let mut out: Vec<PathBuf> = glob::glob(p)
            .with_context(|| format!("bad glob pattern `{p}`"))?
            .filter_map(|r| r.ok())
            .filter(|f| f.is_file())
            .collect();
        out.sort();
        return Ok(out);
    }
    let path = Path::new(p);
    if path.is_dir() {
        let mut out = Vec::new();
        let mut stack = vec![path.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in
                std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
            {
                let entry = entry?.path();
                if entry.is_dir() {
                    stack.push(entry);
                } else if entry.is_file() {
                    out.push(entry);
                }
            }
        }
        out.sort();
        Ok(out)
    } else if path.is_file() {
        Ok(vec![path.to_path_buf()])
    } else if path.exists() {
        bail!("`{p}` is neither a file nor a directory")
    } else {
        bail!("`{p}` does not exist")
    }
}

/// The local Hugging Face hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`,
/// else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
pub fn hf_cache_root() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = env("HF_HUB_CACHE") {
        return p;
    }
    if let Some(p) = env("HF_HOME") {
        return p.join("hub");
    }
    let cache = env("XDG_CACHE_HOME")
        .or_else(|| env("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("huggingface").join("hub")
}

/// Files of a dataset in the hub cache layout
/// `datasets--{owner}--{name}/{refs,snapshots}/…`, resolved offline.
pub fn resolve_hf_dataset(
    root: &Path,
    repo: &str,
    revision: &str,
    pattern: &str,
) -> Result<Vec<PathBuf>> {
    let dir = root.join(format!("datasets--{}", repo.replace('/', "--")));
    if !dir.is_dir() {
        bail!(
            "dataset `{repo}` is not in the Hugging Face cache: looked for {} \
             (set HF_HUB_CACHE or HF_HOME, or download it first, e.g. \
             `huggingface-cli download --repo-type dataset {repo}`)",
            dir.display()
        );
    }
    let snapshots = dir.join("snapshots");
    let commit = if snapshots.join(revision).is_dir() {
        revision.to_string()
    } else {
        let reference = dir.join("refs").join(revision);
        std::fs::read_to_string(&reference)
            .map(|s| s.trim().to_string())
            .with_context(|| {
                format!(
                    "dataset `{repo}`: revision `{revision}` is neither a cached snapshot nor a ref (looked for {})",
                    reference.display()
                )
            })?
    };
    let snap = snapshots.join(&commit);
    if !snap.is_dir() {
        bail!(
            "dataset `{repo}`: snapshot {} is missing from the cache",
            snap.display()
        );
    }
    let pat = format!(
        "{}/{}",
        glob::Pattern::escape(&snap.to_string_lossy()),
        pattern
    );
    let mut files: Vec<PathBuf> = glob::glob(&pat)
        .with_context(|| format!("bad pattern `{pattern}`"))?
        .filter_map(|r| r.ok())
        .filter(|f| f.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "dataset `{repo}`: no files match `{pattern}` in {}",
            snap.display()
        );
    }
    Ok(files)
}
