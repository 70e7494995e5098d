//! The GPU launchers of the gated MLP's product and its gradients.

use crate::model::config::Activation;
use crate::model::cuda::prelude::*;

/// act(gate) * up for bf16 tensors of one shape, with its backward rule.
pub fn gated_mul(activation: Activation, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, GatedMul(activation))
}

/// The kernels' number for an activation (gated.cu's ACT_*).
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
