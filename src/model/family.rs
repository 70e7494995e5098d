//! One description per model family: what differs between the decoders loralab runs, in one
//! place that the config reader, both loaders, the decoder and the adapter read.
//!
//! Every family here is a pre-norm RMSNorm decoder with rotary embeddings, grouped-query
//! attention and a gated MLP; a family says which `config.json` names mean it, which tensors a
//! layer holds (biases, per-head q/k norms, norms of the attention's and the MLP's outputs),
//! how its norms and embeddings scale, its activation and soft caps, which layers attend within
//! a sliding window, and where a GGUF file of it comes from. The tensor
//! table ([`tensors`]) gives every weight's transformers name and shape for a config: the
//! decoder takes them by it, random models are drawn by it, and the adapter's projection
//! shapes come from it.
//!
//! Adding a family: a `Family` value in [`FAMILIES`], plus whatever op is new to the decoder.

use crate::adapter::Target;

use super::config::{Activation, Config};

/// How a family's q/k/v projections get biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvBias {
    /// Never (Qwen3, Mistral).
    Never,
    /// Always (Qwen2, Qwen2.5).
    Always,
    /// When config.json says `attention_bias: true` (Llama).
    FromConfig,
}

/// A decoder family.
#[derive(Debug)]
pub struct Family {
    /// The name loralab uses in messages.
    pub name: &'static str,
    /// The `architectures` entries of config.json that mean this family.
    pub hf_names: &'static [&'static str],
    pub qkv_bias: QkvBias,
    /// RMSNorm over each head's queries and keys before the rotary embedding
    /// (`self_attn.q_norm`, `self_attn.k_norm`, of head_dim weights).
    pub qk_norm: bool,
    /// The GGUF `general.architecture` whose files hold this family (llama.cpp's Q/K row
    /// permutation undone on reading), if loralab reads them.
    pub gguf: Option<&'static str>,
    /// transformers' defaults for config.json keys left out, where they are not Llama's:
    /// head_dim (else hidden_size / num_attention_heads) and num_key_value_heads (else
    /// num_attention_heads).
    pub default_head_dim: Option<usize>,
    pub default_kv_heads: Option<usize>,
    /// Which layers attend within `sliding_window` when config.json has no `layer_types`.
    pub windows: WindowLayers,
    /// The activation when config.json names none.
    pub activation: Activation,
    /// RMSNorm scales by `1 + w` (Gemma stores the scale less one): the loaders add it.
    pub norm_plus_one: bool,
    /// RMSNorm of the attention's and of the MLP's output before each residual sum (Gemma 2's
    /// `post_attention_layernorm` and `post_feedforward_layernorm`; its pre-MLP norm is then
    /// `pre_feedforward_layernorm`).
    pub output_norms: bool,
    /// Embeddings multiplied by sqrt(hidden_size), rounded to the model's dtype (Gemma).
    pub scaled_embeddings: bool,
    /// The default soft caps (attention scores, final logits) where config.json leaves them out.
    pub softcaps: Option<(f64, f64)>,
    /// Whether the head is the embedding matrix when config.json does not say.
    pub tied_by_default: bool,
}

/// The layers that attend within the sliding window, by family convention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowLayers {
    /// Every layer (Mistral).
    All,
    /// Layers 0, 2, 4... (Gemma 2).
    EveryOther,
    /// With `use_sliding_window`, layers from `max_window_layers` on (Qwen).
    FromMaxWindowLayers,
}

/// What the Llama layout has, which most families keep.
const LLAMA_LIKE: Family = Family {
    name: "Llama",
    hf_names: &["LlamaForCausalLM"],
    qkv_bias: QkvBias::FromConfig,
    qk_norm: false,
    gguf: Some("llama"),
    default_head_dim: None,
    default_kv_heads: None,
    windows: WindowLayers::All,
    activation: Activation::Silu,
    norm_plus_one: false,
    output_norms: false,
    scaled_embeddings: false,
    softcaps: None,
    tied_by_default: false,
};

pub const LLAMA: Family = LLAMA_LIKE;

/// Mistral-7B-v0.3's layout is Llama's without biases; its config sets no sliding window
/// (v0.1's attends within 4096 positions on every layer).
pub const MISTRAL: Family = Family {
    name: "Mistral",
    hf_names: &["MistralForCausalLM"],
    qkv_bias: QkvBias::Never,
    gguf: None,
    default_kv_heads: Some(8),
    ..LLAMA_LIKE
};

pub const QWEN2: Family = Family {
    name: "Qwen2",
    hf_names: &["Qwen2ForCausalLM"],
    qkv_bias: QkvBias::Always,
    gguf: None,
    windows: WindowLayers::FromMaxWindowLayers,
    ..LLAMA_LIKE
};

pub const QWEN3: Family = Family {
    name: "Qwen3",
    hf_names: &["Qwen3ForCausalLM"],
    qkv_bias: QkvBias::Never,
    qk_norm: true,
    gguf: None,
    default_head_dim: Some(128),
    windows: WindowLayers::FromMaxWindowLayers,
    ..LLAMA_LIKE
};

/// Gemma 2: GeGLU, `(1 + w)` norms also after the attention and the MLP, scaled and tied
/// embeddings, soft-capped attention scores and logits, a sliding window on every other layer.
pub const GEMMA2: Family = Family {
    name: "Gemma 2",
    hf_names: &["Gemma2ForCausalLM"],
    qkv_bias: QkvBias::FromConfig,
    gguf: None,
    default_head_dim: Some(256),
    windows: WindowLayers::EveryOther,
    activation: Activation::GeluTanh,
    norm_plus_one: true,
    output_norms: true,
    scaled_embeddings: true,
    softcaps: Some((50.0, 30.0)),
    tied_by_default: true,
    ..LLAMA_LIKE
};

/// Every family loralab runs.
pub const FAMILIES: &[&Family] = &[&LLAMA, &MISTRAL, &QWEN2, &QWEN3, &GEMMA2];

impl Family {
    /// The family of a `config.json` `architectures` entry, or an error listing those supported.
    pub fn from_hf_name(name: &str) -> anyhow::Result<&'static Family> {
        FAMILIES.iter().copied().find(|f| f.hf_names.contains(&name)).ok_or_else(|| {
            let known: Vec<&str> = FAMILIES.iter().flat_map(|f| f.hf_names.iter().copied()).collect();
            anyhow::anyhow!("unsupported architecture '{name}': loralab runs {}", known.join(", "))
        })
    }

    /// Whether q/k/v carry biases under `config`.
    pub fn qkv_bias(&self, config: &Config) -> bool {
        match self.qkv_bias {
            QkvBias::Never => false,
            QkvBias::Always => true,
            QkvBias::FromConfig => config.attention_bias,
        }
    }
}

/// What a tensor is, for drawing random weights of its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A matrix (embeddings, projections, the output head).
    Matrix,
    /// An RMSNorm scale (1 at initialisation).
    Norm,
    /// A projection's bias (0 at initialisation).
    Bias,
}

/// One tensor of a checkpoint: its transformers name, shape and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: Kind,
}

impl TensorSpec {
    fn new(name: String, shape: &[usize], kind: Kind) -> Self {
        TensorSpec { name, shape: shape.to_vec(), kind }
    }
}

/// The tensors of one layer, by role.
#[derive(Debug, Clone)]
pub struct LayerTensors {
    /// The seven projections in [`Target::ALL`]'s order: (weight, bias if the family has one).
    pub projections: Vec<(Target, TensorSpec, Option<TensorSpec>)>,
    /// The attention's input norm.
    pub input_norm: TensorSpec,
    /// The MLP's input norm (`post_attention_layernorm` in Llama's naming).
    pub mlp_norm: TensorSpec,
    /// Per-head query and key norms (families with `qk_norm`).
    pub qk_norms: Option<(TensorSpec, TensorSpec)>,
    /// Norms of the attention's and the MLP's outputs (families with `output_norms`).
    pub output_norms: Option<(TensorSpec, TensorSpec)>,
}

impl LayerTensors {
    pub fn all(&self) -> Vec<&TensorSpec> {
        let mut out: Vec<&TensorSpec> = Vec::new();
        for (_, w, b) in &self.projections {
            out.push(w);
            out.extend(b);
        }
        out.push(&self.input_norm);
        out.push(&self.mlp_norm);
        for (a, b) in self.qk_norms.iter().chain(&self.output_norms) {
            out.push(a);
            out.push(b);
        }
        out
    }
}

/// (out, in) of a projection under `config`.
pub fn projection_shape(config: &Config, target: Target) -> (usize, usize) {
    let (d, f) = (config.hidden_size, config.intermediate_size);
    let (h, k, e) = (config.num_attention_heads, config.num_kv_heads(), config.head_dim());
    match target {
        Target::QProj => (h * e, d),
        Target::KProj | Target::VProj => (k * e, d),
        Target::OProj => (d, h * e),
        Target::GateProj | Target::UpProj => (f, d),
        Target::DownProj => (d, f),
    }
}

/// The tensors of layer `i`.
pub fn layer_tensors(family: &Family, config: &Config, i: usize) -> LayerTensors {
    let p = format!("model.layers.{i}");
    let d = config.hidden_size;
    let qkv_bias = family.qkv_bias(config);
    let projections = Target::ALL
        .iter()
        .map(|&t| {
            let (out, inp) = projection_shape(config, t);
            let path = t.module_path();
            let weight = TensorSpec::new(format!("{p}.{path}.weight"), &[out, inp], Kind::Matrix);
            let has_bias = qkv_bias && matches!(t, Target::QProj | Target::KProj | Target::VProj);
            let bias = has_bias.then(|| TensorSpec::new(format!("{p}.{path}.bias"), &[out], Kind::Bias));
            (t, weight, bias)
        })
        .collect();
    let norm = |name: &str, n: usize| TensorSpec::new(format!("{p}.{name}.weight"), &[n], Kind::Norm);
    let e = config.head_dim();
    let (mlp_norm, output_norms) = match family.output_norms {
        true => (
            norm("pre_feedforward_layernorm", d),
            Some((norm("post_attention_layernorm", d), norm("post_feedforward_layernorm", d))),
        ),
        false => (norm("post_attention_layernorm", d), None),
    };
    LayerTensors {
        projections,
        input_norm: norm("input_layernorm", d),
        mlp_norm,
        qk_norms: family.qk_norm.then(|| (norm("self_attn.q_norm", e), norm("self_attn.k_norm", e))),
        output_norms,
    }
}

/// The tensors outside the layers: (embeddings, final norm, output head unless tied).
pub fn outer_tensors(config: &Config) -> (TensorSpec, TensorSpec, Option<TensorSpec>) {
    let (v, d) = (config.vocab_size, config.hidden_size);
    let embed = TensorSpec::new("model.embed_tokens.weight".into(), &[v, d], Kind::Matrix);
    let norm = TensorSpec::new("model.norm.weight".into(), &[d], Kind::Norm);
    let head = (!config.tied_embeddings()).then(|| TensorSpec::new("lm_head.weight".into(), &[v, d], Kind::Matrix));
    (embed, norm, head)
}

/// Every tensor a checkpoint of `config` holds, in a fixed order.
pub fn tensors(config: &Config) -> anyhow::Result<Vec<TensorSpec>> {
    let family = config.family()?;
    let (embed, norm, head) = outer_tensors(config);
    let mut out = vec![embed, norm];
    out.extend(head);
    for i in 0..config.num_hidden_layers {
        out.extend(layer_tensors(family, config, i).all().into_iter().cloned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(arch: &str) -> Config {
        serde_json::from_value(serde_json::json!({
            "architectures": [arch], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 12,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 6,
        }))
        .unwrap()
    }

    #[test]
    fn each_family_lists_its_biases_and_norms() {
        let names =
            |arch: &str| -> Vec<String> { tensors(&config(arch)).unwrap().into_iter().map(|t| t.name).collect() };
        let qwen2 = names("Qwen2ForCausalLM");
        assert!(qwen2.contains(&"model.layers.0.self_attn.q_proj.bias".to_string()));
        assert!(!qwen2.iter().any(|n| n.contains("o_proj.bias") || n.contains("q_norm")));
        let qwen3 = names("Qwen3ForCausalLM");
        assert!(qwen3.contains(&"model.layers.0.self_attn.k_norm.weight".to_string()));
        assert!(!qwen3.iter().any(|n| n.ends_with(".bias")));
        assert_eq!(names("MistralForCausalLM").len(), 3 + 7 + 2, "embeddings, norm, head; 7 projections, 2 norms");
        let shapes = tensors(&config("Qwen3ForCausalLM")).unwrap();
        let q = shapes.iter().find(|t| t.name.ends_with("q_proj.weight")).unwrap();
        assert_eq!(q.shape, vec![12, 8], "an explicit head_dim (6 x 2 heads), not hidden / heads");
        let qn = shapes.iter().find(|t| t.name.ends_with("q_norm.weight")).unwrap();
        assert_eq!(qn.shape, vec![6]);
    }

    #[test]
    fn gemma2_configs_take_transformers_defaults_and_bad_values_are_named() {
        let base = serde_json::json!({
            "architectures": ["Gemma2ForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 12,
            "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
            "sliding_window": 16,
        });
        let c: Config = serde_json::from_value(base.clone()).unwrap();
        c.validate().unwrap();
        assert!(c.tied_embeddings(), "Gemma2Config ties the head unless told otherwise");
        assert_eq!((c.attention_softcap(), c.final_softcap()), (Some(50.0), Some(30.0)));
        assert_eq!(c.activation().unwrap(), Activation::GeluTanh);
        assert_eq!((c.layer_window(0), c.layer_window(1), c.layer_window(2)), (Some(16), None, Some(16)));
        assert_eq!(c.attention_scale(), 0.5, "head_dim^-1/2 without query_pre_attn_scalar");
        let names = tensors(&c).unwrap().into_iter().map(|t| t.name).collect::<Vec<_>>();
        for norm in
            ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
        {
            assert!(names.contains(&format!("model.layers.0.{norm}.weight")), "{norm}");
        }
        assert!(!names.iter().any(|n| n == "lm_head.weight"));

        let with = |key: &str, value: serde_json::Value| -> Config {
            let mut v = base.clone();
            v[key] = value;
            serde_json::from_value(v).unwrap()
        };
        let c = with("attn_logit_softcapping", serde_json::Value::Null);
        assert_eq!(c.attention_softcap(), None, "null turns the cap off");
        assert_eq!(with("query_pre_attn_scalar", 64.into()).attention_scale(), 0.125);
        let types = serde_json::json!(["full_attention", "sliding_attention", "full_attention"]);
        assert_eq!(with("layer_types", types).layer_window(0), None, "layer_types overrides the pattern");
        let e = with("hidden_activation", "relu2".into()).validate().unwrap_err().to_string();
        assert!(e.contains("relu2") && e.contains("gelu_pytorch_tanh"), "{e}");
        let e = with("layer_types", serde_json::json!(["full_attention"])).validate().unwrap_err().to_string();
        assert!(e.contains("layer_types lists 1 layers") && e.contains("num_hidden_layers is 3"), "{e}");
        let e = with("final_logit_softcapping", (-1.0).into()).validate().unwrap_err().to_string();
        assert!(e.contains("final_logit_softcapping"), "{e}");
    }

    #[test]
    fn an_unknown_architecture_names_those_supported() {
        let e = Family::from_hf_name("GPT2LMHeadModel").unwrap_err().to_string();
        assert!(e.contains("GPT2LMHeadModel") && e.contains("Qwen3ForCausalLM") && e.contains("MistralForCausalLM"));
    }

    #[test]
    fn left_out_config_keys_take_the_family_defaults_of_transformers() {
        let c: Config = serde_json::from_value(serde_json::json!({
            "architectures": ["Qwen3ForCausalLM"], "vocab_size": 10, "hidden_size": 1024, "intermediate_size": 12,
            "num_hidden_layers": 1, "num_attention_heads": 16,
        }))
        .unwrap();
        assert_eq!(c.head_dim(), 128, "Qwen3Config's default, not 1024 / 16");
        let m: Config = serde_json::from_value(serde_json::json!({
            "architectures": ["MistralForCausalLM"], "vocab_size": 10, "hidden_size": 64, "intermediate_size": 12,
            "num_hidden_layers": 1, "num_attention_heads": 16, "sliding_window": 4096,
        }))
        .unwrap();
        assert_eq!((m.num_kv_heads(), m.head_dim()), (8, 4));
        assert_eq!(m.layer_window(0), Some(4096), "Mistral's window needs no switch");
        let q: Config = serde_json::from_value(serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 64, "intermediate_size": 12,
            "num_hidden_layers": 1, "num_attention_heads": 4, "sliding_window": 4096, "use_sliding_window": false,
        }))
        .unwrap();
        assert_eq!(q.layer_window(0), None);
    }
}
