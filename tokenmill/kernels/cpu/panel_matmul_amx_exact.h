/*
 * The integer panel kernels' product on AMX int8 tiles (panel_matmul_amx_exact.c), for
 * q4_matmul_panels.c and int8_matmul_panels.c to hand their many-row calls to.
 */
#ifndef TOKENMILL_PANEL_MATMUL_AMX_EXACT_H
#define TOKENMILL_PANEL_MATMUL_AMX_EXACT_H

#include <stdint.h>

#include "q8_input.h"

/* Which instructions q4_matmul_panels_f32 / int8_matmul_panels_f32 use (the same bits
   either way): vector ones only, AMX int8 tiles only (-2 when unavailable), or tiles from
   the kernel's measured row count on. */
enum { TM_PANELS_VECTOR = 0, TM_PANELS_TILES = 1, TM_PANELS_AUTO = 2 };

/* 1 when this build and CPU have AMX-INT8 and this process may use the tiles. */
int panel_matmul_amx_exact_available(void);

/* out[M, N] (+ bias) for the input already rounded (in; Q8_0 also its code sums per
   group, xsum) against packed Q4_1 / Q8_0 panels. 0; -1 when out of memory; -2, nothing
   written, when unavailable or N % 32 != 0. */
int tm_q4_panels_amx_exact(const tm_q8_input *in, const uint8_t *packed, const float *bias,
                           float *out, int64_t out_stride, int M, int N, int K);
int tm_int8_panels_amx_exact(const tm_q8_input *in, const int32_t *xsum,
                             const uint8_t *packed, const float *bias, float *out,
                             int64_t out_stride, int M, int N, int K);

#endif
