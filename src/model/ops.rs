//! Custom tensor operations the training path needs and candle does not provide.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `x @ W^T` for a frozen weight `W`: the backward pass returns the gradient of `x` only.
///
/// candle's matmul backward computes the gradient of both operands, which for a frozen base
/// weight means a weight-sized buffer per projection and a third more FLOPs. Here the product is
/// computed by an ordinary matmul on a detached input and then routed through [`FrozenGrad`],
/// whose forward is a copy of that product and whose backward is `grad @ W`.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    // x: (N, in), weight: (out, in) -> (N, out)
    let y = x.detach().matmul(&weight.t()?)?;
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op2(&y, FrozenGrad { weight: weight.clone() })
}

/// Passes its second argument through; sends `grad @ weight` to its first.
struct FrozenGrad {
    weight: Tensor,
}

impl CustomOp2 for FrozenGrad {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, y: &CpuStorage, y_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((y.try_clone(y_layout)?, y_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        y: &candle_core::CudaStorage,
        y_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((y.try_clone(y_layout)?, y_layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // grad: (N, out), weight: (out, in) -> (N, in)
        let gx = grad.matmul(&self.weight.to_dtype(grad.dtype())?)?;
        Ok((Some(gx), None))
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
