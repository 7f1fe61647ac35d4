//! Document readers for text, JSONL and parquet files, and resolution of
//! paths, globs and Hugging Face hub-cache datasets into file lists.
//!
//! Every document carries the position where it starts and the position just
//! after it, so a stream can restart exactly at a document, and every bad
//! record is reported with its file and line, row group or byte offset.

use super::files::Format;
use super::parquet::ParquetRows;
use super::OnBadRecord;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use std::sync::Arc;

/// A position in a source's file list.
///
/// For text and JSONL files `offset` is the byte offset of the document's
/// first line and `line` its 1-based line number; for parquet files `offset`
/// is the row index within the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DocPos {
    /// Completed passes over the file list.
    pub epoch: u64,
    /// Index into the file list.
    pub file: usize,
    /// Byte offset (text, JSONL) or row index (parquet).
    pub offset: u64,
    /// 1-based line number (text, JSONL); 0 for parquet.
    pub line: u64,
}

/// One document and where it lies.
#[derive(Debug, Clone)]
pub struct Document {
    /// The text.
    pub text: String,
    /// Where it starts.
    pub pos: DocPos,
    /// Where the next document starts.
    pub next: DocPos,
}

/// The open file being read.
enum Open {
    Lines {
        reader: BufReader<File>,
        /// Byte offset and line number of the next unread line.
        offset: u64,
        line: u64,
        /// A line read and given back: (bytes, offset, line).
        pending: Option<(Vec<u8>, u64, u64)>,
    },
    Parquet(ParquetRows),
}

/// Reads documents from a list of files in order, starting at a position,
/// optionally cycling through the list forever.
pub struct DocReader {
    files: Arc<Vec<(PathBuf, Format)>>,
    pos: DocPos,
    repeat: bool,
    on_bad: OnBadRecord,
    open: Option<Open>,
    skipped: u64,
    done: bool,
    /// Documents produced since the start of the current pass, and whether
    /// that pass began at the first file (so a lap with none means "empty").
    docs_in_pass: u64,
    full_pass: bool,
}

impl DocReader {
    /// A reader that starts at `start`.
    pub fn new(
        files: Arc<Vec<(PathBuf, Format)>>,
        start: DocPos,
        repeat: bool,
        on_bad: OnBadRecord,
    ) -> Self {
        Self {
            files,
            pos: start,
            repeat,
            on_bad,
            open: None,
            skipped: 0,
            done: false,
            docs_in_pass: 0,
            full_pass: start.file == 0 && start.offset == 0,
        }
    }

    /// Records skipped so far under `on_bad_record = "skip"`.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// The position of the next document to be read.
    pub fn position(&self) -> DocPos {
        self.pos
    }

    fn path(&self) -> &Path {
        &self.files[self.pos.file].0
    }

    /// A bad record: an error, or a count under the skip policy.
    fn bad(&mut self, msg: String) -> Result<()> {
        match self.on_bad {
            OnBadRecord::Error => bail!("{msg}"),
            OnBadRecord::Skip => {
                self.skipped += 1;
                Ok(())
            }
        }
    }

    fn open_file(&mut self) -> Result<Open> {
        let (path, fmt) = &self.files[self.pos.file];
        match fmt {
            Format::Parquet { column } => Ok(Open::Parquet(ParquetRows::open(
                path,
                column,
                self.pos.offset,
            )?)),
            _ => {
                let mut file =
                    File::open(path).with_context(|| format!("opening {}", path.display()))?;
                file.seek(SeekFrom::Start(self.pos.offset))?;
                Ok(Open::Lines {
                    reader: BufReader::with_capacity(1 << 16, file),
                    offset: self.pos.offset,
                    line: self.pos.line.max(1),
                    pending: None,
                })
            }
        }
    }

    /// Read the next document, or `None` at the end (never, when repeating).
    pub fn next_doc(&mut self) -> Result<Option<Document>> {
        loop {
            if self.done || self.files.is_empty() {
                return Ok(None);
            }
            if self.open.is_none() {
                self.open = Some(self.open_file()?);
            }
            let mut open = self.open.take().unwrap();
            let doc = match self.files[self.pos.file].1.clone() {
                Format::Parquet { column } => self.parquet_doc(&mut open, &column)?,
                Format::Jsonl { field } => self.jsonl_doc(&mut open, &field)?,
                Format::Text {
                    blank_lines,
                    doc_start_prefix,
                } => self.text_doc(&mut open, blank_lines, doc_start_prefix.as_deref())?,
            };
            match doc {
                Some(d) => {
                    self.open = Some(open);
                    self.pos = d.next;
                    self.docs_in_pass += 1;
                    return Ok(Some(d));
                }
                None => {
                    // End of this file: move to the next, wrapping around when repeating.
                    self.pos = DocPos {
                        epoch: self.pos.epoch,
                        file: self.pos.file + 1,
                        offset: 0,
                        line: 1,
                    };
                    if self.pos.file == self.files.len() {
                        if !self.repeat {
                            self.done = true;
                            return Ok(None);
                        }
                        if self.full_pass && self.docs_in_pass == 0 {
                            bail!(
                                "the corpus is empty: {} file(s) starting with {} hold no readable documents",
                                self.files.len(),
                                self.files[0].0.display()
                            );
                        }
                        self.full_pass = true;
                        self.docs_in_pass = 0;
                        self.pos.file = 0;
                        self.pos.epoch += 1;
                    }
                }
            }
        }
    }

    fn parquet_doc(&mut self, open: &mut Open, column: &str) -> Result<Option<Document>> {
        let Open::Parquet(rows) = open else {
            unreachable!("a parquet file is opened as parquet")
        };
        while let Some((row, text)) = rows.next_row()? {
            let pos = DocPos {
                offset: row,
                line: 0,
                ..self.pos
            };
            let next = DocPos {
                offset: row + 1,
                ..pos
            };
            match text {
                Some(text) => return Ok(Some(Document { text, pos, next })),
                None => {
                    let msg = format!(
                        "{}: row {row}: column `{column}` is null or not a string",
                        self.path().display()
                    );
                    self.bad(msg)?;
                    self.pos = next;
                }
            }
        }
        Ok(None)
    }

    /// Read one line as bytes; returns its (offset, line number), or None at EOF.
    fn read_line(open: &mut Open, buf: &mut Vec<u8>) -> Result<Option<(u64, u64)>> {
        let Open::Lines {
            reader,
            offset,
            line,
            pending,
        } = open
        else {
            unreachable!()
        };
        if let Some((bytes, off, ln)) = pending.take() {
            *buf = bytes;
            return Ok(Some((off, ln)));
        }
        buf.clear();
        let n = reader.read_until(b'\n', buf)?;
        if n == 0 {
            return Ok(None);
        }
        let start = (*offset, *line);
        *offset += n as u64;
        *line += 1;
        Ok(Some(start))
    }

    /// Position of the next unread line.
    fn line_pos(&self, open: &Open) -> DocPos {
        let Open::Lines { offset, line, .. } = open else {
            unreachable!()
        };
        DocPos {
            offset: *offset,
            line: *line,
            ..self.pos
        }
    }

    fn jsonl_doc(&mut self, open: &mut Open, field: &str) -> Result<Option<Document>> {
        let mut buf = Vec::new();
        while let Some((offset, line)) = Self::read_line(open, &mut buf)? {
            let pos = DocPos {
                offset,
                line,
                ..self.pos
            };
            let next = self.line_pos(open);
            let where_ = format!("{}:{line}", self.path().display());
            if buf.iter().all(|b| b.is_ascii_whitespace()) {
                self.pos = next;
                continue;
            }
            let problem = match std::str::from_utf8(&buf) {
                Err(e) => Some(format!(
                    "{where_}: invalid UTF-8 at byte offset {}",
                    offset + e.valid_up_to() as u64
                )),
                Ok(s) => match serde_json::from_str::<serde_json::Value>(s) {
                    Err(e) => Some(format!("{where_}: malformed JSON: {e}")),
                    Ok(v) => match v.get(field) {
                        None => Some(format!("{where_}: missing text field `{field}`")),
                        Some(serde_json::Value::String(text)) => {
                            return Ok(Some(Document {
                                text: text.clone(),
                                pos,
                                next,
                            }));
                        }
                        Some(_) => Some(format!("{where_}: field `{field}` is not a string")),
                    },
                },
            };
            if let Some(msg) = problem {
                self.bad(msg)?;
                self.pos = next;
            }
        }
        Ok(None)
    }

    fn text_doc(
        &mut self,
        open: &mut Open,
        blank_lines: usize,
        prefix: Option<&str>,
    ) -> Result<Option<Document>> {
        let mut buf = Vec::new();
        let mut text = String::new();
        let mut start: Option<DocPos> = None;
        let mut blanks = 0usize;
        let mut bad: Option<String> = None;
        loop {
            let line = Self::read_line(open, &mut buf)?;
            // Where the document ends, if it ends here; and whether at EOF.
            let (end, eof) = match line {
                None => (Some(self.line_pos(open)), true),
                Some((off, ln)) => {
                    let here = DocPos {
                        offset: off,
                        line: ln,
                        ..self.pos
                    };
                    let is_blank = buf.iter().all(|b| b.is_ascii_whitespace());
                    let is_prefix = prefix.is_some_and(|p| buf.starts_with(p.as_bytes()));
                    if start.is_some() && is_prefix {
                        // This line starts the next document: give it back.
                        let Open::Lines { pending, .. } = open else {
                            unreachable!()
                        };
                        *pending = Some((std::mem::take(&mut buf), off, ln));
                        (Some(here), false)
                    } else if start.is_none() && is_blank {
                        continue;
                    } else {
                        start.get_or_insert(here);
                        blanks = if is_blank { blanks + 1 } else { 0 };
                        match std::str::from_utf8(&buf) {
                            Ok(s) => text.push_str(s),
                            Err(e) => {
                                bad.get_or_insert(format!(
                                    "{}:{ln}: invalid UTF-8 at byte offset {}",
                                    self.path().display(),
                                    off + e.valid_up_to() as u64
                                ));
                            }
                        }
                        if blank_lines > 0 && blanks >= blank_lines {
                            (Some(self.line_pos(open)), false)
                        } else {
                            (None, false)
                        }
                    }
                }
            };
            let Some(next) = end else { continue };
            let Some(pos) = start.take() else {
                return Ok(None); // EOF with no document left
            };
            if let Some(msg) = bad.take() {
                self.bad(msg)?;
                self.pos = next;
                text.clear();
                blanks = 0;
                if eof {
                    return Ok(None);
                }
                continue;
            }
            // Trailing blank lines are separators, not content.
            let keep = text.trim_end_matches(['\n', '\r', ' ', '\t']).len();
            text.truncate(keep);
            return Ok(Some(Document { text, pos, next }));
        }
    }
}
