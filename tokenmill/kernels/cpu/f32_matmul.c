/*
 * float32 linear layers on AVX2/FMA: y = x @ W^T (+ b), W packed once at load in
 * panels of 16 output columns.
 *
 * Why tokenmill has its own: the native decoder stack (decoder_stack.c) is C, and C
 * cannot call oneDNN's packed matmuls, so a float32 model had to run every decode
 * step through ~15 PyTorch calls per layer (a quarter of a batch-8 step on a 2-core
 * AVX2 host). With this kernel float32 layers are something the stack can run.
 *
 * Packed layout (N % 16 == 0): packed[nb][k][c] = W[16 nb + c][k], so one k step of a
 * panel is 16 contiguous floats (PyTorch builds it: w.view(N/16, 16, K).permute(0, 2, 1)).
 *
 * The inner block is the classic 6 x 16 register tile: six rows of x, broadcast one
 * element at a time, times the panel's two 8-float vectors, into twelve accumulators.
 * Threads split the panels (decode sizes: each weight byte is read once), or from 96
 * rows per thread the rows. Rows go in blocks that keep their x slice in L2 (a panel is
 * re-read once per block).
 *
 * Numerics: each output is the float32 sum over k in increasing order, one fused
 * multiply-add per term, then + bias. An output row does not depend on the other
 * rows of the call or on the number of threads.
 */
#include <stdint.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <omp.h>
#define TM_F32_PANEL 1
#endif

/* 0: this build lacks the kernel; 1: it has it (the CPU it was built for has AVX2 and
   FMA); 2: it has it, but the CPU also has AVX-512, where oneDNN's 512-bit kernels
   beat this 256-bit one from 16 rows on. */
int f32_matmul_available(void) {
#if defined(TM_F32_PANEL) && defined(__AVX512F__)
    return 2;
#elif defined(TM_F32_PANEL)
    return 1;
#else
    return 0;
#endif
}

#ifdef TM_F32_PANEL
/* rows (1..6) x 16 outputs of one panel; R is a constant after inlining. The twelve
   accumulators are named variables: kept in an array, GCC stored them to the stack on
   every k step (a third slower). */
#define TM_ROW_FMA(r, a0, a1)                                                                 \
    if (R > r) {                                                                              \
        const __m256 a = _mm256_broadcast_ss(x + r * x_stride + k);                           \
        a0 = _mm256_fmadd_ps(a, b0, a0);                                                      \
        a1 = _mm256_fmadd_ps(a, b1, a1);                                                      \
    }
#define TM_ROW_LOAD(r, a0, a1)                                                                \
    if (R > r) {                                                                              \
        a0 = _mm256_loadu_ps(y + r * y_stride);                                               \
        a1 = _mm256_loadu_ps(y + r * y_stride + 8);                                           \
    }
#define TM_ROW_STORE(r, a0, a1)                                                               \
    if (R > r) {                                                                              \
        if (last && bias) {                                                                   \
            a0 = _mm256_add_ps(a0, _mm256_loadu_ps(bias));                                    \
            a1 = _mm256_add_ps(a1, _mm256_loadu_ps(bias + 8));                                \
        }                                                                                     \
        _mm256_storeu_ps(y + r * y_stride, a0);                                               \
        _mm256_storeu_ps(y + r * y_stride + 8, a1);                                           \
    }
static inline __attribute__((always_inline)) void tm_f32_tile(
        const float *x, int64_t x_stride, const float *panel, int K, const float *bias,
        float *y, int64_t y_stride, int first, int last, const int R) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    if (!first) { /* continue the sums of the previous k chunk, kept in y */
        TM_ROW_LOAD(0, c00, c01)
        TM_ROW_LOAD(1, c10, c11)
        TM_ROW_LOAD(2, c20, c21)
        TM_ROW_LOAD(3, c30, c31)
        TM_ROW_LOAD(4, c40, c41)
        TM_ROW_LOAD(5, c50, c51)
    }
    #pragma GCC unroll 4
    for (int k = 0; k < K; k++) {
        const __m256 b0 = _mm256_loadu_ps(panel + 16 * (int64_t)k);
        const __m256 b1 = _mm256_loadu_ps(panel + 16 * (int64_t)k + 8);
        TM_ROW_FMA(0, c00, c01)
        TM_ROW_FMA(1, c10, c11)
        TM_ROW_FMA(2, c20, c21)
        TM_ROW_FMA(3, c30, c31)
        TM_ROW_FMA(4, c40, c41)
        TM_ROW_FMA(5, c50, c51)
    }
    TM_ROW_STORE(0, c00, c01)
    TM_ROW_STORE(1, c10, c11)
    TM_ROW_STORE(2, c20, c21)
    TM_ROW_STORE(3, c30, c31)
    TM_ROW_STORE(4, c40, c41)
    TM_ROW_STORE(5, c50, c51)
}
#undef TM_ROW_FMA
#undef TM_ROW_LOAD
#undef TM_ROW_STORE

static void tm_f32_rows(const float *x, int64_t x_stride, const float *panel, int K,
                        const float *bias, float *y, int64_t y_stride, int first, int last,
                        int rows) {
    switch (rows) {
    case 1: tm_f32_tile(x, x_stride, panel, K, bias, y, y_stride, first, last, 1); break;
    case 2: tm_f32_tile(x, x_stride, panel, K, bias, y, y_stride, first, last, 2); break;
    case 3: tm_f32_tile(x, x_stride, panel, K, bias, y, y_stride, first, last, 3); break;
    case 4: tm_f32_tile(x, x_stride, panel, K, bias, y, y_stride, first, last, 4); break;
    case 5: tm_f32_tile(x, x_stride, panel, K, bias, y, y_stride, first, last, 5); break;
    default: tm_f32_tile(x, x_stride, panel, K, bias, y, y_stride, first, last, 6); break;
    }
}
#endif

/* x [M, K] (row stride x_stride), packed from the layout above, bias [N] or NULL,
   y [M, N] (row stride y_stride). Returns 0, or -1 when this build lacks the kernel or
   N % 16 != 0. */
int f32_matmul_packed(const float *x, int64_t x_stride, const float *packed, const float *bias,
                      float *y, int64_t y_stride, int M, int N, int K) {
#ifdef TM_F32_PANEL
    if (N % 16 != 0 || M < 0 || K <= 0) return -1;
    const int panels = N / 16;
    /* rows per block: their x slice within ~256 KiB, a multiple of 6 */
    int block = (int)((256 * 1024) / ((int64_t)K * 4)) / 6 * 6;
    if (block < 6) block = 6;
    /* inputs per pass over a panel when several row tiles share it: its 16 KiB slice
       stays in L1 while they stream past (one pass when a single tile takes all rows) */
    const int kc = M > 6 ? 256 : K;
    #pragma omp parallel if (panels > 1)
    {
        const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
        int p0 = (int)((int64_t)panels * tid / nt), p1 = (int)((int64_t)panels * (tid + 1) / nt);
        int r0 = 0, r1 = M;
        if (M >= 96 * nt) {  /* prompt chunks: each thread its own rows, all panels (the x
                                slices stay private; 2048 rows ran 94 -> 102 GFLOP/s) */
            const int tiles = (M + 5) / 6;
            p0 = 0; p1 = panels;
            r0 = (int)((int64_t)tiles * tid / nt) * 6;
            r1 = (int)((int64_t)tiles * (tid + 1) / nt) * 6;
            if (r1 > M) r1 = M;
        }
        for (int m0 = r0; m0 < r1; m0 += block) {
            const int m1 = r1 - m0 < block ? r1 : m0 + block;
            for (int p = p0; p < p1; p++) {
                const float *b = bias ? bias + 16 * p : NULL;
                for (int k0 = 0; k0 < K; k0 += kc) {
                    const int kn = K - k0 < kc ? K - k0 : kc;
                    const float *panel = packed + ((int64_t)p * K + k0) * 16;
                    for (int m = m0; m < m1; m += 6)
                        tm_f32_rows(x + (int64_t)m * x_stride + k0, x_stride, panel, kn, b,
                                    y + (int64_t)m * y_stride + 16 * p, y_stride, k0 == 0,
                                    k0 + kn == K, m1 - m < 6 ? m1 - m : 6);
                }
            }
        }
    }
    return 0;
#else
    (void)x; (void)x_stride; (void)packed; (void)bias; (void)y; (void)y_stride;
    (void)M; (void)N; (void)K;
    return -1;
#endif
}
