/*
 * How the paged-attention kernels split their work between threads and warm the
 * cache ahead of it. A work item is a (sequence b, KV head hk) pair, numbered
 * b * num_kv_heads + hk. Each thread takes a contiguous run of items with an even
 * share of the keys read, so it knows its next item and can prefetch that item's
 * K/V rows while it computes this one.
 *
 * The rows of one KV head are a few cache lines every num_kv_heads rows, in blocks
 * scattered over the pool, which the hardware prefetchers do not follow: without the
 * prefetch the AVX-512 bfloat16 kernel waited on memory at a quarter of the read
 * bandwidth. The AVX2 kernel spreads the next item's prefetches over this item's key
 * loop (tm_cursor_step) instead of issuing them in one burst, whose misses then stall
 * the core before it computes: 1.1-1.3x on float32 K/V at batch 32. Sizes here are in
 * bytes, so the float32, bfloat16 and 8-bit (codes plus a scale) caches share the code. tm_window_start, the first key a query may see under
 * a sliding window, is shared with prefill_attention.c.
 */
#ifndef TM_PAGED_ATTENTION_ITEMS_H
#define TM_PAGED_ATTENTION_ITEMS_H

#include <stdint.h>
#include <omp.h>

/* The first key a query that sees keys 0..visible - 1 attends to: with a sliding window
   W > 0 only the last W of them, else all. */
static inline int tm_window_start(int visible, int window) {
    return window > 0 && visible > window ? visible - window : 0;
}

/* Keys a sequence's query rows read, for splitting work between threads. */
static inline int64_t tm_item_keys(const int32_t *query_start, const int32_t *seq_lens, int b,
                                   int max_q_len) {
    const int qlen = query_start[b + 1] - query_start[b];
    return qlen <= 0 || qlen > max_q_len ? 1 : (int64_t)qlen * seq_lens[b] + 16;
}

/* This thread's work items: [*it0, *it1), a contiguous run with an even share of the
   keys read. Call inside the parallel region. */
static inline void tm_thread_items(const int32_t *query_start, const int32_t *seq_lens,
                                   int num_seqs, int num_kv_heads, int max_q_len, int *it0,
                                   int *it1) {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int items = num_seqs * num_kv_heads;
    int64_t total = 0;
    for (int b = 0; b < num_seqs; b++) total += tm_item_keys(query_start, seq_lens, b, max_q_len);
    total *= num_kv_heads;
    const int64_t from = total * tid / nt, to = total * (tid + 1) / nt;
    int64_t seen = 0;
    *it0 = *it1 = items;
    for (int it = 0; it < items; it++) {
        if (*it0 == items && seen >= from) *it0 = it;
        if (seen >= to) {
            *it1 = it;
            break;
        }
        seen += tm_item_keys(query_start, seq_lens, it / num_kv_heads, max_q_len);
    }
    if (tid == nt - 1) *it1 = items;
    if (*it1 < *it0) *it1 = *it0;
}

/* One work item's K/V rows still to prefetch: the keys its first query row sees, from
   pos to len - 1 (none for an item the kernel skips or past the thread's run). head_row:
   bytes of one (token, head) row; the token stride (row) is num_kv_heads of them. A
   prefetch never faults, so stale block-table entries are harmless. */
typedef struct {
    const char *k, *v;
    const int32_t *table;
    int pos, len, block_size;
    int64_t row, head_row;
} tm_prefetch_cursor;

static inline void tm_cursor_init(tm_prefetch_cursor *c, int it, int it1, const void *k_cache,
                                  const void *v_cache, const int32_t *query_start,
                                  const int32_t *seq_lens, const int32_t *block_tables,
                                  int max_blocks, int num_kv_heads, int block_size,
                                  int max_q_len, int window, int64_t head_row) {
    *c = (tm_prefetch_cursor){0}; /* empty: pos == len */
    if (it >= it1) return;
    const int b = it / num_kv_heads, hk = it % num_kv_heads;
    const int qlen = query_start[b + 1] - query_start[b];
    if (qlen <= 0 || qlen > max_q_len) return;
    c->k = (const char *)k_cache + hk * head_row;
    c->v = (const char *)v_cache + hk * head_row;
    c->table = block_tables + (int64_t)b * max_blocks;
    c->pos = tm_window_start(seq_lens[b] - qlen + 1, window);
    c->len = seq_lens[b];
    c->block_size = block_size;
    c->head_row = head_row;
    c->row = head_row * num_kv_heads;
}

/* Prefetch (into L2) the cursor's next `rows` rows: a few per step of the computation. */
static inline void tm_cursor_step(tm_prefetch_cursor *c, int rows) {
    for (; rows > 0 && c->pos < c->len; rows--, c->pos++) {
        const int64_t off = ((int64_t)c->table[c->pos / c->block_size] * c->block_size
                             + c->pos % c->block_size) * c->row;
        for (int64_t l = 0; l < c->head_row; l += 64) {
            __builtin_prefetch(c->k + off + l, 0, 2);
            __builtin_prefetch(c->v + off + l, 0, 2);
        }
    }
}

/* Prefetch all the cursor's remaining rows at once, block by block (one table look-up
   per block). */
static inline void tm_cursor_finish(tm_prefetch_cursor *c) {
    if (c->pos >= c->len) return; /* nothing left (and an empty cursor has no block size) */
    const int bs = c->block_size;
    for (int start = c->pos - c->pos % bs; start < c->len; start += bs) {
        const int n = c->len - start < bs ? c->len - start : bs;
        const int64_t base = (int64_t)c->table[start / bs] * bs * c->row;
        for (int j = start < c->pos ? c->pos - start : 0; j < n; j++)
            for (int64_t l = 0; l < c->head_row; l += 64) {
                __builtin_prefetch(c->k + base + j * c->row + l, 0, 2);
                __builtin_prefetch(c->v + base + j * c->row + l, 0, 2);
            }
    }
    c->pos = c->len;
}

/* All of work item it's rows at once. */
static inline void tm_prefetch_item(int it, const void *k_cache, const void *v_cache,
                                    const int32_t *query_start, const int32_t *seq_lens,
                                    const int32_t *block_tables, int max_blocks,
                                    int num_kv_heads, int block_size, int max_q_len,
                                    int window, int64_t head_row) {
    tm_prefetch_cursor c;
    tm_cursor_init(&c, it, it + 1, k_cache, v_cache, query_start, seq_lens, block_tables,
                   max_blocks, num_kv_heads, block_size, max_q_len, window, head_row);
    tm_cursor_finish(&c);
}

/* Called at the start of item it of this thread's run [it0, it1): prefetch the next
   item (and, at the first, this one), so its rows arrive while this one computes. */
static inline void tm_prefetch_ahead(int it, int it0, int it1, const void *k_cache,
                                     const void *v_cache, const int32_t *query_start,
                                     const int32_t *seq_lens, const int32_t *block_tables,
                                     int max_blocks, int num_kv_heads, int block_size,
                                     int max_q_len, int window, int64_t head_row) {
    for (int next = it == it0 ? it : it + 1; next <= it + 1 && next < it1; next++)
        tm_prefetch_item(next, k_cache, v_cache, query_start, seq_lens, block_tables,
                         max_blocks, num_kv_heads, block_size, max_q_len, window, head_row);
}

#endif
