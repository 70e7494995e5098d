// LoRA's inverted dropout, its mask drawn from a key where it is applied.

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
