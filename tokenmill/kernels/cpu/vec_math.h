/*
 * Eight-lane float32 helpers for the AVX2 kernels (paged_attention.c, bf16_ops.c,
 * decoder_stack.c, q4_matmul.c, prefill_attention.c): exp, a horizontal sum, a
 * first-lanes mask, bfloat16 loads, rounding and stores eight at a time; the same exp
 * on sixteen lanes where the compiler targets AVX-512. Empty without AVX2 and FMA.
 */
#ifndef TOKENMILL_VEC_MATH_H
#define TOKENMILL_VEC_MATH_H

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <stdint.h>

/* exp of floats in [-87.3, 88.3], one definition per vector width (P: _mm256 or
   _mm512; W: 256 or 512; ROUND: that width's round-to-integer): x = n ln2 + r with
   |r| <= ln2 / 2, exp(r) by a degree-7 minimax polynomial, times 2^n built in the
   exponent bits. Within 2 ulp of expf. */
#define TM_DEFINE_EXP_IN_RANGE(NAME, V, VI, P, W, ROUND)                                     \
static inline V NAME(V x) {                                                                  \
    const V n = ROUND(P##_mul_ps(x, P##_set1_ps(1.44269504088896341f)),                     \
                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);                        \
    /* ln2 split in two so that n * hi is exact: r = x - n * ln2 to full precision */       \
    V r = P##_fnmadd_ps(n, P##_set1_ps(0.693359375f), x);                                    \
    r = P##_fnmadd_ps(n, P##_set1_ps(-2.12194440e-4f), r);                                   \
    V p = P##_set1_ps(1.9875691500e-4f);                                                     \
    p = P##_fmadd_ps(p, r, P##_set1_ps(1.3981999507e-3f));                                   \
    p = P##_fmadd_ps(p, r, P##_set1_ps(8.3334519073e-3f));                                   \
    p = P##_fmadd_ps(p, r, P##_set1_ps(4.1665795894e-2f));                                   \
    p = P##_fmadd_ps(p, r, P##_set1_ps(1.6666665459e-1f));                                   \
    p = P##_fmadd_ps(p, r, P##_set1_ps(5.0000001201e-1f));                                   \
    p = P##_fmadd_ps(p, P##_mul_ps(r, r), P##_add_ps(r, P##_set1_ps(1.0f)));                 \
    const VI bits = P##_slli_epi32(P##_add_epi32(P##_cvtps_epi32(n), P##_set1_epi32(127)),  \
                                   23);                                                      \
    return P##_mul_ps(p, P##_castsi##W##_ps(bits));                                          \
}

TM_DEFINE_EXP_IN_RANGE(tm_exp_in_range, __m256, __m256i, _mm256, 256, _mm256_round_ps)
#if defined(__AVX512F__)
TM_DEFINE_EXP_IN_RANGE(tm_exp16_in_range, __m512, __m512i, _mm512, 512, _mm512_roundscale_ps)
#endif

/* exp of eight floats <= 0 (softmax after subtracting the maximum); inputs below -87.3
   give 2^-126 (the weight of a score that far below the maximum is lost in the sum
   either way). */
static inline __m256 tm_exp_nonpositive(__m256 x) {
    return tm_exp_in_range(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)));
}

#if defined(__AVX512F__)
/* tm_exp_nonpositive on sixteen lanes. */
static inline __m512 tm_exp16_nonpositive(__m512 x) {
    return tm_exp16_in_range(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)));
}
#endif

/* exp of any eight floats, clamped to [-87.3, 88.3] (exp(88.3) is 2.2e38; beyond it
   SiLU's g / (1 + exp(-g)) is a negative zero or a tiny negative either way). */
static inline __m256 tm_exp_ps(__m256 x) {
    return tm_exp_in_range(_mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)),
                                         _mm256_set1_ps(88.3f)));
}

/* All-ones in lanes 0 .. n - 1 (every lane for n >= 8): the mask of the masked loads and
   stores that read or write a row's last few floats and nothing past them. */
static inline __m256i tm_first_lanes(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static inline float tm_hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* bfloat16 -> float32 for eight elements: the 16 bits become the high half (exact). */
static inline __m256 tm_load8_bf16(const uint16_t *p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* Eight floats rounded to bfloat16 as bf16.h's tm_f32_to_bf16 rounds (nearest even; a
   NaN stays a quiet NaN), kept as floats. */
static inline __m256 tm_round_bf16_ps(__m256 v) {
    const __m256i u = _mm256_castps_si256(v), high = _mm256_set1_epi32((int)0xFFFF0000u);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_and_si256(
        _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), high);
    const __m256i quiet = _mm256_and_si256(_mm256_or_si256(u, _mm256_set1_epi32(0x400000)),
                                           high);
    return _mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(quiet),
                            _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

/* Eight floats that are bfloat16 values already (tm_round_bf16_ps) stored as bfloat16. */
static inline void tm_store8_bf16(uint16_t *p, __m256 rounded) {
    const __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(rounded), 16);
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(hi),
                                                    _mm256_extracti128_si256(hi, 1)));
}

#endif
#endif
