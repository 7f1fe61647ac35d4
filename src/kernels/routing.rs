//! Which backend serves which fused operation: the CPU backend all of them
//! in f32, the GPU (Cube) backends those with a CubeCL kernel, unless
//! `train.gpu_kernels` turned them off; everything else takes the
//! composed path.

use burn::prelude::*;
use burn::tensor::DType;

/// Whether the fused kernels serve a float tensor on `device` of `dtype`:
/// the CPU backend (with or without autodiff) in f32.
pub fn fused_on(device: &Device, dtype: DType) -> bool {
    on_cpu(device) && dtype == DType::F32
}

/// Whether `device` is the CPU backend (with or without autodiff).
pub fn on_cpu(device: &Device) -> bool {
    device.clone().without_autodiff() == Device::flex()
}

/// Whether `device` is a GPU (Cube) backend whose kernels this build has
/// (the `wgpu` or `cuda` feature), with or without autodiff.
pub fn on_cube(device: &Device) -> bool {
    #[cfg(feature = "gpu-kernels")]
    {
        let inner = device.clone().without_autodiff();
        matches!(inner.as_dispatch(), burn::backend::DispatchDevice::Cube(_))
    }
    #[cfg(not(feature = "gpu-kernels"))]
    {
        let _ = device;
        false
    }
}

/// A fused operation that may have a GPU kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// [`super::causal_attention`].
    CausalAttention,
    /// [`super::linear_cross_entropy`] and [`super::linear_cross_entropy_rows`].
    LinearCrossEntropy,
    /// [`super::rms_norm`].
    RmsNorm,
    /// [`super::rope`].
    Rope,
    /// [`super::adamw_update`].
    AdamW,
    /// [`super::sum_squares`] (the gradient norm's sum).
    SumSquares,
    /// [`super::grouped_swiglu`] (the routed experts over grouped rows).
    GroupedSwiglu,
    /// [`super::combine_rows`] (the weighted sum of each token's expert
    /// outputs).
    Combine,
}

/// The widest attention head the GPU attention kernel takes: each unit
/// keeps a few rows of this width in registers.
pub const GPU_MAX_HEAD_DIM: usize = 256;

/// Whether the GPU backends run the CubeCL kernels (`train.gpu_kernels`):
/// process-wide, set once at the start of a run or benchmark.
static GPU_KERNELS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turn the GPU kernels on (the default) or off (Burn's composed path on
/// every backend but the CPU's), for the whole process.
pub fn use_gpu_kernels(on: bool) {
    GPU_KERNELS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the GPU's grouped experts run the SwiGLU in their matmuls'
/// epilogue (`train.gpu_fused_swiglu`): process-wide, set once at the start
/// of a run or benchmark. Default off.
static FUSED_SWIGLU: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Run the GPU's grouped experts with the SwiGLU fused into switchyard's
/// tiled matmul (true) or with CubeCL's matmuls and a separate SwiGLU pass
/// (false, the default), for the whole process. No effect on the CPU.
pub fn use_fused_swiglu(on: bool) {
    FUSED_SWIGLU.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// What [`use_fused_swiglu`] last set.
pub fn fused_swiglu() -> bool {
    FUSED_SWIGLU.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether the fused `op` serves a float tensor on `device` of `dtype`:
/// every operation on the CPU backend in f32 ([`fused_on`]), and on the
/// GPU (Cube) backends those with a CubeCL kernel, unless
/// [`use_gpu_kernels`] turned them off: in f32, and attention, RoPE, the
/// grouped experts, the combine and the LM head in f16 and bf16 too
/// (their arithmetic is f32 whatever the dtype).
pub fn served_on(op: Op, device: &Device, dtype: DType) -> bool {
    if fused_on(device, dtype) {
        return true;
    }
    let kernels = on_cube(device) && GPU_KERNELS.load(std::sync::atomic::Ordering::Relaxed);
    let gpu = kernels && dtype == DType::F32;
    let half = kernels && matches!(dtype, DType::F16 | DType::BF16);
    match op {
        Op::CausalAttention
        | Op::Rope
        | Op::GroupedSwiglu
        | Op::Combine
        | Op::LinearCrossEntropy => gpu || half,
        Op::RmsNorm | Op::AdamW | Op::SumSquares => gpu,
    }
}
