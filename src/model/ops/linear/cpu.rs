//! The LoRA adapter's products on the CPU in f32: one of their dimensions is the adapter's rank,
//! a few dozen, so each is a thin product of a few MFLOPs. Through candle each was a call into
//! a general matrix library on another thread pool, then a pass of its own to add the result to
//! a sum (the projection's output, the input's gradient, the weights' gradients). Here each is
//! one pass on candle's thread pool that adds into its destination in place.
//!
//! All three shapes are one kernel, `c (m, n) (+)= alpha * a (m, k) @ b (k, n)`, with `a` read
//! through strides, so that a transposed operand needs no copy:
//! - the adapter's term of the output, y (N, out) += z (N, r) @ (s B)^T (r, out);
//! - the input's gradient, dx (N, in) += dz (N, r) @ A (r, in);
//! - the gradient of z, dz (N, r) = dy (N, out) @ s B (out, r);
//! - the weights' gradients, dB (out, r) += s dy^T (out, N) @ z (N, r) and
//!   dA (r, in) += dz^T (r, N) @ x (N, in).
//!
//! The sums run along k in order, whatever the split between threads.

use candle_core::{CpuStorage, Layout, Result, Tensor};

use crate::model::cpu::{chunks_on_pool, on_cpu_f32};
use crate::model::packed::{fma, Kernel};

/// Rows of c per tile (each a task's unit of work).
const MR: usize = 8;
/// Columns of c per tile: one 16-lane vector per row.
const NC: usize = 16;

/// Whether these tensors take the CPU's kernels here.
pub(crate) fn applies(tensors: &[&Tensor]) -> bool {
    on_cpu_f32(tensors)
}

/// `c += a @ b` in place, for c (m, n) contiguous and held by the caller alone, a (m, k),
/// b (k, n).
pub(crate) fn add_product(c: &Tensor, a: &Tensor, b: &Tensor) -> Result<()> {
    c.inplace_op3(&a.contiguous()?, &b.contiguous()?, &Product { alpha: 1.0, a_transposed: false })
}

/// `c += alpha * a^T @ b` in place, for c (m, n) contiguous and held by the caller alone,
/// a (k, m), b (k, n).
pub(crate) fn add_transposed_product(c: &Tensor, a: &Tensor, b: &Tensor, alpha: f32) -> Result<()> {
    c.inplace_op3(&a.contiguous()?, &b.contiguous()?, &Product { alpha, a_transposed: true })
}

/// `a @ b` as a new tensor (m, n), for a (m, k), b (k, n).
pub(crate) fn product(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, n) = (a.dim(0)?, b.dim(1)?);
    let c = Tensor::zeros((m, n), a.dtype(), a.device())?;
    add_product(&c, a, b)?;
    Ok(c)
}

struct Product {
    alpha: f32,
    /// a is given as (k, m).
    a_transposed: bool,
}

impl candle_core::InplaceOp3 for Product {
    fn name(&self) -> &'static str {
        "low-rank-product-cpu"
    }

    fn cpu_fwd(
        &self,
        c: &mut CpuStorage,
        cl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<()> {
        use CpuStorage::F32;
        let (F32(c), F32(a), F32(b)) = (c, a, b) else {
            candle_core::bail!("low-rank-product-cpu: f32 tensors expected")
        };
        let (Some((c0, c1)), Some((a0, a1)), Some((b0, b1))) =
            (cl.contiguous_offsets(), al.contiguous_offsets(), bl.contiguous_offsets())
        else {
            candle_core::bail!("low-rank-product-cpu: contiguous tensors expected")
        };
        let (&[cm, cn], &[ad0, ad1], &[bk, bn]) = (cl.dims(), al.dims(), bl.dims()) else {
            candle_core::bail!(
                "low-rank-product-cpu: matrices expected, got {:?} {:?} {:?}",
                cl.dims(),
                al.dims(),
                bl.dims()
            )
        };
        let (am, ak) = if self.a_transposed { (ad1, ad0) } else { (ad0, ad1) };
        if am != cm || ak != bk || bn != cn {
            candle_core::bail!(
                "low-rank-product-cpu: ({cm}, {cn}) += ({am}, {ak}) @ ({bk}, {bn}) does not fit{}",
                if self.a_transposed { " (the left operand transposed)" } else { "" }
            )
        }
        // Element (i, kk) of a at i * row + kk * step.
        let a = Strided {
            data: &a[a0..a1],
            row: if self.a_transposed { 1 } else { ak },
            step: if self.a_transposed { am } else { 1 },
        };
        run(&mut c[c0..c1], cn, a, &b[b0..b1], ak, self.alpha, Kernel::best());
        Ok(())
    }
}

/// A matrix read in place: element (i, kk) at `data[i * row + kk * step]`.
#[derive(Clone, Copy)]
struct Strided<'a> {
    data: &'a [f32],
    row: usize,
    step: usize,
}

/// c (m, n) += alpha * a (m, k) @ b (k, n) row-major, a block of MR rows of c per task.
fn run(c: &mut [f32], n: usize, a: Strided, b: &[f32], k: usize, alpha: f32, kernel: Kernel) {
    if n == 0 || c.is_empty() {
        return;
    }
    let m = c.len() / n;
    let whole = n / NC * NC;
    // Columns past the last whole vector of b, padded with zeros: (k, NC).
    let tail = (whole < n).then(|| {
        let mut t = vec![0f32; k * NC];
        for kk in 0..k {
            t[kk * NC..kk * NC + n - whole].copy_from_slice(&b[kk * n + whole..(kk + 1) * n]);
        }
        t
    });
    // Block `first / (MR n)` of MR rows of c (fewer in the last).
    let task = |first: usize, rows: &mut [f32]| {
        let t = first / (MR * n);
        let live = rows.len() / n;
        // Rows past m repeat the last one; their sums are not stored.
        let first: [usize; MR] = std::array::from_fn(|i| (t * MR + i.min(live - 1)) * a.row);
        let block = Block { a: a.data, first, step: a.step, k, alpha };
        block.add_into(kernel, &mut Out { data: rows, row: n, live }, &Panel { data: b, stride: n, cols: whole });
        if let Some(tail) = &tail {
            let mut sums = [0f32; MR * NC];
            block.add_into(
                kernel,
                &mut Out { data: &mut sums, row: NC, live },
                &Panel { data: tail, stride: NC, cols: NC },
            );
            for i in 0..live {
                for (o, s) in rows[i * n + whole..(i + 1) * n].iter_mut().zip(&sums[i * NC..]) {
                    *o += s;
                }
            }
        }
    };
    // Below about a million FLOPs, waking the pool costs more than it saves.
    if 2 * m * n * k < 1 << 20 {
        c.chunks_mut(MR * n).enumerate().for_each(|(t, rows)| task(t * MR * n, rows));
    } else {
        chunks_on_pool(c, MR * n, task);
    }
}

/// MR rows of a (row i's element kk at `a[first[i] + kk * step]`), times alpha.
struct Block<'a> {
    a: &'a [f32],
    first: [usize; MR],
    step: usize,
    k: usize,
    alpha: f32,
}

/// The first `live` rows of a tile of c, rows `row` floats apart, that a block adds into.
struct Out<'a> {
    data: &'a mut [f32],
    row: usize,
    live: usize,
}

/// The columns 0..cols (a multiple of NC) of b's rows, `stride` floats apart.
struct Panel<'a> {
    data: &'a [f32],
    stride: usize,
    cols: usize,
}

impl Block<'_> {
    /// out[i][j] += alpha * sum over kk of a(i, kk) * panel[kk][j], the sums in order of kk,
    /// with the given kernel's fused multiply-adds.
    fn add_into(&self, kernel: Kernel, out: &mut Out, panel: &Panel) {
        let (k, cols) = (self.k, panel.cols);
        if k == 0 || cols == 0 {
            return;
        }
        assert!(cols % NC == 0 && out.live <= MR && cols <= out.row);
        assert!((out.live - 1) * out.row + cols <= out.data.len());
        assert!(self.first.iter().all(|&f| f + (k - 1) * self.step < self.a.len()));
        assert!((k - 1) * panel.stride + cols <= panel.data.len());
        match kernel {
            // Safety: the kernel's features were detected, and every index was checked above.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { x86::add_avx512(self, out, panel) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::add_avx2(self, out, panel) },
            Kernel::Portable => self.add_portable(out, panel),
        }
    }

    fn add_portable(&self, out: &mut Out, panel: &Panel) {
        for j0 in (0..panel.cols).step_by(NC) {
            let mut sums = [[0f32; NC]; MR];
            for kk in 0..self.k {
                let b = &panel.data[kk * panel.stride + j0..kk * panel.stride + j0 + NC];
                for (s, &f) in sums.iter_mut().zip(&self.first) {
                    let x = self.a[f + kk * self.step];
                    for j in 0..NC {
                        s[j] = fma(x, b[j], s[j]);
                    }
                }
            }
            for (i, s) in sums.iter().enumerate().take(out.live) {
                for (o, v) in out.data[i * out.row + j0..i * out.row + j0 + NC].iter_mut().zip(s) {
                    *o = fma(self.alpha, *v, *o);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Block, Out, Panel, MR, NC};
    use std::arch::x86_64::*;

    /// [`Block::add_into`] in 8 zmm sums per NC columns, two vectors of columns at a time where
    /// there are: each broadcast of a then serves two multiply-adds (the loads, not the
    /// arithmetic, bound these thin products). Safety: AVX-512F, and the indices checked by the
    /// caller.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn add_avx512(block: &Block, out: &mut Out, panel: &Panel) {
        let pairs = panel.cols / (2 * NC) * (2 * NC);
        for j0 in (0..pairs).step_by(2 * NC) {
            tile_avx512::<2>(block, out, panel, j0);
        }
        for j0 in (pairs..panel.cols).step_by(NC) {
            tile_avx512::<1>(block, out, panel, j0);
        }
    }

    /// The tile of MR rows and V vectors of columns from j0 of [`add_avx512`].
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_avx512<const V: usize>(block: &Block, out: &mut Out, panel: &Panel, j0: usize) {
        let (a, b, o) = (block.a.as_ptr(), panel.data.as_ptr(), out.data.as_mut_ptr());
        let mut s = [[_mm512_setzero_ps(); V]; MR];
        let mut bv = [_mm512_setzero_ps(); V];
        for kk in 0..block.k {
            for (h, v) in bv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(b.add(kk * panel.stride + j0 + NC * h));
            }
            for (i, si) in s.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add(block.first[i] + kk * block.step));
                for (sh, v) in si.iter_mut().zip(&bv) {
                    *sh = _mm512_fmadd_ps(x, *v, *sh);
                }
            }
        }
        let alpha = _mm512_set1_ps(block.alpha);
        for (i, si) in s.iter().enumerate().take(out.live) {
            for (h, sh) in si.iter().enumerate() {
                let p = o.add(i * out.row + j0 + NC * h);
                _mm512_storeu_ps(p, _mm512_fmadd_ps(alpha, *sh, _mm512_loadu_ps(p)));
            }
        }
    }

    /// [`Block::add_into`] in 16 ymm sums per NC columns. Safety: AVX2 and FMA, and the indices
    /// checked by the caller.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn add_avx2(block: &Block, out: &mut Out, panel: &Panel) {
        let (a, b, o) = (block.a.as_ptr(), panel.data.as_ptr(), out.data.as_mut_ptr());
        let alpha = _mm256_set1_ps(block.alpha);
        for j0 in (0..panel.cols).step_by(NC) {
            let mut s = [[_mm256_setzero_ps(); 2]; MR];
            for kk in 0..block.k {
                let bv = [0, 8].map(|h| _mm256_loadu_ps(b.add(kk * panel.stride + j0 + h)));
                for (i, si) in s.iter_mut().enumerate() {
                    let x = _mm256_set1_ps(*a.add(block.first[i] + kk * block.step));
                    for (sh, v) in si.iter_mut().zip(&bv) {
                        *sh = _mm256_fmadd_ps(x, *v, *sh);
                    }
                }
            }
            for (i, si) in s.iter().enumerate().take(out.live) {
                for (h, sh) in si.iter().enumerate() {
                    let p = o.add(i * out.row + j0 + 8 * h);
                    _mm256_storeu_ps(p, _mm256_fmadd_ps(alpha, *sh, _mm256_loadu_ps(p)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(shape: (usize, usize), seed: u32) -> Result<Tensor> {
        Tensor::from_vec(crate::testing::uniform(shape.0 * shape.1, seed, -1.0, 1.0), shape, &Device::Cpu)
    }

    fn max_diff(x: &Tensor, y: &Tensor) -> Result<f32> {
        (x - y)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn products_added_in_place_match_candles_on_ragged_shapes() -> Result<()> {
        // (m, k, n): thin in either dimension, rows and columns past whole tiles, large enough
        // for the pool and too small for it.
        for &(m, k, n) in
            &[(1, 1, 1), (3, 16, 5), (9, 16, 576), (240, 16, 1536), (240, 576, 16), (17, 240, 33), (16, 240, 576)]
        {
            let a = values((m, k), (m * 7 + k) as u32)?;
            let b = values((k, n), (k * 5 + n) as u32)?;
            let c = values((m, n), 3)?;
            let want = (&c + a.matmul(&b)?)?;
            add_product(&c, &a, &b)?;
            assert!(max_diff(&c, &want)? < 1e-4, "({m}, {k}, {n})");

            let at = a.t()?.contiguous()?; // (k, m)
            let c = values((m, n), 4)?;
            let want = (&c + (a.matmul(&b)? * 0.5)?)?;
            add_transposed_product(&c, &at, &b, 0.5)?;
            assert!(max_diff(&c, &want)? < 1e-4, "transposed ({m}, {k}, {n})");

            assert!(max_diff(&product(&a, &b)?, &a.matmul(&b)?)? < 1e-4, "new ({m}, {k}, {n})");
        }
        Ok(())
    }

    #[test]
    fn every_kernel_adds_the_same_product_in_place() {
        // (m, k, n) with a tail of columns and a ragged last block of rows, a read in place and
        // transposed.
        let (m, k, n) = (19, 24, 53);
        let (a, b) = (crate::testing::uniform(m * k, 1, -1.0, 1.0), crate::testing::uniform(k * n, 2, -1.0, 1.0));
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect(); // (k, m)
        let mut want = crate::testing::uniform(m * n, 3, -1.0, 1.0);
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] += 0.5 * (0..k).map(|kk| a[i * k + kk] * b[kk * n + j]).sum::<f32>();
            }
        }
        for kernel in Kernel::available() {
            for (data, row, step) in [(&a[..], k, 1), (&at[..], 1, m)] {
                let mut c = crate::testing::uniform(m * n, 3, -1.0, 1.0);
                run(&mut c, n, Strided { data, row, step }, &b, k, 0.5, kernel);
                let diff = c.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                assert!(diff < 1e-4, "{kernel:?}, a step {step}: {diff}");
            }
        }
    }

    #[test]
    fn a_product_whose_operands_do_not_fit_is_an_error_naming_the_shapes() -> Result<()> {
        let c = Tensor::zeros((4, 5), candle_core::DType::F32, &Device::Cpu)?;
        let err = add_product(&c, &values((4, 3), 1)?, &values((2, 5), 2)?).unwrap_err().to_string();
        assert!(err.contains("(4, 5) += (4, 3) @ (2, 5)"), "{err}");
        Ok(())
    }
}
