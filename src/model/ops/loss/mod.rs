//! Cross-entropy through the frozen output head, a chunk of rows at a time.

use std::sync::Arc;

use candle_core::{Result, Tensor};

#[cfg(feature = "cuda")]
use super::fused;
use super::{attach, Backward};
use crate::model::packed::PackedMatrix;

#[cfg(feature = "cuda")]
pub mod cuda;

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
/// `softcap` c: the logits are `c * tanh(h W^T / c)` (Gemma 2), whose derivative
/// 1 - tanh^2 then scales the logits' gradient.
pub fn linear_cross_entropy(
    h: &Tensor,
    weight: &Tensor,
    packed: Option<&Arc<PackedMatrix>>,
    targets: &[u32],
    chunk: usize,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let n = h.dim(0)?;
    if targets.len() != n {
        candle_core::bail!("linear-cross-entropy: {} targets for {n} rows", targets.len());
    }
    let (weight, h_detached) = (weight.detach(), h.detach());
    let chunk = chunk.max(1);
    let with_grad = h.track_op();
    if let Some(packed) = packed.filter(|_| h.device().is_cpu() && h.dtype() == candle_core::DType::F32) {
        return packed_cross_entropy(h, &h_detached, packed, targets, chunk, softcap);
    }
    let targets = Tensor::from_slice(targets, (n, 1), h.device())?;
    #[cfg(feature = "cuda")]
    if fused(h) {
        return fused_cross_entropy(h, &h_detached, &weight, &targets, chunk, softcap);
    }
    let mut dh = Vec::new();
    let sums = by_chunks(n, chunk, |start, rows| {
        let (logp, tanh) = chunk_log_softmax(&h_detached.narrow(0, start, rows)?, &weight, softcap)?;
        let targets = targets.narrow(0, start, rows)?;
        let nll = logp.gather(&targets, 1)?.neg()?.sum_all()?;
        if with_grad {
            // d nll / d logits = softmax - onehot(target); dh = dlogits @ W
            let ones = Tensor::ones((rows, 1), logp.dtype(), logp.device())?;
            let dlogits = logp.exp()?.scatter_add(&targets, &ones.neg()?, 1)?;
            let dlogits = match tanh {
                Some(tanh) => (dlogits * (tanh.sqr()?.neg()? + 1.0)?)?,
                None => dlogits,
            };
            dh.push(dlogits.to_dtype(h.dtype())?.matmul(&weight.to_dtype(h.dtype())?)?);
        }
        Ok(nll)
    })?;
    attach_gradient(h, total_of(&sums, loss_dtype(h.dtype()), h.device())?, dh)
}

/// The CPU's f32 path: per chunk of rows, the logits by the packed weight, then one pass per row
/// (rows in parallel) that gives the row's loss and turns its logits into their gradient in
/// place, with one exponential per logit, and the gradient's product through the packed
/// transpose. h (N, D) -> a scalar.
fn packed_cross_entropy(
    h: &Tensor,
    h_detached: &Tensor,
    packed: &Arc<PackedMatrix>,
    targets: &[u32],
    chunk: usize,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (n, v) = (h.dim(0)?, packed.n());
    let with_grad = h.track_op();
    let mut total = 0f64;
    let mut dh = Vec::new();
    for start in (0..n).step_by(chunk) {
        let rows = chunk.min(n - start);
        let x = h_detached.narrow(0, start, rows)?.flatten_all()?.to_vec1::<f32>()?;
        let mut logits = packed.matmul(&x, rows); // (rows, V)
        let cap = softcap.map(|c| c as f32);
        let chunk_targets = &targets[start..start + rows];
        let losses = crate::model::cpu::chunks_on_pool(&mut logits, v, |first, row| {
            row_loss(row, chunk_targets[first / v] as usize, cap, with_grad)
        });
        total += losses.iter().sum::<f64>();
        if with_grad {
            let dlogits = Tensor::from_vec(logits, (rows, v), h.device())?;
            dh.push(crate::model::cpu::linear_packed(&dlogits, &packed.transposed())?);
        }
    }
    attach_gradient(h, Tensor::new(total as f32, h.device())?, dh)
}

/// One row's cross-entropy `lse(cap(x)) - cap(x)[target]`; with `grad`, the row becomes the
/// gradient of its logits, (softmax - onehot(target)) times the cap's derivative.
fn row_loss(row: &mut [f32], target: usize, cap: Option<f32>, grad: bool) -> f64 {
    // The cap's derivative 1 - tanh^2 per logit, kept before the row is overwritten.
    let slopes: Option<Vec<f32>> = cap.map(|c| {
        row.iter_mut()
            .map(|x| {
                let t = (*x / c).tanh();
                *x = c * t;
                1.0 - t * t
            })
            .collect()
    });
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let at_target = row[target];
    crate::model::cpu::exp_shifted_in_place(row, max);
    let sum = crate::model::cpu::lane_sum(row);
    let loss = (max + sum.ln() - at_target) as f64;
    if grad {
        let inv = 1.0 / sum;
        for x in row.iter_mut() {
            *x *= inv;
        }
        row[target] -= 1.0;
        if let Some(slopes) = slopes {
            for (x, s) in row.iter_mut().zip(slopes) {
                *x *= s;
            }
        }
    }
    loss
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
            return cuda::scale_by(&self.dh, g);
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

/// log softmax(cap(h W^T)) of one chunk of rows: (rows, D) -> (rows, V) in the loss dtype, and
/// where capped tanh(h W^T / c), which the cap's derivative needs.
fn chunk_log_softmax(h: &Tensor, weight: &Tensor, softcap: Option<f64>) -> Result<(Tensor, Option<Tensor>)> {
    let logits = h.matmul(&weight.t()?)?.to_dtype(loss_dtype(h.dtype()))?;
    let (logits, tanh) = match softcap {
        Some(c) => {
            let tanh = (logits / c)?.tanh()?;
            ((&tanh * c)?, Some(tanh))
        }
        None => (logits, None),
    };
    Ok((candle_nn::ops::log_softmax(&logits, 1)?, tanh))
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
    softcap: Option<f64>,
) -> Result<Tensor> {
    let mut dh = Vec::new();
    let sums = by_chunks(h.dim(0)?, chunk, |start, rows| {
        let logits = h_detached.narrow(0, start, rows)?.matmul(&weight.t()?)?; // (rows, V) bf16
        let targets = targets.narrow(0, start, rows)?;
        let stats = if h.track_op() && cuda::cross_entropy_fused_fits(&logits) {
            // One kernel: the statistics, and the logits turned into their gradient in place.
            let stats = cuda::cross_entropy_fused(&logits, &targets, softcap)?;
            dh.push(logits.matmul(weight)?);
            stats
        } else {
            let stats = cuda::cross_entropy_forward(&logits, &targets, softcap)?; // (rows, 2): loss, lse
            if h.track_op() {
                let dlogits = cuda::cross_entropy_backward(&logits, &targets, &stats, softcap)?;
                dh.push(dlogits.matmul(weight)?);
            }
            stats
        };
        stats.narrow(1, 0, 1)?.sum_all()
    })?;
    attach_gradient(h, total_of(&sums, candle_core::DType::F32, h.device())?, dh)
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
        let chunked = linear_cross_entropy(h.as_tensor(), &w, None, &targets, 3, None)?;
        let (a, b) = (plain.to_scalar::<f64>()?, chunked.to_scalar::<f64>()?);
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        let ga = plain.backward()?.get(h.as_tensor()).unwrap().clone();
        let gb = (chunked * 2.0)?.backward()?.get(h.as_tensor()).unwrap().clone();
        let diff = ((ga * 2.0)? - gb)?.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "gradient differs by {diff}");
        Ok(())
    }

    #[test]
    fn capped_logits_give_the_loss_and_gradient_of_the_capped_composite() -> Result<()> {
        let dev = Device::Cpu;
        let (n, d, v, c) = (7, 5, 11, 1.5);
        let h = Var::from_tensor(&Tensor::randn(0f64, 1., (n, d), &dev)?)?;
        let w = Tensor::randn(0f64, 1., (v, d), &dev)?;
        let targets: Vec<u32> = vec![0, 3, 10, 4, 4, 9, 1];
        let plain = {
            let logits = ((h.as_tensor().matmul(&w.t()?)? / c)?.tanh()? * c)?;
            let logp = candle_nn::ops::log_softmax(&logits, 1)?;
            logp.gather(&Tensor::from_slice(&targets, (n, 1), &dev)?, 1)?.neg()?.sum_all()?
        };
        let chunked = linear_cross_entropy(h.as_tensor(), &w, None, &targets, 3, Some(c))?;
        let (a, b) = (plain.to_scalar::<f64>()?, chunked.to_scalar::<f64>()?);
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        let ga = plain.backward()?.get(h.as_tensor()).unwrap().clone();
        let gb = chunked.backward()?.get(h.as_tensor()).unwrap().clone();
        let diff = (ga - gb)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
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
        for softcap in [None, Some(2.0)] {
            let run = |p: Option<&Arc<PackedMatrix>>| -> Result<(f32, Tensor)> {
                let loss = linear_cross_entropy(h.as_tensor(), &w, p, &targets, 4, softcap)?;
                let g = loss.backward()?.get(h.as_tensor()).unwrap().clone();
                Ok((loss.to_scalar::<f32>()?, g))
            };
            let ((la, ga), (lb, gb)) = (run(None)?, run(Some(&packed))?);
            assert!((la - lb).abs() < 1e-4 * la.abs(), "cap {softcap:?}: loss {la} vs {lb}");
            let diff = (ga - gb)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "cap {softcap:?}: gradient differs by {diff}");
        }
        Ok(())
    }
}
