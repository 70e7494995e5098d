//! LoRA adapters: low-rank updates `W + scale * B @ A` on the decoder's projections.
//!
//! Follows PEFT: `y = W x + b + scale * B(A(dropout(x)))` with `scale = lora_alpha / r`
//! (`lora_alpha / sqrt(r)` with rsLoRA), A initialised Kaiming-uniform, B zero. A and B are
//! kept in f32 whatever the model's dtype and cast at use.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};

/// The seven projections a LoRA can target, by their PEFT / transformers names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::QProj,
        Target::KProj,
        Target::VProj,
        Target::OProj,
        Target::GateProj,
        Target::UpProj,
        Target::DownProj,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::QProj => "q_proj",
            Target::KProj => "k_proj",
            Target::VProj => "v_proj",
            Target::OProj => "o_proj",
            Target::GateProj => "gate_proj",
            Target::UpProj => "up_proj",
            Target::DownProj => "down_proj",
        }
    }

    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The module path inside a decoder layer, as in transformers (`self_attn.q_proj`).
    pub fn module_path(self) -> &'static str {
        match self {
            Target::QProj => "self_attn.q_proj",
            Target::KProj => "self_attn.k_proj",
            Target::VProj => "self_attn.v_proj",
            Target::OProj => "self_attn.o_proj",
            Target::GateProj => "mlp.gate_proj",
            Target::UpProj => "mlp.up_proj",
            Target::DownProj => "mlp.down_proj",
        }
    }
}

/// One LoRA pair: A (r, in) and B (out, r), trainable, f32.
#[derive(Clone)]
pub struct LoraPair {
    pub a: Var,
    pub b: Var,
}

/// The hyper-parameters of an adapter, named as in PEFT's `LoraConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Vec<Target>,
    pub use_rslora: bool,
}

impl LoraConfig {
    /// The factor applied to `B @ A`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

/// A set of LoRA pairs over the layers of one model.
#[derive(Clone)]
pub struct Adapter {
    pub config: LoraConfig,
    /// (layer, target) -> pair
    pub pairs: BTreeMap<(usize, Target), LoraPair>,
    pub device: Device,
}

impl Adapter {
    pub fn pair(&self, layer: usize, target: Target) -> Option<&LoraPair> {
        self.pairs.get(&(layer, target))
    }

    pub fn scale(&self) -> f64 {
        self.config.scale()
    }

    /// All trainable variables, in a fixed order (layer, then target, A before B).
    pub fn vars(&self) -> Vec<Var> {
        self.pairs.values().flat_map(|p| [p.a.clone(), p.b.clone()]).collect()
    }

    /// Number of trainable parameters.
    pub fn num_parameters(&self) -> usize {
        self.pairs.values().map(|p| p.a.elem_count() + p.b.elem_count()).sum()
    }

    /// The dense update `scale * B @ A` (out, in) of one projection, in `dtype`.
    pub fn delta(&self, layer: usize, target: Target, dtype: DType) -> candle_core::Result<Option<Tensor>> {
        let Some(p) = self.pair(layer, target) else { return Ok(None) };
        let d = (p.b.as_tensor().matmul(p.a.as_tensor())? * self.scale())?;
        Ok(Some(d.to_dtype(dtype)?.detach()))
    }
}

impl Adapter {
    /// A fresh adapter for `decoder`: A Kaiming-uniform as PEFT initialises it
    /// (`kaiming_uniform_(a=sqrt(5))`, i.e. U(-1/sqrt(in), 1/sqrt(in))), B zero, from `seed`.
    pub fn new(decoder: &crate::model::Decoder, config: LoraConfig, seed: u64) -> anyhow::Result<Adapter> {
        use rand::{Rng, SeedableRng};
        anyhow::ensure!(config.r >= 1, "r must be >= 1 (got {})", config.r);
        anyhow::ensure!(!config.target_modules.is_empty(), "target_modules must name at least one projection");
        anyhow::ensure!(
            (0.0..1.0).contains(&config.lora_dropout),
            "lora_dropout must be in [0, 1) (got {})",
            config.lora_dropout
        );
        let device = decoder.device.clone();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut pairs = BTreeMap::new();
        for layer in 0..decoder.layers.len() {
            for &target in &config.target_modules {
                let (out, inp) = decoder.projection_shape(target);
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..config.r * inp).map(|_| rng.gen_range(-bound..bound) as f32).collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (config.r, inp), &device)?)?;
                let b = Var::zeros((out, config.r), DType::F32, &device)?;
                pairs.insert((layer, target), LoraPair { a, b });
            }
        }
        Ok(Adapter { config, pairs, device })
    }

    /// Writes PEFT's format: `adapter_config.json` and `adapter_model.safetensors` with
    /// tensors `base_model.model.model.layers.{i}.<module>.lora_A.weight` / `lora_B.weight`.
    pub fn save(&self, dir: &std::path::Path, base_model: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut tensors = std::collections::HashMap::new();
        for ((layer, target), p) in &self.pairs {
            let prefix = peft_prefix(*layer, *target);
            tensors.insert(format!("{prefix}.lora_A.weight"), p.a.as_tensor().to_device(&Device::Cpu)?);
            tensors.insert(format!("{prefix}.lora_B.weight"), p.b.as_tensor().to_device(&Device::Cpu)?);
        }
        let tmp = dir.join(".adapter_model.safetensors.partial");
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, dir.join("adapter_model.safetensors"))?;
        let cfg = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.config.r,
            "lora_alpha": self.config.lora_alpha,
            "lora_dropout": self.config.lora_dropout,
            "target_modules": self.config.target_modules.iter().map(|t| t.name()).collect::<Vec<_>>(),
            "use_rslora": self.config.use_rslora,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "use_dora": false,
        });
        crate::store::write_atomic(&dir.join("adapter_config.json"), serde_json::to_string_pretty(&cfg)?.as_bytes())?;
        Ok(())
    }

    /// Reads a PEFT adapter folder. Strict: a tensor that is not a LoRA A/B of a known
    /// projection, or an A without its B, is an error that lists them.
    pub fn load(dir: &std::path::Path, decoder: &crate::model::Decoder) -> anyhow::Result<Adapter> {
        use anyhow::Context;
        let cfg_path = dir.join("adapter_config.json");
        let cfg: PeftConfig = serde_json::from_str(
            &std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?,
        )
        .with_context(|| format!("{} is not a PEFT LoRA config", cfg_path.display()))?;
        anyhow::ensure!(
            cfg.peft_type.as_deref().unwrap_or("LORA") == "LORA",
            "{}: peft_type must be LORA",
            cfg_path.display()
        );
        let mut targets = Vec::new();
        for name in &cfg.target_modules {
            let t = Target::from_name(name)
                .with_context(|| format!("{}: unsupported target module '{name}'", cfg_path.display()))?;
            targets.push(t);
        }
        let config = LoraConfig {
            r: cfg.r,
            lora_alpha: cfg.lora_alpha,
            lora_dropout: cfg.lora_dropout,
            target_modules: targets,
            use_rslora: cfg.use_rslora,
        };
        let st = dir.join("adapter_model.safetensors");
        let mut tensors = candle_core::safetensors::load(&st, &decoder.device)
            .map_err(|e| anyhow::anyhow!("{}: cannot read ({e})", st.display()))?;
        let mut pairs = BTreeMap::new();
        for layer in 0..decoder.layers.len() {
            for &target in &config.target_modules {
                let prefix = peft_prefix(layer, target);
                let a = tensors.remove(&format!("{prefix}.lora_A.weight"));
                let b = tensors.remove(&format!("{prefix}.lora_B.weight"));
                match (a, b) {
                    (Some(a), Some(b)) => {
                        let (out, inp) = decoder.projection_shape(target);
                        anyhow::ensure!(
                            a.dims() == [config.r, inp] && b.dims() == [out, config.r],
                            "{}: {prefix} has A {:?} / B {:?}, expected [{}, {inp}] / [{out}, {}]",
                            st.display(),
                            a.dims(),
                            b.dims(),
                            config.r,
                            config.r
                        );
                        let a = Var::from_tensor(&a.to_dtype(DType::F32)?)?;
                        let b = Var::from_tensor(&b.to_dtype(DType::F32)?)?;
                        pairs.insert((layer, target), LoraPair { a, b });
                    }
                    (None, None) => {}
                    _ => anyhow::bail!("{}: {prefix} has only one of lora_A / lora_B", st.display()),
                }
            }
        }
        if !tensors.is_empty() {
            let mut left: Vec<String> = tensors.into_keys().collect();
            left.sort();
            anyhow::bail!("{}: tensors that match no LoRA pair of this model: {}", st.display(), left.join(", "));
        }
        anyhow::ensure!(!pairs.is_empty(), "{}: no LoRA tensors for this model", st.display());
        Ok(Adapter { config, pairs, device: decoder.device.clone() })
    }
}

/// PEFT's name prefix of a projection inside a causal LM.
fn peft_prefix(layer: usize, target: Target) -> String {
    format!("base_model.model.model.layers.{layer}.{}", target.module_path())
}

/// The fields of PEFT's `adapter_config.json` this runtime reads.
#[derive(serde::Deserialize)]
struct PeftConfig {
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: Vec<String>,
    #[serde(default)]
    use_rslora: bool,
}
