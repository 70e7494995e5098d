//! The GPU launchers of attention: the causal softmax and its backward, the flash kernels, decoding
//! from the KV cache, heads split and joined with the rope, and rowsum(dO * O).

use crate::model::cuda::prelude::*;

/// Causal softmax of bf16 scores (rows, S), `scale` applied first, then `softcap` c where given
/// (c * tanh(s / c)); the query position of row r is r % t and its last visible key
/// (r % t) + S - t.
pub fn causal_softmax(scores: &Tensor, t: usize, scale: f64, softcap: Option<f64>) -> Result<Tensor> {
    scores.contiguous()?.apply_op1_no_bwd(&CausalSoftmax { t, scale: scale as f32, cap: cap_arg(softcap) })
}

struct CausalSoftmax {
    t: usize,
    scale: f32,
    cap: f32,
}

impl candle_core::CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }
    gpu_only!(1);
    fn cuda_fwd(&self, x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let (rows, s) = rows_of(l);
        let input = view::<bf16>(x, l, "scores")?;
        let out = unsafe { dev.alloc::<bf16>(rows * s)? };
        let (s32, t32) = (s as i32, self.t as i32);
        let rows64 = rows as i64;
        launch!(
            dev,
            "causal_softmax_bf16",
            launch_warps(rows),
            &input,
            &out,
            &rows64,
            &s32,
            &t32,
            &self.scale,
            &self.cap
        );
        Ok((CudaStorage::wrap_cuda_slice(out, dev), l.shape().clone()))
    }
}

/// ds = p * (dp - d) * scale, for bf16 p and dp (rows, S) and f32 d (rows, 1); `t` as in
/// [`causal_softmax`], whose hidden keys are then not read (0: every key visible). `capped`: the
/// uncapped scores (rows, S) and the cap, whose derivative ds then takes as well.
pub fn softmax_backward(
    p: &Tensor,
    dp: &Tensor,
    d: &Tensor,
    t: usize,
    scale: f64,
    capped: Option<(&Tensor, f64)>,
) -> Result<Tensor> {
    let raw = capped.map(|(raw, _)| raw.contiguous()).transpose()?;
    let op = SoftmaxBackward { t, scale: scale as f32, raw, cap: cap_arg(capped.map(|(_, c)| c)) };
    p.contiguous()?.apply_op3_no_bwd(&dp.contiguous()?, &d.contiguous()?, &op)
}

struct SoftmaxBackward {
    t: usize,
    scale: f32,
    raw: Option<Tensor>,
    cap: f32,
}

impl candle_core::CustomOp3 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-backward"
    }
    gpu_only!(3);
    fn cuda_fwd(
        &self,
        p: &CudaStorage,
        pl: &Layout,
        dp: &CudaStorage,
        dpl: &Layout,
        d: &CudaStorage,
        dl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = p.device().clone();
        let (rows, s) = rows_of(pl);
        if dpl.shape() != pl.shape() || dl.shape().elem_count() != rows {
            return Err(disagree(self.name(), &[pl.shape(), dpl.shape(), dl.shape()]));
        }
        let (pv, dpv, dv) = (view::<bf16>(p, pl, "p")?, view::<bf16>(dp, dpl, "dp")?, view::<f32>(d, dl, "d")?);
        let out = unsafe { dev.alloc::<bf16>(rows * s)? };
        let (s32, t32) = (s as i32, self.t as i32);
        match &self.raw {
            Some(raw) => {
                let (rs, rl) = raw.storage_and_layout();
                let candle_core::Storage::Cuda(rs) = &*rs else {
                    candle_core::bail!("softmax-backward: scores not on the GPU")
                };
                if rl.shape() != pl.shape() {
                    return Err(disagree(self.name(), &[pl.shape(), rl.shape()]));
                }
                let rv = view::<bf16>(rs, rl, "scores")?;
                launch!(
                    dev,
                    "softmax_backward_bf16",
                    launch_rows(rows),
                    &pv,
                    &dpv,
                    &dv,
                    &out,
                    &s32,
                    &t32,
                    &self.scale,
                    &rv,
                    &self.cap
                );
            }
            None => {
                let none = 0u64; // the scores are not read
                let cap = 0f32;
                launch!(
                    dev,
                    "softmax_backward_bf16",
                    launch_rows(rows),
                    &pv,
                    &dpv,
                    &dv,
                    &out,
                    &s32,
                    &t32,
                    &self.scale,
                    &none,
                    &cap
                );
            }
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), pl.shape().clone()))
    }
}

/// Largest number of query heads per kv head the decoding kernel takes: the 16 rows of its
/// tensor-core products.
const DECODE_MAX_GROUP: usize = 16;

/// Whether [`decode_attention`] takes this step: q (B, K, R, E) bf16 on the GPU with R <= 16 query
/// heads per kv head, E 64 or 128, and a mask of one row per batch row, if any.
pub fn decode_attention_fits(q: &Tensor, s: usize, mask: Option<&Tensor>) -> bool {
    let Ok((b, _, r, e)) = q.dims4() else { return false };
    applies(q) && r <= DECODE_MAX_GROUP && matches!(e, 64 | 128) && mask.is_none_or(|m| m.elem_count() == b * s)
}

/// Attention of one new token per row against the KV cache: q (B, K, R, E) bf16, the whole
/// caches (B, K, C, E) of which the first `s` positions count, `mask` additive f32 (B, s) (any
/// shape of that many elements) -> (B, K, R, E), for shapes [`decode_attention_fits`] accepts.
pub fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    s: usize,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let mask = mask.map(|m| m.to_dtype(DType::F32)?.contiguous()).transpose()?;
    q.contiguous()?.apply_op3_no_bwd(
        &k.contiguous()?,
        &v.contiguous()?,
        &DecodeAttention { s, mask, scale: scale as f32 },
    )
}

struct DecodeAttention {
    s: usize,
    mask: Option<Tensor>,
    scale: f32,
}

impl candle_core::CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
    }
    gpu_only!(3);
    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = q.device().clone();
        let (b, heads, r, e) = ql.shape().dims4()?;
        let c = kl.shape().dims4()?.2;
        // The kernel reads the query, keys and values with 16-byte loads.
        let aligned = [ql, kl, vl].iter().all(|l| l.start_offset().is_multiple_of(8));
        if r > DECODE_MAX_GROUP || !matches!(e, 64 | 128) || self.s > c || kl.shape() != vl.shape() || !aligned {
            candle_core::bail!(
                "decode-attention: unsupported shapes q {:?}, cache {:?}, s {}",
                ql.shape(),
                kl.shape(),
                self.s
            );
        }
        let (qv, kv, vv) = (view::<bf16>(q, ql, "q")?, view::<bf16>(k, kl, "keys")?, view::<bf16>(v, vl, "values")?);
        let out = unsafe { dev.alloc::<bf16>(b * heads * r * e)? };
        let (h32, r32, c32, s32) = (heads as i32, r as i32, c as i32, self.s as i32);
        // One block per (row, kv head) with flash_forward's four tiles of shared memory.
        let cfg = flash_grid((b * heads) as u32, 1, e, 4, 0);
        let name = format!("decode_attention_{e}");
        match &self.mask {
            Some(mask) => {
                if mask.elem_count() != b * self.s {
                    candle_core::bail!(
                        "decode-attention: mask of {} values for {b} rows of {} keys",
                        mask.elem_count(),
                        self.s
                    );
                }
                let (ms, ml) = mask.storage_and_layout();
                let candle_core::Storage::Cuda(ms) = &*ms else {
                    candle_core::bail!("decode-attention: mask not on the GPU")
                };
                let mv = view::<f32>(ms, ml, "mask")?;
                launch_with_shared!(dev, &name, cfg, &qv, &kv, &vv, &mv, &out, &h32, &r32, &c32, &s32, &self.scale);
            }
            None => {
                let null = 0u64;
                launch_with_shared!(dev, &name, cfg, &qv, &kv, &vv, &null, &out, &h32, &r32, &c32, &s32, &self.scale);
            }
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), ql.shape().clone()))
    }
}

/// How [`heads`] treats the rope.
#[derive(Clone, Copy)]
pub enum Rope {
    None = 0,
    Forward = 1,
    /// By the opposite angle: the rope's transpose, for gradients.
    Inverse = -1,
}

/// A projection's output as attention heads, `to_heads`: x (B, T, n*E) -> (B, n, T, E); or back:
/// (B, n, T, E) -> (B, T, n*E). One pass, the rope (cos, sin (T, E/2)) applied on the way.
/// Replaces a strided copy plus a rope pass, each slower than this whole kernel.
pub fn heads(x: &Tensor, n: usize, cos: &Tensor, sin: &Tensor, rope: Rope, to_heads: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &Heads { n, rope, to_heads })
}

struct Heads {
    n: usize,
    rope: Rope,
    to_heads: bool,
}

impl candle_core::CustomOp3 for Heads {
    fn name(&self) -> &'static str {
        "heads"
    }
    gpu_only!(3);
    #[rustfmt::skip]
    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, c: &CudaStorage, cl: &Layout, s: &CudaStorage, sl: &Layout)
        -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let (b, t, e, shape) = if self.to_heads {
            let (b, t, w) = xl.shape().dims3()?;
            (b, t, w / self.n, Shape::from((b, self.n, t, w / self.n)))
        } else {
            let (b, n, t, e) = xl.shape().dims4()?;
            if n != self.n {
                return Err(disagree(self.name(), &[xl.shape()]));
            }
            (b, t, e, Shape::from((b, t, n * e)))
        };
        if e % 4 != 0 || e * self.n * b * t != xl.shape().elem_count() || cl.shape().elem_count() < t * e / 2
            || sl.shape() != cl.shape() {
            return Err(disagree(self.name(), &[xl.shape(), cl.shape(), sl.shape()]));
        }
        let (xv, cv, sv) = (view::<bf16>(x, xl, "x")?, view::<bf16>(c, cl, "cos")?, view::<bf16>(s, sl, "sin")?);
        let out = unsafe { dev.alloc::<bf16>(xl.shape().elem_count())? };
        let dims = [b as i32, t as i32, self.n as i32, e as i32, self.rope as i32, self.to_heads as i32];
        launch!(dev, "heads_bf16", launch_elements(b * t * self.n * e / 4), &xv, &out, &cv, &sv,
                &dims[0], &dims[1], &dims[2], &dims[3], &dims[4], &dims[5]);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
    }
}

/// The stacked q/k/v projection's output y (N = B*T, (H + 2K) E) and its bias ((H + 2K) E) as
/// attention heads: q (B, H, T, E) and k (B, K, T, E) roped at cos, sin (T, E/2), and v
/// (B, K, T, E). One pass in place of a bias addition, three strided copies and two rope passes;
/// the three are contiguous views of one allocation.
pub fn qkv_heads(
    y: &Tensor,
    bias: Option<&Tensor>,
    cos: &Tensor,
    sin: &Tensor,
    (b, t, h, kh): (usize, usize, usize, usize),
) -> Result<(Tensor, Tensor, Tensor)> {
    let (y, cos, sin) = (y.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let width = y.dim(candle_core::D::Minus1)?;
    let e = width / (h + 2 * kh);
    let fits = e % 4 == 0
        && e * (h + 2 * kh) == width
        && y.elem_count() == b * t * width
        && cos.elem_count() >= t * e / 2
        && sin.shape() == cos.shape()
        && bias.is_none_or(|bias| bias.elem_count() == width);
    if !fits {
        return Err(disagree("qkv-heads", &[y.shape(), cos.shape()]));
    }
    let dev = cuda_device(&y)?;
    let (q_size, kv_size) = (b * h * t * e, b * kh * t * e);
    let out = unsafe { dev.alloc::<bf16>(q_size + 2 * kv_size)? };
    {
        let ((ys, yl), (cs, cl), (ss, sl)) =
            (y.storage_and_layout(), cos.storage_and_layout(), sin.storage_and_layout());
        let (yv, cv, sv) = (bf16_view(&ys, yl, "y")?, bf16_view(&cs, cl, "cos")?, bf16_view(&ss, sl, "sin")?);
        let [b32, t32, h32, kh32, e32] = [b, t, h, kh, e].map(|n| n as i32);
        let cfg = launch_elements(b * t * width / 4);
        let bias = bias.map(Tensor::contiguous).transpose()?;
        let bias_at = optional_address(bias.as_ref(), "qkv-heads")?;
        launch!(dev, "qkv_heads_bf16", cfg, &yv, &bias_at, &cv, &sv, &out, &b32, &t32, &h32, &kh32, &e32);
    }
    let all = wrap(out, &dev, Shape::from(q_size + 2 * kv_size));
    let q = all.narrow(0, 0, q_size)?.reshape((b, h, t, e))?;
    let k = all.narrow(0, q_size, kv_size)?.reshape((b, kh, t, e))?;
    let v = all.narrow(0, q_size + kv_size, kv_size)?.reshape((b, kh, t, e))?;
    Ok((q, k, v))
}

/// The device address of an optional bf16 tensor (contiguous, on the GPU), 0 for none: the
/// kernels' null pointer. The tensor must outlive the launch that reads it.
fn optional_address(t: Option<&Tensor>, op: &str) -> Result<u64> {
    t.map_or(Ok(0), |t| typed_address::<bf16>(t, op))
}

/// The shape of a slot cache ([`crate::model::decoder::SlotCache`]'s per-layer tensor): (2, slots,
/// K, C, E), keys then values.
fn slot_dims(kv: &Tensor) -> Result<(usize, usize, usize, usize)> {
    match kv.dims() {
        &[2, slots, kh, c, e] if kv.is_contiguous() && applies(kv) => Ok((slots, kh, c, e)),
        _ => candle_core::bail!("slot cache: {:?} is not a contiguous bf16 (2, slots, K, C, E) GPU tensor", kv.shape()),
    }
}

/// [`qkv_heads`] for a decoding step over a slot cache: y (N, (H + 2K) E), one new token per
/// row, -> q (N, H, E), its k (roped) and v written into each row's slot of `kv` (2, slots, K,
/// C, E) in place. rows: (N, 5) u32 on the GPU as [`decode_slots`] takes them: each row's slot,
/// the positions it holds, its new token's position, its prompt's slot and length; the new key
/// goes to position held - prompt length of its slot. cos, sin: the rope's whole tables
/// (positions, E/2). The caller keeps every row's keys within C and positions within the tables.
pub fn qkv_slots(
    y: &Tensor,
    bias: Option<&Tensor>,
    (cos, sin): (&Tensor, &Tensor),
    rows: &Tensor,
    kv: &Tensor,
    (h, kh): (usize, usize),
) -> Result<Tensor> {
    let (y, cos, sin, rows) = (y.contiguous()?, cos.contiguous()?, sin.contiguous()?, rows.contiguous()?);
    let (slots, skh, c, e) = slot_dims(kv)?;
    let (n, width) = y.dims2()?;
    let fits = skh == kh
        && e % 4 == 0
        && e * (h + 2 * kh) == width
        && rows.dims() == [n, 5]
        && rows.dtype() == DType::U32
        && cos.dim(1)? == e / 2
        && sin.shape() == cos.shape()
        && bias.is_none_or(|bias| bias.elem_count() == width);
    if !fits {
        return Err(disagree("qkv-slots", &[y.shape(), rows.shape(), kv.shape(), cos.shape()]));
    }
    let dev = cuda_device(&y)?;
    let q = unsafe { dev.alloc::<bf16>(n * h * e)? };
    let kv_at = typed_address::<bf16>(kv, "qkv-slots")?;
    {
        let ((ys, yl), (cs, cl), (ss, sl), (rs, rl)) =
            (y.storage_and_layout(), cos.storage_and_layout(), sin.storage_and_layout(), rows.storage_and_layout());
        let (yv, cv, sv) = (bf16_view(&ys, yl, "y")?, bf16_view(&cs, cl, "cos")?, bf16_view(&ss, sl, "sin")?);
        let rv = match &*rs {
            candle_core::Storage::Cuda(r) => view::<u32>(r, rl, "rows")?,
            _ => candle_core::bail!("qkv-slots: rows not on the GPU"),
        };
        let [n32, h32, kh32, e32, c32] = [n, h, kh, e, c].map(|x| x as i32);
        let slots64 = slots as i64;
        let cfg = launch_elements(n * width / 4);
        let bias = bias.map(Tensor::contiguous).transpose()?;
        let bias_at = optional_address(bias.as_ref(), "qkv-slots")?;
        launch!(
            dev,
            "qkv_slots_bf16",
            cfg,
            &yv,
            &bias_at,
            &cv,
            &sv,
            &rv,
            &q,
            &kv_at,
            &n32,
            &h32,
            &kh32,
            &e32,
            &c32,
            &slots64
        );
    }
    Ok(wrap(q, &dev, Shape::from((n, h, e))))
}

/// [`decode_attention`] over a slot cache: q (N, K, R, E) -> (N, K, R, E), row i attending to
/// the `rows[i][1] + 1` positions it holds (see [`qkv_slots`], which wrote the last of them), or
/// with a sliding `window` to the last `window` of them. rows (N, 5): slot, positions held,
/// position, prompt slot, prompt length. The first `prompt length` positions lie in the prompt
/// slot of `prompts` (2, prompt slots, K, PC, E), those after them in the row's slot of `kv` (2,
/// slots, K, C, E), both from position 0; a row with prompt length 0 holds all in its slot.
pub fn decode_slots(
    q: &Tensor,
    kv: &Tensor,
    prompts: &Tensor,
    rows: &Tensor,
    window: Option<usize>,
    scale: f64,
) -> Result<Tensor> {
    let (q, rows) = (q.contiguous()?, rows.contiguous()?);
    let (slots, kh, c, e) = slot_dims(kv)?;
    let (pslots, pkh, pc, pe) = slot_dims(prompts)?;
    let (n, qk, r, qe) = q.dims4()?;
    let fits = qk == kh && pkh == kh && qe == e && pe == e && r <= DECODE_MAX_GROUP && matches!(e, 64 | 128);
    if !fits || rows.dims() != [n, 5] || !applies(&q) {
        return Err(disagree("decode-slots", &[q.shape(), kv.shape(), prompts.shape(), rows.shape()]));
    }
    let dev = cuda_device(&q)?;
    let out = unsafe { dev.alloc::<bf16>(n * kh * r * e)? };
    let kv_at = typed_address::<bf16>(kv, "decode-slots")?;
    let prompts_at = typed_address::<bf16>(prompts, "decode-slots")?;
    {
        let ((qs, ql), (rs, rl)) = (q.storage_and_layout(), rows.storage_and_layout());
        let qv = bf16_view(&qs, ql, "q")?;
        let rv = match &*rs {
            candle_core::Storage::Cuda(r) => view::<u32>(r, rl, "rows")?,
            _ => candle_core::bail!("decode-slots: rows not on the GPU"),
        };
        let [kh32, r32, c32, pc32] = [kh, r, c, pc].map(|x| x as i32);
        let (slots64, pslots64, scale32) = (slots as i64, pslots as i64, scale as f32);
        let window32 = window.map_or(0, |w| w.min(i32::MAX as usize)) as i32;
        let cfg = flash_grid((n * kh) as u32, 1, e, 4, 0);
        let name = format!("decode_slots_{e}");
        launch_with_shared!(
            dev,
            &name,
            cfg,
            &qv,
            &kv_at,
            &prompts_at,
            &rv,
            &out,
            &kh32,
            &r32,
            &c32,
            &slots64,
            &pc32,
            &pslots64,
            &window32,
            &scale32
        );
    }
    Ok(wrap(out, &dev, Shape::from((n, kh, r, e))))
}

/// Copies the keys and values of prefilled prompts into their rows' slots: `prefilled` (P, K, L,
/// E), the prompts left-padded to L, into half `which` (0 keys, 1 values) of `kv` (2, slots, K,
/// C, E) in place; rows (M, 3) u32 on the GPU: each new row's prompt, slot and padding, its slot
/// then holding the prompt's L - padding positions from the start.
pub fn fill_slots(prefilled: &Tensor, kv: &Tensor, which: usize, rows: &Tensor) -> Result<()> {
    let (src, rows) = (prefilled.contiguous()?, rows.contiguous()?);
    let (slots, kh, c, e) = slot_dims(kv)?;
    let (_, pk, l, pe) = src.dims4()?;
    let m = rows.dim(0)?;
    if pk != kh || pe != e || l > c || which > 1 || !e.is_multiple_of(8) || rows.dims() != [m, 3] || !applies(&src) {
        return Err(disagree("fill-slots", &[src.shape(), kv.shape(), rows.shape()]));
    }
    let dev = cuda_device(&src)?;
    let dst = typed_address::<bf16>(kv, "fill-slots")? + (which * slots * kh * c * e * 2) as u64;
    let ((ss, sl), (rs, rl)) = (src.storage_and_layout(), rows.storage_and_layout());
    let sv = bf16_view(&ss, sl, "prefilled")?;
    let rv = match &*rs {
        candle_core::Storage::Cuda(r) => view::<u32>(r, rl, "rows")?,
        _ => candle_core::bail!("fill-slots: rows not on the GPU"),
    };
    let [m32, kh32, l32, e32, c32] = [m, kh, l, e, c].map(|x| x as i32);
    launch!(dev, "fill_slots_bf16", launch_elements(m * kh * l * e / 8), &sv, &dst, &rv, &m32, &kh32, &l32, &e32, &c32);
    Ok(())
}

/// rowsum(a * b) in f32 over the last dimension: (..., W) x 2 -> (rows,).
pub fn row_dot(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &RowDot)
}

struct RowDot;

impl candle_core::CustomOp2 for RowDot {
    fn name(&self) -> &'static str {
        "row-dot"
    }
    gpu_only!(2);
    fn cuda_fwd(&self, a: &CudaStorage, al: &Layout, b: &CudaStorage, bl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = a.device().clone();
        if al.shape() != bl.shape() {
            return Err(disagree(self.name(), &[al.shape(), bl.shape()]));
        }
        let (rows, w) = rows_of(al);
        let (av, bv) = (view::<bf16>(a, al, "a")?, view::<bf16>(b, bl, "b")?);
        let out = unsafe { dev.alloc::<f32>(rows)? };
        let (rows64, w32) = (rows as i64, w as i32);
        launch!(dev, "row_dot_bf16", launch_warps(rows), &av, &bv, &out, &rows64, &w32);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(rows)))
    }
}

/// Head sizes the flash-attention kernels are built for.
const FLASH_HEAD_SIZES: [usize; 2] = [64, 128];

/// How the query side (q, the output, their gradients) of [`flash_attention`] is laid out.
#[derive(Clone, Copy)]
pub enum QueryLayout<'a> {
    /// (B, K, G*T, E), the G query heads of each kv head stacked, q roped.
    Heads,
    /// (B, T, H*E) as the projections make and take them, q not roped: the kernels rope it with
    /// cos, sin (T, E/2) as they read it, and its gradient by the opposite angle.
    Merged { cos: &'a Tensor, sin: &'a Tensor },
}

/// The shape of a flash attention: (B, K, G, T, E).
fn flash_shape(q: &Tensor, k: &Tensor, g: usize, layout: QueryLayout) -> Option<(usize, usize, usize, usize, usize)> {
    let (b, kh, t, e) = k.dims4().ok()?;
    let fits_q = match layout {
        QueryLayout::Heads => q.dims4().ok()? == (b, kh, g * t, e),
        QueryLayout::Merged { cos, sin } => {
            q.dims3().ok()? == (b, t, kh * g * e)
                && cos.dims2().ok()? == (t, e / 2)
                && sin.dims() == cos.dims()
                && [cos, sin].iter().all(|x| applies(x) && x.is_contiguous())
        }
    };
    let aligned = [q, k].iter().all(|x| applies(x) && x.is_contiguous() && x.layout().start_offset().is_multiple_of(8));
    (fits_q && aligned && t > 0 && FLASH_HEAD_SIZES.contains(&e)).then_some((b, kh, g, t, e))
}

/// Whether [`flash_attention`] takes these: bf16 on the GPU, k (B, K, T, E) with E 64 or 128, q
/// as `layout` says, all contiguous from a 16-byte boundary.
pub fn flash_fits(q: &Tensor, k: &Tensor, g: usize, layout: QueryLayout) -> bool {
    flash_shape(q, k, g, layout).is_some()
}

/// A flash kernel's launch: its own arguments, then those they share (kv heads, whether merged,
/// cos, sin), then any after `;`.
macro_rules! launch_flash {
    ($dev:expr, $name:expr, $grid:expr, $kv:expr, $layout:expr, $($arg:expr),+ $(; $($tail:expr),+)?) => {{
        let kv = $kv as i32;
        match $layout {
            QueryLayout::Heads => {
                let none = 0u64; // cos and sin are not read
                launch_with_shared!($dev, $name, $grid, $($arg),+, &kv, &0i32, &none, &none $($(, $tail)+)?);
            }
            QueryLayout::Merged { cos, sin } => {
                let ((cs, cl), (ss, sl)) = (cos.storage_and_layout(), sin.storage_and_layout());
                let (cv, sv) = (bf16_view(&cs, cl, "cos")?, bf16_view(&ss, sl, "sin")?);
                launch_with_shared!($dev, $name, $grid, $($arg),+, &kv, &1i32, &cv, &sv $($(, $tail)+)?);
            }
        }
    }};
}

/// What [`flash_attention`] gives, and its backward pass takes.
pub struct FlashOutput {
    /// The attention's output, laid out as q.
    pub out: Tensor,
    /// Each query row's base-2 log-sum-exp of its scaled scores, f32.
    pub lse: Tensor,
    /// For [`QueryLayout::Merged`], q roped (as q): the backward pass's q.
    pub q_roped: Option<Tensor>,
}

/// Causal attention of q (as `layout` says) against k and v (B, K, T, E), bf16 on the GPU,
/// without the (T x T) scores in memory.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: usize,
    scale: f64,
    layout: QueryLayout,
) -> Result<FlashOutput> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let Some((b, kh, _, t, e)) = flash_shape(&q, &k, g, layout).filter(|_| v.dims() == k.dims()) else {
        return Err(disagree("flash-attention", &[q.shape(), k.shape(), v.shape()]));
    };
    let dev = cuda_device(&q)?;
    let out = unsafe { dev.alloc::<bf16>(q.elem_count())? };
    let lse = unsafe { dev.alloc::<f32>(q.elem_count() / e)? };
    let q_roped = match layout {
        QueryLayout::Merged { .. } => Some(unsafe { dev.alloc::<bf16>(q.elem_count())? }),
        QueryLayout::Heads => None,
    };
    {
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (qv, kv, vv) = (bf16_view(&qs, ql, "q")?, bf16_view(&ks, kl, "k")?, bf16_view(&vs, vl, "v")?);
        let (t32, g32, s32) = (t as i32, g as i32, scale as f32);
        let grid = flash_grid((g * t.div_ceil(64)) as u32, b * kh, e, 4, 0);
        let name = format!("flash_forward_{e}");
        match &q_roped {
            Some(roped) => {
                launch_flash!(dev, &name, grid, kh, layout, &qv, &kv, &vv, &out, &lse, &t32, &g32, &s32; roped)
            }
            None => launch_flash!(dev, &name, grid, kh, layout, &qv, &kv, &vv, &out, &lse, &t32, &g32, &s32; &0u64),
        }
    }
    Ok(FlashOutput {
        out: wrap(out, &dev, q.shape().clone()),
        lse: wrap(lse, &dev, Shape::from(q.elem_count() / e)),
        q_roped: q_roped.map(|r| wrap(r, &dev, q.shape().clone())),
    })
}

/// The gradients of q, k and v of [`flash_attention`] (dq as q, dk and dv (B, K, T, E)) from its
/// inputs (for [`QueryLayout::Merged`], q roped: [`FlashOutput::q_roped`]), its lse and `d`,
/// each query row's rowsum(dout * out) in f32 ([`row_dot`] over the rows of E), and the
/// output's gradient `dout`. For the merged layout dq is that of the unroped q.
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
    lse: &Tensor,
    d: &Tensor,
    g: usize,
    scale: f64,
    layout: QueryLayout,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (q, k, v, dout) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, dout.contiguous()?);
    let shape = flash_shape(&q, &k, g, layout);
    let rows = q.elem_count() / k.dim(3)?;
    let Some((b, kh, _, t, e)) = shape.filter(|_| {
        v.dims() == k.dims() && dout.dims() == q.dims() && d.elem_count() == rows && lse.elem_count() == rows
    }) else {
        return Err(disagree("flash-attention backward", &[q.shape(), k.shape(), dout.shape(), lse.shape()]));
    };
    let dev = cuda_device(&q)?;
    let dq = unsafe { dev.alloc::<bf16>(q.elem_count())? };
    // dk and dv per query head, in f32, summed below.
    let dk = unsafe { dev.alloc::<f32>(g * k.elem_count())? };
    let dv = unsafe { dev.alloc::<f32>(g * v.elem_count())? };
    {
        let (lse, d) = (lse.contiguous()?, d.contiguous()?);
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (os, ol) = dout.storage_and_layout();
        let (ls, ll) = lse.storage_and_layout();
        let (ds, dl) = d.storage_and_layout();
        let (qv, kv, vv) = (bf16_view(&qs, ql, "q")?, bf16_view(&ks, kl, "k")?, bf16_view(&vs, vl, "v")?);
        let ov = bf16_view(&os, ol, "dout")?;
        let (lv, dv_) = (f32_view(&ls, ll, "lse")?, f32_view(&ds, dl, "d")?);
        let (t32, g32, s32) = (t as i32, g as i32, scale as f32);
        let grid = flash_grid((g * t.div_ceil(64)) as u32, b * kh, e, 4, 0);
        let name = format!("flash_dq_{e}");
        launch_flash!(dev, &name, grid, kh, layout, &qv, &kv, &vv, &ov, &lv, &dv_, &dq, &t32, &g32, &s32);
        let grid = flash_grid(t.div_ceil(64) as u32, b * kh * g, e, 6, 4);
        let name = format!("flash_dkv_{e}");
        launch_flash!(dev, &name, grid, kh, layout, &qv, &kv, &vv, &ov, &lv, &dv_, &dk, &dv, &t32, &g32, &s32);
    }
    let summed = |parts: CudaSlice<f32>| -> Result<Tensor> {
        let n = k.elem_count();
        let out = unsafe { dev.alloc::<bf16>(n)? };
        let (n64, g32) = (n as i64, g as i32);
        launch!(dev, "sum_parts_bf16", launch_elements(n), &parts, &out, &n64, &g32);
        Ok(wrap(out, &dev, k.shape().clone()))
    };
    Ok((wrap(dq, &dev, q.shape().clone()), summed(dk)?, summed(dv)?))
}

/// The launch of a flash kernel with a grid (x, y) of 128-thread blocks, each with shared memory
/// for `tiles` tiles of 64 rows of E + 8 bf16 and `rows` rows of 64 f32.
fn flash_grid(x: u32, y: usize, e: usize, tiles: usize, rows: usize) -> LaunchConfig {
    let shared = (tiles * 64 * (e + 8) * 2 + rows * 64 * 4) as u32;
    LaunchConfig { grid_dim: (x, y as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: shared }
}
