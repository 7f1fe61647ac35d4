//! The all-to-all of expert parallelism as a differentiable tensor
//! operation: rows of a `[n, d]` tensor go to the ranks that hold their
//! experts, and the backward pass sends the rows' gradients back the way
//! they came (the same exchange with the counts swapped).
//!
//! It is a backend extension for the CPU backend, the GPU (Cube) backends
//! and autodiff over them.
//! Its backward runs inside Burn's backward pass; every rank's graph has the
//! same operations, and the backward runs them deepest first, so every rank
//! reaches each exchange in the same order.

use super::{Collective, Traffic, World};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex};
use burn::prelude::*;
use std::sync::{Arc, Mutex};

/// The ranks of one expert-parallel group, shared by the MoE layers that
/// exchange rows over it.
#[derive(Clone)]
pub struct RowLink(Arc<Link>);

struct Link {
    world: World,
    comm: Mutex<Box<dyn Collective>>,
}

// SAFETY: MPI is initialised at the funneled level, so only the thread that
// initialised it may call it. The link is used by the training step, which
// runs on that thread: the layers' forward passes and Burn's backward pass
// (which runs its steps on the calling thread). The mutex orders the calls.
unsafe impl Send for Link {}
unsafe impl Sync for Link {}

impl std::fmt::Debug for RowLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RowLink({:?})", self.0.world)
    }
}

impl RowLink {
    /// A link over `comm`'s ranks.
    pub fn new(comm: Box<dyn Collective>) -> Self {
        Self(Arc::new(Link {
            world: comm.world(),
            comm: Mutex::new(comm),
        }))
    }

    /// This rank's place in the group.
    pub fn world(&self) -> World {
        self.0.world
    }

    fn comm(&self) -> std::sync::MutexGuard<'_, Box<dyn Collective>> {
        self.0.comm.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Exchange equal chunks of counts (see [`Collective::all_to_all_counts`]).
    pub fn counts(&self, send: &[u64]) -> Vec<u64> {
        self.comm().all_to_all_counts(send)
    }

    /// Sum over the group (see [`Collective::all_reduce_sum`]).
    pub fn all_reduce_sum(&self, buf: &mut [f32]) {
        self.comm().all_reduce_sum(buf)
    }

    /// Sum over the group (see [`Collective::all_reduce_sum_f64`]).
    pub fn all_reduce_sum_f64(&self, buf: &mut [f64]) {
        self.comm().all_reduce_sum_f64(buf)
    }

    /// Every rank's bytes, in rank order (see [`Collective::all_gather`]).
    pub fn all_gather(&self, local: &[u8]) -> Vec<Vec<u8>> {
        self.comm().all_gather(local)
    }

    /// Every rank's values, in rank order (an [`all_gather`](Self::all_gather)
    /// of their little-endian bytes).
    pub fn all_gather_f32(&self, local: &[f32]) -> Vec<Vec<f32>> {
        let bytes: Vec<u8> = local.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.all_gather(&bytes)
            .iter()
            .map(|p| {
                p.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            })
            .collect()
    }

    /// The rows' traffic since the last call.
    pub fn take_traffic(&self) -> Traffic {
        self.comm().take_traffic()
    }
}

/// One exchange: how many rows go to each rank of the link and come from
/// each, and the row width.
#[derive(Clone, Debug)]
pub struct RowRoute {
    /// Rows sent to each rank, in rank order.
    pub send: Vec<usize>,
    /// Rows received from each rank, in rank order.
    pub recv: Vec<usize>,
    /// Values per row.
    pub width: usize,
    /// The ranks.
    pub link: RowLink,
}

impl RowRoute {
    /// The way back.
    pub fn reversed(&self) -> Self {
        Self {
            send: self.recv.clone(),
            recv: self.send.clone(),
            width: self.width,
            link: self.link.clone(),
        }
    }
}

/// The exchange, as a backend extension.
#[backend_extension(Flex, Autodiff, Cube: cfg(feature = "gpu-kernels"))]
pub trait ExchangeOps: Backend {
    /// Rows `[Σ send, d]` in rank order → rows `[Σ recv, d]` in rank order.
    fn exchange_rows(x: FloatTensor<Self>, route: RowRoute) -> FloatTensor<Self>;
}

/// The exchange of host rows: `data` holds `[Σ route.send, d]` rows.
fn exchange_data(data: TensorData, route: &RowRoute) -> TensorData {
    let values = data
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("converted to f32");
    let counts: Vec<usize> = route.send.iter().map(|r| r * route.width).collect();
    let (out, got) = route.link.comm().all_to_all_v(&values, &counts);
    let rows: usize = route.recv.iter().sum();
    debug_assert_eq!(
        got,
        route
            .recv
            .iter()
            .map(|r| r * route.width)
            .collect::<Vec<_>>()
    );
    TensorData::new(out, [rows, route.width])
}

impl ExchangeOps for Flex {
    fn exchange_rows(x: FlexTensor, route: RowRoute) -> FlexTensor {
        FlexTensor::from_data(exchange_data(x.into_data(), &route))
    }
}

/// On a GPU the rows pass through host memory: read, exchanged by the
/// link's collective (on CUDA devices the group's NCCL communicator, which
/// copies them to the device for the transfer), written back.
#[cfg(feature = "gpu-kernels")]
impl ExchangeOps for burn::backend::Cube {
    fn exchange_rows(x: FloatTensor<Self>, route: RowRoute) -> FloatTensor<Self> {
        use burn::backend::ops::FloatTensorOps;
        use burn::backend::TensorMetadata;
        type C = burn::backend::Cube;
        let device = x.device();
        let data = burn::tensor::try_read_sync(C::float_into_data(x))
            .expect("a synchronous read of the rows")
            .expect("reading the rows to exchange from the device");
        C::float_from_data(exchange_data(data, &route), &device)
    }
}

#[derive(Debug)]
struct ExchangeBackward;

impl<B: Backend + ExchangeOps> Backward<B, 1> for ExchangeBackward {
    type State = RowRoute;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        // Every rank runs the reverse exchange, whether or not its input
        // needs the gradient: the other ranks wait for it.
        let back = B::exchange_rows(grad, ops.state.reversed());
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, back);
        }
    }
}

impl<B: Backend + ExchangeOps, C: CheckpointStrategy> ExchangeOps for Autodiff<B, C> {
    fn exchange_rows(x: FloatTensor<Self>, route: RowRoute) -> FloatTensor<Self> {
        let xi = x.primitive().clone();
        match ExchangeBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::exchange_rows(xi, route.clone());
                prep.finish(route, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::exchange_rows(xi, route)),
        }
    }
}

/// Send rows to the ranks of `route.link` (see [`ExchangeOps`]), on the CPU
/// backend in f32.
///
/// # Shapes
/// - `x`: `[Σ route.send, d]` → `[Σ route.recv, d]`
pub fn exchange_rows(x: Tensor<2>, route: RowRoute) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as ExchangeOps>::exchange_rows(
        x.into_dispatch(),
        route,
    ))
}
