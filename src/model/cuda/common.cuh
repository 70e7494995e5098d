// What the kernels of every op share: the block size, reductions over a warp and a block, eight
// bf16 values as one 16-byte load, soft caps, a hash, conversions. Every kernel works on rows or
// elements with f32 arithmetic throughout; kernels.cu includes this first.
#pragma once

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
