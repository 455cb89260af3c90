"""A tensor-parallel group: this process's rank and the collectives sharded layers need.

Each group is a stand-alone ``torch.distributed`` process group (gloo on CPU,
NCCL on CUDA) built from a TCP store: no global default group, so an offline
``LLM`` with tensor parallelism can live in a process that also uses
``torch.distributed`` for something else. Collectives time out (``timeout``),
so a rank that dies or hangs turns into an exception on the others, never a
hang.

``TPGroup()`` (world size 1) is the single-device case: every collective is
the identity and layers skip them.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class CollectiveError(RuntimeError):
    """A collective failed or timed out: a peer rank died or hung."""


@dataclass
class TPGroup:
    """Rank ``rank`` of ``world_size`` tensor-parallel ranks."""

    rank: int = 0
    world_size: int = 1
    process_group: Any = None  # a torch ProcessGroup, None when world_size == 1
    store: Any = None  # the TCPStore the group was built from

    @classmethod
    def create(
        cls, rank: int, world_size: int, store: Any, device: torch.device,
        timeout_s: float = 60.0,
    ) -> TPGroup:
        """Join the group of ``world_size`` ranks that share ``store``."""
        timeout = datetime.timedelta(seconds=timeout_s)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            pg = dist.ProcessGroupNCCL(store, rank, world_size, options)
        else:
            pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        return cls(rank, world_size, pg, store)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def _wait(self, work: Any) -> None:
        try:
            work.wait()
        except RuntimeError as exc:
            raise CollectiveError(f"tensor-parallel collective failed on rank {self.rank}: "
                                  f"{exc}") from exc

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place (row-parallel layers' partial outputs)."""
        if self.sharded:
            self._wait(self.process_group.allreduce([x]))
        return x

    def gather_to_first(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenate every rank's ``x`` along the last dim on rank 0 (None elsewhere)."""
        if not self.sharded:
            return x
        x = x.contiguous()
        opts = dist.GatherOptions()
        opts.rootRank = 0
        if self.is_first:
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            self._wait(self.process_group.gather([parts], [x], opts))
            return torch.cat(parts, dim=-1)
        self._wait(self.process_group.gather([], [x], opts))
        return None

    def min_int(self, value: int) -> int:
        """The smallest ``value`` any rank holds (e.g. the KV blocks every rank can fit)."""
        if not self.sharded:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self._wait(self.process_group.allreduce([t], opts))
        return int(t.item())

    def barrier(self) -> None:
        if self.sharded:
            self.min_int(0)


def shard_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, size)`` of rank's even share of ``total`` (which must divide)."""
    size = total // world_size
    return rank * size, size


def padded_shard(total: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """``(start, size, padded_size)`` for splitting ``total`` rows into equal padded shards.

    Every rank holds ``padded_size = ceil(total / world_size)`` rows; the last
    ranks' shards may hold fewer real rows (``size``), the rest is padding.
    """
    padded = -(-total // world_size)
    start = min(total, rank * padded)
    return start, min(padded, total - start), padded


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
