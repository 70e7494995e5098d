//! Hostile input through the Lua API: every case ends in an error that names the setting, never
//! in an abort, a panic or a silent NaN; the run store survives bad results and damaged files.

use std::path::Path;
use std::process::Command;

fn loralab(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loralab"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the binary runs");
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Runs a Lua body after a prelude that defines `lab` and `tiny(overrides)`, a random Qwen2.
fn run_lua(body: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("case.lua");
    let prelude = r#"
local lab = require("lab")
local function tiny(over)
  local c = { architectures = {"Qwen2ForCausalLM"}, vocab_size = 50, hidden_size = 16, intermediate_size = 32,
    num_hidden_layers = 2, num_attention_heads = 2, num_key_value_heads = 1, max_position_embeddings = 64 }
  for k, v in pairs(over or {}) do c[k] = v end
  return lab.model.random(c, { seed = 3 })
end
local rows = lab.data.rows({ { input_ids = {1, 2, 3, 4} }, { input_ids = {5, 6, 7} } })
local function train(opts, lora)
  local m = tiny()
  local a = lab.adapter.new(m, lora or { r = 2, target_modules = {"all-linear"} })
  local o = { max_steps = not opts.num_train_epochs and 2 or nil, per_device_train_batch_size = 2 }
  for k, v in pairs(opts) do o[k] = v end
  return lab.train.sft(m, a, rows, o)
end
"#;
    std::fs::write(&path, format!("{prelude}\n{body}")).unwrap();
    loralab(&["run", &path.display().to_string()])
}

/// Asserts a clean failure: exit status 1 (not an abort's 134 or a panic's 101) and `want` said.
fn fails_naming(body: &str, want: &str) {
    let (code, out) = run_lua(body);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(want), "wanted '{want}' in:\n{out}");
    assert!(!out.contains("panicked"), "{out}");
}

#[test]
fn a_huge_epoch_count_is_refused_before_anything_is_reserved() {
    fails_naming("train({ num_train_epochs = 1e9 })", "is more than 100000000");
    fails_naming("train({ num_train_epochs = math.huge })", "num_train_epochs must be a finite number");
}

#[test]
fn optimizer_settings_out_of_range_are_errors_naming_them() {
    fails_naming("train({ learning_rate = math.huge })", "learning_rate must be a finite number");
    fails_naming("train({ weight_decay = 0/0 })", "weight_decay must be a finite number");
    fails_naming("train({ adam_beta1 = 5 })", "adam_beta1 must be in [0, 1)");
    fails_naming("train({ adam_beta2 = -1 })", "adam_beta2 must be in [0, 1)");
    fails_naming("train({ adam_epsilon = 0 })", "adam_epsilon must be > 0");
    fails_naming(
        "train({}, { r = 2, lora_alpha = 0/0, target_modules = {'q_proj'} })",
        "lora_alpha must be a finite number",
    );
}

#[test]
fn a_step_whose_loss_or_gradient_is_not_finite_stops_training_naming_the_step() {
    fails_naming("train({ learning_rate = 1e30, max_steps = 4 })", "training step ");
    let (_, out) = run_lua("train({ learning_rate = 1e30, max_steps = 4 })");
    assert!(out.contains("the adapter was not updated") && out.contains("Lower learning_rate"), "{out}");
    // Or, when asked, such steps are skipped and counted.
    let (code, out) =
        run_lua("local log = train({ learning_rate = 1e30, max_steps = 4, skip_nonfinite_steps = true })\nprint('taken', #log, 'skipped', log.skipped_steps)");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("skipped (skip_nonfinite_steps)"), "{out}");
    let line = out.lines().find(|l| l.starts_with("taken")).unwrap();
    let n: Vec<i64> = line.split('\t').filter_map(|x| x.parse().ok()).collect();
    assert!(n[0] + n[1] == 4 && n[1] >= 1, "{line}");
}

#[test]
fn set_refuses_nan_and_infinity_for_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.lua");
    std::fs::write(&path, "local lab = require('lab')\nlocal s = lab.settings({ lr = 1e-4 })\nprint(s.lr)\n").unwrap();
    for bad in ["lr=inf", "lr=nan", "lr=-inf"] {
        let (code, out) = loralab(&["run", &path.display().to_string(), "--set", bad]);
        assert_eq!(code, Some(1), "{out}");
        assert!(out.contains("expected a finite number"), "{out}");
    }
}

#[test]
fn impossible_model_shapes_and_ranks_are_errors_not_panics() {
    fails_naming("tiny({ hidden_size = 0 })", "hidden_size must be > 0");
    fails_naming("tiny({ max_position_embeddings = 4294967295 })", "max_position_embeddings = 4294967295");
    fails_naming("train({}, { r = 1000000000, target_modules = {'q_proj'} })", "r = 1000000000 is larger than");
}

#[test]
fn sampling_more_completions_than_the_batch_gives_the_same_completions_in_slices() {
    let (code, out) = run_lua(
        r#"
local m = tiny()
local a = m:sample({ {1, 2, 3} }, { n = 6, max_tokens = 5, seed = 9, batch_size = 64, ignore_eos = true })
local b, st = m:sample({ {1, 2, 3} }, { n = 6, max_tokens = 5, seed = 9, batch_size = 4, ignore_eos = true })
for i = 1, 6 do assert(a[1][i].text == b[1][i].text, i .. ": " .. a[1][i].text .. " vs " .. b[1][i].text) end
print("same", #b[1], "peak", st.peak_rows)
local ok, err = pcall(m.sample, m, { {1, 2} }, { n = 10000000000, max_tokens = 60, batch_size = 4 })
print(ok, err)
"#,
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("same\t6\tpeak\t4"), "rows in flight bounded by batch_size: {out}");
    assert!(out.contains("lower n or max_tokens"), "{out}");
}

#[test]
fn a_sampling_group_larger_than_the_batch_is_refused_naming_group_size() {
    fails_naming("tiny():sample({ {1, 2} }, { n = 4, batch_size = 8, group_size = 3 })", "lower group_size");
    fails_naming("tiny():sample({ {1, 2} }, { n = 4, batch_size = 8, group_size = 2^62 })", "lower group_size");
}

#[test]
fn tokens_per_pass_misspelt_or_negative_is_refused_by_name() {
    fails_naming("train({ tokens_per_pas = 64 })", "did you mean 'tokens_per_pass'");
    fails_naming("train({ tokens_per_pass = -5 })", "option 'tokens_per_pass' must be a whole number >= 0, got -5");
    // A budget shorter than every row: each micro-batch runs as it is.
    let (code, out) = run_lua("print('steps', #train({ tokens_per_pass = 1 }))");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("steps\t2"), "{out}");
}

#[test]
fn continuous_batching_misspelt_or_not_a_boolean_is_refused_by_name() {
    fails_naming("tiny():sample({ {1, 2} }, { continous_batching = true })", "did you mean 'continuous_batching'");
    fails_naming(
        "tiny():sample({ {1, 2} }, { continuous_batching = 1 })",
        "'continuous_batching' must be true or false, got an integer",
    );
}

#[test]
fn a_kv_cache_larger_than_memory_is_refused_naming_batch_size() {
    fails_naming(
        "tiny({ max_position_embeddings = 4000000 }):sample({ {1, 2} }, { n = 100000, batch_size = 100000, max_tokens = 3000 })",
        "lower batch_size (now 100000)",
    );
}

#[test]
fn a_result_that_is_not_json_fails_its_cell_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        r#"
local run = lab.run.open("{}")
local cyc = {{}}; cyc.self = cyc
local r1, e1 = run:cell("nan", {{}}, function() return {{ x = 0/0 }} end, {{ retries = 0 }})
local r2, e2 = run:cell("fn", {{}}, function() return {{ f = print }} end, {{ retries = 0 }})
local r3, e3 = run:cell("cycle", {{}}, function() return cyc end, {{ retries = 0 }})
local r4 = run:cell("fine", {{}}, function() return {{ ok = true }} end)
print(r1, r2, r3, r4.ok)
print(e1)
"#,
        dir.path().join("run").display()
    );
    let (code, out) = run_lua(&body);
    assert_eq!(code, Some(1), "three cells failed: {out}");
    assert!(out.contains("nil\tnil\tnil\ttrue"), "{out}");
    assert!(out.contains("the cell returned") && out.contains("NaN"), "{out}");
    assert!(out.contains("3 cell(s) failed"), "{out}");
}

#[test]
fn a_corrupt_result_is_moved_aside_and_the_cell_runs_again_and_dead_writers_files_go() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let body = format!(
        r#"
local run = lab.run.open("{}")
local r = run:cell("c", {{ k = 1 }}, function() return {{ v = 42 }} end)
print("value", r.v)
"#,
        run_dir.display()
    );
    let (code, out) = run_lua(&body);
    assert_eq!(code, Some(0), "{out}");
    let cell = std::fs::read_dir(&run_dir).unwrap().flatten().find(|e| e.path().is_dir()).unwrap().path();
    std::fs::write(cell.join("result.json"), "{\"v\": 4").unwrap();
    // A temporary file of a writer killed mid-write (its pid no longer exists).
    let stray = cell.join(format!(".result.json.tmp-{}-0.json", i32::MAX - 7));
    std::fs::write(&stray, "{").unwrap();
    let (code, out) = run_lua(&body);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("is not valid JSON") && out.contains("value\t42"), "{out}");
    assert!(!stray.exists(), "the dead writer's temporary file was removed");
    let aside: Vec<_> = std::fs::read_dir(&cell)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("result.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1);
}

fn write_adapter_case(dir: &Path, config_targets: &str) -> String {
    format!(
        r#"
local m = tiny()
local a = lab.adapter.new(m, {{ r = 2, target_modules = {{ "q_proj", "v_proj" }}, seed = 1 }})
a:save("{d}/a")
a:save("{d}/a") -- saving over an earlier save replaces it
local cfg = lab.fs.read_json("{d}/a/adapter_config.json")
print("base", cfg.base_model_name_or_path)
cfg.target_modules = {config_targets}
lab.fs.write_json("{d}/a/adapter_config.json", cfg)
local b = lab.adapter.load(m, "{d}/a")
print("loaded", b:num_parameters())
"#,
        d = dir.display()
    )
}

#[test]
fn an_adapter_config_must_match_its_file_and_may_say_all_linear() {
    let dir = tempfile::tempdir().unwrap();
    // The file holds q and v only: a config listing k as well is refused, naming k.
    let (code, out) = run_lua(&write_adapter_case(dir.path(), r#"{ "q_proj", "k_proj", "v_proj" }"#));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("lists k_proj among target_modules"), "{out}");
    // "all-linear" (a string, as PEFT writes it) is read as the seven projections.
    let dir2 = tempfile::tempdir().unwrap();
    let all = format!(
        r#"
local m = tiny()
local a = lab.adapter.new(m, {{ r = 2, target_modules = {{ "all-linear" }}, seed = 1 }})
a:save("{d}/a")
local cfg = lab.fs.read_json("{d}/a/adapter_config.json")
cfg.target_modules = "all-linear"
lab.fs.write_json("{d}/a/adapter_config.json", cfg)
print("loaded", lab.adapter.load(m, "{d}/a"):num_parameters() == a:num_parameters())
"#,
        d = dir2.path().display()
    );
    let (code, out) = run_lua(&all);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("loaded\ttrue"), "{out}");
}

#[test]
fn a_saved_adapter_follows_the_umask_and_names_a_loadable_base_model() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = run_lua(&write_adapter_case(dir.path(), r#"{ "q_proj", "v_proj" }"#));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("loaded\t"), "{out}");
    // A random model has no file: its id is written as it is; a file's is its absolute path.
    assert!(out.contains("base\trandom"), "{out}");
    let mode = std::fs::metadata(dir.path().join("a/adapter_model.safetensors")).unwrap().permissions().mode() & 0o777;
    let umask = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Umask:"))
        .map(|l| u32::from_str_radix(l[6..].trim(), 8).unwrap())
        .unwrap();
    assert_eq!(mode, 0o666 & !umask, "{mode:o}: a private mode keeps a group from reading a shared run");
}

#[test]
fn a_byte_order_mark_is_accepted_and_a_non_utf8_byte_is_reported_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("bom.jsonl");
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend_from_slice(b"{\"text\": \"one\"}\r\n{\"text\": \"two\"}\n");
    std::fs::write(&good, bytes).unwrap();
    let bad = dir.path().join("latin1.jsonl");
    std::fs::write(&bad, b"{\"text\": \"one\"}\n{\"text\": \"caf\xE9\"}\n").unwrap();
    let (code, out) = run_lua(&format!(
        "print('rows', lab.data.jsonl('{}'):len())\nlab.data.jsonl('{}')",
        good.display(),
        bad.display()
    ));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("rows\t2"), "{out}");
    assert!(out.contains("latin1.jsonl:2: not UTF-8 text (byte 14 of the line)"), "{out}");
}

#[test]
fn a_row_ending_in_a_user_turn_is_an_error_and_cut_rows_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    let long = "word ".repeat(200);
    std::fs::write(
        &data,
        format!(
            "{{\"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}, {{\"role\": \"assistant\", \"content\": \"{long}\"}}]}}\n\
             {{\"messages\": [{{\"role\": \"user\", \"content\": \"a\"}}, {{\"role\": \"assistant\", \"content\": \"b\"}}, {{\"role\": \"user\", \"content\": \"c\"}}]}}\n"
        ),
    )
    .unwrap();
    let body = format!(
        r#"
local m = lab.model.load()
local d = lab.data.jsonl("{d}")
local a = lab.adapter.new(m, {{ r = 1, target_modules = {{ "q_proj" }} }})
local ok, err = pcall(lab.train.sft, m, a, d, {{ max_steps = 1 }})
print(ok, err)
lab.train.sft(m, a, d:take(1), {{ max_steps = 1, max_length = 64, per_device_train_batch_size = 1 }})
"#,
        d = data.display()
    );
    let (code, out) = run_lua(&body);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("row 2: the row's last turn is a user turn"), "{out}");
    assert!(out.contains("max_length = 64 cut 1 of 1 rows"), "{out}");
}

/// A copy of the tiny Qwen2 fixture whose config.json is changed by `edit`, with its tensors
/// changed by `tensors` (name -> tensor), then read: the error, if any.
fn read_tiny_with(
    edit: impl Fn(&mut serde_json::Value),
    tensors: impl Fn(&mut std::collections::HashMap<String, candle_core::Tensor>),
) -> Option<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen2");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let mut t = candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    tensors(&mut t);
    candle_core::safetensors::save(&t, dir.path().join("model.safetensors")).unwrap();
    let opts = loralab::model::LoadOptions { dtype: candle_core::DType::F32, device: candle_core::Device::Cpu };
    loralab::model::load::read_decoder(dir.path(), &opts).err().map(|e| format!("{e:#}"))
}

#[test]
fn a_checkpoint_whose_tensors_and_config_disagree_is_refused_naming_the_tensors() {
    assert_eq!(read_tiny_with(|_| {}, |_| {}), None, "the fixture itself loads");
    // The config says one layer fewer than the file holds (its layer_types too).
    let one_fewer = |c: &mut serde_json::Value| {
        c["num_hidden_layers"] = (c["num_hidden_layers"].as_u64().unwrap() - 1).into();
        if let Some(types) = c.get_mut("layer_types").and_then(|t| t.as_array_mut()) {
            types.pop();
        }
    };
    let err = read_tiny_with(one_fewer, |_| {}).expect("refused");
    assert!(err.contains("not part of a model of this config") && err.contains("model.layers.1."), "{err}");
    // A stray tensor.
    let err = read_tiny_with(
        |_| {},
        |t| {
            t.insert(
                "model.extra.weight".into(),
                candle_core::Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
            );
        },
    )
    .expect("refused");
    assert!(err.contains("model.extra.weight") && err.contains("model.safetensors"), "{err}");
    // A projection of the wrong shape names the tensor and the shape the config implies.
    let err = read_tiny_with(
        |_| {},
        |t| {
            let q = t["model.layers.0.self_attn.q_proj.weight"].narrow(0, 0, 2).unwrap();
            t.insert("model.layers.0.self_attn.q_proj.weight".into(), q);
        },
    )
    .expect("refused");
    assert!(err.contains("model.layers.0.self_attn.q_proj.weight") && err.contains("the config implies"), "{err}");
}

#[test]
fn a_huge_row_is_refused_before_tokenizing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    let huge = "word ".repeat(2_000_000); // 10 MB
    std::fs::write(
        &data,
        format!(
            "{{\"messages\": [{{\"role\": \"user\", \"content\": \"{huge}\"}}, {{\"role\": \"assistant\", \"content\": \"ok\"}}]}}\n"
        ),
    )
    .unwrap();
    let body = format!(
        r#"
local m = lab.model.load()
local a = lab.adapter.new(m, {{ r = 1, target_modules = {{ "q_proj" }} }})
local ok, err = pcall(lab.train.sft, m, a, lab.data.jsonl("{d}"), {{ max_steps = 1 }})
print(ok, err)
"#,
        d = data.display()
    );
    let (code, out) = run_lua(&body);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("the row holds 10.0 MB of text, more than max_length = 1024"), "{out}");
}

/// The tiny seed GGUF written again to `dir/name` with its tensors passed through `edit` (which
/// returns the tensors to write for each one read), its metadata unchanged; and the seed's path.
fn rewrite_seed_gguf(
    dir: &Path,
    name: &str,
    edit: impl Fn(&str, candle_core::quantized::QTensor) -> Vec<(String, candle_core::quantized::QTensor)>,
) -> (std::path::PathBuf, std::path::PathBuf) {
    use candle_core::quantized::{gguf_file, QTensor};
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus/gguf/tiny-llama.gguf");
    let mut file = std::fs::File::open(&seed).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut tensors = Vec::new();
    for n in content.tensor_infos.keys() {
        tensors.extend(edit(n, content.tensor(&mut file, n, &candle_core::Device::Cpu).unwrap()));
    }
    let meta: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let path = dir.join(name);
    gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &meta, &refs).unwrap();
    (path, seed)
}

fn load_error(path: &Path) -> String {
    let opts = loralab::model::LoadOptions { dtype: candle_core::DType::F32, device: candle_core::Device::Cpu };
    format!("{:#}", loralab::model::load(&path.display().to_string(), &opts).err().expect("refused"))
}

#[test]
fn a_gguf_with_more_layers_of_tensors_than_its_block_count_is_refused_naming_them() {
    use candle_core::quantized::{GgmlDType, QTensor};
    let dir = tempfile::tempdir().unwrap();
    // The one layer's tensors again as a second layer, with block_count still 1.
    let (path, seed) =
        rewrite_seed_gguf(dir.path(), "two-layers-one-block.gguf", |n, t| match n.strip_prefix("blk.0.") {
            Some(rest) => {
                let again =
                    QTensor::quantize(&t.dequantize(&candle_core::Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
                vec![(n.to_string(), t), (format!("blk.1.{rest}"), again)]
            }
            None => vec![(n.to_string(), t)],
        });
    let err = load_error(&path);
    assert!(err.contains("two-layers-one-block.gguf") && err.contains("model.layers.1."), "{err}");
    // The seed itself loads.
    let opts = loralab::model::LoadOptions { dtype: candle_core::DType::F32, device: candle_core::Device::Cpu };
    loralab::model::load(&seed.display().to_string(), &opts).expect("the seed loads");
}

#[test]
fn a_gguf_projection_with_too_few_rows_names_the_file_and_the_tensor() {
    use candle_core::quantized::{GgmlDType, QTensor};
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = rewrite_seed_gguf(dir.path(), "short-q.gguf", |n, t| {
        if n != "blk.0.attn_q.weight" {
            return vec![(n.to_string(), t)];
        }
        let w = t.dequantize(&candle_core::Device::Cpu).unwrap();
        let rows = w.dim(0).unwrap() - 2;
        // A fresh tensor: quantizing a view would read its whole storage.
        let values = w.narrow(0, 0, rows).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let fewer =
            candle_core::Tensor::from_vec(values, (rows, w.dim(1).unwrap()), &candle_core::Device::Cpu).unwrap();
        vec![(n.to_string(), QTensor::quantize(&fewer, GgmlDType::F32).unwrap())]
    });
    let err = load_error(&path);
    assert!(err.contains("short-q.gguf") && err.contains("blk.0.attn_q.weight") && err.contains("[6, 8]"), "{err}");
}
