/*
 * What the AMX kernels (bf16_matmul.c, panel_matmul_amx.c, panel_matmul_amx_exact.c)
 * share: the 64-byte tile configuration that _tile_loadconfig reads (palette 1: bytes per
 * row and rows of each of the 16 tile registers, 8 of them usable) and loading it, and the
 * 2 x 2 bfloat16 pass of the first two (its rows, its tile products).
 * Included only where the build has AMX.
 */
#ifndef TOKENMILL_AMX_TILES_H
#define TOKENMILL_AMX_TILES_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tm_tile_config;

/* ldtilecfg from cfg. The compiler barrier keeps the configuration's stores: once the
   configuring function was inlined, GCC 12 dropped them as dead (the tile instruction's
   read of memory is not visible to it) and ldtilecfg faulted on a half-written one. */
#define tm_tile_load_config(cfg)                   \
    do {                                           \
        __asm__ __volatile__("" ::: "memory");     \
        _tile_loadconfig(cfg);                     \
    } while (0)

/* Configure tiles 0-7: rows and bytes per row of each (the other eight unused). */
static inline void tm_tile_configure(const int rows[8], const int colsb[8]) {
    tm_tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = (uint8_t)rows[t];
        cfg.colsb[t] = (uint16_t)colsb[t];
    }
    tm_tile_load_config(&cfg);
}

/* The bfloat16 pass of bf16_matmul.c and panel_matmul_amx.c: tiles 0-3 accumulators
   C[m][n] (m: two row tiles, n: two blocks of 16 columns), 4-5 the row tiles'
   activations A[m], 6-7 the weights B[n], every row 64 bytes (16 floats or 32
   bfloat16). Row tile 0 has rows0 rows, row tile 1 rows1 (at least 1 when unused). */
static inline void tm_tile_configure_bf16_pass(int rows0, int rows1) {
    const int rows[8] = {rows0, rows0, rows1, rows1, rows0, rows1, 16, 16};
    const int colsb[8] = {64, 64, 64, 64, 64, 64, 64, 64};
    tm_tile_configure(rows, colsb);
}

/* tile register t (a constant) <- the A tile at p, as tm_bf16_pass_products asks */
#define TM_LOAD_A(t, p)                      \
    do {                                     \
        if (stream_a)                        \
            _tile_stream_loadd(t, p, lda);   \
        else                                 \
            _tile_loadd(t, p, lda);          \
    } while (0)

/* The products of one such pass over `steps` K steps of 32 inputs, into accumulators 0-3
   (zeroed first; 2 and 3 only when rows1 > 0): A tiles at a0 and a1 + s * a_step elements,
   rows lda bytes apart, loaded with the no-reuse hint when `stream_a` (a pass reads them
   once; kept out of L1 they leave it to B); B tiles at b0 and b1 + s * b_step, rows 64
   bytes apart, prefetched two steps ahead when `prefetch_b` (the tile loads do not train
   the hardware prefetcher well). Inlined, so that `stream_a`, a constant at every call,
   picks its load instruction at compile time. */
static inline __attribute__((always_inline)) void tm_bf16_pass_products(
    const uint16_t *a0, const uint16_t *a1, int64_t a_step, int64_t lda, int stream_a,
    const uint16_t *b0, const uint16_t *b1, int64_t b_step, int prefetch_b, int steps,
    int rows1) {
    _tile_zero(0);
    _tile_zero(1);
    if (rows1 > 0) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int s = 0; s < steps; s++) {
        if (prefetch_b) {
            const char *p0 = (const char *)(b0 + (s + 2) * b_step);
            const char *p1 = (const char *)(b1 + (s + 2) * b_step);
            for (int l = 0; l < 1024; l += 64) {
                _mm_prefetch(p0 + l, _MM_HINT_T0);
                _mm_prefetch(p1 + l, _MM_HINT_T0);
            }
        }
        _tile_loadd(6, b0 + s * b_step, 64);
        _tile_loadd(7, b1 + s * b_step, 64);
        TM_LOAD_A(4, a0 + s * a_step);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (rows1 > 0) {
            TM_LOAD_A(5, a1 + s * a_step);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
}
#undef TM_LOAD_A

/* Rows of the pass starting at row m0 of M: row tile 0 (rows0, at most 16) and 1 (rows1,
   0 when unused); the tiles are reconfigured when these differ from the last pass's
   (*configured, -1 at first). */
static inline void tm_bf16_pass_rows(int M, int m0, int *rows0, int *rows1, int *configured) {
    *rows0 = M - m0 < 16 ? M - m0 : 16;
    *rows1 = M - m0 - 16 <= 0 ? 0 : (M - m0 - 16 < 16 ? M - m0 - 16 : 16);
    if (32 * *rows0 + *rows1 != *configured) {
        tm_tile_configure_bf16_pass(*rows0, *rows1 > 0 ? *rows1 : 1);
        *configured = 32 * *rows0 + *rows1;
    }
}

#endif
