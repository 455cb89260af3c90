"""KV-cache block bookkeeping: block tables, reference counts and the prefix cache.

The KV cache is a pool of fixed-size blocks. Each sequence owns a block table
(a list of block ids, one per ``block_size`` tokens). Full blocks are keyed by
a chained hash of (parent block's hash, the block's token ids), so two
sequences whose prompts share a prefix map that prefix to the same physical
blocks, with a reference count per block.

Blocks whose count drops to zero go to the tail of an LRU free list but keep
their hash: until the block is handed out again, a later request with the
same prefix can revive it. The free list therefore *is* the prefix cache, and
eviction is simply "take the block at the head of the free list".

Only this class changes reference counts. Allocation never half-succeeds: a
call either gets every block it needs or returns ``None`` / ``False`` and
changes nothing, so the scheduler can preempt and retry.

Sliding-window models: once a sequence's leading blocks hold only tokens no
future query can attend to, :meth:`free_blocks_before` releases them and
leaves :data:`NULL_BLOCK` in their table slots (positions stay where they
are). Released blocks join the free list like any freed block, keeping their
prefix-cache hash, so a later request with the same prefix can still revive
them: a prefix hit walks the chain from the first block and revives every
block of it, and the new sequence releases the ones outside its window again
after its first step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

# A full block's identity: (parent block hash, the block's token ids). Keeping
# the token ids in the key makes lookups exact even if two hashes collide.
BlockKey = tuple[int, tuple[int, ...]]

_ROOT_HASH = 0x7A3B  # parent hash of a sequence's first block
NULL_BLOCK = -1  # a block-table slot whose block was released (outside every window)


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    key: BlockKey | None = None  # set once the block is full and registered
    hash: int | None = None


@dataclass
class _SeqBlocks:
    block_ids: list[int] = field(default_factory=list)
    num_hashed: int = 0  # leading blocks already registered in the prefix cache
    last_hash: int = _ROOT_HASH  # hash of block num_hashed - 1 (chain parent)
    num_released: int = 0  # leading blocks released by free_blocks_before (NULL_BLOCK)


class BlockManager:
    """Owns the KV block pool for one engine."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError(f"the KV cache must hold at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (head is evicted first).
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockKey, int] = {}  # full-block key -> block id
        self._seqs: dict[str, _SeqBlocks] = {}
        # Prefix-cache statistics, in tokens.
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences."""
        return 1.0 - len(self._free) / self.num_blocks

    def block_table(self, seq_id: str) -> list[int]:
        return self._seqs[seq_id].block_ids

    def has_seq(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def computed_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Block ids of the longest cached prefix of ``token_ids``.

        The last token is never counted: its logits must be computed, so at
        most ``len(token_ids) - 1`` tokens can come from the cache.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        max_blocks = (len(token_ids) - 1) // bs
        found: list[int] = []
        parent = _ROOT_HASH
        for i in range(max_blocks):
            key = (parent, tuple(token_ids[i * bs : (i + 1) * bs]))
            block_id = self._cached.get(key)
            if block_id is None:
                break
            found.append(block_id)
            parent = self.blocks[block_id].hash  # type: ignore[assignment]
        return found

    # --------------------------------------------------------------- mutations
    def allocate(
        self, seq_id: str, num_tokens: int, cached_block_ids: Sequence[int] = ()
    ) -> list[int] | None:
        """Give a new sequence blocks for its first ``num_tokens`` tokens.

        ``cached_block_ids`` (from :meth:`computed_prefix`) are shared, not
        copied. Returns the new block table, or ``None`` if the pool is short.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        cached = list(cached_block_ids)
        num_new = max(self.blocks_needed(num_tokens) - len(cached), 0)
        # Reviving a cached block that sits in the free list also uses a free slot.
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        if num_new + revived > len(self._free):
            return None
        for b in cached:
            self._take(b)
        table = cached + [self._pop_free() for _ in range(num_new)]
        seq = _SeqBlocks(block_ids=table)
        if cached:
            seq.num_hashed = len(cached)
            seq.last_hash = self.blocks[cached[-1]].hash  # type: ignore[assignment]
        self._seqs[seq_id] = seq
        return table

    def append_slots(self, seq_id: str, num_tokens: int) -> list[int] | None:
        """Grow a sequence's table to cover ``num_tokens`` tokens in total.

        Returns the newly added block ids (possibly empty) or ``None`` if the
        pool cannot supply them (nothing changes then).
        """
        seq = self._seqs[seq_id]
        need = self.blocks_needed(num_tokens) - len(seq.block_ids)
        if need <= 0:
            return []
        if need > len(self._free):
            return None
        new = [self._pop_free() for _ in range(need)]
        seq.block_ids.extend(new)
        return new

    def cache_full_blocks(self, seq_id: str, token_ids: Sequence[int],
                          num_computed: int) -> list[tuple[int, int]]:
        """Register the sequence's blocks that are now full of computed tokens.

        Returns ``(index in the table, block id)`` of the blocks newly registered
        (for the offload tiers; a block already holding the same content elsewhere
        is included).
        """
        if not self.enable_prefix_caching:
            return []
        seq = self._seqs[seq_id]
        registered: list[tuple[int, int]] = []
        bs = self.block_size
        num_full = min(num_computed // bs, len(seq.block_ids))
        for i in range(seq.num_hashed, num_full):
            key: BlockKey = (seq.last_hash, tuple(token_ids[i * bs : (i + 1) * bs]))
            block_hash = hash(key)
            block = self.blocks[seq.block_ids[i]]
            existing = self._cached.get(key)
            if existing is None and block.key is None:
                block.key, block.hash = key, block_hash
                self._cached[key] = block.block_id
            elif block.key is None:
                # Same content was computed concurrently elsewhere; keep the
                # first copy as the canonical cached block, this one stays private.
                block.hash = block_hash
            seq.last_hash = block_hash
            seq.num_hashed = i + 1
            if seq.block_ids[i] != NULL_BLOCK:
                registered.append((i, seq.block_ids[i]))
        return registered

    def fork(self, parent_id: str, child_id: str, num_tokens: int) -> list[tuple[int, int]] | None:
        """Give ``child_id`` the parent's blocks for its first ``num_tokens`` tokens.

        Full blocks are shared (reference counted). A partial last block, which
        both sequences will keep writing to, is duplicated: the returned
        (src, dst) copies must be performed by the runner before the next
        forward pass. Returns ``None`` (and changes nothing) if no block is
        free for the copy.
        """
        parent = self._seqs[parent_id]
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id!r} already has blocks")
        table = list(parent.block_ids[: self.blocks_needed(num_tokens)])
        copies: list[tuple[int, int]] = []
        num_shared = len(table)
        if num_tokens % self.block_size:
            if not self._free:
                return None
            dst = self._pop_free()
            copies.append((table[-1], dst))
            table[-1] = dst
            num_shared -= 1
        for b in table[:num_shared]:
            if b != NULL_BLOCK:
                self.blocks[b].ref_count += 1
        child = _SeqBlocks(block_ids=table, num_released=min(parent.num_released, num_shared))
        if parent.num_hashed <= num_shared:
            child.num_hashed, child.last_hash = parent.num_hashed, parent.last_hash
        self._seqs[child_id] = child
        return copies

    def free(self, seq_id: str) -> None:
        """Release every block of a finished, aborted or preempted sequence.

        Blocks go to the free list tail in reverse table order, so a
        sequence's later blocks are evicted before its (more shareable) prefix.
        Freeing an unknown sequence is a no-op.
        """
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        for b in reversed(seq.block_ids):
            if b != NULL_BLOCK:
                self._release(b)

    def free_blocks_before(self, seq_id: str, num_tokens: int) -> int:
        """Release the sequence's leading blocks that hold only positions < ``num_tokens``.

        For sliding-window models: the scheduler passes the first position any
        future query of the sequence can still attend to. With prefix caching,
        only blocks already registered are released (a registered block keeps
        its hash in the free list; the chain of hashes stays intact). Their
        table slots become :data:`NULL_BLOCK`. Returns how many were released.
        """
        seq = self._seqs[seq_id]
        upto = min(max(num_tokens, 0) // self.block_size, len(seq.block_ids))
        if self.enable_prefix_caching:
            upto = min(upto, seq.num_hashed)
        released = 0
        for i in range(seq.num_released, upto):
            b = seq.block_ids[i]
            if b != NULL_BLOCK:
                self._release(b)
                seq.block_ids[i] = NULL_BLOCK
                released += 1
        seq.num_released = max(seq.num_released, upto)
        return released

    def _release(self, b: int) -> None:
        """Drop one reference; an unreferenced block joins the free list's tail."""
        block = self.blocks[b]
        block.ref_count -= 1
        if block.ref_count < 0:
            raise AssertionError(f"block {b} reference count went negative")
        if block.ref_count == 0:
            if block.key is None:
                block.hash = None
            self._free[b] = None

    def record_prefix_query(self, num_queried: int, num_hit: int) -> None:
        self.prefix_queries += num_queried
        self.prefix_hits += num_hit

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash (only when no sequence is live)."""
        if self._seqs:
            return False
        self._cached.clear()
        for block in self.blocks:
            block.key, block.hash = None, None
        return True

    # ----------------------------------------------------------------- helpers
    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.key is not None:  # evict from the prefix cache
            if self._cached.get(block.key) == block_id:
                del self._cached[block.key]
            block.key = None
        block.hash = None
        block.ref_count = 1
        return block_id

    def check_invariants(self) -> None:
        """Assert internal consistency (used by tests)."""
        refs = [0] * self.num_blocks
        for seq in self._seqs.values():
            for i, b in enumerate(seq.block_ids):
                assert (b == NULL_BLOCK) == (i < seq.num_released), (seq, i)
                if b != NULL_BLOCK:
                    refs[b] += 1
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], (block, refs[block.block_id])
            assert (block.ref_count == 0) == (block.block_id in self._free), block
        for key, b in self._cached.items():
            assert self.blocks[b].key == key
