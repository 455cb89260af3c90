/*
 * Attention for long prefill chunks on the CPU (float32), reading K/V in place from
 * the paged cache: the sequences with more query tokens than the paged decode kernel
 * (paged_attention.c) takes.
 *
 * PyTorch's fused CPU attention reached 30-36 GFLOP/s on a 512-token SmolLM2 prompt
 * on two AVX2 cores, a third of what the same cores give a float32 GEMM, and it needs
 * the keys gathered out of the cache first. Here a work item is a tile of query rows:
 * up to TM_PA_ROWS (query token, head) pairs of one KV head's GQA group, token-major
 * (row r is token r / G, head r % G), so every K and V row read serves G heads.
 * The tile's queries are kept transposed (Qt[d][r], the scale folded in): a row per
 * vector lane. Then, for each block of TM_PA_KEYS keys:
 *   scores     S[j][r] from one broadcast key element and two query vectors per
 *              step (4 keys x 2 vectors of rows: 8 FMAs per 6 loads);
 *   softmax    online, down the lanes: the running maximum and sum of each row,
 *              the block's probabilities written over its scores;
 *   output     O[r][d] = alpha * O[r][d] + sum_j P[j][r] V[j][d], from a broadcast
 *              probability and two V vectors per step (4 rows x 2 vectors).
 * Masks (bottom-right causal: query token i of a sequence with context length L and
 * query length n sits at position L - n + i and sees keys up to it; with a sliding
 * window W > 0, only the last W of them) are applied only to key blocks some row of
 * the tile cannot fully see. Keys before the tile's first window are never read.
 *
 * Work items are spread over the OpenMP threads of PyTorch's runtime (same soname),
 * the tiles with the most keys first.
 *
 * A 16-bit or 8-bit cache (kv_kind, kv_cache_types.h) is widened to float32 first, each
 * long sequence's visible rows once per call (in parallel), then read as a float32 one;
 * past TM_PA_WIDE_MAX bytes for the call, each tile widens its key blocks into its
 * thread's buffer instead.
 *
 * Layouts (element strides), as paged_attention.c:
 *   q, out       [T, H, D]; token t at t * q_stride / t * out_stride, heads contiguous
 *   k/v_cache    [num_blocks, block_size, KVH, D] contiguous
 *   query_start  [B + 1]; seq_lens [B]; block_tables [B, max_blocks]
 * Sequences with at most min_q_len query tokens are skipped (left to the paged kernel).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "fp16.h"
#include "kv_cache_types.h"
#include "paged_attention_items.h"
#include "vec_math.h"

#define TM_PA_ROWS 64 /* query rows per tile (a multiple of 2 vectors, so AVX-512 too) */
#define TM_PA_KEYS 32 /* keys per softmax block */
#define TM_PA_WIDE_MAX ((size_t)256 << 20) /* widened 16/8-bit K/V kept for a whole call */

typedef struct {
    int b, t0, hk; /* sequence, first query token of the tile, KV head */
} tm_pa_item;

/* The work items, tiles with the most keys first (the last tiles of each sequence);
   *count = how many (0 with nothing to do). NULL when out of memory. */
static tm_pa_item *tm_pa_items(const int32_t *query_start, int num_seqs, int num_kv_heads,
                               int tile_tokens, int min_q_len, int *count) {
    int n = 0, max_tiles = 0;
    for (int b = 0; b < num_seqs; b++) {
        const int qlen = query_start[b + 1] - query_start[b];
        if (qlen <= min_q_len) continue;
        const int tiles = (qlen + tile_tokens - 1) / tile_tokens;
        n += tiles * num_kv_heads;
        max_tiles = tiles > max_tiles ? tiles : max_tiles;
    }
    *count = n;
    tm_pa_item *items = malloc(sizeof(tm_pa_item) * (size_t)(n ? n : 1));
    if (!items) return NULL;
    int k = 0;
    for (int from_end = 0; from_end < max_tiles; from_end++)
        for (int b = 0; b < num_seqs; b++) {
            const int qlen = query_start[b + 1] - query_start[b];
            const int tiles = (qlen + tile_tokens - 1) / tile_tokens;
            if (qlen <= min_q_len || from_end >= tiles) continue;
            for (int hk = 0; hk < num_kv_heads; hk++)
                items[k++] = (tm_pa_item){b, (tiles - 1 - from_end) * tile_tokens, hk};
        }
    return items;
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* dst[0..D) = the cache row at element offset `at` as float32: 16-bit values widened
   (exact), 8-bit codes times the row's scale (one rounding, as kv_quant.dequantize). */
static void tm_widen_row(float *dst, const void *cache, int64_t at, int D, int kv_kind) {
    int d = 0;
    if (kv_kind == TM_KV_INT8 || kv_kind == TM_KV_FP8) {
        const uint8_t *c = (const uint8_t *)cache + at;
        float s;
        memcpy(&s, c + D, sizeof s);
        for (; d < D; d++)
            dst[d] = (kv_kind == TM_KV_INT8 ? (float)(int8_t)c[d] : tm_fp8_e4m3_to_f32(c[d])) * s;
        return;
    }
    const uint16_t *src = (const uint16_t *)cache + at;
    if (kv_kind == TM_KV_BF16)
        for (; d + 8 <= D; d += 8) _mm256_storeu_ps(dst + d, tm_load8_bf16(src + d));
#ifdef __F16C__
    else
        for (; d + 8 <= D; d += 8)
            _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + d))));
#endif
    for (; d < D; d++)
        dst[d] = kv_kind == TM_KV_BF16 ? tm_bf16_to_f32(src[d]) : tm_f16_to_f32(src[d]);
}

#define TM_VL 8
#define TM_V __m256
#define TM_V_LOAD(p) _mm256_load_ps(p)
#define TM_V_LOADU(p) _mm256_loadu_ps(p)
#define TM_V_STORE(p, x) _mm256_store_ps(p, x)
#define TM_V_STOREU(p, x) _mm256_storeu_ps(p, x)
#define TM_V_SET1(x) _mm256_set1_ps(x)
#define TM_V_BCAST(p) _mm256_broadcast_ss(p)
#define TM_V_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define TM_V_MUL(a, b) _mm256_mul_ps(a, b)
#define TM_V_ADD(a, b) _mm256_add_ps(a, b)
#define TM_V_SUB(a, b) _mm256_sub_ps(a, b)
#define TM_V_MAX(a, b) _mm256_max_ps(a, b)
#define TM_V_ZERO() _mm256_setzero_ps()
#define TM_V_EXP(x) tm_exp_nonpositive(x)
/* s where key j is visible to the lane's row (lo <= j <= pos), else -inf */
#define TM_V_MASK_KEY(s, j, pos, lo)                                                           \
    _mm256_blendv_ps(s, _mm256_set1_ps(-INFINITY),                                           \
                     _mm256_or_ps(_mm256_cmp_ps(j, pos, _CMP_GT_OQ),                          \
                                  _mm256_cmp_ps(j, lo, _CMP_LT_OQ)))
/* p, zero in the lanes where the masked score s is -inf */
#define TM_V_ZERO_MASKED(p, s)                                                                 \
    _mm256_andnot_ps(_mm256_cmp_ps(s, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ), p)
#define TM_PA_KERNEL prefill_attention_avx2
#include "prefill_attention.inc"
#endif

#if defined(__AVX512F__)
#define TM_VL 16
#define TM_V __m512
#define TM_V_LOAD(p) _mm512_load_ps(p)
#define TM_V_LOADU(p) _mm512_loadu_ps(p)
#define TM_V_STORE(p, x) _mm512_store_ps(p, x)
#define TM_V_STOREU(p, x) _mm512_storeu_ps(p, x)
#define TM_V_SET1(x) _mm512_set1_ps(x)
#define TM_V_BCAST(p) _mm512_set1_ps(*(p))
#define TM_V_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define TM_V_MUL(a, b) _mm512_mul_ps(a, b)
#define TM_V_ADD(a, b) _mm512_add_ps(a, b)
#define TM_V_SUB(a, b) _mm512_sub_ps(a, b)
#define TM_V_MAX(a, b) _mm512_max_ps(a, b)
#define TM_V_ZERO() _mm512_setzero_ps()
#define TM_V_EXP(x) tm_exp16_nonpositive(x)
#define TM_V_MASK_KEY(s, j, pos, lo)                                                           \
    _mm512_mask_blend_ps(_mm512_cmp_ps_mask(j, pos, _CMP_GT_OQ)                               \
                             | _mm512_cmp_ps_mask(j, lo, _CMP_LT_OQ),                         \
                         s, _mm512_set1_ps(-INFINITY))
#define TM_V_ZERO_MASKED(p, s)                                                                 \
    _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s, _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ), p)
#define TM_PA_KERNEL prefill_attention_avx512
#include "prefill_attention.inc"
#endif

/* Whether prefill_attention_f32 runs heads of this size in this build. */
int prefill_attention_supported(int head_dim) {
#if defined(__AVX2__) && defined(__FMA__)
    return head_dim > 0 && head_dim % 8 == 0;
#else
    (void)head_dim;
    return 0;
#endif
}

/* Returns 1 when it attended every sequence with more than min_q_len query tokens, 0
   when it cannot run these inputs (no AVX2, head_dim not a multiple of 8, out of
   memory: the caller falls back, writing again any rows written here). */
int prefill_attention_f32(const float *q, int64_t q_stride, float *out, int64_t out_stride,
                          const void *k_cache, const void *v_cache,
                          const int32_t *query_start, const int32_t *seq_lens,
                          const int32_t *block_tables, int num_seqs, int max_blocks,
                          int num_heads, int num_kv_heads, int head_dim, int block_size,
                          float scale, int min_q_len, int window, int kv_kind) {
#if defined(__AVX512F__)
    if (head_dim % 16 == 0)
        return prefill_attention_avx512(q, q_stride, out, out_stride, k_cache, v_cache,
                                        query_start, seq_lens, block_tables, num_seqs,
                                        max_blocks, num_heads, num_kv_heads, head_dim,
                                        block_size, scale, min_q_len, window, kv_kind);
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (head_dim % 8 == 0)
        return prefill_attention_avx2(q, q_stride, out, out_stride, k_cache, v_cache,
                                      query_start, seq_lens, block_tables, num_seqs, max_blocks,
                                      num_heads, num_kv_heads, head_dim, block_size, scale,
                                      min_q_len, window, kv_kind);
#endif
    (void)kv_kind;
    (void)q; (void)q_stride; (void)out; (void)out_stride; (void)k_cache; (void)v_cache;
    (void)query_start; (void)seq_lens; (void)block_tables; (void)num_seqs; (void)max_blocks;
    (void)num_heads; (void)num_kv_heads; (void)head_dim; (void)block_size; (void)scale;
    (void)min_q_len; (void)window;
    return 0;
}
