//! The Hugging Face hub cache, configured and laid out as `huggingface_hub` does it, and the
//! provenance of every loaded model.
//!
//! Where the cache is (first that is set): `HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE` (legacy),
//! `$HF_HOME/hub`, `$XDG_CACHE_HOME/huggingface/hub`, `~/.cache/huggingface/hub`. Paths may use
//! `~` and `$VAR`, expanded as Python's `expanduser`/`expandvars` would. `HF_HUB_OFFLINE` (or,
//! when it is unset, `TRANSFORMERS_OFFLINE`) set to 1, ON, YES or TRUE forbids every network
//! call. The token for gated models: `HF_TOKEN`, else `HUGGING_FACE_HUB_TOKEN` (legacy), else
//! the file `HF_TOKEN_PATH`, else `$HF_HOME/token`. One difference: a variable set to the empty
//! string counts as unset here (Python would take "" as a path, the current folder).
//!
//! A repository lives in `<cache>/models--<org>--<name>/`: `refs/<branch or tag>` holds a commit
//! hash, `snapshots/<commit>/` the files of that commit, as symlinks to `blobs/<etag>`. The etag
//! of a file stored with Git LFS (every weight file) is its SHA-256, so a weight file's hash is
//! read from its blob's name instead of hashing gigabytes; small files stored in git proper are
//! named by their git SHA-1 and are hashed. A local file is hashed once and its hash cached by
//! path, size and modification time.
//!
//! A model found in the cache is used as it is, without asking the hub whether the branch moved
//! (one network call fewer, and a run reads the same weights as long as the cache is unchanged).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The weights of a checkpoint in one file.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint: `weight_map` names the shard of every tensor.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Files a model folder must have besides its weights.
const REQUIRED_FILES: [&str; 2] = ["config.json", "tokenizer.json"];
/// Files read when present.
pub const OPTIONAL_FILES: [&str; 3] = ["tokenizer_config.json", "generation_config.json", "chat_template.jinja"];

/// Looks up an environment variable; the process environment in use, a map in tests.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, as an [`EnvLookup`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// A variable's value, with the empty string taken as unset.
fn var(env: EnvLookup, name: &str) -> Option<String> {
    env(name).filter(|v| !v.is_empty())
}

/// A folder and what chose it (a variable's name, or "default"), for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub path: PathBuf,
    pub from: String,
}

impl std::fmt::Display for Located {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (from {})", self.path.display(), self.from)
    }
}

/// `~` and `$VAR`/`${VAR}` expanded like Python's `os.path.expandvars(os.path.expanduser(p))`:
/// an unknown variable is left as written.
pub fn expand(path: &str, env: EnvLookup) -> PathBuf {
    let home = || var(env, "HOME").unwrap_or_else(|| ".".into());
    let user = if path == "~" {
        home()
    } else if let Some(rest) = path.strip_prefix("~/") {
        format!("{}/{rest}", home())
    } else {
        path.to_string()
    };
    let re = regex::Regex::new(r"\$(\w+|\{[^}]*\})").expect("a valid pattern");
    let out = re.replace_all(&user, |c: &regex::Captures| {
        let name = c[1].trim_start_matches('{').trim_end_matches('}');
        env(name).unwrap_or_else(|| c[0].to_string())
    });
    PathBuf::from(out.into_owned())
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home(env: EnvLookup) -> Located {
    if let Some(v) = var(env, "HF_HOME") {
        return Located { path: expand(&v, env), from: "HF_HOME".into() };
    }
    if let Some(v) = var(env, "XDG_CACHE_HOME") {
        return Located { path: expand(&v, env).join("huggingface"), from: "XDG_CACHE_HOME".into() };
    }
    Located { path: expand("~/.cache/huggingface", env), from: "default".into() }
}

/// The hub cache: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `<hf_home>/hub`.
pub fn hub_cache(env: EnvLookup) -> Located {
    for name in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"] {
        if let Some(v) = var(env, name) {
            return Located { path: expand(&v, env), from: name.into() };
        }
    }
    let home = hf_home(env);
    Located { path: home.path.join("hub"), from: home.from }
}

/// `Some("HF_HUB_OFFLINE=1")` (the setting that made it so) when no network call may be made.
/// As in huggingface_hub, `TRANSFORMERS_OFFLINE` is read only when `HF_HUB_OFFLINE` is unset.
pub fn offline(env: EnvLookup) -> Option<String> {
    let (name, value) =
        ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"].into_iter().find_map(|name| var(env, name).map(|v| (name, v)))?;
    is_true(&value).then(|| format!("{name}={value}"))
}

/// huggingface_hub's boolean values: 1, ON, YES, TRUE in any case; anything else is false.
pub fn is_true(value: &str) -> bool {
    ["1", "ON", "YES", "TRUE"].contains(&value.to_ascii_uppercase().as_str())
}

/// A hub access token and where it was found. Debug never shows the token itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub value: String,
    pub from: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token(from {})", self.from)
    }
}

/// The token for gated and private models: `HF_TOKEN`, else `HUGGING_FACE_HUB_TOKEN`, else the
/// file `HF_TOKEN_PATH`, else `<hf_home>/token`. Line breaks and surrounding blanks are removed;
/// a token that is then empty counts as none.
pub fn token(env: EnvLookup) -> Option<Token> {
    // As in huggingface_hub, the first variable that is set is the one cleaned, so a blank
    // HF_TOKEN does not fall back to the legacy variable, only to the file.
    let set = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"].into_iter().find_map(|n| var(env, n).map(|v| (n, v)));
    if let Some((name, raw)) = set {
        if let Some(value) = clean_token(&raw) {
            return Some(Token { value, from: name.into() });
        }
    }
    let path = match var(env, "HF_TOKEN_PATH") {
        Some(p) => expand(&p, env),
        None => hf_home(env).path.join("token"),
    };
    let value = clean_token(&std::fs::read_to_string(&path).ok()?)?;
    Some(Token { value, from: path.display().to_string() })
}

fn clean_token(raw: &str) -> Option<String> {
    let t = raw.replace(['\r', '\n'], "");
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Everything the environment says about the hub.
#[derive(Debug, Clone)]
pub struct HubEnv {
    pub cache: Located,
    /// The setting that forbids network calls, e.g. "HF_HUB_OFFLINE=1".
    pub offline: Option<String>,
    pub token: Option<Token>,
    /// `HF_ENDPOINT`: a private hub or a mirror.
    pub endpoint: Option<String>,
}

impl HubEnv {
    pub fn from_lookup(env: EnvLookup) -> Self {
        HubEnv { cache: hub_cache(env), offline: offline(env), token: token(env), endpoint: var(env, "HF_ENDPOINT") }
    }

    pub fn from_process() -> Self {
        Self::from_lookup(&process_env)
    }
}

/// A hub id with an optional revision (branch, tag or commit hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSpec {
    pub id: String,
    pub revision: Option<String>,
}

impl HubSpec {
    /// Reads `org/name` or `org/name@revision`; `revision` is the `revision` option, which must
    /// agree with one given after `@`. `Ok(None)` when `spec` is not a hub id.
    pub fn parse(spec: &str, revision: Option<&str>) -> anyhow::Result<Option<HubSpec>> {
        let (id, at) = match spec.split_once('@') {
            Some((id, rev)) => (id, Some(rev)),
            None => (spec, None),
        };
        if !looks_like_hub_id(id) {
            return Ok(None);
        }
        let revision = match (at, revision) {
            (Some(a), Some(b)) if a != b => anyhow::bail!(
                "model '{spec}' names revision '{a}' and the option revision = \"{b}\" another; give one of them"
            ),
            (Some(r), _) | (None, Some(r)) => Some(check_revision(spec, r)?),
            (None, None) => None,
        };
        Ok(Some(HubSpec { id: id.to_string(), revision }))
    }

    /// The revision asked for; `main` when none was.
    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }

    /// The repository's folder in the cache.
    pub fn folder(&self) -> String {
        format!("models--{}", self.id.replace('/', "--"))
    }

    /// `id` or `id@revision`, as the user would write it.
    pub fn shown(&self) -> String {
        match &self.revision {
            Some(r) => format!("{}@{r}", self.id),
            None => self.id.clone(),
        }
    }
}

/// Whether `spec` reads as `org/name` (repository names never contain `@`).
pub fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.') && !p.contains('@'))
}

/// A revision is used as a path under refs/ and snapshots/: it must stay inside them.
fn check_revision(spec: &str, rev: &str) -> anyhow::Result<String> {
    let bad = rev.is_empty() || rev.starts_with('/') || rev.split('/').any(|p| p.is_empty() || p == "." || p == "..");
    anyhow::ensure!(
        !bad,
        "model '{spec}': revision '{rev}' is not a branch, tag or commit hash (write e.g. Qwen/Qwen2.5-7B-Instruct@main)"
    );
    Ok(rev.to_string())
}

/// A snapshot of a repository in the cache, with every file a model needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub spec: HubSpec,
    /// The commit hash of the snapshot read.
    pub commit: String,
    pub dir: PathBuf,
}

/// The snapshot of `spec` in the cache, downloading what is missing unless offline.
pub fn resolve(spec: &HubSpec, env: &HubEnv) -> anyhow::Result<Snapshot> {
    match find_cached(spec, &env.cache.path) {
        Ok(snap) => match check_complete(&snap.dir) {
            Ok(()) => Ok(snap),
            Err(missing) => fetch_missing(spec, env, "is only partly in", &format!("{missing:#}")),
        },
        Err(why) => fetch_missing(spec, env, "is not in", &why),
    }
}

/// Downloads `spec` after the cache fell short (`state` and `why`), or says why it may not.
fn fetch_missing(spec: &HubSpec, env: &HubEnv, state: &str, why: &str) -> anyhow::Result<Snapshot> {
    let id = &spec.id;
    let rev = spec.revision();
    let cli = match &spec.revision {
        Some(r) => format!("huggingface-cli download {id} --revision {r}"),
        None => format!("huggingface-cli download {id}"),
    };
    let hint = format!(
        "HINT: on a machine with network, run `HF_HUB_CACHE={} {cli}` and make that cache reachable here \
         (set HF_HUB_CACHE or HF_HOME to it), or pass the path of a local folder holding config.json, \
         *.safetensors and tokenizer.json",
        env.cache.path.display()
    );
    if let Some(setting) = &env.offline {
        anyhow::bail!(
            "model '{id}' (revision '{rev}') {state} the Hugging Face cache {}: {why}; {setting} forbids \
             downloading it.\n{hint}",
            env.cache
        );
    }
    download(spec, env).map_err(|e| {
        anyhow::anyhow!(
            "model '{id}' (revision '{rev}') {state} the Hugging Face cache {}: {why}; downloading it failed: \
             {e:#}.\n{hint}",
            env.cache
        )
    })?;
    let snap = find_cached(spec, &env.cache.path).map_err(|why| {
        anyhow::anyhow!("model '{id}': downloaded into {}, yet the snapshot is not there: {why}", env.cache)
    })?;
    check_complete(&snap.dir)
        .with_context(|| format!("model '{id}': the download into {} is incomplete", env.cache))?;
    Ok(snap)
}

/// The snapshot folder `spec`'s revision points at, or why there is none. Reads only the disk:
/// `refs/<revision>` gives the commit; a revision with no ref is taken as a commit hash.
pub fn find_cached(spec: &HubSpec, cache: &Path) -> Result<Snapshot, String> {
    let repo = cache.join(spec.folder());
    if !repo.is_dir() {
        return Err(format!("no folder {}", spec.folder()));
    }
    let rev = spec.revision();
    let ref_file = repo.join("refs").join(rev);
    let commit = match std::fs::read_to_string(&ref_file) {
        Ok(text) => text.trim().to_string(),
        Err(_) if repo.join("snapshots").join(rev).is_dir() => rev.to_string(),
        Err(_) => {
            return Err(format!(
                "{} has no refs/{rev} and no snapshots/{rev} (cached refs: {}; cached snapshots: {})",
                repo.display(),
                list_or_none(&repo.join("refs")),
                list_or_none(&repo.join("snapshots"))
            ))
        }
    };
    let dir = repo.join("snapshots").join(&commit);
    if commit.is_empty() || !dir.is_dir() {
        return Err(format!("{} points at commit '{commit}', but {} is missing", ref_file.display(), dir.display()));
    }
    Ok(Snapshot { spec: spec.clone(), commit, dir })
}

fn list_or_none(dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// Whether a snapshot holds config.json, tokenizer.json and every weight file; the error names
/// the first file missing and the folder.
pub fn check_complete(dir: &Path) -> anyhow::Result<()> {
    for name in REQUIRED_FILES {
        anyhow::ensure!(dir.join(name).is_file(), "{name} is missing from {}", dir.display());
    }
    anyhow::ensure!(
        dir.join(SINGLE_FILE).is_file() || dir.join(INDEX_FILE).is_file(),
        "neither {SINGLE_FILE} nor {INDEX_FILE} is in {}",
        dir.display()
    );
    super::load::weight_files(dir).map(|_| ())
}

/// Fetches the files of a model into the cache with hf-hub: config, tokenizer, the optional
/// files, and the weights (one file, else the index and its shards). Files already cached for
/// the revision are not fetched again.
fn download(spec: &HubSpec, env: &HubEnv) -> anyhow::Result<()> {
    use hf_hub::{api::sync::ApiBuilder, Repo, RepoType};
    let mut builder = ApiBuilder::new()
        .with_cache_dir(env.cache.path.clone())
        .with_token(env.token.as_ref().map(|t| t.value.clone()));
    if let Some(endpoint) = &env.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let api = builder.build()?;
    let repo = api.repo(Repo::with_revision(spec.id.clone(), RepoType::Model, spec.revision().to_string()));
    for name in REQUIRED_FILES {
        repo.get(name).with_context(|| format!("cannot fetch {name}"))?;
    }
    for name in OPTIONAL_FILES {
        let _ = repo.get(name); // absent from many repositories
    }
    if let Err(single) = repo.get(SINGLE_FILE) {
        let index = repo
            .get(INDEX_FILE)
            .map_err(|e| anyhow::anyhow!("neither {SINGLE_FILE} ({single}) nor {INDEX_FILE} ({e}) could be fetched"))?;
        for shard in shard_names(&index)? {
            repo.get(&shard).with_context(|| format!("cannot fetch the shard {shard}"))?;
        }
    }
    Ok(())
}

/// The shard files an index lists, sorted and each once.
pub fn shard_names(index: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("cannot read {}", index.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
        anyhow::anyhow!("{} has no \"weight_map\" object naming the shard of each tensor", index.display())
    })?;
    let mut shards: Vec<String> = map.values().filter_map(|x| x.as_str().map(String::from)).collect();
    shards.sort();
    shards.dedup();
    anyhow::ensure!(!shards.is_empty(), "{}: the weight_map names no shard", index.display());
    for s in &shards {
        anyhow::ensure!(
            !s.contains('/') && !s.starts_with('.'),
            "{}: shard name '{s}' is not a file name in the same folder",
            index.display()
        );
    }
    Ok(shards)
}

// ---------------------------------------------------------------------------------------------
// Provenance

/// Where a model's weights came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A snapshot of the Hugging Face hub cache.
    Hub,
    /// A local folder of safetensors.
    Local,
    /// A local GGUF file.
    Gguf,
    /// loralab's embedded default model.
    Embedded,
    /// Random weights (`lab.model.random`).
    Random,
}

/// One file read to build a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHash {
    /// The file's name inside its folder.
    pub name: String,
    pub sha256: String,
    pub bytes: u64,
}

/// Exactly which weights a model was built from: recorded with every result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    pub source: Source,
    /// The hub id, the embedded model's name, or a random model's label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The commit hash of the hub snapshot read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The revision asked for (a branch, tag or commit); "main" when none was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_revision: Option<String>,
    /// The folder or file read, on this machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Every file read (config, tokenizer, weights), by name.
    pub files: Vec<FileHash>,
    /// Random models: the seed of the weights (none: they differ in every process).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Random models: SHA-256 of the config, as JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
}

impl Provenance {
    /// A provenance with only a source and id; the loader fills in the rest.
    pub fn new(source: Source, id: Option<String>) -> Self {
        Provenance {
            source,
            id,
            revision: None,
            requested_revision: None,
            path: None,
            files: Vec::new(),
            seed: None,
            config_sha256: None,
        }
    }

    /// The provenance as JSON, with its [`weights_id`] added.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("a provenance serializes");
        v["weights_id"] = serde_json::Value::String(weights_id(self));
        v
    }
}

/// A short hash (16 hex digits) of the weights' content: the SHA-256s of the files read, in name
/// order, or a random model's config and seed. The same files give the same id wherever they
/// are (a hub snapshot or a copy in a folder); for use in cell keys, so that different weights
/// never reuse a stale result. An unseeded random model's weights differ in every process,
/// which its id cannot tell.
pub fn weights_id(p: &Provenance) -> String {
    let mut files: Vec<&FileHash> = p.files.iter().collect();
    files.sort_by(|a, b| a.name.cmp(&b.name));
    let value = if p.source == Source::Random {
        serde_json::json!({ "random": p.config_sha256, "seed": p.seed })
    } else {
        serde_json::json!(files.iter().map(|f| f.sha256.as_str()).collect::<Vec<_>>())
    };
    crate::store::key_hash(&value)
}

/// Every model loaded so far in this process, in load order, each once.
static LOADED: Mutex<Vec<Provenance>> = Mutex::new(Vec::new());

/// Adds a model's provenance to [`loaded_models`].
pub fn record(p: &Provenance) {
    let mut list = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if !list.contains(p) {
        list.push(p.clone());
    }
}

/// The provenance (with `weights_id`) of every model loaded in this process so far, for
/// run.json and each cell's meta.json.
pub fn loaded_models() -> Vec<serde_json::Value> {
    LOADED.lock().unwrap_or_else(|e| e.into_inner()).iter().map(Provenance::to_json).collect()
}

/// The hash of a file read as `name`: the name of the hub blob it links to when that is a
/// SHA-256 (a Git LFS file), else its content's SHA-256, cached by path, size and mtime.
pub fn hash_file(name: &str, path: &Path) -> anyhow::Result<FileHash> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let sha256 = match lfs_blob_sha256(path) {
        Some(h) => h,
        None => cached_content_sha256(path, &meta)?,
    };
    Ok(FileHash { name: name.to_string(), sha256, bytes: meta.len() })
}

/// Follows a chain of symlinks (a folder linking into a hub snapshot, the snapshot linking to
/// its blob) and returns the first name on it that is 64 hex digits: an LFS blob, named by the
/// SHA-256 of its content. Only the first such name counts: a blob shared across repositories
/// links on to a store named by another hash.
fn lfs_blob_sha256(path: &Path) -> Option<String> {
    let mut current = path.to_path_buf();
    for _ in 0..16 {
        let target = std::fs::read_link(&current).ok()?;
        let next = match current.parent() {
            Some(parent) if target.is_relative() => parent.join(&target),
            _ => target,
        };
        let name = next.file_name()?.to_str()?;
        if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Some(name.to_ascii_lowercase());
        }
        current = next;
    }
    None
}

/// One entry of the hash cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CachedHash {
    bytes: u64,
    mtime_ns: u64,
    sha256: String,
}

/// The file holding hashes of local files, under loralab's cache folder.
pub fn hash_cache_path() -> PathBuf {
    super::load::cache_dir().join("sha256-cache.json")
}

/// SHA-256 of a file's content, from the cache when its size and mtime are unchanged.
fn cached_content_sha256(path: &Path, meta: &std::fs::Metadata) -> anyhow::Result<String> {
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()).display().to_string();
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64);
    let cache_file = hash_cache_path();
    let mut cache = read_hash_cache(&cache_file);
    if let Some(c) = cache.get(&key) {
        if c.bytes == meta.len() && c.mtime_ns == mtime_ns {
            return Ok(c.sha256.clone());
        }
    }
    let sha256 = crate::store::file_sha256(path).with_context(|| format!("cannot read {}", path.display()))?;
    cache.insert(key, CachedHash { bytes: meta.len(), mtime_ns, sha256: sha256.clone() });
    // Only a cache: if it cannot be written the file is hashed again next time.
    if let Ok(bytes) = serde_json::to_vec_pretty(&cache) {
        let _ = crate::store::write_atomic(&cache_file, &bytes);
    }
    Ok(sha256)
}

/// The hash cache; empty when missing or unreadable (it is rebuilt as files are hashed).
fn read_hash_cache(path: &Path) -> BTreeMap<String, CachedHash> {
    std::fs::read_to_string(path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn the_cache_follows_huggingface_hubs_precedence() {
        let all = [
            ("HOME", "/h"),
            ("XDG_CACHE_HOME", "/xdg"),
            ("HF_HOME", "/hf"),
            ("HUGGINGFACE_HUB_CACHE", "/legacy"),
            ("HF_HUB_CACHE", "/new"),
        ];
        let expect = ["/h/.cache/huggingface/hub", "/xdg/huggingface/hub", "/hf/hub", "/legacy", "/new"];
        let froms = ["default", "XDG_CACHE_HOME", "HF_HOME", "HUGGINGFACE_HUB_CACHE", "HF_HUB_CACHE"];
        for n in 0..all.len() {
            let got = hub_cache(&env_of(&all[..=n]));
            assert_eq!(got.path, PathBuf::from(expect[n]), "with {:?}", &all[..=n]);
            assert_eq!(got.from, froms[n]);
        }
    }

    #[test]
    fn hf_home_defaults_to_xdg_cache_home_then_the_home_folder() {
        assert_eq!(hf_home(&env_of(&[("HOME", "/h")])).path, PathBuf::from("/h/.cache/huggingface"));
        assert_eq!(hf_home(&env_of(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x")])).path, PathBuf::from("/x/huggingface"));
        assert_eq!(
            hf_home(&env_of(&[("HOME", "/h"), ("HF_HOME", "/y"), ("XDG_CACHE_HOME", "/x")])).path,
            PathBuf::from("/y")
        );
    }

    #[test]
    fn paths_expand_the_home_folder_and_variables_and_empty_values_count_as_unset() {
        let env = env_of(&[("HOME", "/h"), ("SCRATCH", "/scratch/u1"), ("HF_HUB_CACHE", "")]);
        assert_eq!(expand("~/models", &env), PathBuf::from("/h/models"));
        assert_eq!(expand("$SCRATCH/hf/${SCRATCH}", &env), PathBuf::from("/scratch/u1/hf//scratch/u1"));
        assert_eq!(expand("$NOT_SET/x", &env), PathBuf::from("$NOT_SET/x"));
        assert_eq!(hub_cache(&env).path, PathBuf::from("/h/.cache/huggingface/hub"));
    }

    #[test]
    fn offline_takes_huggingface_hubs_true_values_and_names_the_variable() {
        for v in ["1", "ON", "yes", "True"] {
            assert_eq!(offline(&env_of(&[("HF_HUB_OFFLINE", v)])), Some(format!("HF_HUB_OFFLINE={v}")));
        }
        for v in ["0", "off", "no", "2", ""] {
            assert_eq!(offline(&env_of(&[("HF_HUB_OFFLINE", v)])), None, "{v}");
        }
        assert_eq!(offline(&env_of(&[("TRANSFORMERS_OFFLINE", "1")])), Some("TRANSFORMERS_OFFLINE=1".into()));
        // HF_HUB_OFFLINE, once set, decides alone.
        assert_eq!(offline(&env_of(&[("HF_HUB_OFFLINE", "0"), ("TRANSFORMERS_OFFLINE", "1")])), None);
    }

    #[test]
    fn the_token_comes_from_hf_token_then_the_legacy_variable_then_the_token_files() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("hf");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(home.join("token"), "hf_file\n").unwrap();
        let custom = dir.path().join("custom-token");
        std::fs::write(&custom, "  hf_custom \r\n").unwrap();
        let h = home.to_str().unwrap();
        let c = custom.to_str().unwrap();
        let get = |pairs: &[(&str, &str)]| token(&env_of(pairs)).map(|t| (t.value, t.from));

        let both = [("HF_TOKEN", "hf_env"), ("HUGGING_FACE_HUB_TOKEN", "hf_legacy"), ("HF_HOME", h)];
        assert_eq!(get(&both), Some(("hf_env".into(), "HF_TOKEN".into())));
        assert_eq!(get(&both[1..]), Some(("hf_legacy".into(), "HUGGING_FACE_HUB_TOKEN".into())));
        let file = home.join("token").display().to_string();
        assert_eq!(get(&[("HF_HOME", h)]), Some(("hf_file".into(), file.clone())));
        assert_eq!(get(&[("HF_HOME", h), ("HF_TOKEN_PATH", c)]), Some(("hf_custom".into(), c.to_string())));
        // A blank variable falls through to the file, not to the legacy variable.
        assert_eq!(
            get(&[("HF_TOKEN", " \n"), ("HUGGING_FACE_HUB_TOKEN", "x"), ("HF_HOME", h)]),
            Some(("hf_file".into(), file))
        );
        let nothing = dir.path().join("none");
        assert_eq!(get(&[("HF_HOME", nothing.to_str().unwrap())]), None);
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let t = Token { value: "hf_secret".into(), from: "HF_TOKEN".into() };
        let env = HubEnv { cache: hub_cache(&env_of(&[])), offline: None, token: Some(t), endpoint: None };
        assert!(!format!("{env:?}").contains("hf_secret"));
    }

    #[test]
    fn hub_specs_take_a_revision_after_at_or_as_an_option() {
        let p = |s: &str, r: Option<&str>| HubSpec::parse(s, r);
        assert_eq!(
            p("Qwen/Qwen2.5-7B", None).unwrap().unwrap(),
            HubSpec { id: "Qwen/Qwen2.5-7B".into(), revision: None }
        );
        assert_eq!(p("Qwen/Q@v1.0", None).unwrap().unwrap().revision(), "v1.0");
        assert_eq!(p("Qwen/Q", Some("abc")).unwrap().unwrap().revision(), "abc");
        assert_eq!(p("Qwen/Q@refs/pr/1", None).unwrap().unwrap().revision(), "refs/pr/1");
        assert_eq!(p("Qwen/Q@x", Some("x")).unwrap().unwrap().revision(), "x");
        assert!(p("Qwen/Q@x", Some("y")).unwrap_err().to_string().contains("give one of them"));
        for bad in ["Qwen/Q@", "Qwen/Q@../../etc", "Qwen/Q@/abs"] {
            assert!(p(bad, None).is_err(), "{bad}");
        }
        assert_eq!(p("just-a-name", None).unwrap(), None);
        assert_eq!(p("./models/x", None).unwrap(), None);
        assert_eq!(p("Qwen/Q", None).unwrap().unwrap().folder(), "models--Qwen--Q");
    }

    #[test]
    fn weights_ids_depend_on_the_file_hashes_only() {
        let f = |n: &str, h: &str| FileHash { name: n.into(), sha256: h.into(), bytes: 1 };
        let mut a = Provenance::new(Source::Hub, Some("o/n".into()));
        a.files = vec![f("config.json", "aa"), f("model.safetensors", "bb")];
        let mut b = Provenance::new(Source::Local, None);
        b.path = Some("/elsewhere".into());
        b.files = vec![f("model.safetensors", "bb"), f("config.json", "aa")];
        assert_eq!(weights_id(&a), weights_id(&b));
        assert_eq!(weights_id(&a).len(), 16);
        b.files[0].sha256 = "cc".into();
        assert_ne!(weights_id(&a), weights_id(&b));
        let mut r1 = Provenance::new(Source::Random, Some("random".into()));
        r1.config_sha256 = Some("c".into());
        let mut r2 = r1.clone();
        r2.seed = Some(1);
        assert_ne!(weights_id(&r1), weights_id(&r2));
    }

    #[test]
    fn an_lfs_blob_names_its_sha256_and_a_git_blob_is_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs");
        let snap = dir.path().join("snapshots/c1");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::create_dir_all(&snap).unwrap();
        let lfs = "ab".repeat(32);
        std::fs::write(blobs.join(&lfs), b"weights").unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{lfs}"), snap.join("model.safetensors")).unwrap();
        let git = "cd".repeat(20);
        std::fs::write(blobs.join(&git), b"{}").unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{git}"), snap.join("config.json")).unwrap();
        assert_eq!(lfs_blob_sha256(&snap.join("model.safetensors")), Some(lfs));
        assert_eq!(lfs_blob_sha256(&snap.join("config.json")), None);
        // A folder linking into the snapshot reaches the blob name through the chain.
        let mine = dir.path().join("mine");
        std::fs::create_dir_all(&mine).unwrap();
        std::os::unix::fs::symlink(snap.join("model.safetensors"), mine.join("model.safetensors")).unwrap();
        assert_eq!(lfs_blob_sha256(&mine.join("model.safetensors")), Some("ab".repeat(32)));
    }
}
