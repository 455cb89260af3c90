/*
 * bfloat16 linear layers on AVX512-BF16 dot products (vdpbf16ps), for CPUs that have
 * them without AMX (AMD Zen 4/5, Intel Cooper Lake): y = x @ W^T (+ b).
 *
 * On a 2-core Zen 4 EPYC, oneDNN's bfloat16 matmul (through PyTorch) took 1.4x this
 * kernel's time for one decoder layer at 1 row and 1.1-1.2x at 4-8 rows (the same from
 * 32 rows on), each call with PyTorch's dispatch on top; and without a kernel of its
 * own for these CPUs the bfloat16 decoder stack could not run.
 *
 * The weight is packed exactly as for the AMX kernel (bf16_matmul.c): per block of 16
 * output columns and block of 32 inputs, 16 rows of 64 bytes, row r holding the input
 * pair (2r, 2r + 1) of each of the 16 columns. One such row is the second operand of
 * vdpbf16ps as it is; the first is an activation pair broadcast to all 16 lanes.
 * A thread takes a range of 32-column groups and, per group, up to TM_ROWS (12) rows of x
 * at a time: 2 * TM_ROWS accumulators, two weight loads and TM_ROWS broadcasts per input
 * pair.
 *
 * Numerics: each output is a float32 sum of exact bfloat16 products (vdpbf16ps rounds
 * to nearest even and treats denormals as zero), in the same order for every row
 * whatever M is, then + bias, rounded to bfloat16 once - the AMX kernel's contract,
 * up to summation order. Shapes: N % 32 == 0 and K % 32 == 0.
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <omp.h>
#define TM_DPBF16 1
#endif

/* 1 when this build has the kernel (compiled for a CPU with AVX512-BF16). */
int bf16_matmul_dot_available(void) {
#ifdef TM_DPBF16
    return 1;
#else
    return 0;
#endif
}

#ifdef TM_DPBF16
/* 12 rows: 24 accumulators + 2 weight rows + 1 broadcast of the 32 vector registers;
   against 8, 1.05-1.12x at 16-64 rows (the weights re-read from L2 fewer times) */
#define TM_ROWS 12

/* Rows [0, R) of x times one group of 32 columns (tiles b0, b1), written to out. */
static inline __attribute__((always_inline)) void
tm_dot_rows(const int R, const uint16_t *x, int64_t ldx, const uint16_t *b0,
            const uint16_t *b1, int kblocks, const float *bias, uint16_t *out, int64_t ldo) {
    __m512 acc0[TM_ROWS], acc1[TM_ROWS];
    for (int i = 0; i < R; i++) {
        acc0[i] = _mm512_setzero_ps();
        acc1[i] = _mm512_setzero_ps();
    }
    for (int kb = 0; kb < kblocks; kb++) {
        const uint16_t *w0 = b0 + (int64_t)kb * 512, *w1 = b1 + (int64_t)kb * 512;
        const uint16_t *xk = x + 32 * kb;
        for (int r = 0; r < 16; r++) {
            /* one 64-byte line per tile row: fetch the row two tiles ahead */
            _mm_prefetch((const char *)(w0 + 1024 + 32 * r), _MM_HINT_T0);
            _mm_prefetch((const char *)(w1 + 1024 + 32 * r), _MM_HINT_T0);
            const __m512bh v0 = (__m512bh)_mm512_loadu_si512(w0 + 32 * r);
            const __m512bh v1 = (__m512bh)_mm512_loadu_si512(w1 + 32 * r);
            for (int i = 0; i < R; i++) {
                int32_t pair;
                memcpy(&pair, xk + i * ldx + 2 * r, sizeof pair);
                const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
                acc0[i] = _mm512_dpbf16_ps(acc0[i], a, v0);
                acc1[i] = _mm512_dpbf16_ps(acc1[i], a, v1);
            }
        }
    }
    const __m512 bias0 = _mm512_loadu_ps(bias), bias1 = _mm512_loadu_ps(bias + 16);
    for (int i = 0; i < R; i++) {
        float sums[32];
        _mm512_storeu_ps(sums, _mm512_add_ps(acc0[i], bias0));
        _mm512_storeu_ps(sums + 16, _mm512_add_ps(acc1[i], bias1));
        for (int c = 0; c < 32; c++) out[i * ldo + c] = tm_f32_to_bf16(sums[c]);
    }
}
#endif

/* y[M, N] = x[M, K] @ W^T (+ bias[N]); x rows ldx elements apart, y rows ldy apart,
   W packed as for bf16_matmul_amx. Returns 0, or -1 when this build or shape has no
   path (nothing written). */
int bf16_matmul_dot(const uint16_t *x, int64_t ldx, const uint16_t *packed,
                    const uint16_t *bias, uint16_t *y, int64_t ldy, int M, int N, int K) {
#ifdef TM_DPBF16
    if (N % 32 != 0 || K % 32 != 0 || M <= 0) return -1;
    const int kblocks = K / 32, groups = N / 32;
    const int64_t group_elems = (int64_t)2 * kblocks * 512;
    #pragma omp parallel
    {
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int g_begin = (int)((int64_t)groups * t / nt);
        const int g_end = (int)((int64_t)groups * (t + 1) / nt);
        /* 6 * TM_ROWS rows of x at a time stay in L2 while the thread's groups pass */
        for (int m0 = 0; m0 < M; m0 += 6 * TM_ROWS) {
            const int m_end = M - m0 < 6 * TM_ROWS ? M : m0 + 6 * TM_ROWS;
            for (int g = g_begin; g < g_end; g++) {
                const uint16_t *b0 = packed + g * group_elems, *b1 = b0 + kblocks * 512;
                float b[32];
                for (int c = 0; c < 32; c++)
                    b[c] = bias ? tm_bf16_to_f32(bias[32 * g + c]) : 0.0f;
                for (int m = m0; m < m_end; m += TM_ROWS) {
                    const uint16_t *xm = x + (int64_t)m * ldx;
                    uint16_t *out = y + (int64_t)m * ldy + 32 * g;
                    switch (m_end - m < TM_ROWS ? m_end - m : TM_ROWS) {
#define TM_CASE(R) case R: tm_dot_rows(R, xm, ldx, b0, b1, kblocks, b, out, ldy); break;
                    TM_CASE(1) TM_CASE(2) TM_CASE(3) TM_CASE(4) TM_CASE(5) TM_CASE(6)
                    TM_CASE(7) TM_CASE(8) TM_CASE(9) TM_CASE(10) TM_CASE(11)
                    default: tm_dot_rows(TM_ROWS, xm, ldx, b0, b1, kblocks, b, out, ldy); break;
#undef TM_CASE
                    }
                }
            }
        }
    }
    return 0;
#else
    (void)x; (void)ldx; (void)packed; (void)bias; (void)y; (void)ldy; (void)M; (void)N; (void)K;
    return -1;
#endif
}
