/*
 * Paged attention for short queries (decodes, speculative verification,
 * short prefill chunks) on the CPU, reading K/V in place from the paged cache.
 *
 * The PyTorch path gathers every sequence's blocks into a padded copy per
 * layer and runs batched matmuls on tiny shapes; at batch 32 that costs more
 * than the layer's weight matmuls. Here each (sequence, KV head) pair walks
 * its block table once, scoring the whole GQA group of query heads against
 * each key row while it is in cache, with a per-block online softmax (no
 * score matrix is kept). Work items are spread over the OpenMP threads of the
 * runtime PyTorch already loaded (same soname), so there is one thread pool.
 *
 * Layouts (element strides):
 *   q, out       [T, H, D]; token t at t * q_stride / t * out_stride, heads contiguous
 *   k/v_cache    [num_blocks, block_size, KVH, D] contiguous
 *   query_start  [B + 1]; seq_lens [B]; block_tables [B, max_blocks]
 * Query token i of a sequence with context length L and query length n sits
 * at position L - n + i and sees keys 0..L - n + i (bottom-right causal).
 * Sequences with more than max_q_len query tokens are skipped (the caller
 * runs them through a matmul-based kernel).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

#define LOAD_f32(p) (p)
#define STORE_f32(x) (x)
#define LOAD_bf16(p) bf16_to_f32(p)
#define STORE_bf16(x) f32_to_bf16(x)

#define DEFINE_PAGED_ATTENTION(NAME, T, SFX)                                                  \
void NAME(const T *q, int64_t q_stride, T *out, int64_t out_stride, const T *k_cache,          \
          const T *v_cache, const int32_t *query_start, const int32_t *seq_lens,              \
          const int32_t *block_tables, int num_seqs, int max_blocks, int num_heads,            \
          int num_kv_heads, int head_dim, int block_size, float scale, int max_q_len) {        \
    const int group = num_heads / num_kv_heads;                                                \
    const int64_t row = (int64_t)num_kv_heads * head_dim; /* one token's K (or V) */           \
    _Pragma("omp parallel for collapse(2) schedule(dynamic, 1)")                               \
    for (int b = 0; b < num_seqs; b++) {                                                       \
        for (int hk = 0; hk < num_kv_heads; hk++) {                                            \
            const int q0 = query_start[b], qlen = query_start[b + 1] - q0;                     \
            if (qlen <= 0 || qlen > max_q_len) continue;                                       \
            const int len = seq_lens[b];                                                       \
            const int32_t *table = block_tables + (int64_t)b * max_blocks;                     \
            float qv[group][head_dim], acc[group][head_dim];                                   \
            float s[group][block_size], m[group], l[group];                                    \
            for (int i = 0; i < qlen; i++) {                                                   \
                const int visible = len - qlen + i + 1;                                        \
                for (int g = 0; g < group; g++) {                                              \
                    const T *qp = q + (int64_t)(q0 + i) * q_stride                             \
                                  + (int64_t)(hk * group + g) * head_dim;                      \
                    for (int d = 0; d < head_dim; d++) qv[g][d] = LOAD_##SFX(qp[d]) * scale;   \
                    for (int d = 0; d < head_dim; d++) acc[g][d] = 0.0f;                       \
                    m[g] = -INFINITY;                                                          \
                    l[g] = 0.0f;                                                               \
                }                                                                              \
                for (int start = 0; start < visible; start += block_size) {                    \
                    const int64_t base = (int64_t)table[start / block_size] * block_size * row \
                                         + (int64_t)hk * head_dim;                             \
                    const int n = visible - start < block_size ? visible - start : block_size; \
                    for (int j = 0; j < n; j++) {                                              \
                        const T *kp = k_cache + base + j * row;                                \
                        for (int g = 0; g < group; g++) {                                      \
                            float dot = 0.0f;                                                  \
                            _Pragma("omp simd reduction(+:dot)")                               \
                            for (int d = 0; d < head_dim; d++) dot += qv[g][d] * LOAD_##SFX(kp[d]); \
                            s[g][j] = dot;                                                     \
                        }                                                                      \
                    }                                                                          \
                    for (int g = 0; g < group; g++) {                                          \
                        float mx = m[g];                                                       \
                        for (int j = 0; j < n; j++) mx = s[g][j] > mx ? s[g][j] : mx;          \
                        const float corr = expf(m[g] - mx);                                    \
                        l[g] *= corr;                                                          \
                        for (int d = 0; d < head_dim; d++) acc[g][d] *= corr;                  \
                        for (int j = 0; j < n; j++) {                                          \
                            const float p = expf(s[g][j] - mx);                                \
                            const T *vp = v_cache + base + j * row;                            \
                            l[g] += p;                                                         \
                            _Pragma("omp simd")                                                \
                            for (int d = 0; d < head_dim; d++) acc[g][d] += p * LOAD_##SFX(vp[d]); \
                        }                                                                      \
                        m[g] = mx;                                                             \
                    }                                                                          \
                }                                                                              \
                for (int g = 0; g < group; g++) {                                              \
                    T *op = out + (int64_t)(q0 + i) * out_stride                               \
                            + (int64_t)(hk * group + g) * head_dim;                            \
                    const float inv = 1.0f / l[g];                                             \
                    for (int d = 0; d < head_dim; d++) op[d] = STORE_##SFX(acc[g][d] * inv);   \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
}

DEFINE_PAGED_ATTENTION(paged_attention_f32, float, f32)
DEFINE_PAGED_ATTENTION(paged_attention_bf16, uint16_t, bf16)
