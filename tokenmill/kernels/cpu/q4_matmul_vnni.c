/*
 * y = x @ W.T (+ bias) for a Q4_1 weight (w = d * code + m per group of 32, d and m in
 * half precision) on AVX512-VNNI, the weight packed in panels of 16 output columns.
 *
 * q4_matmul.c streams the weight row by row, which suits one input row; with many rows
 * it spends more instructions moving and scaling than multiplying. Here one 64-byte
 * load holds 16 columns x 8 inputs: its low nibbles are the 16 columns' codes for
 * inputs k..k+3 and its high nibbles for k+4..k+7, each a ready unsigned operand of
 * vpdpbusd (codes are 0..15), and four input codes broadcast as its signed operand.
 * A group's 32 inputs are 4 loads and 8 vpdpbusd per input row; only then is the
 * exact integer sum converted and scaled (d * dx), and the minimum's term m * sx added.
 *
 * Packed layout (pack_q4_vnni in kernels/cpu/__init__.py): for each panel p of 16
 * columns and each group g, a block of TM_Q4V_BLOCK bytes, blocks in (p, g) order:
 *   bytes 64 h + 4 c + b (h 0..3, c 0..15, b 0..3): low nibble code[16 p + c][32 g + 8 h + b],
 *                                                   high nibble code[...][32 g + 8 h + 4 + b]
 *   bytes 256 + 2 c: d[16 p + c][g] (float16); bytes 288 + 2 c: m[16 p + c][g] (float16).
 * So a thread's panels are one contiguous stream, scales included.
 *
 * Each output is summed over its groups in the same order whatever the number of rows
 * (row blocks of 1..TM_Q4V_ROWS take the same path), so a row's result does not depend
 * on the batch. The input is rounded to 8 bits per group as for q4_matmul_f32.
 */
#include <stdint.h>

#include "q8_input.h"

#define TM_Q4V_BLOCK 320

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#include <omp.h>
#define TM_Q4V 1
#define TM_Q4V_ROWS 8

/* R input rows (qx rows K bytes apart) against one panel; out rows ldo apart. */
static inline __attribute__((always_inline)) void q4v_rows(
    const int R, const uint8_t *panel, int groups, const int8_t *qx, int K, const float *dx,
    const float *sx, const float *bias, float *out, int64_t ldo) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 f[TM_Q4V_ROWS];
    for (int r = 0; r < R; r++) f[r] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        const uint8_t *blk = panel + (int64_t)g * TM_Q4V_BLOCK;
        __m512i acc[TM_Q4V_ROWS];
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
#endif

int q4_matmul_vnni_available(void) {
#ifdef TM_Q4V
    return 1;
#else
    return 0;
#endif
}

/* out[M, N] = x[M, K] @ W^T (+ bias[N]); x rows x_stride floats apart, out rows
   out_stride apart, W packed as above. N % 16 == 0, K % 32 == 0. Returns 0, -1 when out
   of memory for the rounded input, -2 when this build has no VNNI path (nothing written). */
int q4_matmul_vnni_f32(const float *x, int64_t x_stride, const uint8_t *packed,
                       const float *bias, float *out, int64_t out_stride, int M, int N, int K) {
#ifdef TM_Q4V
    const int groups = K / 32, panels = N / 16;
    const int64_t panel_bytes = (int64_t)groups * TM_Q4V_BLOCK;
    tm_q8_input in;
    if (tm_q8_input_make(&in, x, x_stride, M, K, 0) != 0) return -1;
    const int8_t *qx = in.qx;
    const float *dx = in.dx, *sx = in.sx;
    #pragma omp parallel
    {
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int p_begin = (int)((int64_t)panels * t / nt);
        const int p_end = (int)((int64_t)panels * (t + 1) / nt);
        /* 6 row blocks of x at a time stay in L2 while the thread's panels pass */
        for (int m0 = 0; m0 < M; m0 += 6 * TM_Q4V_ROWS) {
            const int m_end = M - m0 < 6 * TM_Q4V_ROWS ? M : m0 + 6 * TM_Q4V_ROWS;
            for (int p = p_begin; p < p_end; p++) {
                const uint8_t *panel = packed + p * panel_bytes;
                const float *b = bias ? bias + 16 * p : NULL;
                for (int m = m0; m < m_end; m += TM_Q4V_ROWS) {
                    const int8_t *xm = qx + (int64_t)m * K;
                    const float *dxm = dx + (int64_t)m * groups, *sxm = sx + (int64_t)m * groups;
                    float *o = out + (int64_t)m * out_stride + 16 * p;
                    switch (m_end - m < TM_Q4V_ROWS ? m_end - m : TM_Q4V_ROWS) {
#define TM_CASE(R) \
    case R: q4v_rows(R, panel, groups, xm, K, dxm, sxm, b, o, out_stride); break;
                    TM_CASE(1) TM_CASE(2) TM_CASE(3) TM_CASE(4) TM_CASE(5) TM_CASE(6)
                    TM_CASE(7)
                    default: q4v_rows(TM_Q4V_ROWS, panel, groups, xm, K, dxm, sxm, b, o,
                                      out_stride); break;
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
    (void)M; (void)N; (void)K;
    return -2;
#endif
}
