//! The optimizer step's kernels: on the GPU the global gradient norm and torch's AdamW over every
//! adapter variable, one launch each; on the CPU AdamW in one pass per variable.

#[cfg(feature = "cuda")]
pub mod cuda;

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

/// One AdamW step of an f32 variable on the CPU, in place: its value `p` (a contiguous tensor),
/// its moments `mv` (m then v, each of p's length) and its gradient `g`. The f32 operations, and
/// their order, of the composite ops of the other devices (candle's `tensor * x` for a scalar x
/// multiplies by x as f32, `tensor / x` by 1 / x as f32), with g scaled by `clip` first:
/// p <- p (1 - lr wd); m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2;
/// p <- p - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
pub fn adamw_cpu(
    p: &candle_core::Tensor,
    mv: &mut [f32],
    g: &candle_core::Tensor,
    h: &AdamStep,
) -> candle_core::Result<()> {
    let op = AdamCpu { mv: std::sync::Mutex::new(mv), h };
    p.inplace_op2(&g.contiguous()?, &op)
}

struct AdamCpu<'a> {
    mv: std::sync::Mutex<&'a mut [f32]>,
    h: &'a AdamStep,
}

impl candle_core::InplaceOp2 for AdamCpu<'_> {
    fn name(&self) -> &'static str {
        "adamw-cpu"
    }

    fn cpu_fwd(
        &self,
        p: &mut candle_core::CpuStorage,
        pl: &candle_core::Layout,
        g: &candle_core::CpuStorage,
        gl: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage::F32;
        let (F32(p), F32(g), Some((p0, p1)), Some((g0, g1))) = (p, g, pl.contiguous_offsets(), gl.contiguous_offsets())
        else {
            candle_core::bail!("adamw-cpu: contiguous f32 value and gradient expected")
        };
        let (p, g) = (&mut p[p0..p1], &g[g0..g1]);
        let mut mv = self.mv.lock().unwrap_or_else(|e| e.into_inner());
        let n = p.len();
        if g.len() != n || mv.len() != 2 * n {
            candle_core::bail!("adamw-cpu: value of {n}, gradient of {}, moments of {}", g.len(), mv.len());
        }
        let (m, v) = mv.split_at_mut(n);
        let h = self.h;
        let f = |x: f64| x as f32;
        let (clip, b1, one_b1, b2, one_b2) = (f(h.clip), f(h.beta1), f(1.0 - h.beta1), f(h.beta2), f(1.0 - h.beta2));
        let (decay, inv_sqrt_bc2, eps, step) = (
            f(1.0 - h.lr * h.weight_decay),
            f(1.0 / h.bias_correction2.sqrt()),
            f(h.eps),
            f(h.lr / h.bias_correction1),
        );
        for i in 0..n {
            let gi = if h.clip < 1.0 { g[i] * clip } else { g[i] };
            m[i] = m[i] * b1 + gi * one_b1;
            v[i] = v[i] * b2 + gi * gi * one_b2;
            let denom = v[i].sqrt() * inv_sqrt_bc2 + eps;
            p[i] = p[i] * decay - m[i] / denom * step;
        }
        Ok(())
    }
}
