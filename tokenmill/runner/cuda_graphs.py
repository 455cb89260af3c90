"""CUDA graphs for decode steps: capture per batch-size bucket, pad, replay.

A decode step of a small model is mostly kernel-launch overhead: dozens of
small kernels per layer, each taking longer to launch from Python than to
run. A CUDA graph records the whole forward pass once and replays it with a
single launch. A graph is frozen: same shapes, same memory addresses, no
host-side decisions. So:

- graphs are captured at a few *bucket* batch sizes (1, 2, 4, 8, then every
  8 up to the largest); a step with ``B`` decodes runs the graph of the
  smallest bucket ``P >= B``;
- inputs live in *static buffers* sized for the largest bucket and for
  ``max_model_len``; each step copies its real inputs in and fills the
  ``P - B`` padding rows so they are harmless (:func:`pad_decode_step`):
  cache slot -1 (the KV write skips them) and a context of one token read
  from block 0 (valid memory, so no NaN); their outputs are ignored;
- host-side choices are fixed at capture: the metadata's host fields hold
  worst-case values (``max_seq_len = max_model_len``), and the Triton
  backend's split-K decision is made once per bucket for that worst case
  (:func:`fixed_decode_split`), because its heuristic otherwise reads the
  step's real ``max_seq_len`` on the host.

Prefill and mixed steps, batches above the largest bucket, CPU runs,
``enforce_eager`` and the torch attention backend (which syncs with the host)
run eagerly. The padding logic is plain numpy and runs on any device, so it
is tested on the CPU (``tests/test_cuda_graph_padding.py``).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from tokenmill.attention.base import AttentionBackend, AttentionMetadata

if TYPE_CHECKING:
    from tokenmill.runner.model_runner import KVCache, StepInputs
    from tokenmill.step_types import TokenFill

logger = logging.getLogger(__name__)

DEFAULT_MAX_CAPTURE_BATCH = 256
PAD_SLOT = -1  # the KV-write kernels skip negative slots
PAD_SEQ_LEN = 1  # padding rows attend to one (arbitrary, valid) cached token


@dataclass(frozen=True)
class CudaGraphConfig:
    """What the decode graphs must cover."""

    max_batch_size: int  # largest decode batch replayed from a graph
    max_model_len: int  # longest context: sizes the static block tables


def capture_sizes(max_batch_size: int) -> list[int]:
    """Bucket batch sizes: 1, 2, 4, 8, then every 8, and ``max_batch_size`` itself."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    sizes = [s for s in (1, 2, 4) if s < max_batch_size]
    sizes += range(8, max_batch_size, 8)
    sizes.append(max_batch_size)
    return sorted(set(sizes))


def bucket_size(num_seqs: int, sizes: Sequence[int]) -> int | None:
    """Smallest bucket holding ``num_seqs`` decodes (``sizes`` ascending), or None."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


def pad_decode_step(step: StepInputs, size: int) -> StepInputs:
    """``step`` (B decodes) with ``size - B`` padding requests appended.

    Padding requests have token 0 at position 0, cache slot -1 (never
    written), a context of one token and a block table of zeros (so attention
    reads block 0: valid memory, finite values). Real rows keep their index,
    so ``logits_indices`` is unchanged.
    """
    num_seqs = step.num_seqs
    if not step.is_decode_only:
        raise ValueError("only decode-only steps (one token per request) can be padded")
    if size < num_seqs:
        raise ValueError(f"cannot pad {num_seqs} decodes down to {size}")
    pad = size - num_seqs
    width = step.block_tables.shape[1]

    def extend(array: np.ndarray, value: int) -> np.ndarray:
        return np.concatenate([array, np.full(pad, value, dtype=array.dtype)])

    return dataclasses.replace(
        step,
        input_ids=extend(step.input_ids, 0),
        positions=extend(step.positions, 0),
        slot_mapping=extend(step.slot_mapping, PAD_SLOT),
        query_start_loc=np.arange(size + 1, dtype=step.query_start_loc.dtype),
        seq_lens=extend(step.seq_lens, PAD_SEQ_LEN),
        block_tables=np.concatenate(
            [step.block_tables, np.zeros((pad, width), dtype=step.block_tables.dtype)]
        ),
    )


class DecodeGraphInputs:
    """Static input buffers shared by every captured decode graph.

    A graph reads its inputs from fixed addresses, so each step copies its
    (padded) inputs into these buffers before replaying. Views of the first
    ``size`` rows are what a bucket's graph was captured with.
    """

    def __init__(self, max_batch_size: int, max_model_len: int, block_size: int,
                 device: torch.device) -> None:
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        max_blocks = -(-max_model_len // block_size)
        self.device = device
        self.input_ids = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_batch_size,), PAD_SLOT, dtype=torch.int64,
                                       device=device)
        self.seq_lens = torch.full((max_batch_size,), PAD_SEQ_LEN, dtype=torch.int32,
                                   device=device)
        self.block_tables = torch.zeros(max_batch_size, max_blocks, dtype=torch.int32,
                                        device=device)
        # One token per request, always: the query start locations never change.
        self.query_start_loc = torch.arange(max_batch_size + 1, dtype=torch.int32,
                                            device=device)

    def views(self, size: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids, positions, metadata) over the first ``size`` rows.

        The host-side fields hold worst-case values: they are read once, at
        capture, and must be valid for every step the graph will replay.
        """
        meta = AttentionMetadata(
            num_tokens=size,
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            query_start_loc_cpu=list(range(size + 1)),
            seq_lens_cpu=[self.max_model_len] * size,
        )
        return self.input_ids[:size], self.positions[:size], meta

    def load(self, padded: StepInputs) -> None:
        """Copy a padded decode step into the first rows of the buffers."""
        size = padded.num_seqs
        width = padded.block_tables.shape[1]
        if size > self.max_batch_size or width > self.block_tables.shape[1]:
            raise ValueError(f"step of {size} requests x {width} blocks exceeds the buffers")
        self._copy(self.input_ids[:size], padded.input_ids)
        self._copy(self.positions[:size], padded.positions)
        self._copy(self.slot_mapping[:size], padded.slot_mapping)
        self._copy(self.seq_lens[:size], padded.seq_lens)
        # Columns past ``width`` keep stale block ids: only blocks below seq_len are read.
        self._copy(self.block_tables[:size, :width], padded.block_tables)

    def _copy(self, dst: torch.Tensor, src: np.ndarray) -> None:
        host = torch.from_numpy(np.ascontiguousarray(src)).to(dst.dtype)
        if self.device.type == "cuda":
            host = host.pin_memory()
        dst.copy_(host, non_blocking=True)


def graph_decode_segments(batch_size: int, num_kv_heads: int, max_model_len: int,
                          device: torch.device) -> int:
    """Split-K segments a bucket's graph uses: the heuristic's choice at full context."""
    from tokenmill.kernels.paged_decode import choose_num_segments

    return choose_num_segments(batch_size, num_kv_heads, max_model_len, device)


@contextlib.contextmanager
def fixed_decode_split(backend: AttentionBackend, num_segments: int) -> Iterator[None]:
    """Pin the Triton backend's split-K choice to ``num_segments`` while capturing.

    The backend instance is shared by every layer of the model, so this sets
    its options for the duration of the capture and restores them after.
    Backends without the option are left alone.
    """
    if getattr(backend, "name", None) != "triton":
        yield
        return
    saved = (backend.split_kv, backend.num_segments)  # type: ignore[attr-defined]
    backend.split_kv = num_segments > 1  # type: ignore[attr-defined]
    backend.num_segments = num_segments if num_segments > 1 else None  # type: ignore[attr-defined]
    try:
        yield
    finally:
        backend.split_kv, backend.num_segments = saved  # type: ignore[attr-defined]


class DecodeGraphRunner:
    """Captures the model's decode forward at bucket sizes and replays it."""

    def __init__(self, config: CudaGraphConfig, block_size: int, device: torch.device,
                 backend: AttentionBackend) -> None:
        self.config = config
        self.sizes = capture_sizes(config.max_batch_size)
        self.device = device
        self.backend = backend
        self.inputs = DecodeGraphInputs(config.max_batch_size, config.max_model_len,
                                        block_size, device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_replays = 0  # decode steps replayed from a graph
        self.num_padded_replays = 0  # ... of which had fewer requests than their bucket

    @torch.inference_mode()
    def capture(self, model: torch.nn.Module, kv_caches: list[KVCache]) -> None:
        """Record one graph per bucket, largest first, all sharing one memory pool."""
        t0 = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        num_kv_heads = kv_caches[0][0].shape[2]
        pool = None
        for size in reversed(self.sizes):
            input_ids, positions, meta = self.inputs.views(size)
            segments = graph_decode_segments(size, num_kv_heads, self.config.max_model_len,
                                             self.device)
            with fixed_decode_split(self.backend, segments):
                # Warm-up outside the graph: compiles the Triton kernels for these shapes.
                model(input_ids, positions, kv_caches, meta)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = model(input_ids, positions, kv_caches, meta)
            pool = graph.pool()
            self._graphs[size] = (graph, hidden)
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info("captured %d decode CUDA graphs (batch sizes %d..%d) in %.1fs, %.0f MiB",
                    len(self.sizes), self.sizes[0], self.sizes[-1],
                    time.perf_counter() - t0, used / 2**20)

    def run(self, step: StepInputs, fill: TokenFill | None = None) -> torch.Tensor | None:
        """Replay the bucket for a decode-only ``step``; hidden states ``[P, hidden]``.

        Rows past ``step.num_seqs`` are padding. Returns None (run it eagerly)
        when no captured bucket holds the step. The returned tensor is the
        graph's output buffer: read it before the next replay.
        """
        size = bucket_size(step.num_seqs, self.sizes)
        if size is None or size not in self._graphs:
            return None
        if step.block_tables.shape[1] > self.inputs.block_tables.shape[1]:
            return None  # longer than max_model_len: cannot happen through the scheduler
        self.inputs.load(pad_decode_step(step, size))
        if fill is not None:  # placeholder rows are step rows: padding comes after them
            fill.apply_to(self.inputs.input_ids)
        graph, hidden = self._graphs[size]
        graph.replay()
        self.num_replays += 1
        self.num_padded_replays += size > step.num_seqs
        return hidden
