//! The gated MLP's product act(gate) * up and its gradients, for the activation a config names:
//! SwiGLU ([`silu_mul`]) or GeGLU ([`gelu_mul`]). Changing or adding an activation is a function
//! here, one in `gated.cu` (`act_of`, `gated_mul_grads`), and a variant of
//! [`Activation`](crate::model::config::Activation).

use candle_core::{Result, Tensor};

use crate::model::config::Activation;

mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod gelu;
mod silu;

pub use gelu::{gelu_mul, gelu_mul_backward};
pub use silu::{silu_mul, silu_mul_backward};

/// act(gate) * up, the gated MLP's product, for untracked or tracked tensors of one shape.
pub fn gated(activation: Activation, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    match activation {
        Activation::Silu => silu_mul(gate, up),
        Activation::GeluTanh => gelu_mul(gate, up),
    }
}

/// The gradients of gate and up from that of [`gated`]'s product.
pub fn gated_backward(activation: Activation, gate: &Tensor, up: &Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    match activation {
        Activation::Silu => silu_mul_backward(gate, up, dh),
        Activation::GeluTanh => gelu_mul_backward(gate, up, dh),
    }
}
