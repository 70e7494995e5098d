//! What the GPU launchers of every op share: the PTX module of `kernels.cu` (compiled by
//! build.rs from the kernel files beside each op in `src/model/ops/<op>/`), launch shapes, views of
//! candle's storage, and the macros that launch a kernel and refuse the CPU. Each op's launchers
//! are in its folder's `cuda.rs`; they take contiguous bf16 (and u32 / f32) tensors on the GPU and
//! run one block of [`BLOCK`] threads per row, or a grid-stride loop for elementwise kernels.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CpuStorage, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Tensor};
use half::bf16;

pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
pub(crate) const BLOCK: u32 = 256;

pub(crate) fn launch_rows(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// One warp per row.
pub(crate) fn launch_warps(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((rows * 32).div_ceil(BLOCK as usize) as u32, 1, 1), ..launch_rows(1) }
}

pub(crate) fn launch_elements(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 65_536) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

pub(crate) fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    let (a, b) = offsets(l, what)?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// [`view`], writable: for the ops that update a tensor in place.
pub(crate) fn view_mut<'a, T: CudaDType>(s: &'a mut CudaStorage, l: &Layout, what: &str) -> Result<CudaViewMut<'a, T>> {
    let (a, b) = offsets(l, what)?;
    Ok(s.as_cuda_slice_mut::<T>()?.slice_mut(a..b))
}

/// Where a contiguous layout's elements start and end in its storage.
pub(crate) fn offsets(l: &Layout, what: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("fused kernel: {what} must be contiguous")))
}

/// Whether n bf16 elements at these (contiguous) layouts can be moved eight at a time: 16-byte
/// aligned (allocations are; a view's offset may not be) and a multiple of 8.
pub(crate) fn packed8(n: usize, layouts: &[&Layout]) -> bool {
    n.is_multiple_of(8) && layouts.iter().all(|l| l.start_offset().is_multiple_of(8))
}

/// (rows, width) of a layout taken as rows of its last dimension.
pub(crate) fn rows_of(l: &Layout) -> (usize, usize) {
    let width = *l.dims().last().unwrap_or(&1);
    (l.shape().elem_count() / width.max(1), width)
}

/// The error of an op given shapes that do not fit together.
pub(crate) fn disagree(name: &str, shapes: &[&Shape]) -> candle_core::Error {
    candle_core::Error::Msg(format!("{name}: shapes {shapes:?} do not agree"))
}

pub(crate) fn no_cpu(name: &str) -> Result<(CpuStorage, Shape)> {
    candle_core::bail!("{name}: a GPU kernel, called on the CPU")
}

/// The CPU side of a GPU-only custom op of 1, 2 or 3 inputs, or of an in-place op
/// (`inplace 2`, `inplace 3`): an error naming the op.
macro_rules! gpu_only {
    (inplace 2) => {
        fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
            no_cpu(self.name()).map(|_| ())
        }
    };
    (inplace 3) => {
#[rustfmt::skip]
        fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout)
            -> Result<()> {
            no_cpu(self.name()).map(|_| ())
        }
    };
    (1) => {
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            no_cpu(self.name())
        }
    };
    (2) => {
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            no_cpu(self.name())
        }
    };
    (3) => {
#[rustfmt::skip]
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout)
            -> Result<(CpuStorage, Shape)> {
            no_cpu(self.name())
        }
    };
}

macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let func = $dev.get_or_load_custom_func($name, "loralab_kernels", PTX)?;
        let mut builder = func.builder();
        $( builder.arg($arg); )+
        // Safety: the argument list matches the kernel's signature in its .cu file.
        unsafe { builder.launch($cfg) }.w()?;
    }};
}

/// [`launch!`] for a kernel that asks for more shared memory than the default 48 KiB.
macro_rules! launch_with_shared {
    ($dev:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
        let cfg: LaunchConfig = $cfg;
        let func = $dev.get_or_load_custom_func($name, "loralab_kernels", PTX)?;
        let limit = CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        func.set_attribute(limit, cfg.shared_mem_bytes as i32).w()?;
        let mut builder = func.builder();
        $( builder.arg($arg); )+
        // Safety: the argument list matches the kernel's signature in its .cu file.
        unsafe { builder.launch(cfg) }.w()?;
    }};
}

/// A soft cap as the kernels take it: 0 for none.
pub(crate) fn cap_arg(softcap: Option<f64>) -> f32 {
    softcap.unwrap_or(0.0) as f32
}

/// The device address of a contiguous f32 tensor's first element, for kernels that take many
/// tensors through a table. The tensor must outlive the launches that use it (allocations are
/// freed in stream order, so a tensor dropped after the launch is).
pub(crate) fn address(t: &Tensor, op: &str) -> Result<u64> {
    typed_address::<f32>(t, op)
}

/// [`address`] for a contiguous tensor of element type T (f32, bf16, u32) on the GPU: for
/// kernels that write into a tensor they do not return (a KV cache filled in place).
pub(crate) fn typed_address<T: CudaDType + candle_core::WithDType>(t: &Tensor, op: &str) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (storage, layout) = t.storage_and_layout();
    let (candle_core::Storage::Cuda(cs), Some((start, _)), true) =
        (&*storage, layout.contiguous_offsets(), t.dtype() == T::DTYPE)
    else {
        candle_core::bail!("{op}: {:?} must be a contiguous {} tensor on the GPU", t.shape(), T::DTYPE.as_str())
    };
    let slice = cs.as_cuda_slice::<T>()?;
    let (ptr, _sync) = slice.device_ptr(slice.stream());
    Ok(ptr + (start * std::mem::size_of::<T>()) as u64)
}

/// Whether the fused kernels apply: a bf16 tensor on the GPU.
pub fn applies(t: &Tensor) -> bool {
    t.device().is_cuda() && t.dtype() == DType::BF16
}

/// Stops candle from recording an event per tensor use: loralab runs every kernel on the
/// device's one stream, where the events order nothing and cost time at every launch.
pub fn single_stream(dev: &CudaDevice) {
    // Safety: all work is issued on this device's default stream (no other stream exists).
    unsafe { dev.disable_event_tracking() }
}

/// The GPU's free and total memory, in bytes. Waits for the GPU first: memory freed since
/// the last wait is held by the stream's pool until then, and would count as used.
pub fn memory(dev: &CudaDevice) -> Result<(usize, usize)> {
    use candle_core::cuda_backend::WrapErr;
    let stream = dev.cuda_stream();
    stream.synchronize().w()?;
    stream.context().mem_get_info().w()
}

pub(crate) fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(dev) => Ok(dev.clone()),
        _ => candle_core::bail!("a GPU kernel, called on the CPU"),
    }
}

pub(crate) fn bf16_view<'a>(s: &'a candle_core::Storage, l: &Layout, what: &str) -> Result<CudaView<'a, bf16>> {
    match s {
        candle_core::Storage::Cuda(c) => view::<bf16>(c, l, what),
        _ => candle_core::bail!("{what}: not on the GPU"),
    }
}

pub(crate) fn f32_view<'a>(s: &'a candle_core::Storage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
    match s {
        candle_core::Storage::Cuda(c) => view::<f32>(c, l, what),
        _ => candle_core::bail!("{what}: not on the GPU"),
    }
}

/// A freshly written GPU buffer as an untracked tensor.
pub(crate) fn wrap<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice, shape: Shape) -> Tensor {
    let storage = candle_core::Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape, candle_core::op::BackpropOp::none(), false)
}

pub(crate) use {gpu_only, launch, launch_with_shared};

/// What an op's launchers use: `use crate::model::cuda::prelude::*;`.
pub(crate) mod prelude {
    pub(crate) use super::{
        address, applies, bf16_view, cap_arg, cuda_device, disagree, f32_view, gpu_only, launch, launch_elements,
        launch_rows, launch_warps, launch_with_shared, no_cpu, packed8, rows_of, typed_address, view, view_mut, wrap,
        BLOCK, PTX,
    };
    pub(crate) use candle_core::backend::BackendStorage;
    pub(crate) use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
    pub(crate) use candle_core::cuda_backend::WrapErr;
    pub(crate) use candle_core::{CpuStorage, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Tensor};
    pub(crate) use half::bf16;
}
