//! RMSNorm with its backward rule, and the fused forms the layer op uses.

use candle_core::{Result, Tensor};

#[cfg(feature = "cuda")]
use super::fused;
use super::{attach, Backward};

#[cfg(feature = "cuda")]
pub mod cuda;

/// RMSNorm `y = w * x / sqrt(mean(x^2) + eps)` over the last dimension, differentiable in x
/// (w is frozen): with r = 1/sqrt(mean(x^2) + eps) and gw = g * w,
/// dx = r * gw - x * r^3 * mean(gw * x).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if x.dtype() == candle_core::DType::F64 {
        // candle's fused kernel has no f64 version: the plain composite (used by gradient checks).
        let r = (x.sqr()?.mean_keepdim(candle_core::D::Minus1)? + eps)?.sqrt()?;
        return x.broadcast_div(&r)?.broadcast_mul(weight);
    }
    let y = candle_nn::ops::rms_norm(&x.detach(), weight, eps as f32)?;
    attach(x, y, RmsNormGrad { weight: weight.clone(), eps })
}

/// [`rms_norm`]'s value of an untracked x.
pub(crate) fn rms_norm_value(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if x.dtype() == candle_core::DType::F64 {
        return rms_norm(x, weight, eps);
    }
    #[cfg(feature = "cuda")]
    if fused(x) && weight.dtype() == candle_core::DType::BF16 && cuda::rms_norm_fits(x.dim(candle_core::D::Minus1)?) {
        return cuda::rms_norm(x, weight, eps);
    }
    candle_nn::ops::rms_norm(x, weight, eps as f32)
}

/// [`rms_norm`]'s input gradient from the output's, `g`.
pub(crate) fn rms_norm_backward(x: &Tensor, weight: &Tensor, eps: f64, g: &Tensor) -> Result<Tensor> {
    RmsNormGrad { weight: weight.clone(), eps }.grad(x, x, g)
}

/// `plus` + [`rms_norm_backward`]: the gradient of a residual stream x that also feeds a norm (one
/// fused pass on the GPU in bf16).
pub(crate) fn rms_norm_backward_plus(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    g: &Tensor,
    plus: &Tensor,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(x) && weight.dtype() == candle_core::DType::BF16 {
        return cuda::rms_norm_backward_plus(x, g, weight, plus, eps);
    }
    plus + rms_norm_backward(x, weight, eps, g)?
}

struct RmsNormGrad {
    weight: Tensor,
    eps: f64,
}

impl Backward for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm"
    }
    fn grad(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Tensor> {
        use candle_core::{DType, D};
        #[cfg(feature = "cuda")]
        if fused(x) && self.weight.dtype() == DType::BF16 {
            return cuda::rms_norm_backward(x, g, &self.weight, self.eps);
        }
        let dtype = x.dtype();
        let up = |t: &Tensor| if dtype == DType::F64 { Ok(t.clone()) } else { t.to_dtype(DType::F32) };
        let (xf, gf) = (up(x)?, up(g)?);
        let gw = gf.broadcast_mul(&up(&self.weight)?)?;
        let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        let s = (&gw * &xf)?.mean_keepdim(D::Minus1)?;
        let dx = (gw.broadcast_mul(&r)? - xf.broadcast_mul(&(r.powf(3.0)? * s)?)?)?;
        dx.to_dtype(dtype)
    }
}
