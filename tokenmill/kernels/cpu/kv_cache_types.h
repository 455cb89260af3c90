/*
 * Element types of a float32 model's K/V cache, as the kernels' kv_kind argument: float32
 * (--kv-cache-dtype auto) or 16 bits per value (bfloat16 or float16), widened to float32
 * on load. The 8-bit formats have their own kernel (paged_attention_q8.c).
 */
#ifndef TOKENMILL_KV_CACHE_TYPES_H
#define TOKENMILL_KV_CACHE_TYPES_H

enum { TM_KV_F32 = 0, TM_KV_BF16 = 1, TM_KV_F16 = 2 };

#endif
