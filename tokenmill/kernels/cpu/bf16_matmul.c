/*
 * bfloat16 linear layers on AMX tiles: y = x @ W^T (+ b), W packed once at load.
 *
 * oneDNN (through PyTorch) reached 6-13 GB/s of weight reads on the small matrices of
 * batched decode (1-32 rows of a 0.6-3.5 MB layer) on a 2-core Xeon that reads
 * 18-21 GB/s: per call it chooses a blocking, sets up its kernels and splits the work
 * for the general case. This kernel does one thing: it streams a weight packed as AMX
 * B tiles, in the order it reads them, once per call, and multiplies each 1 KiB tile
 * with the activations' rows that are already in L1.
 *
 * Packed layout (bf16_matmul_packed_size elements): for each block of 16 output
 * columns, for each block of 32 inputs, one 16 x 32 tile whose row r holds the input
 * pairs (2r, 2r + 1) of the 16 columns interleaved (AMX's "VNNI" layout for B):
 *   packed[nb][kb][r][c][e] = W[16 nb + c][32 kb + 2 r + e]
 * (PyTorch builds it: w.view(N/16, 16, K/32, 16, 2).permute(0, 2, 3, 1, 4)).
 *
 * Numerics: each output is float32 sums of exact bfloat16 products, 32 inputs per tile
 * instruction, then + bias, then rounded to bfloat16 (nearest even) once; the same
 * arithmetic as oneDNN's AMX path, up to summation order. A row's result does not
 * depend on the other rows multiplied with it.
 *
 * Shapes: N % 32 == 0 and K % 32 == 0 (every model the engine serves so far); the
 * caller keeps oneDNN for the others. Threads split the output columns.
 */
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>
#define TM_AMX 1
#endif

/* 1 when this build can run the AMX kernel and the kernel lets this process use the
   tile registers (Linux asks each process to request them: ARCH_REQ_XCOMP_PERM). */
int bf16_matmul_amx_init(void) {
#ifdef TM_AMX
    /* asked once per process (every matmul wrapper checks it); a race only asks twice */
    static int granted = -1;
    if (granted < 0)
        granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                          18 /* XFEATURE_XTILEDATA */) == 0;
    return granted;
#else
    return 0;
#endif
}

#ifdef TM_AMX
#include "amx_tiles.h"

/* One accumulator tile (rows x 16 floats) plus bias, rounded into out. */
static inline void tm_write(const float *acc, int rows, const uint16_t *bias, uint16_t *out,
                            int64_t ldo) {
    float b[16];
    for (int c = 0; c < 16; c++) b[c] = bias ? tm_bf16_to_f32(bias[c]) : 0.0f;
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < 16; c++) out[r * ldo + c] = tm_f32_to_bf16(acc[r * 16 + c] + b[c]);
}

/* A pass's four accumulator tiles (rows0 + rows1 rows x 32 columns) plus bias, through
   acc, rounded into out. */
static inline void tm_pass_write(float acc[4][16 * 16], int rows0, int rows1,
                                 const uint16_t *bias, uint16_t *out, int64_t ldo) {
    _tile_stored(0, acc[0], 64);
    _tile_stored(1, acc[1], 64);
    tm_write(acc[0], rows0, bias, out, ldo);
    tm_write(acc[1], rows0, bias ? bias + 16 : NULL, out + 16, ldo);
    if (rows1 > 0) {
        _tile_stored(2, acc[2], 64);
        _tile_stored(3, acc[3], 64);
        tm_write(acc[2], rows1, bias, out + 16 * ldo, ldo);
        tm_write(acc[3], rows1, bias ? bias + 16 : NULL, out + 16 * ldo + 16, ldo);
    }
}

/* More than 32 rows (prompt chunks). The loop below (rows outer) streams the whole weight
   once per 32 rows, from memory once a layer outgrows L2. Here each thread takes its
   column pairs one at a time: every 32-row pass re-reads the pair's B tiles from L1. The
   activations are first copied into the A tiles' own layout (block of 16 rows x 32
   inputs at xb + (rb * kblocks + kb) * 512): a pass reads them as one contiguous stream,
   with the no-reuse hint so they leave L1 to the B tiles (as panel_matmul_amx.c). Each
   output adds the same products in the same order as below: the same bits. 30 x
   SmolLM2's layers, 2-core Sapphire Rapids: 128 rows 25.2-27.2 -> 22.5 ms, 512 rows
   69 -> 65 ms; one 3072 x 576 layer at 512 rows 1.09 -> 0.85 ms. */
static int bf16_matmul_amx_rows(const uint16_t *x, int64_t ldx, const uint16_t *packed,
                                const uint16_t *bias, uint16_t *y, int64_t ldy, int M,
                                int N, int K) {
    const int kblocks = K / 32, groups = N / 32, row_blocks = (M + 15) / 16;
    const int64_t tile = 16 * 32; /* elements in one packed B tile */
    uint16_t *xb = aligned_alloc(64, (size_t)row_blocks * (size_t)kblocks * 1024);
    if (!xb) return -1;
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int r = 0; r < M; r++)
            for (int kb = 0; kb < kblocks; kb++)
                _mm512_store_si512((void *)(xb + ((int64_t)(r / 16) * kblocks + kb) * 512
                                            + (r % 16) * 32),
                                   _mm512_loadu_si512((const void *)(x + r * ldx + 32 * kb)));
        float acc[4][16 * 16] __attribute__((aligned(64)));
        int configured = -1;
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int g_begin = (int)((int64_t)groups * t / nt);
        const int g_end = (int)((int64_t)groups * (t + 1) / nt);
        for (int g = g_begin; g < g_end; g++) {
            const uint16_t *b0 = packed + (int64_t)(2 * g) * kblocks * tile;
            const uint16_t *b1 = b0 + kblocks * tile;
            for (int m0 = 0; m0 < M; m0 += 32) {
                int rows0, rows1;
                tm_bf16_pass_rows(M, m0, &rows0, &rows1, &configured);
                const uint16_t *a0 = xb + (int64_t)(m0 / 16) * kblocks * 512;
                const uint16_t *a1 = a0 + (int64_t)kblocks * 512;
                /* the first pass reads the pair from memory */
                tm_bf16_pass_products(a0, a1, 512, 64, 1, b0, b1, tile, m0 == 0, kblocks, rows1);
                tm_pass_write(acc, rows0, rows1, bias ? bias + 32 * g : NULL,
                              y + (int64_t)m0 * ldy + 32 * g, ldy);
            }
        }
        _tile_release();
    }
    free(xb);
    return 0;
}
#endif

/* y[M, N] = x[M, K] @ W^T (+ bias[N]); x rows ldx elements apart, y rows ldy apart.
   Returns 0, or -1 when this build or shape has no AMX path (nothing written). */
int bf16_matmul_amx(const uint16_t *x, int64_t ldx, const uint16_t *packed,
                    const uint16_t *bias, uint16_t *y, int64_t ldy, int M, int N, int K) {
#ifdef TM_AMX
    if (N % 32 != 0 || K % 32 != 0 || M <= 0) return -1;
    if (M > 32) return bf16_matmul_amx_rows(x, ldx, packed, bias, y, ldy, M, N, K);
    const int kblocks = K / 32, groups = N / 32;
    const int64_t tile = 16 * 32; /* elements in one packed B tile */
    #pragma omp parallel
    {
        float acc[4][16 * 16] __attribute__((aligned(64)));
        int configured = -1;
        /* each thread a contiguous range of column groups; rows outer, so a chunk of
           32 activation rows stays in L1 while the thread's weights stream past it */
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int g_begin = (int)((int64_t)groups * t / nt);
        const int g_end = (int)((int64_t)groups * (t + 1) / nt);
        for (int m0 = 0; m0 < M; m0 += 32) {
            for (int g = g_begin; g < g_end; g++) {
                const uint16_t *b0 = packed + (int64_t)(2 * g) * kblocks * tile;
                const uint16_t *b1 = b0 + kblocks * tile;
                int rows0, rows1;
                tm_bf16_pass_rows(M, m0, &rows0, &rows1, &configured);
                const uint16_t *a0 = x + (int64_t)m0 * ldx;
                const uint16_t *a1 = a0 + 16 * ldx;
                tm_bf16_pass_products(a0, a1, 32, ldx * 2, 0, b0, b1, tile, 1, kblocks, rows1);
                tm_pass_write(acc, rows0, rows1, bias ? bias + 32 * g : NULL,
                              y + (int64_t)m0 * ldy + 32 * g, ldy);
            }
        }
        _tile_release();
    }
    return 0;
#else
    (void)x; (void)ldx; (void)packed; (void)bias; (void)y; (void)ldy; (void)M; (void)N; (void)K;
    return -1;
#endif
}
