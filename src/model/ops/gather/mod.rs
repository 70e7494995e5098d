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
/// GPU, which takes either.
pub(crate) fn take_rows(x: &Tensor, idx: &Tensor, zero_rows: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if cuda::take_rows_fits(x) {
        return cuda::take_rows(x, idx);
    }
    if !zero_rows {
        return x.index_select(idx, 0);
    }
    let zero = Tensor::zeros((1, x.dim(1)?), x.dtype(), x.device())?;
    Tensor::cat(&[x, &zero], 0)?.index_select(idx, 0)
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
    fn a_row_picked_twice_or_out_of_range_is_an_error() {
        let x = Tensor::zeros((3, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(gather_rows(&x, &[1, 1]).unwrap_err().to_string().contains("picked twice"));
        assert!(gather_rows(&x, &[3]).unwrap_err().to_string().contains("row 3 of 3"));
    }
}
