//! Matmuls on `f32` slices, through the `gemm` crate: any row and column
//! strides on either operand (so a transpose costs nothing), into a block
//! of a larger output, overwriting or accumulating.

/// A row-major matrix operand: its data and its row and column strides
/// (`(k, 1)` for a plain `[m, k]` matrix, `(1, k)` for its transpose).
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Operand<'a> {
    /// A row-major matrix with `cols` columns.
    pub fn plain(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix with `cols` columns.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: cols,
        }
    }
}

/// `c = alpha · a · b`, or `c += alpha · a · b` when `accumulate`, with
/// `a: [m, k]`, `b: [k, n]` and `c` a row-major `[m, n]` slice. `parallel`
/// lets the matmul split across the rayon pool (off for callers that run
/// many matmuls in parallel themselves).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    (m, k, n): (usize, usize, usize),
    a: Operand,
    b: Operand,
    c: &mut [f32],
    accumulate: bool,
    alpha: f32,
    parallel: bool,
) {
    matmul_strided((m, k, n), a, b, (c, n), accumulate, alpha, parallel);
}

/// [`matmul`] into an `[m, n]` block of a larger row-major matrix: `c` is
/// given with its row stride (≥ n).
#[allow(clippy::too_many_arguments)]
pub fn matmul_strided(
    (m, k, n): (usize, usize, usize),
    a: Operand,
    b: Operand,
    (c, ldc): (&mut [f32], usize),
    accumulate: bool,
    alpha: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        ldc >= n,
        "matmul: output row stride {ldc} below its width {n}"
    );
    assert!((m - 1) * ldc + n <= c.len(), "matmul: output out of bounds");
    if k == 0 {
        if !accumulate {
            for row in c.chunks_mut(ldc).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    let last = |o: Operand, rows: usize, cols: usize| {
        (rows - 1) * o.row_stride + (cols - 1) * o.col_stride
    };
    assert!(last(a, m, k) < a.data.len(), "matmul: lhs out of bounds");
    assert!(last(b, k, n) < b.data.len(), "matmul: rhs out of bounds");
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every index gemm touches inside the
    // slices; `c` is borrowed mutably, so it aliases neither `a` nor `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `y = x · w` for row-major `x: [n, d_in]`, `w: [d_in, d_out]`, over the
/// whole pool.
pub fn linear(x: &[f32], w: &[f32], (n, d_in, d_out): (usize, usize, usize), y: &mut [f32]) {
    let (x, w) = (Operand::plain(x, d_in), Operand::plain(w, d_out));
    matmul((n, d_in, d_out), x, w, y, false, 1.0, true);
}

/// Gradients of [`linear`] from `dy: [n, d_out]`: `dx = dy · wᵀ` into
/// `dx`, and `dw = xᵀ · dy` into `dw`, or added to it when `accumulate_dw`.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    (n, d_in, d_out): (usize, usize, usize),
    dx: &mut [f32],
    dw: &mut [f32],
    accumulate_dw: bool,
) {
    let dy = Operand::plain(dy, d_out);
    let wt = Operand::transposed(w, d_out);
    matmul((n, d_out, d_in), dy, wt, dx, false, 1.0, true);
    let xt = Operand::transposed(x, d_in);
    matmul((d_in, n, d_out), xt, dy, dw, accumulate_dw, 1.0, true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_matmul_writes_only_its_block() {
        // a [2, 3] · b [3, 2] into columns 1..3 of a [2, 4] matrix.
        let a = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
        let mut c = [9.0f32; 8];
        matmul_strided(
            (2, 3, 2),
            Operand::plain(&a, 3),
            Operand::plain(&b, 2),
            (&mut c[1..], 4),
            false,
            1.0,
            false,
        );
        assert_eq!(c, [9.0, 4.0, 5.0, 9.0, 9.0, 10.0, 11.0, 9.0]);
    }
}
