"""The attention-backend interface and the per-step metadata every layer reads.

A step runs the model once over the flattened new tokens of all scheduled
requests (prefill chunks and decodes mixed). Request ``i`` contributes the
query tokens ``query_start_loc[i]:query_start_loc[i+1]``; after this step its
context holds ``seq_lens[i]`` tokens, the last ``query_len`` of which are the
new ones. K/V for every context token live in the paged cache, reached through
``block_tables[i]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner, read by every attention layer."""

    num_tokens: int  # real (unpadded) query tokens in this step
    slot_mapping: torch.Tensor  # [T] int64 cache slot of each new token; -1 = padding
    query_start_loc: torch.Tensor  # [B+1] int32 cumulative query lengths
    seq_lens: torch.Tensor  # [B] int32 context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    # Host copies for backends that branch or loop in Python.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # Whether any slot is -1 (padding), known on the host; None = unknown, check on device.
    has_padding_slots: bool | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(Protocol):
    """Writes the new K/V into the paged cache, then attends.

    Shapes: ``q`` [T, num_heads, head_dim]; ``k``/``v`` [T, num_kv_heads, head_dim];
    ``k_cache``/``v_cache`` [num_blocks, block_size, num_kv_heads, head_dim].
    Returns [T, num_heads, head_dim]. Attention is causal: query token ``j`` of
    request ``i`` sits at position ``p = seq_lens[i] - query_len + j`` and sees
    context positions ``<= p``; with ``sliding_window`` W only the last W of
    them, ``p - W < position <= p`` (transformers' convention). Keys outside
    the window are never read, so their blocks may have been freed (a block
    table entry there may point anywhere).
    """

    name: str

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
    ) -> torch.Tensor: ...


def window_start(position: int, sliding_window: int | None) -> int:
    """First key position a query at ``position`` attends to."""
    if sliding_window is None:
        return 0
    return max(0, position - sliding_window + 1)


def get_attention_backend(name: str, batch_invariant: bool = False) -> AttentionBackend:
    """Return the backend registered under ``name`` ("torch" or "triton").

    ``batch_invariant``: the CPU kernels attend every query with the same kernel, however
    long its chunk (see :class:`~tokenmill.attention.torch_backend.TorchAttentionBackend`).
    """
    if name == "torch":
        from tokenmill.attention.torch_backend import (
            SHORT_QUERY_LEN,
            UNLIMITED_QUERY_LEN,
            TorchAttentionBackend,
        )

        return TorchAttentionBackend(UNLIMITED_QUERY_LEN if batch_invariant else SHORT_QUERY_LEN)
    if name == "triton":
        from tokenmill.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; choose 'torch' or 'triton'")
