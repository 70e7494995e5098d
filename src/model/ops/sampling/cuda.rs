//! The GPU launcher of the sampler's cuts and Gumbel-max draws.

use crate::model::cuda::prelude::*;

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
