//! The `[data]` section: corpus sources, tokenizer, split and workers.

use super::{at_most, limit, ConfigError};
use serde::{Deserialize, Serialize};

/// What to do with a record that cannot be read (bad UTF-8, malformed JSON,
/// a missing or non-string text field, a null parquet value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnBadRecord {
    /// Stop with an error naming the file and the line, row or byte offset.
    #[default]
    Error,
    /// Skip the record and count it; the count is reported.
    Skip,
}

/// The kind of a corpus source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Plain text files; documents are files or blocks between separators.
    Text,
    /// One JSON object per line, text in `text_field`.
    Jsonl,
    /// Parquet files (Hugging Face datasets layout), text in `text_field`.
    Parquet,
    /// A dataset already in the local Hugging Face hub cache.
    HfCache,
}

/// One corpus source of the `[data]` section (`[[data.sources]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// The domain this source is reported as (per-domain expert maps).
    /// Default: the file stem of its first path, or its repo.
    pub name: Option<String>,
    /// "text", "jsonl", "parquet" or "hf_cache". Default "text".
    pub kind: SourceKind,
    /// Files, directories (read recursively, sorted) or glob patterns, for
    /// text/jsonl/parquet. Relative paths are taken from the working directory.
    pub paths: Vec<String>,
    /// Mixing weight: the share of tokens this source contributes is
    /// weight / Σ weights. Default 1.0.
    pub weight: f64,
    /// JSONL field or parquet column holding the text. Default "text".
    pub text_field: String,
    /// Text files: a run of at least this many blank lines ends a document;
    /// 0 disables the rule. Default 1.
    pub blank_lines: usize,
    /// Text files: a line starting with this prefix begins a new document
    /// (e.g. "// file: "). Default none.
    pub doc_start_prefix: Option<String>,
    /// hf_cache: the dataset, "owner/name". Default none.
    pub repo: Option<String>,
    /// hf_cache: a branch/tag name or a commit hash. Default "main".
    pub revision: String,
    /// hf_cache: glob of files inside the snapshot. Default "**/*.parquet".
    pub pattern: String,
    /// hf_cache: the hub cache directory; default `$HF_HUB_CACHE`, else
    /// `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    pub cache_dir: Option<String>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            name: None,
            kind: SourceKind::Text,
            paths: Vec::new(),
            weight: 1.0,
            text_field: "text".into(),
            blank_lines: 1,
            doc_start_prefix: None,
            repo: None,
            revision: "main".into(),
            pattern: "**/*.parquet".into(),
            cache_dir: None,
        }
    }
}

/// The `[data]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Path of a Hugging Face `tokenizer.json`. Default "data/tokenizer.json".
    pub tokenizer: String,
    /// Token appended after every document. Default "<|endoftext|>".
    pub eos_token: String,
    /// The corpus sources. Default: the bundled Shakespeare text.
    pub sources: Vec<SourceConfig>,
    /// Fraction of documents (by content hash) held out for validation. Default 0.05.
    pub val_fraction: f64,
    /// Windows held in the shuffle buffer; 0 or 1 disables shuffling. Default 256.
    pub shuffle_buffer: usize,
    /// Tokenization worker threads. Default 2.
    pub workers: usize,
    /// "error" or "skip". Default "error".
    pub on_bad_record: OnBadRecord,
    /// How the ranks of a run of several processes split the training
    /// stream. Default "documents". No effect on one process.
    pub sharding: Sharding,
}

/// How the ranks of a data-parallel run split the training stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharding {
    /// Each rank reads, tokenizes and packs only its share of the documents
    /// (chosen by a hash of the text), with its own cursor: no work is
    /// repeated, and the data order depends on the world size.
    #[default]
    Documents,
    /// Every rank reads the whole stream, cuts the global batch (world size
    /// × train.batch_size rows) and keeps its rows: the batches of one
    /// process with the global batch size, at any world size, for the cost
    /// of every rank tokenizing everything.
    Rows,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            tokenizer: "data/tokenizer.json".into(),
            eos_token: "<|endoftext|>".into(),
            sources: vec![SourceConfig {
                paths: vec!["data/shakespeare/shakespeare_complete_works.txt".into()],
                blank_lines: 2,
                ..SourceConfig::default()
            }],
            val_fraction: 0.05,
            shuffle_buffer: 256,
            workers: 2,
            on_bad_record: OnBadRecord::Error,
            sharding: Sharding::Documents,
        }
    }
}

impl DataConfig {
    /// Check every field; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: String, message: String| Err(ConfigError { key, message });
        if self.sources.is_empty() {
            return err("data.sources".into(), "needs at least one source".into());
        }
        // Each token's source is carried as a 16-bit index (one value reserved).
        if self.sources.len() >= u16::MAX as usize {
            return err(
                "data.sources".into(),
                format!(
                    "at most {} sources, got {}",
                    u16::MAX - 1,
                    self.sources.len()
                ),
            );
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            return err(
                "data.val_fraction".into(),
                format!("must be in [0, 1), got {}", self.val_fraction),
            );
        }
        if self.workers == 0 {
            return err("data.workers".into(), "must be at least 1".into());
        }
        at_most("data.workers", self.workers, limit::WORKERS)?;
        at_most("data.shuffle_buffer", self.shuffle_buffer, limit::SHUFFLE)?;
        for (i, s) in self.sources.iter().enumerate() {
            let key = |k: &str| format!("data.sources.{i}.{k}");
            if !(s.weight > 0.0) || !s.weight.is_finite() {
                return err(
                    key("weight"),
                    format!("must be a finite number > 0, got {}", s.weight),
                );
            }
            match s.kind {
                SourceKind::HfCache => {
                    let ok = s.repo.as_deref().is_some_and(|r| {
                        let parts: Vec<_> = r.split('/').collect();
                        parts.len() == 2 && parts.iter().all(|p| !p.is_empty())
                    });
                    if !ok {
                        return err(
                            key("repo"),
                            "hf_cache sources need repo = \"owner/name\"".into(),
                        );
                    }
                }
                _ if s.paths.is_empty() => {
                    return err(
                        key("paths"),
                        "needs at least one file, directory or glob".into(),
                    );
                }
                _ => {}
            }
            if s.text_field.is_empty() {
                return err(key("text_field"), "must not be empty".into());
            }
            if let Some(name) = &s.name {
                if name.trim().is_empty() {
                    return err(key("name"), "must not be empty".into());
                }
                let earlier = self.sources[..i]
                    .iter()
                    .position(|o| o.name.as_ref() == Some(name));
                if let Some(j) = earlier {
                    return err(
                        key("name"),
                        format!("\"{name}\" is already the name of data.sources.{j}"),
                    );
                }
            }
        }
        Ok(())
    }

    /// Each source's domain name, in order: its `name`, else the file stem
    /// of its first path (or the last part of its repo); a default that
    /// repeats an earlier name gets `-{index}` appended.
    pub fn source_names(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (i, s) in self.sources.iter().enumerate() {
            let name = s.name.clone().unwrap_or_else(|| {
                let stem = s
                    .paths
                    .first()
                    .map(|p| {
                        let p = std::path::Path::new(p.trim_end_matches('/'));
                        let stem = p.file_stem().and_then(|x| x.to_str()).unwrap_or_default();
                        // "data/*.txt" names the directory, not the glob.
                        if stem.contains('*') || stem.is_empty() {
                            p.parent()
                                .and_then(|d| d.file_name())
                                .and_then(|x| x.to_str())
                                .unwrap_or_default()
                                .to_string()
                        } else {
                            stem.to_string()
                        }
                    })
                    .or_else(|| {
                        s.repo
                            .as_deref()
                            .map(|r| r.rsplit('/').next().unwrap_or(r).to_string())
                    })
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| format!("source{i}"));
                if out.contains(&stem)
                    || self.sources.iter().any(|o| o.name.as_ref() == Some(&stem))
                {
                    format!("{stem}-{i}")
                } else {
                    stem
                }
            });
            out.push(name);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_names_default_to_file_stems_and_stay_distinct() {
        let cfg: DataConfig = toml::from_str(
            r#"
            [[sources]]
            paths = ["corpora/shakespeare.txt"]
            [[sources]]
            paths = ["code/*.rs"]
            [[sources]]
            kind = "hf_cache"
            repo = "owner/wiki"
            [[sources]]
            paths = ["other/shakespeare.txt"]
            [[sources]]
            name = "legal"
            paths = ["x.jsonl"]
            "#,
        )
        .unwrap();
        assert_eq!(
            cfg.source_names(),
            ["shakespeare", "code", "wiki", "shakespeare-3", "legal"]
        );
        let dup: DataConfig =
            toml::from_str("[[sources]]\nname = \"a\"\npaths = [\"x\"]\n[[sources]]\nname = \"a\"\npaths = [\"y\"]\n")
                .unwrap();
        assert_eq!(dup.validate().unwrap_err().key, "data.sources.1.name");
    }

    #[test]
    fn defaults_validate_and_parse() {
        DataConfig::default().validate().unwrap();
        let cfg: DataConfig = toml::from_str(
            r#"
            tokenizer = "t.json"
            [[sources]]
            kind = "jsonl"
            paths = ["a.jsonl"]
            weight = 3
            [[sources]]
            kind = "hf_cache"
            repo = "owner/name"
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.sources[0].weight, 3.0);
        assert_eq!(cfg.sources[1].revision, "main");
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = toml::from_str::<DataConfig>("[[sources]]\nkind = \"csv\"\n").unwrap_err();
        assert!(e.to_string().contains("jsonl"), "{e}");
        let e = toml::from_str::<DataConfig>("[[sources]]\npath = [\"x\"]\n").unwrap_err();
        assert!(e.to_string().contains("paths"), "{e}");
        let mut cfg = DataConfig::default();
        cfg.sources[0].weight = 0.0;
        assert_eq!(cfg.validate().unwrap_err().key, "data.sources.0.weight");
        let mut cfg = DataConfig::default();
        cfg.sources.push(SourceConfig {
            kind: SourceKind::HfCache,
            repo: Some("noslash".into()),
            ..SourceConfig::default()
        });
        assert_eq!(cfg.validate().unwrap_err().key, "data.sources.1.repo");
    }
}
