//! The fused GPU kernels against the CPU's plain ops (built with `--features cuda`, run on a
//! machine with a GPU: `cargo test --release --features cuda --test cuda`). Each value is
//! computed in bf16 on the GPU and in f32 on the CPU from the same bf16-rounded inputs; the
//! tolerances are bf16's (8 bits of mantissa).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Result, Tensor, Var};
use loralab::model::ops;

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

/// The same random values as a bf16 GPU tensor and an f32 CPU tensor.
fn pair(shape: &[usize], seed: u64) -> Result<(Tensor, Tensor)> {
    // xorshift: values in [-2, 2)
    let mut s = (seed as u32).wrapping_mul(2654435761).wrapping_add(1);
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 4.0 - 2.0
        })
        .collect();
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
    let (b, k, g, t, e) = (2, 2, 3, 37, 16);
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
        let out = ops::attention(q.as_tensor(), kk.as_tensor(), v.as_tensor(), Some(mask), true, 0.25, g)?;
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
        assert!(d < 2e-2, "{name}: relative difference {d}");
    }
    Ok(())
}

#[test]
fn fused_cross_entropy_matches_the_plain_one_with_its_gradient() -> Result<()> {
    // The fused path rounds the logits to bf16 (as transformers does under bf16 autocast): the
    // reference rounds them too, then computes in f32.
    let (n, dim, vocab) = (50, 64, 1000);
    let (hg, hc) = pair(&[n, dim], 5)?;
    let (wg, wc) = pair(&[vocab, dim], 6)?;
    let targets: Vec<u32> = (0..n as u32).map(|i| (i * 37) % vocab as u32).collect();
    let h = Var::from_tensor(&hg)?;
    let loss = ops::linear_cross_entropy(h.as_tensor(), &wg, None, &targets, 16)?;
    let grads = (&loss * 0.5)?.backward()?;
    let fused_loss = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    let fused_grad = grads.get(h.as_tensor()).unwrap().clone();

    let logits = hc.matmul(&wc.t()?)?.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
    let logp = candle_nn::ops::log_softmax(&logits, 1)?;
    let picked = logp.gather(&Tensor::from_slice(&targets, (n, 1), &Device::Cpu)?, 1)?;
    let plain_loss = picked.neg()?.sum_all()?.to_scalar::<f32>()?;
    let onehot = Tensor::zeros((n, vocab), DType::F32, &Device::Cpu)?.scatter_add(
        &Tensor::from_slice(&targets, (n, 1), &Device::Cpu)?,
        &Tensor::ones((n, 1), DType::F32, &Device::Cpu)?,
        1,
    )?;
    let plain_grad = ((logp.exp()? - onehot)?.matmul(&wc)? * 0.5)?;
    assert!((fused_loss - plain_loss).abs() / plain_loss < 1e-3, "loss {fused_loss} vs {plain_loss}");
    let d = rel_diff(&fused_grad, &plain_grad);
    assert!(d < 2e-2, "gradient: relative difference {d}");
    Ok(())
}

#[test]
fn fused_silu_mul_matches_the_plain_one_with_its_gradients() -> Result<()> {
    let (gg, gc) = pair(&[3, 5, 300], 7)?;
    let (ug, uc) = pair(&[3, 5, 300], 8)?;
    let (wg, wc) = pair(&[3, 5, 300], 9)?;
    let run = |g: &Tensor, u: &Tensor, w: &Tensor| -> Result<Vec<Tensor>> {
        let (g, u) = (Var::from_tensor(g)?, Var::from_tensor(u)?);
        let h = ops::silu_mul(g.as_tensor(), u.as_tensor())?;
        let grads = (h.to_dtype(DType::F32)? * w.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
        Ok(vec![h, grads.get(g.as_tensor()).unwrap().clone(), grads.get(u.as_tensor()).unwrap().clone()])
    };
    let fused = run(&gg, &ug, &wg)?;
    let plain = run(&gc, &uc, &wc)?;
    for (name, (a, b)) in ["h", "dgate", "dup"].iter().zip(fused.iter().zip(&plain)) {
        let d = rel_diff(a, b);
        assert!(d < 2e-2, "{name}: relative difference {d}");
    }
    Ok(())
}

#[test]
fn decoding_attention_from_the_cache_matches_the_cpu_kernel() -> Result<()> {
    // B 3, K 2, 7 query heads per kv head, E 128; a cache of capacity 40 holding 33 positions.
    for &(r, e) in &[(7, 128), (3, 64)] {
        let (b, k, c, s) = (3, 2, 40, 33);
        let (qg, qc) = pair(&[b, k, r, e], 10)?;
        let (kg, kc) = pair(&[b, k, c, e], 11)?;
        let (vg, vc) = pair(&[b, k, c, e], 12)?;
        // Row 0 is left-padded by 5 positions.
        let mask: Vec<f32> =
            (0..b * s).map(|i| if i / s == 0 && i % s < 5 { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mask_c = Tensor::from_vec(mask, (b, 1, 1, 1, s), &Device::Cpu)?;
        let mask_g = mask_c.to_device(&gpu())?;
        let scale = 1.0 / (e as f64).sqrt();
        let fused = loralab::model::cuda::decode_attention(&qg, &kg, &vg, s, Some(&mask_g), scale)?;
        let plain = loralab::model::cpu::attention_cpu(&qc, &kc, &vc, s, Some(&mask_c), scale)?;
        let d = rel_diff(&fused, &plain);
        assert!(d < 2e-2, "r {r}, e {e}: relative difference {d}");
    }
    Ok(())
}
