//! Log-probabilities under teacher forcing: how likely the model finds a given continuation.
//!
//! Each sequence is a prompt followed by the tokens to score. Sequences are taken in batches,
//! right-padded to the batch's longest: under the causal mask a token never sees the padding that
//! follows it, so every row gives exactly what it would alone, at positions 0.., with the fast
//! causal attention path. Only the rows of the hidden states that predict a scored token go
//! through the output projection, in chunks, so the (rows x vocab) logits stay small.
//!
//! Shapes: B sequences in a batch, T longest of them, D hidden size, V vocab, N scored positions.

use candle_core::Tensor;

use crate::adapter::Adapter;
use crate::model::decoder::Mask;
use crate::model::{Model, Pass};

/// One sequence to score: the prompt's token ids, then those of the continuation.
#[derive(Debug, Clone)]
pub struct Sequence {
    pub prompt: Vec<u32>,
    pub continuation: Vec<u32>,
}

/// How to score.
#[derive(Debug, Clone)]
pub struct LogprobOptions {
    /// Sequences run through the model at once.
    pub batch_size: usize,
    /// Alternatives kept per scored position (0: none), and for the next token after the whole
    /// sequence.
    pub top_k: usize,
}

impl Default for LogprobOptions {
    fn default() -> Self {
        LogprobOptions { batch_size: 8, top_k: 0 }
    }
}

/// The scores of one sequence.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scored {
    /// log p(continuation[i] | prompt, continuation[..i]), natural log.
    pub logprobs: Vec<f32>,
    /// For each continuation token, the `top_k` most likely tokens at its position:
    /// (id, log-probability), most likely first. Empty when `top_k` is 0.
    pub top: Vec<Vec<(u32, f32)>>,
    /// The `top_k` most likely tokens after the whole sequence (empty when `top_k` is 0).
    pub next: Vec<(u32, f32)>,
}

impl Scored {
    pub fn sum(&self) -> f64 {
        self.logprobs.iter().map(|&x| x as f64).sum()
    }
}

/// Rows of logits computed at once: 1024 x 152k f32 is 620 MB.
const CHUNK_ROWS: usize = 1024;

/// Scores every sequence; results in the order given.
pub fn logprobs(
    model: &Model,
    adapter: Option<&Adapter>,
    seqs: &[Sequence],
    opts: &LogprobOptions,
) -> anyhow::Result<Vec<Scored>> {
    anyhow::ensure!(opts.batch_size >= 1, "batch_size must be >= 1 (got {})", opts.batch_size);
    let vocab = model.config().vocab_size;
    for (i, s) in seqs.iter().enumerate() {
        anyhow::ensure!(!s.prompt.is_empty(), "sequence {}: the prompt has no tokens (nothing to condition on)", i + 1);
        if let Some(&bad) = s.prompt.iter().chain(&s.continuation).find(|&&t| t as usize >= vocab) {
            anyhow::bail!("sequence {}: token id {bad} is outside the vocabulary (0..{vocab})", i + 1);
        }
    }
    // Batches of similar lengths waste less padding; results are put back in the given order.
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].prompt.len() + seqs[i].continuation.len());
    let mut out = vec![Scored::default(); seqs.len()];
    for batch in order.chunks(opts.batch_size) {
        crate::interrupt::check()?;
        let scored = score_batch(model, adapter, &batch.iter().map(|&i| &seqs[i]).collect::<Vec<_>>(), opts)?;
        for (&i, s) in batch.iter().zip(scored) {
            out[i] = s;
        }
    }
    Ok(out)
}

/// One batch: a forward pass over the right-padded sequences, then the scored rows.
fn score_batch(
    model: &Model,
    adapter: Option<&Adapter>,
    seqs: &[&Sequence],
    opts: &LogprobOptions,
) -> anyhow::Result<Vec<Scored>> {
    let dec = &model.decoder;
    let device = &dec.device;
    let b = seqs.len();
    let t = seqs.iter().map(|s| s.prompt.len() + s.continuation.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(b * t);
    for s in seqs {
        let len = s.prompt.len() + s.continuation.len();
        ids.extend(s.prompt.iter().chain(&s.continuation));
        ids.extend(std::iter::repeat_n(0u32, t - len));
    }
    let ids = Tensor::from_vec(ids, (b, t), device)?;
    let mask = Mask::causal(t, device)?;
    let hidden = dec.forward_hidden(&ids, 0, Some(&mask), None, Pass::infer(adapter))?; // (B, T, D)
    let d = hidden.dim(2)?;
    let hidden = hidden.reshape((b * t, d))?;

    // The rows that predict something: for sequence r, positions prompt-1 .. len-2 predict the
    // continuation's tokens; with top_k, position len-1 predicts the next token.
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (r, s) in seqs.iter().enumerate() {
        let p = s.prompt.len();
        for (j, &tok) in s.continuation.iter().enumerate() {
            rows.push((r * t + p - 1 + j) as u32);
            targets.push(tok);
        }
        if opts.top_k > 0 {
            rows.push((r * t + p + s.continuation.len() - 1) as u32);
            targets.push(0); // not a scored token: only its top-k is read
        }
    }
    let (picked, top) = score_rows(model, &hidden, &rows, &targets, opts.top_k)?;

    let mut out = Vec::with_capacity(b);
    let mut at = 0;
    for s in seqs {
        let n = s.continuation.len();
        let mut scored = Scored { logprobs: picked[at..at + n].to_vec(), ..Default::default() };
        if opts.top_k > 0 {
            scored.top = top[at..at + n].to_vec();
            scored.next = top[at + n].clone();
            at += 1;
        }
        at += n;
        out.push(scored);
    }
    Ok(out)
}

/// Per row: the (token id, log-probability) alternatives with the highest log-probabilities.
type TopK = Vec<Vec<(u32, f32)>>;

/// hidden (B*T, D); for each selected row, the log-probability of its target and, with top_k,
/// its top_k (id, log-probability).
fn score_rows(
    model: &Model,
    hidden: &Tensor,
    rows: &[u32],
    targets: &[u32],
    top_k: usize,
) -> anyhow::Result<(Vec<f32>, TopK)> {
    let device = hidden.device();
    let mut picked = Vec::with_capacity(rows.len());
    let mut top = Vec::new();
    for (chunk, chunk_targets) in rows.chunks(CHUNK_ROWS).zip(targets.chunks(CHUNK_ROWS)) {
        let n = chunk.len();
        let h = hidden.index_select(&Tensor::new(chunk, device)?, 0)?; // (N, D)
        let logits = model.decoder.logits(&h.unsqueeze(0)?)?.squeeze(0)?; // (N, V) f32
        let logp = candle_nn::ops::log_softmax(&logits, 1)?;
        let t = Tensor::new(chunk_targets, device)?.reshape((n, 1))?;
        picked.extend(logp.gather(&t, 1)?.squeeze(1)?.to_vec1::<f32>()?);
        if top_k > 0 {
            // One copy of the chunk, not one per row.
            top.extend(logp.to_vec2::<f32>()?.iter().map(|row| top_of(row, top_k)));
        }
    }
    Ok((picked, top))
}

/// The k largest entries of `xs`, largest first, ties by lower id.
fn top_of(xs: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..xs.len() as u32).collect();
    let k = k.min(xs.len());
    let by_value = |a: &u32, b: &u32| xs[*b as usize].total_cmp(&xs[*a as usize]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k, by_value);
        idx.truncate(k);
    }
    idx.sort_by(by_value);
    idx.into_iter().map(|i| (i, xs[i as usize])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_of_returns_the_largest_first_and_breaks_ties_by_id() {
        let xs = [0.1, 0.5, -1.0, 0.5, 0.3];
        assert_eq!(top_of(&xs, 3), vec![(1, 0.5), (3, 0.5), (4, 0.3)]);
        assert_eq!(top_of(&xs, 10).len(), 5);
    }
}
