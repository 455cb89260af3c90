/*
 * IEEE half precision <-> float32 for the kernels that keep halves as uint16_t: Q4_1's
 * scales (d and m, as in llama.cpp's files) and float16 K/V caches. Widening is exact
 * for every value, subnormals, infinities and NaNs included; with F16C (every AVX2 CPU)
 * the vector loads use vcvtph2ps instead, which gives the same floats. Narrowing rounds
 * to nearest even as PyTorch's .to(torch.float16) does (a NaN stays a quiet NaN).
 */
#ifndef TOKENMILL_FP16_H
#define TOKENMILL_FP16_H

#include <stdint.h>
#include <string.h>

static inline float tm_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0x1Fu) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else { /* zero or subnormal: man * 2^-24, exact in float32 */
        const float f = (float)man * 5.9604644775390625e-08f;
        memcpy(&bits, &f, sizeof bits);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t tm_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7FFFFFFFu;
    if (ax > 0x7F800000u) return sign | 0x7E00u | (uint16_t)((ax >> 13) & 0x3FFu); /* NaN */
    if (ax >= 0x477FF000u) return sign | 0x7C00u; /* 65520 and up round to infinity */
    if (ax >= 0x38800000u) /* normal: rebias the exponent (127 -> 15), round the mantissa */
        return sign | (uint16_t)((ax - 0x38000000u + 0xFFFu + ((ax >> 13) & 1u)) >> 13);
    /* subnormal (or zero): adding 0.5 leaves the value's multiple of 2^-24, rounded to
       nearest even by the float addition, in the low bits */
    float a;
    memcpy(&a, &ax, sizeof a);
    a += 0.5f;
    uint32_t bits;
    memcpy(&bits, &a, sizeof bits);
    return sign | (uint16_t)(bits - 0x3F000000u);
}

#endif
