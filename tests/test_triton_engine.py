"""The engine on the Triton attention backend equals the torch backend, token for token.

A tiny random Llama runs through the whole engine twice, once per backend:
prompts sharing a prefix (prefix-cache hits), block size 4 and a small token
budget, so prefill is chunked and steps mix decodes with prompt chunks. Also:
the model layers' fused-kernel path, and the CUDA-graph decode inputs (padded
rows, static buffers, a fixed split-K choice) on the Triton backend. Without
CUDA the kernels run in Triton's interpreter (slow: keep shapes tiny); see
test_triton_kernels.py for why TRITON_INTERPRET is set here.
"""

import json
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

from tokenmill.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from tokenmill.kernels.triton_utils import (  # noqa: E402
    interpreter_active,
    interpreter_problem,
)
from tokenmill.llm import LLM  # noqa: E402
from tokenmill.model import layers  # noqa: E402
from tokenmill.model.loader import init_dummy_weights  # noqa: E402
from tokenmill.runner.cuda_graphs import (  # noqa: E402
    DecodeGraphInputs,
    fixed_decode_split,
    pad_decode_step,
)
from tokenmill.runner.model_runner import build_step_inputs  # noqa: E402
from tokenmill.sampling import SamplingParams  # noqa: E402

if not ON_GPU and not interpreter_active():
    pytest.skip("an earlier test module imported triton in compiled mode; "
                "test_triton_interpreter.py runs this module in a child process instead",
                allow_module_level=True)
if not ON_GPU and interpreter_problem():
    pytest.skip(interpreter_problem(), allow_module_level=True)

DEVICE = "cuda" if ON_GPU else "cpu"
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128,
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}
# An explicit, small KV budget on every device. Without one, a GPU engine takes
# gpu_memory_utilization of the whole card: tens of millions of Python block
# objects for this tiny model, a negative budget for the test's second engine, and
# a cache too large to clone. 4 MiB is ~4k blocks here: far more than any test uses.
TEST_KV_CACHE_MEMORY = 4 << 20
ENGINE_ARGS = dict(
    load_format="dummy", device=DEVICE, dtype="float32", block_size=4,
    max_num_batched_tokens=12, max_num_seqs=3, kv_cache_memory=TEST_KV_CACHE_MEMORY,
)  # on a GPU the triton engine also captures and replays decode CUDA graphs


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return str(path)


def make_llm(path: str, backend: str, **overrides) -> LLM:
    llm = LLM(path, attention_backend=backend, **{**ENGINE_ARGS, **overrides})
    kv = llm.engine.core.runner.kv_cache
    assert kv.numel() * kv.element_size() <= TEST_KV_CACHE_MEMORY
    # Larger random weights than the loader's default: sharp logits, no near-ties.
    init_dummy_weights(llm.engine.core.runner.model, std=0.2, seed=7)
    return llm


def record_step_kinds(llm: LLM) -> set[str]:
    """Watch the scheduler: which kinds of step ran (decode-only, with a partial chunk...)."""
    kinds: set[str] = set()
    scheduler = llm.engine.core.scheduler
    schedule = scheduler.schedule

    def watched(*args, **kwargs):
        out = schedule(*args, **kwargs)
        lens = [len(s.token_ids) for s in out.seqs]
        if lens:
            kinds.add("decode" if max(lens) == 1 else "mixed" if min(lens) == 1 else "prefill")
        if any(s.num_logits == 0 for s in out.seqs):
            kinds.add("chunk")  # a prompt chunk that does not reach the prompt's end
        return out

    scheduler.schedule = watched
    return kinds


def prompts() -> list[list[int]]:
    rng = random.Random(1)
    shared = [rng.randrange(3, 128) for _ in range(9)]
    return [
        shared + [rng.randrange(3, 128) for _ in range(5)],
        [rng.randrange(3, 128) for _ in range(3)],
        shared + [rng.randrange(3, 128) for _ in range(2)],
        shared[:8] + [rng.randrange(3, 128) for _ in range(4)],
        [rng.randrange(3, 128) for _ in range(17)],
        shared + [rng.randrange(3, 128)],
    ]


def test_engine_greedy_tokens_match_torch_backend(tiny_model_dir):
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    results = {}
    for backend in ("torch", "triton"):
        llm = make_llm(tiny_model_dir, backend)
        assert llm.engine.config.attention_backend == backend
        steps = record_step_kinds(llm)
        outs = llm.generate(prompts(), params, use_tqdm=False)
        assert "mixed" in steps and "decode" in steps and "chunk" in steps
        stats = llm.engine.stats()
        assert stats.prefix_cache_hits > 0  # later prompts reuse the shared prefix
        assert stats.num_free_blocks == stats.num_total_blocks
        results[backend] = [o.outputs[0].token_ids for o in outs]
    assert results["triton"] == results["torch"]
    assert all(len(tokens) == 8 for tokens in results["torch"])
    # Distinct prompts, distinct outputs (no request reads another's rows). Prompts 2 and
    # 5 extend prompt 0's shared prefix by a token or two and may fall into the same
    # greedy cycle on these random weights (they do with oneDNN's float32 rounding).
    assert len({tuple(results["torch"][i]) for i in (0, 1, 3, 4)}) == 4


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_quantized_kv_engine_matches_torch_backend(tiny_model_dir, kv_cache_dtype):
    """--kv-cache-dtype int8|fp8 through the whole engine (prefix hits, chunks, decodes):
    the Triton KV write and kernels give the PyTorch backend's greedy tokens."""
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    results = {}
    for backend in ("torch", "triton"):
        llm = make_llm(tiny_model_dir, backend, kv_cache_dtype=kv_cache_dtype)
        assert llm.engine.core.runner.kv_cache.shape[-1] == TINY_CONFIG["hidden_size"] // (
            TINY_CONFIG["num_attention_heads"]) + 4
        outs = llm.generate(prompts(), params, use_tqdm=False)
        assert llm.engine.stats().prefix_cache_hits > 0
        results[backend] = [o.outputs[0].token_ids for o in outs]
    assert results["triton"] == results["torch"]


def test_model_layers_fused_path_matches_eager():
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    norm = layers.RMSNorm(48, eps=1e-5, device=DEVICE)
    with torch.no_grad():
        norm.weight.copy_(rand(48))
    x, residual = rand(5, 48), rand(5, 48)
    eager = norm(x), norm(x, residual)
    norm.use_triton = True
    fused = norm(x), norm(x, residual)
    torch.testing.assert_close(fused[0], eager[0], atol=1e-5, rtol=1e-5)
    for got, want in zip(fused[1], eager[1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    gate_up = rand(5, 64)
    torch.testing.assert_close(layers.silu_and_mul(gate_up, use_triton=True),
                               layers.silu_and_mul(gate_up, use_triton=False),
                               atol=1e-6, rtol=1e-6)

    rope = layers.RotaryEmbedding(16, 64, 10000.0, device=DEVICE)
    positions = torch.tensor([0, 3, 17, 63, 5], device=DEVICE)
    qkv = rand(5, (4 + 2 + 2) * 16)  # rotary works in place on views of the fused QKV
    q = qkv[:, :64].view(5, 4, 16)
    k = qkv[:, 64:96].view(5, 2, 16)
    want_q, want_k = layers.apply_rotary(q, k, *rope.cos_sin(positions, q.dtype),
                                         use_triton=False)
    got_q, got_k = layers.apply_rotary(q, k, *rope.cos_sin(positions, q.dtype),
                                       use_triton=True)
    torch.testing.assert_close(got_q, want_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_k, want_k, atol=1e-6, rtol=1e-6)
    assert got_q.data_ptr() == q.data_ptr()  # rotated in place


@pytest.mark.parametrize("num_segments", [1, 2])
def test_graph_decode_inputs_on_triton_backend_match_torch(tiny_model_dir, num_segments):
    """What a captured decode graph computes (padded rows, static buffers, fixed split)."""
    from tokenmill.step_types import ScheduledSeq, SchedulerOutput

    llm = make_llm(tiny_model_dir, "torch")
    runner = llm.engine.core.runner
    rng = random.Random(num_segments)
    seqs_prompts = [[rng.randrange(128) for _ in range(n)] for n in (6, 11, 1)]
    tables = [[3, 9], [12, 4, 7], [20]]
    runner.execute(SchedulerOutput(
        seqs=[ScheduledSeq(f"s{i}", p, 0, t, 1)
              for i, (p, t) in enumerate(zip(seqs_prompts, tables))],
        num_batched_tokens=18,
    ))
    decode = SchedulerOutput(
        seqs=[ScheduledSeq(f"s{i}", [rng.randrange(128)], len(p), t, 1)
              for i, (p, t) in enumerate(zip(seqs_prompts, tables))],
        num_batched_tokens=3,
    )
    before = runner.kv_cache.clone()
    want = runner.execute(decode).logits  # torch backend, unpadded, eager

    runner.kv_cache.copy_(before)
    backend = TritonAttentionBackend()
    for layer in runner.model.model.layers:
        layer.self_attn.attn_backend = backend
    inputs = DecodeGraphInputs(8, llm.engine.max_model_len, runner.block_size,
                               runner.device)
    step = build_step_inputs(decode, runner.block_size)
    inputs.load(pad_decode_step(step, 4))
    input_ids, positions, meta = inputs.views(4)
    with fixed_decode_split(backend, num_segments), torch.inference_mode():
        assert backend._decode_segments(meta, 2, runner.device) == num_segments
        hidden = runner.model(input_ids, positions, runner.kv_caches, meta)
        got = runner.model.compute_logits(hidden[torch.from_numpy(step.logits_indices)])
    assert backend.split_kv is None and backend.num_segments is None  # restored
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


WINDOWED_CONFIGS = {
    # Local layers with a 5-token window around a global one, own RoPE bases, Q/K norms.
    "gemma3": {**TINY_CONFIG, "architectures": ["Gemma3ForCausalLM"],
               "model_type": "gemma3_text", "num_hidden_layers": 3, "head_dim": 16,
               "sliding_window": 5, "sliding_window_pattern": 2, "query_pre_attn_scalar": 16,
               "tie_word_embeddings": True},
    # Every layer windowed (blocks behind the window are released) and experts.
    "mixtral": {**TINY_CONFIG, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                "sliding_window": 6, "num_local_experts": 4, "num_experts_per_tok": 2},
}


@pytest.mark.parametrize("family", list(WINDOWED_CONFIGS))
def test_windowed_and_moe_families_match_torch_backend(family, tmp_path):
    """Sliding windows in the Triton kernels and the fused MoE kernel inside the engine."""
    (tmp_path / "config.json").write_text(json.dumps(WINDOWED_CONFIGS[family]))
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    results = {}
    for backend in ("torch", "triton"):
        llm = make_llm(str(tmp_path), backend)
        if backend == "triton":
            for module in llm.engine.core.runner.model.modules():
                if hasattr(module, "quantize_experts"):
                    module.impl = "triton"  # the fused kernel (default on CUDA only)
        outs = llm.generate(prompts(), params, use_tqdm=False)
        results[backend] = [o.outputs[0].token_ids for o in outs]
        stats = llm.engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks
    assert results["triton"] == results["torch"]
