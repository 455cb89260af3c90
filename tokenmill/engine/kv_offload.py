"""The prefix cache's offload tiers: content keys, look-ups, restores and the background writer.

Every full, computed block the scheduler registers in the pool's prefix cache is
also offered to the tiers (host memory, disk): the engine thread starts copying its
bytes out of the KV caches (on a GPU into pinned memory, asynchronously, ordered
before any later step that could overwrite the block), and a background thread waits
for the copy and writes it. The writer's queue is
bounded in bytes; when it is full the block is dropped (counted), so a slow disk never
stalls decoding. Blocks already in the tiers are not written again.

On a prefix miss in the pool, the scheduler asks :meth:`KVOffloadManager.lookup`
how many of the prompt's next full blocks the tiers hold; those are read and
verified (checksum, token ids) *at look-up*, so a corrupted file is a miss, and
staged until the engine copies them into the blocks the scheduler allocated
(:meth:`KVOffloadManager.restore`), before the step's forward pass.

Content keys: ``key_i = SHA-256(namespace || key_{i-1} || token ids of block i)``,
``key_{-1}`` empty. The namespace digests the model's identity (weights and
config), the model and KV-cache dtypes, the block size, the cache layout and
any draft model, so another model or setting never reads these blocks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tokenmill.engine.kv_store import KVTier
from tokenmill.runner.model_runner import BlockCopy

logger = logging.getLogger(__name__)

# Files up to this size are hashed whole for the model's identity; larger ones by
# their size and 64 evenly spaced 1 MiB samples (a multi-GB checkpoint is not read
# in full at every start-up).
_FULL_HASH_LIMIT = 2 << 30
_SAMPLES, _SAMPLE_BYTES = 64, 1 << 20
# Bytes of block copies waiting for the background writer; beyond this, new blocks are
# dropped (counted) rather than stalling the engine.
DEFAULT_QUEUE_BYTES = 256 << 20
# Verified blocks kept between a look-up and their restore (a request at the head of
# the queue may wait a few steps for room); the oldest are dropped beyond this.
_STAGED_MAX_BYTES = 256 << 20


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a weights file's contents (sampled above 2 GiB, see above)."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        else:
            step = (size - _SAMPLE_BYTES) // (_SAMPLES - 1)
            for i in range(_SAMPLES):
                f.seek(i * step)
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def namespace_digest(identity: dict[str, Any]) -> bytes:
    """32 bytes naming everything a block's bytes depend on besides its tokens."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).digest()


def chain_keys(namespace: bytes, token_ids: Sequence[int], block_size: int, num_blocks: int,
               start: Sequence[bytes] = ()) -> list[bytes]:
    """Content keys of the first ``num_blocks`` full blocks of ``token_ids``.

    ``start``: keys already known for the leading blocks (extended, not recomputed).
    """
    keys = list(start[:num_blocks])
    parent = keys[-1] if keys else b""
    for i in range(len(keys), num_blocks):
        block = token_ids[i * block_size:(i + 1) * block_size]
        parent = hashlib.sha256(namespace + parent
                                + struct.pack(f"<{len(block)}i", *block)).digest()
        keys.append(parent)
    return keys


class BlockIO(Protocol):
    """What the manager needs from the executor: a block's bytes out and in."""

    def read_block(self, block_id: int) -> BlockCopy: ...

    def write_block(self, block_id: int, payload: bytes) -> None: ...


@dataclass
class OffloadStats:
    """Counters behind the ``tokenmill_kv_offload_*`` metrics."""

    stores: int = 0  # blocks written to a tier
    store_bytes: int = 0
    dropped: int = 0  # blocks not written because the writer's queue was full
    hits: int = 0  # blocks restored from a tier
    hit_bytes: int = 0
    misses: int = 0  # look-ups that found no (valid) block
    restore_seconds: float = 0.0  # reading, verifying and copying restored blocks


class KVOffloadManager:
    """Looks blocks up in the tiers, stages and restores them, writes new ones in the background.

    ``tiers`` are searched in order (host memory first, then disk); a block
    found on disk is also kept in memory. The scheduler calls :meth:`block_keys`
    and :meth:`lookup`; the engine core calls :meth:`restore` and :meth:`store`.
    """

    def __init__(self, tiers: Sequence[KVTier], namespace: bytes, block_size: int,
                 queue_bytes: int = DEFAULT_QUEUE_BYTES) -> None:
        if not tiers:
            raise ValueError("KV offload needs at least one tier")
        self.tiers = list(tiers)
        self.namespace = namespace
        self.block_size = block_size
        self.stats = OffloadStats()
        # Verified payloads waiting for restore(); a request that could not be admitted
        # this step keeps its blocks staged for the next try, within _STAGED_MAX_BYTES.
        self._staged: OrderedDict[bytes, bytes] = OrderedDict()
        self._staged_bytes = 0
        self._pinned: set[bytes] = set()  # looked up this step: kept until restore()
        # Unbounded in items, bounded in bytes: a long prompt registers many blocks at once.
        self._queue: queue.Queue[tuple[bytes, tuple[int, ...], BlockCopy] | None] = queue.Queue()
        self.queue_bytes = queue_bytes
        self._block_bytes = 0  # size of the last block read (all blocks are the same size)
        self._queued_bytes = 0
        self._queued_lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, name="kv-offload-writer",
                                        daemon=True)
        self._writer.start()

    # -------------------------------------------------------- scheduler side
    def block_keys(self, token_ids: Sequence[int], num_blocks: int,
                   start: Sequence[bytes] = ()) -> list[bytes]:
        """Content keys of the first ``num_blocks`` full blocks of ``token_ids``."""
        return chain_keys(self.namespace, token_ids, self.block_size, num_blocks, start)

    def lookup(self, token_ids: Sequence[int], first: int, max_blocks: int) -> list[bytes]:
        """Keys of the blocks ``first, first + 1, ...`` (< ``max_blocks``) the tiers hold.

        Stops at the first block no tier holds intact. Found payloads were read
        and verified here and are staged for :meth:`restore` (kept a few steps if the
        request cannot be admitted yet, within a byte budget).
        """
        if first >= max_blocks:
            return []
        t0 = time.perf_counter()
        bs = self.block_size
        keys = self.block_keys(token_ids, first)
        found: list[bytes] = []
        for i in range(first, max_blocks):
            keys = self.block_keys(token_ids, i + 1, keys)
            key = keys[i]
            if key not in self._staged:
                payload = self._get(key, token_ids[i * bs:(i + 1) * bs])
                if payload is None:
                    self.stats.misses += 1
                    break
                self._stage(key, payload)
            self._pinned.add(key)
            found.append(key)
        self.stats.restore_seconds += time.perf_counter() - t0
        return found

    def _get(self, key: bytes, tokens: Sequence[int]) -> bytes | None:
        for i, tier in enumerate(self.tiers):
            if not tier.contains(key):
                continue
            payload = tier.get(key, tokens)
            if payload is not None:
                for upper in self.tiers[:i]:  # promote into the faster tiers
                    upper.put(key, tokens, payload)
                return payload
        return None

    # ------------------------------------------------------------ engine side
    def restore(self, restores: Sequence[tuple[int, bytes]], io: BlockIO) -> None:
        """Copy staged blocks into the caches: ``(block_id, key)`` pairs from the scheduler."""
        t0 = time.perf_counter()
        for block_id, key in restores:
            payload = self._staged[key]
            io.write_block(block_id, payload)
            self.stats.hits += 1
            self.stats.hit_bytes += len(payload)
        for _, key in restores:  # restored: the pool has them now
            payload = self._staged.pop(key, None)
            if payload is not None:
                self._staged_bytes -= len(payload)
        self._pinned.clear()
        self.stats.restore_seconds += time.perf_counter() - t0

    def _stage(self, key: bytes, payload: bytes) -> None:
        self._staged[key] = payload
        self._staged_bytes += len(payload)
        for old_key in list(self._staged):
            if self._staged_bytes <= _STAGED_MAX_BYTES:
                break
            if old_key not in self._pinned and old_key != key:
                self._staged_bytes -= len(self._staged.pop(old_key))

    def store(self, blocks: Sequence[tuple[int, bytes, Sequence[int]]], io: BlockIO) -> None:
        """Offer newly registered blocks ``(block_id, key, token ids)`` to the tiers.

        Blocks some tier already holds are skipped; the rest are copied out now and
        queued for the writer, or dropped when its queue holds ``queue_bytes`` already.
        """
        for block_id, key, tokens in blocks:
            if all(tier.contains(key) for tier in self.tiers):
                continue
            if self._queued_bytes + self._block_bytes > self.queue_bytes:
                self.stats.dropped += 1
                continue
            copy = io.read_block(block_id)
            self._block_bytes = copy.nbytes
            with self._queued_lock:
                self._queued_bytes += copy.nbytes
            self._queue.put_nowait((key, tuple(tokens), copy))

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                key, tokens, copy = item
                payload: bytes | None = None
                try:
                    payload = copy.wait()
                except Exception:  # noqa: BLE001 - a failed copy loses one block, not the writer
                    logger.exception("KV offload: copying a block to the host failed")
                stored = False
                for tier in self.tiers if payload is not None else ():
                    try:
                        stored |= tier.put(key, tokens, payload)
                    except Exception:  # noqa: BLE001 - a failing tier must not kill the writer
                        logger.exception("KV offload: writing to the %s tier failed", tier.name)
                if stored and payload is not None:
                    self.stats.stores += 1
                    self.stats.store_bytes += len(payload)
                with self._queued_lock:
                    self._queued_bytes -= copy.nbytes
            finally:
                self._queue.task_done()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued block is written (tests, shutdown). False on timeout."""
        if timeout is None:
            self._queue.join()
            return True
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (up to ``timeout`` seconds), then stop the writer."""
        if not self._writer.is_alive():
            return
        self.flush(timeout)
        self._queue.put(None)
        self._writer.join(timeout=1.0)
