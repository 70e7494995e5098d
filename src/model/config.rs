//! The model configuration: the fields of a Hugging Face `config.json`, by their own names.

use serde::Deserialize;

/// Decoder families this runtime implements. Both are pre-norm RMSNorm decoders with rotary
/// embeddings, grouped-query attention and a SwiGLU MLP; Qwen2 adds biases to q/k/v.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
}

impl Architecture {
    /// Maps a `config.json` `architectures` entry to a family, or says which ones are supported.
    pub fn from_hf_name(name: &str) -> anyhow::Result<Self> {
        match name {
            "LlamaForCausalLM" | "MistralForCausalLM" => Ok(Architecture::Llama),
            "Qwen2ForCausalLM" => Ok(Architecture::Qwen2),
            other => anyhow::bail!(
                "unsupported architecture '{other}': loralab runs LlamaForCausalLM (Llama, SmolLM2) \
                 and Qwen2ForCausalLM (Qwen2, Qwen2.5) checkpoints"
            ),
        }
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

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
    /// Llama's switch for q/k/v/o biases; Qwen2 always has q/k/v biases.
    #[serde(default)]
    pub attention_bias: bool,
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
    pub fn architecture(&self) -> anyhow::Result<Architecture> {
        match self.architectures.first() {
            Some(name) => Architecture::from_hf_name(name),
            None => anyhow::bail!("config.json has no 'architectures' entry; cannot tell the model family"),
        }
    }

    /// The rotary base frequency, wherever the config keeps it (10000 if nowhere).
    pub fn rope_theta(&self) -> f64 {
        self.rope_theta.or_else(|| self.rope_parameters.as_ref()?.get("rope_theta")?.as_f64()).unwrap_or(10_000.0)
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// 0 when nothing defines it (no heads): `validate` then names the missing value.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or_else(|| self.hidden_size.checked_div(self.num_attention_heads).unwrap_or(0))
    }

    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(&self) -> anyhow::Result<bool> {
        Ok(match self.architecture()? {
            Architecture::Qwen2 => true,
            Architecture::Llama => self.attention_bias,
        })
    }

    /// Checks the shape arithmetic once so that the decoder can rely on it.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.architecture()?;
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
