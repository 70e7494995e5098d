//! The model configuration: the fields of a Hugging Face `config.json`, by their own names.

use serde::Deserialize;

use super::family::Family;

/// The longest context a config may declare (Llama 3.1 declares 131,072).
pub const MAX_POSITIONS: usize = 1 << 22;

/// `config.json` as written by transformers (only the fields the decoder needs).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct Config {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// transformers < 5 writes `rope_theta`; transformers 5 nests it in `rope_parameters`.
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama's switch for q/k/v biases (see [`Family::qkv_bias`]).
    #[serde(default)]
    pub attention_bias: bool,
    /// Attention within the last `sliding_window` positions (Mistral v0.1; Qwen with
    /// `use_sliding_window`), which loralab does not implement: longer sequences are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: bool,
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

impl Config {
    /// The model family, from the first `architectures` entry.
    pub fn family(&self) -> anyhow::Result<&'static Family> {
        match self.architectures.first() {
            Some(name) => Family::from_hf_name(name),
            None => anyhow::bail!("config.json has no 'architectures' entry; cannot tell the model family"),
        }
    }

    /// The rotary base frequency, wherever the config keeps it (10000 if nowhere).
    pub fn rope_theta(&self) -> f64 {
        self.rope_theta.or_else(|| self.rope_parameters.as_ref()?.get("rope_theta")?.as_f64()).unwrap_or(10_000.0)
    }

    pub fn num_kv_heads(&self) -> usize {
        let family_default = self.family().ok().and_then(|f| f.default_kv_heads);
        self.num_key_value_heads.or(family_default).unwrap_or(self.num_attention_heads)
    }

    /// 0 when nothing defines it (no heads): `validate` then names the missing value.
    pub fn head_dim(&self) -> usize {
        let family_default = self.family().ok().and_then(|f| f.default_head_dim);
        self.head_dim
            .or(family_default)
            .unwrap_or_else(|| self.hidden_size.checked_div(self.num_attention_heads).unwrap_or(0))
    }

    /// The sliding attention window, where the config turns one on: sequences longer than it
    /// are refused (full attention would differ from the model's own beyond it).
    pub fn attention_window(&self) -> Option<usize> {
        let on = self.use_sliding_window || self.family().is_ok_and(|f| f.window_always_on);
        self.sliding_window.filter(|_| on)
    }

    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(&self) -> anyhow::Result<bool> {
        Ok(self.family()?.qkv_bias(self))
    }

    /// Checks the shape arithmetic once so that the decoder can rely on it.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.family()?;
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("head_dim", self.head_dim()),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            anyhow::ensure!(v > 0, "config: {name} must be > 0 (got {v})");
        }
        // Rotary tables are made for every position up front: a context length read from a
        // damaged file (2^32 - 1) would ask for terabytes.
        anyhow::ensure!(
            self.max_position_embeddings <= MAX_POSITIONS,
            "config: max_position_embeddings = {} is more than the {MAX_POSITIONS} positions loralab supports",
            self.max_position_embeddings
        );
        anyhow::ensure!(
            self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0,
            "config: rms_norm_eps must be a finite number >= 0 (got {})",
            self.rms_norm_eps
        );
        anyhow::ensure!(
            self.rope_theta().is_finite() && self.rope_theta() > 0.0,
            "config: rope_theta must be a finite number > 0 (got {})",
            self.rope_theta()
        );
        anyhow::ensure!(
            self.num_attention_heads.is_multiple_of(self.num_kv_heads()),
            "config: num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
            self.num_attention_heads,
            self.num_kv_heads()
        );
        anyhow::ensure!(self.head_dim().is_multiple_of(2), "config: head_dim must be even for rotary embeddings");
        Ok(())
    }

    /// Token ids listed as end of sequence (`eos_token_id` may be a number or a list).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        ids_of(self.eos_token_id.as_ref())
    }
}

/// Reads a token id field that may be a number or a list of numbers.
pub fn ids_of(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => Vec::new(),
    }
}
