/*
 * RMSNorm for bfloat16 models on the CPU: one call per norm instead of seven
 * PyTorch ops. It rounds where PyTorch's bfloat16 ops on the same formula round, so
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
