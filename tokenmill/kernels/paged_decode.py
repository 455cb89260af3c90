"""Paged decode attention: one new query token per sequence.

Each program serves one (sequence, KV head) pair and the whole group of query
heads that share that KV head (GQA), so every K/V tile is read from memory
once per group. Tiles of ``BLOCK_N`` context tokens are gathered through the
block table and folded into an online softmax (running max, running sum,
rescaled accumulator), so no score row is ever stored.

Split-K ("flash-decoding"): with few sequences there are too few programs to
fill the GPU, so the context is cut into ``num_segments`` contiguous pieces
handled by separate programs that write partial (max, sum, output); a second
kernel merges them. The grid depends only on the batch size and the segment
count, never on the context length, so both variants are CUDA-graph safe.
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
    device_parallelism,
    dot_precision,
    launcher,
    needs_fp32_compute,
    next_power_of_2,
)

LOG2E = 1.4426950408889634

# Split-K is worth it only when the un-split grid leaves most of the GPU idle
# and each segment still has a few tiles to chew on.
SPLIT_MIN_CONTEXT = 1024
MAX_SEGMENTS = 32


@triton.jit
def _paged_decode_kernel(
    out_ptr, part_out_ptr, part_ml_ptr,
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, seq_lens_ptr,
    scale_log2, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    KV_QUANT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    seq_len = tl.load(seq_lens_ptr + seq)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM

    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # The query sits at seq_len - 1; a sliding window (> 0) starts its keys at
    # seq_len - window, and nothing before that is read.
    lo = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)
    if NUM_SEGMENTS == 1:
        start = lo
        end = seq_len
    else:
        tiles_per_segment = tl.cdiv(tl.cdiv(seq_len - lo, BLOCK_N), NUM_SEGMENTS)
        start = lo + segment * tiles_per_segment * BLOCK_N
        end = tl.minimum(start + tiles_per_segment * BLOCK_N, seq_len)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt

    for tile_start in range(start, end, BLOCK_N):
        pos = tile_start + offs_n
        n_mask = pos < end
        block = tl.load(table + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        in_block = pos % BLOCK_SIZE
        kv_mask = n_mask[None, :] & d_mask[:, None]
        k_row = block * stride_kb + in_block * stride_ks + kv_head * stride_kh
        v_row = block * stride_vb + in_block * stride_vs + kv_head * stride_vh
        k = tl.load(k_cache_ptr + k_row[None, :] + offs_d[:, None], mask=kv_mask, other=0)
        v = tl.load(v_cache_ptr + v_row[:, None] + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0)
        # Scores in log2 units: exp2 is the fast hardware path.
        if KV_QUANT == 0:
            s = tl.dot(q, k.to(q.dtype), input_precision=PRECISION, out_dtype=tl.float32)
        else:
            # 8-bit codes widen exactly to q's dtype; the row scales multiply the scores
            # (K) and the softmax weights (V) in float32: nothing dequantized is stored.
            k_scale = tl.load(k_scale_ptr + (k_row + HEAD_DIM) // 4, mask=n_mask, other=0.0)
            v_scale = tl.load(v_scale_ptr + (v_row + HEAD_DIM) // 4, mask=n_mask, other=0.0)
            s = tl.dot(q, decode_codes(k, KV_QUANT).to(q.dtype), input_precision=PRECISION,
                       out_dtype=tl.float32) * k_scale[None, :]
            v = decode_codes(v, KV_QUANT)
        s = tl.where(n_mask[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if KV_QUANT != 0:
            p = p * v_scale[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype),
                                            input_precision=PRECISION, out_dtype=tl.float32)
        m_i = m_new

    # An empty segment has l == 0: write zeros rather than 0/0.
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    o = acc / safe_l[:, None]
    o_mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SEGMENTS == 1:
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        # Partials: out [B, H, S, D], (max, sum) [B, H, S, 2], all float32.
        row = (seq * num_heads + heads) * NUM_SEGMENTS + segment
        tl.store(part_out_ptr + row[:, None] * BLOCK_D + offs_d[None, :], o, mask=o_mask)
        tl.store(part_ml_ptr + row * 2, m_i, mask=g_mask)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_mask)


@triton.jit
def _merge_segments_kernel(
    out_ptr, part_out_ptr, part_ml_ptr, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    offs_s = tl.arange(0, NUM_SEGMENTS)
    offs_d = tl.arange(0, BLOCK_D)
    rows = (seq * num_heads + head) * NUM_SEGMENTS + offs_s
    m = tl.load(part_ml_ptr + rows * 2)
    l_seg = tl.load(part_ml_ptr + rows * 2 + 1)
    o = tl.load(part_out_ptr + rows[:, None] * BLOCK_D + offs_d[None, :])
    # Each segment's output is already normalised by its own sum; reweight by
    # sum * exp2(max - global max). Empty segments have sum 0 and drop out.
    m_all = tl.max(m, axis=0)
    w = tl.where(l_seg > 0, l_seg * tl.exp2(m - m_all), 0.0)
    total = tl.sum(w, axis=0)
    merged = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + offs_d,
             merged.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def choose_num_segments(num_seqs: int, num_kv_heads: int, max_seq_len: int,
                        device: torch.device) -> int:
    """Heuristic: split the context only for long contexts and too few (seq, head) programs.

    Returns 1 (no split) or a power of two aiming at about two programs per SM.
    """
    programs = num_seqs * num_kv_heads
    parallelism = device_parallelism(device)
    if max_seq_len < SPLIT_MIN_CONTEXT or programs >= parallelism:
        return 1
    wanted = triton.cdiv(2 * parallelism, programs)
    return max(2, min(MAX_SEGMENTS, next_power_of_2(wanted)))


def decode_block_n(head_dim: int) -> int:
    return 32 if head_dim > 128 else 64


def paged_decode_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_segments: int = 1,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attend one query token per sequence over its paged context; writes ``out``.

    ``sliding_window``: only the last ``sliding_window`` positions are attended
    (and read).

    ``q``/``out``: [B, num_heads, head_dim] (rows past ``len(seq_lens)`` are not
    touched); caches [num_blocks, block_size, kv_heads, head_dim] (or quantized rows of
    ``head_dim`` codes + a float32 scale, dequantized in registers);
    ``block_tables`` [B, max_blocks] int32; ``seq_lens`` [B] int32 (tokens
    including the new one). ``num_segments`` > 1 selects split-K (power of two).
    """
    num_seqs = seq_lens.shape[0]
    _, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_seqs == 0:
        return out
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    if num_segments < 1 or num_segments & (num_segments - 1):
        raise ValueError(f"num_segments must be a power of two, got {num_segments}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    check_quantized_cache(k_cache, head_dim)
    group = num_heads // num_kv_heads
    block_d = next_power_of_2(head_dim)
    device = q.device
    common = dict(
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_G=max(16, next_power_of_2(group)), BLOCK_D=block_d,
        BLOCK_N=decode_block_n(head_dim), NUM_SEGMENTS=num_segments,
        UPCAST=needs_fp32_compute(device), PRECISION=dot_precision(q.dtype),
        KV_QUANT=kv_quant_code(k_cache),
    )
    if num_segments == 1:
        part_out = part_ml = out  # unused placeholders
    else:
        part_out = torch.empty(num_seqs, num_heads, num_segments, block_d,
                               dtype=torch.float32, device=device)
        part_ml = torch.empty(num_seqs, num_heads, num_segments, 2,
                              dtype=torch.float32, device=device)
    launcher(_paged_decode_kernel, device)[(num_seqs, num_kv_heads, num_segments)](
        out, part_out, part_ml,
        q, k_cache, v_cache, scale_view(k_cache), scale_view(v_cache), block_tables, seq_lens,
        scale * LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        **common,
    )
    if num_segments > 1:
        launcher(_merge_segments_kernel, device)[(num_seqs, num_heads)](
            out, part_out, part_ml, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SEGMENTS=num_segments,
        )
    return out
