// RMSNorm and its input gradient, one row per block.

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

// RMSNorm of rows of D (D % 8 == 0, D <= 8 * RMS_PACKS * BLOCK, 16-byte aligned rows), one row
// per block, eight elements per load, each row read once: out = x * w / sqrt(mean(x^2) + eps).
// With `h` (not null), the row normed is the residual sum x + h, rounded to bf16 as a separate
// addition would round it, and also written to `sum`: the residual stream and the next norm in
// one pass.
#define RMS_PACKS 4
__device__ __forceinline__ void rms_norm_row(const __nv_bfloat16* x, const __nv_bfloat16* h, __nv_bfloat16* sum,
                                             const __nv_bfloat16* w, __nv_bfloat16* out, int d, float eps) {
    __shared__ float shared[32];
    const long base = (long)blockIdx.x * d;
    const int packs = d / 8;
    Pack8 xv[RMS_PACKS];
    float squares = 0.0f;
    for (int k = 0; k < RMS_PACKS; ++k) {
        int p = threadIdx.x + k * BLOCK;
        if (p >= packs) break;
        xv[k].raw = reinterpret_cast<const uint4*>(x + base)[p];
        if (h) {
            Pack8 hv;
            hv.raw = reinterpret_cast<const uint4*>(h + base)[p];
            for (int j = 0; j < 4; ++j) xv[k].pairs[j] = __hadd2(xv[k].pairs[j], hv.pairs[j]);
            reinterpret_cast<uint4*>(sum + base)[p] = xv[k].raw;
        }
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

extern "C" __global__ void rms_norm_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* out,
                                         int d, float eps) {
    rms_norm_row(x, nullptr, nullptr, w, out, d, eps);
}

// sum = x + h and out = RMSNorm(sum), rows as rms_norm_bf16 takes them.
extern "C" __global__ void add_rms_norm_bf16(const __nv_bfloat16* x, const __nv_bfloat16* h, const __nv_bfloat16* w,
                                             __nv_bfloat16* sum, __nv_bfloat16* out, int d, float eps) {
    rms_norm_row(x, h, sum, w, out, d, eps);
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
