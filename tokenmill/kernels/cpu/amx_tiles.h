/*
 * What the AMX kernels (bf16_matmul.c, panel_matmul_amx.c, panel_matmul_amx_exact.c)
 * share: the 64-byte tile configuration that _tile_loadconfig reads (palette 1: bytes per
 * row and rows of each of the 16 tile registers, 8 of them usable), and loading it.
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

#endif
