// Rows of a tensor by index, and the scatter of their gradient.

// out row i = src row idx[i], or zeros where idx[i] >= n_src: rows of d bf16 elements, d % 8 == 0
// and 16-byte aligned rows, eight elements per load (a gather, or its gradient's scatter through
// the inverse index).
extern "C" __global__ void take_rows_bf16(const __nv_bfloat16* src, long n_src, const unsigned int* idx,
                                          __nv_bfloat16* out, long n_out, int d) {
    const long per_row = d / 8;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n_out * per_row;
         i += (long)gridDim.x * blockDim.x) {
        long row = i / per_row, col = i % per_row;
        long from = idx[row];
        uint4 v = make_uint4(0, 0, 0, 0);
        if (from < n_src) v = reinterpret_cast<const uint4*>(src)[from * per_row + col];
        reinterpret_cast<uint4*>(out)[i] = v;
    }
}
