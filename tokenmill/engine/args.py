"""User-facing engine arguments, shared by the offline API, the CLI and the server."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tokenmill.config import (
    KV_CACHE_DTYPES,
    CacheConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    parse_dtype,
    parse_memory,
)
from tokenmill.kernels.cpu_features import has_native_bf16

if TYPE_CHECKING:
    from tokenmill.model.loader import ResolvedModel

_AUTO = "auto"

# Overrides what ``--dtype auto`` picks on the CPU (e.g. float32 on every machine: the
# test suite compares against float32 references).
CPU_DTYPE_ENV = "TOKENMILL_CPU_DTYPE"
# Overrides what ``--quantization auto`` picks on the CPU (none / int4 / int8; the test
# suite sets none: its references run float weights).
CPU_QUANTIZATION_ENV = "TOKENMILL_CPU_QUANTIZATION"
QUANTIZATION_CHOICES = (_AUTO, "none", "int4", "int8")

# Token budget per step when none is given. On the CPU a step of 2,048 prompt tokens
# takes seconds, and every running stream waits for it; a few hundred rows already
# fill the cores' matmuls, so a smaller budget lets the first prompts of a burst start
# decoding sooner at no cost in throughput: 1,024 gave 0.57x the mean time to first
# token of 2,048 at 32 streams; with the panel matmuls 512 gives 0.76-0.85x that of
# 1,024 at 8 and 32 streams, 0.99-1.08x the output tok/s, and a 2,000-token prompt no
# slower (docs/performance.md).
DEFAULT_BATCHED_TOKENS = {"cuda": 8192, "cpu": 512}


def default_cpu_dtype(quantization: str | None, native_bf16: bool | None = None) -> torch.dtype:
    """What ``--dtype auto`` means on the CPU.

    bfloat16 where the CPU multiplies it in hardware (AVX512_BF16, AMX-BF16;
    ``native_bf16`` overrides the detection) and the weights are not quantized:
    oneDNN's bfloat16 GEMMs there run 2-3x faster than float32 and read half the
    bytes (perplexity change -0.08% on SmolLM2, docs/performance.md). float32
    elsewhere - emulated bfloat16 is ~3x slower than float32 - and for int4/int8
    weights, whose integer kernels take float32 activations. ``TOKENMILL_CPU_DTYPE``
    (float32 / bfloat16) overrides the choice.
    """
    override = os.environ.get(CPU_DTYPE_ENV, "")
    if override:
        dtype = parse_dtype(override)
        if dtype == torch.float16:
            raise ValueError(f"{CPU_DTYPE_ENV}={override!r}: choose float32 or bfloat16")
        return dtype
    native = has_native_bf16() if native_bf16 is None else native_bf16
    return torch.bfloat16 if native and quantization is None else torch.float32


def auto_quantization(
    resolved: ResolvedModel, device: torch.device, dtype: str = _AUTO
) -> str | None:
    """What ``--quantization auto`` means: a GGUF file's own weight quantization on
    CPUs whose integer kernels run it, as llama.cpp runs its files.

    A file whose decoder matrices are all Q4_0/Q4_1 gets ``int4``, all Q8_0 ``int8``
    (:func:`~tokenmill.model.gguf_loader.file_quantization`; the codes load exactly)
    where the CPU has the panel kernels (int4: AVX2 or AVX512-VNNI; int8: AVX512-VNNI),
    and ``--dtype`` is auto or float32 (the kernels take float32 activations). Everything
    else - GPUs, safetensors, float or K-quant files, other CPUs - loads float weights.
    ``TOKENMILL_CPU_QUANTIZATION`` (none / int4 / int8) overrides the choice on the CPU.
    """
    if device.type != "cpu":
        return None
    override = os.environ.get(CPU_QUANTIZATION_ENV, "")
    if override:
        if override not in QUANTIZATION_CHOICES[1:]:
            raise ValueError(f"{CPU_QUANTIZATION_ENV}={override!r}: choose none, int4 or int8")
        return None if override == "none" else override
    if resolved.format != "gguf" or dtype not in (_AUTO, "float32"):
        return None
    from tokenmill.kernels import cpu
    from tokenmill.model.gguf_loader import file_quantization, open_gguf

    method = file_quantization(open_gguf(resolved.gguf_file))
    # int8 only where measured ahead of float weights at every batch: the VNNI path.
    runs = {"int4": cpu.q4_panels_available, "int8": cpu.int8_panels_vnni}
    return method if method is not None and runs[method]() else None


@dataclass
class EngineArgs:
    """Everything a user may set when creating an engine; ``None``/"auto" = pick a default."""

    model: str | None = None  # None = the bundled SmolLM2-135M-Instruct GGUF
    tokenizer: str | None = None  # defaults to the model's own tokenizer
    load_format: str = _AUTO  # auto | safetensors | gguf | dummy
    # auto: bfloat16 on GPU; on CPU see default_cpu_dtype | float32 | bfloat16 | float16
    dtype: str = _AUTO
    # auto (a GGUF file's own int4/int8 on the CPU, see auto_quantization) | None/"none"
    # | "int4" | "int8" (weight-only, CPU)
    quantization: str | None = _AUTO
    device: str = _AUTO  # auto | cpu | cuda | cuda:N
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory: int | str | None = None  # bytes or "2GiB"
    # auto (the model's dtype; float16 for a float32 model with int4/int8 weights on the
    # CPU) | float32 | bfloat16 | float16 | int8 | fp8
    kv_cache_dtype: str = _AUTO
    # Prefix-cache offload tiers: host memory (e.g. "4GiB") and a disk directory.
    kv_offload_memory: int | str | None = None
    kv_offload_dir: str | None = None
    kv_offload_dir_size: int | str = "16GiB"
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # exact block count (tests); overrides the budget
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "fcfs"
    attention_backend: str = _AUTO  # auto | torch | triton
    enforce_eager: bool = False  # True: never capture/replay CUDA graphs
    max_cudagraph_batch_size: int | None = None  # largest graph-captured decode batch
    # Plan each step while the previous one runs (one step in flight). None = on for
    # CUDA (the host's work then overlaps the GPU's), off on CPU (nothing to overlap).
    async_scheduling: bool | None = None
    seed: int = 0
    num_threads: int | None = None  # CPU threads for torch; default: all cores
    # A request's output does not depend on what it is batched with (CPU): integer
    # kernels for quantized layers at every row count, one attention kernel for every
    # query length. Slower prompts; see docs/server.md.
    batch_invariant: bool = False
    # Speculative decoding (off unless a method is named; see SpeculativeConfig).
    speculative_method: str | None = None  # None | "ngram" | "draft"
    num_speculative_tokens: int = 4
    ngram_prompt_lookup_max: int = 4
    ngram_prompt_lookup_min: int = 1
    speculative_model: str | None = None  # draft model path (same vocabulary)
    speculative_quantization: str | None = None  # the draft's weight quantization
    # Structured outputs: compiled grammars kept in the engine's LRU cache, and the
    # reasoning format of the model (grammars then constrain the answer after the
    # reasoning block; the server splits reasoning_content off).
    structured_outputs_cache_size: int = 256
    reasoning_parser: str | None = None  # None | "deepseek_r1" | "qwen3"
    # Tensor parallelism: the model is split over this many ranks (processes).
    tensor_parallel_size: int = 1
    nnodes: int = 1  # machines the ranks are spread over (tensor_parallel_size / nnodes each)
    node_rank: int = 0  # this machine's index; node 0 runs the engine core (and server)
    dist_init_addr: str | None = None  # HOST:PORT of node 0's rendezvous (TCP store)
    distributed_timeout: float = 60.0  # seconds before a collective gives up on a rank

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def resolved_device(self) -> torch.device:
        if self.device == _AUTO:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_quantization(self, device: torch.device) -> str | None:
        """The weight quantization to load: None, "int4" or "int8" ("auto" resolved)."""
        if self.quantization in (None, "none"):
            return None
        if self.quantization != _AUTO:
            return self.quantization
        from tokenmill.model.loader import resolve_model

        return auto_quantization(resolve_model(self.model, self.load_format), device, self.dtype)

    def resolved_kv_cache_dtype(self, device: torch.device) -> str:
        """The KV-cache storage to allocate ("auto" resolved).

        ``auto`` is the model's dtype, except on the CPU when a float32 model runs int4 or
        int8 weights (the GGUF's own blocks by default): there it is ``float16``, as
        llama.cpp stores K/V next to its quantized weights. At 32 streams the float32
        cache was the biggest read of a decode step after the weights; half its bytes made
        the step 1.2-1.4x faster, for a perplexity change of +0.3% on SmolLM2
        (docs/performance.md). ``--kv-cache-dtype auto`` on GPUs, float weights and
        bfloat16 models stays the model's dtype.
        """
        if self.kv_cache_dtype != _AUTO:
            return self.kv_cache_dtype
        if (device.type == "cpu" and self.resolved_quantization(device) is not None
                and self.resolved_dtype(device) == torch.float32):
            return "float16"
        return _AUTO

    def resolved_for(self, device: torch.device) -> EngineArgs:
        """These arguments with ``quantization`` and then ``kv_cache_dtype`` resolved for
        ``device`` (idempotent)."""
        args = dataclasses.replace(self, quantization=self.resolved_quantization(device))
        return dataclasses.replace(args, kv_cache_dtype=args.resolved_kv_cache_dtype(device))

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        """The model's dtype (on the CPU it depends on the resolved quantization)."""
        if self.dtype == _AUTO:
            if device.type == "cuda":
                return torch.bfloat16
            return default_cpu_dtype(self.resolved_quantization(device))
        dtype = parse_dtype(self.dtype)
        if dtype == torch.float16 and device.type == "cpu":
            raise ValueError("float16 is supported on GPU only; use float32 or bfloat16 on CPU")
        return dtype

    def resolved_async_scheduling(self, device: torch.device) -> bool:
        """Async scheduling unless turned off; by default only on CUDA."""
        if self.async_scheduling is None:
            return device.type == "cuda"
        return self.async_scheduling

    def resolved_backend(self, device: torch.device) -> str:
        if self.attention_backend == _AUTO:
            return "triton" if device.type == "cuda" else "torch"
        return self.attention_backend

    def cache_config(self) -> CacheConfig:
        memory = parse_memory(self.kv_cache_memory) if self.kv_cache_memory is not None else None
        return CacheConfig(
            block_size=self.block_size,
            kv_cache_dtype=self.kv_cache_dtype,
            kv_cache_memory=memory,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enable_prefix_caching=self.enable_prefix_caching,
            num_gpu_blocks_override=self.num_kv_blocks,
            offload_memory_bytes=(parse_memory(self.kv_offload_memory)
                                  if self.kv_offload_memory is not None else 0),
            offload_dir=self.kv_offload_dir,
            offload_dir_bytes=parse_memory(self.kv_offload_dir_size),
        )

    def scheduler_config(self, model_max_len: int, device: torch.device) -> SchedulerConfig:
        max_len = self.max_model_len or model_max_len
        if self.max_model_len and self.max_model_len > model_max_len:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's context length "
                f"{model_max_len}"
            )
        max_seqs = self.max_num_seqs or (256 if device.type == "cuda" else 64)
        budget = self.max_num_batched_tokens or DEFAULT_BATCHED_TOKENS[
            "cuda" if device.type == "cuda" else "cpu"]
        if not self.enable_chunked_prefill:
            budget = max(budget, max_len)
        return SchedulerConfig(
            max_num_batched_tokens=budget,
            max_num_seqs=max_seqs,
            max_model_len=max_len,
            policy=self.scheduling_policy,  # type: ignore[arg-type]
            enable_chunked_prefill=self.enable_chunked_prefill,
        )

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(
            tensor_parallel_size=self.tensor_parallel_size, nnodes=self.nnodes,
            node_rank=self.node_rank, dist_init_addr=self.dist_init_addr,
            timeout_s=self.distributed_timeout,
        )

    def speculative_config(self) -> SpeculativeConfig | None:
        """The speculative-decoding settings, or None when speculation is off."""
        if self.speculative_method is None:
            if self.speculative_model is not None:
                raise ValueError("--speculative-model needs --speculative-method draft")
            return None
        if self.speculative_method != "draft" and (
                self.speculative_model is not None or self.speculative_quantization is not None):
            raise ValueError("--speculative-model and --speculative-quantization are only "
                             "used with --speculative-method draft")
        return SpeculativeConfig(
            method=self.speculative_method,  # type: ignore[arg-type]
            num_speculative_tokens=self.num_speculative_tokens,
            ngram_prompt_lookup_max=self.ngram_prompt_lookup_max,
            ngram_prompt_lookup_min=self.ngram_prompt_lookup_min,
            model=self.speculative_model,
        )

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        unknown = set(kwargs) - cls.field_names()
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(sorted(unknown))}")
        return cls(**kwargs)

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> EngineArgs:
        return cls(**{k: getattr(args, k) for k in cls.field_names() if hasattr(args, k)})

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Add the engine flags to a CLI (sub)command."""
        g = parser.add_argument_group("engine")
        g.add_argument("--model", default=None,
                       help="HF model directory, .gguf file, or config dir with "
                            "--load-format dummy (default: bundled SmolLM2-135M-Instruct)")
        g.add_argument("--tokenizer", default=None, help="tokenizer directory or .gguf file")
        g.add_argument("--load-format", default=_AUTO,
                       choices=[_AUTO, "safetensors", "gguf", "dummy"])
        g.add_argument("--dtype", default=_AUTO,
                       help="auto | float32 | bfloat16 | float16 (GPU only); auto = bfloat16 on "
                            "GPU and on CPUs with bfloat16 in hardware (AVX512_BF16/AMX) "
                            "unless the weights are quantized (--quantization, or auto on a "
                            "Q4/Q8_0 GGUF), else float32")
        g.add_argument("--quantization", default=_AUTO, choices=list(QUANTIZATION_CHOICES),
                       help="weight-only quantization (CPU): int4 = 4-bit groups of 32 "
                            "(a Q4_0/Q4_1 GGUF keeps its own codes), 8-bit LM head; "
                            "int8 = 8-bit groups of 32 everywhere (Q8_0); none = float "
                            "weights; auto (default) = a GGUF file's own Q4_0/Q4_1 (int4) "
                            "or Q8_0 (int8) on CPUs with the integer kernels, else none")
        g.add_argument("--device", default=_AUTO, help="auto | cpu | cuda | cuda:N")
        g.add_argument("--max-model-len", type=int, default=None)
        g.add_argument("--block-size", type=int, default=16)
        g.add_argument("--kv-cache-memory", default=None,
                       help="KV-cache budget, e.g. 2GiB (CPU default 1GiB)")
        g.add_argument("--kv-cache-dtype", default=_AUTO, choices=list(KV_CACHE_DTYPES),
                       help="KV-cache storage: auto = the model's dtype (float16 for a float32 "
                            "model with int4/int8 weights on the CPU); float32 / bfloat16 / "
                            "float16 = that dtype whatever the model's (a float32 model "
                            "attends 16-bit K/V widened to float32: half the bytes of its "
                            "cache per token); int8 / fp8 "
                            "(e4m3) = 8-bit codes with a float32 scale per token and KV head "
                            "(about 3.8x the tokens of float32 KV in the same memory)")
        g.add_argument("--kv-offload-memory", default=None,
                       help="host-memory tier for the prefix cache, e.g. 4GiB: full KV blocks "
                            "are kept there too and restored on a pool miss (default: off)")
        g.add_argument("--kv-offload-dir", default=None,
                       help="disk tier for the prefix cache: checksummed block files keyed by "
                            "content, model and KV settings; survives restarts (default: off)")
        g.add_argument("--kv-offload-dir-size", default="16GiB",
                       help="size limit of --kv-offload-dir, least recently used files "
                            "deleted beyond it (default 16GiB)")
        g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
        g.add_argument("--num-kv-blocks", type=int, default=None, help=argparse.SUPPRESS)
        g.add_argument("--no-prefix-caching", dest="enable_prefix_caching",
                       action="store_false", help="disable automatic prefix caching")
        g.add_argument("--max-num-batched-tokens", type=int, default=None,
                       help="token budget per step (default 512 CPU / 8192 GPU)")
        g.add_argument("--max-num-seqs", type=int, default=None,
                       help="max sequences per step (default 64 CPU / 256 GPU)")
        g.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill",
                       action="store_false")
        g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"])
        g.add_argument("--attention-backend", default=_AUTO, choices=[_AUTO, "torch", "triton"])
        g.add_argument("--enforce-eager", action="store_true",
                       help="run every step eagerly (no CUDA graphs for decode)")
        g.add_argument("--max-cudagraph-batch-size", type=int, default=None,
                       help="largest decode batch captured as a CUDA graph "
                            "(default: min(max-num-seqs, 256))")
        g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                       default=None,
                       help="plan each step while the previous one runs on the device, so "
                            "the host's work overlaps the GPU's (default: on for CUDA, off on "
                            "CPU; off with tensor parallelism or speculative decoding)")
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--num-threads", type=int, default=None,
                       help="CPU threads for the forward pass (default: all cores)")
        g.add_argument("--batch-invariant", action="store_true",
                       help="the same output for a request alone or in any batch (CPU): "
                            "quantized layers on their integer kernels at every row count "
                            "(no AMX bfloat16 tiles or dense prompt path), one attention "
                            "kernel for every query length; prompts run slower")
        s = parser.add_argument_group("speculative decoding")
        s.add_argument("--speculative-method", default=None, choices=["ngram", "draft"],
                       help="propose draft tokens by n-gram prompt lookup or with a draft "
                            "model, verified by the target in one pass (default: off)")
        s.add_argument("--num-speculative-tokens", type=int, default=4,
                       help="most draft tokens per sequence and step (default 4)")
        s.add_argument("--ngram-prompt-lookup-max", type=int, default=4,
                       help="longest n-gram the ngram proposer looks up (default 4)")
        s.add_argument("--ngram-prompt-lookup-min", type=int, default=1,
                       help="shortest n-gram the ngram proposer looks up (default 1)")
        s.add_argument("--speculative-model", default=None,
                       help="draft model for --speculative-method draft (HF dir or .gguf; "
                            "must share the target's vocabulary)")
        s.add_argument("--speculative-quantization", default=None, choices=["int4", "int8"],
                       help="weight quantization of the draft model (default: none)")
        so = parser.add_argument_group("structured outputs (see docs/structured-output.md)")
        so.add_argument("--reasoning-parser", default=None, choices=["deepseek_r1", "qwen3"],
                        help="the model writes <think>...</think> before its answer: split it "
                             "into reasoning_content and apply grammars to the answer only")
        so.add_argument("--structured-outputs-cache-size", type=int, default=256,
                        help="compiled grammars kept in the engine's LRU cache (default 256)")
        p = parser.add_argument_group("tensor parallelism (see docs/parallelism.md)")
        p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                       help="split the model over this many ranks, one process each "
                            "(gloo on CPU, NCCL on GPUs; default 1)")
        p.add_argument("--nnodes", type=int, default=1,
                       help="machines the ranks run on (default 1); run the same command on "
                            "each with its --node-rank")
        p.add_argument("--node-rank", type=int, default=0,
                       help="this machine's index; node 0 runs the engine core and server")
        p.add_argument("--dist-init-addr", default=None,
                       help="HOST:PORT where node 0 listens for the other ranks (required "
                            "with --nnodes > 1; default: a free port on 127.0.0.1)")
        p.add_argument("--distributed-timeout", type=float, default=60.0,
                       help="seconds a collective waits for a rank before the engine gives "
                            "up on it and exits (default 60)")
