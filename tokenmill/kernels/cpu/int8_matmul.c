/*
 * y = x @ W.T (+ bias) for a weight stored as int8 codes with one float scale
 * per group of 32 inputs (llama.cpp's Q8_0 layout: w = code * scale).
 *
 * Made for the small-M case of decoding (M = sequences in the step). Each
 * thread takes tiles of 4 weight rows, dequantizes them once into a float
 * buffer that stays in L1, then runs the 4 rows against the inputs two at a
 * time: 8 independent accumulators per k, 6 loads per 8 multiply-adds. The
 * weight is read from memory once per call, a quarter of float32's bytes.
 * Threads are PyTorch's own OpenMP pool (see paged_attention.c).
 *
 * x [M, K] (row stride x_stride), codes [N, K], scales [N, K / 32],
 * out [M, N] (row stride out_stride); float32 but the codes. K % 32 == 0.
 */
#include <stdint.h>

#define ROWS 4

static void dequant_rows(const int8_t *codes, const float *scales, int K, int rows,
                         float *w) {
    const int groups = K / 32;
    for (int r = 0; r < rows; r++) {
        for (int g = 0; g < groups; g++) {
            const float scale = scales[(int64_t)r * groups + g];
            const int8_t *c = codes + (int64_t)r * K + g * 32;
            float *dst = w + (int64_t)r * K + g * 32;
            #pragma omp simd
            for (int j = 0; j < 32; j++) dst[j] = (float)c[j] * scale;
        }
    }
}

void int8_matmul_f32(const float *x, int64_t x_stride, const int8_t *codes, const float *scales,
                     const float *bias, float *out, int64_t out_stride, int M, int N, int K) {
    const int groups = K / 32;
    const int tiles = (N + ROWS - 1) / ROWS;
    #pragma omp parallel
    {
        float w[ROWS * K];
        #pragma omp for schedule(static)
        for (int t = 0; t < tiles; t++) {
            const int n0 = t * ROWS;
            const int rows = N - n0 < ROWS ? N - n0 : ROWS;
            dequant_rows(codes + (int64_t)n0 * K, scales + (int64_t)n0 * groups, K, rows, w);
            for (int r = rows; r < ROWS; r++)  /* pad a short last tile with zeros */
                for (int k = 0; k < K; k++) w[r * K + k] = 0.0f;
            const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
            int m = 0;
            for (; m + 2 <= M; m += 2) {
                const float *xa = x + (int64_t)m * x_stride, *xb = xa + x_stride;
                float a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
                #pragma omp simd reduction(+:a0, a1, a2, a3, b0, b1, b2, b3)
                for (int k = 0; k < K; k++) {
                    const float u = xa[k], v = xb[k];
                    a0 += w0[k] * u; a1 += w1[k] * u; a2 += w2[k] * u; a3 += w3[k] * u;
                    b0 += w0[k] * v; b1 += w1[k] * v; b2 += w2[k] * v; b3 += w3[k] * v;
                }
                const float ra[ROWS] = {a0, a1, a2, a3}, rb[ROWS] = {b0, b1, b2, b3};
                for (int r = 0; r < rows; r++) {
                    const float b = bias ? bias[n0 + r] : 0.0f;
                    out[(int64_t)m * out_stride + n0 + r] = ra[r] + b;
                    out[(int64_t)(m + 1) * out_stride + n0 + r] = rb[r] + b;
                }
            }
            for (; m < M; m++) {
                const float *xa = x + (int64_t)m * x_stride;
                float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
                #pragma omp simd reduction(+:a0, a1, a2, a3)
                for (int k = 0; k < K; k++) {
                    const float u = xa[k];
                    a0 += w0[k] * u; a1 += w1[k] * u; a2 += w2[k] * u; a3 += w3[k] * u;
                }
                const float ra[ROWS] = {a0, a1, a2, a3};
                for (int r = 0; r < rows; r++)
                    out[(int64_t)m * out_stride + n0 + r] = ra[r] + (bias ? bias[n0 + r] : 0.0f);
            }
        }
    }
}
