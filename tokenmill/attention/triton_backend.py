"""Attention backend built from Triton kernels (GPU; CPU through Triton's interpreter).

Per layer and step: one kernel stores the new K/V in the paged cache, then
either the paged decode kernel runs (every request has exactly one new token;
optionally split-K for long contexts and few sequences) or the varlen prefill
kernel runs over all requests at once (prefill chunks, prefix-cache hits and
decodes mixed). Same inputs and outputs as the PyTorch reference backend,
sliding windows included (both kernels start reading at each query's window).
"""

from __future__ import annotations

import torch

from tokenmill.attention.base import AttentionMetadata
from tokenmill.kernels.kv_write import write_kv_cache
from tokenmill.kernels.paged_decode import choose_num_segments, paged_decode_attention
from tokenmill.kernels.prefill_attention import prefill_attention


class TritonAttentionBackend:
    """Paged attention with Triton kernels.

    ``split_kv``: None picks split-K decoding by a heuristic (long context, few
    sequences); True/False forces it on/off, e.g. to keep one kernel variant
    inside a captured CUDA graph. ``num_segments`` overrides how many pieces
    the context is cut into when splitting (a power of two).
    """

    name = "triton"

    def __init__(self, split_kv: bool | None = None, num_segments: int | None = None) -> None:
        self.split_kv = split_kv
        self.num_segments = num_segments

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        num_seqs = meta.num_seqs
        covered = meta.query_start_loc_cpu[-1] if num_seqs else 0
        if meta.is_decode_only:
            covered = num_seqs
        if covered < q.shape[0]:
            out[covered:].zero_()  # padding rows, as in the reference backend
        if num_seqs == 0:
            return out
        if meta.is_decode_only:
            segments = self._decode_segments(meta, k_cache.shape[2], q.device)
            paged_decode_attention(
                out, q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                num_segments=segments, sliding_window=sliding_window,
            )
        else:
            prefill_attention(
                out, q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                meta.query_start_loc, scale, sliding_window,
            )
        return out

    def _decode_segments(self, meta: AttentionMetadata, num_kv_heads: int,
                         device: torch.device) -> int:
        """How many context segments each decode sequence is split into (1 = no split)."""
        if self.split_kv is False:
            return 1
        auto = choose_num_segments(meta.num_seqs, num_kv_heads, meta.max_seq_len, device)
        if self.split_kv is None and auto == 1:
            return 1
        return self.num_segments or max(auto, 2)
