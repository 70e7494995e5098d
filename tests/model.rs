//! The decoder, tokenizer and chat template against transformers (fixtures made by
//! tests/fixtures/make_fixtures.py).

use candle_core::{DType, Device, Tensor};
use loralab::model::{self, load::read_decoder, LoadOptions, Message};

mod common;
use common::{fixtures, flat, ids_tensor, json};

fn cpu_f32() -> LoadOptions {
    LoadOptions { dtype: DType::F32, device: Device::Cpu }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
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
    for (row, got) in common::left_padded_logits(&dec, case).iter().enumerate() {
        let diff = max_abs_diff(got, &flat(&case["logits"][row]));
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
