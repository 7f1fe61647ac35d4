//! Layers that both the dense model and the routed-expert layer build on,
//! so that neither imports the other for them: linear layers and their
//! dtype handling, RMSNorm, and the SwiGLU MLP.

pub mod linear;
pub mod mlp;
pub mod norm;

pub use linear::{apply, in_dtype, linear};
pub use mlp::Mlp;
pub use norm::{norm, rms_norm};
