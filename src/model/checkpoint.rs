//! Gradient checkpointing: a layer keeps only its input for the backward pass.
//!
//! Without it, every layer keeps its activations (normalised inputs, q/k/v, the MLP's two
//! (tokens x intermediate) products...) from the forward pass until the backward pass reaches
//! it; for a 7B model at 4 x 2048 tokens that is most of a GPU. With it, the forward pass runs
//! each layer and drops what it saved at once, so nothing is kept but the layer's input and
//! output, and gives the output a backward rule that runs the layer again, this time tracked,
//! and back-propagates through that second run alone. The cost is one more forward pass.
//!
//! The input's gradient goes back to the outer graph through the rule; the adapter's gradients
//! of the second run go to the pass's [`GradSink`], which the trainer reads after each backward
//! pass.
//! LoRA dropout draws the same masks in both runs: the rule keeps the random stream's state from
//! before the first.

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::{Result, Tensor, Var};
use rand_chacha::ChaCha8Rng;

use super::decoder::{Layer, Mask, Pass, Rope, Span};
use super::ops::{attach, tracked, Backward};
use super::sink::GradSink;
use crate::adapter::Adapter;

/// One decoder layer under gradient checkpointing: x (B, T, D) -> (B, T, D).
pub(crate) fn layer(
    layer: &Layer,
    x: &Tensor,
    span: Span,
    pass: Pass,
    index: usize,
    sink: &Arc<GradSink>,
) -> Result<Tensor> {
    let adapter =
        pass.adapter.ok_or_else(|| candle_core::Error::Msg("gradient checkpointing needs an adapter".into()))?;
    let rng_before = pass.dropout_rng.map(|r| r.borrow().clone());
    // The first run as the second will run (the same ops, the layer's single op where it
    // applies), its graph dropped as soon as the output is taken: the state it saved for a
    // backward pass goes with it.
    let first = Pass { checkpoint: false, ..pass };
    let y = layer.forward(&x.detach(), span, None, first, index)?.detach();
    let x = tracked(x)?;
    let rule = Recompute {
        layer: layer.clone(),
        rope: span.rope.clone(),
        pos: span.pos,
        mask: span.mask.cloned(),
        index,
        adapter: adapter.clone(),
        rng: rng_before,
        sink: sink.clone(),
    };
    attach(&x, y, rule)
}

/// What the second run of a layer needs.
struct Recompute {
    layer: Layer,
    rope: Rope,
    pos: usize,
    mask: Option<Mask>,
    index: usize,
    adapter: Adapter,
    rng: Option<ChaCha8Rng>,
    sink: Arc<GradSink>,
}

impl Backward for Recompute {
    fn name(&self) -> &'static str {
        "checkpointed-layer"
    }

    fn grad(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let input = Var::from_tensor(&x.detach())?;
        let rng = self.rng.clone().map(RefCell::new);
        let pass = Pass::train(&self.adapter, rng.as_ref()).with_sink(&self.sink);
        let span = Span { rope: &self.rope, pos: self.pos, mask: self.mask.as_ref() };
        let y = self.layer.forward(input.as_tensor(), span, None, pass, self.index)?;
        // d(sum(y * g))/dy = g: the backward pass of this run carries exactly `grad`.
        let grads = (y * grad.detach())?.sum_all()?.backward()?;
        for pair in self.adapter.pairs.iter().filter(|((l, _), _)| *l == self.index).map(|(_, p)| p) {
            for var in [&pair.a, &pair.b] {
                if let Some(g) = grads.get(var.as_tensor()) {
                    self.sink.add(var.as_tensor().id(), g.clone())?;
                }
            }
        }
        grads
            .get(input.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("checkpointed layer: no gradient for its input".into()))
    }
}
