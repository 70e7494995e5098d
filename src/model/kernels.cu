// Fused kernels for LoRA training in bf16 on the GPU, compiled to PTX by build.rs (feature
// `cuda`) and launched from src/model/cuda.rs. Each replaces a chain of candle ops that would
// each make a full pass over a (rows x columns) tensor, several of them in f32.
//
// Every kernel works on rows: one block of BLOCK threads per row, f32 arithmetic throughout.
#include <cuda_bf16.h>
#include <stdint.h>

#define BLOCK 256

// Sum (or max) of one value per thread over the block; every thread gets the result.
__device__ __forceinline__ float block_reduce(float v, bool is_max, float* shared) {
    for (int o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(0xffffffff, v, o);
        v = is_max ? fmaxf(v, other) : v + other;
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // `shared` may still be read by a previous reduction
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < (int)blockDim.x / 32 ? shared[lane] : (is_max ? -INFINITY : 0.0f);
    for (int o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(0xffffffff, v, o);
        v = is_max ? fmaxf(v, other) : v + other;
    }
    return v;
}

// Eight bf16 at once, for the elementwise kernels (16-byte loads and stores).
union Pack8 {
    uint4 raw;
    __nv_bfloat162 pairs[4];
};

// Max or sum over a warp; every lane gets the result.
__device__ __forceinline__ float warp_reduce(float v, bool is_max) {
    for (int o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(0xffffffff, v, o);
        v = is_max ? fmaxf(v, other) : v + other;
    }
    return v;
}

// Causal softmax of attention scores: probs[r][j] = softmax_j(scores[r][j] * scale) over the
// keys j <= (r % t) + (s - t), zero elsewhere, without reading the hidden keys. Rows are (batch,
// kv head, query head, position), so the query position of row r is r % t. One warp per row
// (a block per row spent its time in barriers), two keys per lane at a time (s even).
// A score or logit capped to cap * tanh(x / cap) (Gemma 2), or x itself where cap is 0.
__device__ __forceinline__ float soft_cap(float x, float cap) {
    return cap > 0.0f ? cap * tanhf(x / cap) : x;
}

// The cap's derivative at a capped value y: 1 - (y / cap)^2 (1 where cap is 0).
__device__ __forceinline__ float soft_cap_slope(float y, float cap) {
    if (cap <= 0.0f) return 1.0f;
    const float th = y / cap;
    return 1.0f - th * th;
}

extern "C" __global__ void causal_softmax_bf16(const __nv_bfloat16* scores, __nv_bfloat16* probs, long rows,
                                              int s, int t, float scale, float cap) {
    const long row = (blockIdx.x * (long)blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const int last = (int)(row % t) + (s - t);  // last visible key
    if (s % 2 == 1) {  // rows not 4-byte aligned: one key per lane at a time
        const __nv_bfloat16* x = scores + row * s;
        float m = -INFINITY, sum = 0.0f;
        for (int j = lane; j <= last; j += 32) m = fmaxf(m, soft_cap(__bfloat162float(x[j]) * scale, cap));
        m = warp_reduce(m, true);
        for (int j = lane; j <= last; j += 32) sum += __expf(soft_cap(__bfloat162float(x[j]) * scale, cap) - m);
        const float inv = 1.0f / warp_reduce(sum, false);
        for (int j = lane; j < s; j += 32)
            probs[row * s + j] = __float2bfloat16(j <= last ? __expf(soft_cap(__bfloat162float(x[j]) * scale, cap) - m) * inv : 0.0f);
        return;
    }
    const __nv_bfloat162* x = reinterpret_cast<const __nv_bfloat162*>(scores + row * s);
    __nv_bfloat162* y = reinterpret_cast<__nv_bfloat162*>(probs + row * s);
    const int pairs = s / 2, visible = last / 2 + 1;  // pairs holding a visible key
    float m = -INFINITY;
    for (int j = lane; j < visible; j += 32) {
        float2 v = __bfloat1622float2(x[j]);
        m = fmaxf(m, soft_cap(v.x * scale, cap));
        if (2 * j + 1 <= last) m = fmaxf(m, soft_cap(v.y * scale, cap));
    }
    m = warp_reduce(m, true);
    float sum = 0.0f;
    for (int j = lane; j < visible; j += 32) {
        float2 v = __bfloat1622float2(x[j]);
        sum += __expf(soft_cap(v.x * scale, cap) - m);
        if (2 * j + 1 <= last) sum += __expf(soft_cap(v.y * scale, cap) - m);
    }
    const float inv = 1.0f / warp_reduce(sum, false);
    for (int j = lane; j < pairs; j += 32) {
        float a = 0.0f, b = 0.0f;
        if (j < visible) {
            float2 v = __bfloat1622float2(x[j]);
            a = __expf(soft_cap(v.x * scale, cap) - m) * inv;
            b = 2 * j + 1 <= last ? __expf(soft_cap(v.y * scale, cap) - m) * inv : 0.0f;
        }
        y[j] = __floats2bfloat162_rn(a, b);
    }
}

// Gradient of the scores through softmax and scale: ds = p * (dp - d[r]) * scale, where
// d[r] = sum_j dp[r][j] * p[r][j] (passed in, computed as rowsum(dO * O)). `t` as in
// causal_softmax_bf16 (0: no causal mask): the hidden keys, where p is 0, are not read. With a
// cap, `raw` holds the uncapped scores q.k, and ds takes the cap's derivative as well.
extern "C" __global__ void softmax_backward_bf16(const __nv_bfloat16* p, const __nv_bfloat16* dp,
                                                 const float* d, __nv_bfloat16* ds, int s, int t, float scale,
                                                 const __nv_bfloat16* raw, float cap) {
    const long row = blockIdx.x;
    const float dr = d[row];
    const int last = t > 0 ? (int)(row % t) + (s - t) : s - 1;
    for (int j = threadIdx.x; j < s; j += BLOCK) {
        long i = row * s + j;
        float v = j <= last ? __bfloat162float(p[i]) * (__bfloat162float(dp[i]) - dr) * scale : 0.0f;
        if (cap > 0.0f && j <= last) v *= soft_cap_slope(soft_cap(__bfloat162float(raw[i]) * scale, cap), cap);
        ds[i] = __float2bfloat16(v);
    }
}

// Cross-entropy of bf16 logits: out[r] = (loss, logsumexp) with loss = lse - logits[r][target].
// `cap` (here and below): the logits are capped first (0: not).
extern "C" __global__ void cross_entropy_forward_bf16(const __nv_bfloat16* logits, const uint32_t* targets,
                                                      float* out, int v, float cap) {
    __shared__ float shared[BLOCK / 32];
    const long row = blockIdx.x;
    const __nv_bfloat16* x = logits + row * v;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < v; j += BLOCK) m = fmaxf(m, soft_cap(__bfloat162float(x[j]), cap));
    m = block_reduce(m, true, shared);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < v; j += BLOCK) sum += __expf(soft_cap(__bfloat162float(x[j]), cap) - m);
    sum = block_reduce(sum, false, shared);
    if (threadIdx.x == 0) {
        float lse = m + __logf(sum);
        out[2 * row] = lse - soft_cap(__bfloat162float(x[targets[row]]), cap);
        out[2 * row + 1] = lse;
    }
}

// Both at once, in place, for rows of V % 8 == 0 (16-byte aligned): stats[r] = (loss, lse) and
// logits[r] becomes softmax - onehot(target). The row is read twice (an online max and sum, then
// the gradient) and written once, eight elements at a time. Capped, the gradient is that of the
// uncapped logits.
extern "C" __global__ void cross_entropy_fused_bf16(__nv_bfloat16* logits, const uint32_t* targets, float* stats,
                                                    int v, float cap) {
    __shared__ float shared[BLOCK / 32];
    const long row = blockIdx.x;
    __nv_bfloat16* x = logits + row * v;
    const int packs = v / 8;
    const uint32_t target = targets[row];
    const float at_target = soft_cap(__bfloat162float(x[target]), cap);  // read before any thread writes
    float m = -INFINITY, sum = 0.0f;
    for (int p = threadIdx.x; p < packs; p += BLOCK) {
        Pack8 a;
        a.raw = reinterpret_cast<const uint4*>(x)[p];
        float2 f[4];
        float mx = m;
        for (int j = 0; j < 4; ++j) {
            f[j] = __bfloat1622float2(a.pairs[j]);
            f[j] = make_float2(soft_cap(f[j].x, cap), soft_cap(f[j].y, cap));
            mx = fmaxf(mx, fmaxf(f[j].x, f[j].y));
        }
        sum *= __expf(m - mx);  // (0 while m is -inf)
        for (int j = 0; j < 4; ++j) sum += __expf(f[j].x - mx) + __expf(f[j].y - mx);
        m = mx;
    }
    const float row_max = block_reduce(m, true, shared);
    sum = m == -INFINITY ? 0.0f : sum * __expf(m - row_max);
    const float lse = row_max + __logf(block_reduce(sum, false, shared));
    if (threadIdx.x == 0) {
        stats[2 * row] = lse - at_target;
        stats[2 * row + 1] = lse;
    }
    for (int p = threadIdx.x; p < packs; p += BLOCK) {
        Pack8 a, o;
        a.raw = reinterpret_cast<const uint4*>(x)[p];
        for (int j = 0; j < 4; ++j) {
            float2 f = __bfloat1622float2(a.pairs[j]);
            f = make_float2(soft_cap(f.x, cap), soft_cap(f.y, cap));
            int i = p * 8 + 2 * j;
            o.pairs[j] = __floats2bfloat162_rn(
                (__expf(f.x - lse) - (i == (int)target ? 1.0f : 0.0f)) * soft_cap_slope(f.x, cap),
                (__expf(f.y - lse) - (i + 1 == (int)target ? 1.0f : 0.0f)) * soft_cap_slope(f.y, cap));
        }
        reinterpret_cast<uint4*>(x)[p] = o.raw;
    }
}

// Gradient of the summed cross-entropy: dlogits = softmax - onehot(target) (the caller scales
// the product with the weight by the incoming gradient).
extern "C" __global__ void cross_entropy_backward_bf16(const __nv_bfloat16* logits, const uint32_t* targets,
                                                       const float* stats, __nv_bfloat16* dlogits, int v, float cap) {
    const long row = blockIdx.x;
    const float lse = stats[2 * row + 1];
    const uint32_t target = targets[row];
    for (int j = threadIdx.x; j < v; j += BLOCK) {
        long i = row * v + j;
        const float y = soft_cap(__bfloat162float(logits[i]), cap);
        float p = __expf(y - lse) - (j == (int)target ? 1.0f : 0.0f);
        dlogits[i] = __float2bfloat16(p * soft_cap_slope(y, cap));
    }
}

// RMSNorm's input gradient, one row of D per block: with r = 1 / sqrt(mean(x^2) + eps) and
// gw = g * w, dx = r * gw - x * r^3 * mean(gw * x).
// `plus`, where not null, is added to the result: the residual branch's gradient, which would
// otherwise take a pass of its own.
extern "C" __global__ void rms_norm_backward_bf16(const __nv_bfloat16* x, const __nv_bfloat16* g,
                                                  const __nv_bfloat16* w, const __nv_bfloat16* plus,
                                                  __nv_bfloat16* dx, int d, float eps) {
    __shared__ float shared[32];
    const long base = (long)blockIdx.x * d;
    float squares = 0.0f, dot = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float xv = __bfloat162float(x[base + i]);
        squares += xv * xv;
        dot += __bfloat162float(g[base + i]) * __bfloat162float(w[i]) * xv;
    }
    squares = block_reduce(squares, false, shared);
    dot = block_reduce(dot, false, shared);
    const float r = rsqrtf(squares / d + eps);
    const float c = r * r * r * dot / d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float gw = __bfloat162float(g[base + i]) * __bfloat162float(w[i]);
        float v = r * gw - __bfloat162float(x[base + i]) * c;
        if (plus) v = __bfloat162float(__float2bfloat16(v)) + __bfloat162float(plus[base + i]);
        dx[base + i] = __float2bfloat16(v);
    }
}

__device__ __forceinline__ float silu_of(float g) { return g / (1.0f + __expf(-g)); }


// RMSNorm of rows of D (D % 8 == 0, D <= 8 * RMS_PACKS * BLOCK, 16-byte aligned rows), one row
// per block, eight elements per load, each row read once: out = x * w / sqrt(mean(x^2) + eps).
#define RMS_PACKS 4
extern "C" __global__ void rms_norm_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* out,
                                         int d, float eps) {
    __shared__ float shared[32];
    const long base = (long)blockIdx.x * d;
    const int packs = d / 8;
    Pack8 xv[RMS_PACKS];
    float squares = 0.0f;
    for (int k = 0; k < RMS_PACKS; ++k) {
        int p = threadIdx.x + k * BLOCK;
        if (p >= packs) break;
        xv[k].raw = reinterpret_cast<const uint4*>(x + base)[p];
        for (int j = 0; j < 4; ++j) {
            float2 f = __bfloat1622float2(xv[k].pairs[j]);
            squares += f.x * f.x + f.y * f.y;
        }
    }
    squares = block_reduce(squares, false, shared);
    const float r = rsqrtf(squares / d + eps);
    for (int k = 0; k < RMS_PACKS; ++k) {
        int p = threadIdx.x + k * BLOCK;
        if (p >= packs) break;
        Pack8 wv, o;
        wv.raw = reinterpret_cast<const uint4*>(w)[p];
        for (int j = 0; j < 4; ++j) {
            float2 f = __bfloat1622float2(xv[k].pairs[j]), wf = __bfloat1622float2(wv.pairs[j]);
            o.pairs[j] = __floats2bfloat162_rn(f.x * r * wf.x, f.y * r * wf.y);
        }
        reinterpret_cast<uint4*>(out + base)[p] = o.raw;
    }
}

// rms_norm_backward_bf16 for rows that rms_norm_bf16 takes: x and g read once, eight at a time.
extern "C" __global__ void rms_norm_backward_packed_bf16(const __nv_bfloat16* x, const __nv_bfloat16* g,
                                                         const __nv_bfloat16* w, const __nv_bfloat16* plus,
                                                         __nv_bfloat16* dx, int d, float eps) {
    __shared__ float shared[32];
    const long base = (long)blockIdx.x * d;
    const int packs = d / 8;
    Pack8 xv[RMS_PACKS], gw[RMS_PACKS];  // x, and g * w (rounded as the plain kernel's inputs are not)
    float squares = 0.0f, dot = 0.0f;
    for (int k = 0; k < RMS_PACKS; ++k) {
        int p = threadIdx.x + k * BLOCK;
        if (p >= packs) break;
        Pack8 gv, wv;
        xv[k].raw = reinterpret_cast<const uint4*>(x + base)[p];
        gv.raw = reinterpret_cast<const uint4*>(g + base)[p];
        wv.raw = reinterpret_cast<const uint4*>(w)[p];
        for (int j = 0; j < 4; ++j) {
            float2 xf = __bfloat1622float2(xv[k].pairs[j]), gf = __bfloat1622float2(gv.pairs[j]),
                   wf = __bfloat1622float2(wv.pairs[j]);
            squares += xf.x * xf.x + xf.y * xf.y;
            dot += gf.x * wf.x * xf.x + gf.y * wf.y * xf.y;
            gw[k].pairs[j] = gv.pairs[j];  // g kept; w read again below
        }
    }
    squares = block_reduce(squares, false, shared);
    dot = block_reduce(dot, false, shared);
    const float r = rsqrtf(squares / d + eps);
    const float c = r * r * r * dot / d;
    for (int k = 0; k < RMS_PACKS; ++k) {
        int p = threadIdx.x + k * BLOCK;
        if (p >= packs) break;
        Pack8 wv, o, pv;
        wv.raw = reinterpret_cast<const uint4*>(w)[p];
        if (plus) pv.raw = reinterpret_cast<const uint4*>(plus + base)[p];
        for (int j = 0; j < 4; ++j) {
            float2 xf = __bfloat1622float2(xv[k].pairs[j]), gf = __bfloat1622float2(gw[k].pairs[j]),
                   wf = __bfloat1622float2(wv.pairs[j]);
            float a = r * gf.x * wf.x - xf.x * c, b = r * gf.y * wf.y - xf.y * c;
            if (plus) {
                float2 pf = __bfloat1622float2(pv.pairs[j]);
                a = __bfloat162float(__float2bfloat16(a)) + pf.x;
                b = __bfloat162float(__float2bfloat16(b)) + pf.y;
            }
            o.pairs[j] = __floats2bfloat162_rn(a, b);
        }
        reinterpret_cast<uint4*>(dx + base)[p] = o.raw;
    }
}

// An adapter's input product beside its bias column: out (n, w) = [z | 1 | 0..] for z (n, r),
// r < w, whose rows are `zs` elements apart.
extern "C" __global__ void augment_bf16(const __nv_bfloat16* z, long zs, __nv_bfloat16* out, long n, int r,
                                        int w) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n * w; i += (long)gridDim.x * blockDim.x) {
        long row = i / w;
        int col = (int)(i % w);
        out[i] = col < r ? z[row * zs + col] : __float2bfloat16(col == r ? 1.f : 0.f);
    }
}

// x * s[0] for a scalar s held on the GPU (a gradient's scale, known only there).
extern "C" __global__ void scale_by_bf16(const __nv_bfloat16* x, const float* s, __nv_bfloat16* out, long n,
                                         int packed) {
    const float f = s[0];
    const long stride = (long)gridDim.x * blockDim.x;
    if (packed) {
        for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n / 8; i += stride) {
            Pack8 v, o;
            v.raw = reinterpret_cast<const uint4*>(x)[i];
            for (int k = 0; k < 4; k++) {
                float2 a = __bfloat1622float2(v.pairs[k]);
                o.pairs[k] = __floats2bfloat162_rn(a.x * f, a.y * f);
            }
            reinterpret_cast<uint4*>(out)[i] = o.raw;
        }
    } else {
        for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += stride)
            out[i] = __float2bfloat16(__bfloat162float(x[i]) * f);
    }
}

// The sums of squares of many f32 tensors in one launch, each as SUM_SQUARES_PARTS partial sums
// (one per block of x) in a fixed order, so that the same gradients always give the same norm:
// tensor blockIdx.y has its address and length at table[2 * y], table[2 * y + 1], and its
// partial sums go to partials[y * SUM_SQUARES_PARTS ..].
#define SUM_SQUARES_PARTS 32
extern "C" __global__ void sum_squares_many_f32(const unsigned long long* table, float* partials) {
    __shared__ float warp_sums[32];
    const float* x = reinterpret_cast<const float*>(table[2 * blockIdx.y]);
    const long n = (long)table[2 * blockIdx.y + 1];
    float s = 0.f;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        s += x[i] * x[i];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x < 32) {
        s = threadIdx.x < blockDim.x / 32 ? warp_sums[threadIdx.x] : 0.f;
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
        if (threadIdx.x == 0) partials[blockIdx.y * SUM_SQUARES_PARTS + blockIdx.x] = s;
    }
}

// out row i = src row idx[i], or zeros where idx[i] >= n_src: rows of d bf16 elements, d % 8 == 0
// and 16-byte aligned rows, eight elements per load (a gather, or its gradient's scatter through
// the inverse index).
extern "C" __global__ void take_rows_bf16(const __nv_bfloat16* src, long n_src, const unsigned int* idx,
                                          __nv_bfloat16* out, long n_out, int d) {
    const long per_row = d / 8;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n_out * per_row;
         i += (long)gridDim.x * blockDim.x) {
        long row = i / per_row, col = i % per_row;
        long from = idx[row];
        uint4 v = make_uint4(0, 0, 0, 0);
        if (from < n_src) v = reinterpret_cast<const uint4*>(src)[from * per_row + col];
        reinterpret_cast<uint4*>(out)[i] = v;
    }
}

// The gated MLP's activations, by number: 0 silu (SwiGLU), 1 GELU's tanh approximation (GeGLU).
#define ACT_SILU 0
#define ACT_GELU_TANH 1
#define GELU_C 0.7978845608028654f  // sqrt(2 / pi)
#define GELU_A 0.044715f

__device__ __forceinline__ float act_of(float g, int act) {
    if (act == ACT_GELU_TANH) return 0.5f * g * (1.0f + tanhf(GELU_C * (g + GELU_A * g * g * g)));
    return silu_of(g);
}

// The gated MLP's product h = act(gate) * up, elementwise. `packed`: n % 8 == 0 and 16-byte
// aligned pointers (the launcher checks), eight elements per load.
extern "C" __global__ void gated_mul_bf16(const __nv_bfloat16* gate, const __nv_bfloat16* up,
                                          __nv_bfloat16* h, long n, int packed, int act) {
    const long stride = (long)gridDim.x * blockDim.x;
    if (packed) {
        for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n / 8; i += stride) {
            Pack8 g, u, out;
            g.raw = reinterpret_cast<const uint4*>(gate)[i];
            u.raw = reinterpret_cast<const uint4*>(up)[i];
            for (int k = 0; k < 4; k++) {
                float2 gv = __bfloat1622float2(g.pairs[k]), uv = __bfloat1622float2(u.pairs[k]);
                out.pairs[k] = __floats2bfloat162_rn(act_of(gv.x, act) * uv.x, act_of(gv.y, act) * uv.y);
            }
            reinterpret_cast<uint4*>(h)[i] = out.raw;
        }
        return;
    }
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += stride) {
        h[i] = __float2bfloat16(act_of(__bfloat162float(gate[i]), act) * __bfloat162float(up[i]));
    }
}

// dgate = dh * up * act'(gate) and dup = dh * act(gate) for one element;
// silu'(g) = sig(g) * (1 + g * (1 - sig(g)));
// gelu'(g) = (1 + tanh u) / 2 + g (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 g^2) / 2.
__device__ __forceinline__ float2 gated_mul_grads(float g, float u, float d, int act) {
    if (act == ACT_GELU_TANH) {
        const float th = tanhf(GELU_C * (g + GELU_A * g * g * g));
        const float slope = 0.5f * (1.0f + th) + 0.5f * g * (1.0f - th * th) * GELU_C * (1.0f + 3.0f * GELU_A * g * g);
        return make_float2(d * u * slope, d * 0.5f * g * (1.0f + th));
    }
    float sig = 1.0f / (1.0f + __expf(-g));
    return make_float2(d * u * sig * (1.0f + g * (1.0f - sig)), d * g * sig);
}

// Its gradients, written as out[0..n] (dgate) and out[n..2n] (dup); `packed` as above.
extern "C" __global__ void gated_mul_backward_bf16(const __nv_bfloat16* gate, const __nv_bfloat16* up,
                                                   const __nv_bfloat16* dh, __nv_bfloat16* out, long n,
                                                   int packed, int act) {
    const long stride = (long)gridDim.x * blockDim.x;
    if (packed) {
        for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n / 8; i += stride) {
            Pack8 g, u, d, dg, du;
            g.raw = reinterpret_cast<const uint4*>(gate)[i];
            u.raw = reinterpret_cast<const uint4*>(up)[i];
            d.raw = reinterpret_cast<const uint4*>(dh)[i];
            for (int k = 0; k < 4; k++) {
                float2 gv = __bfloat1622float2(g.pairs[k]), uv = __bfloat1622float2(u.pairs[k]);
                float2 dv = __bfloat1622float2(d.pairs[k]);
                float2 a = gated_mul_grads(gv.x, uv.x, dv.x, act), b = gated_mul_grads(gv.y, uv.y, dv.y, act);
                dg.pairs[k] = __floats2bfloat162_rn(a.x, b.x);
                du.pairs[k] = __floats2bfloat162_rn(a.y, b.y);
            }
            reinterpret_cast<uint4*>(out)[i] = dg.raw;
            reinterpret_cast<uint4*>(out + n)[i] = du.raw;
        }
        return;
    }
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += stride) {
        float2 r = gated_mul_grads(__bfloat162float(gate[i]), __bfloat162float(up[i]), __bfloat162float(dh[i]), act);
        out[i] = __float2bfloat16(r.x);
        out[n + i] = __float2bfloat16(r.y);
    }
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
        __nv_bfloat162 lo = *reinterpret_cast<const __nv_bfloat162*>(src + from + j);
        __nv_bfloat162 hi = *reinterpret_cast<const __nv_bfloat162*>(src + from + half + j);
        if (rope_sign != 0) {
            float2 a = __bfloat1622float2(lo), c2 = __bfloat1622float2(hi);
            float2 c = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(cos + (long)tt * half + j));
            float2 s = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(sin + (long)tt * half + j));
            s.x *= rope_sign;
            s.y *= rope_sign;
            lo = __floats2bfloat162_rn(a.x * c.x - c2.x * s.x, a.y * c.y - c2.y * s.y);
            hi = __floats2bfloat162_rn(a.x * s.x + c2.x * c.x, a.y * s.y + c2.y * c.y);
        }
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

// Attention of one new token per row against the KV cache (decoding), bf16. One block of E
// threads per (batch row, kv head); the R <= MAX_R query heads that share the kv head are handled
// together, so each key and value is read once. Keys go in tiles of E: thread t scores key t of
// the tile against every query head, the tile's scores
// update each head's running max and sum (online softmax, one warp per head), and then thread t
// accumulates element t of every head's output over the tile's values.
//   q: (B, K, R, E); k, v: (B, K, C, E) of which the first s positions are used, 16-byte aligned;
//   mask: (B, s) additive f32 (-inf hides a key), or null; out: (B, K, R, E); E = 32 * w <= 128.
#define MAX_R 8
#define MAX_E 128
extern "C" __global__ void decode_attention_bf16(const __nv_bfloat16* q, const __nv_bfloat16* k,
                                                 const __nv_bfloat16* v, const float* mask,
                                                 __nv_bfloat16* out, int heads, int r, int c, int s,
                                                 int e, float scale) {
    // Shared values are read as float4: every thread reads the same query and weight values, and
    // one 16-byte read instead of four keeps shared memory from being the bottleneck.
    __shared__ float4 q4[MAX_R][MAX_E / 4];
    __shared__ float4 p4[MAX_R][MAX_E / 4];
    __shared__ float m_s[MAX_R], l_s[MAX_R], corr_s[MAX_R];
    float(*q_s)[MAX_E] = reinterpret_cast<float(*)[MAX_E]>(q4);
    float(*p_s)[MAX_E] = reinterpret_cast<float(*)[MAX_E]>(p4);
    const int bk = blockIdx.x, b = bk / heads, t = threadIdx.x;
    const int warp = t / 32, lane = t % 32, warps = e / 32, per_row = e / 8;
    const __nv_bfloat16* qb = q + (long)bk * r * e;
    const __nv_bfloat16* kb = k + (long)bk * c * e;
    const __nv_bfloat16* vb = v + (long)bk * c * e;
    for (int i = 0; i < r; i++) q_s[i][t] = __bfloat162float(qb[i * e + t]) * scale;
    if (t < MAX_R) {
        m_s[t] = -INFINITY;
        l_s[t] = 0.0f;
    }
    float acc[MAX_R];
#pragma unroll
    for (int i = 0; i < MAX_R; i++) acc[i] = 0.0f;
    __syncthreads();
    for (int j0 = 0; j0 < s; j0 += e) {
        const int n = min(e, s - j0);
        // Scores of key j0 + t, for every query head; the thread reads its key row with 16-byte
        // loads (staging the tile in shared memory cost more occupancy than it saved).
        const int j = j0 + t;
        const float bias = j < s ? (mask ? mask[(long)b * s + j] : 0.0f) : -INFINITY;
        float sc[MAX_R];
#pragma unroll
        for (int i = 0; i < MAX_R; i++) sc[i] = 0.0f;
        if (bias != -INFINITY) {
            const uint4* row = reinterpret_cast<const uint4*>(kb + (long)j * e);
            for (int x = 0; x < per_row; x++) {
                const uint4 raw = row[x];
                const __nv_bfloat162* pair = reinterpret_cast<const __nv_bfloat162*>(&raw);
                const float2 f0 = __bfloat1622float2(pair[0]), f1 = __bfloat1622float2(pair[1]);
                const float2 f2 = __bfloat1622float2(pair[2]), f3 = __bfloat1622float2(pair[3]);
#pragma unroll
                for (int i = 0; i < MAX_R; i++) {
                    if (i < r) {
                        const float4 a = q4[i][2 * x], c4 = q4[i][2 * x + 1];
                        sc[i] += a.x * f0.x + a.y * f0.y + a.z * f1.x + a.w * f1.y + c4.x * f2.x + c4.y * f2.y +
                                 c4.z * f3.x + c4.w * f3.y;
                    }
                }
            }
        }
        for (int i = 0; i < r; i++) p_s[i][t] = bias == -INFINITY ? -INFINITY : sc[i] + bias;
        __syncthreads();
        // Online softmax, one warp per query head: the tile's weights replace its scores (0 for
        // hidden keys and past the tile's end).
        for (int i = warp; i < r; i += warps) {
            float big = -INFINITY;
            for (int x = lane; x < e; x += 32) big = fmaxf(big, p_s[i][x]);
            for (int o = 16; o > 0; o >>= 1) big = fmaxf(big, __shfl_xor_sync(0xffffffff, big, o));
            const float m_old = m_s[i], m_new = fmaxf(m_old, big);
            float sum = 0.0f;
            for (int x = lane; x < e; x += 32) {
                const float p = m_new == -INFINITY ? 0.0f : __expf(p_s[i][x] - m_new);
                p_s[i][x] = p;
                sum += p;
            }
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
            if (lane == 0) {
                const float corr = m_old == -INFINITY ? 0.0f : __expf(m_old - m_new);
                l_s[i] = l_s[i] * corr + sum;
                m_s[i] = m_new;
                corr_s[i] = corr;
            }
        }
        __syncthreads();
        // Element t of each head's output over the tile's values, four keys at a time.
#pragma unroll
        for (int i = 0; i < MAX_R; i++)
            if (i < r) acc[i] *= corr_s[i];
        for (int x0 = 0; x0 < n; x0 += 4) {
            float val[4];
#pragma unroll
            for (int u = 0; u < 4; u++) val[u] = x0 + u < n ? __bfloat162float(vb[(long)(j0 + x0 + u) * e + t]) : 0.0f;
#pragma unroll
            for (int i = 0; i < MAX_R; i++) {
                if (i < r) {
                    const float4 p = p4[i][x0 / 4];
                    acc[i] += p.x * val[0] + p.y * val[1] + p.z * val[2] + p.w * val[3];
                }
            }
        }
        __syncthreads();
    }
    for (int i = 0; i < r; i++) out[((long)bk * r + i) * e + t] = __float2bfloat16(acc[i] / l_s[i]);
}

__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(float x) { return x; }

// A 32-bit integer hash with good avalanche (the "lowbias32" constants).
__device__ __forceinline__ unsigned int mix32(unsigned int x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

// Orders floats as unsigned integers: a > b exactly when order_key(a) > order_key(b).
__device__ __forceinline__ unsigned int order_key(float f) {
    const unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// A token's probability mass in the nucleus search, exp(s - max) in 2^-40 units: integer sums are
// exact and do not depend on the order of the additions, so the cut is reproducible.
__device__ __forceinline__ unsigned long long fixed_mass(float s, float max) {
    return (unsigned long long)(__expf(s - max) * 1099511627776.0f);
}

// Sum of one value per thread over the block; every thread gets the result.
__device__ unsigned long long block_sum_u64(unsigned long long v, unsigned long long* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    __syncthreads();
    if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
    __syncthreads();
    unsigned long long total = 0;
    for (int w = 0; w < (int)blockDim.x / 32; w++) total += shared[w];
    return total;
}

// The largest key tau such that the tokens with key >= tau (among those with key >= floor) weigh
// at least `target`: by count, or by fixed-point mass. Radix selection on the key's bits, 11, 11
// and 10 at a time: each round histograms the candidates under the prefix found so far.
template <typename T>
__device__ unsigned int select_cut(const T* x, int v, float inv_t, float max, unsigned int floor, bool by_mass,
                                   unsigned long long target, unsigned long long* hist) {
    __shared__ unsigned int prefix_s, mask_s;
    __shared__ unsigned long long target_s;
    const int shifts[3] = {21, 10, 0}, widths[3] = {11, 11, 10};
    unsigned int prefix = 0, mask = 0;
    __syncthreads();  // `hist` may still be read by a previous reduction
    for (int level = 0; level < 3; level++) {
        const int bins = 1 << widths[level];
        for (int b = threadIdx.x; b < bins; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < v; i += blockDim.x) {
            const float s = to_f32(x[i]) * inv_t;
            const unsigned int k = order_key(s);
            if (k < floor || (k & mask) != prefix) continue;
            atomicAdd(&hist[(k >> shifts[level]) & (bins - 1)], by_mass ? fixed_mass(s, max) : 1ull);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            // From the top bin down, until the weight above and in the bin reaches the target.
            unsigned long long above = 0;
            int chosen = -1;
            for (int b = bins - 1; b >= 0; b--) {
                if (above + hist[b] >= target) {
                    chosen = b;
                    break;
                }
                above += hist[b];
            }
            if (chosen < 0) {  // the target exceeds the total: keep every candidate
                for (chosen = 0; chosen < bins - 1 && hist[chosen] == 0; chosen++) {
                }
                above -= hist[chosen];
            }
            target_s = target > above ? target - above : 1;
            prefix_s = prefix | ((unsigned int)chosen << shifts[level]);
            mask_s = mask | ((unsigned int)(bins - 1) << shifts[level]);
        }
        __syncthreads();
        prefix = prefix_s;
        mask = mask_s;
        target = target_s;
        __syncthreads();
    }
    return prefix;
}

// One token per row of logits (rows, V): argmax(logits * inv_t + G) with Gumbel noise
// G = -log(-log(U)), an exact draw from softmax(logits * inv_t); inv_t = 0 means greedy. U is a
// hash of (the row's key, step, token id), so a row's draw depends on nothing else in the batch.
// top_k > 0 keeps the top_k most likely tokens (ties included), then top_p < 1 the smallest set of
// the most likely of those whose mass reaches top_p of theirs (the nucleus, as transformers cuts
// it): the draw is the Gumbel-max over the kept tokens, an exact draw from their renormalised
// distribution. One block per row; ties go to the lowest id.
template <typename T>
__device__ void gumbel_argmax(const T* logits, const unsigned long long* keys, unsigned int step, float inv_t,
                              int top_k, float top_p, unsigned int* out, int v) {
    __shared__ float best_s[32];
    __shared__ int best_i_s[32];
    __shared__ unsigned long long hist[2048];
    const int row = blockIdx.x, t = threadIdx.x;
    const T* x = logits + (long)row * v;
    // The cut: tokens whose scaled logit's key is below it are not drawn.
    unsigned int cut = 0;
    const bool by_count = top_k > 0 && top_k < v, by_mass = top_p < 1.0f;
    if (inv_t > 0.0f && (by_count || by_mass)) {
        float max = -INFINITY;
        for (int i = t; i < v; i += blockDim.x) max = fmaxf(max, to_f32(x[i]) * inv_t);
        max = block_reduce(max, true, best_s);
        if (by_count) cut = select_cut(x, v, inv_t, max, 0u, false, (unsigned long long)top_k, hist);
        if (by_mass) {
            unsigned long long kept = 0;
            for (int i = t; i < v; i += blockDim.x) {
                const float s = to_f32(x[i]) * inv_t;
                if (order_key(s) >= cut) kept += fixed_mass(s, max);
            }
            kept = block_sum_u64(kept, hist);
            const unsigned long long target = (unsigned long long)ceil((double)top_p * (double)kept);
            cut = select_cut(x, v, inv_t, max, cut, true, target > 0 ? target : 1, hist);
        }
    }
    const unsigned long long key = keys[row];
    const unsigned int stream = mix32((unsigned int)key ^ mix32((unsigned int)(key >> 32) ^ mix32(step)));
    float best = -INFINITY;
    int best_i = v;
    for (int i = t; i < v; i += blockDim.x) {
        float score = to_f32(x[i]);
        if (inv_t > 0.0f) {
            if (order_key(score * inv_t) < cut) continue;
            const unsigned int h = mix32(stream + mix32((unsigned int)i));
            // 23 bits: the largest value, 1 - 2^-24, still rounds below 1 (24 bits would give 1.0
            // and an infinite score).
            const float u = ((float)(h >> 9) + 0.5f) * (1.0f / 8388608.0f);
            score = score * inv_t - logf(-logf(u));
        }
        if (score > best || (score == best && i < best_i)) {
            best = score;
            best_i = i;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffff, best, o);
        const int oi = __shfl_xor_sync(0xffffffff, best_i, o);
        if (ob > best || (ob == best && oi < best_i)) {
            best = ob;
            best_i = oi;
        }
    }
    __syncthreads();
    if (t % 32 == 0) {
        best_s[t / 32] = best;
        best_i_s[t / 32] = best_i;
    }
    __syncthreads();
    if (t == 0) {
        for (int w = 1; w < (int)blockDim.x / 32; w++) {
            if (best_s[w] > best || (best_s[w] == best && best_i_s[w] < best_i)) {
                best = best_s[w];
                best_i = best_i_s[w];
            }
        }
        out[row] = best_i < v ? best_i : 0;  // a row of NaNs picks token 0
    }
}

extern "C" __global__ void gumbel_argmax_bf16(const __nv_bfloat16* logits, const unsigned long long* keys,
                                              unsigned int step, float inv_t, int top_k, float top_p,
                                              unsigned int* out, int v) {
    gumbel_argmax(logits, keys, step, inv_t, top_k, top_p, out, v);
}

extern "C" __global__ void gumbel_argmax_f32(const float* logits, const unsigned long long* keys, unsigned int step,
                                             float inv_t, int top_k, float top_p, unsigned int* out, int v) {
    gumbel_argmax(logits, keys, step, inv_t, top_k, top_p, out, v);
}

// An inverted-dropout mask of n elements: keep_value where hash(key, i) falls below keep, else 0.
// The same hash as model::decoder's CPU path, so a seed gives the same mask on either device.
template <typename T>
__device__ void dropout_mask(T* out, long n, unsigned int key_lo, unsigned int key_hi, unsigned int threshold,
                             float keep_value) {
    const unsigned int stream = mix32(key_lo ^ mix32(key_hi));
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const unsigned int h = mix32(stream + mix32((unsigned int)i));
        out[i] = (T)((h >> 8) < threshold ? keep_value : 0.0f);
    }
}

extern "C" __global__ void dropout_mask_bf16(__nv_bfloat16* out, long n, unsigned int key_lo, unsigned int key_hi,
                                             unsigned int threshold, float keep_value) {
    dropout_mask(out, n, key_lo, key_hi, threshold, keep_value);
}

extern "C" __global__ void dropout_mask_f32(float* out, long n, unsigned int key_lo, unsigned int key_hi,
                                            unsigned int threshold, float keep_value) {
    dropout_mask(out, n, key_lo, key_hi, threshold, keep_value);
}

// x * mask with the mask of dropout_mask (same key, threshold and value) drawn in the same pass.
extern "C" __global__ void dropout_apply_bf16(const __nv_bfloat16* x, __nv_bfloat16* out, long n, unsigned int key_lo,
                                              unsigned int key_hi, unsigned int threshold, float keep_value) {
    const unsigned int stream = mix32(key_lo ^ mix32(key_hi));
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const unsigned int h = mix32(stream + mix32((unsigned int)i));
        out[i] = __float2bfloat16((h >> 8) < threshold ? __bfloat162float(x[i]) * keep_value : 0.0f);
    }
}

// acc += x * mask, in place, with dropout_apply_bf16's mask and rounding (the product rounded to
// bf16 before the sum, as a separate product and sum would round it).
extern "C" __global__ void dropout_add_bf16(const __nv_bfloat16* x, __nv_bfloat16* acc, long n, unsigned int key_lo,
                                            unsigned int key_hi, unsigned int threshold, float keep_value) {
    const unsigned int stream = mix32(key_lo ^ mix32(key_hi));
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const unsigned int h = mix32(stream + mix32((unsigned int)i));
        if ((h >> 8) < threshold) {
            float product = __bfloat162float(__float2bfloat16(__bfloat162float(x[i]) * keep_value));
            acc[i] = __float2bfloat16(__bfloat162float(acc[i]) + product);
        }
    }
}

// One AdamW step (torch.optim.AdamW's) of many f32 variables in one launch, in place: variable
// blockIdx.y has its value p, moments m then v (mv), gradient g and length n at
// table[4 * y .. 4 * y + 4] as (p, mv, g, n), its elements strided over the blocks of x.
// One launch per variable left the GPU waiting on the host for every few microseconds of work.
extern "C" __global__ void adamw_many_f32(const unsigned long long* table, float clip, float lr, float beta1,
                                          float beta2, float eps, float weight_decay, float bc1, float bc2) {
    const unsigned long long* t = table + 4 * blockIdx.y;
    float* p = reinterpret_cast<float*>(t[0]);
    float* m = reinterpret_cast<float*>(t[1]);
    const float* g = reinterpret_cast<const float*>(t[2]);
    const long n = (long)t[3];
    float* v = m + n;
    const float step = lr / bc1, bc2_sqrt = sqrtf(bc2);
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float gi = g[i] * clip;
        float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        float pi = p[i] * (1.0f - lr * weight_decay);
        p[i] = pi - step * mi / (sqrtf(vi) / bc2_sqrt + eps);
        m[i] = mi;
        v[i] = vi;
    }
}

#include "flash_attention.cu"
