//! Gradient checkpointing: a layer keeps only its input for the backward pass.
//!
//! Without it, every layer keeps its activations (normalised inputs, q/k/v, the MLP's two
//! (tokens x intermediate) products...) from the forward pass until the backward pass reaches
//! it; for a 7B model at 4 x 2048 tokens that is most of a GPU. With it, the forward pass runs
//! each layer and drops what it saved at once, so nothing is kept but the layer's input and
//! output, and gives the output a backward rule that runs the layer again, this time tracked,
//! and back-propagates through that second run alone. The cost is one more forward pass.
//!
//! Every layer runs as one op ([`super::lora`]) and all layers are one graph node ([`stack`]),
//! whose backward rule reruns each layer just before its gradient, without the layer's last
//! product, whose output the backward pass never reads.
//!
//! The input's gradient goes back to the outer graph through the rule; the adapter's gradients
//! of the second run go to the pass's [`GradSink`], which the trainer reads after each backward
//! pass.
//! LoRA dropout draws the same masks in both runs: the rule keeps the random stream's state from
//! before the first.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor};
use rand_chacha::ChaCha8Rng;

use super::decoder::{Layer, Mask, Pass, Rope, Span};
use super::ops::{self, attach, Backward};
use super::sink::GradSink;
use crate::adapter::Adapter;

/// All decoder layers under gradient checkpointing as one op, each run as one op itself:
/// x (B, T, D) -> (B, T, D). The caller checks that every layer runs as one (see
/// `Layer::runs_as_one_op`).
pub(crate) fn stack(layers: &[Layer], x: &Tensor, span: Span, pass: Pass, sink: &Arc<GradSink>) -> Result<Tensor> {
    let adapter =
        pass.adapter.ok_or_else(|| candle_core::Error::Msg("gradient checkpointing needs an adapter".into()))?;
    let mut h = x.detach();
    let mut inputs = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let rng = pass.dropout_rng.map(|r| r.borrow().clone());
        let out = super::lora::layer_output(&h, layer.lora_parts(&h, span, pass, i)?, sink)?;
        inputs.push(LayerInput { x: h, rng });
        h = out;
    }
    let (anchor, input_grad) = ops::anchor(x)?;
    let rule = RerunLayers {
        input_grad,
        layers: layers.to_vec(),
        inputs: Mutex::new(inputs),
        rope: span.rope.clone(),
        pos: span.pos,
        mask: span.mask.cloned(),
        windowed: span.windowed.cloned(),
        adapter: adapter.clone(),
        sink: sink.clone(),
    };
    attach(&anchor, h, rule)
}

/// A layer's input, and the dropout stream's state before the layer drew its keys.
struct LayerInput {
    x: Tensor,
    rng: Option<ChaCha8Rng>,
}

/// What [`stack`]'s backward pass needs: the layers and their inputs (each freed once its
/// layer's gradient is computed), and whether the first input's gradient is wanted (see
/// [`ops::anchor`]).
struct RerunLayers {
    input_grad: bool,
    layers: Vec<Layer>,
    inputs: Mutex<Vec<LayerInput>>,
    rope: Rope,
    pos: usize,
    mask: Option<Mask>,
    windowed: Option<Mask>,
    adapter: Adapter,
    sink: Arc<GradSink>,
}

impl Backward for RerunLayers {
    fn name(&self) -> &'static str {
        "checkpointed-layers"
    }

    fn grad(&self, anchor: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let mut inputs = self.inputs.lock().map_err(|_| candle_core::Error::Msg("layer inputs poisoned".into()))?;
        let span = Span { rope: &self.rope, pos: self.pos, mask: self.mask.as_ref(), windowed: self.windowed.as_ref() };
        let mut grad = grad.clone();
        while let Some(LayerInput { x, rng }) = inputs.pop() {
            let index = inputs.len();
            let rng = rng.map(RefCell::new);
            let pass = Pass::train(&self.adapter, rng.as_ref()).with_sink(&self.sink);
            let parts = self.layers[index].lora_parts(&x, span, pass, index)?;
            let rule = super::lora::layer_rerun(&x, parts, &self.sink)?;
            match rule.backward(&x, &grad, self.input_grad || index > 0)? {
                Some(g) => grad = g,
                None => return anchor.zeros_like(),
            }
        }
        Ok(grad)
    }
}
