//! A frozen projection with its LoRA term as one differentiable op, for training:
//! `y = x W^T + b + scale * (mask * x) A^T B^T`, whose backward rule computes the input's
//! gradient and hands the adapter's gradients to a [`GradSink`] instead of candle's graph.
//!
//! Why: composed from candle ops, the term is a chain of nodes (dropout, two products, the
//! scaling, the sum, reshapes), and candle's backward pass zero-fills and adds a buffer for
//! every gradient that reaches a node. For the MLP of a 7B model at 4 x 1024 tokens that is a
//! dozen passes over (tokens x intermediate) tensors per layer, more GPU time than the layer's
//! products. Here the projection is one node with one input: the backward pass runs the three
//! small products of the adapter and one product with the frozen weight, nothing else.
//!
//! Shapes: x (..., in), flattened to (N, in) inside; W (out, in); A (r, in); B (out, r); the
//! dropout mask (N, in) holds 0 or 1 / (1 - p). The op takes x as it comes (a reshape would be
//! one more node, and one more zero-filled gradient buffer).

use std::sync::Arc;

use candle_core::{Result, Tensor, Var};

use super::checkpoint::GradSink;
use super::ops::{attach, Backward};
use crate::adapter::LoraPair;

/// `x W^T + bias + scale * (mask * x) A^T B^T`, x (..., in) -> (..., out); the gradients of A
/// and B go to `sink`, summed over the calls of a backward pass.
pub(crate) fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    pair: &LoraPair,
    scale: f64,
    mask: Option<Tensor>,
    sink: &Arc<GradSink>,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let d_in = x.dim(candle_core::D::Minus1)?;
    let n = x.elem_count() / d_in;
    let xd = x.detach().reshape((n, d_in))?;
    let mask = mask.map(|m| m.reshape((n, d_in))).transpose()?;
    // The adapter in the activations' dtype, its scale folded into B (a small matrix).
    let a = pair.a.as_tensor().detach().to_dtype(dtype)?; // (r, in)
    let b = (pair.b.as_tensor().detach() * scale)?.to_dtype(dtype)?; // (out, r)
    let xin = match &mask {
        Some(m) => (&xd * m)?,
        None => xd.clone(),
    };
    let z = xin.matmul(&a.t()?)?; // (N, r)
    let mut y = xd.matmul(&weight.t()?)?; // (N, out)
    if let Some(bias) = bias {
        y = y.broadcast_add(bias)?;
    }
    let mut out_shape = x.dims().to_vec();
    *out_shape.last_mut().expect("x has a last dimension") = weight.dim(0)?;
    let y = (y + z.matmul(&b.t()?)?)?.reshape(out_shape)?;
    // An untracked input (the first layer's) still needs the node, for the adapter's sake.
    let x = if x.track_op() { x.clone() } else { Var::from_tensor(x)?.as_tensor().clone() };
    let rule = LoraLinearGrad {
        weight: weight.detach(),
        a,
        b,
        a_var: pair.a.clone(),
        b_var: pair.b.clone(),
        scale,
        mask,
        z,
        sink: sink.clone(),
    };
    attach(&x, y, rule)
}

struct LoraLinearGrad {
    weight: Tensor, // (out, in)
    a: Tensor,      // (r, in)
    b: Tensor,      // (out, r), scaled
    a_var: Var,
    b_var: Var,
    scale: f64,
    mask: Option<Tensor>, // (N, in)
    z: Tensor,            // (N, r) = (mask * x) A^T
    sink: Arc<GradSink>,
}

impl Backward for LoraLinearGrad {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn grad(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let n = self.z.dim(0)?;
        let grad = grad.contiguous()?.reshape((n, ()))?; // (N, out)
        let shape = x.shape().clone();
        let x = x.detach().reshape((n, ()))?;
        let xin = match &self.mask {
            Some(m) => (&x * m)?,
            None => x,
        };
        let dz = grad.matmul(&self.b)?; // (N, r) = scale * dY B
                                        // dB = scale * dY^T z: (out, r); dA = dz^T (mask * x): (r, in)
        let db = (grad.t()?.matmul(&self.z)? * self.scale)?;
        let da = dz.t()?.matmul(&xin)?;
        let f32_of = |t: Tensor, v: &Var| t.to_dtype(v.dtype());
        self.sink.add(self.a_var.as_tensor().id(), f32_of(da, &self.a_var)?)?;
        self.sink.add(self.b_var.as_tensor().id(), f32_of(db, &self.b_var)?)?;
        // dX = dY W + mask * (dz A)
        let through_adapter = dz.matmul(&self.a)?;
        let through_adapter = match &self.mask {
            Some(m) => (through_adapter * m)?,
            None => through_adapter,
        };
        (grad.matmul(&self.weight.to_dtype(grad.dtype())?)? + through_adapter)?.reshape(shape)
    }
}
