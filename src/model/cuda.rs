//! Launchers of the fused bf16 kernels of `kernels.cu` (compiled to PTX by build.rs), as candle
//! ops without backward rules; the differentiable ops in [`super::ops`] call them on the GPU.
//!
//! Every launcher takes contiguous bf16 (and u32 / f32) tensors on the GPU and one block of
//! [`BLOCK`] threads per row, or a grid-stride loop for elementwise kernels.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Tensor};
use half::bf16;

use super::config::Activation;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const BLOCK: u32 = 256;

fn launch_rows(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// One warp per row.
fn launch_warps(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((rows * 32).div_ceil(BLOCK as usize) as u32, 1, 1), ..launch_rows(1) }
}

fn launch_elements(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 65_536) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    let (a, b) = offsets(l, what)?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// [`view`], writable: for the ops that update a tensor in place.
fn view_mut<'a, T: CudaDType>(s: &'a mut CudaStorage, l: &Layout, what: &str) -> Result<CudaViewMut<'a, T>> {
    let (a, b) = offsets(l, what)?;
    Ok(s.as_cuda_slice_mut::<T>()?.slice_mut(a..b))
}

/// Where a contiguous layout's elements start and end in its storage.
fn offsets(l: &Layout, what: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("fused kernel: {what} must be contiguous")))
}

/// Whether n bf16 elements at these (contiguous) layouts can be moved eight at a time: 16-byte
/// aligned (allocations are; a view's offset may not be) and a multiple of 8.
fn packed8(n: usize, layouts: &[&Layout]) -> bool {
    n.is_multiple_of(8) && layouts.iter().all(|l| l.start_offset().is_multiple_of(8))
}

/// (rows, width) of a layout taken as rows of its last dimension.
fn rows_of(l: &Layout) -> (usize, usize) {
    let width = *l.dims().last().unwrap_or(&1);
    (l.shape().elem_count() / width.max(1), width)
}

/// The error of an op given shapes that do not fit together.
fn disagree(name: &str, shapes: &[&Shape]) -> candle_core::Error {
    candle_core::Error::Msg(format!("{name}: shapes {shapes:?} do not agree"))
}

fn no_cpu(name: &str) -> Result<(CpuStorage, Shape)> {
    candle_core::bail!("{name}: a GPU kernel, called on the CPU")
}

/// The CPU side of a GPU-only custom op of 1, 2 or 3 inputs, or of an in-place op
/// (`inplace 2`, `inplace 3`): an error naming the op.
macro_rules! gpu_only {
    (inplace 2) => {
        fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
            no_cpu(self.name()).map(|_| ())
        }
    };
    (inplace 3) => {
#[rustfmt::skip]
        fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout)
            -> Result<()> {
            no_cpu(self.name()).map(|_| ())
        }
    };
    (1) => {
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            no_cpu(self.name())
        }
    };
    (2) => {
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            no_cpu(self.name())
        }
    };
    (3) => {
#[rustfmt::skip]
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout)
            -> Result<(CpuStorage, Shape)> {
            no_cpu(self.name())
        }
    };
}

macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let func = $dev.get_or_load_custom_func($name, "loralab_kernels", PTX)?;
        let mut builder = func.builder();
        $( builder.arg($arg); )+
        // Safety: the argument list matches the kernel's signature in kernels.cu.
        unsafe { builder.launch($cfg) }.w()?;
    }};
}

/// [`launch!`] for a kernel that asks for more shared memory than the default 48 KiB.
macro_rules! launch_with_shared {
    ($dev:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
        let cfg: LaunchConfig = $cfg;
        let func = $dev.get_or_load_custom_func($name, "loralab_kernels", PTX)?;
        let limit = CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        func.set_attribute(limit, cfg.shared_mem_bytes as i32).w()?;
        let mut builder = func.builder();
        $( builder.arg($arg); )+
        // Safety: the argument list matches the kernel's signature in kernels.cu.
        unsafe { builder.launch(cfg) }.w()?;
    }};
}

/// Causal softmax of bf16 scores (rows, S), `scale` applied first, then `softcap` c where given
/// (c * tanh(s / c)); the query position of row r is r % t and its last visible key
/// (r % t) + S - t.
pub fn causal_softmax(scores: &Tensor, t: usize, scale: f64, softcap: Option<f64>) -> Result<Tensor> {
    scores.contiguous()?.apply_op1_no_bwd(&CausalSoftmax { t, scale: scale as f32, cap: cap_arg(softcap) })
}

/// A soft cap as the kernels take it: 0 for none.
fn cap_arg(softcap: Option<f64>) -> f32 {
    softcap.unwrap_or(0.0) as f32
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

/// Per row of bf16 logits (N, V) and u32 targets (N,): (loss, logsumexp) as f32 (N, 2), of the
/// logits capped by `softcap` where given (here and below).
pub fn cross_entropy_forward(logits: &Tensor, targets: &Tensor, softcap: Option<f64>) -> Result<Tensor> {
    logits.contiguous()?.apply_op2_no_bwd(&targets.contiguous()?, &CrossEntropyForward { cap: cap_arg(softcap) })
}

struct CrossEntropyForward {
    cap: f32,
}

impl candle_core::CustomOp2 for CrossEntropyForward {
    fn name(&self) -> &'static str {
        "cross-entropy-forward"
    }
    gpu_only!(2);
    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, t: &CudaStorage, tl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let (n, v) = xl.shape().dims2()?;
        if tl.shape().elem_count() != n {
            candle_core::bail!("cross-entropy: {} targets for {n} rows", tl.shape().elem_count());
        }
        let (xv, tv) = (view::<bf16>(x, xl, "logits")?, view::<u32>(t, tl, "targets")?);
        let out = unsafe { dev.alloc::<f32>(n * 2)? };
        let v32 = v as i32;
        launch!(dev, "cross_entropy_forward_bf16", launch_rows(n), &xv, &tv, &out, &v32, &self.cap);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, 2))))
    }
}

/// Per row of bf16 logits (N, V) and u32 targets (N,): (loss, logsumexp) as f32 (N, 2), and the
/// logits replaced in place by softmax - onehot(target), in one kernel (V a multiple of 8; see
/// [`cross_entropy_fused_fits`]). `logits` must be held by the caller alone (see [`add_matmul`]).
/// Capped, the gradient is that of the uncapped logits.
pub fn cross_entropy_fused(logits: &Tensor, targets: &Tensor, softcap: Option<f64>) -> Result<Tensor> {
    let op = CrossEntropyFused { stats: std::sync::Mutex::new(None), cap: cap_arg(softcap) };
    logits.inplace_op2(&targets.contiguous()?, &op)?;
    let (stats, dev) = op
        .stats
        .into_inner()
        .map_err(|_| candle_core::Error::Msg("cross-entropy statistics poisoned".into()))?
        .ok_or_else(|| candle_core::Error::Msg("cross-entropy: the kernel did not run".into()))?;
    let n = stats.len() / 2;
    Ok(wrap(stats, &dev, Shape::from((n, 2))))
}

/// Whether [`cross_entropy_fused`] takes these logits.
pub fn cross_entropy_fused_fits(logits: &Tensor) -> bool {
    applies(logits)
        && logits.is_contiguous()
        && logits.layout().start_offset().is_multiple_of(8)
        && logits.dims2().is_ok_and(|(_, v)| v.is_multiple_of(8))
}

struct CrossEntropyFused {
    stats: std::sync::Mutex<Option<(CudaSlice<f32>, CudaDevice)>>,
    cap: f32,
}

impl candle_core::InplaceOp2 for CrossEntropyFused {
    fn name(&self) -> &'static str {
        "cross-entropy-fused"
    }
    gpu_only!(inplace 2);
    fn cuda_fwd(&self, x: &mut CudaStorage, xl: &Layout, t: &CudaStorage, tl: &Layout) -> Result<()> {
        let dev = x.device().clone();
        let (n, v) = xl.shape().dims2()?;
        if tl.shape().elem_count() != n || v % 8 != 0 || !packed8(v, &[xl]) {
            return Err(disagree(self.name(), &[xl.shape(), tl.shape()]));
        }
        let tv = view::<u32>(t, tl, "targets")?;
        let mut xv = view_mut::<bf16>(x, xl, "logits")?;
        let out = unsafe { dev.alloc::<f32>(n * 2)? };
        let v32 = v as i32;
        launch!(dev, "cross_entropy_fused_bf16", launch_rows(n), &mut xv, &tv, &out, &v32, &self.cap);
        *self.stats.lock().map_err(|_| candle_core::Error::Msg("cross-entropy statistics poisoned".into()))? =
            Some((out, dev));
        Ok(())
    }
}

/// softmax(logits) - onehot(targets), bf16 (N, V), from the forward pass's (loss, lse) rows;
/// capped, times the cap's derivative.
pub fn cross_entropy_backward(
    logits: &Tensor,
    targets: &Tensor,
    stats: &Tensor,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let op = CrossEntropyBackward { cap: cap_arg(softcap) };
    logits.contiguous()?.apply_op3_no_bwd(&targets.contiguous()?, &stats.contiguous()?, &op)
}

struct CrossEntropyBackward {
    cap: f32,
}

impl candle_core::CustomOp3 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross-entropy-backward"
    }
    gpu_only!(3);
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        t: &CudaStorage,
        tl: &Layout,
        st: &CudaStorage,
        stl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let (n, v) = xl.shape().dims2()?;
        let (xv, tv, sv) =
            (view::<bf16>(x, xl, "logits")?, view::<u32>(t, tl, "targets")?, view::<f32>(st, stl, "stats")?);
        let out = unsafe { dev.alloc::<bf16>(n * v)? };
        let v32 = v as i32;
        launch!(dev, "cross_entropy_backward_bf16", launch_rows(n), &xv, &tv, &sv, &out, &v32, &self.cap);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), xl.shape().clone()))
    }
}

/// RMSNorm of bf16 x (rows, D) with weight (D): one pass, each row read once (D a multiple of 8,
/// at most 8192).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &RmsNorm { eps: eps as f32 })
}

/// Whether [`rms_norm`] takes rows of `d`.
pub fn rms_norm_fits(d: usize) -> bool {
    d.is_multiple_of(8) && d <= 8 * 4 * BLOCK as usize
}

struct RmsNorm {
    eps: f32,
}

impl candle_core::CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }
    gpu_only!(2);
    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, w: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let (rows, d) = rows_of(xl);
        if wl.shape().elem_count() != d || !rms_norm_fits(d) || !packed8(d, &[xl, wl]) {
            return Err(disagree(self.name(), &[xl.shape(), wl.shape()]));
        }
        let (xv, wv) = (view::<bf16>(x, xl, "x")?, view::<bf16>(w, wl, "weight")?);
        let out = unsafe { dev.alloc::<bf16>(rows * d)? };
        let d32 = d as i32;
        launch!(dev, "rms_norm_bf16", launch_rows(rows), &xv, &wv, &out, &d32, &self.eps);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), xl.shape().clone()))
    }
}

/// RMSNorm's input gradient for bf16 x and g (rows, D) and weight (D).
pub fn rms_norm_backward(x: &Tensor, g: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(&g.contiguous()?, &weight.contiguous()?, &RmsNormBackward { eps: eps as f32 })
}

/// The backward kernel for rows of `d`: eight elements at a time where the layouts allow it.
fn rms_norm_backward_kernel(d: usize, layouts: &[&Layout]) -> &'static str {
    if rms_norm_fits(d) && packed8(d, layouts) {
        "rms_norm_backward_packed_bf16"
    } else {
        "rms_norm_backward_bf16"
    }
}

struct RmsNormBackward {
    eps: f32,
}

impl candle_core::CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms-norm-backward"
    }
    gpu_only!(3);
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let (rows, d) = rows_of(xl);
        if gl.shape() != xl.shape() || wl.shape().elem_count() != d {
            return Err(disagree(self.name(), &[xl.shape(), gl.shape(), wl.shape()]));
        }
        let (xv, gv, wv) = (view::<bf16>(x, xl, "x")?, view::<bf16>(g, gl, "grad")?, view::<bf16>(w, wl, "weight")?);
        let out = unsafe { dev.alloc::<bf16>(rows * d)? };
        let d32 = d as i32;
        let none = 0u64; // no residual gradient to add
        let name = rms_norm_backward_kernel(d, &[xl, gl, wl]);
        launch!(dev, name, launch_rows(rows), &xv, &gv, &wv, &none, &out, &d32, &self.eps);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), xl.shape().clone()))
    }
}

/// `[z | 1 | 0..]` (N, width) for bf16 z (N, r), r < width, in one pass: an adapter's input
/// product beside its bias column. Where z is a view of every row's first r columns of a wider
/// tensor it is read in place.
pub fn augment(z: &Tensor, width: usize) -> Result<Tensor> {
    z.apply_op1_no_bwd(&Augment { width })
}

struct Augment {
    width: usize,
}

impl candle_core::CustomOp1 for Augment {
    fn name(&self) -> &'static str {
        "augment"
    }
    gpu_only!(1);
    fn cuda_fwd(&self, z: &CudaStorage, zl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = z.device().clone();
        let (&[n, r], &[zs, 1]) = (zl.dims(), zl.stride()) else {
            return Err(disagree(self.name(), &[zl.shape()]));
        };
        if r >= self.width || zs < r {
            return Err(disagree(self.name(), &[zl.shape(), &Shape::from((n, self.width))]));
        }
        // Rows n - 1 of zs elements and one of r: the view's extent.
        let start = zl.start_offset();
        let zv = z.as_cuda_slice::<bf16>()?.slice(start..start + n.saturating_sub(1) * zs + r);
        let out = unsafe { dev.alloc::<bf16>(n * self.width)? };
        let (zs64, n64, r32, w32) = (zs as i64, n as i64, r as i32, self.width as i32);
        launch!(dev, "augment_bf16", launch_elements(n * self.width), &zv, &zs64, &out, &n64, &r32, &w32);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, self.width))))
    }
}

/// `x * s` for bf16 x and an f32 scalar s, both on the GPU, in one pass (candle's broadcasting
/// product takes ten times as long).
pub fn scale_by(x: &Tensor, s: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&s.to_dtype(DType::F32)?.reshape(1)?, &ScaleBy)
}

struct ScaleBy;

impl candle_core::CustomOp2 for ScaleBy {
    fn name(&self) -> &'static str {
        "scale-by"
    }
    gpu_only!(2);
    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, s: &CudaStorage, sl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let n = xl.shape().elem_count();
        let (xv, sv) = (view::<bf16>(x, xl, "x")?, view::<f32>(s, sl, "the scale")?);
        let out = unsafe { dev.alloc::<bf16>(n)? };
        let (n64, packed) = (n as i64, packed8(n, &[xl]));
        let (cfg, packed) = (launch_elements(n / if packed { 8 } else { 1 }), packed as i32);
        launch!(dev, "scale_by_bf16", cfg, &xv, &sv, &out, &n64, &packed);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), xl.shape().clone()))
    }
}

/// The sum of the squares of all elements of contiguous f32 tensors on the GPU, as an f64 scalar
/// there: a gradient norm from one launch and one sum, in a fixed order (deterministic), where
/// squaring and summing each tensor, then stacking the sums, took four launches per tensor.
pub fn sum_squares(xs: &[Tensor]) -> Result<Tensor> {
    let Some(first) = xs.first() else { candle_core::bail!("sum-squares: no tensors") };
    let dev = cuda_device(first)?;
    let mut table = Vec::with_capacity(2 * xs.len());
    for x in xs {
        table.extend([address(x, "sum-squares")?, x.elem_count() as u64]);
    }
    let table = dev.clone_htod(&table)?;
    let partials = dev.alloc_zeros::<f32>(xs.len() * SUM_SQUARES_PARTS)?;
    let cfg = LaunchConfig { grid_dim: (SUM_SQUARES_PARTS as u32, xs.len() as u32, 1), ..launch_rows(1) };
    launch!(dev, "sum_squares_many_f32", cfg, &table, &partials);
    let partials = wrap(partials, &dev, Shape::from(xs.len() * SUM_SQUARES_PARTS));
    // The addresses were read by the launch above; the tensors outlive it in the caller.
    drop(table);
    partials.to_dtype(DType::F64)?.sum_all()
}

/// Blocks of the sum-squares kernel: partial sums per tensor (SUM_SQUARES_PARTS in kernels.cu).
const SUM_SQUARES_PARTS: usize = 32;

/// The device address of a contiguous f32 tensor's first element, for kernels that take many
/// tensors through a table. The tensor must outlive the launches that use it (allocations are
/// freed in stream order, so a tensor dropped after the launch is).
fn address(t: &Tensor, op: &str) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (storage, layout) = t.storage_and_layout();
    let (candle_core::Storage::Cuda(cs), Some((start, _)), DType::F32) =
        (&*storage, layout.contiguous_offsets(), t.dtype())
    else {
        candle_core::bail!("{op}: {:?} must be a contiguous f32 tensor on the GPU", t.shape())
    };
    let slice = cs.as_cuda_slice::<f32>()?;
    let (ptr, _sync) = slice.device_ptr(slice.stream());
    Ok(ptr + (start * std::mem::size_of::<f32>()) as u64)
}

/// Rows of bf16 src (M, D) by a u32 index (N,): row i of the result is src row idx[i], or zeros
/// where idx[i] >= M. One pass of 16-byte loads, where candle's index_select takes one
/// element per thread; `take_rows_fits` says whether the shapes allow it.
pub fn take_rows(src: &Tensor, idx: &Tensor) -> Result<Tensor> {
    src.contiguous()?.apply_op2_no_bwd(&idx.contiguous()?, &TakeRows)
}

/// Whether [`take_rows`] takes rows of `src` (bf16 on the GPU, D a multiple of 8).
pub fn take_rows_fits(src: &Tensor) -> bool {
    applies(src) && src.dims().len() == 2 && src.dim(1).is_ok_and(|d| d % 8 == 0)
}

struct TakeRows;

impl candle_core::CustomOp2 for TakeRows {
    fn name(&self) -> &'static str {
        "take-rows"
    }
    gpu_only!(2);
    fn cuda_fwd(&self, s: &CudaStorage, sl: &Layout, i: &CudaStorage, il: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        let (m, d) = sl.shape().dims2()?;
        let n = il.shape().elem_count();
        if d % 8 != 0 || !packed8(m * d, &[sl]) {
            return Err(disagree(self.name(), &[sl.shape(), il.shape()]));
        }
        let (sv, iv) = (view::<bf16>(s, sl, "rows")?, view::<u32>(i, il, "the index")?);
        let out = unsafe { dev.alloc::<bf16>(n * d)? };
        let (m64, n64, d32) = (m as i64, n as i64, d as i32);
        launch!(dev, "take_rows_bf16", launch_elements(n * d / 8), &sv, &m64, &iv, &out, &n64, &d32);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, d))))
    }
}

/// act(gate) * up for bf16 tensors of one shape, with its backward rule.
pub fn gated_mul(activation: Activation, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, GatedMul(activation))
}

/// The kernels' number for an activation (kernels.cu's ACT_*).
fn activation_arg(activation: Activation) -> i32 {
    match activation {
        Activation::Silu => 0,
        Activation::GeluTanh => 1,
    }
}

struct GatedMul(Activation);

impl candle_core::CustomOp2 for GatedMul {
    fn name(&self) -> &'static str {
        "gated-mul"
    }
    gpu_only!(2);
    fn cuda_fwd(&self, g: &CudaStorage, gl: &Layout, u: &CudaStorage, ul: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = g.device().clone();
        if gl.shape() != ul.shape() {
            candle_core::bail!("gated-mul: shapes {:?} and {:?} differ", gl.shape(), ul.shape());
        }
        let n = gl.shape().elem_count();
        let (gv, uv) = (view::<bf16>(g, gl, "gate")?, view::<bf16>(u, ul, "up")?);
        let out = unsafe { dev.alloc::<bf16>(n)? };
        let (n64, packed) = (n as i64, packed8(n, &[gl, ul]));
        let (cfg, packed) = (launch_elements(n / if packed { 8 } else { 1 }), packed as i32);
        let act = activation_arg(self.0);
        launch!(dev, "gated_mul_bf16", cfg, &gv, &uv, &out, &n64, &packed, &act);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), gl.shape().clone()))
    }
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dgate, dup) = gated_mul_backward(self.0, gate, up, grad)?;
        Ok((Some(dgate), Some(dup)))
    }
}

/// The gradients of gate and up from that of act(gate) * up, bf16 tensors of one shape.
pub fn gated_mul_backward(
    activation: Activation,
    gate: &Tensor,
    up: &Tensor,
    grad: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let op = GatedMulBackward(activation);
    let both = gate.contiguous()?.apply_op3_no_bwd(&up.contiguous()?, &grad.contiguous()?, &op)?; // (2, n)
    let shape = gate.shape();
    Ok((both.get(0)?.reshape(shape)?, both.get(1)?.reshape(shape)?))
}

struct GatedMulBackward(Activation);

impl candle_core::CustomOp3 for GatedMulBackward {
    fn name(&self) -> &'static str {
        "gated-mul-backward"
    }
    gpu_only!(3);
    fn cuda_fwd(
        &self,
        g: &CudaStorage,
        gl: &Layout,
        u: &CudaStorage,
        ul: &Layout,
        d: &CudaStorage,
        dl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = g.device().clone();
        let n = gl.shape().elem_count();
        let (gv, uv, dv) = (view::<bf16>(g, gl, "gate")?, view::<bf16>(u, ul, "up")?, view::<bf16>(d, dl, "grad")?);
        let out = unsafe { dev.alloc::<bf16>(2 * n)? };
        let (n64, packed) = (n as i64, packed8(n, &[gl, ul, dl]));
        let (cfg, packed) = (launch_elements(n / if packed { 8 } else { 1 }), packed as i32);
        let act = activation_arg(self.0);
        launch!(dev, "gated_mul_backward_bf16", cfg, &gv, &uv, &dv, &out, &n64, &packed, &act);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((2, n))))
    }
}

/// Largest number of query heads per kv head, and head dimension, the decoding kernel takes.
const DECODE_MAX_GROUP: usize = 8;
const DECODE_MAX_HEAD_DIM: usize = 128;

/// Whether [`decode_attention`] takes this step: q (B, K, R, E) bf16 on the GPU with R <= 8 query
/// heads per kv head, E a multiple of 32 up to 128, and a mask of one row per batch row, if any.
pub fn decode_attention_fits(q: &Tensor, s: usize, mask: Option<&Tensor>) -> bool {
    let Ok((b, _, r, e)) = q.dims4() else { return false };
    applies(q)
        && r <= DECODE_MAX_GROUP
        && e % 32 == 0
        && e <= DECODE_MAX_HEAD_DIM
        && mask.is_none_or(|m| m.elem_count() == b * s)
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
        // The kernel reads keys with 16-byte loads.
        let aligned = kl.start_offset().is_multiple_of(8);
        if r > DECODE_MAX_GROUP
            || e % 32 != 0
            || e > DECODE_MAX_HEAD_DIM
            || self.s > c
            || kl.shape() != vl.shape()
            || !aligned
        {
            candle_core::bail!(
                "decode-attention: unsupported shapes q {:?}, cache {:?}, s {}",
                ql.shape(),
                kl.shape(),
                self.s
            );
        }
        let (qv, kv, vv) = (view::<bf16>(q, ql, "q")?, view::<bf16>(k, kl, "keys")?, view::<bf16>(v, vl, "values")?);
        let out = unsafe { dev.alloc::<bf16>(b * heads * r * e)? };
        let (h32, r32, c32, s32, e32) = (heads as i32, r as i32, c as i32, self.s as i32, e as i32);
        // One thread per element of the head dimension.
        let cfg =
            LaunchConfig { grid_dim: ((b * heads) as u32, 1, 1), block_dim: (e as u32, 1, 1), shared_mem_bytes: 0 };
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
                launch!(
                    dev,
                    "decode_attention_bf16",
                    cfg,
                    &qv,
                    &kv,
                    &vv,
                    &mv,
                    &out,
                    &h32,
                    &r32,
                    &c32,
                    &s32,
                    &e32,
                    &self.scale
                );
            }
            None => {
                let null = 0u64;
                launch!(
                    dev,
                    "decode_attention_bf16",
                    cfg,
                    &qv,
                    &kv,
                    &vv,
                    &null,
                    &out,
                    &h32,
                    &r32,
                    &c32,
                    &s32,
                    &e32,
                    &self.scale
                );
            }
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), ql.shape().clone()))
    }
}

/// One token id per row of `logits` (rows, V), bf16 or f32: the Gumbel-max draw
/// argmax(logits / T + G) from softmax(logits / T), or the argmax at T = 0. `top_k` > 0 and
/// `top_p` < 1 restrict the draw to the top-k tokens, then to the nucleus of those (as
/// transformers' warpers cut them). `keys` (rows) i64 holds each row's random key; the noise is a
/// hash of (key, step, token id), so a row draws the same token whatever else is in its batch.
/// Returns (rows) u32.
pub fn gumbel_argmax(
    logits: &Tensor,
    keys: &Tensor,
    step: u32,
    temperature: f64,
    top_k: usize,
    top_p: f64,
) -> Result<Tensor> {
    let inv_t = if temperature == 0.0 { 0.0 } else { (1.0 / temperature) as f32 };
    let op = GumbelArgmax { step, inv_t, top_k: top_k.min(i32::MAX as usize) as i32, top_p: top_p as f32 };
    logits.contiguous()?.apply_op2_no_bwd(&keys.contiguous()?, &op)
}

struct GumbelArgmax {
    step: u32,
    inv_t: f32,
    top_k: i32,
    top_p: f32,
}

impl candle_core::CustomOp2 for GumbelArgmax {
    fn name(&self) -> &'static str {
        "gumbel-argmax"
    }
    gpu_only!(2);
    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, k: &CudaStorage, kl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let (rows, v) = xl.shape().dims2()?;
        if kl.shape().elem_count() != rows || k.dtype() != DType::I64 {
            candle_core::bail!("gumbel-argmax: want one i64 key per row of {:?}, got {:?}", xl.shape(), kl.shape());
        }
        let keys = view::<i64>(k, kl, "keys")?;
        let out = unsafe { dev.alloc::<u32>(rows)? };
        let v32 = v as i32;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
        match x.dtype() {
            DType::BF16 => {
                let xv = view::<bf16>(x, xl, "logits")?;
                launch!(
                    dev,
                    "gumbel_argmax_bf16",
                    cfg,
                    &xv,
                    &keys,
                    &self.step,
                    &self.inv_t,
                    &self.top_k,
                    &self.top_p,
                    &out,
                    &v32
                );
            }
            DType::F32 => {
                let xv = view::<f32>(x, xl, "logits")?;
                launch!(
                    dev,
                    "gumbel_argmax_f32",
                    cfg,
                    &xv,
                    &keys,
                    &self.step,
                    &self.inv_t,
                    &self.top_k,
                    &self.top_p,
                    &out,
                    &v32
                );
            }
            other => candle_core::bail!("gumbel-argmax: logits of {other:?} (want bf16 or f32)"),
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(rows)))
    }
}

/// An inverted-dropout mask of `shape` on `like`'s GPU and in its dtype (bf16 or f32): element i
/// is 1 / keep where the CPU's rule (`decoder::keyed_dropout_mask`) keeps it, else 0.
pub fn dropout_mask(shape: &Shape, key: u64, keep: f64, like: &Tensor) -> Result<Tensor> {
    super::decoder::check_mask_len(shape.elem_count())?;
    // A custom op needs an input: one element that places the mask's device and dtype.
    let anchor = Tensor::zeros(1, like.dtype(), like.device())?;
    let op = DropoutMask { shape: shape.clone(), key, threshold: super::decoder::keep_threshold(keep), keep };
    anchor.apply_op1_no_bwd(&op)
}

struct DropoutMask {
    shape: Shape,
    key: u64,
    threshold: u32,
    keep: f64,
}

impl candle_core::CustomOp1 for DropoutMask {
    fn name(&self) -> &'static str {
        "dropout-mask"
    }
    gpu_only!(1);
    fn cuda_fwd(&self, x: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let n = self.shape.elem_count();
        let n64 = n as i64;
        let (lo, hi) = (self.key as u32, (self.key >> 32) as u32);
        let value = (1.0 / self.keep) as f32;
        let storage = match x.dtype() {
            DType::BF16 => {
                let out = unsafe { dev.alloc::<bf16>(n)? };
                launch!(dev, "dropout_mask_bf16", launch_elements(n), &out, &n64, &lo, &hi, &self.threshold, &value);
                CudaStorage::wrap_cuda_slice(out, dev)
            }
            DType::F32 => {
                let out = unsafe { dev.alloc::<f32>(n)? };
                launch!(dev, "dropout_mask_f32", launch_elements(n), &out, &n64, &lo, &hi, &self.threshold, &value);
                CudaStorage::wrap_cuda_slice(out, dev)
            }
            other => candle_core::bail!("dropout-mask: {other:?} (want bf16 or f32)"),
        };
        Ok((storage, self.shape.clone()))
    }
}

/// x * mask for bf16 x on the GPU, the mask of `dropout_mask` (same key and keep) drawn in the
/// same pass: no mask tensor is written or kept.
pub fn dropout_apply(x: &Tensor, key: u64, keep: f64) -> Result<Tensor> {
    let op = DropoutApply { key, threshold: super::decoder::keep_threshold(keep), keep };
    x.contiguous()?.apply_op1_no_bwd(&op)
}

struct DropoutApply {
    key: u64,
    threshold: u32,
    keep: f64,
}

impl candle_core::CustomOp1 for DropoutApply {
    fn name(&self) -> &'static str {
        "dropout-apply"
    }
    gpu_only!(1);
    fn cuda_fwd(&self, x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let n = l.shape().elem_count();
        super::decoder::check_mask_len(n)?;
        let xv = view::<bf16>(x, l, "x")?;
        let out = unsafe { dev.alloc::<bf16>(n)? };
        let (n64, lo, hi) = (n as i64, self.key as u32, (self.key >> 32) as u32);
        // The mask's value rounded as a bf16 mask would hold it, so that the product is the same.
        let value = bf16::from_f64(1.0 / self.keep).to_f32();
        launch!(dev, "dropout_apply_bf16", launch_elements(n), &xv, &out, &n64, &lo, &hi, &self.threshold, &value);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), l.shape().clone()))
    }
}

/// `acc += x * mask` in place, the mask of [`dropout_apply`] drawn in the same pass: `acc` must
/// be held by the caller alone (see [`add_matmul`]).
pub fn dropout_add(acc: &Tensor, x: &Tensor, key: u64, keep: f64) -> Result<()> {
    let op = DropoutApply { key, threshold: super::decoder::keep_threshold(keep), keep };
    acc.inplace_op2(&x.contiguous()?, &op)
}

impl candle_core::InplaceOp2 for DropoutApply {
    fn name(&self) -> &'static str {
        "dropout-add"
    }
    gpu_only!(inplace 2);
    fn cuda_fwd(&self, acc: &mut CudaStorage, al: &Layout, x: &CudaStorage, xl: &Layout) -> Result<()> {
        let dev = x.device().clone();
        let n = xl.shape().elem_count();
        if al.shape() != xl.shape() {
            return Err(disagree("dropout-add", &[al.shape(), xl.shape()]));
        }
        super::decoder::check_mask_len(n)?;
        let xv = view::<bf16>(x, xl, "x")?;
        let mut av = view_mut::<bf16>(acc, al, "the sum")?;
        let (n64, lo, hi) = (n as i64, self.key as u32, (self.key >> 32) as u32);
        let value = bf16::from_f64(1.0 / self.keep).to_f32();
        launch!(dev, "dropout_add_bf16", launch_elements(n), &xv, &mut av, &n64, &lo, &hi, &self.threshold, &value);
        Ok(())
    }
}

/// Whether the fused kernels apply: a bf16 tensor on the GPU.
pub fn applies(t: &Tensor) -> bool {
    t.device().is_cuda() && t.dtype() == DType::BF16
}

/// Stops candle from recording an event per tensor use: loralab runs every kernel on the
/// device's one stream, where the events order nothing and cost time at every launch.
pub fn single_stream(dev: &CudaDevice) {
    // Safety: all work is issued on this device's default stream (no other stream exists).
    unsafe { dev.disable_event_tracking() }
}

/// `c += a b^T` (`b_transposed`: b is (M, K)) or `c += a b` (b is (K, M)), for c (N, M) and
/// a (N, K), all bf16 and contiguous on the GPU, as one cuBLAS product that accumulates into c
/// (f32 arithmetic, beta = 1). A product followed by an addition would make two more passes
/// over c, which for a (tokens x intermediate) output costs more than the adapter's products.
/// `c` changes in place: the caller must hold the only handle to it (a tensor it has just
/// computed and given to no one).
pub fn add_matmul(c: &Tensor, a: &Tensor, b: &Tensor, b_transposed: bool) -> Result<()> {
    c.inplace_op3(&a.contiguous()?, &b.contiguous()?, &AddMatmul { b_transposed })
}

struct AddMatmul {
    b_transposed: bool,
}

impl candle_core::InplaceOp3 for AddMatmul {
    fn name(&self) -> &'static str {
        "add-matmul"
    }

    gpu_only!(inplace 3);

    fn cuda_fwd(
        &self,
        c: &mut CudaStorage,
        cl: &Layout,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<()> {
        use candle_core::cuda_backend::cudarc::cublas::{sys::cublasOperation_t as Op, Gemm, GemmConfig};
        let ((n, m), (an, k)) = (rows_of(cl), rows_of(al));
        let (bm, bk) = if self.b_transposed { rows_of(bl) } else { (rows_of(bl).1, rows_of(bl).0) };
        if an != n || bm != m || bk != k {
            return Err(disagree(self.name(), &[cl.shape(), al.shape(), bl.shape()]));
        }
        let blas = c.device().cublas_handle();
        let (av, bv) = (view::<bf16>(a, al, "a")?, view::<bf16>(b, bl, "b")?);
        let mut cv = view_mut::<bf16>(c, cl, "c")?;
        // Row-major c (N, M) is column-major c^T (M, N) = op(b) a^T: cuBLAS's first operand is b.
        let (m, n, k) = (m as i32, n as i32, k as i32);
        let cfg = GemmConfig {
            transa: if self.b_transposed { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N },
            transb: Op::CUBLAS_OP_N,
            m,
            n,
            k,
            alpha: bf16::ONE,
            lda: if self.b_transposed { k } else { m },
            ldb: k,
            beta: bf16::ONE,
            ldc: m,
        };
        // Safety: the three views hold exactly the (M, K) or (K, M), (N, K) and (N, M) elements
        // the configuration reads and writes.
        unsafe { blas.gemm(cfg, &bv, &av, &mut cv) }.w()?;
        Ok(())
    }
}

/// `acc = alpha * x^T y + beta * acc` for x (N, M) and y (N, P) in bf16 and acc (M, P) in f32,
/// all contiguous on the GPU: an adapter's weight gradient as one cuBLAS product, scaled and
/// summed over micro-batches in f32 where it is written. A bf16 product followed by a scaling,
/// a cast to f32 and an addition would be four launches and three more passes per variable.
/// With `beta` 0, acc's old content is not read. `acc` changes in place (see [`add_matmul`]).
pub fn grad_product(acc: &Tensor, x: &Tensor, y: &Tensor, alpha: f32, beta: f32) -> Result<()> {
    acc.inplace_op3(&x.contiguous()?, &y.contiguous()?, &GradProduct { alpha, beta })
}

struct GradProduct {
    alpha: f32,
    beta: f32,
}

impl candle_core::InplaceOp3 for GradProduct {
    fn name(&self) -> &'static str {
        "grad-product"
    }

    gpu_only!(inplace 3);

    fn cuda_fwd(
        &self,
        acc: &mut CudaStorage,
        accl: &Layout,
        x: &CudaStorage,
        xl: &Layout,
        y: &CudaStorage,
        yl: &Layout,
    ) -> Result<()> {
        use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
        use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
        let ((n, m), (yn, p), (am, ap)) = (rows_of(xl), rows_of(yl), rows_of(accl));
        if yn != n || am != m || ap != p {
            return Err(disagree(self.name(), &[accl.shape(), xl.shape(), yl.shape()]));
        }
        let dev = x.device().clone();
        let (blas, stream) = (dev.cublas_handle(), dev.cuda_stream());
        let (xv, yv) = (view::<bf16>(x, xl, "x")?, view::<bf16>(y, yl, "y")?);
        let mut av = view_mut::<f32>(acc, accl, "the gradient")?;
        let ((xp, _rx), (yp, _ry), (ap_, _ra)) =
            (xv.device_ptr(&stream), yv.device_ptr(&stream), av.device_ptr_mut(&stream));
        // Row-major acc (M, P) is column-major acc^T (P, M) = y^T x, where row-major y (N, P) is
        // column-major (P, N) and row-major x (N, M) column-major (M, N), taken transposed.
        let (m, n, p) = (m as i32, n as i32, p as i32);
        // Safety: the views hold exactly the (N, M), (N, P) and (M, P) elements the product
        // reads and writes; alpha and beta are host values read during the call.
        unsafe {
            gemm_ex(
                *blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_N,
                sys::cublasOperation_t::CUBLAS_OP_T,
                p,
                m,
                n,
                (&self.alpha) as *const f32 as *const _,
                yp as *const _,
                sys::cudaDataType_t::CUDA_R_16BF,
                p,
                xp as *const _,
                sys::cudaDataType_t::CUDA_R_16BF,
                m,
                (&self.beta) as *const f32 as *const _,
                ap_ as *mut _,
                sys::cudaDataType_t::CUDA_R_32F,
                p,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .w()?;
        Ok(())
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

/// AdamW's hyperparameters for one step, the bias corrections 1 - beta^t included.
pub struct AdamStep {
    pub clip: f64,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub bias_correction1: f64,
    pub bias_correction2: f64,
}

/// One AdamW step of many f32 variables on the GPU in one launch, in place: each value `ps[i]`,
/// its moments `mvs[i]` stacked (2, ...its shape) and its gradient `gs[i]`, all contiguous.
/// Why one launch: an adapter has hundreds of small variables, and a launch for each would leave
/// the GPU waiting on the host to issue them.
pub fn adamw_many(ps: &[&Tensor], mvs: &[&Tensor], gs: &[&Tensor], hyper: &AdamStep) -> Result<()> {
    let Some(first) = ps.first() else { return Ok(()) };
    if mvs.len() != ps.len() || gs.len() != ps.len() {
        candle_core::bail!("adamw: {} values, {} moments, {} gradients", ps.len(), mvs.len(), gs.len());
    }
    let dev = cuda_device(first)?;
    let mut table = Vec::with_capacity(4 * ps.len());
    for ((p, mv), g) in ps.iter().zip(mvs).zip(gs) {
        let n = p.elem_count();
        if mv.elem_count() != 2 * n || g.elem_count() != n {
            return Err(disagree("adamw", &[p.shape(), mv.shape(), g.shape()]));
        }
        table.extend([address(p, "adamw")?, address(mv, "adamw")?, address(g, "adamw")?, n as u64]);
    }
    let table = dev.clone_htod(&table)?;
    let h = hyper;
    let f = [h.clip, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.bias_correction1, h.bias_correction2]
        .map(|x| x as f32);
    let cfg = LaunchConfig { grid_dim: (ADAMW_BLOCKS, ps.len() as u32, 1), ..launch_rows(1) };
    launch!(dev, "adamw_many_f32", cfg, &table, &f[0], &f[1], &f[2], &f[3], &f[4], &f[5], &f[6], &f[7]);
    Ok(())
}

/// Blocks per variable of the AdamW kernel (each strides over its variable).
const ADAMW_BLOCKS: u32 = 32;

/// `plus` + RMSNorm's input gradient for bf16 x, g and plus (rows, D) and weight (D), in one pass:
/// a residual stream's gradient where the norm branches off it.
pub fn rms_norm_backward_plus(x: &Tensor, g: &Tensor, weight: &Tensor, plus: &Tensor, eps: f64) -> Result<Tensor> {
    let (x, g, weight, plus) = (x.contiguous()?, g.contiguous()?, weight.contiguous()?, plus.contiguous()?);
    let (rows, d) = rows_of(x.layout());
    if g.shape() != x.shape() || plus.shape() != x.shape() || weight.elem_count() != d {
        return Err(disagree("rms-norm-backward", &[x.shape(), g.shape(), plus.shape(), weight.shape()]));
    }
    let dev = cuda_device(&x)?;
    let out = unsafe { dev.alloc::<bf16>(rows * d)? };
    {
        let ((xs, xl), (gs, gl)) = (x.storage_and_layout(), g.storage_and_layout());
        let ((ws, wl), (ps, pl)) = (weight.storage_and_layout(), plus.storage_and_layout());
        let (xv, gv) = (bf16_view(&xs, xl, "x")?, bf16_view(&gs, gl, "grad")?);
        let (wv, pv) = (bf16_view(&ws, wl, "weight")?, bf16_view(&ps, pl, "plus")?);
        let (d32, eps) = (d as i32, eps as f32);
        let name = rms_norm_backward_kernel(d, &[xl, gl, wl, pl]);
        launch!(dev, name, launch_rows(rows), &xv, &gv, &wv, &pv, &out, &d32, &eps);
    }
    Ok(wrap(out, &dev, x.shape().clone()))
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

fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(dev) => Ok(dev.clone()),
        _ => candle_core::bail!("a GPU kernel, called on the CPU"),
    }
}

fn bf16_view<'a>(s: &'a candle_core::Storage, l: &Layout, what: &str) -> Result<CudaView<'a, bf16>> {
    match s {
        candle_core::Storage::Cuda(c) => view::<bf16>(c, l, what),
        _ => candle_core::bail!("{what}: not on the GPU"),
    }
}

fn f32_view<'a>(s: &'a candle_core::Storage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
    match s {
        candle_core::Storage::Cuda(c) => view::<f32>(c, l, what),
        _ => candle_core::bail!("{what}: not on the GPU"),
    }
}

/// A freshly written GPU buffer as an untracked tensor.
fn wrap<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice, shape: Shape) -> Tensor {
    let storage = candle_core::Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape, candle_core::op::BackpropOp::none(), false)
}
