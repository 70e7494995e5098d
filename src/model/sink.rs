//! Where the adapter's gradients go when a backward rule computes them itself (the adapted
//! projections of [`super::lora`], checkpointed layers of [`super::checkpoint`]) rather than
//! candle's graph: the trainer takes them from here after each backward pass.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor, TensorId, Var};

/// Gradients of variables computed outside the main backward pass, summed per variable.
#[derive(Default)]
pub struct GradSink(Mutex<HashMap<TensorId, Tensor>>);

impl GradSink {
    pub fn new() -> Arc<GradSink> {
        Arc::new(GradSink::default())
    }

    pub(crate) fn add(&self, id: TensorId, grad: Tensor) -> Result<()> {
        let mut map = self.0.lock().map_err(|_| candle_core::Error::Msg("gradient sink poisoned".into()))?;
        let sum = match map.remove(&id) {
            Some(g) => (g + grad)?,
            None => grad,
        };
        map.insert(id, sum);
        Ok(())
    }

    /// Removes and returns the gradient collected for `var`, if any.
    pub fn take(&self, var: &Var) -> Option<Tensor> {
        self.0.lock().ok()?.remove(&var.as_tensor().id())
    }
}
