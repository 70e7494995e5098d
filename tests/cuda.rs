//! The fused GPU kernels against the CPU's plain ops (built with `--features cuda`, run on a
//! machine with a GPU: `cargo test --release --features cuda --test cuda`). Each value is
//! computed in bf16 on the GPU and in f32 on the CPU from the same bf16-rounded inputs; the
//! tolerances are bf16's (8 bits of mantissa).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Result, Tensor, Var};
use loralab::adapter::Adapter;
use loralab::model::ops;
use loralab::train::{self, TrainConfig};

mod common;

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

/// The same random values as a bf16 GPU tensor and an f32 CPU tensor.
fn pair(shape: &[usize], seed: u64) -> Result<(Tensor, Tensor)> {
    let values = loralab::testing::uniform(shape.iter().product(), seed as u32, -2.0, 2.0);
    let x = Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(DType::BF16)?;
    Ok((x.to_device(&gpu())?, x.to_dtype(DType::F32)?))
}

/// Largest |a - b| relative to the largest |b|.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap();
    let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    diff / scale.max(1e-6)
}

#[test]
fn fused_causal_attention_matches_the_plain_one_with_its_gradients() -> Result<()> {
    // An odd length (keys one at a time) and an even one (two at a time); scores as they are and
    // capped (Gemma 2's soft cap, small enough to bind).
    for t in [37, 40] {
        for softcap in [None, Some(0.7)] {
            causal_attention_case(t, 16, softcap)?;
        }
    }
    Ok(())
}

#[test]
fn flash_attention_matches_the_plain_one_with_its_gradients() -> Result<()> {
    // Head sizes the flash kernels take; lengths within one tile of 64, a whole tile, and over
    // several tiles with a partial last one.
    for e in [64, 128] {
        for t in [37, 64, 150] {
            causal_attention_case(t, e, None)?;
        }
    }
    Ok(())
}

fn causal_attention_case(t: usize, e: usize, softcap: Option<f64>) -> Result<()> {
    let (b, k, g) = (2, 2, 3);
    let (qg, qc) = pair(&[b, k, g * t, e], 1)?;
    let (kg, kc) = pair(&[b, k, t, e], 2)?;
    let (vg, vc) = pair(&[b, k, t, e], 3)?;
    let (wg, wc) = pair(&[b, k, g * t, e], 4)?;
    let causal: Vec<f32> =
        (0..t).flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
    let mask_c = Tensor::from_vec(causal, (1, 1, 1, t, t), &Device::Cpu)?;
    let mask_g = mask_c.to_device(&gpu())?;
    let run = |q: &Tensor, kk: &Tensor, v: &Tensor, w: &Tensor, mask: &Tensor| -> Result<Vec<Tensor>> {
        let (q, kk, v) = (Var::from_tensor(q)?, Var::from_tensor(kk)?, Var::from_tensor(v)?);
        let out = ops::attention(q.as_tensor(), kk.as_tensor(), v.as_tensor(), Some(mask), true, 0.25, softcap, g)?;
        let grads = (out.to_dtype(DType::F32)? * w.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
        Ok(vec![
            out,
            grads.get(q.as_tensor()).unwrap().clone(),
            grads.get(kk.as_tensor()).unwrap().clone(),
            grads.get(v.as_tensor()).unwrap().clone(),
        ])
    };
    let fused = run(&qg, &kg, &vg, &wg, &mask_g)?;
    let plain = run(&qc, &kc, &vc, &wc, &mask_c)?;
    for (name, (a, b)) in ["output", "dq", "dk", "dv"].iter().zip(fused.iter().zip(&plain)) {
        let d = rel_diff(a, b);
        assert!(d < 2e-2, "{name} (T {t}, E {e}, cap {softcap:?}): relative difference {d}");
    }
    Ok(())
}

#[test]
fn fused_cross_entropy_matches_the_plain_one_with_its_gradient() -> Result<()> {
    // A vocabulary the one-kernel path takes (a multiple of 8) and one it does not; logits as they
    // are and capped.
    for vocab in [1000, 1001] {
        for softcap in [None, Some(2.0)] {
            cross_entropy_case(vocab, softcap)?;
        }
    }
    Ok(())
}

fn cross_entropy_case(vocab: usize, softcap: Option<f64>) -> Result<()> {
    // The fused path rounds the logits to bf16 (as transformers does under bf16 autocast): the
    // reference rounds them too, then computes in f32.
    let (n, dim) = (50, 64);
    let (hg, hc) = pair(&[n, dim], 5)?;
    let (wg, wc) = pair(&[vocab, dim], 6)?;
    let targets: Vec<u32> = (0..n as u32).map(|i| (i * 37) % vocab as u32).collect();
    let h = Var::from_tensor(&hg)?;
    let loss = ops::linear_cross_entropy(h.as_tensor(), &wg, None, &targets, 16, softcap)?;
    let grads = (&loss * 0.5)?.backward()?;
    let fused_loss = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    let fused_grad = grads.get(h.as_tensor()).unwrap().clone();

    let logits = hc.matmul(&wc.t()?)?.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
    let (logits, slope) = match softcap {
        Some(c) => {
            let tanh = (logits / c)?.tanh()?;
            ((&tanh * c)?, (tanh.sqr()?.neg()? + 1.0)?)
        }
        None => (logits.clone(), logits.ones_like()?),
    };
    let logp = candle_nn::ops::log_softmax(&logits, 1)?;
    let picked = logp.gather(&Tensor::from_slice(&targets, (n, 1), &Device::Cpu)?, 1)?;
    let plain_loss = picked.neg()?.sum_all()?.to_scalar::<f32>()?;
    let onehot = Tensor::zeros((n, vocab), DType::F32, &Device::Cpu)?.scatter_add(
        &Tensor::from_slice(&targets, (n, 1), &Device::Cpu)?,
        &Tensor::ones((n, 1), DType::F32, &Device::Cpu)?,
        1,
    )?;
    let plain_grad = (((logp.exp()? - onehot)? * slope)?.matmul(&wc)? * 0.5)?;
    let what = format!("vocab {vocab}, cap {softcap:?}");
    assert!((fused_loss - plain_loss).abs() / plain_loss < 1e-3, "{what}: loss {fused_loss} vs {plain_loss}");
    let d = rel_diff(&fused_grad, &plain_grad);
    assert!(d < 2e-2, "{what}: gradient: relative difference {d}");
    Ok(())
}

#[test]
fn the_fused_gated_products_match_the_plain_ones_with_their_gradients() -> Result<()> {
    // 4500 elements go eight at a time, 4485 one at a time; SwiGLU and GeGLU.
    use loralab::model::config::Activation;
    for activation in [Activation::Silu, Activation::GeluTanh] {
        gated_case(300, activation)?;
        gated_case(299, activation)?;
    }
    Ok(())
}

fn gated_case(width: usize, activation: loralab::model::config::Activation) -> Result<()> {
    let (gg, gc) = pair(&[3, 5, width], 7)?;
    let (ug, uc) = pair(&[3, 5, width], 8)?;
    let (wg, wc) = pair(&[3, 5, width], 9)?;
    let run = |g: &Tensor, u: &Tensor, w: &Tensor| -> Result<Vec<Tensor>> {
        let (g, u) = (Var::from_tensor(g)?, Var::from_tensor(u)?);
        let h = ops::gated(activation, g.as_tensor(), u.as_tensor())?;
        let grads = (h.to_dtype(DType::F32)? * w.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
        Ok(vec![h, grads.get(g.as_tensor()).unwrap().clone(), grads.get(u.as_tensor()).unwrap().clone()])
    };
    let fused = run(&gg, &ug, &wg)?;
    let plain = run(&gc, &uc, &wc)?;
    for (name, (a, b)) in ["h", "dgate", "dup"].iter().zip(fused.iter().zip(&plain)) {
        let d = rel_diff(a, b);
        assert!(d < 2e-2, "{activation:?} {name}: relative difference {d}");
    }
    Ok(())
}

#[test]
fn the_rms_norm_kernel_matches_the_plain_norm() -> Result<()> {
    // Rows of 896 (one eight-wide load per thread) and of 3584 (two).
    for d in [896, 3584] {
        let (xg, xc) = pair(&[5, d], 34)?;
        let (wg, wc) = pair(&[d], 35)?;
        let fused = loralab::model::ops::rms_norm::cuda::rms_norm(&xg, &wg, 1e-6)?;
        let plain = candle_nn::ops::rms_norm(&xc, &wc, 1e-6)?;
        let diff = rel_diff(&fused, &plain);
        assert!(diff < 1e-2, "d {d}: relative difference {diff}");
    }
    Ok(())
}

#[test]
fn the_residual_sum_and_its_norm_in_one_pass_are_the_separate_ops() -> Result<()> {
    for d in [896, 3584] {
        let (xg, xc) = pair(&[2, 5, d], 36)?;
        let (hg, hc) = pair(&[2, 5, d], 37)?;
        let (wg, wc) = pair(&[d], 38)?;
        let (sum, normed) = loralab::model::ops::rms_norm::cuda::add_rms_norm(&xg, &hg, &wg, 1e-6)?;
        // The sum rounded to bf16 exactly as the separate addition rounds it.
        let separate = (&xg + &hg)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        assert_eq!(rel_diff(&sum, &separate), 0.0, "d {d}: sum");
        let plain = candle_nn::ops::rms_norm(&(xc + hc)?, &wc, 1e-6)?;
        let diff = rel_diff(&normed, &plain);
        assert!(diff < 1e-2, "d {d}: relative difference {diff}");
    }
    Ok(())
}

#[test]
fn fused_rms_norm_gradient_matches_the_plain_one() -> Result<()> {
    let (xg, xc) = pair(&[4, 7, 896], 30)?;
    let (wg, wc) = pair(&[896], 31)?;
    let (gg, gc) = pair(&[4, 7, 896], 32)?;
    let run = |x: &Tensor, w: &Tensor, g: &Tensor| -> Result<Tensor> {
        let x = Var::from_tensor(x)?;
        let y = ops::rms_norm(x.as_tensor(), w, 1e-6)?;
        let grads = (y.to_dtype(DType::F32)? * g.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
        Ok(grads.get(x.as_tensor()).unwrap().clone())
    };
    let d = rel_diff(&run(&xg, &wg, &gg)?, &run(&xc, &wc, &gc)?);
    assert!(d < 2e-2, "dx: relative difference {d}");
    // With a residual gradient added in the same pass.
    let (pg, pc) = pair(&[4, 7, 896], 33)?;
    let fused = loralab::model::ops::rms_norm::cuda::rms_norm_backward_plus(&xg, &gg, &wg, &pg, 1e-6)?;
    let d = rel_diff(&fused, &(&pc + run(&xc, &wc, &gc)?)?);
    assert!(d < 2e-2, "plus + dx: relative difference {d}");
    Ok(())
}

#[test]
fn decoding_attention_from_the_cache_matches_the_cpu_kernel() -> Result<()> {
    // B 3, K 2; (query heads per kv head R, head dimension E, cache capacity C, positions used S):
    // keys in one tile, several tiles with a partial last one, one query head per kv head, and
    // the 16 the kernel's products hold.
    for &(r, e, c, s) in &[(7, 128, 40, 33), (3, 64, 40, 33), (7, 128, 300, 290), (1, 64, 100, 77), (16, 128, 200, 150)]
    {
        let (b, k) = (3, 2);
        let (qg, qc) = pair(&[b, k, r, e], 10)?;
        let (kg, kc) = pair(&[b, k, c, e], 11)?;
        let (vg, vc) = pair(&[b, k, c, e], 12)?;
        // Row 0 is left-padded by 5 positions; row 2 hides the whole second tile of keys (a
        // window), so one warp of the kernel sees no key in it.
        let hidden = |row: usize, j: usize| (row == 0 && j < 5) || (row == 2 && (64..128).contains(&j) && j + 1 < s);
        let mask: Vec<f32> = (0..b * s).map(|i| if hidden(i / s, i % s) { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mask_c = Tensor::from_vec(mask, (b, 1, 1, 1, s), &Device::Cpu)?;
        let mask_g = mask_c.to_device(&gpu())?;
        let scale = 1.0 / (e as f64).sqrt();
        let fused = loralab::model::ops::attention::cuda::decode_attention(&qg, &kg, &vg, s, Some(&mask_g), scale)?;
        let plain = loralab::model::cpu::attention_cpu(
            &qc,
            loralab::model::cpu::Cached { keys: &kc, values: &vc, s, prefix: None },
            Some(&mask_c),
            scale,
            None,
            loralab::model::cpu::Heads::Stacked,
        )?;
        let d = rel_diff(&fused, &plain);
        assert!(d < 2e-2, "r {r}, e {e}: relative difference {d}");
    }
    Ok(())
}

/// Draws one token per row of `logits` (rows, V) on the GPU, row i keyed by keys[i].
fn draw(logits: &[Vec<f32>], keys: &[i64], step: u32, temperature: f64) -> Vec<u32> {
    draw_cut(logits, keys, step, temperature, 0, 1.0)
}

/// `draw` with a top-k and top-p cut.
fn draw_cut(logits: &[Vec<f32>], keys: &[i64], step: u32, temperature: f64, top_k: usize, top_p: f64) -> Vec<u32> {
    let v = logits[0].len();
    let flat: Vec<f32> = logits.concat();
    let x = Tensor::from_vec(flat, (logits.len(), v), &gpu()).unwrap().to_dtype(DType::BF16).unwrap();
    let keys = Tensor::new(keys, &gpu()).unwrap();
    loralab::model::ops::sampling::cuda::gumbel_argmax(&x, &keys, step, temperature, top_k, top_p)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()
}

#[test]
fn gumbel_sampling_on_the_gpu_follows_the_softmax() {
    // logits ln(1), ln(2), ln(7) (probabilities 0.1, 0.2, 0.7) spread over a vocabulary of 1000
    // whose other tokens are never drawn; 20,000 rows with distinct keys, and one key over steps.
    let mut row = vec![-1e4f32; 1000];
    row[3] = 0.0;
    row[500] = 2f32.ln();
    row[999] = 7f32.ln();
    let n = 20_000;
    let logits = vec![row.clone(); n];
    let keys: Vec<i64> = (0..n as i64).map(|i| i * 7919 + 13).collect();
    let by_row = draw(&logits, &keys, 0, 1.0);
    let by_step: Vec<u32> = (0..2000).map(|step| draw(&logits[..1], &keys[..1], step, 1.0)[0]).collect();
    for (tokens, count) in [(by_row, n), (by_step, 2000)] {
        for (id, p) in [(3u32, 0.1), (500, 0.2), (999, 0.7)] {
            let f = tokens.iter().filter(|&&t| t == id).count() as f64 / count as f64;
            // 5 standard errors of a binomial proportion
            assert!((f - p).abs() < 5.0 * (p * (1.0 - p) / count as f64).sqrt(), "token {id}: {f} vs {p}");
        }
        assert!(tokens.iter().all(|t| [3, 500, 999].contains(t)));
    }
}

/// The sampling kernel's rule on the CPU at temperature 1: the argmax over tokens of
/// logit - ln(-ln u), u from the hash of (the row's key, step, token id).
fn gumbel_draw_on_the_cpu(row: &[f32], key: i64, step: u32) -> u32 {
    fn mix32(mut x: u32) -> u32 {
        x ^= x >> 16;
        x = x.wrapping_mul(0x7feb352d);
        x ^= x >> 15;
        x = x.wrapping_mul(0x846ca68b);
        x ^ (x >> 16)
    }
    let key = key as u64;
    let stream = mix32((key as u32) ^ mix32(((key >> 32) as u32) ^ mix32(step)));
    let mut best = (f32::NEG_INFINITY, 0u32);
    for (i, &logit) in row.iter().enumerate() {
        let h = mix32(stream.wrapping_add(mix32(i as u32)));
        let u = ((h >> 9) as f32 + 0.5) * (1.0 / 8388608.0);
        let score = logit - (-u.ln()).ln();
        if score > best.0 {
            best = (score, i as u32);
        }
    }
    best.1
}

#[test]
fn the_gpu_draws_the_gumbel_max_token_when_it_passes_over_tokens_that_cannot_win() {
    // Logits over [-2, 2), where every token draws its noise, and over [-40, 40), where most of
    // them are more than the largest noise below the best score and are passed over.
    let (_, x) = pair(&[64, 5000], 23).unwrap();
    let keys: Vec<i64> = (0..64).map(|i| 7_000_003 * i + 5).collect();
    for spread in [1.0f64, 20.0] {
        let wide = (&x * spread).unwrap().to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
        let logits: Vec<Vec<f32>> = wide.to_vec2().unwrap();
        for step in [0, 3] {
            let gpu = draw(&logits, &keys, step, 1.0);
            let cpu: Vec<u32> =
                logits.iter().zip(&keys).map(|(row, &key)| gumbel_draw_on_the_cpu(row, key, step)).collect();
            assert_eq!(gpu, cpu, "spread {spread}, step {step}");
        }
    }
}

#[test]
fn a_row_draws_the_same_token_on_the_gpu_whatever_its_batch() {
    let (_, x) = pair(&[64, 5000], 21).unwrap();
    let logits: Vec<Vec<f32>> = x.to_vec2().unwrap();
    let keys: Vec<i64> = (0..64).map(|i| 1_000_003 * i).collect();
    let batch = draw(&logits, &keys, 7, 0.8);
    for i in [0, 17, 63] {
        assert_eq!(draw(&logits[i..i + 1], &keys[i..i + 1], 7, 0.8)[0], batch[i], "row {i}");
    }
    assert_ne!(draw(&logits, &keys, 8, 0.8), batch, "another step draws other tokens");
    // Temperature 0 is the argmax.
    let greedy = draw(&logits, &keys, 0, 0.0);
    for (row, &t) in logits.iter().zip(&greedy) {
        let best = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(row[t as usize], best);
    }
}

#[test]
fn hand_written_backward_rules_on_the_gpu_give_the_gradients_of_autograd() {
    use loralab::adapter::{Adapter, LoraConfig, Target};
    use loralab::data::Example;
    use loralab::model::sink::GradSink;
    use loralab::model::{load::read_decoder, LoadOptions};
    use rand::SeedableRng;
    use std::cell::RefCell;
    // Run from the repository root (the GPU machine's copy) or from this crate's folder.
    let dir = std::path::Path::new("tests/fixtures/tiny-qwen2");
    let dir = if dir.exists() { dir.to_path_buf() } else { std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir) };
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        target_modules: Target::ALL.to_vec(),
        use_rslora: false,
    };
    // The gradients of every adapter variable (in key order) for one batch of the tiny model.
    let grads = |dtype: DType, device: Device, sink: Option<&std::sync::Arc<GradSink>>| -> Vec<Tensor> {
        let dec = read_decoder(&dir, &LoadOptions { dtype, device: device.clone() }).unwrap();
        let adapter = Adapter::new(&dec, config.clone(), 5).unwrap();
        for p in adapter.pairs.values() {
            p.b.set(&(Tensor::ones(p.b.shape(), DType::F32, &device).unwrap() * 0.1).unwrap()).unwrap();
        }
        let vocab = dec.config.vocab_size as u32;
        let rows: Vec<Example> = (0..3u32)
            .map(|r| Example {
                ids: (0..24).map(|i| (i * 7919 + r * 104_729) % vocab).collect(),
                target: vec![true; 24],
            })
            .collect();
        let refs: Vec<&Example> = rows.iter().collect();
        let rng = RefCell::new(rand_chacha::ChaCha8Rng::seed_from_u64(9));
        let loss = loralab::train::batch_loss(&dec, &adapter, &refs, 10, &rng, sink, false).unwrap();
        let store = loss.backward().unwrap();
        let mut out = Vec::new();
        for p in adapter.pairs.values() {
            for v in [&p.a, &p.b] {
                let g = store.get(v.as_tensor()).cloned().or_else(|| sink.and_then(|s| s.take(v))).unwrap();
                out.push(g.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap());
            }
        }
        out
    };
    // bf16 arithmetic differs from f32 by a few percent on these gradients whichever way it is
    // arranged: the hand-written rules are held to autograd's own error against f32 on the CPU.
    let exact = grads(DType::F32, Device::Cpu, None);
    let ours = grads(DType::BF16, gpu(), Some(&GradSink::new()));
    let autograd = grads(DType::BF16, gpu(), None);
    for (i, reference) in exact.iter().enumerate() {
        let (e_ours, e_autograd) = (rel_diff(&ours[i], reference), rel_diff(&autograd[i], reference));
        assert!(
            e_ours < 0.1 && e_ours <= 2.0 * e_autograd + 1e-2,
            "gradient {i}: hand-written rules {e_ours}, autograd {e_autograd}, relative to f32"
        );
    }
}

#[test]
fn top_k_and_top_p_cuts_on_the_gpu_keep_the_right_tokens_in_proportion() {
    // Probabilities 0.1, 0.2, 0.3, 0.4 (the rest of a 5000-token vocabulary never drawn).
    let mut row = vec![-1e4f32; 5000];
    for (id, p) in [(10usize, 0.1f32), (2000, 0.2), (3000, 0.3), (4999, 0.4)] {
        row[id] = p.ln();
    }
    let n = 20_000;
    let logits = vec![row; n];
    let keys: Vec<i64> = (0..n as i64).map(|i| i * 31 + 7).collect();
    // (top_k, top_p) -> the kept tokens' renormalised probabilities
    type Case<'a> = (usize, f64, &'a [(u32, f64)]);
    let cases: [Case; 4] = [
        (0, 0.65, &[(4999, 0.4 / 0.7), (3000, 0.3 / 0.7)]), // 0.4 + 0.3 reach 0.65
        (0, 0.75, &[(4999, 0.4 / 0.9), (3000, 0.3 / 0.9), (2000, 0.2 / 0.9)]),
        (2, 1.0, &[(4999, 0.4 / 0.7), (3000, 0.3 / 0.7)]),
        (3, 0.5, &[(4999, 0.4 / 0.7), (3000, 0.3 / 0.7)]), // top 3 (0.9), then 0.5 of it: 0.45
    ];
    for (top_k, top_p, kept) in cases {
        let tokens = draw_cut(&logits, &keys, 3, 1.0, top_k, top_p);
        for &(id, p) in kept {
            let f = tokens.iter().filter(|&&t| t == id).count() as f64 / n as f64;
            assert!(
                (f - p).abs() < 5.0 * (p * (1.0 - p) / n as f64).sqrt(),
                "k {top_k} p {top_p} token {id}: {f} vs {p}"
            );
        }
        let ids: Vec<u32> = kept.iter().map(|k| k.0).collect();
        assert!(tokens.iter().all(|t| ids.contains(t)), "k {top_k} p {top_p}: a token outside the cut");
    }
    // top_k 1 is the argmax.
    assert!(draw_cut(&logits[..100], &keys[..100], 0, 1.0, 1, 1.0).iter().all(|&t| t == 4999));
}

#[test]
fn a_dropout_mask_drawn_on_the_gpu_is_the_cpus() {
    use loralab::model::ops::dropout::keyed_dropout_mask;
    let shape = candle_core::Shape::from((37, 1001));
    let on = |device: &Device| {
        let like = Tensor::zeros(1, DType::BF16, device).unwrap();
        let m = keyed_dropout_mask(&shape, 0xDEAD_BEEF_1234, 0.95, &like).unwrap();
        m.to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (gpu_mask, cpu_mask) = (on(&gpu()), on(&Device::Cpu));
    assert_eq!(gpu_mask, cpu_mask);
    let dropped = cpu_mask.iter().filter(|&&v| v == 0.0).count() as f64 / cpu_mask.len() as f64;
    assert!((dropped - 0.05).abs() < 0.005, "dropped {dropped}");
    // Applied in one kernel: the product with that mask, to the bit.
    let (xg, xc) = pair(&[37, 1001], 40).unwrap();
    let dropout = loralab::model::ops::dropout::Dropout { key: 0xDEAD_BEEF_1234, keep: 0.95 };
    let fused = dropout.apply(&xg).unwrap().to_device(&Device::Cpu).unwrap();
    let mask = keyed_dropout_mask(&shape, 0xDEAD_BEEF_1234, 0.95, &xc.to_dtype(DType::BF16).unwrap()).unwrap();
    let plain = (xc.to_dtype(DType::BF16).unwrap() * mask).unwrap();
    let diff = (fused.to_dtype(DType::F32).unwrap() - plain.to_dtype(DType::F32).unwrap()).unwrap();
    assert_eq!(diff.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap(), 0.0);
    // Added in place in one kernel: the sum of the same product, to the bit.
    let (sg, sc) = pair(&[37, 1001], 41).unwrap();
    let fused = dropout.add_applied(sg.copy().unwrap(), &xg).unwrap().to_device(&Device::Cpu).unwrap();
    let plain = (sc.to_dtype(DType::BF16).unwrap() + plain).unwrap();
    let diff = (fused.to_dtype(DType::F32).unwrap() - plain.to_dtype(DType::F32).unwrap()).unwrap();
    assert_eq!(diff.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn an_accumulating_product_adds_the_product_in_place() -> Result<()> {
    use loralab::model::ops::linear::cuda::add_matmul;
    let (n, m, k) = (37, 48, 40);
    let (cg, cc) = pair(&[n, m], 21)?;
    let (ag, ac) = pair(&[n, k], 22)?;
    let (bt_g, bt_c) = pair(&[m, k], 23)?; // b as (M, K)
    let (b_g, b_c) = pair(&[k, m], 24)?; // b as (K, M)
    let c1 = cg.copy()?;
    add_matmul(&c1, &ag, &bt_g, true)?;
    let want = (&cc + ac.matmul(&bt_c.t()?)?)?;
    assert!(rel_diff(&c1, &want) < 1e-2, "c + a b^T: {}", rel_diff(&c1, &want));
    let c2 = cg.copy()?;
    add_matmul(&c2, &ag, &b_g, false)?;
    let want = (&cc + ac.matmul(&b_c)?)?;
    assert!(rel_diff(&c2, &want) < 1e-2, "c + a b: {}", rel_diff(&c2, &want));
    // A mismatched shape is an error, not a wrong answer.
    assert!(add_matmul(&cg.copy()?, &ag, &b_g, true).is_err());
    Ok(())
}

#[test]
fn a_gradient_product_is_written_then_summed_in_f32() -> Result<()> {
    use loralab::model::ops::linear::cuda::grad_product;
    let (n, m, p) = (37, 24, 40);
    let (xg, xc) = pair(&[n, m], 25)?;
    let (yg, yc) = pair(&[n, p], 26)?;
    let product = xc.t()?.matmul(&yc)?; // (M, P)
                                        // beta 0: whatever the sum held is not read (NaN here).
    let acc = Tensor::full(f32::NAN, (m, p), &gpu())?;
    grad_product(&acc, &xg, &yg, 0.5, 0.0)?;
    let want = (&product * 0.5)?;
    assert_eq!(acc.dtype(), DType::F32);
    assert!(rel_diff(&acc, &want) < 1e-5, "0.5 x^T y: {}", rel_diff(&acc, &want));
    grad_product(&acc, &xg, &yg, 2.0, 1.0)?;
    let want = (&product * 2.5)?;
    assert!(rel_diff(&acc, &want) < 1e-5, "then + 2 x^T y: {}", rel_diff(&acc, &want));
    assert!(grad_product(&acc, &yg, &xg, 1.0, 1.0).is_err());
    Ok(())
}

#[test]
fn the_heads_kernel_splits_ropes_and_joins_as_the_plain_ops_do() -> Result<()> {
    use loralab::model::ops::attention::cuda::{heads, Rope};
    let (b, t, n, e) = (2, 13, 3, 16);
    let (xg, xc) = pair(&[b, t, n * e], 31)?;
    let angles: Vec<f32> = (0..t * e / 2).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
    let ang = Tensor::from_vec(angles, (t, e / 2), &Device::Cpu)?;
    let (cos_c, sin_c) = (
        ang.cos()?.to_dtype(DType::BF16)?.to_dtype(DType::F32)?,
        ang.sin()?.to_dtype(DType::BF16)?.to_dtype(DType::F32)?,
    );
    let (cos_g, sin_g) =
        (cos_c.to_dtype(DType::BF16)?.to_device(&gpu())?, sin_c.to_dtype(DType::BF16)?.to_device(&gpu())?);
    let split = xc.reshape((b, t, n, e))?.transpose(1, 2)?.contiguous()?; // (B, n, T, E)
    let roped = candle_nn::rotary_emb::rope(&split, &cos_c, &sin_c)?;
    let got = heads(&xg, n, &cos_g, &sin_g, Rope::None, true)?;
    assert_eq!(got.dims(), &[b, n, t, e]);
    assert!(rel_diff(&got, &split) == 0.0, "split");
    let got = heads(&xg, n, &cos_g, &sin_g, Rope::Forward, true)?;
    assert!(rel_diff(&got, &roped) < 1e-2, "split and rope: {}", rel_diff(&got, &roped));
    // Back: the inverse rope undoes the rope, and the join undoes the split.
    let back = heads(&got, n, &cos_g, &sin_g, Rope::Inverse, false)?;
    assert_eq!(back.dims(), &[b, t, n * e]);
    assert!(rel_diff(&back, &xc) < 2e-2, "unrope and join: {}", rel_diff(&back, &xc));
    let joined = heads(&split.to_dtype(DType::BF16)?.to_device(&gpu())?, n, &cos_g, &sin_g, Rope::None, false)?;
    assert!(rel_diff(&joined, &xc) == 0.0, "join");
    Ok(())
}

#[test]
fn the_qkv_heads_kernel_adds_the_biases_splits_and_ropes_as_the_plain_ops_do() -> Result<()> {
    use loralab::model::ops::attention::cuda::qkv_heads;
    // 4 query heads and 2 kv heads of 16, rows of 3 tokens at position 5 of the tables.
    let (b, t, h, kh, e, pos) = (2, 3, 4, 2, 16, 5);
    let width = (h + 2 * kh) * e;
    let (yg, yc) = pair(&[b * t, width], 44)?;
    let (bias_g, bias_c) = pair(&[width], 45)?;
    let angles: Vec<f32> = (0..(pos + t) * e / 2).map(|i| (i as f32 * 0.29).sin() * 3.0).collect();
    let ang = Tensor::from_vec(angles, (pos + t, e / 2), &Device::Cpu)?.narrow(0, pos, t)?;
    let round = |x: Tensor| x.to_dtype(DType::BF16)?.to_dtype(DType::F32);
    let (cos_c, sin_c) = (round(ang.cos()?)?, round(ang.sin()?)?);
    let (cos_g, sin_g) =
        (cos_c.to_dtype(DType::BF16)?.to_device(&gpu())?, sin_c.to_dtype(DType::BF16)?.to_device(&gpu())?);
    for biased in [true, false] {
        let bias = biased.then_some(&bias_g);
        let (q, k, v) = qkv_heads(&yg, bias, &cos_g, &sin_g, (b, t, h, kh))?;
        let y = if biased { round(yc.broadcast_add(&bias_c)?)? } else { yc.clone() };
        let heads = |from: usize, n: usize| -> Result<Tensor> {
            y.narrow(1, from * e, n * e)?.reshape((b, t, n, e))?.transpose(1, 2)?.contiguous()
        };
        let (want_q, want_k) = (
            candle_nn::rotary_emb::rope(&heads(0, h)?, &cos_c, &sin_c)?,
            candle_nn::rotary_emb::rope(&heads(h, kh)?, &cos_c, &sin_c)?,
        );
        assert_eq!(q.dims(), &[b, h, t, e]);
        assert_eq!(k.dims(), &[b, kh, t, e]);
        assert!(rel_diff(&q, &want_q) < 1e-2, "q (bias {biased}): {}", rel_diff(&q, &want_q));
        assert!(rel_diff(&k, &want_k) < 1e-2, "k (bias {biased}): {}", rel_diff(&k, &want_k));
        assert_eq!(rel_diff(&v, &heads(h + kh, kh)?), 0.0, "v (bias {biased})");
    }
    Ok(())
}

#[test]
fn row_dot_on_the_gpu_is_the_rowwise_sum_of_products() -> Result<()> {
    let (ag, ac) = pair(&[3, 5, 130], 41)?;
    let (bg, bc) = pair(&[3, 5, 130], 42)?;
    let got = loralab::model::ops::attention::cuda::row_dot(&ag, &bg)?;
    let want = (ac * bc)?.sum(2)?.flatten_all()?;
    assert!(rel_diff(&got, &want) < 1e-5, "row dot: {}", rel_diff(&got, &want));
    Ok(())
}

#[test]
fn the_augment_kernel_puts_a_ones_column_and_zeros_beside_z_read_in_place_from_a_view() -> Result<()> {
    let (zg, zc) = pair(&[37, 20], 43)?;
    // The first 12 columns of each row: a view whose rows are 20 elements apart, read in place.
    let got = loralab::model::ops::linear::cuda::augment(&zg.narrow(1, 2, 12)?, 16)?;
    let z = zc.narrow(1, 2, 12)?;
    let want = Tensor::cat(
        &[z, Tensor::ones((37, 1), DType::F32, &Device::Cpu)?, Tensor::zeros((37, 3), DType::F32, &Device::Cpu)?],
        1,
    )?;
    assert_eq!(got.dims(), &[37, 16]);
    assert_eq!(rel_diff(&got, &want), 0.0);
    assert!(loralab::model::ops::linear::cuda::augment(&zg, 20).is_err(), "no room for the ones column");
    Ok(())
}

#[test]
fn the_sum_of_squares_of_many_tensors_is_summed_once_and_the_same_every_time() -> Result<()> {
    let shapes: [&[usize]; 3] = [&[18944, 32], &[7], &[32, 3584]];
    let (mut gpu_xs, mut total) = (Vec::new(), 0f64);
    for (i, shape) in shapes.iter().enumerate() {
        let (_, xc) = pair(shape, 50 + i as u64)?;
        total += xc.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
        gpu_xs.push(xc.to_device(&gpu())?);
    }
    let got = loralab::model::ops::optimizer::cuda::sum_squares(&gpu_xs)?.to_scalar::<f64>()?;
    assert!((got - total).abs() < 1e-5 * total, "{got} vs {total}");
    let again = loralab::model::ops::optimizer::cuda::sum_squares(&gpu_xs)?.to_scalar::<f64>()?;
    assert_eq!(got.to_bits(), again.to_bits());
    let bf16 = gpu_xs[1].to_dtype(DType::BF16)?;
    let err = loralab::model::ops::optimizer::cuda::sum_squares(&[bf16]).unwrap_err().to_string();
    assert!(err.contains("sum-squares") && err.contains("f32"), "{err}");
    Ok(())
}

#[test]
fn gathered_rows_on_the_gpu_and_their_gradient_are_the_cpus() -> Result<()> {
    let (xg, xc) = pair(&[9, 24], 45)?;
    let (wg, wc) = pair(&[4, 24], 46)?;
    let rows = [5u32, 0, 8, 3];
    let grad_of = |x: &Tensor, w: &Tensor| -> Result<(Tensor, Tensor)> {
        let x = Var::from_tensor(x)?;
        let y = ops::gather_rows(x.as_tensor(), &rows)?;
        let g = (y.to_dtype(DType::F32)? * w.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
        Ok((y, g.get(x.as_tensor()).unwrap().clone()))
    };
    let (yg, gg) = grad_of(&xg, &wg)?;
    let (yc, gc) = grad_of(&xc, &wc)?;
    assert_eq!(rel_diff(&yg, &yc), 0.0);
    assert_eq!(rel_diff(&gg, &gc), 0.0, "rows not picked get zeros, the others w's rows");
    // Rows whose width is not a multiple of 8 are not the kernel's (the plain ops take them).
    let (narrow, _) = pair(&[9, 12], 47)?;
    assert!(!loralab::model::ops::gather::cuda::take_rows_fits(&narrow));
    let idx = Tensor::new(&rows[..], &gpu())?;
    assert!(loralab::model::ops::gather::cuda::take_rows(&narrow, &idx).unwrap_err().to_string().contains("take-rows"));
    Ok(())
}

#[test]
fn scaling_by_a_scalar_on_the_gpu_multiplies_every_element() -> Result<()> {
    for n in [4096 * 8, 1001] {
        let (xg, xc) = pair(&[n], 44)?;
        let s = Tensor::new(0.37f32, &gpu())?;
        let got = loralab::model::ops::loss::cuda::scale_by(&xg, &s)?;
        let want = (xc * 0.37)?;
        assert!(rel_diff(&got, &want) < 1e-2, "n {n}: {}", rel_diff(&got, &want));
    }
    Ok(())
}

#[test]
fn self_attention_on_the_gpu_matches_the_plain_one_with_its_gradients() -> Result<()> {
    // Head size 16: heads split by the heads kernel; 64 and 128: the flash kernels on the
    // projections' layout, roping q themselves (one tile, and several with a partial last one).
    for (t, e) in [(21, 16), (21, 64), (70, 128), (130, 64)] {
        self_attention_case(t, e)?;
    }
    Ok(())
}

fn self_attention_case(t: usize, e: usize) -> Result<()> {
    let (b, h, kv) = (2, 6, 2);
    let (qg, qc) = pair(&[b, t, h * e], 51)?;
    let (kg, kc) = pair(&[b, t, kv * e], 52)?;
    let (vg, vc) = pair(&[b, t, kv * e], 53)?;
    let (wg, wc) = pair(&[b, t, h * e], 54)?;
    let angles: Vec<f32> = (0..t * e / 2).map(|i| (i as f32 * 0.29).cos() * 2.0).collect();
    let ang = Tensor::from_vec(angles, (t, e / 2), &Device::Cpu)?;
    let (cos_c, sin_c) = (
        ang.cos()?.to_dtype(DType::BF16)?.to_dtype(DType::F32)?,
        ang.sin()?.to_dtype(DType::BF16)?.to_dtype(DType::F32)?,
    );
    let causal: Vec<f32> =
        (0..t).flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
    let mask_c = Tensor::from_vec(causal, (1, 1, 1, t, t), &Device::Cpu)?;
    let run = |q: &Tensor, k: &Tensor, v: &Tensor, w: &Tensor, dev: &Device, dtype: DType| -> Result<Vec<Tensor>> {
        let (q, k, v) = (Var::from_tensor(q)?, Var::from_tensor(k)?, Var::from_tensor(v)?);
        let (cos, sin) = (cos_c.to_dtype(dtype)?.to_device(dev)?, sin_c.to_dtype(dtype)?.to_device(dev)?);
        let mask = mask_c.to_device(dev)?;
        let attention = ops::SelfAttention::new(&cos, &sin, Some(&mask), true, 0.25, None, h, kv);
        let out = attention.op(q.as_tensor(), k.as_tensor(), v.as_tensor())?;
        let grads = (out.to_dtype(DType::F32)? * w.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
        Ok(vec![
            out,
            grads.get(q.as_tensor()).unwrap().clone(),
            grads.get(k.as_tensor()).unwrap().clone(),
            grads.get(v.as_tensor()).unwrap().clone(),
        ])
    };
    let fused = run(&qg, &kg, &vg, &wg, &gpu(), DType::BF16)?;
    let plain = run(&qc, &kc, &vc, &wc, &Device::Cpu, DType::F32)?;
    for (name, (f, p)) in ["out", "dq", "dk", "dv"].iter().zip(fused.iter().zip(&plain)) {
        assert!(rel_diff(f, p) < 3e-2, "{name} (T {t}, E {e}): {}", rel_diff(f, p));
    }
    Ok(())
}

#[test]
fn the_adamw_kernel_takes_pytorchs_step_for_every_variable_in_place() -> Result<()> {
    use loralab::model::ops::optimizer::{cuda::adamw_many, AdamStep};
    let (_, p) = pair(&[6, 50], 61)?;
    let (_, m) = pair(&[6, 50], 62)?;
    let (_, v) = pair(&[6, 50], 63)?;
    let v = v.abs()?;
    let (_, g) = pair(&[6, 50], 64)?;
    let h = AdamStep {
        clip: 0.5,
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        bias_correction1: 1.0 - 0.9f64.powi(3),
        bias_correction2: 1.0 - 0.999f64.powi(3),
    };
    let on_gpu = |t: &Tensor| t.to_device(&gpu());
    let mv_new = Tensor::stack(&[on_gpu(&m)?, on_gpu(&v)?], 0)?;
    let p_new = on_gpu(&p)?;
    // A second variable in the same launch, left unchanged by a zero rate and gradient.
    let (q, q_moments, q_grad) = (on_gpu(&m)?, Tensor::zeros((2, 6, 50), DType::F32, &gpu())?, on_gpu(&(&g * 0.0)?)?);
    adamw_many(&[&p_new, &q], &[&mv_new, &q_moments], &[&on_gpu(&g)?, &q_grad], &h)?;
    // torch.optim.AdamW's single-tensor step, written out.
    let g = (g * h.clip)?;
    let m_want = ((&m * h.beta1)? + (&g * (1.0 - h.beta1))?)?;
    let v_want = ((&v * h.beta2)? + (g.sqr()? * (1.0 - h.beta2))?)?;
    let denom = ((v_want.sqrt()? / h.bias_correction2.sqrt())? + h.eps)?;
    let p_want = ((&p * (1.0 - h.lr * h.weight_decay))? - ((&m_want / denom)? * (h.lr / h.bias_correction1))?)?;
    assert!(rel_diff(&p_new, &p_want) < 1e-6, "value: {}", rel_diff(&p_new, &p_want));
    assert!(rel_diff(&mv_new.get(0)?, &m_want) < 1e-6, "m");
    assert!(rel_diff(&mv_new.get(1)?, &v_want) < 1e-6, "v");
    assert_eq!(mv_new.dims(), &[2, 6, 50]);
    // Lists of different lengths, or a moment of the wrong size: errors naming the op.
    let short = adamw_many(&[&p_new], &[], &[&q_grad], &h).unwrap_err().to_string();
    assert!(short.contains("adamw"), "{short}");
    assert!(adamw_many(&[&p_new], &[&q], &[&q_grad], &h).is_err(), "moments (6, 50) for a (6, 50) value");
    // q: decayed by lr * weight decay only.
    let q_want = (&m * (1.0 - h.lr * h.weight_decay))?;
    assert!(rel_diff(&q, &q_want) < 1e-6, "second variable: {}", rel_diff(&q, &q_want));
    Ok(())
}

#[test]
fn training_on_the_gpu_takes_the_cpus_steps() {
    // f32 on the GPU runs the trainer's GPU paths (one AdamW launch for all variables in place,
    // the gradient norm's kernel) around the layer op's plain products; f64 on the CPU is the
    // reference. No dropout: q/k/v and gate/up share their stacked A's.
    let run = |dtype: DType, device: Device| {
        let dec = common::tiny_on(dtype, device);
        let adapter = Adapter::new(&dec, common::all_targets(4, 0.0), 13).unwrap();
        let config = TrainConfig { shuffle: true, max_steps: Some(3), learning_rate: 2e-2, ..common::fixture_config() };
        let log = train::train(&dec, &adapter, &common::fixture_rows(), &config, |_| Ok(())).unwrap();
        (log, adapter)
    };
    let (gpu_log, on_gpu) = run(DType::F32, gpu());
    let (cpu_log, on_cpu) = run(DType::F64, Device::Cpu);
    for (a, b) in cpu_log.iter().zip(&gpu_log) {
        assert!((a.loss - b.loss).abs() < 1e-4 * a.loss, "step {}: loss {} vs {}", a.step, a.loss, b.loss);
        assert!((a.grad_norm - b.grad_norm).abs() < 1e-3 * a.grad_norm, "step {}: grad norm", a.step);
    }
    for (key, p) in &on_cpu.pairs {
        let q = on_gpu.pairs.get(key).unwrap();
        for (a, b) in [(&p.a, &q.a), (&p.b, &q.b)] {
            let d = common::max_abs_diff(a.as_tensor(), &b.as_tensor().to_device(&Device::Cpu).unwrap());
            assert!(d < 1e-3, "{key:?}: differs by {d}");
        }
    }
}

/// A fixture folder, from the repository root (the GPU machine's copy) or this crate's folder.
fn fixture(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new("tests/fixtures").join(name);
    if dir.exists() {
        dir
    } else {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir)
    }
}

#[test]
fn every_family_on_the_gpu_gives_the_logits_and_the_four_peft_steps_of_transformers() {
    for name in ["tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-gemma2"] {
        // In f32 on the GPU (the tiny-lora fixture is qwen2's).
        let lora = if name == "tiny-qwen2" { "tiny-lora".to_string() } else { format!("{name}-lora") };
        matches_transformers(name, &lora, DType::F32, 1e-4, 1e-3);
    }
}

/// Gemma 2 in bf16 on the GPU (its capped attention, GeGLU and output norms in the layer op's
/// bf16 paths): logits and the four PEFT steps' losses as transformers' f32 ones, to bf16's
/// precision.
#[test]
fn gemma2_in_bf16_on_the_gpu_gives_the_logits_and_losses_of_transformers() {
    matches_transformers("tiny-gemma2", "tiny-gemma2-lora", DType::BF16, 3e-2, 2e-2);
}

/// The fixture model `name` on the GPU in `dtype`: its logits of the first logits case within
/// `logits_tol` (relative), then the four Trainer steps of `lora` with each loss within `loss_rtol`.
fn matches_transformers(name: &str, lora: &str, dtype: DType, logits_tol: f32, loss_rtol: f64) {
    use loralab::model::{load::read_decoder, LoadOptions};
    let read = |path: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let dec = read_decoder(&fixture(name), &LoadOptions { dtype, device: gpu() }).unwrap();
    let fx = read(fixture(&format!("{name}-logits.json")));
    let case = &fx["cases"][0];
    let rows: Vec<Vec<u32>> = serde_json::from_value(case["input_ids"].clone()).unwrap();
    let ids = Tensor::from_vec(rows.concat(), (rows.len(), rows[0].len()), &gpu()).unwrap();
    let got = dec.forward(&ids, None).unwrap().flatten_all().unwrap().to_device(&Device::Cpu).unwrap();
    let want: Vec<f32> = case["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().flat_map(|p| p.as_array().unwrap().iter()))
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let want = Tensor::from_vec(want, got.shape(), &Device::Cpu).unwrap();
    let d = rel_diff(&got, &want);
    assert!(d < logits_tol, "{name} {dtype:?}: logits differ by {d} (relative)");

    let adapter = Adapter::load(&fixture(lora).join("initial"), &dec).unwrap();
    let rows = common::rows_of(&read(fixture(lora).join("rows.json")));
    let log = train::train(&dec, &adapter, &rows, &common::fixture_config(), |_| Ok(())).unwrap();
    let steps = read(fixture(lora).join("steps.json"));
    for (got, w) in log.iter().zip(steps["steps"].as_array().unwrap()) {
        let loss = w["loss"].as_f64().unwrap();
        assert!(
            (got.loss - loss).abs() / loss < loss_rtol,
            "{name} {dtype:?} step {}: loss {} vs {loss}",
            got.step,
            got.loss
        );
    }
}

#[test]
fn logprobs_on_the_gpu_in_bf16_are_those_of_the_cpu_in_f32() {
    use loralab::logprobs::{logprobs, LogprobOptions, Sequence};
    use loralab::model::{load::read_decoder, LoadOptions, Model};
    let text = std::fs::read_to_string(fixture("tiny-qwen3/config.json")).unwrap();
    let config: loralab::model::Config = serde_json::from_str(&text).unwrap();
    let placeholder = loralab::model::load::random(
        config,
        &LoadOptions { dtype: DType::F32, device: Device::Cpu },
        "t".into(),
        Some(1),
    )
    .unwrap()
    .tokenizer;
    let model = |dtype, device: Device| {
        let dec = read_decoder(&fixture("tiny-qwen3"), &LoadOptions { dtype, device }).unwrap();
        Model::new("tiny-qwen3".into(), dec, placeholder.clone())
    };
    let seqs = vec![
        Sequence { prompt: vec![3, 7, 11], continuation: vec![5, 9, 2, 40] },
        Sequence { prompt: vec![1], continuation: vec![8, 8] },
    ];
    let opts = LogprobOptions { batch_size: 2, top_k: 3 };
    let cpu = logprobs(&model(DType::F32, Device::Cpu), None, &seqs, &opts).unwrap();
    let gpu_scores = logprobs(&model(DType::BF16, gpu()), None, &seqs, &opts).unwrap();
    for (c, g) in cpu.iter().zip(&gpu_scores) {
        for (a, b) in c.logprobs.iter().zip(&g.logprobs) {
            assert!((a - b).abs() < 0.05 * a.abs().max(1.0), "cpu {a} vs gpu {b}");
        }
    }
}

#[test]
fn groups_of_other_lengths_decoding_in_one_step_on_the_gpu_give_the_logits_of_each_alone() {
    use loralab::model::{load::read_decoder, LoadOptions};
    let dec = read_decoder(&fixture("tiny-qwen2"), &LoadOptions { dtype: DType::BF16, device: gpu() }).unwrap();
    let together = common::logits_of_two_groups(&dec, &gpu(), true);
    let apart = common::logits_of_two_groups(&dec, &gpu(), false);
    for (step, (a, b)) in together.iter().zip(&apart).enumerate() {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        // The products' roundings may depend on their number of rows; bf16's tolerance.
        assert!(diff <= 2e-2 * scale, "step {step}: {diff} against {scale}");
    }
}

/// A random model of a tiny fixture's family (`tiny-qwen2`: q/k/v biases; `tiny-qwen3`: q/k
/// norms) on the GPU in bf16, with heads the slot kernels take: size 64, two query heads per kv
/// head.
fn slot_model_of(family: &str) -> loralab::model::Model {
    use loralab::model::LoadOptions;
    let text = std::fs::read_to_string(fixture(&format!("{family}/config.json"))).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["hidden_size"] = 256.into();
    config["intermediate_size"] = 512.into();
    if config.get("head_dim").is_some() {
        config["head_dim"] = 64.into();
    }
    if family == "tiny-mistral" {
        // A window of 4 positions on every layer, which the test's prompts and steps pass.
        config["sliding_window"] = 4.into();
        config.as_object_mut().unwrap().remove("layer_types");
    }
    let config: loralab::model::Config = serde_json::from_value(config).unwrap();
    let opts = LoadOptions { dtype: DType::BF16, device: gpu() };
    loralab::model::load::random(config, &opts, "slots".into(), Some(3)).unwrap()
}

fn slot_model() -> loralab::model::Model {
    slot_model_of("tiny-qwen2")
}

#[test]
fn decoding_from_slots_gives_each_row_the_logits_of_its_group() {
    slots_against_groups("tiny-qwen2");
}

#[test]
fn decoding_from_slots_norms_qwen3s_queries_and_keys_as_its_groups_do() {
    slots_against_groups("tiny-qwen3");
}

#[test]
fn decoding_from_slots_keeps_to_mistrals_sliding_window_as_its_groups_do() {
    let model = slot_model_of("tiny-mistral");
    assert!(model.decoder.layers.iter().all(|l| l.window == Some(4)));
    slots_against_groups("tiny-mistral");
}

fn slots_against_groups(family: &str) {
    let (model, dev) = (slot_model_of(family), gpu());
    let reference = common::logits_of_two_groups(&model.decoder, &dev, false);
    let vocab = model.config().vocab_size;
    for (step, (got, expected)) in slot_logits(&model, false).iter().zip(&reference).enumerate() {
        let got = &got[..4 * vocab]; // the groups' own rows
        let scale = expected.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = got.iter().zip(expected).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        // The slot holds no padding: the attention sums the same terms in another order.
        assert!(diff <= 2e-2 * scale, "step {step}: {diff} against {scale}");
    }
}

/// Four decoding steps from one slot cache of the rows of `common::two_prefilled_groups`, in
/// scattered slots, and of two more rows that continue the prompts of rows 1 and 4 with the same
/// tokens: per step, the six rows' logits. The prompts' keys and values lie in the rows' slots,
/// or (`stored`) once per prompt in the cache's prompt store.
fn slot_logits(model: &loralab::model::Model, stored: bool) -> Vec<Vec<f32>> {
    use loralab::model::{Pass, SlotCache};
    let (dec, dev) = (&model.decoder, gpu());
    assert!(dec.slots_apply(Pass::infer(None)));
    let groups = common::two_prefilled_groups(dec, &dev);
    let prompt_slots = if stored { 4 } else { 0 };
    let cache = SlotCache::new(&dec.config, (6, 12), (prompt_slots, 5), dec.dtype, &dev).unwrap();
    // (group, row in it, slot, prompt slot); the last two rows continue rows 1 and 4's prompts.
    let rows: [(usize, usize, u32, u32); 6] =
        [(0, 0, 4, 3), (0, 1, 1, 0), (1, 0, 0, 2), (1, 1, 5, 1), (0, 0, 2, 3), (1, 1, 3, 1)];
    for (g, (prefilled, _, pads)) in groups.iter().enumerate() {
        // Each row's slot, or each prompt's once.
        let mut fill: Vec<[u32; 3]> = Vec::new();
        for &(_, r, slot, prompt_slot) in rows.iter().filter(|row| row.0 == g) {
            let entry = [r as u32, if stored { prompt_slot } else { slot }, pads[r] as u32];
            if !fill.contains(&entry) {
                fill.push(entry);
            }
        }
        let fill = Tensor::from_vec(fill.concat(), (fill.len(), 3), &dev).unwrap();
        cache.fill(prefilled, &fill).unwrap();
    }
    let mut out = Vec::new();
    for step in 0..4usize {
        let (mut ids, mut at) = (Vec::new(), Vec::new());
        for &(g, r, slot, prompt_slot) in &rows {
            let (_, l, pads) = &groups[g];
            let prompt = l - pads[r];
            ids.push((5 * g + 3 * r + 7 * step + 1) as u32 % 50);
            let (prompt_slot, prompt_len) = if stored { (prompt_slot, prompt) } else { (slot, 0) };
            at.extend([slot, (prompt + step) as u32, (l + step) as u32, prompt_slot, prompt_len as u32]);
        }
        let ids = Tensor::from_vec(ids, (6, 1), &dev).unwrap();
        let at = Tensor::from_vec(at, (6, 5), &dev).unwrap();
        let h = dec.decode_slots(&ids, &cache, &at, Pass::infer(None)).unwrap();
        out.push(dec.logits(&h).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    out
}

#[test]
fn rows_reading_their_prompts_from_the_prompt_store_get_the_logits_of_slots_holding_them() {
    for family in ["tiny-qwen2", "tiny-mistral"] {
        let model = slot_model_of(family);
        let vocab = model.config().vocab_size;
        let (apart, held) = (slot_logits(&model, true), slot_logits(&model, false));
        for (step, (a, h)) in apart.iter().zip(&held).enumerate() {
            // The same keys and values in the same order: the same sums, to the bit.
            assert!(a == h, "{family}, step {step}: the logits differ");
            // Two rows continuing one prompt with the same tokens, each reading its one copy.
            for (row, twin) in [(0, 4), (3, 5)] {
                assert!(
                    a[row * vocab..(row + 1) * vocab] == a[twin * vocab..(twin + 1) * vocab],
                    "{family}, step {step}"
                );
            }
        }
    }
}

#[test]
fn continuous_batching_fills_freed_slots_and_draws_every_completion() {
    use loralab::sample::{sample, SampleOptions};
    let model = slot_model();
    let prompts: Vec<Vec<u32>> =
        (0..12).map(|i| (0..(3 + i % 5)).map(|t| (7 * i + 3 * t + 1) as u32 % 120).collect()).collect();
    // Ten of the 128 tokens end a completion: lengths vary from 1 to max_tokens.
    let opts = |continuous_batching| SampleOptions {
        n: 2,
        max_tokens: 40,
        batch_size: 8,
        group_size: 1,
        seed: 5,
        stop_token_ids: (0..10).map(|i| 12 * i + 5).collect(),
        continuous_batching,
        ..Default::default()
    };
    let (slotted, s_stats) = sample(&model, None, &prompts, &opts(true)).unwrap();
    let (grouped, g_stats) = sample(&model, None, &prompts, &opts(false)).unwrap();
    for results in [&slotted, &grouped] {
        assert_eq!(results.len(), 12);
        assert!(results.iter().all(|r| r.len() == 2 && r.iter().all(|c| c.token_ids.len() <= 40)));
    }
    let lengths: Vec<usize> = slotted.iter().flatten().map(|c| c.token_ids.len()).collect();
    assert!(lengths.iter().min() < lengths.iter().max(), "lengths vary: {lengths:?}");
    assert!(s_stats.peak_rows <= 8 && g_stats.peak_rows <= 8);
    assert_eq!(s_stats.generated_tokens, lengths.iter().sum::<usize>());
    // Groups of one prompt join the batch of slots as soon as two rows are free.
    assert!(s_stats.decode_steps <= g_stats.decode_steps, "{} against {}", s_stats.decode_steps, g_stats.decode_steps);
    // Greedy completions from slots are mostly the groups' (bf16 roundings may turn a near tie).
    let greedy = |c| SampleOptions { temperature: 0.0, ..opts(c) };
    let (a, _) = sample(&model, None, &prompts, &greedy(true)).unwrap();
    let (b, _) = sample(&model, None, &prompts, &greedy(false)).unwrap();
    let same = a.iter().flatten().zip(b.iter().flatten()).filter(|(x, y)| x.token_ids == y.token_ids).count();
    assert!(same >= 18, "{same} of 24 greedy completions equal");
}

#[test]
fn a_batch_larger_than_the_gpus_free_memory_samples_the_rows_that_fit_with_the_same_draws() {
    use loralab::sample::{sample, SampleOptions};
    let (model, dev) = (slot_model(), gpu());
    let prompts: Vec<Vec<u32>> =
        (0..64).map(|i| (0..(3 + i % 4)).map(|t| (5 * i + t + 1) as u32 % 120).collect()).collect();
    let opts = |batch_size| SampleOptions {
        n: 4,
        max_tokens: 200,
        batch_size,
        group_size: 1,
        seed: 9,
        stop_token_ids: (0..10).map(|i| 12 * i + 5).collect(),
        ..Default::default()
    };
    // Hold all but a gibibyte and 24 MiB of the GPU's memory: the 256 rows' caches of 200
    // positions (about 48 MiB; the prompts are stored apart) no longer fit beside the gibibyte
    // held back.
    let Device::Cuda(cuda) = &dev else { unreachable!() };
    let (free, _) = loralab::model::cuda::memory(cuda).unwrap();
    let hog = Tensor::zeros(free - (1 << 30) - (24 << 20), DType::U8, &dev).unwrap();
    let (fitted, stats) = sample(&model, None, &prompts, &opts(256)).unwrap();
    drop(hog);
    assert!(stats.batch_size >= 4 && stats.batch_size < 256, "{} rows at once", stats.batch_size);
    assert!(stats.peak_rows <= stats.batch_size);
    assert_eq!(fitted.iter().map(Vec::len).sum::<usize>(), 256);
    // As many rows at once, asked for: the same completions.
    let (asked, again) = sample(&model, None, &prompts, &opts(stats.batch_size)).unwrap();
    assert_eq!(again.batch_size, stats.batch_size);
    let tokens = |r: &Vec<Vec<loralab::sample::Completion>>| -> Vec<Vec<u32>> {
        r.iter().flatten().map(|c| c.token_ids.clone()).collect()
    };
    assert_eq!(tokens(&fitted), tokens(&asked));
}
