//! The model families beyond Qwen2 (src/model/family.rs) against transformers and PEFT: tiny
//! random Qwen3 (per-head q/k norms, an explicit head_dim, no biases), Mistral (the
//! Mistral-7B-v0.3 layout) and Gemma 2 (GeGLU, (1 + w) norms also after the attention and the
//! MLP, scaled tied embeddings, capped attention scores and logits, a sliding window of 4 on
//! layer 0 that the 7-token cases and the training rows exceed) checkpoints made by
//! tests/fixtures/make_fixtures.py.

mod common;

use candle_core::{DType, Device};
use common::{assert_adapters_close, assert_steps_match, fixture_config, fixtures, flat, ids_tensor, json, rows_of};
use loralab::adapter::Adapter;
use loralab::model::{load::read_decoder, Decoder, LoadOptions};
use loralab::train;

/// f32 logits of magnitude <= 6: summation order differs from torch.
const LOGIT_TOL: f32 = 1e-4;
/// As tests/train.rs: trained A/B after 4 AdamW steps, and relative per-step loss and grad norm.
const WEIGHT_TOL: f32 = 1e-4;
const STEP_RTOL: f64 = 1e-4;

const FAMILIES: [&str; 3] = ["tiny-qwen3", "tiny-mistral", "tiny-gemma2"];

fn decoder(name: &str, dtype: DType) -> Decoder {
    read_decoder(&fixtures().join(name), &LoadOptions { dtype, device: Device::Cpu }).unwrap()
}

fn diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn qwen3_mistral_and_gemma2_logits_match_transformers_unpadded_and_left_padded() {
    for name in FAMILIES {
        let dec = decoder(name, DType::F32);
        let fx = json(&format!("{name}-logits.json"));
        let case = &fx["cases"][0];
        let logits = dec.forward(&ids_tensor(&case["input_ids"]), None).unwrap();
        let d = diff(&logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &flat(&case["logits"]));
        assert!(d < LOGIT_TOL, "{name}: max abs diff {d}");

        let case = &fx["cases"][1];
        for (row, got) in common::left_padded_logits(&dec, case).iter().enumerate() {
            let d = diff(got, &flat(&case["logits"][row]));
            assert!(d < LOGIT_TOL, "{name} left-padded row {row}: max abs diff {d}");
        }
    }
}

/// Four Trainer steps from PEFT's initial adapter: per-step loss, grad norm and learning rate,
/// then the trained A and B, on each training path.
#[test]
fn four_adamw_steps_on_qwen3_mistral_and_gemma2_match_peft_and_the_trainer() {
    for name in FAMILIES {
        // f32: the CPU's packed path; f64: the layer op, and the layer op under checkpointing.
        for (dtype, gradient_checkpointing) in [(DType::F32, false), (DType::F64, false), (DType::F64, true)] {
            let dec = decoder(name, dtype);
            let lora = format!("{name}-lora");
            let adapter = Adapter::load(&fixtures().join(&lora).join("initial"), &dec).unwrap();
            let rows = rows_of(&json(&format!("{lora}/rows.json")));
            let config = train::TrainConfig { gradient_checkpointing, ..fixture_config() };
            let log = train::train(&dec, &adapter, &rows, &config, |_| Ok(())).unwrap();
            let what = format!("{name} {dtype:?} checkpointing {gradient_checkpointing}");
            assert_steps_match(&log, &json(&format!("{lora}/steps.json")), STEP_RTOL, &what);
            let reference = Adapter::load(&fixtures().join(&lora).join("final"), &dec).unwrap();
            assert_adapters_close(&adapter, &reference, WEIGHT_TOL, &what);
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

/// Batched, left-padded greedy decoding through the KV cache picks, at every step, the argmax of
/// a full forward pass over the prompt and the tokens so far: the windowed masks of prefill and
/// decoding (Gemma 2's window of 4 is exceeded from the fifth position on) are the full pass's.
#[test]
fn greedy_decoding_through_the_cache_follows_the_full_forward_on_every_family() {
    use loralab::model::{load, Model};
    use loralab::sample::{sample, SampleOptions};
    for name in FAMILIES {
        let dec = decoder(name, DType::F32);
        let placeholder = load::random(
            dec.config.clone(),
            &LoadOptions { dtype: DType::F32, device: Device::Cpu },
            "t".into(),
            Some(1),
        )
        .unwrap()
        .tokenizer;
        let model = Model::new(name.into(), dec, placeholder);
        let prompts = vec![vec![5, 17, 33], vec![9, 2, 77, 40, 101, 64]];
        let opts = SampleOptions { temperature: 0.0, max_tokens: 8, ignore_eos: true, ..Default::default() };
        let (completions, _) = sample(&model, None, &prompts, &opts).unwrap();
        for (prompt, c) in prompts.iter().zip(&completions) {
            let generated = &c[0].token_ids;
            assert_eq!(generated.len(), 8, "{name}");
            for i in 0..generated.len() {
                let ids: Vec<u32> = prompt.iter().chain(&generated[..i]).copied().collect();
                let t = ids.len();
                let logits = model
                    .decoder
                    .forward(&candle_core::Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap(), None)
                    .unwrap();
                let last: Vec<f32> = logits.get(0).unwrap().get(t - 1).unwrap().to_vec1().unwrap();
                let best = (0..last.len()).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap() as u32;
                assert_eq!(generated[i], best, "{name}: prompt {prompt:?}, token {i}");
            }
        }
    }
}
