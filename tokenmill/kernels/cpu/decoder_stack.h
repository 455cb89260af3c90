/*
 * The argument structs of the native decoder stacks (decoder_stack.c: float32 with
 * quantized projections; decoder_stack_bf16.c: bfloat16 with AMX projections), mirrored
 * by ctypes structures in tokenmill/model/native_stack.py. Pointers are void where the
 * element type depends on the stack.
 */
#ifndef TOKENMILL_DECODER_STACK_H
#define TOKENMILL_DECODER_STACK_H

#include <stdint.h>

/* One linear layer: kind 0 = Q4_1 (w0 packed codes, w1 scales, w2 mins, both half
   precision), 1 = Q8_0 (w0 codes, w1 float scales), 2 = bfloat16 AMX tiles (w0 from
   pack_bf16_amx), 3 = float32 panels (w0 from pack_f32_panels), 4 = bfloat16 on
   AVX512-BF16 dot products (w0 from pack_bf16_amx), 5 = Q4_1 on AVX512-VNNI (w0 from
   pack_q4_panels, scales inside), 6 = Q8_0 on AVX512-VNNI (w0 from pack_int8_panels); bias
   in the activations' dtype or NULL. amx_min_rows (kinds 5 and 6): calls of at least this
   many rows run on AMX tiles (panel_matmul_amx.c; 0: never). */
typedef struct {
    int32_t kind, n, k, amx_min_rows;
    const void *w0;
    const void *w1, *w2;
    const void *bias;
} tm_qlinear;

typedef struct {
    tm_qlinear qkv, o, gate_up, down;
    const void *attn_norm, *mlp_norm;
    void *k_cache, *v_cache;
    int32_t window, _pad;
} tm_layer;

typedef struct {
    int32_t hidden, heads, kv_heads, head_dim, inter, block_size;
    float eps, scale;
    int32_t kv_kind, _pad; /* the float32 stack's cache type (kv_cache_types.h); 0 in bf16 */
} tm_dims;

typedef struct {
    int32_t tokens, num_seqs, max_blocks, max_q_len;
    const void *cos, *sin_folded;        /* [T, D] */
    const int64_t *slot_mapping;         /* [T] */
    const int32_t *query_start, *seq_lens, *block_tables;
} tm_step;

#endif
