"""``tokenmill eval ppl``: windows, NLL/PPL arithmetic and the engine's logprobs vs HF."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random

import pytest
import torch
from safetensors.torch import save_file

from tokenmill import cli
from tokenmill.engine.args import EngineArgs
from tokenmill.eval import ppl
from tokenmill.eval.ppl import (
    PerplexityResult,
    Window,
    format_table,
    load_text,
    make_windows,
    nll_from_logprobs,
    parse_overrides,
)
from tokenmill.llm import LLM

VOCAB = 256  # byte-level: every byte is one token


def _byte_tokenizer_json() -> str:
    """A byte-level BPE tokenizer with no merges: token id = byte value."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: _byte_of(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def _byte_of(ch: str) -> int:
    # GPT-2's byte-to-unicode map: printable bytes map to themselves, the rest above 255.
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table[ch]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-weight Llama saved as safetensors with a byte-level tokenizer."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    d = tmp_path_factory.mktemp("tiny_ppl") / "llama"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    (d / "tokenizer.json").write_text(_byte_tokenizer_json())
    return str(d), model


# ------------------------------------------------------------------ windows

def test_windows_without_overlap_skip_each_windows_first_token():
    ws = make_windows(10, 4)
    assert ws == [Window(0, 4, 1), Window(4, 8, 5), Window(8, 10, 9)]
    assert sum(w.num_scored for w in ws) == 10 - 3


def test_strided_windows_score_every_token_but_the_first_once():
    ws = make_windows(10, 4, stride=2)
    assert ws == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6), Window(6, 10, 8)]
    scored = [p for w in ws for p in range(w.score_from, w.end)]
    assert scored == list(range(1, 10))
    for n, ctx, stride in [(1000, 64, 16), (100, 7, 3), (65, 64, 1), (5, 64, 64)]:
        ws = make_windows(n, ctx, stride)
        scored = [p for w in ws for p in range(w.score_from, w.end)]
        if stride < ctx:
            assert scored == list(range(1, n))
        assert scored == sorted(set(scored))
        assert all(w.end - w.start <= ctx and w.score_from > w.start for w in ws)
        assert ws[-1].end == n
        # every scored token has at least ctx - stride tokens of context (or all before it)
        assert all(w.score_from - w.start >= min(ctx - stride, w.score_from) or w.start == 0
                   for w in ws)


def test_window_validation():
    for kwargs in [dict(num_tokens=10, context_len=1), dict(num_tokens=1, context_len=4),
                   dict(num_tokens=10, context_len=4, stride=5),
                   dict(num_tokens=10, context_len=4, stride=0)]:
        with pytest.raises(ValueError):
            make_windows(**kwargs)


# --------------------------------------------------------------- arithmetic

def test_nll_and_perplexity_arithmetic():
    logprobs = [math.log(0.5), math.log(0.25), math.log(0.125)]
    n, nll = nll_from_logprobs(logprobs)
    assert n == 3 and nll == pytest.approx(6 * math.log(2))
    r = PerplexityResult("x", n, nll, 1.0)
    assert r.mean_nll == pytest.approx(2 * math.log(2))
    assert r.perplexity == pytest.approx(4.0)  # geometric mean of 1/p: (2*4*8)^(1/3)
    assert PerplexityResult("u", 1, math.log(VOCAB), 1.0).perplexity == pytest.approx(VOCAB)
    assert math.isnan(PerplexityResult("e", 0, 0.0, 0.0).mean_nll)
    assert PerplexityResult("big", 1, 1e6, 1.0).perplexity == math.inf


def test_format_table_deltas():
    base = PerplexityResult("baseline", 100, 100 * math.log(10.0), 2.0,
                            engine={"dtype": "float32"})
    var = PerplexityResult("quantization=int4", 100, 100 * math.log(11.0), 1.0,
                           engine={"dtype": "float32", "quantization": "int4"})
    lines = format_table([base, var]).splitlines()
    assert len(lines) == 3 and lines[0].split()[0] == "config"
    assert lines[1].split() == ["baseline", "float32", "float", "100", "2.3026", "10.000",
                                "+0.000", "+0.00%", "2.0"]
    assert lines[2].split() == ["quantization=int4", "float32", "int4", "100", "2.3979",
                                "11.000", "+1.000", "+10.00%", "1.0"]


# ---------------------------------------------------------------- overrides

def test_parse_overrides_converts_to_field_types():
    got = parse_overrides("dtype=bfloat16, max_num_seqs=8,enable_prefix_caching=false,"
                          "gpu_memory_utilization=0.5,kv_cache_memory=2GiB,max-model-len=none")
    assert got == {"dtype": "bfloat16", "max_num_seqs": 8, "enable_prefix_caching": False,
                   "gpu_memory_utilization": 0.5, "kv_cache_memory": "2GiB",
                   "max_model_len": None}
    assert parse_overrides("kv_cache_memory=1048576") == {"kv_cache_memory": 1048576}
    assert parse_overrides("block_size=32")["block_size"] == 32


def test_parse_overrides_errors():
    with pytest.raises(ValueError, match="valid fields: .*dtype"):
        parse_overrides("not_a_field=1")
    for bad in ("dtype", "=x", "", "block_size=abc", "enable_prefix_caching=maybe"):
        with pytest.raises(ValueError):
            parse_overrides(bad)


def test_overrides_accept_every_engine_field():
    # Fields added to EngineArgs later (quantization, ...) pass through with no code here.
    for f in dataclasses.fields(EngineArgs):
        default = "none" if f.default is None else str(f.default)
        assert parse_overrides(f"{f.name}={default}") == {f.name: f.default}


def test_bundled_text_is_shipped_and_headerless():
    text = load_text()
    assert text.startswith("In Congress, July 4, 1776.")
    assert "#" not in text.splitlines()[0]
    assert 15_000 < len(text) < 40_000
    assert os.path.isfile(ppl.bundled_text_path())


# ---------------------------------------------- through the engine, vs HF

def _hf_window_logprobs(model, ids: list[int], windows: list[Window]) -> list[float]:
    out: list[float] = []
    with torch.inference_mode():
        for w in windows:
            logits = model(torch.tensor([ids[w.start:w.end]])).logits[0].float()
            lp = torch.log_softmax(logits, dim=-1)
            out.extend(lp[p - w.start - 1, ids[p]].item() for p in range(w.score_from, w.end))
    return out


@pytest.mark.parametrize("stride", [None, 24])
def test_engine_logprobs_equal_hf(tiny, stride):
    path, hf = tiny
    rng = random.Random(0)
    ids = [rng.randrange(VOCAB) for _ in range(300)]
    windows = make_windows(len(ids), 64, stride)
    # A small token budget forces chunked prefill of the windows, batched together.
    llm = LLM(path, num_threads=1, max_num_batched_tokens=100)
    ours = ppl.score_windows(llm, ids, windows)
    ref = _hf_window_logprobs(hf, ids, windows)
    assert len(ours) == len(ref) == sum(w.num_scored for w in windows)
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 1e-4
    result = ppl.perplexity(llm, ids, 64, stride)
    n, nll = nll_from_logprobs(ref)
    assert result.num_tokens == n
    assert result.nll_sum == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / n), rel=1e-4)
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_context_len_must_fit_the_model(tiny):
    path, _ = tiny
    llm = LLM(path, num_threads=1)
    with pytest.raises(ValueError, match="max_model_len"):
        ppl.perplexity(llm, list(range(600)), context_len=512)


def test_cli_compare_table(tiny, tmp_path, capsys):
    path, _ = tiny
    out = tmp_path / "ppl.json"
    rc = cli.main(["eval", "ppl", "--model", path, "--num-threads", "1", "--context-len", "64",
                   "--num-tokens", "300", "--compare", "dtype=bfloat16",
                   "--result-json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    table = text[text.index("config"):].strip().splitlines()
    assert len(table) == 3
    assert table[0].split() == ["config", "dtype", "weights", "tokens", "NLL", "PPL", "dPPL",
                                "dPPL", "%", "time", "s"]
    base, var = table[1].split(), table[2].split()
    assert base[:3] == ["baseline", "float32", "float"]
    assert var[:3] == ["dtype=bfloat16", "bfloat16", "float"]
    assert base[3] == var[3] == str(300 - math.ceil(300 / 64))
    assert base[6:8] == ["+0.000", "+0.00%"]
    data = json.loads(out.read_text())
    assert [r["label"] for r in data["results"]] == ["baseline", "dtype=bfloat16"]
    assert data["results"][1]["overrides"] == {"dtype": "bfloat16"}
    ppls = [r["perplexity"] for r in data["results"]]
    assert all(math.isfinite(p) and p > 1 for p in ppls)
    # bf16 moves the perplexity a little, not a lot, on the same tokens.
    assert abs(ppls[1] - ppls[0]) / ppls[0] < 0.05


def test_cli_unknown_override_fails_before_loading(capsys):
    rc = cli.main(["eval", "ppl", "--compare", "dtpye=bfloat16"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown engine argument 'dtpye'" in err and "dtype" in err


# -------------------------------------------------------------- real model

@pytest.mark.slow
def test_smollm2_perplexity_is_sane(capsys):
    from tokenmill.model.loader import default_model_path

    try:
        default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    rc = cli.main(["eval", "ppl", "--num-tokens", "400", "--context-len", "200",
                   "--num-threads", "2"])
    assert rc == 0
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert row[0] == "baseline"
    value = float(row[4])
    assert math.isfinite(value) and 1.0 < value < 100.0
