//! The routed experts' SwiGLU with the activation fused into the matmuls
//! that make and consume it, for the Cube backends: switchyard's own tiled
//! matmul, one launch over all experts.
//!
//! - Forward: one kernel computes a tile of the gate and up projections
//!   `x_e · gate_e` and `x_e · up_e` together (the tile of x loaded once
//!   for both) and, in its epilogue, their SwiGLU `silu(g) · u` from the
//!   f32 accumulators. It writes g and u (the backward needs them) and h;
//!   no separate pass reads g and u back.
//! - Backward: one kernel computes a tile of `dh = dy_e · down_eᵀ` and, in
//!   its epilogue, the gradients of g and u from it, so dh is never
//!   written.
//!
//! The other matmuls (the down projection and the weight and input
//! gradients) stay CubeCL's, as in [`super::grouped`]. Each launch covers
//! every expert at once: the host lays out a table of row tiles
//! (expert, first row, end row) from the row offsets, so an expert with no
//! rows has no tile and a tile never spans two experts. One cube per row
//! tile and column tile, one unit per output value; the tiles of the
//! inputs pass through shared memory. No tensor cores: the arithmetic is
//! f32 whatever the tensors' dtype, as in the SwiGLU kernels it replaces.
//! `train.gpu_fused_swiglu` selects it (see the README for why it is not
//! the default).

use super::empty_like;
use super::swiglu::{swiglu_grads, swiglu_value};
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::ops::IntTensorOps;
use burn::tensor::{Shape, TensorData};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use cubecl::prelude::*;
use cubecl::CubeDim;

/// Where this cube's row tile is: its expert and its rows `r0..r1`.
#[derive(CubeType, Clone)]
struct RowTile {
    e: usize,
    r0: usize,
    r1: usize,
}

#[cube]
fn row_tile<I: Numeric>(tiles: &Tensor<I>) -> RowTile {
    let t = CUBE_POS_X as usize * 3;
    RowTile {
        e: u32::cast_from(tiles[t]) as usize,
        r0: u32::cast_from(tiles[t + 1]) as usize,
        r1: u32::cast_from(tiles[t + 2]) as usize,
    }
}

/// Tile `[tile, tile]` of rows `r0 + ty` and columns `k0 + tx` of the
/// `[N, width]` matrix `a` into `dst` (zero outside rows `..r1` and
/// columns `..width`), one value per unit.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_rows<F: Float>(
    a: &Tensor<F>,
    dst: &mut Shared<[F]>,
    r1: usize,
    row: usize,
    k0: usize,
    width: usize,
    #[comptime] tile: usize,
) {
    let (ty, tx) = (UNIT_POS_Y as usize, UNIT_POS_X as usize);
    let mut value = F::new(0.0);
    if row < r1 && k0 + tx < width {
        value = a[row * width + k0 + tx];
    }
    dst[ty * tile + tx] = value;
}

/// `h = silu(g) · u` for the rows of each expert, with g and u the gate and
/// up projections, in one tiled pass that writes g, u and h.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn gate_up_swiglu_kernel<F: Float, I: Numeric>(
    x: &Tensor<F>,
    gate: &Tensor<F>,
    up: &Tensor<F>,
    tiles: &Tensor<I>,
    g: &mut Tensor<F>,
    u: &mut Tensor<F>,
    h: &mut Tensor<F>,
    #[comptime] tile: usize,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let d = x.shape(1);
    let f = gate.shape(2);
    let at = row_tile::<I>(tiles);
    let (ty, tx) = (UNIT_POS_Y as usize, UNIT_POS_X as usize);
    let row = at.r0 + ty;
    let col = CUBE_POS_Y as usize * tile + tx;
    let mut xs = Shared::<[F]>::new_slice(comptime!(tile * tile));
    let mut gs = Shared::<[F]>::new_slice(comptime!(tile * tile));
    let mut us = Shared::<[F]>::new_slice(comptime!(tile * tile));
    let (mut acc_g, mut acc_u) = (f32::new(0.0), f32::new(0.0));
    let mut k0 = 0usize;
    while k0 < d {
        load_rows::<F>(x, &mut xs, at.r1, row, k0, d, tile);
        // Row k0 + ty, column col of expert e's [d, F] matrices.
        let (mut gv, mut uv) = (F::new(0.0), F::new(0.0));
        if k0 + ty < d && col < f {
            let at_w = (at.e * d + k0 + ty) * f + col;
            gv = gate[at_w];
            uv = up[at_w];
        }
        gs[ty * tile + tx] = gv;
        us[ty * tile + tx] = uv;
        sync_cube();
        #[unroll]
        for kk in 0..tile {
            let xv = f32::cast_from(xs[ty * tile + kk]);
            acc_g += xv * f32::cast_from(gs[kk * tile + tx]);
            acc_u += xv * f32::cast_from(us[kk * tile + tx]);
        }
        sync_cube();
        k0 += tile;
    }
    if row < at.r1 && col < f {
        let out = row * f + col;
        g[out] = F::cast_from(acc_g);
        u[out] = F::cast_from(acc_u);
        h[out] = F::cast_from(swiglu_value(acc_g, acc_u));
    }
}

/// The gradients of g and u for each expert's rows: `dh = dy · down_eᵀ`
/// in tiles, and from it, in the epilogue, those of the SwiGLU
/// ([`swiglu_grads`]).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn down_swiglu_grad_kernel<F: Float, I: Numeric>(
    dy: &Tensor<F>,
    down: &Tensor<F>,
    g: &Tensor<F>,
    u: &Tensor<F>,
    tiles: &Tensor<I>,
    dg: &mut Tensor<F>,
    du: &mut Tensor<F>,
    #[comptime] tile: usize,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let d = dy.shape(1);
    let f = down.shape(1);
    let at = row_tile::<I>(tiles);
    let (ty, tx) = (UNIT_POS_Y as usize, UNIT_POS_X as usize);
    let row = at.r0 + ty;
    let c0 = CUBE_POS_Y as usize * tile;
    let col = c0 + tx;
    let mut ys = Shared::<[F]>::new_slice(comptime!(tile * tile));
    let mut ds = Shared::<[F]>::new_slice(comptime!(tile * tile));
    let mut acc = f32::new(0.0);
    let mut k0 = 0usize;
    while k0 < d {
        load_rows::<F>(dy, &mut ys, at.r1, row, k0, d, tile);
        // ds[kk, c] = down[e, c0 + c, k0 + kk], read along down's rows.
        let mut dv = F::new(0.0);
        if c0 + ty < f && k0 + tx < d {
            dv = down[(at.e * f + c0 + ty) * d + k0 + tx];
        }
        ds[tx * tile + ty] = dv;
        sync_cube();
        #[unroll]
        for kk in 0..tile {
            acc += f32::cast_from(ys[ty * tile + kk]) * f32::cast_from(ds[kk * tile + tx]);
        }
        sync_cube();
        k0 += tile;
    }
    if row < at.r1 && col < f {
        let at_out = row * f + col;
        let grads = swiglu_grads(f32::cast_from(g[at_out]), f32::cast_from(u[at_out]), acc);
        dg[at_out] = F::cast_from(grads.dg);
        du[at_out] = F::cast_from(grads.du);
    }
}

/// Rows and columns per tile: 16 (256 units a cube), or 8 where a cube
/// holds fewer units.
fn tile_size(t: &CubeTensor) -> usize {
    let units = t.client.properties().hardware.max_units_per_cube as usize;
    if units >= 256 {
        16
    } else {
        8
    }
}

/// The table of row tiles, three values each (expert, first row, end
/// row), for these offsets.
fn row_tiles(offsets: &[usize], tile: usize) -> Vec<i32> {
    let mut table = Vec::new();
    for (e, span) in offsets.windows(2).enumerate() {
        let mut r = span[0];
        while r < span[1] {
            let end = (r + tile).min(span[1]);
            table.extend([e as i32, r as i32, end as i32]);
            r = end;
        }
    }
    table
}

/// One launch of a fused kernel: the table of row tiles on the device,
/// one cube per row tile and column tile, and the storage types of the
/// tensors and of the table.
struct TiledLaunch {
    tiles: CubeTensor,
    cubes: CubeCount,
    dim: CubeDim,
    tile: usize,
    dtypes: [ElemType; 2],
}

/// The launch over the row tiles of `offsets` and `f` output columns, for
/// tensors like `like`; None when there is no value to compute.
fn tiled_launch(like: &CubeTensor, offsets: &[usize], f: usize) -> Option<TiledLaunch> {
    let tile = tile_size(like);
    let table = row_tiles(offsets, tile);
    let count = table.len() / 3;
    if count == 0 || f == 0 {
        return None;
    }
    let len = table.len();
    let tiles = CubeBackend::int_from_data(TensorData::new(table, [len]), &like.device);
    let dtypes = [
        dtype_to_storage_type(like.dtype),
        dtype_to_storage_type(tiles.dtype),
    ];
    Some(TiledLaunch {
        tiles,
        cubes: CubeCount::Static(count as u32, f.div_ceil(tile) as u32, 1),
        dim: CubeDim::new_2d(tile as u32, tile as u32),
        tile,
        dtypes,
    })
}

/// The gate and up projections and their SwiGLU `[N, F]` each, for
/// `x: [N, d]`, `gate, up: [E, d, F]` and the row offsets (`E + 1`).
pub fn gate_up_swiglu(
    x: CubeTensor,
    gate: CubeTensor,
    up: CubeTensor,
    offsets: &[usize],
) -> [CubeTensor; 3] {
    let (x, gate, up) = (
        into_contiguous(x),
        into_contiguous(gate),
        into_contiguous(up),
    );
    let n = x.meta.shape().dims::<2>()[0];
    let f = gate.meta.shape().dims::<3>()[2];
    let out = || empty_like(&x, Shape::new([n, f]));
    let (g, u, h) = (out(), out(), out());
    let Some(at) = tiled_launch(&x, offsets, f) else {
        return [g, u, h];
    };
    gate_up_swiglu_kernel::launch(
        &x.client.clone(),
        at.cubes,
        at.dim,
        x.into_tensor_arg(),
        gate.into_tensor_arg(),
        up.into_tensor_arg(),
        at.tiles.into_tensor_arg(),
        g.clone().into_tensor_arg(),
        u.clone().into_tensor_arg(),
        h.clone().into_tensor_arg(),
        at.tile,
        at.dtypes,
    );
    [g, u, h]
}

/// The gradients of g and u `[N, F]` for the output gradient `dy: [N, d]`,
/// `down: [E, F, d]`, the saved g and u, and the row offsets.
pub fn down_swiglu_grad(
    dy: CubeTensor,
    down: CubeTensor,
    g: CubeTensor,
    u: CubeTensor,
    offsets: &[usize],
) -> [CubeTensor; 2] {
    let (dy, down, g, u) = (
        into_contiguous(dy),
        into_contiguous(down),
        into_contiguous(g),
        into_contiguous(u),
    );
    let shape = g.meta.shape().clone();
    let f = shape.dims::<2>()[1];
    let (dg, du) = (empty_like(&g, shape.clone()), empty_like(&g, shape));
    let Some(at) = tiled_launch(&dy, offsets, f) else {
        return [dg, du];
    };
    down_swiglu_grad_kernel::launch(
        &dy.client.clone(),
        at.cubes,
        at.dim,
        dy.into_tensor_arg(),
        down.into_tensor_arg(),
        g.into_tensor_arg(),
        u.into_tensor_arg(),
        at.tiles.into_tensor_arg(),
        dg.clone().into_tensor_arg(),
        du.clone().into_tensor_arg(),
        at.tile,
        at.dtypes,
    );
    [dg, du]
}
