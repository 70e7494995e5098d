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
    v = lane < BLOCK / 32 ? shared[lane] : (is_max ? -INFINITY : 0.0f);
    for (int o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(0xffffffff, v, o);
        v = is_max ? fmaxf(v, other) : v + other;
    }
    return v;
}

// Causal softmax of attention scores: probs[r][j] = softmax_j(scores[r][j] * scale) over the
// keys j <= (r % t) + (s - t), zero elsewhere. Rows are (batch, kv head, query head, position),
// so the query position of row r is r % t.
extern "C" __global__ void causal_softmax_bf16(const __nv_bfloat16* scores, __nv_bfloat16* probs,
                                              int s, int t, float scale) {
    __shared__ float shared[BLOCK / 32];
    const long row = blockIdx.x;
    const int last = (int)(row % t) + (s - t);  // last visible key
    const __nv_bfloat16* x = scores + row * s;
    __nv_bfloat16* y = probs + row * s;
    float m = -INFINITY;
    for (int j = threadIdx.x; j <= last; j += BLOCK) m = fmaxf(m, __bfloat162float(x[j]) * scale);
    m = block_reduce(m, true, shared);
    float sum = 0.0f;
    for (int j = threadIdx.x; j <= last; j += BLOCK) sum += __expf(__bfloat162float(x[j]) * scale - m);
    sum = block_reduce(sum, false, shared);
    const float inv = 1.0f / sum;
    for (int j = threadIdx.x; j < s; j += BLOCK) {
        float p = j <= last ? __expf(__bfloat162float(x[j]) * scale - m) * inv : 0.0f;
        y[j] = __float2bfloat16(p);
    }
}

// Gradient of the scores through softmax and scale: ds = p * (dp - d[r]) * scale, where
// d[r] = sum_j dp[r][j] * p[r][j] (passed in, computed as rowsum(dO * O)).
extern "C" __global__ void softmax_backward_bf16(const __nv_bfloat16* p, const __nv_bfloat16* dp,
                                                 const float* d, __nv_bfloat16* ds, int s, float scale) {
    const long row = blockIdx.x;
    const float dr = d[row];
    for (int j = threadIdx.x; j < s; j += BLOCK) {
        long i = row * s + j;
        float v = __bfloat162float(p[i]) * (__bfloat162float(dp[i]) - dr) * scale;
        ds[i] = __float2bfloat16(v);
    }
}

// Cross-entropy of bf16 logits: out[r] = (loss, logsumexp) with loss = lse - logits[r][target].
extern "C" __global__ void cross_entropy_forward_bf16(const __nv_bfloat16* logits, const uint32_t* targets,
                                                      float* out, int v) {
    __shared__ float shared[BLOCK / 32];
    const long row = blockIdx.x;
    const __nv_bfloat16* x = logits + row * v;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < v; j += BLOCK) m = fmaxf(m, __bfloat162float(x[j]));
    m = block_reduce(m, true, shared);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < v; j += BLOCK) sum += __expf(__bfloat162float(x[j]) - m);
    sum = block_reduce(sum, false, shared);
    if (threadIdx.x == 0) {
        float lse = m + __logf(sum);
        out[2 * row] = lse - __bfloat162float(x[targets[row]]);
        out[2 * row + 1] = lse;
    }
}

// Gradient of the summed cross-entropy: dlogits = softmax - onehot(target) (the caller scales
// the product with the weight by the incoming gradient).
extern "C" __global__ void cross_entropy_backward_bf16(const __nv_bfloat16* logits, const uint32_t* targets,
                                                       const float* stats, __nv_bfloat16* dlogits, int v) {
    const long row = blockIdx.x;
    const float lse = stats[2 * row + 1];
    const uint32_t target = targets[row];
    for (int j = threadIdx.x; j < v; j += BLOCK) {
        long i = row * v + j;
        float p = __expf(__bfloat162float(logits[i]) - lse) - (j == (int)target ? 1.0f : 0.0f);
        dlogits[i] = __float2bfloat16(p);
    }
}

// SwiGLU's product h = silu(gate) * up, elementwise.
extern "C" __global__ void silu_mul_bf16(const __nv_bfloat16* gate, const __nv_bfloat16* up,
                                         __nv_bfloat16* h, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float g = __bfloat162float(gate[i]);
        float sig = 1.0f / (1.0f + __expf(-g));
        h[i] = __float2bfloat16(g * sig * __bfloat162float(up[i]));
    }
}

// Its gradients: dgate = dh * up * silu'(gate), dup = dh * silu(gate), written as out[0..n]
// and out[n..2n]; silu'(g) = sig(g) * (1 + g * (1 - sig(g))).
extern "C" __global__ void silu_mul_backward_bf16(const __nv_bfloat16* gate, const __nv_bfloat16* up,
                                                  const __nv_bfloat16* dh, __nv_bfloat16* out, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float g = __bfloat162float(gate[i]), u = __bfloat162float(up[i]), d = __bfloat162float(dh[i]);
        float sig = 1.0f / (1.0f + __expf(-g));
        out[i] = __float2bfloat16(d * u * sig * (1.0f + g * (1.0f - sig)));
        out[n + i] = __float2bfloat16(d * g * sig);
    }
}

// Attention of one new token per row against the KV cache (decoding), bf16. One block of
// DECODE_WARPS warps per (batch row, kv head); the R <= MAX_R query heads that share the kv head
// are handled together, so each key and value is read once. Each warp walks its share of the
// keys with an online softmax (running max, sum and weighted values per query head); the warps'
// partial results are merged at the end. Lane l holds elements [l * epl, (l + 1) * epl) of the
// head dimension e = 32 * epl (epl <= 4).
//   q: (B, K, R, E); k, v: (B, K, C, E) of which the first s positions are used;
//   mask: (B, s) additive f32 (-inf hides a key), or null; out: (B, K, R, E).
#define DECODE_WARPS 4
#define MAX_R 8
#define MAX_EPL 4
extern "C" __global__ void decode_attention_bf16(const __nv_bfloat16* q, const __nv_bfloat16* k,
                                                 const __nv_bfloat16* v, const float* mask,
                                                 __nv_bfloat16* out, int heads, int r, int c, int s,
                                                 int e, float scale) {
    __shared__ float part_m[DECODE_WARPS][MAX_R];
    __shared__ float part_l[DECODE_WARPS][MAX_R];
    __shared__ float part_acc[DECODE_WARPS][MAX_R][32 * MAX_EPL];
    const int bk = blockIdx.x, b = bk / heads;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int epl = e / 32;
    const __nv_bfloat16* qb = q + (long)bk * r * e;
    const __nv_bfloat16* kb = k + (long)bk * c * e;
    const __nv_bfloat16* vb = v + (long)bk * c * e;

    float qr[MAX_R][MAX_EPL], acc[MAX_R][MAX_EPL], m[MAX_R], l[MAX_R];
    for (int i = 0; i < MAX_R; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
        for (int x = 0; x < MAX_EPL; x++) {
            qr[i][x] = (i < r && x < epl) ? __bfloat162float(qb[i * e + lane * epl + x]) * scale : 0.0f;
            acc[i][x] = 0.0f;
        }
    }
    for (int j = warp; j < s; j += DECODE_WARPS) {
        const float bias = mask ? mask[(long)b * s + j] : 0.0f;
        if (bias == -INFINITY) continue;  // the same for the whole warp
        float kv[MAX_EPL], vv[MAX_EPL];
        for (int x = 0; x < MAX_EPL; x++) {
            kv[x] = x < epl ? __bfloat162float(kb[(long)j * e + lane * epl + x]) : 0.0f;
            vv[x] = x < epl ? __bfloat162float(vb[(long)j * e + lane * epl + x]) : 0.0f;
        }
        for (int i = 0; i < MAX_R; i++) {
            if (i >= r) break;
            float dot = 0.0f;
            for (int x = 0; x < MAX_EPL; x++) dot += qr[i][x] * kv[x];
            for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, o);
            const float score = dot + bias;
            const float m_new = fmaxf(m[i], score);
            const float corr = __expf(m[i] - m_new), p = __expf(score - m_new);
            l[i] = l[i] * corr + p;
            for (int x = 0; x < MAX_EPL; x++) acc[i][x] = acc[i][x] * corr + p * vv[x];
            m[i] = m_new;
        }
    }
    for (int i = 0; i < r && i < MAX_R; i++) {
        if (lane == 0) {
            part_m[warp][i] = m[i];
            part_l[warp][i] = l[i];
        }
        for (int x = 0; x < epl; x++) part_acc[warp][i][lane * epl + x] = acc[i][x];
    }
    __syncthreads();
    // Merge: thread t owns element t of the head dimension, for every query head.
    for (int d = threadIdx.x; d < e; d += blockDim.x) {
        for (int i = 0; i < r && i < MAX_R; i++) {
            float big = -INFINITY;
            for (int w = 0; w < DECODE_WARPS; w++) big = fmaxf(big, part_m[w][i]);
            float total = 0.0f, value = 0.0f;
            for (int w = 0; w < DECODE_WARPS; w++) {
                if (part_m[w][i] == -INFINITY) continue;  // a warp that saw no visible key
                const float f = __expf(part_m[w][i] - big);
                total += part_l[w][i] * f;
                value += part_acc[w][i][d] * f;
            }
            out[(long)bk * r * e + i * e + d] = __float2bfloat16(value / total);
        }
    }
}
