/*
 * The integer panel kernels' product (q4_matmul_panels.c, int8_matmul_panels.c) on AMX
 * int8 tiles (CPUs with AMX-INT8): the same bits as their VNNI path.
 *
 * One tdpbsud does a whole (16 rows, 16 columns, group of 32) sum of 8-bit products,
 * exact in int32, where the VNNI path needs 8 vpdpbusd per row. Both packed layouts hold
 * a group as B tile rows of four inputs per column: Q8_0 as stored, Q4_1 once its low and
 * high nibbles are split into bytes (once per call and panel). The input codes rounded to
 * 8 bits per group (tm_q8_input) are the A tile. Each group's sums are stored and then
 * scaled with the very float operations of the VNNI epilogue, in group order, so every
 * output has the same bits whichever kernel ran and however many rows the call had.
 *
 * The scaling is most of the work: per 16 x 16 sums, 16 vector convert-scale-adds
 * against one tile product. Rows go 32 at a time against two panels (four sum tiles, each
 * input and weight tile feeding two products), and group g + 1's products are issued
 * before group g's sums are scaled, so the tile unit and the vector units overlap.
 *
 * On a 2-core Sapphire Rapids (benchmarks/panel_tiles.py, 30 x SmolLM2's layers): int8
 * layers 1.2-1.4x the VNNI path at 8 to 32 rows, the 8-bit LM head 1.3x at 16 to 32;
 * int4 layers only 1.0-1.14x from 16 rows (the nibble split and the Q4_1 minimum's
 * term), slower below. Both stay behind the bfloat16 tiles of panel_matmul_amx.c (which
 * change the numbers) from 32-48 rows: those skip the per-group scaling.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "panel_matmul_amx_exact.h"

#define TM_PXQ4_BLOCK 320 /* q4_matmul_panels.c */
#define TM_PXQ8_BLOCK 576 /* int8_matmul_panels.c */

int bf16_matmul_amx_init(void); /* bf16_matmul.c: asks Linux for the tile state once */

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512BW__) \
    && defined(__AVX512F__) && defined(__linux__)
#include <immintrin.h>
#include <omp.h>
#define TM_PANEL_AMX_EXACT 1

#include "amx_tiles.h"

/* Tiles 0-3: the sums C[m][n] (m: the pass's two row tiles, n: its two panels; rows x 16
   int32), 4-5: the row tiles' input codes A[m] (rows x 32 bytes), 6-7: the panels'
   weight codes B[n] (8 rows of 4 inputs x 16 columns). */
static void tm_px_configure(int rows0, int rows1) {
    const int rows[8] = {rows0, rows0, rows1, rows1, rows0, rows1, 8, 8};
    const int colsb[8] = {64, 64, 64, 64, 32, 32, 64, 64};
    tm_tile_configure(rows, colsb);
}

/* A Q4_1 block's codes as a B tile (512 bytes): row 2h holds the low nibbles of bytes
   64h .. 64h + 63 (inputs 8h .. 8h + 3), row 2h + 1 their high nibbles (8h + 4 ..). */
static inline void tm_pxq4_tile(const uint8_t *blk, uint8_t *b) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int h = 0; h < 4; h++) {
        const __m512i w = _mm512_loadu_si512((const void *)(blk + 64 * h));
        _mm512_store_si512((void *)(b + 128 * h), _mm512_and_si512(w, low));
        _mm512_store_si512((void *)(b + 128 * h + 64),
                           _mm512_and_si512(_mm512_srli_epi16(w, 4), low));
    }
}

/* The rounded input as the threads read it. */
typedef struct {
    const int8_t *qx;
    const float *dx;
    const float *sx;      /* Q4_1: scale * code sum per group */
    const int32_t *xsum;  /* Q8_0: code sum per group */
    int K, groups;
} tm_px_input;

/* One group's sums of one (row tile, panel), rows x 16 int32 at c, scaled into acc as the
   VNNI epilogues do. dx, sx and xsum point at the tile's first row's entry for the group. */
static inline __attribute__((always_inline)) void tm_px_scale(
        const int BLOCK, const int32_t *c, float *acc, int rows, const uint8_t *blk,
        const float *dx, const float *sx, const int32_t *xsum, int groups) {
    if (BLOCK == TM_PXQ4_BLOCK) {
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 256)));
        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 288)));
        for (int r = 0; r < rows; r++) {
            const int64_t i = (int64_t)r * groups;
            __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c + 16 * r)),
                                       _mm512_mul_ps(d, _mm512_set1_ps(dx[i])),
                                       _mm512_load_ps(acc + 16 * r));
            _mm512_store_ps(acc + 16 * r, _mm512_fmadd_ps(m, _mm512_set1_ps(sx[i]), f));
        }
    } else {
        const __m512 s = _mm512_loadu_ps((const float *)(blk + 512));
        for (int r = 0; r < rows; r++) {
            const int64_t i = (int64_t)r * groups;
            const __m512i dot = _mm512_sub_epi32(_mm512_load_si512(c + 16 * r),
                                                 _mm512_set1_epi32(128 * xsum[i]));
            _mm512_store_ps(acc + 16 * r,
                            _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                            _mm512_mul_ps(s, _mm512_set1_ps(dx[i])),
                                            _mm512_load_ps(acc + 16 * r)));
        }
    }
}

/* rows0 + rows1 rows (rows1 may be 0) from row m0 against panels 2q and 2q + 1 (the first
   at panel0, the second panel_bytes on); their B tiles at b_tiles, 512 bytes each,
   b_stride bytes from group to group and b_next from the first panel to the second. */
static inline __attribute__((always_inline)) void tm_px_pass(
        const int BLOCK, const tm_px_input *in, int m0, int rows0, int rows1,
        const uint8_t *panel0, int64_t panel_bytes, const uint8_t *b_tiles, int64_t b_stride,
        int64_t b_next, const float *bias, float *out, int64_t ldo) {
    int32_t sums[2][4][16 * 16] __attribute__((aligned(64)));
    float acc[4][16 * 16] __attribute__((aligned(64)));
    memset(acc, 0, sizeof acc);
    const int groups = in->groups, K = in->K;
    const int8_t *a0 = in->qx + (int64_t)m0 * K, *a1 = a0 + 16 * (int64_t)K;
    const int64_t i0 = (int64_t)m0 * groups, i1 = i0 + 16 * (int64_t)groups;
#define TM_PX_PRODUCTS(g)                                                                  \
    do {                                                                                   \
        _tile_loadd(6, b_tiles + (g) * b_stride, 64);                                      \
        _tile_loadd(7, b_tiles + b_next + (g) * b_stride, 64);                             \
        _tile_loadd(4, a0 + 32 * (g), K);                                                  \
        _tile_zero(0);                                                                     \
        _tile_zero(1);                                                                     \
        _tile_dpbsud(0, 4, 6);                                                             \
        _tile_dpbsud(1, 4, 7);                                                             \
        if (rows1 > 0) {                                                                   \
            _tile_loadd(5, a1 + 32 * (g), K);                                              \
            _tile_zero(2);                                                                 \
            _tile_zero(3);                                                                 \
            _tile_dpbsud(2, 5, 6);                                                         \
            _tile_dpbsud(3, 5, 7);                                                         \
        }                                                                                  \
    } while (0)
    TM_PX_PRODUCTS(0);
    for (int g = 0; g < groups; g++) {
        int32_t(*c)[16 * 16] = sums[g & 1];
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        if (rows1 > 0) {
            _tile_stored(2, c[2], 64);
            _tile_stored(3, c[3], 64);
        }
        if (g + 1 < groups) TM_PX_PRODUCTS(g + 1);
        const uint8_t *blk0 = panel0 + (int64_t)g * BLOCK, *blk1 = blk0 + panel_bytes;
        const float *sx0 = in->sx ? in->sx + i0 + g : NULL;
        const float *sx1 = in->sx ? in->sx + i1 + g : NULL;
        const int32_t *xs0 = in->xsum ? in->xsum + i0 + g : NULL;
        const int32_t *xs1 = in->xsum ? in->xsum + i1 + g : NULL;
        tm_px_scale(BLOCK, c[0], acc[0], rows0, blk0, in->dx + i0 + g, sx0, xs0, groups);
        tm_px_scale(BLOCK, c[1], acc[1], rows0, blk1, in->dx + i0 + g, sx0, xs0, groups);
        if (rows1 > 0) {
            tm_px_scale(BLOCK, c[2], acc[2], rows1, blk0, in->dx + i1 + g, sx1, xs1, groups);
            tm_px_scale(BLOCK, c[3], acc[3], rows1, blk1, in->dx + i1 + g, sx1, xs1, groups);
        }
    }
#undef TM_PX_PRODUCTS
    for (int t = 0; t < (rows1 > 0 ? 4 : 2); t++) {
        const __m512 b = bias ? _mm512_loadu_ps(bias + 16 * (t & 1)) : _mm512_setzero_ps();
        float *o = out + (int64_t)(t >> 1) * 16 * ldo + 16 * (t & 1);
        for (int r = 0; r < (t < 2 ? rows0 : rows1); r++)
            _mm512_storeu_ps(o + (int64_t)r * ldo,
                             _mm512_add_ps(_mm512_load_ps(acc[t] + 16 * r), b));
    }
}

static inline __attribute__((always_inline)) int tm_px_matmul(
        const int BLOCK, const tm_px_input *in, const uint8_t *packed, const float *bias,
        float *out, int64_t out_stride, int M, int N) {
    const int groups = in->groups, pairs = N / 32;
    const int64_t panel_bytes = (int64_t)groups * BLOCK;
    int failed = 0;
    #pragma omp parallel
    {
        /* Q4_1: a pair of panels' codes split into bytes, once per call */
        uint8_t *split = BLOCK == TM_PXQ4_BLOCK ? aligned_alloc(64, (size_t)groups * 1024)
                                                : NULL;
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int q_begin = (int)((int64_t)pairs * t / nt);
        const int q_end = (int)((int64_t)pairs * (t + 1) / nt);
        int configured = -1;
        if (BLOCK == TM_PXQ4_BLOCK && !split) {
            #pragma omp atomic write
            failed = 1;
        }
        for (int q = q_begin; q < q_end && (BLOCK != TM_PXQ4_BLOCK || split); q++) {
            const uint8_t *panel = packed + 2 * q * panel_bytes;
            const uint8_t *b_tiles = panel;
            int64_t b_stride = BLOCK, b_next = panel_bytes;
            if (BLOCK == TM_PXQ4_BLOCK) {
                for (int j = 0; j < 2; j++)
                    for (int g = 0; g < groups; g++)
                        tm_pxq4_tile(panel + j * panel_bytes + (int64_t)g * BLOCK,
                                     split + (int64_t)(j * groups + g) * 512);
                b_tiles = split;
                b_stride = 512;
                b_next = (int64_t)groups * 512;
            }
            for (int m0 = 0; m0 < M; m0 += 32) {
                const int rows0 = M - m0 < 16 ? M - m0 : 16;
                const int rows1 = M - m0 <= 16 ? 0 : (M - m0 < 32 ? M - m0 - 16 : 16);
                if (32 * rows0 + rows1 != configured) {
                    tm_px_configure(rows0, rows1 > 0 ? rows1 : 1);
                    configured = 32 * rows0 + rows1;
                }
                tm_px_pass(BLOCK, in, m0, rows0, rows1, panel, panel_bytes, b_tiles, b_stride,
                           b_next, bias ? bias + 32 * q : NULL,
                           out + (int64_t)m0 * out_stride + 32 * q, out_stride);
            }
        }
        if (configured >= 0) _tile_release();
        free(split);
    }
    return failed ? -1 : 0;
}
#endif

int panel_matmul_amx_exact_available(void) {
#ifdef TM_PANEL_AMX_EXACT
    return bf16_matmul_amx_init(); /* every AMX CPU has AMX-BF16 with AMX-INT8 */
#else
    return 0;
#endif
}

int tm_q4_panels_amx_exact(const tm_q8_input *in, const uint8_t *packed, const float *bias,
                           float *out, int64_t out_stride, int M, int N, int K) {
#ifdef TM_PANEL_AMX_EXACT
    if (N % 32 != 0 || K % 32 != 0 || !panel_matmul_amx_exact_available()) return -2;
    const tm_px_input x = {in->qx, in->dx, in->sx, NULL, K, K / 32};
    return M > 0 ? tm_px_matmul(TM_PXQ4_BLOCK, &x, packed, bias, out, out_stride, M, N) : 0;
#else
    (void)in; (void)packed; (void)bias; (void)out; (void)out_stride; (void)M; (void)N;
    (void)K;
    return -2;
#endif
}

int tm_int8_panels_amx_exact(const tm_q8_input *in, const int32_t *xsum,
                             const uint8_t *packed, const float *bias, float *out,
                             int64_t out_stride, int M, int N, int K) {
#ifdef TM_PANEL_AMX_EXACT
    if (N % 32 != 0 || K % 32 != 0 || !panel_matmul_amx_exact_available()) return -2;
    const tm_px_input x = {in->qx, in->dx, NULL, xsum, K, K / 32};
    return M > 0 ? tm_px_matmul(TM_PXQ8_BLOCK, &x, packed, bias, out, out_stride, M, N) : 0;
#else
    (void)in; (void)xsum; (void)packed; (void)bias; (void)out; (void)out_stride; (void)M;
    (void)N; (void)K;
    return -2;
#endif
}
