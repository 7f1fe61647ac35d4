//! Mixing by weight, the resume cursor, a damaged cursor, and cycling past the end of the corpus.

use super::*;

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
