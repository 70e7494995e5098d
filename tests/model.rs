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

#[test]
fn rows_reading_their_prompts_shared_keys_decode_the_same_logits_as_rows_with_copies() {
    use loralab::model::{decoder::Mask, KvCache, Pass};
    use loralab::sample::{decode_mask, prefill_mask};
    let dec = read_decoder(&fixtures().join("tiny-qwen2"), &cpu_f32()).unwrap();
    let dev = Device::Cpu;
    // Two prompts of 5 and 3 tokens, left-padded to 5; three rows of the first, two of the second.
    let (l, pads) = (5usize, vec![0usize, 2]);
    let ids = Tensor::new(&[[3u32, 17, 9, 40, 12], [0, 0, 25, 6, 31]], &dev).unwrap();
    let rows: Vec<u32> = vec![0, 0, 0, 1, 1];
    let row_pads: Vec<usize> = rows.iter().map(|&r| pads[r as usize]).collect();
    let mut caches: Vec<KvCache> =
        (0..2).map(|_| KvCache::new(&dec.config, 2, l + 6, DType::F32, &dev).unwrap()).collect();
    for cache in caches.iter_mut() {
        let mask = Mask::Rows(prefill_mask(&pads, l, &dev).unwrap());
        dec.forward_hidden(&ids, 0, Some(&mask), Some(cache), Pass::infer(None)).unwrap();
    }
    caches[0].select_rows(&rows).unwrap();
    caches[1].share_prefix(&rows).unwrap();
    // Six decoding steps, each row fed its own tokens; after the third, rows 1 and 3 leave the
    // batch (as finished rows do), so that the shared prefix's rows are selected too.
    let mut live: Vec<usize> = (0..rows.len()).collect();
    for step in 0..6usize {
        if step == 3 {
            let keep: Vec<u32> = vec![0, 2, 4];
            for cache in caches.iter_mut() {
                cache.select_rows(&keep).unwrap();
            }
            live = keep.iter().map(|&k| live[k as usize]).collect();
        }
        let next: Vec<u32> = live.iter().map(|&r| (7 * r + 11 * step + 1) as u32 % 50).collect();
        let step_ids = Tensor::from_vec(next, (live.len(), 1), &dev).unwrap();
        let step_pads: Vec<usize> = live.iter().map(|&r| row_pads[r]).collect();
        let mask = Mask::Rows(decode_mask(&step_pads, l + step + 1, &dev).unwrap());
        let logits: Vec<Vec<f32>> = caches
            .iter_mut()
            .map(|cache| {
                let h = dec.forward_hidden(&step_ids, l + step, Some(&mask), Some(cache), Pass::infer(None)).unwrap();
                dec.logits(&h).unwrap().flatten_all().unwrap().to_vec1().unwrap()
            })
            .collect();
        assert_eq!(logits[0], logits[1], "step {step}");
    }
}

#[test]
fn groups_of_other_lengths_decoding_in_one_step_give_each_rows_logits_of_its_group_alone() {
    let dec = read_decoder(&fixtures().join("tiny-qwen2"), &cpu_f32()).unwrap();
    let together = common::logits_of_two_groups(&dec, &Device::Cpu, true);
    let apart = common::logits_of_two_groups(&dec, &Device::Cpu, false);
    assert_eq!(together, apart);
}
