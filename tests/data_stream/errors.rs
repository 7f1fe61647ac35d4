//! Bad corpora named by file and line, and the source of every token.

use super::*;

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
