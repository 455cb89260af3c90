/*
 * y = x @ W.T (+ bias) for a Q8_0 weight (w = code * scale per group of 32, codes in
 * -127..127) on AVX512-VNNI or AVX2, the weight packed in panels of 16 output columns: the
 * int8 companion of q4_matmul_panels.c (see there for the idea), used by an int4 model's
 * 8-bit LM head as much as by int8 models.
 *
 * vpdpbusd multiplies unsigned by signed bytes. The weight is stored offset to unsigned
 * (code + 128, 1..255) and the input codes stay signed, broadcast four at a time, so each
 * group's sum is sum((code + 128) * qx) = dot + 128 * sum(qx): exact in int32, and the
 * input's code sum per group (computed once per row) takes the offset back out.
 *
 * Packed layout (pack_int8_panels in kernels/cpu/__init__.py): for each panel p of 16
 * columns and each group g, a block of TM_Q8V_BLOCK bytes, blocks in (p, g) order:
 *   bytes 64 s + 4 c + b (s 0..7, c 0..15, b 0..3): code[16 p + c][32 g + 4 s + b] + 128
 *   bytes 512 + 4 c: scale[16 p + c][g] (float32).
 * 1.125 bytes per weight, as the row layout. Each output is summed over its groups in the
 * same order whatever the number of rows, so a row's result does not depend on the batch.
 */
#include <stdint.h>
#include <stdlib.h>

#include "panel_matmul_amx_exact.h"
#include "q8_input.h"

#define TM_Q8V_BLOCK 576
/* TM_PANELS_AUTO: AMX int8 tiles from this many rows (panel_matmul_amx_exact.c; on a
   2-core Sapphire Rapids 30 x SmolLM2's int8 layers 1.2-1.4x the VNNI path at 8 to 32
   rows, its LM head 1.3x at 16 to 32, about even below) */
#define TM_Q8V_TILES_MIN_ROWS 8

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#include <omp.h>
#define TM_Q8V 1
#define TM_Q8V_ROWS 8

/* R input rows (qx rows K bytes apart; xsum their per-group code sums) against one
   panel; out rows ldo apart. */
static inline __attribute__((always_inline)) void q8v_rows(
    const int R, const uint8_t *panel, int groups, const int8_t *qx, int K, const float *dx,
    const int32_t *xsum, const float *bias, float *out, int64_t ldo) {
    __m512 f[TM_Q8V_ROWS];
    for (int r = 0; r < R; r++) f[r] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        const uint8_t *blk = panel + (int64_t)g * TM_Q8V_BLOCK;
        __m512i acc[TM_Q8V_ROWS];
        for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_si512();
        for (int s = 0; s < 8; s++) {
            const __m512i w = _mm512_loadu_si512((const void *)(blk + 64 * s));
            for (int r = 0; r < R; r++) {
                int32_t x4;
                __builtin_memcpy(&x4, qx + (int64_t)r * K + 32 * g + 4 * s, 4);
                acc[r] = _mm512_dpbusd_epi32(acc[r], w, _mm512_set1_epi32(x4));
            }
        }
        const __m512 scale = _mm512_loadu_ps((const float *)(blk + 512));
        for (int r = 0; r < R; r++) {
            const int64_t i = (int64_t)r * groups + g;
            const __m512i dot = _mm512_sub_epi32(acc[r], _mm512_set1_epi32(128 * xsum[i]));
            f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                   _mm512_mul_ps(scale, _mm512_set1_ps(dx[i])), f[r]);
        }
    }
    const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    for (int r = 0; r < R; r++) _mm512_storeu_ps(out + (int64_t)r * ldo, _mm512_add_ps(f[r], b));
}
#define TM_Q8V_CALL(R) q8v_rows(R, panel, groups, xm, K, dxm, sm, b, o, out_stride)
#elif defined(TM_AVX2)
#include <omp.h>
#define TM_Q8V 1
#define TM_Q8V_ROWS TM_Q8V_AVX2_ROWS
#ifndef TM_Q8V_AVX2_ROWS
#define TM_Q8V_AVX2_ROWS 4
#endif

/* AVX2 (no VNNI): R input rows against columns 8 part .. 8 part + 7 of one panel. maddubs
   multiplies unsigned by signed bytes but saturates int16 pair sums, so each stored byte
   code + 128 is split into its two nibbles, each a maddubs operand as in the int4 panels:
   nibble x input <= 15 * 127, so a group's eight pair sums per nibble add up exactly in
   int16, and (16 * high + low) gives the same int32 sum as vpdpbusd above: the same bits. */
static inline __attribute__((always_inline)) void q8v_rows(
    const int R, const uint8_t *panel, int part, int groups, const int8_t *qx, int K,
    const float *dx, const int32_t *xsum, const float *bias, float *out, int64_t ldo) {
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 f[TM_Q8V_ROWS];
    for (int r = 0; r < R; r++) f[r] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        const uint8_t *blk = panel + (int64_t)g * TM_Q8V_BLOCK;
        __m256i lo_acc[TM_Q8V_ROWS], hi_acc[TM_Q8V_ROWS];
        for (int r = 0; r < R; r++) lo_acc[r] = hi_acc[r] = _mm256_setzero_si256();
        /* rolled: unrolled, GCC hoists the products ahead of their adds and spills */
        #pragma GCC unroll 1
        for (int s = 0; s < 8; s++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(blk + 64 * s + 32 * part));
            const __m256i lo = _mm256_and_si256(w, low);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
            for (int r = 0; r < R; r++) {
                int32_t x4;
                __builtin_memcpy(&x4, qx + (int64_t)r * K + 32 * g + 4 * s, 4);
                const __m256i xb = _mm256_set1_epi32(x4);
                lo_acc[r] = _mm256_add_epi16(lo_acc[r], _mm256_maddubs_epi16(lo, xb));
                hi_acc[r] = _mm256_add_epi16(hi_acc[r], _mm256_maddubs_epi16(hi, xb));
            }
        }
        const __m256 scale = _mm256_loadu_ps((const float *)(blk + 512) + 8 * part);
        for (int r = 0; r < R; r++) {
            const int64_t i = (int64_t)r * groups + g;
            const __m256i sum = _mm256_add_epi32(
                _mm256_slli_epi32(_mm256_madd_epi16(hi_acc[r], ones), 4),
                _mm256_madd_epi16(lo_acc[r], ones));
            const __m256i dot = _mm256_sub_epi32(sum, _mm256_set1_epi32(128 * xsum[i]));
            f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot),
                                   _mm256_mul_ps(scale, _mm256_set1_ps(dx[i])), f[r]);
        }
    }
    const __m256 b = bias ? _mm256_loadu_ps(bias + 8 * part) : _mm256_setzero_ps();
    for (int r = 0; r < R; r++)
        _mm256_storeu_ps(out + (int64_t)r * ldo + 8 * part, _mm256_add_ps(f[r], b));
}
#define TM_Q8V_CALL(R)                                                                    \
    for (int part = 0; part < 2; part++)                                                  \
        q8v_rows(R, panel, part, groups, xm, K, dxm, sm, b, o, out_stride)
#endif

/* 2: the AVX512-VNNI path; 1: the AVX2 one; 0: none (layers keep the row layout). */
int int8_matmul_panels_available(void) {
#if defined(TM_Q8V) && defined(__AVX512VNNI__)
    return 2;
#elif defined(TM_Q8V)
    return 1;
#else
    return 0;
#endif
}

/* out[M, N] = x[M, K] @ W^T (+ bias[N]); x rows x_stride floats apart, out rows
   out_stride apart, W packed as above; `path` a TM_PANELS_* choice. N % 16 == 0,
   K % 32 == 0. Returns 0, -1 when out of memory for the rounded input, -2 when this build
   has no panel path or not the one asked for (nothing written). */
int int8_matmul_panels_f32(const float *x, int64_t x_stride, const uint8_t *packed,
                           const float *bias, float *out, int64_t out_stride, int M, int N,
                           int K, int path) {
#ifdef TM_Q8V
    const int groups = K / 32, panels = N / 16;
    const int tiles = path == TM_PANELS_TILES
        || (path == TM_PANELS_AUTO && M >= TM_Q8V_TILES_MIN_ROWS && N % 32 == 0
            && panel_matmul_amx_exact_available());
    if (path == TM_PANELS_TILES && !panel_matmul_amx_exact_available()) return -2;
    const int64_t panel_bytes = (int64_t)groups * TM_Q8V_BLOCK;
    tm_q8_input in;
    if (tm_q8_input_make(&in, x, x_stride, M, K, 0) != 0) return -1;
    int32_t *xsum = malloc(sizeof(int32_t) * ((size_t)M * groups + 1));
    if (!xsum) {
        tm_q8_input_free(&in);
        return -1;
    }
    const int8_t *qx = in.qx;
    const float *dx = in.dx;
    for (int64_t i = 0; i < (int64_t)M * groups; i++) {
        int32_t sum = 0;
        for (int j = 0; j < 32; j++) sum += qx[32 * i + j];
        xsum[i] = sum;
    }
    if (tiles) {
        const int status = tm_int8_panels_amx_exact(&in, xsum, packed, bias, out, out_stride,
                                                     M, N, K);
        free(xsum);
        tm_q8_input_free(&in);
        return status;
    }
    #pragma omp parallel
    {
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int p_begin = (int)((int64_t)panels * t / nt);
        const int p_end = (int)((int64_t)panels * (t + 1) / nt);
        /* 6 row blocks of x at a time stay in L2 while the thread's panels pass */
        for (int m0 = 0; m0 < M; m0 += 6 * TM_Q8V_ROWS) {
            const int m_end = M - m0 < 6 * TM_Q8V_ROWS ? M : m0 + 6 * TM_Q8V_ROWS;
            for (int p = p_begin; p < p_end; p++) {
                const uint8_t *panel = packed + p * panel_bytes;
                const float *b = bias ? bias + 16 * p : NULL;
                for (int m = m0; m < m_end; m += TM_Q8V_ROWS) {
                    const int8_t *xm = qx + (int64_t)m * K;
                    const float *dxm = dx + (int64_t)m * groups;
                    const int32_t *sm = xsum + (int64_t)m * groups;
                    float *o = out + (int64_t)m * out_stride + 16 * p;
                    switch (m_end - m < TM_Q8V_ROWS ? m_end - m : TM_Q8V_ROWS) {
#define TM_CASE(R) case R: TM_Q8V_CALL(R); break;
                    TM_CASE(1) TM_CASE(2) TM_CASE(3)
#if TM_Q8V_ROWS > 4
                    TM_CASE(4) TM_CASE(5) TM_CASE(6) TM_CASE(7)
#endif
                    default: TM_Q8V_CALL(TM_Q8V_ROWS); break;
#undef TM_CASE
                    }
                }
            }
        }
    }
    free(xsum);
    tm_q8_input_free(&in);
    return 0;
#else
    (void)x; (void)x_stride; (void)packed; (void)bias; (void)out; (void)out_stride;
    (void)M; (void)N; (void)K; (void)path;
    return -2;
#endif
}
