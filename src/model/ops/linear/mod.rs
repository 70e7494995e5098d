//! Frozen projections: the input's gradient only, never a weight-sized one; and products
//! accumulated into a tensor in place on the GPU.

use candle_core::{Result, Tensor};

#[cfg(feature = "cuda")]
use super::accumulates;
use super::{attach, Backward};

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

/// `c + a b^T` (`b_transposed`: b is (M, K)) or `c + a b` (b is (K, M)), for c (N, M) and
/// a (N, K), untracked. On the GPU in bf16 one product accumulates into `c` in place
/// ([`cuda::add_matmul`]), and on the CPU in f32 a thin one ([`cpu::add_product`]): `c` must be a
/// tensor the caller has just computed and holds alone. Elsewhere the product is added.
pub(crate) fn add_matmul(c: Tensor, a: &Tensor, b: &Tensor, b_transposed: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if accumulates(&c) && c.is_contiguous() {
        cuda::add_matmul(&c, a, b, b_transposed)?;
        return Ok(c);
    }
    // A thin product (an adapter's, whose inner dimension is its rank) adds into c in place.
    if cpu::applies(&[&c, a, b]) && c.is_contiguous() && a.dim(1)? <= THIN {
        let b = if b_transposed { b.t()? } else { b.clone() };
        cpu::add_product(&c, a, &b)?;
        return Ok(c);
    }
    let product = if b_transposed { a.matmul(&b.t()?)? } else { a.matmul(b)? };
    c + product
}

/// `a @ b` for a (N, K) and b (K, M) where one dimension is an adapter's rank: on the CPU in f32
/// one pass on candle's pool ([`cpu::product`]), elsewhere candle's product.
pub(crate) fn thin_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if cpu::applies(&[a, b]) {
        return cpu::product(a, b);
    }
    a.matmul(b)
}

/// The largest inner dimension for which [`add_matmul`] on the CPU adds in place through
/// [`cpu::add_product`] (a LoRA rank): beyond it the general library's blocking pays.
pub(crate) const THIN: usize = 64;

/// `x @ W^T` for a frozen weight `W`: the backward pass returns the gradient of `x` only.
///
/// candle's matmul backward computes the gradient of both operands, which for a frozen base
/// weight means a weight-sized buffer per projection and a third more FLOPs. Here the product is
/// computed by an ordinary matmul on a detached input and given the backward rule `grad @ W`.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    // x: (N, in), weight: (out, in) -> (N, out)
    let y = x.detach().matmul(&weight.detach().t()?)?;
    attach(x, y, FrozenLinearGrad { weight: weight.detach() })
}

struct FrozenLinearGrad {
    weight: Tensor,
}

impl Backward for FrozenLinearGrad {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }
    fn grad(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        // grad: (N, out), weight: (out, in) -> (N, in)
        grad.matmul(&self.weight.to_dtype(grad.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn frozen_linear_gives_the_input_gradient_and_none_for_the_weight() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::arange(0f32, 6., &dev)?.reshape((2, 3))?)?;
        let w = Tensor::new(&[[1f32, 2., 3.], [0.5, -1., 2.]], &dev)?;
        let y = frozen_linear(x.as_tensor(), &w)?;
        let reference = x.as_tensor().detach().matmul(&w.t()?)?;
        let diff = (y.clone() - reference)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        let grads = y.sum_all()?.backward()?;
        // d(sum(x W^T))/dx = ones(2,2) @ W
        let gx = grads.get(x.as_tensor()).expect("x gets a gradient").to_vec2::<f32>()?;
        assert_eq!(gx, vec![vec![1.5, 1.0, 5.0], vec![1.5, 1.0, 5.0]]);
        assert!(grads.get(&w).is_none());
        Ok(())
    }
}
