// The LoRA term's bias column: one product gives the adapter's term and the projection's bias.

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
