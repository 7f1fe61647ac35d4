//! The data pipeline on the real bundled corpora: every source kind, the
//! tokenizers, mixing, the split, exact cursor resume and every bad-input case.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use switchyard::data::files::{resolve_files, resolve_hf_dataset};
use switchyard::data::sources::{DocPos, DocReader};
use switchyard::data::stream::{Batch, Cursor, DataStream, Split, StreamOptions};
use switchyard::data::{tokenizer, DataConfig, OnBadRecord, SourceConfig, SourceKind};
use tokenizers::Tokenizer;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
fn path(p: &str) -> String {
    root().join(p).to_string_lossy().into_owned()
}
fn shakespeare_txt() -> String {
    path("data/shakespeare/shakespeare_complete_works.txt")
}
fn shakespeare_parquet() -> String {
    path("tests/fixtures/shakespeare-hf/data/train-00000-of-00001.parquet")
}
fn shakespeare_jsonl() -> String {
    path("tests/fixtures/shakespeare-hf/train.jsonl")
}
fn shipped_tokenizer() -> Arc<Tokenizer> {
    Arc::new(tokenizer::load(&root().join("data/tokenizer.json")).unwrap())
}

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> common::Scratch {
    common::Scratch::new("data", name)
}

fn source(kind: SourceKind, paths: &[&str]) -> SourceConfig {
    SourceConfig {
        kind,
        paths: paths.iter().map(|s| s.to_string()).collect(),
        ..SourceConfig::default()
    }
}

fn all_docs(src: &SourceConfig, on_bad: OnBadRecord) -> anyhow::Result<(Vec<String>, u64)> {
    let files = Arc::new(resolve_files(src, 0)?);
    let mut r = DocReader::new(files, DocPos::default(), false, on_bad);
    let mut docs = Vec::new();
    while let Some(d) = r.next_doc()? {
        docs.push(d.text);
    }
    Ok((docs, r.skipped()))
}

fn data_cfg(sources: Vec<SourceConfig>) -> DataConfig {
    DataConfig {
        tokenizer: path("data/tokenizer.json"),
        sources,
        shuffle_buffer: 8,
        workers: 2,
        ..DataConfig::default()
    }
}

fn opts(split: Split, seq_len: usize, batch_size: usize) -> StreamOptions {
    StreamOptions {
        seq_len,
        batch_size,
        split,
        seed: 1234,
        shard: switchyard::data::stream::Shard::WHOLE,
    }
}

fn take(stream: &mut DataStream, n: usize) -> Vec<Batch> {
    (0..n)
        .map(|_| stream.next_batch().unwrap().unwrap())
        .collect()
}

#[test]
fn gpt2_tokenizer_loads_from_tokenizer_json() {
    let tok = tokenizer::load(&root().join("tests/fixtures/gpt2/tokenizer.json")).unwrap();
    assert_eq!(
        tokenizer::encode(&tok, "Hello world").unwrap(),
        vec![15496, 995]
    );
    assert_eq!(tokenizer::eos_id(&tok, "<|endoftext|>").unwrap(), 50256);
}

#[test]
fn shipped_tokenizer_round_trips_text() {
    let tok = shipped_tokenizer();
    assert_eq!(tok.get_vocab_size(true), 4096);
    assert_eq!(tokenizer::eos_id(&tok, "<|endoftext|>").unwrap(), 0);
    let text = std::fs::read_to_string(shakespeare_txt()).unwrap();
    for sample in [
        &text[..4000],
        "  Unseen: naïve café, 日本語, emoji 🙂, tabs\tand trailing spaces  \n",
        "fn main() { println!(\"{}\", 1 << 3); }",
    ] {
        let ids = tokenizer::encode(&tok, sample).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), sample);
    }
    // Learnt merges compress English well below one token per byte.
    let ids = tokenizer::encode(&tok, &text[..4000]).unwrap();
    assert!(ids.len() < 1600, "{} tokens for 4000 bytes", ids.len());
}

#[test]
fn text_source_splits_documents_on_blank_line_runs() {
    // The works are separated by three blank lines, and only there.
    let mut src = source(SourceKind::Text, &[&shakespeare_txt()]);
    src.blank_lines = 3;
    let (docs, _) = all_docs(&src, OnBadRecord::Error).unwrap();
    assert_eq!(docs.len(), 42);
    assert!(
        docs[0].starts_with("ALL'S WELL THAT ENDS WELL"),
        "{}",
        &docs[0][..40]
    );
    src.blank_lines = 2;
    let (docs2, _) = all_docs(&src, OnBadRecord::Error).unwrap();
    assert_eq!(docs2.len(), 934);
    // Whole file as one document.
    src.blank_lines = 0;
    let (one, _) = all_docs(&src, OnBadRecord::Error).unwrap();
    assert_eq!(one.len(), 1);
}

#[test]
fn text_source_prefix_lines_start_documents() {
    let mut src = source(
        SourceKind::Text,
        &[&path("data/rust-std/rust_std_1.63_src.txt")],
    );
    src.blank_lines = 0;
    src.doc_start_prefix = Some("// file: ".into());
    let (docs, _) = all_docs(&src, OnBadRecord::Error).unwrap();
    assert_eq!(docs.len(), 723, "one document per source file");
    assert!(docs.iter().all(|d| d.starts_with("// file: library/")));
    assert!(docs[0].starts_with("// file: library/alloc/src/alloc.rs"));
}

#[test]
fn parquet_written_by_pyarrow_matches_its_jsonl_twin() {
    let pq = source(SourceKind::Parquet, &[&shakespeare_parquet()]);
    let js = source(SourceKind::Jsonl, &[&shakespeare_jsonl()]);
    let (a, _) = all_docs(&pq, OnBadRecord::Error).unwrap();
    let (b, _) = all_docs(&js, OnBadRecord::Error).unwrap();
    assert_eq!(a.len(), 42);
    assert_eq!(a, b);
    assert!(a[0].starts_with("ALL'S WELL THAT ENDS WELL"));
    // Directory and glob forms find the same file.
    let dir = source(
        SourceKind::Parquet,
        &[&path("tests/fixtures/shakespeare-hf/data")],
    );
    let glob = source(
        SourceKind::Parquet,
        &[&path("tests/fixtures/shakespeare-hf/data/train-*.parquet")],
    );
    assert_eq!(
        resolve_files(&dir, 0).unwrap(),
        resolve_files(&pq, 0).unwrap()
    );
    assert_eq!(
        resolve_files(&glob, 0).unwrap(),
        resolve_files(&pq, 0).unwrap()
    );
}

#[test]
fn parquet_reader_resumes_mid_file() {
    let pq = source(SourceKind::Parquet, &[&shakespeare_parquet()]);
    let files = Arc::new(resolve_files(&pq, 0).unwrap());
    let mut r = DocReader::new(files.clone(), DocPos::default(), false, OnBadRecord::Error);
    let docs: Vec<_> = std::iter::from_fn(|| r.next_doc().unwrap()).collect();
    // Restart at row 30 (past several row groups) and compare.
    let mut r2 = DocReader::new(files, docs[30].pos, false, OnBadRecord::Error);
    let rest: Vec<_> = std::iter::from_fn(|| r2.next_doc().unwrap())
        .map(|d| d.text)
        .collect();
    let want: Vec<_> = docs[30..].iter().map(|d| d.text.clone()).collect();
    assert_eq!(rest, want);
}

#[test]
fn hf_cache_dataset_resolves_offline() {
    let cache = scratch("hfcache");
    let repo = cache.join("datasets--someone--shakespeare");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit).join("data");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    std::fs::copy(
        shakespeare_parquet(),
        snap.join("train-00000-of-00001.parquet"),
    )
    .unwrap();

    let src = SourceConfig {
        kind: SourceKind::HfCache,
        repo: Some("someone/shakespeare".into()),
        pattern: "data/train-*.parquet".into(),
        cache_dir: Some(cache.to_string_lossy().into()),
        ..SourceConfig::default()
    };
    let (docs, _) = all_docs(&src, OnBadRecord::Error).unwrap();
    assert_eq!(docs.len(), 42);
    // By commit hash as well as by ref.
    let files = resolve_hf_dataset(&cache, "someone/shakespeare", commit, "**/*.parquet").unwrap();
    assert_eq!(files.len(), 1);

    let missing = SourceConfig {
        repo: Some("nobody/nothing".into()),
        ..src.clone()
    };
    let err = resolve_files(&missing, 0).unwrap_err().to_string();
    assert!(
        err.contains("nobody/nothing") && err.contains("datasets--nobody--nothing"),
        "{err}"
    );
    let bad_rev = SourceConfig {
        revision: "v9".into(),
        ..src
    };
    let err = resolve_files(&bad_rev, 0).unwrap_err().to_string();
    assert!(err.contains("v9") && err.contains("refs"), "{err}");
}

#[test]
fn batches_are_packed_windows_with_stride_seq_len() {
    // Validation split: one pass, in order, no shuffling.
    let mut src = source(SourceKind::Text, &[&shakespeare_txt()]);
    src.blank_lines = 2;
    let cfg = data_cfg(vec![src.clone()]);
    let tok = shipped_tokenizer();
    let (t, b) = (32, 4);
    let mut stream =
        DataStream::open(&cfg, tok.clone(), opts(Split::Validation, t, b), None).unwrap();
    let mut rows: Vec<Vec<u32>> = Vec::new();
    let mut targets = 0;
    while let Some(batch) = stream.next_batch().unwrap() {
        assert_eq!(batch.tokens.len(), batch.rows * (t + 1));
        assert_eq!(batch.mask.len(), batch.rows * t);
        rows.extend(batch.tokens.chunks(t + 1).map(|c| c.to_vec()));
        targets += batch.num_tokens();
    }
    // Consecutive windows share one token.
    for w in rows.windows(2) {
        assert_eq!(w[0][t], w[1][0]);
    }
    // The windows spell out exactly the validation documents, each + EOS.
    let (docs, _) = all_docs(&src, OnBadRecord::Error).unwrap();
    let mut want = Vec::new();
    for d in docs
        .iter()
        .filter(|d| switchyard::data::stream::is_validation(d, cfg.val_fraction))
    {
        want.extend(tokenizer::encode(&tok, d).unwrap());
        want.push(0);
    }
    let mut got = rows[0].clone();
    for r in &rows[1..] {
        got.extend_from_slice(&r[1..]);
    }
    // Every token but the first is a target exactly once; padding is masked.
    assert_eq!(targets + 1, want.len());
    got.truncate(targets + 1);
    assert_eq!(got, want);
}

#[test]
fn split_is_stable_disjoint_and_near_its_fraction() {
    let mut src = source(SourceKind::Text, &[&shakespeare_txt()]);
    src.blank_lines = 2;
    let (docs, _) = all_docs(&src, OnBadRecord::Error).unwrap();
    let frac = 0.1;
    let val: Vec<bool> = docs
        .iter()
        .map(|d| switchyard::data::stream::is_validation(d, frac))
        .collect();
    let again: Vec<bool> = docs
        .iter()
        .map(|d| switchyard::data::stream::is_validation(d, frac))
        .collect();
    assert_eq!(val, again);
    let share = val.iter().filter(|&&v| v).count() as f64 / docs.len() as f64;
    assert!((share - frac).abs() < 0.03, "validation share {share}");

    // Two independently opened validation streams give identical batches,
    // and no validation token window appears in the training stream's documents.
    let cfg = DataConfig {
        val_fraction: frac,
        ..data_cfg(vec![src])
    };
    let tok = shipped_tokenizer();
    let collect = |split| {
        let mut s = DataStream::open(&cfg, tok.clone(), opts(split, 64, 4), None).unwrap();
        let mut all = Vec::new();
        for _ in 0..20 {
            match s.next_batch().unwrap() {
                Some(b) => all.push(b.tokens),
                None => break,
            }
        }
        all
    };
    assert_eq!(collect(Split::Validation), collect(Split::Validation));
    let val_windows: HashSet<Vec<u32>> = collect(Split::Validation)
        .iter()
        .flat_map(|b| b.chunks(65).map(|c| c.to_vec()).collect::<Vec<_>>())
        .collect();
    let train = collect(Split::Train);
    assert!(train
        .iter()
        .flat_map(|b| b.chunks(65))
        .all(|w| !val_windows.contains(w)));
}

#[path = "data_stream/stream.rs"]
mod stream;

#[path = "data_stream/errors.rs"]
mod errors;
