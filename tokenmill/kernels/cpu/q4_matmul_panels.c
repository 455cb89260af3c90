/*
 * y = x @ W.T (+ bias) for a Q4_1 weight (w = d * code + m per group of 32, d and m in
 * half precision), the weight packed in panels of 16 output columns.
 *
 * q4_matmul.c streams the weight row by row, which suits one input row; with many rows
 * it spends more instructions moving and scaling than multiplying. Here one 64-byte
 * block holds 16 columns x 8 inputs: its low nibbles are the 16 columns' codes for
 * inputs k..k+3 and its high nibbles for k+4..k+7, each a ready unsigned operand of a
 * u8 x s8 dot product (codes are 0..15), with four input codes broadcast as the signed
 * operand. Only after a group's 32 inputs is the exact integer sum converted and
 * scaled (d * dx), and the minimum's term m * sx added.
 *
 * - AVX512-VNNI: a block is one register; 8 vpdpbusd per group and input row, 16
 *   columns x up to 8 rows in registers.
 * - AVX2 (no VNNI needed): a block is two registers of 8 columns, taken one at a time;
 *   maddubs sums pairs into int16, and since codes are at most 15 and inputs at most
 *   127 in magnitude, a group's 8 maddubs add up in int16 (<= 8 * 2 * 15 * 127 < 2^15)
 *   before one madd widens them: 8 columns x up to TM_Q4P_ROWS rows in registers.
 *
 * Packed layout (pack_q4_panels in kernels/cpu/__init__.py): for each panel p of 16
 * columns and each group g, a block of TM_Q4P_BLOCK bytes, blocks in (p, g) order:
 *   bytes 64 h + 4 c + b (h 0..3, c 0..15, b 0..3): low nibble code[16 p + c][32 g + 8 h + b],
 *                                                   high nibble code[...][32 g + 8 h + 4 + b]
 *   bytes 256 + 2 c: d[16 p + c][g] (float16); bytes 288 + 2 c: m[16 p + c][g] (float16).
 * So a thread's panels are one contiguous stream, scales included: 0.625 bytes per
 * weight, as the row layout.
 *
 * Each output is summed over its groups in the same order whatever the number of rows
 * (row blocks of any size take the same path), so a row's result does not depend on
 * the batch; the two paths add the same float terms in the same order, so they give the
 * same bits. The input is rounded to 8 bits per group as for q4_matmul_f32.
 */
#include <stdint.h>

#include "panel_matmul_amx_exact.h"
#include "q8_input.h"

#define TM_Q4P_BLOCK 320
/* TM_PANELS_AUTO: AMX int8 tiles from this many rows (panel_matmul_amx_exact.c; 1.05-1.1x
   the VNNI path from 32 rows on a 2-core Sapphire Rapids, slower below) */
#define TM_Q4P_TILES_MIN_ROWS 32

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#include <omp.h>
#define TM_Q4P 1
#define TM_Q4P_ROWS 8
#define TM_Q4P_PARTS 1 /* registers per block */

/* R input rows (qx rows K bytes apart) against one panel; out rows ldo apart. */
static inline __attribute__((always_inline)) void q4p_rows(
    const int R, const uint8_t *panel, int part, int groups, const int8_t *qx, int K,
    const float *dx, const float *sx, const float *bias, float *out, int64_t ldo) {
    (void)part;
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 f[TM_Q4P_ROWS];
    for (int r = 0; r < R; r++) f[r] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        const uint8_t *blk = panel + (int64_t)g * TM_Q4P_BLOCK;
        __m512i acc[TM_Q4P_ROWS];
        for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_si512();
        for (int h = 0; h < 4; h++) {
            const __m512i w = _mm512_loadu_si512((const void *)(blk + 64 * h));
            const __m512i lo = _mm512_and_si512(w, low);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
            for (int r = 0; r < R; r++) {
                const int8_t *xr = qx + (int64_t)r * K + 32 * g + 8 * h;
                int32_t x0, x1;
                __builtin_memcpy(&x0, xr, 4);
                __builtin_memcpy(&x1, xr + 4, 4);
                acc[r] = _mm512_dpbusd_epi32(acc[r], lo, _mm512_set1_epi32(x0));
                acc[r] = _mm512_dpbusd_epi32(acc[r], hi, _mm512_set1_epi32(x1));
            }
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 256)));
        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 288)));
        for (int r = 0; r < R; r++) {
            const int64_t i = (int64_t)r * groups + g;
            f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r]),
                                   _mm512_mul_ps(d, _mm512_set1_ps(dx[i])), f[r]);
            f[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sx[i]), f[r]);
        }
    }
    const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    for (int r = 0; r < R; r++) _mm512_storeu_ps(out + (int64_t)r * ldo, _mm512_add_ps(f[r], b));
}
#elif defined(TM_AVX2)
#include <omp.h>
#define TM_Q4P 1
#define TM_Q4P_ROWS 4
#define TM_Q4P_PARTS 2

/* R input rows against columns 8 part .. 8 part + 7 of one panel. */
static inline __attribute__((always_inline)) void q4p_rows(
    const int R, const uint8_t *panel, int part, int groups, const int8_t *qx, int K,
    const float *dx, const float *sx, const float *bias, float *out, int64_t ldo) {
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 f[TM_Q4P_ROWS];
    for (int r = 0; r < R; r++) f[r] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        const uint8_t *blk = panel + (int64_t)g * TM_Q4P_BLOCK;
        __m256i acc[TM_Q4P_ROWS]; /* int16 pair sums, exact (see above) */
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_si256();
        /* Not unrolled: GCC then hoists all 32 maddubs of a group ahead of their adds
           and spills them to the stack (16 ymm registers); this way 1.12-1.21x. */
        #pragma GCC unroll 1
        for (int h = 0; h < 4; h++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32 * part));
            const __m256i lo = _mm256_and_si256(w, low);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
            for (int r = 0; r < R; r++) {
                const int8_t *xr = qx + (int64_t)r * K + 32 * g + 8 * h;
                int32_t x0, x1;
                __builtin_memcpy(&x0, xr, 4);
                __builtin_memcpy(&x1, xr + 4, 4);
                acc[r] = _mm256_add_epi16(acc[r], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(x0)));
                acc[r] = _mm256_add_epi16(acc[r], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x1)));
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 256 + 16 * part)));
        const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 288 + 16 * part)));
        for (int r = 0; r < R; r++) {
            const int64_t i = (int64_t)r * groups + g;
            const __m256i dot = _mm256_madd_epi16(acc[r], ones);
            f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot),
                                   _mm256_mul_ps(d, _mm256_set1_ps(dx[i])), f[r]);
            f[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(sx[i]), f[r]);
        }
    }
    const __m256 b = bias ? _mm256_loadu_ps(bias + 8 * part) : _mm256_setzero_ps();
    for (int r = 0; r < R; r++)
        _mm256_storeu_ps(out + (int64_t)r * ldo + 8 * part, _mm256_add_ps(f[r], b));
}
#endif

int q4_matmul_panels_available(void) {
#ifdef TM_Q4P
    return 1;
#else
    return 0;
#endif
}

/* out[M, N] = x[M, K] @ W^T (+ bias[N]); x rows x_stride floats apart, out rows
   out_stride apart, W packed as above; `path` a TM_PANELS_* choice. N % 16 == 0,
   K % 32 == 0. Returns 0, -1 when out of memory for the rounded input, -2 when this build
   has no panel path or not the one asked for (nothing written). */
int q4_matmul_panels_f32(const float *x, int64_t x_stride, const uint8_t *packed,
                         const float *bias, float *out, int64_t out_stride, int M, int N,
                         int K, int path) {
#ifdef TM_Q4P
    const int groups = K / 32, panels = N / 16;
    const int64_t panel_bytes = (int64_t)groups * TM_Q4P_BLOCK;
    const int tiles = path == TM_PANELS_TILES
        || (path == TM_PANELS_AUTO && M >= TM_Q4P_TILES_MIN_ROWS && N % 32 == 0
            && panel_matmul_amx_exact_available());
    if (path == TM_PANELS_TILES && !panel_matmul_amx_exact_available()) return -2;
    tm_q8_input in;
    if (tm_q8_input_make(&in, x, x_stride, M, K, 0) != 0) return -1;
    if (tiles) {
        const int status = tm_q4_panels_amx_exact(&in, packed, bias, out, out_stride, M, N, K);
        tm_q8_input_free(&in);
        return status;
    }
    const int8_t *qx = in.qx;
    const float *dx = in.dx, *sx = in.sx;
    #pragma omp parallel
    {
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int p_begin = (int)((int64_t)panels * t / nt);
        const int p_end = (int)((int64_t)panels * (t + 1) / nt);
        /* 48 rows of x at a time stay in L2 while the thread's panels pass */
        for (int m0 = 0; m0 < M; m0 += 48) {
            const int m_end = M - m0 < 48 ? M : m0 + 48;
            for (int p = p_begin; p < p_end; p++) {
                const uint8_t *panel = packed + p * panel_bytes;
                const float *b = bias ? bias + 16 * p : NULL;
                for (int part = 0; part < TM_Q4P_PARTS; part++)
                    for (int m = m0; m < m_end; m += TM_Q4P_ROWS) {
                        const int8_t *xm = qx + (int64_t)m * K;
                        const float *dxm = dx + (int64_t)m * groups;
                        const float *sxm = sx + (int64_t)m * groups;
                        float *o = out + (int64_t)m * out_stride + 16 * p;
                        switch (m_end - m < TM_Q4P_ROWS ? m_end - m : TM_Q4P_ROWS) {
#define TM_CASE(R)                                                                        \
    case R: q4p_rows(R, panel, part, groups, xm, K, dxm, sxm, b, o, out_stride); break;
                        TM_CASE(1) TM_CASE(2) TM_CASE(3)
#if TM_Q4P_ROWS > 4
                        TM_CASE(4) TM_CASE(5) TM_CASE(6) TM_CASE(7)
#endif
                        default: q4p_rows(TM_Q4P_ROWS, panel, part, groups, xm, K, dxm, sxm, b,
                                          o, out_stride); break;
#undef TM_CASE
                        }
                    }
            }
        }
    }
    tm_q8_input_free(&in);
    return 0;
#else
    (void)x; (void)x_stride; (void)packed; (void)bias; (void)out; (void)out_stride;
    (void)M; (void)N; (void)K; (void)path;
    return -2;
#endif
}
