"""The model over a paged KV cache: chunked prefill and decode equal one full prefill.

A prompt's logits from a single prefill step are the reference. The same
prompt then runs as a prefix prefill, a second chunk and single-token decode
steps, with block size 4 and a shuffled, non-contiguous block table, sharing
steps with another request; every position's logits must agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tokenmill.attention.base import AttentionMetadata
from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.config import ModelConfig
from tokenmill.model.llama import LlamaCausalLM, Qwen2CausalLM
from tokenmill.model.loader import init_dummy_weights

BLOCK_SIZE = 4
NUM_BLOCKS = 16


@dataclass
class Work:
    """One request's share of a step: its tokens, block table and cached length."""

    tokens: list[int]
    block_table: list[int]
    num_computed: int  # tokens already in the cache before this step


def build_step(works: list[Work]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """input_ids, positions and metadata for one step (slot = block * bs + pos % bs)."""
    ids, positions, slots, starts = [], [], [], [0]
    for w in works:
        for offset, token in enumerate(w.tokens):
            pos = w.num_computed + offset
            ids.append(token)
            positions.append(pos)
            slots.append(w.block_table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
        starts.append(starts[-1] + len(w.tokens))
    width = max(len(w.block_table) for w in works)
    tables = [w.block_table + [0] * (width - len(w.block_table)) for w in works]
    lens = [w.num_computed + len(w.tokens) for w in works]
    meta = AttentionMetadata(
        num_tokens=len(ids),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        max_query_len=max(len(w.tokens) for w in works),
        max_seq_len=max(lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=lens,
    )
    return torch.tensor(ids), torch.tensor(positions), meta


def make_model(cls: type[LlamaCausalLM], max_positions: int = 256) -> LlamaCausalLM:
    config = ModelConfig(
        architecture="Qwen2ForCausalLM" if cls is Qwen2CausalLM else "LlamaForCausalLM",
        vocab_size=96,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        rope_theta=10000.0,
        max_position_embeddings=max_positions,
        attention_bias=cls is Qwen2CausalLM,
    )
    model = cls(config, TorchAttentionBackend()).eval()
    init_dummy_weights(model, std=0.2, seed=3)
    return model


def new_kv(model: LlamaCausalLM) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg = model.config
    shape = (NUM_BLOCKS, BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_hidden_layers)]


def run(model: LlamaCausalLM, kv: list, works: list[Work]) -> list[torch.Tensor]:
    ids, positions, meta = build_step(works)
    with torch.inference_mode():
        logits = model.compute_logits(model(ids, positions, kv, meta))
    s = meta.query_start_loc_cpu
    return [logits[s[i] : s[i + 1]] for i in range(len(works))]


PROMPT_A = [3, 17, 92, 5, 41, 8, 66, 23, 0, 77, 12, 50, 31]  # 13 tokens
PROMPT_B = [9, 1, 88, 45, 2, 60, 19]


@pytest.mark.parametrize("cls", [LlamaCausalLM, Qwen2CausalLM])
def test_chunked_prefill_and_decode_match_full_prefill(cls: type[LlamaCausalLM]) -> None:
    model = make_model(cls)
    ref_a = run(model, new_kv(model), [Work(PROMPT_A, [0, 1, 2, 3], 0)])[0]
    ref_b = run(model, new_kv(model), [Work(PROMPT_B + [42], [0, 1], 0)])[0]

    kv = new_kv(model)
    table_a = [11, 2, 7, 14]  # shuffled, non-contiguous
    table_b = [5, 0]
    got_a: list[torch.Tensor] = []
    got_b: list[torch.Tensor] = []
    # Step 1: prefix of A alone (5 tokens; crosses a block boundary).
    got_a += run(model, kv, [Work(PROMPT_A[:5], table_a, 0)])
    # Step 2: next chunk of A (4 tokens) mixed with all of B's prompt.
    a, b = run(model, kv, [Work(PROMPT_A[5:9], table_a, 5), Work(PROMPT_B, table_b, 0)])
    got_a.append(a)
    got_b.append(b)
    # Steps 3+: decode-only batches, one token per request per step.
    for i in range(9, len(PROMPT_A)):
        works = [Work([PROMPT_A[i]], table_a, i)]
        if i == 9:  # B decodes one token (id 42) in the same batch
            works.append(Work([42], table_b, len(PROMPT_B)))
        outs = run(model, kv, works)
        got_a.append(outs[0])
        got_b += outs[1:]
    torch.testing.assert_close(torch.cat(got_a), ref_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(got_b), ref_b, atol=1e-5, rtol=1e-5)


def test_rotary_table_grows_past_max_positions() -> None:
    """A context longer than max_position_embeddings still rotates correctly."""
    short = make_model(LlamaCausalLM, max_positions=4)
    long = make_model(LlamaCausalLM, max_positions=64)
    assert torch.equal(short.model.embed_tokens.weight, long.model.embed_tokens.weight)
    works = [Work(PROMPT_A, [0, 1, 2, 3], 0)]
    got = run(short, new_kv(short), works)[0]
    assert short.model.rotary.max_positions >= len(PROMPT_A)
    torch.testing.assert_close(got, run(long, new_kv(long), works)[0], atol=0, rtol=0)
