//! A whole decoder layer as one differentiable op for training: RMSNorm, the seven projections
//! each with its LoRA term `x W^T + b + scale * (mask * x) A^T B^T`, self-attention, the gated
//! MLP, the family's extra norms (per-head q/k, the outputs') and both residuals. Its backward rule computes the layer input's gradient and hands the adapter's
//! gradients to a [`GradSink`] instead of candle's graph.
//!
//! Why: composed from candle ops, a layer is some fifty graph nodes (each adapter term alone is
//! a chain: dropout, two products, the scaling, the sum, reshapes), and candle's backward pass
//! zero-fills and adds a buffer for every gradient that reaches a node. For a 7B model at
//! 4 x 1024 tokens that is a dozen (tokens x hidden) and several (tokens x intermediate) passes
//! per layer, once more GPU time than the layer's products. Here the layer is one node: the
//! backward pass runs the products and a few fused kernels; the input gradients of projections
//! that share an input accumulate into one buffer, and each frozen product accumulates into its
//! adapter's term ([`super::ops::add_matmul`]).
//!
//! Shapes: N = B*T rows; W (out, in); A (r, in); B (out, r); the dropout mask (N, in), drawn from
//! its key where it is applied, holds 0 or 1 / (1 - p).

use std::sync::Arc;

use candle_core::{Result, Tensor, Var};

use super::config::Activation;
use super::ops::dropout::Dropout;
use super::ops::linear;
use super::ops::{self, accumulates, add_matmul, attach, Backward, QkvHeads, SelfAttention};
use super::packed::PackedMatrix;
use super::sink::GradSink;
use crate::adapter::LoraPair;

/// A frozen projection and its adapter pair, as the forward pass is given them.
pub(crate) struct Projection<'a> {
    pub weight: &'a Tensor, // (out, in)
    pub bias: Option<&'a Tensor>,
    /// None: a frozen projection without an adapter pair (its target is not adapted).
    pub pair: Option<&'a LoraPair>,
    pub scale: f64,
    /// LoRA dropout of the input.
    pub dropout: Option<Dropout>,
    /// The weight packed for the CPU's f32 kernels, which then compute its products (see
    /// [`super::packed`]); None where a group's packed weight serves it (q/k/v, gate/up).
    pub packed: Option<Arc<PackedMatrix>>,
}

impl Projection<'_> {
    /// x (N, in), untracked -> (N, out), and what the backward pass needs. `z`: the adapter's
    /// input product where it is already computed (see [`shared_input_products`]).
    fn forward(self, x: &Tensor, z: Option<Tensor>, sink: &Arc<GradSink>) -> Result<(Tensor, Saved)> {
        self.forward_onto(x, z, None, sink)
    }

    /// [`Projection::forward`] with its frozen product x W^T (N, out) already computed, as one
    /// product for a group of projections that share x (see [`Group`]).
    fn forward_grouped(
        self,
        x: &Tensor,
        z: Option<Tensor>,
        frozen: Tensor,
        sink: &Arc<GradSink>,
    ) -> Result<(Tensor, Saved)> {
        self.forward_packed(x, z, frozen, None, Frozen::Group, sink)
    }

    /// The output from the frozen product `frozen` (N, out): plus the adapter's term or the bias,
    /// and `onto` where given; `how` says how the backward pass gets the input's gradient.
    fn forward_packed(
        self,
        x: &Tensor,
        z: Option<Tensor>,
        frozen: Tensor,
        onto: Option<Tensor>,
        how: Frozen,
        sink: &Arc<GradSink>,
    ) -> Result<(Tensor, Saved)> {
        let (y, adapter) = match self.pair {
            Some(pair) => {
                let (staged, z) = self.adapter_input(pair, x, z, sink)?;
                // frozen is the packed product's fresh output, which no one else holds: the
                // adapter's term adds into it (in place on the CPU in f32, see `add_matmul`).
                (staged.term(Some(frozen), &z, self.bias)?, Some((pair, staged, z, sink)))
            }
            None => match self.bias {
                Some(bias) => (frozen.broadcast_add(bias)?, None),
                None => (frozen, None),
            },
        };
        let y = match onto {
            Some(onto) => (onto + y)?,
            None => y,
        };
        Ok((y, self.saved_as(adapter, how)))
    }

    /// [`Projection::forward`] added to `onto` (N, out), a residual stream: on the GPU the
    /// products accumulate into it (it must then be a fresh copy held by the caller alone), where
    /// adding the output afterwards would take a pass of its own.
    fn forward_onto(
        self,
        x: &Tensor,
        z: Option<Tensor>,
        onto: Option<Tensor>,
        sink: &Arc<GradSink>,
    ) -> Result<(Tensor, Saved)> {
        if let Some(packed) = self.packed.clone() {
            let frozen = crate::model::cpu::linear_packed(x, &packed)?; // (N, out)
            return self.forward_packed(x, z, frozen, onto, Frozen::Packed(packed), sink);
        }
        let Some(pair) = self.pair else {
            let y = match onto {
                Some(onto) => add_matmul(onto, x, self.weight, true)?,
                None => x.matmul(&self.weight.t()?)?,
            };
            let y = match self.bias {
                Some(bias) => y.broadcast_add(bias)?,
                None => y,
            };
            return Ok((y, self.saved(None)));
        };
        let (staged, z) = self.adapter_input(pair, x, z, sink)?;
        // The adapter's term first, then the frozen product accumulated into it: a product that
        // accumulates reads its output while it computes, at no cost; the other order would add
        // the small product into the large one's output, a read and a write of (N, out).
        let y = add_matmul(staged.term(onto, &z, self.bias)?, x, self.weight, true)?; // (N, out)
        Ok((y, self.saved(Some((pair, staged, z, sink)))))
    }

    /// What the backward pass needs without the output: the last projection of a layer run
    /// again by gradient checkpointing, whose output nothing reads.
    fn saved_only(self, x: &Tensor, sink: &Arc<GradSink>) -> Result<Saved> {
        let adapter = match self.pair {
            Some(pair) => {
                let (staged, z) = self.adapter_input(pair, x, None, sink)?;
                Some((pair, staged, z, sink))
            }
            None => None,
        };
        Ok(self.saved(adapter))
    }

    /// The step's staged adapter weights and the adapter's input product z = (mask * x) A^T
    /// (N, r), unless given. Contiguous unless a bias column is put beside it, which reads it in
    /// place.
    fn adapter_input(
        &self,
        pair: &LoraPair,
        x: &Tensor,
        z: Option<Tensor>,
        sink: &Arc<GradSink>,
    ) -> Result<(Staged, Tensor)> {
        let staged = self.staged(pair, x, sink)?;
        let z = match z {
            Some(z) if staged.b_bias.is_some() => z,
            Some(z) => z.contiguous()?,
            None => {
                let xin = match &self.dropout {
                    Some(d) => d.apply(x)?,
                    None => x.clone(),
                };
                xin.matmul(&staged.a.t()?)?
            }
        };
        Ok((staged, z))
    }

    /// The pair's weights as the products use them this optimizer step.
    fn staged(&self, pair: &LoraPair, like: &Tensor, sink: &Arc<GradSink>) -> Result<Staged> {
        sink.staged(&pair.b, || Staged::new(pair, self.scale, self.bias, like))
    }

    /// The backward pass's state, with the adapter's (pair, staged weights, z, sink) where adapted.
    fn saved(self, adapter: Option<(&LoraPair, Staged, Tensor, &Arc<GradSink>)>) -> Saved {
        let how = match &self.packed {
            Some(packed) => Frozen::Packed(packed.clone()),
            None => Frozen::Weight(self.weight.detach()),
        };
        self.saved_as(adapter, how)
    }

    /// [`Projection::saved`] with the frozen product's backward rule `how`.
    fn saved_as(self, adapter: Option<(&LoraPair, Staged, Tensor, &Arc<GradSink>)>, how: Frozen) -> Saved {
        let adapter = adapter.map(|(pair, Staged { a, b, .. }, z, sink)| SavedAdapter {
            a,
            b,
            a_var: pair.a.clone(),
            b_var: pair.b.clone(),
            scale: self.scale,
            dropout: self.dropout,
            z,
            sink: sink.clone(),
        });
        Saved { frozen: how, adapter }
    }
}

/// The adapter input products z = x A^T of projections that share their input x (N, in), as
/// views of the columns of one product `x [A1; A2; ..]^T` (N, sum r); None for each where one of
/// them has no adapter pair or draws dropout (each then masks x its own way).
///
/// Why: each product reads all of x for a few dozen columns of output; one product reads it once.
///
/// The product is the general library's, whose rounding depends on its number of rows: with a
/// packing it runs on the padded rows, so that each token's z is the padded batch's.
fn shared_input_products<const K: usize>(
    projections: [&Projection; K],
    x: &Tensor,
    sink: &Arc<GradSink>,
    packing: Option<&Packing>,
) -> Result<[Option<Tensor>; K]> {
    let mut out = std::array::from_fn(|_| None);
    let pairs: Option<Vec<&LoraPair>> = projections.iter().map(|p| p.pair.filter(|_| p.dropout.is_none())).collect();
    let Some(pairs) = pairs else { return Ok(out) };
    let stacked = sink.stacked(&pairs[0].a, || {
        let a: Vec<Tensor> =
            projections.iter().zip(&pairs).map(|(p, pair)| Ok(p.staged(pair, x, sink)?.a)).collect::<Result<_>>()?;
        Tensor::cat(&a, 0)
    })?; // (sum r, in)
    let z = match packing {
        Some(p) => {
            let padded = p.spread(x)?; // (B, T, in)
            p.pack(&padded.reshape((p.b * p.t, ()))?.matmul(&stacked.t()?)?)?
        }
        None => x.matmul(&stacked.t()?)?,
    }; // (N, sum r)
    let mut offset = 0;
    for (slot, pair) in out.iter_mut().zip(&pairs) {
        let r = pair.a.dim(0)?;
        *slot = Some(z.narrow(1, offset, r)?);
        offset += r;
    }
    Ok(out)
}

/// An adapter pair's weights in the activations' dtype, as the products use them. They are made
/// once per optimizer step ([`GradSink::staged`]): casting and scaling them for every
/// micro-batch took a few launches per projection.
#[derive(Clone)]
pub(crate) struct Staged {
    a: Tensor, // (r, in)
    b: Tensor, // (out, r), scaled
    /// On the GPU, for a projection with a bias: `[B | bias | 0..]` (out, r + pad), so that one
    /// product gives the adapter's term and the bias.
    b_bias: Option<Tensor>,
}

impl Staged {
    fn new(pair: &LoraPair, scale: f64, bias: Option<&Tensor>, like: &Tensor) -> Result<Staged> {
        let dtype = like.dtype();
        let a = pair.a.as_tensor().detach().to_dtype(dtype)?;
        let b = (pair.b.as_tensor().detach() * scale)?.to_dtype(dtype)?;
        let b_bias = match bias {
            Some(bias) if accumulates(like) => {
                let (out, r) = b.dims2()?;
                let bias = bias.to_dtype(dtype)?.reshape((out, 1))?;
                Some(Tensor::cat(&padded(vec![b.clone(), bias], padding(r) - 1)?, 1)?)
            }
            _ => None,
        };
        Ok(Staged { a, b, b_bias })
    }

    /// `onto + z B^T + bias` for z (N, r), accumulated into `onto` on the GPU (see
    /// [`add_matmul`]), or without `onto` a new tensor. On the GPU one product: the bias is one
    /// more column, `[z | 1 | 0..] [B | bias | 0..]^T`, padded to a multiple of 8 columns (16-byte
    /// rows for the tensor cores).
    fn term(&self, onto: Option<Tensor>, z: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (z, b, bias) = match &self.b_bias {
            Some(b_bias) => (augmented(z)?, b_bias, None),
            None => (z.clone(), &self.b, bias),
        };
        let y = match onto {
            Some(onto) => add_matmul(onto, &z, b, true)?,
            None => z.matmul(&b.t()?)?,
        };
        match bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }
}

/// `[z | 1 | 0..]` for z (N, r), beside `[B | bias | 0..]` (see [`Staged::term`]).
fn augmented(z: &Tensor) -> Result<Tensor> {
    let (n, r) = z.dims2()?;
    #[cfg(feature = "cuda")]
    if accumulates(z) {
        return super::ops::linear::cuda::augment(z, r + padding(r)); // one kernel for the four ops below
    }
    let ones = Tensor::ones((n, 1), z.dtype(), z.device())?;
    Tensor::cat(&padded(vec![z.clone(), ones], padding(r) - 1)?, 1)
}

/// Columns added to r for the bias column and a row length that is a multiple of 8 (>= 1).
fn padding(r: usize) -> usize {
    8 - r % 8
}

/// `parts` with `zeros` columns of zeros after them (rows as the first part's).
fn padded(mut parts: Vec<Tensor>, zeros: usize) -> Result<Vec<Tensor>> {
    if zeros > 0 {
        let first = &parts[0];
        parts.push(Tensor::zeros((first.dim(0)?, zeros), first.dtype(), first.device())?);
    }
    Ok(parts)
}

/// What a projection's backward pass needs.
struct Saved {
    frozen: Frozen,
    adapter: Option<SavedAdapter>,
}

/// How the frozen product's input gradient dY W is computed.
enum Frozen {
    /// From the weight (out, in).
    Weight(Tensor),
    /// Through the packed weight's transpose (the CPU in f32).
    Packed(Arc<PackedMatrix>),
    /// By its group, for all the group's projections at once ([`Group::input_grad`]).
    Group,
}

/// Projections that share their input and whose weights are packed together for the CPU
/// ([W1; W2; ..] (sum out, in): q/k/v, gate/up): one product gives all their frozen outputs, and
/// one product of their joined output gradients all their frozen input gradients.
struct Group {
    packed: Arc<PackedMatrix>,
}

impl Group {
    /// x (N, in) -> the frozen outputs (N, out_i), one per projection of `widths`.
    fn outputs(&self, x: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
        crate::model::cpu::linear_packed_parts(x, &self.packed, widths)
    }

    /// The frozen part of the shared input's gradient from the outputs' gradients (N, out_i):
    /// [dY1 | dY2 | ..] [W1; W2; ..] (N, in).
    fn input_grad(&self, grads: &[&Tensor]) -> Result<Tensor> {
        crate::model::cpu::linear_packed_joined(grads, &self.packed.transposed())
    }
}

/// What the adapter's part of the backward pass needs.
struct SavedAdapter {
    a: Tensor, // (r, in)
    b: Tensor, // (out, r), scaled
    a_var: Var,
    b_var: Var,
    scale: f64,
    dropout: Option<Dropout>,
    z: Tensor, // (N, r) = (mask * x) A^T
    sink: Arc<GradSink>,
}

impl Saved {
    /// The adapter's gradients alone (into the sink), where the input's is not wanted.
    fn adapter_grads(&self, x: &Tensor, grad: &Tensor) -> Result<()> {
        match &self.adapter {
            Some(adapter) => adapter.weight_grads(x, &grad.contiguous()?).map(|_| ()),
            None => Ok(()),
        }
    }

    /// The input's gradient (N, in) from the input x (N, in) and the output's gradient (N, out);
    /// the adapter's gradients go to the sink.
    fn backward(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        self.backward_into(x, grad, None)
    }

    /// [`Saved::backward`], added to `into`, the gradient of the same input from another
    /// projection (in place on the GPU: `into` must be held by the caller alone).
    fn backward_into(&self, x: &Tensor, grad: &Tensor, into: Option<Tensor>) -> Result<Tensor> {
        let grad = grad.contiguous()?;
        match &self.frozen {
            Frozen::Packed(packed) => {
                // On the CPU the frozen product's fresh output takes the adapter's part in place.
                let frozen = crate::model::cpu::linear_packed(&grad, &packed.transposed())?;
                let dx = self.adapter_part(x, &grad, Some(frozen))?.expect("a sum");
                match into {
                    Some(sum) => sum + dx,
                    None => Ok(dx),
                }
            }
            Frozen::Weight(weight) => {
                // The adapter's (small) part first, the frozen product accumulated last (see
                // `Projection::forward`).
                let weight = weight.to_dtype(grad.dtype())?;
                match self.adapter_part(x, &grad, into)? {
                    Some(sum) => add_matmul(sum, &grad, &weight, false),
                    None => grad.matmul(&weight),
                }
            }
            Frozen::Group => candle_core::bail!("a grouped projection's input gradient is its group's"),
        }
    }

    /// The adapter's part of the input's gradient added to `into` (or `into` alone, unadapted);
    /// A's and B's gradients go to the sink.
    fn adapter_part(&self, x: &Tensor, grad: &Tensor, into: Option<Tensor>) -> Result<Option<Tensor>> {
        match &self.adapter {
            Some(adapter) => adapter.backward_into(x, grad, into).map(Some),
            None => Ok(into),
        }
    }
}

impl SavedAdapter {
    /// A's and B's gradients into the sink, from the input x (N, in) and the output's gradient
    /// (N, out); returns dz (N, r), the gradient of the adapter's input product.
    fn weight_grads(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        // The dropped input again, from its key: a mask kept from the forward pass would hold a
        // copy of every adapted input of the model until the backward pass.
        let xin = match &self.dropout {
            Some(d) => d.apply(x)?,
            None => x.clone(),
        };
        // dz = scale * dY B: (N, r); dB = scale * dY^T z: (out, r); dA = dz^T (mask * x): (r, in)
        let dz = linear::thin_matmul(grad, &self.b)?;
        self.sink.add_product(&self.b_var, grad, &self.z, self.scale)?;
        self.sink.add_product(&self.a_var, &dz, &xin, 1.0)?;
        Ok(dz)
    }

    /// The adapter's part of the input's gradient, added to `into` where given; A's and B's
    /// gradients go to the sink.
    fn backward_into(&self, x: &Tensor, grad: &Tensor, into: Option<Tensor>) -> Result<Tensor> {
        let dz = self.weight_grads(x, grad)?;
        // mask * (dz A)
        match (&self.dropout, into) {
            (Some(d), Some(sum)) => d.add_applied(sum, &dz.matmul(&self.a)?),
            (Some(d), None) => d.apply(&dz.matmul(&self.a)?),
            (None, Some(sum)) => add_matmul(sum, &dz, &self.a, false),
            (None, None) => linear::thin_matmul(&dz, &self.a),
        }
    }
}

/// A decoder layer's parts for the layer op: its norms (weight, eps), its seven projections and its
/// self-attention.
pub(crate) struct LayerParts<'a> {
    pub norm1: (&'a Tensor, f64),
    pub norm2: (&'a Tensor, f64),
    /// Per-head RMSNorm of q and k (weight (E,), eps) before the attention (Qwen3).
    pub qk_norms: Option<[(&'a Tensor, f64); 2]>,
    /// RMSNorm of the attention's and of the MLP's output (weight (D,), eps) before their
    /// residual sums (Gemma 2).
    pub output_norms: Option<[(&'a Tensor, f64); 2]>,
    /// q, k, v, o
    pub attention_projections: [Projection<'a>; 4],
    pub attention: SelfAttention,
    pub activation: Activation,
    /// gate, up, down
    pub mlp: [Projection<'a>; 3],
    /// [Wq; Wk; Wv] and [Wgate; Wup] packed for the CPU, where the model has them.
    pub packed_qkv: Option<Arc<PackedMatrix>>,
    pub packed_gate_up: Option<Arc<PackedMatrix>>,
}

/// A layer's output from its untracked input x (B, T, D), nothing kept for a backward pass (the
/// first run of a checkpointed layer).
pub(crate) fn layer_output(x: &Tensor, parts: LayerParts, sink: &Arc<GradSink>) -> Result<Tensor> {
    let (out, _) = layer_forward(x, parts, sink, Run::Output, None)?;
    Ok(out.expect("a layer's output"))
}

/// A checkpointed layer run again for its backward rule, from its untracked input x (B, T, D):
/// everything but the output, which the backward pass does not read: the down product, nearly
/// a third of the layer's forward products, is skipped.
pub(crate) fn layer_rerun(x: &Tensor, parts: LayerParts, sink: &Arc<GradSink>) -> Result<LayerGrad> {
    Ok(layer_forward(x, parts, sink, Run::Rerun, None)?.1)
}

/// Why a layer runs: for its output, or again for its backward rule alone.
#[derive(Clone, Copy)]
enum Run {
    Output,
    Rerun,
}

/// Consecutive decoder layers as one op, x (B, T, D) -> (B, T, D): each layer as the layer op
/// computes it, the backward pass running their rules from the last to the first.
///
/// Why: candle's backward pass zero-fills a gradient buffer for every op's input and adds the
/// op's gradient into it, two passes over (tokens x hidden) per layer that one op saves.
///
/// With a packing, the layers run on the batch's N real tokens as (1, N, D), the padding
/// skipped, and the output comes back as (B, T, D) with zeros at the padding.
pub(crate) fn stack(
    x: &Tensor,
    layers: Vec<LayerParts>,
    sink: &Arc<GradSink>,
    packing: Option<Packing>,
) -> Result<Tensor> {
    let mut h = match &packing {
        Some(p) => p.pack(&x.detach())?.unsqueeze(0)?,
        None => x.detach(),
    };
    let mut rules = Vec::with_capacity(layers.len());
    for parts in layers {
        let (out, rule) = layer_forward(&h, parts, sink, Run::Output, packing.clone())?;
        rules.push((h, rule));
        h = out.expect("a layer's output");
    }
    if let Some(p) = &packing {
        h = p.spread(&h.squeeze(0)?)?;
    }
    let (anchor, input_grad) = ops::anchor(x)?;
    attach(&anchor, h, StackGrad { rules: std::sync::Mutex::new(rules), input_grad, packing })
}

/// The real tokens of a right-padded micro-batch (B, T) as the rows of an (N, ..) tensor: the
/// layers' products, norms and adapters then skip the padding (a tenth of a typical batch's
/// positions), and only the attention, which reads each row's positions, sees the batch as
/// (B, T). Each real token's sums are those of the padded batch: the CPU's products and norms
/// are per token (but for the adapters' input product, see [`shared_input_products`]), and the
/// padding adds only zeros to the adapter's gradients (its gradient is zero, and no real token
/// attends to the right padding).
#[derive(Clone)]
pub(crate) struct Packing {
    b: usize,
    t: usize,
    /// (N,) u32: row * T + position of each real token.
    tokens: Tensor,
    /// (B * T,) u32: each position's token index, or N at the padding (a zero row).
    positions: Tensor,
}

impl Packing {
    /// The packing of rows of these lengths padded to t, where the layers give each token the
    /// padded batch's sums on it: in f32 on the CPU, whose products are per token (not on the
    /// GPU, whose kernels keep their padded shapes), without dropout (its masks are drawn over the
    /// padded shape), with ranks the CPU's thin products take, and with padding to skip. None
    /// otherwise.
    pub(crate) fn of(lengths: &[usize], t: usize, layers: &[LayerParts], x: &Tensor) -> Result<Option<Packing>> {
        let projections = || layers.iter().flat_map(|l| l.attention_projections.iter().chain(&l.mlp));
        let dropout = projections().any(|p| p.dropout.is_some());
        let thin = projections().all(|p| p.pair.is_none_or(|pair| pair.a.dim(0).is_ok_and(|r| r <= ops::linear::THIN)));
        let real: usize = lengths.iter().sum();
        if !ops::linear::cpu::applies(&[x]) || dropout || !thin || real == lengths.len() * t {
            return Ok(None);
        }
        let device = x.device();
        let mut tokens = Vec::with_capacity(real);
        let mut positions = vec![real as u32; lengths.len() * t];
        for (r, &len) in lengths.iter().enumerate() {
            if len > t {
                candle_core::bail!("a row of {len} tokens in a batch padded to {t}");
            }
            for pos in 0..len {
                positions[r * t + pos] = tokens.len() as u32;
                tokens.push((r * t + pos) as u32);
            }
        }
        Ok(Some(Packing {
            b: lengths.len(),
            t,
            tokens: Tensor::new(tokens, device)?,
            positions: Tensor::new(positions, device)?,
        }))
    }

    /// y (tokens, C) as the batch's rows (B, T, C): spread out where packed, else y's tokens are
    /// already the B x T positions.
    fn rows(packing: Option<&Packing>, y: &Tensor, b: usize, t: usize) -> Result<Tensor> {
        match packing {
            Some(p) => p.spread(y),
            None => y.reshape((b, t, ())),
        }
    }

    /// The batch's rows y (B, T, C) as tokens (N, C): packed, or the n = B x T positions.
    fn tokens(packing: Option<&Packing>, y: &Tensor, n: usize) -> Result<Tensor> {
        match packing {
            Some(p) => p.pack(y),
            None => y.reshape((n, ())),
        }
    }

    /// x (B, T, C) or (B * T, C) -> its real tokens (N, C).
    fn pack(&self, x: &Tensor) -> Result<Tensor> {
        let c = x.elem_count() / (self.b * self.t).max(1);
        ops::gather::take_rows(&x.reshape((self.b * self.t, c))?, &self.tokens, false)
    }

    /// x (N, C) -> (B, T, C), zeros at the padding.
    fn spread(&self, x: &Tensor) -> Result<Tensor> {
        let c = x.dim(1)?;
        ops::gather::take_rows(&x.contiguous()?, &self.positions, true)?.reshape((self.b, self.t, c))
    }
}

/// The layers' rules with the input of each, consumed by the backward pass (each layer's saved
/// tensors are freed once its gradient is computed), and whether the first input's gradient is
/// wanted (see [`ops::anchor`]).
struct StackGrad {
    rules: std::sync::Mutex<Vec<(Tensor, LayerGrad)>>,
    input_grad: bool,
    packing: Option<Packing>,
}

impl Backward for StackGrad {
    fn name(&self) -> &'static str {
        "lora-layers"
    }

    fn grad(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let mut rules = self.rules.lock().map_err(|_| candle_core::Error::Msg("layer rules poisoned".into()))?;
        let mut grad = match &self.packing {
            Some(p) => p.pack(grad)?.unsqueeze(0)?,
            None => grad.clone(),
        };
        while let Some((input, rule)) = rules.pop() {
            let wanted = self.input_grad || !rules.is_empty();
            match rule.backward(&input, &grad, wanted)? {
                Some(g) => grad = g,
                None => return x.zeros_like(), // the anchor's
            }
        }
        match &self.packing {
            Some(p) => p.spread(&grad.squeeze(0)?),
            None => Ok(grad),
        }
    }
}

/// One layer's output (for `Run::Output`) from its untracked input x0 (B, T, D), or (1, N, D)
/// with a packing, and its backward rule.
fn layer_forward(
    x0: &Tensor,
    parts: LayerParts,
    sink: &Arc<GradSink>,
    run: Run,
    packing: Option<Packing>,
) -> Result<(Option<Tensor>, LayerGrad)> {
    let (b, t, d) = x0.dims3()?;
    let n = b * t;
    let LayerParts {
        norm1,
        norm2,
        qk_norms,
        output_norms,
        attention_projections: [q, k, v, o],
        attention,
        activation,
        mlp: [gate, up, down],
        packed_qkv,
        packed_gate_up,
    } = parts;
    let (qkv_group, gate_up_group) =
        (packed_qkv.map(|packed| Group { packed }), packed_gate_up.map(|packed| Group { packed }));
    let h1 = ops::rms_norm_value(x0, norm1.0, norm1.1)?.reshape((n, d))?;
    let [zq, zk, zv] = shared_input_products([&q, &k, &v], &h1, sink, packing.as_ref())?;
    let ((qy, q), (ky, k), (vy, v)) = match &qkv_group {
        Some(group) => {
            let widths = [q.weight.dim(0)?, k.weight.dim(0)?, v.weight.dim(0)?];
            let [fq, fk, fv]: [Tensor; 3] =
                group.outputs(&h1, &widths)?.try_into().map_err(|_| candle_core::Error::Msg("q/k/v".into()))?;
            (
                q.forward_grouped(&h1, zq, fq, sink)?,
                k.forward_grouped(&h1, zk, fk, sink)?,
                v.forward_grouped(&h1, zv, fv, sink)?,
            )
        }
        None => (q.forward(&h1, zq, sink)?, k.forward(&h1, zk, sink)?, v.forward(&h1, zv, sink)?),
    }; // (N, H*E), (N, K*E), (N, K*E)
       // Per-head norms: (N, H*E) as (N, H, E), normalised over E; the inputs kept for the backward.
    let (qy, ky, qk_norms) = match qk_norms {
        Some([(wq, eq), (wk, ek)]) => {
            let per_head = |y: &Tensor, w: &Tensor, eps| -> Result<Tensor> {
                ops::rms_norm_value(&y.reshape((n, (), w.dim(0)?))?, w, eps)?.reshape((n, ()))
            };
            let (qn, kn) = (per_head(&qy, wq, eq)?, per_head(&ky, wk, ek)?);
            let saved = QkNorms { q: (qy, wq.clone(), eq), k: (ky, wk.clone(), ek) };
            (qn, kn, Some(saved))
        }
        None => (qy, ky, None),
    };
    // The attention over the batch's rows (B, T, ..), padded again where packed.
    let rows = |y: &Tensor| Packing::rows(packing.as_ref(), y, b, t);
    let (att, heads) = attention.forward_heads(&rows(&qy)?, &rows(&ky)?, &rows(&vy)?)?;
    let att = Packing::tokens(packing.as_ref(), &att, n)?; // (N, H*E)
    let [attention_norm, mlp_norm] = output_norms.map_or([None, None], |[a, m]| [Some(a), Some(m)]);
    // The residual stream x1 = x + o(att), or x + norm(o(att)).
    let (x1, o, attention_out) = residual_sum(o, &att, x0, attention_norm, sink)?;
    let x1 = x1.reshape((b, t, d))?;
    let h2 = ops::rms_norm_value(&x1, norm2.0, norm2.1)?.reshape((n, d))?;
    let [zg, zu] = shared_input_products([&gate, &up], &h2, sink, packing.as_ref())?;
    let ((g, gate), (u, up)) = match &gate_up_group {
        Some(group) => {
            let widths = [gate.weight.dim(0)?, up.weight.dim(0)?];
            let [fg, fu]: [Tensor; 2] =
                group.outputs(&h2, &widths)?.try_into().map_err(|_| candle_core::Error::Msg("gate/up".into()))?;
            (gate.forward_grouped(&h2, zg, fg, sink)?, up.forward_grouped(&h2, zu, fu, sink)?)
        }
        None => (gate.forward(&h2, zg, sink)?, up.forward(&h2, zu, sink)?),
    }; // (N, I) each
    let h = ops::gated(activation, &g, &u)?.detach();
    let (out, down, mlp_out) = match (run, mlp_norm) {
        (Run::Rerun, None) => (None, down.saved_only(&h, sink)?, None),
        // The output norm's backward rule reads down's output: computed again either way.
        _ => {
            let (out, down, mlp_out) = residual_sum(down, &h, &x1, mlp_norm, sink)?; // x1 + down(h), (N, D)
            (Some(out.reshape((b, t, d))?), down, mlp_out)
        }
    };
    let output_norms = match (attention_norm, mlp_norm, attention_out, mlp_out) {
        (Some(a), Some(m), Some(ay), Some(my)) => {
            Some(OutputNorms { attention: (ay, a.0.clone(), a.1), mlp: (my, m.0.clone(), m.1) })
        }
        _ => None,
    };
    let rule = LayerGrad {
        norm1: (norm1.0.clone(), norm1.1),
        norm2: (norm2.0.clone(), norm2.1),
        qk_norms,
        output_norms,
        attention,
        activation,
        qkv_group,
        gate_up_group,
        projections: [q, k, v, o, gate, up, down],
        h1,
        heads,
        att,
        x1,
        h2,
        g,
        u,
        h,
        packing,
    };
    Ok((out, rule))
}

/// `x + p(input)` (N, D) for the residual stream x (B, T, D), or with a norm of the projection's
/// output `x + norm(p(input))`; the projection's backward state, and its output where normed
/// (the norm's backward rule reads it).
fn residual_sum(
    p: Projection,
    input: &Tensor,
    x: &Tensor,
    norm: Option<(&Tensor, f64)>,
    sink: &Arc<GradSink>,
) -> Result<(Tensor, Saved, Option<Tensor>)> {
    let (b, t, d) = x.dims3()?;
    let n = b * t;
    match norm {
        // p's products accumulate into a copy of x.
        None => {
            let (sum, saved) = p.forward_onto(input, None, Some(residual(x, n, d)?), sink)?;
            Ok((sum, saved, None))
        }
        Some((w, eps)) => {
            let (y, saved) = p.forward(input, None, sink)?; // (N, D)
            let sum = (x.reshape((n, d))? + ops::rms_norm_value(&y, w, eps)?)?;
            Ok((sum, saved, Some(y)))
        }
    }
}

/// A residual stream (B, T, D) as (N, D), for a projection to add its output to: a copy of it on
/// the GPU, where the products accumulate in place; elsewhere the stream itself, added to.
fn residual(x: &Tensor, n: usize, d: usize) -> Result<Tensor> {
    let x = x.reshape((n, d))?;
    if accumulates(&x) {
        x.copy()
    } else {
        Ok(x)
    }
}

/// The per-head q/k norms of a layer, with their inputs: (projection output (N, H*E), weight, eps).
struct QkNorms {
    q: (Tensor, Tensor, f64),
    k: (Tensor, Tensor, f64),
}

impl QkNorms {
    /// The gradients of the projections' outputs from those of the normed q and k (N, H*E).
    fn backward(&self, dq: Tensor, dk: Tensor) -> Result<(Tensor, Tensor)> {
        let one = |(y, w, eps): &(Tensor, Tensor, f64), g: &Tensor| -> Result<Tensor> {
            let (n, e) = (y.dim(0)?, w.dim(0)?);
            ops::rms_norm_backward(&y.reshape((n, (), e))?, w, *eps, &g.reshape((n, (), e))?)?.reshape((n, ()))
        };
        Ok((one(&self.q, &dq)?, one(&self.k, &dk)?))
    }
}

/// The norms of a layer's attention and MLP outputs, with their inputs: (the projection's output
/// (N, D), weight, eps).
struct OutputNorms {
    attention: (Tensor, Tensor, f64),
    mlp: (Tensor, Tensor, f64),
}

/// The gradient of a normed output (N, D) from that of the norm, or `g` itself without a norm.
fn through_norm(norm: Option<&(Tensor, Tensor, f64)>, g: Tensor) -> Result<Tensor> {
    match norm {
        Some((y, w, eps)) => ops::rms_norm_backward(y, w, *eps, &g),
        None => Ok(g),
    }
}

/// What a layer's backward pass needs: the inputs of its parts.
pub(crate) struct LayerGrad {
    norm1: (Tensor, f64),
    norm2: (Tensor, f64),
    qk_norms: Option<QkNorms>,
    output_norms: Option<OutputNorms>,
    attention: SelfAttention,
    activation: Activation,
    qkv_group: Option<Group>,
    gate_up_group: Option<Group>,
    /// q, k, v, o, gate, up, down
    projections: [Saved; 7],
    h1: Tensor,      // (N, D) norm1(x)
    heads: QkvHeads, // q, k, v split into heads, roped
    att: Tensor,     // (N, H*E) the attention's merged heads
    x1: Tensor,      // (B, T, D) the residual stream after the attention
    h2: Tensor,      // (N, D) norm2(x1)
    g: Tensor,       // (N, I) gate(h2)
    u: Tensor,       // (N, I) up(h2)
    h: Tensor,       // (N, I) act(g) * u
    /// Where the layer ran on the batch's real tokens alone.
    packing: Option<Packing>,
}

impl Backward for LayerGrad {
    fn name(&self) -> &'static str {
        "lora-layer"
    }

    fn grad(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        self.backward(x, grad, true)?.ok_or_else(|| candle_core::Error::Msg("lora-layer: no input gradient".into()))
    }
}

impl LayerGrad {
    /// The gradient of the layer's input x (B, T, D) from the output's, where `input_grad`;
    /// the adapter's gradients go to the sink either way.
    pub(crate) fn backward(&self, x: &Tensor, grad: &Tensor, input_grad: bool) -> Result<Option<Tensor>> {
        let (b, t, d) = x.dims3()?;
        let n = b * t;
        let [q, k, v, o, gate, up, down] = &self.projections;
        // The MLP and its residual: dx1 = grad + norm2'(dh2).
        let norms = self.output_norms.as_ref();
        let dm = through_norm(norms.map(|n| &n.mlp), grad.reshape((n, d))?)?;
        let dh = down.backward(&self.h, &dm)?;
        let (dg, du) = ops::gated_backward(self.activation, &self.g, &self.u, &dh)?;
        let dh2 = match &self.gate_up_group {
            Some(group) => {
                let sum = group.input_grad(&[&dg, &du])?;
                let sum = gate.adapter_part(&self.h2, &dg.contiguous()?, Some(sum))?;
                up.adapter_part(&self.h2, &du.contiguous()?, sum)?.expect("a sum")
            }
            None => {
                let dh2 = gate.backward(&self.h2, &dg)?;
                up.backward_into(&self.h2, &du, Some(dh2))?
            }
        };
        let dx1 = ops::rms_norm_backward_plus(&self.x1, &self.norm2.0, self.norm2.1, &dh2.reshape((b, t, d))?, grad)?;
        // The attention and its residual: dx = dx1 + norm1'(dh1), the three projections' input
        // gradients accumulated into one.
        let da = through_norm(norms.map(|n| &n.attention), dx1.reshape((n, d))?)?;
        let datt = o.backward(&self.att, &da)?;
        let rows = |y: &Tensor| Packing::rows(self.packing.as_ref(), y, b, t);
        let tokens = |y: Tensor| Packing::tokens(self.packing.as_ref(), &y, n);
        let (dq, dk, dv) = self.attention.backward_heads(&self.heads, &rows(&self.att)?, &rows(&datt)?)?;
        let (dq, dk, dv) = (tokens(dq)?, tokens(dk)?, tokens(dv)?);
        let (dq, dk) = match &self.qk_norms {
            Some(norms) => norms.backward(dq, dk)?,
            None => (dq, dk),
        };
        if !input_grad {
            for (projection, grad) in [(q, &dq), (k, &dk), (v, &dv)] {
                projection.adapter_grads(&self.h1, grad)?;
            }
            return Ok(None);
        }
        let dh1 = match &self.qkv_group {
            Some(group) => {
                let sum = group.input_grad(&[&dq, &dk, &dv])?;
                let sum = q.adapter_part(&self.h1, &dq.contiguous()?, Some(sum))?;
                let sum = k.adapter_part(&self.h1, &dk.contiguous()?, sum)?;
                v.adapter_part(&self.h1, &dv.contiguous()?, sum)?.expect("a sum")
            }
            None => {
                let dh1 = q.backward(&self.h1, &dq)?;
                let dh1 = k.backward_into(&self.h1, &dk, Some(dh1))?;
                v.backward_into(&self.h1, &dv, Some(dh1))?
            }
        };
        ops::rms_norm_backward_plus(&x.detach(), &self.norm1.0, self.norm1.1, &dh1.reshape((b, t, d))?, &dx1).map(Some)
    }
}
