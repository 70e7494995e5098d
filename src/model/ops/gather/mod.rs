//! Rows of a tensor, differentiable, with a gather (not an index_add) for its backward pass.

use candle_core::{Result, Tensor};

use super::{attach, Backward};

#[cfg(feature = "cuda")]
pub mod cuda;

/// Rows `rows` (distinct, in any order) of x (M, D) -> (N, D), differentiable in x.
///
/// candle's `index_select` has this forward, but its backward is an index_add whose GPU kernel
/// runs one thread per column, each over every row: serial in the rows, the longest dimension.
/// Here the backward pass is a gather too: each row of x takes its gradient row through an
/// inverse index, or a zero row where it was not picked.
pub fn gather_rows(x: &Tensor, rows: &[u32]) -> Result<Tensor> {
    let m = x.dim(0)?;
    let n = rows.len();
    // inverse[r] = i where rows[i] = r, else n (the zero row appended to the gradient).
    let mut inverse = vec![n as u32; m];
    for (i, &r) in rows.iter().enumerate() {
        match inverse.get_mut(r as usize) {
            Some(slot) if *slot == n as u32 => *slot = i as u32,
            Some(_) => candle_core::bail!("gather_rows: row {r} is picked twice"),
            None => candle_core::bail!("gather_rows: row {r} of {m} rows"),
        }
    }
    let y = take_rows(&x.detach(), &Tensor::new(rows, x.device())?, false)?;
    attach(x, y, GatherRowsGrad { inverse: Tensor::new(inverse, x.device())? })
}

/// Rows idx of x (M, D); with `zero_rows`, an index M gives a row of zeros. One kernel on the
/// GPU, which takes either; one pass on the CPU's pool in f32.
pub(crate) fn take_rows(x: &Tensor, idx: &Tensor, zero_rows: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if cuda::take_rows_fits(x) {
        return cuda::take_rows(x, idx);
    }
    if crate::model::cpu::on_cpu_f32(&[x]) && x.rank() == 2 && x.dim(1)? > 0 {
        return take_rows_cpu(x, idx, zero_rows);
    }
    if !zero_rows {
        return x.index_select(idx, 0);
    }
    let zero = Tensor::zeros((1, x.dim(1)?), x.dtype(), x.device())?;
    Tensor::cat(&[x, &zero], 0)?.index_select(idx, 0)
}

/// [`take_rows`] of f32 rows on the CPU: each result row copied from its source row (or left at
/// zero) by the pool's task that writes it, where candle's index_select zeroes its result, then
/// copies, on the calling thread (after a copy of all of x beside a zero row, for `zero_rows`).
fn take_rows_cpu(x: &Tensor, idx: &Tensor, zero_rows: bool) -> Result<Tensor> {
    let (m, d) = x.dims2()?;
    let idx = idx.flatten_all()?.to_vec1::<u32>()?;
    if let (Some(&bad), false) = (idx.iter().find(|&&i| i as usize >= m), zero_rows) {
        candle_core::bail!("take-rows: row {bad} of {m} rows");
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let src = crate::model::cpu::cpu_slice(&storage, layout, "rows")?;
    // Chunks of whole rows, about 64 KiB each.
    let rows_per_chunk = (16_384 / d).max(1);
    let out = crate::model::cpu::filled_on_pool(idx.len() * d, rows_per_chunk * d, |first, chunk| {
        for (k, row) in chunk.chunks_mut(d).enumerate() {
            let i = idx[first / d + k] as usize;
            if i < m {
                row.copy_from_slice(&src[i * d..(i + 1) * d]);
            }
        }
    });
    Tensor::from_vec(out, (idx.len(), d), x.device())
}

struct GatherRowsGrad {
    inverse: Tensor, // (M,) u32
}

impl Backward for GatherRowsGrad {
    fn name(&self) -> &'static str {
        "gather-rows"
    }
    fn grad(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        take_rows(grad, &self.inverse, true)
    }
}

#[cfg(test)]
mod gather_tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn gathered_rows_have_the_gradient_of_index_select() -> Result<()> {
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (7, 5), &Device::Cpu)?)?;
        let w = Tensor::randn(0f64, 1.0, (4, 5), &Device::Cpu)?;
        let rows = [5u32, 0, 3, 6];
        let ours = gather_rows(x.as_tensor(), &rows)?;
        let plain = x.as_tensor().index_select(&Tensor::new(&rows[..], &Device::Cpu)?, 0)?;
        assert_eq!(ours.to_vec2::<f64>()?, plain.to_vec2::<f64>()?);
        let g_ours = (ours * &w)?.sum_all()?.backward()?.get(x.as_tensor()).unwrap().clone();
        let g_plain = (plain * &w)?.sum_all()?.backward()?.get(x.as_tensor()).unwrap().clone();
        assert_eq!(g_ours.to_vec2::<f64>()?, g_plain.to_vec2::<f64>()?);
        assert_eq!(g_ours.get(1)?.to_vec1::<f64>()?, vec![0.0; 5], "a row not picked gets no gradient");
        Ok(())
    }

    #[test]
    fn rows_taken_in_f32_on_the_cpu_are_index_selects_with_zero_rows_past_the_end() -> Result<()> {
        // Enough rows for several chunks of the pool.
        let x = Tensor::randn(0f32, 1.0, (3000, 9), &Device::Cpu)?;
        let idx: Vec<u32> = (0..5000u32).map(|i| (i * 7919) % 3001).collect();
        let got = take_rows(&x, &Tensor::new(idx.as_slice(), &Device::Cpu)?, true)?.to_vec2::<f32>()?;
        let padded = Tensor::cat(&[&x, &Tensor::zeros((1, 9), candle_core::DType::F32, &Device::Cpu)?], 0)?;
        let plain = padded.index_select(&Tensor::new(idx.as_slice(), &Device::Cpu)?, 0)?.to_vec2::<f32>()?;
        assert_eq!(got, plain);
        let past = Tensor::new(&[2u32, 3000], &Device::Cpu)?;
        assert!(take_rows(&x, &past, false).unwrap_err().to_string().contains("row 3000 of 3000 rows"));
        Ok(())
    }

    #[test]
    fn a_row_picked_twice_or_out_of_range_is_an_error() {
        let x = Tensor::zeros((3, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(gather_rows(&x, &[1, 1]).unwrap_err().to_string().contains("picked twice"));
        assert!(gather_rows(&x, &[3]).unwrap_err().to_string().contains("row 3 of 3"));
    }
}
