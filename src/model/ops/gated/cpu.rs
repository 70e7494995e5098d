//! SwiGLU's product and its gradients on the CPU for contiguous, untracked f32 tensors: one pass
//! each way over candle's thread pool. candle's CPU silu calls libm's exp per element on one
//! thread and its product is a second pass; here the exp is a polynomial the compiler vectorises.

use candle_core::{Result, Tensor};

use crate::model::cpu::{cpu_slice, exp, filled_on_pool, filled_pair_on_pool, on_cpu_f32, vectorised};

/// Elements per task on the pool: large enough that a task outweighs its scheduling.
const CHUNK: usize = 1 << 14;

/// Whether these tensors take the CPU kernels: f32 on the CPU, one shape, none tracked by autograd
/// (the kernels' results carry no gradient).
fn applies(tensors: &[&Tensor]) -> bool {
    on_cpu_f32(tensors) && tensors.iter().all(|t| t.shape() == tensors[0].shape() && !t.track_op())
}

/// silu(gate) * up, or None where [`applies`] does not hold.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    if !applies(&[gate, up]) {
        return Ok(None);
    }
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let mut h = Vec::new();
    with_slices(&[&gate, &up], |s| {
        let (g, u) = (s[0], s[1]);
        h = filled_on_pool(g.len(), CHUNK, |at, out| {
            silu_mul_into(out, &g[at..at + out.len()], &u[at..at + out.len()])
        });
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
    let (mut dg, mut du) = (Vec::new(), Vec::new());
    with_slices(&[&gate, &up, &dh], |s| {
        let (g, u, d) = (s[0], s[1], s[2]);
        (dg, du) = filled_pair_on_pool(n, CHUNK, |at, dg, du| {
            let range = at..at + dg.len();
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
    let slices = guards.iter().map(|(s, l)| cpu_slice(s, l, "gated-cpu input")).collect::<Result<Vec<_>>>()?;
    f(&slices);
    Ok(())
}

#[inline(always)]
fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + exp(-g))
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
    fn swiglu_and_its_gradients_on_the_pool_equal_candles_composite() -> Result<()> {
        // More elements than one chunk, and an odd count.
        let n = 3 * CHUNK + 77;
        let values = |seed: f32| (0..n).map(|i| (i as f32 * seed).sin() * 9.0).collect::<Vec<f32>>();
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
