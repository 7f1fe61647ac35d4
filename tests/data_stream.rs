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

#[test]
fn mixing_weights_are_respected() {
    let dir = scratch("mix");
    // Two sources with disjoint vocabularies: lowercase words vs digits.
    let a: String = (0..3000)
        .map(|i| format!("alpha beta gamma {i}x\n\n"))
        .collect::<String>()
        .replace(char::is_numeric, "");
    let b: String = (0..3000)
        .map(|i| format!("{} {}\n\n", i * 7, i * 13))
        .collect();
    std::fs::write(dir.join("a.txt"), a).unwrap();
    std::fs::write(dir.join("b.txt"), b).unwrap();
    let tok = shipped_tokenizer();
    let is_digits = |t: u32| {
        let s = tok.decode(&[t], false).unwrap();
        let s = s.trim();
        !s.is_empty() && s.chars().all(|c| c.is_ascii_digit())
    };
    let mut sa = source(SourceKind::Text, &[dir.join("a.txt").to_str().unwrap()]);
    sa.weight = 3.0;
    let sb = source(SourceKind::Text, &[dir.join("b.txt").to_str().unwrap()]);
    let cfg = DataConfig {
        val_fraction: 0.0,
        ..data_cfg(vec![sa, sb])
    };
    let mut stream = DataStream::open(&cfg, tok.clone(), opts(Split::Train, 64, 8), None).unwrap();
    let (mut from_b, mut total) = (0usize, 0usize);
    for batch in take(&mut stream, 40) {
        for row in batch.tokens.chunks(65) {
            for &t in &row[1..] {
                total += 1;
                from_b += usize::from(is_digits(t)); // digits come only from source b
            }
        }
    }
    // Source b's documents are digits, spaces and EOS/newlines; count its
    // digit-bearing tokens against the same count in a pure-b stream.
    let pure = DataConfig {
        val_fraction: 0.0,
        ..data_cfg(vec![cfg.sources[1].clone()])
    };
    let mut only_b = DataStream::open(&pure, tok.clone(), opts(Split::Train, 64, 8), None).unwrap();
    let (mut digits_b, mut total_b) = (0usize, 0usize);
    for batch in take(&mut only_b, 10) {
        for row in batch.tokens.chunks(65) {
            for &t in &row[1..] {
                total_b += 1;
                digits_b += usize::from(is_digits(t));
            }
        }
    }
    let share_b = (from_b as f64 / total as f64) / (digits_b as f64 / total_b as f64);
    assert!(
        (share_b - 0.25).abs() < 0.02,
        "source b's token share {share_b}, want 0.25"
    );
    let c = stream.cursor();
    let emitted: Vec<u64> = c.sources.iter().map(|s| s.emitted_tokens).collect();
    let frac = emitted[1] as f64 / (emitted[0] + emitted[1]) as f64;
    assert!((frac - 0.25).abs() < 0.01, "{emitted:?}");
}

#[test]
fn cursor_resume_gives_the_same_batches() {
    let mut a = source(SourceKind::Text, &[&shakespeare_txt()]);
    a.blank_lines = 2;
    let b = source(SourceKind::Parquet, &[&shakespeare_parquet()]);
    let cfg = data_cfg(vec![a, b]);
    let tok = shipped_tokenizer();
    let o = || opts(Split::Train, 48, 3);

    let mut straight = DataStream::open(&cfg, tok.clone(), o(), None).unwrap();
    let all = take(&mut straight, 30);

    for cut in [1, 7, 17] {
        let mut first = DataStream::open(&cfg, tok.clone(), o(), None).unwrap();
        let head = take(&mut first, cut);
        assert_eq!(head, all[..cut]);
        let saved = serde_json::to_string(&first.cursor()).unwrap();
        drop(first);
        let cursor: Cursor = serde_json::from_str(&saved).unwrap();
        let mut resumed = DataStream::open(&cfg, tok.clone(), o(), Some(cursor)).unwrap();
        let tail = take(&mut resumed, 30 - cut);
        assert_eq!(tail, all[cut..], "resume after {cut} batches diverged");
    }

    // A cursor for another shape is refused.
    let mut s = DataStream::open(&cfg, tok.clone(), o(), None).unwrap();
    take(&mut s, 1);
    let c = s.cursor();
    let err = DataStream::open(&cfg, tok, opts(Split::Train, 64, 3), Some(c))
        .err()
        .unwrap();
    assert!(err.to_string().contains("seq_len"), "{err}");
}

/// A cursor that a damaged or hand-edited checkpoint holds is refused with
/// what is wrong, where it used to index past a list, underflow or feed
/// token ids past the vocabulary to the model.
#[test]
fn a_damaged_cursor_is_refused_with_what_is_wrong() {
    let cfg = data_cfg(vec![source(SourceKind::Text, &[&shakespeare_txt()])]);
    let tok = shipped_tokenizer();
    let o = || opts(Split::Train, 32, 2);
    let mut s = DataStream::open(&cfg, tok.clone(), o(), None).unwrap();
    take(&mut s, 3);
    let good = s.cursor();
    drop(s);
    assert!(!good.window.is_empty() && !good.shuffle.is_empty());
    type Edit = fn(&mut Cursor);
    let cases: [(Edit, &str); 7] = [
        (|c| c.active = Some(5), "active source 5"),
        (|c| c.window = vec![1; 100], "holds 100 tokens"),
        (|c| c.window[0] = 999_999, "token id 999999"),
        (|c| c.window_sources = vec![(7, 1)], "names source 7"),
        (|c| c.shuffle[0].tokens.truncate(2), "holds 2 tokens"),
        (|c| c.shuffle[1].tokens[3] = 4096, "token id 4096"),
        (|c| c.sources[0].resume.file = 9, "resumes at file 9"),
    ];
    for (edit, needle) in cases {
        let mut c = good.clone();
        edit(&mut c);
        let err = DataStream::open(&cfg, tok.clone(), o(), Some(c))
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains(needle), "{needle}: {err:#}");
    }
    DataStream::open(&cfg, tok, o(), Some(good)).unwrap();
}

#[test]
fn training_stream_cycles_past_the_end_of_the_corpus() {
    let dir = scratch("cycle");
    std::fs::write(dir.join("small.txt"), "one two three\n\nfour five six\n").unwrap();
    let cfg = DataConfig {
        val_fraction: 0.0,
        ..data_cfg(vec![source(
            SourceKind::Text,
            &[dir.join("small.txt").to_str().unwrap()],
        )])
    };
    let mut s =
        DataStream::open(&cfg, shipped_tokenizer(), opts(Split::Train, 16, 4), None).unwrap();
    let batches = take(&mut s, 5);
    assert!(batches.iter().all(|b| b.rows == 4 && b.num_tokens() == 64));
}

// ---- bad input -----------------------------------------------------------

fn expect_err(src: SourceConfig, needles: &[&str]) -> String {
    let err = match all_docs(&src, OnBadRecord::Error) {
        Ok(_) => panic!("expected an error mentioning {needles:?}"),
        Err(e) => format!("{e:#}"),
    };
    for n in needles {
        assert!(err.contains(n), "error {err:?} does not mention {n:?}");
    }
    err
}

#[test]
fn invalid_utf8_names_file_line_and_offset() {
    let dir = scratch("utf8");
    let f = dir.join("bad.txt");
    let mut bytes = b"good line\n\nsecond doc ok\n\nthird \xff\xfe doc\n\nlast one\n".to_vec();
    std::fs::write(&f, &bytes).unwrap();
    let src = source(SourceKind::Text, &[f.to_str().unwrap()]);
    // "third" starts at byte 26 on line 5; the bad byte is at 26 + 6 = 32.
    expect_err(src.clone(), &["bad.txt:5", "byte offset 32", "UTF-8"]);
    let (docs, skipped) = all_docs(&src, OnBadRecord::Skip).unwrap();
    assert_eq!(docs, vec!["good line", "second doc ok", "last one"]);
    assert_eq!(skipped, 1);

    bytes = b"{\"text\": \"ok\"}\n{\"text\": \"b\xffd\"}\n".to_vec();
    let j = dir.join("bad.jsonl");
    std::fs::write(&j, &bytes).unwrap();
    expect_err(
        source(SourceKind::Jsonl, &[j.to_str().unwrap()]),
        &["bad.jsonl:2", "UTF-8", "byte offset 26"],
    );
}

#[test]
fn malformed_json_and_missing_fields_name_the_line() {
    let dir = scratch("json");
    let f = dir.join("c.jsonl");
    std::fs::write(
        &f,
        "{\"text\": \"fine\"}\n\n{\"text\": \"also fine\"}\n{\"text\": oops}\n{\"body\": \"x\"}\n{\"text\": 42}\n{\"text\": \"end\"}\n",
    )
    .unwrap();
    let src = source(SourceKind::Jsonl, &[f.to_str().unwrap()]);
    expect_err(src.clone(), &["c.jsonl:4", "malformed JSON"]);
    let (docs, skipped) = all_docs(&src, OnBadRecord::Skip).unwrap();
    assert_eq!(docs, vec!["fine", "also fine", "end"]);
    assert_eq!(skipped, 3);

    let g = dir.join("d.jsonl");
    std::fs::write(&g, "{\"body\": \"x\"}\n").unwrap();
    expect_err(
        source(SourceKind::Jsonl, &[g.to_str().unwrap()]),
        &["d.jsonl:1", "missing text field `text`"],
    );
    let h = dir.join("e.jsonl");
    std::fs::write(&h, "{\"text\": [1]}\n").unwrap();
    expect_err(
        source(SourceKind::Jsonl, &[h.to_str().unwrap()]),
        &["e.jsonl:1", "not a string"],
    );
}

#[test]
fn broken_parquet_files_are_named() {
    let dir = scratch("pq");
    let bytes = std::fs::read(shakespeare_parquet()).unwrap();
    let trunc = dir.join("truncated.parquet");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    expect_err(
        source(SourceKind::Parquet, &[trunc.to_str().unwrap()]),
        &["truncated.parquet", "parquet"],
    );
    let fake = dir.join("fake.parquet");
    std::fs::write(&fake, "this is not parquet at all").unwrap();
    expect_err(
        source(SourceKind::Parquet, &[fake.to_str().unwrap()]),
        &["fake.parquet", "not a readable parquet"],
    );
    let mut wrong_col = source(SourceKind::Parquet, &[&shakespeare_parquet()]);
    wrong_col.text_field = "body".into();
    expect_err(wrong_col, &["no column `body`", "id, text"]);
}

#[test]
fn empty_and_missing_corpora_are_errors() {
    let dir = scratch("empty");
    let f = dir.join("empty.txt");
    std::fs::write(&f, "\n\n\n").unwrap();
    let cfg = DataConfig {
        val_fraction: 0.0,
        ..data_cfg(vec![source(SourceKind::Text, &[f.to_str().unwrap()])])
    };
    let tok = shipped_tokenizer();
    let mut s = DataStream::open(&cfg, tok.clone(), opts(Split::Validation, 16, 2), None).unwrap();
    let err = s.next_batch().unwrap_err().to_string();
    assert!(err.contains("no tokens"), "{err}");
    let mut s = DataStream::open(&cfg, tok.clone(), opts(Split::Train, 16, 2), None).unwrap();
    let err = format!("{:#}", s.next_batch().unwrap_err());
    assert!(err.contains("empty") && err.contains("empty.txt"), "{err}");

    let missing = data_cfg(vec![source(SourceKind::Text, &["/no/such/file.txt"])]);
    let err = DataStream::open(&missing, tok, opts(Split::Train, 16, 2), None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("/no/such/file.txt"), "{err}");
}

#[test]
fn every_token_carries_the_source_it_came_from() {
    let dir = scratch("sources");
    let (a, b) = (dir.join("words.txt"), dir.join("digits.txt"));
    let words: String = (0..60)
        .map(|i| format!("the king and the queen {i}\n\n"))
        .collect();
    let digits: String = (0..60).map(|_| "4242 1717 9393\n\n".to_string()).collect();
    std::fs::write(&a, words.replace(|c: char| c.is_ascii_digit(), "")).unwrap();
    std::fs::write(&b, &digits).unwrap();
    let tok = shipped_tokenizer();
    let ids = |text: &str| -> HashSet<u32> {
        tok.encode(text, false)
            .unwrap()
            .get_ids()
            .iter()
            .copied()
            .collect()
    };
    let (all_a, all_b) = (ids(&std::fs::read_to_string(&a).unwrap()), ids(&digits));
    // Tokens only one corpus has (blank lines and EOS are in both).
    let wa: HashSet<u32> = all_a.difference(&all_b).copied().collect();
    let wb: HashSet<u32> = all_b.difference(&all_a).copied().collect();
    assert!(!wa.is_empty() && !wb.is_empty());
    let cfg = data_cfg(vec![
        source(SourceKind::Text, &[a.to_str().unwrap()]),
        source(SourceKind::Text, &[b.to_str().unwrap()]),
    ]);
    let mut stream = DataStream::open(&cfg, tok.clone(), opts(Split::Train, 16, 4), None).unwrap();
    let mut seen = [0usize; 2];
    for batch in take(&mut stream, 10) {
        let s = batch.seq_len;
        assert_eq!(batch.sources.len(), batch.rows * s);
        for r in 0..batch.rows {
            for i in 0..s {
                let token = batch.tokens[r * (s + 1) + i];
                let src = batch.sources[r * s + i];
                if wa.contains(&token) {
                    assert_eq!(src, 0, "token {token} came from the words file");
                    seen[0] += 1;
                } else if wb.contains(&token) {
                    assert_eq!(src, 1, "token {token} came from the digits file");
                    seen[1] += 1;
                }
            }
        }
    }
    assert!(seen[0] > 100 && seen[1] > 100, "{seen:?}");
}
