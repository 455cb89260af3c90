"""Built-in hyper-parameters of well-known models, so plans need no download.

Each entry holds the fields of the model's public Hugging Face ``config.json``
that matter for planning (the repository is named in ``source``).
"""

from __future__ import annotations

from typing import Any

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
_LLAMA2 = {**_LLAMA, "vocab_size": 32000, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2}
_LLAMA31 = {**_LLAMA, "vocab_size": 128256, "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192},
            "bos_token_id": 128000, "eos_token_id": 128001}

KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "llama-2-7b": {**_LLAMA2, "source": "meta-llama/Llama-2-7b-hf",
                   "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama-2-13b": {**_LLAMA2, "source": "meta-llama/Llama-2-13b-hf",
                    "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40},
    "llama-2-70b": {**_LLAMA2, "source": "meta-llama/Llama-2-70b-hf",
                    "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8},
    "llama-3.1-8b": {**_LLAMA31, "source": "meta-llama/Llama-3.1-8B",
                     "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8},
    "llama-3.1-70b": {**_LLAMA31, "source": "meta-llama/Llama-3.1-70B",
                      "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "num_key_value_heads": 8},
    "mistral-7b": {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                   "source": "mistralai/Mistral-7B-v0.3",
                   "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "head_dim": 128,
                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
                   "rope_theta": 1000000.0, "tie_word_embeddings": False,
                   "bos_token_id": 1, "eos_token_id": 2},
    "qwen2.5-0.5b": {**_QWEN2, "source": "Qwen/Qwen2.5-0.5B-Instruct",
                     "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                     "num_hidden_layers": 24, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "max_position_embeddings": 32768,
                     "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                     "tie_word_embeddings": True,
                     "bos_token_id": 151643, "eos_token_id": 151645},
    "qwen2.5-7b": {**_QWEN2, "source": "Qwen/Qwen2.5-7B-Instruct",
                   "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "max_position_embeddings": 32768,
                   "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                   "tie_word_embeddings": False,
                   "bos_token_id": 151643, "eos_token_id": 151645},
    "smollm2-135m": {**_LLAMA, "source": "HuggingFaceTB/SmolLM2-135M-Instruct",
                     "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "max_position_embeddings": 8192,
                     "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                     "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2},
}
