//! The MPI transport: host buffers between processes started by `mpirun`,
//! through the `mpi` crate (rsmpi) over the system's MPI library.
//!
//! MPI is initialised once, on the thread that calls [`Mpi::init`], which
//! is the only thread that makes MPI calls (the funneled threading level).

use super::{Collective, Traffic, World};
use anyhow::{bail, Result};
use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::{Threading, Universe};
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
use mpi::Count;
use std::time::Instant;

/// A communicator of an MPI job: the world's, or a part split from it.
pub struct Mpi {
    comm: SimpleCommunicator,
    world: World,
    traffic: Traffic,
    /// The world's: finalises MPI when dropped (declared last so the
    /// communicator goes first). A split part holds none and must be
    /// dropped before the world.
    _universe: Option<Universe>,
}

impl Mpi {
    /// Initialise MPI and join its world.
    pub fn init() -> Result<Self> {
        let Some((universe, _)) = mpi::initialize_with_threading(Threading::Funneled) else {
            bail!("MPI is already initialised in this process");
        };
        let comm = universe.world();
        let local_rank = comm.split_shared(comm.rank()).rank() as usize;
        let world = World {
            rank: comm.rank() as usize,
            size: comm.size() as usize,
            local_rank,
        };
        Ok(Self {
            comm,
            world,
            traffic: Traffic::default(),
            _universe: Some(universe),
        })
    }

    /// The processes that pass the same `color`, as a world of their own
    /// (see [`Collective::split`]). Every rank calls it.
    pub fn split_mpi(&mut self, color: usize) -> Mpi {
        let color = i32::try_from(color).expect("a split colour below 2^31");
        let comm = self
            .comm
            .split_by_color(Color::with_value(color))
            .expect("every rank passes a colour");
        let world = World {
            rank: comm.rank() as usize,
            size: comm.size() as usize,
            local_rank: self.world.local_rank,
        };
        Mpi {
            comm,
            world,
            traffic: Traffic::default(),
            _universe: None,
        }
    }
}

/// Time one collective into `secs`.
fn timed<T>(secs: &mut f64, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    *secs += start.elapsed().as_secs_f64();
    out
}

/// MPI counts are `int`: a part this large is split by the callers
/// (gradient buckets are far smaller).
fn count(n: usize) -> Count {
    Count::try_from(n).expect("an MPI message part under 2^31 elements")
}

/// Displacements of parts laid end to end.
fn displs(counts: &[Count]) -> Vec<Count> {
    counts
        .iter()
        .scan(0, |acc, &c| {
            let d = *acc;
            *acc += c;
            Some(d)
        })
        .collect()
}

impl Collective for Mpi {
    fn world(&self) -> World {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) {
        let comm = &self.comm;
        timed(&mut self.traffic.allreduce_secs, || {
            let send = buf.to_vec();
            comm.all_reduce_into(&send[..], buf, SystemOperation::sum());
        });
        self.traffic.allreduce_bytes += 4 * buf.len() as u64;
    }

    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) {
        let comm = &self.comm;
        timed(&mut self.traffic.allreduce_secs, || {
            let send = buf.to_vec();
            comm.all_reduce_into(&send[..], buf, SystemOperation::sum());
        });
        self.traffic.allreduce_bytes += 8 * buf.len() as u64;
    }

    fn broadcast(&mut self, buf: &mut Vec<u8>, root: usize) {
        let root = self.comm.process_at_rank(root as i32);
        let mut len = buf.len() as u64;
        root.broadcast_into(&mut len);
        buf.resize(len as usize, 0);
        root.broadcast_into(&mut buf[..]);
    }

    fn all_gather(&mut self, local: &[u8]) -> Vec<Vec<u8>> {
        let n = self.world.size;
        let mut counts = vec![0 as Count; n];
        self.comm
            .all_gather_into(&count(local.len()), &mut counts[..]);
        let d = displs(&counts);
        let mut all = vec![0u8; counts.iter().map(|&c| c as usize).sum()];
        {
            let mut part = PartitionMut::new(&mut all[..], &counts[..], &d[..]);
            self.comm.all_gather_varcount_into(local, &mut part);
        }
        (0..n)
            .map(|r| all[d[r] as usize..(d[r] + counts[r]) as usize].to_vec())
            .collect()
    }

    fn all_to_all_v(&mut self, send: &[f32], send_counts: &[usize]) -> (Vec<f32>, Vec<usize>) {
        let n = self.world.size;
        assert_eq!(send_counts.len(), n, "one send count per rank");
        let sc: Vec<Count> = send_counts.iter().map(|&c| count(c)).collect();
        let comm = &self.comm;
        let (recv, rc) = timed(&mut self.traffic.alltoall_secs, || {
            // Counts first, then the payload.
            let mut rc = vec![0 as Count; n];
            comm.all_to_all_into(&sc[..], &mut rc[..]);
            let (sd, rd) = (displs(&sc), displs(&rc));
            let mut recv = vec![0f32; rc.iter().map(|&c| c as usize).sum()];
            {
                let part = Partition::new(send, &sc[..], &sd[..]);
                let mut into = PartitionMut::new(&mut recv[..], &rc[..], &rd[..]);
                comm.all_to_all_varcount_into(&part, &mut into);
            }
            (recv, rc)
        });
        let me = self.world.rank;
        let moved: usize = (0..n)
            .filter(|&r| r != me)
            .map(|r| send_counts[r] + rc[r] as usize)
            .sum();
        self.traffic.alltoall_bytes += 4 * moved as u64;
        (recv, rc.into_iter().map(|c| c as usize).collect())
    }

    fn all_to_all_counts(&mut self, send: &[u64]) -> Vec<u64> {
        let n = self.world.size;
        assert_eq!(send.len() % n, 0, "one equal chunk per rank");
        let mut recv = vec![0u64; send.len()];
        self.comm.all_to_all_into(send, &mut recv[..]);
        recv
    }

    fn split(&mut self, color: usize) -> Box<dyn Collective> {
        Box::new(self.split_mpi(color))
    }

    fn take_traffic(&mut self) -> Traffic {
        std::mem::take(&mut self.traffic)
    }
    fn abort(&self, code: i32) -> ! {
        self.comm.abort(code)
    }
}
