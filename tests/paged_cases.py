"""Random paged-attention inputs and the reference the CPU kernels are checked against."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.kernels import cpu


def paged_layout(q_lens, seq_lens, num_blocks, block_size, heads, dim, generator):
    """Block tables over a random permutation of the pool, query offsets and queries.

    Returns ``(q, query_start_loc, seq_lens, block_tables)`` as the kernels take them.
    """
    perm = torch.randperm(num_blocks, generator=generator)
    max_blocks = max(-(-n // block_size) for n in seq_lens)
    tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    used = 0
    for i, n in enumerate(seq_lens):
        count = -(-n // block_size)
        tables[i, :count] = perm[used:used + count]
        used += count
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    q = torch.randn(int(qsl[-1]), heads, dim, generator=generator)
    return q, qsl, torch.tensor(seq_lens, dtype=torch.int32), tables


def reference_attention(q, k_cache, v_cache, qsl, seq_lens, tables, scale, window=None):
    """The torch backend's SDPA path, one sequence at a time (any cache format it reads)."""
    out = torch.zeros_like(q)
    for i in range(len(seq_lens)):
        a, b = int(qsl[i]), int(qsl[i + 1])
        if b > a:
            out[a:b] = TorchAttentionBackend._prefill_one(
                q[a:b], k_cache, v_cache, tables[i], int(seq_lens[i]), scale, window)
    return out


def dense_reference_attention(q, k_cache, v_cache, qsl, seq_lens, tables, scale, window):
    """Independent of the backends: every score computed, then masked to the window
    (``window`` >= the longest sequence for none); in q's dtype."""
    out = torch.zeros_like(q)
    group = q.shape[1] // k_cache.shape[2]
    for i in range(len(seq_lens)):
        a, b, n = int(qsl[i]), int(qsl[i + 1]), int(seq_lens[i])
        keys = k_cache[tables[i].long()].reshape(-1, *k_cache.shape[2:])[:n].to(q.dtype)
        values = v_cache[tables[i].long()].reshape(-1, *v_cache.shape[2:])[:n].to(q.dtype)
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        for j in range(b - a):
            pos = n - (b - a) + j
            lo = max(0, pos - window + 1)
            scores = torch.einsum("hd,khd->hk", q[a + j], keys[lo:pos + 1]) * scale
            out[a + j] = torch.einsum("hk,khd->hd", scores.softmax(-1), values[lo:pos + 1])
    return out


@contextlib.contextmanager
def kernels_built_for(march: str | None, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The kernel module with its library built for ``march`` (None: this CPU's), rebuilt
    as this CPU's afterwards."""
    if march is not None:
        monkeypatch.setenv("TOKENMILL_CPU_MARCH", march)
    cpu.cpu_kernels.cache_clear()
    try:
        yield cpu
    finally:
        monkeypatch.delenv("TOKENMILL_CPU_MARCH", raising=False)
        cpu.cpu_kernels.cache_clear()
