//! switchyard: Mixture-of-Experts language-model training on Burn.
//!
//! - [`config`]: model and MoE configuration, validated once.
//! - [`data`]: corpus sources, tokenizers and the packed token stream.
//! - [`model`]: the decoder-only transformer (attention, RoPE, MLP, blocks).
//! - [`moe`]: the routed-expert layer with every balancing mechanism.
//! - [`nn`]: layers both the model and the MoE layer use (linear, SwiGLU MLP).
//! - [`hf`]: Hugging Face checkpoints, one file per family.
//! - [`params`]: named access to a model's parameters.
//! - [`upcycle`]: a dense model's MLPs turned into routed experts, same function.

// Checks are written `!(x > 0.0)` so that a NaN fails them too.
#![allow(clippy::neg_cmp_op_on_partial_ord)]
// `tensor.slice([a..b])` is Burn's slicing of the first dimension, not a
// vector holding one range by mistake.
#![allow(clippy::single_range_in_vec_init)]

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod dist;
pub mod export;
pub mod generate;
pub mod hf;
pub mod inspect;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod moe;
pub mod nn;
pub mod params;
pub mod sweep;
pub mod tensorfile;
pub mod train;
pub mod upcycle;

/// Keep freed memory in the process heap instead of returning it to the OS.
///
/// A training step allocates and frees the same large activation and
/// gradient buffers every time. glibc serves blocks above its mmap threshold
/// (which tops out at 32 MiB) with fresh mappings and unmaps them on free, so
/// every step page-faults those buffers in again: on the bench shapes that
/// halved the speed of the matmuls writing them. Called first thing by the
/// `switchyard` binary; `SWITCHYARD_SYSTEM_MALLOC=1` skips it (to measure
/// the difference). The peak resident size is what the step needs either way.
pub fn keep_freed_memory() {
    if std::env::var_os("SWITCHYARD_SYSTEM_MALLOC").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before
    // any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Let a closed output pipe end the process quietly, as it does for other
/// command-line tools (`switchyard inspect ... | head`), instead of a panic
/// from `println!`: Rust starts programs with SIGPIPE ignored. Called first
/// thing by the `switchyard` binary.
pub fn quiet_broken_pipe() {
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal before any
    // other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
