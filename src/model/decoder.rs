//! The decoder: one implementation for every family of [`super::family`].
//!
//! A stack of pre-norm blocks, `x + attn(rms_norm(x))` then `x + mlp(rms_norm(x))`, with rotary
//! position embeddings (the "rotate half" layout of transformers), grouped-query attention and a
//! gated MLP `down(act(gate(x)) * up(x))`. What a family adds is read from its description:
//! q/k/v biases, per-head q/k norms, norms of the attention's and MLP's outputs before the
//! residual sums, scaled embeddings, soft-capped attention scores and logits, sliding windows.
//! Weight names are transformers' (`model.layers.{i}.self_attn.q_proj.weight`), so safetensors
//! checkpoints load as they are and GGUF files are renamed to them.
//!
//! Two paths through the same weights:
//! - inference ([`Pass::infer`]): fused kernels, a KV cache, an attention mask for left padding;
//! - training ([`Pass::train`]): only differentiable ops (candle's fused softmax, rms_norm and
//!   rope have no backward, so [`super::ops`] gives them one), frozen projections with a
//!   backward rule for their input only, so that no weight-sized gradient is ever computed, LoRA
//!   deltas with dropout, and optionally gradient checkpointing ([`super::checkpoint`]). With a
//!   gradient sink in the pass, each layer is a single graph node with a hand-written backward
//!   rule ([`super::lora`]), except on the CPU's packed f32 path; [`Decoder::layers_run`] names
//!   the four implementations and chooses one per pass.
//!
//! On the CPU in f32 the projections run through weights packed once ([`super::packed`]), q/k/v
//! and gate/up as one product each; on the GPU in bf16 attention, the loss and SwiGLU run as
//! fused kernels ([`super::cuda`]).
//!
//! Shapes: B batch, T new tokens, S keys (cache length), D hidden, H query heads, K kv heads,
//! G = H / K heads per kv head, E head dim, F intermediate, V vocab.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::config::{Activation, Config};
use super::ops::dropout::{keyed_dropout_mask, Dropout};
use super::ops::{frozen_linear, SelfAttention};
use super::packed::PackedMatrix;
use super::sink::GradSink;
use crate::adapter::{Adapter, LoraPair, Target};

/// How a forward pass runs: which ops, which adapter, which dropout stream.
#[derive(Clone, Copy)]
pub struct Pass<'a> {
    /// Differentiable ops and frozen base weights (training), or fused kernels (inference).
    pub train: bool,
    /// An unmerged adapter whose deltas are added to the projections.
    pub adapter: Option<&'a Adapter>,
    /// Random stream for LoRA dropout; dropout is applied only when training and set.
    pub dropout_rng: Option<&'a RefCell<ChaCha8Rng>>,
    /// Where backward rules that compute the adapter's gradients themselves put them (the
    /// projections of [`super::lora`], checkpointed layers); without it, candle's graph gets them.
    pub sink: Option<&'a Arc<GradSink>>,
    /// Gradient checkpointing: each layer keeps only its input for the backward pass and is run
    /// again there (needs `sink`).
    pub checkpoint: bool,
    /// The lengths of right-padded rows (training), whose padding the layer ops may then skip.
    pub lengths: Option<&'a [usize]>,
}

impl<'a> Pass<'a> {
    pub fn infer(adapter: Option<&'a Adapter>) -> Self {
        Pass { train: false, adapter, dropout_rng: None, sink: None, checkpoint: false, lengths: None }
    }

    pub fn train(adapter: &'a Adapter, dropout_rng: Option<&'a RefCell<ChaCha8Rng>>) -> Self {
        Pass { train: true, adapter: Some(adapter), dropout_rng, sink: None, checkpoint: false, lengths: None }
    }

    /// The same pass with the adapter's gradients collected in `sink`.
    pub fn with_sink(self, sink: &'a Arc<GradSink>) -> Self {
        Pass { sink: Some(sink), ..self }
    }

    /// The same training pass over right-padded rows of these lengths.
    pub fn with_lengths(self, lengths: &'a [usize]) -> Self {
        Pass { lengths: Some(lengths), ..self }
    }

    /// The same training pass with gradient checkpointing into `sink`.
    pub fn checkpointed(self, sink: &'a Arc<GradSink>) -> Self {
        Pass { sink: Some(sink), checkpoint: true, ..self }
    }
}

/// A projection `x W^T + b`, frozen.
#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor, // (out, in)
    /// The weight packed for the CPU path in f32 (see [`super::packed`]).
    pub packed: Option<Arc<PackedMatrix>>,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Unpacked: its layer packs it ([`Layer::pack`]), alone or stacked with its neighbours.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Linear { weight, packed: None, bias })
    }
}

/// The weights [W1; W2; ...] (sum out, in), stacked and packed, where the CPU f32 fast path will
/// use them: one product then serves several projections of the same input.
fn packed_for_cpu(weights: &[&Tensor]) -> Result<Option<Arc<PackedMatrix>>> {
    let w = weights[0];
    if !(w.device().is_cpu() && w.dtype() == DType::F32) {
        return Ok(None);
    }
    let stacked = if weights.len() == 1 { w.clone() } else { Tensor::cat(weights, 0)? };
    let (out, inp) = stacked.dims2()?;
    let values = stacked.flatten_all()?.to_vec1::<f32>()?;
    Ok(Some(Arc::new(PackedMatrix::from_rows_out_in(&values, out, inp))))
}

impl Linear {
    /// x: (B, T, in) -> (B, T, out), with the adapter's delta for (layer, target) if any.
    fn forward(&self, x: &Tensor, pass: Pass, layer: usize, target: Target) -> Result<Tensor> {
        let (b, t, d_in) = x.dims3()?;
        let x2 = x.reshape((b * t, d_in))?;
        let mut y = match &self.packed {
            Some(packed) => frozen_product(&x2, packed, pass)?,
            None if pass.train => frozen_linear(&x2, &self.weight)?,
            None => x2.matmul(&self.weight.t()?)?,
        };
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        if let Some(delta) = lora_delta(&x2, pass, layer, target)? {
            y = (y + delta)?;
        }
        y.reshape((b, t, ()))
    }

    /// This projection and its adapter pair, if any, for [`super::lora`], with its input's
    /// dropout key drawn where it has a pair (as the composite path draws them).
    fn projection<'a>(
        &'a self,
        pair: Option<&'a LoraPair>,
        pass: Pass,
        adapter: &Adapter,
    ) -> Result<super::lora::Projection<'a>> {
        let dropout = if pair.is_some() { dropout_of(pass, adapter)? } else { None };
        Ok(super::lora::Projection {
            weight: &self.weight,
            bias: self.bias.as_ref(),
            pair,
            scale: adapter.scale(),
            dropout,
            packed: self.packed.clone(),
        })
    }
}

/// x (N, in) @ W^T through the packed weight: differentiable in x when training.
fn frozen_product(x2: &Tensor, packed: &Arc<PackedMatrix>, pass: Pass) -> Result<Tensor> {
    if pass.train {
        super::cpu::frozen_linear_packed(x2, packed)
    } else {
        super::cpu::linear_packed(x2, packed)
    }
}

/// The adapter's term for (layer, target), scale * dropout(x) A^T B^T, if the pass has one:
/// x (N, in) -> (N, out).
fn lora_delta(x2: &Tensor, pass: Pass, layer: usize, target: Target) -> Result<Option<Tensor>> {
    let Some(adapter) = pass.adapter else { return Ok(None) };
    let Some(pair) = adapter.pair(layer, target) else { return Ok(None) };
    let dtype = x2.dtype();
    let xin = match dropout_mask(x2, pass, adapter)? {
        Some(mask) => x2.mul(&mask)?,
        None => x2.clone(),
    };
    // (N, in) @ (in, r) -> (N, r); @ (r, out) -> (N, out)
    let (a, bm) = (pair.a.as_tensor().to_dtype(dtype)?, pair.b.as_tensor().to_dtype(dtype)?);
    let delta = xin.matmul(&a.t()?)?.matmul(&bm.t()?)?;
    Ok(Some((delta * adapter.scale())?))
}

/// The inverted-dropout mask of LoRA's input, when training with dropout: 0 or 1 / (1 - p) per
/// element of x (candle's own dropout draws from an unseeded generator).
fn dropout_mask(x: &Tensor, pass: Pass, adapter: &Adapter) -> Result<Option<Tensor>> {
    dropout_of(pass, adapter)?.map(|d| keyed_dropout_mask(x.shape(), d.key, d.keep, x)).transpose()
}

/// The pass's LoRA dropout for one input, when training with dropout: one key from the pass's
/// seeded stream; element i of the input is kept when a hash of (key, i) falls below 1 - p.
fn dropout_of(pass: Pass, adapter: &Adapter) -> Result<Option<Dropout>> {
    let p = adapter.config.lora_dropout;
    let (true, true, Some(rng)) = (pass.train, p > 0.0, pass.dropout_rng) else { return Ok(None) };
    Ok(Some(Dropout { key: rng.borrow_mut().gen(), keep: 1.0 - p }))
}

/// RMSNorm with a learned scale; fused kernel for inference, plain ops for training.
#[derive(Clone)]
pub struct RmsNorm {
    pub weight: Tensor, // (D,)
    pub eps: f64,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let _phase = crate::profile::phase("norms", x.device());
        if train {
            super::ops::rms_norm(x, &self.weight, self.eps)
        } else if super::cpu::on_cpu_f32(&[x]) {
            Ok(super::cpu::rms_norm_cpu(x, None, &self.weight, self.eps)?.1)
        } else {
            super::ops::rms_norm_value(x, &self.weight, self.eps)
        }
    }

    /// The residual stream `x + h` and its norm (x itself where h is None): in inference on the
    /// GPU, one pass that reads x and h once.
    fn forward_added(&self, x: &Tensor, h: Option<&Tensor>, train: bool) -> Result<(Tensor, Tensor)> {
        let Some(h) = h else { return Ok((x.clone(), self.forward(x, train)?)) };
        #[cfg(feature = "cuda")]
        if !train
            && super::cuda::applies(x)
            && self.weight.dtype() == DType::BF16
            && super::ops::rms_norm::cuda::rms_norm_fits(x.dim(candle_core::D::Minus1)?)
        {
            let _phase = crate::profile::phase("residuals and norms", x.device());
            return super::ops::rms_norm::cuda::add_rms_norm(x, h, &self.weight, self.eps);
        }
        if !train && super::cpu::on_cpu_f32(&[x]) {
            let _phase = crate::profile::phase("residuals and norms", x.device());
            return super::cpu::rms_norm_cpu(x, Some(h), &self.weight, self.eps);
        }
        let sum = {
            let _phase = crate::profile::phase("residuals", x.device());
            (x + h)?
        };
        let normed = self.forward(&sum, train)?;
        Ok((sum, normed))
    }
}

#[derive(Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// Per-head RMSNorm of queries and keys before the rotary embedding (Qwen3).
    pub qk_norms: Option<(RmsNorm, RmsNorm)>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// The factor of the scores q.k (1 / sqrt(head_dim) unless the config sets another).
    pub scale: f64,
    /// Scores capped to `c * tanh(s / c)` before the mask and softmax (Gemma 2).
    pub softcap: Option<f64>,
    /// [Wq; Wk; Wv] packed for the CPU f32 path: one product instead of three.
    pub qkv_packed: Option<Arc<PackedMatrix>>,
    /// [Wq; Wk; Wv] and their biases as one weight on the GPU, for inference: one product
    /// instead of three. The q, k and v weights are views of it, so it costs no memory.
    pub qkv_stacked: Option<Linear>,
}

#[derive(Clone)]
pub struct Mlp {
    pub activation: Activation,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    /// [Wgate; Wup] packed for the CPU f32 path.
    pub gate_up_packed: Option<Arc<PackedMatrix>>,
}

#[derive(Clone)]
pub struct Layer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    /// The MLP's input norm (`post_attention_layernorm` in Llama's naming).
    pub mlp_norm: RmsNorm,
    pub mlp: Mlp,
    /// Norms of the attention's and the MLP's outputs before their residual sums (Gemma 2).
    pub output_norms: Option<(RmsNorm, RmsNorm)>,
    /// The sliding window this layer attends within, if any.
    pub window: Option<usize>,
}

/// The residual stream and a layer's branch not yet added to it.
type Tensor2 = (Tensor, Tensor);

/// One group of rows in a decoding step of several ([`Decoder::decode_step`]): prompts that were
/// prefilled together, with their KV cache, positions and padding.
pub struct DecodeSegment<'a> {
    /// Its rows, consecutive in the step's batch.
    pub rows: usize,
    /// The position of the token each row is fed.
    pub pos: usize,
    /// The keys each row sees: (rows, 1, 1, pos + 1).
    pub mask: &'a Mask,
    pub cache: &'a mut KvCache,
}

/// Per-layer keys and values of a batch, pre-allocated to `capacity` positions.
pub struct KvCache {
    /// Per layer: (B, K, capacity, E), or with a shared prefix (B, K, capacity - its length, E),
    /// the positions after it.
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Positions filled so far.
    pub len: usize,
    pub capacity: usize,
    /// The first positions of every row held once per prompt (CPU decoding).
    pub prefix: Option<SharedPrefix>,
}

/// Keys and values of the first `len` positions of prompts that several rows of a batch
/// continue (the completions of one prompt): read by each of its rows, stored once.
pub struct SharedPrefix {
    /// Per layer: (P, K, len, E).
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub len: usize,
    /// Each batch row's prompt.
    pub rows: Vec<usize>,
}

/// The KV cache of continuous batching on the GPU: `slots` rows of `capacity` positions, each
/// held by one completion at a time. A decoding step's rows each read and write their own slot
/// at their own length and position ([`Decoder::decode_slots`]), so a finished row's slot takes
/// the next prompt's row while the others go on decoding. A slot holds a row's real positions
/// only, from its first (its prompt's padding is left out). With a prompt store, the rows of a
/// prompt read its positions from one prompt slot, and their own slots hold the positions after
/// them: each prompt's keys and values are stored once, and its rows, decoding side by side,
/// read them from the GPU's cache rather than its memory.
pub struct SlotCache {
    /// Per layer: (2, slots, K, capacity, E), the keys then the values.
    pub kv: Vec<Tensor>,
    /// Per layer: (2, prompt slots, K, prompt capacity, E), where prompts are stored apart.
    pub prompts: Option<Vec<Tensor>>,
}

impl SlotCache {
    /// `slots` slots of `capacity` positions, and `prompt_slots` prompt slots of
    /// `prompt_capacity` positions (none: each slot holds its row's every position).
    pub fn new(
        cfg: &Config,
        (slots, capacity): (usize, usize),
        (prompt_slots, prompt_capacity): (usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let prompts = match prompt_slots {
            0 => None,
            n => Some(Self::store(cfg, n, prompt_capacity, dtype, device)?),
        };
        Ok(SlotCache { kv: Self::store(cfg, slots, capacity, dtype, device)?, prompts })
    }

    fn store(cfg: &Config, slots: usize, capacity: usize, dtype: DType, device: &Device) -> Result<Vec<Tensor>> {
        let shape = (2, slots, cfg.num_kv_heads(), capacity, cfg.head_dim());
        (0..cfg.num_hidden_layers).map(|_| Tensor::zeros(shape, dtype, device)).collect()
    }

    /// Layer `layer`'s prompt store: the slots themselves where prompts are not stored apart.
    pub fn prompt_store(&self, layer: usize) -> &Tensor {
        self.prompts.as_ref().map_or(&self.kv[layer], |p| &p[layer])
    }

    /// Moves the keys and values of prefilled prompts (a [`KvCache`] of P prompts left-padded to
    /// its `len`) into slots of the prompt store ([`SlotCache::prompt_store`]: the rows' own
    /// slots where the cache stores no prompts apart): `rows` (M, 3) u32 on the device, each a
    /// prompt (in that cache), a slot and the prompt's padding.
    pub fn fill(&self, prefilled: &KvCache, rows: &Tensor) -> Result<()> {
        #[cfg(feature = "cuda")]
        for l in 0..self.kv.len() {
            for (which, part) in [&prefilled.k[l], &prefilled.v[l]].into_iter().enumerate() {
                let part = part.narrow(2, 0, prefilled.len)?;
                super::ops::attention::cuda::fill_slots(&part, self.prompt_store(l), which, rows)?;
            }
        }
        #[cfg(not(feature = "cuda"))]
        candle_core::bail!(
            "filling {} slots from {} prompts needs a build with the GPU kernels (feature cuda)",
            rows.dim(0)?,
            prefilled.batch()
        );
        #[cfg(feature = "cuda")]
        Ok(())
    }
}

impl KvCache {
    pub fn new(cfg: &Config, batch: usize, capacity: usize, dtype: DType, device: &Device) -> Result<Self> {
        let shape = (batch, cfg.num_kv_heads(), capacity, cfg.head_dim());
        let mut k = Vec::with_capacity(cfg.num_hidden_layers);
        let mut v = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            k.push(Tensor::zeros(shape, dtype, device)?);
            v.push(Tensor::zeros(shape, dtype, device)?);
        }
        Ok(KvCache { k, v, len: 0, capacity, prefix: None })
    }

    /// Keeps only the batch rows `rows` (in that order; a row may repeat).
    pub fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        let device = self.k.first().map(|t| t.device().clone()).unwrap_or(Device::Cpu);
        let index = Tensor::new(rows, &device)?;
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            *t = t.index_select(&index, 0)?;
        }
        if let Some(prefix) = &mut self.prefix {
            prefix.rows = rows.iter().map(|&r| prefix.rows[r as usize]).collect();
        }
        Ok(())
    }

    /// Turns the cache of P prompts, filled to their common length, into one of `rows.len()`
    /// rows, row i continuing prompt `rows[i]`, whose prompts' positions stay stored once (a
    /// [`SharedPrefix`]) where [`select_rows`](Self::select_rows) would copy them to each row.
    /// Each row reads the same keys and values either way, in the same order.
    pub fn share_prefix(&mut self, rows: &[u32]) -> Result<()> {
        if self.prefix.is_some() {
            candle_core::bail!("the cache's prefix is shared already");
        }
        let len = self.len;
        let mut prefix =
            SharedPrefix { k: Vec::new(), v: Vec::new(), len, rows: rows.iter().map(|&r| r as usize).collect() };
        for (own, shared) in [(&mut self.k, &mut prefix.k), (&mut self.v, &mut prefix.v)] {
            for t in own.iter_mut() {
                let (_, k, _, e) = t.dims4()?;
                shared.push(t.narrow(2, 0, len)?.contiguous()?);
                *t = Tensor::zeros((rows.len(), k, self.capacity - len, e), t.dtype(), t.device())?;
            }
        }
        self.prefix = Some(prefix);
        Ok(())
    }

    pub fn batch(&self) -> usize {
        self.k.first().map(|t| t.dims()[0]).unwrap_or(0)
    }

    /// Where position `pos` of a row lies in the rows' own tensors.
    fn own_position(&self, pos: usize) -> Result<usize> {
        let first = self.prefix.as_ref().map_or(0, |p| p.len);
        match pos.checked_sub(first) {
            Some(at) => Ok(at),
            None => {
                candle_core::bail!("position {pos} lies in the shared prefix of {first} positions, which is read-only")
            }
        }
    }
}

impl Attention {
    /// x: (B, T, D) -> (B, T, D) at `span`'s positions.
    fn forward(
        &self,
        x: &Tensor,
        span: Span,
        cache: Option<(&mut KvCache, usize)>,
        pass: Pass,
        layer: usize,
    ) -> Result<Tensor> {
        let Span { rope, pos, mask, .. } = span;
        let (b, t, _) = x.dims3()?;
        let (h, k, e) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (q, kx, vx) = self.heads(x, rope, pos, pass, layer)?;
        let phase = crate::profile::phase("heads, rope, cache write", x.device());

        // Keys and values of every position so far: (B, K, S, E)
        // The whole cache tensors (B, K, capacity, E) are kept for the CPU kernel.
        let (keys, values, whole_cache, prefix) = match cache {
            Some((cache, l)) => {
                let at = cache.own_position(pos)?;
                cache.k[l].slice_set(&kx, 2, at)?;
                cache.v[l].slice_set(&vx, 2, at)?;
                let prefix = cache.prefix.as_ref().map(|p| super::cpu::Prefix {
                    keys: &p.k[l],
                    values: &p.v[l],
                    len: p.len,
                    rows: &p.rows,
                });
                (
                    cache.k[l].narrow(2, 0, at + t)?,
                    cache.v[l].narrow(2, 0, at + t)?,
                    Some((cache.k[l].clone(), cache.v[l].clone())),
                    prefix,
                )
            }
            None => (kx, vx, None, None),
        };
        // Keys so far: the prefix's and the row's own.
        let s = prefix.as_ref().map_or(0, |p| p.len) + keys.dim(2)?;
        drop(phase);
        let phase = crate::profile::phase("attention", x.device());

        // Grouped-query attention without repeating K/V: the G query heads sharing a kv head
        // are stacked along the row axis. (B, H, T, E) -> (B, K, G*T, E)
        let g = h / k;
        let q = q.reshape((b, k, g * t, e))?;
        let (scale, softcap) = (self.scale, self.softcap);
        let causal = mask.is_some_and(Mask::is_causal);
        let mask = mask.map(|m| m.for_heads(b, t, s)).transpose()?;
        let cpu_f32 = super::cpu::on_cpu_f32(&[x]);
        // (B, K, G*T, E) -> (B, H, T, E) -> (B, T, H*E)
        let merge = |out: Tensor| out.reshape((b, h, t, e))?.transpose(1, 2)?.reshape((b, t, h * e));
        if prefix.is_some() && (pass.train || !cpu_f32) {
            candle_core::bail!("a cache with a shared prefix is read by the CPU's f32 inference attention alone");
        }
        let out = if pass.train {
            // Probabilities recomputed in the backward pass instead of stored.
            merge(super::ops::attention(&q, &keys, &values, mask.as_ref(), causal, scale, softcap, g)?)?
        } else if let (Some((k_all, v_all)), true) = (&whole_cache, cpu_f32) {
            let merged = super::cpu::Heads::Merged { t };
            let cache = super::cpu::Cached { keys: k_all, values: v_all, s, prefix };
            super::cpu::attention_cpu(&q, cache, mask.as_ref(), scale, softcap, merged)?
        } else if let Some(out) = gpu_decode_attention(&q, t, whole_cache.as_ref(), s, mask.as_ref(), scale, softcap)? {
            merge(out)?
        } else {
            let scores = (q.matmul(&keys.t()?)? * scale)?; // (B, K, G*T, S)
            let scores = match softcap {
                Some(c) => ((scores / c)?.tanh()? * c)?,
                None => scores,
            };
            let scores =
                match &mask {
                    Some(m) => scores
                        .reshape((b, k, g, t, s))?
                        .broadcast_add(&m.to_dtype(scores.dtype())?)?
                        .reshape((b, k, g * t, s))?,
                    None => scores,
                };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            merge(probs.matmul(&values.contiguous()?)?)? // (B, K, G*T, E)
        };
        drop(phase);
        let _phase = crate::profile::phase("o projection", x.device());
        self.o_proj.forward(&out, pass, layer, Target::OProj)
    }
}

impl Attention {
    /// The queries, keys and values of x (B, T, D) as heads at positions pos..pos + T, q and k
    /// roped: (B, H, T, E), (B, K, T, E), (B, K, T, E).
    fn heads(&self, x: &Tensor, rope: &Rope, pos: usize, pass: Pass, layer: usize) -> Result<(Tensor, Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if let Some(heads) = self.fused_heads(x, rope, pos, pass, layer)? {
            return Ok(heads);
        }
        let (b, t, _) = x.dims3()?;
        let (h, k, e) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let phase = crate::profile::phase("q/k/v projections", x.device());
        // (B, T, H*E) -> (B, H, T, E)
        let parts = [(&self.q_proj, Target::QProj), (&self.k_proj, Target::KProj), (&self.v_proj, Target::VProj)];
        let stacked = self.qkv_stacked.as_ref().filter(|_| !pass.train);
        let (q, kx, vx) = match (&self.qkv_packed, stacked) {
            (Some(fused), _) => {
                let mut parts = fused_forward(x, Stack::Packed(fused), &parts, pass, layer)?.into_iter();
                (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap())
            }
            (None, Some(stacked)) => {
                let mut parts = fused_forward(x, Stack::Weight(stacked), &parts, pass, layer)?.into_iter();
                (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap())
            }
            (None, None) => (
                self.q_proj.forward(x, pass, layer, Target::QProj)?,
                self.k_proj.forward(x, pass, layer, Target::KProj)?,
                self.v_proj.forward(x, pass, layer, Target::VProj)?,
            ),
        };
        drop(phase);
        let _phase = crate::profile::phase("heads, rope, cache write", x.device());
        if !pass.train && self.qk_norms.is_none() && super::cpu::on_cpu_f32(&[x]) {
            // One pass per projection: split, roped on the way.
            let (cos, sin) = rope.tables(pos, t, x.dtype())?;
            let cpu = super::cpu::heads_cpu;
            return Ok((
                cpu(&q, h, &cos, &sin, 1.0, true)?,
                cpu(&kx, k, &cos, &sin, 1.0, true)?,
                cpu(&vx, k, &cos, &sin, 0.0, true)?,
            ));
        }
        let (q, kx) = (q.reshape((b, t, h, e))?, kx.reshape((b, t, k, e))?);
        let (q, kx) = match &self.qk_norms {
            Some((qn, kn)) => (qn.forward(&q, pass.train)?, kn.forward(&kx, pass.train)?),
            None => (q, kx),
        };
        let q = q.transpose(1, 2)?.contiguous()?;
        let kx = kx.transpose(1, 2)?.contiguous()?;
        let vx = vx.reshape((b, t, k, e))?.transpose(1, 2)?.contiguous()?;
        let q = rope.apply(&q, pos, pass.train)?;
        let kx = rope.apply(&kx, pos, pass.train)?;
        Ok((q, kx, vx))
    }

    /// [`Attention::heads`] in inference on the GPU: the stacked product, then one kernel that
    /// adds the biases, splits the heads and ropes them. None where it does not apply (training,
    /// q/k norms, an adapter on q, k or v, not bf16 on the GPU).
    #[cfg(feature = "cuda")]
    fn fused_heads(
        &self,
        x: &Tensor,
        rope: &Rope,
        pos: usize,
        pass: Pass,
        layer: usize,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        let Some(stacked) = self.qkv_stacked.as_ref().filter(|_| !pass.train) else { return Ok(None) };
        let adapted = pass.adapter.is_some_and(|a| {
            [Target::QProj, Target::KProj, Target::VProj].iter().any(|&target| a.pair(layer, target).is_some())
        });
        if adapted || self.qk_norms.is_some() || !super::cuda::applies(x) || !self.head_dim.is_multiple_of(4) {
            return Ok(None);
        }
        let (b, t, d) = x.dims3()?;
        let y = {
            let _phase = crate::profile::phase("q/k/v projections", x.device());
            x.reshape((b * t, d))?.matmul(&stacked.weight.t()?)? // (B*T, (H + 2K) E)
        };
        let _phase = crate::profile::phase("heads, rope, cache write", x.device());
        let (cos, sin) = rope.tables(pos, t, x.dtype())?;
        let dims = (b, t, self.num_heads, self.num_kv_heads);
        super::ops::attention::cuda::qkv_heads(&y, stacked.bias.as_ref(), &cos, &sin, dims).map(Some)
    }

    /// The self-attention of a training pass over x (B, T, D) at `span`'s positions, without a
    /// cache.
    fn for_training(&self, x: &Tensor, span: Span) -> Result<SelfAttention> {
        let (b, t, _) = x.dims3()?;
        let (cos, sin) = span.rope.tables(span.pos, t, x.dtype())?;
        let causal = span.mask.is_some_and(Mask::is_causal);
        let mask = span.mask.map(|m| m.for_heads(b, t, t)).transpose()?;
        Ok(SelfAttention::new(
            &cos,
            &sin,
            mask.as_ref(),
            causal,
            self.scale,
            self.softcap,
            self.num_heads,
            self.num_kv_heads,
        ))
    }
}

impl Attention {
    /// Whether [`Attention::forward_slots`] takes this layer in a pass: the stacked q/k/v product
    /// and the fused kernels (bf16 on the GPU, no adapter on q, k or v, no capped scores, head
    /// sizes 64 or 128 and at most 16 query heads per kv head).
    fn slots_apply(&self, pass: Pass, layer: usize) -> bool {
        let adapted = pass.adapter.is_some_and(|a| {
            [Target::QProj, Target::KProj, Target::VProj].iter().any(|&target| a.pair(layer, target).is_some())
        });
        let stacked =
            self.qkv_stacked.as_ref().is_some_and(|s| s.weight.device().is_cuda() && s.weight.dtype() == DType::BF16);
        stacked
            && !adapted
            && !pass.train
            && self.softcap.is_none()
            // The kernel adds the biases after the q/k norms, which would take them first.
            && !(self.qk_norms.is_some() && self.qkv_stacked.as_ref().is_some_and(|s| s.bias.is_some()))
            && matches!(self.head_dim, 64 | 128)
            && self.num_heads / self.num_kv_heads <= 16
    }

    /// A decoding step over a slot cache: x (N, 1, D) -> (N, 1, D); `rows` (N, 5) as
    /// [`Decoder::decode_slots`] takes it, `kv` and `prompts` this layer's slots and prompt
    /// store, `window` the layer's sliding window.
    #[cfg(feature = "cuda")]
    fn forward_slots(
        &self,
        x: &Tensor,
        (rope, window): (&Rope, Option<usize>),
        (kv, prompts): (&Tensor, &Tensor),
        rows: &Tensor,
        pass: Pass,
        layer: usize,
    ) -> Result<Tensor> {
        use super::ops::attention::cuda::{decode_slots, qkv_slots};
        let (n, _, d) = x.dims3()?;
        let (h, k, e) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let Some(stacked) = &self.qkv_stacked else {
            candle_core::bail!("decoding from slots needs the stacked q/k/v")
        };
        let y = {
            let _phase = crate::profile::phase("q/k/v projections", x.device());
            x.reshape((n, d))?.matmul(&stacked.weight.t()?)? // (N, (H + 2K) E)
        };
        let phase = crate::profile::phase("heads, rope, cache write", x.device());
        let y = match &self.qk_norms {
            // Each head of q and k normed before the rope (Qwen3, which has no q/k/v biases).
            Some((qn, kn)) => {
                let q = qn.forward(&y.narrow(1, 0, h * e)?.reshape((n, h, e))?, false)?;
                let key = kn.forward(&y.narrow(1, h * e, k * e)?.reshape((n, k, e))?, false)?;
                Tensor::cat(&[q.reshape((n, h * e))?, key.reshape((n, k * e))?, y.narrow(1, (h + k) * e, k * e)?], 1)?
            }
            None => y,
        };
        let q = qkv_slots(&y, stacked.bias.as_ref(), (&rope.cos, &rope.sin), rows, kv, (h, k))?; // (N, H, E)
        drop(phase);
        let phase = crate::profile::phase("attention", x.device());
        // (N, H, E) = (N, K, G, E): the G query heads of a kv head are consecutive.
        let out = decode_slots(&q.reshape((n, k, h / k, e))?, kv, prompts, rows, window, self.scale)?;
        let out = out.reshape((n, 1, h * e))?;
        drop(phase);
        let _phase = crate::profile::phase("o projection", x.device());
        self.o_proj.forward(&out, pass, layer, Target::OProj)
    }
}

/// Decoding attention on the GPU in bf16 by the fused kernel, straight from the whole cache
/// tensors, where it applies (one new token per row, shapes the kernel takes, scores not
/// capped). Otherwise None. q: (B, K, G, E) -> (B, K, G, E).
fn gpu_decode_attention(
    q: &Tensor,
    t: usize,
    whole_cache: Option<&(Tensor, Tensor)>,
    s: usize,
    mask: Option<&Tensor>,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if let (Some((k_all, v_all)), 1, None) = (whole_cache, t, softcap) {
        if super::ops::attention::cuda::decode_attention_fits(q, s, mask) {
            return super::ops::attention::cuda::decode_attention(q, k_all, v_all, s, mask, scale).map(Some);
        }
    }
    let _ = (q, t, whole_cache, s, mask, scale, softcap);
    Ok(None)
}

impl Mlp {
    fn forward(&self, x: &Tensor, pass: Pass, layer: usize) -> Result<Tensor> {
        let phase = crate::profile::phase("gate/up projections", x.device());
        let (gate, up) = match &self.gate_up_packed {
            Some(fused) => {
                let parts = [(&self.gate_proj, Target::GateProj), (&self.up_proj, Target::UpProj)];
                let mut parts = fused_forward(x, Stack::Packed(fused), &parts, pass, layer)?.into_iter();
                (parts.next().unwrap(), parts.next().unwrap())
            }
            None => (
                self.gate_proj.forward(x, pass, layer, Target::GateProj)?,
                self.up_proj.forward(x, pass, layer, Target::UpProj)?,
            ),
        };
        drop(phase);
        let phase = crate::profile::phase("activation", x.device());
        let h = super::ops::gated(self.activation, &gate, &up)?;
        drop(phase);
        let _phase = crate::profile::phase("down projection", x.device());
        self.down_proj.forward(&h, pass, layer, Target::DownProj)
    }
}

/// The weights of several projections of one input, stacked as one matrix (sum out, in).
enum Stack<'a> {
    /// Packed for the CPU f32 path, without the biases.
    Packed(&'a Arc<PackedMatrix>),
    /// A GPU weight with the stacked biases (inference only).
    Weight(&'a Linear),
}

/// Several projections of the same input as one product: x (B, T, in) @ stacked^T, split back
/// into one (B, T, out) per projection, biases and adapter terms added (in the projections'
/// order, which is also the order their dropout masks are drawn in).
fn fused_forward(
    x: &Tensor,
    stack: Stack,
    parts: &[(&Linear, Target)],
    pass: Pass,
    layer: usize,
) -> Result<Vec<Tensor>> {
    let (b, t, d_in) = x.dims3()?;
    let x2 = x.reshape((b * t, d_in))?;
    let widths = parts.iter().map(|(lin, _)| lin.weight.dim(0)).collect::<Result<Vec<_>>>()?;
    // The stacked product (N, sum out) as one view (N, out) per projection.
    let split = |y: Tensor| -> Result<Vec<Tensor>> {
        let mut offset = 0;
        let mut ys = Vec::with_capacity(widths.len());
        for &n in &widths {
            ys.push(y.narrow(1, offset, n)?);
            offset += n;
        }
        Ok(ys)
    };
    // Each projection's frozen product (N, out), and whether its bias is in it.
    let (ys, biased) = match stack {
        // Inference on the CPU: each projection's product straight into its own tensor.
        Stack::Packed(packed) if !pass.train => (super::cpu::linear_packed_parts(&x2, packed, &widths)?, false),
        Stack::Packed(packed) => (split(frozen_product(&x2, packed, pass)?)?, false),
        Stack::Weight(stacked) => {
            let y = x2.matmul(&stacked.weight.t()?)?;
            let y = match &stacked.bias {
                Some(bias) => y.broadcast_add(bias)?,
                None => y,
            };
            (split(y)?, true)
        }
    };
    let mut out = Vec::with_capacity(parts.len());
    for ((lin, target), mut p) in parts.iter().zip(ys) {
        if let (Some(bias), false) = (&lin.bias, biased) {
            p = p.broadcast_add(bias)?;
        }
        if let Some(delta) = lora_delta(&x2, pass, layer, *target)? {
            p = (p + delta)?;
        }
        out.push(p.reshape((b, t, ()))?);
    }
    Ok(out)
}

impl Layer {
    /// The layer on the residual stream `x + pending` (`pending`: the previous layer's MLP
    /// branch, not yet added), as (the stream after attention, this layer's MLP branch), whose
    /// sum is the layer's output: `x + attn(norm(x))`, then `mlp(norm(.))`; with output norms
    /// `x + norm(attn(norm(x)))`, then `norm(mlp(norm(.)))`. Each addition is left to the norm
    /// that reads its sum.
    pub(crate) fn forward_unadded(
        &self,
        x: &Tensor,
        pending: Option<&Tensor>,
        span: Span,
        cache: Option<(&mut KvCache, usize)>,
        pass: Pass,
        index: usize,
    ) -> Result<Tensor2> {
        let span = span.for_layer(self.window);
        self.forward_unadded_with(x, pending, pass, index, |h| self.self_attn.forward(h, span, cache, pass, index))
    }

    /// [`Layer::forward_unadded`] for the decoding step of several groups of rows at once: the
    /// attention runs per group, on its rows, cache and positions; the rest on the whole batch.
    fn forward_unadded_segments(
        &self,
        x: &Tensor,
        pending: Option<&Tensor>,
        segments: &mut [DecodeSegment],
        spans: &[Span],
        pass: Pass,
        index: usize,
    ) -> Result<Tensor2> {
        self.forward_unadded_with(x, pending, pass, index, |h| {
            let mut outs = Vec::with_capacity(segments.len());
            let mut first = 0;
            for (segment, span) in segments.iter_mut().zip(spans) {
                let rows = h.narrow(0, first, segment.rows)?;
                let cache = Some((&mut *segment.cache, index));
                outs.push(self.self_attn.forward(&rows, span.for_layer(self.window), cache, pass, index)?);
                first += segment.rows;
            }
            Tensor::cat(&outs, 0)
        })
    }

    /// The layer around its attention `attend` (the normed input -> the attention's output).
    fn forward_unadded_with(
        &self,
        x: &Tensor,
        pending: Option<&Tensor>,
        pass: Pass,
        index: usize,
        attend: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor2> {
        let (x, h) = self.input_layernorm.forward_added(x, pending, pass.train)?;
        let mut h = attend(&h)?;
        if let Some((attention_out, _)) = &self.output_norms {
            h = attention_out.forward(&h, pass.train)?;
        }
        let (x1, h) = self.mlp_norm.forward_added(&x, Some(&h), pass.train)?;
        let mut h = self.mlp.forward(&h, pass, index)?;
        if let Some((_, mlp_out)) = &self.output_norms {
            h = mlp_out.forward(&h, pass.train)?;
        }
        Ok((x1, h))
    }

    /// Whether the pass can run this layer as one op (see [`Decoder::layers_run`]).
    fn runs_as_one_op(&self, pass: Pass) -> bool {
        pass.train && pass.adapter.is_some() && pass.sink.is_some()
    }

    /// The parts of the layer op ([`super::lora`]) for this layer, for a pass that runs it as one.
    /// Draws the layer's dropout keys.
    pub(crate) fn lora_parts<'a>(
        &'a self,
        x: &Tensor,
        span: Span,
        pass: Pass<'a>,
        index: usize,
    ) -> Result<super::lora::LayerParts<'a>> {
        let Some(adapter) = pass.adapter else { candle_core::bail!("a layer op needs an adapter") };
        let (a, m) = (&self.self_attn, &self.mlp);
        let lins = [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj];
        let attention = a.for_training(x, span.for_layer(self.window))?;
        // Dropout keys in the order the separate projections draw them.
        let mut projections = Vec::with_capacity(lins.len());
        for (lin, target) in lins.iter().zip(Target::ALL) {
            projections.push(lin.projection(adapter.pair(index, target), pass, adapter)?);
        }
        let mut p = projections.into_iter();
        let mut next = || p.next().expect("seven projections");
        let parts = super::lora::LayerParts {
            norm1: (&self.input_layernorm.weight, self.input_layernorm.eps),
            norm2: (&self.mlp_norm.weight, self.mlp_norm.eps),
            qk_norms: a.qk_norms.as_ref().map(|(q, k)| [(&q.weight, q.eps), (&k.weight, k.eps)]),
            output_norms: self.output_norms.as_ref().map(|(a, m)| [(&a.weight, a.eps), (&m.weight, m.eps)]),
            attention_projections: [next(), next(), next(), next()],
            attention,
            activation: m.activation,
            mlp: [next(), next(), next()],
            packed_qkv: a.qkv_packed.clone(),
            packed_gate_up: m.gate_up_packed.clone(),
        };
        Ok(parts)
    }

    /// Packs the layer's weights for inference (at load, and after a merge changed them): q/k/v
    /// and gate/up each stacked into one matrix (one product serves the projections of the
    /// same input), o and down alone; on the GPU q/k/v stacked. Each weight is packed once: the
    /// stacked copies are the only packed ones of their projections.
    fn pack(&mut self) -> Result<()> {
        let a = &mut self.self_attn;
        a.qkv_packed = packed_for_cpu(&[&a.q_proj.weight, &a.k_proj.weight, &a.v_proj.weight])?;
        a.qkv_stacked = stacked_for_gpu(&mut [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj])?;
        let m = &mut self.mlp;
        m.gate_up_packed = packed_for_cpu(&[&m.gate_proj.weight, &m.up_proj.weight])?;
        for lin in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut m.gate_proj, &mut m.up_proj] {
            lin.packed = None;
        }
        for lin in [&mut a.o_proj, &mut m.down_proj] {
            lin.packed = packed_for_cpu(&[&lin.weight])?;
        }
        Ok(())
    }
}

/// The projections' weights [W1; W2; ...] (sum out, in) and biases stacked on the GPU, the
/// projections' own weights (and biases) becoming views of them; None off the GPU.
fn stacked_for_gpu(lins: &mut [&mut Linear]) -> Result<Option<Linear>> {
    let w = &lins[0].weight;
    if !w.device().is_cuda() {
        return Ok(None);
    }
    let weight = Tensor::cat(&lins.iter().map(|l| &l.weight).collect::<Vec<_>>(), 0)?;
    let bias = if lins.iter().any(|l| l.bias.is_some()) {
        let parts = lins
            .iter()
            .map(|l| match &l.bias {
                Some(b) => Ok(b.clone()),
                None => Tensor::zeros(l.weight.dim(0)?, w.dtype(), w.device()),
            })
            .collect::<Result<Vec<_>>>()?;
        Some(Tensor::cat(&parts, 0)?)
    } else {
        None
    };
    let mut offset = 0;
    for lin in lins.iter_mut() {
        let n = lin.weight.dim(0)?;
        lin.weight = weight.narrow(0, offset, n)?;
        if let (Some(stacked), Some(_)) = (&bias, &lin.bias) {
            lin.bias = Some(stacked.narrow(0, offset, n)?);
        }
        offset += n;
    }
    Ok(Some(Linear { weight, packed: None, bias }))
}

/// Rotary embedding tables: cos/sin of (position, frequency), (max_pos, E/2).
#[derive(Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &Config, dtype: DType, device: &Device) -> Result<Self> {
        let e = cfg.head_dim();
        let max = cfg.max_position_embeddings.max(1);
        let inv_freq: Vec<f32> =
            (0..e / 2).map(|i| (1.0 / cfg.rope_theta().powf(2.0 * i as f64 / e as f64)) as f32).collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, e / 2), device)?;
        let positions = Tensor::arange(0u32, max as u32, device)?.to_dtype(DType::F32)?.reshape((max, 1))?;
        let freqs = positions.matmul(&inv_freq)?; // (max_pos, E/2)
        Ok(Rope { cos: freqs.cos()?.to_dtype(dtype)?, sin: freqs.sin()?.to_dtype(dtype)? })
    }

    /// x: (B, H, T, E) at positions pos..pos+T.
    fn apply(&self, x: &Tensor, pos: usize, train: bool) -> Result<Tensor> {
        let (cos, sin) = self.tables(pos, x.dim(2)?, x.dtype())?;
        if train {
            super::ops::rope(x, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope(x, &cos, &sin)
        }
    }

    /// cos and sin of positions pos..pos + t: (t, E/2) each, in `dtype`.
    fn tables(&self, pos: usize, t: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        if pos + t > self.cos.dim(0)? {
            candle_core::bail!(
                "sequence of {} positions exceeds the model's max_position_embeddings ({})",
                pos + t,
                self.cos.dim(0)?
            );
        }
        Ok((self.cos.narrow(0, pos, t)?.to_dtype(dtype)?, self.sin.narrow(0, pos, t)?.to_dtype(dtype)?))
    }
}

/// The implementations of a decoder's layers, one chosen per pass by [`Decoder::layers_run`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayersRun {
    /// Inference (fused kernels, a KV cache) and composite training (differentiable ops in
    /// candle's graph, without a gradient sink: the reference the hand-written rules are tested
    /// against): each layer by `Layer::forward`, here.
    Composite,
    /// Training with each layer one op with a hand-written backward rule ([`super::lora`]), all
    /// layers one node.
    LayerOps,
    /// The layer ops under gradient checkpointing ([`super::checkpoint::stack`]).
    CheckpointedLayerOps,
}

/// The whole decoder.
#[derive(Clone)]
pub struct Decoder {
    pub config: Config,
    pub embed_tokens: Tensor, // (V, D)
    pub layers: Vec<Layer>,
    pub norm: RmsNorm,
    pub lm_head: Tensor, // (V, D); the embedding itself when tied
    /// lm_head packed for the CPU inference path.
    lm_head_packed: Option<Arc<PackedMatrix>>,
    rope: Rope,
    /// The embeddings' factor, sqrt(hidden_size) rounded to the dtype (Gemma).
    embed_scale: Option<f64>,
    /// The final logits capped to `c * tanh(l / c)` (Gemma 2).
    final_softcap: Option<f64>,
    pub dtype: DType,
    pub device: Device,
}

/// The bias name beside the `index`-th projection's weight.
fn weight_to_bias(spec: &super::family::LayerTensors, index: usize) -> String {
    let name = &spec.projections[index].1.name;
    format!("{}.bias", name.strip_suffix(".weight").unwrap_or(name))
}

/// Takes named tensors out of a checkpoint, checking shapes and naming what is missing.
pub struct Weights {
    pub tensors: HashMap<String, Tensor>,
    pub source: String,
}

impl Weights {
    /// Every tensor of the file must have been used: a leftover means that the file and its
    /// config disagree (a GGUF whose block_count is 2 beside 30 layers of tensors would
    /// otherwise load as a 2-layer model and write garbage).
    fn check_all_used(&self, c: &Config) -> anyhow::Result<()> {
        // Buffers some exporters save beside the weights, recomputed here.
        let derived = |n: &str| n.ends_with("rotary_emb.inv_freq");
        let mut left: Vec<&String> = self.tensors.keys().filter(|n| !derived(n)).collect();
        if left.is_empty() {
            return Ok(());
        }
        left.sort();
        let shown: Vec<&str> = left.iter().take(6).map(|s| s.as_str()).collect();
        anyhow::bail!(
            "{}: {} tensor(s) are not part of a model of this config ({} layers, {}): {}{}; the file and \
             its config disagree (num_hidden_layers, tie_word_embeddings or the architecture)",
            self.source,
            left.len(),
            c.num_hidden_layers,
            c.architectures.first().map(String::as_str).unwrap_or("?"),
            shown.join(", "),
            if left.len() > shown.len() { ", ..." } else { "" }
        )
    }

    fn take(&mut self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> anyhow::Result<Tensor> {
        let t = self.tensors.remove(name).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: tensor '{name}' is missing; the file is incomplete or not a {}-shaped model",
                self.source,
                "decoder"
            )
        })?;
        anyhow::ensure!(
            t.dims() == shape,
            "{}: tensor '{name}' has shape {:?}, the config implies {:?}",
            self.source,
            t.dims(),
            shape
        );
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    fn take_spec(&mut self, spec: &super::family::TensorSpec, dtype: DType, device: &Device) -> anyhow::Result<Tensor> {
        self.take(&spec.name, &spec.shape, dtype, device)
    }

    /// An RMSNorm; a family whose files store the scale less one gets it back here, the sum
    /// in f32 (its own forward adds it in f32 too) rounded once to `dtype`.
    fn take_norm(
        &mut self,
        spec: &super::family::TensorSpec,
        family: &super::family::Family,
        c: &Config,
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<RmsNorm> {
        let weight = if family.norm_plus_one {
            let wide = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
            let w = self.take(&spec.name, &spec.shape, wide, &Device::Cpu)?;
            (w + 1.0)?.to_dtype(dtype)?.to_device(device)?
        } else {
            self.take_spec(spec, dtype, device)?
        };
        Ok(RmsNorm { weight, eps: c.rms_norm_eps })
    }

    fn take_opt(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Option<Tensor>> {
        if self.tensors.contains_key(name) {
            self.take(name, shape, dtype, device).map(Some)
        } else {
            Ok(None)
        }
    }
}

impl Decoder {
    /// Builds the decoder from transformers-named weights.
    pub fn new(config: Config, mut w: Weights, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        config.validate()?;
        let c = &config;
        let family = c.family()?;
        let (h, k, e) = (c.num_attention_heads, c.num_kv_heads(), c.head_dim());
        let (embed_spec, norm_spec, head_spec) = super::family::outer_tensors(c);
        let embed_tokens = w.take_spec(&embed_spec, dtype, device)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let spec = super::family::layer_tensors(family, c, i);
            let mut lins = Vec::with_capacity(spec.projections.len());
            for (_, weight, bias) in &spec.projections {
                let weight = w.take_spec(weight, dtype, device)?;
                let bias = match bias {
                    Some(b) => Some(w.take_spec(b, dtype, device)?),
                    // A bias the family does not require, where a file has one, is used.
                    None => w.take_opt(&weight_to_bias(&spec, lins.len()), &[weight.dim(0)?], dtype, device)?,
                };
                lins.push(Linear::new(weight, bias)?);
            }
            let mut norm =
                |s: &super::family::TensorSpec| -> anyhow::Result<RmsNorm> { w.take_norm(s, family, c, dtype, device) };
            let qk_norms = match &spec.qk_norms {
                Some((q, k)) => Some((norm(q)?, norm(k)?)),
                None => None,
            };
            let output_norms = match &spec.output_norms {
                Some((a, m)) => Some((norm(a)?, norm(m)?)),
                None => None,
            };
            let (input_layernorm, mlp_norm) = (norm(&spec.input_norm)?, norm(&spec.mlp_norm)?);
            let mut lins = lins.into_iter();
            let mut next = || lins.next().expect("seven projections");
            let self_attn = Attention {
                q_proj: next(),
                k_proj: next(),
                v_proj: next(),
                o_proj: next(),
                qk_norms,
                num_heads: h,
                num_kv_heads: k,
                head_dim: e,
                scale: c.attention_scale(),
                softcap: c.attention_softcap(),
                qkv_packed: None,
                qkv_stacked: None,
            };
            let activation = c.activation()?;
            let mlp = Mlp { activation, gate_proj: next(), up_proj: next(), down_proj: next(), gate_up_packed: None };
            let window = c.layer_window(i);
            let mut layer = Layer { input_layernorm, self_attn, mlp_norm, mlp, output_norms, window };
            layer.pack()?;
            layers.push(layer);
        }
        let norm = w.take_norm(&norm_spec, family, c, dtype, device)?;
        // A tied model's file may still carry the head (a copy of the embeddings): used up, unread.
        let lm_head = match head_spec {
            Some(spec) => w.take_spec(&spec, dtype, device)?,
            None => {
                let _ = w.take_opt("lm_head.weight", embed_tokens.dims(), dtype, device)?;
                embed_tokens.clone()
            }
        };
        w.check_all_used(c)?;
        let rope = Rope::new(c, dtype, device)?;
        let lm_head_packed = packed_for_cpu(&[&lm_head])?;
        let embed_scale = family.scaled_embeddings.then(|| rounded_to(dtype, (c.hidden_size as f64).sqrt()));
        let final_softcap = c.final_softcap();
        Ok(Decoder {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            lm_head_packed,
            rope,
            embed_scale,
            final_softcap,
            dtype,
            device: device.clone(),
        })
    }

    /// ids: (B, T) u32 at positions pos..pos+T -> final hidden states (B, T, D).
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        pos: usize,
        mask: Option<&Mask>,
        mut cache: Option<&mut KvCache>,
        pass: Pass,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let windowed = self.windowed_mask(mask, b, pos, t)?;
        let span = Span { rope: &self.rope, pos, mask, windowed: windowed.as_ref() };
        let x = self.embed(ids)?;
        // The residual stream after the layers, and the last layer's branch where it is not added
        // to it yet.
        let (h, pending) = match (self.layers_run(pass, cache.is_some()), pass.sink) {
            (LayersRun::LayerOps, Some(sink)) => {
                let layers = self.layers.iter().enumerate().map(|(i, layer)| layer.lora_parts(&x, span, pass, i));
                let layers: Vec<_> = layers.collect::<Result<_>>()?;
                let packing = match pass.lengths {
                    Some(lengths) => super::lora::Packing::of(lengths, t, &layers, &x)?,
                    None => None,
                };
                (super::lora::stack(&x, layers, sink, packing)?, None)
            }
            (LayersRun::CheckpointedLayerOps, Some(sink)) => {
                (super::checkpoint::stack(&self.layers, &x, span, pass, sink)?, None)
            }
            _ => {
                let out = self.layer_by_layer(x, |layer, i, x, pending| {
                    let cache = cache.as_deref_mut().map(|c| (c, i));
                    layer.forward_unadded(x, pending, span, cache, pass, i)
                })?;
                if let Some(c) = cache {
                    c.len = pos + t;
                }
                out
            }
        };
        Ok(self.norm.forward_added(&h, pending.as_ref(), pass.train)?.1)
    }

    /// The residual stream x through every layer by `layer_step(layer, index, x, pending)` (one
    /// layer's [`Layer::forward_unadded`] or a variant): the stream after the last layer and
    /// that layer's branch, not yet added to it.
    fn layer_by_layer(
        &self,
        x: Tensor,
        mut layer_step: impl FnMut(&Layer, usize, &Tensor, Option<&Tensor>) -> Result<Tensor2>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (mut x, mut pending) = (x, None);
        for (i, layer) in self.layers.iter().enumerate() {
            let (x1, h) = layer_step(layer, i, &x, pending.as_ref())?;
            (x, pending) = (x1, Some(h));
        }
        Ok((x, pending))
    }

    /// Which implementation of the layers a pass runs, decided here once for the whole pass
    /// (before any layer draws its dropout keys, so that the keys are the same whichever runs).
    /// The layer ops need a training pass with an adapter and a gradient sink, and no cache; on the
    /// CPU in f32 they run their frozen products through the packed weights. Gradient
    /// checkpointing needs them (a checkpointed pass has a sink).
    pub fn layers_run(&self, pass: Pass, cached: bool) -> LayersRun {
        let layer_ops = !cached && self.layers.iter().all(|l| l.runs_as_one_op(pass));
        match (layer_ops, pass.checkpoint) {
            (true, true) => LayersRun::CheckpointedLayerOps,
            (true, false) => LayersRun::LayerOps,
            (false, _) => LayersRun::Composite,
        }
    }

    /// The mask of the layers with a sliding window, where the window hides keys that `mask`
    /// shows: some query at position p then sees keys at p - window or before. None where the
    /// window hides nothing (the layers then take `mask` as it is, and its fused kernels).
    fn windowed_mask(&self, mask: Option<&Mask>, b: usize, pos: usize, t: usize) -> Result<Option<Mask>> {
        let Some(w) = self.layers.iter().filter_map(|l| l.window).min() else { return Ok(None) };
        if pos + t <= w {
            return Ok(None);
        }
        Mask::windowed(mask, b, pos, t, w, &self.device).map(Some)
    }

    /// ids (B, T) -> the embeddings (B, T, D), scaled where the family scales them.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let x = candle_nn::Embedding::new(self.embed_tokens.clone(), self.config.hidden_size).forward(ids)?;
        match self.embed_scale {
            Some(scale) => x * scale,
            None => Ok(x),
        }
    }

    /// One decoding step of several groups of rows at once ([`DecodeSegment`]), whose positions
    /// and caches differ: ids (B, 1), the groups' rows consecutive in their order -> hidden (B, 1,
    /// D). Each row gets what [`Decoder::forward_hidden`] gives it in its group alone (every op
    /// but the attention treats rows apart, and the attention runs per group), so groups can join
    /// a batch in flight as others' rows finish.
    pub fn decode_step(&self, ids: &Tensor, segments: &mut [DecodeSegment], pass: Pass) -> Result<Tensor> {
        if let [one] = segments {
            return self.forward_hidden(ids, one.pos, Some(one.mask), Some(&mut *one.cache), pass);
        }
        let (b, t) = ids.dims2()?;
        if t != 1 || segments.iter().map(|s| s.rows).sum::<usize>() != b || pass.train {
            candle_core::bail!("a decoding step takes one new token for each row of its groups, for inference");
        }
        let windowed: Vec<Option<Mask>> =
            segments.iter().map(|s| self.windowed_mask(Some(s.mask), s.rows, s.pos, 1)).collect::<Result<_>>()?;
        let spans: Vec<Span> = segments
            .iter()
            .zip(&windowed)
            .map(|(s, w)| Span { rope: &self.rope, pos: s.pos, mask: Some(s.mask), windowed: w.as_ref() })
            .collect();
        let (x, pending) = self.layer_by_layer(self.embed(ids)?, |layer, i, x, pending| {
            layer.forward_unadded_segments(x, pending, segments, &spans, pass, i)
        })?;
        for s in segments.iter_mut() {
            s.cache.len = s.pos + 1;
        }
        Ok(self.norm.forward_added(&x, pending.as_ref(), pass.train)?.1)
    }

    /// Whether decoding can run from a [`SlotCache`] ([`Decoder::decode_slots`]) in this pass: on
    /// the GPU in bf16, every layer's attention by the fused kernels.
    pub fn slots_apply(&self, pass: Pass) -> bool {
        cfg!(feature = "cuda")
            && self.device.is_cuda()
            && self.dtype == DType::BF16
            && self.layers.iter().enumerate().all(|(i, l)| l.self_attn.slots_apply(pass, i))
    }

    /// One decoding step over a [`SlotCache`]: ids (N, 1), one new token per row -> hidden (N, 1,
    /// D). rows: (N, 5) u32 on the device, each row's slot, the positions it holds, its new
    /// token's position, its prompt's slot in the prompt store and the prompt's length there (0
    /// where its slot holds the prompt); the step writes each row's new keys and values after
    /// those it holds. Each row gets what [`Decoder::forward_hidden`] gives it in its prompt's
    /// group: it holds the group's keys of that row without the padding's, which the group's mask
    /// hides.
    pub fn decode_slots(&self, ids: &Tensor, cache: &SlotCache, rows: &Tensor, pass: Pass) -> Result<Tensor> {
        if ids.dim(1)? != 1 || rows.dims() != [ids.dim(0)?, 5] || !self.slots_apply(pass) {
            candle_core::bail!("a decoding step from slots takes one new token per row, on the GPU in bf16");
        }
        self.layers_from_slots(ids, cache, rows, pass)
    }

    /// [`Decoder::decode_slots`]'s layers, on the GPU.
    #[cfg(feature = "cuda")]
    fn layers_from_slots(&self, ids: &Tensor, cache: &SlotCache, rows: &Tensor, pass: Pass) -> Result<Tensor> {
        let (x, pending) = self.layer_by_layer(self.embed(ids)?, |layer, i, x, pending| {
            let positions = (&self.rope, layer.window);
            let stores = (&cache.kv[i], cache.prompt_store(i));
            let attend = |h: &Tensor| layer.self_attn.forward_slots(h, positions, stores, rows, pass, i);
            layer.forward_unadded_with(x, pending, pass, i, attend)
        })?;
        Ok(self.norm.forward_added(&x, pending.as_ref(), pass.train)?.1)
    }

    /// Without the GPU kernels nothing decodes from slots ([`Decoder::slots_apply`] is false).
    #[cfg(not(feature = "cuda"))]
    fn layers_from_slots(&self, _: &Tensor, _: &SlotCache, _: &Tensor, _: Pass) -> Result<Tensor> {
        candle_core::bail!("decoding from slots needs a build with the GPU kernels (feature cuda)")
    }

    /// The final logits' soft cap, if the model has one.
    pub fn final_softcap(&self) -> Option<f64> {
        self.final_softcap
    }

    /// lm_head packed for the CPU in f32, where the model has it.
    pub fn lm_head_packed(&self) -> Option<&Arc<PackedMatrix>> {
        self.lm_head_packed.as_ref()
    }

    /// hidden: (B, T, D) -> logits (B, T, V) in f32.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.logits_as_computed(hidden)?.to_dtype(DType::F32)
    }

    /// hidden: (B, T, D) -> logits (B, T, V) in the model's dtype (the product's f32 sums rounded
    /// once, as every bf16 stack samples from), for consumers that read them once.
    pub fn logits_as_computed(&self, hidden: &Tensor) -> Result<Tensor> {
        let (b, t, d) = hidden.dims3()?;
        let _phase = crate::profile::phase("logits", hidden.device());
        let h = hidden.reshape((b * t, d))?;
        let logits = match &self.lm_head_packed {
            Some(packed) => super::cpu::linear_packed(&h, packed)?,
            None => h.matmul(&self.lm_head.t()?)?,
        };
        let logits = match self.final_softcap {
            Some(c) => ((logits / c)?.tanh()? * c)?,
            None => logits,
        };
        logits.reshape((b, t, ()))
    }

    /// Logits of every position for unpadded rows: ids (B, T) -> (B, T, V).
    pub fn forward(&self, ids: &Tensor, adapter: Option<&Adapter>) -> Result<Tensor> {
        let t = ids.dim(1)?;
        let mask = Mask::causal(t, &self.device)?;
        let hidden = self.forward_hidden(ids, 0, Some(&mask), None, Pass::infer(adapter))?;
        self.logits(&hidden)
    }

    /// A copy of the decoder with the adapter's deltas folded into the base weights.
    pub fn merged(&self, adapter: &Adapter) -> Result<Decoder> {
        let mut out = self.clone();
        for (i, layer) in out.layers.iter_mut().enumerate() {
            let slots: [(&mut Linear, Target); 7] = [
                (&mut layer.self_attn.q_proj, Target::QProj),
                (&mut layer.self_attn.k_proj, Target::KProj),
                (&mut layer.self_attn.v_proj, Target::VProj),
                (&mut layer.self_attn.o_proj, Target::OProj),
                (&mut layer.mlp.gate_proj, Target::GateProj),
                (&mut layer.mlp.up_proj, Target::UpProj),
                (&mut layer.mlp.down_proj, Target::DownProj),
            ];
            let mut changed = false;
            for (lin, target) in slots {
                if let Some(delta) = adapter.delta(i, target, DType::F32)? {
                    // Fold in f32, then back to the model's dtype: one rounding, as PEFT's merge.
                    let w = (lin.weight.to_dtype(DType::F32)? + delta.to_device(&self.device)?)?;
                    // detach: the merged weight is a constant, not a function of the adapter's
                    // variables (else training on the merged model would track it).
                    lin.weight = w.to_dtype(self.dtype)?.detach();
                    changed = true;
                }
            }
            if changed {
                layer.pack()?;
            }
        }
        Ok(out)
    }

    /// Shape of every projection a LoRA can target: (out, in).
    pub fn projection_shape(&self, target: Target) -> (usize, usize) {
        super::family::projection_shape(&self.config, target)
    }
}

/// The attention mask of a forward pass, additive: 0 where a key is visible, -inf where not.
#[derive(Clone)]
pub enum Mask {
    /// The causal mask (T, T) of [`Mask::causal`]: the GPU kernels apply it without reading it.
    Causal(Tensor),
    /// One per row, (B, 1, T, S): causal, with each row's left padding hidden as well (batched
    /// prefill and decoding).
    Rows(Tensor),
    /// One for every row, (T, S), not the causal one (a sliding window's).
    Shared(Tensor),
}

impl Mask {
    /// 0 on and below the diagonal, -inf above: (T, T).
    pub fn causal(t: usize, device: &Device) -> Result<Mask> {
        let data: Vec<f32> =
            (0..t).flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
        Ok(Mask::Causal(Tensor::from_vec(data, (t, t), device)?))
    }

    fn is_causal(&self) -> bool {
        matches!(self, Mask::Causal(_))
    }

    /// `mask` (None: every key visible) for B rows of T queries at positions pos.. with the keys
    /// at `window` or more positions before each query hidden as well: the mask of a layer with
    /// a sliding window. Left padding shifts a row's positions, not their differences.
    fn windowed(mask: Option<&Mask>, b: usize, pos: usize, t: usize, window: usize, device: &Device) -> Result<Mask> {
        let s = pos + t;
        let data: Vec<f32> = (0..t)
            .flat_map(|i| (0..s).map(move |j| if pos + i >= j + window { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let window = Tensor::from_vec(data, (t, s), device)?; // (T, S)
        match mask {
            None => Ok(Mask::Shared(window)),
            Some(Mask::Causal(m) | Mask::Shared(m)) => Ok(Mask::Shared(m.broadcast_add(&window)?)),
            Some(Mask::Rows(m)) => Ok(Mask::Rows(m.reshape((b, 1, t, s))?.broadcast_add(&window)?)),
        }
    }

    /// As attention takes it for B rows of T queries and S keys: (B or 1, 1, 1, T, S), shared
    /// by the query heads of a kv head.
    fn for_heads(&self, b: usize, t: usize, s: usize) -> Result<Tensor> {
        match self {
            Mask::Causal(m) | Mask::Shared(m) => m.reshape((1, 1, 1, t, s)),
            Mask::Rows(m) => m.reshape((b, 1, 1, t, s)),
        }
    }
}

/// Where a forward pass runs: positions pos..pos+T, their rotary tables, and the mask.
#[derive(Clone, Copy)]
pub(crate) struct Span<'a> {
    pub rope: &'a Rope,
    pub pos: usize,
    pub mask: Option<&'a Mask>,
    /// The mask of the layers with a sliding window, where it differs from `mask`.
    pub windowed: Option<&'a Mask>,
}

impl<'a> Span<'a> {
    /// The span as a layer with this window sees it.
    pub fn for_layer(self, window: Option<usize>) -> Span<'a> {
        match (window, self.windowed) {
            (Some(_), Some(windowed)) => Span { mask: Some(windowed), ..self },
            _ => self,
        }
    }
}

/// `x` rounded to `dtype` (as a scalar tensor of it would hold it).
fn rounded_to(dtype: DType, x: f64) -> f64 {
    match dtype {
        DType::BF16 => half::bf16::from_f64(x).to_f64(),
        DType::F16 => half::f16::from_f64(x).to_f64(),
        DType::F32 => x as f32 as f64,
        _ => x,
    }
}
