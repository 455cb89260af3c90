"""Tensor parallelism over torch.distributed (gloo on the CPU).

- greedy output with TP = 2 and 4 equals TP = 1 (float32) on a tiny random Llama with
  8 query and 4 KV heads, batched, with chunked prefill, prefix-cache hits, n-gram
  speculative decoding; TP = 8 replicates the KV heads;
- a sharded forward's prompt logprobs match the unsharded ones;
- every rank's quantized shard equals the same slice of the unsharded quantized model;
- the bundled SmolLM2 (9 heads, 3 KV heads) with TP = 3 equals TP = 1; TP = 2 is refused
  with the head count in the message;
- a worker rank that dies or hangs fails the requests in flight and the server exits 1;
- two "nodes" on 127.0.0.1 serve together.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch
from family_models import save_family
from safetensors.torch import save_file
from server_utils import ServerProcess, free_port

from tokenmill.attention.base import get_attention_backend
from tokenmill.config import ModelConfig
from tokenmill.distributed import TPGroup
from tokenmill.llm import LLM
from tokenmill.model.loader import load_model, resolve_model
from tokenmill.model.quantization import Int4Linear, Int8Linear
from tokenmill.model.sharding import check_tensor_parallel, shard_plan
from tokenmill.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
ROOT = Path(__file__).resolve().parents[1]


def save_tiny(path: Path, heads: int = 8, kv_heads: int = 4, bias: bool = False) -> str:
    import transformers

    torch.manual_seed(0)
    cls = transformers.Qwen2Config if bias else transformers.LlamaConfig
    cfg = cls(vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
              max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=bias)
    model_cls = transformers.Qwen2ForCausalLM if bias else transformers.LlamaForCausalLM
    model = model_cls(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg.to_dict()))
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("tp") / "tiny")


def prompts() -> list[list[int]]:
    shared = list(range(30, 70))  # a prefix several prompts share (prefix-cache hits)
    return [[5, 6, 7, 8, 9, 10], shared + [1, 2], shared + [3], list(range(100, 160)), [42]]


def generate(path: str, **engine_args) -> list[list[int]]:
    llm = LLM(path, kv_cache_memory="16MiB", **engine_args)
    try:
        outs = llm.generate(prompts(), GREEDY, use_tqdm=False)
        outs += llm.generate(prompts()[1:3], GREEDY, use_tqdm=False)  # cache hits now
        return [o.outputs[0].token_ids for o in outs]
    finally:
        llm.engine.shutdown()


@pytest.fixture(scope="module")
def reference(tiny) -> list[list[int]]:
    return generate(tiny)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_greedy_output_equals_a_single_rank(tiny, reference, tp):
    # 16 tokens per step: long prompts are chunked across steps.
    assert generate(tiny, tensor_parallel_size=tp, max_num_batched_tokens=16) == reference


def test_speculative_decoding_under_tp(tiny, reference):
    assert generate(tiny, tensor_parallel_size=2, speculative_method="ngram") == reference


def test_qwen2_bias_and_tied_head_under_tp(tmp_path):
    path = save_tiny(tmp_path / "qwen", heads=4, kv_heads=2, bias=True)
    assert generate(path, tensor_parallel_size=2) == generate(path)


@pytest.mark.parametrize("family", ["gemma3", "qwen3-moe", "mixtral"])
def test_added_families_under_tp(tmp_path, family):
    """Gemma 3 (sandwich norms, Q/K norms, local/global layers) and the MoE families
    (every expert's intermediate units split across ranks, router replicated; Mixtral's
    all-window layers also release blocks) give the single-rank greedy output."""
    path, _ = save_family(tmp_path, family)
    assert generate(path, tensor_parallel_size=2, max_num_batched_tokens=16) == generate(path)


def test_sharded_logprobs_match_unsharded(tiny):
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=3)
    results = []
    for tp in (1, 2):
        llm = LLM(tiny, kv_cache_memory="16MiB", tensor_parallel_size=tp)
        try:
            results.append(llm.generate(prompts()[3:4], params, use_tqdm=False)[0])
        finally:
            llm.engine.shutdown()
    single, sharded = (r.prompt_logprobs[1:] for r in results)
    for a, b in zip(single, sharded, strict=True):
        assert a.token_id == b.token_id and a.rank == b.rank
        assert abs(a.logprob - b.logprob) < 1e-4
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


@pytest.mark.parametrize("layout", ["default", "rows"])  # default: panels where they run
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_every_quantized_shard_equals_the_unsharded_slice(tiny, method, layout, monkeypatch):
    """Loading rank r of 2 needs no peers; its quantized weights must be exactly the
    matching rows (column-parallel) or input groups (row-parallel) of the whole model:
    compared as the exact weights the codes and scales stand for, whatever the layout."""
    if layout == "rows":
        monkeypatch.setenv("TOKENMILL_CPU_PANELS", "0")
    backend = get_attention_backend("torch")
    resolved = resolve_model(tiny)

    def buffers(tp: TPGroup) -> dict[str, torch.Tensor]:
        model = load_model(resolved, torch.float32, "cpu", backend, method, tp).model
        layers = {n: m for n, m in model.named_modules()
                  if "layers.0." in n and isinstance(m, (Int4Linear, Int8Linear))}
        assert layers
        return {n: m._dequantize_rows(0, m.out_features) for n, m in layers.items()}

    whole = buffers(TPGroup())
    hd = 16
    for rank in range(2):
        part = buffers(TPGroup(rank=rank, world_size=2))
        sp = shard_plan(load_model(resolved, torch.float32, "cpu", backend).config, rank, 2)
        q_rows = slice(sp.q_head_start * hd, (sp.q_head_start + sp.num_heads) * hd)
        for name, value in part.items():
            full = whole[name]
            if "o_proj" in name or "down_proj" in name:
                # Row-parallel: input columns (and with them whole groups) split.
                cols = full.shape[1] // 2
                expected = full[:, rank * cols:(rank + 1) * cols]
            elif "qkv_proj" in name:
                q = q_rows.stop - q_rows.start
                kv_start, kv = sp.kv_head_start * hd, sp.num_kv_heads * hd
                k_off, v_off = 8 * hd, 8 * hd + 4 * hd
                expected = torch.cat([
                    full[q_rows], full[k_off + kv_start:k_off + kv_start + kv],
                    full[v_off + kv_start:v_off + kv_start + kv]])
                assert value.shape[0] == q + 2 * kv
            elif "gate_up_proj" in name:
                inter = 64
                expected = torch.cat([full[rank * inter:(rank + 1) * inter],
                                      full[128 + rank * inter:128 + (rank + 1) * inter]])
            else:
                continue
            assert torch.equal(value, expected), name


def test_smollm2_needs_a_head_divisor():
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64)
    with pytest.raises(ValueError, match="9 attention heads.*sizes that work for this model: 1, 3"):
        check_tensor_parallel(config, 2)
    check_tensor_parallel(config, 3)


def test_expert_width_must_divide():
    config = ModelConfig(architecture="Qwen3MoeForCausalLM", vocab_size=100, hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=8, num_experts=4,
                         num_experts_per_tok=2, moe_intermediate_size=36)
    with pytest.raises(ValueError,
                       match="expert intermediate size 36.*work for this model: 1, 2, 4"):
        check_tensor_parallel(config, 8)
    check_tensor_parallel(config, 4)


def test_an_impossible_split_is_refused_and_cleans_up(tiny):
    with pytest.raises(ValueError, match="8 attention heads"):
        LLM(tiny, kv_cache_memory="16MiB", tensor_parallel_size=3)


@pytest.mark.slow
def test_smollm2_tp3_equals_tp1():
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    params = SamplingParams(max_tokens=16, temperature=0.0)
    outs = []
    for tp in (1, 3):
        llm = LLM(max_model_len=512, kv_cache_memory="64MiB", tensor_parallel_size=tp)
        try:
            outs.append([o.outputs[0].token_ids for o in
                         llm.generate(texts, params, use_tqdm=False)])
        finally:
            llm.engine.shutdown()
    assert outs[0] == outs[1]


# ----- served: failures and several nodes -------------------------------------------------


def _worker_pids(server: ServerProcess) -> list[int]:
    out = subprocess.run(["pgrep", "-f", "tokenmill.engine.tensor_parallel --rank"],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _streams_until_failure(server: ServerProcess, act, count: int = 6) -> list[list[str]]:
    """Start ``count`` long streams (the server runs one at a time, the rest wait in its
    queue), ``act()`` once tokens flow, and return each stream's lines."""
    results: list[list[str]] = [[] for _ in range(count)]
    started = threading.Event()

    def read(lines: list[str]) -> None:
        body = {"prompt": [5, 6, 7], "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body,
                          timeout=300) as resp:
            for line in resp.iter_lines():
                if line:
                    lines.append(line)
                    started.set()

    readers = [threading.Thread(target=read, args=(lines,)) for lines in results]
    for reader in readers:
        reader.start()
    assert started.wait(300)
    act()
    for reader in readers:
        reader.join(300)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_failed_rank_fails_requests_and_the_server_exits(tiny, how):
    server = ServerProcess(["--model", tiny, "--tensor-parallel-size", "2",
                            "--kv-cache-memory", "16MiB", "--distributed-timeout", "5",
                            "--max-num-seqs", "1"])
    try:
        server.wait_ready()
        [worker] = _worker_pids(server)
        sig = signal.SIGKILL if how == "killed" else signal.SIGSTOP
        streams = _streams_until_failure(server, lambda: os.kill(worker, sig))
        assert all(lines[-1] == "data: [DONE]" for lines in streams)
        errors = [json.loads(lines[-2][6:]).get("error", {}).get("code") for lines in streams]
        assert errors.count("engine_dead") >= len(streams) - 1, errors
        assert server.wait_exit(120) == 1
    finally:
        for pid in _worker_pids(server):
            os.kill(pid, signal.SIGKILL)
        server.cleanup()


@pytest.mark.slow
def test_two_nodes_on_one_machine(tiny, reference):
    addr = f"127.0.0.1:{free_port()}"
    flags = ["--model", tiny, "--tensor-parallel-size", "2", "--nnodes", "2",
             "--dist-init-addr", addr, "--kv-cache-memory", "16MiB"]
    node1 = subprocess.Popen([sys.executable, "-m", "tokenmill.server", *flags, "--node-rank",
                              "1"], cwd=ROOT)
    server = ServerProcess([*flags, "--node-rank", "0"])
    try:
        server.wait_ready()
        for prompt, want in zip(prompts(), reference, strict=False):
            body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            resp = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
            resp.raise_for_status()
            assert resp.json()["usage"]["completion_tokens"] == len(want)
        server.signal(signal.SIGTERM)
        assert server.wait_exit(120) == 0
        assert node1.wait(60) == 0  # its rank was told to stop
    finally:
        if node1.poll() is None:
            node1.kill()
        server.cleanup()


def test_rank_zero_alone_is_the_single_device_path():
    group = TPGroup()
    x = torch.ones(3)
    assert group.all_reduce(x) is x and group.gather_to_first(x) is x
    assert group.min_int(7) == 7
