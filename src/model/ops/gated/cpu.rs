//! SwiGLU's product and its gradients on the CPU for contiguous, untracked f32 tensors: one pass
//! each way over candle's thread pool. candle's CPU silu calls libm's exp per element on one
//! thread and its product is a second pass; here the exp is a polynomial the compiler vectorises.

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};

use std::sync::Mutex;

use crate::model::cpu::{chunks_on_pool, map_on_pool};

/// Elements per task on the pool: large enough that a task outweighs its scheduling.
const CHUNK: usize = 1 << 14;

/// Whether these tensors take the CPU kernels: f32 on the CPU, one shape, none tracked by autograd
/// (the kernels' results carry no gradient).
fn applies(tensors: &[&Tensor]) -> bool {
    let first = tensors[0];
    tensors
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.shape() == first.shape() && !t.track_op())
}

/// silu(gate) * up, or None where [`applies`] does not hold.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    if !applies(&[gate, up]) {
        return Ok(None);
    }
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let mut h = vec![0f32; gate.elem_count()];
    with_slices(&[&gate, &up], |s| {
        let (g, u) = (s[0], s[1]);
        chunks_on_pool(&mut h, CHUNK, |at, out| silu_mul_into(out, &g[at..at + out.len()], &u[at..at + out.len()]));
    })?;
    Tensor::from_vec(h, gate.shape(), gate.device()).map(Some)
}

/// (dgate, dup) from dh, the gradient of silu(gate) * up, or None where [`applies`] does not hold:
/// dgate = dh * up * sig(g) * (1 + g * (1 - sig(g))), dup = dh * silu(g).
pub fn silu_mul_backward(gate: &Tensor, up: &Tensor, dh: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
    if !applies(&[gate, up, dh]) {
        return Ok(None);
    }
    let (gate, up, dh) = (gate.contiguous()?, up.contiguous()?, dh.contiguous()?);
    let n = gate.elem_count();
    let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
    with_slices(&[&gate, &up, &dh], |s| {
        let (g, u, d) = (s[0], s[1], s[2]);
        let parts: Vec<Mutex<(&mut [f32], &mut [f32])>> =
            dg.chunks_mut(CHUNK).zip(du.chunks_mut(CHUNK)).map(Mutex::new).collect();
        map_on_pool(parts.len(), |c| {
            let mut part = parts[c].lock().unwrap_or_else(|e| e.into_inner());
            let (dg, du) = &mut *part;
            let range = c * CHUNK..c * CHUNK + dg.len();
            silu_mul_grads_into(dg, du, &g[range.clone()], &u[range.clone()], &d[range]);
        });
    })?;
    let (dg, du) =
        (Tensor::from_vec(dg, gate.shape(), gate.device())?, Tensor::from_vec(du, gate.shape(), gate.device())?);
    Ok(Some((dg, du)))
}

/// f over the contiguous f32 slices of these tensors.
fn with_slices(tensors: &[&Tensor], f: impl FnOnce(&[&[f32]])) -> Result<()> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        match (&**storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => slices.push(&v[a..b]),
            _ => candle_core::bail!("gated-cpu: a contiguous f32 tensor on the CPU expected"),
        }
    }
    f(&slices);
    Ok(())
}

/// exp(x) within 2 ulp for |x| < 87, with a polynomial and no branches (Cephes' expf): x =
/// n ln2 + r, |r| <= ln2 / 2, e^x = 2^n e^r. NaN stays NaN; beyond +-87 it saturates.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Adding 1.5 * 2^23 rounds to an integer held in the low bits of the sum's mantissa.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 87.0); // NaN stays NaN
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    let scale = f32::from_bits(((t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23) as u32);
    e_r * scale
}

#[inline(always)]
fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + exp(-g))
}

/// The loops, compiled for the widest vectors the CPU has.
macro_rules! vectorised {
    ($name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $body
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $body
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // Safety: the CPU has the feature.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // Safety: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body
        }
    };
}

vectorised!(silu_mul_into(out: &mut [f32], g: &[f32], u: &[f32]) {
    for ((h, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *h = g * sigmoid(g) * u;
    }
});

vectorised!(silu_mul_grads_into(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], d: &[f32]) {
    for ((((dg, du), &g), &u), &d) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(d) {
        let sig = sigmoid(g);
        *dg = d * u * sig * (1.0 + g * (1.0 - sig));
        *du = d * g * sig;
    }
});

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_polynomial_exp_is_within_two_ulp_of_libms_and_keeps_nan() {
        let mut worst = 0f32;
        for i in -870_000..870_000 {
            let x = i as f32 * 1e-4;
            let (got, want) = (exp(x), x.exp());
            worst = worst.max((got - want).abs() / (want * f32::EPSILON));
        }
        assert!(worst <= 2.0, "{worst} ulp");
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1e9) > 0.0 && exp(1e9).is_finite());
    }

    #[test]
    fn swiglu_and_its_gradients_on_the_pool_equal_candles_composite() -> Result<()> {
        // More elements than one chunk, and an odd count.
        let n = 3 * CHUNK + 77;
        let values = |seed: f32| (0..n).map(|i| ((i as f32 * seed).sin() * 9.0)).collect::<Vec<f32>>();
        let g = Tensor::from_vec(values(0.37), n, &Device::Cpu)?;
        let u = Tensor::from_vec(values(0.11), n, &Device::Cpu)?;
        let d = Tensor::from_vec(values(0.53), n, &Device::Cpu)?;
        let close = |a: &Tensor, b: &Tensor| -> Result<f32> {
            let scale = b.abs()?.max(0)?.to_scalar::<f32>()?;
            Ok((a - b)?.abs()?.max(0)?.to_scalar::<f32>()? / scale)
        };
        let h = silu_mul(&g, &u)?.expect("applies");
        assert!(close(&h, &(g.silu()? * &u)?)? < 1e-6);
        let (dg, du) = silu_mul_backward(&g, &u, &d)?.expect("applies");
        let sig = candle_nn::ops::sigmoid(&g)?;
        let want_dg = ((&d * &u)? * (&sig * ((&g * (1.0 - &sig)?)? + 1.0)?)?)?;
        let want_du = (&d * (&g * &sig)?)?;
        assert!(close(&dg, &want_dg)? < 1e-6, "dgate");
        assert!(close(&du, &want_du)? < 1e-6, "dup");
        // A tracked input keeps the composite, whose gradient flows.
        let var = candle_core::Var::from_tensor(&g)?;
        assert!(silu_mul(var.as_tensor(), &u)?.is_none());
        Ok(())
    }
}
