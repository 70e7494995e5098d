//! Matrix products for inference on the CPU in f32, from weights packed once at load time.
//!
//! Decoding multiplies a few dozen rows of activations by every weight of the model at each
//! step, so the speed of `x @ W^T` for a short, wide `x` decides the sampler's speed on a CPU.
//! A general matrix library re-packs the weight (or reads it with large strides) on every call;
//! here each weight is laid out once in column panels of [`NR`] columns, `panel[k][0..NR]`
//! contiguous, so that a micro-kernel streams a panel from the cache while it keeps an
//! [`MR`] x [`NR`] tile of the output in registers.
//!
//! Kernels: AVX-512 (8 x 48 tile in 24 vector registers), AVX2 + FMA, and portable Rust for
//! every other CPU (vectorised by the compiler). All compute the same sums in the same order
//! along `k`, so the result does not depend on how the work is split between threads.

use std::sync::{Arc, OnceLock};

use rayon::prelude::*;

/// Columns per panel: three 16-lane f32 vectors.
pub const NR: usize = 48;
/// Rows of the input per micro-tile.
pub const MR: usize = 8;
/// Rows of the input kept hot in the cache while all panels pass by.
const M_CHUNK: usize = 32 * MR;
/// Steps of k per slice of a panel (KC x NR floats, 768 KiB, within a core's L2), which stays in
/// the cache while every block of rows is multiplied by it. Only a long k is sliced (the loss's
/// vocabulary in its backward pass, where a whole panel was read from memory once per block of
/// rows); up to 4096 the product is as fast or faster whole.
const KC: usize = 4096;

/// One cache line of floats: the packed buffers are 64-byte aligned so vector loads never split.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// A (k, n) matrix stored as ceil(n / NR) column panels of k x NR floats (zero-padded columns).
pub struct PackedMatrix {
    k: usize,
    n: usize,
    lines: Vec<Line>,
    /// The transpose, packed on first use (the backward pass of training on the CPU).
    transposed: OnceLock<Arc<PackedMatrix>>,
}

impl PackedMatrix {
    /// Packs `W^T` from a weight `w` stored (n, k) row-major, as checkpoints store projections
    /// (out, in): the product is then `x @ W^T`.
    pub fn from_rows_out_in(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight of {} floats is not ({n}, {k})", w.len());
        if k * n >= 1 << 20 {
            return Self::pack(k, n, |kk, col| w[col * k + kk]);
        }
        // Small matrices (attention's keys and values, packed per row and head in training):
        // each of w's rows is one column of a panel.
        let mut packed = Self::zeros(k, n);
        for (col, row) in w.chunks_exact(k.max(1)).enumerate().take(n) {
            let (p, j) = (col / NR, col % NR);
            let panel = as_floats_mut(packed.panel_lines_mut(p));
            for (kk, &v) in row.iter().enumerate() {
                panel[kk * NR + j] = v;
            }
        }
        packed
    }

    /// Packs a (k, n) matrix `w` stored row-major: the product is then `x @ w`.
    pub fn from_rows_in_out(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "matrix of {} floats is not ({k}, {n})", w.len());
        if k * n >= 1 << 20 {
            return Self::pack(k, n, |kk, col| w[kk * n + col]);
        }
        // Small matrices: each row of w is a row of every panel, copied in pieces of NR.
        let mut packed = Self::zeros(k, n);
        for p in 0..n.div_ceil(NR) {
            let cols = NR.min(n - p * NR);
            let panel = as_floats_mut(packed.panel_lines_mut(p));
            for (kk, row) in w.chunks_exact(n.max(1)).enumerate().take(k) {
                panel[kk * NR..kk * NR + cols].copy_from_slice(&row[p * NR..p * NR + cols]);
            }
        }
        packed
    }

    /// A (k, n) matrix of zeros, packed.
    fn zeros(k: usize, n: usize) -> Self {
        let lines = vec![Line([0.0; 16]); n.div_ceil(NR) * k * NR / 16];
        PackedMatrix { k, n, lines, transposed: OnceLock::new() }
    }

    /// Panel p's lines, to fill.
    fn panel_lines_mut(&mut self, p: usize) -> &mut [Line] {
        let panel_lines = self.k * NR / 16;
        &mut self.lines[p * panel_lines..(p + 1) * panel_lines]
    }

    fn pack(k: usize, n: usize, at: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let panels = n.div_ceil(NR);
        let panel_lines = k * NR / 16;
        let mut lines = vec![Line([0.0; 16]); panels * panel_lines];
        let fill = |(p, panel): (usize, &mut [Line])| {
            let floats = as_floats_mut(panel);
            for kk in 0..k {
                for j in 0..NR {
                    let col = p * NR + j;
                    if col < n {
                        floats[kk * NR + j] = at(kk, col);
                    }
                }
            }
        };
        // Weights at load time are packed by all cores; small matrices (attention's keys and
        // values, packed inside the thread pool's tasks) on the calling thread.
        if k * n >= 1 << 20 {
            lines.par_chunks_mut(panel_lines).enumerate().for_each(fill);
        } else {
            lines.chunks_mut(panel_lines).enumerate().for_each(fill);
        }
        PackedMatrix { k, n, lines, transposed: OnceLock::new() }
    }

    /// Element (kk, col) of the (k, n) matrix.
    fn at(&self, kk: usize, col: usize) -> f32 {
        let floats = self.panel(col / NR);
        floats[kk * NR + col % NR]
    }

    /// The (n, k) transpose, packed once and kept: `y = x @ self^T` multiplies by the original
    /// weight, as the input gradient of a frozen projection does.
    pub fn transposed(&self) -> Arc<PackedMatrix> {
        self.transposed.get_or_init(|| Arc::new(Self::pack(self.n, self.k, |kk, col| self.at(col, kk)))).clone()
    }

    /// Inner dimension (input features).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    fn panel(&self, p: usize) -> &[f32] {
        let panel_lines = self.k * NR / 16;
        as_floats(&self.lines[p * panel_lines..(p + 1) * panel_lines])
    }

    /// y (m, n) = x (m, k) @ self, both row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(x, m, Kernel::best())
    }

    /// [`PackedMatrix::matmul`] with y's columns split into consecutive parts of `widths`
    /// (summing to n), each its own row-major (m, width) output: the products of projections
    /// stacked into one matrix come out separate, with no copy.
    pub fn matmul_parts(&self, x: &[f32], m: usize, widths: &[usize]) -> Vec<Vec<f32>> {
        self.matmul_parts_with(&[x], m, widths, Kernel::best())
    }

    /// [`PackedMatrix::matmul`] of x given as consecutive column parts `xs` (each (m, k_i),
    /// row-major, the k_i summing to k), as the joined gradients of projections stacked into one
    /// matrix are, with no copy: `[x1 | x2 | ..] @ self`, the same sums as the joined input's.
    pub fn matmul_joined(&self, xs: &[&[f32]], m: usize) -> Vec<f32> {
        self.matmul_parts_with(xs, m, &[self.n], Kernel::best()).pop().expect("one part")
    }

    fn matmul_with(&self, x: &[f32], m: usize, kernel: Kernel) -> Vec<f32> {
        self.matmul_parts_with(&[x], m, &[self.n], kernel).pop().expect("one part")
    }

    fn matmul_parts_with(&self, xs: &[&[f32]], m: usize, widths: &[usize], kernel: Kernel) -> Vec<Vec<f32>> {
        // Each input part's columns: (first step of k, k_i).
        let mut ranges = Vec::with_capacity(xs.len());
        let mut k = 0;
        for x in xs {
            let ki = x.len().checked_div(m).unwrap_or(0);
            assert_eq!(x.len(), m * ki, "input part of {} floats is not {m} rows", x.len());
            ranges.push((k, ki));
            k += ki;
        }
        assert_eq!(k, self.k, "inputs of {k} columns for a weight of {} rows", self.k);
        assert_eq!(widths.iter().sum::<usize>(), self.n, "parts {widths:?} do not make {} columns", self.n);
        // Not zeroed: the tiles below write every element (zeroing took a pass of its own).
        let mut ys: Vec<Vec<f32>> = widths.iter().map(|w| Vec::with_capacity(m * w)).collect();
        let out = Parts::new(&mut ys, widths);
        let flops = 2 * m * self.k * self.n;
        // Each chunk of rows: its first row, and each input part as (first step of k, k_i, blocks).
        type Chunk<'x> = (usize, Vec<(usize, usize, Blocks<'x>)>);
        let chunks: Vec<Chunk> = (0..m)
            .step_by(M_CHUNK)
            .map(|m0| {
                let rows = M_CHUNK.min(m - m0);
                let parts = xs
                    .iter()
                    .zip(&ranges)
                    .map(|(x, &(first, ki))| (first, ki, Blocks::new(&x[m0 * ki..(m0 + rows) * ki], rows, ki)))
                    .collect();
                (m0, parts)
            })
            .collect();
        let panels = self.panels();
        // Task i: panel i % panels of row chunk i / panels. The chunks' panels are one pool
        // call, so that a thread done with its share of one chunk goes on to the next rather
        // than wait at a barrier for the other.
        let tile = |i: usize| {
            let (m0, parts) = &chunks[i / panels];
            let (m0, p) = (*m0, i % panels);
            let rows = M_CHUNK.min(m - m0);
            let count = rows.div_ceil(MR);
            let full = rows / MR;
            let panel = self.panel(p);
            let cols = NR.min(self.n - p * NR);
            // A whole panel's columns inside one output part: its blocks of MR rows keep
            // their sums in the output itself; the others (the panel past n, or straddling
            // two parts, and a last block of fewer rows) in buffers copied there at the end.
            let direct = out.inside_one(p * NR, NR).filter(|_| cols == NR);
            let buffered = if direct.is_some() { count - full } else { count };
            let mut buffers = vec![[0f32; MR * NR]; buffered];
            let buffer_of = |b: usize| if direct.is_some() { b - full } else { b };
            let tiles: Vec<Tile> = (0..count)
                .map(|b| match direct {
                    // Safety: rows m0 + b * MR .. + MR of the part exist (b < full), and the
                    // tile's columns are this task's alone.
                    Some((y, width, col)) if b < full => {
                        Tile { ptr: unsafe { y.at((m0 + b * MR) * width + col) }, stride: width }
                    }
                    _ => Tile { ptr: buffers[buffer_of(b)].as_mut_ptr(), stride: NR },
                })
                .collect();
            // The next panel (the same thread's next task) is asked of memory a part per
            // block of rows, so that it is in the cache when its turn comes: a weight is read
            // once per product, from memory, and a core alone waits on each line it asks for.
            let next = (p + 1 < panels).then(|| self.panel(p + 1));
            // The panel a slice of k at a time (within an input part), each slice kept in the
            // cache while every block of rows passes over it; the tiles carry their sums from
            // slice to slice.
            for (first, ki, blocks) in parts {
                for k0 in (0..*ki).step_by(KC) {
                    let kc = KC.min(ki - k0);
                    let slice = &panel[(first + k0) * NR..(first + k0 + kc) * NR];
                    for (b, &tile) in tiles.iter().enumerate() {
                        let ask = match (next, first + k0) {
                            (Some(next), 0) => part_of(next, b, count),
                            _ => &[],
                        };
                        // Safety: each tile is this task's alone, and a first slice writes it
                        // before any later one adds to it.
                        unsafe { kernel.run(blocks.rows(b, k0), *ki, slice, kc, tile, first + k0 > 0, ask) };
                    }
                }
            }
            for b in (0..count).filter(|&b| direct.is_none() || b >= full) {
                let acc = &buffers[buffer_of(b)];
                let r0 = m0 + b * MR;
                for i in 0..MR.min(m - r0) {
                    // Safety: each (row, panel) tile of y is written by exactly one task.
                    unsafe { out.write(r0 + i, p * NR, &acc[i * NR..i * NR + cols]) };
                }
            }
        };
        let tasks = chunks.len() * panels;
        // Small products run on one thread: waking the pool costs more than it saves.
        if flops < 2_000_000 {
            (0..tasks).for_each(tile);
        } else {
            super::cpu::on_pool(tasks, |items| items.for_each(tile));
        }
        for (y, w) in ys.iter_mut().zip(widths) {
            // Safety: the (row, panel) tiles of all row chunks and panels cover every element of
            // every part, and each was written above.
            unsafe { y.set_len(m * w) };
        }
        ys
    }
}

/// The outputs of a product whose columns go to consecutive parts, shared by the tasks, each
/// of which writes its own tiles.
struct Parts {
    /// (first column, width, output) of each part.
    parts: Vec<(usize, usize, OutPtr)>,
}

impl Parts {
    fn new(outputs: &mut [Vec<f32>], widths: &[usize]) -> Self {
        let mut first = 0;
        let mut parts = Vec::with_capacity(widths.len());
        for (y, &w) in outputs.iter_mut().zip(widths) {
            parts.push((first, w, OutPtr(y.as_mut_ptr())));
            first += w;
        }
        Parts { parts }
    }

    /// The part that holds columns col..col + cols of the whole product, where one does: its
    /// output, its width and the first column's place in it.
    fn inside_one(&self, col: usize, cols: usize) -> Option<(OutPtr, usize, usize)> {
        let &(first, width, y) = self.parts.iter().find(|&&(first, width, _)| col >= first && col < first + width)?;
        (col + cols <= first + width).then_some((y, width, col - first))
    }

    /// Writes `values` at (row, col..) of the whole product, across parts where they straddle
    /// one's end. Safety: the place must lie inside the product, and no other task write it.
    unsafe fn write(&self, row: usize, col: usize, values: &[f32]) {
        let (mut col, mut values) = (col, values);
        for &(first, width, y) in &self.parts {
            if values.is_empty() {
                return;
            }
            if col >= first + width {
                continue;
            }
            let take = values.len().min(first + width - col);
            std::ptr::copy_nonoverlapping(values.as_ptr(), y.at(row * width + col - first), take);
            (col, values) = (col + take, &values[take..]);
        }
    }
}

/// The output pointer shared by the tasks, each of which writes its own tiles.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Safety: `offset` must lie inside the output.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

/// Rows of x (rows, k) in blocks of MR, read in place by the kernels (a row's floats are
/// contiguous, consecutive rows k apart). A last, short block is copied once with zero rows
/// below it, so that every block the kernels see has MR rows.
struct Blocks<'a> {
    x: &'a [f32],
    /// The last block padded with zero rows, where rows is not a multiple of MR.
    ragged: Option<Vec<f32>>,
    full: usize,
    k: usize,
}

impl<'a> Blocks<'a> {
    fn new(x: &'a [f32], rows: usize, k: usize) -> Self {
        let full = rows / MR;
        let ragged = (!rows.is_multiple_of(MR)).then(|| {
            let mut last = x[full * MR * k..rows * k].to_vec();
            last.resize(MR * k, 0.0);
            last
        });
        Blocks { x, ragged, full, k }
    }

    /// Block b's rows from column k0 on: the kernel reads row i's column k0 + kk at i * k + kk.
    fn rows(&self, b: usize, k0: usize) -> &[f32] {
        let block = match &self.ragged {
            Some(last) if b == self.full => &last[..],
            _ => &self.x[b * MR * self.k..(b + 1) * MR * self.k],
        };
        &block[k0..]
    }
}

/// Part `part` of `parts` of `floats`, in whole cache lines.
fn part_of(floats: &[f32], part: usize, parts: usize) -> &[f32] {
    let lines = floats.len().div_ceil(16);
    let (from, to) = (lines * part / parts, lines * (part + 1) / parts);
    &floats[(from * 16).min(floats.len())..(to * 16).min(floats.len())]
}

/// Asks for `floats` to be brought into the cache (L2), without waiting for them.
fn prefetch(floats: &[f32]) {
    for line in (0..floats.len()).step_by(16) {
        prefetch_line(floats, line);
    }
}

/// Asks for the cache line of `floats[at]` (L2). Safety of the call: a prefetch never faults,
/// and the address lies inside the slice.
#[inline(always)]
fn prefetch_line(floats: &[f32], at: usize) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(floats.as_ptr().add(at) as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (floats, at);
}

fn as_floats(lines: &[Line]) -> &[f32] {
    // Safety: Line is 16 f32 with no padding.
    unsafe { std::slice::from_raw_parts(lines.as_ptr() as *const f32, lines.len() * 16) }
}

fn as_floats_mut(lines: &mut [Line]) -> &mut [f32] {
    // Safety: Line is 16 f32 with no padding.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut f32, lines.len() * 16) }
}

/// The widest vectors this CPU has, which choose the micro-kernels here and the thin products'
/// in `ops::linear::cpu`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Kernel {
    /// Whether this is the AVX-512 kernel (which kernels elsewhere take as their cue).
    pub(crate) fn is_avx512(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self == Kernel::Avx512 {
            return true;
        }
        false
    }

    /// Detected once.
    pub(crate) fn best() -> Kernel {
        static BEST: OnceLock<Kernel> = OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    return Kernel::Avx512;
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    return Kernel::Avx2;
                }
            }
            Kernel::Portable
        })
    }

    /// Every kernel this CPU can run (for tests).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Kernel> {
        let mut v = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                v.push(Kernel::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                v.push(Kernel::Avx512);
            }
        }
        v
    }

    /// tile (MR, NR) = rows (MR, k) @ panel (k, NR), added to the tile's sums where `add`; row
    /// i's floats start at `rows[i * stride]`, and the tile's row i at `tile.at(i, 0)`. The
    /// sums run along k in order either way, so a product taken in slices of k is the whole
    /// one's.
    ///
    /// Safety: the tile's MR rows of NR floats lie inside memory that this call alone writes
    /// (and, where `add`, that holds floats).
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(self, rows: &[f32], stride: usize, panel: &[f32], k: usize, tile: Tile, add: bool, ask: &[f32]) {
        assert!(k <= stride && rows.len() >= (MR - 1) * stride + k && panel.len() >= k * NR);
        match self {
            // Safety: the feature was detected at run time before this variant was chosen.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => x86::tile_avx512(rows, stride, panel, k, tile, add, ask),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                prefetch(ask);
                x86::tile_avx2(rows, stride, panel, k, tile, add)
            }
            Kernel::Portable => {
                prefetch(ask);
                tile_portable(rows, stride, panel, k, tile, add)
            }
        }
    }
}

/// Where a kernel keeps its MR x NR sums: row i at `ptr + i * stride`. Either a tile of the
/// product's output itself or a buffer of the task's, copied to the output at the end.
#[derive(Clone, Copy)]
struct Tile {
    ptr: *mut f32,
    stride: usize,
}

impl Tile {
    /// Safety: (row, col) lies inside the tile's memory.
    #[inline(always)]
    unsafe fn at(self, row: usize, col: usize) -> *mut f32 {
        self.ptr.add(row * self.stride + col)
    }
}

/// The tile in plain Rust (added to its sums where `add`), as four row groups of two rows so
/// that the accumulators of one group fit in registers; the compiler vectorises the inner loop
/// over the NR columns. Safety: as for [`Kernel::run`].
#[inline(always)]
unsafe fn tile_portable(rows: &[f32], stride: usize, panel: &[f32], k: usize, tile: Tile, add: bool) {
    let load = |i: usize| -> [f32; NR] {
        match add {
            true => std::array::from_fn(|j| *tile.at(i, j)),
            false => [0f32; NR],
        }
    };
    for i0 in (0..MR).step_by(2) {
        let (mut a0, mut a1) = (load(i0), load(i0 + 1));
        for kk in 0..k {
            let w: &[f32; NR] = panel[kk * NR..(kk + 1) * NR].try_into().unwrap();
            let x0 = rows[i0 * stride + kk];
            let x1 = rows[(i0 + 1) * stride + kk];
            for j in 0..NR {
                a0[j] = fma(x0, w[j], a0[j]);
                a1[j] = fma(x1, w[j], a1[j]);
            }
        }
        std::ptr::copy_nonoverlapping(a0.as_ptr(), tile.at(i0, 0), NR);
        std::ptr::copy_nonoverlapping(a1.as_ptr(), tile.at(i0 + 1, 0), NR);
    }
}

/// a * b + c, fused where the target has the instruction (a library call would be slow).
#[inline(always)]
pub(crate) fn fma(a: f32, b: f32, c: f32) -> f32 {
    if cfg!(any(target_arch = "aarch64", target_feature = "fma")) {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Tile, MR, NR};
    use std::arch::x86_64::*;

    /// 8 rows x 48 columns in 24 zmm accumulators, added to the tile's sums where `add`; per
    /// step of k: 3 loads, 8 broadcasts (one from each row), 24 FMAs. Safety: rows holds MR
    /// rows `stride` apart of at least k floats, panel k * NR floats, and the tile is as for
    /// [`super::Kernel::run`].
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_avx512(
        rows: &[f32],
        stride: usize,
        panel: &[f32],
        k: usize,
        tile: Tile,
        add: bool,
        ask: &[f32],
    ) {
        // The lines of `ask` asked of memory evenly over the steps of k (a burst of them would
        // stall the core until the memory answers).
        let ask_lines = ask.len().div_ceil(16);
        let (mut asked, mut credit) = (0usize, 0usize);
        let mut c = [[_mm512_setzero_ps(); 3]; MR];
        if add {
            for (i, row) in c.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(tile.at(i, j * 16));
                }
            }
        }
        let xs: [*const f32; MR] = std::array::from_fn(|i| rows.as_ptr().add(i * stride));
        let wp = panel.as_ptr();
        for kk in 0..k {
            let w0 = _mm512_loadu_ps(wp.add(kk * NR));
            let w1 = _mm512_loadu_ps(wp.add(kk * NR + 16));
            let w2 = _mm512_loadu_ps(wp.add(kk * NR + 32));
            for (i, row) in c.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*xs[i].add(kk));
                row[0] = _mm512_fmadd_ps(x, w0, row[0]);
                row[1] = _mm512_fmadd_ps(x, w1, row[1]);
                row[2] = _mm512_fmadd_ps(x, w2, row[2]);
            }
            credit += ask_lines;
            while credit >= k && asked < ask_lines {
                super::prefetch_line(ask, asked * 16);
                (asked, credit) = (asked + 1, credit - k);
            }
        }
        super::prefetch(&ask[(asked * 16).min(ask.len())..]);
        for (i, row) in c.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                _mm512_storeu_ps(tile.at(i, j * 16), *v);
            }
        }
    }

    /// 4 rows x 24 columns in 12 ymm accumulators, four such sub-tiles per tile, added to the
    /// tile's sums where `add`. Safety: as for [`tile_avx512`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_avx2(rows: &[f32], stride: usize, panel: &[f32], k: usize, tile: Tile, add: bool) {
        let xs: [*const f32; MR] = std::array::from_fn(|i| rows.as_ptr().add(i * stride));
        let wp = panel.as_ptr();
        for i0 in (0..MR).step_by(4) {
            for j0 in (0..NR).step_by(24) {
                let mut c = [[_mm256_setzero_ps(); 3]; 4];
                if add {
                    for (i, row) in c.iter_mut().enumerate() {
                        for (j, v) in row.iter_mut().enumerate() {
                            *v = _mm256_loadu_ps(tile.at(i0 + i, j0 + j * 8));
                        }
                    }
                }
                for kk in 0..k {
                    let w0 = _mm256_loadu_ps(wp.add(kk * NR + j0));
                    let w1 = _mm256_loadu_ps(wp.add(kk * NR + j0 + 8));
                    let w2 = _mm256_loadu_ps(wp.add(kk * NR + j0 + 16));
                    for (i, row) in c.iter_mut().enumerate() {
                        let x = _mm256_set1_ps(*xs[i0 + i].add(kk));
                        row[0] = _mm256_fmadd_ps(x, w0, row[0]);
                        row[1] = _mm256_fmadd_ps(x, w1, row[1]);
                        row[2] = _mm256_fmadd_ps(x, w2, row[2]);
                    }
                }
                for (i, row) in c.iter().enumerate() {
                    for (j, v) in row.iter().enumerate() {
                        _mm256_storeu_ps(tile.at(i0 + i, j0 + j * 8), *v);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|kk| x[i * k + kk] as f64 * w[j * k + kk] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        crate::testing::uniform(len, seed, -1.0, 1.0)
    }

    #[test]
    fn every_kernel_matches_a_plain_product_on_ragged_shapes() {
        for kernel in Kernel::available() {
            for &(m, k, n) in &[
                (1, 1, 1),
                (1, 5, 47),
                (7, 13, 48),
                (8, 64, 49),
                (9, 100, 97),
                (33, 70, 200),
                (300, 17, 96),
                (20, 4500, 50),
            ] {
                let x = values(m * k, (m * 31 + k) as u32);
                let w = values(n * k, (n * 17 + k) as u32);
                let packed = PackedMatrix::from_rows_out_in(&w, n, k);
                let got = packed.matmul_with(&x, m, kernel);
                let want = naive(&x, &w, m, n, k);
                let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                // f32 sums of k products drift from the f64 ones by about k * 1e-8 at worst.
                let tolerance = 1e-4f32.max(k as f32 * 1e-7);
                assert!(diff < tolerance, "{kernel:?} ({m}, {k}, {n}): max abs diff {diff}");
            }
        }
    }

    #[test]
    fn the_transpose_multiplies_by_the_original_weight() {
        let (m, k, n) = (5, 70, 53);
        let w = values(n * k, 11); // (n, k): y = x @ w^T
        let packed = PackedMatrix::from_rows_out_in(&w, n, k);
        let g = values(m * n, 12); // (m, n) @ w (n, k) -> (m, k)
        let got = packed.transposed().matmul(&g, m);
        let mut want = vec![0f32; m * k];
        for i in 0..m {
            for j in 0..k {
                want[i * k + j] = (0..n).map(|c| g[i * n + c] as f64 * w[c * k + j] as f64).sum::<f64>() as f32;
            }
        }
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-4, "max abs diff {diff}");
    }

    #[test]
    fn an_input_given_in_column_parts_gives_the_joined_inputs_product_exactly() {
        for &(m, widths) in &[(3usize, &[5usize, 7][..]), (20, &[64, 4500, 30][..]), (9, &[48][..])] {
            let k: usize = widths.iter().sum();
            let n = 53;
            let w = values(n * k, 21);
            let packed = PackedMatrix::from_rows_out_in(&w, n, k);
            let x = values(m * k, 22);
            let mut parts: Vec<Vec<f32>> = widths.iter().map(|_| Vec::new()).collect();
            for row in x.chunks(k) {
                let mut at = 0;
                for (part, &wi) in parts.iter_mut().zip(widths) {
                    part.extend_from_slice(&row[at..at + wi]);
                    at += wi;
                }
            }
            let refs: Vec<&[f32]> = parts.iter().map(|p| &p[..]).collect();
            assert_eq!(packed.matmul_joined(&refs, m), packed.matmul(&x, m), "({m}, {widths:?})");
        }
    }

    #[test]
    fn a_matrix_packed_from_either_layout_gives_the_same_product() {
        for &(m, k, n) in &[(3usize, 5usize, 7usize), (9, 64, 60), (17, 60, 97), (2, 1, 48)] {
            let w = values(k * n, (k * 3 + n) as u32); // (k, n) row-major
            let mut wt = vec![0f32; n * k]; // (n, k) row-major
            for kk in 0..k {
                for col in 0..n {
                    wt[col * k + kk] = w[kk * n + col];
                }
            }
            let x = values(m * k, 5);
            let want = naive(&x, &wt, m, n, k);
            for packed in [PackedMatrix::from_rows_in_out(&w, k, n), PackedMatrix::from_rows_out_in(&wt, n, k)] {
                let got = packed.matmul(&x, m);
                let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff < 1e-4, "({m}, {k}, {n}): {diff}");
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_result_alone_or_in_a_batch() {
        let (k, n) = (96, 150);
        let x = values(40 * k, 3);
        let w = values(n * k, 4);
        let packed = PackedMatrix::from_rows_out_in(&w, n, k);
        let batch = packed.matmul(&x, 40);
        let alone = packed.matmul(&x[13 * k..14 * k], 1);
        assert_eq!(&batch[13 * n..14 * n], &alone[..]);
    }
}
