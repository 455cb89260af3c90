"""What a capacity plan depends on: model, weights, GPU, dtypes and parallelism."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.config import ModelConfig
from tokenmill.plan.hardware import GIB, GPUSpec, get_gpu
from tokenmill.plan.sources import ModelSource, load_model_source
from tokenmill.plan.weights import (
    KV_DTYPE_BYTES,
    KV_SCALE_BYTES,
    WEIGHT_DTYPE_BYTES,
    WeightBytes,
    count_parameters,
    normalize_dtype,
    weight_bytes_for_dtype,
)

DEFAULT_RESERVE_BYTES = GIB  # activations, CUDA context, cuBLAS workspaces
DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class PlanInputs:
    """One deployment to plan: a model's weights on ``tp`` GPUs of one kind.

    All derived numbers (memory, roofline) are per GPU. ``reserve_bytes`` is
    set aside on each GPU for activations and runtime overhead before the KV
    cache gets the rest of ``gpu_memory_utilization`` x memory.
    """

    config: ModelConfig
    gpu: GPUSpec
    weights: WeightBytes
    max_model_len: int
    kv_dtype: str = "bf16"
    tp: int = 1
    gpu_memory_utilization: float = 0.9
    reserve_bytes: int = DEFAULT_RESERVE_BYTES
    block_size: int = DEFAULT_BLOCK_SIZE
    model_name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kv_dtype", normalize_dtype(self.kv_dtype, KV_DTYPE_BYTES, "KV"))
        cfg = self.config
        if self.tp < 1:
            raise ValueError(f"--tp must be >= 1, got {self.tp}")
        if cfg.num_attention_heads % self.tp:
            raise ValueError(f"--tp {self.tp} does not divide the {cfg.num_attention_heads} "
                             "attention heads")
        kv = cfg.num_key_value_heads
        if kv % self.tp and self.tp % kv:
            raise ValueError(f"--tp {self.tp} neither divides nor is a multiple of the {kv} "
                             "KV heads")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("--gpu-memory-utilization must be in (0, 1]")
        if self.max_model_len < 1:
            raise ValueError("--max-model-len must be positive")
        if self.block_size < 1:
            raise ValueError("--block-size must be positive")
        if self.reserve_bytes < 0:
            raise ValueError("the memory reserve cannot be negative")

    @property
    def kv_dtype_bytes(self) -> float:
        """Bytes per cached K or V element, scales included: tokenmill's 8-bit KV
        (``--kv-cache-dtype int8|fp8``) stores a float32 scale per token and KV head,
        i.e. ``head_dim`` codes + 4 bytes per row."""
        scale = KV_SCALE_BYTES.get(self.kv_dtype, 0) / self.config.head_dim
        return KV_DTYPE_BYTES[self.kv_dtype] + scale

    @property
    def heads_per_gpu(self) -> int:
        return self.config.num_attention_heads // self.tp

    @property
    def kv_heads_per_gpu(self) -> int:
        return kv_heads_per_gpu(self.config, self.tp)


def kv_heads_per_gpu(cfg: ModelConfig, tp: int = 1) -> int:
    """KV heads each GPU stores: split across GPUs, replicated once tp exceeds them."""
    return max(1, cfg.num_key_value_heads // tp)


def build_inputs(
    model: str | ModelSource,
    gpu: str | GPUSpec,
    *,
    dtype: str | None = None,
    kv_dtype: str | None = None,
    tp: int = 1,
    max_model_len: int | None = None,
    gpu_memory_utilization: float = 0.9,
    reserve_bytes: int = DEFAULT_RESERVE_BYTES,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> PlanInputs:
    """Assemble ``PlanInputs`` from user-level choices.

    ``dtype=None`` means the sizes of a GGUF file's tensors for a GGUF model and
    bf16 otherwise. ``kv_dtype=None`` follows ``dtype`` when that is a valid KV
    dtype (fp32, bf16, fp16, int8), else fp16. ``max_model_len=None`` is the
    model's ``max_position_embeddings``.
    """
    source = model if isinstance(model, ModelSource) else load_model_source(model)
    spec = gpu if isinstance(gpu, GPUSpec) else get_gpu(gpu)
    if dtype is None and source.file_weights is not None:
        weights = source.file_weights
    else:
        dtype = normalize_dtype(dtype or "bf16", WEIGHT_DTYPE_BYTES, "weight")
        weights = weight_bytes_for_dtype(count_parameters(source.config), dtype)
    if kv_dtype is None:
        kv_dtype = dtype if dtype in KV_DTYPE_BYTES else "fp16"
    return PlanInputs(
        config=source.config,
        gpu=spec,
        weights=weights,
        max_model_len=max_model_len or source.config.max_position_embeddings,
        kv_dtype=kv_dtype,
        tp=tp,
        gpu_memory_utilization=gpu_memory_utilization,
        reserve_bytes=reserve_bytes,
        block_size=block_size,
        model_name=source.name,
    )
