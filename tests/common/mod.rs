//! Fixtures and helpers shared by the test files: the fixtures, the binary, and comparisons
//! against the PEFT and transformers references.
#![allow(dead_code)] // each test file uses its own part

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use loralab::adapter::{LoraConfig, Target};
use loralab::data::Example;
use loralab::model::{load::read_decoder, Decoder, LoadOptions};
use loralab::train::{Schedule, TrainConfig};
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
}

pub fn tiny(dtype: DType) -> Decoder {
    tiny_on(dtype, Device::Cpu)
}

/// The tiny random Qwen2 of the fixtures on `device`.
pub fn tiny_on(dtype: DType, device: Device) -> Decoder {
    read_decoder(&fixtures().join("tiny-qwen2"), &LoadOptions { dtype, device }).unwrap()
}

pub fn fixture_rows() -> Vec<Example> {
    rows_of(&json("tiny-lora/rows.json"))
}

/// Examples from a rows.json fixture: `labels` -100 marks a position without loss.
pub fn rows_of(rows: &Value) -> Vec<Example> {
    rows["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let ids: Vec<u32> = serde_json::from_value(r["input_ids"].clone()).unwrap();
            let labels: Vec<i64> = serde_json::from_value(r["labels"].clone()).unwrap();
            Example { ids, target: labels.iter().map(|&l| l != -100).collect() }
        })
        .collect()
}

pub fn fixture_config() -> TrainConfig {
    TrainConfig {
        max_steps: Some(4),
        learning_rate: 1e-2,
        lr_scheduler_type: Schedule::Linear,
        warmup_steps: Some(1),
        weight_decay: 0.01,
        max_grad_norm: 1.0,
        per_device_train_batch_size: 2,
        gradient_accumulation_steps: 2,
        shuffle: false,
        ..Default::default()
    }
}

/// LoRA of rank r on all 7 projections, alpha 2r.
pub fn all_targets(r: usize, lora_dropout: f64) -> LoraConfig {
    LoraConfig { r, lora_alpha: 2.0 * r as f64, lora_dropout, target_modules: Target::ALL.to_vec(), use_rslora: false }
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Runs the loralab binary from the repository root: (success, stdout, stderr).
pub fn loralab(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loralab"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every number of a nested JSON array, flattened, as f32.
pub fn flat(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(flat).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap() as f32],
        _ => panic!("not numbers"),
    }
}

/// Rows of token ids (a JSON list of lists) as a (B, T) tensor on the CPU.
pub fn ids_tensor(v: &Value) -> Tensor {
    let rows: Vec<Vec<u32>> = serde_json::from_value(v.clone()).unwrap();
    let (b, t) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu).unwrap()
}

/// A training log against a Trainer's steps.json: loss and gradient norm within `rtol`
/// (relative), the learning rate within 1e-12, the same trained tokens.
pub fn assert_steps_match(log: &[loralab::train::StepLog], steps: &Value, rtol: f64, what: &str) {
    let want = steps["steps"].as_array().unwrap();
    assert_eq!(log.len(), want.len(), "{what}: steps taken");
    for (got, w) in log.iter().zip(want) {
        let (loss, norm, lr) =
            (w["loss"].as_f64().unwrap(), w["grad_norm"].as_f64().unwrap(), w["learning_rate"].as_f64().unwrap());
        let at = format!("{what} step {}", got.step);
        assert!((got.loss - loss).abs() / loss < rtol, "{at}: loss {} vs {loss}", got.loss);
        assert!((got.grad_norm - norm).abs() / norm < rtol, "{at}: grad norm {} vs {norm}", got.grad_norm);
        assert!((got.learning_rate - lr).abs() < 1e-12, "{at}: lr {} vs {lr}", got.learning_rate);
        assert_eq!(got.tokens as u64, w["num_items_in_batch"].as_u64().unwrap(), "{at}: tokens");
    }
}

/// Every A and B of `adapter` within `tol` of the reference's.
pub fn assert_adapters_close(
    adapter: &loralab::adapter::Adapter,
    reference: &loralab::adapter::Adapter,
    tol: f32,
    what: &str,
) {
    for (key, pair) in &adapter.pairs {
        let r = reference.pairs.get(key).unwrap();
        let (da, db) =
            (max_abs_diff(pair.a.as_tensor(), r.a.as_tensor()), max_abs_diff(pair.b.as_tensor(), r.b.as_tensor()));
        assert!(da < tol && db < tol, "{what} {key:?}: A differs by {da}, B by {db}");
    }
}

/// The logits of every non-padded position of a left-padded batch (a `left_padding` case of a
/// logits fixture), per row, as the decoder computes them with the rows' padding masked.
pub fn left_padded_logits(dec: &Decoder, case: &Value) -> Vec<Vec<f32>> {
    let mask: Vec<Vec<u32>> = serde_json::from_value(case["attention_mask"].clone()).unwrap();
    let pads: Vec<usize> = mask.iter().map(|r| r.iter().filter(|&&m| m == 0).count()).collect();
    let ids = ids_tensor(&case["input_ids"]);
    let t = ids.dim(1).unwrap();
    let attn = loralab::model::decoder::Mask::Rows(loralab::sample::prefill_mask(&pads, t, &Device::Cpu).unwrap());
    let hidden = dec.forward_hidden(&ids, 0, Some(&attn), None, loralab::model::Pass::infer(None)).unwrap();
    let logits = dec.logits(&hidden).unwrap();
    pads.iter()
        .enumerate()
        .map(|(row, &pad)| {
            logits.get(row).unwrap().narrow(0, pad, t - pad).unwrap().flatten_all().unwrap().to_vec1().unwrap()
        })
        .collect()
}

/// Two groups of prompts prefilled apart (left-padded to 5 and to 3 tokens), each with its cache.
pub fn two_prefilled_groups(
    dec: &loralab::model::Decoder,
    dev: &Device,
) -> Vec<(loralab::model::KvCache, usize, Vec<usize>)> {
    use loralab::model::{decoder::Mask, KvCache, Pass};
    use loralab::sample::prefill_mask;
    let groups: [(Vec<Vec<u32>>, usize); 2] =
        [(vec![vec![3, 17, 9, 40, 12], vec![25, 6, 31]], 5), (vec![vec![8, 2, 44], vec![19, 23]], 3)];
    groups
        .iter()
        .map(|(prompts, l)| {
            let pads: Vec<usize> = prompts.iter().map(|p| l - p.len()).collect();
            let ids: Vec<u32> =
                prompts.iter().flat_map(|p| std::iter::repeat_n(0, l - p.len()).chain(p.clone())).collect();
            let ids = Tensor::from_vec(ids, (prompts.len(), *l), dev).unwrap();
            let mut cache = KvCache::new(&dec.config, prompts.len(), l + 4, dec.dtype, dev).unwrap();
            let mask = Mask::Rows(prefill_mask(&pads, *l, dev).unwrap());
            dec.forward_hidden(&ids, 0, Some(&mask), Some(&mut cache), Pass::infer(None)).unwrap();
            (cache, *l, pads)
        })
        .collect()
}

/// Four decoding steps of the two groups of [`two_prefilled_groups`]: their rows' logits, the
/// groups one after the other, from one step of both (`together`) or a step of each.
pub fn logits_of_two_groups(dec: &Decoder, dev: &Device, together: bool) -> Vec<Vec<f32>> {
    use loralab::model::{decoder::DecodeSegment, decoder::Mask, Pass};
    use loralab::sample::decode_mask;
    let mut groups = two_prefilled_groups(dec, dev);
    let mut out = Vec::new();
    for step in 0..4usize {
        let masks: Vec<Mask> =
            groups.iter().map(|(_, l, pads)| Mask::Rows(decode_mask(pads, l + step + 1, dev).unwrap())).collect();
        let fed: Vec<Vec<u32>> = groups
            .iter()
            .enumerate()
            .map(|(g, (_, _, pads))| (0..pads.len()).map(|r| (5 * g + 3 * r + 7 * step + 1) as u32 % 50).collect())
            .collect();
        let mut segments: Vec<DecodeSegment> = groups
            .iter_mut()
            .zip(&masks)
            .map(|((cache, l, pads), mask)| DecodeSegment { rows: pads.len(), pos: *l + step, mask, cache })
            .collect();
        let logits = |ids: Vec<u32>, segments: &mut [DecodeSegment]| {
            let ids = Tensor::from_vec(ids.clone(), (ids.len(), 1), dev).unwrap();
            let h = dec.decode_step(&ids, segments, Pass::infer(None)).unwrap();
            dec.logits(&h).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        match together {
            true => out.push(logits(fed.concat(), &mut segments)),
            false => {
                for (i, ids) in fed.into_iter().enumerate() {
                    out.push(logits(ids, &mut segments[i..i + 1]));
                }
            }
        }
    }
    // Per step, both groups' rows: the same layout either way.
    match together {
        true => out,
        false => out.chunks(2).map(|pair| pair.concat()).collect(),
    }
}
