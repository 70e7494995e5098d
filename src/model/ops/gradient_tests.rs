//! The backward rules of softmax, RMSNorm and rope against candle's autograd of the composite ops.

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
