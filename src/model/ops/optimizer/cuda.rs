//! The GPU launchers of the optimizer step: the gradient norm and AdamW over many variables.

use super::AdamStep;
use crate::model::cuda::prelude::*;

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

/// Blocks of the sum-squares kernel: partial sums per tensor (SUM_SQUARES_PARTS in optimizer.cu).
const SUM_SQUARES_PARTS: usize = 32;

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
