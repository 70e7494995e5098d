// Attention with its probabilities materialised, for shapes the flash kernels do not take: the
// causal softmax of the scores q.k (scaled, capped where the model caps them) and its backward.

// Causal softmax of attention scores: probs[r][j] = softmax_j(scores[r][j] * scale) over the
// keys j <= (r % t) + (s - t), zero elsewhere, without reading the hidden keys. Rows are (batch,
// kv head, query head, position), so the query position of row r is r % t. One warp per row
// (a block per row spent its time in barriers), two keys per lane at a time (s even).

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
