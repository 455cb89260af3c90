/*
 * y = x @ W.T (+ bias) with W in 4-bit groups of 32 (llama.cpp's Q4_1:
 * w = d * q + m, q in 0..15) and x rounded to 8 bits per group of 32
 * (x ~= dx * qx, qx in -127..127), the way llama.cpp multiplies its Q4 files.
 *
 * Per group the dot product splits into an integer part and a correction:
 *   sum_j w_j x_j ~= d * dx * sum_j q_j qx_j  +  m * dx * sum_j qx_j
 * The integer sums are exact; on AVX2 two groups of 32 cost a handful of
 * instructions (unpack nibbles, u8 x s8 multiply-adds - vpdpbusd with VNNI -
 * one convert, one float FMA; see below), which is why this beats dequantizing to
 * float: single-stream decode reads 0.625 bytes per weight and does little work per byte.
 *
 * Weight layout per row: K / 2 bytes, group g at bytes 16 g .. 16 g + 15,
 * byte j holding element j in its low nibble and element j + 16 in its high
 * nibble (Q4_1's own order); d and m: IEEE half [N, K / 32] (as in Q4_1 files: 0.625
 * bytes per weight in all).
 * x [M, K] float (row stride x_stride); out [M, N] (row stride out_stride).
 * Input rows are quantized once per call; weight rows are split over
 * PyTorch's OpenMP threads (see paged_attention.c), in tiles of four weight rows
 * and one input row (decode) or two weight rows and four input rows.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fp16.h"
#include "q8_input.h"
#include "vec_math.h"

#define MT 4  /* input rows per pass over a weight row */
#define MB 64 /* input rows per panel */

/* One group: codes = round(x / dx) with dx = max|x| / 127; returns dx, sets *sum. */
static inline float tm_quantize_group(const float *src, int8_t codes[32], int *sum) {
#ifdef TM_AVX2
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 v[4];
    for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(src + 8 * i);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], absmask), _mm256_and_ps(v[1], absmask)),
                             _mm256_max_ps(_mm256_and_ps(v[2], absmask), _mm256_and_ps(v[3], absmask)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    const float scale = _mm_cvtss_f32(h) / 127.0f;
    const __m256 inv = _mm256_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
    __m256i q[4];
    for (int i = 0; i < 4; i++) /* the same rounding as nearbyintf */
        q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
    *sum = _mm_cvtsi128_si32(t);
    /* |codes| <= 127, so the saturating packs are exact; they interleave 4-code runs,
       which the permute puts back in order. */
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]),
                                              _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256((__m256i *)codes,
                        _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    return scale;
#else
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(src[j]));
    const float scale = amax / 127.0f;
    const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
    int total = 0;
    for (int j = 0; j < 32; j++) {
        const int v = (int)nearbyintf(src[j] * inv);
        codes[j] = (int8_t)v;
        total += v;
    }
    *sum = total;
    return scale;
#endif
}

/* qx = round(x / dx) with dx = max|x| / 127 per group; sx = dx * sum(qx). */
static void tm_quantize_rows_q8(const float *x, int64_t x_stride, int M, int K, int8_t *qx,
                                float *dx, float *sx, int pair_order) {
    const int groups = K / 32;
    for (int m = 0; m < M; m++) {
        for (int g = 0; g < groups; g++) {
            int8_t codes[32];
            int sum;
            const float scale = tm_quantize_group(x + (int64_t)m * x_stride + g * 32, codes, &sum);
            int8_t *row = qx + (int64_t)m * K;
            if (pair_order && g / 2 * 2 + 1 < groups) { /* a group with a partner */
                int8_t *pair = row + (g / 2) * 64 + (g % 2) * 16;
                memcpy(pair, codes, 16);
                memcpy(pair + 32, codes + 16, 16);
            } else {
                memcpy(row + g * 32, codes, 32);
            }
            dx[(int64_t)m * groups + g] = scale;
            sx[(int64_t)m * groups + g] = scale * (float)sum;
        }
    }
}

void tm_q8_input_free(tm_q8_input *in) {
    free(in->qx);
    free(in->dx);
    free(in->sx);
}

int tm_q8_input_make(tm_q8_input *in, const float *x, int64_t x_stride, int M, int K,
                     int pair_order) {
    const size_t groups = (size_t)M * (K / 32);
    in->qx = malloc((size_t)M * K);
    in->dx = malloc(sizeof(float) * groups);
    in->sx = malloc(sizeof(float) * groups);
    if (!in->qx || !in->dx || !in->sx) {
        tm_q8_input_free(in);
        return -1;
    }
    tm_quantize_rows_q8(x, x_stride, M, K, in->qx, in->dx, in->sx, pair_order);
    return 0;
}

#ifdef TM_AVX2
/*
 * The AVX2 path takes the groups two at a time: one 32-byte load holds a pair's nibbles,
 * its low nibbles are elements 0..15 of both groups and its high nibbles elements
 * 16..31, which is why the input is quantized in pair order. A pair's integer sums land
 * in lanes 0-3 (group A) and 4-7 (group B) of one vector, so one convert and one FMA
 * serve two groups; the scales d * dx come eight groups at a time from one vector
 * multiply, a permute handing each pair its two, and the minimum's terms m * sx join the
 * accumulator eight at a time too. The three tiles below add each output's terms in the
 * same order, so a row's result does not depend on the batch.
 */

/* Lanes 0-3 take lane a of a block's scales, lanes 4-7 lane b: pair j is (2 j, 2 j + 1),
   a lone last group j (2 j, 2 j). */
static const int32_t tm_pair_lanes[8][8] = {
    {0, 0, 0, 0, 1, 1, 1, 1}, {2, 2, 2, 2, 3, 3, 3, 3}, {4, 4, 4, 4, 5, 5, 5, 5},
    {6, 6, 6, 6, 7, 7, 7, 7}, {0, 0, 0, 0, 0, 0, 0, 0}, {2, 2, 2, 2, 2, 2, 2, 2},
    {4, 4, 4, 4, 4, 4, 4, 4}, {6, 6, 6, 6, 6, 6, 6, 6}};

static inline __m256 tm_pair_scale(__m256 block, int j, int lone) {
    return _mm256_permutevar8x32_ps(
        block, _mm256_loadu_si256((const __m256i *)tm_pair_lanes[j + 4 * lone]));
}

/* Lanes 0 .. n - 1 of eight floats at p, the rest 0 (nothing read past n). */
static inline __m256 tm_load_first(const float *p, int n) {
    if (n == 8) return _mm256_loadu_ps(p);
    return _mm256_maskload_ps(p, tm_first_lanes(n));
}

/* The exact integer sums of lo * xlo + hi * xhi, per lane. Each u8 x s8 pair is at most
   2 * 15 * 127, so the two 16-bit pair sums add without overflow before the widening. */
static inline __m256i tm_dot2(__m256i lo, __m256i xlo, __m256i hi, __m256i xhi) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, xlo), hi, xhi);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, xlo),
                                   hi, xhi);
#else
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo),
                                              _mm256_maddubs_epi16(hi, xhi)),
                             _mm256_set1_epi16(1));
#endif
}

/* Lanes 0 .. n - 1 of eight halves at p as floats, the rest 0 (nothing read past n). */
static inline __m256 tm_load_first_f16(const uint16_t *p, int n) {
    if (n == 8) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    __m128i v = _mm_setzero_si128();
    switch (n) { /* constant lanes for the insert; falls through */
    case 7: v = _mm_insert_epi16(v, p[6], 6); /* fall through */
    case 6: v = _mm_insert_epi16(v, p[5], 5); /* fall through */
    case 5: v = _mm_insert_epi16(v, p[4], 4); /* fall through */
    case 4: v = _mm_insert_epi16(v, p[3], 3); /* fall through */
    case 3: v = _mm_insert_epi16(v, p[2], 2); /* fall through */
    case 2: v = _mm_insert_epi16(v, p[1], 1); /* fall through */
    case 1: v = _mm_insert_epi16(v, p[0], 0); /* fall through */
    default: break;
    }
    return _mm256_cvtph_ps(v);
}

/* Per block of eight groups (n of them valid) and (weight row, input row): the scales
   d * dx, returned, and the minimum's terms m * sx, added to acc. */
static inline __m256 tm_block_start(const uint16_t *d, const uint16_t *mn, const float *dx,
                                    const float *sx, int g0, int n, __m256 *acc) {
    *acc = _mm256_fmadd_ps(tm_load_first_f16(mn + g0, n), tm_load_first(sx + g0, n), *acc);
    return _mm256_mul_ps(tm_load_first_f16(d + g0, n), tm_load_first(dx + g0, n));
}

/* acc + the integer sums of a pair (or a lone group) times their scales. */
static inline __m256 tm_add_sums(__m256 acc, __m256i sums, __m256 scale) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc);
}

/* A pair's 32 code bytes as low-nibble and high-nibble vectors. */
static inline void tm_unpack_pair(const uint8_t *w, __m256i *lo, __m256i *hi) {
    const __m256i raw = _mm256_loadu_si256((const __m256i *)w), low4 = _mm256_set1_epi8(0x0F);
    *lo = _mm256_and_si256(raw, low4);
    *hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
}

/* A lone group's 16 code bytes as elements 0..15, 16..31 of one vector. */
static inline __m256i tm_unpack_lone(const uint8_t *w) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)w), low4 = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low4), _mm_and_si128(raw, low4));
}

#define TM_X(R, G) (x + (int64_t)(R) * K + (int64_t)(G) * 32)
#define TM_LOAD(P) _mm256_loadu_si256((const __m256i *)(P))

/*
 * The three tiles below are one computation at three shapes: for every (weight row,
 * input row) they add, block by block, the minimum's terms, then each pair, then a lone
 * last group, with the same operations. Weight row i is at w + i * K / 2 (scales
 * d + i * groups, mins mn + i * groups); input row r at x + r * K in pair order (dx,
 * sx + r * groups).
 */

/* One weight row against one input row (a partial quad of weight rows). */
static float tile_1x1(const uint8_t *w, const uint16_t *d, const uint16_t *mn, const int8_t *x,
                      const float *dx, const float *sx, int K) {
    const int groups = K / 32;
    __m256 a = _mm256_setzero_ps();
    for (int g0 = 0; g0 < groups; g0 += 8) {
        const int n = groups - g0 < 8 ? groups - g0 : 8, pairs = n / 2;
        const __m256 s = tm_block_start(d, mn, dx, sx, g0, n, &a);
        for (int j = 0; j < pairs; j++) {
            const int g = g0 + 2 * j;
            __m256i lo, hi;
            tm_unpack_pair(w + g * 16, &lo, &hi);
            a = tm_add_sums(a, tm_dot2(lo, TM_LOAD(TM_X(0, g)), hi, TM_LOAD(TM_X(0, g) + 32)),
                            tm_pair_scale(s, j, 0));
        }
        if (n % 2) {
            const int g = g0 + n - 1;
            a = tm_add_sums(a, tm_dot_u8s8(tm_unpack_lone(w + g * 16), TM_LOAD(TM_X(0, g))),
                            tm_pair_scale(s, pairs, 1));
        }
    }
    return tm_hsum256(a);
}

/* Four weight rows against one input row (decode): each input load serves four rows. */
static void tile_4x1(const uint8_t *w, const uint16_t *d, const uint16_t *mn, const int8_t *x,
                     const float *dx, const float *sx, int K, float res[4]) {
    const int groups = K / 32;
    const int64_t wrow = K / 2;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int g0 = 0; g0 < groups; g0 += 8) {
        const int n = groups - g0 < 8 ? groups - g0 : 8, pairs = n / 2;
        const __m256 s0 = tm_block_start(d, mn, dx, sx, g0, n, &a0);
        const __m256 s1 = tm_block_start(d + groups, mn + groups, dx, sx, g0, n, &a1);
        const __m256 s2 = tm_block_start(d + 2 * groups, mn + 2 * groups, dx, sx, g0, n, &a2);
        const __m256 s3 = tm_block_start(d + 3 * groups, mn + 3 * groups, dx, sx, g0, n, &a3);
        for (int j = 0; j < pairs; j++) {
            const int g = g0 + 2 * j;
            const __m256i xlo = TM_LOAD(TM_X(0, g)), xhi = TM_LOAD(TM_X(0, g) + 32);
            /* the rows two quads ahead (as int8_matmul.c's tile_4x1_q8): 1.4-1.5x on a
               decode step's 30 layers at one row */
            for (int r = 8; r < 12; r++)
                _mm_prefetch((const char *)(w + r * wrow + g * 16), _MM_HINT_T0);
#define TM_ROW(I, A, S)                                                                        \
            {                                                                                  \
                __m256i lo, hi;                                                                \
                tm_unpack_pair(w + (I) * wrow + g * 16, &lo, &hi);                             \
                A = tm_add_sums(A, tm_dot2(lo, xlo, hi, xhi), tm_pair_scale(S, j, 0));         \
            }
            TM_ROW(0, a0, s0)
            TM_ROW(1, a1, s1)
            TM_ROW(2, a2, s2)
            TM_ROW(3, a3, s3)
#undef TM_ROW
        }
        if (n % 2) {
            const int g = g0 + n - 1;
            const __m256i xv = TM_LOAD(TM_X(0, g));
#define TM_ROW(I, A, S)                                                                        \
            A = tm_add_sums(A, tm_dot_u8s8(tm_unpack_lone(w + (I) * wrow + g * 16), xv),       \
                            tm_pair_scale(S, pairs, 1));
            TM_ROW(0, a0, s0)
            TM_ROW(1, a1, s1)
            TM_ROW(2, a2, s2)
            TM_ROW(3, a3, s3)
#undef TM_ROW
        }
    }
    res[0] = tm_hsum256(a0);
    res[1] = tm_hsum256(a1);
    res[2] = tm_hsum256(a2);
    res[3] = tm_hsum256(a3);
}

/* Two weight rows against four input rows (batched steps): res[i * 4 + r]. */
static void tile_2x4(const uint8_t *w, const uint16_t *d, const uint16_t *mn, const int8_t *x,
                     const float *dx, const float *sx, int K, float res[8]) {
    const int groups = K / 32;
    const int64_t wrow = K / 2;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
    __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    for (int g0 = 0; g0 < groups; g0 += 8) {
        const int n = groups - g0 < 8 ? groups - g0 : 8, pairs = n / 2;
        __m256 s0[MT], s1[MT];
#define TM_START(R, A0, A1)                                                                    \
        s0[R] = tm_block_start(d, mn, dx + (R) * groups, sx + (R) * groups, g0, n, &A0);     \
        s1[R] = tm_block_start(d + groups, mn + groups, dx + (R) * groups, sx + (R) * groups, \
                               g0, n, &A1);
        TM_START(0, a00, a10)
        TM_START(1, a01, a11)
        TM_START(2, a02, a12)
        TM_START(3, a03, a13)
#undef TM_START
        for (int j = 0; j < pairs; j++) {
            const int g = g0 + 2 * j;
            __m256i lo0, hi0, lo1, hi1;
            /* this tile's rows two quads ahead, for steps of few rows */
            _mm_prefetch((const char *)(w + 8 * wrow + g * 16), _MM_HINT_T0);
            _mm_prefetch((const char *)(w + 9 * wrow + g * 16), _MM_HINT_T0);
            tm_unpack_pair(w + g * 16, &lo0, &hi0);
            tm_unpack_pair(w + wrow + g * 16, &lo1, &hi1);
#define TM_STEP(R, A0, A1)                                                                     \
            {                                                                                  \
                const __m256i xlo = TM_LOAD(TM_X(R, g)), xhi = TM_LOAD(TM_X(R, g) + 32);       \
                A0 = tm_add_sums(A0, tm_dot2(lo0, xlo, hi0, xhi), tm_pair_scale(s0[R], j, 0)); \
                A1 = tm_add_sums(A1, tm_dot2(lo1, xlo, hi1, xhi), tm_pair_scale(s1[R], j, 0)); \
            }
            TM_STEP(0, a00, a10)
            TM_STEP(1, a01, a11)
            TM_STEP(2, a02, a12)
            TM_STEP(3, a03, a13)
#undef TM_STEP
        }
        if (n % 2) {
            const int g = g0 + n - 1;
            const __m256i q0 = tm_unpack_lone(w + g * 16), q1 = tm_unpack_lone(w + wrow + g * 16);
#define TM_STEP(R, A0, A1)                                                                     \
            {                                                                                  \
                const __m256i xv = TM_LOAD(TM_X(R, g));                                        \
                A0 = tm_add_sums(A0, tm_dot_u8s8(q0, xv), tm_pair_scale(s0[R], pairs, 1));     \
                A1 = tm_add_sums(A1, tm_dot_u8s8(q1, xv), tm_pair_scale(s1[R], pairs, 1));     \
            }
            TM_STEP(0, a00, a10)
            TM_STEP(1, a01, a11)
            TM_STEP(2, a02, a12)
            TM_STEP(3, a03, a13)
#undef TM_STEP
        }
    }
    res[0] = tm_hsum256(a00); res[1] = tm_hsum256(a01);
    res[2] = tm_hsum256(a02); res[3] = tm_hsum256(a03);
    res[4] = tm_hsum256(a10); res[5] = tm_hsum256(a11);
    res[6] = tm_hsum256(a12); res[7] = tm_hsum256(a13);
}
#undef TM_X
#undef TM_LOAD
#else
/* Portable: dot products of one weight row with rows m0 .. m0 + rows - 1 of the input. */
static void row_dots(const uint8_t *wq, const uint16_t *d, const uint16_t *mn, const int8_t *qx,
                     const float *dx, const float *sx, int K, int m0, int rows, float *res) {
    const int groups = K / 32;
    for (int r = 0; r < rows; r++) {
        const int64_t row = (int64_t)(m0 + r);
        float total = 0.0f;
        for (int g = 0; g < groups; g++) {
            const uint8_t *b = wq + g * 16;
            const int8_t *xq = qx + row * K + g * 32;
            int dot = 0;
            for (int j = 0; j < 16; j++) dot += (b[j] & 0x0F) * xq[j] + (b[j] >> 4) * xq[j + 16];
            total += (float)dot * (tm_f16_to_f32(d[g]) * dx[row * groups + g])
                     + tm_f16_to_f32(mn[g]) * sx[row * groups + g];
        }
        res[r] = total;
    }
}
#endif

int q4_matmul_f32(const float *x, int64_t x_stride, const uint8_t *packed, const uint16_t *d,
                  const uint16_t *mins, const float *bias, float *out, int64_t out_stride, int M,
                  int N, int K) {
    const int groups = K / 32;
    tm_q8_input in;
#ifdef TM_AVX2
    const int pair_order = 1;
#else
    const int pair_order = 0;
#endif
    if (tm_q8_input_make(&in, x, x_stride, M, K, pair_order) != 0) return -1;
    const int8_t *qx = in.qx;
    const float *dx = in.dx, *sx = in.sx;
    /* Long inputs (prefill) go in panels of MB rows, so a panel's quantized rows stay
       in L2 while every weight row passes over them. */
    for (int mb = 0; mb < M; mb += MB) {
    const int mend = M - mb < MB ? M : mb + MB;
    #pragma omp parallel for schedule(static)
    for (int nq = 0; nq < (N + 3) / 4; nq++) {
        const int n0 = 4 * nq, nrows = N - n0 < 4 ? N - n0 : 4;
#ifdef TM_AVX2
        const uint8_t *w0 = packed + (int64_t)n0 * (K / 2);
        const uint16_t *d0 = d + (int64_t)n0 * groups, *mn0 = mins + (int64_t)n0 * groups;
        if (nrows == 4) {
            const int full = mend - (mend - mb) % MT; /* rows covered by whole tiles */
            float res[2 * MT];
            int m = mb;
            for (; m < full; m += MT) {
                for (int o = 0; o < 4; o += 2) {
                    tile_2x4(w0 + o * (K / 2), d0 + o * groups, mn0 + o * groups,
                             qx + (int64_t)m * K, dx + (int64_t)m * groups,
                             sx + (int64_t)m * groups, K, res);
                    for (int j = 0; j < 2; j++)
                        for (int r = 0; r < MT; r++)
                            out[(int64_t)(m + r) * out_stride + n0 + o + j] =
                                res[j * MT + r] + (bias ? bias[n0 + o + j] : 0.0f);
                }
            }
            for (; m < mend; m++) { /* one input row against the four weight rows */
                tile_4x1(w0, d0, mn0, qx + (int64_t)m * K, dx + (int64_t)m * groups,
                         sx + (int64_t)m * groups, K, res);
                for (int j = 0; j < 4; j++)
                    out[(int64_t)m * out_stride + n0 + j] = res[j] + (bias ? bias[n0 + j] : 0.0f);
            }
        } else {
            for (int j = 0; j < nrows; j++) /* a partial quad, one output at a time */
                for (int m = mb; m < mend; m++) {
                    const float one = tile_1x1(w0 + j * (K / 2), d0 + j * groups, mn0 + j * groups,
                                               qx + (int64_t)m * K, dx + (int64_t)m * groups,
                                               sx + (int64_t)m * groups, K);
                    out[(int64_t)m * out_stride + n0 + j] = one + (bias ? bias[n0 + j] : 0.0f);
                }
        }
#else
        for (int n = n0; n < n0 + nrows; n++) {
            const uint8_t *wq = packed + (int64_t)n * (K / 2);
            const uint16_t *dn = d + (int64_t)n * groups, *mn = mins + (int64_t)n * groups;
            const float b = bias ? bias[n] : 0.0f;
            float res[MT];
            for (int m = mb; m < mend; m += MT) {
                const int rows = mend - m < MT ? mend - m : MT;
                row_dots(wq, dn, mn, qx, dx, sx, K, m, rows, res);
                for (int r = 0; r < rows; r++) out[(int64_t)(m + r) * out_stride + n] = res[r] + b;
            }
        }
#endif
    }
    }
    tm_q8_input_free(&in);
    return 0;
}
