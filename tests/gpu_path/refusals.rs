//! What `--device wgpu` refuses before a run starts, cleanly: no adapter,
//! an adapter index, and a tensor over the device's largest buffer.

use super::common;

/// A machine where wgpu finds no adapter (here: every Vulkan and EGL
/// driver hidden from the loaders) gets a clean error naming what to
/// install, before anything starts, not a panic on the backend's device
/// thread; and a device index, which wgpu does not take, is refused.
#[test]
fn wgpu_without_an_adapter_or_with_an_index_is_refused_cleanly() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = common::Scratch::new("gpu-noadapter", "runs");
    let train = |device: &str, hide_drivers: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
        cmd.args(["train", "--device", device, "--config"])
            .arg(root.join("configs/tiny.toml"))
            .arg("--runs-dir")
            .arg(dir.as_os_str())
            .env_remove("RUST_BACKTRACE");
        if hide_drivers {
            for var in [
                "VK_ICD_FILENAMES",
                "VK_DRIVER_FILES",
                "__EGL_VENDOR_LIBRARY_FILENAMES",
                "__EGL_VENDOR_LIBRARY_DIRS",
            ] {
                cmd.env(var, "/nonexistent");
            }
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{device}: {err}");
        assert!(!err.contains("panicked"), "{device}: {err}");
        err
    };
    let err = train("wgpu", true);
    assert!(
        err.contains("found no graphics adapter") && err.contains("mesa-vulkan-drivers"),
        "{err}"
    );
    let err = train("wgpu:1", false);
    assert!(err.contains("takes no index"), "{err}");
    assert!(
        std::fs::read_dir(&*dir).unwrap().next().is_none(),
        "a run was started"
    );
}

/// A model with a tensor larger than the device allocates in one buffer is
/// refused before anything is built, naming the tensor and the keys that
/// size it, where the backend would panic on its device thread. A 2^24 ×
/// 2^16 embedding (4 TiB) is over any adapter's limit; llvmpipe's is 128 MiB.
#[test]
fn a_tensor_over_the_devices_largest_buffer_is_refused_at_start() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = common::Scratch::new("gpu-bigtensor", "runs");
    for command in ["train", "bench"] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
        cmd.args([command, "--device", "wgpu", "--config"])
            .arg(root.join("configs/tiny.toml"))
            .args(["--set", "model.vocab_size=16777216"])
            .args(["--set", "model.d_model=65536"])
            .env_remove("RUST_BACKTRACE");
        if command == "train" {
            cmd.arg("--runs-dir").arg(dir.as_os_str());
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command}: {err}");
        assert!(!err.contains("panicked"), "{command}: {err}");
        assert!(
            err.contains("allocates at most")
                && err.contains("the token embedding ([16777216, 65536], f32)")
                && err.contains("model.vocab_size × model.d_model"),
            "{command}: {err}"
        );
    }
    assert!(
        std::fs::read_dir(&*dir).map_or(true, |mut d| d.next().is_none()),
        "a run was started"
    );
}
