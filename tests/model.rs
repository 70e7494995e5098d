//! The decoder, tokenizer and chat template against transformers (fixtures made by
//! tests/fixtures/make_fixtures.py).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use loralab::model::{self, load::read_decoder, LoadOptions, Message, Pass};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn cpu_f32() -> LoadOptions {
    LoadOptions { dtype: DType::F32, device: Device::Cpu }
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
}

fn ids_tensor(v: &Value) -> Tensor {
    let rows: Vec<Vec<u32>> = serde_json::from_value(v.clone()).unwrap();
    let (b, t) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn flat(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(flat).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap() as f32],
        _ => panic!("not numbers"),
    }
}

/// Tolerance for f32 logits of the tiny model (|logit| <= 6): summation order differs from torch.
const TINY_TOL: f32 = 1e-4;

#[test]
fn tiny_qwen2_logits_match_transformers() {
    let dec = read_decoder(&fixtures().join("tiny-qwen2"), &cpu_f32()).unwrap();
    let fx = json("tiny-qwen2-logits.json");
    let case = &fx["cases"][0];
    let logits = dec.forward(&ids_tensor(&case["input_ids"]), None).unwrap();
    let got = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let diff = max_abs_diff(&got, &flat(&case["logits"]));
    assert!(diff < TINY_TOL, "max abs diff {diff}");
}

#[test]
fn left_padded_rows_give_the_logits_of_unpadded_rows() {
    let dec = read_decoder(&fixtures().join("tiny-qwen2"), &cpu_f32()).unwrap();
    let fx = json("tiny-qwen2-logits.json");
    let case = &fx["cases"][1];
    let mask: Vec<Vec<u32>> = serde_json::from_value(case["attention_mask"].clone()).unwrap();
    let pads: Vec<usize> = mask.iter().map(|r| r.iter().filter(|&&m| m == 0).count()).collect();
    let ids = ids_tensor(&case["input_ids"]);
    let t = ids.dim(1).unwrap();
    let attn = loralab::model::decoder::Mask::Rows(loralab::sample::prefill_mask(&pads, t, &Device::Cpu).unwrap());
    let hidden = dec.forward_hidden(&ids, 0, Some(&attn), None, Pass::infer(None)).unwrap();
    let logits = dec.logits(&hidden).unwrap();
    for (row, &pad) in pads.iter().enumerate() {
        let got =
            logits.get(row).unwrap().narrow(0, pad, t - pad).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let diff = max_abs_diff(&got, &flat(&case["logits"][row]));
        assert!(diff < TINY_TOL, "row {row}: max abs diff {diff}");
    }
}

fn smollm2() -> model::Model {
    model::load(model::DEFAULT_MODEL, &cpu_f32()).expect("the default model loads (fetched on first use)")
}

#[test]
fn smollm2_tokenizer_matches_the_reference_ids() {
    let m = smollm2();
    let fx = json("smollm2.json");
    for case in fx["tokenizer_cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(m.tokenizer.encode(text).unwrap(), want, "text {text:?}");
        assert_eq!(m.tokenizer.decode(&want, false).unwrap(), text, "round trip of {text:?}");
    }
}

#[test]
fn smollm2_chat_template_renders_as_transformers_does() {
    let m = smollm2();
    let fx = json("smollm2.json");
    for case in fx["chat_cases"].as_array().unwrap() {
        let msgs: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let add = case["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(m.tokenizer.chat_prompt(&msgs, add).unwrap(), case["text"].as_str().unwrap());
    }
}

/// Dequantised Q4_1 weights are the same on both sides; what differs is f32 summation order
/// over 30 layers, on logits of magnitude ~20.
const SMOL_TOL: f32 = 2e-3;

#[test]
fn smollm2_logits_match_transformers_and_greedy_decoding_says_paris() {
    let m = smollm2();
    let fx = json("smollm2.json");
    let reference =
        candle_core::safetensors::load(fixtures().join("smollm2-logits.safetensors"), &Device::Cpu).unwrap();
    for case in fx["logits_cases"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let n = ids.len();
        let logits = m.decoder.forward(&Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap(), None).unwrap();
        let last = logits.get(0).unwrap().get(n - 1).unwrap().to_vec1::<f32>().unwrap();
        let want = reference[case["name"].as_str().unwrap()].to_vec1::<f32>().unwrap();
        let diff = max_abs_diff(&last, &want);
        assert!(diff < SMOL_TOL, "{}: max abs diff {diff}", case["name"]);
    }
    let prompt = m.tokenizer.encode("The capital of France is").unwrap();
    let opts = loralab::sample::SampleOptions { temperature: 0.0, max_tokens: 3, ..Default::default() };
    let (outs, _) = loralab::sample::sample(&m, None, &[prompt], &opts).unwrap();
    assert!(outs[0][0].text.starts_with(" Paris"), "{:?}", outs[0][0].text);
}
