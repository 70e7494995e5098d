//! Batched generation with a pre-allocated KV cache.
//!
//! Prompts are sorted by length and taken in groups; each group is prefilled once, left-padded
//! to its longest prompt (an attention mask hides the padding), and the `n` completions of a
//! prompt continue that one prefill: on the CPU they read its keys and values from one copy
//! (the cache's shared prefix), elsewhere each row's cache starts with its own. Every decoding
//! step runs the rows of every group in flight, each group with its own cache and positions; a
//! row that reaches a stop token, a stop string or `max_tokens` is done, finished rows are
//! dropped from the batch (cache included) once they are a share of their group, and the next
//! group joins as soon as its rows fit in `batch_size` beside those still decoding.
//!
//! Continuous batching (the GPU in bf16, where the model's attention runs on the fused
//! kernels): every row decodes instead in a slot of one cache of `batch_size` slots, which holds
//! its real positions only; the kernels read and write each row at its own length and position,
//! so the rows of all groups decode as one batch, and a finished row's slot is free at once for
//! the next group's rows.
//!
//! Positions: all rows of a group share positions 0..len, padding included. Rotary embeddings
//! depend only on the distance between a query and a key, so a left-padded row attends exactly
//! as it would alone.
//!
//! Randomness: each completion has its own stream, seeded from (seed, prompt index, sample
//! index), so a completion's draws do not depend on the batch it ran in. Its logits can, in
//! their last bits: a row's left padding, hence its positions and the length of its sums, is set
//! by the longest prompt of its group, so another `batch_size` may draw other completions.
//!
//! Shapes: B rows in flight, P prompts in a group, L longest prompt, S keys so far, V vocab.

use std::collections::VecDeque;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::adapter::Adapter;
use crate::model::decoder::{DecodeSegment, Mask};
use crate::model::{KvCache, Model, Pass, SlotCache};

/// Sampling settings, named as in transformers' `generate` / vLLM's `SamplingParams`.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// Completions per prompt.
    pub n: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: f64,
    /// 0 means no top-k cut.
    pub top_k: usize,
    pub max_tokens: usize,
    /// Strings that end a completion (not included in its text).
    pub stop: Vec<String>,
    /// Extra token ids that end a completion, besides the model's end-of-turn tokens.
    pub stop_token_ids: Vec<u32>,
    pub seed: u64,
    /// Most rows decoded at once (memory bound: the KV cache grows with it).
    pub batch_size: usize,
    /// Prompts prefilled together, left-padded to the longest of them, whose rows then join the
    /// batch in flight together; 0: `batch_size / n`. With 1 no prompt is padded, so a prompt's
    /// completions do not depend on the others'. Groups smaller than the batch keep it fuller as
    /// rows finish, but each group in flight runs its own attention.
    pub group_size: usize,
    /// Generate exactly `max_tokens` tokens, ignoring stop tokens (for benchmarks).
    pub ignore_eos: bool,
    /// Where the model decodes from slots ([`crate::model::Decoder::slots_apply`]: the GPU in bf16), every
    /// row decodes in a slot of one cache and a group joins the batch as soon as enough slots
    /// are free, in the same decoding step as the rows in flight. `group_size` 0 then means
    /// the largest divisor of `batch_size / n` up to an eighth of it. Otherwise (and with false)
    /// groups decode beside each other, each with its own cache.
    pub continuous_batching: bool,
}

impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions {
            n: 1,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_tokens: 256,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            seed: 0,
            batch_size: 64,
            group_size: 0,
            ignore_eos: false,
            continuous_batching: true,
        }
    }
}

impl SampleOptions {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.n >= 1, "n must be >= 1 (got {})", self.n);
        anyhow::ensure!(
            self.temperature >= 0.0 && self.temperature.is_finite(),
            "temperature must be >= 0 (got {})",
            self.temperature
        );
        anyhow::ensure!(self.top_p > 0.0 && self.top_p <= 1.0, "top_p must be in (0, 1] (got {})", self.top_p);
        anyhow::ensure!(self.max_tokens >= 1, "max_tokens must be >= 1 (got {})", self.max_tokens);
        anyhow::ensure!(self.batch_size >= 1, "batch_size must be >= 1 (got {})", self.batch_size);
        anyhow::ensure!(
            self.group_size.saturating_mul(self.n.min(self.batch_size)) <= self.batch_size,
            "group_size {} x n {} completions is more than batch_size {} rows; lower group_size (0: batch_size / n)",
            self.group_size,
            self.n,
            self.batch_size
        );
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
}

/// Throughput of one `sample` call.
#[derive(Debug, Clone, Default)]
pub struct SampleStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// The most rows decoded at once.
    pub peak_rows: usize,
    /// The rows allowed at once: `batch_size`, or fewer where the GPU's free memory holds fewer.
    pub batch_size: usize,
    /// Decoding steps run (each over every row still in its batch).
    pub decode_steps: usize,
}

/// Generates `opts.n` completions for each prompt (token ids). Returns them per prompt, in order.
pub fn sample(
    model: &Model,
    adapter: Option<&Adapter>,
    prompts: &[Vec<u32>],
    opts: &SampleOptions,
) -> anyhow::Result<(Vec<Vec<Completion>>, SampleStats)> {
    opts.validate()?;
    for (i, p) in prompts.iter().enumerate() {
        anyhow::ensure!(!p.is_empty(), "prompt {} is empty", i + 1);
        let max = model.config().max_position_embeddings;
        anyhow::ensure!(
            p.len() + opts.max_tokens <= max,
            "prompt {} has {} tokens; with max_tokens {} that exceeds the model's {max} positions",
            i + 1,
            p.len(),
            opts.max_tokens
        );
    }
    check_results_fit(prompts.len(), opts)?;
    let continuous = opts.continuous_batching && model.decoder.slots_apply(Pass::infer(adapter));
    let fitted = fit_to_gpu_memory(model, prompts, opts, continuous)?;
    let opts = fitted.as_ref().unwrap_or(opts);
    if !model.device().is_cpu() {
        model.device().set_seed(opts.seed)?;
    }
    let mut stop_ids = if opts.ignore_eos { Vec::new() } else { model.tokenizer.stop_ids.clone() };
    stop_ids.extend(&opts.stop_token_ids);
    let mut sampler =
        Sampler { model, adapter, prompts, opts, stop_ids: &stop_ids, rows: Vec::new(), stats: SampleStats::default() };
    match continuous {
        true => sampler.run_slots(units(prompts, opts, continuous))?,
        false => sampler.run(units(prompts, opts, continuous))?,
    }
    let Sampler { rows, mut stats, .. } = sampler;
    stats.batch_size = opts.batch_size;
    let results = completions(model, rows, prompts.len(), opts)?;
    if let Some(table) = crate::profile::report(stats.decode_steps, "step") {
        eprintln!(
            "profile of sample (LORALAB_PROFILE): {} prompt tokens, {} generated, {} decoding steps\n{table}",
            stats.prompt_tokens, stats.generated_tokens, stats.decode_steps
        );
    }
    Ok((results, stats))
}

/// The prompts in units (sorted by length, so that a unit's padding is short) and the
/// completions each unit draws.
fn units(prompts: &[Vec<u32>], opts: &SampleOptions, continuous: bool) -> VecDeque<Unit> {
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| prompts[i].len());
    if opts.n <= opts.batch_size {
        // Whole prompts together, `group_size` of them at a time.
        let per_group = group_prompts(opts.batch_size, opts, continuous);
        order.chunks(per_group).map(|group| Unit { prompts: group.to_vec(), completions: 0..opts.n }).collect()
    } else {
        // More completions of a prompt than rows allowed at once: its completions in slices of
        // `batch_size` (each completion's random stream is its own, so the slicing changes no draw).
        let slices = |i: usize| {
            (0..opts.n)
                .step_by(opts.batch_size)
                .map(move |start| Unit { prompts: vec![i], completions: start..(start + opts.batch_size).min(opts.n) })
        };
        order.iter().flat_map(|&i| slices(i)).collect()
    }
}

/// Prompts per group (prefilled together) in batches of `batch` rows: `group_size`, or by
/// default a full batch's prompts, or in continuous batching [`continuous_group`] of them.
fn group_prompts(batch: usize, opts: &SampleOptions, continuous: bool) -> usize {
    let per_batch = (batch / opts.n).max(1);
    match (opts.group_size, continuous) {
        (0, false) => per_batch,
        (0, true) => continuous_group(per_batch),
        (size, _) => size,
    }
}

/// The default group of continuous batching for `per_batch` prompts in a full batch: the largest
/// divisor of it up to an eighth of it, so that freed slots take a group soon (at least eight
/// groups fill the batch) and groups fill the whole batch at once.
fn continuous_group(per_batch: usize) -> usize {
    (1..=(per_batch / 8).max(1)).rev().find(|g| per_batch.is_multiple_of(*g)).unwrap_or(1)
}

/// The finished rows as each prompt's completions, texts cut at the first stop string. Rows were
/// made in the order of their units, and within one by prompt and completion.
fn completions(
    model: &Model,
    rows: Vec<Row>,
    prompts: usize,
    opts: &SampleOptions,
) -> anyhow::Result<Vec<Vec<Completion>>> {
    let mut results: Vec<Vec<Completion>> = vec![Vec::new(); prompts];
    for row in rows {
        let mut text = model.tokenizer.decode(&row.tokens, true)?;
        if let Some(cut) = opts.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
        }
        results[row.prompt].push(Completion {
            text,
            token_ids: row.tokens,
            finish_reason: row.done.unwrap_or(FinishReason::Length),
        });
    }
    Ok(results)
}

/// Prompts prefilled together, left-padded to the longest, and the completions of each to draw.
struct Unit {
    prompts: Vec<usize>,
    completions: std::ops::Range<usize>,
}

/// One completion being drawn.
struct Row {
    prompt: usize,
    tokens: Vec<u32>,
    /// Seeds the row's random stream (on the CPU) or keys its noise (on the GPU).
    key: u64,
    rng: ChaCha8Rng,
    done: Option<FinishReason>,
    text_len_checked: usize,
}

/// A unit in flight: its rows' KV cache, padding and position.
struct Segment {
    cache: KvCache,
    /// Its rows in the batch, as indices into the sampler's rows, in batch order.
    live: Vec<usize>,
    /// Each live row's left padding.
    pads: Vec<usize>,
    /// The token each live row was drawn last, to be fed next.
    next: Vec<u32>,
    /// Its prompts' padded length, and the position of the next token fed.
    prompt_len: usize,
    pos: usize,
}

impl Segment {
    fn finished(&self, rows: &[Row]) -> usize {
        self.live.iter().filter(|&&r| rows[r].done.is_some()).count()
    }
}

/// A row decoding in a slot of a [`SlotCache`] (continuous batching).
struct SlotRow {
    /// Its index in the sampler's rows.
    row: usize,
    slot: usize,
    /// Its prompt's slot in the cache's prompt store and the prompt's length there, or its own
    /// slot and 0 where that holds the prompt.
    prompt_slot: usize,
    prompt_len: usize,
    /// Positions it holds: its prompt's (without the padding) and the tokens fed so far.
    held: usize,
    /// The position of the token fed next, counted as in its group: its padding included.
    pos: usize,
    /// The token it was drawn last, fed next.
    next: u32,
    /// Decoding steps since its prefill (its sampling noise's step).
    step: u32,
}

/// Draws the completions of units of prompts. A unit is prefilled once, then its rows decode in
/// a batch with those of the other units in flight: in groups ([`Sampler::run`]), each unit with
/// its own cache and positions, finished rows leaving the batch (cache included) once they are a
/// share of their unit's and the next unit joining once its rows fit in `batch_size` beside the
/// rows in flight; or in slots of one cache ([`Sampler::run_slots`]).
struct Sampler<'a> {
    model: &'a Model,
    adapter: Option<&'a Adapter>,
    prompts: &'a [Vec<u32>],
    opts: &'a SampleOptions,
    stop_ids: &'a [u32],
    rows: Vec<Row>,
    stats: SampleStats,
}

impl Sampler<'_> {
    fn run(&mut self, mut units: VecDeque<Unit>) -> anyhow::Result<()> {
        let mut segments: Vec<Segment> = Vec::new();
        let t0 = Instant::now();
        let prefill_before = self.stats.prefill_seconds;
        loop {
            // A stop signal ends sampling between decoding steps (the cell resumes on a rerun).
            crate::interrupt::check()?;
            self.retire(&mut segments);
            for segment in segments.iter_mut() {
                self.compact(segment)?;
            }
            while let Some(unit) = units.front() {
                let in_flight: usize = segments.iter().map(|s| s.live.len()).sum();
                let rows = unit.prompts.len() * unit.completions.len();
                if !segments.is_empty() && in_flight + rows > self.opts.batch_size {
                    break;
                }
                let unit = units.pop_front().expect("a unit is waiting");
                let segment = self.prefill(&unit, in_flight)?;
                self.take_tokens(&segment.live, &segment.next)?;
                segments.push(segment);
            }
            self.retire(&mut segments);
            if segments.is_empty() {
                match units.is_empty() {
                    true => break,
                    false => continue,
                }
            }
            self.decode(&mut segments)?;
            for segment in &segments {
                self.take_tokens(&segment.live, &segment.next)?;
            }
        }
        let prefill = self.stats.prefill_seconds - prefill_before;
        self.stats.decode_seconds += t0.elapsed().as_secs_f64() - prefill;
        Ok(())
    }

    /// Continuous batching: every row decodes in a slot of one [`SlotCache`], and a unit joins as
    /// soon as its rows find free slots, in the same decoding step as the rows in flight (one
    /// product per projection and one attention launch for all of them).
    fn run_slots(&mut self, mut units: VecDeque<Unit>) -> anyhow::Result<()> {
        let (dec, opts) = (&self.model.decoder, self.opts);
        // Slots run on the GPU only, where `fit_to_gpu_memory` sized the batch.
        let layout = SlotLayout::of(self.prompts, opts, true);
        let (rows, prompts) = ((layout.slots, layout.positions), (layout.prompt_slots, layout.prompt_positions));
        let cache = SlotCache::new(&dec.config, rows, prompts, dec.dtype, &dec.device)?;
        let mut free = Free::new(layout);
        let mut live: Vec<SlotRow> = Vec::new();
        let t0 = Instant::now();
        let prefill_before = self.stats.prefill_seconds;
        loop {
            // A stop signal ends sampling between decoding steps (the cell resumes on a rerun).
            crate::interrupt::check()?;
            while let Some(unit) = units.front() {
                if !free.fits(unit) {
                    break;
                }
                let unit = units.pop_front().expect("a unit is waiting");
                let joined = self.prefill_slots(&unit, &cache, &mut free)?;
                live.extend(joined);
                self.stats.peak_rows = self.stats.peak_rows.max(live.len());
            }
            self.free_slots(&mut live, &mut free);
            if live.is_empty() {
                match units.is_empty() {
                    true => break,
                    false => continue,
                }
            }
            self.decode_slots(&cache, &mut live)?;
            self.free_slots(&mut live, &mut free);
        }
        let prefill = self.stats.prefill_seconds - prefill_before;
        self.stats.decode_seconds += t0.elapsed().as_secs_f64() - prefill;
        Ok(())
    }

    /// Drops the finished rows, their slots freed for the next units.
    fn free_slots(&self, live: &mut Vec<SlotRow>, free: &mut Free) {
        live.retain(|r| match self.rows[r.row].done {
            Some(_) => {
                free.release(r);
                false
            }
            None => true,
        });
    }

    /// Prefills a unit's prompts and moves their keys and values into free slots: one per
    /// prompt in the prompt store where the cache has one, else one per row. Its rows, each in a
    /// slot of its own with its first token drawn.
    fn prefill_slots(&mut self, unit: &Unit, cache: &SlotCache, free: &mut Free) -> anyhow::Result<Vec<SlotRow>> {
        let device = self.model.decoder.device.clone();
        let t0 = Instant::now();
        let (prefilled, logits, pads) = self.prefill_prompts(unit, 0)?;
        let l = prefilled.len;
        let (expand, rows, next) = self.first_tokens(unit, &logits)?;
        let held = |k: u32| l - pads[k as usize];
        let slots = free.take_rows(rows.len());
        let stored = cache.prompts.is_some();
        // Each prompt's slot, or each row's, filled with the prompt's keys and values: the rows'
        // prompt slots, and the (prompt in the unit, slot) pairs to fill.
        let (prompt_slots, filled): (Vec<usize>, Vec<(u32, usize)>) = match stored {
            true => {
                let taken = free.take_prompt(unit.prompts.len(), unit.completions.len());
                let filled = taken.iter().enumerate().map(|(k, &slot)| (k as u32, slot)).collect();
                (expand.iter().map(|&k| taken[k as usize]).collect(), filled)
            }
            false => (slots.clone(), expand.iter().copied().zip(slots.iter().copied()).collect()),
        };
        let fill: Vec<u32> = filled.iter().flat_map(|&(k, slot)| [k, slot as u32, pads[k as usize] as u32]).collect();
        cache.fill(&prefilled, &Tensor::from_vec(fill, (filled.len(), 3), &device)?)?;
        self.take_tokens(&rows, &next)?;
        self.stats.prefill_seconds += t0.elapsed().as_secs_f64();
        let joined = rows.into_iter().zip(expand).zip(slots).zip(prompt_slots).zip(next);
        Ok(joined
            .map(|((((row, k), slot), prompt_slot), next)| SlotRow {
                row,
                slot,
                prompt_slot,
                prompt_len: if stored { held(k) } else { 0 },
                held: held(k),
                pos: l,
                next,
                step: 0,
            })
            .collect())
    }

    /// One decoding step of every row in its slot: feeds each row its last token and draws the next.
    fn decode_slots(&mut self, cache: &SlotCache, live: &mut [SlotRow]) -> anyhow::Result<()> {
        let dec = &self.model.decoder;
        let device = dec.device.clone();
        let phase = crate::profile::phase("ids and masks", &device);
        let ids = Tensor::from_vec(live.iter().map(|r| r.next).collect(), (live.len(), 1), &device)?;
        let at = live.iter().flat_map(|r| [r.slot, r.held, r.pos, r.prompt_slot, r.prompt_len].map(|x| x as u32));
        let at = Tensor::from_vec(at.collect(), (live.len(), 5), &device)?;
        drop(phase);
        self.stats.decode_steps += 1;
        let hidden = dec.decode_slots(&ids, cache, &at, Pass::infer(self.adapter))?;
        let logits = dec.logits_as_computed(&hidden)?.squeeze(1)?; // (N, V)
        let _phase = crate::profile::phase("sampling (cuts, draws)", &device);
        for r in live.iter_mut() {
            (r.held, r.pos, r.step) = (r.held + 1, r.pos + 1, r.step + 1);
        }
        // The rows of a unit are consecutive and share their step: one draw per run of them.
        let mut first = 0;
        while first < live.len() {
            let step = live[first].step;
            let end = first + live[first..].iter().take_while(|r| r.step == step).count();
            let rows: Vec<usize> = live[first..end].iter().map(|r| r.row).collect();
            let next = choose_tokens(&logits.narrow(0, first, end - first)?, &mut self.rows, &rows, step, self.opts)?;
            self.take_tokens(&rows, &next)?;
            for (r, tok) in live[first..end].iter_mut().zip(next) {
                r.next = tok;
            }
            first = end;
        }
        Ok(())
    }

    /// Drops the segments whose rows have all finished, and their caches.
    fn retire(&self, segments: &mut Vec<Segment>) {
        segments.retain(|s| s.finished(&self.rows) < s.live.len());
    }

    /// Prefills a unit's prompts: (P, L) left-padded ids -> its segment, with each row's first
    /// token drawn. `in_flight`: the rows decoding beside it.
    fn prefill(&mut self, unit: &Unit, in_flight: usize) -> anyhow::Result<Segment> {
        let (dec, opts) = (&self.model.decoder, self.opts);
        let device = dec.device.clone();
        let (p, n) = (unit.prompts.len(), unit.completions.len());
        let l = unit.prompts.iter().map(|&i| self.prompts[i].len()).max().unwrap_or(0);
        check_cache_fits(&dec.config, in_flight + p * n, l + opts.max_tokens, dec.dtype, &device, opts)?;
        self.stats.peak_rows = self.stats.peak_rows.max(in_flight + p * n);
        let t0 = Instant::now();
        let (mut cache, logits, pads) = self.prefill_prompts(unit, opts.max_tokens)?;
        let (expand, live, next) = self.first_tokens(unit, &logits)?;
        // On the CPU the rows of a prompt read its positions from one copy of them, where
        // elsewhere each row's cache starts with its own copy (the same keys and values either way).
        match dec.device.is_cpu() && dec.dtype == DType::F32 {
            true => cache.share_prefix(&expand)?,
            false => cache.select_rows(&expand)?,
        }
        let pads = expand.iter().map(|&k| pads[k as usize]).collect();
        self.stats.prefill_seconds += t0.elapsed().as_secs_f64();
        Ok(Segment { cache, live, pads, next, prompt_len: l, pos: l })
    }

    /// Runs a unit's prompts, left-padded to the longest (L), through the model: their cache
    /// (with room for `room` more positions), the logits of each prompt's next token (P, V), and
    /// each prompt's padding.
    fn prefill_prompts(&mut self, unit: &Unit, room: usize) -> anyhow::Result<(KvCache, Tensor, Vec<usize>)> {
        let dec = &self.model.decoder;
        let device = dec.device.clone();
        let prompts: Vec<&[u32]> = unit.prompts.iter().map(|&i| self.prompts[i].as_slice()).collect();
        let p = prompts.len();
        let l = prompts.iter().map(|x| x.len()).max().unwrap_or(0);
        let pads: Vec<usize> = prompts.iter().map(|x| l - x.len()).collect();
        let mut ids = Vec::with_capacity(p * l);
        for (x, &pad) in prompts.iter().zip(&pads) {
            ids.extend(std::iter::repeat_n(0u32, pad));
            ids.extend_from_slice(x);
        }
        let ids = Tensor::from_vec(ids, (p, l), &device)?;
        let mask = Mask::Rows(prefill_mask(&pads, l, &device)?);
        let mut cache = KvCache::new(&dec.config, p, l + room, dec.dtype, &device)?;
        let hidden = dec.forward_hidden(&ids, 0, Some(&mask), Some(&mut cache), Pass::infer(self.adapter))?;
        let logits = dec.logits_as_computed(&hidden.narrow(1, l - 1, 1)?)?.squeeze(1)?; // (P, V)
        self.stats.prompt_tokens += prompts.iter().map(|x| x.len()).sum::<usize>();
        Ok((cache, logits, pads))
    }

    /// The rows of a unit's completions (see [`Sampler::new_rows`]) with their first tokens drawn
    /// from its prompts' next-token logits (P, V): each row's prompt within the unit, its index
    /// in the sampler's rows, and its token.
    fn first_tokens(&mut self, unit: &Unit, logits: &Tensor) -> anyhow::Result<(Vec<u32>, Vec<usize>, Vec<u32>)> {
        let first = self.new_rows(unit);
        let n = unit.completions.len();
        let expand: Vec<u32> = (0..unit.prompts.len() as u32).flat_map(|k| std::iter::repeat_n(k, n)).collect();
        let first_logits = logits.index_select(&Tensor::new(expand.as_slice(), logits.device())?, 0)?;
        let rows: Vec<usize> = (first..self.rows.len()).collect();
        let next = choose_tokens(&first_logits, &mut self.rows, &rows, 0, self.opts)?;
        Ok((expand, rows, next))
    }

    /// The rows of a unit's completions, n per prompt, each with its own random stream; returns
    /// the index of the first.
    fn new_rows(&mut self, unit: &Unit) -> usize {
        let first = self.rows.len();
        for &pid in &unit.prompts {
            for j in unit.completions.clone() {
                let seed = self.opts.seed
                    ^ (pid as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ (j as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(j as u64);
                self.rows.push(Row {
                    prompt: pid,
                    tokens: Vec::new(),
                    key: seed,
                    rng,
                    done: None,
                    text_len_checked: 0,
                });
            }
        }
        first
    }

    /// Takes the tokens the rows `live` were drawn (`next`, in that order): each ends its row or
    /// joins its completion.
    fn take_tokens(&mut self, live: &[usize], next: &[u32]) -> anyhow::Result<()> {
        for (&r, &tok) in live.iter().zip(next) {
            let row = &mut self.rows[r];
            if row.done.is_some() {
                continue;
            }
            if self.stop_ids.contains(&tok) {
                row.done = Some(FinishReason::Stop);
                continue;
            }
            row.tokens.push(tok);
            self.stats.generated_tokens += 1;
            if !self.opts.stop.is_empty() && hits_stop_string(self.model, row, &self.opts.stop)? {
                row.done = Some(FinishReason::Stop);
            } else if row.tokens.len() >= self.opts.max_tokens {
                row.done = Some(FinishReason::Length);
            }
        }
        Ok(())
    }

    /// Drops a segment's finished rows once they are a share of it: the copy of the cache costs
    /// less than decoding them further. On the CPU a step costs in proportion to its rows, and
    /// the copy takes only the rows' own positions (their prompts' stay shared), so an eighth;
    /// elsewhere half.
    fn compact(&self, segment: &mut Segment) -> anyhow::Result<()> {
        let device = &self.model.decoder.device;
        let share = if device.is_cpu() { 8 } else { 2 };
        if segment.finished(&self.rows) * share < segment.live.len() {
            return Ok(());
        }
        let _phase = crate::profile::phase("cache compaction", device);
        let keep: Vec<usize> = (0..segment.live.len()).filter(|&s| self.rows[segment.live[s]].done.is_none()).collect();
        let index: Vec<u32> = keep.iter().map(|&s| s as u32).collect();
        segment.cache.select_rows(&index)?;
        segment.live = keep.iter().map(|&s| segment.live[s]).collect();
        segment.pads = keep.iter().map(|&s| segment.pads[s]).collect();
        segment.next = keep.iter().map(|&s| segment.next[s]).collect();
        Ok(())
    }

    /// One decoding step of every segment: feeds each row its last token and draws the next.
    fn decode(&mut self, segments: &mut [Segment]) -> anyhow::Result<()> {
        let dec = &self.model.decoder;
        let device = dec.device.clone();
        let phase = crate::profile::phase("ids and masks", &device);
        let fed: Vec<u32> = segments.iter().flat_map(|s| s.next.iter().copied()).collect();
        let ids = Tensor::from_vec(fed, (segments.iter().map(|s| s.live.len()).sum::<usize>(), 1), &device)?;
        let masks: Vec<Mask> = segments
            .iter()
            .map(|s| Ok(Mask::Rows(decode_mask(&s.pads, s.pos + 1, &device)?)))
            .collect::<Result<_, candle_core::Error>>()?;
        drop(phase);
        self.stats.decode_steps += 1;
        let mut steps: Vec<DecodeSegment> = segments
            .iter_mut()
            .zip(&masks)
            .map(|(s, mask)| DecodeSegment { rows: s.live.len(), pos: s.pos, mask, cache: &mut s.cache })
            .collect();
        let hidden = dec.decode_step(&ids, &mut steps, Pass::infer(self.adapter))?;
        let logits = dec.logits_as_computed(&hidden)?.squeeze(1)?; // (B, V)
        let _phase = crate::profile::phase("sampling (cuts, draws)", &device);
        let mut first = 0;
        for s in segments.iter_mut() {
            s.pos += 1;
            let rows = logits.narrow(0, first, s.live.len())?;
            first += s.live.len();
            s.next = choose_tokens(&rows, &mut self.rows, &s.live, (s.pos - s.prompt_len) as u32, self.opts)?;
        }
        Ok(())
    }
}

/// Refuses to start when the completions alone (their token ids and text, about 8 bytes a
/// token at most) could not fit in memory: `n = 1e7` would otherwise run for hours and then
/// abort the process.
fn check_results_fit(prompts: usize, opts: &SampleOptions) -> anyhow::Result<()> {
    let bytes = 8.0 * prompts as f64 * opts.n as f64 * opts.max_tokens as f64;
    if let Some(available) = crate::lua::sys::available_memory_bytes() {
        anyhow::ensure!(
            bytes <= available as f64,
            "{prompts} prompts x n = {} completions x max_tokens = {} could need {:.1} GiB for the completions \
             alone, more than the {:.1} GiB of memory available; lower n or max_tokens",
            opts.n,
            opts.max_tokens,
            bytes / 2f64.powi(30),
            available as f64 / 2f64.powi(30)
        );
    }
    Ok(())
}

/// Bytes of KV cache one row of `positions` holds.
fn cache_bytes_per_row(cfg: &crate::model::Config, positions: usize, dtype: DType) -> u64 {
    (2 * cfg.num_hidden_layers * cfg.num_kv_heads() * cfg.head_dim() * positions * dtype.size_in_bytes()) as u64
}

/// Bytes a decoding row holds for one step besides its cache: its hidden states, q/k/v and the
/// MLP's three (intermediate) tensors in the model's dtype, and its logits in that dtype and in
/// f32 for the sampling kernel.
fn step_bytes_per_row(cfg: &crate::model::Config, dtype: DType) -> u64 {
    let qkv = (cfg.num_attention_heads + 2 * cfg.num_kv_heads()) * cfg.head_dim();
    let activations = (6 * cfg.hidden_size + qkv + 3 * cfg.intermediate_size) * dtype.size_in_bytes();
    (activations + cfg.vocab_size * (dtype.size_in_bytes() + 4)) as u64
}

/// The rows at once that `free` bytes hold beside `reserve`, each taking `per_row`: `wanted`
/// where they all fit (0 where not even one does).
fn rows_that_fit(free: u64, reserve: u64, per_row: u64, wanted: usize) -> usize {
    let room = free.saturating_sub(reserve);
    wanted.min(usize::try_from(room / per_row.max(1)).unwrap_or(usize::MAX))
}

/// How a batch's KV cache holds its rows: in continuous batching with more than one completion
/// per prompt, each prompt's positions once in a slot of the prompt store and each row's slot
/// only those after them; otherwise each row's cache holds its prompt's positions too.
#[derive(Clone, Copy)]
struct SlotLayout {
    /// Rows at once, and the positions each holds.
    slots: usize,
    positions: usize,
    /// Prompt slots (0: no prompt store), and the positions each holds.
    prompt_slots: usize,
    prompt_positions: usize,
}

impl SlotLayout {
    fn of(prompts: &[Vec<u32>], opts: &SampleOptions, continuous: bool) -> SlotLayout {
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let slots = opts.batch_size.min(prompts.len() * opts.n);
        match continuous && opts.n > 1 {
            // A prompt keeps its slot while one of its rows decodes: at most one per row.
            true => SlotLayout {
                slots,
                positions: opts.max_tokens,
                prompt_slots: prompts.len().min(slots),
                prompt_positions: longest,
            },
            false => SlotLayout { slots, positions: longest + opts.max_tokens, prompt_slots: 0, prompt_positions: 0 },
        }
    }
}

/// The free slots of a [`SlotLayout`], and the rows still reading each prompt slot (none where
/// the layout has no prompt store).
struct Free {
    slots: Vec<usize>,
    prompt_slots: Vec<usize>,
    readers: Vec<usize>,
}

impl Free {
    fn new(layout: SlotLayout) -> Free {
        Free {
            slots: (0..layout.slots).rev().collect(),
            prompt_slots: (0..layout.prompt_slots).rev().collect(),
            readers: vec![0; layout.prompt_slots],
        }
    }

    fn stores_prompts(&self) -> bool {
        !self.readers.is_empty()
    }

    /// Whether a unit's rows (and prompts) find free slots.
    fn fits(&self, unit: &Unit) -> bool {
        let rows = unit.prompts.len() * unit.completions.len();
        rows <= self.slots.len() && (!self.stores_prompts() || unit.prompts.len() <= self.prompt_slots.len())
    }

    fn take_rows(&mut self, n: usize) -> Vec<usize> {
        self.slots.split_off(self.slots.len() - n)
    }

    /// Prompt slots for `prompts` prompts of `rows` rows each.
    fn take_prompt(&mut self, prompts: usize, rows: usize) -> Vec<usize> {
        let taken = self.prompt_slots.split_off(self.prompt_slots.len() - prompts);
        for &p in &taken {
            self.readers[p] = rows;
        }
        taken
    }

    /// Frees a finished row's slot, and its prompt's once no row reads it.
    fn release(&mut self, row: &SlotRow) {
        self.slots.push(row.slot);
        if self.stores_prompts() {
            self.readers[row.prompt_slot] -= 1;
            if self.readers[row.prompt_slot] == 0 {
                self.prompt_slots.push(row.prompt_slot);
            }
        }
    }
}

/// On the GPU, the options with `batch_size` lowered to the rows whose KV cache and decoding
/// step fit in the memory free now, where fewer than asked do (None where all fit, and on the
/// CPU): an allocation that fails midway fails the call, and a cell's retry would fail the same
/// way. The prefill of a batch's prompts and a gibibyte for the libraries' workspaces are held
/// back. Says so once per setting; an error where not even one row fits.
fn fit_to_gpu_memory(
    model: &Model,
    prompts: &[Vec<u32>],
    opts: &SampleOptions,
    continuous: bool,
) -> anyhow::Result<Option<SampleOptions>> {
    let Some((free, _total)) = gpu_memory(model.device())? else { return Ok(None) };
    let (cfg, dtype) = (model.config(), model.decoder.dtype);
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let layout = SlotLayout::of(prompts, opts, continuous);
    let positions = layout.positions;
    let rows: usize = prompts.len() * opts.n;
    let wanted = opts.batch_size.min(rows.max(1));
    // A group's prompts prefilled at once: their cache and about a dozen activations of each
    // position; and the prompt store.
    let group = group_prompts(opts.batch_size, opts, continuous);
    let prefill_tokens = (group * longest) as u64;
    let per_position = (8 * cfg.hidden_size + 3 * cfg.intermediate_size) * dtype.size_in_bytes();
    let reserve = (1u64 << 30)
        + prefill_tokens * (cache_bytes_per_row(cfg, 1, dtype) + per_position as u64)
        + layout.prompt_slots as u64 * cache_bytes_per_row(cfg, layout.prompt_positions, dtype);
    let per_row = cache_bytes_per_row(cfg, positions, dtype) + step_bytes_per_row(cfg, dtype);
    let fit = rows_that_fit(free as u64, reserve, per_row, wanted);
    let gib = |b: u64| b as f64 / 2f64.powi(30);
    anyhow::ensure!(
        fit >= 1,
        "sampling needs {:.2} GiB per row ({positions} positions of KV cache and a decoding step) beside {:.1} GiB \
         held back for the prefill and the libraries, and the GPU has {:.1} GiB free; lower max_tokens (now {}) or \
         free the GPU's memory (models and adapters no longer used)",
        gib(per_row),
        gib(reserve),
        gib(free as u64),
        opts.max_tokens
    );
    if fit >= wanted {
        return Ok(None);
    }
    static SAID: std::sync::Mutex<Option<(usize, usize)>> = std::sync::Mutex::new(None);
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    if *said != Some((opts.batch_size, fit)) {
        eprintln!(
            "sample: batch_size {} rows of {positions} positions need {:.1} GiB of KV cache and decoding steps; \
             the GPU has {:.1} GiB free, which holds {fit} rows at once: sampling {fit} at a time (set batch_size \
             to at most {fit} to keep it)",
            opts.batch_size,
            gib(per_row * wanted as u64 + reserve),
            gib(free as u64)
        );
        *said = Some((opts.batch_size, fit));
    }
    // The groups that the batch asked for, where they fit: a prompt's padding (its group's
    // longest prompt), and so its draws, then do not depend on the memory free.
    let mut fitted = opts.clone();
    fitted.batch_size = fit;
    fitted.group_size = if group.saturating_mul(opts.n.min(fit)) <= fit { group } else { 0 };
    Ok(Some(fitted))
}

/// The GPU's free and total memory (None on the CPU).
fn gpu_memory(device: &Device) -> anyhow::Result<Option<(usize, usize)>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return Ok(Some(crate::model::cuda::memory(dev)?));
    }
    let _ = device;
    Ok(None)
}

/// On the CPU, refuses a KV cache larger than the memory available, naming the settings to
/// lower: an allocation that fails aborts the process, losing the run.
fn check_cache_fits(
    cfg: &crate::model::Config,
    rows: usize,
    positions: usize,
    dtype: DType,
    device: &Device,
    opts: &SampleOptions,
) -> anyhow::Result<()> {
    if !device.is_cpu() {
        return Ok(()); // the GPU reports its own out-of-memory error, which a cell can retry
    }
    let bytes = cache_bytes_per_row(cfg, positions, dtype) as f64 * rows as f64;
    if let Some(available) = crate::lua::sys::available_memory_bytes() {
        anyhow::ensure!(
            bytes <= available as f64,
            "the KV cache of {rows} rows x {positions} positions needs {:.1} GiB, more than the {:.1} GiB of \
             memory available; lower batch_size (now {}) or max_tokens (now {})",
            bytes / 2f64.powi(30),
            available as f64 / 2f64.powi(30),
            opts.batch_size,
            opts.max_tokens
        );
    }
    Ok(())
}

/// Checks the tail of a row's text for a stop string (only the part not checked before).
fn hits_stop_string(model: &Model, row: &mut Row, stop: &[String]) -> anyhow::Result<bool> {
    let text = model.tokenizer.decode(&row.tokens, true)?;
    let longest = stop.iter().map(|s| s.len()).max().unwrap_or(0);
    let from = row.text_len_checked.saturating_sub(longest);
    let from = (0..=from).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    let hit = stop.iter().any(|s| text[from..].contains(s.as_str()));
    row.text_len_checked = text.len();
    Ok(hit)
}

/// Picks the next token of every live row from its logits (B, V); `step` counts the tokens
/// drawn before in this group.
fn choose_tokens(
    logits: &Tensor,
    rows: &mut [Row],
    live: &[usize],
    step: u32,
    opts: &SampleOptions,
) -> anyhow::Result<Vec<u32>> {
    // On the GPU the draw stays there; elsewhere only for the full distribution (Gumbel-max from
    // candle ops, no top-k or top-p cut).
    let full = opts.top_k == 0 && opts.top_p >= 1.0;
    if logits.device().is_cuda() || (!logits.device().is_cpu() && full) {
        let keys: Vec<i64> = live.iter().map(|&r| rows[r].key as i64).collect();
        return choose_on_device(logits, &keys, step, opts);
    }
    let logits = logits.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.contiguous()?;
    let vocab = logits.dim(1)?;
    let (storage, layout) = logits.storage_and_layout();
    let logits = crate::model::cpu::cpu_slice(&storage, layout, "logits")?;
    // Each row's stream is independent, so the live rows (logits slot, row) are drawn in parallel.
    let mut by_index: Vec<Option<&mut Row>> = rows.iter_mut().map(Some).collect();
    let picked: Vec<(usize, &mut Row)> =
        live.iter().enumerate().map(|(slot, &r)| (slot, by_index[r].take().expect("a row is live once"))).collect();
    let toks = crate::model::cpu::parts_on_pool(picked, |_, (slot, row)| {
        if row.done.is_some() {
            return 0;
        }
        sample_one(&logits[*slot * vocab..(*slot + 1) * vocab], &mut row.rng, opts)
    });
    Ok(toks)
}

/// Sampling on the GPU: greedy is an argmax; at temperature T the Gumbel-max trick,
/// argmax(logits / T + G) with G = -log(-log(U)), is an exact draw from softmax(logits / T), and
/// over the tokens a top-k or top-p cut keeps, from their renormalised distribution. Only one id
/// per row crosses to the host. With CUDA one fused kernel makes the cuts and draws U from a hash
/// of (the row's key, step, token id), so a GPU completion is reproducible and does not depend on
/// the batch it ran in; elsewhere (full distribution only) the noise comes from the device's
/// generator (seeded once per `sample` call) and does.
fn choose_on_device(logits: &Tensor, keys: &[i64], step: u32, opts: &SampleOptions) -> anyhow::Result<Vec<u32>> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        let keys = Tensor::new(keys, logits.device())?;
        let picked = crate::model::ops::sampling::cuda::gumbel_argmax(
            logits,
            &keys,
            step,
            opts.temperature,
            opts.top_k,
            opts.top_p,
        )?;
        return Ok(picked.to_vec1::<u32>()?);
    }
    let _ = (keys, step);
    let logits = logits.to_dtype(DType::F32)?; // (B, V)
    let scores = if opts.temperature == 0.0 {
        logits
    } else {
        let u = Tensor::rand(1e-10f32, 1.0 - 1e-7, logits.shape(), logits.device())?;
        let gumbel = u.log()?.neg()?.log()?.neg()?;
        ((logits / opts.temperature)? + gumbel)?
    };
    Ok(scores.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?)
}

/// Draws one token id from logits: greedy at temperature 0, else softmax(logits / T) cut to
/// top-k and the top-p nucleus, by inverse-CDF sampling with one uniform draw.
pub fn sample_one(logits: &[f32], rng: &mut ChaCha8Rng, opts: &SampleOptions) -> u32 {
    if opts.temperature == 0.0 {
        return argmax(logits);
    }
    let u: f64 = rng.gen();
    let inv_t = 1.0 / opts.temperature;
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    if opts.top_k == 0 && opts.top_p >= 1.0 {
        // Full distribution: no sort needed.
        let mut weights = vec![0f64; logits.len()];
        let total = softmax_weights(&mut weights, logits, max, inv_t);
        let mut target = u * total;
        for (i, w) in weights.iter().enumerate() {
            target -= w;
            if target < 0.0 {
                return i as u32;
            }
        }
        return argmax(logits);
    }
    let (idx, weights, keep) = match opts.top_k {
        k if k > 0 && k < logits.len() => top_k_cut(logits, max, inv_t, k, opts.top_p),
        _ => nucleus_cut(logits, max, inv_t, opts.top_p),
    };
    let kept: f64 = weights[..keep].iter().sum();
    let mut target = u * kept;
    for k in 0..keep {
        target -= weights[k];
        if target < 0.0 {
            return idx[k];
        }
    }
    idx[keep - 1]
}

/// Most likely first, ties by id: the order in which the cuts keep tokens.
fn by_likelihood(logits: &[f32]) -> impl Fn(&u32, &u32) -> std::cmp::Ordering + '_ {
    |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b))
}

/// The nucleus of a distribution: how many of the first `weights` (in order) reach `top_p` of
/// `total`; all of them where none does.
fn nucleus_len(weights: &[f64], total: f64, top_p: f64) -> Option<usize> {
    if top_p >= 1.0 {
        return None;
    }
    let mut acc = 0.0;
    for (k, w) in weights.iter().enumerate() {
        acc += w / total;
        if acc >= top_p {
            return Some(k + 1);
        }
    }
    None
}

/// The top-k cut, then the nucleus of those k: their ids most likely first, their weights
/// e^((x - max) / T), and how many the nucleus keeps. The k are picked by selection, and only
/// they are sorted.
fn top_k_cut(logits: &[f32], max: f64, inv_t: f64, top_k: usize, top_p: f64) -> (Vec<u32>, Vec<f64>, usize) {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    idx.select_nth_unstable_by(top_k - 1, by_likelihood(logits));
    idx.truncate(top_k);
    idx.sort_unstable_by(by_likelihood(logits));
    let weights: Vec<f64> = idx.iter().map(|&i| ((logits[i as usize] as f64 - max) * inv_t).exp()).collect();
    let total: f64 = weights.iter().sum();
    let keep = nucleus_len(&weights, total, top_p).unwrap_or(weights.len());
    (idx, weights, keep)
}

/// Bins of a row's tokens by how far below the best logit they lie, half a nat of weight each;
/// the last holds everything further down.
const NUCLEUS_BINS: usize = 64; // a token's bin fits a byte

/// The top-p nucleus of the whole vocabulary: its ids most likely first, their weights, and
/// their count. Sorting the vocabulary is most of a step's cost for a small model, and the
/// nucleus is usually a few hundred tokens at most; so the tokens are binned by logit first
/// (each bin a range of logits, so the bins up to any one hold a prefix of the sorted order),
/// and only the bins that hold the nucleus are sorted. Should those fall short of `top_p` by
/// rounding, the whole vocabulary is sorted.
fn nucleus_cut(logits: &[f32], max: f64, inv_t: f64, top_p: f64) -> (Vec<u32>, Vec<f64>, usize) {
    let mut all = vec![0f64; logits.len()];
    let total = softmax_weights(&mut all, logits, max, inv_t);
    // Each token's bin, kept for picking the candidates below.
    let bins: Vec<u8> =
        logits.iter().map(|&x| (((max - x as f64) * inv_t * 2.0) as usize).min(NUCLEUS_BINS - 1) as u8).collect();
    let mut mass = [0f64; NUCLEUS_BINS];
    for (&b, w) in bins.iter().zip(&all) {
        mass[b as usize] += w;
    }
    // The first bins whose mass passes top_p with a margin far above the sums' rounding.
    let mut last = NUCLEUS_BINS - 1;
    let mut acc = 0.0;
    for (b, m) in mass.iter().enumerate() {
        acc += m;
        if acc >= (top_p + 1e-9) * total {
            last = b;
            break;
        }
    }
    let sorted = |mut idx: Vec<u32>| {
        idx.sort_unstable_by(by_likelihood(logits));
        let weights: Vec<f64> = idx.iter().map(|&i| all[i as usize]).collect();
        (idx, weights)
    };
    if last < NUCLEUS_BINS - 1 {
        let (idx, weights) = sorted((0..logits.len() as u32).filter(|&i| bins[i as usize] as usize <= last).collect());
        if let Some(keep) = nucleus_len(&weights, total, top_p) {
            return (idx, weights, keep);
        }
    }
    let (idx, weights) = sorted((0..logits.len() as u32).collect());
    let keep = nucleus_len(&weights, total, top_p).unwrap_or(weights.len());
    (idx, weights, keep)
}

crate::model::cpu::vectorised!(softmax_weights_into(weights: &mut [f64], logits: &[f32], max: f64, inv_t: f64, lanes: &mut [f64; 8]) {
    for (w, &x) in weights.iter_mut().zip(logits) {
        *w = crate::model::cpu::exp_f64((x as f64 - max) * inv_t);
    }
    for chunk in weights.chunks(8) {
        for (lane, w) in lanes.iter_mut().zip(chunk) {
            *lane += w;
        }
    }
});

/// The unnormalised weights e^((x - max) / T) of the logits, into `weights`, and their sum.
fn softmax_weights(weights: &mut [f64], logits: &[f32], max: f64, inv_t: f64) -> f64 {
    let mut lanes = [0f64; 8];
    softmax_weights_into(weights, logits, max, inv_t, &mut lanes);
    lanes.iter().sum()
}

fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// Additive prefill mask (P, 1, L, L): causal, with padded keys hidden. A padded query row
/// may see itself so that its softmax stays finite (its output is never used).
pub fn prefill_mask(pads: &[usize], l: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mut data = Vec::with_capacity(pads.len() * l * l);
    for &pad in pads {
        for i in 0..l {
            for j in 0..l {
                let visible = j <= i && (j >= pad || j == i);
                data.push(if visible { 0f32 } else { f32::NEG_INFINITY });
            }
        }
    }
    Tensor::from_vec(data, (pads.len(), 1, l, l), device)
}

/// Additive decode mask (B, 1, 1, S): each row's padding hidden.
pub fn decode_mask(pads: &[usize], s: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mut data = Vec::with_capacity(pads.len() * s);
    for &pad in pads {
        data.extend((0..s).map(|j| if j >= pad { 0f32 } else { f32::NEG_INFINITY }));
    }
    Tensor::from_vec(data, (pads.len(), 1, 1, s), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen25_7b() -> crate::model::Config {
        let text = std::fs::read_to_string("scripts/bench/configs/qwen2.5-7b.json").unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn slot_row(slot: usize, prompt_slot: usize) -> SlotRow {
        SlotRow { row: 0, slot, prompt_slot, prompt_len: 3, held: 3, pos: 3, next: 0, step: 0 }
    }

    #[test]
    fn rows_of_a_prompt_share_its_slot_in_the_prompt_store_only_with_several_completions() {
        let prompts = vec![vec![1; 5], vec![2; 9], vec![3; 7]];
        let opts = |n, batch_size| SampleOptions { n, batch_size, max_tokens: 100, ..Default::default() };
        // Three prompts of 9 tokens at most, ten completions each, 16 rows at once: each row's
        // slot holds its 100 new positions, and a prompt slot per prompt its 9 at most.
        let shared = SlotLayout::of(&prompts, &opts(10, 16), true);
        assert_eq!((shared.slots, shared.positions, shared.prompt_slots, shared.prompt_positions), (16, 100, 3, 9));
        // One completion per prompt, or decoding in groups: each row holds its prompt.
        for layout in [SlotLayout::of(&prompts, &opts(1, 16), true), SlotLayout::of(&prompts, &opts(10, 16), false)] {
            assert_eq!((layout.positions, layout.prompt_slots), (109, 0));
        }
        assert_eq!(SlotLayout::of(&prompts, &opts(1, 16), true).slots, 3);
    }

    #[test]
    fn a_prompts_slot_is_freed_with_the_last_of_its_rows_and_a_unit_waits_for_free_prompt_slots() {
        let layout = SlotLayout { slots: 6, positions: 10, prompt_slots: 2, prompt_positions: 4 };
        let mut free = Free::new(layout);
        let unit = Unit { prompts: vec![0], completions: 0..3 };
        assert!(free.fits(&unit));
        let (rows, prompt) = (free.take_rows(3), free.take_prompt(1, 3));
        let (more, second) = (free.take_rows(2), free.take_prompt(1, 2));
        assert_ne!(prompt, second);
        // Slots for three rows but no prompt slot left.
        free.release(&slot_row(more[0], second[0]));
        assert!(free.slots.len() == 2 && !free.fits(&Unit { prompts: vec![1], completions: 0..1 }));
        free.release(&slot_row(more[1], second[0]));
        assert!(free.fits(&Unit { prompts: vec![1], completions: 0..3 }));
        for &slot in &rows[..2] {
            free.release(&slot_row(slot, prompt[0]));
        }
        assert_eq!(free.prompt_slots, vec![second[0]]);
        free.release(&slot_row(rows[2], prompt[0]));
        assert_eq!((free.slots.len(), free.prompt_slots.len()), (6, 2));
    }

    #[test]
    fn a_row_of_qwen25_7b_holds_56_kib_of_cache_per_position_in_bf16() {
        // 28 layers x 4 kv heads x 128 x (key, value) x 2 bytes
        assert_eq!(cache_bytes_per_row(&qwen25_7b(), 1, DType::BF16), 57_344);
        assert_eq!(cache_bytes_per_row(&qwen25_7b(), 612, DType::BF16), 612 * 57_344);
    }

    #[test]
    fn the_rows_that_fit_are_those_asked_for_or_as_many_as_the_memory_beside_the_reserve_holds() {
        assert_eq!(rows_that_fit(1000, 100, 10, 50), 50);
        assert_eq!(rows_that_fit(1000, 100, 10, 90), 90);
        assert_eq!(rows_that_fit(1000, 100, 10, 91), 90);
        assert_eq!(rows_that_fit(1000, 100, 10, 5000), 90);
        assert_eq!(rows_that_fit(99, 100, 10, 5), 0);
        assert_eq!(rows_that_fit(1000, 0, 0, 7), 7);
    }

    #[test]
    fn a_decoding_rows_step_is_small_beside_its_cache_at_the_studys_length() {
        // Qwen2.5-7B in bf16, 100-token prompts and 512 new tokens: the logits (152k) and
        // activations of a step take about a megabyte, a thirtieth of the row's 35 MB of cache.
        let cfg = qwen25_7b();
        let step = step_bytes_per_row(&cfg, DType::BF16);
        assert_eq!(step, ((6 * 3584 + 36 * 128 + 3 * 18944) * 2 + 152_064 * 6) as u64);
        assert!(step * 30 < cache_bytes_per_row(&cfg, 612, DType::BF16));
    }

    fn opts(temperature: f64, top_p: f64, top_k: usize) -> SampleOptions {
        SampleOptions { temperature, top_p, top_k, ..Default::default() }
    }

    #[test]
    fn temperature_zero_is_greedy() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(sample_one(&[0.1, 3.0, 2.0], &mut rng, &opts(0.0, 1.0, 0)), 1);
    }

    #[test]
    fn top_k_one_always_picks_the_best_token() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..100 {
            assert_eq!(sample_one(&[0.0, 0.5, 0.4, 0.1], &mut rng, &opts(1.0, 1.0, 1)), 1);
        }
    }

    #[test]
    fn full_distribution_draws_equal_those_of_libms_exp_and_a_running_sum() {
        // The draw before the weights were vectorised, for a vocabulary-sized row.
        fn reference(logits: &[f32], rng: &mut ChaCha8Rng) -> u32 {
            let u: f64 = rng.gen();
            let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let weights: Vec<f64> = logits.iter().map(|&x| (x as f64 - max).exp()).collect();
            let mut target = u * weights.iter().sum::<f64>();
            for (i, w) in weights.iter().enumerate() {
                target -= w;
                if target < 0.0 {
                    return i as u32;
                }
            }
            unreachable!("the weights sum to the total")
        }
        let mut values = ChaCha8Rng::seed_from_u64(11);
        for row in 0..400u64 {
            let logits: Vec<f32> = (0..5003).map(|_| values.gen_range(-12.0f32..12.0)).collect();
            let (mut a, mut b) = (ChaCha8Rng::seed_from_u64(row), ChaCha8Rng::seed_from_u64(row));
            assert_eq!(sample_one(&logits, &mut a, &opts(1.0, 1.0, 0)), reference(&logits, &mut b), "row {row}");
        }
    }

    #[test]
    fn cut_draws_equal_those_of_sorting_the_whole_vocabulary() {
        // The draw before the cuts sorted only the tokens they can keep.
        fn reference(logits: &[f32], rng: &mut ChaCha8Rng, o: &SampleOptions) -> u32 {
            let u: f64 = rng.gen();
            let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
            idx.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
            if o.top_k > 0 {
                idx.truncate(o.top_k);
            }
            let weights: Vec<f64> =
                idx.iter().map(|&i| ((logits[i as usize] as f64 - max) / o.temperature).exp()).collect();
            let total: f64 = weights.iter().sum();
            let mut keep = weights.len();
            let mut acc = 0.0;
            for (k, w) in weights.iter().enumerate() {
                acc += w / total;
                if o.top_p < 1.0 && acc >= o.top_p {
                    keep = k + 1;
                    break;
                }
            }
            let mut target = u * weights[..keep].iter().sum::<f64>();
            for k in 0..keep {
                target -= weights[k];
                if target < 0.0 {
                    return idx[k];
                }
            }
            idx[keep - 1]
        }
        let mut values = ChaCha8Rng::seed_from_u64(13);
        // (temperature, top_p, top_k, logits' spread): peaked and flat rows, a nucleus of nearly
        // everything, top-k alone and both cuts, and top-k past the vocabulary.
        let cases = [
            (0.7, 0.95, 0, 12.0f32),
            (1.0, 0.5, 0, 12.0),
            (1.0, 0.9, 0, 0.5),
            (1.3, 0.999_999, 0, 3.0),
            (1.0, 1.0, 40, 12.0),
            (0.8, 0.9, 200, 2.0),
            (1.0, 1.0, 9000, 4.0),
        ];
        for (case, &(temperature, top_p, top_k, spread)) in cases.iter().enumerate() {
            let o = opts(temperature, top_p, top_k);
            for row in 0..60u64 {
                let mut logits: Vec<f32> = (0..5003).map(|_| values.gen_range(-spread..spread)).collect();
                logits[17] = logits[3]; // a tie, broken by id
                let (mut a, mut b) = (ChaCha8Rng::seed_from_u64(row), ChaCha8Rng::seed_from_u64(row));
                let (got, want) = (sample_one(&logits, &mut a, &o), reference(&logits, &mut b, &o));
                assert_eq!(got, want, "case {case}, row {row}");
            }
        }
    }

    #[test]
    fn sampling_frequencies_follow_the_softmax() {
        // logits ln(1), ln(2), ln(7): probabilities 0.1, 0.2, 0.7
        let logits = [0f32, 2f32.ln(), 7f32.ln()];
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut counts = [0usize; 3];
        let n = 20_000;
        for _ in 0..n {
            counts[sample_one(&logits, &mut rng, &opts(1.0, 1.0, 0)) as usize] += 1;
        }
        for (c, p) in counts.iter().zip([0.1, 0.2, 0.7]) {
            let f = *c as f64 / n as f64;
            // 5 standard errors of a binomial proportion
            assert!((f - p).abs() < 5.0 * (p * (1.0 - p) / n as f64).sqrt(), "{f} vs {p}");
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // probabilities 0.1, 0.2, 0.7: top_p 0.75 keeps {0.7, 0.2}, never token 0
        let logits = [0f32, 2f32.ln(), 7f32.ln()];
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..2000 {
            assert_ne!(sample_one(&logits, &mut rng, &opts(1.0, 0.75, 0)), 0);
        }
    }

    #[test]
    fn a_continuous_batch_takes_groups_that_fill_it_exactly_at_most_an_eighth_of_it() {
        assert_eq!(continuous_group(84), 7); // the study's 840 rows of n = 10: twelve groups
        assert_eq!(continuous_group(64), 8);
        assert_eq!(continuous_group(83), 1); // a prime: one prompt at a time
        assert_eq!(continuous_group(6), 1);
        assert_eq!(continuous_group(1), 1);
    }

    #[test]
    fn padded_rows_never_see_their_padding() {
        let m = prefill_mask(&[2], 4, &Device::Cpu).unwrap().reshape((4, 4)).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m[3][0], f32::NEG_INFINITY);
        assert_eq!(m[3][2], 0.0);
        assert_eq!(m[2][2], 0.0);
        assert_eq!(m[0][0], 0.0, "a pad query sees itself");
    }
}
