//! Entry points for fuzzing the readers of outside input: each takes arbitrary bytes and must
//! return (an error is fine) without a panic, an abort, or an allocation beyond a bound. Each
//! says whether the input was accepted, so that a test can check that the seeds are.
//!
//! They are shared by the bounded fuzz test that `cargo test` runs (`tests/fuzz.rs`, a fixed
//! number of mutations of the seed corpus in `tests/fuzz/corpus/`) and by the libFuzzer targets
//! in `fuzz/` for long runs (`cargo fuzz run gguf`).

use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::model::{Decoder, LoadOptions};

/// A fuzz target: takes any bytes, says whether they were accepted.
pub type Target = fn(&[u8]) -> bool;

/// The fuzz targets by name.
pub const TARGETS: &[(&str, Target)] = &[
    ("gguf", gguf),
    ("safetensors", safetensors),
    ("config", config),
    ("tokenizer", tokenizer),
    ("chat_template", chat_template),
    ("jsonl", jsonl),
    ("adapter", adapter),
    ("set", set),
];

/// A GGUF file, read as a model.
pub fn gguf(bytes: &[u8]) -> bool {
    crate::model::gguf::read_from(&mut Cursor::new(bytes), "fuzz.gguf").is_ok()
}

/// A folder of weights for a fixed small config: the safetensors file is the input.
pub fn safetensors(bytes: &[u8]) -> bool {
    let dir = scratch("safetensors");
    let _ = std::fs::write(dir.join("config.json"), TINY_CONFIG);
    let _ = std::fs::write(dir.join("model.safetensors"), bytes);
    crate::model::load::read_decoder(&dir, &cpu()).is_ok()
}

/// A config.json, with random weights of its shape when it is valid and small.
pub fn config(bytes: &[u8]) -> bool {
    let Ok(cfg) = serde_json::from_slice::<crate::model::Config>(bytes) else { return false };
    if cfg.validate().is_err() {
        return false;
    }
    // Only shapes a test can afford; the size bounds themselves are the loaders' to check.
    let params = cfg.vocab_size.saturating_mul(cfg.hidden_size).saturating_add(
        cfg.num_hidden_layers
            .saturating_mul(cfg.hidden_size.saturating_mul(cfg.intermediate_size.max(cfg.hidden_size))),
    );
    if params > 1 << 20 || cfg.max_position_embeddings > 1 << 12 {
        return true;
    }
    crate::model::load::random(cfg, &cpu(), "fuzz".into(), Some(0)).is_ok()
}

/// A tokenizer.json, then encoding and decoding a fixed text with it.
pub fn tokenizer(bytes: &[u8]) -> bool {
    let Ok(tok) = crate::model::tokenizer::parse_tokenizer_json(bytes, "fuzz.json") else { return false };
    match tok.encode("Hello, world! 123 café", false) {
        Ok(enc) => tok.decode(enc.get_ids(), false).is_ok(),
        Err(_) => false,
    }
}

/// A chat template (the input as text), rendering a fixed conversation.
pub fn chat_template(bytes: &[u8]) -> bool {
    let Ok(template) = std::str::from_utf8(bytes) else { return false };
    let inner = word_tokenizer();
    let tok = crate::model::TextTokenizer::new(inner, Some(template.to_string()), None, None, Vec::new());
    let messages = [
        crate::model::Message { role: "system".into(), content: "Be brief.".into() },
        crate::model::Message { role: "user".into(), content: "Hi".into() },
        crate::model::Message { role: "assistant".into(), content: "Hello.".into() },
    ];
    tok.chat_prompt(&messages, true).is_ok()
}

/// A JSONL file of training rows.
pub fn jsonl(bytes: &[u8]) -> bool {
    let path = scratch("jsonl").join("rows.jsonl");
    if std::fs::write(&path, bytes).is_err() {
        return false;
    }
    let _ = crate::data::Dataset::jsonl(&path, true);
    crate::data::Dataset::jsonl(&path, false).is_ok()
}

/// An adapter folder for the tiny model: adapter_config.json, a NUL byte, then the safetensors
/// file (the input holds both).
pub fn adapter(bytes: &[u8]) -> bool {
    let (config, weights) = match bytes.iter().position(|&b| b == 0) {
        Some(i) => (&bytes[..i], &bytes[i + 1..]),
        None => (bytes, &[][..]),
    };
    let dir = scratch("adapter");
    let _ = std::fs::write(dir.join("adapter_config.json"), config);
    let _ = std::fs::write(dir.join("adapter_model.safetensors"), weights);
    crate::adapter::Adapter::load(&dir, tiny_decoder()).is_ok()
}

/// `--set` values (one `KEY=VALUE` per line) against defaults of every type.
pub fn set(bytes: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(bytes) else { return false };
    let given: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .collect();
    let lua = mlua::Lua::new();
    let Ok(defaults) = lua
        .load("return { n = 4, lr = 1e-4, name = 'x', flag = true, seeds = { 1, 2 }, words = { 'a' }, free = {} }")
        .eval::<mlua::Table>()
    else {
        return false;
    };
    crate::lua::resolve_settings(&lua, &defaults, &given).is_ok()
}

/// The config of the fuzz targets that read weights (also the seed writer's, in tests/fuzz.rs).
pub const TINY_CONFIG: &str = r#"{"architectures": ["Qwen2ForCausalLM"], "vocab_size": 32, "hidden_size": 8,
 "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
 "max_position_embeddings": 32, "tie_word_embeddings": true}"#;

fn cpu() -> LoadOptions {
    LoadOptions { dtype: DType::F32, device: Device::Cpu }
}

/// The tiny model the adapter target loads onto, made once.
fn tiny_decoder() -> &'static Decoder {
    static D: std::sync::OnceLock<Decoder> = std::sync::OnceLock::new();
    D.get_or_init(|| {
        let cfg: crate::model::Config = serde_json::from_str(TINY_CONFIG).expect("a valid config");
        crate::model::load::random(cfg, &cpu(), "tiny".into(), Some(0)).expect("a tiny model").decoder
    })
}

fn word_tokenizer() -> tokenizers::Tokenizer {
    use tokenizers::models::wordlevel::WordLevel;
    let vocab = [("[UNK]".to_string(), 0u32), ("Hi".to_string(), 1)].into_iter().collect();
    let model = WordLevel::builder().vocab(vocab).unk_token("[UNK]".into()).build().expect("a word-level model");
    tokenizers::Tokenizer::new(model)
}

/// A folder of this process and thread for a target's files, reused across inputs.
fn scratch(target: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join(format!("loralab-fuzz-{}-{:?}", std::process::id(), std::thread::current().id()))
        .join(target);
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Removes this process's scratch folders.
pub fn clean_scratch() {
    let prefix = format!("loralab-fuzz-{}-", std::process::id());
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// The seed inputs of a target: the files of `corpus/<target>/`.
pub fn seeds(corpus: &Path, target: &str) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(corpus.join(target)).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    files.sort();
    files.into_iter().filter_map(|f| std::fs::read(f).ok()).collect()
}

/// A deterministic mutator: small edits of the kinds that break parsers (bit flips, boundary
/// integers at any offset, inserted, deleted, repeated and cut ranges, splices of two seeds).
pub struct Mutator {
    state: u64,
}

impl Mutator {
    pub fn new(seed: u64) -> Self {
        Mutator { state: seed ^ 0x9E37_79B9_7F4A_7C15 }
    }

    fn next(&mut self) -> u64 {
        // SplitMix64.
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    /// A mutated copy of one of `seeds`.
    pub fn mutate(&mut self, seeds: &[Vec<u8>]) -> Vec<u8> {
        let mut data = seeds[self.below(seeds.len())].clone();
        for _ in 0..1 + self.below(4) {
            self.edit(&mut data, seeds);
        }
        data
    }

    fn edit(&mut self, data: &mut Vec<u8>, seeds: &[Vec<u8>]) {
        const BOUNDARY: [u64; 8] = [0, 1, 0x7F, 0xFF, 0x7FFF_FFFF, 0xFFFF_FFFF, 1 << 62, u64::MAX];
        let len = data.len();
        match self.below(8) {
            0 if len > 0 => {
                let i = self.below(len);
                data[i] ^= 1 << self.below(8);
            }
            1 if len > 0 => {
                let i = self.below(len);
                data[i] = [0u8, 0xFF, 0x7F, 0x80, b'"', b'{', b'9', 0][self.below(8)];
            }
            2 if len >= 8 => {
                let i = self.below(len - 7);
                let v = BOUNDARY[self.below(BOUNDARY.len())].to_le_bytes();
                let width = [1usize, 2, 4, 8][self.below(4)];
                data[i..i + width].copy_from_slice(&v[..width]);
            }
            3 => {
                let i = self.below(len + 1);
                let n = 1 + self.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| self.next() as u8).collect();
                data.splice(i..i, bytes);
            }
            4 if len > 0 => {
                let i = self.below(len);
                let n = 1 + self.below((len - i).min(64));
                data.drain(i..i + n);
            }
            5 if len > 0 => {
                let i = self.below(len);
                let n = 1 + self.below((len - i).min(256));
                let copy = data[i..i + n].to_vec();
                let at = self.below(len + 1);
                data.splice(at..at, copy);
            }
            6 if len > 0 => {
                let keep = self.below(len);
                data.truncate(keep);
            }
            _ => {
                let other = &seeds[self.below(seeds.len())];
                if !other.is_empty() {
                    let at = self.below(len + 1);
                    let from = self.below(other.len());
                    data.truncate(at);
                    data.extend_from_slice(&other[from..]);
                }
            }
        }
    }
}
