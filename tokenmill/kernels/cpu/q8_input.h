/*
 * Shared by the two quantized matmuls (q4_matmul.c, int8_matmul.c): the matmul
 * input rounded to 8 bits per group of 32 (llama.cpp's Q8 activations), and an
 * AVX2 horizontal sum.
 */
#ifndef TOKENMILL_Q8_INPUT_H
#define TOKENMILL_Q8_INPUT_H

#include <stdint.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TM_AVX2 1

static inline float tm_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
#endif

/* x ~= dx * qx per group of 32; sx = dx * sum(qx) (the Q4_1 minimum's term). */
typedef struct {
    int8_t *qx; /* [M, K] codes */
    float *dx;  /* [M, K / 32] scales */
    float *sx;  /* [M, K / 32] scale * sum of codes */
} tm_q8_input;

/* Allocate and fill (defined in q4_matmul.c); -1, nothing allocated, when out of memory. */
int tm_q8_input_make(tm_q8_input *in, const float *x, int64_t x_stride, int M, int K);
void tm_q8_input_free(tm_q8_input *in);

#endif
