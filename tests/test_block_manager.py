"""Block manager: exact block ids, reference counts, free-list order; invariants."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.engine.block_manager import NULL_BLOCK, BlockManager


def test_allocate_takes_blocks_in_order_and_free_returns_reversed():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate("a", 9) == [0, 1, 2]  # 9 tokens -> 3 blocks
    assert bm.allocate("b", 4) == [3]
    assert bm.num_free_blocks == 4
    assert [bm.blocks[i].ref_count for i in range(4)] == [1, 1, 1, 1]
    bm.free("a")
    # Freed blocks join the tail in reverse table order: last block evicted first.
    assert list(bm._free) == [4, 5, 6, 7, 2, 1, 0]
    bm.check_invariants()


def test_allocation_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.allocate("a", 12) == [0, 1, 2]
    assert bm.allocate("b", 8) is None  # needs 2, only 1 free
    assert not bm.has_seq("b")
    assert bm.append_slots("a", 20) is None  # needs 2 more
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.append_slots("a", 13) == [3]
    assert bm.append_slots("a", 16) == []
    bm.check_invariants()


def test_prefix_cache_hit_shares_blocks_and_counts_references():
    bm = BlockManager(num_blocks=10, block_size=4)
    prompt = list(range(100, 110))  # 10 tokens: 2 full blocks + 2
    bm.allocate("a", len(prompt))
    bm.cache_full_blocks("a", prompt, num_computed=10)
    hit = bm.computed_prefix(prompt)
    assert hit == [0, 1]
    assert bm.allocate("b", len(prompt), hit) == [0, 1, 3]
    assert bm.blocks[0].ref_count == 2 and bm.blocks[1].ref_count == 2
    assert bm.blocks[2].ref_count == 1
    bm.check_invariants()


def test_last_prompt_token_is_never_a_cache_hit():
    bm = BlockManager(num_blocks=10, block_size=4)
    prompt = list(range(8))  # exactly 2 full blocks
    bm.allocate("a", 8)
    bm.cache_full_blocks("a", prompt, 8)
    # Both blocks are cached, but the last token must be computed: only 1 block hits.
    assert bm.computed_prefix(prompt) == [0]
    assert bm.computed_prefix(prompt + [99]) == [0, 1]


def test_chained_hash_depends_on_the_whole_prefix():
    bm = BlockManager(num_blocks=10, block_size=2)
    bm.allocate("a", 5)
    bm.cache_full_blocks("a", [1, 2, 3, 4, 5], 5)
    # Same second block, different first block: no hit for either.
    assert bm.computed_prefix([9, 9, 3, 4, 5]) == []
    assert bm.computed_prefix([1, 2, 3, 9, 5]) == [0]


def test_freed_blocks_keep_their_hash_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 5)  # blocks 0,1,2
    bm.cache_full_blocks("a", [1, 2, 3, 4, 5], 5)
    bm.free("a")
    assert list(bm._free) == [3, 2, 1, 0]
    # Still a cache hit after free: revived from the free list.
    assert bm.computed_prefix([1, 2, 3, 4, 7]) == [0, 1]
    assert bm.allocate("b", 5, [0, 1]) == [0, 1, 3]
    assert list(bm._free) == [2]
    bm.free("b")
    # New tokens evict the least recently freed block first (2, then 3 ...).
    assert bm.allocate("c", 2) == [2]
    assert bm.allocate("d", 4) == [3, 1]  # block 1 evicted: its hash is gone
    assert bm.computed_prefix([1, 2, 3, 4, 7]) == [0]
    bm.check_invariants()


def test_fork_shares_full_blocks_and_copies_partial_last_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("p", 6)  # blocks 0,1 (second partial)
    copies = bm.fork("p", "c", num_tokens=6)
    assert copies == [(1, 2)]
    assert bm.block_table("c") == [0, 2]
    assert bm.blocks[0].ref_count == 2 and bm.blocks[1].ref_count == 1
    # Exact multiple of the block size: nothing to copy.
    bm.allocate("q", 8)  # blocks 3,4
    assert bm.fork("q", "d", num_tokens=8) == []
    assert bm.block_table("d") == [3, 4]
    for s in ("p", "c", "q", "d"):
        bm.free(s)
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_usage_and_free_unknown_is_noop():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("a", 8)
    assert bm.usage == 0.5
    bm.free("nope")
    bm.free("a")
    bm.free("a")
    assert bm.usage == 0.0


def test_free_blocks_before_releases_leading_blocks_to_the_free_list_tail():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    assert bm.allocate("a", 14) == [0, 1, 2, 3]
    assert bm.free_blocks_before("a", 3) == 0  # block 0 still holds position 3
    assert bm.free_blocks_before("a", 9) == 2  # positions 0..7 gone: blocks 0 and 1
    assert bm.block_table("a") == [NULL_BLOCK, NULL_BLOCK, 2, 3]
    assert list(bm._free) == [4, 5, 6, 7, 0, 1]  # released blocks join the tail
    assert bm.free_blocks_before("a", 9) == 0  # idempotent
    assert bm.append_slots("a", 20) == [4]  # positions stay where they were
    assert bm.block_table("a") == [NULL_BLOCK, NULL_BLOCK, 2, 3, 4]
    bm.check_invariants()
    bm.free("a")
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_released_blocks_keep_their_prefix_hash_and_can_be_revived():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(14))
    bm.allocate("a", 14)
    # Only registered blocks are released with prefix caching on: nothing yet.
    assert bm.free_blocks_before("a", 12) == 0
    bm.cache_full_blocks("a", tokens, 12)
    assert bm.free_blocks_before("a", 12) == 3
    assert bm.block_table("a") == [NULL_BLOCK] * 3 + [3]
    # A new request with the same prefix finds the whole chain and revives it.
    assert bm.computed_prefix(tokens + [99]) == [0, 1, 2]
    assert bm.allocate("b", 15, [0, 1, 2]) == [0, 1, 2, 4]
    assert [bm.blocks[b].ref_count for b in (0, 1, 2)] == [1, 1, 1]
    bm.check_invariants()


def test_fork_after_release_shares_only_live_blocks():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    bm.allocate("p", 10)
    bm.free_blocks_before("p", 8)
    assert bm.fork("p", "c", 10) == [(2, 3)]  # partial last block copied
    assert bm.block_table("c") == [NULL_BLOCK, NULL_BLOCK, 3]
    bm.check_invariants()
    bm.free("p")
    bm.free("c")
    assert bm.num_free_blocks == 8


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "append", "fork", "free", "cache",
                                           "release"]),
                          st.integers(0, 5), st.integers(1, 40)), max_size=60),
       st.booleans())
def test_random_operations_never_leak_and_counts_stay_valid(ops, prefix_caching):
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=prefix_caching)
    tokens: dict[str, list[int]] = {}
    for op, sid, n in ops:
        name = f"s{sid}"
        if op == "alloc" and name not in tokens:
            toks = [(sid * 7 + i) % 5 for i in range(n)]  # shared patterns -> cache hits
            cached = bm.computed_prefix(toks)
            if bm.allocate(name, n, cached) is not None:
                tokens[name] = toks
        elif op == "append" and name in tokens:
            new_len = len(tokens[name]) + n
            if bm.append_slots(name, new_len) is not None:
                tokens[name] = tokens[name] + [n % 5] * n
        elif op == "cache" and name in tokens:
            bm.cache_full_blocks(name, tokens[name], len(tokens[name]))
        elif op == "fork" and name in tokens:
            child = f"{name}.{n}"
            if child not in tokens and bm.fork(name, child, len(tokens[name])) is not None:
                tokens[child] = list(tokens[name])
        elif op == "release" and name in tokens:
            bm.free_blocks_before(name, len(tokens[name]) - n)  # a window of n tokens
        elif op == "free":
            bm.free(name)
            tokens.pop(name, None)
        bm.check_invariants()
        assert all(b.ref_count >= 0 for b in bm.blocks)
        assert bm.num_free_blocks + sum(b.ref_count > 0 for b in bm.blocks) == 16
    for name in list(tokens):
        bm.free(name)
    bm.check_invariants()
    assert bm.num_free_blocks == 16
