//! Bounded, deterministic fuzzing of every reader of outside input (`loralab::fuzzing`): a fixed
//! number of mutations of the committed seed corpus (`tests/fuzz/corpus/<target>/`) per target,
//! each of which must return without a panic, an abort, or an allocation above 1 GiB. Inputs
//! that once found a bug stay in the corpus as regression tests.
//!
//!   cargo test --release --test fuzz                                  # CI: 400 inputs a target
//!   LORALAB_FUZZ_ITERATIONS=1000000 cargo test --release --test fuzz  # a long run
//!   cargo test --release --test fuzz -- --ignored write_the_seed_corpus  # remake the seeds

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};

use loralab::fuzzing::{self, Mutator, TARGETS};

/// No reader may ask for more than this at once, whatever its input.
const ALLOCATION_BOUND: usize = 1 << 30;

/// The system allocator, refusing (with a message) any single allocation above the bound: the
/// test process then aborts, which fails the test.
struct Bounded;

unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOCATION_BOUND {
            let msg = b"fuzz: an allocation above the bound was asked for\n";
            // Safety: writing a static buffer to stderr; nothing here allocates.
            unsafe { libc::write(2, msg.as_ptr() as *const libc::c_void, msg.len()) };
            return std::ptr::null_mut();
        }
        // Safety: forwarding to the system allocator with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // Safety: the pointer came from `alloc` above, which is the system's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOCATION_BOUND {
            return std::ptr::null_mut();
        }
        // Safety: as for `alloc` and `dealloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Bounded = Bounded;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus")
}

fn iterations() -> usize {
    std::env::var("LORALAB_FUZZ_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(400)
}

/// Runs one target over its seeds and their mutations; a panic fails with the input saved.
fn fuzz(name: &str) {
    let target = TARGETS.iter().find(|(n, _)| *n == name).expect("a target").1;
    let seeds = fuzzing::seeds(&corpus(), name);
    assert!(!seeds.is_empty(), "no seeds in tests/fuzz/corpus/{name}");
    let mut m = Mutator::new(name.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)));
    let inputs = seeds.iter().cloned().chain((0..iterations()).map(|_| m.mutate(&seeds)));
    let mut accepted_seeds = 0;
    for (i, input) in inputs.enumerate() {
        let caught = std::panic::catch_unwind(|| target(&input));
        if i < seeds.len() && matches!(caught, Ok(true)) {
            accepted_seeds += 1;
        }
        if i + 1 == seeds.len() {
            assert!(accepted_seeds > 0, "fuzz target {name}: none of its seeds is accepted");
        }
        if let Err(panic) = caught {
            let saved = std::env::temp_dir().join(format!("loralab-fuzz-{name}-{i}.bin"));
            std::fs::write(&saved, &input).unwrap();
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("fuzz target {name}: input {i} panicked ({msg}); saved to {}", saved.display());
        }
    }
    fuzzing::clean_scratch();
}

#[test]
fn the_gguf_reader_survives_mutated_files() {
    fuzz("gguf");
}

#[test]
fn the_safetensors_loader_survives_mutated_files() {
    fuzz("safetensors");
}

#[test]
fn the_config_reader_survives_mutated_configs() {
    fuzz("config");
}

#[test]
fn the_tokenizer_loader_survives_mutated_tokenizer_files() {
    fuzz("tokenizer");
}

#[test]
fn chat_templates_survive_mutation() {
    fuzz("chat_template");
}

#[test]
fn the_jsonl_reader_survives_mutated_rows() {
    fuzz("jsonl");
}

#[test]
fn the_adapter_loader_survives_mutated_adapters() {
    fuzz("adapter");
}

#[test]
fn set_values_survive_mutation() {
    fuzz("set");
}

#[test]
fn every_target_has_a_test_and_seeds() {
    let src = std::fs::read_to_string(file!()).unwrap();
    for (name, _) in TARGETS {
        assert!(src.contains(&format!("fuzz(\"{name}\")")), "no test fuzzes {name}");
        assert!(!fuzzing::seeds(&corpus(), name).is_empty(), "no seeds for {name}");
    }
}

/// Writes the seed corpus: one small valid input per target (and a few variants).
#[test]
#[ignore]
fn write_the_seed_corpus() {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::{DType, Device, Tensor};
    let put = |target: &str, file: &str, bytes: &[u8]| {
        let dir = corpus().join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(file), bytes).unwrap();
    };
    let dev = Device::Cpu;
    let randn = |shape: &[usize]| Tensor::randn(0f32, 0.02, shape, &dev).unwrap();
    let (v, d, f, h, k) = (8usize, 8usize, 16usize, 2usize, 1usize);
    let e = d / h;

    // gguf: a one-layer llama with a byte-level BPE vocabulary of a few tokens.
    let mut tensors: Vec<(String, Tensor)> = vec![
        ("token_embd.weight".into(), randn(&[v, d])),
        ("output_norm.weight".into(), Tensor::ones(d, DType::F32, &dev).unwrap()),
    ];
    for (name, shape) in [
        ("attn_q", vec![h * e, d]),
        ("attn_k", vec![k * e, d]),
        ("attn_v", vec![k * e, d]),
        ("attn_output", vec![d, h * e]),
        ("ffn_gate", vec![f, d]),
        ("ffn_up", vec![f, d]),
        ("ffn_down", vec![d, f]),
    ] {
        tensors.push((format!("blk.0.{name}.weight"), randn(&shape)));
    }
    tensors.push(("blk.0.attn_norm.weight".into(), Tensor::ones(d, DType::F32, &dev).unwrap()));
    tensors.push(("blk.0.ffn_norm.weight".into(), Tensor::ones(d, DType::F32, &dev).unwrap()));
    let q: Vec<(String, QTensor)> =
        tensors.iter().map(|(n, t)| (n.clone(), QTensor::quantize(t, GgmlDType::F32).unwrap())).collect();
    let strings =
        |xs: &[&str]| gguf_file::Value::Array(xs.iter().map(|s| gguf_file::Value::String(s.to_string())).collect());
    let meta: Vec<(&str, gguf_file::Value)> = vec![
        ("general.architecture", gguf_file::Value::String("llama".into())),
        ("llama.block_count", gguf_file::Value::U32(1)),
        ("llama.embedding_length", gguf_file::Value::U32(d as u32)),
        ("llama.feed_forward_length", gguf_file::Value::U32(f as u32)),
        ("llama.attention.head_count", gguf_file::Value::U32(h as u32)),
        ("llama.attention.head_count_kv", gguf_file::Value::U32(k as u32)),
        ("llama.attention.layer_norm_rms_epsilon", gguf_file::Value::F32(1e-5)),
        ("llama.context_length", gguf_file::Value::U32(32)),
        ("tokenizer.ggml.model", gguf_file::Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", strings(&["a", "b", "ab", "c", "<s>", "</s>", "Ġ", "Ġa"])),
        ("tokenizer.ggml.merges", strings(&["a b", "Ġ a"])),
        ("tokenizer.ggml.eos_token_id", gguf_file::Value::U32(5)),
        (
            "tokenizer.chat_template",
            gguf_file::Value::String("{% for m in messages %}{{ m.content }}{% endfor %}".into()),
        ),
    ];
    let mut buf = std::io::Cursor::new(Vec::new());
    let meta_refs: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let q_refs: Vec<(&str, &QTensor)> = q.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut buf, &meta_refs, &q_refs).unwrap();
    let gguf = buf.into_inner();
    loralab::model::gguf::read_from(&mut std::io::Cursor::new(&gguf), "seed").expect("the seed GGUF reads");
    put("gguf", "tiny-llama.gguf", &gguf);

    // safetensors: the weights of the fuzzing module's fixed config (Qwen2, tied, one layer), by
    // the families' tensor table.
    let config: loralab::model::Config = serde_json::from_str(loralab::fuzzing::TINY_CONFIG).unwrap();
    let mut st: std::collections::HashMap<String, Tensor> = std::collections::HashMap::new();
    for spec in loralab::model::family::tensors(&config).unwrap() {
        let t = match spec.kind {
            loralab::model::family::Kind::Norm => Tensor::ones(spec.shape.as_slice(), DType::F32, &dev).unwrap(),
            _ => randn(&spec.shape),
        };
        st.insert(spec.name, t);
    }
    let dir = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&st, dir.path().join("m.safetensors")).unwrap();
    let weights = std::fs::read(dir.path().join("m.safetensors")).unwrap();
    put("safetensors", "tiny-qwen2.safetensors", &weights);

    // config: the tiny fixture's and the fuzzing module's.
    put("config", "tiny-qwen2.json", &std::fs::read(corpus().join("../../fixtures/tiny-qwen2/config.json")).unwrap());
    put(
        "config",
        "llama.json",
        br#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4,
 "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": true,
 "eos_token_id": [1, 2]}"#,
    );

    // tokenizer: a byte-level BPE and a word-level tokenizer.json.
    let bpe = r#"{"version": "1.0", "truncation": null, "padding": null,
 "added_tokens": [{"id": 5, "content": "<|im_end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
 "normalizer": null, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
 "post_processor": null, "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
 "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
  "fuse_unk": false, "byte_fallback": false, "vocab": {"H": 0, "e": 1, "l": 2, "o": 3, "He": 4, "<|im_end|>": 5, "ll": 6, "Hell": 7},
  "merges": ["H e", "l l", "He ll"]}}"#;
    put("tokenizer", "bpe.json", bpe.as_bytes());
    let word = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
 "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
 "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "Hello": 1, "world": 2}, "unk_token": "[UNK]"}}"#;
    put("tokenizer", "word.json", word.as_bytes());

    // chat_template: ChatML (Qwen2.5, SmolLM2) and a Llama 3 style template.
    put(
        "chat_template",
        "chatml.jinja",
        b"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    );
    put(
        "chat_template",
        "llama3.jinja",
        b"{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    );

    // jsonl: rows of every shape.
    put(
        "jsonl",
        "rows.jsonl",
        br#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
{"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}]}
{"prompt": "Say hi", "completion": "hi"}
{"text": "plain text"}
{"input_ids": [1, 2, 3]}
"#,
    );

    // adapter: adapter_config.json, a NUL byte, adapter_model.safetensors (q and v, r 2).
    let mut ad: std::collections::HashMap<String, Tensor> = std::collections::HashMap::new();
    for (name, out) in [("q_proj", h * e), ("v_proj", k * e)] {
        let prefix = format!("base_model.model.model.layers.0.self_attn.{name}");
        ad.insert(format!("{prefix}.lora_A.weight"), randn(&[2, d]));
        ad.insert(format!("{prefix}.lora_B.weight"), randn(&[out, 2]));
    }
    candle_core::safetensors::save(&ad, dir.path().join("a.safetensors")).unwrap();
    let mut adapter = br#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}"#.to_vec();
    adapter.push(0);
    adapter.extend(std::fs::read(dir.path().join("a.safetensors")).unwrap());
    put("adapter", "q-v.bin", &adapter);

    // set: values of every type, good and bad.
    put("set", "values.txt", b"n=8\nlr=3e-4\nname=hello\nflag=false\nseeds=1,2,3\nwords=a,b\nfree=x\n");
    put("set", "bad.txt", b"n=1.5\nlr=inf\nflag=maybe\nseeds=1,x\nnope=1\n");
}
