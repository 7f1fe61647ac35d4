//! The device a run asks for: `--device` parsed, and refused with the
//! reason where the backend would otherwise fail inside its own thread
//! (no wgpu adapter, no CUDA driver, toolkit or device), or where it cannot
//! hold the precision the config asks for.

use crate::config::Precision;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use burn::tensor::DType;

/// The backend device named by `spec`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let (kind, index) = match spec.split_once(':') {
        Some((k, i)) => (
            k,
            Some(
                i.parse::<usize>()
                    .with_context(|| format!("bad device index in `{spec}`"))?,
            ),
        ),
        None => (spec, None),
    };
    match kind {
        "flex" | "cpu" => Ok(Device::flex()),
        #[cfg(feature = "cuda")]
        "cuda" => {
            let index = index.unwrap_or(0);
            check_cuda(spec, index)?;
            Ok(Device::cuda(index))
        }
        #[cfg(feature = "wgpu")]
        "wgpu" => {
            if index.is_some() {
                bail!("--device {spec}: wgpu runs on its default adapter and takes no index (give `wgpu`)");
            }
            check_wgpu()?;
            Ok(Device::wgpu(Default::default()))
        }
        #[cfg(not(feature = "cuda"))]
        "cuda" => bail!("--device cuda: this build has no CUDA support; rebuild with `cargo build --release --features cuda`"),
        #[cfg(not(feature = "wgpu"))]
        "wgpu" => bail!("--device wgpu: this build has no wgpu support; rebuild with `cargo build --release --features wgpu`"),
        other => {
            let _ = index;
            bail!("unknown device `{other}` (allowed: flex, wgpu, cuda, cuda:N)")
        }
    }
}

/// Refuse `--device wgpu` where wgpu finds no adapter on any graphics API,
/// where the backend would otherwise panic on its device thread at the
/// first tensor. The probe is the one the backend makes when it starts.
#[cfg(feature = "wgpu")]
fn check_wgpu() -> Result<()> {
    if cubecl::Device::wgpu(Default::default()).is_err() {
        bail!(
            "--device wgpu: wgpu found no graphics adapter (no Vulkan, Metal, DirectX 12 or \
             OpenGL driver answered); install the GPU's driver, or Mesa's Vulkan driver \
             (`mesa-vulkan-drivers` on Debian) to run the GPU code path on the CPU, or use \
             --device flex"
        );
    }
    Ok(())
}

/// The most device `spec` allocates in one buffer, where the backend
/// states a limit that a model could reach: wgpu's, the adapter's
/// storage-buffer binding size (CubeCL's largest memory page). None on the
/// CPU and on CUDA, whose single allocations go to the card's memory.
pub fn max_buffer_bytes(spec: &str) -> Option<u64> {
    #[cfg(feature = "wgpu")]
    if spec == "wgpu" {
        let device = cubecl::Device::wgpu(Default::default()).ok()?;
        return Some(device.client().properties().memory.max_page_size);
    }
    let _ = spec;
    None
}

/// Refuse `--device cuda[:N]` with the reason, where the CUDA backend
/// would otherwise panic on its device thread at the first tensor: no
/// NVIDIA driver library, no NVRTC (which compiles the kernels) or no
/// CUDA headers for it, a driver that does not start, or no device `index`.
#[cfg(feature = "cuda")]
fn check_cuda(spec: &str, index: usize) -> Result<()> {
    use cudarc::driver::result as driver;
    // SAFETY: each only tries to open the library by its usual names.
    let (has_driver, has_nvrtc) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
        )
    };
    if !has_driver {
        bail!(
            "--device {spec}: the NVIDIA driver library (libcuda.so) is not on this machine; \
             CUDA needs an NVIDIA GPU and its driver (use --device flex on the CPU)"
        );
    }
    if !has_nvrtc {
        bail!(
            "--device {spec}: NVRTC (libnvrtc.so), which compiles switchyard's CUDA kernels, was \
             not found; put its folder on LD_LIBRARY_PATH (scripts/cuda-libs.sh finds it in the \
             CUDA toolkit or a Python package such as nvidia-cuda-nvrtc)"
        );
    }
    // CubeCL hands NVRTC the toolkit's include folder (for the f16/bf16 and
    // matrix headers) and panics where it finds no toolkit.
    match cubecl_cuda::install::cuda_path() {
        Some(root) if root.join("include").is_dir() => {}
        found => bail!(
            "--device {spec}: no CUDA headers{}; NVRTC compiles switchyard's kernels against \
             them: set CUDA_PATH to a CUDA toolkit (the folder holding include/cuda_bf16.h; \
             scripts/cuda-libs.sh also looks in the Python packages)",
            found.map_or(String::new(), |r| format!(
                " in {}",
                r.join("include").display()
            ))
        ),
    }
    driver::init()
        .map_err(|e| anyhow::anyhow!("--device {spec}: the CUDA driver did not start: {e}"))?;
    let count = driver::device::get_count()
        .map_err(|e| anyhow::anyhow!("--device {spec}: could not count CUDA devices: {e}"))?;
    if index >= count.max(0) as usize {
        bail!("--device {spec}: this machine has {count} CUDA device(s), numbered from 0");
    }
    Ok(())
}

/// Refuse a compute precision the device cannot hold, before anything is
/// built: `train.precision = "bf16"` needs bf16 tensors, which the CPU
/// backend and CUDA have and wgpu (WGSL has no bf16 type) has not.
pub fn check_precision(device: &Device, spec: &str, precision: Precision) -> Result<()> {
    if precision == Precision::Bf16 && !device.supports_dtype(DType::BF16) {
        bail!(
            "train.precision = \"bf16\": device `{spec}` has no bf16 tensors; \
             use train.precision = \"f32\" there, or bf16 on `cuda` or `flex`"
        );
    }
    Ok(())
}
