//! The GPU side of the frozen products: cuBLAS products accumulated in place, the f32 gradient
//! products of the adapter, and the LoRA term's bias column.

use crate::model::cuda::prelude::*;

/// `[z | 1 | 0..]` (N, width) for bf16 z (N, r), r < width, in one pass: an adapter's input
/// product beside its bias column. Where z is a view of every row's first r columns of a wider
/// tensor it is read in place.
pub fn augment(z: &Tensor, width: usize) -> Result<Tensor> {
    z.apply_op1_no_bwd(&Augment { width })
}

struct Augment {
    width: usize,
}

impl candle_core::CustomOp1 for Augment {
    fn name(&self) -> &'static str {
        "augment"
    }
    gpu_only!(1);
    fn cuda_fwd(&self, z: &CudaStorage, zl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = z.device().clone();
        let (&[n, r], &[zs, 1]) = (zl.dims(), zl.stride()) else {
            return Err(disagree(self.name(), &[zl.shape()]));
        };
        if r >= self.width || zs < r {
            return Err(disagree(self.name(), &[zl.shape(), &Shape::from((n, self.width))]));
        }
        // Rows n - 1 of zs elements and one of r: the view's extent.
        let start = zl.start_offset();
        let zv = z.as_cuda_slice::<bf16>()?.slice(start..start + n.saturating_sub(1) * zs + r);
        let out = unsafe { dev.alloc::<bf16>(n * self.width)? };
        let (zs64, n64, r32, w32) = (zs as i64, n as i64, r as i32, self.width as i32);
        launch!(dev, "augment_bf16", launch_elements(n * self.width), &zv, &zs64, &out, &n64, &r32, &w32);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, self.width))))
    }
}

/// `c += a b^T` (`b_transposed`: b is (M, K)) or `c += a b` (b is (K, M)), for c (N, M) and
/// a (N, K), all bf16 and contiguous on the GPU, as one cuBLAS product that accumulates into c
/// (f32 arithmetic, beta = 1). A product followed by an addition would make two more passes
/// over c, which for a (tokens x intermediate) output costs more than the adapter's products.
/// `c` changes in place: the caller must hold the only handle to it (a tensor it has just
/// computed and given to no one).
pub fn add_matmul(c: &Tensor, a: &Tensor, b: &Tensor, b_transposed: bool) -> Result<()> {
    c.inplace_op3(&a.contiguous()?, &b.contiguous()?, &AddMatmul { b_transposed })
}

struct AddMatmul {
    b_transposed: bool,
}

impl candle_core::InplaceOp3 for AddMatmul {
    fn name(&self) -> &'static str {
        "add-matmul"
    }

    gpu_only!(inplace 3);

    fn cuda_fwd(
        &self,
        c: &mut CudaStorage,
        cl: &Layout,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<()> {
        use candle_core::cuda_backend::cudarc::cublas::{sys::cublasOperation_t as Op, Gemm, GemmConfig};
        let ((n, m), (an, k)) = (rows_of(cl), rows_of(al));
        let (bm, bk) = if self.b_transposed { rows_of(bl) } else { (rows_of(bl).1, rows_of(bl).0) };
        if an != n || bm != m || bk != k {
            return Err(disagree(self.name(), &[cl.shape(), al.shape(), bl.shape()]));
        }
        let blas = c.device().cublas_handle();
        let (av, bv) = (view::<bf16>(a, al, "a")?, view::<bf16>(b, bl, "b")?);
        let mut cv = view_mut::<bf16>(c, cl, "c")?;
        // Row-major c (N, M) is column-major c^T (M, N) = op(b) a^T: cuBLAS's first operand is b.
        let (m, n, k) = (m as i32, n as i32, k as i32);
        let cfg = GemmConfig {
            transa: if self.b_transposed { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N },
            transb: Op::CUBLAS_OP_N,
            m,
            n,
            k,
            alpha: bf16::ONE,
            lda: if self.b_transposed { k } else { m },
            ldb: k,
            beta: bf16::ONE,
            ldc: m,
        };
        // Safety: the three views hold exactly the (M, K) or (K, M), (N, K) and (N, M) elements
        // the configuration reads and writes.
        unsafe { blas.gemm(cfg, &bv, &av, &mut cv) }.w()?;
        Ok(())
    }
}

/// `acc = alpha * x^T y + beta * acc` for x (N, M) and y (N, P) in bf16 and acc (M, P) in f32,
/// all contiguous on the GPU: an adapter's weight gradient as one cuBLAS product, scaled and
/// summed over micro-batches in f32 where it is written. A bf16 product followed by a scaling,
/// a cast to f32 and an addition would be four launches and three more passes per variable.
/// With `beta` 0, acc's old content is not read. `acc` changes in place (see [`add_matmul`]).
pub fn grad_product(acc: &Tensor, x: &Tensor, y: &Tensor, alpha: f32, beta: f32) -> Result<()> {
    acc.inplace_op3(&x.contiguous()?, &y.contiguous()?, &GradProduct { alpha, beta })
}

struct GradProduct {
    alpha: f32,
    beta: f32,
}

impl candle_core::InplaceOp3 for GradProduct {
    fn name(&self) -> &'static str {
        "grad-product"
    }

    gpu_only!(inplace 3);

    fn cuda_fwd(
        &self,
        acc: &mut CudaStorage,
        accl: &Layout,
        x: &CudaStorage,
        xl: &Layout,
        y: &CudaStorage,
        yl: &Layout,
    ) -> Result<()> {
        use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
        use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
        let ((n, m), (yn, p), (am, ap)) = (rows_of(xl), rows_of(yl), rows_of(accl));
        if yn != n || am != m || ap != p {
            return Err(disagree(self.name(), &[accl.shape(), xl.shape(), yl.shape()]));
        }
        let dev = x.device().clone();
        let (blas, stream) = (dev.cublas_handle(), dev.cuda_stream());
        let (xv, yv) = (view::<bf16>(x, xl, "x")?, view::<bf16>(y, yl, "y")?);
        let mut av = view_mut::<f32>(acc, accl, "the gradient")?;
        let ((xp, _rx), (yp, _ry), (ap_, _ra)) =
            (xv.device_ptr(&stream), yv.device_ptr(&stream), av.device_ptr_mut(&stream));
        // Row-major acc (M, P) is column-major acc^T (P, M) = y^T x, where row-major y (N, P) is
        // column-major (P, N) and row-major x (N, M) column-major (M, N), taken transposed.
        let (m, n, p) = (m as i32, n as i32, p as i32);
        // Safety: the views hold exactly the (N, M), (N, P) and (M, P) elements the product
        // reads and writes; alpha and beta are host values read during the call.
        unsafe {
            gemm_ex(
                *blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_N,
                sys::cublasOperation_t::CUBLAS_OP_T,
                p,
                m,
                n,
                (&self.alpha) as *const f32 as *const _,
                yp as *const _,
                sys::cudaDataType_t::CUDA_R_16BF,
                p,
                xp as *const _,
                sys::cudaDataType_t::CUDA_R_16BF,
                m,
                (&self.beta) as *const f32 as *const _,
                ap_ as *mut _,
                sys::cudaDataType_t::CUDA_R_32F,
                p,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .w()?;
        Ok(())
    }
}
