/*
 * A whole decoder stack of a float32 llama-style model (quantized projections, or dense
 * ones on the float32 panel kernel) in one call, for steps of fewer rows than the
 * dense prefill GEMM takes (decodes, and the steps where a prompt chunk joins them),
 * where a step's time on a small model goes as much to dispatching ~15 PyTorch and
 * ctypes calls per layer as to the matmuls themselves.
 *
 * Per layer it runs the same kernels the per-layer Python path calls, in the
 * same order and with the same arithmetic: rms_norm_f32 (optionally after the
 * residual add), the Q4_1, Q8_0 or float32 panel matmul for the fused QKV projection,
 * rope_kv_write_f32, paged_attention_f32 and prefill_attention_f32 (chunks longer
 * than the paged kernel takes; their _kvbf16 / _kvf16 forms over a 16-bit cache),
 * the output projection, the second
 * norm, the fused gate/up projection, silu_mul_f32 and the down projection.
 * A model with the stack runs rms_norm_f32 and silu_mul_f32 on its per-layer
 * path too, so the two give bit-identical hidden states
 * (tests/test_decoder_stack.py).
 *
 * rms_norm_f32: y = x * (1 / sqrt(mean(x^2) + eps)) * w per row, the sum of
 * squares in eight float lanes added pairwise at the end; with a residual,
 * x = x + residual is stored to the residual first (the fused add of
 * tokenmill.model.layers.RMSNorm). silu_mul_f32: y = g / (1 + exp(-g)) * u on
 * [gate | up] rows; with AVX2 eight at a time, exp within 2 ulp of expf (vec_math.h),
 * every element (a row's tail too, through masks) through the same vector exp.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "decoder_stack.h"
#include "kv_cache_types.h"
#include "panel_matmul_amx_exact.h"
#include "vec_math.h"

#pragma GCC optimize("fp-contract=off")

int q4_matmul_f32(const float *x, int64_t x_stride, const uint8_t *packed, const uint16_t *d,
                  const uint16_t *mins, const float *bias, float *out, int64_t out_stride, int M,
                  int N, int K);
int f32_matmul_packed(const float *x, int64_t x_stride, const float *packed, const float *bias,
                      float *y, int64_t y_stride, int M, int N, int K);
int int8_matmul_f32(const float *x, int64_t x_stride, const int8_t *codes, const float *scales,
                    const float *bias, float *out, int64_t out_stride, int M, int N, int K);
int q4_matmul_panels_f32(const float *x, int64_t x_stride, const uint8_t *packed,
                         const float *bias, float *out, int64_t out_stride, int M, int N, int K,
                         int path);
int q4_matmul_panels_amx(const float *x, int64_t x_stride, const uint8_t *packed,
                         const float *bias, float *out, int64_t out_stride, int M, int N, int K);
int int8_matmul_panels_amx(const float *x, int64_t x_stride, const uint8_t *packed,
                           const float *bias, float *out, int64_t out_stride, int M, int N,
                           int K);
int int8_matmul_panels_f32(const float *x, int64_t x_stride, const uint8_t *packed,
                           const float *bias, float *out, int64_t out_stride, int M, int N,
                           int K, int path);
void rope_kv_write_f32(const float *qkv, int64_t qkv_stride, int T, int H, int KVH, int D,
                       const float *cos, const float *sin_f, float *q_out, float *k_cache,
                       float *v_cache, const int64_t *slots);
void rope_kv_write_f32_kvbf16(const float *qkv, int64_t qkv_stride, int T, int H, int KVH,
                              int D, const float *cos, const float *sin_f, float *q_out,
                              uint16_t *k_cache, uint16_t *v_cache, const int64_t *slots);
void rope_kv_write_f32_kvf16(const float *qkv, int64_t qkv_stride, int T, int H, int KVH,
                             int D, const float *cos, const float *sin_f, float *q_out,
                             uint16_t *k_cache, uint16_t *v_cache, const int64_t *slots);
/* The three paged-attention entry points share this signature but for the cache's type. */
#define TM_DECLARE_PAGED_ATTENTION(NAME, KT)                                                   \
void NAME(const float *q, int64_t q_stride, float *out, int64_t out_stride, const KT *k_cache, \
          const KT *v_cache, const int32_t *query_start, const int32_t *seq_lens,             \
          const int32_t *block_tables, int num_seqs, int max_blocks, int num_heads,            \
          int num_kv_heads, int head_dim, int block_size, float scale, int max_q_len,          \
          int window);
TM_DECLARE_PAGED_ATTENTION(paged_attention_f32, float)
TM_DECLARE_PAGED_ATTENTION(paged_attention_f32_kvbf16, uint16_t)
TM_DECLARE_PAGED_ATTENTION(paged_attention_f32_kvf16, uint16_t)
int prefill_attention_f32(const float *q, int64_t q_stride, float *out, int64_t out_stride,
                          const void *k_cache, const void *v_cache,
                          const int32_t *query_start, const int32_t *seq_lens,
                          const int32_t *block_tables, int num_seqs, int max_blocks,
                          int num_heads, int num_kv_heads, int head_dim, int block_size,
                          float scale, int min_q_len, int window, int kv_kind);

/* Rotary and the K/V store of one layer, into a cache of the stack's type. */
static void rope_kv_write(const tm_dims *dims, const tm_step *step, const float *qkv,
                          int64_t qkv_n, float *q, void *k_cache, void *v_cache) {
    const int T = step->tokens, H = dims->heads, KVH = dims->kv_heads, D = dims->head_dim;
    if (dims->kv_kind == TM_KV_BF16)
        rope_kv_write_f32_kvbf16(qkv, qkv_n, T, H, KVH, D, step->cos, step->sin_folded, q,
                                 k_cache, v_cache, step->slot_mapping);
    else if (dims->kv_kind == TM_KV_F16)
        rope_kv_write_f32_kvf16(qkv, qkv_n, T, H, KVH, D, step->cos, step->sin_folded, q,
                                k_cache, v_cache, step->slot_mapping);
    else
        rope_kv_write_f32(qkv, qkv_n, T, H, KVH, D, step->cos, step->sin_folded, q, k_cache,
                          v_cache, step->slot_mapping);
}

/* The paged kernel for the stack's cache type. */
static void paged_attention(const tm_dims *dims, const tm_step *step, const tm_layer *L,
                            const float *q, float *attn, int64_t q_size) {
#define TM_PAGED_ARGS                                                                          \
    q, q_size, attn, q_size, L->k_cache, L->v_cache, step->query_start, step->seq_lens,        \
        step->block_tables, step->num_seqs, step->max_blocks, dims->heads, dims->kv_heads,     \
        dims->head_dim, dims->block_size, dims->scale, step->max_q_len, L->window
    if (dims->kv_kind == TM_KV_BF16)
        paged_attention_f32_kvbf16(TM_PAGED_ARGS);
    else if (dims->kv_kind == TM_KV_F16)
        paged_attention_f32_kvf16(TM_PAGED_ARGS);
    else
        paged_attention_f32(TM_PAGED_ARGS);
#undef TM_PAGED_ARGS
}

static void norm_row(const float *x, const float *w, float *y, int N, float eps) {
    float lanes[8] = {0};
    int i = 0;
    for (; i + 8 <= N; i += 8)
        for (int j = 0; j < 8; j++) lanes[j] += x[i + j] * x[i + j];
    for (int j = 0; i < N; i++, j++) lanes[j] += x[i] * x[i];
    const float sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                      + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    const float inv = 1.0f / sqrtf(sum / (float)N + eps);
    for (int k = 0; k < N; k++) y[k] = x[k] * inv * w[k];
}

/* x, y [T, N] (row strides x_stride, N). With res_in (contiguous [T, N], else NULL):
   res_out = x + res_in (res_out may be res_in) is what gets normalised. */
void rms_norm_f32(const float *x, int64_t x_stride, const float *res_in, float *res_out,
                  const float *w, float *y, int T, int N, float eps) {
    #pragma omp parallel for schedule(static) if (T >= 64)
    for (int t = 0; t < T; t++) {
        const float *src = x + (int64_t)t * x_stride;
        float *dst = y + (int64_t)t * N;
        if (res_in) {
            const float *r = res_in + (int64_t)t * N;
            float *sum = res_out + (int64_t)t * N;
            for (int k = 0; k < N; k++) sum[k] = src[k] + r[k];
            src = sum;
        }
        norm_row(src, w, dst, N, eps);
    }
}

/* gate_up [T, 2 I] (row stride gu_stride) -> y [T, I]. */
void silu_mul_f32(const float *gate_up, int64_t gu_stride, float *y, int T, int I) {
    #pragma omp parallel for schedule(static) if ((int64_t)T * I >= 65536)
    for (int t = 0; t < T; t++) {
        const float *g = gate_up + (int64_t)t * gu_stride, *u = g + I;
        float *dst = y + (int64_t)t * I;
#if defined(__AVX2__) && defined(__FMA__)
        const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
        for (int i = 0; i < I; i += 8) {
            const __m256i mask = tm_first_lanes(I - i); /* the row's tail: nothing past I */
            const __m256 gv = _mm256_maskload_ps(g + i, mask), uv = _mm256_maskload_ps(u + i, mask);
            const __m256 e = tm_exp_ps(_mm256_sub_ps(zero, gv));
            _mm256_maskstore_ps(dst + i, mask,
                                _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), uv));
        }
#else
        for (int i = 0; i < I; i++) dst[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
#endif
    }
}

static int linear(const tm_qlinear *l, const float *x, float *out, int M) {
    if (l->kind == 3)
        return f32_matmul_packed(x, l->k, (const float *)l->w0, l->bias, out, l->n, M, l->n,
                                 l->k);
    if (l->kind == 5 || l->kind == 6) {
        /* the same choice as Int4Linear / Int8Linear.forward: AMX tiles from amx_min_rows
           rows on */
        if (l->amx_min_rows > 0 && M >= l->amx_min_rows) {
            const int status = (l->kind == 5 ? q4_matmul_panels_amx : int8_matmul_panels_amx)(
                x, l->k, (const uint8_t *)l->w0, l->bias, out, l->n, M, l->n, l->k);
            if (status != -2) return status;
        }
        return (l->kind == 5 ? q4_matmul_panels_f32 : int8_matmul_panels_f32)(
            x, l->k, (const uint8_t *)l->w0, l->bias, out, l->n, M, l->n, l->k,
            TM_PANELS_AUTO);
    }
    if (l->kind == 0)
        return q4_matmul_f32(x, l->k, (const uint8_t *)l->w0, l->w1, l->w2, l->bias, out, l->n,
                             M, l->n, l->k);
    return int8_matmul_f32(x, l->k, (const int8_t *)l->w0, (const float *)l->w1, l->bias, out,
                           l->n, M, l->n, l->k);
}

/*
 * hidden [T, hidden] in: the embeddings; out: the last layer's MLP output, with
 * residual (written, not read) holding the stream before it (the pair
 * DecoderLayer.forward returns). Returns 0, or -1 when out of memory.
 */
int decoder_stack_f32(const tm_dims *dims, const tm_layer *layers, int num_layers,
                      const tm_step *step, float *hidden, float *residual) {
    const int T = step->tokens, Hd = dims->hidden, D = dims->head_dim;
    const int q_size = dims->heads * D, qkv_n = (dims->heads + 2 * dims->kv_heads) * D;
    const int inter = dims->inter;
    const size_t floats = (size_t)T * ((size_t)Hd + qkv_n + 2 * (size_t)q_size + 3 * (size_t)inter);
    float *scratch = malloc(sizeof(float) * (floats ? floats : 1));
    if (!scratch) return -1;
    float *normed = scratch, *qkv = normed + (size_t)T * Hd, *q = qkv + (size_t)T * qkv_n;
    float *attn = q + (size_t)T * q_size, *gate_up = attn + (size_t)T * q_size;
    float *act = gate_up + (size_t)T * 2 * inter;
    /* a chunk longer than the paged kernel takes: once per step, not per layer */
    int long_chunk = 0;
    for (int b = 0; b < step->num_seqs; b++)
        long_chunk |= step->query_start[b + 1] - step->query_start[b] > step->max_q_len;
    int status = 0;
    for (int i = 0; i < num_layers && status == 0; i++) {
        const tm_layer *L = &layers[i];
        if (i == 0) {
            memcpy(residual, hidden, sizeof(float) * (size_t)T * Hd);
            rms_norm_f32(hidden, Hd, NULL, NULL, L->attn_norm, normed, T, Hd, dims->eps);
        } else {
            rms_norm_f32(hidden, Hd, residual, residual, L->attn_norm, normed, T, Hd, dims->eps);
        }
        status |= linear(&L->qkv, normed, qkv, T);
        rope_kv_write(dims, step, qkv, qkv_n, q, L->k_cache, L->v_cache);
        memset(attn, 0, sizeof(float) * (size_t)T * q_size);
        paged_attention(dims, step, L, q, attn, q_size);
        /* sequences with longer chunks (the caller checked the kernel takes them) */
        if (long_chunk && !prefill_attention_f32(q, q_size, attn, q_size, L->k_cache, L->v_cache,
                                   step->query_start, step->seq_lens, step->block_tables,
                                   step->num_seqs, step->max_blocks, dims->heads,
                                   dims->kv_heads, D, dims->block_size, dims->scale,
                                   step->max_q_len, L->window, dims->kv_kind))
            status = -1;
        status |= linear(&L->o, attn, hidden, T);
        rms_norm_f32(hidden, Hd, residual, residual, L->mlp_norm, normed, T, Hd, dims->eps);
        status |= linear(&L->gate_up, normed, gate_up, T);
        silu_mul_f32(gate_up, 2 * inter, act, T, inter);
        status |= linear(&L->down, act, hidden, T);
    }
    free(scratch);
    return status ? -1 : 0;
}
