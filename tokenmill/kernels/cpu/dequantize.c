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
            for (int j = 0; j < 16; j++) {
                const float lo = (float)(bytes[j] & 0x0F), hi = (float)(bytes[j] >> 4);
                o[j] = scale * lo + low;
                o[j + 16] = scale * hi + low;
            }
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
            for (int j = 0; j < 32; j++) dst[g * 32 + j] = (float)row[g * 32 + j] * scale;
        }
    }
}
