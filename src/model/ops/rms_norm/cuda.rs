//! The GPU launchers of RMSNorm and its input gradient.

use crate::model::cuda::prelude::*;

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

/// The residual stream and the norm that reads it, in one pass: for bf16 x, h (rows, D) and
/// weight (D), `(x + h, RMSNorm(x + h))`, the sum rounded to bf16 before it is normed, as the
/// separate addition rounds it. D as [`rms_norm_fits`] takes it.
pub fn add_rms_norm(x: &Tensor, h: &Tensor, weight: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let (x, h, weight) = (x.contiguous()?, h.contiguous()?, weight.contiguous()?);
    let (rows, d) = rows_of(x.layout());
    if h.shape() != x.shape() || weight.elem_count() != d || !rms_norm_fits(d) {
        return Err(disagree("add-rms-norm", &[x.shape(), h.shape(), weight.shape()]));
    }
    if !packed8(d, &[x.layout(), h.layout(), weight.layout()]) {
        // A view that starts off the 16-byte grid: the two passes.
        let sum = (&x + &h)?;
        let normed = rms_norm(&sum, &weight, eps)?;
        return Ok((sum, normed));
    }
    let dev = cuda_device(&x)?;
    let sum = unsafe { dev.alloc::<bf16>(rows * d)? };
    let out = unsafe { dev.alloc::<bf16>(rows * d)? };
    {
        let ((xs, xl), (hs, hl), (ws, wl)) =
            (x.storage_and_layout(), h.storage_and_layout(), weight.storage_and_layout());
        let (xv, hv, wv) = (bf16_view(&xs, xl, "x")?, bf16_view(&hs, hl, "h")?, bf16_view(&ws, wl, "weight")?);
        let (d32, eps) = (d as i32, eps as f32);
        launch!(dev, "add_rms_norm_bf16", launch_rows(rows), &xv, &hv, &wv, &sum, &out, &d32, &eps);
    }
    Ok((wrap(sum, &dev, x.shape().clone()), wrap(out, &dev, x.shape().clone())))
}
