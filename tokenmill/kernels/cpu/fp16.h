/*
 * IEEE half precision -> float32 for the kernels that keep their scales as uint16_t
 * (Q4_1's d and m, as in llama.cpp's files): exact for every value, subnormals, infinities
 * and NaNs included. With F16C (every AVX2 CPU) the vector loads use vcvtph2ps instead,
 * which gives the same floats.
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

#endif
