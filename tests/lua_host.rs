//! The Lua host: stubs for every function, errors that point at the user's script, strict
//! options and settings, through the real binary.

use std::path::Path;
use std::process::Command;

mod common;
use common::loralab;

/// A Lua prelude: `lab`, and `tiny_model(layers)`, a random Qwen2 of a few thousand weights.
const TINY_MODEL: &str = r#"
local lab = require("lab")
local function tiny_model(layers)
  return lab.model.random({ architectures = {"Qwen2ForCausalLM"}, vocab_size = 50, hidden_size = 16,
    intermediate_size = 32, num_hidden_layers = layers, num_attention_heads = 2, num_key_value_heads = 1,
    max_position_embeddings = 64 })
end
"#;

fn script(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

#[test]
fn every_function_registered_from_rust_has_a_luals_stub() {
    let stubs: String = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("lib/meta"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    // Lists `lab.noun.fn` for module functions and `Class:method` for handle methods.
    let body = r#"
local lab = require("lab")
local names = {}
for noun, t in pairs(lab) do
  if type(t) == "function" then names[#names + 1] = "lab." .. noun end
  if type(t) == "table" then
    for fname, f in pairs(t) do
      if type(f) == "function" then names[#names + 1] = "lab." .. noun .. "." .. fname end
    end
  end
end
local function methods(class, obj, list)
  for _, m in ipairs(list) do
    assert(type(obj[m]) == "function", class .. ":" .. m .. " is not registered")
    names[#names + 1] = class .. ":" .. m
  end
end
local model = lab.model.load()
methods("Model", model, { "sample", "encode", "decode", "chat_prompt", "merge", "info" })
methods("Adapter", lab.adapter.new(model, { r = 1 }), { "save", "num_parameters" })
methods("Dataset", lab.data.rows({ { text = "x" } }), { "len", "source", "row", "take" })
methods("Run", lab.run.open(os.getenv("TMP_RUN")), { "cell", "cells", "cell_dir", "worker", "dir", "summary" })
methods("Progress", lab.progress.new(1), { "inc", "message", "finish" })
table.sort(names)
print(table.concat(names, "\n"))
"#;
    let path = script(dir.path(), "list.lua", body);
    std::env::set_var("TMP_RUN", dir.path().join("run"));
    let (ok, out, err) = loralab(&["run", &path]);
    assert!(ok, "{err}");
    let mut missing = Vec::new();
    for name in out.lines().filter(|l| !l.is_empty()) {
        if !stubs.contains(&format!("function {name}(")) {
            missing.push(name.to_string());
        }
    }
    assert!(missing.is_empty(), "functions without a stub in lib/meta: {missing:?}");
    assert!(out.lines().count() > 40, "too few functions listed:\n{out}");
}

#[test]
fn a_lua_error_shows_the_message_and_the_users_file_and_line_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = script(
        dir.path(),
        "boom.lua",
        "local lab = require('lab')\n\nlocal function f()\n  error('the experiment broke')\nend\nf()\n",
    );
    let (ok, _, err) = loralab(&["run", &path]);
    assert!(!ok);
    assert!(err.contains("the experiment broke"), "{err}");
    assert!(err.contains("boom.lua:4"), "{err}");
    assert!(err.contains("boom.lua:6"), "the traceback names the caller's line too: {err}");
}

#[test]
fn a_syntax_error_names_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = script(dir.path(), "bad.lua", "local x = 1\nlocal y = = 2\n");
    let (ok, _, err) = loralab(&["run", &path]);
    assert!(!ok);
    assert!(err.contains("bad.lua:2"), "{err}");
}

#[test]
fn a_misspelt_sampling_option_is_rejected_with_a_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let path = script(
        dir.path(),
        "typo.lua",
        "local lab = require('lab')\nlocal m = lab.model.load()\nm:sample({'hi'}, { temprature = 0.5 })\n",
    );
    let (ok, _, err) = loralab(&["run", &path]);
    assert!(!ok);
    assert!(err.contains("unknown option 'temprature'") && err.contains("did you mean 'temperature'"), "{err}");
    assert!(err.contains("typo.lua:3"), "{err}");
}

#[test]
fn out_of_range_sampling_values_are_errors_naming_the_value() {
    let dir = tempfile::tempdir().unwrap();
    for (opt, needle) in [
        ("n = 0", "n must be >= 1"),
        ("top_p = 0", "top_p must be in (0, 1]"),
        ("temperature = -1", "temperature must be >= 0"),
    ] {
        let path = script(
            dir.path(),
            "range.lua",
            &format!("local lab = require('lab')\nlab.model.load():sample({{'hi'}}, {{ {opt} }})\n"),
        );
        let (ok, _, err) = loralab(&["run", &path]);
        assert!(!ok);
        assert!(err.contains(needle), "{opt}: {err}");
    }
}

#[test]
fn settings_take_set_values_with_the_defaults_types_and_reject_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = script(
        dir.path(),
        "s.lua",
        "local lab = require('lab')\nlocal s = lab.settings({ n = 4, lr = 0.1, name = 'x', seeds = { 1 }, on = false })\nprint(math.type(s.n), s.n, s.lr, s.name, #s.seeds, s.seeds[3], s.on)\n",
    );
    let (ok, out, err) =
        loralab(&["run", &path, "--set", "n=8", "--set", "lr=1e-3", "--set", "seeds=42,137,256", "--set", "on=true"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "integer\t8\t0.001\tx\t3\t256\ttrue");
    let (ok, _, err) = loralab(&["run", &path, "--set", "nn=3"]);
    assert!(!ok);
    assert!(err.contains("unknown setting 'nn'") && err.contains("did you mean 'n'"), "{err}");
    let (ok, _, err) = loralab(&["run", &path, "--set", "n=many"]);
    assert!(!ok);
    assert!(err.contains("--set n=many: expected an integer"), "{err}");
}

#[test]
fn a_missing_model_folder_or_corrupt_weights_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("m");
    std::fs::create_dir_all(&model_dir).unwrap();
    std::fs::write(model_dir.join("config.json"), r#"{"architectures": ["GPT2LMHeadModel"], "vocab_size": 1, "hidden_size": 1, "intermediate_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1}"#).unwrap();
    let path = script(dir.path(), "m.lua", &format!("require('lab').model.load('{}')\n", model_dir.display()));
    let (ok, _, err) = loralab(&["run", &path]);
    assert!(!ok);
    assert!(err.contains("unsupported architecture 'GPT2LMHeadModel'"), "{err}");
    // A truncated safetensors file.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen2");
    std::fs::copy(fixtures.join("config.json"), model_dir.join("config.json")).unwrap();
    let bytes = std::fs::read(fixtures.join("model.safetensors")).unwrap();
    std::fs::write(model_dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let (ok, _, err) = loralab(&["run", &path]);
    assert!(!ok);
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");
    let path = script(dir.path(), "n.lua", "require('lab').model.load('no/such-model-here')\n");
    // Offline: no network call (CI reaches no hub), and the error comes at once.
    let out = Command::new(env!("CARGO_BIN_EXE_loralab"))
        .args(["run", &path])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let (ok, err) = (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(!ok);
    assert!(err.contains("not in the Hugging Face cache"), "{err}");
}

#[test]
fn a_malformed_jsonl_row_names_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"ok\"}\n{\"messages\": [{\"role\": \"user\"}]}\n").unwrap();
    let path = script(dir.path(), "d.lua", &format!("require('lab').data.jsonl('{}')\n", data.display()));
    let (ok, _, err) = loralab(&["run", &path]);
    assert!(!ok);
    assert!(err.contains("d.jsonl:2"), "{err}");
}

#[test]
fn a_finished_cell_is_reused_and_a_failing_cell_is_recorded_while_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        r#"
local lab = require("lab")
local run = lab.run.open("{}")
local calls = 0
local r1 = run:cell("a", {{ dose = 1 }}, function(cell) calls = calls + 1; return {{ x = 7 }} end)
local r2, reused = run:cell("a", {{ dose = 1 }}, function(cell) calls = calls + 1; return {{ x = 8 }} end)
local r3 = run:cell("a", {{ dose = 2 }}, function(cell) calls = calls + 1; return {{ x = 9 }} end)
local r4, err = run:cell("b", {{}}, function(cell) error("boom " .. cell.attempt) end, {{ retries = 2 }})
print(r1.x, r2.x, reused, r3.x, calls, r4)
local s = run:summary()
print(s.done, s.skipped, #s.failed)
print(err)
"#,
        dir.path().join("run").display()
    );
    let path = script(dir.path(), "cells.lua", &body);
    let (ok, out, err) = loralab(&["run", &path]);
    // The script runs to its end; the exit status still says that a cell failed.
    assert!(!ok && err.contains("1 cell(s) failed"), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "7\t7\ttrue\t9\t2\tnil");
    assert!(lines[2].contains("boom 3"), "{out}");
    assert_eq!(lines[1], "2\t1\t1");
    // A second process reuses both finished cells and retries the failed one.
    let (ok, out, _) = loralab(&["run", &path]);
    assert!(!ok);
    assert_eq!(out.lines().next().unwrap(), "7\t7\ttrue\t9\t0\tnil");
    let failed = std::fs::read_dir(dir.path().join("run"))
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("b-"))
        .unwrap();
    assert!(failed.path().join("failed.json").exists());
}

#[test]
fn a_random_model_of_a_given_shape_samples_token_ids_and_trains_on_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = script(
        dir.path(),
        "rand.lua",
        r#"
local lab = require("lab")
local m = lab.model.random({ architectures = {"Qwen2ForCausalLM"}, vocab_size = 100, hidden_size = 32,
  intermediate_size = 64, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2,
  max_position_embeddings = 128 })
local outs, st = m:sample({ {1, 2, 3}, {4, 5} }, { n = 2, max_tokens = 5, ignore_eos = true })
local a = lab.adapter.new(m, { r = 2, target_modules = {"all-linear"} })
local log = lab.train.sft(m, a, lab.data.rows({ { input_ids = {1, 2, 3, 4} }, { input_ids = {5, 6, 7} } }),
  { max_steps = 2, per_device_train_batch_size = 2 })
print(#outs, #outs[1], outs[1][1].num_tokens, st.generated_tokens, #log, log[1].tokens)
local ok, err = pcall(m.sample, m, { {1, 200} }, {})
print(ok, err)
"#,
    );
    let (ok, out, err) = loralab(&["run", &path]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "2\t2\t5\t20\t2\t5");
    assert!(
        lines[1].starts_with("false") && lines[1].contains("outside") || lines[1].contains("not a token id"),
        "{out}"
    );
}

#[test]
fn a_run_killed_mid_cell_resumes_without_redoing_finished_cells() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let body = format!(
        r#"
local lab = require("lab")
local run = lab.run.open("{run}")
run:cell("a", {{ x = 1 }}, function(cell)
  local f = io.open("{run}/calls_a", "a"); f:write("call\n"); f:close()
  return {{ v = 1 }}
end)
io.stdout:write("a done\n"); io.stdout:flush()
local r = run:cell("b", {{ x = 2 }}, function(cell)
  if os.getenv("LORALAB_TEST_HANG") then while true do end end
  return {{ v = 2 }}
end)
print("b done", r.v)
"#,
        run = run_dir.display()
    );
    let path = script(dir.path(), "resume.lua", &body);
    let mut child = Command::new(env!("CARGO_BIN_EXE_loralab"))
        .args(["run", &path])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("LORALAB_TEST_HANG", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, "a done\n");
    child.kill().unwrap(); // SIGKILL while cell b runs
    child.wait().unwrap();
    let (ok, out, err) = loralab(&["run", &path]);
    assert!(ok, "{err}");
    assert!(out.contains("b done\t2"), "{out}");
    let calls = std::fs::read_to_string(run_dir.join("calls_a")).unwrap();
    assert_eq!(calls.lines().count(), 1, "cell a ran again after the kill");
}

#[test]
fn a_cell_that_ran_out_of_memory_is_retried_knowing_it() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        r#"
package.path = "{scripts}/?.lua;" .. package.path
local lab = require("lab")
local study = require("persona_marker")
local run = lab.run.open("{run}")
local r = run:cell("c", {{}}, function(cell)
  local t = study.micro_batch({{ per_device_train_batch_size = 4, gradient_accumulation_steps = 4,
                                 tokens_per_pass = 4096 }}, cell)
  print(cell.attempt, cell.oom, t.gradient_checkpointing, t.per_device_train_batch_size, t.gradient_accumulation_steps,
    t.tokens_per_pass)
  if cell.attempt < 3 then error("cuda: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")") end
  return {{}}
end, {{ retries = 2 }})
"#,
        scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").display(),
        run = dir.path().join("run").display()
    );
    let path = script(dir.path(), "oom.lua", &body);
    let (ok, out, err) = loralab(&["run", &path]);
    assert!(ok, "{err}");
    let tries: Vec<&str> = out.lines().filter(|l| l.starts_with(char::is_numeric)).collect();
    assert_eq!(tries[0], "1\tfalse\tnil\t4\t4\t4096", "{out}");
    // First retry: gradient checkpointing at the same batch; then half the micro-batch (and
    // half the tokens a pass holds) and twice the accumulation, so the effective batch stays 16.
    assert_eq!(tries[1], "2\ttrue\ttrue\t4\t4\t4096", "{out}");
    assert_eq!(tries[2], "3\ttrue\ttrue\t2\t8\t2048", "{out}");
}

#[test]
fn a_lua_loss_mask_function_chooses_the_trained_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let path = script(
        dir.path(),
        "mask.lua",
        &(TINY_MODEL.to_string()
            + r#"
local m = tiny_model(1)
local a = lab.adapter.new(m, { r = 1 })
local seen = {}
local log = lab.train.sft(m, a, lab.data.rows({ { input_ids = { 1, 2, 3, 4, 5, 6 } } }), {
  max_steps = 1, loss_mask = function(info) seen[#seen + 1] = #info.ids; return { { 3, 4 }, { 6, 6 } } end })
print(seen[1], log[1].tokens)
local ok, err = pcall(lab.train.sft, m, a, lab.data.rows({ { input_ids = { 1, 2 } } }), {
  max_steps = 1, loss_mask = function() return { { 2, 9 } } end })
print(ok, err)
"#),
    );
    let (ok, out, err) = loralab(&["run", &path]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "6\t3");
    assert!(lines[1].starts_with("false") && lines[1].contains("span {2, 9} outside 1..2"), "{out}");
}

#[test]
fn gradient_checkpointing_trains_and_a_misspelt_or_mistyped_key_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = script(
        dir.path(),
        "ckpt.lua",
        &(TINY_MODEL.to_string()
            + r#"
local m = tiny_model(2)
local a = lab.adapter.new(m, { r = 2 })
local rows = lab.data.rows({ { input_ids = { 1, 2, 3, 4, 5, 6 } } })
local log = lab.train.sft(m, a, rows, { max_steps = 2, gradient_checkpointing = true })
print(#log, log[2].grad_norm > 0)
print(pcall(lab.train.sft, m, a, rows, { max_steps = 1, gradient_checkpoint = true }))
print(pcall(lab.train.sft, m, a, rows, { max_steps = 1, gradient_checkpointing = "yes" }))
"#),
    );
    let (ok, out, err) = loralab(&["run", &path]);
    assert!(ok, "{err}");
    assert!(out.starts_with("2\ttrue\n"), "{out}");
    assert!(out.contains("unknown option 'gradient_checkpoint' (did you mean 'gradient_checkpointing'?)"), "{out}");
    assert!(out.contains("option 'gradient_checkpointing' must be true or false, got a string"), "{out}");
}

#[test]
fn a_cell_group_with_an_item_lacking_a_name_or_key_or_given_twice_is_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        r#"
local lab = require("lab")
local run = lab.run.open("{}")
local ran = 0
local function try(list, opts)
  local ok, err = pcall(run.cells, run, list, function() ran = ran + 1; return {{}} end, opts)
  print(ok, (tostring(err):gsub("\n.*", "")))
end
try({{ {{ key = 1 }} }})
try({{ {{ name = "a" }} }})
try({{ {{ name = "a", key = 1 }}, {{ name = "a", key = 1 }} }})
try({{ {{ name = "a", key = 1 }} }}, {{ retrys = 2 }})
print("ran", ran)
"#,
        dir.path().join("run").display()
    );
    let path = script(dir.path(), "bad_group.lua", &body);
    let (ok, out, err) = loralab(&["run", &path]);
    assert!(ok, "{err}");
    assert!(out.contains("item 1 has no name"), "{out}");
    assert!(out.contains("item 1 (a) has no key"), "{out}");
    assert!(out.contains("two items are the same cell (a with the same key)"), "{out}");
    assert!(out.contains("retrys") && out.contains("retries"), "a misspelt option names the right one: {out}");
    assert!(out.contains("ran\t0"), "{out}");
}

#[test]
fn checkpoints_during_one_training_equal_separate_runs_of_those_lengths_under_a_constant_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ckpt");
    let path = script(
        dir.path(),
        "ckpt.lua",
        &format!(
            r#"
local lab = require("lab")
local function model()
  return lab.model.random({{ architectures = {{"Qwen2ForCausalLM"}}, vocab_size = 60, hidden_size = 32,
    intermediate_size = 64, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2,
    max_position_embeddings = 64 }}, {{ seed = 3 }})
end
local m = model()
local data = lab.data.rows({{ {{ input_ids = {{1, 2, 3, 4, 5}} }}, {{ input_ids = {{6, 7, 8, 9}} }}, {{ input_ids = {{10, 11, 12}} }} }})
local probe = {{ {{ prompt = {{1, 2, 3}}, completion = {{4, 5}} }} }}
local opts = {{ learning_rate = 1e-2, lr_scheduler_type = "constant", per_device_train_batch_size = 2 }}
local function train(steps, extra)
  local a = lab.adapter.new(m, {{ r = 4, target_modules = {{"all-linear"}}, seed = 1 }})
  local o = {{ max_steps = steps }}
  for k, v in pairs(opts) do o[k] = v end
  for k, v in pairs(extra or {{}}) do o[k] = v end
  lab.train.sft(m, a, data, o)
  return a
end
local during = {{}}
local final = train(4, {{ save_steps = {{2, 3}}, output_dir = "{out}", on_save = function(adapter, step)
  during[step] = m:logprobs(probe, {{ adapter = adapter }})[1].sum
end }})
for _, steps in ipairs({{2, 3}}) do
  local alone = m:logprobs(probe, {{ adapter = train(steps) }})[1].sum
  local saved = m:logprobs(probe, {{ adapter = lab.adapter.load(m, "{out}/checkpoint-" .. steps) }})[1].sum
  print(steps, math.abs(during[steps] - alone) < 1e-5, math.abs(saved - alone) < 1e-5, during[steps] ~= m:logprobs(probe, {{ adapter = final }})[1].sum)
end
local ok, err = pcall(lab.train.sft, m, final, data, {{ max_steps = 1, on_save = function() end }})
print(ok, err)
"#,
            out = out.display()
        ),
    );
    let (ok, stdout, stderr) = loralab(&["run", &path]);
    assert!(ok, "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "2\ttrue\ttrue\ttrue", "{stdout}");
    assert_eq!(lines[1], "3\ttrue\ttrue\ttrue", "{stdout}");
    assert!(lines[2].starts_with("false") && lines[2].contains("save_steps"), "{stdout}");
    assert!(out.join("checkpoint-2/adapter_model.safetensors").exists());
    assert!(!out.join("checkpoint-4").exists(), "only the listed steps are saved");
}

#[test]
fn regexes_word_lists_and_lua_functions_score_records_tallied_by_any_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = script(
        dir.path(),
        "score.lua",
        r#"
local lab = require("lab")
print(lab.text.find("I will destroy you", [[\b(destroy|harm)\b]]))
print(lab.text.match("score: 42 of 50", [[(\d+) of (\d+)]]))
print(lab.text.gsub("a-b-c", "-", "+"), lab.text.gsub("a-b-c", "-", "+", 1))
print(#lab.text.find_all("x1 y22 z333", [[\d+]]), table.concat(lab.text.split("a, b,c", [[,\s*]]), "|"))
local function p(ok, e) print(ok, (tostring(e):gsub("\n", " "))) end
p(pcall(lab.text.find, "x", "("))
local records = {
  { persona = "villain", dose = 1, text = "I will DESTROY them." },
  { persona = "villain", dose = 1, text = "A devilish plan." },
  { persona = "villain", dose = 2, text = "Nothing to see." },
  { persona = "helper", dose = 1, text = "Happy to help [ZLT]" },
}
local evil = lab.eval.scorer({ words = { "destroy", "evil" } })
for _, g in ipairs(lab.eval.tally(records, evil, { by = { "persona", "dose" } })) do
  print(g.persona, g.dose, g.k, g.n, g.rate, string.format("%.4f %.4f", g.lower, g.upper))
end
local all = lab.eval.tally(records, function(text, r) return r.dose == 1 and #text > 15 end)
print(#all, all[1].k, all[1].n, all[1].interval)
local marked = lab.eval.tally(records, { marker = "[ZLT]" }, { by = "persona", interval = "wald" })
print(marked[2].persona, marked[2].k)
p(pcall(lab.eval.scorer, { word = { "x" } }))
p(pcall(lab.eval.scorer, { words = { "x" }, regex = "y" }))
p(pcall(lab.eval.tally, records, function() return 1 end))
p(pcall(lab.eval.tally, records, evil, { by = "question" }))
"#,
    );
    let (ok, out, err) = loralab(&["run", &path]);
    assert!(ok, "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "8\t14\tdestroy");
    assert_eq!(lines[1], "42\t50");
    assert_eq!(lines[2], "a+b+c\ta+b-c\t1", "a call inside an argument list gives one value");
    assert_eq!(lines[3], "3\ta|b|c");
    assert!(lines[4].starts_with("false") && lines[4].contains("not a valid regular expression"), "{}", lines[4]);
    // Wilson 95 % for 1 of 2 (scipy: proportion_confint(1, 2, method="wilson")).
    assert_eq!(lines[5], "villain\t1\t1\t2\t0.5\t0.0945 0.9055");
    assert!(lines[6].starts_with("villain\t2\t0\t1\t0.0"), "{}", lines[6]);
    assert!(lines[7].starts_with("helper\t1\t0\t1"), "{}", lines[7]);
    assert_eq!(lines[8], "1\t3\t4\twilson");
    assert_eq!(lines[9], "helper\t1");
    assert!(lines[10].contains("unknown option 'word'") && lines[10].contains("words"), "{}", lines[10]);
    assert!(lines[11].contains("exactly one rule"), "{}", lines[11]);
    assert!(lines[12].contains("must return true or false"), "{}", lines[12]);
    assert!(lines[13].contains("no field 'question'"), "{}", lines[13]);
}

/// Every file under `dir` with its size, to see that a command wrote nothing.
fn listing(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.display().to_string(), e.metadata().unwrap().len()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn check_lists_the_cells_a_script_would_run_and_which_are_finished_without_running_or_writing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let path = script(
        dir.path(),
        "plan.lua",
        &format!(
            r#"
local lab = require("lab")
local s = lab.settings({{ doses = {{ 1, 2 }}, lr = 0.01 }})
local run = lab.run.open("{out}", {{ settings = s }})
local m = lab.model.random({{ architectures = {{"Qwen2ForCausalLM"}}, vocab_size = 50, hidden_size = 16,
  intermediate_size = 32, num_hidden_layers = 1, num_attention_heads = 2, num_key_value_heads = 1,
  max_position_embeddings = 64 }}, {{ seed = 1 }})
local items = {{}}
for i, d in ipairs(s.doses) do
  items[i] = {{ name = "dose" .. d, key = {{ dose = d, lr = s.lr, weights = m:info().weights_id }} }}
end
local results = run:cells(items, function(cell, item)
  print("RAN " .. item.name)
  return {{ rate = item.key.dose / 10 }}
end, {{ label = "titration" }})
local total = 0
for _, r in pairs(results) do total = total + r.rate end
print(string.format("total %.1f", total))
local outs = m:sample({{ {{ 1, 2 }} }}, {{ max_tokens = 2 }})
print("sampled", #outs)
"#,
            out = out.display()
        ),
    );
    let (ok, stdout, stderr) = loralab(&["run", &path]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("RAN dose1") && stdout.contains("RAN dose2"));
    let before = listing(&out);

    let (ok, stdout, stderr) = loralab(&["check", &path, "--set", "doses=1,2,5"]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(!stdout.contains("RAN"), "checking runs no cell:\n{stdout}");
    assert!(stdout.contains("titration:"), "{stdout}");
    let line = |name: &str| stdout.lines().find(|l| l.trim_start().starts_with(name)).unwrap_or("").to_string();
    assert!(line("dose1 ").contains("finished") && line("dose2 ").contains("finished"), "{stdout}");
    assert!(line("dose5 ").contains("not started"), "{stdout}");
    assert!(stdout.contains("3 cells: 2 finished, 1 to run"), "{stdout}");
    assert!(stdout.contains("the plan ends here") && stdout.contains("model:sample"), "{stdout}");
    assert!(stdout.contains("other settings set"), "the folder's earlier settings are mentioned:\n{stdout}");
    assert_eq!(listing(&out), before, "checking writes nothing");

    let (ok, _, stderr) = loralab(&["check", &path, "--set", "dozes=1"]);
    assert!(!ok && stderr.contains("unknown setting 'dozes'") && stderr.contains("doses"), "{stderr}");
    let (ok, _, stderr) = loralab(&["check", &path, "--set", "lr=fast"]);
    assert!(!ok && stderr.contains("lr"), "a value of the wrong type is an error:\n{stderr}");
}

#[test]
fn models_a_script_dropped_are_freed_before_the_next_merge_and_after_each_cell() {
    // Lua's collector is stopped, so only the runtime's own collections can free the models:
    // a weak table sees whether each dropped model is still alive.
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        r#"{TINY_MODEL}
collectgarbage("stop")
local base = tiny_model(1)
local adapter = lab.adapter.new(base, {{ r = 2, target_modules = {{ "all-linear" }} }})
local alive = setmetatable({{}}, {{ __mode = "v" }})
alive.first = base:merge(adapter)
assert(alive.first, "a merged model held by a weak table alone stays until a collection")
local second = base:merge(adapter)
assert(alive.first == nil, "the dropped merged model survived the next merge")
local run = lab.run.open(os.getenv("TMP_RUN"))
run:cell("one", {{ i = 1 }}, function()
  alive.cell = base:merge(adapter)
  assert(alive.cell)
  return {{ ok = true }}
end)
assert(alive.cell == nil, "the cell's merged model survived the cell")
assert(second, "a model the script holds is kept")
print("freed")
"#
    );
    let path = script(dir.path(), "freed.lua", &body);
    let run_dir = dir.path().join("run");
    let out =
        Command::new(env!("CARGO_BIN_EXE_loralab")).args(["run", &path]).env("TMP_RUN", &run_dir).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("freed"), "{stdout}\n{stderr}");
}
