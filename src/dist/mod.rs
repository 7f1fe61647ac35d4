//! Several processes, one run: the world a process belongs to and the
//! collectives the trainer needs, behind one trait.
//!
//! World size 1 is the ordinary path through the same code ([`Single`]: every
//! collective is the identity). Under `mpirun` with the `mpi` feature,
//! [`mpi::Mpi`] moves host buffers between ranks with Open MPI (or any MPI).
//! The trainer uses the trait only: data parallelism ([`dp`]) averages
//! gradients in buckets and sums the logged statistics; rank 0 writes.

pub mod dp;
pub mod exchange;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(all(feature = "mpi", feature = "cuda"))]
pub mod nccl;
pub mod plan;
mod plan_files;

use anyhow::Result;

/// One MoE layer's placement: each expert's devices and its share of the
/// expert's tokens on each (what `plan-experts` proposes and
/// `train.expert_placement` reads).
pub type Layout = Vec<Vec<(usize, f64)>>;

/// Where this process stands among the processes of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    /// 0-based rank; rank 0 writes logs and checkpoints.
    pub rank: usize,
    /// Number of processes.
    pub size: usize,
    /// Rank among the processes of this node (which GPU to use).
    pub local_rank: usize,
}

impl World {
    /// One process on its own.
    pub const SINGLE: World = World {
        rank: 0,
        size: 1,
        local_rank: 0,
    };

    /// Whether this process writes the run's files.
    pub fn is_writer(&self) -> bool {
        self.rank == 0
    }
}

/// Bytes this rank handed to each kind of collective, and the seconds it
/// spent in them, since the last [`Collective::take_traffic`].
///
/// Bytes are the payload: for an all-reduce, the buffer's size (a ring
/// all-reduce sends about 2·(W−1)/W times that); for an all-to-all, what
/// went to other ranks plus what came from them.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Traffic {
    /// All-reduce payload bytes.
    pub allreduce_bytes: u64,
    /// Seconds spent in all-reduces.
    pub allreduce_secs: f64,
    /// All-to-all bytes sent to and received from other ranks.
    pub alltoall_bytes: u64,
    /// Seconds spent in all-to-alls.
    pub alltoall_secs: f64,
}

impl std::ops::AddAssign for Traffic {
    fn add_assign(&mut self, t: Traffic) {
        self.allreduce_bytes += t.allreduce_bytes;
        self.allreduce_secs += t.allreduce_secs;
        self.alltoall_bytes += t.alltoall_bytes;
        self.alltoall_secs += t.alltoall_secs;
    }
}

/// The collectives the trainer uses. Every rank calls each one in the same
/// order with buffers of the same length (except where a length is
/// per-rank by design: [`all_gather`](Collective::all_gather),
/// [`all_to_all_v`](Collective::all_to_all_v)).
pub trait Collective {
    /// This process's place in the world.
    fn world(&self) -> World;
    /// Sum `buf` element-wise over every rank; every rank gets the sum.
    fn all_reduce_sum(&mut self, buf: &mut [f32]);
    /// [`all_reduce_sum`](Collective::all_reduce_sum) in double precision
    /// (counts and losses, where f32 sums would round).
    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]);
    /// Replace `buf` on every rank with `root`'s bytes.
    fn broadcast(&mut self, buf: &mut Vec<u8>, root: usize);
    /// Every rank's `local` bytes, in rank order, on every rank.
    fn all_gather(&mut self, local: &[u8]) -> Vec<Vec<u8>>;
    /// Send `send[..]` cut by `send_counts` (one count per rank, in rank
    /// order) so that rank j gets the j-th part; returns what every rank
    /// sent here, concatenated in rank order, and how much came from each.
    fn all_to_all_v(&mut self, send: &[f32], send_counts: &[usize]) -> (Vec<f32>, Vec<usize>);
    /// Send the j-th of `size` equal chunks of `send` to rank j; returns
    /// the chunks every rank sent here, in rank order. For counts and other
    /// metadata: not counted in [`Traffic`].
    fn all_to_all_counts(&mut self, send: &[u64]) -> Vec<u64>;
    /// The processes that pass the same `color`, as a world of their own
    /// (ranks in the order of this world's). Every rank calls it.
    fn split(&mut self, color: usize) -> Box<dyn Collective>;
    /// The traffic since the last call, and start counting afresh.
    fn take_traffic(&mut self) -> Traffic;
    /// Stop every process of the run (after an error on this one), with
    /// this exit code.
    fn abort(&self, code: i32) -> !;
}

/// One process: every collective is the identity.
#[derive(Debug, Default)]
pub struct Single;

impl Collective for Single {
    fn world(&self) -> World {
        World::SINGLE
    }
    fn all_reduce_sum(&mut self, _: &mut [f32]) {}
    fn all_reduce_sum_f64(&mut self, _: &mut [f64]) {}
    fn broadcast(&mut self, _: &mut Vec<u8>, _: usize) {}
    fn all_gather(&mut self, local: &[u8]) -> Vec<Vec<u8>> {
        vec![local.to_vec()]
    }
    fn all_to_all_v(&mut self, send: &[f32], send_counts: &[usize]) -> (Vec<f32>, Vec<usize>) {
        debug_assert_eq!(send_counts, [send.len()]);
        (send.to_vec(), vec![send.len()])
    }
    fn all_to_all_counts(&mut self, send: &[u64]) -> Vec<u64> {
        send.to_vec()
    }
    fn split(&mut self, _: usize) -> Box<dyn Collective> {
        Box::new(Single)
    }
    fn take_traffic(&mut self) -> Traffic {
        Traffic::default()
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// The number of processes a launcher started this one among, from the
/// environment Open MPI, MPICH (Hydra) and Slurm's PMI set; `None` when not
/// launched by one.
pub fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// Join the world this process was launched into: MPI under a launcher
/// (with the `mpi` feature; NCCL for the large collectives when `device`
/// is CUDA and the `cuda` feature is on), otherwise a world of one.
pub fn init(device: &str) -> Result<Box<dyn Collective>> {
    let launched = launched_size();
    #[cfg(feature = "mpi")]
    if launched.is_some() {
        let mpi = mpi::Mpi::init()?;
        #[cfg(feature = "gpu-kernels")]
        if mpi.world().size > 1 && (device.starts_with("cuda") || device.starts_with("wgpu")) {
            // Before the device is made: one cache database per rank.
            if !crate::kernels::cube::own_cache_per_rank(mpi.world().rank) {
                eprintln!(
                    "warning: CubeCL's settings were fixed before this rank could take a \
                     cache of its own; ranks sharing one cache database can crash CubeCL"
                );
            }
        }
        #[cfg(feature = "cuda")]
        if device.starts_with("cuda") {
            return Ok(Box::new(nccl::Nccl::init(mpi)?));
        }
        let _ = device;
        return Ok(Box::new(mpi));
    }
    let _ = device;
    #[cfg(not(feature = "mpi"))]
    if let Some(n) = launched.filter(|&n| n > 1) {
        anyhow::bail!(
            "this process was launched as one of {n} (mpirun), but switchyard was built \
             without MPI: build it with `cargo build --release --features mpi` \
             (needs libopenmpi-dev and libclang-dev)"
        );
    }
    let _ = launched;
    Ok(Box::new(Single))
}

/// Expert parallelism (`train.expert_parallel = N`): rank r holds the
/// experts of slot `r mod N` in every MoE layer, exchanges rows with the
/// other N − 1 ranks of its group (`r / N`), and shares its experts'
/// gradients with the ranks of the other groups that hold the same slot.
pub struct ExpertParallel {
    /// N, the ranks one layer's experts are spread over.
    pub degree: usize,
    /// This rank's slot, `0..N`.
    pub slot: usize,
    /// The N ranks of this rank's group.
    pub link: exchange::RowLink,
    /// The W / N ranks that hold the same experts as this one.
    pub replicas: Box<dyn Collective>,
    /// Per MoE layer (by block index): the experts each rank of the group
    /// holds, in stack order.
    pub layers: std::collections::BTreeMap<usize, Vec<Vec<usize>>>,
}

impl ExpertParallel {
    /// Split `comm`'s world into groups of `degree` consecutive ranks.
    /// Every rank calls it.
    pub fn new(comm: &mut dyn Collective, degree: usize) -> Result<Self> {
        let world = comm.world();
        if degree == 0 || !world.size.is_multiple_of(degree) {
            anyhow::bail!(
                "train.expert_parallel = {degree} must divide the number of processes ({})",
                world.size
            );
        }
        let link = exchange::RowLink::new(comm.split(world.rank / degree));
        let replicas = comm.split(world.rank % degree);
        Ok(Self {
            degree,
            slot: world.rank % degree,
            link,
            replicas,
            layers: Default::default(),
        })
    }
}
