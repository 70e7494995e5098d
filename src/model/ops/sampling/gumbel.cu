// Sampling on the GPU: top-k / top-p cuts and Gumbel-max draws from the logits, keyed per row
// and step so that a row draws the same tokens whatever its batch.

// Orders floats as unsigned integers: a > b exactly when order_key(a) > order_key(b).
__device__ __forceinline__ unsigned int order_key(float f) {
    const unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The inverse of order_key.
__device__ __forceinline__ float from_order_key(unsigned int k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Above the largest Gumbel noise a draw can give, -log(-log(1 - 2^-24)) = 16.64 (see
// gumbel_argmax), with room for the rounding of the scores.
#define GUMBEL_MAX 16.7f

// Eight consecutive values as f32, from 16-byte aligned memory.
__device__ __forceinline__ void load8(const __nv_bfloat16* x, float* f) {
    Pack8 p;
    p.raw = *reinterpret_cast<const uint4*>(x);
    for (int j = 0; j < 4; ++j) {
        const float2 two = __bfloat1622float2(p.pairs[j]);
        f[2 * j] = two.x;
        f[2 * j + 1] = two.y;
    }
}
__device__ __forceinline__ void load8(const float* x, float* f) {
    const float4 a = reinterpret_cast<const float4*>(x)[0], b = reinterpret_cast<const float4*>(x)[1];
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
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
    // The order key of the best score any thread of the block has reached: a token whose scaled
    // logit plus the largest noise is below it cannot win, and is passed over without drawing
    // its noise (most of a trained model's vocabulary). The draws are the same either way.
    __shared__ unsigned int reached_s;
    if (t == 0) reached_s = 0u;
    __syncthreads();
    const volatile unsigned int* reached = &reached_s;
    float best = -INFINITY;
    int best_i = v;
    auto consider = [&](float logit, int i) {
        float score = logit;
        if (inv_t > 0.0f) {
            if (order_key(score * inv_t) < cut || score * inv_t + GUMBEL_MAX < best) return;
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
    };
    const bool packed = v % 8 == 0 && (reinterpret_cast<unsigned long long>(x) & 15) == 0;
    for (int p = t; packed && p < v / 8; p += blockDim.x) {
        float f[8];
        load8(x + 8 * (long)p, f);
        if (inv_t > 0.0f) {
            float most = f[0];
            for (int j = 1; j < 8; ++j) most = fmaxf(most, f[j]);
            if (most * inv_t + GUMBEL_MAX < fmaxf(best, from_order_key(*reached))) continue;
        }
        for (int j = 0; j < 8; ++j) consider(f[j], 8 * p + j);
        if (inv_t > 0.0f && order_key(best) > *reached) atomicMax(&reached_s, order_key(best));
    }
    for (int i = t; !packed && i < v; i += blockDim.x) consider(to_f32(x[i]), i);
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
