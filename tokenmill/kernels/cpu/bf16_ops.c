/*
 * Elementwise steps of bfloat16 models on the CPU, rounded where PyTorch's bfloat16 ops
 * on the same formulas round.
 *
 * RMSNorm: one call per norm instead of seven PyTorch ops. It rounds where PyTorch's bfloat16 ops on the same formula round, so
 * only the order of the sum of squares differs: with a residual, s = bf16(x + r)
 * is stored as the new residual and normalised;
 * y = bf16(w * bf16(s * (1 / sqrt(mean(s^2) + eps)))), the mean taken in float32
 * (tokenmill.model.layers.RMSNorm._norm).
 *
 * bfloat16 values are uint16_t here (bf16.h).
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include "vec_math.h"

/* No fused multiply-adds where PyTorch rounds the product (the norm). Only the norm: a
   function under this pragma would not inline vec_math.h's helpers. */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

void rms_norm_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *res_in,
                   uint16_t *res_out, const uint16_t *w, uint16_t *y, int T, int N, float eps) {
    #pragma omp parallel for schedule(static) if (T >= 64)
    for (int t = 0; t < T; t++) {
        const uint16_t *src = x + (int64_t)t * x_stride;
        uint16_t *dst = y + (int64_t)t * N;
        if (res_in) {
            const uint16_t *r = res_in + (int64_t)t * N;
            uint16_t *sum = res_out + (int64_t)t * N;
            for (int k = 0; k < N; k++)
                sum[k] = tm_f32_to_bf16(tm_bf16_to_f32(src[k]) + tm_bf16_to_f32(r[k]));
            src = sum;
        }
        float lanes[8] = {0};
        int i = 0;
        for (; i + 8 <= N; i += 8)
            for (int j = 0; j < 8; j++) {
                const float v = tm_bf16_to_f32(src[i + j]);
                lanes[j] += v * v;
            }
        float ss = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
                   + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
        for (; i < N; i++) {
            const float v = tm_bf16_to_f32(src[i]);
            ss += v * v;
        }
        const float inv = 1.0f / sqrtf(ss / (float)N + eps);
        for (int k = 0; k < N; k++) {
            const uint16_t normed = tm_f32_to_bf16(tm_bf16_to_f32(src[k]) * inv);
            dst[k] = tm_f32_to_bf16(tm_bf16_to_f32(w[k]) * tm_bf16_to_f32(normed));
        }
    }
}

#pragma GCC pop_options

/* SiLU-and-multiply: gate_up [T, 2 I] (row stride gu_stride) holds [g | u];
   y [T, I] = bf16(bf16(g / (1 + exp(-g))) * u), PyTorch's F.silu(g) * u in bfloat16.
   The AVX2 exp is within 2 ulp of PyTorch's, so a SiLU value can round to the
   neighbouring bfloat16 (one step) where PyTorch's would not (about 1 in 10^4).
   For the bfloat16 decoder stack, whose per-layer path must round as it does: as a
   separate call it is no faster than PyTorch's two ops. */
void silu_mul_bf16(const uint16_t *gate_up, int64_t gu_stride, uint16_t *y, int T, int I) {
    #pragma omp parallel for schedule(static) if (T > 1 && (int64_t)T * I >= 16384)
    for (int t = 0; t < T; t++) {
        const uint16_t *g = gate_up + (int64_t)t * gu_stride, *u = g + I;
        uint16_t *dst = y + (int64_t)t * I;
        int i = 0;
#if defined(__AVX2__) && defined(__FMA__)
        const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
        for (; i + 8 <= I; i += 8) {
            const __m256 gv = tm_load8_bf16(g + i);
            const __m256 e = tm_exp_ps(_mm256_sub_ps(zero, gv));
            const __m256 s = tm_round_bf16_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)));
            tm_store8_bf16(dst + i, tm_round_bf16_ps(_mm256_mul_ps(s, tm_load8_bf16(u + i))));
        }
#endif
        for (; i < I; i++) {
            const float gi = tm_bf16_to_f32(g[i]);
            const float s = tm_bf16_to_f32(tm_f32_to_bf16(gi / (1.0f + expf(-gi))));
            dst[i] = tm_f32_to_bf16(s * tm_bf16_to_f32(u[i]));
        }
    }
}
