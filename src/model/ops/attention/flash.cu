// Causal attention for training without the (T x T) scores in memory: each block holds a tile of
// rows in registers and streams the other side's tiles through shared memory, the products on
// the tensor cores (mma.sync m16n8k16, bf16 in, f32 accumulators). Included by src/model/cuda/kernels.cu.
//
// Layout: k, v (BK, T, E) roped (k), BK = B * KV; key s is visible to position t when s <= t.
// E is 64 or 128. The query side (q, out, dout, dq) comes in one of two layouts:
//   heads:  (BK, G*T, E), the G query heads of one kv head stacked, q roped;
//   merged: (B, T, H*E) with H = KV * G, as the projections make and take them. The forward
//           kernel takes q unroped, ropes it as it loads it (cos, sin (T, E/2)) and writes the
//           roped q (q_roped) for the backward kernels, which take that; dq is given the rope's
//           transpose on its way out.
//
// The forward kernel also writes lse2 (BK, G*T) f32, each row's log2(sum 2^(s * log2e)) of its
// scaled scores, from which the backward kernels recompute the probabilities exactly:
// p = 2^(score * scale * log2e - lse2). The backward pass is two kernels (no atomics): one per
// tile of rows for dq, one per tile of keys for dk and dv, which sums over the G heads.
//
// Fragments of m16n8k16, lane = 4 * gid + tig: A (16 x 16) a0 = A[gid][2tig, 2tig+1],
// a1 = A[gid+8][..], a2 = A[gid][2tig+8, +9], a3 = A[gid+8][2tig+8, +9]; B (16 x 8, k x n)
// b0 = B[2tig, 2tig+1][gid], b1 = B[2tig+8, +9][gid]; C (16 x 8) c0, c1 = C[gid][2tig, 2tig+1],
// c2, c3 = C[gid+8][2tig, 2tig+1]. Two C tiles side by side are one A tile: the probabilities
// computed as C become the next product's A without leaving the registers.

#define FA_ROWS 64      // rows (or keys) per block: 4 warps of 16
#define FA_THREADS 128
#define LOG2E 1.4426950408889634f

__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldsm_x4(uint32_t* r, const __nv_bfloat16* p) {
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t* r, const __nv_bfloat16* p) {
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// The A fragment of rows r0..r0+15, columns k0..k0+15 of a row-major tile in shared memory.
template <int P>
__device__ __forceinline__ void load_a(uint32_t* a, const __nv_bfloat16* tile, int r0, int k0, int lane) {
    int j = lane / 8, r = lane % 8;
    ldsm_x4(a, tile + (r0 + r + 8 * (j & 1)) * P + k0 + 8 * (j >> 1));
}

// B fragments where B[k][n] = X[n][k] for a row-major tile X (rows n): two n-tiles n0, n0+8 at
// k0..k0+15. b[0], b[1] serve n-tile n0; b[2], b[3] n-tile n0+8.
template <int P>
__device__ __forceinline__ void load_b_rows(uint32_t* b, const __nv_bfloat16* x, int n0, int k0, int lane) {
    int j = lane / 8, r = lane % 8;
    ldsm_x4(b, x + (n0 + r + 8 * (j >> 1)) * P + k0 + 8 * (j & 1));
}

// B fragments where B[k][n] = Y[k][n] for a row-major tile Y (rows k): two n-tiles n0, n0+8 at
// k0..k0+15, transposed by ldmatrix. b[0], b[1] serve n-tile n0; b[2], b[3] n-tile n0+8.
template <int P>
__device__ __forceinline__ void load_b_cols(uint32_t* b, const __nv_bfloat16* y, int k0, int n0, int lane) {
    int j = lane / 8, r = lane % 8;
    ldsm_x4_trans(b, y + (k0 + r + 8 * (j & 1)) * P + n0 + 8 * (j >> 1));
}

// Rows first..first+63 of rows of E elements, `stride` apart, into a shared tile; rows at or
// past `end` are zeros.
template <int E, int P>
__device__ __forceinline__ void load_tile(__nv_bfloat16* tile, const __nv_bfloat16* x, long first, long end,
                                          long stride = E) {
    constexpr int PER_ROW = E / 8;  // 16-byte pieces
    for (int i = threadIdx.x; i < FA_ROWS * PER_ROW; i += FA_THREADS) {
        int r = i / PER_ROW, c = (i % PER_ROW) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (first + r < end) v = *reinterpret_cast<const uint4*>(x + (first + r) * stride + c);
        *reinterpret_cast<uint4*>(tile + r * P + c) = v;
    }
}

// The inverse of load_tile: a shared tile's rows first.. (those before `end`) to rows `stride`
// apart.
template <int E, int P>
__device__ __forceinline__ void store_tile(__nv_bfloat16* x, const __nv_bfloat16* tile, long first, long end,
                                           long stride) {
    constexpr int PER_ROW = E / 8;
    for (int i = threadIdx.x; i < FA_ROWS * PER_ROW; i += FA_THREADS) {
        int r = i / PER_ROW, c = (i % PER_ROW) * 8;
        if (first + r < end)
            *reinterpret_cast<uint4*>(x + (first + r) * stride + c) = *reinterpret_cast<const uint4*>(tile + r * P + c);
    }
}

// The rope of positions t0.. applied to a shared tile of rows (rows at or past T untouched):
// element j of each row's first half turns against element j of its second half by the angle
// whose cos and sin are at (t, j) of the (T, E/2) tables, as the heads kernel does.
template <int E, int P>
__device__ __forceinline__ void rope_tile(__nv_bfloat16* tile, const __nv_bfloat16* cos, const __nv_bfloat16* sin,
                                          long t0, long T) {
    constexpr int HALF = E / 2;
    for (int i = threadIdx.x; i < FA_ROWS * HALF / 2; i += FA_THREADS) {
        int r = i / (HALF / 2), j = (i % (HALF / 2)) * 2;
        long t = t0 + r;
        if (t >= T) continue;
        __nv_bfloat162* lo = reinterpret_cast<__nv_bfloat162*>(tile + r * P + j);
        __nv_bfloat162* hi = reinterpret_cast<__nv_bfloat162*>(tile + r * P + HALF + j);
        float2 a = __bfloat1622float2(*lo), b = __bfloat1622float2(*hi);
        float2 c = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(cos + t * HALF + j));
        float2 s = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(sin + t * HALF + j));
        *lo = __floats2bfloat162_rn(a.x * c.x - b.x * s.x, a.y * c.y - b.y * s.y);
        *hi = __floats2bfloat162_rn(a.x * s.x + b.x * c.x, a.y * s.y + b.y * c.y);
    }
}

// Where a stream of rows of E elements lies. A pointer x: row j at x + j * E. Strided: row j at
// x + j * stride. KeyRows: in two runs, row j at head + j * E for j < split, at
// rest + (j - split) * E after it (decoding's prompt store and a row's own slot).
struct Strided {
    const __nv_bfloat16* x;
    long stride;
};

struct KeyRows {
    const __nv_bfloat16* head;
    const __nv_bfloat16* rest;
    int split;
};

template <int E>
__device__ __forceinline__ const __nv_bfloat16* row_at(const __nv_bfloat16* x, long j) {
    return x + j * E;
}

template <int E>
__device__ __forceinline__ const __nv_bfloat16* row_at(Strided x, long j) {
    return x.x + j * x.stride;
}

template <int E>
__device__ __forceinline__ const __nv_bfloat16* row_at(KeyRows x, long j) {
    return j < x.split ? x.head + j * E : x.rest + (j - x.split) * E;
}

// load_tile by cp.async from rows laid out as `Rows` (above): the copy runs while the block
// computes; wait for it with cp_async_wait and a barrier.
template <int E, int P, typename Rows>
__device__ __forceinline__ void fetch_tile(__nv_bfloat16* tile, Rows x, long first, long end) {
    constexpr int PER_ROW = E / 8;
    for (int i = threadIdx.x; i < FA_ROWS * PER_ROW; i += FA_THREADS) {
        int r = i / PER_ROW, c = (i % PER_ROW) * 8;
        bool in = first + r < end;
        uint32_t dst = (uint32_t)__cvta_generic_to_shared(tile + r * P + c);
        const __nv_bfloat16* src = row_at<E>(x, in ? first + r : 0) + c;
        // A source size of 0 fills the 16 bytes with zeros.
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(in ? 16 : 0));
    }
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }

// Waits until at most N of this thread's committed copies are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// The key and value tiles a block of query rows t0..t0+63 streams: up to its last visible key.
__device__ __forceinline__ int key_tiles(long t0, int T) {
    return (min((int)t0 + FA_ROWS, T) - 1) / FA_ROWS + 1;
}

// Starts streaming key and value tiles through two buffers each: tile 0 into the first.
template <int E, int P, typename Rows>
__device__ __forceinline__ void kv_stream_start(__nv_bfloat16* kbuf, __nv_bfloat16* vbuf, Rows kh, Rows vh, int T) {
    fetch_tile<E, P>(kbuf, kh, 0, T);
    fetch_tile<E, P>(vbuf, vh, 0, T);
    cp_async_commit();
}

// Tile `it` of `tiles` (into ks and vs) once it has arrived, the next one fetched meanwhile into
// the other buffers, whose last readers passed the barrier that ends each tile's use. Every
// thread of the block calls it, and each tile's use ends with __syncthreads().
template <int E, int P, typename Rows>
__device__ __forceinline__ void kv_stream_next(int it, int tiles, __nv_bfloat16* kbuf, __nv_bfloat16* vbuf, Rows kh,
                                               Rows vh, int T, __nv_bfloat16*& ks, __nv_bfloat16*& vs) {
    ks = kbuf + (it & 1) * FA_ROWS * P;
    vs = vbuf + (it & 1) * FA_ROWS * P;
    if (it + 1 < tiles) {
        fetch_tile<E, P>(kbuf + ((it + 1) & 1) * FA_ROWS * P, kh, (it + 1) * FA_ROWS, T);
        fetch_tile<E, P>(vbuf + ((it + 1) & 1) * FA_ROWS * P, vh, (it + 1) * FA_ROWS, T);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
}

// The block's tile of query rows: (g, t0..t0+63) of kv head bk.
struct RowTile {
    long bk, g, t0;
};

// The last tiles first: they see the most keys, and the short work of the first tiles then fills
// the GPU's last wave of blocks.
__device__ __forceinline__ RowTile row_tile(int T) {
    int tiles = (T + FA_ROWS - 1) / FA_ROWS;
    return RowTile{(long)blockIdx.y, (long)(blockIdx.x / tiles), (long)(tiles - 1 - blockIdx.x % tiles) * FA_ROWS};
}

// Where query head (bk, g)'s rows are: row t at element first + t * step of q, out, dout and dq,
// and at (first + t * step) / E of lse2 and D.
struct QRows {
    long first, step;
};

__device__ __forceinline__ QRows q_rows(long bk, long g, int T, int G, int KV, int merged, int E) {
    if (!merged) return QRows{(bk * G + g) * T * E, E};
    long b = bk / KV, kvh = bk % KV, h = kvh * G + g, H = (long)KV * G;
    return QRows{(b * T * H + h) * E, H * E};
}

// Forward: out and lse2 of one tile of 64 query rows. Grid (G * ceil(T/64), BK), 128 threads,
// shared memory 4 * 64 * (E + 8) bf16: two buffers of key and value tiles, the next fetched
// while the current is used.
template <int E>
__device__ void flash_forward(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                              __nv_bfloat16* out, float* lse2, int T, int G, float scale, int KV, int merged,
                              const __nv_bfloat16* cos, const __nv_bfloat16* sin, __nv_bfloat16* q_roped) {
    constexpr int P = E + 8;  // padded rows: ldmatrix reads 8 rows without bank conflicts
    extern __shared__ __align__(16) unsigned char fa_smem[];
    __nv_bfloat16* kbuf = reinterpret_cast<__nv_bfloat16*>(fa_smem);
    __nv_bfloat16* vbuf = kbuf + 2 * FA_ROWS * P;
    __nv_bfloat16 *ks = kbuf, *vs = vbuf;  // the tiles in use
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
    RowTile tile = row_tile(T);
    QRows rows = q_rows(tile.bk, tile.g, T, G, KV, merged, E);
    const __nv_bfloat16* kh = k + tile.bk * T * E;
    const __nv_bfloat16* vh = v + tile.bk * T * E;

    // The warp's 16 query rows as A fragments, staged through the key tile's space.
    uint32_t qa[E / 16][4];
    load_tile<E, P>(ks, q + rows.first, tile.t0, T, rows.step);
    __syncthreads();
    if (merged) {
        rope_tile<E, P>(ks, cos, sin, tile.t0, T);
        __syncthreads();
        store_tile<E, P>(q_roped + rows.first, ks, tile.t0, T, rows.step);
    }
    for (int kk = 0; kk < E / 16; ++kk) load_a<P>(qa[kk], ks, warp * 16, kk * 16, lane);
    __syncthreads();

    const float s2 = scale * LOG2E;
    int t_lo = (int)tile.t0 + warp * 16 + gid, t_hi = t_lo + 8;  // this thread's two rows
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;
    float o[E / 8][4];
    for (int n = 0; n < E / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    int tiles = key_tiles(tile.t0, T);
    kv_stream_start<E, P>(kbuf, vbuf, kh, vh, T);
    for (int it = 0; it < tiles; ++it) {
        int s0 = it * FA_ROWS;
        kv_stream_next<E, P>(it, tiles, kbuf, vbuf, kh, vh, T, ks, vs);
        // S = Q K^T: 16 rows x 64 keys per warp.
        float s[8][4];
        for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
        for (int kk = 0; kk < E / 16; ++kk) {
            for (int np = 0; np < 4; ++np) {
                uint32_t b[4];
                load_b_rows<P>(b, ks, np * 16, kk * 16, lane);
                mma16816(s[2 * np], qa[kk], b[0], b[1]);
                mma16816(s[2 * np + 1], qa[kk], b[2], b[3]);
            }
        }
        // Online softmax in base 2, hidden keys at -inf.
        float mx_lo = -INFINITY, mx_hi = -INFINITY;
        for (int n = 0; n < 8; ++n) {
            int key = s0 + n * 8 + 2 * tig;
            s[n][0] = key <= t_lo ? s[n][0] * s2 : -INFINITY;
            s[n][1] = key + 1 <= t_lo ? s[n][1] * s2 : -INFINITY;
            s[n][2] = key <= t_hi ? s[n][2] * s2 : -INFINITY;
            s[n][3] = key + 1 <= t_hi ? s[n][3] * s2 : -INFINITY;
            mx_lo = fmaxf(mx_lo, fmaxf(s[n][0], s[n][1]));
            mx_hi = fmaxf(mx_hi, fmaxf(s[n][2], s[n][3]));
        }
        for (int o_ = 1; o_ < 4; o_ <<= 1) {
            mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffff, mx_lo, o_));
            mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffff, mx_hi, o_));
        }
        float new_lo = fmaxf(m_lo, mx_lo), new_hi = fmaxf(m_hi, mx_hi);
        // A row that has seen no visible key yet keeps -inf; its factors must not be NaN.
        float base_lo = new_lo == -INFINITY ? 0.f : new_lo, base_hi = new_hi == -INFINITY ? 0.f : new_hi;
        float c_lo = exp2f(m_lo - base_lo), c_hi = exp2f(m_hi - base_hi);
        float sum_lo = 0.f, sum_hi = 0.f;
        for (int n = 0; n < 8; ++n) {
            s[n][0] = exp2f(s[n][0] - base_lo);
            s[n][1] = exp2f(s[n][1] - base_lo);
            s[n][2] = exp2f(s[n][2] - base_hi);
            s[n][3] = exp2f(s[n][3] - base_hi);
            sum_lo += s[n][0] + s[n][1];
            sum_hi += s[n][2] + s[n][3];
        }
        l_lo = l_lo * c_lo + sum_lo;
        l_hi = l_hi * c_hi + sum_hi;
        m_lo = new_lo;
        m_hi = new_hi;
        for (int n = 0; n < E / 8; ++n) {
            o[n][0] *= c_lo;
            o[n][1] *= c_lo;
            o[n][2] *= c_hi;
            o[n][3] *= c_hi;
        }
        // O += P V, P from the registers.
        for (int kk = 0; kk < 4; ++kk) {
            uint32_t pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                              pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            for (int np = 0; np < E / 16; ++np) {
                uint32_t b[4];
                load_b_cols<P>(b, vs, kk * 16, np * 16, lane);
                mma16816(o[2 * np], pa, b[0], b[1]);
                mma16816(o[2 * np + 1], pa, b[2], b[3]);
            }
        }
        __syncthreads();  // the tiles are reloaded next
    }
    // Row sums over the quad of lanes that share a row.
    for (int o_ = 1; o_ < 4; o_ <<= 1) {
        l_lo += __shfl_xor_sync(0xffffffff, l_lo, o_);
        l_hi += __shfl_xor_sync(0xffffffff, l_hi, o_);
    }
    float inv_lo = 1.f / l_lo, inv_hi = 1.f / l_hi;
    for (int n = 0; n < E / 8; ++n) {
        int col = n * 8 + 2 * tig;
        if (t_lo < T)
            *reinterpret_cast<uint32_t*>(out + rows.first + t_lo * rows.step + col) =
                pack_bf16(o[n][0] * inv_lo, o[n][1] * inv_lo);
        if (t_hi < T)
            *reinterpret_cast<uint32_t*>(out + rows.first + t_hi * rows.step + col) =
                pack_bf16(o[n][2] * inv_hi, o[n][3] * inv_hi);
    }
    if (tig == 0) {
        if (t_lo < T) lse2[(rows.first + t_lo * rows.step) / E] = m_lo + log2f(l_lo);
        if (t_hi < T) lse2[(rows.first + t_hi * rows.step) / E] = m_hi + log2f(l_hi);
    }
}

// dq of one tile of 64 query rows: dq = scale * sum over keys of dS K, with
// P = 2^(S * scale * log2e - lse2), dS = P * (dO V^T - D), D = rowsum(dO * O) given.
// Grid and shared memory as the forward kernel's.
template <int E>
__device__ void flash_dq(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                         const __nv_bfloat16* dout, const float* lse2, const float* D, __nv_bfloat16* dq, int T,
                         int G, float scale, int KV, int merged, const __nv_bfloat16* cos,
                         const __nv_bfloat16* sin) {
    constexpr int P = E + 8;
    extern __shared__ __align__(16) unsigned char fa_smem[];
    __nv_bfloat16* kbuf = reinterpret_cast<__nv_bfloat16*>(fa_smem);
    __nv_bfloat16* vbuf = kbuf + 2 * FA_ROWS * P;
    __nv_bfloat16 *ks = kbuf, *vs = vbuf;  // the tiles in use
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
    RowTile tile = row_tile(T);
    QRows rows = q_rows(tile.bk, tile.g, T, G, KV, merged, E);
    const __nv_bfloat16* kh = k + tile.bk * T * E;
    const __nv_bfloat16* vh = v + tile.bk * T * E;

    uint32_t qa[E / 16][4], da[E / 16][4];
    load_tile<E, P>(ks, q + rows.first, tile.t0, T, rows.step);
    load_tile<E, P>(vs, dout + rows.first, tile.t0, T, rows.step);
    __syncthreads();
    for (int kk = 0; kk < E / 16; ++kk) {
        load_a<P>(qa[kk], ks, warp * 16, kk * 16, lane);
        load_a<P>(da[kk], vs, warp * 16, kk * 16, lane);
    }
    __syncthreads();

    const float s2 = scale * LOG2E;
    int t_lo = (int)tile.t0 + warp * 16 + gid, t_hi = t_lo + 8;
    long r_lo = (rows.first + t_lo * rows.step) / E, r_hi = (rows.first + t_hi * rows.step) / E;
    float l_lo = t_lo < T ? lse2[r_lo] : INFINITY, l_hi = t_hi < T ? lse2[r_hi] : INFINITY;
    float d_lo = t_lo < T ? D[r_lo] : 0.f, d_hi = t_hi < T ? D[r_hi] : 0.f;
    float acc[E / 8][4];
    for (int n = 0; n < E / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    int tiles = key_tiles(tile.t0, T);
    kv_stream_start<E, P>(kbuf, vbuf, kh, vh, T);
    for (int it = 0; it < tiles; ++it) {
        int s0 = it * FA_ROWS;
        kv_stream_next<E, P>(it, tiles, kbuf, vbuf, kh, vh, T, ks, vs);
        float s[8][4], dp[8][4];
        for (int n = 0; n < 8; ++n)
            for (int i = 0; i < 4; ++i) s[n][i] = dp[n][i] = 0.f;
        for (int kk = 0; kk < E / 16; ++kk) {
            for (int np = 0; np < 4; ++np) {
                uint32_t b[4];
                load_b_rows<P>(b, ks, np * 16, kk * 16, lane);
                mma16816(s[2 * np], qa[kk], b[0], b[1]);
                mma16816(s[2 * np + 1], qa[kk], b[2], b[3]);
                load_b_rows<P>(b, vs, np * 16, kk * 16, lane);
                mma16816(dp[2 * np], da[kk], b[0], b[1]);
                mma16816(dp[2 * np + 1], da[kk], b[2], b[3]);
            }
        }
        // dS = P * (dP - D), hidden keys 0.
        for (int n = 0; n < 8; ++n) {
            int key = s0 + n * 8 + 2 * tig;
            s[n][0] = key <= t_lo ? exp2f(s[n][0] * s2 - l_lo) * (dp[n][0] - d_lo) : 0.f;
            s[n][1] = key + 1 <= t_lo ? exp2f(s[n][1] * s2 - l_lo) * (dp[n][1] - d_lo) : 0.f;
            s[n][2] = key <= t_hi ? exp2f(s[n][2] * s2 - l_hi) * (dp[n][2] - d_hi) : 0.f;
            s[n][3] = key + 1 <= t_hi ? exp2f(s[n][3] * s2 - l_hi) * (dp[n][3] - d_hi) : 0.f;
        }
        // dQ += dS K
        for (int kk = 0; kk < 4; ++kk) {
            uint32_t pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                              pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            for (int np = 0; np < E / 16; ++np) {
                uint32_t b[4];
                load_b_cols<P>(b, ks, kk * 16, np * 16, lane);
                mma16816(acc[2 * np], pa, b[0], b[1]);
                mma16816(acc[2 * np + 1], pa, b[2], b[3]);
            }
        }
        __syncthreads();
    }
    if (merged) {
        // The rope's transpose (the opposite angle) on dq: column c of the first half pairs with
        // c + E/2, held by this thread in tile n + E/16.
        constexpr int HALF = E / 2;
        for (int n = 0; n < E / 16; ++n) {
            int c = n * 8 + 2 * tig;
            for (int i = 0; i < 4; ++i) {
                long t = i < 2 ? t_lo : t_hi;
                if (t >= T) continue;
                float cs = __bfloat162float(cos[t * HALF + c + (i & 1)]);
                float sn = __bfloat162float(sin[t * HALF + c + (i & 1)]);
                float a = acc[n][i], b = acc[n + E / 16][i];
                acc[n][i] = a * cs + b * sn;
                acc[n + E / 16][i] = b * cs - a * sn;
            }
        }
    }
    for (int n = 0; n < E / 8; ++n) {
        int col = n * 8 + 2 * tig;
        if (t_lo < T)
            *reinterpret_cast<uint32_t*>(dq + rows.first + t_lo * rows.step + col) =
                pack_bf16(acc[n][0] * scale, acc[n][1] * scale);
        if (t_hi < T)
            *reinterpret_cast<uint32_t*>(dq + rows.first + t_hi * rows.step + col) =
                pack_bf16(acc[n][2] * scale, acc[n][3] * scale);
    }
}

// dk and dv of one tile of 64 keys from one query head g, summed over the positions that see
// them: dv = P^T dO, dk = scale * dS^T Q, written in f32 to (G, BK, T, E) parts that the caller
// sums over g. One block per head rather than per kv head: the first key tiles are seen by many
// more rows than the last, and G times more, smaller blocks keep the GPU evenly busy.
// Grid (ceil(T/64), BK * G), 128 threads, shared memory 6 * 64 * (E + 8) bf16 + 4 * 64 f32:
// the key and value tiles, and two buffers of the rows' tiles (q, dout, lse2, D).
// Each warp holds 16 keys; the rows come 64 at a time and are taken 32 at a time.
template <int E>
__device__ void flash_dkv(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                          const __nv_bfloat16* dout, const float* lse2, const float* D, float* dk, float* dv,
                          int T, int G, float scale, int KV, int merged, const __nv_bfloat16* cos,
                          const __nv_bfloat16* sin) {
    constexpr int P = E + 8;
    extern __shared__ __align__(16) unsigned char fa_smem[];
    __nv_bfloat16* ks = reinterpret_cast<__nv_bfloat16*>(fa_smem);
    __nv_bfloat16* vs = ks + FA_ROWS * P;
    __nv_bfloat16* qbuf = vs + FA_ROWS * P;
    __nv_bfloat16* dobuf = qbuf + 2 * FA_ROWS * P;
    float* lbuf = reinterpret_cast<float*>(dobuf + 2 * FA_ROWS * P);
    float* dbuf = lbuf + 2 * FA_ROWS;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
    long bk = blockIdx.y / G, g = blockIdx.y % G;
    int s0 = blockIdx.x * FA_ROWS;
    const __nv_bfloat16* kh = k + bk * T * E;
    const __nv_bfloat16* vh = v + bk * T * E;
    load_tile<E, P>(ks, kh, s0, T);
    load_tile<E, P>(vs, vh, s0, T);

    const float s2 = scale * LOG2E;
    int key_lo = s0 + warp * 16 + gid, key_hi = key_lo + 8;  // this thread's two keys
    float dka[E / 8][4], dva[E / 8][4];
    for (int n = 0; n < E / 8; ++n)
        for (int i = 0; i < 4; ++i) dka[n][i] = dva[n][i] = 0.f;
    {
        QRows rows = q_rows(bk, g, T, G, KV, merged, E);
        // Rows t0.. into buffer b: q and dout by cp.async, lse2 and D by plain stores.
        auto fetch = [&](int b, int t0) {
            fetch_tile<E, P>(qbuf + b * FA_ROWS * P, Strided{q + rows.first, rows.step}, t0, T);
            fetch_tile<E, P>(dobuf + b * FA_ROWS * P, Strided{dout + rows.first, rows.step}, t0, T);
            for (int i = threadIdx.x; i < FA_ROWS; i += FA_THREADS) {
                bool in = t0 + i < T;
                long r = (rows.first + (t0 + i) * rows.step) / E;
                lbuf[b * FA_ROWS + i] = in ? lse2[r] : INFINITY;
                dbuf[b * FA_ROWS + i] = in ? D[r] : 0.f;
            }
        };
        int tiles = (T - s0 + FA_ROWS - 1) / FA_ROWS;
        fetch(0, s0);
        cp_async_commit();
        for (int it = 0; it < tiles; ++it) {
            int t0 = s0 + it * FA_ROWS, b = it & 1;
            if (it + 1 < tiles) fetch(b ^ 1, t0 + FA_ROWS);  // its last readers passed the barrier
            cp_async_commit();
            cp_async_wait<1>();
            __syncthreads();
            const __nv_bfloat16 *qs = qbuf + b * FA_ROWS * P, *dos = dobuf + b * FA_ROWS * P;
            const float *ls = lbuf + b * FA_ROWS, *ds = dbuf + b * FA_ROWS;
            for (int half = 0; half < 2; ++half) {
                int r0 = half * 32;  // rows r0..r0+31 of the tile
                if (t0 + r0 + 31 < s0) continue;  // all hidden from this block's keys
                // S^T = K Q^T and dP^T = V dO^T: 16 keys x 32 rows per warp.
                float st[4][4], dpt[4][4];
                for (int n = 0; n < 4; ++n)
                    for (int i = 0; i < 4; ++i) st[n][i] = dpt[n][i] = 0.f;
                for (int kk = 0; kk < E / 16; ++kk) {
                    uint32_t ka[4], va[4];
                    load_a<P>(ka, ks, warp * 16, kk * 16, lane);
                    load_a<P>(va, vs, warp * 16, kk * 16, lane);
                    for (int np = 0; np < 2; ++np) {
                        uint32_t b[4];
                        load_b_rows<P>(b, qs, r0 + np * 16, kk * 16, lane);
                        mma16816(st[2 * np], ka, b[0], b[1]);
                        mma16816(st[2 * np + 1], ka, b[2], b[3]);
                        load_b_rows<P>(b, dos, r0 + np * 16, kk * 16, lane);
                        mma16816(dpt[2 * np], va, b[0], b[1]);
                        mma16816(dpt[2 * np + 1], va, b[2], b[3]);
                    }
                }
                // P^T and dS^T; column j of these tiles is row r0 + j, position t0 + r0 + j.
                for (int n = 0; n < 4; ++n) {
                    int j = r0 + n * 8 + 2 * tig, t = t0 + j;
                    float l0 = ls[j], l1 = ls[j + 1], d0 = ds[j], d1 = ds[j + 1];
                    float p0 = key_lo <= t ? exp2f(st[n][0] * s2 - l0) : 0.f;
                    float p1 = key_lo <= t + 1 ? exp2f(st[n][1] * s2 - l1) : 0.f;
                    float p2 = key_hi <= t ? exp2f(st[n][2] * s2 - l0) : 0.f;
                    float p3 = key_hi <= t + 1 ? exp2f(st[n][3] * s2 - l1) : 0.f;
                    st[n][0] = p0;
                    st[n][1] = p1;
                    st[n][2] = p2;
                    st[n][3] = p3;
                    dpt[n][0] = p0 * (dpt[n][0] - d0);
                    dpt[n][1] = p1 * (dpt[n][1] - d1);
                    dpt[n][2] = p2 * (dpt[n][2] - d0);
                    dpt[n][3] = p3 * (dpt[n][3] - d1);
                }
                // dV += P^T dO and dK += dS^T Q, over the 32 rows.
                for (int kk = 0; kk < 2; ++kk) {
                    uint32_t pa[4] = {pack_bf16(st[2 * kk][0], st[2 * kk][1]), pack_bf16(st[2 * kk][2], st[2 * kk][3]),
                                      pack_bf16(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                                      pack_bf16(st[2 * kk + 1][2], st[2 * kk + 1][3])};
                    uint32_t sa[4] = {pack_bf16(dpt[2 * kk][0], dpt[2 * kk][1]),
                                      pack_bf16(dpt[2 * kk][2], dpt[2 * kk][3]),
                                      pack_bf16(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                                      pack_bf16(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
                    for (int np = 0; np < E / 16; ++np) {
                        uint32_t b[4];
                        load_b_cols<P>(b, dos, r0 + kk * 16, np * 16, lane);
                        mma16816(dva[2 * np], pa, b[0], b[1]);
                        mma16816(dva[2 * np + 1], pa, b[2], b[3]);
                        load_b_cols<P>(b, qs, r0 + kk * 16, np * 16, lane);
                        mma16816(dka[2 * np], sa, b[0], b[1]);
                        mma16816(dka[2 * np + 1], sa, b[2], b[3]);
                    }
                }
            }
            __syncthreads();  // buffer b is fetched into next
        }
    }
    long part = ((g * gridDim.y / G + bk) * T) * E;  // (g, bk) of the (G, BK, T, E) parts
    for (int n = 0; n < E / 8; ++n) {
        int col = n * 8 + 2 * tig;
        if (key_lo < T) {
            *reinterpret_cast<float2*>(dk + part + key_lo * E + col) = make_float2(dka[n][0] * scale, dka[n][1] * scale);
            *reinterpret_cast<float2*>(dv + part + key_lo * E + col) = make_float2(dva[n][0], dva[n][1]);
        }
        if (key_hi < T) {
            *reinterpret_cast<float2*>(dk + part + key_hi * E + col) = make_float2(dka[n][2] * scale, dka[n][3] * scale);
            *reinterpret_cast<float2*>(dv + part + key_hi * E + col) = make_float2(dva[n][2], dva[n][3]);
        }
    }
}

// out[i] = sum over p < parts of x[p * n + i], in f32, written as bf16: the dk and dv parts.
extern "C" __global__ void sum_parts_bf16(const float* x, __nv_bfloat16* out, long n, int parts) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float sum = 0.f;
        for (int p = 0; p < parts; ++p) sum += x[p * n + i];
        out[i] = __float2bfloat16(sum);
    }
}

#define FLASH_ROPE int KV, int merged, const __nv_bfloat16 *cos, const __nv_bfloat16 *sin
#define FLASH_KERNELS(E)                                                                                         \
    extern "C" __global__ void __launch_bounds__(FA_THREADS)                                                    \
        flash_forward_##E(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,             \
                          __nv_bfloat16* out, float* lse2, int T, int G, float scale, FLASH_ROPE,              \
                          __nv_bfloat16* q_roped) {                                                             \
        flash_forward<E>(q, k, v, out, lse2, T, G, scale, KV, merged, cos, sin, q_roped);                      \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(FA_THREADS)                                                    \
        flash_dq_##E(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,                  \
                     const __nv_bfloat16* dout, const float* lse2, const float* D, __nv_bfloat16* dq, int T,   \
                     int G, float scale, FLASH_ROPE) {                                                           \
        flash_dq<E>(q, k, v, dout, lse2, D, dq, T, G, scale, KV, merged, cos, sin);                            \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(FA_THREADS)                                                    \
        flash_dkv_##E(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,                 \
                      const __nv_bfloat16* dout, const float* lse2, const float* D, float* dk, float* dv,      \
                      int T, int G, float scale, FLASH_ROPE) {                                                  \
        flash_dkv<E>(q, k, v, dout, lse2, D, dk, dv, T, G, scale, KV, merged, cos, sin);                       \
    }

FLASH_KERNELS(64)
FLASH_KERNELS(128)
