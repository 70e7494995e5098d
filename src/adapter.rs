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
    /// Checks the values against each other and the model's projection shapes, before anything
    /// is allocated: a rank of 1e9 would otherwise abort the process on allocation.
    pub fn validate(&self, decoder: &crate::model::Decoder) -> anyhow::Result<()> {
        anyhow::ensure!(self.r >= 1, "r must be >= 1 (got {})", self.r);
        anyhow::ensure!(!self.target_modules.is_empty(), "target_modules must name at least one projection");
        anyhow::ensure!(
            self.lora_alpha.is_finite() && self.lora_alpha > 0.0,
            "lora_alpha must be a finite number > 0 (got {})",
            self.lora_alpha
        );
        anyhow::ensure!(
            (0.0..1.0).contains(&self.lora_dropout),
            "lora_dropout must be in [0, 1) (got {})",
            self.lora_dropout
        );
        for &t in &self.target_modules {
            let (out, inp) = decoder.projection_shape(t);
            anyhow::ensure!(
                self.r <= out.min(inp),
                "r = {} is larger than {}'s smaller side ({out} x {inp}): a LoRA of rank r adds r x ({out} + {inp}) \
                 weights per layer and gains nothing past {}; lower r",
                self.r,
                t.module_path(),
                out.min(inp)
            );
        }
        Ok(())
    }

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
        config.validate(decoder)?;
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
        use anyhow::Context;
        anyhow::ensure!(!dir.is_file(), "{} is a file; an adapter is saved as a folder", dir.display());
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the folder {}", dir.display()))?;
        let mut tensors = std::collections::HashMap::new();
        for ((layer, target), p) in &self.pairs {
            let prefix = peft_prefix(*layer, *target);
            tensors.insert(format!("{prefix}.lora_A.weight"), p.a.as_tensor().to_device(&Device::Cpu)?);
            tensors.insert(format!("{prefix}.lora_B.weight"), p.b.as_tensor().to_device(&Device::Cpu)?);
        }
        // Written like every result (atomically, with the umask's mode, so groups share runs).
        let weights = dir.join("adapter_model.safetensors");
        crate::store::write_atomic_with(&weights, |tmp| {
            candle_core::safetensors::save(&tensors, tmp).map_err(std::io::Error::other)
        })
        .with_context(|| format!("cannot write {}", weights.display()))?;
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
        let cfg_path = dir.join("adapter_config.json");
        crate::store::write_atomic(&cfg_path, serde_json::to_string_pretty(&cfg)?.as_bytes())
            .with_context(|| format!("cannot write {}", cfg_path.display()))?;
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
        let names = match &cfg.target_modules {
            // PEFT's shorthand for every linear layer but the output head.
            TargetModules::One(n) if n == "all-linear" => Target::ALL.iter().map(|t| t.name().to_string()).collect(),
            TargetModules::One(n) => vec![n.clone()],
            TargetModules::Many(v) => v.clone(),
        };
        let mut targets = Vec::new();
        for name in &names {
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
        config.validate(decoder).with_context(|| format!("{}", cfg_path.display()))?;
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
                    (None, None) => anyhow::bail!(
                        "{}: {prefix} has no lora_A / lora_B, but {} lists {} among target_modules",
                        st.display(),
                        cfg_path.display(),
                        target.name()
                    ),
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
    target_modules: TargetModules,
    #[serde(default)]
    use_rslora: bool,
}

/// `target_modules` as PEFT writes it: a list of names, or one string (`"all-linear"`).
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum TargetModules {
    One(String),
    Many(Vec<String>),
}
