//! The routed experts' SwiGLU over rows grouped by expert, for the Cube
//! backends: no padding to a capacity. Each expert with rows runs three
//! matmuls over exactly its rows (the backend's own, CubeCL's matmul) with
//! one element-wise kernel for the SwiGLU between them; its backward runs
//! the six matmuls of the gradients and one kernel for the SwiGLU's
//! derivative. An expert with no rows costs nothing but its zero gradient.
//!
//! The row offsets are host values: the dispatch plan they come from is
//! read to the host once per layer to lay the rows out.
//!
//! In f16 or bf16 the matmuls run in that dtype (on CUDA, tensor cores
//! with CubeCL's accumulation), and the SwiGLU kernels compute in f32.
//!
//! With `fused` (`train.gpu_fused_swiglu`), the gate and up matmuls and
//! their SwiGLU, and in the backward the matmul through the down
//! projection and the SwiGLU's derivative, are each one tiled kernel of
//! switchyard's own over all experts ([`super::grouped_fused`]); the
//! other four matmuls stay CubeCL's.

use super::swiglu::{swiglu_grads, swiglu_value};
use super::{empty_like, grouped_fused, launch_elementwise};
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::ops::FloatTensorOps;
use burn::backend::Slice;
use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use cubecl::prelude::*;

/// `h = silu(g) · u`, element-wise, computed in f32.
#[cube(launch)]
fn swiglu_kernel<F: Float>(
    g: &Tensor<F>,
    u: &Tensor<F>,
    h: &mut Tensor<F>,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i >= h.len() {
        terminate!();
    }
    h[i] = F::cast_from(swiglu_value(f32::cast_from(g[i]), f32::cast_from(u[i])));
}

/// The gradients of g and u of `h = silu(g) · u` for the gradient `dh`,
/// computed in f32.
#[cube(launch)]
fn swiglu_backward_kernel<F: Float>(
    g: &Tensor<F>,
    u: &Tensor<F>,
    dh: &Tensor<F>,
    dg: &mut Tensor<F>,
    du: &mut Tensor<F>,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i >= dg.len() {
        terminate!();
    }
    let grads = swiglu_grads(
        f32::cast_from(g[i]),
        f32::cast_from(u[i]),
        f32::cast_from(dh[i]),
    );
    dg[i] = F::cast_from(grads.dg);
    du[i] = F::cast_from(grads.du);
}

fn swiglu(g: CubeTensor, u: CubeTensor) -> CubeTensor {
    let (g, u) = (into_contiguous(g), into_contiguous(u));
    let h = empty_like(&g, g.meta.shape().clone());
    let (count, dim) = launch_elementwise(&g, h.meta.shape().num_elements());
    swiglu_kernel::launch(
        &g.client.clone(),
        count,
        dim,
        g.clone().into_tensor_arg(),
        u.into_tensor_arg(),
        h.clone().into_tensor_arg(),
        dtype_to_storage_type(g.dtype),
    );
    h
}

fn swiglu_backward(g: CubeTensor, u: CubeTensor, dh: CubeTensor) -> (CubeTensor, CubeTensor) {
    let (g, u, dh) = (into_contiguous(g), into_contiguous(u), into_contiguous(dh));
    let (dg, du) = (
        empty_like(&g, g.meta.shape().clone()),
        empty_like(&g, g.meta.shape().clone()),
    );
    let (count, dim) = launch_elementwise(&g, dg.meta.shape().num_elements());
    swiglu_backward_kernel::launch(
        &g.client.clone(),
        count,
        dim,
        g.clone().into_tensor_arg(),
        u.into_tensor_arg(),
        dh.into_tensor_arg(),
        dg.clone().into_tensor_arg(),
        du.clone().into_tensor_arg(),
        dtype_to_storage_type(g.dtype),
    );
    (dg, du)
}

/// Rows `r0..r1` of a 2-d tensor.
fn rows(t: &CubeTensor, r0: usize, r1: usize) -> CubeTensor {
    let w = t.meta.shape().dims::<2>()[1];
    CubeBackend::float_slice(t.clone(), &[Slice::from(r0..r1), Slice::from(0..w)])
}

/// Expert e's `[a, b]` matrix of an `[E, a, b]` stack.
fn expert(stack: &CubeTensor, e: usize) -> CubeTensor {
    let [_, a, b] = stack.meta.shape().dims::<3>();
    let one = CubeBackend::float_slice(
        stack.clone(),
        &[Slice::from(e..e + 1), Slice::from(0..a), Slice::from(0..b)],
    );
    CubeBackend::float_reshape(into_contiguous(one), Shape::new([a, b]))
}

fn transpose(t: CubeTensor) -> CubeTensor {
    CubeBackend::float_transpose(t)
}

fn cat_rows(parts: Vec<CubeTensor>, like: &CubeTensor, width: usize) -> CubeTensor {
    if parts.is_empty() {
        return CubeBackend::float_zeros(Shape::new([0, width]), &like.device, like.dtype.into());
    }
    CubeBackend::float_cat(parts, 0)
}

/// The dimensions `[d, F]` of the stacks and the row count, checked
/// against the offsets.
fn dims(x: &CubeTensor, gate: &CubeTensor, offsets: &[usize]) -> [usize; 3] {
    let [n, d] = x.meta.shape().dims::<2>();
    let [e, gd, f] = gate.meta.shape().dims::<3>();
    assert!(
        gd == d && offsets.len() == e + 1 && offsets[e] == n,
        "grouped_swiglu: x is [{n}, {d}], the stacks [{e}, {gd}, {f}], offsets {offsets:?}"
    );
    [n, d, f]
}

/// The experts' output `[N, d]` and the gate, up and SwiGLU rows `[N, F]`
/// the backward needs; `fused`: the gate and up projections and their
/// SwiGLU in one tiled kernel ([`super::grouped_fused`]).
pub fn forward(
    x: CubeTensor,
    [gate, up, down]: [CubeTensor; 3],
    offsets: &[usize],
    fused: bool,
) -> (CubeTensor, [CubeTensor; 3]) {
    let [_, d, f] = dims(&x, &gate, offsets);
    let spans = || offsets.windows(2).enumerate().filter(|(_, s)| s[1] > s[0]);
    if fused {
        let [g, u, h] = grouped_fused::gate_up_swiglu(x.clone(), gate, up, offsets);
        let ys = spans()
            .map(|(e, s)| CubeBackend::float_matmul(rows(&h, s[0], s[1]), expert(&down, e)))
            .collect();
        return (cat_rows(ys, &x, d), [g, u, h]);
    }
    let (mut ys, mut gs, mut us, mut hs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (e, span) in spans() {
        let xe = rows(&x, span[0], span[1]);
        let g = CubeBackend::float_matmul(xe.clone(), expert(&gate, e));
        let u = CubeBackend::float_matmul(xe, expert(&up, e));
        let h = swiglu(g.clone(), u.clone());
        ys.push(CubeBackend::float_matmul(h.clone(), expert(&down, e)));
        gs.push(g);
        us.push(u);
        hs.push(h);
    }
    let y = cat_rows(ys, &x, d);
    let saved = [gs, us, hs].map(|parts| cat_rows(parts, &x, f));
    (y, saved)
}

/// The gradients of x and of the three stacks; `fused`: the gradients of
/// the gate and up projections in one tiled kernel from `dy · downᵀ`
/// ([`super::grouped_fused`]).
pub fn backward(
    x: CubeTensor,
    [gate, up, down]: [CubeTensor; 3],
    offsets: &[usize],
    [g, u, h]: [CubeTensor; 3],
    grad: CubeTensor,
    fused: bool,
) -> [CubeTensor; 4] {
    let [_, d, f] = dims(&x, &gate, offsets);
    let zeros = |a: usize, b: usize| {
        CubeBackend::float_zeros(Shape::new([1, a, b]), &x.device, x.dtype.into())
    };
    let stacked =
        |t: CubeTensor, a: usize, b: usize| CubeBackend::float_reshape(t, Shape::new([1, a, b]));
    // Every expert's gradients of g and u at once, where fused.
    let both = fused.then(|| {
        grouped_fused::down_swiglu_grad(grad.clone(), down.clone(), g.clone(), u.clone(), offsets)
    });
    let mut dx = Vec::new();
    let (mut dgate, mut dup, mut ddown) = (Vec::new(), Vec::new(), Vec::new());
    for (e, span) in offsets.windows(2).enumerate() {
        if span[1] == span[0] {
            dgate.push(zeros(d, f));
            dup.push(zeros(d, f));
            ddown.push(zeros(f, d));
            continue;
        }
        let (r0, r1) = (span[0], span[1]);
        let (xe, dy) = (rows(&x, r0, r1), rows(&grad, r0, r1));
        let (dg, du) = match &both {
            Some([dg, du]) => (rows(dg, r0, r1), rows(du, r0, r1)),
            None => {
                let dh = CubeBackend::float_matmul(dy.clone(), transpose(expert(&down, e)));
                swiglu_backward(rows(&g, r0, r1), rows(&u, r0, r1), dh)
            }
        };
        ddown.push(stacked(
            CubeBackend::float_matmul(transpose(rows(&h, r0, r1)), dy),
            f,
            d,
        ));
        dx.push(CubeBackend::float_add(
            CubeBackend::float_matmul(dg.clone(), transpose(expert(&gate, e))),
            CubeBackend::float_matmul(du.clone(), transpose(expert(&up, e))),
        ));
        dgate.push(stacked(
            CubeBackend::float_matmul(transpose(xe.clone()), dg),
            d,
            f,
        ));
        dup.push(stacked(CubeBackend::float_matmul(transpose(xe), du), d, f));
    }
    [
        cat_rows(dx, &x, d),
        CubeBackend::float_cat(dgate, 0),
        CubeBackend::float_cat(dup, 0),
        CubeBackend::float_cat(ddown, 0),
    ]
}
