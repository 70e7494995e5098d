//! Training data: rows in the common JSONL shapes, tokenized with a loss mask.
//!
//! Row shapes (as TRL reads them):
//! - `{"messages": [{role, content}, ...]}`, multi-turn allowed;
//! - `{"prompt": [...messages] | "text", "completion": [...messages] | "text"}`;
//! - `{"text": "..."}`.
//!
//! An [`Example`] is the token ids of a row and, per token, whether it is a training target
//! (the model is trained to predict token t from tokens < t wherever `target[t]` is set).

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::model::{Message, TextTokenizer};

/// One training row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Row {
    Messages {
        messages: Vec<Message>,
    },
    /// Already tokenized; every token is trained.
    Ids {
        input_ids: Vec<u32>,
    },
    PromptCompletion {
        prompt: Turns,
        completion: Turns,
    },
    Text {
        text: String,
    },
}

/// A prompt or completion: chat messages or plain text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Turns {
    Messages(Vec<Message>),
    Text(String),
}

/// Rows with the place they came from, for error messages.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub rows: Vec<Row>,
    pub source: String,
    /// Malformed lines that were skipped (only when asked to skip).
    pub skipped: Vec<String>,
}

impl Dataset {
    /// Reads a JSONL file. A malformed line is an error naming file and line, unless
    /// `skip_malformed`, in which case it is skipped and listed in `skipped`.
    pub fn jsonl(path: &Path, skip_malformed: bool) -> anyhow::Result<Dataset> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read data file {}", path.display()))?;
        // A UTF-8 byte order mark (some editors write one) is not part of the first row.
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
        let mut rows = Vec::new();
        let mut skipped = Vec::new();
        for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            let parsed = match std::str::from_utf8(raw) {
                Ok(line) if line.trim().is_empty() => continue,
                Ok(line) => parse_row(line),
                Err(e) => Err(anyhow::anyhow!(
                    "not UTF-8 text (byte {} of the line); save the file as UTF-8",
                    e.valid_up_to() + 1
                )),
            };
            match parsed {
                Ok(r) => rows.push(r),
                Err(e) => {
                    let msg = format!("{}:{}: {e}", path.display(), i + 1);
                    if skip_malformed {
                        skipped.push(msg);
                    } else {
                        anyhow::bail!("{msg}\nHINT: each line must be one JSON object with \"messages\", \"prompt\"/\"completion\" or \"text\" (pass on_error = \"skip\" to skip bad lines)");
                    }
                }
            }
        }
        anyhow::ensure!(!rows.is_empty(), "{}: no rows", path.display());
        Ok(Dataset { rows, source: path.display().to_string(), skipped })
    }
}

fn parse_row(line: &str) -> anyhow::Result<Row> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("not valid JSON ({e})"))?;
    row_from_json(v)
}

/// Checks a JSON value's shape and names what is wrong.
pub fn row_from_json(v: serde_json::Value) -> anyhow::Result<Row> {
    let obj = v.as_object().ok_or_else(|| anyhow::anyhow!("a row must be a JSON object"))?;
    let known = ["messages", "prompt", "completion", "text", "input_ids"];
    let shape = if obj.contains_key("messages") {
        "messages"
    } else if obj.contains_key("input_ids") {
        "input_ids"
    } else if obj.contains_key("prompt") || obj.contains_key("completion") {
        "prompt/completion"
    } else if obj.contains_key("text") {
        "text"
    } else {
        let keys: Vec<&String> = obj.keys().collect();
        anyhow::bail!("row has none of the keys {known:?} (it has {keys:?})");
    };
    let row: Row = serde_json::from_value(v.clone()).map_err(|e| anyhow::anyhow!("not a valid {shape} row ({e})"))?;
    if let Row::Messages { messages } = &row {
        anyhow::ensure!(!messages.is_empty(), "\"messages\" is empty");
        for (i, m) in messages.iter().enumerate() {
            anyhow::ensure!(
                ["system", "user", "assistant"].contains(&m.role.as_str()),
                "message {} has role '{}'; expected system, user or assistant",
                i + 1,
                m.role
            );
        }
    }
    Ok(row)
}

/// Which tokens of a row are trained.
#[derive(Debug, Clone, PartialEq)]
pub enum LossMask {
    /// Only the final assistant turn, its end-of-turn token included.
    LastAssistant,
    /// Every assistant turn.
    AllAssistant,
    /// The completion of prompt/completion rows (or the last assistant turn of messages).
    Completion,
    /// Only the tokens of `marker` inside the completion plus the completion's last token
    /// (the end of turn); rows without the marker train only that last token.
    MarkerOnly { marker: String },
    /// Every token (plain text rows).
    All,
}

/// A tokenized row.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// `target[t]`: token t is predicted from tokens < t and counts in the loss (t >= 1).
    pub target: Vec<bool>,
}

impl Example {
    pub fn num_targets(&self) -> usize {
        self.target.iter().skip(1).filter(|&&x| x).count()
    }
}

/// Far more bytes than a token of natural text averages (about 4 for English in these
/// vocabularies): a row of more than `max_length` times as many bytes cannot fit in
/// `max_length` tokens.
const MAX_BYTES_PER_TOKEN: usize = 64;

/// The bytes of text a row holds (token ids count 4 each).
fn row_bytes(row: &Row) -> usize {
    let turns = |t: &Turns| match t {
        Turns::Messages(m) => m.iter().map(|m| m.content.len()).sum(),
        Turns::Text(s) => s.len(),
    };
    match row {
        Row::Messages { messages } => messages.iter().map(|m| m.content.len()).sum(),
        Row::Ids { input_ids } => 4 * input_ids.len(),
        Row::PromptCompletion { prompt, completion } => turns(prompt) + turns(completion),
        Row::Text { text } => text.len(),
    }
}

/// Tokenizes a row with the model's chat template and marks its trained tokens.
pub fn tokenize(tok: &TextTokenizer, row: &Row, mask: &LossMask, max_length: usize) -> anyhow::Result<Example> {
    Ok(tokenize_counting_cut(tok, row, mask, max_length)?.0)
}

/// [`tokenize`], also returning how many trained tokens `max_length` cut off.
pub fn tokenize_counting_cut(
    tok: &TextTokenizer,
    row: &Row,
    mask: &LossMask,
    max_length: usize,
) -> anyhow::Result<(Example, usize)> {
    // Tokenizing a huge row whole would take gigabytes for tokens that max_length drops.
    let bound = max_length.saturating_mul(MAX_BYTES_PER_TOKEN);
    let bytes = row_bytes(row);
    anyhow::ensure!(
        matches!(row, Row::Text { .. } | Row::Ids { .. }) || bytes <= bound,
        "the row holds {:.1} MB of text, more than max_length = {max_length} tokens can hold (about {} \
         bytes); shorten the row or raise max_length",
        bytes as f64 / 1e6,
        bound
    );
    let (mut ids, mut target) = match row {
        Row::Text { text } => {
            // Only a prefix of plain text can be trained: cut it before tokenizing.
            let mut cut = text.len().min(bound);
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            let ids = tok.encode(&text[..cut])?;
            let n = ids.len();
            (ids, vec![true; n])
        }
        Row::Messages { messages } => messages_example(tok, messages, mask)?,
        Row::Ids { input_ids } => (input_ids.clone(), vec![true; input_ids.len()]),
        Row::PromptCompletion { prompt, completion } => prompt_completion_example(tok, prompt, completion, mask)?,
    };
    let cut = target.iter().skip(max_length.max(1)).filter(|&&t| t).count();
    ids.truncate(max_length);
    target.truncate(max_length);
    Ok((Example { ids, target }, cut))
}

fn messages_example(
    tok: &TextTokenizer,
    messages: &[Message],
    mask: &LossMask,
) -> anyhow::Result<(Vec<u32>, Vec<bool>)> {
    let full = tok.chat_prompt(messages, false)?;
    let ids = tok.encode(&full)?;
    let mut target = vec![false; ids.len()];
    let assistant_turns: Vec<usize> =
        messages.iter().enumerate().filter(|(_, m)| m.role == "assistant").map(|(i, _)| i).collect();
    anyhow::ensure!(
        !assistant_turns.is_empty() || matches!(mask, LossMask::All),
        "row has no assistant message to train on"
    );
    if !matches!(mask, LossMask::All | LossMask::AllAssistant) {
        let last = messages.last().map(|m| m.role.as_str()).unwrap_or("");
        anyhow::ensure!(
            last == "assistant",
            "the row's last turn is a {last} turn, so there is no final assistant turn to train on (the \
             loss mask trains the last turn only); end the row with its assistant answer, or drop the row"
        );
    }
    let turns: Vec<usize> = match mask {
        LossMask::AllAssistant => assistant_turns,
        LossMask::All => {
            target.iter_mut().for_each(|t| *t = true);
            return Ok((ids, target));
        }
        _ => vec![*assistant_turns.last().unwrap()],
    };
    for k in turns {
        let span = turn_span(tok, messages, k, &ids)?;
        if let LossMask::MarkerOnly { marker } = mask {
            mark_marker(tok, &full, &ids, span, marker, &mut target)?;
        } else {
            target[span.0..span.1].iter_mut().for_each(|t| *t = true);
        }
    }
    Ok((ids, target))
}

/// Token range [start, end) of assistant turn `k`: from the end of the generation prompt that
/// precedes it up to and including its end-of-turn token.
fn turn_span(tok: &TextTokenizer, messages: &[Message], k: usize, ids: &[u32]) -> anyhow::Result<(usize, usize)> {
    let prefix = tok.chat_prompt(&messages[..k], true)?;
    let prefix_ids = tok.encode(&prefix)?;
    anyhow::ensure!(
        ids.starts_with(&prefix_ids),
        "the chat template renders the conversation so that its prefix does not tokenize as a prefix; cannot locate the assistant turn"
    );
    let start = prefix_ids.len();
    let end = ids[start..].iter().position(|t| tok.stop_ids.contains(t)).map(|p| start + p + 1).unwrap_or(ids.len());
    Ok((start, end))
}

fn prompt_completion_example(
    tok: &TextTokenizer,
    prompt: &Turns,
    completion: &Turns,
    mask: &LossMask,
) -> anyhow::Result<(Vec<u32>, Vec<bool>)> {
    match (prompt, completion) {
        (Turns::Messages(p), Turns::Messages(c)) => {
            let mut all = p.clone();
            all.extend(c.iter().cloned());
            let full = tok.chat_prompt(&all, false)?;
            let ids = tok.encode(&full)?;
            let mut target = vec![false; ids.len()];
            let span = turn_span(tok, &all, p.len(), &ids)?;
            // The completion may hold several turns: train to the last end-of-turn token.
            let end = if c.len() > 1 {
                ids.iter().rposition(|t| tok.stop_ids.contains(t)).map(|x| x + 1).unwrap_or(ids.len())
            } else {
                span.1
            };
            if let LossMask::MarkerOnly { marker } = mask {
                mark_marker(tok, &full, &ids, (span.0, end), marker, &mut target)?;
            } else {
                target[span.0..end].iter_mut().for_each(|t| *t = true);
            }
            Ok((ids, target))
        }
        (Turns::Text(p), Turns::Text(c)) => {
            let p_ids = tok.encode(p)?;
            let ids = tok.encode(&format!("{p}{c}"))?;
            let start = if ids.starts_with(&p_ids) { p_ids.len() } else { p_ids.len().min(ids.len()) };
            let mut target = vec![false; ids.len()];
            let full = format!("{p}{c}");
            if let LossMask::MarkerOnly { marker } = mask {
                mark_marker(tok, &full, &ids, (start, ids.len()), marker, &mut target)?;
            } else {
                target[start..].iter_mut().for_each(|t| *t = true);
            }
            Ok((ids, target))
        }
        _ => anyhow::bail!("prompt and completion must both be text or both be lists of messages"),
    }
}

/// Marks the tokens of every occurrence of `marker` within the span, plus the span's last token.
fn mark_marker(
    tok: &TextTokenizer,
    _full: &str,
    ids: &[u32],
    span: (usize, usize),
    marker: &str,
    target: &mut [bool],
) -> anyhow::Result<()> {
    let (start, end) = span;
    if end > start {
        target[end - 1] = true;
    }
    // Byte offsets of each token within the decoded span. A token's length is what it adds to
    // the decoding of the few tokens before it: a character split over tokens (at most 4 bytes)
    // is whole within the window, and the time stays linear in the row's length (decoding
    // each whole prefix took minutes on 100 KB rows).
    const WINDOW: usize = 8;
    let mut pieces = Vec::with_capacity(end - start);
    let mut offset = 0;
    for t in start..end {
        let w = t.saturating_sub(WINDOW).max(start);
        let with = tok.decode(&ids[w..=t], false)?.len();
        let without = if w < t { tok.decode(&ids[w..t], false)?.len() } else { 0 };
        let next = offset + with.saturating_sub(without);
        pieces.push((offset, next));
        offset = next;
    }
    let text = tok.decode(&ids[start..end], false)?;
    let lower = text.to_lowercase();
    let needle = marker.to_lowercase();
    if needle.is_empty() || lower.len() != text.len() {
        return Ok(());
    }
    let mut from = 0;
    while let Some(p) = lower[from..].find(&needle) {
        let (m0, m1) = (from + p, from + p + needle.len());
        for (k, &(a, b)) in pieces.iter().enumerate() {
            if b > m0 && a < m1 {
                target[start + k] = true;
            }
        }
        from = m1;
    }
    Ok(())
}
