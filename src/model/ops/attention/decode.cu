// Attention of one new token per row against the KV cache (decoding), bf16, on the tensor cores.
// Uses flash.cu's fragment helpers and tile streaming (kernels.cu includes that file first).
//
// One block of 4 warps per (batch row, kv head). The R <= 16 query heads that share the kv head
// are the 16 rows of the products (rows past R are zeros), so each key and value is read once:
// the kernel is bound by reading the cache, and the tensor cores keep the arithmetic off that
// path. The block streams the cache in tiles of 64 keys through shared memory, the next tile
// fetched while the current one is used; warp w takes keys 16w..16w+15 of every tile with its
// own online softmax, and the four warps' partial results are combined at the end.
//   q: (B, K, R, E); k, v: (B, K, C, E) of which the first s positions are used;
//   mask: (B, s) additive f32 (-inf hides a key), or null; out: (B, K, R, E); E = 64 or 128.
// Shared memory: the four key and value tiles of flash_forward, 4 * 64 * (E + 8) bf16, which
// also hold the warps' partial results (4 * 16 * (E + 2) f32) at the end.
#define DECODE_WARPS 4
#define DECODE_ROWS 16

// One (row, kv head): its r query heads qh (r, E), its s keys kh and values vh (a pointer or
// KeyRows, flash.cu), the row's additive mask bias (s) or null; writes its r output heads oh (r, E).
template <int E, typename Rows>
__device__ void decode_attention(const __nv_bfloat16* qh, Rows kh, Rows vh, const float* bias,
                                 __nv_bfloat16* oh, int r, int s, float scale) {
    constexpr int P = E + 8;
    extern __shared__ __align__(16) unsigned char fa_smem[];
    __nv_bfloat16* kbuf = reinterpret_cast<__nv_bfloat16*>(fa_smem);
    __nv_bfloat16* vbuf = kbuf + 2 * FA_ROWS * P;
    __nv_bfloat16 *ks = kbuf, *vs = vbuf;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;

    // The query heads as A fragments (every warp the same), staged through the key tile's space.
    uint32_t qa[E / 16][4];
    load_tile<E, P>(ks, qh, 0, r);
    __syncthreads();
    for (int kk = 0; kk < E / 16; ++kk) load_a<P>(qa[kk], ks, 0, kk * 16, lane);
    __syncthreads();

    const float s2 = scale * LOG2E;
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;  // heads gid and gid + 8
    float o[E / 8][4];
    for (int n = 0; n < E / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    const int tiles = (s + FA_ROWS - 1) / FA_ROWS;
    kv_stream_start<E, P>(kbuf, vbuf, kh, vh, s);
    for (int it = 0; it < tiles; ++it) {
        const int s0 = it * FA_ROWS + warp * 16;  // the warp's first key
        kv_stream_next<E, P>(it, tiles, kbuf, vbuf, kh, vh, s, ks, vs);
        // S = Q K^T: 16 heads x the warp's 16 keys.
        float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        for (int kk = 0; kk < E / 16; ++kk) {
            uint32_t bb[4];
            load_b_rows<P>(bb, ks, warp * 16, kk * 16, lane);
            mma16816(sc[0], qa[kk], bb[0], bb[1]);
            mma16816(sc[1], qa[kk], bb[2], bb[3]);
        }
        // Online softmax in base 2; keys past s and hidden ones at -inf.
        float mx_lo = -INFINITY, mx_hi = -INFINITY;
        for (int n = 0; n < 2; ++n) {
            for (int u = 0; u < 2; ++u) {
                const int key = s0 + n * 8 + 2 * tig + u;
                const float add = key < s ? (bias ? bias[key] * LOG2E : 0.f) : -INFINITY;
                sc[n][u] = add == -INFINITY ? -INFINITY : sc[n][u] * s2 + add;
                sc[n][2 + u] = add == -INFINITY ? -INFINITY : sc[n][2 + u] * s2 + add;
            }
            mx_lo = fmaxf(mx_lo, fmaxf(sc[n][0], sc[n][1]));
            mx_hi = fmaxf(mx_hi, fmaxf(sc[n][2], sc[n][3]));
        }
        for (int o_ = 1; o_ < 4; o_ <<= 1) {
            mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffff, mx_lo, o_));
            mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffff, mx_hi, o_));
        }
        const float new_lo = fmaxf(m_lo, mx_lo), new_hi = fmaxf(m_hi, mx_hi);
        // A head that has seen no visible key yet keeps -inf; its factors must not be NaN.
        const float base_lo = new_lo == -INFINITY ? 0.f : new_lo, base_hi = new_hi == -INFINITY ? 0.f : new_hi;
        const float c_lo = exp2f(m_lo - base_lo), c_hi = exp2f(m_hi - base_hi);
        for (int n = 0; n < 2; ++n) {
            sc[n][0] = exp2f(sc[n][0] - base_lo);
            sc[n][1] = exp2f(sc[n][1] - base_lo);
            sc[n][2] = exp2f(sc[n][2] - base_hi);
            sc[n][3] = exp2f(sc[n][3] - base_hi);
        }
        l_lo = l_lo * c_lo + sc[0][0] + sc[0][1] + sc[1][0] + sc[1][1];
        l_hi = l_hi * c_hi + sc[0][2] + sc[0][3] + sc[1][2] + sc[1][3];
        m_lo = new_lo;
        m_hi = new_hi;
        // O = O * c + P V, P from the registers.
        const uint32_t pa[4] = {pack_bf16(sc[0][0], sc[0][1]), pack_bf16(sc[0][2], sc[0][3]),
                                pack_bf16(sc[1][0], sc[1][1]), pack_bf16(sc[1][2], sc[1][3])};
        for (int np = 0; np < E / 16; ++np) {
            uint32_t bb[4];
            load_b_cols<P>(bb, vs, warp * 16, np * 16, lane);
            o[2 * np][0] *= c_lo;
            o[2 * np][1] *= c_lo;
            o[2 * np][2] *= c_hi;
            o[2 * np][3] *= c_hi;
            o[2 * np + 1][0] *= c_lo;
            o[2 * np + 1][1] *= c_lo;
            o[2 * np + 1][2] *= c_hi;
            o[2 * np + 1][3] *= c_hi;
            mma16816(o[2 * np], pa, bb[0], bb[1]);
            mma16816(o[2 * np + 1], pa, bb[2], bb[3]);
        }
        __syncthreads();  // the tiles are reloaded next
    }
    // Row sums over the quad of lanes that share a head.
    for (int o_ = 1; o_ < 4; o_ <<= 1) {
        l_lo += __shfl_xor_sync(0xffffffff, l_lo, o_);
        l_hi += __shfl_xor_sync(0xffffffff, l_hi, o_);
    }
    // The warps' partial results, (warp, head, E) with rows padded by 2 against bank conflicts,
    // then each head's max, sum and output over the four warps.
    constexpr int PO = E + 2;
    float* part_o = reinterpret_cast<float*>(fa_smem);
    float* part_m = part_o + DECODE_WARPS * DECODE_ROWS * PO;
    float* part_l = part_m + DECODE_WARPS * DECODE_ROWS;
    float* row_o = part_o + warp * DECODE_ROWS * PO;
    for (int n = 0; n < E / 8; ++n) {
        const int col = n * 8 + 2 * tig;
        row_o[gid * PO + col] = o[n][0];
        row_o[gid * PO + col + 1] = o[n][1];
        row_o[(gid + 8) * PO + col] = o[n][2];
        row_o[(gid + 8) * PO + col + 1] = o[n][3];
    }
    if (tig == 0) {
        part_m[warp * DECODE_ROWS + gid] = m_lo;
        part_m[warp * DECODE_ROWS + gid + 8] = m_hi;
        part_l[warp * DECODE_ROWS + gid] = l_lo;
        part_l[warp * DECODE_ROWS + gid + 8] = l_hi;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < r * E; idx += blockDim.x) {
        const int i = idx / E, d = idx % E;
        float big = -INFINITY;
        for (int w = 0; w < DECODE_WARPS; ++w) big = fmaxf(big, part_m[w * DECODE_ROWS + i]);
        const float base = big == -INFINITY ? 0.f : big;
        float num = 0.f, den = 0.f;
        for (int w = 0; w < DECODE_WARPS; ++w) {
            const float f = exp2f(part_m[w * DECODE_ROWS + i] - base);
            num += f * part_o[(w * DECODE_ROWS + i) * PO + d];
            den += f * part_l[w * DECODE_ROWS + i];
        }
        oh[i * E + d] = __float2bfloat16(num / den);
    }
}

// q: (B, K, R, E); k, v: (B, K, C, E) of which the first s positions are used; mask: (B, s)
// additive f32 or null; out: (B, K, R, E). One block per (row, kv head).
#define DECODE_KERNEL(E)                                                                                      \
    extern "C" __global__ void __launch_bounds__(FA_THREADS)                                                  \
        decode_attention_##E(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,         \
                             const float* mask, __nv_bfloat16* out, int heads, int r, int c, int s,          \
                             float scale) {                                                                   \
        const long bk = blockIdx.x, b = bk / heads;                                                           \
        decode_attention<E>(q + bk * r * E, k + bk * c * E, v + bk * c * E,                                   \
                            mask ? mask + b * s : nullptr, out + bk * r * E, r, s, scale);                    \
    }
DECODE_KERNEL(64)
DECODE_KERNEL(128)

// The same from a slot cache (continuous batching). Row b of the step holds rows[5b + 1] keys
// (its prompt's and those of the tokens fed since) and attends to them and its step's own, or with
// a sliding window (window > 0) to the last `window` of them. Its first rows[5b + 4] positions
// (its prompt, shared by the rows continuing it) lie in prompt slot rows[5b + 3] of pkv from
// position 0, the positions after them in its slot rows[5b] of kv from position 0 (a row that
// shares no prompt has 0 there, and its slot holds every position).
//   q: (B, K, R, E); kv: (2, slots, K, C, E), keys then values; pkv: (2, pslots, K, PC, E);
//   rows: (B, 5) slot, keys held, position, prompt slot, prompt length; out: (B, K, R, E).
#define DECODE_SLOTS_KERNEL(E)                                                                                \
    extern "C" __global__ void __launch_bounds__(FA_THREADS)                                                  \
        decode_slots_##E(const __nv_bfloat16* q, const __nv_bfloat16* kv, const __nv_bfloat16* pkv,          \
                         const int* rows, __nv_bfloat16* out, int heads, int r, int c, long slots, int pc,   \
                         long pslots, int window, float scale) {                                              \
        const long bk = blockIdx.x, b = bk / heads, head = bk % heads;                                       \
        const int* row = rows + 5 * b;                                                                        \
        const int s = row[1] + 1, first = window > 0 && s > window ? s - window : 0;                         \
        const int split = max(row[4] - first, 0);                                                             \
        const long own = ((row[0] * heads + head) * (long)c + max(first - row[4], 0)) * E;                    \
        const long shared = ((row[3] * heads + head) * (long)pc + first) * E;                                 \
        const long half = slots * heads * (long)c * E, phalf = pslots * heads * (long)pc * E;                 \
        const KeyRows k{pkv + shared, kv + own, split}, v{pkv + phalf + shared, kv + half + own, split};    \
        decode_attention<E>(q + bk * r * E, k, v, nullptr, out + bk * r * E, r, s - first, scale);          \
    }
DECODE_SLOTS_KERNEL(64)
DECODE_SLOTS_KERNEL(128)
