"""The CUDA-graph decode path's padding and static buffers, checked eagerly on the CPU.

A captured graph replays a forward pass over ``P`` (bucket) rows whose inputs
sit in static buffers, ``B <= P`` of them real. Without a GPU we cannot
capture, but everything the graph would read can be built and run eagerly
through the torch backend: the padded step and the buffer views (with the
capture-time host metadata) must give the real rows the logits of the
unpadded step (to rounding, see ATOL) and the same greedy tokens, and the
padding rows must write nothing into the KV cache.
Also covered: bucket sizes, the KV budget arithmetic and the profiling pass.
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import pytest
import torch

from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.config import ModelConfig
from tokenmill.engine.args import EngineArgs
from tokenmill.model.llama import LlamaCausalLM
from tokenmill.model.loader import init_dummy_weights
from tokenmill.runner.cuda_graphs import (
    PAD_SLOT,
    CudaGraphConfig,
    DecodeGraphInputs,
    bucket_size,
    capture_sizes,
    fixed_decode_split,
    pad_decode_step,
)
from tokenmill.runner.kv_cache import allocate_kv_cache, gpu_kv_cache_budget
from tokenmill.runner.model_runner import (
    ModelRunner,
    build_step_inputs,
    profile_peak_memory,
)
from tokenmill.step_types import ScheduledSeq, SchedulerOutput

BLOCK_SIZE = 4
NUM_BLOCKS = 48
MAX_MODEL_LEN = 64


def make_runner(graph_config: CudaGraphConfig | None = None) -> ModelRunner:
    config = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=96, hidden_size=48, intermediate_size=80,
        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
        rope_theta=10000.0, max_position_embeddings=MAX_MODEL_LEN,
    )
    backend = TorchAttentionBackend()
    model = LlamaCausalLM(config, backend).eval()
    init_dummy_weights(model, std=0.2, seed=5)
    kv = allocate_kv_cache(config, NUM_BLOCKS, BLOCK_SIZE, torch.float32, torch.device("cpu"))
    return ModelRunner(model, kv, BLOCK_SIZE, attn_backend=backend, graph_config=graph_config)


def prefill_then_decode(runner: ModelRunner, num_seqs: int, seed: int = 0) -> SchedulerOutput:
    """Prefill ``num_seqs`` prompts of different lengths; return their next decode step."""
    rng = random.Random(seed)
    free = list(range(1, NUM_BLOCKS))  # block 0 stays shared with the padding rows' reads
    rng.shuffle(free)
    prompts, tables = [], []
    for _ in range(num_seqs):
        length = rng.randint(1, 17)
        prompts.append([rng.randrange(96) for _ in range(length)])
        # Room for the decode token too.
        tables.append([free.pop() for _ in range(length // BLOCK_SIZE + 1)])
    runner.execute(SchedulerOutput(
        seqs=[ScheduledSeq(f"s{i}", p, 0, t, 1) for i, (p, t) in enumerate(zip(prompts, tables))],
        num_batched_tokens=sum(map(len, prompts)),
    ))
    return SchedulerOutput(
        seqs=[ScheduledSeq(f"s{i}", [rng.randrange(96)], len(p), t, 1)
              for i, (p, t) in enumerate(zip(prompts, tables))],
        num_batched_tokens=num_seqs,
    )


def padded_logits(runner: ModelRunner, decode: SchedulerOutput, size: int) -> torch.Tensor:
    step = build_step_inputs(decode, BLOCK_SIZE)
    with torch.inference_mode():
        hidden = runner.forward_eager(pad_decode_step(step, size))
        return runner.model.compute_logits(hidden[torch.from_numpy(step.logits_indices)])


def graph_buffer_logits(runner: ModelRunner, decode: SchedulerOutput, size: int,
                        max_batch: int) -> torch.Tensor:
    """What a replay computes: inputs loaded into the static buffers, capture-time metadata."""
    step = build_step_inputs(decode, BLOCK_SIZE)
    inputs = DecodeGraphInputs(max_batch, MAX_MODEL_LEN, BLOCK_SIZE, torch.device("cpu"))
    # Stale contents from an earlier, larger step must not matter.
    inputs.block_tables.fill_(NUM_BLOCKS - 1)
    inputs.input_ids.fill_(7)
    inputs.load(pad_decode_step(step, size))
    input_ids, positions, meta = inputs.views(size)
    assert meta.max_seq_len == MAX_MODEL_LEN and meta.num_seqs == size
    with torch.inference_mode():
        hidden = runner.model(input_ids, positions, runner.kv_caches, meta)
        assert hidden.shape[0] == size
        return runner.model.compute_logits(hidden[torch.from_numpy(step.logits_indices)])


def assert_same_cache_writes(cache: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
                             real_slots: np.ndarray) -> None:
    """Only the real tokens' slots changed (padding wrote nothing), to what they became."""
    flat = cache.flatten(2, 3)  # [layers, 2, slots, kv_heads, head_dim]
    untouched = torch.ones(flat.shape[2], dtype=torch.bool)
    untouched[torch.from_numpy(real_slots)] = False
    assert torch.equal(flat[:, :, untouched], before.flatten(2, 3)[:, :, untouched])
    real = torch.from_numpy(real_slots)
    torch.testing.assert_close(flat[:, :, real], after.flatten(2, 3)[:, :, real],
                               rtol=0, atol=1e-5)


# Logits are compared at a tight tolerance, not bit for bit: CPU matrix multiplies
# round differently for different row counts (a 1-row product is not a row of the
# 2-row product), so padding a batch perturbs the last bits of the real rows too.
ATOL = 2e-5


@pytest.mark.parametrize("num_seqs,size", [(1, 1), (1, 2), (3, 4), (5, 8), (8, 8), (6, 16)])
def test_padded_decode_gives_the_real_rows_the_unpadded_logits(num_seqs, size):
    runner = make_runner()
    decode = prefill_then_decode(runner, num_seqs, seed=num_seqs * 10 + size)
    real_slots = build_step_inputs(decode, BLOCK_SIZE).slot_mapping
    before = runner.kv_cache.clone()

    want = runner.execute(decode).logits
    after_unpadded = runner.kv_cache.clone()

    runner.kv_cache.copy_(before)
    got = padded_logits(runner, decode, size)
    assert_same_cache_writes(runner.kv_cache, before, after_unpadded, real_slots)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    assert torch.equal(got.argmax(-1), want.argmax(-1))

    runner.kv_cache.copy_(before)
    got_buffers = graph_buffer_logits(runner, decode, size, max_batch=16)
    assert_same_cache_writes(runner.kv_cache, before, after_unpadded, real_slots)
    torch.testing.assert_close(got_buffers, want, rtol=0, atol=ATOL)
    assert torch.equal(got_buffers.argmax(-1), want.argmax(-1))
    if size == num_seqs:  # no padding: the very same computation
        assert torch.equal(got, want)


def test_padding_rows_are_harmless_and_finite():
    runner = make_runner()
    decode = prefill_then_decode(runner, 2, seed=4)
    step = build_step_inputs(decode, BLOCK_SIZE)
    padded = pad_decode_step(step, 8)
    assert padded.num_seqs == 8 and padded.is_decode_only
    assert padded.slot_mapping[2:].tolist() == [PAD_SLOT] * 6
    assert padded.seq_lens[2:].tolist() == [1] * 6
    assert not padded.block_tables[2:].any()
    assert padded.query_start_loc.tolist() == list(range(9))
    np.testing.assert_array_equal(padded.logits_indices, step.logits_indices)
    with torch.inference_mode():
        hidden = runner.forward_eager(padded)
    assert torch.isfinite(hidden).all()  # seq_len 1, not 0: no 0/0 in the padding rows


def test_pad_rejects_prefill_and_shrinking():
    runner = make_runner()
    decode = prefill_then_decode(runner, 3)
    step = build_step_inputs(decode, BLOCK_SIZE)
    with pytest.raises(ValueError, match="pad 3 decodes down"):
        pad_decode_step(step, 2)
    prefill = build_step_inputs(SchedulerOutput(
        seqs=[ScheduledSeq("p", [1, 2, 3], 0, [5], 1)], num_batched_tokens=3), BLOCK_SIZE)
    assert not prefill.is_decode_only
    with pytest.raises(ValueError, match="decode-only"):
        pad_decode_step(prefill, 4)


def test_capture_sizes_and_buckets():
    assert capture_sizes(1) == [1]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = capture_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and len(sizes) == 35
    assert [bucket_size(n, sizes) for n in (1, 3, 4, 9, 255, 256, 257)] == [
        1, 4, 4, 16, 256, 256, None]
    with pytest.raises(ValueError):
        capture_sizes(0)


def test_graphs_stay_off_on_cpu_and_runs_are_eager():
    runner = make_runner(CudaGraphConfig(max_batch_size=8, max_model_len=MAX_MODEL_LEN))
    assert "not CUDA" in runner.cuda_graphs_supported()
    assert runner.capture_cuda_graphs() is False and runner.graphs is None
    assert make_runner().cuda_graphs_supported().startswith("disabled")
    with fixed_decode_split(runner.attn_backend, 4):  # a no-op for the torch backend
        assert not hasattr(runner.attn_backend, "split_kv")


def test_gpu_kv_budget_arithmetic():
    gib = 2**30
    # 80 GiB device, 0.9 of it ours; 16 GiB peak; another process holds 3 GiB,
    # our allocator 17 GiB: budget = 72 - 16 - 3 = 53 GiB.
    budget = gpu_kv_cache_budget(total=80 * gib, free=60 * gib, reserved=17 * gib,
                                 peak=16 * gib, utilization=0.9)
    assert budget == int(80 * gib * 0.9) - 16 * gib - 3 * gib
    # Our allocator may hold more than the device reports used (never negative "other").
    assert gpu_kv_cache_budget(10 * gib, 9 * gib, 2 * gib, gib, 0.5) == 5 * gib - gib


def test_profiling_forward_runs_without_a_kv_cache():
    runner = make_runner()
    cfg = runner.model.config
    before = runner.kv_cache.clone()
    peak = profile_peak_memory(runner.model, cfg.num_hidden_layers, cfg.num_key_value_heads,
                               cfg.head_dim, max_num_batched_tokens=40, max_num_seqs=6,
                               block_size=BLOCK_SIZE, dtype=torch.float32,
                               device=torch.device("cpu"))
    assert peak == 0  # only CUDA reports allocations
    assert torch.equal(runner.kv_cache, before)


def test_enforce_eager_and_graph_batch_flags():
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = EngineArgs.from_cli(parser.parse_args(
        ["--enforce-eager", "--max-cudagraph-batch-size", "64"]))
    assert args.enforce_eager is True and args.max_cudagraph_batch_size == 64
    default = EngineArgs.from_cli(parser.parse_args([]))
    assert default.enforce_eager is False and default.max_cudagraph_batch_size is None
