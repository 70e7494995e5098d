//! The tensor operations the model runs where candle's own are missing or slow, one folder per
//! fused op: its CPU path and backward rule in `mod.rs`, its GPU launchers in `cuda.rs`
//! (feature `cuda`) and its kernels beside them in `.cu` files, which
//! `src/model/cuda/kernels.cu` gathers into one PTX module (the CPU's own kernels are in
//! [`super::cpu`]). This file holds what the ops share: how a rule is attached to a value
//! computed outside candle's graph ([`attach`], [`Backward`]), and whether the GPU's fused
//! kernels apply.
//!
//! - [`linear`]: frozen projections, products accumulated in place, the LoRA term's bias column;
//! - [`gather`]: rows of a tensor, with a gather for a backward pass;
//! - [`softmax`], [`rms_norm`], [`rope`]: candle's fused forwards given backward rules;
//! - [`attention`]: attention that recomputes its probabilities (flash kernels, a materialised
//!   softmax, decoding from the cache), and the layer's self-attention;
//! - [`loss`]: chunked cross-entropy through the output head;
//! - [`gated`]: the gated MLP's product (SwiGLU, GeGLU);
//! - [`dropout`]: LoRA's keyed dropout;
//! - [`sampling`], [`optimizer`]: the GPU kernels of the sampler's draws and of the AdamW step,
//!   whose CPU paths are in `crate::sample` and `crate::train`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Result, Shape, Tensor};

/// Whether the fused GPU kernels of [`super::cuda`] take this tensor (bf16 on a GPU).
#[cfg(feature = "cuda")]
fn fused(t: &Tensor) -> bool {
    super::cuda::applies(t)
}

/// Whether [`add_matmul`] accumulates in place (on the GPU in bf16) rather than adding a product.
pub(crate) fn accumulates(t: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    if fused(t) {
        return true;
    }
    let _ = t;
    false
}

/// The backward rule of a fused forward op that candle provides without one.
pub(crate) trait Backward: Send + Sync {
    fn name(&self) -> &'static str;
    /// Gradient of the input `x`, given the output `y` and the output's gradient `grad`.
    fn grad(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Tensor>;
}

/// What an op over several layers attaches its backward rule to, and whether its input's
/// gradient is wanted: `x` itself where it is tracked; otherwise (the first layer's input, the
/// frozen embedding's output) a one-element variable, so that the rule runs without computing
/// a (tokens x hidden) gradient, and the products behind it, that no one reads.
pub(crate) fn anchor(x: &Tensor) -> Result<(Tensor, bool)> {
    match x.track_op() {
        true => Ok((x.clone(), true)),
        false => Ok((candle_core::Var::zeros(1, x.dtype(), x.device())?.as_tensor().clone(), false)),
    }
}

/// Gives `y` (computed from `x` by a fused kernel without backward) the backward rule `rule`.
/// The forward is a copy of `y`, one memory pass, instead of the several ops (each with its
/// own backward) that the differentiable composite would take.
pub(crate) fn attach<B: Backward + 'static>(x: &Tensor, y: Tensor, rule: B) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op1(Attached { rule, out: Handoff::new(y)? })
}

/// A tensor computed before a custom op is applied, handed to the op's forward once and released
/// there: the autograd graph keeps the op alive until the backward pass, and must not keep a
/// second copy of every output with it.
struct Handoff(std::sync::Mutex<Option<Tensor>>);

impl Handoff {
    fn new(t: Tensor) -> Result<Self> {
        Ok(Handoff(std::sync::Mutex::new(Some(t.detach().contiguous()?))))
    }

    fn take(&self) -> Result<Tensor> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("handoff lock poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("custom op forward ran twice".into()))
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let t = self.take()?;
        let (storage, layout) = t.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("custom op: tensor on another device"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        let t = self.take()?;
        let (storage, layout) = t.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("custom op: tensor on another device"),
        }
    }
}

/// The forward of a custom op of 1 or 3 inputs whose output was computed before the op was
/// applied: hands over `self.out` (a [`Handoff`]) on either device.
macro_rules! handed_over {
    (1) => {
        fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            self.out.cpu()
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &candle_core::Layout) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            self.out.cuda()
        }
    };
    (3) => {
        #[rustfmt::skip]
        fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &candle_core::Layout, _: &candle_core::CpuStorage, _: &candle_core::Layout, _: &candle_core::CpuStorage, _: &candle_core::Layout)
            -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            self.out.cpu()
        }

        #[cfg(feature = "cuda")]
        #[rustfmt::skip]
        fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &candle_core::Layout, _: &candle_core::CudaStorage, _: &candle_core::Layout,
                    _: &candle_core::CudaStorage, _: &candle_core::Layout) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            self.out.cuda()
        }
    };
}

struct Attached<B> {
    rule: B,
    out: Handoff,
}

impl<B: Backward> candle_core::CustomOp1 for Attached<B> {
    fn name(&self) -> &'static str {
        self.rule.name()
    }

    handed_over!(1);

    fn bwd(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.rule.grad(x, y, grad)?))
    }
}

// The ops, after the plumbing above (its macro is visible only below its definition).
pub mod attention;
pub mod dropout;
pub mod gated;
pub mod gather;
#[cfg(test)]
mod gradient_tests;
pub mod linear;
pub mod loss;
pub mod optimizer;
pub mod rms_norm;
mod rope;
pub mod sampling;
mod softmax;

pub(crate) use attention::QkvHeads;
pub use attention::{attention, SelfAttention};
pub use gated::{gated, gated_backward, gelu_mul, gelu_mul_backward, silu_mul, silu_mul_backward};
pub use gather::gather_rows;
pub(crate) use linear::add_matmul;
pub use linear::frozen_linear;
pub use loss::linear_cross_entropy;
pub use rms_norm::rms_norm;
pub(crate) use rms_norm::{rms_norm_backward, rms_norm_backward_plus, rms_norm_value};
pub use rope::rope;
pub use softmax::softmax_last_dim;
