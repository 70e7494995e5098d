//! Differentiable tensor operations the training path needs and candle does not provide: frozen
//! projections, softmax, RMSNorm and rope with backward rules, attention that recomputes its
//! probabilities, chunked cross-entropy and SwiGLU's product. On the GPU in bf16 several of them
//! run the fused kernels of [`super::cuda`]; the CPU's own kernels are in [`super::cpu`].

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use std::sync::Arc;

use super::packed::PackedMatrix;

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

/// `c + a b^T` (`b_transposed`: b is (M, K)) or `c + a b` (b is (K, M)), for c (N, M) and
/// a (N, K), untracked. On the GPU in bf16 one product accumulates into `c` in place
/// ([`super::cuda::add_matmul`]): `c` must be a tensor the caller has just computed and holds
/// alone. Elsewhere the product is added.
pub(crate) fn add_matmul(c: Tensor, a: &Tensor, b: &Tensor, b_transposed: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if accumulates(&c) && c.is_contiguous() {
        super::cuda::add_matmul(&c, a, b, b_transposed)?;
        return Ok(c);
    }
    let product = if b_transposed { a.matmul(&b.t()?)? } else { a.matmul(b)? };
    c + product
}

/// `x @ W^T` for a frozen weight `W`: the backward pass returns the gradient of `x` only.
///
/// candle's matmul backward computes the gradient of both operands, which for a frozen base
/// weight means a weight-sized buffer per projection and a third more FLOPs. Here the product is
/// computed by an ordinary matmul on a detached input and given the backward rule `grad @ W`.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    // x: (N, in), weight: (out, in) -> (N, out)
    let y = x.detach().matmul(&weight.detach().t()?)?;
    attach(x, y, FrozenLinearGrad { weight: weight.detach() })
}

struct FrozenLinearGrad {
    weight: Tensor,
}

impl Backward for FrozenLinearGrad {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }
    fn grad(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        // grad: (N, out), weight: (out, in) -> (N, in)
        grad.matmul(&self.weight.to_dtype(grad.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn frozen_linear_gives_the_input_gradient_and_none_for_the_weight() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::arange(0f32, 6., &dev)?.reshape((2, 3))?)?;
        let w = Tensor::new(&[[1f32, 2., 3.], [0.5, -1., 2.]], &dev)?;
        let y = frozen_linear(x.as_tensor(), &w)?;
        let reference = x.as_tensor().detach().matmul(&w.t()?)?;
        let diff = (y.clone() - reference)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        let grads = y.sum_all()?.backward()?;
        // d(sum(x W^T))/dx = ones(2,2) @ W
        let gx = grads.get(x.as_tensor()).expect("x gets a gradient").to_vec2::<f32>()?;
        assert_eq!(gx, vec![vec![1.5, 1.0, 5.0], vec![1.5, 1.0, 5.0]]);
        assert!(grads.get(&w).is_none());
        Ok(())
    }
}

/// Rows `rows` (distinct, in any order) of x (M, D) -> (N, D), differentiable in x.
///
/// candle's `index_select` has this forward, but its backward is an index_add whose GPU kernel
/// runs one thread per column, each over every row: 2.4 ms per 7B micro-batch of 4 x 1024 rows.
/// Here the backward pass is a gather too: each row of x takes its gradient row through an
/// inverse index, or a zero row where it was not picked.
pub fn gather_rows(x: &Tensor, rows: &[u32]) -> Result<Tensor> {
    let m = x.dim(0)?;
    let n = rows.len();
    // inverse[r] = i where rows[i] = r, else n (the zero row appended to the gradient).
    let mut inverse = vec![n as u32; m];
    for (i, &r) in rows.iter().enumerate() {
        match inverse.get_mut(r as usize) {
            Some(slot) if *slot == n as u32 => *slot = i as u32,
            Some(_) => candle_core::bail!("gather_rows: row {r} is picked twice"),
            None => candle_core::bail!("gather_rows: row {r} of {m} rows"),
        }
    }
    let y = take_rows(&x.detach(), &Tensor::new(rows, x.device())?, false)?;
    attach(x, y, GatherRowsGrad { inverse: Tensor::new(inverse, x.device())? })
}

/// Rows idx of x (M, D); with `zero_rows`, an index M gives a row of zeros. One kernel on the
/// GPU, which takes either.
fn take_rows(x: &Tensor, idx: &Tensor, zero_rows: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::cuda::take_rows_fits(x) {
        return super::cuda::take_rows(x, idx);
    }
    if !zero_rows {
        return x.index_select(idx, 0);
    }
    let zero = Tensor::zeros((1, x.dim(1)?), x.dtype(), x.device())?;
    Tensor::cat(&[x, &zero], 0)?.index_select(idx, 0)
}

struct GatherRowsGrad {
    inverse: Tensor, // (M,) u32
}

impl Backward for GatherRowsGrad {
    fn name(&self) -> &'static str {
        "gather-rows"
    }
    fn grad(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        take_rows(grad, &self.inverse, true)
    }
}

#[cfg(test)]
mod gather_tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn gathered_rows_have_the_gradient_of_index_select() -> Result<()> {
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (7, 5), &Device::Cpu)?)?;
        let w = Tensor::randn(0f64, 1.0, (4, 5), &Device::Cpu)?;
        let rows = [5u32, 0, 3, 6];
        let ours = gather_rows(x.as_tensor(), &rows)?;
        let plain = x.as_tensor().index_select(&Tensor::new(&rows[..], &Device::Cpu)?, 0)?;
        assert_eq!(ours.to_vec2::<f64>()?, plain.to_vec2::<f64>()?);
        let g_ours = (ours * &w)?.sum_all()?.backward()?.get(x.as_tensor()).unwrap().clone();
        let g_plain = (plain * &w)?.sum_all()?.backward()?.get(x.as_tensor()).unwrap().clone();
        assert_eq!(g_ours.to_vec2::<f64>()?, g_plain.to_vec2::<f64>()?);
        assert_eq!(g_ours.get(1)?.to_vec1::<f64>()?, vec![0.0; 5], "a row not picked gets no gradient");
        Ok(())
    }

    #[test]
    fn a_row_picked_twice_or_out_of_range_is_an_error() {
        let x = Tensor::zeros((3, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(gather_rows(&x, &[1, 1]).unwrap_err().to_string().contains("picked twice"));
        assert!(gather_rows(&x, &[3]).unwrap_err().to_string().contains("row 3 of 3"));
    }
}

/// The backward rule of a fused forward op that candle provides without one.
pub(crate) trait Backward: Send + Sync {
    fn name(&self) -> &'static str;
    /// Gradient of the input `x`, given the output `y` and the output's gradient `grad`.
    fn grad(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Tensor>;
}

/// `x`, or where it is untracked (the first layer's input, the embedding) a variable holding it:
/// a rule attached to it is then still reached by the backward pass, for the adapter's sake.
pub(crate) fn tracked(x: &Tensor) -> Result<Tensor> {
    Ok(if x.track_op() { x.clone() } else { candle_core::Var::from_tensor(x)?.as_tensor().clone() })
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
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            self.out.cpu()
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
            self.out.cuda()
        }
    };
    (3) => {
#[rustfmt::skip]
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout)
            -> Result<(CpuStorage, Shape)> {
            self.out.cpu()
        }

#[cfg(feature = "cuda")]
        #[rustfmt::skip]
        fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout, _: &candle_core::CudaStorage, _: &Layout,
                    _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
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

/// Softmax over the last dimension, differentiable: dx = y * (g - sum(g * y)).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::softmax_last_dim(&x.detach())?;
    attach(x, y, SoftmaxGrad)
}

struct SoftmaxGrad;

impl Backward for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }
    fn grad(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Tensor> {
        let dot = (g * y)?.sum_keepdim(candle_core::D::Minus1)?;
        y * g.broadcast_sub(&dot)?
    }
}

/// RMSNorm `y = w * x / sqrt(mean(x^2) + eps)` over the last dimension, differentiable in x
/// (w is frozen): with r = 1/sqrt(mean(x^2) + eps) and gw = g * w,
/// dx = r * gw - x * r^3 * mean(gw * x).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if x.dtype() == candle_core::DType::F64 {
        // candle's fused kernel has no f64 version: the plain composite (used by gradient checks).
        let r = (x.sqr()?.mean_keepdim(candle_core::D::Minus1)? + eps)?.sqrt()?;
        return x.broadcast_div(&r)?.broadcast_mul(weight);
    }
    let y = candle_nn::ops::rms_norm(&x.detach(), weight, eps as f32)?;
    attach(x, y, RmsNormGrad { weight: weight.clone(), eps })
}

/// [`rms_norm`]'s value of an untracked x.
pub(crate) fn rms_norm_value(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if x.dtype() == candle_core::DType::F64 {
        return rms_norm(x, weight, eps);
    }
    #[cfg(feature = "cuda")]
    if fused(x)
        && weight.dtype() == candle_core::DType::BF16
        && super::cuda::rms_norm_fits(x.dim(candle_core::D::Minus1)?)
    {
        return super::cuda::rms_norm(x, weight, eps);
    }
    candle_nn::ops::rms_norm(x, weight, eps as f32)
}

/// [`rms_norm`]'s input gradient from the output's, `g`.
pub(crate) fn rms_norm_backward(x: &Tensor, weight: &Tensor, eps: f64, g: &Tensor) -> Result<Tensor> {
    RmsNormGrad { weight: weight.clone(), eps }.grad(x, x, g)
}

/// `plus` + [`rms_norm_backward`]: the gradient of a residual stream x that also feeds a norm (one
/// fused pass on the GPU in bf16).
pub(crate) fn rms_norm_backward_plus(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    g: &Tensor,
    plus: &Tensor,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(x) && weight.dtype() == candle_core::DType::BF16 {
        return super::cuda::rms_norm_backward_plus(x, g, weight, plus, eps);
    }
    plus + rms_norm_backward(x, weight, eps, g)?
}

struct RmsNormGrad {
    weight: Tensor,
    eps: f64,
}

impl Backward for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm"
    }
    fn grad(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Tensor> {
        use candle_core::{DType, D};
        #[cfg(feature = "cuda")]
        if fused(x) && self.weight.dtype() == DType::BF16 {
            return super::cuda::rms_norm_backward(x, g, &self.weight, self.eps);
        }
        let dtype = x.dtype();
        let up = |t: &Tensor| if dtype == DType::F64 { Ok(t.clone()) } else { t.to_dtype(DType::F32) };
        let (xf, gf) = (up(x)?, up(g)?);
        let gw = gf.broadcast_mul(&up(&self.weight)?)?;
        let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        let s = (&gw * &xf)?.mean_keepdim(D::Minus1)?;
        let dx = (gw.broadcast_mul(&r)? - xf.broadcast_mul(&(r.powf(3.0)? * s)?)?)?;
        dx.to_dtype(dtype)
    }
}

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

#[cfg(test)]
mod fused_tests {
    use super::*;
    use candle_core::{DType, Device, Var, D};

    /// Gradient of sum(f(x) * weights) for a random x, by candle's autograd.
    fn grad_of(f: impl Fn(&Tensor) -> Result<Tensor>, x: &Var, w: &Tensor) -> Result<Vec<f64>> {
        let y = f(x.as_tensor())?;
        let loss = (y * w)?.sum_all()?;
        let g = loss.backward()?;
        g.get(x.as_tensor()).expect("gradient").flatten_all()?.to_vec1::<f64>()
    }

    fn close(a: &[f64], b: &[f64]) {
        close_to(a, b, 1e-9)
    }

    fn close_to(a: &[f64], b: &[f64], tol: f64) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < tol * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    fn setup(shape: (usize, usize, usize, usize)) -> Result<(Var, Tensor)> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1., shape, &dev)?)?;
        let w = Tensor::randn(0f64, 1., shape, &dev)?;
        Ok((x, w))
    }

    #[test]
    fn fused_softmax_has_the_gradient_of_the_composite() -> Result<()> {
        let (x, w) = setup((2, 3, 4, 5))?;
        close(&grad_of(softmax_last_dim, &x, &w)?, &grad_of(|t| candle_nn::ops::softmax(t, D::Minus1), &x, &w)?);
        Ok(())
    }

    #[test]
    fn fused_rms_norm_has_the_gradient_of_the_composite() -> Result<()> {
        let (x, w) = setup((2, 3, 4, 6))?;
        let (x, w) = (Var::from_tensor(&x.to_dtype(DType::F32)?)?, w.to_dtype(DType::F32)?);
        let scale = Tensor::randn(0f32, 1., 6, &Device::Cpu)?;
        let composite = |t: &Tensor| -> Result<Tensor> {
            let r = (t.sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?.sqrt()?;
            t.broadcast_div(&r)?.broadcast_mul(&scale)
        };
        // f32: the fused kernel has no f64 version.
        let g32 = |f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<Vec<f64>> {
            let loss = (f(x.as_tensor())? * &w)?.sum_all()?;
            loss.backward()?.get(x.as_tensor()).unwrap().flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()
        };
        close_to(&g32(&|t| rms_norm(t, &scale, 1e-5))?, &g32(&composite)?, 1e-5);
        Ok(())
    }

    #[test]
    fn fused_rope_has_the_gradient_of_the_composite() -> Result<()> {
        let (x, w) = setup((2, 3, 4, 8))?;
        let cos = Tensor::randn(0f64, 1., (4, 4), &Device::Cpu)?.to_dtype(DType::F64)?;
        let sin = Tensor::randn(0f64, 1., (4, 4), &Device::Cpu)?;
        close(
            &grad_of(|t| rope(t, &cos, &sin), &x, &w)?,
            &grad_of(|t| candle_nn::rotary_emb::rope_slow(t, &cos, &sin), &x, &w)?,
        );
        Ok(())
    }
}

/// Attention for training, `softmax(q k^T * scale + mask) v`, that keeps only its inputs and
/// output for the backward pass and recomputes the probabilities there.
///
/// Materialised scores and probabilities are the largest tensors of a training step (for a 7B
/// model and 4 x 1024 tokens, about 1.6 GB per layer in the composite form); here they live only
/// while one layer's forward or backward runs. Backward, with P the probabilities and dO the
/// output's gradient: dV = P^T dO; dS = P * (dO V^T - rowsum(dO V^T * P)); dQ = dS K * scale;
/// dK = dS^T Q * scale.
///
/// Shapes: q (B, K, G*T, E), k and v (B, K, S, E); `mask` additive, (B or 1, 1, 1, T, S), shared
/// by the G query heads of each kv head.
///
/// `causal`: the mask is exactly the causal one (key j visible to position t when
/// j <= t + S - T); on the GPU in bf16 a fused kernel then applies it without reading the mask.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    scale: f64,
    g: usize,
) -> Result<Tensor> {
    recomputed(AttentionRule::new(mask, causal, scale, g), q, k, v)
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
    fn new(mask: Option<&Tensor>, causal: bool, scale: f64, g: usize) -> Self {
        AttentionRule { mask: mask.map(|m| m.detach()), causal, scale, g, saved: Default::default() }
    }

    /// Whether the fused GPU kernels compute this attention.
    #[cfg(feature = "cuda")]
    fn fused(&self, q: &Tensor) -> bool {
        self.causal && fused(q)
    }

    /// What the forward pass of the flash kernels keeps for the backward pass.
    #[cfg(feature = "cuda")]
    fn saved(&self) -> Result<std::sync::MutexGuard<'_, Option<(Tensor, Tensor)>>> {
        self.saved.lock().map_err(|_| candle_core::Error::Msg("attention statistics poisoned".into()))
    }

    /// Whether the flash kernels compute it: fused, and shapes they take (a query per key).
    #[cfg(feature = "cuda")]
    fn flash(&self, q: &Tensor, k: &Tensor) -> bool {
        self.fused(q) && super::cuda::flash_fits(q, k, self.g, super::cuda::QueryLayout::Heads)
    }

    /// Probabilities (B, K, G*T, S) in f32 (f64 stays f64); in bf16 where fused.
    fn probs(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        use candle_core::DType;
        #[cfg(feature = "cuda")]
        if self.fused(q) {
            let t = q.dim(2)? / self.g;
            return super::cuda::causal_softmax(&q.matmul(&k.t()?)?, t, self.scale);
        }
        let (b, kh, m, _) = q.dims4()?;
        let s = k.dim(2)?;
        let up = |t: Tensor| if t.dtype() == DType::F64 { Ok(t) } else { t.to_dtype(DType::F32) };
        let mut scores = (up(q.matmul(&k.t()?)?)? * self.scale)?;
        if let Some(mask) = &self.mask {
            let t = m / self.g;
            scores = scores
                .reshape((b, kh, self.g, t, s))?
                .broadcast_add(&mask.to_dtype(scores.dtype())?)?
                .reshape((b, kh, m, s))?;
        }
        if scores.dtype() == DType::F64 {
            candle_nn::ops::softmax(&scores, candle_core::D::Minus1)
        } else {
            candle_nn::ops::softmax_last_dim(&scores)
        }
    }
}

impl Qkv for AttentionRule {
    const NAME: &'static str = "attention-recompute";

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.flash(q, k) {
            let flash = super::cuda::flash_attention(q, k, v, self.g, self.scale, super::cuda::QueryLayout::Heads)?;
            *self.saved()? = Some((flash.lse, q.clone()));
            return Ok(flash.out);
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
                None => super::cuda::flash_attention(q, k, v, self.g, self.scale, super::cuda::QueryLayout::Heads)?.lse,
            };
            let d = super::cuda::row_dot(grad, out)?; // (B * K * M,) f32
            return super::cuda::flash_attention_backward(
                q,
                k,
                v,
                grad,
                &lse,
                &d,
                self.g,
                self.scale,
                super::cuda::QueryLayout::Heads,
            );
        }
        #[cfg(feature = "cuda")]
        if self.fused(q) {
            // All products in bf16; rowsum(dP * P) = rowsum(dO * O) needs only (B, K, M, E) tensors.
            let p = self.probs(q, k)?; // (B, K, M, S) bf16
            let dout = grad.contiguous()?;
            let dv = p.t()?.matmul(&dout)?;
            let dp = dout.matmul(&v.t()?)?;
            let d = super::cuda::row_dot(&dout, out)?; // (B * K * M,) f32
            let ds = super::cuda::softmax_backward(&p, &dp, &d, q.dim(2)? / self.g, self.scale)?;
            return Ok((ds.matmul(k)?, ds.t()?.matmul(q)?, dv));
        }
        let _ = out;
        let p = self.probs(q, k)?; // (B, K, M, S), f32
        let dout = grad.to_dtype(p.dtype())?; // (B, K, M, E)
        let vf = v.to_dtype(p.dtype())?;
        let dv = p.t()?.matmul(&dout)?; // (B, K, S, E)
        let dp = dout.matmul(&vf.t()?)?; // (B, K, M, S)
        let row = (&dp * &p)?.sum_keepdim(candle_core::D::Minus1)?;
        let ds = (p * dp.broadcast_sub(&row)?)?;
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
/// heads merged back. The whole-layer op of [`super::lora`] runs its forward and backward
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
    /// `mask`, `causal` and `scale` as [`attention`] takes them; cos/sin (T, E/2).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        causal: bool,
        scale: f64,
        heads: usize,
        kv_heads: usize,
    ) -> Self {
        let rule = AttentionRule::new(mask, causal, scale, heads / kv_heads);
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
            let flash = super::cuda::flash_attention(&heads.q, &heads.k, &heads.v, g, self.rule.scale, layout)?;
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
        if self.rule.causal && fused(q) {
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
    fn merged_layout<'a>(&'a self, heads: &QkvHeads) -> Option<super::cuda::QueryLayout<'a>> {
        let layout = super::cuda::QueryLayout::Merged { cos: &self.heads.cos, sin: &self.heads.sin };
        let fits = heads.merged && super::cuda::flash_fits(&heads.q, &heads.k, self.rule.g, layout);
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
                    let flash = super::cuda::flash_attention(&heads.q, &heads.k, &heads.v, g, scale, layout)?;
                    let roped =
                        flash.q_roped.ok_or_else(|| candle_core::Error::Msg("flash attention: no roped q".into()))?;
                    (flash.lse, roped)
                }
            };
            // rowsum(dout * out) per query head: rows of E.
            let e = heads.k.dim(3)?;
            let d = super::cuda::row_dot(&grad.reshape(((), e))?, &out.reshape(((), e))?)?;
            let (dq, dk, dv) =
                super::cuda::flash_attention_backward(&q_roped, &heads.k, &heads.v, grad, &lse, &d, g, scale, layout)?;
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
            use super::cuda::{heads, Rope};
            return heads(x, n, &self.cos, &self.sin, if roped { Rope::Forward } else { Rope::None }, true);
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
            use super::cuda::{heads, Rope};
            return heads(x, x.dim(1)?, &self.cos, &self.sin, if unroped { Rope::Inverse } else { Rope::None }, false);
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
    fn recomputing_attention_has_the_gradients_of_the_composite() -> Result<()> {
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
        let composite = || -> Result<Tensor> {
            let s = (q.as_tensor().matmul(&k.as_tensor().t()?)? * scale)?;
            let s = s.reshape((b, kh, g, t, t))?.broadcast_add(&mask)?.reshape((b, kh, g * t, t))?;
            candle_nn::ops::softmax(&s, D::Minus1)?.matmul(v.as_tensor())
        };
        let ours = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), Some(&mask), true, scale, g)?;
        let reference = composite()?;
        let diff = (&ours - &reference)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "outputs differ by {diff}");
        let g1 = (ours * &w)?.sum_all()?.backward()?;
        let g2 = (reference * &w)?.sum_all()?.backward()?;
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let a = g1.get(var.as_tensor()).unwrap();
            let r = g2.get(var.as_tensor()).unwrap();
            let diff = (a - r)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            assert!(diff < 1e-10, "d{name} differs by {diff}");
        }
        Ok(())
    }
}

/// Sum over rows of the cross-entropy `-log softmax(h W^T)[target]` for a frozen `W`, computed
/// `chunk` rows at a time in f32 (f64 stays f64): only one chunk of (rows, V) logits exists at
/// any moment.
///
/// Where `h` is tracked, the gradient of `h` is computed eagerly, chunk by chunk beside the loss,
/// and kept (N x D, the size of `h`): the backward pass then only scales it, where it would
/// otherwise recompute every chunk's logits, the largest product of a small model's step.
///
/// h: (N, D), weight: (V, D), targets: N ids -> a scalar.
///
/// `packed`: the same weight packed for the CPU (f32), which then computes the products.
pub fn linear_cross_entropy(
    h: &Tensor,
    weight: &Tensor,
    packed: Option<&Arc<PackedMatrix>>,
    targets: &[u32],
    chunk: usize,
) -> Result<Tensor> {
    let n = h.dim(0)?;
    if targets.len() != n {
        candle_core::bail!("linear-cross-entropy: {} targets for {n} rows", targets.len());
    }
    let (weight, h_detached) = (weight.detach(), h.detach());
    let targets = Tensor::from_slice(targets, (n, 1), h.device())?;
    let chunk = chunk.max(1);
    let with_grad = h.track_op();
    #[cfg(feature = "cuda")]
    if fused(h) {
        return fused_cross_entropy(h, &h_detached, &weight, &targets, chunk);
    }
    let packed = packed.filter(|_| h.device().is_cpu() && h.dtype() == candle_core::DType::F32).cloned();
    let mut dh = Vec::new();
    let sums = by_chunks(n, chunk, |start, rows| {
        let logp = chunk_log_softmax(&h_detached.narrow(0, start, rows)?, &weight, packed.as_ref())?;
        let targets = targets.narrow(0, start, rows)?;
        let nll = logp.gather(&targets, 1)?.neg()?.sum_all()?;
        if with_grad {
            // d nll / d logits = softmax - onehot(target); dh = dlogits @ W
            let ones = Tensor::ones((rows, 1), logp.dtype(), logp.device())?;
            let dlogits = logp.exp()?.scatter_add(&targets, &ones.neg()?, 1)?;
            dh.push(match &packed {
                // (rows, V) @ W (V, D) through the packed transpose
                Some(p) => super::cpu::linear_packed(&dlogits, &p.transposed())?,
                None => dlogits.to_dtype(h.dtype())?.matmul(&weight.to_dtype(h.dtype())?)?,
            });
        }
        Ok(nll)
    })?;
    attach_gradient(h, total_of(&sums, loss_dtype(h.dtype()), h.device())?, dh)
}

/// The sum of the chunks' scalars (0 for none, in `dtype`).
fn total_of(sums: &[Tensor], dtype: candle_core::DType, device: &candle_core::Device) -> Result<Tensor> {
    match sums.is_empty() {
        true => Tensor::zeros((), dtype, device),
        false => Tensor::stack(sums, 0)?.sum_all(),
    }
}

/// Gives the scalar `total` (a function of `h`) the backward rule `dh * g`, with `dh` computed
/// eagerly in chunks of rows.
fn attach_gradient(h: &Tensor, total: Tensor, dh: Vec<Tensor>) -> Result<Tensor> {
    if !h.track_op() {
        return Ok(total);
    }
    let dh = match dh.len() {
        0 => h.zeros_like()?,
        _ => Tensor::cat(&dh, 0)?,
    };
    attach(h, total, EagerGrad { dh })
}

/// The backward rule of a scalar whose gradient `dh` was computed with it.
struct EagerGrad {
    dh: Tensor,
}

impl Backward for EagerGrad {
    fn name(&self) -> &'static str {
        "eager-gradient"
    }
    fn grad(&self, h: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if fused(&self.dh) {
            return super::cuda::scale_by(&self.dh, g);
        }
        self.dh.broadcast_mul(&g.to_dtype(h.dtype())?)
    }
}

/// `f(start, rows)` for consecutive chunks of at most `chunk` of `n` rows, in order.
fn by_chunks(n: usize, chunk: usize, mut f: impl FnMut(usize, usize) -> Result<Tensor>) -> Result<Vec<Tensor>> {
    (0..n).step_by(chunk).map(|start| f(start, chunk.min(n - start))).collect()
}

/// The dtype the loss is computed in: f32, or f64 for gradient checks.
fn loss_dtype(dtype: candle_core::DType) -> candle_core::DType {
    if dtype == candle_core::DType::F64 {
        dtype
    } else {
        candle_core::DType::F32
    }
}

/// log softmax(h W^T) of one chunk of rows: (rows, D) -> (rows, V) in the loss dtype.
fn chunk_log_softmax(h: &Tensor, weight: &Tensor, packed: Option<&Arc<PackedMatrix>>) -> Result<Tensor> {
    let logits = match packed {
        Some(p) => super::cpu::linear_packed(h, p)?,
        None => h.matmul(&weight.t()?)?.to_dtype(loss_dtype(h.dtype()))?,
    };
    candle_nn::ops::log_softmax(&logits, 1)
}

/// The GPU path: bf16 logits, each row's (loss, logsumexp) and, for a tracked `h`, the gradient
/// by fused kernels.
#[cfg(feature = "cuda")]
fn fused_cross_entropy(
    h: &Tensor,
    h_detached: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    chunk: usize,
) -> Result<Tensor> {
    let mut dh = Vec::new();
    let sums = by_chunks(h.dim(0)?, chunk, |start, rows| {
        let logits = h_detached.narrow(0, start, rows)?.matmul(&weight.t()?)?; // (rows, V) bf16
        let targets = targets.narrow(0, start, rows)?;
        let stats = if h.track_op() && super::cuda::cross_entropy_fused_fits(&logits) {
            // One kernel: the statistics, and the logits turned into their gradient in place.
            let stats = super::cuda::cross_entropy_fused(&logits, &targets)?;
            dh.push(logits.matmul(weight)?);
            stats
        } else {
            let stats = super::cuda::cross_entropy_forward(&logits, &targets)?; // (rows, 2): loss, lse
            if h.track_op() {
                let dlogits = super::cuda::cross_entropy_backward(&logits, &targets, &stats)?;
                dh.push(dlogits.matmul(weight)?);
            }
            stats
        };
        stats.narrow(1, 0, 1)?.sum_all()
    })?;
    attach_gradient(h, total_of(&sums, candle_core::DType::F32, h.device())?, dh)
}

/// silu(gate) * up, SwiGLU's product: one fused kernel each way on the GPU in bf16.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(gate) {
        return super::cuda::silu_mul(gate, up);
    }
    gate.silu()? * up
}

/// The gradients of gate and up from that of silu(gate) * up, for untracked tensors of one shape:
/// dgate = dh * up * sig(g) * (1 + g * (1 - sig(g))), dup = dh * silu(g).
pub fn silu_mul_backward(gate: &Tensor, up: &Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if fused(gate) {
        return super::cuda::silu_mul_backward(gate, up, dh);
    }
    let sig = candle_nn::ops::sigmoid(gate)?;
    let silu = (gate * &sig)?;
    let dsilu = (&sig * ((gate * (1.0 - &sig)?)? + 1.0)?)?;
    Ok((((dh * up)? * dsilu)?, (dh * silu)?))
}

#[cfg(test)]
mod linear_cross_entropy_tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn chunked_cross_entropy_equals_the_plain_one_in_value_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let (n, d, v) = (7, 5, 11);
        let h = Var::from_tensor(&Tensor::randn(0f64, 1., (n, d), &dev)?)?;
        let w = Tensor::randn(0f64, 1., (v, d), &dev)?;
        let targets: Vec<u32> = vec![0, 3, 10, 4, 4, 9, 1];
        let plain = {
            let logp = candle_nn::ops::log_softmax(&h.as_tensor().matmul(&w.t()?)?, 1)?;
            logp.gather(&Tensor::from_slice(&targets, (n, 1), &dev)?, 1)?.neg()?.sum_all()?
        };
        let chunked = linear_cross_entropy(h.as_tensor(), &w, None, &targets, 3)?;
        let (a, b) = (plain.to_scalar::<f64>()?, chunked.to_scalar::<f64>()?);
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        let ga = plain.backward()?.get(h.as_tensor()).unwrap().clone();
        let gb = (chunked * 2.0)?.backward()?.get(h.as_tensor()).unwrap().clone();
        let diff = ((ga * 2.0)? - gb)?.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "gradient differs by {diff}");
        Ok(())
    }

    #[test]
    fn the_packed_weight_gives_the_same_loss_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let (n, d, v) = (9, 20, 70);
        let h = Var::from_tensor(&Tensor::randn(0f32, 1., (n, d), &dev)?)?;
        let w = Tensor::randn(0f32, 1., (v, d), &dev)?;
        let packed = Arc::new(PackedMatrix::from_rows_out_in(&w.flatten_all()?.to_vec1()?, v, d));
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 13) % v as u32).collect();
        let run = |p: Option<&Arc<PackedMatrix>>| -> Result<(f32, Tensor)> {
            let loss = linear_cross_entropy(h.as_tensor(), &w, p, &targets, 4)?;
            let g = loss.backward()?.get(h.as_tensor()).unwrap().clone();
            Ok((loss.to_scalar::<f32>()?, g))
        };
        let ((la, ga), (lb, gb)) = (run(None)?, run(Some(&packed))?);
        assert!((la - lb).abs() < 1e-4 * la.abs(), "loss {la} vs {lb}");
        let diff = (ga - gb)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "gradient differs by {diff}");
        Ok(())
    }
}
