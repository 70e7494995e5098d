//! SwiGLU's product silu(gate) * up, and its gradients.

use candle_core::{Result, Tensor};

#[cfg(feature = "cuda")]
use super::super::fused;

/// silu(gate) * up, SwiGLU's product: one fused kernel each way on the GPU in bf16, and one pass
/// on the CPU's threads in f32 (untracked tensors).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(gate) {
        return super::cuda::gated_mul(crate::model::config::Activation::Silu, gate, up);
    }
    if let Some(h) = super::cpu::silu_mul(gate, up)? {
        return Ok(h);
    }
    gate.silu()? * up
}

/// The gradients of gate and up from that of silu(gate) * up, for untracked tensors of one shape:
/// dgate = dh * up * sig(g) * (1 + g * (1 - sig(g))), dup = dh * silu(g).
pub fn silu_mul_backward(gate: &Tensor, up: &Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if fused(gate) {
        return super::cuda::gated_mul_backward(crate::model::config::Activation::Silu, gate, up, dh);
    }
    if let Some(grads) = super::cpu::silu_mul_backward(gate, up, dh)? {
        return Ok(grads);
    }
    let sig = candle_nn::ops::sigmoid(gate)?;
    let silu = (gate * &sig)?;
    let dsilu = (&sig * ((gate * (1.0 - &sig)?)? + 1.0)?)?;
    Ok((((dh * up)? * dsilu)?, (dh * silu)?))
}
