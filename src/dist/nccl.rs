//! The NCCL transport, for ranks on CUDA devices (`--device cuda` under
//! `mpirun`, with the `cuda` and `mpi` features): the gradient all-reduces
//! and the expert all-to-alls move over NCCL (NVLink or the network NCCL
//! finds), device to device; the small collectives (run directory, cursors,
//! checksums, counts) stay on MPI. The NCCL communicator is bootstrapped by
//! broadcasting rank 0's unique id over MPI; rank r uses `cuda:{local rank}`.
//!
//! The parts of the world expert parallelism splits off (its groups, and
//! the ranks holding the same experts) get NCCL communicators of their own
//! the same way.
//!
//! The trainer hands the collectives host buffers, so each call copies its
//! buffer to the device and back: the transfer between devices is NCCL's,
//! the copies are extra. Not yet run on a GPU.

use super::mpi::Mpi;
use super::{Collective, Traffic, World};
use anyhow::{anyhow, Context, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};
use std::sync::Arc;
use std::time::Instant;

/// MPI for the small collectives, NCCL for the large ones.
pub struct Nccl {
    comm: Comm,
    stream: Arc<CudaStream>,
    mpi: Mpi,
    traffic: Traffic,
}

impl Nccl {
    /// Join the NCCL clique of `mpi`'s world, on `cuda:{local rank}`.
    pub fn init(mut mpi: Mpi) -> Result<Self> {
        let world = mpi.world();
        let ctx = CudaContext::new(world.local_rank)
            .map_err(|e| anyhow!("CUDA device {}: {e:?}", world.local_rank))?;
        let stream = ctx.default_stream();
        let mut bytes: Vec<u8> = if world.rank == 0 {
            let id = Id::new().map_err(|e| anyhow!("creating the NCCL unique id: {e:?}"))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        mpi.broadcast(&mut bytes, 0);
        let internal: [std::ffi::c_char; 128] = bytes
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| anyhow!("the NCCL unique id is not 128 bytes"))?;
        let comm = Comm::from_rank(stream.clone(), world.rank, world.size, Id::uninit(internal))
            .map_err(|e| anyhow!("joining the NCCL communicator: {e:?}"))
            .context("NCCL bootstrap")?;
        let mut nccl = Self {
            comm,
            stream,
            mpi,
            traffic: Traffic::default(),
        };
        // Check the clique once: rank r contributes r + 1 to every entry.
        let mut probe = vec![(world.rank + 1) as f32; 1000];
        nccl.all_reduce_sum(&mut probe);
        let want = (world.size * (world.size + 1) / 2) as f32;
        if let Some(bad) = probe.iter().find(|&&x| x != want) {
            anyhow::bail!("NCCL bootstrap check: an all-reduce gave {bad}, not {want}");
        }
        nccl.traffic = Traffic::default();
        Ok(nccl)
    }

    fn to_device(&self, host: &[f32]) -> CudaSlice<f32> {
        self.stream
            .clone_htod(host)
            .unwrap_or_else(|e| panic!("copying {} values to the device: {e:?}", host.len()))
    }

    fn to_host(&self, dev: &CudaSlice<f32>, into: &mut [f32]) {
        self.stream
            .memcpy_dtoh(dev, into)
            .unwrap_or_else(|e| panic!("copying {} values to the host: {e:?}", into.len()));
        self.stream
            .synchronize()
            .unwrap_or_else(|e| panic!("waiting for the device: {e:?}"));
    }
}

impl Collective for Nccl {
    fn world(&self) -> World {
        self.mpi.world()
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) {
        if buf.is_empty() {
            return;
        }
        let start = Instant::now();
        let mut dev = self.to_device(buf);
        self.comm
            .all_reduce_in_place(&mut dev, &ReduceOp::Sum)
            .unwrap_or_else(|e| panic!("NCCL all-reduce: {e:?}"));
        self.to_host(&dev, buf);
        self.traffic.allreduce_secs += start.elapsed().as_secs_f64();
        self.traffic.allreduce_bytes += 4 * buf.len() as u64;
    }

    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) {
        self.mpi.all_reduce_sum_f64(buf)
    }

    fn broadcast(&mut self, buf: &mut Vec<u8>, root: usize) {
        self.mpi.broadcast(buf, root)
    }

    fn all_gather(&mut self, local: &[u8]) -> Vec<Vec<u8>> {
        self.mpi.all_gather(local)
    }

    fn all_to_all_v(&mut self, send: &[f32], send_counts: &[usize]) -> (Vec<f32>, Vec<usize>) {
        let world = self.mpi.world();
        let (n, me) = (world.size, world.rank);
        let counts: Vec<u64> = send_counts.iter().map(|&c| c as u64).collect();
        let recv_counts: Vec<usize> = self
            .mpi
            .all_to_all_counts(&counts)
            .into_iter()
            .map(|c| c as usize)
            .collect();
        let start = Instant::now();
        let offsets = |c: &[usize]| -> Vec<usize> {
            c.iter()
                .scan(0, |acc, &x| {
                    let o = *acc;
                    *acc += x;
                    Some(o)
                })
                .collect()
        };
        let (so, ro) = (offsets(send_counts), offsets(&recv_counts));
        let dev_send = self.to_device(send);
        // One receive buffer per peer, so each is borrowed once in the group.
        let mut dev_recv: Vec<Option<CudaSlice<f32>>> = (0..n)
            .map(|j| {
                (j != me && recv_counts[j] > 0).then(|| {
                    self.stream
                        .alloc_zeros::<f32>(recv_counts[j])
                        .unwrap_or_else(|e| panic!("allocating a receive buffer: {e:?}"))
                })
            })
            .collect();
        {
            let mut group = self.comm.group();
            for j in (0..n).filter(|&j| j != me) {
                if send_counts[j] > 0 {
                    group
                        .send(dev_send.slice(so[j]..so[j] + send_counts[j]), j as i32)
                        .unwrap_or_else(|e| panic!("NCCL send to rank {j}: {e:?}"));
                }
            }
            for (j, buf) in dev_recv.iter_mut().enumerate() {
                if let Some(buf) = buf {
                    group
                        .recv(buf.slice_mut(..), j as i32)
                        .unwrap_or_else(|e| panic!("NCCL receive from rank {j}: {e:?}"));
                }
            }
        }
        let mut out = vec![0f32; recv_counts.iter().sum()];
        out[ro[me]..ro[me] + recv_counts[me]]
            .copy_from_slice(&send[so[me]..so[me] + send_counts[me]]);
        for (j, buf) in dev_recv.iter().enumerate() {
            if let Some(buf) = buf {
                self.to_host(buf, &mut out[ro[j]..ro[j] + recv_counts[j]]);
            }
        }
        self.traffic.alltoall_secs += start.elapsed().as_secs_f64();
        let moved: usize = (0..n)
            .filter(|&j| j != me)
            .map(|j| send_counts[j] + recv_counts[j])
            .sum();
        self.traffic.alltoall_bytes += 4 * moved as u64;
        (out, recv_counts)
    }

    fn all_to_all_counts(&mut self, send: &[u64]) -> Vec<u64> {
        self.mpi.all_to_all_counts(send)
    }

    /// A part of the world (an expert-parallel group, or the ranks holding
    /// the same experts) gets an NCCL communicator of its own, bootstrapped
    /// over its own MPI communicator, so that its exchanges and all-reduces
    /// go device to device too.
    fn split(&mut self, color: usize) -> Box<dyn Collective> {
        let part = self.mpi.split_mpi(color);
        match Nccl::init(part) {
            Ok(nccl) => Box::new(nccl),
            Err(e) => {
                eprintln!("error: NCCL for a part of the world (colour {color}): {e:#}");
                self.mpi.abort(1)
            }
        }
    }

    fn take_traffic(&mut self) -> Traffic {
        let mut t = std::mem::take(&mut self.traffic);
        t += self.mpi.take_traffic();
        t
    }

    fn abort(&self, code: i32) -> ! {
        self.mpi.abort(code)
    }
}
