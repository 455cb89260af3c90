"""Sizing and allocating the one KV-cache tensor of the engine."""

from __future__ import annotations

import logging

import torch

from tokenmill.config import CacheConfig, ModelConfig
from tokenmill.kernels.kv_quant import row_bytes, row_width, storage_dtype

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB when the user names no budget


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype,
                    num_kv_heads: int | None = None, kv_cache_dtype: str = "auto") -> int:
    """Bytes of K and V for ``block_size`` tokens across all layers.

    ``dtype`` is the model's; ``kv_cache_dtype`` (auto | bfloat16 | float16 | int8 | fp8) how K/V
    are stored (quantized rows carry their scales). ``num_kv_heads``: the heads
    this tensor-parallel rank holds (default: all).
    """
    heads = model.num_key_value_heads if num_kv_heads is None else num_kv_heads
    row = row_bytes(model.head_dim, kv_cache_dtype, dtype)
    return 2 * model.num_hidden_layers * heads * row * block_size


def gpu_kv_cache_budget(
    total: int, free: int, reserved: int, peak: int, utilization: float
) -> int:
    """Bytes the KV cache may take on a GPU (may be <= 0 when nothing is left).

    ``utilization`` of the device's ``total`` memory is ours to use; from it
    go ``peak`` (the most this process had allocated: weights plus the
    activations of a worst-case step) and whatever other processes (and the
    CUDA context) hold: ``total - free - reserved``, where ``reserved`` is
    what PyTorch's allocator holds for this process.
    """
    other = max(total - free - reserved, 0)
    return int(total * utilization) - peak - other


def num_kv_blocks(
    model: ModelConfig,
    cache: CacheConfig,
    dtype: torch.dtype,
    device: torch.device,
    peak_memory: int | None = None,
    num_kv_heads: int | None = None,
) -> int:
    """How many blocks the memory budget holds (on this rank, with ``num_kv_heads``).

    CPU: ``cache.kv_cache_memory`` bytes (default 1 GiB). GPU: an explicit
    ``kv_cache_memory`` wins; otherwise :func:`gpu_kv_cache_budget` with
    ``peak_memory`` (from a profiling forward pass run by the caller; default:
    the allocator's peak so far). The budget is logged.
    """
    if cache.num_gpu_blocks_override is not None:
        return cache.num_gpu_blocks_override
    per_block = bytes_per_block(model, cache.block_size, dtype, num_kv_heads,
                                cache.kv_cache_dtype)
    if cache.kv_cache_memory is not None:
        budget = cache.kv_cache_memory
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device)
        peak = torch.cuda.max_memory_allocated(device) if peak_memory is None else peak_memory
        budget = gpu_kv_cache_budget(total, free, reserved, peak, cache.gpu_memory_utilization)
        logger.info(
            "GPU memory: total %.2f GiB x utilization %.2f; peak of a worst-case step "
            "(weights + activations) %.2f GiB; other processes and CUDA context %.2f GiB; "
            "KV-cache budget %.2f GiB",
            total / 2**30, cache.gpu_memory_utilization, peak / 2**30,
            max(total - free - reserved, 0) / 2**30, budget / 2**30,
        )
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
    model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
    device: torch.device, num_kv_heads: int | None = None, kv_cache_dtype: str = "auto",
) -> torch.Tensor:
    """One tensor [layers, 2 (K/V), num_blocks, block_size, kv_heads, row].

    ``row`` is ``head_dim`` in the model's ``dtype``, or with ``kv_cache_dtype``
    int8/fp8 ``head_dim`` codes + a 4-byte scale (:mod:`tokenmill.kernels.kv_quant`).
    """
    heads = model.num_key_value_heads if num_kv_heads is None else num_kv_heads
    return torch.zeros(
        model.num_hidden_layers, 2, num_blocks, block_size, heads,
        row_width(model.head_dim, kv_cache_dtype),
        dtype=storage_dtype(kv_cache_dtype, dtype), device=device,
    )
