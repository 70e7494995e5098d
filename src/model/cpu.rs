//! Inference and training kernels on the CPU in f32: products with weights packed once
//! ([`super::packed`]), differentiable for frozen projections, and attention read straight from
//! the KV cache.

use std::cell::Cell;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

use super::ops::{attach, Backward};
use super::packed::PackedMatrix;

thread_local! {
    /// Whether this thread is running a task of [`on_pool`]: a nested call then runs inline.
    static IN_POOL_TASK: Cell<bool> = const { Cell::new(false) };
}

/// f over chunks of the items 0..n on candle's CPU thread pool; inline where the caller is
/// itself one of the pool's tasks (the pool's lock is held while its tasks run, so a nested
/// call from the calling thread would wait on itself forever).
///
/// Work between candle ops runs here rather than on rayon's pool: candle's threads spin for a
/// while after each op, and beside them rayon's threads would fight them for the cores.
pub(crate) fn on_pool(n: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    if IN_POOL_TASK.get() {
        f(0..n);
        return;
    }
    let pool = candle_core::utils::barrier_pool();
    // Few, large items (a product's panels) are handed out one at a time, so that no thread
    // waits at the end for another's last grab of several; many small ones in grabs of an
    // eighth of a thread's share, as the pool's own chunking does.
    let threads = candle_core::utils::get_num_threads().max(1);
    let grab = if n <= 64 * threads { 1 } else { n.div_ceil(threads * 8) };
    let cursor = std::sync::atomic::AtomicUsize::new(0);
    pool.execute(|_| {
        let _task = PoolTask::enter();
        loop {
            let start = cursor.fetch_add(grab, std::sync::atomic::Ordering::Relaxed);
            if start >= n {
                break;
            }
            f(start..n.min(start + grab));
        }
    });
}

/// Marks this thread as running a pool task until dropped (a panicking task included).
struct PoolTask(bool);

impl PoolTask {
    fn enter() -> Self {
        PoolTask(IN_POOL_TASK.replace(true))
    }
}

impl Drop for PoolTask {
    fn drop(&mut self) {
        IN_POOL_TASK.set(self.0);
    }
}

/// f(0), .., f(n - 1) on candle's CPU thread pool ([`on_pool`]), in order.
pub(crate) fn map_on_pool<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let slots: Vec<Mutex<Option<T>>> = (0..n).map(|_| Mutex::new(None)).collect();
    on_pool(n, |items| {
        for i in items {
            let value = f(i);
            *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
        }
    });
    slots.into_iter().map(|s| s.into_inner().unwrap_or_else(|e| e.into_inner()).expect("every item ran")).collect()
}

/// f(i, part i) for each of `parts` on candle's thread pool ([`map_on_pool`]); the results in
/// order. Each part goes to one task alone: its lock only lends the part's `&mut` to the pool.
pub(crate) fn parts_on_pool<P: Send, R: Send>(parts: Vec<P>, f: impl Fn(usize, &mut P) -> R + Sync) -> Vec<R> {
    let parts: Vec<Mutex<P>> = parts.into_iter().map(Mutex::new).collect();
    map_on_pool(parts.len(), |i| {
        let mut part = parts[i].lock().unwrap_or_else(|e| e.into_inner());
        f(i, &mut part)
    })
}

/// f(first index, chunk) for consecutive chunks of `out` of `chunk` elements, on candle's thread
/// pool ([`parts_on_pool`]); the results in order.
pub(crate) fn chunks_on_pool<T: Send, R: Send>(
    out: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) -> R + Sync,
) -> Vec<R> {
    let chunk = chunk.max(1);
    parts_on_pool(out.chunks_mut(chunk).collect(), |c, part| f(c * chunk, part))
}

/// A new vector of `n` floats, filled by f(first index, chunk) over chunks of `chunk` floats on
/// the pool ([`chunks_on_pool`]). Each chunk is zeroed by the task that fills it, in its cache,
/// where `vec![0.0; n]` would first zero the whole vector on the calling thread.
pub(crate) fn filled_on_pool(n: usize, chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    chunks_on_pool(&mut v.spare_capacity_mut()[..n], chunk, |first, part| f(first, zeroed(part)));
    // Safety: the chunks cover 0..n, and `zeroed` wrote each.
    unsafe { v.set_len(n) };
    v
}

/// [`filled_on_pool`] for two vectors of `n` floats filled side by side: f(first index, chunk
/// of the first, chunk of the second).
pub(crate) fn filled_pair_on_pool(
    n: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) -> (Vec<f32>, Vec<f32>) {
    let (mut a, mut b): (Vec<f32>, Vec<f32>) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let chunk = chunk.max(1);
    let parts: Vec<_> =
        a.spare_capacity_mut()[..n].chunks_mut(chunk).zip(b.spare_capacity_mut()[..n].chunks_mut(chunk)).collect();
    parts_on_pool(parts, |c, (a, b)| f(c * chunk, zeroed(a), zeroed(b)));
    // Safety: the chunks cover 0..n of both, and `zeroed` wrote each.
    unsafe {
        a.set_len(n);
        b.set_len(n);
    }
    (a, b)
}

/// The floats of a fresh chunk, zeroed.
fn zeroed(part: &mut [std::mem::MaybeUninit<f32>]) -> &mut [f32] {
    for x in part.iter_mut() {
        x.write(0.0);
    }
    // Safety: every element was written just above, and any bits are a valid f32.
    unsafe { &mut *(part as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}

/// Whether the CPU's f32 kernels take these tensors: f32 on the CPU (f64, for gradient checks,
/// keeps the composite ops).
pub(crate) fn on_cpu_f32(tensors: &[&Tensor]) -> bool {
    tensors.iter().all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
}

/// `x @ W^T` for inference on the CPU in f32, from the weight packed once at load time (see
/// [`super::packed`]): x (N, in) -> (N, out).
pub fn linear_packed(x: &Tensor, w: &Arc<PackedMatrix>) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&LinearPacked { w: w.clone() })
}

/// [`linear_packed`] of a weight stacked from several projections' ([W1; W2; ..]), each
/// projection's output its own (N, width) tensor: x (N, in) -> [(N, w1), (N, w2), ..].
pub fn linear_packed_parts(x: &Tensor, w: &Arc<PackedMatrix>, widths: &[usize]) -> Result<Vec<Tensor>> {
    let x = x.contiguous()?;
    let (n, d_in) = x.dims2()?;
    if w.k() != d_in {
        candle_core::bail!("linear-packed: input has {d_in} features, weight expects {}", w.k());
    }
    let (storage, layout) = x.storage_and_layout();
    let ys = w.matmul_parts(cpu_slice(&storage, layout, "input")?, n, widths);
    ys.into_iter().zip(widths).map(|(y, &width)| Tensor::from_vec(y, (n, width), x.device())).collect()
}

/// [`linear_packed`] of x given as column parts (each (N, in_i), the in_i summing to the
/// weight's input features), as the joined gradients of projections stacked into one weight
/// are: `[x1 | x2 | ..] @ W^T` (N, out), without joining them.
pub fn linear_packed_joined(xs: &[&Tensor], w: &Arc<PackedMatrix>) -> Result<Tensor> {
    let xs: Vec<Tensor> = xs.iter().map(|x| x.contiguous()).collect::<Result<_>>()?;
    let n = xs.first().map(|x| x.dim(0)).transpose()?.unwrap_or(0);
    let mut features = 0;
    for x in &xs {
        let (rows, d) = x.dims2()?;
        if rows != n {
            candle_core::bail!("linear-packed: input parts of {n} and {rows} rows");
        }
        features += d;
    }
    if w.k() != features {
        candle_core::bail!("linear-packed: input parts have {features} features, weight expects {}", w.k());
    }
    let guards: Vec<_> = xs.iter().map(|x| x.storage_and_layout()).collect();
    let slices = guards.iter().map(|(s, l)| cpu_slice(s, l, "input part")).collect::<Result<Vec<_>>>()?;
    let device = xs.first().map(|x| x.device().clone()).unwrap_or(candle_core::Device::Cpu);
    Tensor::from_vec(w.matmul_joined(&slices, n), (n, w.n()), &device)
}

/// `x @ W^T` for a frozen weight through its packed copy (CPU f32), differentiable in x: the
/// backward pass multiplies the gradient by W through the packed transpose. x (N, in) -> (N, out).
pub fn frozen_linear_packed(x: &Tensor, w: &Arc<PackedMatrix>) -> Result<Tensor> {
    let y = linear_packed(&x.detach(), w)?;
    attach(x, y, PackedLinearGrad { w: w.clone() })
}

struct PackedLinearGrad {
    w: Arc<PackedMatrix>,
}

impl Backward for PackedLinearGrad {
    fn name(&self) -> &'static str {
        "frozen-linear-packed"
    }
    fn grad(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        // grad (N, out) @ W (out, in) -> (N, in)
        linear_packed(grad, &self.w.transposed())
    }
}

struct LinearPacked {
    w: Arc<PackedMatrix>,
}

impl candle_core::CustomOp1 for LinearPacked {
    fn name(&self) -> &'static str {
        "linear-packed"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, d_in) = x_layout.shape().dims2()?;
        if self.w.k() != d_in {
            candle_core::bail!("linear-packed: input has {d_in} features, weight expects {}", self.w.k());
        }
        let x = match (x, x_layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("linear-packed: expects a contiguous f32 input"),
        };
        Ok((CpuStorage::F32(self.w.matmul(x, n)), Shape::from((n, self.w.n()))))
    }
}

#[cfg(test)]
mod linear_packed_tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn linear_from_the_packed_weight_equals_the_matmul() -> Result<()> {
        let dev = Device::Cpu;
        for (n, d_in, d_out) in [(1, 5, 3), (7, 16, 33), (64, 96, 130)] {
            let x = Tensor::randn(0f32, 1., (n, d_in), &dev)?;
            let w = Tensor::randn(0f32, 1., (d_out, d_in), &dev)?;
            let want = x.matmul(&w.t()?)?;
            let packed = Arc::new(PackedMatrix::from_rows_out_in(&w.flatten_all()?.to_vec1()?, d_out, d_in));
            let got = linear_packed(&x, &packed)?;
            let diff = (want - got)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "({n}, {d_in}, {d_out}): {diff}");
        }
        Ok(())
    }

    #[test]
    fn prefill_attention_whose_products_are_large_enough_for_the_pool_finishes() {
        // Each (row, kv head) task runs two packed products of more than 2 MFLOP, which would
        // use the pool themselves: nested in a pool task they must run inline. A hang fails
        // here after a minute rather than stalling the test run.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let dev = Device::Cpu;
            let (b, k, r, s, e) = (2, 2, 300, 300, 64);
            let q = Tensor::randn(0f32, 1., (b, k, r, e), &dev).unwrap();
            let keys = Tensor::randn(0f32, 1., (b, k, s, e), &dev).unwrap();
            let values = Tensor::randn(0f32, 1., (b, k, s, e), &dev).unwrap();
            let out = attention_cpu(
                &q,
                Cached { keys: &keys, values: &values, s, prefix: None },
                None,
                0.125,
                None,
                Heads::Stacked,
            )
            .map(|o| o.dims().to_vec());
            let _ = done.send(out.unwrap());
        });
        let dims =
            finished.recv_timeout(std::time::Duration::from_secs(60)).expect("attention finished within a minute");
        assert_eq!(dims, vec![2, 2, 300, 64]);
    }

    #[test]
    fn a_stacked_product_split_into_parts_equals_each_projections_product() -> Result<()> {
        let dev = Device::Cpu;
        // Parts that end inside a column panel and parts of whole panels.
        for widths in [vec![7, 50, 3], vec![96, 48], vec![100]] {
            let x = Tensor::randn(0f32, 1., (9, 24), &dev)?;
            let ws: Vec<Tensor> =
                widths.iter().map(|&w| Tensor::randn(0f32, 1., (w, 24), &dev)).collect::<Result<_>>()?;
            let stacked = Tensor::cat(&ws, 0)?;
            let n = stacked.dim(0)?;
            let packed = Arc::new(PackedMatrix::from_rows_out_in(&stacked.flatten_all()?.to_vec1()?, n, 24));
            let parts = linear_packed_parts(&x, &packed, &widths)?;
            assert_eq!(parts.len(), widths.len());
            for (w, got) in ws.iter().zip(&parts) {
                let want = x.matmul(&w.t()?)?;
                let diff = (want - got)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(diff < 1e-4, "{widths:?}: {diff}");
            }
        }
        Ok(())
    }
}

/// The keys and values attention reads: the first `s` positions of every row, the first
/// `prefix.len` of them from the row's prompt's shared prefix where there is one, the rest from
/// the row's own (B, K, C, E) tensors.
#[derive(Clone, Copy)]
pub struct Cached<'a> {
    pub keys: &'a Tensor,
    pub values: &'a Tensor,
    pub s: usize,
    pub prefix: Option<Prefix<'a>>,
}

/// One layer's shared prefix (see [`super::decoder::SharedPrefix`]): keys and values
/// (P, K, len, E), and each batch row's prompt.
#[derive(Clone, Copy)]
pub struct Prefix<'a> {
    pub keys: &'a Tensor,
    pub values: &'a Tensor,
    pub len: usize,
    pub rows: &'a [usize],
}

/// Attention for inference on the CPU in f32, `softmax(cap(q k^T * scale) + mask) v` (`softcap`
/// c: scores capped to c * tanh(s / c)), read straight from the KV cache: one pass per query
/// row, no copy of the cache and no (rows, S) tensors.
///
/// q: (B, K, R, E) with R = G * T query rows per kv head (row r is at new position r % T);
/// the cache's keys and values: `s` positions of each row ([`Cached`]); mask: additive,
/// (B or 1, 1, 1, T, S). Returns (B, K, R, E), or with `Heads::Merged` (B, T, H * E), the
/// layout the output projection takes (head k * G + g of token t is row g * T + t of kv head k).
pub fn attention_cpu(
    q: &Tensor,
    cache: Cached,
    mask: Option<&Tensor>,
    scale: f64,
    softcap: Option<f64>,
    heads: Heads,
) -> Result<Tensor> {
    let Cached { keys, values, s, prefix } = cache;
    let (b, k, r, e) = q.dims4()?;
    let c = keys.dim(2)?;
    let mask = MaskRows::new(mask, s)?;
    let q = q.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = keys.storage_and_layout();
    let (vs, vl) = values.storage_and_layout();
    let q = cpu_slice(&qs, ql, "q")?;
    let kc = cpu_slice(&ks, kl, "keys")?;
    let vc = cpu_slice(&vs, vl, "values")?;
    let shared = match prefix {
        Some(p) => {
            if p.rows.len() != b || p.len > s || s - p.len > c {
                candle_core::bail!(
                    "a prefix of {} positions for {} rows does not fit {b} rows of {s} keys",
                    p.len,
                    p.rows.len()
                )
            }
            Some((p.keys.storage_and_layout(), p.values.storage_and_layout()))
        }
        None => None,
    };
    let shared = match &shared {
        Some(((pks, pkl), (pvs, pvl))) => {
            Some((cpu_slice(pks, pkl, "prefix keys")?, cpu_slice(pvs, pvl, "prefix values")?))
        }
        None => None,
    };
    let head = prefix.map_or(0, |p| p.len);
    let scale = Scale { scale: scale as f32, softcap: softcap.map(|c| c as f32) };
    // One (batch row, kv head) per task: (R, E) each.
    let per_head = map_on_pool(b * k, |bk| {
        let mut out_bk = vec![0f32; r * e];
        let bi = bk / k;
        let q_bk = &q[bk * r * e..(bk + 1) * r * e];
        // The row's keys and values: its prompt's shared ones, then its own.
        let (keys, values) = match (prefix, shared) {
            (Some(p), Some((pk, pv))) => {
                let at = (p.rows[bi] * k + bk % k) * head * e;
                (
                    Rows { head: &pk[at..at + head * e], tail: &kc[bk * c * e..bk * c * e + (s - head) * e], e },
                    Rows { head: &pv[at..at + head * e], tail: &vc[bk * c * e..bk * c * e + (s - head) * e], e },
                )
            }
            _ => (
                Rows { head: &[], tail: &kc[bk * c * e..bk * c * e + s * e], e },
                Rows { head: &[], tail: &vc[bk * c * e..bk * c * e + s * e], e },
            ),
        };
        let mask_row = |row: usize| mask.as_ref().map(|m| m.row(bi, row));
        if r >= BLOCKED_ROWS {
            // Prefill: (R, E) @ K^T -> (R, S) probabilities, @ V -> (R, E), as packed products.
            let (k_bk, v_bk) = (keys.joined(), values.joined());
            let mut probs = PackedMatrix::from_rows_out_in(&k_bk, s, e).matmul(q_bk, r);
            for (row, p) in probs.chunks_mut(s).enumerate() {
                softmax_in_place(p, mask_row(row), scale);
            }
            return PackedMatrix::from_rows_in_out(&v_bk, s, e).matmul(&probs, r);
        }
        // Decoding: a few rows, one pass over the cache each.
        let mut p = vec![0f32; s];
        for (row, out_row) in out_bk.chunks_mut(e).enumerate() {
            attend_row(out_row, &q_bk[row * e..(row + 1) * e], keys, values, &mut p, mask_row(row), scale);
        }
        out_bk
    });
    drop((qs, ks, vs));
    match heads {
        Heads::Stacked => Tensor::from_vec(per_head.concat(), (b, k, r, e), keys.device()),
        Heads::Merged { t } => {
            let g = r.checked_div(t).unwrap_or(0);
            let width = k * g * e;
            let tokens = filled_on_pool(b * t * width, 16 * width, |first, rows| {
                for (i, row) in rows.chunks_mut(width).enumerate() {
                    let (bi, ti) = ((first / width + i) / t, (first / width + i) % t);
                    for (head, out) in row.chunks_mut(e).enumerate() {
                        let (kv, gi) = (head / g, head % g);
                        let at = (gi * t + ti) * e;
                        out.copy_from_slice(&per_head[bi * k + kv][at..at + e]);
                    }
                }
            });
            Tensor::from_vec(tokens, (b, t, width), keys.device())
        }
    }
}

/// How [`attention_cpu`] lays out its output.
#[derive(Clone, Copy)]
pub enum Heads {
    /// (B, K, G * T, E): the G query heads of each kv head stacked, as q comes in.
    Stacked,
    /// (B, T, H * E) for `t` new positions.
    Merged { t: usize },
}

/// The gradients (dq, dk, dv) of [`attention_cpu`]'s output over whole key ranges (training:
/// keys and values (B, K, S, E), every position used), from the output `out` and its gradient
/// `dout` (B, K, R, E); scores not capped. Per (batch row, kv head) on the pool, with the
/// probabilities P recomputed, as packed products:
/// dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = dS K * scale,
/// dK = dS^T Q * scale.
pub fn attention_backward_cpu(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    out: &Tensor,
    dout: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, k, r, e) = q.dims4()?;
    let s = keys.dim(2)?;
    let mask = MaskRows::new(mask, s)?;
    let [q, keys, values, out, dout] = [q, keys, values, out, dout].map(|x| x.contiguous());
    let (q, keys, values, out, dout) = (q?, keys?, values?, out?, dout?);
    let guards = [&q, &keys, &values, &out, &dout].map(|x| x.storage_and_layout());
    let names = ["q", "keys", "values", "output", "output gradient"];
    let mut slices = Vec::with_capacity(5);
    for ((storage, layout), name) in guards.iter().zip(names) {
        slices.push(cpu_slice(storage, layout, name)?);
    }
    let (qc, kc, vc, oc, dc) = (slices[0], slices[1], slices[2], slices[3], slices[4]);
    let sc = Scale { scale: scale as f32, softcap: None };
    let per_head = map_on_pool(b * k, |bk| {
        let bi = bk / k;
        let (rows, cache) = (bk * r * e..(bk + 1) * r * e, bk * s * e..(bk + 1) * s * e);
        let (q_bk, k_bk, v_bk) = (&qc[rows.clone()], &kc[cache.clone()], &vc[cache]);
        let (o_bk, d_bk) = (&oc[rows.clone()], &dc[rows]);
        // P (R, S), as in the forward pass.
        let mut p = PackedMatrix::from_rows_out_in(k_bk, s, e).matmul(q_bk, r);
        for (row, p_row) in p.chunks_mut(s).enumerate() {
            softmax_in_place(p_row, mask.as_ref().map(|m| m.row(bi, row)), sc);
        }
        // dV (S, E) = P^T dO.
        let dv = PackedMatrix::from_rows_in_out(d_bk, r, e).matmul(&transposed(&p, r, s), s);
        // dS (R, S) = P * (dP - rowsum(dO * O)) * scale, dP = dO V^T.
        let mut ds = PackedMatrix::from_rows_out_in(v_bk, s, e).matmul(d_bk, r);
        for (row, (ds_row, p_row)) in ds.chunks_mut(s).zip(p.chunks(s)).enumerate() {
            let rowsum = dot(&d_bk[row * e..(row + 1) * e], &o_bk[row * e..(row + 1) * e]);
            for (x, &pj) in ds_row.iter_mut().zip(p_row) {
                *x = pj * (*x - rowsum) * sc.scale;
            }
        }
        // dQ (R, E) = dS K; dK (S, E) = dS^T Q.
        let dq = PackedMatrix::from_rows_in_out(k_bk, s, e).matmul(&ds, r);
        let dk = PackedMatrix::from_rows_in_out(q_bk, r, e).matmul(&transposed(&ds, r, s), s);
        (dq, dk, dv)
    });
    drop(guards);
    let (mut dq, mut dk, mut dv) = (Vec::with_capacity(b * k * r * e), Vec::new(), Vec::new());
    for (q_part, k_part, v_part) in per_head {
        dq.extend_from_slice(&q_part);
        dk.extend_from_slice(&k_part);
        dv.extend_from_slice(&v_part);
    }
    let dev = q.device();
    Ok((
        Tensor::from_vec(dq, (b, k, r, e), dev)?,
        Tensor::from_vec(dk, (b, k, s, e), dev)?,
        Tensor::from_vec(dv, (b, k, s, e), dev)?,
    ))
}

/// A projection's output as attention heads and back on the CPU in f32, the rope applied on the
/// way, in one pass per batch row on the pool (the composite is a strided copy and a rope pass,
/// each allocating). `to_heads`: x (B, T, n*E) -> (B, n, T, E); else (B, n, T, E) -> (B, T, n*E).
/// cos, sin (T, E/2) rotate the first half of each head against the second; `rope_sign` 1 ropes,
/// -1 ropes by the opposite angle (the rope's transpose, for gradients), 0 leaves the values.
pub fn heads_cpu(x: &Tensor, n: usize, cos: &Tensor, sin: &Tensor, rope_sign: f32, to_heads: bool) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (b, t, e, shape) = if to_heads {
        let (b, t, w) = x.dims3()?;
        (b, t, w / n, Shape::from((b, n, t, w / n)))
    } else {
        let (b, _, t, e) = x.dims4()?;
        (b, t, e, Shape::from((b, t, n * e)))
    };
    let half = e / 2;
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let guards = [&x, &cos, &sin].map(|x| x.storage_and_layout());
    let xs = cpu_slice(&guards[0].0, guards[0].1, "x")?;
    let (cs, ss) = (cpu_slice(&guards[1].0, guards[1].1, "cos")?, cpu_slice(&guards[2].0, guards[2].1, "sin")?);
    if cs.len() < t * half || ss.len() != cs.len() || xs.len() != b * t * n * e || e % 2 != 0 {
        candle_core::bail!("heads-cpu: x {:?}, {n} heads, cos {:?}", x.shape(), cos.shape());
    }
    let mut out = vec![0f32; xs.len()];
    let block = t * n * e;
    chunks_on_pool(&mut out, block, |at, out| {
        let src = &xs[at..at + block];
        for tt in 0..t {
            let (c, s) = (&cs[tt * half..(tt + 1) * half], &ss[tt * half..(tt + 1) * half]);
            for h in 0..n {
                let (x_at, y_at) = ((tt * n + h) * e, (h * t + tt) * e);
                let (from, to) = if to_heads { (x_at, y_at) } else { (y_at, x_at) };
                let (lo, hi) = src[from..from + e].split_at(half);
                let (out_lo, out_hi) = out[to..to + e].split_at_mut(half);
                if rope_sign == 0.0 {
                    out_lo.copy_from_slice(lo);
                    out_hi.copy_from_slice(hi);
                    continue;
                }
                for i in 0..half {
                    let si = rope_sign * s[i];
                    out_lo[i] = lo[i] * c[i] - hi[i] * si;
                    out_hi[i] = lo[i] * si + hi[i] * c[i];
                }
            }
        }
    });
    drop(guards);
    Tensor::from_vec(out, shape, x.device())
}

/// RMSNorm on the CPU in f32 for inference, rows on the pool: `x * w / sqrt(mean(x^2) + eps)`
/// over the last dimension of x, or, with `h`, of the residual sum x + h, which is returned too
/// (the sum and the norm that reads it in one pass).
pub fn rms_norm_cpu(x: &Tensor, h: Option<&Tensor>, weight: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let h = h.map(|h| h.contiguous()).transpose()?;
    let d = x.dim(candle_core::D::Minus1)?;
    if weight.elem_count() != d || h.as_ref().is_some_and(|h| h.shape() != x.shape()) {
        candle_core::bail!("rms-norm-cpu: x {:?}, weight {:?}", x.shape(), weight.shape());
    }
    let (xg, wg) = (x.storage_and_layout(), weight.storage_and_layout());
    let hg = h.as_ref().map(|h| h.storage_and_layout());
    let (xs, ws) = (cpu_slice(&xg.0, xg.1, "x")?, cpu_slice(&wg.0, wg.1, "weight")?);
    let hs = match &hg {
        Some((st, l)) => Some(cpu_slice(st, l, "h")?),
        None => None,
    };
    // Each row's sum (where there is one) and its norm, side by side in one buffer per chunk.
    const ROWS: usize = 16;
    let eps = eps as f32;
    let norm_rows = |first: usize, out: &mut [f32], sum: Option<&mut [f32]>| {
        let range = first..first + out.len();
        let (x, h) = (&xs[range.clone()], hs.map(|h| &h[range]));
        let mut sum = sum;
        for (row, out_row) in out.chunks_mut(d).enumerate() {
            let x_row = &x[row * d..(row + 1) * d];
            let src: &[f32] = match (h, sum.as_deref_mut()) {
                (Some(h), Some(sum)) => {
                    let s_row = &mut sum[row * d..(row + 1) * d];
                    for ((s, a), b) in s_row.iter_mut().zip(x_row).zip(&h[row * d..(row + 1) * d]) {
                        *s = a + b;
                    }
                    s_row
                }
                _ => x_row,
            };
            let r = 1.0 / (dot(src, src) / d as f32 + eps).sqrt();
            for ((o, v), w) in out_row.iter_mut().zip(src).zip(ws) {
                *o = v * r * w;
            }
        }
    };
    let (out, sum) = if hs.is_some() {
        filled_pair_on_pool(xs.len(), ROWS * d, |first, out, sum| norm_rows(first, out, Some(sum)))
    } else {
        (filled_on_pool(xs.len(), ROWS * d, |first, out| norm_rows(first, out, None)), Vec::new())
    };
    drop((xg, wg, hg));
    let normed = Tensor::from_vec(out, x.shape(), x.device())?;
    let sum = if h.is_some() { Tensor::from_vec(sum, x.shape(), x.device())? } else { x };
    Ok((sum, normed))
}

/// The (cols, rows) transpose of a row-major (rows, cols) matrix.
fn transposed(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; rows * cols];
    for (i, row) in x.chunks(cols).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            t[j * rows + i] = v;
        }
    }
    t
}

/// An additive attention mask, (B or 1, 1, 1, T, S), as rows of S keys.
struct MaskRows {
    data: Vec<f32>,
    t: usize,
    s: usize,
    /// Whether each batch row has its own T rows (else one set serves all).
    per_batch: bool,
}

impl MaskRows {
    fn new(mask: Option<&Tensor>, s: usize) -> Result<Option<Self>> {
        let Some(mask) = mask else { return Ok(None) };
        let t = mask.dim(mask.rank() - 2)?;
        let data = mask.flatten_all()?.to_vec1::<f32>()?;
        let per_batch = data.len() / (t * s) > 1;
        Ok(Some(MaskRows { data, t, s, per_batch }))
    }

    /// The keys' biases for query row `row` (at new position row % T) of batch row `bi`.
    fn row(&self, bi: usize, row: usize) -> &[f32] {
        let at = ((if self.per_batch { bi } else { 0 }) * self.t + row % self.t) * self.s;
        &self.data[at..at + self.s]
    }
}

/// Query rows per (batch row, kv head) from which attention runs as two packed products
/// (prefill) rather than one pass over the cache per row (decoding).
const BLOCKED_ROWS: usize = 16;

/// Rows of E floats, the first ones from `head` and the rest from `tail`: a row's keys or values
/// where a shared prefix holds the first of them.
#[derive(Clone, Copy)]
struct Rows<'a> {
    head: &'a [f32],
    tail: &'a [f32],
    e: usize,
}

impl<'a> Rows<'a> {
    #[inline(always)]
    fn at(self, j: usize) -> &'a [f32] {
        let e = self.e;
        match j * e < self.head.len() {
            true => &self.head[j * e..(j + 1) * e],
            false => &self.tail[j * e - self.head.len()..(j + 1) * e - self.head.len()],
        }
    }

    /// All rows in one (S, E) buffer: `tail` itself where there is no head.
    fn joined(self) -> std::borrow::Cow<'a, [f32]> {
        match self.head.is_empty() {
            true => std::borrow::Cow::Borrowed(self.tail),
            false => std::borrow::Cow::Owned([self.head, self.tail].concat()),
        }
    }
}

// One query row against keys and values (S, E): out (E) += softmax(scores) V, with `p` (S) for
// the probabilities.
vectorised!(attend_row(out: &mut [f32], q: &[f32], keys: Rows, values: Rows, p: &mut [f32], bias: Option<&[f32]>, scale: Scale) {
    // Whole blocks of keys by the vector kernel (hidden keys' scores too: the softmax drops
    // them), the rest here, hidden keys (causal or padding) at no cost.
    let blocked = super::ops::attention::cpu::block_scores(p, q, |j| keys.at(j));
    for (j, sc) in p.iter_mut().enumerate().skip(blocked) {
        let hidden = bias.is_some_and(|m| m[j] == f32::NEG_INFINITY);
        *sc = if hidden { 0.0 } else { dot(q, keys.at(j)) };
    }
    softmax_in_place(p, bias, scale);
    if super::ops::attention::cpu::add_weighted_values(out, p, |j| values.at(j)) {
        return;
    }
    for (j, &pj) in p.iter().enumerate() {
        if pj != 0.0 {
            for (o, v) in out.iter_mut().zip(values.at(j)) {
                *o += pj * v;
            }
        }
    }
});

/// scores (S,) <- softmax(scores * scale + bias), where a bias of -inf hides a key exactly.
#[inline(always)]
fn softmax_in_place(scores: &mut [f32], bias: Option<&[f32]>, scale: Scale) {
    let mut max = f32::NEG_INFINITY;
    for (j, sc) in scores.iter_mut().enumerate() {
        let b = bias.map_or(0.0, |m| m[j]);
        *sc = if b == f32::NEG_INFINITY { b } else { scale.apply(*sc) + b };
        max = max.max(*sc);
    }
    exp_shifted_in_place(scores, max);
    let inv = 1.0 / lane_sum(scores);
    for sc in scores.iter_mut() {
        *sc *= inv;
    }
}

/// How raw scores q.k become the softmax's input: scaled, then capped where the model caps them.
#[derive(Clone, Copy)]
struct Scale {
    scale: f32,
    softcap: Option<f32>,
}

impl Scale {
    #[inline(always)]
    fn apply(self, score: f32) -> f32 {
        match self.softcap {
            Some(c) => c * (score * self.scale / c).tanh(),
            None => score * self.scale,
        }
    }
}

/// exp(x) within 2 ulp for |x| <= 87, with a polynomial and no branches (Cephes' expf): x =
/// n ln2 + r, |r| <= ln2 / 2, e^x = 2^n e^r. Below -87 it is 0 (exp(-inf) is 0 exactly, as a
/// hidden key's weight must be), above 87 it saturates, and NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Adding 1.5 * 2^23 rounds to an integer held in the low bits of the sum's mantissa.
    const ROUND: f32 = 12_582_912.0;
    let x_in = x;
    let x = x.clamp(-87.0, 87.0); // NaN stays NaN
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    let scale = f32::from_bits(((t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23) as u32);
    if x_in < -87.0 {
        0.0
    } else {
        e_r * scale
    }
}

/// e^x in f64, within an ulp or two of libm's, as operations the compiler vectorises:
/// x = n ln2 + r, |r| <= ln2 / 2, e^x = 2^n e^r with e^r to its r^13 term. Below -708 it is 0
/// (where libm's results turn subnormal), above 709 it saturates, and NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f64(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    // ln 2 in two parts, the first with trailing zero bits so that n * LN2_HI is exact.
    const LN2_HI: f64 = 0.693_147_180_369_123_8;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    // Adding 1.5 * 2^52 rounds to an integer held in the low bits of the sum's mantissa.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    // 1 / k! for k = 13 down to 2.
    const C: [f64; 12] = [
        1.0 / 6_227_020_800.0,
        1.0 / 479_001_600.0,
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
    ];
    let x_in = x;
    let x = x.clamp(-708.0, 709.0); // NaN stays NaN
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = C[0];
    for c in &C[1..] {
        p = p * r + c;
    }
    let e_r = 1.0 + (r + r * r * p);
    let scale = f64::from_bits(((t.to_bits() as i64 - ROUND.to_bits() as i64 + 1023) << 52) as u64);
    if x_in < -708.0 {
        0.0
    } else {
        e_r * scale
    }
}

/// The loops, compiled for the widest vectors the CPU has.
macro_rules! vectorised {
    ($vis:vis $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $body
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $body
                // The one detection the packed products make.
                match $crate::model::packed::Kernel::best() {
                    // Safety: the CPU has the kernel's features.
                    $crate::model::packed::Kernel::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::model::packed::Kernel::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::model::packed::Kernel::Portable => {}
                }
            }
            $body
        }
    };
}
pub(crate) use vectorised;

// x <- exp(x - shift), elementwise.
vectorised!(pub(crate) exp_shifted_in_place(x: &mut [f32], shift: f32) {
    for v in x.iter_mut() {
        *v = exp(*v - shift);
    }
});

/// The sum of x in 16 independent lanes (see [`dot`]).
pub(crate) fn lane_sum(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..16 {
            lanes[i] += c[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Dot product in 16 independent lanes, which the compiler keeps in vector registers (a plain
/// sum of f32 must be added in order, one element at a time).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The contiguous f32 data of a CPU tensor.
pub(crate) fn cpu_slice<'a>(storage: &'a candle_core::Storage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("cpu kernels: {what} must be a contiguous f32 tensor on the CPU"),
    }
}

#[cfg(test)]
mod attention_cpu_tests {
    use super::*;
    use candle_core::{Device, D};

    #[test]
    fn attention_from_the_cache_equals_the_plain_formula() -> Result<()> {
        // B 2, K 2, G 3, E 8; T 4 new positions in a cache of capacity 9 holding S = 6 (rows one
        // at a time), and T 20 in one of capacity 60 holding 53 (rows as packed products).
        check_cache_attention(4, 9, 6)?;
        check_cache_attention(20, 60, 53)
    }

    fn check_cache_attention(t: usize, cap: usize, s: usize) -> Result<()> {
        let dev = Device::Cpu;
        let (b, k, g, e) = (2, 2, 3, 8);
        let q = Tensor::randn(0f32, 1., (b, k, g * t, e), &dev)?;
        let keys = Tensor::randn(0f32, 1., (b, k, cap, e), &dev)?;
        let values = Tensor::randn(0f32, 1., (b, k, cap, e), &dev)?;
        // Row 0 hides its first key (padding), row 1 sees all; causal over the last T keys.
        let mut m = vec![0f32; b * t * s];
        for bi in 0..b {
            for ti in 0..t {
                for j in 0..s {
                    let hidden = j > s - t + ti || (bi == 0 && j == 0);
                    m[(bi * t + ti) * s + j] = if hidden { f32::NEG_INFINITY } else { 0.0 };
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, 1, t, s), &dev)?;
        let attend = |heads| {
            let cached = Cached { keys: &keys, values: &values, s, prefix: None };
            attention_cpu(&q, cached, Some(&mask), 0.3, None, heads)
        };
        let got = attend(Heads::Stacked)?;

        let kk = keys.narrow(2, 0, s)?;
        let vv = values.narrow(2, 0, s)?.contiguous()?;
        let scores =
            (q.matmul(&kk.t()?)? * 0.3)?.reshape((b, k, g, t, s))?.broadcast_add(&mask)?.reshape((b, k, g * t, s))?;
        let want = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&vv)?;
        let diff = (&got - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "T {t}: max abs diff {diff}");
        // The same output with the heads merged per token, as the output projection takes it.
        let merged = attend(Heads::Merged { t })?;
        let want = got.reshape((b, k * g, t, e))?.transpose(1, 2)?.reshape((b, t, k * g * e))?;
        assert_eq!(merged.to_vec3::<f32>()?, want.to_vec3::<f32>()?, "T {t}: merged heads");
        Ok(())
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn attention_gradients_on_the_cpu_are_those_of_autograd_through_the_plain_formula() -> Result<()> {
        // B 2, K 2, G 3, E 8, T = S = 20 (packed products), causal with row 0's first key hidden.
        let dev = Device::Cpu;
        let (b, k, g, t, e) = (2, 2, 3, 20, 8);
        let q = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1., (b, k, g * t, e), &dev)?)?;
        let keys = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1., (b, k, t, e), &dev)?)?;
        let values = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1., (b, k, t, e), &dev)?)?;
        let dout = Tensor::randn(0f32, 1., (b, k, g * t, e), &dev)?;
        let mut m = vec![0f32; b * t * t];
        for bi in 0..b {
            for ti in 0..t {
                for j in 0..t {
                    let hidden = j > ti || (bi == 0 && j == 0 && ti > 0);
                    m[(bi * t + ti) * t + j] = if hidden { f32::NEG_INFINITY } else { 0.0 };
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, 1, t, t), &dev)?;
        let scores = (q.as_tensor().matmul(&keys.as_tensor().t()?)? * 0.3)?
            .reshape((b, k, g, t, t))?
            .broadcast_add(&mask)?
            .reshape((b, k, g * t, t))?;
        let out = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(values.as_tensor())?;
        let grads = (&out * &dout)?.sum_all()?.backward()?;
        let (q0, k0, v0) = (q.as_tensor().detach(), keys.as_tensor().detach(), values.as_tensor().detach());
        let (dq, dk, dv) = attention_backward_cpu(&q0, &k0, &v0, &out.detach(), &dout, Some(&mask), 0.3)?;
        for (got, var, name) in [(dq, &q, "dq"), (dk, &keys, "dk"), (dv, &values, "dv")] {
            let diff = max_diff(&got, grads.get(var.as_tensor()).expect("a gradient"))?;
            assert!(diff < 1e-4, "{name}: max abs diff {diff}");
        }
        Ok(())
    }

    #[test]
    fn heads_on_the_cpu_split_rope_and_join_as_the_plain_ops_do() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, n, e) = (2, 5, 3, 8);
        let x = Tensor::randn(0f32, 1., (b, t, n * e), &dev)?;
        let angles = Tensor::randn(0f32, 1., (t, e / 2), &dev)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let split = x.reshape((b, t, n, e))?.transpose(1, 2)?.contiguous()?;
        let roped = candle_nn::rotary_emb::rope(&split, &cos, &sin)?;
        assert_eq!(max_diff(&heads_cpu(&x, n, &cos, &sin, 0.0, true)?, &split)?, 0.0);
        let got = heads_cpu(&x, n, &cos, &sin, 1.0, true)?;
        assert!(max_diff(&got, &roped)? < 1e-6, "split and rope");
        // The inverse rope undoes the rope, and the join undoes the split.
        let back = heads_cpu(&got, n, &cos, &sin, -1.0, false)?;
        assert!(max_diff(&back, &x)? < 1e-5, "unrope and join");
        assert_eq!(max_diff(&heads_cpu(&split, n, &cos, &sin, 0.0, false)?, &x)?, 0.0);
        Ok(())
    }
}

#[cfg(test)]
mod exp_tests {
    use super::*;

    #[test]
    fn the_polynomial_exp_is_within_two_ulp_of_libms_and_keeps_nan() {
        let mut worst = 0f32;
        for i in -870_000..870_000 {
            let x = i as f32 * 1e-4;
            let (got, want) = (exp(x), x.exp());
            worst = worst.max((got - want).abs() / (want * f32::EPSILON));
        }
        assert!(worst <= 2.0, "{worst} ulp");
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(f32::NEG_INFINITY) == 0.0 && exp(1e9).is_finite());
    }

    #[test]
    fn the_f64_polynomial_exp_is_within_two_ulp_of_libms_and_keeps_nan() {
        let mut worst = 0f64;
        for i in -7_079_000..7_089_000 {
            // Steps of about 1e-4 that are not round in binary.
            let x = i as f64 * 1.000_000_7e-4;
            let (got, want) = (exp_f64(x), x.exp());
            worst = worst.max((got - want).abs() / (want * f64::EPSILON));
        }
        assert!(worst <= 2.0, "{worst} ulp");
        assert!(exp_f64(f64::NAN).is_nan());
        assert!(exp_f64(f64::NEG_INFINITY) == 0.0 && exp_f64(-709.0) == 0.0 && exp_f64(1e9).is_finite());
        assert_eq!(exp_f64(0.0), 1.0);
    }
}
