"""Step inputs built with whole-array numpy and persistent block tables equal the plain loop.

``reference_step_inputs`` is the straightforward per-sequence loop the runner
used before (kept here as the oracle). Random steps mix prompt chunks,
decodes, draft tokens, prompt-logprob rows and released (sliding-window)
blocks; sequences of steps grow, release, re-allocate, fork and evict block
tables, and the persistent tables must always give what a fresh build gives.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from tokenmill.runner.block_tables import PersistentBlockTables
from tokenmill.runner.model_runner import build_step_inputs
from tokenmill.step_types import ScheduledSeq, SchedulerOutput

NULL = -1


def reference_step_inputs(out: SchedulerOutput, block_size: int) -> dict[str, np.ndarray]:
    seqs = out.seqs
    input_ids, positions, slots, logits_idx = [], [], [], []
    qsl = [0]
    max_blocks = max((len(s.block_table) for s in seqs), default=0)
    tables = np.zeros((len(seqs), max_blocks), dtype=np.int32)
    for i, s in enumerate(seqs):
        start = qsl[-1]
        for j, token in enumerate(s.token_ids):
            pos = s.start_pos + j
            input_ids.append(token)
            positions.append(pos)
            slots.append(s.block_table[pos // block_size] * block_size + pos % block_size)
        qsl.append(start + len(s.token_ids))
        tables[i, :len(s.block_table)] = [max(b, 0) for b in s.block_table]
        logits_idx.extend(range(qsl[-1] - s.num_logits, qsl[-1]))
    return dict(input_ids=np.array(input_ids, dtype=np.int64),
                positions=np.array(positions, dtype=np.int64),
                slot_mapping=np.array(slots, dtype=np.int64),
                query_start_loc=np.array(qsl, dtype=np.int64),
                seq_lens=np.array([s.start_pos + len(s.token_ids) for s in seqs], dtype=np.int64),
                block_tables=tables,
                logits_indices=np.array(logits_idx, dtype=np.int64))


def assert_same(step, want: dict[str, np.ndarray]) -> None:
    for name, expected in want.items():
        got = getattr(step, name)
        assert got.dtype == expected.dtype, name
        np.testing.assert_array_equal(got, expected, err_msg=name)


def random_seq(rng: random.Random, i: int, block_size: int, next_block: list[int]) -> ScheduledSeq:
    start = rng.choice([0, rng.randrange(0, 60)])
    kind = rng.choice(["decode", "decode", "chunk", "last-chunk", "drafts", "prompt-logprobs"])
    q = 1 if kind == "decode" else rng.randint(1, 9)
    num_logits = {"decode": 1, "chunk": 0, "last-chunk": 1, "drafts": q,
                  "prompt-logprobs": q}[kind]
    num_blocks = (start + q - 1) // block_size + 1 + rng.randrange(2)
    table = []
    for _ in range(num_blocks):
        next_block[0] += 1
        table.append(next_block[0])
    released = rng.randrange(0, max(1, start // block_size))  # never a block being written
    table[:released] = [NULL] * released
    return ScheduledSeq(f"s{i}", [rng.randrange(1000) for _ in range(q)], start, table,
                        num_logits, num_draft_tokens=q - 1 if kind == "drafts" else 0)


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_step_inputs_match_the_per_sequence_loop(seed, block_size):
    rng = random.Random(seed)
    counter = [0]
    seqs = [random_seq(rng, i, block_size, counter) for i in range(rng.randint(1, 12))]
    if seed % 3 == 0:  # all decodes: the fast path
        seqs = [ScheduledSeq(s.seq_id, s.token_ids[:1], s.start_pos, s.block_table, 1)
                for s in seqs]
    out = SchedulerOutput(seqs=seqs, num_batched_tokens=sum(len(s.token_ids) for s in seqs))
    want = reference_step_inputs(out, block_size)
    assert_same(build_step_inputs(out, block_size), want)
    assert_same(build_step_inputs(out, block_size, PersistentBlockTables(rows=2, width=1)), want)


def test_as_many_logit_rows_as_sequences_but_not_one_each():
    # Drafts on one sequence and a mid-prompt chunk on another: 4 rows for 4 sequences.
    seqs = [ScheduledSeq("a", [80], 45, [6, 7, 11], 1),
            ScheduledSeq("b", [34, 34], 39, [8, 10, 15], 2, num_draft_tokens=1),
            ScheduledSeq("c", [198], 42, [12, 14, 16], 1),
            ScheduledSeq("d", [125, 94, 152], 16, [0, 17], 0)]
    out = SchedulerOutput(seqs=seqs, num_batched_tokens=7)
    step = build_step_inputs(out, 16)
    assert step.logits_indices.tolist() == [0, 1, 2, 3]
    assert_same(step, reference_step_inputs(out, 16))


def test_persistent_tables_follow_growth_release_reallocation_and_eviction():
    """Many steps of live tables changing the ways the block manager changes them."""
    rng = random.Random(0)
    tables = PersistentBlockTables(rows=4, width=2)
    live: dict[str, list[int]] = {}
    next_block = 0

    def new_table(n: int) -> list[int]:
        nonlocal next_block
        next_block += n
        return list(range(next_block - n, next_block))

    for step in range(400):
        # Arrivals, finishes, preemptions (a new list for the same id), forks.
        if len(live) < 20 and rng.random() < 0.3:
            live[f"q{step}"] = new_table(rng.randint(1, 5))
        if live and rng.random() < 0.1:
            del live[rng.choice(sorted(live))]
        if live and rng.random() < 0.05:
            sid = rng.choice(sorted(live))
            live[sid] = new_table(len(live[sid]))  # re-allocated after preemption
        if live and rng.random() < 0.05:
            parent = live[rng.choice(sorted(live))]
            live[f"f{step}"] = list(parent)  # forked: a copy, NULLs included
        for table in live.values():  # in place, as the block manager does
            if rng.random() < 0.2:
                table.extend(new_table(rng.randint(1, 3)))
            if rng.random() < 0.1:
                released = sum(1 for b in table if b == NULL)
                upto = min(len(table) - 1, released + rng.randint(0, 2))
                table[:upto] = [NULL] * upto
        scheduled = [sid for sid in sorted(live) if rng.random() < 0.8]  # some skip a step
        got = tables.gather(scheduled, [live[s] for s in scheduled])
        want = np.zeros((len(scheduled), max((len(live[s]) for s in scheduled), default=0)),
                        dtype=np.int32)
        for i, sid in enumerate(scheduled):
            want[i, :len(live[sid])] = np.maximum(live[sid], 0)
        np.testing.assert_array_equal(got, want, err_msg=f"step {step}")
    assert tables.num_rows <= 2 * 20 + 64


def test_persistent_tables_copy_only_what_changed():
    tables = PersistentBlockTables()
    live = {f"s{i}": [10 * i, 10 * i + 1] for i in range(8)}
    ids = sorted(live)
    tables.gather(ids, [live[s] for s in ids])
    assert tables.num_full_copies == 8
    for _ in range(5):
        for table in live.values():
            table.append(table[-1] + 1)  # grows in place
        tables.gather(ids, [live[s] for s in ids])
    assert tables.num_full_copies == 8  # appends only: no whole-table copy
    live["s3"] = [99, 98]  # re-allocated: a new list
    got = tables.gather(ids, [live[s] for s in ids])
    assert tables.num_full_copies == 9
    assert got[3].tolist()[:2] == [99, 98] and not got[3, 2:].any()
    live["s4"][-1] = 77  # changed in place at the tail (not a pattern the manager uses): caught
    got = tables.gather(ids, [live[s] for s in ids])
    assert got[4, len(live["s4"]) - 1] == 77
