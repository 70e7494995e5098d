//! Attention for training that recomputes its probabilities in the backward pass, and the
//! decoder layer's self-attention (heads split, roped and merged) built on it.

use candle_core::{Result, Tensor};

#[cfg(feature = "cuda")]
use super::fused;
use super::Handoff;

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

/// Attention for training, `softmax(cap(q k^T * scale) + mask) v`, that keeps only its inputs
/// and output for the backward pass and recomputes the probabilities there. `softcap`: the
/// scores become `c * tanh(s / c)` (Gemma 2), else they stay as they are.
///
/// Materialised scores and probabilities are the largest tensors of a training step (for a 7B
/// model and 4 x 1024 tokens, about 1.6 GB per layer in the composite form); here they live only
/// while one layer's forward or backward runs. Backward, with P the probabilities and dO the
/// output's gradient: dV = P^T dO; dS = P * (dO V^T - rowsum(dO V^T * P)); dQ = dS K * scale;
/// dK = dS^T Q * scale; a cap multiplies dS by its derivative 1 - tanh^2(s / c).
///
/// Shapes: q (B, K, G*T, E), k and v (B, K, S, E); `mask` additive, (B or 1, 1, 1, T, S), shared
/// by the G query heads of each kv head.
///
/// `causal`: the mask is exactly the causal one (key j visible to position t when
/// j <= t + S - T); on the GPU in bf16 a fused kernel then applies it without reading the mask.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    scale: f64,
    softcap: Option<f64>,
    g: usize,
) -> Result<Tensor> {
    recomputed(AttentionRule::new(mask, causal, scale, softcap, g), q, k, v)
}

/// An attention from q, k and v with its own backward rule: [`AttentionRule`] and
/// [`SelfAttention`].
trait Qkv: Send + Sync + 'static {
    const NAME: &'static str;
    /// The output of untracked q, k and v.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor>;
    /// The gradients of q, k and v from the output `out` and its gradient (untracked inputs).
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)>;
}

/// `rule`'s attention as one op in the graph, differentiable in q, k and v: the output is computed
/// before the op is applied and handed over, and the backward pass recomputes what it needs.
fn recomputed<R: Qkv>(rule: R, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let out = rule.forward(&q.detach(), &k.detach(), &v.detach())?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    q.apply_op3(k, v, AttentionOp { rule, out: Handoff::new(out)? })
}

struct AttentionRule {
    mask: Option<Tensor>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    causal: bool,
    scale: f64,
    softcap: Option<f64>,
    g: usize,
    /// Where the flash kernels ran, what the forward pass keeps for the backward pass: the row
    /// statistics, with the roped q of the merged layout (otherwise q itself).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    saved: std::sync::Mutex<Option<(Tensor, Tensor)>>,
}

/// The attention op in the graph: its output, computed before it is applied, is handed over.
struct AttentionOp<R> {
    rule: R,
    out: Handoff,
}

impl AttentionRule {
    fn new(mask: Option<&Tensor>, causal: bool, scale: f64, softcap: Option<f64>, g: usize) -> Self {
        AttentionRule { mask: mask.map(|m| m.detach()), causal, scale, softcap, g, saved: Default::default() }
    }

    /// Whether the fused GPU kernels compute this attention (causal).
    #[cfg(feature = "cuda")]
    fn fused(&self, q: &Tensor) -> bool {
        self.causal && fused(q)
    }

    /// What the forward pass of the flash kernels keeps for the backward pass.
    #[cfg(feature = "cuda")]
    fn saved(&self) -> Result<std::sync::MutexGuard<'_, Option<(Tensor, Tensor)>>> {
        self.saved.lock().map_err(|_| candle_core::Error::Msg("attention statistics poisoned".into()))
    }

    /// Whether the flash kernels compute it: fused, scores not capped, and shapes they take (a
    /// query per key).
    #[cfg(feature = "cuda")]
    fn flash(&self, q: &Tensor, k: &Tensor) -> bool {
        let layout = cuda::QueryLayout::Heads;
        self.fused(q) && self.softcap.is_none() && cuda::flash_fits(q, k, self.g, layout)
    }

    /// Probabilities (B, K, G*T, S) in f32 (f64 stays f64); in bf16 where fused.
    fn probs(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        Ok(self.probs_and_cap(q, k)?.0)
    }

    /// The probabilities and, where the scores are capped, tanh(s / c) (B, K, G*T, S), which the
    /// cap's derivative needs.
    fn probs_and_cap(&self, q: &Tensor, k: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        use candle_core::DType;
        #[cfg(feature = "cuda")]
        if self.fused(q) {
            let t = q.dim(2)? / self.g;
            let probs = cuda::causal_softmax(&q.matmul(&k.t()?)?, t, self.scale, self.softcap)?;
            return Ok((probs, None));
        }
        let (b, kh, m, _) = q.dims4()?;
        let s = k.dim(2)?;
        let up = |t: Tensor| if t.dtype() == DType::F64 { Ok(t) } else { t.to_dtype(DType::F32) };
        let mut scores = (up(q.matmul(&k.t()?)?)? * self.scale)?;
        let tanh = match self.softcap {
            Some(c) => {
                let tanh = (scores / c)?.tanh()?;
                scores = (&tanh * c)?;
                Some(tanh)
            }
            None => None,
        };
        if let Some(mask) = &self.mask {
            let t = m / self.g;
            scores = scores
                .reshape((b, kh, self.g, t, s))?
                .broadcast_add(&mask.to_dtype(scores.dtype())?)?
                .reshape((b, kh, m, s))?;
        }
        let probs = if scores.dtype() == DType::F64 {
            candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        Ok((probs, tanh))
    }
}

impl Qkv for AttentionRule {
    const NAME: &'static str = "attention-recompute";

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.flash(q, k) {
            let flash = cuda::flash_attention(q, k, v, self.g, self.scale, cuda::QueryLayout::Heads)?;
            *self.saved()? = Some((flash.lse, q.clone()));
            return Ok(flash.out);
        }
        if crate::model::cpu::on_cpu_f32(&[q, k, v]) {
            let s = k.dim(2)?;
            let (mask, heads) = (self.mask.as_ref(), crate::model::cpu::Heads::Stacked);
            let cache = crate::model::cpu::Cached { keys: k, values: v, s, prefix: None };
            return crate::model::cpu::attention_cpu(q, cache, mask, self.scale, self.softcap, heads);
        }
        self.probs(q, k)?.to_dtype(v.dtype())?.matmul(v)?.contiguous()
    }

    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if self.flash(q, k) {
            let lse = match self.saved()?.take() {
                Some((lse, _)) => lse,
                None => cuda::flash_attention(q, k, v, self.g, self.scale, cuda::QueryLayout::Heads)?.lse,
            };
            let d = cuda::row_dot(grad, out)?; // (B * K * M,) f32
            return cuda::flash_attention_backward(
                q,
                k,
                v,
                grad,
                &lse,
                &d,
                self.g,
                self.scale,
                cuda::QueryLayout::Heads,
            );
        }
        #[cfg(feature = "cuda")]
        if self.fused(q) {
            // All products in bf16; rowsum(dP * P) = rowsum(dO * O) needs only (B, K, M, E) tensors.
            let t = q.dim(2)? / self.g;
            let raw = q.matmul(&k.t()?)?; // (B, K, M, S) bf16
            let p = cuda::causal_softmax(&raw, t, self.scale, self.softcap)?;
            let dout = grad.contiguous()?;
            let dv = p.t()?.matmul(&dout)?;
            let dp = dout.matmul(&v.t()?)?;
            let d = cuda::row_dot(&dout, out)?; // (B * K * M,) f32
            let capped = self.softcap.map(|c| (&raw, c));
            let ds = cuda::softmax_backward(&p, &dp, &d, t, self.scale, capped)?;
            return Ok((ds.matmul(k)?, ds.t()?.matmul(q)?, dv));
        }
        if crate::model::cpu::on_cpu_f32(&[q, k, v, out, grad]) && self.softcap.is_none() {
            return crate::model::cpu::attention_backward_cpu(q, k, v, out, grad, self.mask.as_ref(), self.scale);
        }
        let _ = out;
        let (p, tanh) = self.probs_and_cap(q, k)?; // (B, K, M, S), f32
        let dout = grad.to_dtype(p.dtype())?; // (B, K, M, E)
        let vf = v.to_dtype(p.dtype())?;
        let dv = p.t()?.matmul(&dout)?; // (B, K, S, E)
        let dp = dout.matmul(&vf.t()?)?; // (B, K, M, S)
        let row = (&dp * &p)?.sum_keepdim(candle_core::D::Minus1)?;
        let ds = (p * dp.broadcast_sub(&row)?)?;
        let ds = match tanh {
            Some(tanh) => (ds * (tanh.sqr()?.neg()? + 1.0)?)?,
            None => ds,
        };
        let dq = (ds.matmul(&k.to_dtype(ds.dtype())?)? * self.scale)?;
        let dk = (ds.t()?.matmul(&q.to_dtype(ds.dtype())?)? * self.scale)?;
        Ok((dq.to_dtype(q.dtype())?, dk.to_dtype(k.dtype())?, dv.to_dtype(v.dtype())?))
    }
}

impl<R: Qkv> candle_core::CustomOp3 for AttentionOp<R> {
    fn name(&self) -> &'static str {
        R::NAME
    }

    handed_over!(3);

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = self.rule.backward(&q.detach(), &k.detach(), &v.detach(), &res.detach(), grad)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Self-attention for training from the projections' outputs to the heads' merged output:
/// q (B, T, H*E), k and v (B, T, K*E) -> (B, T, H*E). Inside: the heads split to (B, H, T, E),
/// rope on q and k with cos/sin (T, E/2), [`attention`] with its `mask` and `causal`, and the
/// heads merged back. The whole-layer op of [`crate::model::lora`] runs its forward and backward
/// passes; [`SelfAttention::op`] makes it one differentiable op.
///
/// Why one piece: composed, the reshapes, transposes, copies and ropes of q, k, v and the output
/// are a dozen graph nodes, and candle's backward pass zero-fills and adds a (tokens x hidden)
/// buffer for each. The backward pass here recomputes the split and the rope (one fused pass on
/// the GPU) and runs the same attention backward.
pub struct SelfAttention {
    rule: AttentionRule,
    heads: Heads,
}

impl SelfAttention {
    /// `mask`, `causal`, `scale` and `softcap` as [`attention`] takes them; cos/sin (T, E/2).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        causal: bool,
        scale: f64,
        softcap: Option<f64>,
        heads: usize,
        kv_heads: usize,
    ) -> Self {
        let rule = AttentionRule::new(mask, causal, scale, softcap, heads / kv_heads);
        SelfAttention { rule, heads: Heads { cos: cos.clone(), sin: sin.clone(), heads, kv_heads } }
    }

    /// The attention as one op in the graph, differentiable in q, k and v.
    pub fn op(self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        recomputed(self, q, k, v)
    }

    /// The attention's output, and the heads it split q, k and v into, which
    /// [`SelfAttention::backward_heads`] takes instead of splitting them again.
    pub(crate) fn forward_heads(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, QkvHeads)> {
        let heads = self.split(q, k, v)?;
        #[cfg(feature = "cuda")]
        if let Some(layout) = self.merged_layout(&heads) {
            let g = self.rule.g;
            let flash = cuda::flash_attention(&heads.q, &heads.k, &heads.v, g, self.rule.scale, layout)?;
            let q_roped = flash.q_roped.ok_or_else(|| candle_core::Error::Msg("flash attention: no roped q".into()))?;
            *self.rule.saved()? = Some((flash.lse, q_roped.clone()));
            return Ok((flash.out, QkvHeads { q: q_roped, roped: true, ..heads }));
        }
        let out = self.heads.merge(&self.rule.forward(&heads.q, &heads.k, &heads.v)?)?;
        Ok((out, heads))
    }

    /// q, k and v as the attention takes them: where the flash kernels run, q stays as the
    /// projection made it (they rope it and merge the output themselves: four passes over
    /// (tokens x hidden) fewer); otherwise every one split into heads.
    fn split(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<QkvHeads> {
        #[cfg(feature = "cuda")]
        if self.rule.fused(q) {
            let hs = &self.heads;
            let (k, v) = (hs.heads_of(k, hs.kv_heads, true)?, hs.heads_of(v, hs.kv_heads, false)?);
            let heads = QkvHeads { q: q.clone(), k, v, merged: true, roped: false };
            if self.merged_layout(&heads).is_some() {
                return Ok(heads);
            }
            let (b, t, _) = q.dims3()?;
            let qh = hs.heads_of(q, hs.heads, true)?.reshape((b, hs.kv_heads, hs.heads / hs.kv_heads * t, ()))?;
            return Ok(QkvHeads { q: qh, merged: false, roped: true, ..heads });
        }
        let (q, k, v) = self.heads.split(q, k, v)?;
        Ok(QkvHeads { q, k, v, merged: false, roped: true })
    }

    /// The flash kernels' layout for merged heads, where they take these.
    #[cfg(feature = "cuda")]
    fn merged_layout<'a>(&'a self, heads: &QkvHeads) -> Option<cuda::QueryLayout<'a>> {
        let layout = cuda::QueryLayout::Merged { cos: &self.heads.cos, sin: &self.heads.sin };
        let fits =
            heads.merged && self.rule.softcap.is_none() && cuda::flash_fits(&heads.q, &heads.k, self.rule.g, layout);
        fits.then_some(layout)
    }

    /// The gradients of q, k and v from the heads of [`SelfAttention::forward_heads`].
    pub(crate) fn backward_heads(
        &self,
        heads: &QkvHeads,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let hs = &self.heads;
        #[cfg(feature = "cuda")]
        if let Some(layout) = self.merged_layout(heads) {
            let (g, scale) = (self.rule.g, self.rule.scale);
            // The forward pass's statistics and roped q, or (a second backward pass) again.
            let (lse, q_roped) = match (self.rule.saved()?.take(), heads.roped) {
                (Some(saved), _) => saved,
                (None, true) => candle_core::bail!("self-attention: a second backward pass over its roped heads"),
                (None, false) => {
                    let flash = cuda::flash_attention(&heads.q, &heads.k, &heads.v, g, scale, layout)?;
                    let roped =
                        flash.q_roped.ok_or_else(|| candle_core::Error::Msg("flash attention: no roped q".into()))?;
                    (flash.lse, roped)
                }
            };
            // rowsum(dout * out) per query head: rows of E.
            let e = heads.k.dim(3)?;
            let d = cuda::row_dot(&grad.reshape(((), e))?, &out.reshape(((), e))?)?;
            let (dq, dk, dv) =
                cuda::flash_attention_backward(&q_roped, &heads.k, &heads.v, grad, &lse, &d, g, scale, layout)?;
            return Ok((dq, hs.unrope(&dk)?, hs.joined(&dv, false)?));
        }
        let (out, dout) = (hs.unmerge(out)?, hs.unmerge(grad)?);
        let (dq, dk, dv) = self.rule.backward(&heads.q, &heads.k, &heads.v, &out, &dout)?;
        let (b, _, m, e) = dq.dims4()?;
        let dq = hs.unrope(&dq.reshape((b, hs.heads, m * hs.kv_heads / hs.heads, e))?)?;
        Ok((dq, hs.unrope(&dk)?, hs.joined(&dv, false)?))
    }
}

/// Self-attention on the projections' layout: q (B, T, H*E), k and v (B, T, K*E), untracked ->
/// (B, T, H*E), and the gradients of those shapes.
impl Qkv for SelfAttention {
    const NAME: &'static str = "self-attention";

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        Ok(self.forward_heads(q, k, v)?.0)
    }

    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        self.backward_heads(&self.split(q, k, v)?, out, grad)
    }
}

/// q, k and v as the attention takes them: k (B, K, T, E) roped, v (B, K, T, E), and q either
/// as heads (B, K, G*T, E), roped, or (`merged`) in the projection's layout (B, T, H*E), roped
/// by the flash kernels (`roped` tells whether it is yet).
pub(crate) struct QkvHeads {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    merged: bool,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    roped: bool,
}

/// (B, T, n*E) -> (B, n, T, E)
fn split_heads(x: &Tensor, n: usize) -> Result<Tensor> {
    let (b, t, w) = x.dims3()?;
    x.reshape((b, t, n, w / n))?.transpose(1, 2)?.contiguous()
}

/// (B, n, T, E) -> (B, T, n*E)
fn join_heads(x: &Tensor) -> Result<Tensor> {
    let (b, n, t, e) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, t, n * e))
}

/// How the projections' outputs become heads and back.
struct Heads {
    cos: Tensor,
    sin: Tensor,
    heads: usize,
    kv_heads: usize,
}

impl Heads {
    /// Whether one fused kernel moves heads of size `e` (on the GPU in bf16, e a multiple of 4).
    #[cfg(feature = "cuda")]
    fn fused(&self, x: &Tensor, e: usize) -> bool {
        fused(x) && e.is_multiple_of(4) && fused(&self.cos)
    }

    /// x (B, T, n*E) -> (B, n, T, E), roped or not.
    fn heads_of(&self, x: &Tensor, n: usize, roped: bool) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.fused(x, x.dim(2)? / n) {
            use cuda::{heads, Rope};
            return heads(x, n, &self.cos, &self.sin, if roped { Rope::Forward } else { Rope::None }, true);
        }
        if crate::model::cpu::on_cpu_f32(&[x, &self.cos]) {
            return crate::model::cpu::heads_cpu(x, n, &self.cos, &self.sin, if roped { 1.0 } else { 0.0 }, true);
        }
        let h = split_heads(x, n)?;
        if roped {
            candle_nn::rotary_emb::rope(&h, &self.cos, &self.sin)
        } else {
            Ok(h)
        }
    }

    /// (B, n, T, E) -> (B, T, n*E); `unroped`: the gradient of a roped head goes back through the
    /// rope's transpose, the rope by the opposite angle.
    fn joined(&self, x: &Tensor, unroped: bool) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.fused(x, x.dim(3)?) {
            use cuda::{heads, Rope};
            return heads(x, x.dim(1)?, &self.cos, &self.sin, if unroped { Rope::Inverse } else { Rope::None }, false);
        }
        if crate::model::cpu::on_cpu_f32(&[x, &self.cos]) {
            let n = x.dim(1)?;
            return crate::model::cpu::heads_cpu(x, n, &self.cos, &self.sin, if unroped { -1.0 } else { 0.0 }, false);
        }
        if unroped {
            join_heads(&candle_nn::rotary_emb::rope(&x.contiguous()?, &self.cos, &self.sin.neg()?)?)
        } else {
            join_heads(x)
        }
    }

    /// q, k, v as attention takes them: q (B, K, G*T, E) and k (B, K, T, E) roped, v (B, K, T, E).
    fn split(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = q.dims3()?;
        let qh = self.heads_of(q, self.heads, true)?;
        let qh = qh.reshape((b, self.kv_heads, self.heads / self.kv_heads * t, ()))?;
        Ok((qh, self.heads_of(k, self.kv_heads, true)?, self.heads_of(v, self.kv_heads, false)?))
    }

    /// Attention's output (B, K, G*T, E) -> (B, T, H*E).
    fn merge(&self, out: &Tensor) -> Result<Tensor> {
        let (b, _, m, e) = out.dims4()?;
        self.joined(&out.reshape((b, self.heads, m * self.kv_heads / self.heads, e))?, false)
    }

    /// The inverse of `merge`: (B, T, H*E) -> (B, K, G*T, E).
    fn unmerge(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        self.heads_of(x, self.heads, false)?.reshape((b, self.kv_heads, self.heads / self.kv_heads * t, ()))
    }

    /// A roped head's gradient back to its projection's layout: (B, n, T, E) -> (B, T, n*E).
    fn unrope(&self, g: &Tensor) -> Result<Tensor> {
        self.joined(g, true)
    }
}

#[cfg(test)]
mod attention_tests {
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn recomputing_attention_has_the_gradients_of_the_composite_with_and_without_a_cap() -> Result<()> {
        let dev = Device::Cpu;
        let (b, kh, g, t, e) = (2, 2, 3, 4, 5);
        let q = Var::from_tensor(&Tensor::randn(0f64, 1., (b, kh, g * t, e), &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f64, 1., (b, kh, t, e), &dev)?)?;
        let v = Var::from_tensor(&Tensor::randn(0f64, 1., (b, kh, t, e), &dev)?)?;
        let w = Tensor::randn(0f64, 1., (b, kh, g * t, e), &dev)?;
        let causal: Vec<f64> =
            (0..t).flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f64::NEG_INFINITY })).collect();
        let mask = Tensor::from_vec(causal, (1, 1, 1, t, t), &dev)?;
        let scale = 0.4;
        // Without a cap, and with one that binds (scores of these sizes reach 2-3).
        for softcap in [None, Some(0.8)] {
            let composite = || -> Result<Tensor> {
                let s = (q.as_tensor().matmul(&k.as_tensor().t()?)? * scale)?;
                let s = match softcap {
                    Some(c) => ((s / c)?.tanh()? * c)?,
                    None => s,
                };
                let s = s.reshape((b, kh, g, t, t))?.broadcast_add(&mask)?.reshape((b, kh, g * t, t))?;
                candle_nn::ops::softmax(&s, D::Minus1)?.matmul(v.as_tensor())
            };
            let ours = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), Some(&mask), true, scale, softcap, g)?;
            let reference = composite()?;
            let diff = (&ours - &reference)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "cap {softcap:?}: outputs differ by {diff}");
            let g1 = (ours * &w)?.sum_all()?.backward()?;
            let g2 = (reference * &w)?.sum_all()?.backward()?;
            for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                let a = g1.get(var.as_tensor()).unwrap();
                let r = g2.get(var.as_tensor()).unwrap();
                let diff = (a - r)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
                assert!(diff < 1e-10, "cap {softcap:?}: d{name} differs by {diff}");
            }
        }
        Ok(())
    }
}
