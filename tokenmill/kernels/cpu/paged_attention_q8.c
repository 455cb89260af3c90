/*
 * Paged attention over a quantized KV cache (--kv-cache-dtype int8|fp8), float32 or
 * bfloat16 queries (computed in float32), for short queries (decodes, speculative verification, short chunks).
 *
 * Cache row layout (one token, one KV head): head_dim one-byte codes, then the
 * 4 bytes of a float32 scale; x = decode(code) * scale, where decode is the
 * int8 value (kind 0) or the float8 e4m3fn value (kind 1). The codes are read
 * in place from the paged cache and widened to float in registers: the scale
 * multiplies the finished dot product (K) or the softmax weight (V), so no
 * dequantized row is ever written to memory.
 *
 * Layouts: q, out [T, H, D] float32 or bf16 (token stride given, heads contiguous);
 * k/v_cache bytes [num_blocks, block_size, KVH, D + 4]; query_start [B + 1];
 * seq_lens [B]; block_tables [B, max_blocks]. Same masking rules (causal,
 * bottom-right aligned, optional sliding window) as paged_attention.c.
 * Sequences with more than max_q_len query tokens are skipped.
 *
 * Work is split and prefetched as in paged_attention.c (paged_attention_items.h).
 * Per query and head: all scores first into a per-thread buffer (two-pass
 * softmax), then the weighted sum of V rows. The AVX2 path widens 8 codes at a
 * time (int8: sign-extend + convert; fp8: rebuilt as fp16 bits and converted with
 * F16C, or a gather from a 256-entry table without F16C);
 * the portable path does the same one code at a time.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "kv_cache_types.h"
#include "paged_attention_items.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TM_Q8_AVX2 1
#endif

static float fp8_table[256];
static volatile int fp8_table_ready = 0;

static void fp8_table_init(void) {
    if (fp8_table_ready) return;
    for (unsigned b = 0; b < 256; b++) fp8_table[b] = tm_fp8_e4m3_to_f32((uint8_t)b);
    __sync_synchronize();
    fp8_table_ready = 1;
}

static inline float code_value(const uint8_t *c, int d, int kind) {
    return kind == 0 ? (float)(int8_t)c[d] : fp8_table[c[d]];
}

static inline float row_scale(const uint8_t *row, int D) {
    float s;
    memcpy(&s, row + D, sizeof s);
    return s;
}

#ifdef TM_Q8_AVX2
static inline __m256 widen8(const uint8_t *c, int kind) {
    const __m128i raw = _mm_loadl_epi64((const __m128i *)c);
    if (kind == 0) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
#ifdef __F16C__
    /* e4m3 -> fp16 bits (sign to bit 15, exponent and mantissa shifted up by 7), then the
       hardware half -> float conversion (exact, subnormals included); fp16's exponent
       bias exceeds e4m3's by 8, hence the factor 2^8. */
    const __m128i u = _mm_cvtepu8_epi16(raw);
    const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(u, _mm_set1_epi16(0x7F)), 7),
                                   _mm_slli_epi16(_mm_and_si128(u, _mm_set1_epi16(0x80)), 8));
    return _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0f));
#else
    return _mm256_i32gather_ps(fp8_table, _mm256_cvtepu8_epi32(raw), 4);
#endif
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#ifdef TM_Q8_AVX2
/* Eight keys at once (rows c, c + row, ..., D % 8 == 0): lane j = sum_d q[d] * decode(c_j[d]). */
static inline __m256 dot8_codes(const float *q, const uint8_t *c, int64_t row, int D, int kind) {
    __m256 a[8];
    for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
    for (int d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(qv, widen8(c + j * row + d, kind), a[j]);
    }
    const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
    const __m256 lo = _mm256_permute2f128_ps(h0123, h4567, 0x20);
    const __m256 hi = _mm256_permute2f128_ps(h0123, h4567, 0x31);
    return _mm256_add_ps(lo, hi);
}
#endif

/* sum_d q[d] * decode(c[d]) (the row's scale is applied by the caller) */
static inline float dot_codes(const float *q, const uint8_t *c, int D, int kind) {
#ifdef TM_Q8_AVX2
    if (D % 8 == 0) {
        __m256 a = _mm256_setzero_ps();
        for (int d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), widen8(c + d, kind), a);
        return hsum8(a);
    }
#endif
    float dot = 0.0f;
    for (int d = 0; d < D; d++) dot += q[d] * code_value(c, d, kind);
    return dot;
}

/* acc[d] += w * decode(c[d]) */
static inline void axpy_codes(float *acc, float w, const uint8_t *c, int D, int kind) {
#ifdef TM_Q8_AVX2
    if (D % 8 == 0) {
        const __m256 wv = _mm256_set1_ps(w);
        for (int d = 0; d < D; d += 8)
            _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(wv, widen8(c + d, kind), _mm256_loadu_ps(acc + d)));
        return;
    }
#endif
    for (int d = 0; d < D; d++) acc[d] += w * code_value(c, d, kind);
}

static inline float load_q(const void *base, int64_t i, int bf16) {
    return bf16 ? tm_bf16_to_f32(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

static inline void store_out(void *base, int64_t i, float x, int bf16) {
    if (bf16)
        ((uint16_t *)base)[i] = tm_f32_to_bf16(x);
    else
        ((float *)base)[i] = x;
}

/* q/out are float32 (io_bf16 = 0) or bfloat16 (io_bf16 = 1); strides in elements. */
void paged_attention_q8(const void *q, int64_t q_stride, void *out, int64_t out_stride,
                        const uint8_t *k_cache, const uint8_t *v_cache,
                        const int32_t *query_start, const int32_t *seq_lens,
                        const int32_t *block_tables, int num_seqs, int max_blocks,
                        int num_heads, int num_kv_heads, int D, int block_size, float scale,
                        int max_q_len, int window, int kind, int io_bf16) {
    if (kind == 1) fp8_table_init();
    const int group = num_heads / num_kv_heads;
    const int64_t width = (int64_t)D + 4;                 /* bytes per (token, head) row */
    const int64_t row = (int64_t)num_kv_heads * width;    /* bytes per token */
    int max_len = 0;
    for (int b = 0; b < num_seqs; b++) max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    #pragma omp parallel
    {
        float *sc = malloc(sizeof(float) * ((size_t)max_len + 8));
        float *qs = malloc(sizeof(float) * (size_t)D);
        float *acc = malloc(sizeof(float) * (size_t)D);
        int it0, it1;
        tm_thread_items(query_start, seq_lens, num_seqs, num_kv_heads, max_q_len, &it0, &it1);
        for (int it = it0; it < it1; it++) {
            tm_prefetch_ahead(it, it0, it1, k_cache, v_cache, query_start, seq_lens,
                              block_tables, max_blocks, num_kv_heads, block_size, max_q_len,
                              window, width);
            {
                const int b = it / num_kv_heads, hk = it % num_kv_heads;
                const int q0 = query_start[b], qlen = query_start[b + 1] - q0;
                if (qlen <= 0 || qlen > max_q_len || !sc || !qs || !acc) continue;
                const int len = seq_lens[b];
                const int32_t *table = block_tables + (int64_t)b * max_blocks;
                for (int i = 0; i < qlen; i++) {
                    const int visible = len - qlen + i + 1;
                    const int lo = tm_window_start(visible, window);
                    const int first = lo - lo % block_size;
                    for (int g = 0; g < group; g++) {
                        const int head = hk * group + g;
                        const int64_t qoff = (int64_t)(q0 + i) * q_stride + (int64_t)head * D;
                        for (int d = 0; d < D; d++) qs[d] = load_q(q, qoff + d, io_bf16) * scale;
                        float mx = -INFINITY;
                        for (int start = first; start < visible; start += block_size) {
                            const uint8_t *kb = k_cache
                                + (int64_t)table[start / block_size] * block_size * row
                                + (int64_t)hk * width;
                            const int n = visible - start < block_size ? visible - start : block_size;
                            int j = start < lo ? lo - start : 0;
#ifdef TM_Q8_AVX2
                            if (D % 8 == 0) {
                                for (; j + 8 <= n; j += 8) {
                                    float d8[8];
                                    _mm256_storeu_ps(d8, dot8_codes(qs, kb + j * row, row, D, kind));
                                    for (int t = 0; t < 8; t++) {
                                        const float s = d8[t] * row_scale(kb + (j + t) * row, D);
                                        sc[start + j + t] = s;
                                        mx = s > mx ? s : mx;
                                    }
                                }
                            }
#endif
                            for (; j < n; j++) {
                                const uint8_t *kr = kb + j * row;
                                const float s = dot_codes(qs, kr, D, kind) * row_scale(kr, D);
                                sc[start + j] = s;
                                mx = s > mx ? s : mx;
                            }
                        }
                        float sum = 0.0f;
                        for (int t = lo; t < visible; t++) {
                            sc[t] = expf(sc[t] - mx);
                            sum += sc[t];
                        }
                        for (int d = 0; d < D; d++) acc[d] = 0.0f;
#ifdef TM_Q8_AVX2
                        if (D % 8 == 0) {
                            /* weighted sum of V with the accumulator in registers, 64 dims a pass */
                            for (int d0 = 0; d0 < D; d0 += 64) {
                                const int w8 = (D - d0 < 64 ? D - d0 : 64) / 8;
                                __m256 a[8];
                                for (int c = 0; c < 8; c++) a[c] = _mm256_setzero_ps();
                                for (int start = first; start < visible; start += block_size) {
                                    const uint8_t *vb = v_cache
                                        + (int64_t)table[start / block_size] * block_size * row
                                        + (int64_t)hk * width;
                                    const int n = visible - start < block_size ? visible - start
                                                                               : block_size;
                                    for (int j = start < lo ? lo - start : 0; j < n; j++) {
                                        const uint8_t *vr = vb + j * row;
                                        const __m256 p = _mm256_set1_ps(sc[start + j] * row_scale(vr, D));
                                        for (int c = 0; c < w8; c++)
                                            a[c] = _mm256_fmadd_ps(p, widen8(vr + d0 + 8 * c, kind), a[c]);
                                    }
                                }
                                for (int c = 0; c < w8; c++) _mm256_storeu_ps(acc + d0 + 8 * c, a[c]);
                            }
                            const int64_t ooff = (int64_t)(q0 + i) * out_stride + (int64_t)head * D;
                            const float inv = 1.0f / sum;
                            for (int d = 0; d < D; d++) store_out(out, ooff + d, acc[d] * inv, io_bf16);
                            continue;
                        }
#endif
                        for (int start = first; start < visible; start += block_size) {
                            const uint8_t *vb = v_cache
                                + (int64_t)table[start / block_size] * block_size * row
                                + (int64_t)hk * width;
                            const int n = visible - start < block_size ? visible - start : block_size;
                            for (int j = start < lo ? lo - start : 0; j < n; j++) {
                                const uint8_t *vr = vb + j * row;
                                axpy_codes(acc, sc[start + j] * row_scale(vr, D), vr, D, kind);
                            }
                        }
                        const int64_t ooff = (int64_t)(q0 + i) * out_stride + (int64_t)head * D;
                        const float inv = 1.0f / sum;
                        for (int d = 0; d < D; d++) store_out(out, ooff + d, acc[d] * inv, io_bf16);
                    }
                }
            }
        }
        free(sc);
        free(qs);
        free(acc);
    }
}
