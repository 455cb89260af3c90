/*
 * Quantized weight rows back to float32, for the many-row matmuls of prefill:
 * there a float GEMM (PyTorch's, blocked for the cache) on a dequantized tile
 * does more useful work per cycle than the integer dot products built for
 * few-row decode, which on AVX2 without VNNI spend most instructions on
 * unpacking and widening.
 *
 * Layouts are those of q4_matmul.c (Q4_1: w = d * q + m, K / 2 bytes per row,
 * byte j of a group holding element j low and element j + 16 high) and
 * int8_matmul.c (Q8_0: w = code * scale). Rows are split over PyTorch's OpenMP
 * threads. out is [N, K] contiguous. The products are rounded once per weight
 * (no fused multiply-add), so the result equals PyTorch's d * q + m exactly (d and m
 * widened from half precision first).
 */
#include <stdint.h>

#include "fp16.h"

#pragma GCC optimize("fp-contract=off")

#if defined(__AVX2__)
#include <immintrin.h>

/* The low eight bytes of codes8 (0..15) times scale plus low, stored at o: the multiply
   and the add rounded separately, as the scalar loop (fp-contract is off). */
static inline void tm_q4_scale8(__m128i codes8, __m256 scale, __m256 low, float *o) {
    const __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes8));
    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_mul_ps(x, scale), low));
}
#endif

void q4_dequantize_f32(const uint8_t *packed, const uint16_t *d, const uint16_t *mins, float *out,
                       int N, int K) {
    const int groups = K / 32;
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = packed + (int64_t)n * (K / 2);
        float *dst = out + (int64_t)n * K;
        for (int g = 0; g < groups; g++) {
            const float scale = tm_f16_to_f32(d[(int64_t)n * groups + g]);
            const float low = tm_f16_to_f32(mins[(int64_t)n * groups + g]);
            const uint8_t *bytes = row + g * 16;
            float *o = dst + g * 32;
#if defined(__AVX2__)
            /* GCC leaves the loop below scalar (o may alias bytes): 10x slower */
            const __m128i packed16 = _mm_loadu_si128((const __m128i *)bytes);
            const __m128i nibble = _mm_set1_epi8(0x0F);
            const __m128i lo = _mm_and_si128(packed16, nibble);
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed16, 4), nibble);
            const __m256 vs = _mm256_set1_ps(scale), vm = _mm256_set1_ps(low);
            tm_q4_scale8(lo, vs, vm, o);
            tm_q4_scale8(_mm_srli_si128(lo, 8), vs, vm, o + 8);
            tm_q4_scale8(hi, vs, vm, o + 16);
            tm_q4_scale8(_mm_srli_si128(hi, 8), vs, vm, o + 24);
#else
            for (int j = 0; j < 16; j++) {
                const float lo = (float)(bytes[j] & 0x0F), hi = (float)(bytes[j] >> 4);
                o[j] = scale * lo + low;
                o[j + 16] = scale * hi + low;
            }
#endif
        }
    }
}

void q8_dequantize_f32(const int8_t *codes, const float *scales, float *out, int N, int K) {
    const int groups = K / 32;
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const int8_t *row = codes + (int64_t)n * K;
        float *dst = out + (int64_t)n * K;
        for (int g = 0; g < groups; g++) {
            const float scale = scales[(int64_t)n * groups + g];
#if defined(__AVX2__)
            const __m256 vs = _mm256_set1_ps(scale);
            for (int j = 0; j < 32; j += 8) {
                const __m128i codes8 = _mm_loadl_epi64((const __m128i *)(row + g * 32 + j));
                const __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes8));
                _mm256_storeu_ps(dst + g * 32 + j, _mm256_mul_ps(x, vs));
            }
#else
            for (int j = 0; j < 32; j++) dst[g * 32 + j] = (float)row[g * 32 + j] * scale;
#endif
        }
    }
}

/* The rows of `panels` 16-column panels of a weight in q4_matmul_panels.c's layout (blocks
   of 320 bytes per panel and group: codes, then 16 half-precision d, then 16 m), out
   [16 * panels, K]. Each output element as q4_dequantize_f32's: d * q + m, rounded twice. */
void q4_panels_dequantize_f32(const uint8_t *packed, float *out, int panels, int K) {
    const int groups = K / 32;
    #pragma omp parallel for schedule(static)
    for (int p = 0; p < panels; p++) {
        for (int g = 0; g < groups; g++) {
            const uint8_t *blk = packed + ((int64_t)p * groups + g) * 320;
            const uint16_t *d = (const uint16_t *)(blk + 256), *mn = (const uint16_t *)(blk + 288);
            for (int c = 0; c < 16; c++) {
                const float scale = tm_f16_to_f32(d[c]), low = tm_f16_to_f32(mn[c]);
                float *o = out + (int64_t)(16 * p + c) * K + 32 * g;
                for (int h = 0; h < 4; h++) {
                    const uint8_t *bytes = blk + 64 * h + 4 * c;
#if defined(__AVX2__)
                    uint32_t four;
                    __builtin_memcpy(&four, bytes, 4);
                    const uint64_t eight = (uint64_t)(four & 0x0F0F0F0Fu)
                                           | (uint64_t)((four >> 4) & 0x0F0F0F0Fu) << 32;
                    tm_q4_scale8(_mm_cvtsi64_si128((long long)eight), _mm256_set1_ps(scale),
                                 _mm256_set1_ps(low), o + 8 * h);
#else
                    for (int b = 0; b < 4; b++) {
                        o[8 * h + b] = scale * (float)(bytes[b] & 0x0F) + low;
                        o[8 * h + 4 + b] = scale * (float)(bytes[b] >> 4) + low;
                    }
#endif
                }
            }
        }
    }
}

/* The rows of `panels` 16-column panels of a weight in int8_matmul_panels.c's layout (blocks
   of 576 bytes per panel and group: codes + 128, then 16 float scales), out
   [16 * panels, K]: code * scale, as q8_dequantize_f32. */
void q8_panels_dequantize_f32(const uint8_t *packed, float *out, int panels, int K) {
    const int groups = K / 32;
    #pragma omp parallel for schedule(static)
    for (int p = 0; p < panels; p++) {
        for (int g = 0; g < groups; g++) {
            const uint8_t *blk = packed + ((int64_t)p * groups + g) * 576;
            const float *scales = (const float *)(blk + 512);
            for (int c = 0; c < 16; c++) {
                float *o = out + (int64_t)(16 * p + c) * K + 32 * g;
                for (int s = 0; s < 8; s++)
                    for (int b = 0; b < 4; b++)
                        o[4 * s + b] = (float)((int)blk[64 * s + 4 * c + b] - 128) * scales[c];
            }
        }
    }
}
