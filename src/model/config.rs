//! The model configuration: the fields of a Hugging Face `config.json`, by their own names.

use serde::Deserialize;

use super::family::{Family, WindowLayers};

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
    /// The output head is the embedding matrix (absent: the family's default, as transformers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    /// Llama's switch for q/k/v biases (see [`Family::qkv_bias`]).
    #[serde(default)]
    pub attention_bias: bool,
    /// Attention within the last `sliding_window` positions, on the layers [`Config::layer_window`]
    /// names (Mistral v0.1: all; Gemma 2: every other; Qwen with `use_sliding_window`: from
    /// `max_window_layers` on), unless `layer_types` lists them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
    /// Per layer, "sliding_attention" or "full_attention" (transformers 5 writes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// The MLP's activation: `hidden_act` (Llama, Qwen, Mistral) or `hidden_activation` (Gemma).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_activation: Option<String>,
    /// Attention scores scaled by `query_pre_attn_scalar^-1/2` instead of `head_dim^-1/2` (Gemma).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<f64>,
    /// `cap * tanh(x / cap)` of the attention scores and of the final logits (Gemma 2); absent:
    /// the family's default, null: none.
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<Option<f64>>,
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
}

/// A key that is present, null or not: `Some(None)` for null, `None` (by `default`) when absent.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(d).map(Some)
}

/// The activations of an MLP `down(act(gate(x)) * up(x))` that loralab runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU: `x * sigmoid(x)` ("silu").
    Silu,
    /// GeGLU with GELU's tanh approximation ("gelu_pytorch_tanh").
    GeluTanh,
}

impl Activation {
    fn from_hf_name(name: &str) -> anyhow::Result<Activation> {
        match name {
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu_pytorch_tanh" | "gelu_tanh" => Ok(Activation::GeluTanh),
            other => anyhow::bail!(
                "config: hidden_act '{other}' is not supported; loralab runs 'silu' and 'gelu_pytorch_tanh'"
            ),
        }
    }
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

    /// The sliding attention window of layer `i`, if it has one: a query attends to the keys
    /// of the last `window` positions, itself included.
    pub fn layer_window(&self, i: usize) -> Option<usize> {
        let window = self.sliding_window?;
        let sliding = match (&self.layer_types, self.family().map(|f| f.windows)) {
            (Some(types), _) => types.get(i).is_some_and(|t| t == "sliding_attention"),
            (None, Ok(WindowLayers::All)) => true,
            (None, Ok(WindowLayers::EveryOther)) => i.is_multiple_of(2),
            (None, Ok(WindowLayers::FromMaxWindowLayers)) => {
                self.use_sliding_window && i >= self.max_window_layers.unwrap_or(0)
            }
            (None, Err(_)) => false,
        };
        sliding.then_some(window)
    }

    /// Whether the output head is the embedding matrix.
    pub fn tied_embeddings(&self) -> bool {
        let family = self.family().is_ok_and(|f| f.tied_by_default);
        self.tie_word_embeddings.unwrap_or(family)
    }

    /// The MLP's activation (the family's when the config names none). Gemma's configs carry
    /// both keys; `hidden_activation` is the one its model reads.
    pub fn activation(&self) -> anyhow::Result<Activation> {
        match self.hidden_activation.as_deref().or(self.hidden_act.as_deref()) {
            Some(name) => Activation::from_hf_name(name),
            None => Ok(self.family()?.activation),
        }
    }

    /// The factor of the attention scores q.k: `query_pre_attn_scalar^-1/2` where the config
    /// gives one, else `head_dim^-1/2`.
    pub fn attention_scale(&self) -> f64 {
        1.0 / self.query_pre_attn_scalar.unwrap_or(self.head_dim() as f64).sqrt()
    }

    /// The soft cap of the attention scores, if any.
    pub fn attention_softcap(&self) -> Option<f64> {
        let family = self.family().ok().and_then(|f| f.softcaps).map(|(a, _)| a);
        self.attn_logit_softcapping.unwrap_or(family)
    }

    /// The soft cap of the final logits, if any.
    pub fn final_softcap(&self) -> Option<f64> {
        let family = self.family().ok().and_then(|f| f.softcaps).map(|(_, l)| l);
        self.final_logit_softcapping.unwrap_or(family)
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
        self.activation()?;
        for (name, v) in [
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
            ("attn_logit_softcapping", self.attention_softcap()),
            ("final_logit_softcapping", self.final_softcap()),
        ] {
            if let Some(v) = v {
                anyhow::ensure!(v.is_finite() && v > 0.0, "config: {name} must be a finite number > 0 (got {v})");
            }
        }
        anyhow::ensure!(self.sliding_window != Some(0), "config: sliding_window must be > 0 (got 0)");
        if let Some(types) = &self.layer_types {
            anyhow::ensure!(
                types.len() == self.num_hidden_layers,
                "config: layer_types lists {} layers, num_hidden_layers is {}",
                types.len(),
                self.num_hidden_layers
            );
            if let Some(t) = types.iter().find(|t| !matches!(t.as_str(), "sliding_attention" | "full_attention")) {
                anyhow::bail!("config: layer_types entry '{t}' is neither 'sliding_attention' nor 'full_attention'");
            }
        }
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
