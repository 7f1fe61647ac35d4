//! Rotary position embedding in the `rotate_half` convention of Hugging Face
//! (RoFormer, Su et al. 2021): the head is split into two halves and dimension
//! i is paired with i + head_dim/2, not with its interleaved neighbour as in
//! burn-nn's `RotaryEncoding`.

use crate::nn::in_dtype;
use burn::prelude::*;

/// Precomputed cos/sin tables for positions `0..max_len`.
#[derive(Module, Debug)]
pub struct Rope {
    /// `[max_len, head_dim]`, each half repeating the frequencies.
    cos: Tensor<2>,
    /// `[max_len, head_dim]`
    sin: Tensor<2>,
}

impl Rope {
    /// Tables for `max_len` positions of width `head_dim` (even) and base `theta`.
    pub fn new(head_dim: usize, max_len: usize, theta: f64, device: &Device) -> Self {
        let half = head_dim / 2;
        // Computed in f64 on the host once; the angles are exact to f32 rounding.
        let mut cos = Vec::with_capacity(max_len * head_dim);
        let mut sin = Vec::with_capacity(max_len * head_dim);
        for pos in 0..max_len {
            for i in 0..head_dim {
                let inv_freq = 1.0 / theta.powf((2 * (i % half)) as f64 / head_dim as f64);
                let angle = pos as f64 * inv_freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self {
            cos: Tensor::from_data(TensorData::new(cos, [max_len, head_dim]), device),
            sin: Tensor::from_data(TensorData::new(sin, [max_len, head_dim]), device),
        }
    }

    /// Number of positions the tables cover.
    pub fn max_len(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Rotate queries or keys, in the sequence-major layout the projections
    /// produce.
    ///
    /// # Shapes
    /// - `x`: `[B, S, H, head_dim]` → `[B, S, H, head_dim]`
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, s, _, hd] = x.dims();
        assert!(
            s <= self.max_len(),
            "sequence length {s} exceeds the RoPE table length {}",
            self.max_len()
        );
        let dt = x.dtype();
        let (cos, sin) = (
            in_dtype(self.cos.clone().slice([0..s]), dt),
            in_dtype(self.sin.clone().slice([0..s]), dt),
        );
        if let Some(y) = crate::kernels::rope(x.clone(), cos.clone(), sin.clone()) {
            return y;
        }
        let cos = cos.reshape([1, s, 1, hd]);
        let sin = sin.reshape([1, s, 1, hd]);
        let half = hd / 2;
        let x1 = x.clone().slice_dim(3, 0..half);
        let x2 = x.clone().slice_dim(3, half..hd);
        // rotate_half(x) = [-x2, x1]
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos + rotated * sin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_identity_and_norm_is_preserved() {
        let device = Device::flex();
        let rope = Rope::new(8, 4, 10_000.0, &device);
        let x = Tensor::<4>::random(
            [1, 4, 2, 8],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let y = rope.apply(x.clone());
        let x0: Vec<f32> = x
            .clone()
            .slice_dim(1, 0..1)
            .into_data()
            .try_to_vec()
            .unwrap();
        let y0: Vec<f32> = y
            .clone()
            .slice_dim(1, 0..1)
            .into_data()
            .try_to_vec()
            .unwrap();
        for (a, b) in x0.iter().zip(&y0) {
            assert!((a - b).abs() < 1e-6);
        }
        let nx: Vec<f32> = x.square().sum_dim(3).into_data().try_to_vec().unwrap();
        let ny: Vec<f32> = y.square().sum_dim(3).into_data().try_to_vec().unwrap();
        for (a, b) in nx.iter().zip(&ny) {
            assert!((a - b).abs() < 1e-4 * a.max(1.0));
        }
    }

    #[test]
    fn rotate_half_pairs_first_and_second_half() {
        // head_dim 2: one frequency (1.0); at position 1 the pair (x0, x1)
        // rotates by 1 radian: (x0 cos1 - x1 sin1, x1 cos1 + x0 sin1).
        let device = Device::flex();
        let rope = Rope::new(2, 2, 10_000.0, &device);
        let x = Tensor::<4>::from_data(
            TensorData::new(vec![0.0f32, 0.0, 1.0, 2.0], [1, 2, 1, 2]),
            &device,
        );
        let y: Vec<f32> = rope.apply(x).into_data().try_to_vec().unwrap();
        let (c, s) = (1f32.cos(), 1f32.sin());
        let want = [0.0, 0.0, c - 2.0 * s, 2.0 * c + s];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }
}
