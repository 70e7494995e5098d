//! Models by hub id from a Hugging Face cache laid out as `huggingface-cli download` leaves it
//! (blobs named by hash, snapshot files as symlinks into them, refs naming commits), built here
//! from the tiny fixture and read through the real binary with the network forbidden; and the
//! provenance every loaded model reports.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

const ID: &str = "tiny-org/tiny-qwen2";
const REPO: &str = "models--tiny-org--tiny-qwen2";
/// The commit of the single-file checkpoint.
const REV1: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
/// The commit of the same weights in two shards.
const REV2: &str = "b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2";
const SHARD2: &str = "model-00002-of-00002.safetensors";

/// Every variable that could point the binary at the real cache or the network.
const HF_VARS: [&str; 11] = [
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "XDG_CACHE_HOME",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_ENDPOINT",
    "LORALAB_CACHE",
];

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen2").join(name)).unwrap()
}

/// A word-level tokenizer over the fixture's 128 tokens, "t0" to "t127".
fn tokenizer_json() -> Vec<u8> {
    use tokenizers::models::wordlevel::WordLevel;
    let vocab = (0..128u32).map(|i| (format!("t{i}"), i)).collect();
    let model = WordLevel::builder().vocab(vocab).unk_token("t0".into()).build().unwrap();
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
    tok.to_string(false).unwrap().into_bytes()
}

/// A file of a snapshot: its name, content, and whether the hub stores it with Git LFS.
struct File {
    name: String,
    bytes: Vec<u8>,
    lfs: bool,
}

fn file(name: &str, bytes: Vec<u8>, lfs: bool) -> File {
    File { name: name.into(), bytes, lfs }
}

/// The fixture as the hub serves it: config and tokenizer in git, the weights in LFS.
fn single_file_model() -> Vec<File> {
    vec![
        file("config.json", fixture("config.json"), false),
        file("tokenizer.json", tokenizer_json(), false),
        file("model.safetensors", fixture("model.safetensors"), true),
    ]
}

/// The fixture's tensors split into two shards with an index.
fn sharded_model() -> Vec<File> {
    let bytes = fixture("model.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = st.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let half = tensors.len() / 2;
    let names = ["model-00001-of-00002.safetensors", SHARD2];
    let mut weight_map = serde_json::Map::new();
    let mut files =
        vec![file("config.json", fixture("config.json"), false), file("tokenizer.json", tokenizer_json(), false)];
    for (shard, part) in names.iter().zip([&tensors[..half], &tensors[half..]]) {
        for (name, _) in part {
            weight_map.insert(name.clone(), Value::String(shard.to_string()));
        }
        let data = safetensors::serialize(part.iter().map(|(n, v)| (n.clone(), v)), &None).unwrap();
        files.push(file(shard, data, true));
    }
    let index = serde_json::json!({ "metadata": { "total_size": bytes.len() }, "weight_map": weight_map });
    files.push(file("model.safetensors.index.json", serde_json::to_vec_pretty(&index).unwrap(), false));
    files
}

/// The name of a file's blob: its SHA-256 for an LFS file, else a git object id (40 hex
/// digits; which ones does not matter to a reader of the cache).
fn blob_name(f: &File) -> String {
    if f.lfs {
        sha256_hex(&f.bytes)
    } else {
        sha256_hex(&[b"blob ".as_slice(), &f.bytes].concat())[..40].to_string()
    }
}

/// Writes a snapshot of the tiny repository at `commit` into the hub cache `cache`, with
/// `refs` (branches or tags) pointing at it.
fn add_snapshot(cache: &Path, commit: &str, files: &[File], refs: &[&str]) -> PathBuf {
    let repo = cache.join(REPO);
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for f in files {
        let blob = blob_name(f);
        std::fs::write(repo.join("blobs").join(&blob), &f.bytes).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join(&f.name)).unwrap();
    }
    for r in refs {
        point_ref(cache, r, commit);
    }
    snap
}

/// Makes `refs/<name>` name `commit`, as huggingface_hub writes it (no newline).
fn point_ref(cache: &Path, name: &str, commit: &str) {
    let refs = cache.join(REPO).join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::write(refs.join(name), commit).unwrap();
}

/// A scratch folder with a home and a loralab cache, so that nothing of the machine's own is read.
struct Sandbox {
    dir: tempfile::TempDir,
}

/// What a run of `lab.model.load` gave.
struct Loaded {
    ok: bool,
    /// `model:info()`'s id, provenance and weights_id, and a greedy completion's text.
    info: Value,
    stderr: String,
    seconds: f64,
}

impl Sandbox {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("home")).unwrap();
        Sandbox { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn loralab_cache(&self) -> PathBuf {
        self.path("loralab-cache")
    }

    /// Runs `lab.model.load(<args>)` with `env` set (paths relative to the sandbox are written
    /// as `{}`-prefixed: "{}/hub" is "<sandbox>/hub").
    fn load(&self, args: &str, env: &[(&str, &str)]) -> Loaded {
        let out = self.path("out.json");
        let _ = std::fs::remove_file(&out);
        let script = self.path("load.lua");
        let body = format!(
            r#"local lab = require("lab")
local m = lab.model.load({args})
local outs = m:sample({{ {{ 1, 2, 3 }} }}, {{ max_tokens = 4, temperature = 0 }})
local info = m:info()
lab.fs.write_json("{}", {{ id = info.id, provenance = info.provenance, weights_id = info.weights_id,
  text = outs[1][1].text }})
"#,
            out.display()
        );
        std::fs::write(&script, body).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_loralab"));
        cmd.arg("run").arg(&script).current_dir(self.dir.path());
        for v in HF_VARS {
            cmd.env_remove(v);
        }
        cmd.env("HOME", self.path("home")).env("LORALAB_CACHE", self.loralab_cache());
        let root = self.dir.path().display().to_string();
        for (k, v) in env {
            cmd.env(k, v.replace("{}", &root));
        }
        let start = Instant::now();
        let o = cmd.output().expect("the binary runs");
        let seconds = start.elapsed().as_secs_f64();
        let info = std::fs::read_to_string(&out).map(|t| serde_json::from_str(&t).unwrap()).unwrap_or(Value::Null);
        Loaded { ok: o.status.success(), info, stderr: String::from_utf8_lossy(&o.stderr).into_owned(), seconds }
    }
}

impl Loaded {
    /// The provenance, asserting that the load succeeded.
    fn provenance(&self) -> &Value {
        assert!(self.ok, "the load failed: {}", self.stderr);
        &self.info["provenance"]
    }

    fn revision(&self) -> &str {
        self.provenance()["revision"].as_str().unwrap()
    }

    /// The SHA-256 recorded for the file `name`.
    fn sha256_of(&self, name: &str) -> String {
        let files = self.provenance()["files"].as_array().unwrap();
        let f = files.iter().find(|f| f["name"] == name).unwrap_or_else(|| panic!("{name} not in {files:?}"));
        f["sha256"].as_str().unwrap().to_string()
    }

    fn file_names(&self) -> Vec<String> {
        let files = self.provenance()["files"].as_array().unwrap();
        files.iter().map(|f| f["name"].as_str().unwrap().to_string()).collect()
    }

    fn weights_id(&self) -> &str {
        self.info["weights_id"].as_str().unwrap()
    }

    fn failed_with(&self, needles: &[&str]) {
        assert!(!self.ok, "the load should have failed");
        for n in needles {
            assert!(self.stderr.contains(n), "the error lacks '{n}':\n{}", self.stderr);
        }
    }
}

const BY_ID: &str = "\"tiny-org/tiny-qwen2\"";
const OFFLINE: (&str, &str) = ("HF_HUB_OFFLINE", "1");

#[test]
fn a_model_is_found_through_hf_hub_cache_offline() {
    let s = Sandbox::new();
    let files = single_file_model();
    add_snapshot(&s.path("shared/hub"), REV1, &files, &["main"]);
    let got = s.load(BY_ID, &[("HF_HUB_CACHE", "{}/shared/hub"), OFFLINE]);
    let p = got.provenance();
    assert_eq!(p["source"], "hub");
    assert_eq!(p["id"], ID);
    assert_eq!(got.revision(), REV1);
    assert_eq!(p["requested_revision"], "main");
    assert!(p["path"].as_str().unwrap().ends_with(&format!("{REPO}/snapshots/{REV1}")), "{p}");
    assert_eq!(got.info["id"], ID);
    // The weights' hash is their blob's name; the git-stored files are hashed.
    assert_eq!(got.sha256_of("model.safetensors"), blob_name(&files[2]));
    assert_eq!(got.sha256_of("model.safetensors"), sha256_hex(&files[2].bytes));
    assert_eq!(got.sha256_of("config.json"), sha256_hex(&files[0].bytes));
    assert_eq!(got.sha256_of("tokenizer.json"), sha256_hex(&files[1].bytes));
    assert_eq!(p["files"][2]["bytes"], files[2].bytes.len());
    assert_eq!(got.weights_id().len(), 16);
    assert!(!got.info["text"].as_str().unwrap().is_empty(), "the model samples: {}", got.info);
}

#[test]
fn a_model_is_found_through_the_legacy_huggingface_hub_cache_offline() {
    let s = Sandbox::new();
    add_snapshot(&s.path("legacy"), REV1, &single_file_model(), &["main"]);
    let got = s.load(BY_ID, &[("HUGGINGFACE_HUB_CACHE", "{}/legacy"), OFFLINE]);
    assert_eq!(got.revision(), REV1);
}

#[test]
fn a_model_is_found_under_hf_home_offline() {
    let s = Sandbox::new();
    add_snapshot(&s.path("hf-home/hub"), REV1, &single_file_model(), &["main"]);
    let got = s.load(BY_ID, &[("HF_HOME", "{}/hf-home"), OFFLINE]);
    assert_eq!(got.revision(), REV1);
}

#[test]
fn without_variables_the_cache_is_under_xdg_cache_home_else_the_home_folder() {
    let s = Sandbox::new();
    add_snapshot(&s.path("xdg/huggingface/hub"), REV1, &single_file_model(), &["main"]);
    add_snapshot(&s.path("home/.cache/huggingface/hub"), REV2, &sharded_model(), &["main"]);
    assert_eq!(s.load(BY_ID, &[("XDG_CACHE_HOME", "{}/xdg"), OFFLINE]).revision(), REV1);
    assert_eq!(s.load(BY_ID, &[OFFLINE]).revision(), REV2);
}

#[test]
fn hf_hub_cache_wins_over_huggingface_hub_cache_which_wins_over_hf_home() {
    let s = Sandbox::new();
    let rev_c = "c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3";
    add_snapshot(&s.path("new"), REV1, &single_file_model(), &["main"]);
    add_snapshot(&s.path("legacy"), REV2, &single_file_model(), &["main"]);
    add_snapshot(&s.path("home-dir/hub"), rev_c, &single_file_model(), &["main"]);
    let new = ("HF_HUB_CACHE", "{}/new");
    let legacy = ("HUGGINGFACE_HUB_CACHE", "{}/legacy");
    let home = ("HF_HOME", "{}/home-dir");
    assert_eq!(s.load(BY_ID, &[new, legacy, home, OFFLINE]).revision(), REV1);
    assert_eq!(s.load(BY_ID, &[legacy, home, OFFLINE]).revision(), REV2);
    assert_eq!(s.load(BY_ID, &[home, OFFLINE]).revision(), rev_c);
}

#[test]
fn refs_main_is_resolved_offline_and_a_moved_ref_gives_other_weights() {
    let s = Sandbox::new();
    let cache = s.path("hub");
    add_snapshot(&cache, REV1, &single_file_model(), &["main"]);
    add_snapshot(&cache, REV2, &sharded_model(), &[]);
    let env = [("HF_HUB_CACHE", "{}/hub"), OFFLINE];
    let first = s.load(BY_ID, &env);
    assert_eq!(first.revision(), REV1);
    point_ref(&cache, "main", &format!("{REV2}\n"));
    let second = s.load(BY_ID, &env);
    assert_eq!(second.revision(), REV2);
    assert_ne!(first.weights_id(), second.weights_id(), "other files, another weights id");
}

#[test]
fn a_revision_after_at_or_as_an_option_loads_that_snapshot() {
    let s = Sandbox::new();
    let cache = s.path("hub");
    add_snapshot(&cache, REV1, &single_file_model(), &["main"]);
    add_snapshot(&cache, REV2, &sharded_model(), &["v2"]);
    let env = [("HF_HUB_CACHE", "{}/hub"), OFFLINE];
    for args in [
        format!("\"{ID}@{REV2}\""),
        format!("\"{ID}@v2\""),
        format!("{BY_ID}, {{ revision = \"v2\" }}"),
        format!("{BY_ID}, {{ revision = \"{REV2}\" }}"),
    ] {
        let got = s.load(&args, &env);
        assert_eq!(got.revision(), REV2, "{args}");
        assert!(got.info["id"].as_str().unwrap().starts_with(&format!("{ID}@")), "{args}: {}", got.info);
    }
    let got = s.load(&format!("\"{ID}@v2\""), &env);
    assert_eq!(got.provenance()["requested_revision"], "v2");
    s.load(&format!("\"{ID}@v2\", {{ revision = \"main\" }}"), &env).failed_with(&["give one of them"]);
    s.load(&format!("\"{ID}@nope\""), &env).failed_with(&["refs/nope", "cached refs: main, v2", REV1, REV2]);
    s.load(&format!("{BY_ID}, {{ revison = \"v2\" }}"), &env).failed_with(&["did you mean 'revision'"]);
}

#[test]
fn a_sharded_checkpoint_loads_from_the_cache_like_the_single_file() {
    let s = Sandbox::new();
    let cache = s.path("hub");
    add_snapshot(&cache, REV1, &single_file_model(), &["main"]);
    let sharded = sharded_model();
    add_snapshot(&cache, REV2, &sharded, &["sharded"]);
    let env = [("HF_HUB_CACHE", "{}/hub"), OFFLINE];
    let single = s.load(BY_ID, &env);
    let split = s.load(&format!("\"{ID}@sharded\""), &env);
    assert_eq!(split.revision(), REV2);
    assert_eq!(split.info["text"], single.info["text"], "the same tensors give the same greedy completion");
    let names = split.file_names();
    for f in &sharded {
        assert!(names.contains(&f.name), "{} not recorded: {names:?}", f.name);
        assert_eq!(split.sha256_of(&f.name), sha256_hex(&f.bytes), "{}", f.name);
    }
}

#[test]
fn a_missing_shard_is_an_error_naming_the_file_and_the_snapshot() {
    let s = Sandbox::new();
    let cache = s.path("hub");
    let sharded = sharded_model();
    let snap = add_snapshot(&cache, REV2, &sharded, &["main"]);
    // The download stopped before the second shard: its link dangles.
    let shard = sharded.iter().find(|f| f.name == SHARD2).unwrap();
    std::fs::remove_file(cache.join(REPO).join("blobs").join(blob_name(shard))).unwrap();
    let got = s.load(BY_ID, &[("HF_HUB_CACHE", "{}/hub"), OFFLINE]);
    got.failed_with(&[
        SHARD2,
        &snap.display().to_string(),
        "only partly in the Hugging Face cache",
        "HF_HUB_OFFLINE=1",
    ]);
    assert!(got.seconds < 10.0, "offline, it fails at once ({:.1} s)", got.seconds);
}

#[test]
fn a_model_missing_offline_fails_at_once_naming_the_cache_and_the_variable() {
    let s = Sandbox::new();
    std::fs::create_dir_all(s.path("hub")).unwrap();
    let cache = s.path("hub").display().to_string();
    for (var, value) in [("HF_HUB_OFFLINE", "1"), ("HF_HUB_OFFLINE", "yes"), ("TRANSFORMERS_OFFLINE", "ON")] {
        let got = s.load("\"no-org/no-such-model\"", &[("HF_HUB_CACHE", "{}/hub"), (var, value)]);
        let setting = format!("{var}={value}");
        got.failed_with(&["not in the Hugging Face cache", &cache, "from HF_HUB_CACHE", &setting, "HINT"]);
        assert!(got.seconds < 10.0, "offline, it fails at once ({:.1} s)", got.seconds);
    }
}

#[test]
fn a_snapshot_of_copied_files_without_symlinks_is_hashed_by_content() {
    let s = Sandbox::new();
    let files = single_file_model();
    let linked = add_snapshot(&s.path("linked"), REV1, &files, &["main"]);
    let snap = s.path("copied").join(REPO).join("snapshots").join(REV1);
    std::fs::create_dir_all(&snap).unwrap();
    for f in &files {
        std::fs::write(snap.join(&f.name), &f.bytes).unwrap();
    }
    point_ref(&s.path("copied"), "main", REV1);
    let copied = s.load(BY_ID, &[("HF_HUB_CACHE", "{}/copied"), OFFLINE]);
    assert_eq!(copied.sha256_of("model.safetensors"), sha256_hex(&files[2].bytes));
    let via_links = s.load(BY_ID, &[("HF_HUB_CACHE", "{}/linked"), OFFLINE]);
    assert_eq!(copied.weights_id(), via_links.weights_id());
    assert!(linked.is_dir());
}

#[test]
fn a_local_folder_is_hashed_once_and_its_hash_cached_by_size_and_mtime() {
    let s = Sandbox::new();
    let dir = s.path("my-model");
    std::fs::create_dir_all(&dir).unwrap();
    let files = single_file_model();
    for f in &files {
        std::fs::write(dir.join(&f.name), &f.bytes).unwrap();
    }
    let spec = format!("\"{}\"", dir.display());
    let got = s.load(&spec, &[]);
    assert_eq!(got.provenance()["source"], "local");
    let real = sha256_hex(&files[2].bytes);
    assert_eq!(got.sha256_of("model.safetensors"), real);
    // The same files in the hub cache are the same weights.
    add_snapshot(&s.path("hub"), REV1, &files, &["main"]);
    assert_eq!(s.load(BY_ID, &[("HF_HUB_CACHE", "{}/hub"), OFFLINE]).weights_id(), got.weights_id());

    // A second load reads the hash from the cache: a forged entry shows through...
    let cache_file = s.loralab_cache().join("sha256-cache.json");
    let text = std::fs::read_to_string(&cache_file).expect("the hash cache is written");
    let forged = "0".repeat(64);
    assert!(text.contains(&real));
    std::fs::write(&cache_file, text.replace(&real, &forged)).unwrap();
    assert_eq!(s.load(&spec, &[]).sha256_of("model.safetensors"), forged);
    // ...until the file's mtime changes, when it is hashed again.
    let weights = std::fs::File::options().write(true).open(dir.join("model.safetensors")).unwrap();
    weights.set_modified(std::time::SystemTime::now() + Duration::from_secs(5)).unwrap();
    drop(weights);
    assert_eq!(s.load(&spec, &[]).sha256_of("model.safetensors"), real);
}

#[test]
fn a_local_sharded_folder_loads_and_a_missing_shard_is_named() {
    let s = Sandbox::new();
    let dir = s.path("sharded");
    std::fs::create_dir_all(&dir).unwrap();
    for f in sharded_model() {
        std::fs::write(dir.join(&f.name), &f.bytes).unwrap();
    }
    let spec = format!("\"{}\"", dir.display());
    let got = s.load(&spec, &[]);
    assert!(got.file_names().contains(&"model.safetensors.index.json".to_string()), "{:?}", got.file_names());
    std::fs::remove_file(dir.join(SHARD2)).unwrap();
    s.load(&spec, &[]).failed_with(&[SHARD2, "model.safetensors.index.json", "missing"]);
}

#[test]
fn a_revision_is_refused_for_anything_but_a_hub_id() {
    let s = Sandbox::new();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen2");
    s.load(&format!("\"{}\", {{ revision = \"main\" }}", dir.display()), &[])
        .failed_with(&["a local folder", "applies only to hub ids"]);
}
