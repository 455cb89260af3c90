"""Offload tiers for the prefix cache: where full KV blocks go besides the device pool.

A tier maps a block's *content key* (32 bytes, see :mod:`tokenmill.engine.kv_offload`)
to the block's bytes (every layer's K and V rows, quantization scales included,
for the target model and any draft model). Each entry also keeps the block's token
ids, and a lookup must present the same ids: like the pool's prefix cache, a
lookup is exact even if two keys were ever to collide.

- :class:`HostKVStore`: host memory, LRU within a byte budget.
- :class:`DiskKVStore`: one file per block under a directory, LRU within a byte
  budget, surviving restarts. Each file carries a header (magic, version, key,
  token ids, payload length) and the SHA-256 of header and payload; a file that
  is truncated, corrupted or written for another key is a miss (and deleted),
  never served. Files are written to a temporary name and renamed, so readers
  never see a half-written file under a real name.

Both are thread-safe: the engine looks blocks up from its own thread while a
background writer (:class:`~tokenmill.engine.kv_offload.KVOffloadManager`) puts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)

KEY_BYTES = 32
_MAGIC = b"TMKVBLK1"
# magic, key, number of token ids, payload length
_HEADER = struct.Struct(f"<8s{KEY_BYTES}sIQ")
_DIGEST_BYTES = 32
_SUFFIX = ".kvb"


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(token_ids)}i", *token_ids)


class KVTier(Protocol):
    """One offload tier (host memory or disk)."""

    name: str

    def contains(self, key: bytes) -> bool:
        """Whether an entry is indexed under ``key`` (it may still fail verification)."""
        ...

    def get(self, key: bytes, token_ids: Sequence[int]) -> bytes | None:
        """The verified payload stored for (``key``, ``token_ids``), else None."""
        ...

    def put(self, key: bytes, token_ids: Sequence[int], payload: bytes) -> bool:
        """Store a block; False when it was not stored (already there, or too large)."""
        ...

    @property
    def num_bytes(self) -> int:
        """Bytes the tier holds now."""
        ...


class HostKVStore:
    """Blocks in host memory, least recently used evicted beyond ``max_bytes``."""

    name = "memory"

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("the host-memory KV tier needs a positive size")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, tuple[bytes, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def num_bytes(self) -> int:
        return self._bytes

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: bytes, token_ids: Sequence[int]) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] != _token_bytes(token_ids):
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: bytes, token_ids: Sequence[int], payload: bytes) -> bool:
        if len(payload) > self.max_bytes:
            return False
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return False
            self._entries[key] = (_token_bytes(token_ids), payload)
            self._bytes += len(payload)
            while self._bytes > self.max_bytes:
                _, (_, old) = self._entries.popitem(last=False)
                self._bytes -= len(old)
        return True


class DiskKVStore:
    """Checksummed block files under ``root``, LRU-trimmed to ``max_bytes``.

    The index (key -> file size, in recency order) is rebuilt from the directory
    at start-up, oldest modification time first, so a restarted server knows
    every block an earlier run left behind. Reads touch the file's mtime, so
    recency survives restarts too.
    """

    name = "disk"

    def __init__(self, root: str | os.PathLike[str], max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("the disk KV tier needs a positive size limit")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._index: OrderedDict[bytes, int] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._scan()

    # ----------------------------------------------------------------- layout
    def path_of(self, key: bytes) -> Path:
        """Where the block with ``key`` lives (two-level fan-out by the key's hex)."""
        name = key.hex()
        return self.root / name[:2] / (name + _SUFFIX)

    def _scan(self) -> None:
        found: list[tuple[float, bytes, int]] = []
        for sub in self.root.iterdir():
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for entry in os.scandir(sub):
                if not entry.name.endswith(_SUFFIX):
                    if entry.name.startswith(".tmp"):
                        _unlink(Path(entry.path))  # left by a crashed writer
                    continue
                try:
                    key = bytes.fromhex(entry.name[: -len(_SUFFIX)])
                    st = entry.stat()
                except (ValueError, OSError):
                    continue
                if len(key) == KEY_BYTES:
                    found.append((st.st_mtime, key, st.st_size))
        found.sort()
        for _, key, size in found:
            self._index[key] = size
            self._bytes += size
        self._trim()

    # ------------------------------------------------------------------ reads
    @property
    def num_bytes(self) -> int:
        return self._bytes

    @property
    def num_blocks(self) -> int:
        return len(self._index)

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._index

    def get(self, key: bytes, token_ids: Sequence[int]) -> bytes | None:
        with self._lock:
            if key not in self._index:
                return None
            self._index.move_to_end(key)
        path = self.path_of(key)
        try:
            data = path.read_bytes()
        except OSError:
            self._forget(key)
            return None
        payload = self._verify(data, key, token_ids)
        if payload is None:
            logger.warning("KV disk tier: %s failed verification; discarded", path.name)
            self._forget(key, unlink=True)
            return None
        try:
            os.utime(path)
        except OSError:
            pass
        return payload

    @staticmethod
    def _verify(data: bytes, key: bytes, token_ids: Sequence[int]) -> bytes | None:
        """The payload if ``data`` is a whole, intact file for (key, token_ids)."""
        tokens = _token_bytes(token_ids)
        head = _HEADER.size
        if len(data) < head + _DIGEST_BYTES:
            return None
        magic, file_key, num_tokens, length = _HEADER.unpack_from(data)
        body_end = head + 4 * num_tokens + length
        if magic != _MAGIC or file_key != key or len(data) != body_end + _DIGEST_BYTES:
            return None
        if data[head:head + 4 * num_tokens] != tokens:
            return None
        if hashlib.sha256(memoryview(data)[:body_end]).digest() != data[body_end:]:
            return None
        return data[head + 4 * num_tokens:body_end]

    # ----------------------------------------------------------------- writes
    def put(self, key: bytes, token_ids: Sequence[int], payload: bytes) -> bool:
        tokens = _token_bytes(token_ids)
        header = _HEADER.pack(_MAGIC, key, len(token_ids), len(payload))
        size = len(header) + len(tokens) + len(payload) + _DIGEST_BYTES
        if size > self.max_bytes:
            return False
        with self._lock:
            if key in self._index:
                return False
        digest = hashlib.sha256()
        for part in (header, tokens, payload):
            digest.update(part)
        path = self.path_of(key)
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                for part in (header, tokens, payload, digest.digest()):
                    f.write(part)
            os.replace(tmp, path)
        except OSError as exc:
            _unlink(Path(tmp))
            logger.warning("KV disk tier: could not write %s: %s", path, exc)
            return False
        with self._lock:
            self._index[key] = size
            self._bytes += size
        self._trim()
        return True

    def _forget(self, key: bytes, unlink: bool = False) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._bytes -= size
        if unlink:
            _unlink(self.path_of(key))

    def _trim(self) -> None:
        """Delete least recently used files until the tier fits its limit."""
        victims = []
        with self._lock:
            while self._bytes > self.max_bytes and self._index:
                key, size = self._index.popitem(last=False)
                self._bytes -= size
                victims.append(key)
        for key in victims:
            _unlink(self.path_of(key))


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
