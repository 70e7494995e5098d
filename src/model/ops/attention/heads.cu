// The projections' outputs as attention heads and back, roped on the way, and the row dot
// products attention's backward pass needs.

// Elements j, j + 1 of a head's first half (lo) and of its second half (hi), with the head's
// bias (or null) added, rounded to bf16 as a separate addition rounds it.
__device__ __forceinline__ void head_pairs(const __nv_bfloat16* head, const __nv_bfloat16* bias, int half, int j,
                                           __nv_bfloat162& lo, __nv_bfloat162& hi) {
    lo = *reinterpret_cast<const __nv_bfloat162*>(head + j);
    hi = *reinterpret_cast<const __nv_bfloat162*>(head + half + j);
    if (bias) {
        lo = __hadd2(lo, *reinterpret_cast<const __nv_bfloat162*>(bias + j));
        hi = __hadd2(hi, *reinterpret_cast<const __nv_bfloat162*>(bias + half + j));
    }
}

// The rope on head_pairs' two pairs: the first half rotated against the second by the angle of
// position `pos` (rows of cos, sin (positions, E/2)), times sign (-1: the rope's transpose).
__device__ __forceinline__ void rope_pairs(__nv_bfloat162& lo, __nv_bfloat162& hi, const __nv_bfloat16* cos,
                                           const __nv_bfloat16* sin, long pos, int half, int j, float sign) {
    const float2 a = __bfloat1622float2(lo), b = __bfloat1622float2(hi);
    const float2 c = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(cos + pos * half + j));
    float2 s = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(sin + pos * half + j));
    s.x *= sign;
    s.y *= sign;
    lo = __floats2bfloat162_rn(a.x * c.x - b.x * s.x, a.y * c.y - b.y * s.y);
    hi = __floats2bfloat162_rn(a.x * s.x + b.x * c.x, a.y * s.y + b.y * c.y);
}

// A projection's output as attention heads and back: x (B, T, n, E) <-> y (B, n, T, E), with
// the rope on the way: cos, sin (T, E/2) rotate the first half of each head against the second
// (rope_sign 1), by the opposite angle (-1: the rope's transpose, for gradients) or not at all (0).
// to_heads: src is x and dst is y; else the reverse. One thread per two adjacent pairs
// (E % 4 == 0), f32 arithmetic.
extern "C" __global__ void heads_bf16(const __nv_bfloat16* src, __nv_bfloat16* dst, const __nv_bfloat16* cos,
                                      const __nv_bfloat16* sin, int b, int t, int n, int e, int rope_sign,
                                      int to_heads) {
    int half = e / 2, quads = half / 2;
    long total = (long)b * t * n * quads;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        int j = (int)(i % quads) * 2;
        long rest = i / quads;
        int h = (int)(rest % n);
        rest /= n;
        int tt = (int)(rest % t), bb = (int)(rest / t);
        long x_at = (((long)bb * t + tt) * n + h) * e, y_at = (((long)bb * n + h) * t + tt) * e;
        long from = to_heads ? x_at : y_at, to = to_heads ? y_at : x_at;
        __nv_bfloat162 lo, hi;
        head_pairs(src + from, nullptr, half, j, lo, hi);
        if (rope_sign != 0) rope_pairs(lo, hi, cos, sin, tt, half, j, (float)rope_sign);
        *reinterpret_cast<__nv_bfloat162*>(dst + to + j) = lo;
        *reinterpret_cast<__nv_bfloat162*>(dst + to + half + j) = hi;
    }
}

// d[r] = sum_i a[r][i] * b[r][i] in f32, for rows of width w: one warp per row. (Attention's
// backward needs rowsum(dO * O) per query.)
extern "C" __global__ void row_dot_bf16(const __nv_bfloat16* a, const __nv_bfloat16* b, float* d, long rows,
                                        int w) {
    long r = (blockIdx.x * (long)blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (r >= rows) return;
    float sum = 0.0f;
    for (int i = lane; i < w; i += 32) sum += __bfloat162float(a[r * w + i]) * __bfloat162float(b[r * w + i]);
    for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffff, sum, o);
    if (lane == 0) d[r] = sum;
}

// The stacked q/k/v projection's output y (B*T, (H + 2K) * E) as attention heads, written one
// after another to `out`: q (B, H, T, E) and k (B, K, T, E) roped at cos, sin (T, E/2) as
// heads_bf16 ropes, v (B, K, T, E) as is. `bias` ((H + 2K) * E, or null) is added first, rounded
// to bf16 as a separate addition rounds it. One thread per two adjacent pairs of a head (E % 4 ==
// 0), f32 arithmetic.
extern "C" __global__ void qkv_heads_bf16(const __nv_bfloat16* y, const __nv_bfloat16* bias, const __nv_bfloat16* cos,
                                          const __nv_bfloat16* sin, __nv_bfloat16* out, int b, int t, int h, int kh,
                                          int e) {
    const int half = e / 2, quads = half / 2, heads = h + 2 * kh;
    const long q_size = (long)b * h * t * e, kv_size = (long)b * kh * t * e;
    const long total = (long)b * t * heads * quads;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        const int j = (int)(i % quads) * 2;
        long rest = i / quads;
        const int hh = (int)(rest % heads);
        rest /= heads;
        const int tt = (int)(rest % t), bb = (int)(rest / t);
        const long from = (((long)bb * t + tt) * heads + hh) * e;
        __nv_bfloat162 lo, hi;
        head_pairs(y + from, bias ? bias + (long)hh * e : nullptr, half, j, lo, hi);
        long to;
        if (hh < h) {
            to = (((long)bb * h + hh) * t + tt) * e;
        } else if (hh < h + kh) {
            to = q_size + (((long)bb * kh + hh - h) * t + tt) * e;
        } else {
            to = q_size + kv_size + (((long)bb * kh + hh - h - kh) * t + tt) * e;
        }
        if (hh < h + kh) rope_pairs(lo, hi, cos, sin, tt, half, j, 1.f);
        *reinterpret_cast<__nv_bfloat162*>(out + to + j) = lo;
        *reinterpret_cast<__nv_bfloat162*>(out + to + half + j) = hi;
    }
}

// qkv_heads_bf16 for a decoding step over a slot cache (continuous batching): y (N, (H + 2K) * E)
// holds one new token per row. q goes to q (N, H, E); k, roped, and v are written into the row's
// slot of kv (2, slots, K, C, E) at the row's own place: rows (N, 5) gives each row its slot, the
// keys it holds, its new token's position (which picks the rope's row of cos, sin (positions,
// E/2)), its prompt's slot and length; the new key goes after those held, at position held -
// prompt length of its slot (a shared prompt's keys lie elsewhere, see decode_slots).
extern "C" __global__ void qkv_slots_bf16(const __nv_bfloat16* y, const __nv_bfloat16* bias, const __nv_bfloat16* cos,
                                          const __nv_bfloat16* sin, const int* rows, __nv_bfloat16* q,
                                          __nv_bfloat16* kv, int n, int h, int kh, int e, int c, long slots) {
    const int half = e / 2, quads = half / 2, heads = h + 2 * kh;
    const long total = (long)n * heads * quads;
    const long v_at = slots * kh * (long)c * e;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        const int j = (int)(i % quads) * 2;
        const long rest = i / quads;
        const int hh = (int)(rest % heads), row = (int)(rest / heads);
        const long from = ((long)row * heads + hh) * e;
        __nv_bfloat162 lo, hi;
        head_pairs(y + from, bias ? bias + (long)hh * e : nullptr, half, j, lo, hi);
        const int slot = rows[5 * row], held = rows[5 * row + 1] - rows[5 * row + 4], pos = rows[5 * row + 2];
        __nv_bfloat16* to;
        if (hh < h) {
            to = q + ((long)row * h + hh) * e;
        } else {
            const int g = hh < h + kh ? hh - h : hh - h - kh;
            to = kv + (hh < h + kh ? 0 : v_at) + (((long)slot * kh + g) * c + held) * e;
        }
        if (hh < h + kh) rope_pairs(lo, hi, cos, sin, pos, half, j, 1.f);
        *reinterpret_cast<__nv_bfloat162*>(to + j) = lo;
        *reinterpret_cast<__nv_bfloat162*>(to + half + j) = hi;
    }
}

// Copies prefilled prompts' keys or values into the slots of their rows: src (P, K, L, E), the
// prompts left-padded to L; rows (M, 3): each new row's prompt, slot and padding. Slot position j
// of row m gets the prompt's position pad + j, for j < L - pad. dst: (slots, K, C, E) (kv's
// keys or values). 16-byte moves: E % 8 == 0.
extern "C" __global__ void fill_slots_bf16(const __nv_bfloat16* src, __nv_bfloat16* dst, const int* rows, int m,
                                           int kh, int l, int e, int c) {
    const int chunks = e / 8;
    const long total = (long)m * kh * l * chunks;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        const int x = (int)(i % chunks) * 8;
        long rest = i / chunks;
        const int j = (int)(rest % l);
        rest /= l;
        const int g = (int)(rest % kh), row = (int)(rest / kh);
        const int prompt = rows[3 * row], slot = rows[3 * row + 1], pad = rows[3 * row + 2];
        if (j >= l - pad) continue;
        const long from = (((long)prompt * kh + g) * l + pad + j) * e + x;
        const long to = (((long)slot * kh + g) * c + j) * e + x;
        *reinterpret_cast<uint4*>(dst + to) = *reinterpret_cast<const uint4*>(src + from);
    }
}
