//! Data pipeline benchmark.
//!
//! ```bash
//! cargo run --release --example data_bench -- throughput   # default corpus, 1 and 2 workers
//! cargo run --release --example data_bench -- memory 200   # generated 200 MB corpus, peak RSS
//! ```
//!
//! `throughput` streams one full pass over the bundled Shakespeare corpus
//! (tokenize, pack, shuffle, batch) and reports MB/s and tokens/s.
//! `memory` writes a corpus of the given size in MB to a temporary directory,
//! streams one full pass over it and reports the peak resident memory, which
//! stays flat whatever the corpus size.

use std::sync::Arc;
use std::time::Instant;
use switchyard::data::stream::{DataStream, Split, StreamOptions};
use switchyard::data::{tokenizer, DataConfig, SourceConfig};

fn rss_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Stream one pass over `cfg`'s single source; returns (seconds, tokens).
fn one_pass(cfg: &DataConfig, tok: Arc<tokenizers::Tokenizer>) -> anyhow::Result<(f64, u64)> {
    let opts = StreamOptions {
        seq_len: 256,
        batch_size: 16,
        split: Split::Train,
        seed: 0,
        shard: switchyard::data::stream::Shard::WHOLE,
    };
    let start = Instant::now();
    let mut stream = DataStream::open(cfg, tok, opts, None)?;
    let mut tokens = 0u64;
    while stream.cursor().sources[0].resume.epoch == 0 {
        let b = stream.next_batch()?.expect("training streams do not end");
        tokens += b.num_tokens() as u64;
    }
    Ok((start.elapsed().as_secs_f64(), tokens))
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "throughput".into());
    let tok = Arc::new(tokenizer::load(std::path::Path::new(
        "data/tokenizer.json",
    ))?);
    let base = DataConfig {
        val_fraction: 0.0,
        ..DataConfig::default()
    };
    match mode.as_str() {
        "throughput" => {
            let bytes = std::fs::metadata(&base.sources[0].paths[0])?.len() as f64;
            println!(
                "corpus: {} ({:.1} MB)",
                base.sources[0].paths[0],
                bytes / 1e6
            );
            println!("| workers | MB/s | tokens/s | seconds |");
            println!("|---|---|---|---|");
            for workers in [1, 2] {
                let cfg = DataConfig {
                    workers,
                    ..base.clone()
                };
                one_pass(&cfg, tok.clone())?; // warm the page cache
                let (secs, tokens) = one_pass(&cfg, tok.clone())?;
                println!(
                    "| {workers} | {:.1} | {:.0} | {secs:.2} |",
                    bytes / 1e6 / secs,
                    tokens as f64 / secs
                );
            }
            println!("peak RSS: {:.1} MB", rss_kb("VmHWM:") as f64 / 1024.0);
        }
        "memory" => {
            let mb: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(200);
            let dir = std::env::temp_dir().join(format!("sy-data-bench-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let path = dir.join("corpus.txt");
            let seed_text = std::fs::read_to_string(&base.sources[0].paths[0])?;
            let words: Vec<&str> = seed_text.split_whitespace().collect();
            {
                use std::io::Write;
                let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
                let (mut written, mut x) = (0u64, 0x9e37_79b9_7f4a_7c15u64);
                while written < mb * 1_000_000 {
                    // A paragraph of pseudo-random Shakespeare words.
                    let mut para = String::new();
                    for i in 0..120 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        para.push_str(words[(x % words.len() as u64) as usize]);
                        para.push(if i % 12 == 11 { '\n' } else { ' ' });
                    }
                    para.push_str("\n\n");
                    f.write_all(para.as_bytes())?;
                    written += para.len() as u64;
                }
            }
            let size = std::fs::metadata(&path)?.len();
            let before = rss_kb("VmRSS:");
            let cfg = DataConfig {
                sources: vec![SourceConfig {
                    paths: vec![path.to_string_lossy().into()],
                    blank_lines: 1,
                    ..SourceConfig::default()
                }],
                ..base
            };
            let (secs, tokens) = one_pass(&cfg, tok)?;
            let peak = rss_kb("VmHWM:");
            println!(
                "corpus {:.0} MB, {tokens} tokens in {secs:.1}s ({:.1} MB/s); RSS before {:.1} MB, peak {:.1} MB",
                size as f64 / 1e6,
                size as f64 / 1e6 / secs,
                before as f64 / 1024.0,
                peak as f64 / 1024.0
            );
            std::fs::remove_dir_all(&dir)?;
        }
        other => anyhow::bail!("unknown mode {other:?}: use throughput or memory"),
    }
    Ok(())
}
