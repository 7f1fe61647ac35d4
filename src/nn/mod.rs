//! Layers that both the dense model and the routed-expert layer build on,
//! so that neither imports the other for them: linear layers and their
//! dtype handling, and the SwiGLU MLP.

pub mod linear;
pub mod mlp;

pub use linear::{apply, in_dtype, linear};
pub use mlp::Mlp;
