//! Causal grouped-query attention for the Cube backends (CUDA, wgpu):
//! forward and backward without the `[S, S]` score matrix.
//!
//! The forward keeps one running maximum, denominator and output row per
//! query (the online softmax) and saves each row's log-sum-exp; the
//! backward recomputes the probabilities from it. Memory is O(S) per head,
//! where the composed path holds `[B, H, S, S]` scores, probabilities and
//! their gradients. Key/value head g serves query heads
//! `g·H/KV .. (g+1)·H/KV` and is read in place, not repeated.
//!
//! Tiles of rows: one cube per tile of query rows of one head in the
//! forward and the query gradient, one per tile of key rows of one
//! key/value head in the key and value gradients, one unit (thread) per
//! row. The cube loads each tile of the rows it reads (keys and values, or
//! queries and output gradients) once into shared memory, and every unit
//! reads it there; query tiles stop at the diagonal tile and key tiles
//! start there. The tile is the most rows, up to 64, whose tiles fit the
//! device's shared memory.
//!
//! Precision: q, k, v, the output and the shared-memory tiles are in the
//! tensors' dtype (f32, or f16/bf16 under `train.precision = "bf16"`);
//! every score, running statistic and accumulator, and the saved
//! log-sum-exp, are f32.
//!
//! The forward is here; the backward's two kernels are in
//! [`super::attention_grad`].

use super::{empty_f32_like, empty_like};
use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::CubeDim;

/// Copy rows `base..base + tile` of one head of `src` (`[B, S, N, hd]`:
/// batch `b`, head `head`) into `dst` (`tile · hd` values), all units of
/// the cube together, each value read once and neighbouring units reading
/// neighbouring values; rows past `s` are left as they were.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn load_tile<F: Float>(
    src: &Tensor<F>,
    dst: &mut Shared<[F]>,
    b: usize,
    head: usize,
    base: usize,
    s: usize,
    #[comptime] tile: usize,
    #[comptime] hd: usize,
) {
    let n = src.shape(2);
    let mut idx = UNIT_POS_X as usize;
    while idx < tile * hd {
        let j = base + idx / hd;
        if j < s {
            dst[idx] = src[((b * s + j) * n + head) * hd + idx % hd];
        }
        idx += tile;
    }
}

/// Where a unit's query row is, in the kernels with one cube per tile of
/// query rows of one (batch, head).
#[derive(CubeType, Clone)]
pub(super) struct QueryRow {
    /// Sequence length.
    pub s: usize,
    /// Batch.
    pub b: usize,
    /// The query head's key/value head.
    pub g: usize,
    /// The query tile.
    pub qt: usize,
    /// The row; past the sequence (`live` false) for the last tile's spare
    /// units, which still load tiles and wait at the barriers.
    pub i: usize,
    /// Whether the row exists.
    pub live: bool,
    /// Where the row starts in `q` (the last row for a spare unit).
    pub at: usize,
    /// Its index in the `[B, H, S]` statistics (the last row for a spare
    /// unit).
    pub stat: usize,
}

/// This unit's [`QueryRow`] for `q: [B, S, H, hd]` and `k: [B, S, KV, hd]`.
#[cube]
pub(super) fn query_row<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    #[comptime] tile: usize,
    #[comptime] hd: usize,
) -> QueryRow {
    let s = q.shape(1);
    let h = q.shape(2);
    let qt = CUBE_POS_X as usize;
    let head = CUBE_POS_Y as usize % h;
    let b = CUBE_POS_Y as usize / h;
    let i = qt * tile + UNIT_POS_X as usize;
    let live = i < s;
    let mut row = s - 1;
    if live {
        row = i;
    }
    QueryRow {
        s,
        b,
        g: head / (h / k.shape(2)),
        qt,
        i,
        live,
        at: ((b * s + row) * h + head) * hd,
        stat: (b * h + head) * s + row,
    }
}

/// `x · tile row r` over one head's width, in f32.
#[cube]
pub(super) fn dot_tile<F: Float>(
    x: &Array<f32>,
    rows: &Shared<[F]>,
    r: usize,
    #[comptime] hd: usize,
) -> f32 {
    let mut acc = f32::new(0.0);
    #[unroll]
    for d in 0..hd {
        acc += x[d] * f32::cast_from(rows[r * hd + d]);
    }
    acc
}

/// One tile of `tile` query rows of one (batch, head) per cube, one unit
/// per row: `out = softmax(q kᵀ · scale) v` over keys `0..=i`, and each
/// row's log-sum-exp of the scaled scores. The cube walks the key tiles up
/// to and including the diagonal one, each loaded once into shared memory.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    scale: f32,
    #[comptime] hd: usize,
    #[comptime] tile: usize,
    #[define(F)] _dtype: ElemType,
) {
    let row = query_row::<F>(q, k, tile, hd);
    let (s, b, g, qt, i, live, q_at) = (row.s, row.b, row.g, row.qt, row.i, row.live, row.at);
    let kv = k.shape(2);
    let mut qr = Array::<f32>::new(hd);
    #[unroll]
    for d in 0..hd {
        qr[d] = f32::cast_from(q[q_at + d]) * scale;
    }
    // Key 0 is in every causal row: start the running statistics there.
    let first = (b * s * kv + g) * hd;
    let mut m = f32::new(0.0);
    #[unroll]
    for d in 0..hd {
        m += qr[d] * f32::cast_from(k[first + d]);
    }
    let mut l = f32::new(1.0);
    let mut acc = Array::<f32>::new(hd);
    #[unroll]
    for d in 0..hd {
        acc[d] = f32::cast_from(v[first + d]);
    }
    let mut ks = Shared::<[F]>::new_slice(comptime!(tile * hd));
    let mut vs = Shared::<[F]>::new_slice(comptime!(tile * hd));
    for kt in 0..qt + 1 {
        let base = kt * tile;
        load_tile::<F>(k, &mut ks, b, g, base, s, tile, hd);
        load_tile::<F>(v, &mut vs, b, g, base, s, tile, hd);
        sync_cube();
        if live {
            for r in 0..tile {
                let j = base + r;
                if j >= 1 && j <= i {
                    let score = dot_tile::<F>(&qr, &ks, r, hd);
                    let mut m_new = m;
                    if score > m {
                        m_new = score;
                    }
                    let rescale = (m - m_new).exp();
                    let p = (score - m_new).exp();
                    l = l * rescale + p;
                    #[unroll]
                    for d in 0..hd {
                        acc[d] = acc[d] * rescale + p * f32::cast_from(vs[r * hd + d]);
                    }
                    m = m_new;
                }
            }
        }
        sync_cube();
    }
    if live {
        let inv = f32::new(1.0) / l;
        #[unroll]
        for d in 0..hd {
            out[q_at + d] = F::cast_from(acc[d] * inv);
        }
        lse[row.stat] = m + l.ln();
    }
}

/// The dimensions of `q: [B, S, H, hd]` and `k, v: [B, S, KV, hd]`,
/// checked: `[B, S, H, KV, hd]`.
pub(super) fn dims(q: &CubeTensor, k: &CubeTensor, v: &CubeTensor) -> [usize; 5] {
    let [b, s, h, hd] = q.meta.shape().dims::<4>();
    let [kb, ks, kv, khd] = k.meta.shape().dims::<4>();
    assert!(
        kb == b && ks == s && khd == hd && v.meta.shape().dims::<4>() == [b, s, kv, hd],
        "attention: q is [{b}, {s}, {h}, {hd}], k [{kb}, {ks}, {kv}, {khd}], v {:?}",
        v.meta.shape()
    );
    assert!(
        kv > 0 && h % kv == 0,
        "attention: {h} query heads are not a multiple of {kv} key/value heads"
    );
    [b, s, h, kv, hd]
}

/// Rows per tile: the most, up to 64, whose tiles fit the device's shared
/// memory (the key/value gradient holds two `tile × hd` tiles and two
/// `tile` statistics).
pub(super) fn tile_rows(t: &CubeTensor, hd: usize) -> usize {
    let hardware = &t.client.properties().hardware;
    let bytes = hardware.max_shared_memory_size;
    let mut tile = 64usize.min(hardware.max_units_per_cube.max(1) as usize);
    while tile > 1 && (2 * tile * hd + 2 * tile) * 4 > bytes {
        tile /= 2;
    }
    tile
}

/// One cube per tile of `tile` rows of each of `groups` heads.
pub(super) fn launch_tiles(s: usize, groups: usize, tile: usize) -> (CubeCount, CubeDim) {
    (
        CubeCount::Static(s.div_ceil(tile) as u32, groups as u32, 1),
        CubeDim::new_1d(tile as u32),
    )
}

/// The attention output `[B, S, H, hd]` (in q's dtype) and each query
/// row's log-sum-exp `[B, H, S]` (f32).
pub fn forward(q: CubeTensor, k: CubeTensor, v: CubeTensor) -> (CubeTensor, CubeTensor) {
    let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
    let [b, s, h, _, hd] = dims(&q, &k, &v);
    let out = empty_like(&q, q.meta.shape().clone());
    let lse = empty_f32_like(&q, Shape::new([b, h, s]));
    let tile = tile_rows(&q, hd);
    let (count, dim) = launch_tiles(s, b * h, tile);
    let dtype = dtype_to_storage_type(q.dtype);
    forward_kernel::launch(
        &q.client.clone(),
        count,
        dim,
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        1.0 / (hd as f32).sqrt(),
        hd,
        tile,
        dtype,
    );
    (out, lse)
}
