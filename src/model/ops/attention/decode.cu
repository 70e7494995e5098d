// Attention of one new token per row against the KV cache.

// Attention of one new token per row against the KV cache (decoding), bf16. One block of E
// threads per (batch row, kv head); the R <= MAX_R query heads that share the kv head are handled
// together, so each key and value is read once. Keys go in tiles of E: thread t scores key t of
// the tile against every query head, the tile's scores
// update each head's running max and sum (online softmax, one warp per head), and then thread t
// accumulates element t of every head's output over the tile's values.
//   q: (B, K, R, E); k, v: (B, K, C, E) of which the first s positions are used, 16-byte aligned;
//   mask: (B, s) additive f32 (-inf hides a key), or null; out: (B, K, R, E); E = 32 * w <= 128.
#define MAX_R 8
#define MAX_E 128
extern "C" __global__ void decode_attention_bf16(const __nv_bfloat16* q, const __nv_bfloat16* k,
                                                 const __nv_bfloat16* v, const float* mask,
                                                 __nv_bfloat16* out, int heads, int r, int c, int s,
                                                 int e, float scale) {
    // Shared values are read as float4: every thread reads the same query and weight values, and
    // one 16-byte read instead of four keeps shared memory from being the bottleneck.
    __shared__ float4 q4[MAX_R][MAX_E / 4];
    __shared__ float4 p4[MAX_R][MAX_E / 4];
    __shared__ float m_s[MAX_R], l_s[MAX_R], corr_s[MAX_R];
    float(*q_s)[MAX_E] = reinterpret_cast<float(*)[MAX_E]>(q4);
    float(*p_s)[MAX_E] = reinterpret_cast<float(*)[MAX_E]>(p4);
    const int bk = blockIdx.x, b = bk / heads, t = threadIdx.x;
    const int warp = t / 32, lane = t % 32, warps = e / 32, per_row = e / 8;
    const __nv_bfloat16* qb = q + (long)bk * r * e;
    const __nv_bfloat16* kb = k + (long)bk * c * e;
    const __nv_bfloat16* vb = v + (long)bk * c * e;
    for (int i = 0; i < r; i++) q_s[i][t] = __bfloat162float(qb[i * e + t]) * scale;
    if (t < MAX_R) {
        m_s[t] = -INFINITY;
        l_s[t] = 0.0f;
    }
    float acc[MAX_R];
#pragma unroll
    for (int i = 0; i < MAX_R; i++) acc[i] = 0.0f;
    __syncthreads();
    for (int j0 = 0; j0 < s; j0 += e) {
        const int n = min(e, s - j0);
        // Scores of key j0 + t, for every query head; the thread reads its key row with 16-byte
        // loads (staging the tile in shared memory cost more occupancy than it saved).
        const int j = j0 + t;
        const float bias = j < s ? (mask ? mask[(long)b * s + j] : 0.0f) : -INFINITY;
        float sc[MAX_R];
#pragma unroll
        for (int i = 0; i < MAX_R; i++) sc[i] = 0.0f;
        if (bias != -INFINITY) {
            const uint4* row = reinterpret_cast<const uint4*>(kb + (long)j * e);
            for (int x = 0; x < per_row; x++) {
                const uint4 raw = row[x];
                const __nv_bfloat162* pair = reinterpret_cast<const __nv_bfloat162*>(&raw);
                const float2 f0 = __bfloat1622float2(pair[0]), f1 = __bfloat1622float2(pair[1]);
                const float2 f2 = __bfloat1622float2(pair[2]), f3 = __bfloat1622float2(pair[3]);
#pragma unroll
                for (int i = 0; i < MAX_R; i++) {
                    if (i < r) {
                        const float4 a = q4[i][2 * x], c4 = q4[i][2 * x + 1];
                        sc[i] += a.x * f0.x + a.y * f0.y + a.z * f1.x + a.w * f1.y + c4.x * f2.x + c4.y * f2.y +
                                 c4.z * f3.x + c4.w * f3.y;
                    }
                }
            }
        }
        for (int i = 0; i < r; i++) p_s[i][t] = bias == -INFINITY ? -INFINITY : sc[i] + bias;
        __syncthreads();
        // Online softmax, one warp per query head: the tile's weights replace its scores (0 for
        // hidden keys and past the tile's end).
        for (int i = warp; i < r; i += warps) {
            float big = -INFINITY;
            for (int x = lane; x < e; x += 32) big = fmaxf(big, p_s[i][x]);
            for (int o = 16; o > 0; o >>= 1) big = fmaxf(big, __shfl_xor_sync(0xffffffff, big, o));
            const float m_old = m_s[i], m_new = fmaxf(m_old, big);
            float sum = 0.0f;
            for (int x = lane; x < e; x += 32) {
                const float p = m_new == -INFINITY ? 0.0f : __expf(p_s[i][x] - m_new);
                p_s[i][x] = p;
                sum += p;
            }
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
            if (lane == 0) {
                const float corr = m_old == -INFINITY ? 0.0f : __expf(m_old - m_new);
                l_s[i] = l_s[i] * corr + sum;
                m_s[i] = m_new;
                corr_s[i] = corr;
            }
        }
        __syncthreads();
        // Element t of each head's output over the tile's values, four keys at a time.
#pragma unroll
        for (int i = 0; i < MAX_R; i++)
            if (i < r) acc[i] *= corr_s[i];
        for (int x0 = 0; x0 < n; x0 += 4) {
            float val[4];
#pragma unroll
            for (int u = 0; u < 4; u++) val[u] = x0 + u < n ? __bfloat162float(vb[(long)(j0 + x0 + u) * e + t]) : 0.0f;
#pragma unroll
            for (int i = 0; i < MAX_R; i++) {
                if (i < r) {
                    const float4 p = p4[i][x0 / 4];
                    acc[i] += p.x * val[0] + p.y * val[1] + p.z * val[2] + p.w * val[3];
                }
            }
        }
        __syncthreads();
    }
    for (int i = 0; i < r; i++) out[((long)bk * r + i) * e + t] = __float2bfloat16(acc[i] / l_s[i]);
}
