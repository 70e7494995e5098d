//! Where the adapter's gradients go when a backward rule computes them itself (the adapted
//! projections of [`super::lora`], checkpointed layers of [`super::checkpoint`]) rather than
//! candle's graph: the trainer takes them from here after each backward pass. It also keeps the
//! adapter's weights as those rules multiply them, for the rest of an optimizer step.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor, TensorId, Var};

use super::lora::Staged;

/// Gradients of variables computed outside the main backward pass, summed per variable.
#[derive(Default)]
pub struct GradSink {
    grads: Mutex<HashMap<TensorId, Tensor>>,
    /// Per adapter pair (keyed by its B): its weights in the activations' dtype, made once per
    /// optimizer step for all its micro-batches (and a checkpointed layer's second run).
    staged: Mutex<HashMap<TensorId, Staged>>,
    /// Per group of pairs that share their input (keyed by the first one's A): their staged A's
    /// stacked, (sum r, in), made once per optimizer step.
    stacked: Mutex<HashMap<TensorId, Tensor>>,
}

fn poisoned<T>(_: T) -> candle_core::Error {
    candle_core::Error::Msg("gradient sink poisoned".into())
}

impl GradSink {
    pub fn new() -> Arc<GradSink> {
        Arc::new(GradSink::default())
    }

    pub(crate) fn add(&self, id: TensorId, grad: Tensor) -> Result<()> {
        let mut map = self.grads.lock().map_err(poisoned)?;
        let sum = match map.remove(&id) {
            Some(g) => (g + grad)?,
            None => grad,
        };
        map.insert(id, sum);
        Ok(())
    }

    /// Adds `alpha * x^T y` (x (N, M), y (N, P)) to the gradient of `var` (M, P). On the GPU in
    /// bf16 the product is written into the f32 sum itself ([`super::ops::linear::cuda::grad_product`]).
    pub(crate) fn add_product(&self, var: &Var, x: &Tensor, y: &Tensor, alpha: f64) -> Result<()> {
        #[cfg(feature = "cuda")]
        if super::cuda::applies(x) && var.dtype() == candle_core::DType::F32 {
            let mut map = self.grads.lock().map_err(poisoned)?;
            let id = var.as_tensor().id();
            let (acc, beta) = match map.remove(&id) {
                Some(g) => (g, 1.0),
                // Safety: beta 0 below: the product writes every element without reading them.
                None => (unsafe { Tensor::empty(var.shape(), var.dtype(), var.device())? }, 0.0),
            };
            super::ops::linear::cuda::grad_product(&acc, x, y, alpha as f32, beta)?;
            map.insert(id, acc);
            return Ok(());
        }
        if super::ops::linear::cpu::applies(&[x, y]) && var.dtype() == candle_core::DType::F32 {
            let mut map = self.grads.lock().map_err(poisoned)?;
            let id = var.as_tensor().id();
            // The sum is this sink's alone (a fresh one where there is none yet).
            let acc = match map.remove(&id) {
                Some(g) if g.is_contiguous() => g,
                Some(g) => g.contiguous()?,
                None => Tensor::zeros(var.shape(), var.dtype(), var.device())?,
            };
            super::ops::linear::cpu::add_transposed_product(&acc, x, y, alpha as f32)?;
            map.insert(id, acc);
            return Ok(());
        }
        let product = (x.t()?.matmul(y)? * alpha)?;
        self.add(var.as_tensor().id(), product.to_dtype(var.dtype())?)
    }

    /// The staged weights of the pair whose B is `b`, made by `make` the first time in a step.
    pub(crate) fn staged(&self, b: &Var, make: impl FnOnce() -> Result<Staged>) -> Result<Staged> {
        once_per_step(&self.staged, b, make)
    }

    /// The stacked A's of the group whose first A is `a`, made by `make` the first time in a step.
    pub(crate) fn stacked(&self, a: &Var, make: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
        once_per_step(&self.stacked, a, make)
    }

    /// Forgets the staged weights: the trainer calls it when the variables change.
    pub fn new_step(&self) {
        if let Ok(mut staged) = self.staged.lock() {
            staged.clear();
        }
        if let Ok(mut stacked) = self.stacked.lock() {
            stacked.clear();
        }
    }

    /// Removes and returns the gradient collected for `var`, if any.
    pub fn take(&self, var: &Var) -> Option<Tensor> {
        self.grads.lock().ok()?.remove(&var.as_tensor().id())
    }
}

/// The value kept in `map` for `var`, made by `make` (outside the lock) where there is none.
fn once_per_step<T: Clone>(
    map: &Mutex<HashMap<TensorId, T>>,
    var: &Var,
    make: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let id = var.as_tensor().id();
    if let Some(value) = map.lock().map_err(poisoned)?.get(&id) {
        return Ok(value.clone());
    }
    let value = make()?;
    map.lock().map_err(poisoned)?.insert(id, value.clone());
    Ok(value)
}
