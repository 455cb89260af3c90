"""Sizing and allocating the one KV-cache tensor of the engine."""

from __future__ import annotations

import logging

import torch

from tokenmill.config import CacheConfig, ModelConfig

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB when the user names no budget


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for ``block_size`` tokens across all layers."""
    elem = torch.empty((), dtype=dtype).element_size()
    return model.kv_bytes_per_token_per_dtype_byte * elem * block_size


def num_kv_blocks(
    model: ModelConfig,
    cache: CacheConfig,
    dtype: torch.dtype,
    device: torch.device,
) -> int:
    """How many blocks the memory budget holds.

    CPU: ``cache.kv_cache_memory`` bytes (default 1 GiB). GPU: an explicit
    ``kv_cache_memory`` wins; otherwise ``gpu_memory_utilization`` of the
    device's total memory minus what is already allocated (weights and the
    peak of a profiling forward pass run by the caller before this).
    """
    if cache.num_gpu_blocks_override is not None:
        return cache.num_gpu_blocks_override
    per_block = bytes_per_block(model, cache.block_size, dtype)
    if cache.kv_cache_memory is not None:
        budget = cache.kv_cache_memory
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used_by_us = torch.cuda.max_memory_allocated(device)
        other = total - free - torch.cuda.memory_reserved(device)
        budget = int(total * cache.gpu_memory_utilization) - used_by_us - max(other, 0)
    else:
        budget = DEFAULT_CPU_KV_CACHE_BYTES
    blocks = budget // per_block
    if blocks <= 0:
        raise ValueError(
            f"the KV-cache budget ({budget / 2**20:.1f} MiB) is smaller than one block "
            f"({per_block / 2**20:.2f} MiB); raise kv_cache_memory or gpu_memory_utilization"
        )
    return int(blocks)


def allocate_kv_cache(
    model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """One tensor [layers, 2 (K/V), num_blocks, block_size, kv_heads, head_dim]."""
    return torch.zeros(
        model.num_hidden_layers, 2, num_blocks, block_size,
        model.num_key_value_heads, model.head_dim,
        dtype=dtype, device=device,
    )
