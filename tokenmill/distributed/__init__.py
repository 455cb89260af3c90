"""Tensor parallelism: process groups, collectives and how tensors are split across ranks."""

from tokenmill.distributed.group import (
    CollectiveError,
    TPGroup,
    divisors,
    padded_shard,
    shard_range,
)

__all__ = ["CollectiveError", "TPGroup", "divisors", "padded_shard", "shard_range"]
