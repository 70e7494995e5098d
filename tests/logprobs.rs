//! Log-probabilities under teacher forcing (`model:logprobs`, `model:next_token_logprobs`):
//! against transformers on the embedded model (tests/fixtures/smollm2-logprobs.json, made by
//! tests/fixtures/make_fixtures.py), and batched against one sequence at a time.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{all_targets, fixtures, json, loralab, tiny};
use loralab::adapter::Adapter;
use loralab::logprobs::{logprobs, LogprobOptions, Sequence};
use loralab::model::{self, Config, LoadOptions, Model};
use serde_json::Value;

/// As the logits test: the same dequantised weights, f32 sums in another order over 30 layers.
const SMOL_TOL: f32 = 2e-3;

/// The tiny Qwen2 of the fixtures (trained-looking weights, unlike a fresh random model) with
/// the placeholder tokenizer of a random model of its shape.
fn tiny_model() -> Model {
    let text = std::fs::read_to_string(fixtures().join("tiny-qwen2/config.json")).unwrap();
    let config: Config = serde_json::from_str(&text).unwrap();
    let opts = LoadOptions { dtype: DType::F32, device: Device::Cpu };
    let placeholder = model::load::random(config, &opts, "tiny".into(), Some(1)).unwrap();
    Model::new("tiny".into(), tiny(DType::F32), placeholder.tokenizer)
}

fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() < tol, "{what}[{i}]: {g} vs {w}");
    }
}

#[test]
fn smollm2_logprobs_of_chat_completions_match_transformers_through_lua() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.json");
    let script = dir.path().join("lp.lua");
    std::fs::write(
        &script,
        format!(
            r#"
local lab = require("lab")
local fx = lab.fs.read_json("tests/fixtures/smollm2-logprobs.json")
local m = lab.model.load()
local items = {{}}
for i, c in ipairs(fx.cases) do
  items[i] = {{ prompt = c.messages, completion = {{ {{ role = "assistant", content = c.completion }} }} }}
end
local scored = m:logprobs(items, {{ top_k = 5, batch_size = 2 }})
local next = m:next_token_logprobs((function()
  local ps = {{}}
  for i, c in ipairs(fx.cases) do ps[i] = c.messages end
  return ps
end)(), {{ top_k = 5 }})
lab.fs.write_json("{}", {{ scored = scored, next = next }})
"#,
            out.display()
        ),
    )
    .unwrap();
    let (ok, stdout, stderr) = loralab(&["run", script.to_str().unwrap()]);
    assert!(ok, "{stdout}\n{stderr}");
    let got: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let fx = json("smollm2-logprobs.json");
    for (i, case) in fx["cases"].as_array().unwrap().iter().enumerate() {
        let name = case["name"].as_str().unwrap();
        let s = &got["scored"][i];
        assert_eq!(ids(&s["token_ids"]), ids(&case["continuation_ids"]), "{name}: continuation tokens");
        assert_close(&floats(&s["logprobs"]), &floats(&case["token_logprobs"]), SMOL_TOL, name);
        let sum = s["sum"].as_f64().unwrap();
        assert!((sum - case["sum"].as_f64().unwrap()).abs() < 1e-2, "{name}: sum {sum}");
        // The alternatives after the prompt are the continuation's first top-k, and next_token_logprobs.
        let want_top = ids(&case["top5_next"]["ids"]);
        let first: Vec<u32> =
            s["top"][0].as_array().unwrap().iter().map(|a| a["id"].as_u64().unwrap() as u32).collect();
        let next: Vec<u32> =
            got["next"][i].as_array().unwrap().iter().map(|a| a["id"].as_u64().unwrap() as u32).collect();
        assert_eq!(first, want_top, "{name}: top 5 at the first continuation position");
        assert_eq!(next, want_top, "{name}: next_token_logprobs");
        let next_lp: Vec<f32> =
            got["next"][i].as_array().unwrap().iter().map(|a| a["logprob"].as_f64().unwrap() as f32).collect();
        assert_close(&next_lp, &floats(&case["top5_next"]["logprobs"]), SMOL_TOL, name);
    }
}

#[test]
fn batched_logprobs_equal_those_of_one_sequence_at_a_time_and_the_log_softmax_of_the_logits() {
    let m = tiny_model();
    let seqs: Vec<Sequence> = vec![
        Sequence { prompt: vec![3, 7, 11], continuation: vec![5, 9, 2, 40] },
        Sequence { prompt: vec![1], continuation: vec![8] },
        Sequence { prompt: vec![4, 4, 4, 4, 4, 4], continuation: vec![10, 20] },
        Sequence { prompt: vec![30, 31], continuation: vec![] },
    ];
    let batched = logprobs(&m, None, &seqs, &LogprobOptions { batch_size: 4, top_k: 3 }).unwrap();
    for (s, b) in seqs.iter().zip(&batched) {
        let alone = logprobs(&m, None, std::slice::from_ref(s), &LogprobOptions { batch_size: 1, top_k: 3 }).unwrap();
        assert_close(&b.logprobs, &alone[0].logprobs, 1e-5, "batched vs alone");
        assert_eq!(
            b.next.iter().map(|x| x.0).collect::<Vec<_>>(),
            alone[0].next.iter().map(|x| x.0).collect::<Vec<_>>()
        );
        // The reference: log_softmax of the full forward's logits, gathered at each next token.
        let all: Vec<u32> = s.prompt.iter().chain(&s.continuation).copied().collect();
        let n = all.len();
        let logits = m.decoder.forward(&Tensor::from_vec(all.clone(), (1, n), &Device::Cpu).unwrap(), None).unwrap();
        let logp = candle_nn::ops::log_softmax(&logits.get(0).unwrap(), 1).unwrap().to_vec2::<f32>().unwrap();
        let want: Vec<f32> = (s.prompt.len()..n).map(|i| logp[i - 1][all[i] as usize]).collect();
        assert_close(&b.logprobs, &want, 1e-5, "against the logits");
        let best = logp[n - 1].iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        assert!((b.next[0].1 - best).abs() < 1e-5, "the first alternative is the most likely token");
        assert!(b.next.windows(2).all(|w| w[0].1 >= w[1].1), "alternatives are sorted");
    }
}

#[test]
fn an_adapter_attached_gives_the_logprobs_of_the_merged_model() {
    let m = tiny_model();
    let adapter = Adapter::new(&m.decoder, all_targets(4, 0.0), 3).unwrap();
    for p in adapter.pairs.values() {
        p.b.set(&(Tensor::ones(p.b.shape(), DType::F32, &Device::Cpu).unwrap() * 0.05).unwrap()).unwrap();
    }
    let merged = Model::new("merged".into(), m.decoder.merged(&adapter).unwrap(), m.tokenizer.clone());
    let seqs = vec![Sequence { prompt: vec![3, 7, 11], continuation: vec![5, 9, 2] }];
    let opts = LogprobOptions::default();
    let attached = logprobs(&m, Some(&adapter), &seqs, &opts).unwrap();
    let folded = logprobs(&merged, None, &seqs, &opts).unwrap();
    let base = logprobs(&m, None, &seqs, &opts).unwrap();
    assert_close(&attached[0].logprobs, &folded[0].logprobs, 1e-4, "attached vs merged");
    assert!((attached[0].sum() - base[0].sum()).abs() > 1e-3, "the adapter changes the scores");
}

#[test]
fn bad_logprob_items_are_errors_that_name_the_item_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("{ { prompt = {1, 2}, complation = {3} } }", "item 1: unknown option 'complation'"),
        ("{ { prompt = {1, 2} } }", "item 1 needs both 'prompt' and 'completion'"),
        ("{ { prompt = {1, 2}, completion = {3} }, { prompt = {1, 99}, completion = {3} } }", "prompt 2"),
        ("{ { prompt = \"\", completion = {3} } }", "the prompt has no tokens"),
        ("{ { prompt = {}, completion = {3} } }", "prompt 1: this model has no chat template"),
        ("{ 5 }", "item 1 must be a table"),
        (
            "{ { prompt = 'text', completion = { { role = 'assistant', content = 'x' } } } }",
            "a completion given as messages needs a prompt given as messages",
        ),
    ];
    for (items, want) in cases {
        let script = dir.path().join("bad.lua");
        std::fs::write(
            &script,
            format!(
                r#"local lab = require("lab")
local m = lab.model.random({{ architectures = {{"Qwen2ForCausalLM"}}, vocab_size = 50, hidden_size = 16,
  intermediate_size = 32, num_hidden_layers = 1, num_attention_heads = 2, num_key_value_heads = 1,
  max_position_embeddings = 64 }})
m:logprobs({items})
"#
            ),
        )
        .unwrap();
        let (ok, _, stderr) = loralab(&["run", script.to_str().unwrap()]);
        assert!(!ok, "{items} should fail");
        assert!(stderr.contains(want), "{items}: wanted '{want}' in:\n{stderr}");
        assert!(stderr.contains("bad.lua:5"), "the error points at the script line:\n{stderr}");
    }
}
