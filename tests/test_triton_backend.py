"""TritonAttentionBackend against the PyTorch reference backend.

Small shapes covering block sizes, GQA ratios, head dims, ragged lengths,
cached prefixes (prefix-cache hits and earlier chunks), padding slots,
decode-only steps (with and without split-K) and mixed steps. Without CUDA
the kernels run in Triton's interpreter (see test_triton_kernels.py for why
TRITON_INTERPRET is set here).
"""

import os
import random
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU and "triton" not in sys.modules:
    # Must precede triton's first import; pointless (so not leaked) once it happened.
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tokenmill.attention.base import AttentionMetadata, get_attention_backend  # noqa: E402
from tokenmill.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from tokenmill.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from tokenmill.kernels.paged_decode import choose_num_segments, paged_decode_attention  # noqa: E402
from tokenmill.kernels.triton_utils import (  # noqa: E402
    interpreter_active,
    interpreter_problem,
)

if not ON_GPU and not interpreter_active():
    pytest.skip("an earlier test module imported triton in compiled mode; "
                "test_triton_interpreter.py runs this module in a child process instead",
                allow_module_level=True)
if not ON_GPU and interpreter_problem():
    pytest.skip(interpreter_problem(), allow_module_level=True)

DEVICE = "cuda" if ON_GPU else "cpu"


def make_step(requests, block_size, num_pad=0, seed=0):
    """Metadata for ``requests`` = [(cached_tokens, new_tokens), ...] in shuffled blocks.

    Returns (meta, num_blocks). ``num_pad`` padding tokens (slot -1) follow the
    real ones, as when a runner pads a batch for a CUDA graph.
    """
    rng = random.Random(seed)
    blocks_needed = [-(-(cached + new) // block_size) for cached, new in requests]
    num_blocks = sum(blocks_needed) + 3
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    max_blocks = max(blocks_needed)
    tables, slots, query_start, seq_lens = [], [], [0], []
    for (cached, new), n in zip(requests, blocks_needed, strict=True):
        table = [pool.pop() for _ in range(n)]
        tables.append(table + [0] * (max_blocks - n))
        slots += [table[p // block_size] * block_size + p % block_size
                  for p in range(cached, cached + new)]
        query_start.append(query_start[-1] + new)
        seq_lens.append(cached + new)
    slots += [-1] * num_pad
    meta = AttentionMetadata(
        num_tokens=query_start[-1],
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=DEVICE),
        max_query_len=max(new for _, new in requests),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=query_start,
        seq_lens_cpu=seq_lens,
    )
    return meta, num_blocks


def make_tensors(meta, num_blocks, block_size, num_heads, num_kv_heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = meta.slot_mapping.shape[0]

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)

    # The caches start full of random "earlier" K/V: the cached prefix.
    return dict(
        q=rand(tokens, num_heads, head_dim),
        k=rand(tokens, num_kv_heads, head_dim),
        v=rand(tokens, num_kv_heads, head_dim),
        k_cache=rand(num_blocks, block_size, num_kv_heads, head_dim),
        v_cache=rand(num_blocks, block_size, num_kv_heads, head_dim),
    )


def run_both(backend, meta, t, scale, ref_dtype=None, window=None):
    """Run ``backend`` and the reference (optionally in a wider dtype) on copies."""
    ref_dtype = ref_dtype or t["q"].dtype
    ref_in = {name: x.to(ref_dtype).clone() for name, x in t.items()}
    out_in = {name: x.clone() for name, x in t.items()}
    ref = TorchAttentionBackend().forward(**ref_in, meta=meta, scale=scale,
                                          sliding_window=window)
    out = backend.forward(**out_in, meta=meta, scale=scale, sliding_window=window)
    assert out.shape == t["q"].shape and out.dtype == t["q"].dtype
    # Both backends must leave identical caches behind.
    assert torch.equal(out_in["k_cache"].to(ref_dtype), ref_in["k_cache"])
    assert torch.equal(out_in["v_cache"].to(ref_dtype), ref_in["v_cache"])
    return out, ref


HEADS = [(4, 4), (6, 2), (8, 2)]  # GQA ratios 1, 3, 4
MIXED = [(0, 13), (5, 1), (21, 9), (40, 1), (0, 1), (3, 30)]  # (cached, new) per request
DECODES = [(4, 1), (40, 1), (16, 1), (0, 1), (70, 1)]


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mixed_step_with_prefix_hits_matches_reference(block_size, num_heads, num_kv_heads,
                                                       head_dim):
    meta, num_blocks = make_step(MIXED, block_size, num_pad=3, seed=block_size)
    t = make_tensors(meta, num_blocks, block_size, num_heads, num_kv_heads, head_dim,
                     torch.float32)
    out, ref = run_both(TritonAttentionBackend(), meta, t, head_dim ** -0.5)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    assert not out[meta.num_tokens:].any()  # padding rows are zero, as in the reference


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_step_matches_reference(block_size, num_heads, num_kv_heads, head_dim):
    meta, num_blocks = make_step(DECODES, block_size, num_pad=2, seed=head_dim)
    t = make_tensors(meta, num_blocks, block_size, num_heads, num_kv_heads, head_dim,
                     torch.float32, seed=1)
    out, ref = run_both(TritonAttentionBackend(split_kv=False), meta, t, 0.3)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    assert not out[len(DECODES):].any()


@pytest.mark.parametrize("num_segments", [2, 4, 16])
@pytest.mark.parametrize("block_size", [8, 32])
def test_split_kv_decode_matches_reference(num_segments, block_size):
    # Long and short contexts together: short ones leave most segments empty.
    requests = [(299, 1), (3, 1), (150, 1)]
    meta, num_blocks = make_step(requests, block_size, seed=num_segments)
    t = make_tensors(meta, num_blocks, block_size, 8, 2, 64, torch.float32, seed=2)
    backend = TritonAttentionBackend(split_kv=True, num_segments=num_segments)
    out, ref = run_both(backend, meta, t, 0.125)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_split_and_unsplit_decode_agree_on_long_context():
    meta, num_blocks = make_step([(1100, 1)], 16, seed=3)
    t = make_tensors(meta, num_blocks, 16, 4, 1, 64, torch.float32, seed=3)
    write = TorchAttentionBackend()  # fills the new token's slot
    write.forward(**t, meta=meta, scale=0.1)
    args = (t["q"], t["k_cache"], t["v_cache"], meta.block_tables, meta.seq_lens, 0.1)
    plain = paged_decode_attention(torch.empty_like(t["q"]), *args)
    split = paged_decode_attention(torch.empty_like(t["q"]), *args, num_segments=8)
    torch.testing.assert_close(split, plain, atol=1e-5, rtol=1e-5)


def test_split_heuristic_only_for_long_contexts_and_few_programs():
    cpu = torch.device("cpu")
    assert choose_num_segments(1, 8, 100, cpu) == 1  # short context
    assert choose_num_segments(64, 8, 8192, cpu) == 1  # enough programs already
    segments = choose_num_segments(1, 2, 8192, cpu)
    assert segments > 1 and segments & (segments - 1) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decode_only", [False, True])
def test_half_precision_close_to_fp32_reference(dtype, decode_only):
    requests = DECODES if decode_only else MIXED
    meta, num_blocks = make_step(requests, 16, num_pad=1, seed=7)
    t = make_tensors(meta, num_blocks, 16, 8, 2, 128, dtype, seed=7)
    out, ref = run_both(TritonAttentionBackend(), meta, t, 128 ** -0.5, ref_dtype=torch.float32)
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_long_prefill_chunk_tiles_across_many_blocks():
    # Several query tiles and key tiles per request, a chunk after a cached prefix,
    # and a non-power-of-two head dim.
    requests = [(37, 90), (0, 70)]
    meta, num_blocks = make_step(requests, 8, seed=11)
    t = make_tensors(meta, num_blocks, 8, 3, 1, 80, torch.float32, seed=11)
    out, ref = run_both(TritonAttentionBackend(), meta, t, 0.11)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def poison_outside_window(meta, t, requests, block_size, window):
    """Point table entries wholly before every query's window at a NaN block (appended to
    the caches): a kernel that read them would return NaN. Returns the new metadata."""
    import dataclasses

    nan = torch.full((1, *t["k_cache"].shape[1:]), float("nan"), device=DEVICE)
    t["k_cache"] = torch.cat([t["k_cache"], nan.to(t["k_cache"].dtype)])
    t["v_cache"] = torch.cat([t["v_cache"], nan.to(t["v_cache"].dtype)])
    tables = meta.block_tables.clone()
    for i, (cached, _new) in enumerate(requests):
        tables[i, : max(0, cached - window + 1) // block_size] = t["k_cache"].shape[0] - 1
    return dataclasses.replace(meta, block_tables=tables)


WINDOWED = [(0, 30), (5, 1), (21, 9), (70, 1), (0, 1), (44, 20)]


@pytest.mark.parametrize("window", [1, 7, 16, 40])
@pytest.mark.parametrize("block_size", [8, 16])
def test_sliding_window_mixed_step_matches_reference(window, block_size):
    meta, num_blocks = make_step(WINDOWED, block_size, num_pad=2, seed=window)
    t = make_tensors(meta, num_blocks, block_size, 6, 2, 64, torch.float32, seed=window)
    ref = TorchAttentionBackend().forward(**{k: x.clone() for k, x in t.items()}, meta=meta,
                                          scale=0.2, sliding_window=window)
    poisoned = poison_outside_window(meta, t, WINDOWED, block_size, window)
    out = TritonAttentionBackend().forward(**t, meta=poisoned, scale=0.2,
                                           sliding_window=window)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 9, 64])
@pytest.mark.parametrize("split", [False, True])
def test_sliding_window_decode_matches_reference(window, split):
    requests = [(299, 1), (3, 1), (150, 1), (64, 1)]
    meta, num_blocks = make_step(requests, 16, seed=window)
    t = make_tensors(meta, num_blocks, 16, 8, 2, 64, torch.float32, seed=window)
    ref = TorchAttentionBackend().forward(**{k: x.clone() for k, x in t.items()}, meta=meta,
                                          scale=0.125, sliding_window=window)
    poisoned = poison_outside_window(meta, t, requests, 16, window)
    backend = TritonAttentionBackend(split_kv=split, num_segments=4 if split else None)
    out = backend.forward(**t, meta=poisoned, scale=0.125, sliding_window=window)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_registered_under_triton_name():
    backend = get_attention_backend("triton")
    assert isinstance(backend, TritonAttentionBackend) and backend.name == "triton"


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("step,split", [("mixed", False), ("decode", False), ("decode", True)])
def test_quantized_kv_cache_matches_reference(fmt, step, split):
    """--kv-cache-dtype int8|fp8: the Triton KV write stores the same bytes as the
    PyTorch reference (codes and scales), and both kernels read them back alike."""
    from tokenmill.kernels.kv_quant import quantize

    requests = MIXED if step == "mixed" else DECODES
    meta, num_blocks = make_step(requests, 16, num_pad=2, seed=11)
    t = make_tensors(meta, num_blocks, 16, 6, 2, 64, torch.float32, seed=4)
    t["k_cache"] = quantize(t["k_cache"] * 3, fmt)
    t["v_cache"] = quantize(t["v_cache"], fmt)
    ref_in = {name: x.clone() for name, x in t.items()}
    out_in = {name: x.clone() for name, x in t.items()}
    ref = TorchAttentionBackend().forward(**ref_in, meta=meta, scale=0.125)
    backend = TritonAttentionBackend(split_kv=split, num_segments=4 if split else None)
    out = backend.forward(**out_in, meta=meta, scale=0.125)
    assert torch.equal(out_in["k_cache"], ref_in["k_cache"])
    assert torch.equal(out_in["v_cache"], ref_in["v_cache"])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
