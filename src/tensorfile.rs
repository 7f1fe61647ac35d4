//! safetensors files: written from host tensors, and read through a memory
//! map one tensor at a time.
//!
//! A loader that reads the whole file and then converts every tensor holds
//! the file's bytes, the converted host tensors and the device tensors at
//! once: three times the weights. Here the file is mapped, each tensor is
//! converted when it is asked for and its pages are handed back to the
//! kernel right after, so a loader that places each tensor before asking
//! for the next stays near the size of the weights.

use anyhow::{bail, Context, Result};
use burn::tensor::DType;
use burn::tensor::TensorData;
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// A mapped safetensors file whose header has been checked.
pub struct TensorFile {
    path: PathBuf,
    map: Mmap,
    /// Tensor names, in the file's order.
    names: Vec<String>,
}

impl TensorFile {
    /// Map `path` and check its header (a truncated or foreign file fails
    /// here, naming the file).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
        // SAFETY: the map is read-only; checkpoints are published by an
        // atomic rename and never written in place, so the file does not
        // change under the map while it is read.
        let map =
            unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        let names = SafeTensors::deserialize(&map)
            .with_context(|| format!("{}: not a valid safetensors file", path.display()))?
            .names()
            .into_iter()
            .map(String::from)
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            map,
            names,
        })
    }

    /// The tensor names.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Tensor `name`, floats as f32 and integers as i64. Its pages of the
    /// file are released once it is converted.
    pub fn read(&self, name: &str) -> Result<TensorData> {
        self.read_from(&self.header()?, name)
    }

    /// [`Self::read`] for many tensors, the header parsed once.
    pub fn reader(&self) -> Result<impl Fn(&str) -> Result<TensorData> + '_> {
        let st = self.header()?;
        Ok(move |name: &str| self.read_from(&st, name))
    }

    /// Every tensor, by name.
    pub fn read_all(&self) -> Result<HashMap<String, TensorData>> {
        let read = self.reader()?;
        self.names
            .iter()
            .map(|n| Ok((n.clone(), read(n)?)))
            .collect()
    }

    /// The parsed file (header checked at `open`).
    fn header(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.map)
            .with_context(|| format!("{}: not a valid safetensors file", self.path.display()))
    }

    /// Tensor `name` of the parsed file `st`, its pages released after.
    fn read_from(&self, st: &SafeTensors<'_>, name: &str) -> Result<TensorData> {
        let view = st
            .tensor(name)
            .with_context(|| format!("{}: no tensor `{name}`", self.path.display()))?;
        let data = convert(&view, name, &self.path)?;
        let raw = view.data();
        let offset = raw.as_ptr() as usize - self.map.as_ptr() as usize;
        // SAFETY: the mapping is private and read-only, so dropping its pages
        // loses nothing: a later read faults them back in from the file.
        // Failure only means the pages stay resident.
        let _ = unsafe {
            self.map
                .unchecked_advise_range(UncheckedAdvice::DontNeed, offset, raw.len())
        };
        Ok(data)
    }
}

/// One tensor's bytes as host data.
fn convert(view: &TensorView<'_>, name: &str, path: &Path) -> Result<TensorData> {
    let shape = view.shape().to_vec();
    let raw = view.data();
    let words = |n: usize| raw.chunks_exact(n);
    Ok(match view.dtype() {
        Dtype::F32 => TensorData::new(
            words(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<f32>>(),
            shape,
        ),
        Dtype::BF16 => TensorData::new(
            words(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect::<Vec<f32>>(),
            shape,
        ),
        Dtype::F16 => TensorData::new(
            words(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect::<Vec<f32>>(),
            shape,
        ),
        Dtype::I64 => TensorData::new(
            words(8)
                .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect::<Vec<i64>>(),
            shape,
        ),
        other => bail!(
            "{}: tensor `{name}` has unsupported dtype {other:?}",
            path.display()
        ),
    })
}

/// Serialise tensors (f32, bf16 or i64) to safetensors bytes, with optional
/// header metadata.
pub fn to_bytes(
    tensors: &BTreeMap<String, TensorData>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, data) in tensors {
        let dtype = match data.dtype() {
            DType::F32 => Dtype::F32,
            DType::BF16 => Dtype::BF16,
            DType::I64 => Dtype::I64,
            other => bail!("tensor `{name}`: cannot write dtype {other:?} to safetensors"),
        };
        let view = TensorView::new(dtype, data.shape().to_vec(), data.as_bytes())
            .with_context(|| format!("tensor `{name}`"))?;
        views.push((name.clone(), view));
    }
    Ok(safetensors::serialize(views, metadata)?)
}

/// Read one safetensors file whole, floats as f32 and integers as i64.
pub fn read(path: &Path) -> Result<HashMap<String, TensorData>> {
    TensorFile::open(path)?.read_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_round_trip_and_damage_is_named() {
        let dir = std::env::temp_dir().join(format!("sy-tensorfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "a".to_string(),
            TensorData::new(vec![1.5f32, -2.0, 3.25], [3]),
        );
        tensors.insert("b".to_string(), TensorData::new(vec![7i64, -9], [2, 1]));
        std::fs::write(&path, to_bytes(&tensors, None).unwrap()).unwrap();
        let f = TensorFile::open(&path).unwrap();
        assert_eq!(f.names().len(), 2);
        assert_eq!(f.read("a").unwrap(), tensors["a"]);
        // A second read after the pages were released gives the same values.
        assert_eq!(f.read("a").unwrap(), tensors["a"]);
        assert_eq!(f.read("b").unwrap(), tensors["b"]);
        let err = f.read("c").unwrap_err().to_string();
        assert!(err.contains("`c`"), "{err}");

        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let err = TensorFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("t.safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
