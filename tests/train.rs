//! The LoRA trainer against PEFT + transformers' Trainer (fixtures in tests/fixtures/tiny-lora,
//! made by tests/fixtures/make_fixtures.py), and its gradients.

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor};
use loralab::adapter::{Adapter, LoraConfig, Target};
use loralab::data::Example;
use loralab::model::sink::GradSink;
use loralab::model::{Decoder, LoadOptions};
use loralab::train::{self, TrainConfig};
use rand::SeedableRng;
use serde_json::Value;

mod common;
use common::*;

/// Trained A/B after 4 steps at lr 1e-2 (|A| ~ 0.1): Adam's normalised updates amplify f32
/// rounding differences in tiny gradient components.
const WEIGHT_TOL: f32 = 1e-4;

/// Relative tolerance for per-step losses and grad norms (f32 on both sides).
const STEP_RTOL: f64 = 1e-4;

#[test]
fn four_adamw_steps_match_peft_and_the_trainer() {
    let dec = tiny(DType::F32);
    let adapter = Adapter::load(&fixtures().join("tiny-lora/initial"), &dec).unwrap();
    let log = train::train(&dec, &adapter, &fixture_rows(), &fixture_config(), |_| Ok(())).unwrap();
    assert_steps_match(&log, &json("tiny-lora/steps.json"), STEP_RTOL, "tiny-lora");
    let reference = Adapter::load(&fixtures().join("tiny-lora/final"), &dec).unwrap();
    assert_adapters_close(&adapter, &reference, WEIGHT_TOL, "tiny-lora");
}

#[test]
fn the_same_seed_gives_a_bitwise_identical_loss_curve() {
    let dec = tiny(DType::F32);
    let run = || {
        let cfg = all_targets(4, 0.1);
        let adapter = Adapter::new(&dec, cfg, 7).unwrap();
        let config = TrainConfig { shuffle: true, max_steps: Some(3), learning_rate: 1e-2, ..fixture_config() };
        train::train(&dec, &adapter, &fixture_rows(), &config, |_| Ok(()))
            .unwrap()
            .iter()
            .map(|s| s.loss.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

#[test]
fn a_steps_rows_in_one_pass_train_to_the_weights_of_its_micro_batches() {
    let dec = tiny(DType::F32);
    let run = |tokens_per_pass| {
        let adapter = Adapter::load(&fixtures().join("tiny-lora/initial"), &dec).unwrap();
        // Rows alone are longer than one token: each step runs its two micro-batches.
        let config = TrainConfig { tokens_per_pass, gradient_accumulation_steps: 4, ..fixture_config() };
        let log = train::train(&dec, &adapter, &fixture_rows(), &config, |_| Ok(())).unwrap();
        (adapter, log)
    };
    let (apart, apart_log) = run(1);
    let (joined, joined_log) = run(100_000);
    for (a, j) in apart_log.iter().zip(&joined_log) {
        assert!((a.loss - j.loss).abs() <= 1e-5 * a.loss, "step {}: {} against {}", a.step, a.loss, j.loss);
        assert_eq!(a.tokens, j.tokens);
    }
    assert_adapters_close(&joined, &apart, 1e-5, "one pass against micro-batches");
}

#[test]
fn gradient_checkpointing_trains_to_the_same_weights() {
    // f32 checkpoints layer by layer through candle's graph (the CPU's packed path); f64 runs
    // every layer as one op, so that all layers are one checkpointed op.
    for dtype in [DType::F32, DType::F64] {
        checkpointing_case(dtype);
    }
}

fn checkpointing_case(dtype: DType) {
    let dec = tiny(dtype);
    let run = |gradient_checkpointing: bool| {
        // Dropout on: both runs of a checkpointed layer must draw the same masks.
        let cfg = all_targets(4, 0.1);
        let adapter = Adapter::new(&dec, cfg, 11).unwrap();
        let config = TrainConfig { shuffle: true, max_steps: Some(3), gradient_checkpointing, ..fixture_config() };
        let log = train::train(&dec, &adapter, &fixture_rows(), &config, |_| Ok(())).unwrap();
        (log, adapter)
    };
    let (plain_log, plain) = run(false);
    let (ckpt_log, ckpt) = run(true);
    for (a, b) in plain_log.iter().zip(&ckpt_log) {
        assert!((a.loss - b.loss).abs() < 1e-6 * a.loss, "step {}: loss {} vs {}", a.step, a.loss, b.loss);
        assert!(
            (a.grad_norm - b.grad_norm).abs() < 1e-5 * a.grad_norm,
            "step {}: grad norm {} vs {}",
            a.step,
            a.grad_norm,
            b.grad_norm
        );
    }
    for (key, p) in &plain.pairs {
        let q = ckpt.pairs.get(key).unwrap();
        let (da, db) = (max_abs_diff(p.a.as_tensor(), q.a.as_tensor()), max_abs_diff(p.b.as_tensor(), q.b.as_tensor()));
        assert!(da < 1e-5 && db < 1e-5, "{key:?}: A differs by {da}, B by {db}");
    }
}

#[test]
fn the_layer_op_trains_as_the_composite_ops_do_step_after_step() {
    // With dropout and without (where q/k/v and gate/up share their stacked A's, renewed
    // every step as well).
    for dropout in [0.1, 0.0] {
        layer_op_case(dropout);
    }
}

fn layer_op_case(dropout: f64) {
    // f64 weights are not packed for the CPU: training runs each layer as one op with its
    // staged adapter weights (renewed every step); f32 runs the composite ops.
    let run = |dtype: DType| {
        let dec = tiny(dtype);
        let adapter = Adapter::new(&dec, all_targets(4, dropout), 13).unwrap();
        let config = TrainConfig { shuffle: true, max_steps: Some(3), learning_rate: 2e-2, ..fixture_config() };
        let log = train::train(&dec, &adapter, &fixture_rows(), &config, |_| Ok(())).unwrap();
        (log, adapter)
    };
    let (op_log, op) = run(DType::F64);
    let (plain_log, plain) = run(DType::F32);
    for (a, b) in plain_log.iter().zip(&op_log) {
        assert!((a.loss - b.loss).abs() < 1e-5 * a.loss, "step {}: loss {} vs {}", a.step, a.loss, b.loss);
        assert!((a.grad_norm - b.grad_norm).abs() < 1e-4 * a.grad_norm, "step {}: grad norm", a.step);
    }
    for (key, p) in &plain.pairs {
        let q = op.pairs.get(key).unwrap();
        let (da, db) = (max_abs_diff(p.a.as_tensor(), q.a.as_tensor()), max_abs_diff(p.b.as_tensor(), q.b.as_tensor()));
        assert!(da < WEIGHT_TOL && db < WEIGHT_TOL, "{key:?}: A differs by {da}, B by {db}");
    }
}

#[test]
fn hand_written_lora_backward_gives_the_gradients_of_autograd() {
    // f64: the layer op's products by candle's matmul; f32: through the CPU's packed weights, q/k/v
    // and gate/up as one product each way.
    for dtype in [DType::F64, DType::F32] {
        // Every projection adapted, and some frozen inside the layer's op.
        hand_written_rules_case(all_targets(4, 0.1), dtype);
        // Without dropout, q/k/v and gate/up each share one product of their common input.
        hand_written_rules_case(all_targets(4, 0.0), dtype);
        let some = vec![Target::QProj, Target::VProj, Target::DownProj];
        hand_written_rules_case(LoraConfig { target_modules: some, ..all_targets(4, 0.1) }, dtype);
    }
}

fn hand_written_rules_case(config: LoraConfig, dtype: DType) {
    let dec = tiny(dtype);
    let adapter = Adapter::new(&dec, config, 5).unwrap();
    for p in adapter.pairs.values() {
        p.b.set(&(Tensor::ones(p.b.shape(), DType::F32, &Device::Cpu).unwrap() * 0.1).unwrap()).unwrap();
    }
    let rows = fixture_rows();
    let refs: Vec<&Example> = rows.iter().take(2).collect();
    // Each way starts from the same dropout stream, so draws the same masks.
    let grads = |sink: Option<&std::sync::Arc<GradSink>>, checkpointing: bool| {
        let rng = RefCell::new(rand_chacha::ChaCha8Rng::seed_from_u64(9));
        let loss = train::batch_loss(&dec, &adapter, &refs, 10, &rng, sink, checkpointing).unwrap();
        let store = loss.backward().unwrap();
        let mut out = Vec::new();
        for (key, p) in &adapter.pairs {
            for v in [&p.a, &p.b] {
                let (graph, sunk) = (store.get(v.as_tensor()).cloned(), sink.and_then(|s| s.take(v)));
                // With a sink, the rules of `model::lora` give every adapter gradient.
                assert_eq!(graph.is_none(), sink.is_some(), "{key:?}");
                out.push((*key, graph.or(sunk).unwrap_or_else(|| panic!("{key:?}: no gradient"))));
            }
        }
        (loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(), out)
    };
    // f32 sums in another order: a looser bound than f64's.
    let (loss_tol, grad_tol) = if dtype == DType::F64 { (1e-12, 1e-5) } else { (1e-6, 1e-4) };
    let (loss, reference) = grads(None, false);
    for checkpointing in [false, true] {
        let sink = GradSink::new();
        let (l, ours) = grads(Some(&sink), checkpointing);
        assert!((l - loss).abs() < loss_tol * loss.abs().max(1.0), "{dtype:?}: loss {l} vs {loss}");
        for ((key, g), (_, r)) in ours.iter().zip(&reference) {
            let d = max_abs_diff(g, r);
            let scale = r.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(
                d <= grad_tol * scale.max(1e-3),
                "{dtype:?} {key:?} (checkpointing {checkpointing}): differs by {d}, scale {scale}"
            );
        }
    }
}

#[test]
fn skipping_a_batchs_padding_changes_no_loss_or_gradient_bit_for_bit() {
    let dec = tiny(DType::F32);
    let adapter = Adapter::new(&dec, all_targets(4, 0.0), 5).unwrap();
    for p in adapter.pairs.values() {
        p.b.set(&(Tensor::ones(p.b.shape(), DType::F32, &Device::Cpu).unwrap() * 0.1).unwrap()).unwrap();
    }
    // Rows of 5, 12 and 7 tokens, right-padded to 12.
    let rows = fixture_rows();
    let lengths: Vec<usize> = rows.iter().take(3).map(|r| r.ids.len()).collect();
    let (b, t) = (lengths.len(), *lengths.iter().max().unwrap());
    let mut ids = Vec::new();
    let mut real = Vec::new();
    for (r, row) in rows.iter().take(b).enumerate() {
        ids.extend(row.ids.iter().copied().chain(std::iter::repeat(0)).take(t));
        real.extend((0..row.ids.len()).map(|p| (r * t + p) as u32));
    }
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
    let run = |skip_padding: bool| {
        let sink = GradSink::new();
        let rng = RefCell::new(rand_chacha::ChaCha8Rng::seed_from_u64(1));
        let pass = loralab::model::Pass::train(&adapter, Some(&rng)).with_sink(&sink);
        let pass = if skip_padding { pass.with_lengths(&lengths) } else { pass };
        let mask = loralab::model::decoder::Mask::causal(t, &Device::Cpu).unwrap();
        let hidden = dec.forward_hidden(&ids, 0, Some(&mask), None, pass).unwrap(); // (B, T, D)
        let d = hidden.dim(2).unwrap();
        // A loss of the real positions alone: their hidden states against fixed weights.
        let picked = loralab::model::ops::gather_rows(&hidden.reshape((b * t, d)).unwrap(), &real).unwrap();
        let w = Tensor::arange(0f32, d as f32, &Device::Cpu).unwrap().affine(0.01, -0.3).unwrap();
        let loss = picked.broadcast_mul(&w).unwrap().sqr().unwrap().sum_all().unwrap();
        loss.backward().unwrap();
        let mut bits = vec![loss.to_scalar::<f32>().unwrap().to_bits()];
        for p in adapter.pairs.values() {
            for v in [&p.a, &p.b] {
                let g = sink.take(v).expect("a gradient");
                bits.extend(g.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()));
            }
        }
        bits
    };
    // Fails where a kernel's sums depend on the rows beside a token (as the general library's
    // product of the adapters' input does on the tokens alone, hence on the padded rows).
    assert!(run(true) == run(false), "the loss or a gradient differs with the padding skipped");
}

#[test]
fn every_trainable_variable_receives_a_gradient() {
    let dec = tiny(DType::F32);
    let cfg = all_targets(4, 0.0);
    let adapter = Adapter::new(&dec, cfg, 3).unwrap();
    // Nonzero B so that A's gradient is nonzero too.
    for p in adapter.pairs.values() {
        p.b.set(&(Tensor::ones(p.b.shape(), DType::F32, &Device::Cpu).unwrap() * 0.1).unwrap()).unwrap();
    }
    let rows = fixture_rows();
    let refs: Vec<&Example> = rows.iter().take(2).collect();
    let rng = RefCell::new(rand_chacha::ChaCha8Rng::seed_from_u64(0));
    let loss = train::batch_loss(&dec, &adapter, &refs, 10, &rng, None, false).unwrap();
    let grads = loss.backward().unwrap();
    for ((layer, target), p) in &adapter.pairs {
        for (name, v) in [("A", &p.a), ("B", &p.b)] {
            let g =
                grads.get(v.as_tensor()).unwrap_or_else(|| panic!("layer {layer} {target:?} {name} has no gradient"));
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0, "layer {layer} {target:?} {name} has a zero gradient");
        }
    }
    // The frozen base gets none.
    assert!(grads.get(&dec.layers[0].self_attn.q_proj.weight).is_none());
    assert!(grads.get(&dec.embed_tokens).is_none());
}

#[test]
fn lora_gradients_match_finite_differences() {
    let dec = tiny(DType::F64);
    let cfg = LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        lora_dropout: 0.0,
        target_modules: vec![Target::VProj, Target::DownProj],
        use_rslora: false,
    };
    let adapter = Adapter::new(&dec, cfg, 5).unwrap();
    let to64 =
        |v: &candle_core::Var| candle_core::Var::from_tensor(&v.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
    let mut a64 = adapter.clone();
    for p in a64.pairs.values_mut() {
        p.a = to64(&p.a);
        p.b = candle_core::Var::from_tensor(
            &(Tensor::ones(p.b.shape(), DType::F64, &Device::Cpu).unwrap() * 0.05).unwrap(),
        )
        .unwrap();
    }
    let rows = fixture_rows();
    let refs: Vec<&Example> = rows.iter().take(2).collect();
    let rng = RefCell::new(rand_chacha::ChaCha8Rng::seed_from_u64(0));
    let loss = |ad: &Adapter| train::batch_loss(&dec, ad, &refs, 10, &rng, None, false).unwrap();
    let grads = loss(&a64).backward().unwrap();
    let h = 1e-6;
    for p in a64.pairs.values() {
        for var in [&p.a, &p.b] {
            let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let orig = var.as_tensor().copy().unwrap();
            for idx in [0usize, 3] {
                let mut flat = orig.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                flat[idx] += h;
                var.set(&Tensor::from_vec(flat.clone(), orig.shape(), &Device::Cpu).unwrap()).unwrap();
                let up = loss(&a64).to_scalar::<f64>().unwrap();
                flat[idx] -= 2.0 * h;
                var.set(&Tensor::from_vec(flat, orig.shape(), &Device::Cpu).unwrap()).unwrap();
                let down = loss(&a64).to_scalar::<f64>().unwrap();
                var.set(&orig).unwrap();
                let numeric = (up - down) / (2.0 * h);
                assert!(
                    (numeric - g[idx]).abs() < 1e-6 + 1e-4 * numeric.abs(),
                    "numeric {numeric} vs analytic {}",
                    g[idx]
                );
            }
        }
    }
}

fn logits_of(dec: &Decoder, adapter: Option<&Adapter>, ids: &Value) -> Tensor {
    let rows: Vec<Vec<u32>> = serde_json::from_value(ids.clone()).unwrap();
    let (b, t) = (rows.len(), rows[0].len());
    dec.forward(&Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu).unwrap(), adapter).unwrap()
}

fn json_tensor(v: &Value, like: &Tensor) -> Tensor {
    fn flat(v: &Value, out: &mut Vec<f32>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
            Value::Number(n) => out.push(n.as_f64().unwrap() as f32),
            _ => panic!(),
        }
    }
    let mut out = Vec::new();
    flat(v, &mut out);
    Tensor::from_vec(out, like.shape(), &Device::Cpu).unwrap()
}

#[test]
fn a_peft_made_rslora_adapter_gives_peft_logits_attached_and_merged() {
    let dec = tiny(DType::F32);
    let adapter = Adapter::load(&fixtures().join("tiny-lora/rslora"), &dec).unwrap();
    assert!(adapter.config.use_rslora);
    let fx = json("tiny-lora/rslora/logits.json");
    let got = logits_of(&dec, Some(&adapter), &fx["input_ids"]);
    let want = json_tensor(&fx["logits"], &got);
    assert!(max_abs_diff(&got, &want) < 1e-4, "attached: {}", max_abs_diff(&got, &want));
    let merged = dec.merged(&adapter).unwrap();
    let got = logits_of(&merged, None, &fx["input_ids"]);
    assert!(max_abs_diff(&got, &want) < 1e-4, "merged: {}", max_abs_diff(&got, &want));
}

#[test]
fn a_saved_adapter_loads_back_identically_in_peft_format() {
    let dec = tiny(DType::F32);
    let adapter = Adapter::load(&fixtures().join("tiny-lora/final"), &dec).unwrap();
    let dir = tempfile::tempdir().unwrap();
    adapter.save(dir.path(), "tiny-qwen2").unwrap();
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    let back = Adapter::load(dir.path(), &dec).unwrap();
    for (k, p) in &adapter.pairs {
        assert_eq!(max_abs_diff(p.a.as_tensor(), back.pairs[k].a.as_tensor()), 0.0);
        assert_eq!(max_abs_diff(p.b.as_tensor(), back.pairs[k].b.as_tensor()), 0.0);
    }
    let fx = json("tiny-lora/logits_after.json");
    let got = logits_of(&dec, Some(&back), &fx["input_ids"]);
    let want = json_tensor(&fx["logits"], &got);
    assert!(max_abs_diff(&got, &want) < 1e-4);
}

#[test]
fn loading_an_adapter_with_stray_tensors_names_them() {
    let dec = tiny(DType::F32);
    let src = Adapter::load(&fixtures().join("tiny-lora/final"), &dec).unwrap();
    let dir = tempfile::tempdir().unwrap();
    src.save(dir.path(), "tiny-qwen2").unwrap();
    let st = dir.path().join("adapter_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    tensors.insert(
        "base_model.model.model.layers.0.mlp.extra.lora_A.weight".into(),
        Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &st).unwrap();
    let err = Adapter::load(dir.path(), &dec).err().unwrap().to_string();
    assert!(err.contains("mlp.extra.lora_A"), "{err}");
}

#[test]
fn a_second_adapter_trains_on_a_merged_model() {
    let dec = tiny(DType::F32);
    let first = Adapter::load(&fixtures().join("tiny-lora/rslora"), &dec).unwrap();
    let merged = dec.merged(&first).unwrap();
    let cfg = all_targets(2, 0.0);
    let second = Adapter::new(&merged, cfg, 1).unwrap();
    let config = TrainConfig { max_steps: Some(2), ..fixture_config() };
    let log = train::train(&merged, &second, &fixture_rows(), &config, |_| Ok(())).unwrap();
    assert!(log.iter().all(|s| s.loss.is_finite() && s.grad_norm > 0.0));
}

#[test]
fn three_adamw_steps_on_smollm2_match_peft_and_the_trainer() {
    let m =
        loralab::model::load(loralab::model::DEFAULT_MODEL, &LoadOptions { dtype: DType::F32, device: Device::Cpu })
            .unwrap();
    let dir = fixtures().join("smollm2-lora");
    let adapter = Adapter::load(&dir.join("initial"), &m.decoder).unwrap();
    let examples = rows_of(&json("smollm2-lora/rows.json"));
    let cfg = TrainConfig {
        max_steps: Some(3),
        learning_rate: 1e-3,
        warmup_steps: Some(0),
        weight_decay: 0.01,
        per_device_train_batch_size: 2,
        gradient_accumulation_steps: 1,
        shuffle: false,
        ..Default::default()
    };
    let log = train::train(&m.decoder, &adapter, &examples, &cfg, |_| Ok(())).unwrap();
    let want: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("steps.json")).unwrap()).unwrap();
    for (got, w) in log.iter().zip(want["steps"].as_array().unwrap()) {
        let (loss, norm) = (w["loss"].as_f64().unwrap(), w["grad_norm"].as_f64().unwrap());
        assert!((got.loss - loss).abs() / loss < SMOL_STEP_RTOL, "step {}: loss {} vs {loss}", got.step, got.loss);
        assert!(
            (got.grad_norm - norm).abs() / norm < SMOL_STEP_RTOL,
            "step {}: grad norm {} vs {norm}",
            got.step,
            got.grad_norm
        );
        assert!((got.learning_rate - w["learning_rate"].as_f64().unwrap()).abs() < 1e-12);
        assert_eq!(got.tokens as u64, w["num_items_in_batch"].as_u64().unwrap());
    }
}

/// 30 layers of f32 with different summation orders than torch.
const SMOL_STEP_RTOL: f64 = 1e-4;

#[test]
fn a_dropout_mask_keeps_about_one_minus_p_and_depends_only_on_its_key() {
    use loralab::model::ops::dropout::keyed_dropout_mask;
    let like = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
    let shape = candle_core::Shape::from((200, 500));
    let mask = |key: u64| {
        keyed_dropout_mask(&shape, key, 0.9, &like).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let a = mask(1);
    let kept = a.iter().filter(|&&v| v != 0.0).count() as f64 / a.len() as f64;
    assert!((kept - 0.9).abs() < 0.005, "kept {kept}");
    assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
    assert_eq!(a, mask(1));
    assert_ne!(a, mask(2));
}

#[test]
fn each_pass_runs_the_layers_by_the_one_implementation_it_names() {
    use loralab::model::decoder::LayersRun;
    use loralab::model::Pass;
    let sink = GradSink::new();
    let rng = RefCell::new(rand_chacha::ChaCha8Rng::seed_from_u64(1));
    for dtype in [DType::F32, DType::F64] {
        // f32 on the CPU: the layer ops with packed weights; f64: unpacked.
        let dec = tiny(dtype);
        let adapter = Adapter::new(&dec, all_targets(2, 0.0), 1).unwrap();
        let train = Pass::train(&adapter, Some(&rng));
        let (plain, checkpointed) = (LayersRun::LayerOps, LayersRun::CheckpointedLayerOps);
        assert_eq!(dec.layers_run(Pass::infer(Some(&adapter)), false), LayersRun::Composite);
        assert_eq!(dec.layers_run(train, false), LayersRun::Composite, "no sink: candle's graph");
        assert_eq!(dec.layers_run(train.with_sink(&sink), false), plain, "{dtype:?}");
        assert_eq!(dec.layers_run(train.checkpointed(&sink), false), checkpointed, "{dtype:?}");
        assert_eq!(dec.layers_run(train.with_sink(&sink), true), LayersRun::Composite, "a cache");
    }
}
