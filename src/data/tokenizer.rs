//! Tokenizers: load any Hugging Face `tokenizer.json`, and train a byte-level
//! BPE (GPT-2 style: Radford et al. 2019) on a corpus, streaming it.

use super::files::Format;
use super::sources::{DocPos, DocReader};
use super::OnBadRecord;
use anyhow::{anyhow, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

/// Load a `tokenizer.json`.
pub fn load(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path).map_err(|e| anyhow!("loading tokenizer {}: {e}", path.display()))
}

/// Refuse a tokenizer whose ids a model with `vocab_size` embeddings could
/// not look up (`path` names it in the error).
pub fn check_fits(tok: &Tokenizer, path: &Path, vocab_size: usize) -> Result<()> {
    let n = tok.get_vocab_size(true);
    if n > vocab_size {
        anyhow::bail!(
            "the tokenizer {} has {n} tokens but the model's vocabulary (model.vocab_size) \
             has {vocab_size}: use the tokenizer the model was trained with",
            path.display()
        );
    }
    Ok(())
}

/// The id of the end-of-document token, which must exist in the vocabulary.
pub fn eos_id(tok: &Tokenizer, eos: &str) -> Result<u32> {
    tok.token_to_id(eos).with_context(|| {
        format!(
            "the tokenizer has no token `{eos}`; set data.eos_token to one of its special tokens"
        )
    })
}

/// Encode one text without special tokens.
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok
        .encode_fast(text, false)
        .map_err(|e| anyhow!("tokenizing: {e}"))?
        .get_ids()
        .to_vec())
}

/// Options for training a byte-level BPE tokenizer.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Final vocabulary size, special tokens included.
    pub vocab_size: usize,
    /// Pairs seen fewer times are not merged.
    pub min_frequency: u64,
    /// Special tokens, first gets id 0. The end-of-document token belongs here.
    pub special_tokens: Vec<String>,
    /// Show a progress bar over the input bytes.
    pub progress: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            vocab_size: 4096,
            min_frequency: 2,
            special_tokens: vec!["<|endoftext|>".into()],
            progress: true,
        }
    }
}

/// Train a byte-level BPE tokenizer on the documents of `files` and save it
/// as `tokenizer.json` at `out`. Documents are streamed: only word counts are
/// held in memory, never the corpus.
pub fn train_bpe(
    files: Vec<(PathBuf, Format)>,
    opts: &TrainOptions,
    out: &Path,
) -> Result<Tokenizer> {
    if let Some(t) = opts.special_tokens.iter().find(|t| t.is_empty()) {
        anyhow::bail!("special tokens (--eos-token) must not be empty (got {t:?})");
    }
    // The 256 byte tokens and the special ones come before any merge.
    let least = 256 + opts.special_tokens.len();
    let most = crate::config::limit::VOCAB;
    if !(least..=most).contains(&opts.vocab_size) {
        anyhow::bail!(
            "the vocabulary size (--vocab-size) must be in {least}..={most} (the 256 byte tokens and {} \
             special token(s) come first), got {}",
            opts.special_tokens.len(),
            opts.vocab_size
        );
    }
    let total: u64 = files
        .iter()
        .map(|(f, _)| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let bar = if opts.progress {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
            )
            .unwrap()
            .progress_chars("=> "),
        );
        bar.set_message("counting words");
        bar
    } else {
        ProgressBar::hidden()
    };

    let mut reader = DocReader::new(
        Arc::new(files),
        DocPos::default(),
        false,
        OnBadRecord::Error,
    );
    let failure: Arc<Mutex<Option<anyhow::Error>>> = Arc::default();
    let fail = failure.clone();
    let progress = bar.clone();
    let read = Arc::new(AtomicU64::new(0));
    let counted = read.clone();
    let docs = std::iter::from_fn(move || match reader.next_doc() {
        Ok(Some(doc)) => {
            progress.inc(doc.text.len() as u64 + 1);
            counted.fetch_add(1, Ordering::Relaxed);
            Some(doc.text)
        }
        Ok(None) => None,
        Err(e) => {
            *fail.lock().unwrap() = Some(e);
            None
        }
    });

    let special: Vec<AddedToken> = opts
        .special_tokens
        .iter()
        .map(|t| AddedToken::from(t.clone(), true))
        .collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(opts.vocab_size)
        .min_frequency(opts.min_frequency)
        .special_tokens(special)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build();
    let mut tok = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<tokenizers::NormalizerWrapper>)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(Some(ByteLevel::new(false, false, true)))
        .with_decoder(Some(ByteLevelDecoder::default()))
        .build()
        .map_err(|e| anyhow!("building tokenizer: {e}"))?;
    tok.train(&mut trainer, docs)
        .map_err(|e| anyhow!("training tokenizer: {e}"))?;
    bar.finish_and_clear();
    if let Some(e) = failure.lock().unwrap().take() {
        return Err(e);
    }
    if read.load(Ordering::Relaxed) == 0 {
        anyhow::bail!("the input holds no documents to train the tokenizer on");
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tok: Tokenizer = tok.into();
    tok.save(out, false)
        .map_err(|e| anyhow!("saving tokenizer to {}: {e}", out.display()))?;
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trained_byte_level_bpe_round_trips_text() {
        let dir = std::env::temp_dir().join(format!("sy-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let corpus = dir.join("c.txt");
        let text = "the cat sat on the mat.\n\nthe dog sat on the log!\n\nünïcödé — ok? 12345\n";
        std::fs::write(&corpus, text.repeat(20)).unwrap();
        let fmt = Format::Text {
            blank_lines: 1,
            doc_start_prefix: None,
        };
        let opts = TrainOptions {
            vocab_size: 300,
            progress: false,
            ..TrainOptions::default()
        };
        let out = dir.join("tok.json");
        let tok = train_bpe(vec![(corpus, fmt)], &opts, &out).unwrap();
        let reloaded = load(&out).unwrap();
        assert_eq!(eos_id(&reloaded, "<|endoftext|>").unwrap(), 0);
        assert!(tok.get_vocab_size(true) > 257, "no merges were learnt");
        for sample in [
            "the cat sat on the mat.",
            "  leading spaces, tabs\tand\nnewlines\n",
            "ünïcödé — ok? 12345 never seen: zqxj 🙂",
        ] {
            let ids = encode(&reloaded, sample).unwrap();
            let back = reloaded.decode(&ids, false).unwrap();
            assert_eq!(back, sample);
        }
        // Merges make frequent text shorter than its byte count.
        assert!(encode(&reloaded, "the cat sat on the mat.").unwrap().len() < 12);
        std::fs::remove_dir_all(&dir).ok();
    }
}
