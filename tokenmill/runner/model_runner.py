"""Turns the scheduler's plain output into tensors and runs the model once per step.

A step goes through three stages, each a plain function or method so it can
be tested on its own:

1. :func:`build_step_inputs` flattens a :class:`SchedulerOutput` into host
   (numpy) arrays: token ids, positions, cache slots, block tables, lengths;
2. :func:`step_tensors` moves them to the device as ids, positions and one
   :class:`AttentionMetadata`;
3. :meth:`ModelRunner.execute` runs the model (eagerly, or by replaying a
   captured CUDA graph for decode-only steps, see ``cuda_graphs.py``) and
   returns float32 logits for the rows the sampler needs.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.attention.base import AttentionBackend, AttentionMetadata
from tokenmill.runner.block_tables import PersistentBlockTables
from tokenmill.runner.cuda_graphs import CudaGraphConfig, DecodeGraphRunner
from tokenmill.step_types import ModelOutput, ScheduledSeq, SchedulerOutput, TokenFill

logger = logging.getLogger(__name__)

KVCache = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepInputs:
    """One step flattened on the host: request ``i`` owns tokens ``query_start_loc[i]:[i+1]``."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64; -1 = padding (nothing written)
    query_start_loc: np.ndarray  # [B+1] int64
    seq_lens: np.ndarray  # [B] int64, context length after this step
    block_tables: np.ndarray  # [B, max_blocks] int32, padded with 0
    logits_indices: np.ndarray  # [N] int64 token rows whose logits are wanted, in order

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def max_query_len(self) -> int:
        return int(np.diff(self.query_start_loc).max()) if self.num_seqs else 0

    @property
    def is_decode_only(self) -> bool:
        """Every request computes exactly one token (the CUDA-graph case)."""
        return self.num_seqs > 0 and self.num_tokens == self.num_seqs


def build_step_inputs(
    out: SchedulerOutput, block_size: int, tables: PersistentBlockTables | None = None
) -> StepInputs:
    """Flatten the scheduled sequences of one step into host arrays.

    Per sequence this reads a few numbers and its token ids; everything else
    is whole-array numpy work. The block tables come from ``tables`` (kept
    from step to step, see :mod:`tokenmill.runner.block_tables`) when given,
    else they are rebuilt from the scheduled lists.
    """
    seqs = out.seqs
    n = len(seqs)
    q_lens = np.fromiter((len(s.token_ids) for s in seqs), dtype=np.int64, count=n)
    starts = np.fromiter((s.start_pos for s in seqs), dtype=np.int64, count=n)
    num_logits = np.fromiter((s.num_logits for s in seqs), dtype=np.int64, count=n)
    qsl = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(q_lens, out=qsl[1:])
    total = int(qsl[-1])

    if total == n:  # decode-only: one token each
        input_ids = np.fromiter((s.token_ids[0] for s in seqs), dtype=np.int64, count=n)
        owner = np.arange(n)
        positions = starts.copy()
    else:
        input_ids = np.fromiter(itertools.chain.from_iterable(s.token_ids for s in seqs),
                                dtype=np.int64, count=total)
        owner = np.repeat(np.arange(n), q_lens)  # the sequence of each token
        positions = np.arange(total, dtype=np.int64) + (starts - qsl[:-1])[owner]
    if tables is not None:
        block_tables = tables.gather([s.seq_id for s in seqs], [s.block_table for s in seqs])
    else:
        block_tables = _tables_from_lists(seqs)
    # New tokens never sit in released (NULL) blocks, so the table's 0 there is never used.
    slots = block_tables[owner, positions // block_size].astype(np.int64) * block_size
    slots += positions % block_size

    if (num_logits == 1).all():  # one logit row per sequence, at its last token
        logits_idx = qsl[1:] - 1
    else:
        num_rows = int(num_logits.sum())
        row_owner = np.repeat(np.arange(n), num_logits)
        first = np.cumsum(num_logits) - num_logits  # each sequence's first row
        logits_idx = (qsl[1:] - num_logits)[row_owner] + np.arange(num_rows) - first[row_owner]
    return StepInputs(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slots,
        query_start_loc=qsl,
        seq_lens=starts + q_lens,
        block_tables=block_tables,
        logits_indices=logits_idx.astype(np.int64, copy=False),
    )


def _tables_from_lists(seqs: list[ScheduledSeq]) -> np.ndarray:
    """``[B, max_len]`` int32 block tables, padded with 0; released (-1) slots read 0."""
    lens = np.fromiter((len(s.block_table) for s in seqs), dtype=np.int64, count=len(seqs))
    width = int(lens.max()) if len(seqs) else 0
    flat = np.fromiter(itertools.chain.from_iterable(s.block_table for s in seqs),
                       dtype=np.int64, count=int(lens.sum()))
    tables = np.zeros((len(seqs), width), dtype=np.int32)
    tables[np.arange(width) < lens[:, None]] = np.maximum(flat, 0)
    return tables


def _to_device(array: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
    if device.type == "cuda":
        # Pinned staging lets the copy run asynchronously with the host's next work.
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def step_tensors(
    step: StepInputs, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Device tensors for ``step``: (input_ids, positions, attention metadata)."""
    meta = AttentionMetadata(
        num_tokens=step.num_tokens,
        slot_mapping=_to_device(step.slot_mapping, torch.int64, device),
        query_start_loc=_to_device(step.query_start_loc, torch.int32, device),
        seq_lens=_to_device(step.seq_lens, torch.int32, device),
        block_tables=_to_device(step.block_tables, torch.int32, device),
        max_query_len=step.max_query_len,
        max_seq_len=int(step.seq_lens.max()) if step.num_seqs else 0,
        query_start_loc_cpu=step.query_start_loc.tolist(),
        seq_lens_cpu=step.seq_lens.tolist(),
        has_padding_slots=bool((step.slot_mapping < 0).any()),
    )
    return (
        _to_device(step.input_ids, torch.int64, device),
        _to_device(step.positions, torch.int64, device),
        meta,
    )


@dataclass(frozen=True)
class BlockCopy:
    """A KV block's bytes on their way to the host: the size now, the bytes from ``wait()``."""

    nbytes: int
    wait: Callable[[], bytes]

    @staticmethod
    def ready(payload: bytes) -> BlockCopy:
        """A copy that is already complete."""
        return BlockCopy(len(payload), lambda: payload)


class ModelRunner:
    """Owns the model and the KV cache; knows nothing about requests.

    ``attn_backend`` is the backend instance the model's layers share; with a
    ``graph_config`` on a CUDA device, :meth:`capture_cuda_graphs` records
    decode steps at bucketed batch sizes, and later decode-only steps that fit
    a bucket replay them. Everything else runs eagerly.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: torch.Tensor,
        block_size: int,
        attn_backend: AttentionBackend | None = None,
        graph_config: CudaGraphConfig | None = None,
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device
        self.kv_caches: list[KVCache] = [
            (kv_cache[i, 0], kv_cache[i, 1]) for i in range(kv_cache.shape[0])
        ]
        self.attn_backend = attn_backend
        self.graph_config = graph_config
        self.graphs: DecodeGraphRunner | None = None
        self.block_tables = PersistentBlockTables()  # host block tables, kept across steps

    # ----------------------------------------------------------- CUDA graphs
    def cuda_graphs_supported(self) -> str | None:
        """Why decode steps cannot be captured here, or None if they can."""
        if self.graph_config is None:
            return "disabled (enforce_eager or no graph config)"
        if self.device.type != "cuda":
            return f"device {self.device} is not CUDA"
        if self.attn_backend is None or self.attn_backend.name != "triton":
            # The torch backend syncs with the host (padding filter, Python loops).
            return "only the triton attention backend can be captured"
        return None

    def capture_cuda_graphs(self) -> bool:
        """Capture decode graphs if supported; returns whether graphs are in use."""
        reason = self.cuda_graphs_supported()
        if reason is not None:
            log = logger.debug if self.graph_config is None else logger.info
            log("CUDA graphs off: %s", reason)
            return False
        assert self.graph_config is not None and self.attn_backend is not None
        graphs = DecodeGraphRunner(
            self.graph_config, self.block_size, self.device, self.attn_backend
        )
        graphs.capture(self.model, self.kv_caches)
        self.graphs = graphs
        return True

    # -------------------------------------------------------------- running
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Duplicate whole KV blocks (copy-on-fork for n > 1 sampling)."""
        if not copies:
            return
        src = torch.tensor([c[0] for c in copies], device=self.device)
        dst = torch.tensor([c[1] for c in copies], device=self.device)
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def read_block(self, block_id: int) -> BlockCopy:
        """Start copying one block (every layer's K and V, scales included) to the host.

        On a GPU the copy goes into pinned memory, queued on the compute stream without
        waiting: a later step that overwrites the block runs after it, and only the
        caller of :meth:`BlockCopy.wait` (the offload writer thread) waits for it.
        """
        block = self.kv_cache[:, :, block_id]
        if block.device.type != "cuda":
            payload = block.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
            return BlockCopy.ready(payload)
        host = torch.empty(block.shape, dtype=block.dtype, pin_memory=True)
        host.copy_(block, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        def wait() -> bytes:
            copied.synchronize()
            return host.view(torch.uint8).reshape(-1).numpy().tobytes()

        return BlockCopy(host.numel() * host.element_size(), wait)

    def write_block(self, block_id: int, payload: bytes | memoryview) -> None:
        """Fill one block from the bytes of a :meth:`read_block` copy (same layout)."""
        shape = self.kv_cache[:, :, block_id].shape
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        block = data.view(self.kv_cache.dtype).view(shape)
        self.kv_cache[:, :, block_id] = block.to(self.device)

    @property
    def block_bytes(self) -> int:
        """Size of :meth:`read_block`'s result."""
        return self.kv_cache[:, :, 0].numel() * self.kv_cache.element_size()

    def forward_eager(self, step: StepInputs, fill: TokenFill | None = None) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` of one step run without graphs."""
        input_ids, positions, meta = step_tensors(step, self.device)
        if fill is not None:
            fill.apply_to(input_ids)
        return self.model(input_ids, positions, self.kv_caches, meta)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, fill: TokenFill | None = None) -> ModelOutput:
        """Run one step; float32 logits for the requested positions and their owners.

        Block copies of ``out`` are not applied here: the executor applies them
        to every KV cache it owns before running any model. ``fill`` replaces the
        step's placeholder tokens on the device (async scheduling).
        """
        rows: list[range] = []
        start = 0
        for item in out.seqs:
            rows.append(range(start, start + item.num_logits))
            start += item.num_logits
        if not out.seqs:
            return ModelOutput(torch.empty(0, device=self.device), rows)
        step = build_step_inputs(out, self.block_size, self.block_tables)
        hidden = None
        if self.graphs is not None and step.is_decode_only:
            hidden = self.graphs.run(step, fill)  # None when no bucket fits
        if hidden is None:
            hidden = self.forward_eager(step, fill)
        if len(step.logits_indices) == 0:
            return ModelOutput(torch.empty(0, device=self.device), rows)
        index = _to_device(step.logits_indices, torch.long, self.device)
        logits = self.model.compute_logits(hidden[index])  # None on tensor-parallel ranks > 0
        return ModelOutput(torch.empty(0) if logits is None else logits.float(), rows)


def profile_peak_memory(
    model: torch.nn.Module,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> int:
    """Peak bytes allocated on ``device`` while running a worst-case step.

    The step has ``max_num_batched_tokens`` tokens: one long prompt and up to
    ``max_num_seqs - 1`` one-token prompts, none with a cached prefix; it
    computes logits for each prompt's last token and samples them with
    top-k/top-p (the sampler's largest temporaries). It needs no real KV cache: every new token has
    slot -1 (nothing is written) and every block-table entry points at the
    one block of a throw-away cache, so attention reads valid (meaningless)
    memory. The result includes the weights, which are already allocated.
    """
    from tokenmill.sampling import Sampler, SamplingBatch, SamplingParams

    # One long prompt (the largest attention) beside single-token requests (the most
    # logit rows): the worst of both within the token budget.
    num_tokens = max_num_batched_tokens
    num_seqs = max(1, min(max_num_seqs, num_tokens))
    q_lens = np.ones(num_seqs, dtype=np.int64)
    q_lens[0] = num_tokens - (num_seqs - 1)
    qsl = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(q_lens, out=qsl[1:])
    max_blocks = -(-int(q_lens.max()) // block_size)
    step = StepInputs(
        input_ids=np.zeros(num_tokens, dtype=np.int64),
        positions=np.concatenate([np.arange(n, dtype=np.int64) for n in q_lens]),
        slot_mapping=np.full(num_tokens, -1, dtype=np.int64),
        query_start_loc=qsl,
        seq_lens=q_lens.copy(),
        block_tables=np.zeros((num_seqs, max_blocks), dtype=np.int32),
        logits_indices=qsl[1:] - 1,
    )
    cache = torch.zeros(1, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    kv_caches = [(cache, cache)] * num_layers

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        input_ids, positions, meta = step_tensors(step, device)
        hidden = model(input_ids, positions, kv_caches, meta)
        rows = _to_device(step.logits_indices, torch.long, device)
        logits = model.compute_logits(hidden[rows])
        del hidden
        if logits is not None:  # tensor-parallel ranks > 0 get none: rank 0 samples
            params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
            batch = SamplingBatch(
                params=[params] * num_seqs,
                prompt_token_ids=[[0]] * num_seqs,
                output_token_ids=[[]] * num_seqs,
                generators=[None] * num_seqs,
            )
            Sampler()(logits.float(), batch)
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))
