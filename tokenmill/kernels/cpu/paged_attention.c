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
 * at position p = L - n + i and sees keys 0..p (bottom-right causal); with a
 * sliding window W > 0 only keys p - W + 1..p. Blocks before a query's window
 * are never read (their block-table entries may be stale).
 * Sequences with more than max_q_len query tokens are skipped (the caller
 * runs them through a matmul-based kernel).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TM_AVX2 1
#endif

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
          int num_kv_heads, int head_dim, int block_size, float scale, int max_q_len,          \
          int window) {                                                                        \
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
                const int lo = window > 0 && visible > window ? visible - window : 0;          \
                for (int g = 0; g < group; g++) {                                              \
                    const T *qp = q + (int64_t)(q0 + i) * q_stride                             \
                                  + (int64_t)(hk * group + g) * head_dim;                      \
                    for (int d = 0; d < head_dim; d++) qv[g][d] = LOAD_##SFX(qp[d]) * scale;   \
                    for (int d = 0; d < head_dim; d++) acc[g][d] = 0.0f;                       \
                    m[g] = -INFINITY;                                                          \
                    l[g] = 0.0f;                                                               \
                }                                                                              \
                for (int start = lo - lo % block_size; start < visible; start += block_size) { \
                    const int64_t base = (int64_t)table[start / block_size] * block_size * row \
                                         + (int64_t)hk * head_dim;                             \
                    const int n = visible - start < block_size ? visible - start : block_size; \
                    const int j0 = start < lo ? lo - start : 0;                                \
                    for (int j = j0; j < n; j++) {                                             \
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
                        for (int j = j0; j < n; j++) mx = s[g][j] > mx ? s[g][j] : mx;         \
                        const float corr = expf(m[g] - mx);                                    \
                        l[g] *= corr;                                                          \
                        for (int d = 0; d < head_dim; d++) acc[g][d] *= corr;                  \
                        for (int j = j0; j < n; j++) {                                         \
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

DEFINE_PAGED_ATTENTION(paged_attention_f32_generic, float, f32)
DEFINE_PAGED_ATTENTION(paged_attention_bf16, uint16_t, bf16)

#ifdef TM_AVX2
/* Eight dot products at once: rows k0..k7 (each D floats) with q; returns the eight sums. */
static inline __m256 dot8(const float *q, const float *k, int64_t row, int D) {
    __m256 a[8];
    for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
    for (int d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + j * row + d), a[j]);
    }
    /* transpose-reduce: lane j of the result = horizontal sum of a[j] */
    const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
    const __m256 lo = _mm256_permute2f128_ps(h0123, h4567, 0x20);
    const __m256 hi = _mm256_permute2f128_ps(h0123, h4567, 0x31);
    return _mm256_add_ps(lo, hi);
}

/* float32, head_dim % 8 == 0: per query, all scores first (two-pass softmax), then the
   weighted sum of V with the accumulator in registers. Scores live in a per-thread
   buffer of the longest context. Same results as the generic kernel up to rounding. */
static void paged_attention_f32_avx2(const float *q, int64_t q_stride, float *out,
                                     int64_t out_stride, const float *k_cache,
                                     const float *v_cache, const int32_t *query_start,
                                     const int32_t *seq_lens, const int32_t *block_tables,
                                     int num_seqs, int max_blocks, int num_heads,
                                     int num_kv_heads, int D, int block_size, float scale,
                                     int max_q_len, int window) {
    const int group = num_heads / num_kv_heads;
    const int64_t row = (int64_t)num_kv_heads * D;
    int max_len = 0;
    for (int b = 0; b < num_seqs; b++) max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    #pragma omp parallel
    {
        float *sc = malloc(sizeof(float) * ((size_t)max_len + 8));
        float *qs = malloc(sizeof(float) * (size_t)D);
        float *acc = malloc(sizeof(float) * (size_t)D);
        #pragma omp for collapse(2) schedule(dynamic, 1)
        for (int b = 0; b < num_seqs; b++) {
            for (int hk = 0; hk < num_kv_heads; hk++) {
                const int q0 = query_start[b], qlen = query_start[b + 1] - q0;
                if (qlen <= 0 || qlen > max_q_len || !sc) continue;
                const int len = seq_lens[b];
                const int32_t *table = block_tables + (int64_t)b * max_blocks;
                for (int i = 0; i < qlen; i++) {
                    const int visible = len - qlen + i + 1;
                    const int lo = window > 0 && visible > window ? visible - window : 0;
                    const int first = lo - lo % block_size; /* block-aligned start */
                    for (int g = 0; g < group; g++) {
                        const int head = hk * group + g;
                        const float *qp = q + (int64_t)(q0 + i) * q_stride + (int64_t)head * D;
                        for (int d = 0; d < D; d++) qs[d] = qp[d] * scale;
                        /* scores, 8 keys at a time inside each block */
                        float mx = -INFINITY;
                        for (int start = first; start < visible; start += block_size) {
                            const float *kb = k_cache
                                + (int64_t)table[start / block_size] * block_size * row
                                + (int64_t)hk * D;
                            const int n = visible - start < block_size ? visible - start
                                                                       : block_size;
                            int j = start < lo ? lo - start : 0;
                            for (; j + 8 <= n; j += 8)
                                _mm256_storeu_ps(sc + start + j, dot8(qs, kb + j * row, row, D));
                            for (; j < n; j++) {
                                float dot = 0.0f;
                                for (int d = 0; d < D; d++) dot += qs[d] * kb[j * row + d];
                                sc[start + j] = dot;
                            }
                        }
                        for (int t = lo; t < visible; t++) mx = sc[t] > mx ? sc[t] : mx;
                        float sum = 0.0f;
                        for (int t = lo; t < visible; t++) {
                            sc[t] = expf(sc[t] - mx);
                            sum += sc[t];
                        }
                        /* weighted sum of V rows, accumulator in registers (D <= 128) */
                        for (int d0 = 0; d0 < D; d0 += 64) {
                            const int w = D - d0 < 64 ? D - d0 : 64; /* multiple of 8 */
                            __m256 a[8];
                            for (int c = 0; c < 8; c++) a[c] = _mm256_setzero_ps();
                            for (int start = first; start < visible; start += block_size) {
                                const float *vb = v_cache
                                    + (int64_t)table[start / block_size] * block_size * row
                                    + (int64_t)hk * D + d0;
                                const int n = visible - start < block_size ? visible - start
                                                                           : block_size;
                                for (int j = start < lo ? lo - start : 0; j < n; j++) {
                                    const __m256 p = _mm256_set1_ps(sc[start + j]);
                                    for (int c = 0; c < w / 8; c++)
                                        a[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vb + j * row + 8 * c),
                                                               a[c]);
                                }
                            }
                            for (int c = 0; c < w / 8; c++) _mm256_storeu_ps(acc + d0 + 8 * c, a[c]);
                        }
                        float *op = out + (int64_t)(q0 + i) * out_stride + (int64_t)head * D;
                        const float inv = 1.0f / sum;
                        for (int d = 0; d < D; d++) op[d] = acc[d] * inv;
                    }
                }
            }
        }
        free(sc);
        free(qs);
        free(acc);
    }
}
#endif

void paged_attention_f32(const float *q, int64_t q_stride, float *out, int64_t out_stride,
                         const float *k_cache, const float *v_cache, const int32_t *query_start,
                         const int32_t *seq_lens, const int32_t *block_tables, int num_seqs,
                         int max_blocks, int num_heads, int num_kv_heads, int head_dim,
                         int block_size, float scale, int max_q_len, int window) {
#ifdef TM_AVX2
    if (head_dim % 8 == 0) {
        paged_attention_f32_avx2(q, q_stride, out, out_stride, k_cache, v_cache, query_start,
                                 seq_lens, block_tables, num_seqs, max_blocks, num_heads,
                                 num_kv_heads, head_dim, block_size, scale, max_q_len, window);
        return;
    }
#endif
    paged_attention_f32_generic(q, q_stride, out, out_stride, k_cache, v_cache, query_start,
                                seq_lens, block_tables, num_seqs, max_blocks, num_heads,
                                num_kv_heads, head_dim, block_size, scale, max_q_len, window);
}
