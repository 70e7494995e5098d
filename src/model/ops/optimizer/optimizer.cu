// The optimizer step on the GPU: the gradient norm and AdamW over many variables in one launch
// each.

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
