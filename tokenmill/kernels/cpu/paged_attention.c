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
#include "fp16.h"
#include "paged_attention_items.h"
#include "vec_math.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TM_AVX2 1
#endif

#define LOAD_f32(p) (p)
#define STORE_f32(x) (x)
#define LOAD_bf16(p) tm_bf16_to_f32(p)
#define STORE_bf16(x) tm_f32_to_bf16(x)
#define LOAD_f16(p) tm_f16_to_f32(p)

/* q and out of type T, the cache of type KT (float32 queries may read a 16-bit cache). */
#define DEFINE_PAGED_ATTENTION(NAME, T, SFX, KT, KSFX)                                        \
void NAME(const T *q, int64_t q_stride, T *out, int64_t out_stride, const KT *k_cache,         \
          const KT *v_cache, const int32_t *query_start, const int32_t *seq_lens,             \
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
                const int lo = tm_window_start(visible, window);                               \
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
                        const KT *kp = k_cache + base + j * row;                               \
                        for (int g = 0; g < group; g++) {                                      \
                            float dot = 0.0f;                                                  \
                            _Pragma("omp simd reduction(+:dot)")                               \
                            for (int d = 0; d < head_dim; d++) dot += qv[g][d] * LOAD_##KSFX(kp[d]); \
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
                            const KT *vp = v_cache + base + j * row;                           \
                            l[g] += p;                                                         \
                            _Pragma("omp simd")                                                \
                            for (int d = 0; d < head_dim; d++) acc[g][d] += p * LOAD_##KSFX(vp[d]); \
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

DEFINE_PAGED_ATTENTION(paged_attention_f32_generic, float, f32, float, f32)
DEFINE_PAGED_ATTENTION(paged_attention_bf16_generic, uint16_t, bf16, uint16_t, bf16)
DEFINE_PAGED_ATTENTION(paged_attention_f32_kvbf16_generic, float, f32, uint16_t, bf16)
DEFINE_PAGED_ATTENTION(paged_attention_f32_kvf16_generic, float, f32, uint16_t, f16)

#ifdef TM_AVX2
#define TM_T float
#define TM_KV_T float
#define TM_LOAD8(p) _mm256_loadu_ps(p)
#define TM_LOADKV1(x) (x)
#define TM_LOAD1(x) (x)
#define TM_STORE1(f) (f)
#define TM_DOT8 dot8_f32
#define TM_KERNEL paged_attention_f32_avx2
#include "paged_attention_avx2.inc"

#define TM_T uint16_t
#define TM_KV_T uint16_t
#define TM_LOAD8(p) tm_load8_bf16(p)
#define TM_LOADKV1(x) tm_bf16_to_f32(x)
#define TM_LOAD1(x) tm_bf16_to_f32(x)
#define TM_STORE1(f) tm_f32_to_bf16(f)
#define TM_DOT8 dot8_bf16
#define TM_KERNEL paged_attention_bf16_avx2
#include "paged_attention_avx2.inc"

/* float32 queries over a 16-bit cache (--kv-cache-dtype bfloat16|float16 in a float32
   model): half the bytes of a float32 cache read per key, the same float32 arithmetic on
   the widened values. */
#define TM_T float
#define TM_KV_T uint16_t
#define TM_LOAD8(p) tm_load8_bf16(p)
#define TM_LOADKV1(x) tm_bf16_to_f32(x)
#define TM_LOAD1(x) (x)
#define TM_STORE1(f) (f)
#define TM_DOT8 dot8_f32_kvbf16
#define TM_KERNEL paged_attention_f32_kvbf16_avx2
#include "paged_attention_avx2.inc"

#ifdef __F16C__
static inline __m256 tm_load8_f16(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
#define TM_T float
#define TM_KV_T uint16_t
#define TM_LOAD8(p) tm_load8_f16(p)
#define TM_LOADKV1(x) tm_f16_to_f32(x)
#define TM_LOAD1(x) (x)
#define TM_STORE1(f) (f)
#define TM_DOT8 dot8_f32_kvf16
#define TM_KERNEL paged_attention_f32_kvf16_avx2
#include "paged_attention_avx2.inc"
#else
#define paged_attention_f32_kvf16_avx2 paged_attention_f32_kvf16_generic
#endif
#endif

#if defined(TM_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__)
#define TM_AVX512 1
#define TM_MAX_GROUP 16 /* query heads per KV head the AVX-512 kernels take */

/* v[0..15] -> one vector whose lane j is the sum of v[(j % 4) * 4 + j / 4]'s lanes: a
   4-level tree of 45 shuffles and adds, against 16 separate horizontal sums. */
static inline __m512 tm_reduce16(const __m512 *v) {
    __m512 s[8], u[4], w[2];
    for (int k = 0; k < 8; k++)
        s[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
    for (int k = 0; k < 4; k++)
        u[k] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * k], s[2 * k + 1], 0x88),
                             _mm512_shuffle_f32x4(s[2 * k], s[2 * k + 1], 0xDD));
    for (int k = 0; k < 2; k++)
        w[k] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * k], u[2 * k + 1], 0x44),
                             _mm512_shuffle_ps(u[2 * k], u[2 * k + 1], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xDD));
}

static inline __m512 tm_load16_bf16(const uint16_t *p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* Whether the AVX-512 kernels take these heads (their registers hold up to 256 columns
   of a K row and the group's scores fit TM_MAX_GROUP). */
static inline int tm_avx512_fits(int head_dim, int num_heads, int num_kv_heads) {
    return head_dim % 16 == 0 && head_dim <= 256 && num_heads / num_kv_heads <= TM_MAX_GROUP;
}

/* A head's scores s[lo .. visible) replaced by exp(s - max), in place; returns 1 / their
   sum. The maximum sixteen lanes at a time (a scalar loop waits on each max's latency); a
   NaN score is skipped, as the scalar tail skips it. */
static inline float tm_softmax16(float *s, int lo, int visible) {
    __m512 m16 = _mm512_set1_ps(-INFINITY);
    int t = lo;
    for (; t + 16 <= visible; t += 16) m16 = _mm512_max_ps(_mm512_loadu_ps(s + t), m16);
    float mx = _mm512_reduce_max_ps(m16);
    for (; t < visible; t++) mx = s[t] > mx ? s[t] : mx;
    const __m512 mx16 = _mm512_set1_ps(mx);
    __m512 sum16 = _mm512_setzero_ps();
    for (t = lo; t + 16 <= visible; t += 16) {
        const __m512 e = tm_exp16_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + t), mx16));
        _mm512_storeu_ps(s + t, e);
        sum16 = _mm512_add_ps(sum16, e);
    }
    float sum = _mm512_reduce_add_ps(sum16);
    for (; t < visible; t++) {
        s[t] = expf(s[t] - mx);
        sum += s[t];
    }
    return 1.0f / sum;
}

/* float32 queries: float32, bfloat16 and float16 caches */
#define TM_KV_T float
#define TM_LOAD16(p) _mm512_loadu_ps(p)
#define TM_KERNEL paged_attention_f32_avx512
#include "paged_attention_avx512.inc"
#define TM_KV_T uint16_t
#define TM_LOAD16(p) tm_load16_bf16(p)
#define TM_KERNEL paged_attention_f32_kvbf16_avx512
#include "paged_attention_avx512.inc"
#define TM_KV_T uint16_t
#define TM_LOAD16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define TM_KERNEL paged_attention_f32_kvf16_avx512
#include "paged_attention_avx512.inc"
#endif

#if defined(TM_AVX512) && defined(__AVX512BF16__)
#define TM_AVX512_BF16 1

/* bfloat16 caches on AVX512-BF16 CPUs, head_dim % 32 == 0 and <= 256, at most
   TM_MAX_GROUP query heads per KV head. One work item is a (sequence, KV head) pair and
   its whole GQA group, so a K or V row comes from memory once for all the group's heads.
   Scores: vdpbf16ps (32 exact products per instruction, summed in float32), 16 keys per
   head reduced together, times the scale afterwards; softmax as the AVX2 kernel (two
   passes, the same exp); weighted V sums in float32 FMAs, each V row widened once for
   up to 6 heads, 64 columns at a time. Per layer at batch 32 x 160 keys (SmolLM2, 2-core
   Sapphire Rapids): 0.87 ms on the AVX2 kernel, 0.49 ms here.

   One query row of one item; chunks (D / 32) and group are constants where the kernel
   knows them (inlined inside the parallel region, as paged_attention_avx512.inc). */
static inline __attribute__((always_inline)) void tm_bf16_row(
        const int chunks, const int group, const uint16_t *qrow, uint16_t *orow,
        const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *table, int hk,
        int lo, int visible, int block_size, int64_t row, float scale, float *sc,
        int64_t sc_stride) {
    const int D = 32 * chunks, first = lo - lo % block_size;
    __m512bh qv[TM_MAX_GROUP][8];
    for (int g = 0; g < group; g++)
        for (int c = 0; c < chunks; c++)
            qv[g][c] = (__m512bh)_mm512_loadu_si512(qrow + g * D + 32 * c);
    /* scores, 16 keys at a time: each head's 16 dot products reduced together
       (tm_reduce16), the K rows read from L1 once per head */
    for (int t0 = lo; t0 < visible; t0 += 16) {
        const int cnt = visible - t0 < 16 ? visible - t0 : 16;
        const uint16_t *kp[16];
        for (int j = 0, blk = t0 / block_size, off = t0 % block_size; j < cnt; j++) {
            kp[j] = k_cache + ((int64_t)table[blk] * block_size + off) * row + (int64_t)hk * D;
            if (++off == block_size) {
                off = 0;
                blk++;
            }
        }
        for (int g = 0; g < group; g++) {
            __m512 acc[16];
            for (int j = 0; j < 16; j++) {
                __m512 a = _mm512_setzero_ps();
                if (j < cnt)
                    for (int c = 0; c < chunks; c++)
                        a = _mm512_dpbf16_ps(a, qv[g][c],
                                             (__m512bh)_mm512_loadu_si512(kp[j] + 32 * c));
                acc[(j % 4) * 4 + j / 4] = a;
            }
            const __m512 dots = _mm512_mul_ps(tm_reduce16(acc), _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(sc + g * sc_stride + t0, (__mmask16)((1u << cnt) - 1u), dots);
        }
    }
    float inv[TM_MAX_GROUP];
    for (int g = 0; g < group; g++) inv[g] = tm_softmax16(sc + g * sc_stride, lo, visible);
    /* weighted sums of V: 64 columns of up to 6 heads in 24 registers */
    for (int d0 = 0; d0 < D; d0 += 64) {
        const int w16 = (D - d0 < 64 ? D - d0 : 64) / 16;
        for (int g0 = 0; g0 < group; g0 += 6) {
            const int gn = group - g0 < 6 ? group - g0 : 6;
            __m512 acc[6][4];
            for (int g = 0; g < 6; g++)
                for (int c = 0; c < 4; c++) acc[g][c] = _mm512_setzero_ps();
            for (int start = first; start < visible; start += block_size) {
                const uint16_t *vb = v_cache + (int64_t)table[start / block_size] * block_size * row
                                     + (int64_t)hk * D + d0;
                const int n = visible - start < block_size ? visible - start : block_size;
                for (int j = start < lo ? lo - start : 0; j < n; j++) {
                    __m512 v[4];
                    for (int c = 0; c < w16; c++) v[c] = tm_load16_bf16(vb + j * row + 16 * c);
                    for (int g = 0; g < gn; g++) {
                        const __m512 p = _mm512_set1_ps(sc[(g0 + g) * sc_stride + start + j]);
                        for (int c = 0; c < w16; c++)
                            acc[g][c] = _mm512_fmadd_ps(p, v[c], acc[g][c]);
                    }
                }
            }
            for (int g = 0; g < gn; g++) {
                uint16_t *op = orow + (int64_t)(g0 + g) * D + d0;
                float vals[64];
                for (int c = 0; c < w16; c++) _mm512_storeu_ps(vals + 16 * c, acc[g][c]);
                for (int d = 0; d < 16 * w16; d++) op[d] = tm_f32_to_bf16(vals[d] * inv[g0 + g]);
            }
        }
    }
}

static void paged_attention_bf16_avx512(
        const uint16_t *q, int64_t q_stride, uint16_t *out, int64_t out_stride,
        const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *query_start,
        const int32_t *seq_lens, const int32_t *block_tables, int num_seqs, int max_blocks,
        int num_heads, int num_kv_heads, int D, int block_size, float scale, int max_q_len,
        int window) {
    const int group = num_heads / num_kv_heads;
    const int64_t row = (int64_t)num_kv_heads * D;
    int max_len = 0;
    for (int b = 0; b < num_seqs; b++) max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    const int64_t sc_stride = max_len + 16;
    #pragma omp parallel
    {
        float *sc = malloc(sizeof(float) * (size_t)(group * sc_stride));
        int it0, it1;
        tm_thread_items(query_start, seq_lens, num_seqs, num_kv_heads, max_q_len, &it0, &it1);
        for (int it = it0; it < it1 && sc; it++) {
            tm_prefetch_ahead(it, it0, it1, k_cache, v_cache, query_start, seq_lens,
                              block_tables, max_blocks, num_kv_heads, block_size, max_q_len,
                              window, (int64_t)sizeof(uint16_t) * D);
            const int b = it / num_kv_heads, hk = it % num_kv_heads;
            const int q0 = query_start[b], qlen = query_start[b + 1] - q0;
            const int32_t *table = block_tables + (int64_t)b * max_blocks;
            for (int i = 0; qlen <= max_q_len && i < qlen; i++) {
                const int visible = seq_lens[b] - qlen + i + 1;
                const int lo = tm_window_start(visible, window);
                const uint16_t *qrow = q + (int64_t)(q0 + i) * q_stride + (int64_t)hk * group * D;
                uint16_t *orow = out + (int64_t)(q0 + i) * out_stride + (int64_t)hk * group * D;
#define TM_CALL(CH, G)                                                                       \
    tm_bf16_row(CH, G, qrow, orow, k_cache, v_cache, table, hk, lo, visible, block_size,     \
                row, scale, sc, sc_stride)
                /* the usual shapes spelled out (as the float32 kernel) */
                if (D == 64 && group == 3) TM_CALL(2, 3);
                else if (D == 64 && group == 7) TM_CALL(2, 7);
                else if (D == 64 && group == 4) TM_CALL(2, 4);
                else if (D == 64 && group == 1) TM_CALL(2, 1);
                else if (D == 128 && group == 4) TM_CALL(4, 4);
                else if (D == 128 && group == 8) TM_CALL(4, 8);
                else if (D == 128 && group == 1) TM_CALL(4, 1);
                else TM_CALL(D / 32, group);
#undef TM_CALL
            }
        }
        free(sc);
    }
}
#endif

/* The entry points: the AVX2 kernel where it runs (head_dim a multiple of 8), the
   generic loop elsewhere. */
#ifdef TM_AVX2
#define TM_PICK(AVX2, GENERIC, D) ((D) % 8 == 0 ? AVX2 : GENERIC)
#else
#define TM_PICK(AVX2, GENERIC, D) GENERIC
#endif
#define DEFINE_DISPATCH(NAME, T, KT, AVX2, GENERIC)                                           \
void NAME(const T *q, int64_t q_stride, T *out, int64_t out_stride, const KT *k_cache,         \
          const KT *v_cache, const int32_t *query_start, const int32_t *seq_lens,             \
          const int32_t *block_tables, int num_seqs, int max_blocks, int num_heads,            \
          int num_kv_heads, int head_dim, int block_size, float scale, int max_q_len,          \
          int window) {                                                                        \
    TM_PICK(AVX2, GENERIC, head_dim)(q, q_stride, out, out_stride, k_cache, v_cache,           \
                                     query_start, seq_lens, block_tables, num_seqs,            \
                                     max_blocks, num_heads, num_kv_heads, head_dim,            \
                                     block_size, scale, max_q_len, window);                    \
}

#ifdef TM_AVX512
/* float32 queries: the AVX-512 kernel where its limits allow, else the AVX2 one. */
#define DEFINE_F32_AVX(NAME, KT)                                                              \
static void NAME##_avx(const float *q, int64_t q_stride, float *out, int64_t out_stride,     \
                       const KT *k_cache, const KT *v_cache, const int32_t *query_start,     \
                       const int32_t *seq_lens, const int32_t *block_tables, int num_seqs,   \
                       int max_blocks, int num_heads, int num_kv_heads, int head_dim,        \
                       int block_size, float scale, int max_q_len, int window) {             \
    (tm_avx512_fits(head_dim, num_heads, num_kv_heads) ? NAME##_avx512 : NAME##_avx2)(       \
        q, q_stride, out, out_stride, k_cache, v_cache, query_start, seq_lens, block_tables, \
        num_seqs, max_blocks, num_heads, num_kv_heads, head_dim, block_size, scale,          \
        max_q_len, window);                                                                  \
}
DEFINE_F32_AVX(paged_attention_f32, float)
DEFINE_F32_AVX(paged_attention_f32_kvbf16, uint16_t)
DEFINE_F32_AVX(paged_attention_f32_kvf16, uint16_t)
#undef DEFINE_F32_AVX
#else
#define paged_attention_f32_avx paged_attention_f32_avx2
#define paged_attention_f32_kvbf16_avx paged_attention_f32_kvbf16_avx2
#define paged_attention_f32_kvf16_avx paged_attention_f32_kvf16_avx2
#endif
DEFINE_DISPATCH(paged_attention_f32, float, float, paged_attention_f32_avx,
                paged_attention_f32_generic)
DEFINE_DISPATCH(paged_attention_f32_kvbf16, float, uint16_t, paged_attention_f32_kvbf16_avx,
                paged_attention_f32_kvbf16_generic)
DEFINE_DISPATCH(paged_attention_f32_kvf16, float, uint16_t, paged_attention_f32_kvf16_avx,
                paged_attention_f32_kvf16_generic)
#ifdef TM_AVX512_BF16
/* The AVX-512 kernel where its limits allow, else as float32. */
static void paged_attention_bf16_avx(
        const uint16_t *q, int64_t q_stride, uint16_t *out, int64_t out_stride,
        const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *query_start,
        const int32_t *seq_lens, const int32_t *block_tables, int num_seqs, int max_blocks,
        int num_heads, int num_kv_heads, int head_dim, int block_size, float scale,
        int max_q_len, int window) {
    const int fits = head_dim % 32 == 0 && tm_avx512_fits(head_dim, num_heads, num_kv_heads);
    (fits ? paged_attention_bf16_avx512 : paged_attention_bf16_avx2)(
        q, q_stride, out, out_stride, k_cache, v_cache, query_start, seq_lens, block_tables,
        num_seqs, max_blocks, num_heads, num_kv_heads, head_dim, block_size, scale, max_q_len,
        window);
}
DEFINE_DISPATCH(paged_attention_bf16, uint16_t, uint16_t, paged_attention_bf16_avx,
                paged_attention_bf16_generic)
#else
DEFINE_DISPATCH(paged_attention_bf16, uint16_t, uint16_t, paged_attention_bf16_avx2,
                paged_attention_bf16_generic)
#endif
