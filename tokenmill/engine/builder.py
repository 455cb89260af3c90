"""Composition root: from :class:`EngineArgs` to a running :class:`EngineCore`.

Loading the weights, sizing and allocating the KV cache, and wiring the
scheduler, executor, sampler and speculator happen here and nowhere else, so
each part can be built from its own pieces in tests (``EngineCore`` takes them
as arguments; a fake executor is enough to test the core without a model).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenmill.attention.base import get_attention_backend
from tokenmill.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from tokenmill.distributed import TPGroup
from tokenmill.engine.args import EngineArgs
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.core import EngineCore
from tokenmill.engine.executor import Executor
from tokenmill.engine.messages import EngineInfo
from tokenmill.engine.placement import rank_device, rank_threads
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.structured import StructuredOutputManager
from tokenmill.engine.validation import EngineLimits
from tokenmill.runner.cuda_graphs import DEFAULT_MAX_CAPTURE_BATCH, CudaGraphConfig
from tokenmill.runner.kv_cache import allocate_kv_cache, bytes_per_block, num_kv_blocks
from tokenmill.runner.model_runner import ModelRunner, profile_peak_memory
from tokenmill.sampling import Sampler

logger = logging.getLogger(__name__)


@dataclass
class BuiltEngine:
    """An engine core and what a front end needs beside it."""

    core: EngineCore
    info: EngineInfo
    config: EngineConfig
    model_config: ModelConfig
    tokenizer: Any  # the model's Tokenizer, or None for bare dummy configs
    model_path: str
    gguf_file: str | None


@dataclass
class RankModel:
    """One rank's model shard, KV cache and runner (every rank builds one alike)."""

    runner: ModelRunner
    loaded: Any  # LoadedModel
    resolved: Any  # ResolvedModel
    num_blocks: int
    cache_cfg: CacheConfig
    sched_cfg: SchedulerConfig
    dtype: torch.dtype
    backend: Any
    load_s: float
    draft: Any = None  # rank 0's draft model (LoadedModel), when one is configured


DraftLoader = Callable[[ModelConfig, SchedulerConfig], Any]


def build_rank_model(
    args: EngineArgs, tp: TPGroup, device: torch.device,
    draft_loader: DraftLoader | None = None,
) -> RankModel:
    """Load this rank's shard, size the KV cache, allocate it, wrap both in a runner.

    Every rank runs this in the same order: sizing (and GPU profiling) use
    collectives, and every rank must end up with the same number of blocks.
    ``draft_loader(target_config, scheduler_config)`` (rank 0 with a draft
    model) loads the draft before the KV budget is computed, so its weights
    and cache count against it.
    """
    from tokenmill.model.loader import load_model, resolve_model

    args = args.resolved_for(device)
    dtype = args.resolved_dtype(device)
    backend = get_attention_backend(args.resolved_backend(device), args.batch_invariant)
    if args.batch_invariant and device.type != "cpu":
        logger.warning("--batch-invariant: only the CPU kernels are made batch-invariant; "
                       "on %s a request's numbers can still depend on its batch", device)
    t0 = time.perf_counter()
    resolved = resolve_model(args.model, args.load_format)
    loaded = load_model(resolved, dtype=dtype, device=str(device), attn_backend=backend,
                        quantization=args.quantization, tp=tp, max_model_len=args.max_model_len,
                        batch_invariant=args.batch_invariant)
    load_s = time.perf_counter() - t0
    model_config = loaded.config
    kv_heads = loaded.model.shard.num_kv_heads
    cache_cfg = args.cache_config()
    sched_cfg = args.scheduler_config(model_config.max_position_embeddings, device)
    draft = draft_loader(model_config, sched_cfg) if draft_loader is not None else None
    peak = None
    if (device.type == "cuda" and cache_cfg.kv_cache_memory is None
            and cache_cfg.num_gpu_blocks_override is None):
        # Size the KV cache from what a worst-case step leaves free.
        mc = model_config
        peak = profile_peak_memory(
            loaded.model, mc.num_hidden_layers, kv_heads, mc.head_dim,
            sched_cfg.max_num_batched_tokens, sched_cfg.max_num_seqs,
            cache_cfg.block_size, dtype, device,
        )
        torch.cuda.empty_cache()  # hand the profiling activations back to the device
    num_blocks = num_kv_blocks(model_config, cache_cfg, dtype, device, peak, kv_heads)
    if draft is not None and cache_cfg.num_gpu_blocks_override is None:
        from tokenmill.spec.draft_model import split_kv_blocks

        # The draft's cache mirrors the target's block for block: share the budget.
        num_blocks = split_kv_blocks(num_blocks, model_config, draft.config,
                                     cache_cfg.block_size, dtype, cache_cfg.kv_cache_dtype)
    num_blocks = tp.min_int(num_blocks)  # every rank holds the same blocks
    kv = allocate_kv_cache(model_config, num_blocks, cache_cfg.block_size, dtype, device,
                           kv_heads, cache_cfg.kv_cache_dtype)
    graph_cfg = None
    if device.type == "cuda" and not args.enforce_eager and not tp.sharded:
        # Decode graphs are captured on single-rank engines only (collectives run eagerly).
        largest = args.max_cudagraph_batch_size or DEFAULT_MAX_CAPTURE_BATCH
        graph_cfg = CudaGraphConfig(
            max_batch_size=max(1, min(largest, sched_cfg.max_num_seqs)),
            max_model_len=sched_cfg.max_model_len,
        )
    runner = ModelRunner(loaded.model, kv, cache_cfg.block_size, attn_backend=backend,
                         graph_config=graph_cfg)
    runner.capture_cuda_graphs()
    return RankModel(runner, loaded, resolved, num_blocks, cache_cfg, sched_cfg, dtype,
                     backend, load_s, draft)


def build_engine(args: EngineArgs, log_level: str = "info") -> BuiltEngine:
    """Load the model and build the engine core (blocking: seconds to minutes).

    With ``tensor_parallel_size > 1`` this process becomes rank 0: it starts the
    other ranks of this node (worker processes), joins the group and, per step,
    publishes the scheduler's output to them; the scheduler, block manager,
    sampler and speculator run here only.
    """
    pc = args.parallel_config()
    # "auto" is resolved once, here, so this node's ranks all load the same layers.
    args = args.resolved_for(rank_device(args, 0, pc))
    launch = None
    group = TPGroup()
    if pc.tensor_parallel_size > 1:
        from tokenmill.engine.tensor_parallel import launch_rank0

        launch, args = launch_rank0(args, log_level)
        group = launch.group
    try:
        device = rank_device(args, 0, pc)
        if device.type == "cpu":
            torch.set_num_threads(rank_threads(args, pc))
        spec_cfg = args.speculative_config()
        draft_loader = None
        if spec_cfg is not None and spec_cfg.method == "draft":
            draft_loader = _draft_loader(args, spec_cfg.model or "", device)
        rank = build_rank_model(args, group, device, draft_loader)
        if launch is not None:
            from tokenmill.engine.tensor_parallel import open_step_channel

            open_step_channel(launch, (args.dist_init_addr or "").rpartition(":")[0])
        return _assemble(args, rank, device, launch)
    except BaseException:
        if launch is not None:
            launch.stop()
        raise


def _draft_loader(args: EngineArgs, path: str, device: torch.device) -> DraftLoader:
    def load(target: ModelConfig, sched_cfg: SchedulerConfig) -> Any:
        from tokenmill.spec.draft_model import load_draft_model

        # Whole, on rank 0 only: the draft is small and its passes need no peers.
        return load_draft_model(
            path, target, sched_cfg.max_model_len, args.resolved_dtype(device), device,
            get_attention_backend(args.resolved_backend(device)),
            load_format="dummy" if args.load_format == "dummy" else "auto",
            quantization=args.speculative_quantization,
        )

    return load


def _assemble(args: EngineArgs, rank: RankModel, device: torch.device,
              launch: Any) -> BuiltEngine:
    """Rank 0's engine core around its runner: scheduler, sampler, speculator, executor."""
    loaded, resolved = rank.loaded, rank.resolved
    model_config = loaded.config
    cache_cfg, sched_cfg, dtype = rank.cache_cfg, rank.sched_cfg, rank.dtype
    num_blocks = rank.num_blocks
    tokenizer = _tokenizer(args, resolved, getattr(loaded, "gguf_reader", None))
    config = EngineConfig(
        model=model_config, model_path=resolved.path, cache=cache_cfg,
        scheduler=sched_cfg, dtype=dtype, quantization=args.quantization, device=str(device),
        load_format=resolved.format, attention_backend=rank.backend.name, seed=args.seed,
        num_threads=args.num_threads, parallel=args.parallel_config(),
    )
    eos_token_ids = tuple(
        tokenizer.eos_token_ids if tokenizer is not None else model_config.eos_token_ids)
    window = model_config.kv_window
    if rank.draft is not None:
        # The draft reads the same blocks: release them only if it never needs them either.
        draft_window = rank.draft.config.kv_window
        window = None if window is None or draft_window is None else max(window, draft_window)
    kv_offload = None
    if cache_cfg.offload_enabled:
        if launch is not None:
            raise ValueError("--kv-offload-memory/--kv-offload-dir are not supported with "
                             "tensor parallelism yet")
        kv_offload = _kv_offload(args, rank, cache_cfg)
    scheduler = Scheduler(
        sched_cfg, BlockManager(num_blocks, cache_cfg.block_size, cache_cfg.enable_prefix_caching),
        eos_token_ids, sliding_window=window, kv_tiers=kv_offload,
    )
    generator = torch.Generator(device=device).manual_seed(args.seed)
    spec_cfg = args.speculative_config()
    speculator = None
    draft_runner = None
    if spec_cfg is not None:
        from tokenmill.engine.speculation import Speculator
        from tokenmill.spec.draft_model import build_draft_proposer

        draft = None if rank.draft is None else build_draft_proposer(
            rank.draft, num_blocks, cache_cfg.block_size, dtype, device, rank.backend,
            eos_token_ids, generator, cache_cfg.kv_cache_dtype,
        )
        draft_runner = draft.runner if draft is not None else None
        speculator = Speculator(spec_cfg, scheduler, sched_cfg.max_model_len, eos_token_ids,
                                generator, draft)
    if launch is not None:
        from tokenmill.engine.tensor_parallel import TPExecutor

        executor: Executor = TPExecutor(rank.runner, launch, draft_runner)
    else:
        executor = Executor(rank.runner, draft_runner)
    limits = EngineLimits(
        max_model_len=sched_cfg.max_model_len, vocab_size=model_config.vocab_size,
        num_kv_blocks=num_blocks, block_size=cache_cfg.block_size,
    )
    structured = _structured_outputs(args, tokenizer, model_config.vocab_size, eos_token_ids)
    async_scheduling = args.resolved_async_scheduling(device)
    if async_scheduling and (speculator is not None or not executor.supports_async_scheduling):
        logger.info("async scheduling off: not supported with %s",
                    "speculative decoding" if speculator is not None else "tensor parallelism")
        async_scheduling = False
    core = EngineCore(scheduler, executor, Sampler(generator), limits, speculator, structured,
                      kv_offload, async_scheduling=async_scheduling)
    info = EngineInfo(
        model_name=model_name(resolved.path, resolved.gguf_file), limits=limits,
        eos_token_ids=list(eos_token_ids), architecture=model_config.architecture,
        pid=os.getpid(),
    )
    capacity = num_blocks * cache_cfg.block_size
    kv_heads = loaded.model.shard.num_kv_heads
    kv_mib = num_blocks * bytes_per_block(model_config, cache_cfg.block_size, dtype,
                                          kv_heads, cache_cfg.kv_cache_dtype) / 2**20
    tp = config.parallel.tensor_parallel_size
    logger.info(
        "loaded %s (%s, %s) in %.1fs on %s%s; KV cache (%s): %d blocks x %d tokens = %d tokens "
        "(%.0f MiB%s); max concurrency at full context (%d tokens): %.2f",
        model_config.architecture, resolved.format,
        str(dtype).replace("torch.", "") + (f", {args.quantization} weights"
                                            if args.quantization else ""),
        rank.load_s, device, f" (tensor parallel {tp})" if tp > 1 else "",
        cache_cfg.kv_cache_dtype, num_blocks,
        cache_cfg.block_size, capacity, kv_mib, " per rank" if tp > 1 else "",
        sched_cfg.max_model_len, capacity / sched_cfg.max_model_len,
    )
    return BuiltEngine(core, info, config, model_config, tokenizer, resolved.path,
                       resolved.gguf_file)


def _weights_identity(resolved: Any, seed: int) -> dict[str, str]:
    """Fingerprints of the files a model's weights (and config) come from."""
    from tokenmill.engine.kv_offload import file_fingerprint

    if resolved.format == "gguf":
        return {"gguf": file_fingerprint(resolved.gguf_file)}
    root = Path(resolved.path)
    files = sorted(p for p in root.iterdir() if p.is_file() and (
        p.suffix in (".safetensors", ".bin", ".pt") or p.name == "config.json"))
    out = {p.name: file_fingerprint(p) for p in files}
    if resolved.format == "dummy":
        out["dummy_seed"] = str(seed)  # random weights drawn from this seed
    return out


def _kv_offload(args: EngineArgs, rank: RankModel, cache_cfg: CacheConfig) -> Any:
    """The prefix cache's offload tiers, keyed by this model's identity and KV settings."""
    from tokenmill.engine.kv_offload import KVOffloadManager, namespace_digest
    from tokenmill.engine.kv_store import DiskKVStore, HostKVStore
    from tokenmill.model.loader import resolve_model

    identity: dict[str, Any] = {
        "format": 1,
        "weights": _weights_identity(rank.resolved, args.seed),
        "config": repr(rank.loaded.config),
        "dtype": str(rank.dtype),
        "kv_cache_dtype": cache_cfg.kv_cache_dtype,
        "block_size": cache_cfg.block_size,
        "quantization": args.quantization,
        "kv_layout": list(rank.runner.kv_cache.shape[:2] + rank.runner.kv_cache.shape[3:]),
    }
    if rank.draft is not None:
        identity["draft"] = {
            "weights": _weights_identity(resolve_model(args.speculative_model or "", "auto"),
                                         args.seed),
            "config": repr(rank.draft.config),
            "quantization": args.speculative_quantization,
        }
    tiers: list[Any] = []
    if cache_cfg.offload_memory_bytes:
        tiers.append(HostKVStore(cache_cfg.offload_memory_bytes))
    if cache_cfg.offload_dir is not None:
        tiers.append(DiskKVStore(cache_cfg.offload_dir, cache_cfg.offload_dir_bytes))
    manager = KVOffloadManager(tiers, namespace_digest(identity), cache_cfg.block_size)
    logger.info("KV offload tiers: %s", ", ".join(
        f"memory {cache_cfg.offload_memory_bytes / 2**30:.2f} GiB" if t.name == "memory"
        else f"disk {cache_cfg.offload_dir} ({t.num_blocks} blocks, "
             f"{t.num_bytes / 2**20:.0f} MiB of {cache_cfg.offload_dir_bytes / 2**30:.1f} GiB)"
        for t in tiers))
    return manager


def _structured_outputs(args: EngineArgs, tokenizer: Any, vocab_size: int,
                        eos_token_ids: tuple[int, ...]) -> StructuredOutputManager | None:
    """The grammar compiler and matcher factory (None without a tokenizer: no vocabulary)."""
    if tokenizer is None:
        return None
    from tokenmill.sampling.grammar import GrammarCompiler, tokenizer_info

    compiler = GrammarCompiler(
        lambda: tokenizer_info(tokenizer, vocab_size, eos_token_ids),
        cache_size=args.structured_outputs_cache_size)
    markers = None
    if args.reasoning_parser is not None:
        markers = reasoning_markers(args.reasoning_parser, tokenizer)
    return StructuredOutputManager(compiler, vocab_size, markers)


def reasoning_markers(name: str, tokenizer: Any) -> Any:
    """The token ids of a reasoning format's markers in this vocabulary."""
    from tokenmill.sampling.grammar import ReasoningMarkers
    from tokenmill.tokenizer.reasoning import get_reasoning_format

    fmt = get_reasoning_format(name)
    start = tuple(tokenizer.encode(fmt.start, add_special_tokens=False))
    end = tuple(tokenizer.encode(fmt.end, add_special_tokens=False))
    if len(start) != 1 or len(end) != 1:
        logger.warning("reasoning markers %r / %r are not single tokens in this vocabulary; "
                       "grammars start after the token sequence %s", fmt.start, fmt.end, end)
    return ReasoningMarkers(start, end, fmt.starts_in_reasoning)


def load_tokenizer(args: EngineArgs) -> Any:
    """The tokenizer of the model ``args`` name, without loading the model.

    Used by the API server process, which needs text <-> tokens but no weights.
    """
    from tokenmill.model.loader import resolve_model

    return _tokenizer(args, resolve_model(args.model, args.load_format), None)


def _tokenizer(args: EngineArgs, resolved: Any, gguf_reader: Any) -> Any:
    """The model's tokenizer (GGUF metadata or HF files), or None for bare dummy configs."""
    from tokenmill.tokenizer import Tokenizer

    if args.tokenizer is not None:
        return Tokenizer.from_path(args.tokenizer)
    if gguf_reader is not None:
        return Tokenizer.from_gguf_reader(gguf_reader)
    if resolved.gguf_file:
        return Tokenizer.from_gguf_file(resolved.gguf_file)
    if os.path.isfile(os.path.join(resolved.path, "tokenizer.json")):
        return Tokenizer.from_hf_dir(resolved.path)
    logger.warning("no tokenizer found for %s: only token-id prompts are accepted",
                   resolved.path)
    return None


def model_name(path: str, gguf_file: str | None) -> str:
    """A short model id: the directory name, or the GGUF file name without quantization."""
    if gguf_file:
        name = os.path.basename(gguf_file)
        name = name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
        stem, dot, suffix = name.rpartition(".")
        # "SmolLM2-135M-Instruct.Q4_1" -> "SmolLM2-135M-Instruct"
        if dot and suffix.upper().startswith(("Q", "F16", "F32", "BF16", "IQ")):
            name = stem
        return name
    return os.path.basename(os.path.normpath(path))
