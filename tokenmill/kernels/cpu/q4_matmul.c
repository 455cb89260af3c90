/*
 * y = x @ W.T (+ bias) with W in 4-bit groups of 32 (llama.cpp's Q4_1:
 * w = d * q + m, q in 0..15) and x rounded to 8 bits per group of 32
 * (x ~= dx * qx, qx in -127..127), the way llama.cpp multiplies its Q4 files.
 *
 * Per group the dot product splits into an integer part and a correction:
 *   sum_j w_j x_j ~= d * dx * sum_j q_j qx_j  +  m * dx * sum_j qx_j
 * The integer sums are exact; on AVX2 one group of 32 costs a handful of
 * instructions (unpack nibbles, u8 x s8 multiply-adds - one vpdpbusd with VNNI -
 * convert, one float FMA), which is why this beats dequantizing to float: single-stream
 * decode reads 0.56 bytes per weight and does little work per byte.
 *
 * Weight layout per row: K / 2 bytes, group g at bytes 16 g .. 16 g + 15,
 * byte j holding element j in its low nibble and element j + 16 in its high
 * nibble (Q4_1's own order); d and m: float [N, K / 32].
 * x [M, K] float (row stride x_stride); out [M, N] (row stride out_stride).
 * Input rows are quantized once per call; weight rows are split over
 * PyTorch's OpenMP threads (see paged_attention.c), each pass over a group's
 * bytes serving up to four input rows.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "q8_input.h"

#define MT 4  /* input rows per pass over a weight row */
#define MB 64 /* input rows per panel */

/* qx = round(x / dx) with dx = max|x| / 127 per group; sx = dx * sum(qx). */
static void tm_quantize_rows_q8(const float *x, int64_t x_stride, int M, int K, int8_t *qx,
                                float *dx, float *sx) {
    const int groups = K / 32;
    for (int m = 0; m < M; m++) {
        for (int g = 0; g < groups; g++) {
            const float *src = x + (int64_t)m * x_stride + g * 32;
            float amax = 0.0f;
            for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(src[j]));
            const float scale = amax / 127.0f;
            const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
            int8_t *dst = qx + (int64_t)m * K + g * 32;
            int sum = 0;
            for (int j = 0; j < 32; j++) {
                const int v = (int)nearbyintf(src[j] * inv);
                dst[j] = (int8_t)v;
                sum += v;
            }
            dx[(int64_t)m * groups + g] = scale;
            sx[(int64_t)m * groups + g] = scale * (float)sum;
        }
    }
}

void tm_q8_input_free(tm_q8_input *in) {
    free(in->qx);
    free(in->dx);
    free(in->sx);
}

int tm_q8_input_make(tm_q8_input *in, const float *x, int64_t x_stride, int M, int K) {
    const size_t groups = (size_t)M * (K / 32);
    in->qx = malloc((size_t)M * K);
    in->dx = malloc(sizeof(float) * groups);
    in->sx = malloc(sizeof(float) * groups);
    if (!in->qx || !in->dx || !in->sx) {
        tm_q8_input_free(in);
        return -1;
    }
    tm_quantize_rows_q8(x, x_stride, M, K, in->qx, in->dx, in->sx);
    return 0;
}


/* Dot products of one weight row with rows m0 .. m0 + rows - 1 of the quantized input. */
static void row_dots(const uint8_t *wq, const float *d, const float *mn, const int8_t *qx,
                     const float *dx, const float *sx, int K, int m0, int rows, float *res) {
    const int groups = K / 32;
#ifdef TM_AVX2
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m256 acc[MT];
    float corr[MT];
    for (int r = 0; r < rows; r++) {
        acc[r] = _mm256_setzero_ps();
        corr[r] = 0.0f;
    }
    for (int g = 0; g < groups; g++) {
        const __m128i raw = _mm_loadu_si128((const __m128i *)(wq + g * 16));
        const __m128i lo = _mm_and_si128(raw, low4);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
        const __m256i q = _mm256_set_m128i(hi, lo); /* elements 0..15, then 16..31 */
        for (int r = 0; r < rows; r++) {
            const int64_t row = (int64_t)(m0 + r);
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(qx + row * K + g * 32));
            const __m256 sums = _mm256_cvtepi32_ps(tm_dot_u8s8(q, xv)); /* pairs <= 3810 */
            const float scale = d[g] * dx[row * groups + g];
            acc[r] = _mm256_fmadd_ps(sums, _mm256_set1_ps(scale), acc[r]);
            corr[r] += mn[g] * sx[row * groups + g];
        }
    }
    for (int r = 0; r < rows; r++) res[r] = tm_hsum256(acc[r]) + corr[r];
#else
    for (int r = 0; r < rows; r++) {
        const int64_t row = (int64_t)(m0 + r);
        float total = 0.0f;
        for (int g = 0; g < groups; g++) {
            const uint8_t *b = wq + g * 16;
            const int8_t *xq = qx + row * K + g * 32;
            int dot = 0;
            for (int j = 0; j < 16; j++) dot += (b[j] & 0x0F) * xq[j] + (b[j] >> 4) * xq[j + 16];
            total += (float)dot * (d[g] * dx[row * groups + g]) + mn[g] * sx[row * groups + g];
        }
        res[r] = total;
    }
#endif
}

#ifdef TM_AVX2
/* The full tile: weight rows n, n + 1 against input rows m0 .. m0 + 3 (8 accumulators). */
static void tile_2x4(const uint8_t *w0, const uint8_t *w1, const float *d0, const float *d1,
                     const float *mn0, const float *mn1, const int8_t *qx, const float *dx,
                     const float *sx, int K, int m0, float res[2][MT]) {
    const int groups = K / 32;
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
    __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    float c0[MT] = {0}, c1[MT] = {0};
    const int8_t *x0 = qx + (int64_t)m0 * K;
    const float *dxr = dx + (int64_t)m0 * groups, *sxr = sx + (int64_t)m0 * groups;
    for (int g = 0; g < groups; g++) {
        const __m128i r0 = _mm_loadu_si128((const __m128i *)(w0 + g * 16));
        const __m128i r1 = _mm_loadu_si128((const __m128i *)(w1 + g * 16));
        const __m256i q0 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(r0, 4), low4),
                                            _mm_and_si128(r0, low4));
        const __m256i q1 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(r1, 4), low4),
                                            _mm_and_si128(r1, low4));
#define TM_STEP(R, A0, A1)                                                                    \
        {                                                                                     \
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(x0 + (int64_t)(R) * K + g * 32)); \
            const float dxv = dxr[(R) * groups + g], sxv = sxr[(R) * groups + g];            \
            const __m256 s0 = _mm256_cvtepi32_ps(tm_dot_u8s8(q0, xv)); \
            const __m256 s1 = _mm256_cvtepi32_ps(tm_dot_u8s8(q1, xv)); \
            A0 = _mm256_fmadd_ps(s0, _mm256_set1_ps(d0[g] * dxv), A0);                       \
            A1 = _mm256_fmadd_ps(s1, _mm256_set1_ps(d1[g] * dxv), A1);                       \
            c0[R] += mn0[g] * sxv;                                                            \
            c1[R] += mn1[g] * sxv;                                                            \
        }
        TM_STEP(0, a00, a10)
        TM_STEP(1, a01, a11)
        TM_STEP(2, a02, a12)
        TM_STEP(3, a03, a13)
#undef TM_STEP
    }
    res[0][0] = tm_hsum256(a00) + c0[0]; res[0][1] = tm_hsum256(a01) + c0[1];
    res[0][2] = tm_hsum256(a02) + c0[2]; res[0][3] = tm_hsum256(a03) + c0[3];
    res[1][0] = tm_hsum256(a10) + c1[0]; res[1][1] = tm_hsum256(a11) + c1[1];
    res[1][2] = tm_hsum256(a12) + c1[2]; res[1][3] = tm_hsum256(a13) + c1[3];
}

/* Weight rows n .. n + 3 against one input row (decode): one input load per group
   serves four rows, four accumulators stay in registers. */
static void tile_4x1(const uint8_t *w, const float *d, const float *mn, const int8_t *qx,
                     const float *dx, const float *sx, int K, int m, float res[4]) {
    const int groups = K / 32;
    const int64_t wrow = K / 2;
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    float c0 = 0, c1 = 0, c2 = 0, c3 = 0;
    const int8_t *xr = qx + (int64_t)m * K;
    const float *dxr = dx + (int64_t)m * groups, *sxr = sx + (int64_t)m * groups;
    for (int g = 0; g < groups; g++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xr + g * 32));
        const float dxv = dxr[g], sxv = sxr[g];
#define TM_ROW(R, A, C)                                                                        \
        {                                                                                      \
            const __m128i raw = _mm_loadu_si128((const __m128i *)(w + (R) * wrow + g * 16));   \
            const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low4),    \
                                               _mm_and_si128(raw, low4));                      \
            const __m256 sums = _mm256_cvtepi32_ps(tm_dot_u8s8(q, xv)); \
            A = _mm256_fmadd_ps(sums, _mm256_set1_ps(d[(R) * groups + g] * dxv), A);           \
            C += mn[(R) * groups + g] * sxv;                                                   \
        }
        TM_ROW(0, a0, c0)
        TM_ROW(1, a1, c1)
        TM_ROW(2, a2, c2)
        TM_ROW(3, a3, c3)
#undef TM_ROW
    }
    res[0] = tm_hsum256(a0) + c0;
    res[1] = tm_hsum256(a1) + c1;
    res[2] = tm_hsum256(a2) + c2;
    res[3] = tm_hsum256(a3) + c3;
}
#endif

int q4_matmul_f32(const float *x, int64_t x_stride, const uint8_t *packed, const float *d,
                  const float *mins, const float *bias, float *out, int64_t out_stride, int M,
                  int N, int K) {
    const int groups = K / 32;
    tm_q8_input in;
    if (tm_q8_input_make(&in, x, x_stride, M, K) != 0) return -1;
    const int8_t *qx = in.qx;
    const float *dx = in.dx, *sx = in.sx;
    /* Long inputs (prefill) go in panels of MB rows, so a panel's quantized rows stay
       in L2 while every weight row passes over them. */
    for (int mb = 0; mb < M; mb += MB) {
    const int mend = M - mb < MB ? M : mb + MB;
    #pragma omp parallel for schedule(static)
    for (int nq = 0; nq < (N + 3) / 4; nq++) {
        const int n0 = 4 * nq, nrows = N - n0 < 4 ? N - n0 : 4;
        int m0 = mb;
#ifdef TM_AVX2
        const int full = mend - (mend - mb) % MT; /* rows covered by whole tiles */
        if (nrows == 4) {
            const uint8_t *w0 = packed + (int64_t)n0 * (K / 2);
            const float *d0 = d + (int64_t)n0 * groups, *mn0 = mins + (int64_t)n0 * groups;
            float res[2][MT], one[4];
            for (; m0 < full; m0 += MT) {
                for (int half = 0; half < 2; half++) {
                    const int64_t o = 2 * half;
                    tile_2x4(w0 + o * (K / 2), w0 + (o + 1) * (K / 2), d0 + o * groups,
                             d0 + (o + 1) * groups, mn0 + o * groups, mn0 + (o + 1) * groups,
                             qx, dx, sx, K, m0, res);
                    for (int j = 0; j < 2; j++) {
                        const float b = bias ? bias[n0 + o + j] : 0.0f;
                        for (int r = 0; r < MT; r++)
                            out[(int64_t)(m0 + r) * out_stride + n0 + o + j] = res[j][r] + b;
                    }
                }
            }
            for (; m0 < mend; m0++) {
                tile_4x1(w0, d0, mn0, qx, dx, sx, K, m0, one);
                for (int j = 0; j < 4; j++)
                    out[(int64_t)m0 * out_stride + n0 + j] = one[j] + (bias ? bias[n0 + j] : 0.0f);
            }
        }
#endif
        for (int n = n0; n < n0 + nrows; n++) { /* rows left over, one weight row at a time */
            const uint8_t *wq = packed + (int64_t)n * (K / 2);
            const float *dn = d + (int64_t)n * groups, *mn = mins + (int64_t)n * groups;
            const float b = bias ? bias[n] : 0.0f;
            float res[MT];
            for (int m = m0; m < mend; m += MT) {
                const int rows = mend - m < MT ? mend - m : MT;
                row_dots(wq, dn, mn, qx, dx, sx, K, m, rows, res);
                for (int r = 0; r < rows; r++) out[(int64_t)(m + r) * out_stride + n] = res[r] + b;
            }
        }
    }
    }
    tm_q8_input_free(&in);
    return 0;
}
