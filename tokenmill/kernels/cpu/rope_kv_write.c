/*
 * One call per decoder layer instead of about ten PyTorch dispatches: rotary
 * embedding of Q and K straight out of the fused QKV projection, K and V
 * stored into their paged-cache slots, Q into a contiguous [T, H, D] buffer
 * for the attention kernel.
 *
 * The arithmetic is the eager path's, operation for operation
 * (tokenmill.model.layers.rotate_eager): y = x * cos + roll(x, D / 2) * sin_f
 * with sin_f the sign-folded sine, each product and the sum rounded to float32
 * once (no fused multiply-add), so the results are bit-identical to it.
 *
 * qkv [T, (H + 2 KVH) D] (row stride qkv_stride); cos, sin_f [T, D];
 * q_out [T, H, D]; k/v_cache [num_blocks * block_size, KVH, D] contiguous;
 * slots [T] int64, every slot >= 0. rope_kv_write_bf16 is the same on bfloat16
 * tensors, rounding each product and the sum to bfloat16 as PyTorch's bfloat16
 * ops do (bit-identical to the eager path in a bfloat16 model). rope_kv_write_f32_kvbf16
 * and _kvf16 take float32 tensors and a 16-bit cache (--kv-cache-dtype bfloat16|float16):
 * K and V are rounded to nearest even once, on store, as the eager path's .to(cache dtype)
 * does. One thread below
 * 256 tokens: the work is a few microseconds per token, and an OpenMP region here
 * (from 16 tokens) made batch-32 decode steps 10x slower in a measurement
 * (docs/performance.md); prompt chunks split their tokens over the threads (each
 * token writes its own slots).
 */
#include <stdint.h>

#include "bf16.h"
#include "fp16.h"

#pragma GCC optimize("fp-contract=off")

static void rotate_row(const float *x, const float *c, const float *s, float *dst, int D) {
    const int half = D / 2;
    for (int i = 0; i < half; i++) {
        const float a = x[i] * c[i];
        const float b = x[i + half] * s[i];
        dst[i] = a + b;
    }
    for (int i = half; i < D; i++) {
        const float a = x[i] * c[i];
        const float b = x[i - half] * s[i];
        dst[i] = a + b;
    }
}

static void rotate_row_bf16(const uint16_t *x, const uint16_t *c, const uint16_t *s,
                            uint16_t *dst, int D) {
    const int half = D / 2;
    for (int i = 0; i < D; i++) {
        const int j = i < half ? i + half : i - half;
        const uint16_t a = tm_f32_to_bf16(tm_bf16_to_f32(x[i]) * tm_bf16_to_f32(c[i]));
        const uint16_t b = tm_f32_to_bf16(tm_bf16_to_f32(x[j]) * tm_bf16_to_f32(s[i]));
        dst[i] = tm_f32_to_bf16(tm_bf16_to_f32(a) + tm_bf16_to_f32(b));
    }
}

/* One driver per pair of storage types: T of qkv, cos, sin and q_out, KT of the cache.
   ROTATE rotates one head's row; STORE turns one T element into a cache element (as is
   when KT is T; rounded to nearest even from float32 into a 16-bit cache). */
#define DEFINE_ROPE_KV_WRITE(NAME, T, KT, ROTATE, STORE)                                       \
void NAME(const T *qkv, int64_t qkv_stride, int T_, int H, int KVH, int D, const T *cos,      \
          const T *sin_f, T *q_out, KT *k_cache, KT *v_cache, const int64_t *slots) {          \
    const int64_t kv_row = (int64_t)KVH * D;                                                   \
    _Pragma("omp parallel for schedule(static) if (T_ >= 256)")                                \
    for (int t = 0; t < T_; t++) {                                                             \
        const T *src = qkv + (int64_t)t * qkv_stride;                                          \
        const T *c = cos + (int64_t)t * D, *s = sin_f + (int64_t)t * D;                        \
        T *q_dst = q_out + (int64_t)t * H * D;                                                 \
        KT *k_dst = k_cache + slots[t] * kv_row, *v_dst = v_cache + slots[t] * kv_row;         \
        T k_row[D];                                                                            \
        for (int h = 0; h < H; h++) ROTATE(src + (int64_t)h * D, c, s, q_dst + (int64_t)h * D, D); \
        for (int h = 0; h < KVH; h++) {                                                        \
            ROTATE(src + (int64_t)(H + h) * D, c, s, k_row, D);                                \
            for (int d = 0; d < D; d++) k_dst[(int64_t)h * D + d] = STORE(k_row[d]);           \
        }                                                                                      \
        const T *v_src = src + (int64_t)(H + KVH) * D;                                         \
        for (int64_t i = 0; i < kv_row; i++) v_dst[i] = STORE(v_src[i]);                       \
    }                                                                                          \
}

#define TM_AS_IS(x) (x)
DEFINE_ROPE_KV_WRITE(rope_kv_write_f32, float, float, rotate_row, TM_AS_IS)
DEFINE_ROPE_KV_WRITE(rope_kv_write_bf16, uint16_t, uint16_t, rotate_row_bf16, TM_AS_IS)
DEFINE_ROPE_KV_WRITE(rope_kv_write_f32_kvbf16, float, uint16_t, rotate_row, tm_f32_to_bf16)
DEFINE_ROPE_KV_WRITE(rope_kv_write_f32_kvf16, float, uint16_t, rotate_row, tm_f32_to_f16)
