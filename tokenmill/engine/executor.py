"""Runs each step's model work on the engine's KV caches.

The executor owns the model runners: the target's and, with a draft model, the
draft's (whose cache mirrors the target's block for block). Block copies
(copy-on-write for ``n > 1`` forks) are applied here, to every cache, before
the step's forward pass - the one place they are applied.
"""

from __future__ import annotations

import torch

from tokenmill.runner.model_runner import BlockCopy, ModelRunner
from tokenmill.step_types import ModelOutput, SchedulerOutput, TokenFill


class Executor:
    """Single-process executor: the model runs in the engine core's own process."""

    def __init__(self, runner: ModelRunner, draft_runner: ModelRunner | None = None) -> None:
        self.runner = runner
        self.draft_runner = draft_runner

    @property
    def runners(self) -> list[ModelRunner]:
        return [r for r in (self.runner, self.draft_runner) if r is not None]

    # Whether steps may be planned before the previous step's tokens reach the host
    # (their placeholders are filled from the device): only when one process holds
    # the whole model.
    supports_async_scheduling = True

    def execute(self, out: SchedulerOutput, fill: TokenFill | None = None) -> ModelOutput:
        """Apply the step's block copies to every cache, then run the target model.

        ``fill``: the step's placeholder tokens, from the previous step's samples.
        """
        if out.block_copies:
            for runner in self.runners:
                runner.copy_blocks(out.block_copies)
        return self.runner.execute(out, fill)

    def read_block(self, block_id: int) -> BlockCopy:
        """Start copying a KV block of every cache (target, then draft) to the host."""
        copies = [r.read_block(block_id) for r in self.runners]
        return BlockCopy(sum(c.nbytes for c in copies),
                         lambda: b"".join(c.wait() for c in copies))

    def write_block(self, block_id: int, payload: bytes) -> None:
        """Fill a KV block of every cache from the bytes of a :meth:`read_block` copy."""
        offset = 0
        for r in self.runners:
            size = r.block_bytes
            r.write_block(block_id, memoryview(payload)[offset:offset + size])
            offset += size
        if offset != len(payload):
            raise ValueError(f"KV block payload of {len(payload)} bytes, expected {offset}")

    @property
    def device(self) -> torch.device:
        return self.runner.device

    def shutdown(self) -> None:
        """Release what the executor started (other ranks' processes, with TP)."""
