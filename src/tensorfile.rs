//! safetensors files read through a memory map, one tensor at a time.
//!
//! A loader that reads the whole file and then converts every tensor holds
//! the file's bytes, the converted host tensors and the device tensors at
//! once: three times the weights. Here the file is mapped, each tensor is
//! converted when it is asked for and its pages are handed back to the
//! kernel right after, so a loader that places each tensor before asking
//! for the next stays near the size of the weights.

use anyhow::{bail, Context, Result};
use burn::tensor::TensorData;
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
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
        let st = SafeTensors::deserialize(&self.map)
            .with_context(|| format!("{}: not a valid safetensors file", self.path.display()))?;
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

    /// Every tensor, by name.
    pub fn read_all(&self) -> Result<HashMap<String, TensorData>> {
        self.names
            .iter()
            .map(|n| Ok((n.clone(), self.read(n)?)))
            .collect()
    }
}

/// One tensor's bytes as host data.
fn convert(
    view: &safetensors::tensor::TensorView<'_>,
    name: &str,
    path: &Path,
) -> Result<TensorData> {
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

/// Read one safetensors file whole, floats as f32 and integers as i64.
pub fn read(path: &Path) -> Result<HashMap<String, TensorData>> {
    TensorFile::open(path)?.read_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

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
        std::fs::write(
            &path,
            crate::checkpoint::safetensors_bytes(&tensors, None).unwrap(),
        )
        .unwrap();
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
    }
}
