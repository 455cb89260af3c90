/*
 * The decoder stack of a bfloat16 llama-style model in one call, for steps of few
 * tokens (decode) on CPUs with AMX-BF16 or AVX512-BF16: the float32 stack's idea
 * (decoder_stack.c) on the bfloat16 kernels. At batch 1-8 a step of SmolLM2 spent
 * 8-10 ms of ~30 in Python and PyTorch dispatch around ~12 calls per layer.
 *
 * Per layer, in the per-layer path's order and on its kernels: rms_norm_bf16 (after
 * the residual add from the second layer on), bf16_matmul_amx or bf16_matmul_dot for
 * the fused QKV, rope_kv_write_bf16, paged_attention_bf16, the output projection,
 * rms_norm_bf16 with the residual, the fused gate/up projection, silu_mul_bf16 and the
 * down projection.
 * A model with this stack runs silu_mul_bf16 on its per-layer path too, so both paths
 * give bit-identical hidden states (tests/test_decoder_stack.py).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "decoder_stack.h"

int bf16_matmul_amx(const uint16_t *x, int64_t ldx, const uint16_t *packed,
                    const uint16_t *bias, uint16_t *y, int64_t ldy, int M, int N, int K);
int bf16_matmul_dot(const uint16_t *x, int64_t ldx, const uint16_t *packed,
                    const uint16_t *bias, uint16_t *y, int64_t ldy, int M, int N, int K);
void rms_norm_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *res_in,
                   uint16_t *res_out, const uint16_t *w, uint16_t *y, int T, int N, float eps);
void silu_mul_bf16(const uint16_t *gate_up, int64_t gu_stride, uint16_t *y, int T, int I);
void rope_kv_write_bf16(const uint16_t *qkv, int64_t qkv_stride, int T, int H, int KVH, int D,
                        const uint16_t *cos, const uint16_t *sin_f, uint16_t *q_out,
                        uint16_t *k_cache, uint16_t *v_cache, const int64_t *slots);
void paged_attention_bf16(const uint16_t *q, int64_t q_stride, uint16_t *out,
                          int64_t out_stride, const uint16_t *k_cache, const uint16_t *v_cache,
                          const int32_t *query_start, const int32_t *seq_lens,
                          const int32_t *block_tables, int num_seqs, int max_blocks,
                          int num_heads, int num_kv_heads, int head_dim, int block_size,
                          float scale, int max_q_len, int window);

static int linear(const tm_qlinear *l, const uint16_t *x, uint16_t *out, int M) {
    const uint16_t *w = (const uint16_t *)l->w0, *bias = (const uint16_t *)l->bias;
    if (l->kind == 2) return bf16_matmul_amx(x, l->k, w, bias, out, l->n, M, l->n, l->k);
    if (l->kind == 4) return bf16_matmul_dot(x, l->k, w, bias, out, l->n, M, l->n, l->k);
    return -1;
}

/*
 * hidden [T, hidden] in: the embeddings; out: the last layer's MLP output, with
 * residual (written, not read) holding the stream before it (the pair
 * DecoderLayer.forward returns). Returns 0, -1 when out of memory, -2 when a
 * projection is not an AMX or AVX512-BF16 one (nothing useful written).
 */
int decoder_stack_bf16(const tm_dims *dims, const tm_layer *layers, int num_layers,
                       const tm_step *step, uint16_t *hidden, uint16_t *residual) {
    const int T = step->tokens, Hd = dims->hidden, D = dims->head_dim;
    const int q_size = dims->heads * D, qkv_n = (dims->heads + 2 * dims->kv_heads) * D;
    const int inter = dims->inter;
    const size_t elems = (size_t)T * ((size_t)Hd + qkv_n + 2 * (size_t)q_size + 3 * (size_t)inter);
    uint16_t *scratch = malloc(sizeof(uint16_t) * (elems ? elems : 1));
    if (!scratch) return -1;
    uint16_t *normed = scratch, *qkv = normed + (size_t)T * Hd, *q = qkv + (size_t)T * qkv_n;
    uint16_t *attn = q + (size_t)T * q_size, *gate_up = attn + (size_t)T * q_size;
    uint16_t *act = gate_up + (size_t)T * 2 * inter;
    int status = 0;
    for (int i = 0; i < num_layers && status == 0; i++) {
        const tm_layer *L = &layers[i];
        if (i == 0) {
            memcpy(residual, hidden, sizeof(uint16_t) * (size_t)T * Hd);
            rms_norm_bf16(hidden, Hd, NULL, NULL, L->attn_norm, normed, T, Hd, dims->eps);
        } else {
            rms_norm_bf16(hidden, Hd, residual, residual, L->attn_norm, normed, T, Hd,
                          dims->eps);
        }
        status |= linear(&L->qkv, normed, qkv, T);
        rope_kv_write_bf16(qkv, qkv_n, T, dims->heads, dims->kv_heads, D, step->cos,
                           step->sin_folded, q, L->k_cache, L->v_cache, step->slot_mapping);
        memset(attn, 0, sizeof(uint16_t) * (size_t)T * q_size);
        paged_attention_bf16(q, q_size, attn, q_size, L->k_cache, L->v_cache,
                             step->query_start, step->seq_lens, step->block_tables,
                             step->num_seqs, step->max_blocks, dims->heads, dims->kv_heads, D,
                             dims->block_size, dims->scale, step->max_q_len, L->window);
        status |= linear(&L->o, attn, hidden, T);
        rms_norm_bf16(hidden, Hd, residual, residual, L->mlp_norm, normed, T, Hd, dims->eps);
        status |= linear(&L->gate_up, normed, gate_up, T);
        silu_mul_bf16(gate_up, 2 * inter, act, T, inter);
        status |= linear(&L->down, act, hidden, T);
    }
    free(scratch);
    return status ? -2 : 0;
}
