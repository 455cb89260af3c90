/*
 * y = x @ W.T (+ bias) for weights in the 16-column panels of q4_matmul_panels.c (Q4_1)
 * and int8_matmul_panels.c (Q8_0), on AMX bfloat16 tiles (CPUs with AMX-BF16).
 *
 * The VNNI panel kernels spend their time on multiply-adds: from a few dozen rows on they
 * are bound by arithmetic (SmolLM2's int4 layers at 32 rows: ~0.4 ms per layer on a 2-core
 * Sapphire Rapids, a fifth of the weights' read time). One AMX tile instruction does
 * 16 x 16 x 32 multiply-adds. Here each (panel, group) block of the packed weight is
 * dequantized once per call into one AMX B tile (16 pairs of inputs x 16 columns; Q4_1
 * w = d * code + m, Q8_0 w = code * scale, each in float32 with one rounding, then
 * rounded to bfloat16), and the activations, rounded to bfloat16 once per call, are
 * multiplied against it two panels and 32 rows at a time (four accumulator tiles, each
 * activation and weight tile feeding two products: a tile register is reloaded only once
 * the products reading it are done), float32 accumulation in group order.
 *
 * Numerics: those of the dense bfloat16 path (dequant_matmul.py: x and the dequantized
 * weight rounded to bfloat16, float32 sums), not those of the integer kernels (input
 * rounded to 8 bits per group); the sums' order differs from oneDNN's. A row's result
 * does not depend on the other rows. The conversion instructions treat float32
 * denormals (below 1.2e-38) as zero.
 *
 * Shapes: N % 32 == 0, K % 32 == 0. Threads split the pairs of panels.
 */
#include <stdint.h>
#include <stdlib.h>

/* bytes of one (panel, group) block: q4_matmul_panels.c, int8_matmul_panels.c */
#define TM_Q4A_BLOCK 320
#define TM_Q8A_BLOCK 576

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) \
    && defined(__AVX512BW__) && defined(__AVX512VBMI__) && defined(__linux__)
#include <immintrin.h>
#include <omp.h>
#define TM_PANEL_AMX 1

#include "amx_tiles.h"

/* Row r of a B tile: the 16 columns' weights for an even and an odd input, rounded to
   bfloat16 (nearest even) and interleaved (word 2c <- even[c], word 2c + 1 <- odd[c]). */
static inline void tm_pa_store_pair(uint16_t *row, __m512 even, __m512 odd) {
    const __m512i pairs = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
        23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    _mm512_storeu_si512((void *)row, _mm512_permutexvar_epi16(
                                         pairs, (__m512i)_mm512_cvtne2ps_pbh(odd, even)));
}

/* Byte indices for vpermb: dword lane t takes (zero-extended) byte 4 (t / 2) + 2 p + t % 2
   of a nibble plane, plus 32 for columns 8..15: the codes of input pair p of a chunk, for
   word t of a B tile row's first (columns 0..7) or second half. */
#define TM_Q4A_PAIR_INDEX(p, half)                                                          \
    _mm512_set_epi32(28 + 2 * (p) + 1 + 32 * (half), 28 + 2 * (p) + 32 * (half),           \
                     24 + 2 * (p) + 1 + 32 * (half), 24 + 2 * (p) + 32 * (half),           \
                     20 + 2 * (p) + 1 + 32 * (half), 20 + 2 * (p) + 32 * (half),           \
                     16 + 2 * (p) + 1 + 32 * (half), 16 + 2 * (p) + 32 * (half),           \
                     12 + 2 * (p) + 1 + 32 * (half), 12 + 2 * (p) + 32 * (half),           \
                     8 + 2 * (p) + 1 + 32 * (half), 8 + 2 * (p) + 32 * (half),             \
                     4 + 2 * (p) + 1 + 32 * (half), 4 + 2 * (p) + 32 * (half),             \
                     2 * (p) + 1 + 32 * (half), 2 * (p) + 32 * (half))

/* One packed Q4_1 block (16 columns x 32 inputs) as an AMX B tile at b (512 bfloat16): row
   4h + r holds inputs 8h + 2r and 8h + 2r + 1 of the 16 columns, in word 2c and 2c + 1.
   Those codes are the low (r < 2) or high nibbles of bytes 4c + 2 (r % 2) and + 1 of chunk
   h; one vpermb per half row puts each in its own dword, already in the row's word order,
   so the float32 weights d * code + m of a half row round to bfloat16 straight into
   place (8 instructions per 32 weights, against 11 with a shift and mask per input and
   an interleave per row: the dequantization is most of a 32-row call). */
static inline void tm_q4a_block_tile(const uint8_t *blk, uint16_t *b) {
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 256)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 288)));
    const __m512i col0 = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i col1 = _mm512_add_epi32(col0, _mm512_set1_epi32(8));
    const __m512 d0 = _mm512_permutexvar_ps(col0, d), d1 = _mm512_permutexvar_ps(col1, d);
    const __m512 m0 = _mm512_permutexvar_ps(col0, m), m1 = _mm512_permutexvar_ps(col1, m);
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __mmask64 dword_low_bytes = 0x1111111111111111ULL;
    for (int h = 0; h < 4; h++) {
        const __m512i w = _mm512_loadu_si512((const void *)(blk + 64 * h));
        const __m512i planes[2] = {_mm512_and_si512(w, low),
                                   _mm512_and_si512(_mm512_srli_epi16(w, 4), low)};
        for (int r = 0; r < 4; r++) { /* unrolled: constant indices */
            const __m512i plane = planes[r / 2];
            const __m512 first = _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(
                dword_low_bytes, TM_Q4A_PAIR_INDEX(r % 2, 0), plane));
            const __m512 second = _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(
                dword_low_bytes, TM_Q4A_PAIR_INDEX(r % 2, 1), plane));
            _mm512_storeu_si512((void *)(b + 32 * (4 * h + r)),
                                (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(second, d1, m1),
                                                             _mm512_fmadd_ps(first, d0, m0)));
        }
    }
}

/* One Q8_0 block (bytes 64 s + 4 c + b: column c's code for input 4 s + b, plus 128;
   then 16 float scales) as an AMX B tile at b: row r = inputs 2r and 2r + 1, the bytes
   2 (r % 2) and 2 (r % 2) + 1 of chunk r / 2's 32-bit lanes. */
static inline void tm_q8a_block_tile(const uint8_t *blk, uint16_t *b) {
    const __m512 scale = _mm512_loadu_ps((const float *)(blk + 512));
    const __m512i byte = _mm512_set1_epi32(0xFF), offset = _mm512_set1_epi32(128);
    for (int s = 0; s < 8; s++) {
        const __m512i w = _mm512_loadu_si512((const void *)(blk + 64 * s));
#define TM_Q8A_WEIGHT(j) \
    _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32( \
        _mm512_and_si512(_mm512_srli_epi32(w, 8 * (j)), byte), offset)), scale)
        tm_pa_store_pair(b + 32 * (2 * s), TM_Q8A_WEIGHT(0), TM_Q8A_WEIGHT(1));
        tm_pa_store_pair(b + 32 * (2 * s + 1), TM_Q8A_WEIGHT(2), TM_Q8A_WEIGHT(3));
#undef TM_Q8A_WEIGHT
    }
}

/* The 32 biases added to `rows` output rows ldo floats apart, in place. */
static inline void tm_pa_add_bias(const float *bias, int rows, float *out, int64_t ldo) {
    const __m512 b0 = _mm512_loadu_ps(bias), b1 = _mm512_loadu_ps(bias + 16);
    for (int r = 0; r < rows; r++) {
        _mm512_storeu_ps(out + r * ldo, _mm512_add_ps(_mm512_loadu_ps(out + r * ldo), b0));
        _mm512_storeu_ps(out + r * ldo + 16,
                         _mm512_add_ps(_mm512_loadu_ps(out + r * ldo + 16), b1));
    }
}
#endif

int panel_matmul_amx_available(void) {
#ifdef TM_PANEL_AMX
    return 1;
#else
    return 0;
#endif
}

#ifdef TM_PANEL_AMX
/* The product for block bytes `block` (TM_Q4A_BLOCK or TM_Q8A_BLOCK: inlined with a
   constant, each format gets its own copy). */
static inline __attribute__((always_inline)) int panel_matmul_amx(
        const int block, const float *x, int64_t x_stride, const uint8_t *packed,
        const float *bias, float *out, int64_t out_stride, int M, int N, int K) {
    if (M <= 0 || N % 32 != 0 || K % 32 != 0) return -2;
    const int groups = K / 32, pairs = N / 32;
    const int64_t panel_bytes = (int64_t)groups * block;
    /* The activations rounded to bfloat16 once (nearest even), stored as the A tiles
       they are loaded as: block (16 rows, group g) at xb + (rb * groups + g) * 512, row r
       of it 32 words. A pass then reads its A tiles as one contiguous stream, which the
       hardware prefetchers follow; with plain K-wide rows each tile load touched 16
       lines 2K bytes apart. */
    const int row_blocks = (M + 15) / 16;
    uint16_t *xb = aligned_alloc(64, (size_t)row_blocks * (size_t)groups * 1024);
    if (!xb) return -1;
    int failed = 0;
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int r = 0; r < M; r++)
            for (int k = 0; k < K; k += 16)
                _mm256_store_si256(
                    (__m256i *)(xb + ((int64_t)(r / 16) * groups + k / 32) * 512
                                + (r % 16) * 32 + k % 32),
                    (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + (int64_t)r * x_stride + k)));
        /* two panels' B tiles, group by group: dequantized once, used by every pass */
        uint16_t *tiles_b = aligned_alloc(64, (size_t)groups * 2048);
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int q_begin = (int)((int64_t)pairs * t / nt);
        const int q_end = (int)((int64_t)pairs * (t + 1) / nt);
        int configured = -1;
        if (!tiles_b) {
            #pragma omp atomic write
            failed = 1;
        }
        for (int q = q_begin; q < q_end && tiles_b; q++) {
            const uint8_t *panel = packed + 2 * q * panel_bytes;
            for (int g = 0; g < groups; g++) {
                for (int j = 0; j < 2; j++) {
                    const uint8_t *blk = panel + j * panel_bytes + (int64_t)g * block;
                    for (int l = 0; l < block; l += 64)
                        _mm_prefetch((const char *)blk + 2 * block + l, _MM_HINT_T0);
                    if (block == TM_Q4A_BLOCK)
                        tm_q4a_block_tile(blk, tiles_b + 1024 * g + 512 * j);
                    else
                        tm_q8a_block_tile(blk, tiles_b + 1024 * g + 512 * j);
                }
            }
            for (int m0 = 0; m0 < M; m0 += 32) {
                int rows0, rows1;
                tm_bf16_pass_rows(M, m0, &rows0, &rows1, &configured);
                const uint16_t *a0 = xb + (int64_t)(m0 / 16) * groups * 512;
                const uint16_t *a1 = a0 + (int64_t)groups * 512;
                /* A tiles with the no-reuse hint (tileloaddt1): each is read once per
                   pass, and kept out of L1 they leave it to the pair's B tiles, which
                   every pass re-reads (2-core Sapphire Rapids, a scratch loop of
                   18-group passes: 9.4-10.1 -> 7.3-7.7 ns per tile product) */
                tm_bf16_pass_products(a0, a1, 512, 64, 1, tiles_b, tiles_b + 512, 1024, 0,
                                      groups, rows1);
                /* the tiles straight into out (a tile's rows are out's rows), then the
                   bias onto them there */
                float *o = out + (int64_t)m0 * out_stride + 32 * q;
                const int64_t ldo = out_stride * 4; /* bytes */
                _tile_stored(0, o, ldo);
                _tile_stored(1, o + 16, ldo);
                if (rows1 > 0) {
                    _tile_stored(2, o + 16 * out_stride, ldo);
                    _tile_stored(3, o + 16 * out_stride + 16, ldo);
                }
                if (bias) tm_pa_add_bias(bias + 32 * q, rows0 + rows1, o, out_stride);
            }
        }
        _tile_release();
        free(tiles_b);
    }
    free(xb);
    return failed ? -1 : 0;
}
#endif

/* out[M, N] = x[M, K] @ W^T (+ bias[N]); x rows x_stride floats apart, out rows
   out_stride apart, W packed as for q4_matmul_panels_f32 / int8_matmul_panels_f32. The
   caller has made sure this process may use AMX tiles (bf16_matmul_amx_init). Return 0,
   -1 when out of memory, -2 when this build has no AMX path or the shape does not fit
   (nothing written). */
#ifdef TM_PANEL_AMX
#define DEFINE_PANEL_AMX(NAME, BLOCK)                                                          \
int NAME(const float *x, int64_t x_stride, const uint8_t *packed, const float *bias,          \
         float *out, int64_t out_stride, int M, int N, int K) {                               \
    return panel_matmul_amx(BLOCK, x, x_stride, packed, bias, out, out_stride, M, N, K);      \
}
#else
#define DEFINE_PANEL_AMX(NAME, BLOCK)                                                          \
int NAME(const float *x, int64_t x_stride, const uint8_t *packed, const float *bias,          \
         float *out, int64_t out_stride, int M, int N, int K) {                               \
    (void)x; (void)x_stride; (void)packed; (void)bias; (void)out; (void)out_stride;           \
    (void)M; (void)N; (void)K;                                                                 \
    return -2;                                                                                 \
}
#endif
DEFINE_PANEL_AMX(q4_matmul_panels_amx, TM_Q4A_BLOCK)
DEFINE_PANEL_AMX(int8_matmul_panels_amx, TM_Q8A_BLOCK)
