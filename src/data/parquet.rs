//! Rows of one string column of a parquet file, read a row group at a time
//! and numbered from the start of the file, so a reader can start at any row.

use anyhow::{bail, Context, Result};
use parquet::errors::ParquetError;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::RowAccessor;
use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};

/// An open parquet file and the position in its text column.
pub(super) struct ParquetRows {
    /// The file, named in errors.
    path: PathBuf,
    reader: SerializedFileReader<File>,
    /// Index of the text column among the file's top-level fields.
    column: usize,
    /// The next row group to read.
    row_group: usize,
    /// Rows of the current group not yet handed out: (row index, text or
    /// `None` for a null or non-string value).
    rows: VecDeque<(u64, Option<String>)>,
    /// Index of the next row within the file.
    next_row: u64,
}

impl ParquetRows {
    /// Open `path` at row `start` of its column `column`. Whole row groups
    /// before `start` are skipped from the metadata; the rows of the group
    /// that holds it are read and dropped up to it.
    pub(super) fn open(path: &Path, column: &str, start: u64) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let reader = SerializedFileReader::new(file).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a readable parquet file (truncated or corrupt?): {e}",
                path.display()
            )
        })?;
        let fields = reader.metadata().file_metadata().schema().get_fields();
        let Some(col) = fields.iter().position(|f| f.name() == column) else {
            let names: Vec<_> = fields.iter().map(|f| f.name().to_string()).collect();
            bail!(
                "{}: no column `{column}` (columns: {})",
                path.display(),
                names.join(", ")
            );
        };
        let (mut row_group, mut first) = (0, 0u64);
        let md = reader.metadata();
        while row_group < md.num_row_groups()
            && first + md.row_group(row_group).num_rows() as u64 <= start
        {
            first += md.row_group(row_group).num_rows() as u64;
            row_group += 1;
        }
        let mut open = Self {
            path: path.to_path_buf(),
            reader,
            column: col,
            row_group,
            rows: VecDeque::new(),
            next_row: first,
        };
        while open.next_row < start {
            if open.next_row()?.is_none() {
                break;
            }
        }
        Ok(open)
    }

    /// The next row: `(row index, text or None for null)`, or `None` at the
    /// end of the file.
    pub(super) fn next_row(&mut self) -> Result<Option<(u64, Option<String>)>> {
        while self.rows.is_empty() {
            if self.row_group >= self.reader.metadata().num_row_groups() {
                return Ok(None);
            }
            let rg = self.row_group;
            let path = &self.path;
            let ctx = |e: ParquetError| anyhow::anyhow!("{}: row group {rg}: {e}", path.display());
            let group = self.reader.get_row_group(rg).map_err(ctx)?;
            let field =
                self.reader.metadata().file_metadata().schema().get_fields()[self.column].clone();
            let projection = parquet::schema::types::Type::group_type_builder("schema")
                .with_fields(vec![field])
                .build()
                .map_err(ctx)?;
            let first = self.next_row;
            for (i, row) in group
                .get_row_iter(Some(projection))
                .map_err(ctx)?
                .enumerate()
            {
                let row = row.map_err(ctx)?;
                self.rows
                    .push_back((first + i as u64, row.get_string(0).ok().cloned()));
            }
            self.row_group += 1;
        }
        let row = self.rows.pop_front().expect("a row group was just read");
        self.next_row = row.0 + 1;
        Ok(Some(row))
    }
}
