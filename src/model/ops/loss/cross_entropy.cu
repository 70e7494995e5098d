// Cross-entropy through the output head, from bf16 logits (capped where the model caps them),
// and the scaling of its eagerly computed gradient.

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
