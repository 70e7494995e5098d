//! Rotary position embeddings with their backward rule.

use candle_core::{Result, Tensor};

use super::{attach, Backward};

/// Rotary embedding ("rotate half" layout) of x (B, H, T, E) with cos/sin (T, E/2),
/// differentiable: the rotation's transpose is the rotation by the opposite angle.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let y = candle_nn::rotary_emb::rope(&x.detach().contiguous()?, cos, sin)?;
    attach(x, y, RopeGrad { cos: cos.clone(), sin: sin.clone() })
}

struct RopeGrad {
    cos: Tensor,
    sin: Tensor,
}

impl Backward for RopeGrad {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn grad(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Tensor> {
        candle_nn::rotary_emb::rope(&g.contiguous()?, &self.cos, &self.sin.neg()?)
    }
}
