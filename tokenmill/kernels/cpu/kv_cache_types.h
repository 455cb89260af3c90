/*
 * Element types of a K/V cache the float32 attention kernels take, as their kv_kind
 * argument: float32 (a float32 model's --kv-cache-dtype auto), 16 bits per value
 * (bfloat16 or float16), widened to float32 on load, or 8-bit codes followed by a float32
 * scale per (token, head) row (int8, float8 e4m3; kernels/kv_quant.py), decoded times the
 * scale. Also the e4m3 decoding both 8-bit readers share.
 */
#ifndef TOKENMILL_KV_CACHE_TYPES_H
#define TOKENMILL_KV_CACHE_TYPES_H

#include <math.h>
#include <stdint.h>
#include <string.h>

enum { TM_KV_F32 = 0, TM_KV_BF16 = 1, TM_KV_F16 = 2, TM_KV_INT8 = 3, TM_KV_FP8 = 4 };
/* Or'ed into the prompt kernel's kv_kind: widen key blocks per tile, never the whole
   sequence first (what it does past its memory limit; tests reach that path with it). */
enum { TM_KV_PER_TILE = 16 };

/* float8 e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; S.1111.111 is NaN, there
   are no infinities. Exact in float32. */
static inline float tm_fp8_e4m3_to_f32(uint8_t b) {
    const uint32_t e = (b >> 3) & 0xFu, m = b & 7u;
    float v;
    if (e == 0xFu && m == 7u) {
        v = NAN;
    } else if (e == 0) {
        v = (float)m * 0.001953125f; /* subnormal: m/8 * 2^-6 */
    } else {
        const uint32_t bits = ((e + 120u) << 23) | (m << 20); /* rebias 7 -> 127 */
        memcpy(&v, &bits, sizeof v);
    }
    return (b & 0x80u) ? -v : v;
}

#endif
