"""The native decoder stack (one C call for all layers) against the per-layer path."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_model_paged import BLOCK_SIZE, NUM_BLOCKS, Work, build_step

from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.config import ModelConfig
from tokenmill.kernels import cpu as cpu_kernels
from tokenmill.model import quantization as quantization_module
from tokenmill.model.layers import RMSNorm, fold_rotary_sign
from tokenmill.model.llama import LlamaCausalLM, Qwen2CausalLM
from tokenmill.model.loader import init_dummy_weights
from tokenmill.model.native_stack import NativeDecoderStack
from tokenmill.model.prepacked import PrepackedLinear, default_prepack, prepack_linears
from tokenmill.model.quantization import quantize_model

pytestmark = pytest.mark.skipif(cpu_kernels.cpu_kernels() is None,
                                reason="no C compiler: native kernels unavailable")


def _model(cls: type[LlamaCausalLM], quantization: str | None, window: int | None = None,
           dtype: torch.dtype = torch.float32):
    config = ModelConfig(
        architecture="Qwen2ForCausalLM" if cls is Qwen2CausalLM else "LlamaForCausalLM",
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
        max_position_embeddings=256, attention_bias=cls is Qwen2CausalLM,
        sliding_window=window,
    )
    model = cls(config, TorchAttentionBackend(), dtype).eval()
    init_dummy_weights(model, std=0.2, seed=5)
    quantize_model(model, quantization)
    if dtype == torch.bfloat16 and default_prepack("cpu", dtype):
        # AmxLinear where the CPU has AMX-BF16; as the loader, nothing where the CPU lacks
        # bfloat16 in hardware (oneDNN's bfloat16 reorder raises there)
        prepack_linears(model)
    return model


def _kv(model: LlamaCausalLM,
        dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed caches, in the model's dtype unless ``dtype``."""
    cfg = model.config
    shape = (NUM_BLOCKS, BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim)
    dtype = dtype or model.model.embed_tokens.weight.dtype
    return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
            for _ in range(cfg.num_hidden_layers)]


def _spied(stack: NativeDecoderStack) -> list[bool]:
    """Record, per forward pass, whether the stack ran (True) or fell back (False)."""
    ran: list[bool] = []
    run = stack.run

    def spy(*args, **kwargs):
        out = run(*args, **kwargs)
        ran.append(out is not None)
        return out

    stack.run = spy
    return ran


def _step(model, kv, works, stack):
    ids, positions, meta = build_step(works)
    meta = dataclasses.replace(meta, has_padding_slots=False)
    model.model.native_stack = stack
    with torch.inference_mode():
        return model.compute_logits(model(ids, positions, kv, meta))


needs_amx = pytest.mark.skipif(not cpu_kernels.amx_bf16_available(),
                               reason="no AMX-BF16 here")
needs_bf16_dot = pytest.mark.skipif(not cpu_kernels.bf16_dot_available(),
                                    reason="no AVX512-BF16 here")
# The bfloat16 stack on each of its matmul kernels: AMX, or AVX512-BF16 dot products
# (what CPUs without AMX run; an AMX CPU has them too, so it tests both).
BF16_KERNELS = [pytest.param("amx", marks=needs_amx), pytest.param("dot", marks=needs_bf16_dot)]


def _bf16_kernel(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make prepack_linears pick ``kernel`` for bfloat16 layers."""
    if kernel == "dot":
        monkeypatch.setattr(cpu_kernels, "amx_bf16_available", lambda: False)


needs_f32_panel = pytest.mark.skipif(not cpu_kernels.f32_panel_available(),
                                     reason="the float32 panel kernel needs AVX2/FMA")


# Where the panel kernels run, "int4"/"int8" take them and the "-rows" cases the row layout.
needs_q4_panels = pytest.mark.skipif(not cpu_kernels.q4_panels_available(),
                                     reason="no int4 panel kernel here: rows are the default")
needs_int8_panels = pytest.mark.skipif(not cpu_kernels.int8_panels_available(),
                                       reason="no int8 panel kernel here: rows are the default")


@pytest.mark.parametrize("quantization", [
    "int4", "int8",  # this CPU's default kernels
    pytest.param("int4-rows", marks=needs_q4_panels),
    pytest.param("int8-rows", marks=needs_int8_panels),
    *[pytest.param(q, marks=pytest.mark.skipif(  # every projection call on AMX tiles
        not cpu_kernels.panels_amx_available(), reason="no AMX-BF16"))
      for q in ("int4-amx", "int8-amx")],
    pytest.param("bfloat16", marks=needs_amx),  # bfloat16: AMX projections
    pytest.param("bfloat16-dot", marks=needs_bf16_dot),  # bfloat16: AVX512-BF16 projections
    pytest.param("float32", marks=needs_f32_panel),  # dense float32 on the panel kernel
])
@pytest.mark.parametrize("cls", [LlamaCausalLM, Qwen2CausalLM])  # Qwen2: QKV bias
def test_bit_identical_to_per_layer_path(cls, quantization: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    if quantization.startswith("bfloat16"):
        _bf16_kernel("dot" if quantization == "bfloat16-dot" else "amx", monkeypatch)
        model = _model(cls, None, dtype=torch.bfloat16)
    elif quantization == "float32":
        monkeypatch.setenv("TOKENMILL_CPU_GEMM", "native")  # the panel kernel, any AVX2 CPU
        model = _model(cls, None)
        prepack_linears(model)
    else:
        if quantization.endswith("-rows"):
            monkeypatch.setenv("TOKENMILL_CPU_PANELS", "0")
        if quantization.endswith("-amx"):
            monkeypatch.setattr(quantization_module, "AMX_MIN_ROWS", {4: 1, 8: 1})
        model = _model(cls, quantization.removesuffix("-rows").removesuffix("-amx"))
        if quantization.endswith("-amx"):
            assert model.model.layers[0].mlp.down_proj.amx_min_rows == 1
    stack = NativeDecoderStack.build(model.model)
    assert stack is not None
    ran = _spied(stack)
    a, b = [3, 17, 92, 5, 41, 8, 66, 23, 0, 77, 12, 50, 31], [9, 1, 88, 45, 2, 60, 19]
    kv_layers, kv_stack = _kv(model), _kv(model)
    works = [Work(a, [0, 1, 2, 3], 0), Work(b, [5, 6], 0)]  # short prompts: the stack runs
    want = _step(model, kv_layers, works, None)
    got = _step(model, kv_stack, works, stack)
    assert torch.equal(got, want)
    lengths = [len(a), len(b)]
    for _ in range(6):  # batched decode, crossing block boundaries
        ends = torch.tensor([len(w.tokens) for w in works]).cumsum(0) - 1
        nxt = want[ends].argmax(-1).tolist()
        works = [Work([nxt[0]], [0, 1, 2, 3, 4], lengths[0]),
                 Work([nxt[1]], [5, 6, 7, 8], lengths[1])]
        want = _step(model, kv_layers, works, None)
        got = _step(model, kv_stack, works, stack)
        assert torch.equal(got, want)
        lengths = [n + 1 for n in lengths]
    assert ran == [True] * 7
    for (k1, v1), (k2, v2) in zip(kv_layers, kv_stack, strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


@pytest.mark.parametrize("kernel", ["int4", *BF16_KERNELS])
def test_sliding_window_layers(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _bf16_kernel(kernel, monkeypatch)
    dtype = torch.float32 if kernel == "int4" else torch.bfloat16
    model = _model(LlamaCausalLM, "int4" if dtype == torch.float32 else None, window=5,
                   dtype=dtype)
    stack = NativeDecoderStack.build(model.model)
    assert stack is not None
    ran = _spied(stack)
    prompt = [4, 8, 15, 16, 23, 42, 7, 11, 30, 2]
    kv_layers, kv_stack = _kv(model), _kv(model)
    works = [Work(prompt, [0, 1, 2], 0)]
    assert torch.equal(_step(model, kv_stack, works, stack), _step(model, kv_layers, works, None))
    works = [Work([9], [0, 1, 2], len(prompt))]
    assert torch.equal(_step(model, kv_stack, works, stack), _step(model, kv_layers, works, None))
    assert ran == [True, True]


@pytest.mark.skipif(not cpu_kernels.prefill_attention_supported(16),
                    reason="no prefill-attention kernel in this build")
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("kv_dtype", [None, torch.float16, torch.bfloat16])
def test_long_prompt_chunks_run_on_the_stack(window: int | None,
                                             kv_dtype: torch.dtype | None) -> None:
    """A step with a chunk longer than SHORT_QUERY_LEN (prefill_attention_f32) next to
    decodes and a short chunk: on the stack, bit-identical to the per-layer path; with a
    float32 cache and with a 16-bit one (--kv-cache-dtype float16|bfloat16)."""
    model = _model(LlamaCausalLM, "int4", window=window)
    stack = NativeDecoderStack.build(model.model)
    assert stack is not None and stack.long_chunks
    ran = _spied(stack)
    first, long_prompt = [5, 9, 14], [(7 * i) % 90 + 1 for i in range(40)]
    kv_layers, kv_stack = _kv(model, kv_dtype), _kv(model, kv_dtype)
    works = [Work(first, [0, 1], 0)]
    assert torch.equal(_step(model, kv_stack, works, stack), _step(model, kv_layers, works, None))
    # the long prompt in two chunks (the second after 23 cached tokens), with a decode
    long_table = list(range(2, 12))  # 40 tokens in blocks of 4
    steps = [(long_prompt[:23], 0, Work([8, 2], [12], 0)),  # and a short prompt
             (long_prompt[23:], 23, Work([6], [12], 2))]  # and its decode
    for chunk, start, other in steps:
        works = [Work([3], [0, 1], len(first)), Work(chunk, long_table, start), other]
        want = _step(model, kv_layers, works, None)
        assert torch.equal(_step(model, kv_stack, works, stack), want)
        first = [*first, 3]
    assert ran == [True, True, True]
    for (k1, v1), (k2, v2) in zip(kv_layers, kv_stack, strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_steps_it_does_not_cover_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(LlamaCausalLM, "int4")
    monkeypatch.setattr(cpu_kernels, "prefill_attention_supported", lambda head_dim: False)
    stack = NativeDecoderStack.build(model.model)
    long_prompt = list(range(1, 21))  # 20 new tokens: longer than SHORT_QUERY_LEN
    ids, positions, meta = build_step([Work(long_prompt, [0, 1, 2, 3, 4, 5], 0)])
    meta = dataclasses.replace(meta, has_padding_slots=False)
    hidden = model.model.embed_tokens(ids)
    cos, sin = model.model.rotary.cos_sin(positions, torch.float32)
    kv = _kv(model)
    # without the prefill-attention kernel, a long chunk is the per-layer path's
    assert stack.run(hidden, cos, fold_rotary_sign(sin), kv, meta) is None
    padded = dataclasses.replace(meta, has_padding_slots=None)  # unknown: maybe padding
    assert stack.run(hidden, cos, fold_rotary_sign(sin), kv, padded) is None
    # The forward pass still runs (per layer) and equals the model without the stack.
    assert torch.equal(_step(model, _kv(model), [Work(long_prompt, [0, 1, 2, 3, 4, 5], 0)],
                             stack),
                       _step(model, _kv(model), [Work(long_prompt, [0, 1, 2, 3, 4, 5], 0)],
                             None))


def test_models_it_does_not_cover() -> None:
    assert NativeDecoderStack.build(_model(LlamaCausalLM, None).model) is None  # dense
    bf16 = _model(LlamaCausalLM, None, dtype=torch.bfloat16)
    if NativeDecoderStack.build(bf16.model) is not None:
        # one projection on oneDNN instead of a native kernel: the whole stack is off
        bf16.model.layers[2].mlp.down_proj = PrepackedLinear(
            bf16.model.layers[2].mlp.down_proj.weight)
    assert NativeDecoderStack.build(bf16.model) is None
    model = _model(LlamaCausalLM, "int4")
    model.model.layers[1].mlp.down_proj.dense_min_rows = 9
    assert NativeDecoderStack.build(model.model).max_rows == 8


def test_native_norm_and_silu_match_pytorch() -> None:
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(7, 576, generator=g), torch.randn(7, 576, generator=g)
    norm = RMSNorm(576, 1e-5)
    norm.weight.data.copy_(torch.randn(576, generator=g))
    want = torch.rms_norm(x, (576,), norm.weight, 1e-5)
    assert torch.equal(norm(x), want)  # PyTorch's op unless a stack switched it
    norm.native_cpu = True
    torch.testing.assert_close(norm(x), want, rtol=1e-6, atol=1e-5)
    normed, total = norm(x, r)
    assert torch.equal(total, x + r)
    torch.testing.assert_close(normed, torch.rms_norm(x + r, (576,), norm.weight, 1e-5),
                               rtol=1e-6, atol=1e-5)
    for inter in (96, 99):  # 99: a row's last three lanes through the vector path's mask
        gate_up = torch.randn(5, 2 * inter, generator=g)
        gate_up[0, :4] = torch.tensor([-100.0, 100.0, -30.0, 30.0])  # beyond exp's clamp
        gate, up = gate_up.chunk(2, dim=-1)
        torch.testing.assert_close(cpu_kernels.silu_and_mul(gate_up),
                                   torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 7, 40])
def test_bfloat16_silu_rounds_like_pytorch(rows: int) -> None:
    """The bfloat16 stack's SiLU-mul against F.silu(g) * u in bfloat16: equal almost
    everywhere, elsewhere one bfloat16 step apart (its exp is within 2 ulp of
    PyTorch's); infinities and NaN as PyTorch gives them."""
    g = torch.Generator().manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * 1000, generator=g) * 4).bfloat16()
    gate_up[0, :6] = torch.tensor([float("nan"), float("inf"), -30.0, 30.0, 0.0, -0.0])
    gate, up = gate_up.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    got = cpu_kernels.silu_and_mul(gate_up)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    same = (got == want) | (got.isnan() & want.isnan())
    assert same.float().mean() > 0.999
    step = want.float().abs() * 2.0**-7 + 1e-30
    assert ((got.float() - want.float()).abs()[~same] <= step[~same]).all()


def test_build_switches_the_per_layer_path_to_its_kernels() -> None:
    dense = _model(LlamaCausalLM, None)
    assert NativeDecoderStack.build(dense.model) is None
    assert not dense.model.layers[0].input_layernorm.native_cpu  # float32 keeps PyTorch's
    assert not dense.model.norm.native_cpu
    model = _model(LlamaCausalLM, "int8")
    NativeDecoderStack.build(model.model)
    for layer in model.model.layers:
        assert layer.input_layernorm.native_cpu and layer.post_attention_layernorm.native_cpu
        assert layer.mlp.native_cpu_act
    assert model.model.norm.native_cpu  # the final norm too (one row: PyTorch's ~0.17 ms)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", [
    "int4", pytest.param("bfloat16", marks=pytest.mark.skipif(
        not (cpu_kernels.amx_bf16_available() or cpu_kernels.bf16_dot_available()),
        reason="no AMX-BF16 or AVX512-BF16 here"))])
def test_smollm2_same_tokens_with_and_without_the_stack(quantization: str) -> None:
    """The bundled model, quantized or in bfloat16 (on AMX or AVX512-BF16): batched greedy
    decode with the stack on and off."""
    from tokenmill import LLM, SamplingParams

    llm = (LLM(dtype="bfloat16", num_threads=2) if quantization == "bfloat16"
           else LLM(quantization=quantization, num_threads=2))
    decoder = llm.engine.core.runner.model.model
    stack = decoder.native_stack
    assert stack is not None
    ran = _spied(stack)
    prompts = ["The capital of France is", "def fibonacci(n):",
               "Once upon a time, there was", "List three colors:"]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    with_stack = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert ran and all(ran[-10:])  # decode steps ran through it
    decoder.native_stack = None
    per_layer = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert with_stack == per_layer
