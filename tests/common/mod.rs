//! Fixtures and helpers shared by the training tests (`train.rs`) and the GPU tests (`cuda.rs`).
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
