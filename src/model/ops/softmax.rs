//! Softmax over the last dimension with its backward rule.

use candle_core::{Result, Tensor};

use super::{attach, Backward};

/// Softmax over the last dimension, differentiable: dx = y * (g - sum(g * y)).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::softmax_last_dim(&x.detach())?;
    attach(x, y, SoftmaxGrad)
}

struct SoftmaxGrad;

impl Backward for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }
    fn grad(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Tensor> {
        let dot = (g * y)?.sum_keepdim(candle_core::D::Minus1)?;
        y * g.broadcast_sub(&dot)?
    }
}
