/*
 * y = x @ W.T (+ bias) for a weight stored as int8 codes with one float scale
 * per group of 32 inputs (llama.cpp's Q8_0: w = code * scale), the input
 * rounded to 8 bits per group of 32 as well (x ~= dx * qx).
 *
 * Per group: sum_j w_j x_j ~= scale * dx * sum_j code_j qx_j, an exact
 * integer sum. AVX2 has only an unsigned x signed byte multiply-add, so the
 * weight's signs move onto the input first (|w| * sign(w) x), as llama.cpp
 * does. Each pass over a group's 32 weight bytes serves up to four input rows;
 * weight rows are split over PyTorch's OpenMP threads (see paged_attention.c).
 *
 * x [M, K] float (row stride x_stride), codes [N, K], scales [N, K / 32],
 * out [M, N] (row stride out_stride). K % 32 == 0.
 */
#include <stdint.h>

#include "q8_input.h"

#define MT 4

#ifdef TM_AVX2
/* One group's term of one output: the exact dot product of 32 weight codes wv with 32
   input codes xv (the weight's signs moved onto the input), times scale = weight scale
   x input scale, added to acc. Every AVX2 path below adds its groups through this, in
   order, so a row's result does not depend on which path (or batch) computed it. */
static inline __m256 tm_q8_group(__m256i wv, __m256i xv, float scale, __m256 acc) {
    const __m256i dots = tm_dot_u8s8(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_set1_ps(scale), acc);
}
#endif

static void row_dots_q8(const int8_t *w, const float *ws, const int8_t *qx, const float *dx,
                        int K, int m0, int rows, float *res) {
    const int groups = K / 32;
#ifdef TM_AVX2
    __m256 acc[MT];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + g * 32));
        for (int r = 0; r < rows; r++) {
            const int64_t row = (int64_t)(m0 + r);
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(qx + row * K + g * 32));
            acc[r] = tm_q8_group(wv, xv, ws[g] * dx[row * groups + g], acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) res[r] = tm_hsum256(acc[r]);
#else
    for (int r = 0; r < rows; r++) {
        const int64_t row = (int64_t)(m0 + r);
        float total = 0.0f;
        for (int g = 0; g < groups; g++) {
            int dot = 0;
            for (int j = 0; j < 32; j++) dot += w[g * 32 + j] * qx[row * K + g * 32 + j];
            total += (float)dot * (ws[g] * dx[row * groups + g]);
        }
        res[r] = total;
    }
#endif
}

#ifdef TM_AVX2
/* The full tile: one weight row against input rows m0 .. m0 + 3, in registers. */
static void tile_1x4_q8(const int8_t *w, const float *ws, const int8_t *qx, const float *dx,
                        int K, int m0, float *res) {
    const int groups = K / 32;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const int8_t *x0 = qx + (int64_t)m0 * K;
    const float *d0 = dx + (int64_t)m0 * groups;
    for (int g = 0; g < groups; g++) {
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + g * 32));
#define TM_STEP(R, A)                                                                          \
        A = tm_q8_group(wv, _mm256_loadu_si256((const __m256i *)(x0 + (int64_t)(R) * K + g * 32)), \
                        ws[g] * d0[(R) * groups + g], A);
        TM_STEP(0, a0)
        TM_STEP(1, a1)
        TM_STEP(2, a2)
        TM_STEP(3, a3)
#undef TM_STEP
    }
    res[0] = tm_hsum256(a0);
    res[1] = tm_hsum256(a1);
    res[2] = tm_hsum256(a2);
    res[3] = tm_hsum256(a3);
}

/* Weight rows n .. n + 3 against one input row (decode, and the rows a 4-row tile leaves):
   each input load serves four weight rows, and four independent accumulators keep the
   FMA latency hidden (one row at a time is bound by it at K = 576). */
static void tile_4x1_q8(const int8_t *w, const float *ws, const int8_t *qx, const float *dx,
                        int K, int m, float res[4]) {
    const int groups = K / 32;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const int8_t *xr = qx + (int64_t)m * K;
    const float *dxr = dx + (int64_t)m * groups;
    for (int g = 0; g < groups; g++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xr + g * 32));
        const float dxv = dxr[g];
        /* the rows two quads ahead, a line (two groups) at a time: decode streams the
           LM head's 28 MB once per step, and without this a thread read it at a third
           of the memory's rate (interleaved rows do not train the hardware prefetcher) */
        if (!(g & 1))
            for (int r = 8; r < 12; r++)
                _mm_prefetch((const char *)(w + (int64_t)r * K + g * 32), _MM_HINT_T0);
#define TM_ROW(R, A)                                                                           \
        A = tm_q8_group(_mm256_loadu_si256((const __m256i *)(w + (int64_t)(R) * K + g * 32)), xv, \
                        ws[(R) * groups + g] * dxv, A);
        TM_ROW(0, a0)
        TM_ROW(1, a1)
        TM_ROW(2, a2)
        TM_ROW(3, a3)
#undef TM_ROW
    }
    res[0] = tm_hsum256(a0);
    res[1] = tm_hsum256(a1);
    res[2] = tm_hsum256(a2);
    res[3] = tm_hsum256(a3);
}
#endif

int int8_matmul_f32(const float *x, int64_t x_stride, const int8_t *codes, const float *scales,
                    const float *bias, float *out, int64_t out_stride, int M, int N, int K) {
    const int groups = K / 32;
    tm_q8_input in;
    if (tm_q8_input_make(&in, x, x_stride, M, K, 0) != 0) return -1;
    const int8_t *qx = in.qx;
    const float *dx = in.dx;
    #pragma omp parallel for schedule(static)
    for (int nq = 0; nq < (N + 3) / 4; nq++) {
        const int n0 = 4 * nq, nrows = N - n0 < 4 ? N - n0 : 4;
#ifdef TM_AVX2
        /* A full quad of weight rows leaves the last M % MT input rows to tile_4x1_q8. */
        const int mend = nrows == 4 ? M - M % MT : M;
#else
        const int mend = M;
#endif
        for (int n = n0; n < n0 + nrows; n++) {
            const int8_t *w = codes + (int64_t)n * K;
            const float *ws = scales + (int64_t)n * groups;
            const float b = bias ? bias[n] : 0.0f;
            float res[MT];
            for (int m0 = 0; m0 < mend; m0 += MT) {
                const int rows = mend - m0 < MT ? mend - m0 : MT;
#ifdef TM_AVX2
                if (rows == MT)
                    tile_1x4_q8(w, ws, qx, dx, K, m0, res);
                else
#endif
                    row_dots_q8(w, ws, qx, dx, K, m0, rows, res);
                for (int r = 0; r < rows; r++) out[(int64_t)(m0 + r) * out_stride + n] = res[r] + b;
            }
        }
#ifdef TM_AVX2
        if (nrows == 4) {
            const int8_t *w0 = codes + (int64_t)n0 * K;
            const float *ws0 = scales + (int64_t)n0 * groups;
            float one[4];
            for (int m = mend; m < M; m++) {
                tile_4x1_q8(w0, ws0, qx, dx, K, m, one);
                for (int j = 0; j < 4; j++)
                    out[(int64_t)m * out_stride + n0 + j] = one[j] + (bias ? bias[n0 + j] : 0.0f);
            }
        }
#endif
    }
    tm_q8_input_free(&in);
    return 0;
}
