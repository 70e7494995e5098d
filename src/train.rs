//! Supervised fine-tuning of a LoRA adapter, with the semantics of transformers' `Trainer`.
//!
//! One optimizer step:
//! 1. take `gradient_accumulation_steps` micro-batches of `per_device_train_batch_size` rows
//!    (a seeded permutation of the data per epoch); run them in passes, each right-padded to
//!    its longest row (on the CPU the layers then skip the padding, with the same sums: see
//!    [`crate::model::lora`]): the micro-batches themselves, or where fewer passes hold the
//!    step's rows, those ([`passes`]);
//! 2. count the target tokens of the whole step, N; each pass's loss is its summed
//!    cross-entropy divided by N, so the accumulated gradient is the token mean over the step
//!    (transformers >= 4.46 `num_items_in_batch`), whichever rows share a pass; the logged loss
//!    is that mean;
//! 3. global L2 norm of the gradients (logged, before clipping), clip to `max_grad_norm`;
//! 4. AdamW (PyTorch's decoupled weight decay) at the scheduled learning rate.
//!
//! The schedule is `lr_at(step)`: linear / cosine / constant after `warmup_steps` (or
//! `ceil(warmup_ratio * total)`) of linear warmup from 0, so a warmed-up schedule's first
//! update has lr 0.
//!
//! Memory: the base weights are frozen through [`crate::model::ops::frozen_linear`] (no
//! weight-sized gradients), and logits are computed only at target positions.
//!
//! Shapes: B rows, T longest row, D hidden, N target tokens, V vocab.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::adapter::Adapter;
use crate::data::Example;
use crate::model::sink::GradSink;
use crate::model::{Decoder, Pass};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    Linear,
    Cosine,
    /// The learning rate throughout: warmup settings are ignored, as transformers' "constant".
    Constant,
    ConstantWithWarmup,
}

impl Schedule {
    /// transformers' name of the schedule.
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
            Schedule::Constant => "constant",
            Schedule::ConstantWithWarmup => "constant_with_warmup",
        }
    }

    pub fn from_name(s: &str) -> Option<Schedule> {
        match s {
            "linear" => Some(Schedule::Linear),
            "cosine" => Some(Schedule::Cosine),
            "constant" => Some(Schedule::Constant),
            "constant_with_warmup" => Some(Schedule::ConstantWithWarmup),
            _ => None,
        }
    }
}

/// Training settings, named as in `transformers.TrainingArguments`.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub max_steps: Option<usize>,
    pub num_train_epochs: f64,
    pub learning_rate: f64,
    pub lr_scheduler_type: Schedule,
    pub warmup_steps: Option<usize>,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// Seed of LoRA dropout.
    pub seed: u64,
    /// Seed of the data order.
    pub data_seed: u64,
    /// false: rows in file order (for comparisons with a sequential sampler).
    pub shuffle: bool,
    /// Keep only each layer's input and run the layer again in the backward pass: a third more
    /// compute for a fraction of the activation memory.
    pub gradient_checkpointing: bool,
    /// A step whose loss or gradient norm is not finite is skipped (the adapter unchanged, no
    /// log record) instead of stopping training with an error.
    pub skip_nonfinite_steps: bool,
    /// Most padded tokens (rows x the longest of them) one forward and backward pass holds; 0:
    /// `per_device_train_batch_size` x the longest example, what a micro-batch could hold. A
    /// step's rows run in as few passes as this allows (see [`passes`]): its gradient is the
    /// same sum, and fewer, fuller passes run faster on a GPU.
    pub tokens_per_pass: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            max_steps: None,
            num_train_epochs: 1.0,
            learning_rate: 5e-5,
            lr_scheduler_type: Schedule::Linear,
            warmup_steps: None,
            warmup_ratio: 0.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            per_device_train_batch_size: 8,
            gradient_accumulation_steps: 1,
            seed: 42,
            data_seed: 42,
            shuffle: true,
            gradient_checkpointing: false,
            skip_nonfinite_steps: false,
            tokens_per_pass: 0,
        }
    }
}

impl TrainConfig {
    /// Total optimizer steps for `rows` examples: `max_steps`, else epochs x steps per epoch
    /// (`ceil(ceil(rows / batch) / accumulation)`, as Trainer counts them).
    pub fn total_steps(&self, rows: usize) -> usize {
        if let Some(s) = self.max_steps {
            return s;
        }
        let batches = rows.div_ceil(self.per_device_train_batch_size);
        let per_epoch = batches.div_ceil(self.gradient_accumulation_steps).max(1);
        (self.num_train_epochs * per_epoch as f64).ceil() as usize
    }

    pub fn warmup(&self, total: usize) -> usize {
        self.warmup_steps.unwrap_or_else(|| (self.warmup_ratio * total as f64).ceil() as usize)
    }

    /// Learning rate used by optimizer step `step` (0-based) of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        if self.lr_scheduler_type == Schedule::Constant {
            return self.learning_rate;
        }
        let warmup = self.warmup(total);
        if step < warmup {
            return self.learning_rate * step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
        let factor = match self.lr_scheduler_type {
            Schedule::Linear => ((total - step) as f64 / (total - warmup).max(1) as f64).max(0.0),
            Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
            Schedule::Constant | Schedule::ConstantWithWarmup => 1.0,
        };
        self.learning_rate * factor
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let finite = |name: &str, v: f64| -> anyhow::Result<()> {
            anyhow::ensure!(v.is_finite(), "{name} must be a finite number (got {v})");
            Ok(())
        };
        for (name, v) in [
            ("learning_rate", self.learning_rate),
            ("num_train_epochs", self.num_train_epochs),
            ("warmup_ratio", self.warmup_ratio),
            ("weight_decay", self.weight_decay),
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
            ("adam_epsilon", self.adam_epsilon),
            ("max_grad_norm", self.max_grad_norm),
        ] {
            finite(name, v)?;
        }
        anyhow::ensure!(self.learning_rate >= 0.0, "learning_rate must be >= 0 (got {})", self.learning_rate);
        anyhow::ensure!(self.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1");
        anyhow::ensure!(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1");
        anyhow::ensure!(
            (0.0..1.0).contains(&self.warmup_ratio),
            "warmup_ratio must be in [0, 1) (got {})",
            self.warmup_ratio
        );
        anyhow::ensure!(self.max_steps != Some(0), "max_steps must be >= 1");
        anyhow::ensure!(self.num_train_epochs > 0.0, "num_train_epochs must be > 0");
        anyhow::ensure!(self.max_grad_norm >= 0.0, "max_grad_norm must be >= 0 (0 disables clipping)");
        anyhow::ensure!(self.weight_decay >= 0.0, "weight_decay must be >= 0 (got {})", self.weight_decay);
        anyhow::ensure!(
            (0.0..1.0).contains(&self.adam_beta1),
            "adam_beta1 must be in [0, 1) (got {})",
            self.adam_beta1
        );
        anyhow::ensure!(
            (0.0..1.0).contains(&self.adam_beta2),
            "adam_beta2 must be in [0, 1) (got {})",
            self.adam_beta2
        );
        anyhow::ensure!(self.adam_epsilon > 0.0, "adam_epsilon must be > 0 (got {})", self.adam_epsilon);
        Ok(())
    }

    /// The total steps for `rows` examples, refused past [`MAX_STEPS`] (a mistyped epoch count
    /// would otherwise run for ever).
    pub fn checked_total_steps(&self, rows: usize) -> anyhow::Result<usize> {
        let total = self.total_steps(rows);
        anyhow::ensure!(
            total <= MAX_STEPS,
            "{total} optimizer steps (num_train_epochs = {}, max_steps = {:?}, {rows} rows) is more than {MAX_STEPS}; \
             lower num_train_epochs or max_steps",
            self.num_train_epochs,
            self.max_steps
        );
        Ok(total)
    }
}

/// More optimizer steps than any run here makes (weeks on a GPU at the study's shapes).
pub const MAX_STEPS: usize = 100_000_000;

/// One line of the training log.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepLog {
    pub step: usize,
    pub epoch: f64,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    /// Target tokens in the step.
    pub tokens: usize,
    /// All tokens (padding excluded) in the step.
    pub seen_tokens: usize,
    pub seconds: f64,
}

/// PyTorch's AdamW (`torch.optim.AdamW`, non-fused maths).
struct AdamW {
    vars: Vec<Var>,
    /// The first and second moments of each variable, stacked: (2, ...its shape); none where the
    /// CPU's step runs.
    moments: Vec<Tensor>,
    /// The same for the CPU's in-place step in f32, as plain floats (m then v).
    cpu_moments: Vec<std::sync::Mutex<Vec<f32>>>,
    step: i32,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    fn new(vars: Vec<Var>, cfg: &TrainConfig) -> candle_core::Result<Self> {
        // The moments as plain floats where the CPU's in-place step runs, else as tensors.
        let (moments, cpu_moments) = if Self::on_cpu(&vars) {
            (Vec::new(), vars.iter().map(|v| std::sync::Mutex::new(vec![0f32; 2 * v.elem_count()])).collect())
        } else {
            let stacked = vars.iter().map(|v| Tensor::stack(&[v.zeros_like()?, v.zeros_like()?], 0));
            (stacked.collect::<candle_core::Result<_>>()?, Vec::new())
        };
        Ok(AdamW {
            vars,
            moments,
            cpu_moments,
            step: 0,
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
            weight_decay: cfg.weight_decay,
        })
    }

    /// With g scaled by `clip` first: p <- p (1 - lr wd); m <- b1 m + (1-b1) g;
    /// v <- b2 v + (1-b2) g^2; p <- p - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
    fn update(&mut self, grads: &[Tensor], lr: f64, clip: f64) -> candle_core::Result<()> {
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step);
        let bc2 = 1.0 - self.beta2.powi(self.step);
        let hyper = crate::model::ops::optimizer::AdamStep {
            clip,
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            bias_correction1: bc1,
            bias_correction2: bc2,
        };
        if Self::on_cpu(&self.vars) {
            return self.update_on_cpu(grads, &hyper);
        }
        #[cfg(feature = "cuda")]
        if self.vars.iter().all(|v| v.device().is_cuda() && v.dtype() == DType::F32) {
            // One launch for all variables, in place (see `cuda::adamw_many`).
            let grads: Vec<Tensor> = grads.iter().map(|g| g.contiguous()).collect::<candle_core::Result<_>>()?;
            let ps: Vec<&Tensor> = self.vars.iter().map(|v| v.as_tensor()).collect();
            let mvs: Vec<&Tensor> = self.moments.iter().collect();
            return crate::model::ops::optimizer::cuda::adamw_many(
                &ps,
                &mvs,
                &grads.iter().collect::<Vec<_>>(),
                &hyper,
            );
        }
        for ((var, mv), g) in self.vars.iter().zip(self.moments.iter_mut()).zip(grads) {
            let g = if clip < 1.0 { (g * clip)? } else { g.clone() };
            let (m, v) = (mv.get(0)?, mv.get(1)?);
            let m = ((&m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            let v = ((&v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * self.weight_decay))?;
            let denom = ((v.sqrt()? / bc2.sqrt())? + self.eps)?;
            let update = ((&m / denom)? * (lr / bc1))?;
            var.set(&(decayed - update)?)?;
            *mv = Tensor::stack(&[m, v], 0)?;
        }
        Ok(())
    }

    /// Whether the CPU's in-place step takes these variables (all f32 on the CPU).
    fn on_cpu(vars: &[Var]) -> bool {
        vars.iter().all(|v| v.device().is_cpu() && v.dtype() == DType::F32)
    }

    /// [`AdamW::update`] on the CPU in f32: one pass per variable, in place, the variables on the
    /// pool; the moments are kept as plain floats.
    fn update_on_cpu(
        &self,
        grads: &[Tensor],
        hyper: &crate::model::ops::optimizer::AdamStep,
    ) -> candle_core::Result<()> {
        let results = crate::model::cpu::map_on_pool(self.vars.len(), |i| {
            let mut mv = self.cpu_moments[i].lock().unwrap_or_else(|e| e.into_inner());
            crate::model::ops::optimizer::adamw_cpu(self.vars[i].as_tensor(), &mut mv, &grads[i], hyper)
        });
        results.into_iter().collect()
    }
}

/// Trains `adapter` on `examples`; calls `on_step` after every optimizer step (an error from
/// it stops training). Returns the log: one record per step taken (skipped steps have none).
pub fn train(
    decoder: &Decoder,
    adapter: &Adapter,
    examples: &[Example],
    cfg: &TrainConfig,
    mut on_step: impl FnMut(&StepLog) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<StepLog>> {
    cfg.validate()?;
    anyhow::ensure!(!examples.is_empty(), "no training examples");
    let trainable: Vec<&Example> = examples.iter().filter(|e| e.num_targets() > 0).collect();
    anyhow::ensure!(
        !trainable.is_empty(),
        "none of the {} examples has a trained token (check the loss mask and max_length)",
        examples.len()
    );
    let total = cfg.checked_total_steps(examples.len())?;
    let vars = adapter.vars();
    let mut opt = AdamW::new(vars.clone(), cfg)?;
    let dropout_rng = RefCell::new(ChaCha8Rng::seed_from_u64(cfg.seed));
    // Adapter gradients computed by hand-written backward rules (see `model::lora`).
    let sink = GradSink::new();
    let mut order = Order::new(examples.len(), cfg);
    let longest = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let pass_tokens = match cfg.tokens_per_pass {
        0 => cfg.per_device_train_batch_size * longest,
        n => n,
    };
    // The log grows as steps are taken: reserving every step up front would let a large step
    // count exhaust memory before the first step.
    let mut log = Vec::new();
    for step in 0..total {
        // A stop signal ends training at a step boundary, naming the step.
        crate::interrupt::check().map_err(|e| anyhow::anyhow!("{e} before training step {} of {total}", step + 1))?;
        let t0 = Instant::now();
        let batches = passes(order.step_batches(cfg), examples, pass_tokens);
        let n_targets: usize = batches.iter().flatten().map(|&i| examples[i].num_targets()).sum();
        let seen: usize = batches.iter().flatten().map(|&i| examples[i].ids.len()).sum();
        sink.new_step(); // the variables changed: the staged copies are stale
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        // The loss stays on the device until the step ends: reading it back after each
        // pass would stall the GPU's queue.
        let mut losses = Vec::with_capacity(batches.len());
        if n_targets > 0 {
            for batch in &batches {
                let rows: Vec<&Example> = batch.iter().map(|&i| &examples[i]).collect();
                let loss = batch_loss(
                    decoder,
                    adapter,
                    &rows,
                    n_targets,
                    &dropout_rng,
                    Some(&sink),
                    cfg.gradient_checkpointing,
                )?;
                losses.push(loss.detach().to_dtype(DType::F64)?);
                if !loss.track_op() {
                    continue; // a pass without trained tokens adds no gradient
                }
                let phase = crate::profile::phase("backward pass", &decoder.device);
                let store = loss.backward()?;
                drop(phase);
                for (acc, var) in grads.iter_mut().zip(&vars) {
                    let from_sink = sink.take(var);
                    for g in store.get(var.as_tensor()).cloned().into_iter().chain(from_sink) {
                        *acc = Some(match acc.take() {
                            Some(a) => (a + g)?,
                            None => g,
                        });
                    }
                }
            }
        }
        let grads: Vec<Tensor> = grads
            .into_iter()
            .zip(&vars)
            .map(|(g, v)| g.map(Ok).unwrap_or_else(|| v.zeros_like()))
            .collect::<candle_core::Result<_>>()?;
        let loss_sum = losses.iter().map(|l| l.to_scalar::<f64>()).sum::<candle_core::Result<f64>>()?;
        let norm = global_norm(&grads)?;
        // A non-finite loss or gradient would turn the adapter into NaN without a word.
        if !(loss_sum.is_finite() && norm.is_finite()) && cfg.skip_nonfinite_steps {
            eprintln!(
                "training step {} of {total}: the loss is {loss_sum} and the gradient norm {norm}; skipped \
                 (skip_nonfinite_steps), the adapter unchanged",
                step + 1
            );
            continue;
        }
        anyhow::ensure!(
            loss_sum.is_finite() && norm.is_finite(),
            "training step {} of {total}: the loss is {loss_sum} and the gradient norm {norm}; the adapter \
             was not updated. Lower learning_rate (now {}) or check the data and the model's weights",
            step + 1,
            cfg.learning_rate
        );
        let clip = if cfg.max_grad_norm > 0.0 { (cfg.max_grad_norm / (norm + 1e-6)).min(1.0) } else { 1.0 };
        let lr = cfg.lr_at(step, total);
        let phase = crate::profile::phase("optimizer", &decoder.device);
        opt.update(&grads, lr, clip)?;
        drop(phase);
        let record = StepLog {
            step: step + 1,
            epoch: order.consumed as f64 / examples.len() as f64,
            loss: loss_sum,
            learning_rate: lr,
            grad_norm: norm,
            tokens: n_targets,
            seen_tokens: seen,
            seconds: t0.elapsed().as_secs_f64(),
        };
        on_step(&record)?;
        log.push(record);
    }
    if let Some(table) = crate::profile::report(log.len(), "step") {
        eprintln!("profile of training (LORALAB_PROFILE): {} optimizer steps\n{table}", log.len());
    }
    Ok(log)
}

/// The passes of one step's micro-batches: its rows sorted by length, as many in a pass as
/// `tokens` padded tokens (rows x the longest of them) allow, a row longer than that alone;
/// the micro-batches as they are where that makes no fewer passes. Every pass's loss is its
/// summed cross-entropy over the step's target count, so the step's gradient is the same sum
/// whichever rows share a pass (up to rounding, and LoRA dropout draws its masks in another
/// order); short rows then run in passes of the size the longest would, and rows of like
/// length together pad less.
fn passes(micro: Vec<Vec<usize>>, examples: &[Example], tokens: usize) -> Vec<Vec<usize>> {
    let mut rows: Vec<usize> = micro.iter().flatten().copied().collect();
    rows.sort_by_key(|&i| examples[i].ids.len());
    let mut joined: Vec<Vec<usize>> = Vec::new();
    for i in rows {
        let len = examples[i].ids.len();
        match joined.last_mut() {
            // Rows come shortest first: the newcomer is the pass's longest.
            Some(pass) if (pass.len() + 1) * len <= tokens => pass.push(i),
            _ => joined.push(vec![i]),
        }
    }
    match joined.len() < micro.len() {
        true => joined,
        false => micro,
    }
}

/// The data order: a fresh seeded permutation per epoch (or file order), consumed in slices.
struct Order {
    n: usize,
    rng: ChaCha8Rng,
    shuffle: bool,
    queue: Vec<usize>,
    /// Rows handed out so far, over all epochs.
    consumed: usize,
}

impl Order {
    fn new(n: usize, cfg: &TrainConfig) -> Self {
        Order { n, rng: ChaCha8Rng::seed_from_u64(cfg.data_seed), shuffle: cfg.shuffle, queue: Vec::new(), consumed: 0 }
    }

    /// The micro-batches of one optimizer step: up to `gradient_accumulation_steps` of them, but
    /// the step ends with its epoch, as the transformers Trainer's does: an epoch's last step
    /// may have fewer micro-batches (and its last micro-batch fewer rows), never rows of the
    /// next epoch.
    fn step_batches(&mut self, cfg: &TrainConfig) -> Vec<Vec<usize>> {
        let mut micro = Vec::with_capacity(cfg.gradient_accumulation_steps);
        for _ in 0..cfg.gradient_accumulation_steps {
            if !micro.is_empty() && self.queue.is_empty() {
                break;
            }
            micro.push(self.take(cfg.per_device_train_batch_size));
        }
        micro
    }

    /// The next `k` rows; an epoch's last batch may be short, as with `drop_last = False`.
    fn take(&mut self, k: usize) -> Vec<usize> {
        if self.queue.is_empty() {
            let mut epoch: Vec<usize> = (0..self.n).collect();
            if self.shuffle {
                epoch.shuffle(&mut self.rng);
            }
            epoch.reverse(); // popped from the back
            self.queue = epoch;
        }
        let mut out = Vec::with_capacity(k);
        while out.len() < k {
            match self.queue.pop() {
                Some(i) => out.push(i),
                None => break,
            }
        }
        self.consumed += out.len();
        out
    }
}

/// Bytes of logits held at once by the loss: 512 MiB, 880 rows of Qwen2.5's vocabulary in f32
/// (the CPU), 1,765 in bf16 (the GPU's fused loss).
const LOGIT_BYTES_PER_CHUNK: usize = 1 << 29;

/// Rows per chunk of the loss for n rows: as many as [`LOGIT_BYTES_PER_CHUNK`] holds, spread
/// evenly over the chunks and rounded up to whole 128-row tiles of the GPU's products (a chunk
/// that ends inside a tile computes the whole tile anyway, in each of its two products).
fn chunk_rows(n: usize, vocab: usize, bytes_per_logit: usize) -> usize {
    let most = (LOGIT_BYTES_PER_CHUNK / (vocab * bytes_per_logit).max(1)).max(1);
    let even = n.div_ceil(n.div_ceil(most).max(1)).max(1);
    match most >= 128 {
        true => (even.div_ceil(128) * 128).min(most),
        false => even,
    }
}

/// Sum of the cross-entropy of a micro-batch's target tokens, divided by `denominator`.
///
/// With a `sink`, each decoder layer runs as a single op with a hand-written backward rule
/// that puts the adapter's gradients there (and so does gradient checkpointing, which needs it);
/// without one, the loss's backward pass gives every gradient.
pub fn batch_loss(
    decoder: &Decoder,
    adapter: &Adapter,
    rows: &[&Example],
    denominator: usize,
    dropout_rng: &RefCell<ChaCha8Rng>,
    sink: Option<&Arc<GradSink>>,
    gradient_checkpointing: bool,
) -> anyhow::Result<Tensor> {
    let device = &decoder.device;
    let t = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    let b = rows.len();
    // Right padding: real tokens never attend to it under the causal mask.
    let mut ids = Vec::with_capacity(b * t);
    let mut positions = Vec::new(); // flat (row * T + t - 1) of each prediction
    let mut targets = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        ids.extend_from_slice(&row.ids);
        ids.extend(std::iter::repeat_n(0u32, t - row.ids.len()));
        for pos in 1..row.ids.len() {
            if row.target[pos] {
                positions.push((r * t + pos - 1) as u32);
                targets.push(row.ids[pos]);
            }
        }
    }
    if positions.is_empty() {
        return Ok(Tensor::zeros((), DType::F32, device)?); // nothing to learn from these rows
    }
    let ids = Tensor::from_vec(ids, (b, t), device)?;
    let mask = crate::model::decoder::Mask::causal(t, device)?;
    let lengths: Vec<usize> = rows.iter().map(|r| r.ids.len()).collect();
    let pass = Pass::train(adapter, Some(dropout_rng)).with_lengths(&lengths);
    let pass = match sink {
        Some(sink) if gradient_checkpointing => pass.checkpointed(sink),
        Some(sink) => pass.with_sink(sink),
        None => {
            anyhow::ensure!(!gradient_checkpointing, "gradient checkpointing needs a gradient sink");
            pass
        }
    };
    let hidden = decoder.forward_hidden(&ids, 0, Some(&mask), None, pass)?;
    // Logits only where a target is predicted: (B*T, D) -> (N, D) -> (N, V)
    let d = hidden.dim(2)?;
    let picked = crate::model::ops::gather_rows(&hidden.reshape((b * t, d))?, &positions)?;
    // The softmax runs in f32 at least (bf16 logits lose the loss's precision), a bounded chunk
    // of rows at a time: (N, V) f32 logits of a long batch would not fit beside a 7B model.
    let bytes_per_logit = match device.is_cuda() && hidden.dtype() == DType::BF16 {
        true => 2, // bf16 logits, turned into their gradient in place
        false => hidden.dtype().size_in_bytes().max(4),
    };
    let chunk = chunk_rows(targets.len(), decoder.config.vocab_size, bytes_per_logit);
    let _phase = crate::profile::phase("loss (and its input's gradient)", device);
    let nll = crate::model::ops::linear_cross_entropy(
        &picked,
        &decoder.lm_head,
        decoder.lm_head_packed(),
        &targets,
        chunk,
        decoder.final_softcap(),
    )?;
    Ok((nll / denominator as f64)?)
}

/// Global L2 norm of all gradients, read back from the device once.
fn global_norm(grads: &[Tensor]) -> candle_core::Result<f64> {
    #[cfg(feature = "cuda")]
    if grads.iter().all(|g| g.device().is_cuda() && g.dtype() == DType::F32) && !grads.is_empty() {
        return Ok(crate::model::ops::optimizer::cuda::sum_squares(grads)?.to_scalar::<f64>()?.sqrt());
    }
    let squares =
        grads.iter().map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all()).collect::<candle_core::Result<Vec<_>>>()?;
    let total = Tensor::stack(&squares, 0)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    Ok(total.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_chunks_are_even_whole_tiles_within_the_memory_bound() {
        // Qwen2.5's vocabulary: 1,765 bf16 rows fit; 4,092 rows -> three chunks of 1,408.
        assert_eq!(chunk_rows(4092, 152_064, 2), 1408);
        // In f32, 882 rows fit: whole tiles would be 896, so the bound wins.
        assert_eq!(chunk_rows(4092, 152_064, 4), 882);
        // Few rows: one chunk of them all.
        assert_eq!(chunk_rows(300, 49_152, 4), 384);
        // A vocabulary too large for 128 rows (two fit): even chunks, untiled.
        assert_eq!(chunk_rows(1000, 1 << 26, 4), 2);
    }

    #[test]
    fn a_warmed_up_linear_schedule_starts_at_zero_and_decays_to_zero() {
        let cfg = TrainConfig { learning_rate: 1e-2, warmup_steps: Some(1), ..Default::default() };
        let lrs: Vec<f64> = (0..4).map(|s| cfg.lr_at(s, 4)).collect();
        assert_eq!(lrs[0], 0.0);
        assert!((lrs[1] - 1e-2).abs() < 1e-15);
        assert!((lrs[2] - 1e-2 * 2.0 / 3.0).abs() < 1e-15);
        assert!((lrs[3] - 1e-2 / 3.0).abs() < 1e-15);
    }

    #[test]
    fn constant_ignores_warmup_and_constant_with_warmup_warms_up_as_transformers_does() {
        let cfg =
            |s| TrainConfig { learning_rate: 1e-2, warmup_steps: Some(2), lr_scheduler_type: s, ..Default::default() };
        let lrs = |c: TrainConfig| (0..4).map(|s| c.lr_at(s, 4)).collect::<Vec<f64>>();
        assert_eq!(lrs(cfg(Schedule::Constant)), vec![1e-2; 4]);
        assert_eq!(lrs(cfg(Schedule::ConstantWithWarmup)), vec![0.0, 5e-3, 1e-2, 1e-2]);
        assert_eq!(Schedule::from_name("constant_with_warmup"), Some(Schedule::ConstantWithWarmup));
    }

    #[test]
    fn warmup_ratio_rounds_up_as_transformers_does() {
        let cfg = TrainConfig { warmup_ratio: 0.03, ..Default::default() };
        assert_eq!(cfg.warmup(5), 1);
        assert_eq!(cfg.warmup(10), 1);
        assert_eq!(cfg.warmup(375), 12);
    }

    #[test]
    fn steps_per_epoch_count_partial_batches() {
        let cfg = TrainConfig {
            per_device_train_batch_size: 4,
            gradient_accumulation_steps: 4,
            num_train_epochs: 20.0,
            ..Default::default()
        };
        // 600 rows: 150 micro-batches, 38 steps per epoch
        assert_eq!(cfg.total_steps(600), 760);
    }

    fn rows_of_lengths(lengths: &[usize]) -> Vec<Example> {
        lengths.iter().map(|&n| Example { ids: vec![1; n], target: vec![true; n] }).collect()
    }

    #[test]
    fn a_steps_short_rows_share_passes_shortest_first_up_to_the_token_budget() {
        let rows = rows_of_lengths(&[30, 10, 20, 10, 40, 10, 20, 30]);
        let micro = vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7]];
        // 4 rows x 40 tokens: 160 padded tokens.
        assert_eq!(passes(micro.clone(), &rows, 160), [vec![1, 3, 5, 2, 6], vec![0, 7, 4]]);
        assert_eq!(passes(micro.clone(), &rows, 320), [vec![1, 3, 5, 2, 6, 0, 7, 4]]);
    }

    #[test]
    fn micro_batches_stay_as_they_are_where_joining_makes_no_fewer_passes() {
        let rows = rows_of_lengths(&[40, 40, 40, 40, 40]);
        let micro = vec![vec![3, 1], vec![0, 2], vec![4]];
        assert_eq!(passes(micro.clone(), &rows, 80), micro);
        assert_eq!(passes(micro.clone(), &rows, 10), micro, "a row longer than the budget");
        assert_eq!(passes(vec![vec![2, 0]], &rows, 1000), [vec![2, 0]]);
        assert_eq!(passes(micro, &rows, 120), [vec![3, 1, 0], vec![2, 4]], "rows of one length keep their order");
    }

    #[test]
    fn each_epoch_visits_every_row_once() {
        let cfg = TrainConfig::default();
        let mut o = Order::new(10, &cfg);
        let mut seen: Vec<usize> = (0..5).flat_map(|_| o.take(2)).collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn an_optimizer_step_ends_with_its_epoch_as_the_trainers_does() {
        // 6 rows, micro-batches of 2, 2 per step: each epoch is a full step and a half step.
        let cfg = TrainConfig {
            per_device_train_batch_size: 2,
            gradient_accumulation_steps: 2,
            num_train_epochs: 2.0,
            ..Default::default()
        };
        assert_eq!(cfg.total_steps(6), 4);
        let mut o = Order::new(6, &cfg);
        let steps: Vec<Vec<usize>> = (0..4).map(|_| o.step_batches(&cfg).iter().map(Vec::len).collect()).collect();
        assert_eq!(steps, [vec![2, 2], vec![2], vec![2, 2], vec![2]]);
        assert_eq!(o.consumed, 12, "exactly two epochs");
        // Phase 1's shape: 600 rows, 4 x 4 per step, 20 epochs: 760 steps and 20 epochs' rows.
        let p1 = TrainConfig {
            per_device_train_batch_size: 4,
            gradient_accumulation_steps: 4,
            num_train_epochs: 20.0,
            ..Default::default()
        };
        let mut o = Order::new(600, &p1);
        for _ in 0..p1.total_steps(600) {
            o.step_batches(&p1);
        }
        assert_eq!((p1.total_steps(600), o.consumed), (760, 12_000));
    }
}
