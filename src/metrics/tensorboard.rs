//! A TensorBoard event-file writer (and reader, for tests and summaries).
//!
//! The format is TFRecord: each record is `u64 length`, `u32 masked
//! crc32c(length)`, the bytes, `u32 masked crc32c(bytes)`; each record holds
//! a `tensorflow.Event` protobuf. The message definitions below mirror
//! `tensorflow/core/util/event.proto`, `framework/summary.proto` and
//! `tensorboard/plugins/hparams/plugin_data.proto`, field numbers included.

pub use super::tb_proto::*;
use anyhow::{bail, Context, Result};
use prost::Message;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// An appending event-file writer.
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl EventWriter {
    /// A new `events.out.tfevents.<time>.<host>` file in `dir`.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let mut secs = now_secs() as u64;
        let mut path = dir.join(format!("events.out.tfevents.{secs}.{host}"));
        while path.exists() {
            secs += 1;
            path = dir.join(format!("events.out.tfevents.{secs}.{host}"));
        }
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = Self {
            out: BufWriter::new(file),
            path,
        };
        w.write(&Event {
            wall_time: now_secs(),
            step: 0,
            what: Some(EventWhat::FileVersion("brain.Event:2".into())),
        })?;
        Ok(w)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: &Event) -> Result<()> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc(&len).to_le_bytes())?;
        self.out.write_all(&data)?;
        self.out.write_all(&masked_crc(&data).to_le_bytes())?;
        Ok(())
    }

    /// Write one step's values.
    pub fn write_summary(&mut self, step: i64, value: Vec<SummaryValue>) -> Result<()> {
        self.write(&Event {
            wall_time: now_secs(),
            step,
            what: Some(EventWhat::Summary(Summary { value })),
        })
    }

    /// Write the run's hyperparameters for TensorBoard's HParams tab.
    pub fn write_hparams(
        &mut self,
        hparams: BTreeMap<String, ProtoValue>,
        group: &str,
    ) -> Result<()> {
        let data = HParamsPluginData {
            version: 0,
            data: Some(HParamsData::SessionStartInfo(SessionStartInfo {
                hparams,
                group_name: group.into(),
                start_time_secs: now_secs(),
            })),
        };
        self.write_hparams_value("_hparams_/session_start_info", data)
    }

    /// Mark the run finished (`ok`) or failed in the HParams tab.
    pub fn write_hparams_end(&mut self, ok: bool) -> Result<()> {
        let data = HParamsPluginData {
            version: 0,
            data: Some(HParamsData::SessionEndInfo(SessionEndInfo {
                status: if ok { 1 } else { 2 },
                end_time_secs: now_secs(),
            })),
        };
        self.write_hparams_value("_hparams_/session_end_info", data)
    }

    fn write_hparams_value(&mut self, tag: &str, data: HParamsPluginData) -> Result<()> {
        let value = SummaryValue {
            tag: tag.into(),
            metadata: Some(SummaryMetadata {
                plugin_data: Some(PluginData {
                    plugin_name: "hparams".into(),
                    content: data.encode_to_vec(),
                }),
            }),
            value: None,
        };
        self.write_summary(0, vec![value])?;
        self.flush()
    }

    /// Push buffered records to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush()?;
        Ok(())
    }
}

/// A scalar value.
pub fn scalar(tag: impl Into<String>, v: f64) -> SummaryValue {
    SummaryValue {
        tag: tag.into(),
        metadata: None,
        value: Some(ValueKind::SimpleValue(v as f32)),
    }
}

/// A text entry (TensorBoard's Text tab): a scalar string tensor owned by
/// the text plugin.
pub fn text(tag: impl Into<String>, s: &str) -> SummaryValue {
    SummaryValue {
        tag: tag.into(),
        metadata: Some(SummaryMetadata {
            plugin_data: Some(PluginData {
                plugin_name: "text".into(),
                content: Vec::new(),
            }),
        }),
        value: Some(ValueKind::Tensor(TensorProto {
            dtype: 7,
            tensor_shape: Some(TensorShapeProto::default()),
            string_val: vec![s.as_bytes().to_vec()],
        })),
    }
}

/// An image (TensorBoard's Images tab) from a PNG file's bytes; `None`
/// when they are not a PNG.
pub fn png_image(tag: impl Into<String>, png: Vec<u8>) -> Option<SummaryValue> {
    if png.len() < 24 || &png[1..4] != b"PNG" {
        return None;
    }
    let be = |b: &[u8]| i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let (width, height) = (be(&png[16..20]), be(&png[20..24]));
    Some(SummaryValue {
        tag: tag.into(),
        metadata: None,
        value: Some(ValueKind::Image(ImageProto {
            height,
            width,
            colorspace: 3,
            encoded_image_string: png,
        })),
    })
}

/// A histogram with one bucket per index: bucket i holds `counts[i]`
/// observations of the value i (e.g. tokens routed to expert i).
pub fn index_histogram(tag: impl Into<String>, counts: &[f64]) -> SummaryValue {
    let num: f64 = counts.iter().sum();
    let sum: f64 = counts.iter().enumerate().map(|(i, c)| i as f64 * c).sum();
    let sum_squares: f64 = counts
        .iter()
        .enumerate()
        .map(|(i, c)| (i * i) as f64 * c)
        .sum();
    let used: Vec<usize> = (0..counts.len()).filter(|&i| counts[i] > 0.0).collect();
    SummaryValue {
        tag: tag.into(),
        metadata: None,
        value: Some(ValueKind::Histo(HistogramProto {
            min: used.first().copied().unwrap_or(0) as f64,
            max: used.last().copied().unwrap_or(0) as f64,
            num,
            sum,
            sum_squares,
            bucket_limit: (0..counts.len()).map(|i| i as f64 + 0.5).collect(),
            bucket: counts.to_vec(),
        })),
    }
}

/// Read every event of a file, checking both checksums of every record.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let mut bytes = Vec::new();
    File::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .read_to_end(&mut bytes)?;
    let mut events = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        if bytes.len() - at < 12 {
            bail!("{}: truncated record header at byte {at}", path.display());
        }
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        if crc != masked_crc(len_bytes) {
            bail!("{}: bad length checksum at byte {at}", path.display());
        }
        let start = at + 12;
        if bytes.len() < start + len + 4 {
            bail!("{}: truncated record at byte {at}", path.display());
        }
        let data = &bytes[start..start + len];
        let crc = u32::from_le_bytes(bytes[start + len..start + len + 4].try_into().unwrap());
        if crc != masked_crc(data) {
            bail!("{}: bad data checksum at byte {at}", path.display());
        }
        events.push(
            Event::decode(data)
                .with_context(|| format!("{}: bad event at byte {at}", path.display()))?,
        );
        at = start + len + 4;
    }
    Ok(events)
}

/// The event files in a run directory, oldest first.
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("events.out.tfevents."))
        })
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_published_check_value() {
        // CRC-32C of "123456789" is 0xE3069283 (RFC 3720 test vector).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn written_events_read_back() {
        let dir = std::env::temp_dir().join(format!("sy-tb-{}", std::process::id()));
        let mut w = EventWriter::create(&dir).unwrap();
        w.write_summary(
            3,
            vec![
                scalar("loss/total", 2.5),
                index_histogram("h", &[1.0, 0.0, 3.0]),
            ],
        )
        .unwrap();
        let mut hp = BTreeMap::new();
        hp.insert(
            "moe.top_k".to_string(),
            ProtoValue {
                kind: Some(ProtoKind::Number(2.0)),
            },
        );
        w.write_hparams(hp.clone(), "g").unwrap();
        w.flush().unwrap();
        let events = read_events(w.path()).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(
            events[0].what,
            Some(EventWhat::FileVersion("brain.Event:2".into()))
        );
        let Some(EventWhat::Summary(s)) = &events[1].what else {
            panic!()
        };
        assert_eq!(events[1].step, 3);
        assert_eq!(s.value[0].value, Some(ValueKind::SimpleValue(2.5)));
        let Some(ValueKind::Histo(h)) = &s.value[1].value else {
            panic!()
        };
        assert_eq!(h.bucket, vec![1.0, 0.0, 3.0]);
        assert_eq!(
            (h.num, h.sum, h.sum_squares, h.min, h.max),
            (4.0, 6.0, 12.0, 0.0, 2.0)
        );
        let Some(EventWhat::Summary(s)) = &events[2].what else {
            panic!()
        };
        let plugin = s.value[0]
            .metadata
            .as_ref()
            .unwrap()
            .plugin_data
            .as_ref()
            .unwrap();
        assert_eq!(plugin.plugin_name, "hparams");
        let data = HParamsPluginData::decode(plugin.content.as_slice()).unwrap();
        let Some(HParamsData::SessionStartInfo(info)) = data.data else {
            panic!()
        };
        assert_eq!(info.hparams, hp);

        // A flipped byte is caught by the checksum.
        let mut bytes = std::fs::read(w.path()).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        std::fs::write(w.path(), bytes).unwrap();
        assert!(read_events(w.path()).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
