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

#include "bf16.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TM_AVX2 1
#endif

#define LOAD_f32(p) (p)
#define STORE_f32(x) (x)
#define LOAD_bf16(p) tm_bf16_to_f32(p)
#define STORE_bf16(x) tm_f32_to_bf16(x)

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
DEFINE_PAGED_ATTENTION(paged_attention_bf16_generic, uint16_t, bf16)

#ifdef TM_AVX2
/* exp of eight floats <= 0 (softmax after subtracting the maximum): x = n ln2 + r with
   |r| <= ln2 / 2, exp(r) by a degree-7 minimax polynomial, times 2^n built in the
   exponent bits. Within 2 ulp of expf; inputs below -87.3 give 2^-126 (the weight of a
   score that far below the maximum is lost in the sum either way). */
static inline __m256 tm_exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* ln2 split in two so that n * hi is exact: r = x - n * ln2 to full precision */
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i bits = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

static inline float tm_hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* bfloat16 -> float32 for eight elements: the 16 bits become the high half (exact). */
static inline __m256 tm_load8_bf16(const uint16_t *p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

#define TM_T float
#define TM_LOAD8(p) _mm256_loadu_ps(p)
#define TM_LOAD1(x) (x)
#define TM_STORE1(f) (f)
#define TM_DOT8 dot8_f32
#define TM_KERNEL paged_attention_f32_avx2
#include "paged_attention_avx2.inc"

#define TM_T uint16_t
#define TM_LOAD8(p) tm_load8_bf16(p)
#define TM_LOAD1(x) tm_bf16_to_f32(x)
#define TM_STORE1(f) tm_f32_to_bf16(f)
#define TM_DOT8 dot8_bf16
#define TM_KERNEL paged_attention_bf16_avx2
#include "paged_attention_avx2.inc"
#endif

/* The entry points: the AVX2 kernel where it runs (head_dim a multiple of 8), the
   generic loop elsewhere. */
#ifdef TM_AVX2
#define TM_PICK(AVX2, GENERIC, D) ((D) % 8 == 0 ? AVX2 : GENERIC)
#else
#define TM_PICK(AVX2, GENERIC, D) GENERIC
#endif
#define DEFINE_DISPATCH(NAME, T, AVX2, GENERIC)                                               \
void NAME(const T *q, int64_t q_stride, T *out, int64_t out_stride, const T *k_cache,          \
          const T *v_cache, const int32_t *query_start, const int32_t *seq_lens,              \
          const int32_t *block_tables, int num_seqs, int max_blocks, int num_heads,            \
          int num_kv_heads, int head_dim, int block_size, float scale, int max_q_len,          \
          int window) {                                                                        \
    TM_PICK(AVX2, GENERIC, head_dim)(q, q_stride, out, out_stride, k_cache, v_cache,           \
                                     query_start, seq_lens, block_tables, num_seqs,            \
                                     max_blocks, num_heads, num_kv_heads, head_dim,            \
                                     block_size, scale, max_q_len, window);                    \
}

DEFINE_DISPATCH(paged_attention_f32, float, paged_attention_f32_avx2,
                paged_attention_f32_generic)
DEFINE_DISPATCH(paged_attention_bf16, uint16_t, paged_attention_bf16_avx2,
                paged_attention_bf16_generic)
