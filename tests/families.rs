//! The model families beyond Qwen2 (src/model/family.rs) against transformers and PEFT: tiny
//! random Qwen3 (per-head q/k norms, an explicit head_dim, no biases) and Mistral (the
//! Mistral-7B-v0.3 layout) checkpoints made by tests/fixtures/make_fixtures.py.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture_config, fixtures, json, max_abs_diff, rows_of};
use loralab::adapter::Adapter;
use loralab::model::{load::read_decoder, Decoder, LoadOptions, Pass};
use loralab::train;
use serde_json::Value;

/// f32 logits of magnitude <= 6: summation order differs from torch.
const LOGIT_TOL: f32 = 1e-4;
/// As tests/train.rs: trained A/B after 4 AdamW steps, and relative per-step loss and grad norm.
const WEIGHT_TOL: f32 = 1e-4;
const STEP_RTOL: f64 = 1e-4;

const FAMILIES: [&str; 2] = ["tiny-qwen3", "tiny-mistral"];

fn decoder(name: &str, dtype: DType) -> Decoder {
    read_decoder(&fixtures().join(name), &LoadOptions { dtype, device: Device::Cpu }).unwrap()
}

fn flat(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(flat).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap() as f32],
        _ => panic!("not numbers"),
    }
}

fn ids_tensor(v: &Value) -> Tensor {
    let rows: Vec<Vec<u32>> = serde_json::from_value(v.clone()).unwrap();
    let (b, t) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu).unwrap()
}

fn diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn qwen3_and_mistral_logits_match_transformers_unpadded_and_left_padded() {
    for name in FAMILIES {
        let dec = decoder(name, DType::F32);
        let fx = json(&format!("{name}-logits.json"));
        let case = &fx["cases"][0];
        let logits = dec.forward(&ids_tensor(&case["input_ids"]), None).unwrap();
        let d = diff(&logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &flat(&case["logits"]));
        assert!(d < LOGIT_TOL, "{name}: max abs diff {d}");

        let case = &fx["cases"][1];
        let mask: Vec<Vec<u32>> = serde_json::from_value(case["attention_mask"].clone()).unwrap();
        let pads: Vec<usize> = mask.iter().map(|r| r.iter().filter(|&&m| m == 0).count()).collect();
        let ids = ids_tensor(&case["input_ids"]);
        let t = ids.dim(1).unwrap();
        let attn = loralab::model::decoder::Mask::Rows(loralab::sample::prefill_mask(&pads, t, &Device::Cpu).unwrap());
        let hidden = dec.forward_hidden(&ids, 0, Some(&attn), None, Pass::infer(None)).unwrap();
        let logits = dec.logits(&hidden).unwrap();
        for (row, &pad) in pads.iter().enumerate() {
            let got = logits.get(row).unwrap().narrow(0, pad, t - pad).unwrap().flatten_all().unwrap();
            let d = diff(&got.to_vec1::<f32>().unwrap(), &flat(&case["logits"][row]));
            assert!(d < LOGIT_TOL, "{name} left-padded row {row}: max abs diff {d}");
        }
    }
}

/// Four Trainer steps from PEFT's initial adapter: per-step loss, grad norm and learning rate,
/// then the trained A and B, on each training path.
#[test]
fn four_adamw_steps_on_qwen3_and_mistral_match_peft_and_the_trainer() {
    for name in FAMILIES {
        // f32: the CPU's packed path; f64: the layer op, and the layer op under checkpointing.
        for (dtype, gradient_checkpointing) in [(DType::F32, false), (DType::F64, false), (DType::F64, true)] {
            let dec = decoder(name, dtype);
            let lora = format!("{name}-lora");
            let adapter = Adapter::load(&fixtures().join(&lora).join("initial"), &dec).unwrap();
            let rows = rows_of(&json(&format!("{lora}/rows.json")));
            let config = train::TrainConfig { gradient_checkpointing, ..fixture_config() };
            let log = train::train(&dec, &adapter, &rows, &config, |_| Ok(())).unwrap();
            let want = json(&format!("{lora}/steps.json"));
            assert_eq!(log.len(), 4);
            for (got, w) in log.iter().zip(want["steps"].as_array().unwrap()) {
                let (loss, norm) = (w["loss"].as_f64().unwrap(), w["grad_norm"].as_f64().unwrap());
                let what = format!("{name} {dtype:?} checkpointing {gradient_checkpointing} step {}", got.step);
                assert!((got.loss - loss).abs() / loss < STEP_RTOL, "{what}: loss {} vs {loss}", got.loss);
                assert!((got.grad_norm - norm).abs() / norm < STEP_RTOL, "{what}: grad norm {} vs {norm}", got.grad_norm);
                assert!((got.learning_rate - w["learning_rate"].as_f64().unwrap()).abs() < 1e-12, "{what}: lr");
                assert_eq!(got.tokens as u64, w["num_items_in_batch"].as_u64().unwrap(), "{what}: tokens");
            }
            let reference = Adapter::load(&fixtures().join(&lora).join("final"), &dec).unwrap();
            for (key, pair) in &adapter.pairs {
                let r = reference.pairs.get(key).unwrap();
                let (da, db) =
                    (max_abs_diff(pair.a.as_tensor(), r.a.as_tensor()), max_abs_diff(pair.b.as_tensor(), r.b.as_tensor()));
                assert!(da < WEIGHT_TOL && db < WEIGHT_TOL, "{name} {dtype:?} {key:?}: A differs by {da}, B by {db}");
            }
        }
    }
}

#[test]
fn a_qwen3_checkpoint_without_its_q_norm_is_an_error_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-qwen3");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    tensors.remove("model.layers.1.self_attn.q_norm.weight");
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let err = read_decoder(dir.path(), &LoadOptions { dtype: DType::F32, device: Device::Cpu }).err().unwrap();
    assert!(format!("{err:#}").contains("model.layers.1.self_attn.q_norm.weight"), "{err:#}");
}
