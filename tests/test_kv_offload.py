"""Offload tiers of the prefix cache: stores, keys, the writer, the scheduler's restores,
and restarts of a real engine served from the disk tier."""

from __future__ import annotations

import threading

import pytest

from tokenmill.config import SchedulerConfig
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.kv_offload import KVOffloadManager, chain_keys, namespace_digest
from tokenmill.engine.kv_store import DiskKVStore, HostKVStore
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Sequence
from tokenmill.runner.model_runner import BlockCopy
from tokenmill.sampling import SamplingParams

KEY = bytes(range(32))


def _seq(name, prompt, max_tokens=2):
    return Sequence(seq_id=name, request_id=name, index=0, token_ids=list(prompt),
                    num_prompt_tokens=len(prompt),
                    params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                    arrival_time=0.0, arrival_order=0)
TOKENS = [5, 6, 7, 8]


# ----------------------------------------------------------------------- stores
def test_disk_store_round_trip_and_exact_tokens(tmp_path):
    store = DiskKVStore(tmp_path, 1 << 20)
    assert store.put(KEY, TOKENS, b"payload" * 10)
    assert not store.put(KEY, TOKENS, b"payload" * 10)  # already there
    assert store.get(KEY, TOKENS) == b"payload" * 10
    assert store.get(KEY, [5, 6, 7, 9]) is None  # same key, other tokens: never served
    assert store.get(bytes(32), TOKENS) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "wrong-key"])
def test_damaged_file_is_a_miss_and_removed(tmp_path, damage):
    store = DiskKVStore(tmp_path, 1 << 20)
    store.put(KEY, TOKENS, bytes(range(256)) * 4)
    path = store.path_of(KEY)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[:-100])
    elif damage == "flip":
        data[len(data) // 2] ^= 0x40
        path.write_bytes(data)
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a valid file copied under another key's name
        other = bytes(31) + b"\x01"
        store.put(other, TOKENS, b"x")
        path.write_bytes(store.path_of(other).read_bytes())
    reopened = DiskKVStore(tmp_path, 1 << 20)  # as after a restart
    assert reopened.contains(KEY)
    assert reopened.get(KEY, TOKENS) is None
    assert not path.exists() and not reopened.contains(KEY)


def test_disk_store_survives_restart_and_trims_lru(tmp_path):
    store = DiskKVStore(tmp_path, 10_000)
    keys = [bytes([i]) * 32 for i in range(4)]
    for k in keys:
        assert store.put(k, TOKENS, bytes(3000))
    # 4 files of ~3.1 kB exceed 10 kB: the oldest went.
    assert not store.contains(keys[0]) and store.num_bytes <= 10_000
    assert not store.path_of(keys[0]).exists()
    (tmp_path / "ab").mkdir(exist_ok=True)
    (tmp_path / "ab" / ".tmpdead").write_bytes(b"half")  # a crashed writer's leftover
    again = DiskKVStore(tmp_path, 10_000)
    assert [again.contains(k) for k in keys] == [False, True, True, True]
    assert again.get(keys[2], TOKENS) == bytes(3000)
    assert not (tmp_path / "ab" / ".tmpdead").exists()


def test_host_store_lru():
    store = HostKVStore(250)
    for i in range(3):
        store.put(bytes([i]) * 32, TOKENS, bytes(100))
    assert not store.contains(bytes([0]) * 32) and store.num_bytes == 200
    assert store.get(bytes([1]) * 32, TOKENS) == bytes(100)
    assert store.get(bytes([1]) * 32, [1]) is None


def test_chain_keys_depend_on_prefix_and_namespace():
    a = namespace_digest({"model": "a", "kv_cache_dtype": "int8"})
    b = namespace_digest({"model": "a", "kv_cache_dtype": "fp8"})
    toks = list(range(12))
    ka = chain_keys(a, toks, 4, 3)
    assert len(ka) == 3 and len(set(ka)) == 3
    assert chain_keys(a, toks, 4, 3, start=ka[:1]) == ka
    assert chain_keys(a, [99] + toks[1:], 4, 3)[1] != ka[1]  # the chain carries the prefix
    assert not set(chain_keys(b, toks, 4, 3)) & set(ka)


# ------------------------------------------------------------------ the writer
class _FakeIO:
    def __init__(self):
        self.blocks: dict[int, bytes] = {}

    def read_block(self, block_id):
        return BlockCopy.ready(self.blocks.get(block_id, bytes([block_id]) * 8))

    def write_block(self, block_id, payload):
        self.blocks[block_id] = payload


class _SlowTier(HostKVStore):
    def __init__(self):
        super().__init__(1 << 20)
        self.gate = threading.Event()

    def put(self, key, token_ids, payload):
        self.gate.wait(10)
        return super().put(key, token_ids, payload)


def test_writer_survives_a_failed_copy():
    """A block whose device-to-host copy fails is lost alone: the writer keeps going."""

    def broken() -> bytes:
        raise RuntimeError("copy failed")

    class _BrokenOnce(_FakeIO):
        calls = 0

        def read_block(self, block_id):
            self.calls += 1
            return BlockCopy(8, broken) if self.calls == 1 else super().read_block(block_id)

    tier = HostKVStore(1 << 20)
    manager = KVOffloadManager([tier], bytes(32), 4)
    manager.store([(0, bytes([0]) * 32, TOKENS), (1, bytes([1]) * 32, TOKENS)], _BrokenOnce())
    assert manager.flush(10)
    assert manager.stats.stores == 1
    assert not tier.contains(bytes([0]) * 32) and tier.contains(bytes([1]) * 32)
    assert manager._queued_bytes == 0
    manager.close()


def test_writer_drops_on_overload_and_never_blocks():
    tier = _SlowTier()
    manager = KVOffloadManager([tier], bytes(32), 4, queue_bytes=16)  # two 8-byte blocks
    blocks = [(i, bytes([i]) * 32, TOKENS) for i in range(6)]
    manager.store(blocks, _FakeIO())  # returns at once although the tier is stuck
    assert manager.stats.dropped >= 3
    tier.gate.set()
    assert manager.flush(10)
    assert manager.stats.stores + manager.stats.dropped == 6
    manager.close()


# ----------------------------------------------------------------- scheduling
def test_scheduler_restores_tier_hits_after_pool_hits():
    tier = HostKVStore(1 << 20)
    ns = bytes(32)
    manager = KVOffloadManager([tier], ns, 4)
    prompt = list(range(100, 118))  # 18 tokens: 4 full blocks (the last token never cached)
    keys = chain_keys(ns, prompt, 4, 4)
    for i in range(3):  # the tiers hold blocks 0..2, not 3
        tier.put(keys[i], prompt[4 * i:4 * i + 4], bytes([i]) * 8)
    bm = BlockManager(16, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=64), bm,
                      kv_tiers=manager)
    seq = _seq("a-0", prompt)
    sched.add(seq)
    out = sched.schedule()
    table = bm.block_table("a-0")
    assert out.kv_restores == [(table[0], keys[0]), (table[1], keys[1]), (table[2], keys[2])]
    assert seq.num_computed_tokens == 12 and seq.num_cached_tokens == 12
    assert out.seqs[0].start_pos == 12 and len(out.seqs[0].token_ids) == 6
    io = _FakeIO()
    manager.restore(out.kv_restores, io)
    assert io.blocks == {table[i]: bytes([i]) * 8 for i in range(3)}
    assert manager.stats.hits == 3 and manager.stats.misses == 1
    manager.close()


def test_scheduler_offers_registered_blocks_with_chained_keys():
    manager = KVOffloadManager([HostKVStore(1 << 20)], bytes(32), 4)
    bm = BlockManager(16, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=64), bm,
                      kv_tiers=manager)
    prompt = list(range(10))
    seq = _seq("b-0", prompt, max_tokens=1)
    sched.add(seq)
    out = sched.schedule()
    from tokenmill.step_types import SampledTokens

    update = sched.update(out, {"b-0": SampledTokens([7])})
    table = bm.block_table("b-0") if bm.has_seq("b-0") else None
    keys = chain_keys(bytes(32), prompt, 4, 2)
    assert [(k, t) for _, k, t in update.offload] == [(keys[0], prompt[:4]),
                                                       (keys[1], prompt[4:8])]
    assert table is None  # finished: max_tokens 1
    manager.close()


# ------------------------------------------------------------ a real engine
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_engine_tiny import _save_tiny

    return _save_tiny(tmp_path_factory.mktemp("offload"), "llama")[0]


GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _prompts():
    from test_engine_tiny import _prompts as make

    return make(5, seed=7)


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_restart_serves_prefix_from_disk(tiny, tmp_path, kv_cache_dtype):
    from tokenmill.llm import LLM

    prompts = _prompts()
    plain = _tokens(LLM(tiny, num_threads=1, kv_cache_dtype=kv_cache_dtype)
                    .generate(prompts, GREEDY, use_tqdm=False))
    args = dict(num_threads=1, block_size=4, kv_offload_dir=str(tmp_path / "kv"),
                kv_cache_dtype=kv_cache_dtype)
    first = LLM(tiny, **args)
    assert _tokens(first.generate(prompts, GREEDY, use_tqdm=False)) == plain
    first.engine.shutdown()  # writes what is queued
    assert first.engine.stats().kv_offload_stores_total > 0

    second = LLM(tiny, **args)  # a restart: empty pool, the disk tier holds the prefixes
    outs = second.generate(prompts, GREEDY, use_tqdm=False)
    assert _tokens(outs) == plain
    for out, prompt in zip(outs, prompts, strict=True):
        assert out.num_cached_tokens == (len(prompt) - 1) // 4 * 4
    stats = second.engine.stats()
    assert stats.kv_offload_hits_total > 0
    assert stats.kv_offload_restored_tokens_total == sum(o.num_cached_tokens for o in outs)
    assert stats.prefix_cache_hits == 0  # nothing came from the pool
    second.engine.shutdown()

    # Another KV setting (or model) never reads these blocks.
    other = "fp8" if kv_cache_dtype == "int8" else "int8"
    third = LLM(tiny, **{**args, "kv_cache_dtype": other})
    third.generate(prompts, GREEDY, use_tqdm=False)
    assert third.engine.stats().kv_offload_hits_total == 0
    third.engine.shutdown()


def test_corrupted_files_are_recomputed(tiny, tmp_path):
    from tokenmill.llm import LLM

    prompts = _prompts()
    args = dict(num_threads=1, block_size=4, kv_offload_dir=str(tmp_path / "kv"))
    first = LLM(tiny, **args)
    want = _tokens(first.generate(prompts, GREEDY, use_tqdm=False))
    first.engine.shutdown()
    files = sorted((tmp_path / "kv").rglob("*.kvb"))
    assert files
    for i, path in enumerate(files):  # damage every block file
        data = bytearray(path.read_bytes())
        if i % 2:
            path.write_bytes(data[: len(data) // 2])
        else:
            data[-40] ^= 0xFF
            path.write_bytes(data)
    second = LLM(tiny, **args)
    outs = second.generate(prompts, GREEDY, use_tqdm=False)
    assert _tokens(outs) == want
    assert all(o.num_cached_tokens == 0 for o in outs)
    stats = second.engine.stats()
    assert stats.kv_offload_hits_total == 0 and stats.kv_offload_misses_total > 0
    second.engine.shutdown()


def test_memory_tier_restores_blocks_evicted_from_the_pool(tiny):
    """A pool too small to keep the first prompt's prefix once others ran: the host tier
    brings it back, with identical greedy tokens."""
    from tokenmill.llm import LLM

    prompts = _prompts()
    plain = _tokens(LLM(tiny, num_threads=1).generate(prompts, GREEDY, use_tqdm=False))
    llm = LLM(tiny, num_threads=1, block_size=4, num_kv_blocks=40, max_num_seqs=1,
              kv_offload_memory="64MiB")
    assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == plain
    llm.engine.core.kv_offload.flush(30)
    again = llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    assert _tokens(again) == plain[:1]
    stats = llm.engine.stats()
    assert stats.kv_offload_hits_total > 0
    assert again[0].num_cached_tokens == (len(prompts[0]) - 1) // 4 * 4
    llm.engine.shutdown()


def test_offload_needs_prefix_caching(tiny, tmp_path):
    from tokenmill.llm import LLM

    with pytest.raises(ValueError, match="prefix caching"):
        LLM(tiny, num_threads=1, enable_prefix_caching=False, kv_offload_dir=str(tmp_path))


def test_cli_flags_reach_the_cache_config(tmp_path):
    import argparse

    from tokenmill.engine.args import EngineArgs

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    ns = parser.parse_args(["--kv-cache-dtype", "fp8", "--kv-offload-memory", "1GiB",
                            "--kv-offload-dir", str(tmp_path), "--kv-offload-dir-size", "2GiB"])
    cache = EngineArgs.from_cli(ns).cache_config()
    assert cache.kv_cache_dtype == "fp8"
    assert cache.offload_memory_bytes == 1 << 30 and cache.offload_dir_bytes == 2 << 30
    assert cache.offload_dir == str(tmp_path) and cache.offload_enabled
    assert not EngineArgs().cache_config().offload_enabled
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "int4"])


def test_blocks_stay_staged_while_the_request_waits_for_room():
    """A request whose tier hits were read but which did not fit keeps them staged; when
    it is admitted later the restore needs no second read."""
    tier = HostKVStore(1 << 20)
    ns = bytes(32)
    manager = KVOffloadManager([tier], ns, 4)
    prompt = list(range(200, 213))  # 3 full blocks before the last token
    keys = chain_keys(ns, prompt, 4, 3)
    for i in range(3):
        tier.put(keys[i], prompt[4 * i:4 * i + 4], bytes([i]) * 8)
    bm = BlockManager(4, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=64), bm,
                      kv_tiers=manager)
    blocker = _seq("x-0", list(range(500, 508)), max_tokens=50)  # holds 2 of 4 blocks
    sched.add(blocker)
    first = sched.schedule()
    manager.restore(first.kv_restores, _FakeIO())
    sched.add(_seq("a-0", prompt))
    second = sched.schedule()  # a-0 needs 4 blocks: does not fit
    assert not second.kv_restores and not bm.has_seq("a-0")
    manager.restore(second.kv_restores, _FakeIO())
    tier._entries.clear()  # the tier forgets: only the staged copies remain
    sched.abort(blocker)
    third = sched.schedule()
    assert [k for _, k in third.kv_restores] == keys
    io = _FakeIO()
    manager.restore(third.kv_restores, io)
    assert sorted(io.blocks.values()) == [bytes([i]) * 8 for i in range(3)]
    manager.close()


def test_restored_blocks_carry_the_draft_models_kv(tiny, tmp_path):
    """Draft-model speculation: the tiers keep the draft's block beside the target's, so
    after a restart a self-draft still proposes what the target computes (a stale draft
    cache would drag the acceptance rate down)."""
    from tokenmill.llm import LLM

    prompts = _prompts()
    args = dict(num_threads=1, block_size=4, kv_offload_dir=str(tmp_path / "kv"),
                speculative_method="draft", speculative_model=tiny, num_speculative_tokens=3)
    first = LLM(tiny, **args)
    want = _tokens(first.generate(prompts, GREEDY, use_tqdm=False))
    first.engine.shutdown()
    second = LLM(tiny, **args)
    assert _tokens(second.generate(prompts, GREEDY, use_tqdm=False)) == want
    stats = second.engine.stats()
    assert stats.kv_offload_hits_total > 0
    assert stats.spec_acceptance_rate > 0.9
    second.engine.shutdown()


# ------------------------------------------------------------- property test
class _SimulatedKV:
    """Stands in for the KV caches: slot (block, offset) holds what a forward pass would
    write there, a function of the whole prefix up to that position."""

    def __init__(self, block_size):
        self.bs = block_size
        self.blocks: dict[int, list] = {}

    @staticmethod
    def value(tokens, pos):
        return hash(tuple(tokens[:pos + 1]))

    def compute(self, table, tokens, start, end):
        for pos in range(start, end):
            self.blocks.setdefault(table[pos // self.bs], [None] * self.bs)[pos % self.bs] = (
                self.value(tokens, pos))

    def holds_prefix(self, table, tokens, end):
        return all(self.blocks.get(table[p // self.bs], [None] * self.bs)[p % self.bs]
                   == self.value(tokens, p) for p in range(end))

    def read_block(self, block_id):
        import pickle

        return BlockCopy.ready(pickle.dumps(self.blocks.get(block_id, [None] * self.bs)))

    def write_block(self, block_id, payload):
        import pickle

        self.blocks[block_id] = pickle.loads(payload)


from hypothesis import event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 14), st.integers(1, 6)),
                min_size=1, max_size=6),
       st.integers(3, 16), st.integers(8, 20))
def test_restored_blocks_always_hold_their_prefix(reqs, budget, num_blocks):
    """Random prompts sharing prefixes, a pool small enough to evict and preempt, the same
    requests twice: whatever a step reads (positions before its first new token) holds
    exactly what computing that prefix would have written, whether it came from the
    pool, the tier, or this sequence's own earlier steps; nothing leaks."""
    from tokenmill.step_types import SampledTokens

    bs = 4
    prefixes = [[11, 12, 13, 14, 15, 16, 17, 18, 19], [21, 22, 23, 24, 25], []]
    manager = KVOffloadManager([HostKVStore(1 << 24)], bytes(32), bs)
    bm = BlockManager(num_blocks, bs)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=3,
                                      max_model_len=256), bm, kv_tiers=manager)
    kv = _SimulatedKV(bs)
    for rnd in range(2):
        for i, (which, own, out_len) in enumerate(reqs):
            prompt = prefixes[which] + [100 + 7 * i + j for j in range(own)]
            if -(-(len(prompt) + out_len) // bs) > num_blocks:
                continue
            sched.add(_seq(f"r{rnd}-{i}", prompt, max_tokens=out_len))
        for _ in range(500):
            if not sched.has_work():
                break
            out = sched.schedule()
            manager.restore(out.kv_restores, kv)
            for item in out.seqs:
                seq = sched.get(item.seq_id)
                table = bm.block_table(item.seq_id)
                assert kv.holds_prefix(table, seq.token_ids, item.start_pos)
                kv.compute(table, seq.token_ids, item.start_pos,
                           item.start_pos + len(item.token_ids))
            sampled = {}
            for item in out.seqs:  # play the sampler, as tests/test_scheduler.py does
                if item.start_pos + len(item.token_ids) == sched.get(item.seq_id).num_tokens:
                    sampled[item.seq_id] = SampledTokens([7])
            update = sched.update(out, sampled)
            manager.store(update.offload, kv)
            manager.flush()
            bm.check_invariants()
        assert not sched.has_work()
        assert bm.num_free_blocks == num_blocks
    event(f"blocks restored from the tier: {min(manager.stats.hits, 5)}+")
    manager.close()
