//! GeGLU's product gelu(gate) * up with GELU's tanh approximation (Gemma's
//! "gelu_pytorch_tanh"), and its gradients.

use candle_core::{DType, Result, Tensor};

#[cfg(feature = "cuda")]
use super::super::fused;

/// sqrt(2 / pi) and the cubic term's coefficient of the tanh approximation.
const C: f64 = 0.797_884_560_802_865_4;
const A: f64 = 0.044_715;

/// gelu(gate) * up, gelu(x) = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): candle's `gelu` is
/// this approximation (its `gelu_erf` the exact one), differentiable in both; one fused kernel
/// each way on the GPU in bf16.
pub fn gelu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(gate) {
        return super::cuda::gated_mul(crate::model::config::Activation::GeluTanh, gate, up);
    }
    gate.gelu()? * up
}

/// The gradients of gate and up from that of gelu(gate) * up, for untracked tensors of one shape:
/// dgate = dh * up * gelu'(g), dup = dh * gelu(g), with
/// gelu'(g) = (1 + tanh u) / 2 + g (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 g^2) / 2.
/// Computed in f32 at least (bf16 intermediates would round each of the dozen steps).
pub fn gelu_mul_backward(gate: &Tensor, up: &Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if fused(gate) {
        return super::cuda::gated_mul_backward(crate::model::config::Activation::GeluTanh, gate, up, dh);
    }
    let dtype = gate.dtype();
    let wide = |t: &Tensor| if dtype == DType::F64 { Ok(t.clone()) } else { t.to_dtype(DType::F32) };
    let (g, u, d) = (wide(gate)?, wide(up)?, wide(dh)?);
    let g2 = g.sqr()?;
    let th = ((&g + (&g * &g2)? * A)? * C)?.tanh()?; // tanh u
    let half_one_plus = ((&th + 1.0)? * 0.5)?;
    let slope = (((th.sqr()?.neg()? + 1.0)? * ((&g2 * (3.0 * A))? + 1.0)?)? * (0.5 * C))?;
    let dgelu = (&half_one_plus + (&g * slope)?)?;
    let gelu = (&g * half_one_plus)?;
    let dgate = ((&d * &u)? * dgelu)?.to_dtype(dtype)?;
    let dup = (d * gelu)?.to_dtype(dtype)?;
    Ok((dgate, dup))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Against autograd through the formula written out in elementary ops (candle's own `gelu`
    /// backward rounds its constants to f32).
    #[test]
    fn the_gelu_products_gradients_are_those_of_its_formula() -> Result<()> {
        let dev = Device::Cpu;
        let g = Var::from_tensor(&(Tensor::randn(0f64, 1.5, (3, 7), &dev)?))?;
        let u = Var::from_tensor(&Tensor::randn(0f64, 1., (3, 7), &dev)?)?;
        let w = Tensor::randn(0f64, 1., (3, 7), &dev)?;
        let x = g.as_tensor();
        let inner = ((x + (x.sqr()? * x)? * A)? * C)?;
        let formula = ((x * 0.5)? * (inner.tanh()? + 1.0)?)?;
        let value = gelu_mul(x, u.as_tensor())?;
        let d = (&value - (&formula * u.as_tensor())?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        assert!(d < 1e-6, "candle's gelu is the tanh approximation: differs by {d}");
        let grads = ((formula * u.as_tensor())? * &w)?.sum_all()?.backward()?;
        let (dg, du) = gelu_mul_backward(g.as_tensor(), u.as_tensor(), &w)?;
        for (name, ours, theirs) in [("gate", dg, grads.get(g.as_tensor())), ("up", du, grads.get(u.as_tensor()))] {
            let diff = (ours - theirs.unwrap())?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "d{name} differs by {diff}");
        }
        Ok(())
    }
}
