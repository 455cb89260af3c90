"""Parameter counts and weight bytes of a decoder (dense or mixture of experts).

Counts are grouped by how the planner treats them: matrices that multiply
every token (attention and MLP), the vocabulary matrices (input embedding,
output projection), small vectors (biases, norms). For mixture-of-experts
models ``mlp`` holds every expert (and router) and ``experts`` /
``experts_active`` say how much of it is expert matrices, all of them and the
``num_experts_per_tok`` a token runs through.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.config import ModelConfig

WEIGHT_DTYPE_BYTES: dict[str, float] = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "int4": 0.5}
KV_DTYPE_BYTES: dict[str, float] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
# Per (token, KV head) row: tokenmill's 8-bit KV keeps a float32 scale after the codes.
KV_SCALE_BYTES: dict[str, int] = {"fp8": 4, "int8": 4}
_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16",
            "half": "fp16", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8"}

# Weight-only int4 (AWQ/GPTQ style): groups of 128 weights share an fp16 scale
# and a 4-bit zero point; vocabulary matrices, biases and norms stay 16-bit.
INT4_GROUP_SIZE = 128
INT4_BYTES_PER_WEIGHT = 0.5 + (2 + 0.5) / INT4_GROUP_SIZE
_HIGH_PRECISION_BYTES = 2


def normalize_dtype(name: str, table: dict[str, float], what: str) -> str:
    """Map a dtype spelling ("bfloat16", "BF16") onto a key of ``table``."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in table:
        raise ValueError(f"unknown {what} dtype {name!r}; choose one of {', '.join(table)}")
    return key


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a decoder-only transformer, by kind."""

    embedding: int  # input token embedding table, vocab x hidden
    lm_head: int  # untied output projection, vocab x hidden; 0 when tied to the embedding
    attention: int  # q, k, v, o projection matrices of all layers
    mlp: int  # gate, up, down projection matrices of all layers
    biases: int  # q/k/v biases (Qwen2)
    norms: int  # RMSNorm weights
    experts: int = 0  # expert matrices of all MoE layers (part of ``mlp``)
    experts_active: int = 0  # the expert matrices one token runs through

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.attention + self.mlp + self.biases + self.norms

    @property
    def layer_matmul(self) -> int:
        """Weights of the decoder layers' matrices (every expert included)."""
        return self.attention + self.mlp

    @property
    def layer_matmul_active(self) -> int:
        """Weights each token multiplies by in the decoder layers (its experts only)."""
        return self.attention + self.mlp - self.experts + self.experts_active


def count_parameters(cfg: ModelConfig) -> ParamCounts:
    """Count the parameters of any supported model from its hyper-parameters."""
    hidden, layers, head_dim = cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim
    q_width = cfg.num_attention_heads * head_dim
    kv_width = cfg.num_key_value_heads * head_dim
    vocab_matrix = cfg.vocab_size * hidden
    per_layer_attention = hidden * q_width + 2 * hidden * kv_width + q_width * hidden
    per_layer_bias = q_width + 2 * kv_width if cfg.attention_bias else 0
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(layers))
    per_expert = 3 * hidden * cfg.moe_intermediate_size
    experts = moe_layers * cfg.num_experts * per_expert
    router = moe_layers * cfg.num_experts * hidden
    dense_mlp = (layers - moe_layers) * 3 * hidden * cfg.intermediate_size
    norms_per_layer = 2 * hidden
    if cfg.architecture == "Gemma3ForCausalLM":
        norms_per_layer += 2 * hidden  # norms after attention and after the MLP too
    if cfg.qk_norm:
        norms_per_layer += 2 * head_dim
    return ParamCounts(
        embedding=vocab_matrix,
        lm_head=0 if cfg.tie_word_embeddings else vocab_matrix,
        attention=layers * per_layer_attention,
        mlp=dense_mlp + experts + router,
        biases=layers * per_layer_bias,
        norms=layers * norms_per_layer + hidden,
        experts=experts,
        experts_active=moe_layers * cfg.num_experts_per_tok * per_expert,
    )


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of the model's weights, by how tensor parallelism treats them."""

    embedding: float  # input embedding table (vocab-parallel)
    lm_head: float  # untied output projection (vocab-parallel); 0 when tied
    layers: float  # attention and MLP matrices with their biases (sharded)
    replicated: float  # norms and other vectors every GPU keeps whole
    label: str  # where the sizes come from, e.g. "bf16" or "GGUF Q4_1"
    experts: float = 0.0  # the expert matrices' share of ``layers`` (MoE models)

    @property
    def total(self) -> float:
        return self.embedding + self.lm_head + self.layers + self.replicated

    @property
    def tied(self) -> bool:
        return self.lm_head == 0

    def per_gpu(self, tp: int = 1) -> float:
        """Weight bytes each of ``tp`` tensor-parallel GPUs holds."""
        return (self.embedding + self.lm_head + self.layers) / tp + self.replicated

    def streamed_per_step(self, tp: int = 1) -> float:
        """Bytes each GPU reads from memory in one forward step.

        Every weight is read once, except an untied input embedding table, of
        which a step only gathers the rows of its tokens (negligible).
        """
        gathered = 0.0 if self.tied else self.embedding / tp
        return self.per_gpu(tp) - gathered


def weight_bytes_for_dtype(counts: ParamCounts, dtype: str) -> WeightBytes:
    """Weight bytes when the model is stored in ``dtype`` (see ``WEIGHT_DTYPE_BYTES``).

    fp32/bf16/fp16 store everything at that width. int8 and int4 are weight-only
    quantization of the layer matrices; the vocabulary matrices, biases and norms
    stay 16-bit, as in AWQ/GPTQ checkpoints. int4 includes its group scales.
    """
    dtype = normalize_dtype(dtype, WEIGHT_DTYPE_BYTES, "weight")
    width = WEIGHT_DTYPE_BYTES[dtype]
    if dtype == "int4":
        matrix_width, other_width = INT4_BYTES_PER_WEIGHT, _HIGH_PRECISION_BYTES
    elif dtype == "int8":
        matrix_width, other_width = width, _HIGH_PRECISION_BYTES
    else:
        matrix_width = other_width = width
    return WeightBytes(
        embedding=counts.embedding * other_width,
        lm_head=counts.lm_head * other_width,
        layers=counts.layer_matmul * matrix_width + counts.biases * other_width,
        replicated=counts.norms * other_width,
        label=dtype,
        experts=counts.experts * matrix_width,
    )
