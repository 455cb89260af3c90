"""A tiny random-weight chat model with a real vocabulary, for structured-output tests.

Grammar tests need a real tokenizer (xgrammar compiles against the vocabulary) but
not a good model: a random model under a grammar still has to produce valid output,
which is the property under test. The model is a 2-layer Llama with SmolLM2's
byte-level BPE vocabulary (49152 tokens, read from the bundled GGUF) plus
``<think>``/``</think>`` as single added tokens, saved as an HF directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

THINK_TOKENS = ("<think>", "</think>")
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_chat_model(directory: Path, seed: int = 0) -> str:
    """Write the model into ``directory`` and return its path."""
    import transformers

    from tokenmill.model.loader import default_model_path
    from tokenmill.tokenizer import Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    backend = Tokenizer.from_gguf_file(default_model_path()).backend
    backend.add_tokens(list(THINK_TOKENS))
    backend.save(str(directory / "tokenizer.json"))
    vocab = backend.get_vocab_size(with_added_tokens=True)
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML,
    }))
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(cfg.to_dict()))
    return str(directory)
