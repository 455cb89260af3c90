/*
 * What the AMX kernels (bf16_matmul.c, panel_matmul_amx.c) share: the 64-byte tile
 * configuration that _tile_loadconfig reads (palette 1: bytes per row and rows of each
 * of the 16 tile registers, 8 of them usable).
 */
#ifndef TOKENMILL_AMX_TILES_H
#define TOKENMILL_AMX_TILES_H

#include <stdint.h>

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

#endif
