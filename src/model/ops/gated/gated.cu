// The gated MLP's product act(gate) * up (SwiGLU, GeGLU) and its gradients.

__device__ __forceinline__ float silu_of(float g) { return g / (1.0f + __expf(-g)); }

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
