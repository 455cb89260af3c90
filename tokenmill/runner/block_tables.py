"""Block tables of the running sequences, kept in one host array from step to step.

Each step the model runner needs a ``[B, max_blocks]`` array of the scheduled
sequences' block tables. Rebuilding it from Python lists costs one pass over
every block of every sequence, every step (thousands of entries at a batch of
hundreds). Between two steps a sequence's table changes very little, so this
keeps one row per sequence and, per step, copies only what changed:

- blocks appended at the end (the common case: one new block every
  ``block_size`` decode steps);
- leading blocks released by a sliding window (their entries become
  ``NULL_BLOCK`` in place, from the front; the array holds 0 for them, as the
  step inputs always have: they are never read);
- anything else (a new sequence, a re-allocation after preemption, a fork, a
  table that no longer matches what was copied) is copied whole.

The scheduler hands the runner the block manager's own list for each
sequence, so "the same list object as last step" identifies an unchanged
allocation cheaply; a table that arrives as a fresh list each step (from
another process) is simply copied whole each time. Rows of sequences not
scheduled recently are recycled; a sequence that comes back is copied whole,
so correctness never depends on what was evicted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NULL_ENTRY = -1  # a released table slot (the block manager's NULL_BLOCK)


class _Row:
    """What the array's row ``index`` holds about one sequence's table."""

    __slots__ = ("index", "table", "synced", "released", "last_step")

    def __init__(self, index: int) -> None:
        self.index = index
        self.table: list[int] | None = None  # the list last copied from
        self.synced = 0  # leading entries copied
        self.released = 0  # leading entries known to be NULL (stored as 0)
        self.last_step = -1


class PersistentBlockTables:
    """One ``int32`` row per recently scheduled sequence, updated in place."""

    def __init__(self, rows: int = 64, width: int = 32) -> None:
        self._array = np.zeros((rows, width), dtype=np.int32)
        self._rows: dict[str, _Row] = {}
        self._free = list(range(rows - 1, -1, -1))
        self._step = 0
        self.num_full_copies = 0  # tables copied whole (for tests and benchmarks)

    @property
    def num_rows(self) -> int:
        return len(self._rows)

    def gather(self, seq_ids: Sequence[str], tables: Sequence[list[int]]) -> np.ndarray:
        """The ``[B, max_len]`` tables of one step (0 past each table's end and for NULLs)."""
        self._step += 1
        step = self._step
        rows = np.empty(len(seq_ids), dtype=np.intp)
        width = 0
        for i, (seq_id, table) in enumerate(zip(seq_ids, tables, strict=True)):
            row = self._rows.get(seq_id)
            if row is None:
                row = self._new_row(seq_id)
            self._sync(row, table)
            row.last_step = step
            rows[i] = row.index
            if len(table) > width:
                width = len(table)
        if len(self._rows) > 2 * len(seq_ids) + 64:
            self._evict(step)
        return self._array[rows, :width]

    # ------------------------------------------------------------- internals
    def _sync(self, row: _Row, table: list[int]) -> None:
        n = len(table)
        k = row.synced
        arr = self._array
        if (row.table is not table or n < k
                or (k and table[k - 1] != arr[row.index, k - 1] and table[k - 1] != NULL_ENTRY)):
            self._copy_whole(row, table)
            return
        if n > arr.shape[1]:
            self._widen(n)
            arr = self._array
        if n > k:
            arr[row.index, k:n] = np.maximum(np.asarray(table[k:n], dtype=np.int64), 0)
            row.synced = n
        r = row.released
        while r < n and table[r] == NULL_ENTRY:  # released from the front, in place
            arr[row.index, r] = 0
            r += 1
        row.released = r

    def _copy_whole(self, row: _Row, table: list[int]) -> None:
        n = len(table)
        if n > self._array.shape[1]:
            self._widen(n)
        line = self._array[row.index]
        line[:n] = np.maximum(np.asarray(table, dtype=np.int64), 0)
        line[n:] = 0
        row.table, row.synced = table, n
        r = 0
        while r < n and table[r] == NULL_ENTRY:
            r += 1
        row.released = r
        self.num_full_copies += 1

    def _new_row(self, seq_id: str) -> _Row:
        if not self._free:
            old = self._array.shape[0]
            self._array = np.concatenate([self._array, np.zeros_like(self._array)])
            self._free = list(range(2 * old - 1, old - 1, -1))
        row = _Row(self._free.pop())
        self._rows[seq_id] = row
        return row

    def _widen(self, width: int) -> None:
        rows, old = self._array.shape
        wider = np.zeros((rows, max(width, 2 * old)), dtype=np.int32)
        wider[:, :old] = self._array
        self._array = wider

    def _evict(self, step: int) -> None:
        for seq_id, row in list(self._rows.items()):
            if row.last_step != step:
                del self._rows[seq_id]
                self._free.append(row.index)
