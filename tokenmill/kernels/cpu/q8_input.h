/*
 * Shared by the two quantized matmuls (q4_matmul.c, int8_matmul.c): the matmul
 * input rounded to 8 bits per group of 32 (llama.cpp's Q8 activations), an
 * AVX2 horizontal sum and the 8-bit dot product.
 */
#ifndef TOKENMILL_Q8_INPUT_H
#define TOKENMILL_Q8_INPUT_H

#include <stdint.h>

/* F16C (half-precision loads of Q4_1's scales) comes with every AVX2 CPU; a -march
   without it gets the portable loops. */
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define TM_AVX2 1

static inline float tm_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* Eight int32 lanes, each the sum of four adjacent u8 x s8 products. With VNNI
   (AVX512-VNNI + VL, or AVX-VNNI) one vpdpbusd; on plain AVX2 maddubs, which sums
   pairs into int16, then madd. The callers' pairs stay below 2^15 (4-bit or
   sign-folded 8-bit codes times |x| <= 127), so both give the same exact sums. */
static inline __m256i tm_dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
#endif

/* x ~= dx * qx per group of 32; sx = dx * sum(qx) (the Q4_1 minimum's term). */
typedef struct {
    int8_t *qx; /* [M, K] codes, in group order or in pair order (tm_q8_input_make) */
    float *dx;  /* [M, K / 32] scales */
    float *sx;  /* [M, K / 32] scale * sum of codes */
} tm_q8_input;

/* Allocate and fill (defined in q4_matmul.c); -1, nothing allocated, when out of memory.
   With pair_order, each pair of groups A, B (0-1, 2-3, ...) is stored as A's codes 0..15,
   B's 0..15, A's 16..31, B's 16..31: the order of a Q4_1 weight pair's low and high
   nibbles (q4_matmul.c); a last odd group keeps its own order. */
int tm_q8_input_make(tm_q8_input *in, const float *x, int64_t x_stride, int M, int K,
                     int pair_order);
void tm_q8_input_free(tm_q8_input *in);

#endif
