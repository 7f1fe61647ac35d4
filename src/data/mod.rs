//! The data side: corpus sources → tokenizer → packer → batches.
//!
//! - [`sources`]: read documents from text, JSONL, parquet files and the
//!   Hugging Face hub cache, with positions precise enough to resume from and
//!   to name in error messages.
//! - [`tokenizer`]: load any `tokenizer.json`; train a byte-level BPE.
//! - [`stream`]: background tokenization, weighted mixing, packing into
//!   `seq_len + 1` windows, a seeded shuffle buffer, train/validation split by
//!   document hash, and an exact resume cursor.
//! - [`ranks`]: each rank's part of the training stream in a run of several
//!   processes, and its cursors across a change of world size.

mod batch;
mod cursor;
pub mod files;
mod parquet;
pub mod ranks;
pub mod rng;
pub mod sources;
pub mod split;
pub mod stream;
pub mod tokenizer;
mod workers;

pub use crate::config::{DataConfig, OnBadRecord, Sharding, SourceConfig, SourceKind};
