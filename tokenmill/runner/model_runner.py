"""Turns the scheduler's plain output into tensors and runs the model once per step."""

from __future__ import annotations

import numpy as np
import torch

from tokenmill.engine.scheduler import SchedulerOutput
from tokenmill.runner.attention.base import AttentionMetadata


class ModelRunner:
    """Owns the model and the KV cache; knows nothing about requests."""

    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, block_size: int):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device
        self.kv_caches = [(kv_cache[i, 0], kv_cache[i, 1]) for i in range(kv_cache.shape[0])]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Duplicate whole KV blocks (copy-on-fork for n > 1 sampling)."""
        if not copies:
            return
        src = torch.tensor([c[0] for c in copies], device=self.device)
        dst = torch.tensor([c[1] for c in copies], device=self.device)
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata,
                                                     torch.Tensor]:
        """Flatten the step: input ids, positions, attention metadata, logits indices."""
        bs = self.block_size
        seqs = out.seqs
        q_lens = np.fromiter((len(s.token_ids) for s in seqs), dtype=np.int64, count=len(seqs))
        starts = np.fromiter((s.start_pos for s in seqs), dtype=np.int64, count=len(seqs))
        qsl = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=qsl[1:])
        seq_lens = starts + q_lens
        total = int(qsl[-1])

        input_ids = np.empty(total, dtype=np.int64)
        positions = np.empty(total, dtype=np.int64)
        slots = np.empty(total, dtype=np.int64)
        max_blocks = max(len(s.block_table) for s in seqs)
        tables = np.zeros((len(seqs), max_blocks), dtype=np.int32)
        logits_idx: list[int] = []
        for i, s in enumerate(seqs):
            a, b = int(qsl[i]), int(qsl[i + 1])
            input_ids[a:b] = s.token_ids
            pos = np.arange(s.start_pos, s.start_pos + (b - a), dtype=np.int64)
            positions[a:b] = pos
            table = np.asarray(s.block_table, dtype=np.int64)
            tables[i, : len(table)] = table
            slots[a:b] = table[pos // bs] * bs + pos % bs
            if s.num_logits:
                logits_idx.extend(range(b - s.num_logits, b))

        dev = self.device
        meta = AttentionMetadata(
            num_tokens=total,
            slot_mapping=torch.from_numpy(slots).to(dev),
            query_start_loc=torch.from_numpy(qsl.astype(np.int32)).to(dev),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(dev),
            block_tables=torch.from_numpy(tables).to(dev),
            max_query_len=int(q_lens.max()),
            max_seq_len=int(seq_lens.max()),
            query_start_loc_cpu=qsl.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
        )
        return (
            torch.from_numpy(input_ids).to(dev),
            torch.from_numpy(positions).to(dev),
            meta,
            torch.tensor(logits_idx, dtype=torch.long, device=dev),
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Run one step; return float32 logits for the requested positions, in order."""
        self.copy_blocks(out.block_copies)
        if not out.seqs:
            return torch.empty(0)
        input_ids, positions, meta, logits_idx = self.prepare(out)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if logits_idx.numel() == 0:
            return torch.empty(0, device=self.device)
        return self.model.compute_logits(hidden[logits_idx]).float()
