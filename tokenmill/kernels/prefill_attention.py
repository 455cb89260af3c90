"""Prefill (and mixed-batch) attention over variable-length chunks and a paged cache.

Every request in the step contributes ``query_len`` new tokens whose K/V have
already been written to the cache, after ``seq_len - query_len`` earlier
tokens (a prefix-cache hit or earlier chunks). So all keys are read through the
block table, whatever their origin. Flash-attention style: a program owns a
tile of query rows, streams K/V tiles through on-chip memory and keeps an
online softmax; no score matrix is ever stored.

The grid is flat over query tiles of all requests (a program finds its request
by binary search over ``query_start_loc``), so a step mixing many decodes with
one long chunk launches about ``T / BLOCK_Q + B`` programs, not ``B`` times the
longest chunk's tile count.

Rows of a tile are (token, query head) pairs: ``BLOCK_Q`` consecutive tokens
times the ``GROUP`` query heads that share one KV head (padded to a power of
two), so each K/V tile is loaded once for the whole group.

Causality is bottom-right aligned: query ``j`` of a request sits at absolute
position ``seq_len - query_len + j`` and sees keys at positions <= that. Key
tiles wholly visible to every row of the tile skip the mask; only the last few
tiles, which straddle the diagonal, compute it. With a sliding window ``W`` a
row at position ``p`` sees only ``p - W < key <= p``: the key loop starts at
the tile holding the first row's first visible key, and tiles below the last
row's window start are masked too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels.kv_quant_triton import (
    check_quantized_cache,
    decode_codes,
    kv_quant_code,
    scale_view,
)
from tokenmill.kernels.triton_utils import (
    dot_precision,
    launcher,
    needs_fp32_compute,
    next_power_of_2,
)

LOG2E = 1.4426950408889634


@triton.jit
def _prefill_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    scale_log2, num_seqs, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    KV_QUANT: tl.constexpr,
):
    # Request i owns query tiles starting at query_start_loc[i] // BLOCK_Q + i; those
    # ranges never overlap, and the grid covers num_tokens // BLOCK_Q + num_seqs tiles
    # (a few spare programs exit at once). Binary search for this tile's request.
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        go_right = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= tile
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(go_right, hi, mid)
    req = lo - 1

    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    first = (tile - q_start // BLOCK_Q - req) * BLOCK_Q  # first query index of the tile
    if first >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    context_len = seq_len - q_len

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P2
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    token = first + offs_m // GROUP_P2  # query index within the request
    g = offs_m % GROUP_P2
    head = kv_head * GROUP + g
    row_mask = (token < q_len) & (g < GROUP)
    d_mask = offs_d < HEAD_DIM
    q_rows = (q_start + token).to(tl.int64)

    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh
                + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = context_len + token  # absolute position of each row

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + req.to(tl.int64) * stride_bt

    last = tl.minimum(first + BLOCK_Q, q_len) - 1  # last real query index in the tile
    # Keys < context_len + first + 1 are visible to every row; whole tiles of them
    # need no mask. Keys up to context_len + last are visible to some rows.
    unmasked_end = ((context_len + first + 1) // BLOCK_N) * BLOCK_N
    kv_end = context_len + last + 1
    # Sliding window: the first row sees keys from kv_lo on; keys from window_all on
    # are inside every row's window, so only tiles below that need the window mask.
    kv_lo = tl.where(window > 0, tl.maximum(context_len + first - window + 1, 0), 0)
    window_all = tl.where(window > 0, tl.maximum(context_len + last - window + 1, 0), 0)
    kv_start = (kv_lo // BLOCK_N) * BLOCK_N

    for tile_start in range(kv_start, kv_end, BLOCK_N):
        pos = tile_start + offs_n
        n_mask = (pos < kv_end) & (pos >= kv_lo)
        block = tl.load(table + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        in_block = pos % BLOCK_SIZE
        k_row = block * stride_kb + in_block * stride_ks + kv_head * stride_kh
        v_row = block * stride_vb + in_block * stride_vs + kv_head * stride_vh
        k = tl.load(k_cache_ptr + k_row[None, :] + offs_d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None], other=0)
        v = tl.load(v_cache_ptr + v_row[:, None] + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0)
        if KV_QUANT == 0:
            s = tl.dot(q, k.to(q.dtype), input_precision=PRECISION, out_dtype=tl.float32)
        else:
            # Codes widen exactly; row scales multiply scores (K) and weights (V).
            k_scale = tl.load(k_scale_ptr + (k_row + HEAD_DIM) // 4, mask=n_mask, other=0.0)
            v_scale = tl.load(v_scale_ptr + (v_row + HEAD_DIM) // 4, mask=n_mask, other=0.0)
            s = tl.dot(q, decode_codes(k, KV_QUANT).to(q.dtype), input_precision=PRECISION,
                       out_dtype=tl.float32) * k_scale[None, :]
            v = decode_codes(v, KV_QUANT)
        s = s * scale_log2
        if (tile_start >= unmasked_end) | (tile_start < window_all):
            visible = (pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
            visible = visible & ((pos[None, :] > q_pos[:, None] - window) | (window <= 0))
            s = tl.where(visible, s, float("-inf"))
        # With a window a row may see nothing in a tile (-inf max): exponentiate
        # against 0 then, so exp2(-inf - 0) = 0 rather than NaN.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if KV_QUANT != 0:
            p = p * v_scale[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype),
                                            input_precision=PRECISION, out_dtype=tl.float32)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def prefill_tile_sizes(head_dim: int, group: int) -> tuple[int, int]:
    """(BLOCK_M query rows, BLOCK_N keys) per program; rows = tokens x grouped heads."""
    block_m = 64
    block_n = 32 if head_dim > 128 else 64
    return max(block_m, next_power_of_2(group)), block_n


def prefill_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention for a batch of chunks (any mix of prefills and decodes).

    ``sliding_window``: each query attends only its last ``sliding_window``
    positions (keys before are not read).

    ``q``/``out``: [T, num_heads, head_dim], request ``i`` owning rows
    ``query_start_loc[i]:query_start_loc[i+1]``; caches
    [num_blocks, block_size, kv_heads, head_dim] already holding the new K/V
    (or quantized rows of ``head_dim`` codes + a float32 scale, dequantized in
    registers);
    ``seq_lens`` [B] int32 context length after this step; ``block_tables``
    [B, max_blocks] int32. Rows outside every request are not touched. The
    launch needs no host copy of the lengths (grid from T and B only).
    """
    num_seqs = seq_lens.shape[0]
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_seqs == 0 or num_tokens == 0:
        return out
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    if q.stride(-1) != 1:
        q = q.contiguous()
    check_quantized_cache(k_cache, head_dim)
    group = num_heads // num_kv_heads
    group_p2 = next_power_of_2(group)
    block_m, block_n = prefill_tile_sizes(head_dim, group)
    block_q = block_m // group_p2
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    launcher(_prefill_attention_kernel, q.device)[grid](
        out, q, k_cache, v_cache, scale_view(k_cache), scale_view(v_cache),
        block_tables, seq_lens, query_start_loc,
        scale * LOG2E, num_seqs, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, GROUP_P2=group_p2, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_Q=block_q, BLOCK_D=next_power_of_2(head_dim), BLOCK_N=block_n,
        UPCAST=needs_fp32_compute(q.device), PRECISION=dot_precision(q.dtype),
        KV_QUANT=kv_quant_code(k_cache),
    )
    return out
