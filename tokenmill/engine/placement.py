"""Where a tensor-parallel rank runs: its device and its share of the CPU threads.

Kept apart from ``tensor_parallel.py`` (which needs ZeroMQ) so a single-rank
engine can be built on a machine without the serving dependencies.
"""

from __future__ import annotations

import os

import torch

from tokenmill.config import ParallelConfig
from tokenmill.engine.args import EngineArgs


def rank_device(args: EngineArgs, rank: int, pc: ParallelConfig) -> torch.device:
    """The device of ``rank``: the CPU, or the GPU of its local index on its node."""
    device = args.resolved_device()
    if device.type == "cuda" and pc.tensor_parallel_size > 1:
        return torch.device("cuda", rank % pc.ranks_per_node)
    return device


def rank_threads(args: EngineArgs, pc: ParallelConfig) -> int:
    """CPU threads for one rank: the node's threads divided among its ranks.

    By default the node's threads are the CPUs this process may run on (fewer than
    the machine's when it is pinned, e.g. with ``TOKENMILL_ENGINE_CPUS``).
    """
    return max(1, (args.num_threads or usable_cpus()) // pc.ranks_per_node)


def usable_cpus() -> int:
    """How many CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1
