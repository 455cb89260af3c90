"""Batched token sampling: one call per engine step for every row that needs a token.

Pipeline per row (each stage is skipped when no row in the batch uses it):

0. constraints: ``logit_bias`` is added, then tokens the row's grammar
   forbids (its packed bitmask, see :mod:`tokenmill.sampling.grammar`) get
   -inf; what follows, logprobs included, sees this constrained distribution;
1. penalties on the logits: repetition (HF, over prompt + output), then
   frequency and presence (OpenAI, over output tokens);
2. ``min_tokens``: EOS and ``stop_token_ids`` get -inf while the output is
   shorter than ``min_tokens`` (unless the grammar allows nothing else: a
   complete JSON value must be allowed to end);
3. greedy rows take the argmax; random rows go through temperature, top-k,
   top-p and min-p and are then sampled.

Every filter becomes a per-row *logit cutoff*; tokens below it are masked.
Because the cutoff is a value, ties at the boundary are kept and a row's
result never depends on the other rows of the batch.

Sampling uses the exponential race (the Gumbel-max trick):
``argmax(logits / T - log(q))`` with ``q ~ Exp(1)`` per token picks token
*i* with probability ``softmax(logits / T)[i]``, without normalising. We
compute the equivalent ``argmax(logits - T * log(q))``, which needs no
scaled copy of the logits. A seeded row draws its ``q`` from its own
generator only, so the same seed gives the same tokens whatever else shares
the batch (bit-exact on CPU; on GPU the top-p mass sums are reductions whose
rounding may depend on the batch shape, which matters only for a token lying
exactly on the top-p boundary). Unseeded rows share the sampler's default
generator.

Reported logprobs are the log-softmax of the constrained logits (after
``logit_bias`` and the grammar mask, before penalties, temperature and
filters); without constraints that is the raw logits, as vLLM reports them
by default.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmill.kernels import cpu as cpu_kernels
from tokenmill.outputs import TokenLogprob
from tokenmill.sampling.params import SamplingParams

# top-p first looks for its nucleus among this many best tokens (a partial
# top-k is ~10x cheaper than a full sort on CPU); rows whose nucleus is wider
# fall back to a full sort.
TOP_P_PREFIX = 1024

_NEG_INF = float("-inf")


@dataclass
class SamplingBatch:
    """Everything the sampler needs about the rows sampled in one step (one row each)."""

    params: list[SamplingParams]
    prompt_token_ids: list[list[int]]  # repetition penalty looks at prompt + output
    output_token_ids: list[list[int]]  # generated so far; frequency/presence count these
    generators: list[torch.Generator | None]  # per-request generator when seeded, else None
    eos_token_ids: tuple[int, ...] = ()  # masked (with stop_token_ids) below min_tokens
    # Grammar constraints: a packed bitmask [rows, ceil(V / 32)] int32 (bit set =
    # allowed) whose rows pair with params; only the rows listed in bitmask_rows
    # are applied (the others may hold anything).
    token_bitmask: torch.Tensor | None = None
    bitmask_rows: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        rows = len(self.params)
        for name in ("prompt_token_ids", "output_token_ids", "generators"):
            if len(getattr(self, name)) != rows:
                raise ValueError(
                    f"SamplingBatch.{name} has {len(getattr(self, name))} rows, "
                    f"params has {rows}"
                )
        if self.bitmask_rows and (self.token_bitmask is None
                                  or self.token_bitmask.shape[0] != rows):
            raise ValueError("SamplingBatch.token_bitmask must have one row per params row")


@dataclass
class SamplerOutput:
    """One sampled token per row, and its logprob entry when the row asked for logprobs."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for a seeded request, on the device where logits live.

    Any Python int is accepted; it is reduced modulo 2**64 as torch requires.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % (1 << 64))
    return generator


class Sampler:
    """Picks the next token for every row of a batch of logits."""

    def __init__(self, default_generator: torch.Generator | None = None) -> None:
        # None means torch's global RNG for the logits' device.
        self.default_generator = default_generator

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Sample one token per row of ``logits`` ``[B, V]``; row *i* follows ``batch.params[i]``.

        ``logits`` is not modified. A seeded row's generator advances by one
        draw of ``V`` uniforms per sampled token; greedy rows draw nothing.
        """
        _check_rows(logits, batch)
        num_rows = logits.shape[0]
        if num_rows == 0:
            return SamplerOutput(token_ids=[], logprobs=[])
        # Never modified in place afterwards: logprobs read it at the end.
        raw = constrained_logits(logits.float(), batch)
        params = batch.params
        token_ids = self._pick(raw, batch)

        logprobs: list[TokenLogprob | None] = [None] * num_rows
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if logprob_rows:
            if len(logprob_rows) == num_rows:
                rows_raw, rows_tokens = raw, token_ids
            else:
                index = device_tensor(logprob_rows, device=raw.device)
                rows_raw, rows_tokens = raw[index], token_ids[index]
            entries = _logprob_entries(
                rows_raw, rows_tokens, [params[i].logprobs for i in logprob_rows]
            )
            for row, entry in zip(logprob_rows, entries, strict=True):
                logprobs[row] = entry
        return SamplerOutput(token_ids=token_ids.tolist(), logprobs=logprobs)

    def sample_tokens(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The tokens :meth:`__call__` picks, as an int64 tensor on the logits' device.

        Nothing waits for the device: async scheduling copies the result to the
        host while the next step runs. No logprobs are computed.
        """
        _check_rows(logits, batch)
        if logits.shape[0] == 0:
            return torch.empty(0, dtype=torch.long, device=logits.device)
        return self._pick(constrained_logits(logits.float(), batch), batch)

    def _pick(self, raw: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Penalties, ``min_tokens``, then argmax or a random draw per row of ``raw``."""
        params = batch.params
        x = _penalised_logits(raw, batch)
        x = _mask_below_min_tokens(x, raw, batch)
        greedy_rows = [i for i, p in enumerate(params) if p.is_greedy]
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if not random_rows:
            return x.argmax(dim=-1)
        if not greedy_rows:
            return self._sample_random(x, params, batch.generators)
        token_ids = torch.empty(len(params), dtype=torch.long, device=x.device)
        greedy_index = device_tensor(greedy_rows, device=x.device)
        random_index = device_tensor(random_rows, device=x.device)
        token_ids[greedy_index] = x[greedy_index].argmax(dim=-1)
        token_ids[random_index] = self._sample_random(
            x[random_index],
            [params[i] for i in random_rows],
            [batch.generators[i] for i in random_rows],
        )
        return token_ids

    def greedy(self, logits: torch.Tensor) -> list[int]:
        """The argmax of each row of ``logits`` ``[B, V]``.

        What :meth:`__call__` returns for rows that use no option beyond greedy
        decoding (no logit bias, grammar, penalties, ``min_tokens`` or logprobs),
        without building a :class:`SamplingBatch`.
        """
        return argmax_rows(logits.float()).tolist()

    def _sample_random(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        """Top-k/top-p/min-p filtering and one exponential-race draw per row."""
        temperatures = [p.temperature for p in params]
        cutoffs = filter_cutoffs(
            logits,
            temperatures=temperatures,
            top_k=[p.top_k for p in params],
            top_p=[p.top_p for p in params],
            min_p=[p.min_p for p in params],
        )
        scores = exponential_race_scores(
            logits, temperatures, generators, self.default_generator
        )
        if cutoffs is not None:
            scores.masked_fill_(logits < cutoffs.unsqueeze(1), _NEG_INF)
        return scores.argmax(dim=-1)


def _check_rows(logits: torch.Tensor, batch: SamplingBatch) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(batch.params):
        raise ValueError(
            f"logits must be [B, V] with B = {len(batch.params)} rows, "
            f"got shape {tuple(logits.shape)}"
        )


def probability_rows(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The distribution ``[R, V]`` the sampler draws each row's token from.

    The same processing as :class:`Sampler`: penalties, the ``min_tokens``
    mask, then ``softmax(logits / T)`` restricted to the tokens that survive
    top-k/top-p/min-p and renormalised. Greedy rows are one-hot at their
    argmax. Speculative decoding verifies draft tokens against these rows.
    """
    if logits.dim() != 2 or logits.shape[0] != len(batch.params):
        raise ValueError(
            f"logits must be [B, V] with B = {len(batch.params)} rows, "
            f"got shape {tuple(logits.shape)}"
        )
    raw = constrained_logits(logits.float(), batch)
    x = _penalised_logits(raw, batch)
    x = _mask_below_min_tokens(x, raw, batch)
    probs = torch.zeros_like(x)
    params = batch.params
    greedy_rows = [i for i, p in enumerate(params) if p.is_greedy]
    random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if greedy_rows:
        index = device_tensor(greedy_rows, device=x.device)
        probs[index, x[index].argmax(dim=-1)] = 1.0
    if random_rows:
        index = device_tensor(random_rows, device=x.device)
        rows = x[index]
        chosen = [params[i] for i in random_rows]
        temperatures = [p.temperature for p in chosen]
        cutoffs = filter_cutoffs(
            rows,
            temperatures=temperatures,
            top_k=[p.top_k for p in chosen],
            top_p=[p.top_p for p in chosen],
            min_p=[p.min_p for p in chosen],
        )
        scaled = rows / _vector(temperatures, rows).unsqueeze(1)
        if cutoffs is not None:
            scaled = scaled.masked_fill(rows < cutoffs.unsqueeze(1), _NEG_INF)
        probs[index] = torch.softmax(scaled, dim=-1)
    return probs


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    repetition_penalties: Sequence[float],
    frequency_penalties: Sequence[float],
    presence_penalties: Sequence[float],
) -> torch.Tensor:
    """Return penalised logits ``[R, V]`` (the input is left unchanged).

    Repetition (HF ``RepetitionPenaltyLogitsProcessor``): every token that
    occurs in prompt or output has its logit divided by the penalty when
    positive and multiplied by it when negative. Then frequency and presence
    (OpenAI): ``logit -= frequency * count + presence * (count > 0)``, where
    ``count`` is how often the token occurs in the output. Ids outside the
    vocabulary are ignored.
    """
    vocab = logits.shape[1]
    result = logits.clone(memory_format=torch.contiguous_format)
    # Work on the (row, token) pairs that occur rather than on [R, V] masks:
    # a few thousand entries instead of several passes over the whole vocabulary.
    flat = result.view(-1)
    if any(r != 1.0 for r in repetition_penalties):
        prompt_pos = _flat_positions(prompt_token_ids, vocab, result.device)
        output_pos = _flat_positions(output_token_ids, vocab, result.device)
        seen = torch.unique(torch.cat([prompt_pos, output_pos]))
        penalty = _vector(repetition_penalties, result)[seen // vocab]
        values = flat[seen]
        flat[seen] = torch.where(values > 0, values / penalty, values * penalty)
    if any(f != 0.0 for f in frequency_penalties) or any(p != 0.0 for p in presence_penalties):
        output_pos = _flat_positions(output_token_ids, vocab, result.device)
        tokens, counts = torch.unique(output_pos, return_counts=True)
        rows = tokens // vocab
        flat[tokens] -= (
            _vector(frequency_penalties, result)[rows] * counts.to(result.dtype)
            + _vector(presence_penalties, result)[rows]
        )
    return result


def filter_cutoffs(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    top_k: Sequence[int],
    top_p: Sequence[float],
    min_p: Sequence[float],
) -> torch.Tensor | None:
    """Per-row logit cutoffs ``[R]`` for top-k, top-p and min-p, or None if no row filters.

    A token survives when its (unscaled) logit is >= its row's cutoff. The
    filters apply in the order top-k, top-p, min-p on ``softmax(logits / T)``:
    top-p looks at the distribution renormalised after top-k; min-p keeps
    tokens whose probability is at least ``min_p`` times the largest (the
    largest survives every filter, so that ratio does not depend on the
    earlier filters). ``top_k`` 0 disables top-k for a row. ``logits`` is not
    modified.
    """
    num_rows, vocab = logits.shape
    k_active = [0 < k < vocab for k in top_k]
    use_top_k = any(k_active)
    use_top_p = any(p < 1.0 for p in top_p)
    use_min_p = any(m > 0.0 for m in min_p)
    if not (use_top_k or use_top_p or use_min_p):
        return None
    device = logits.device
    cutoff = torch.full((num_rows,), _NEG_INF, dtype=logits.dtype, device=device)
    # Row k as a count of kept tokens: the whole vocabulary when top-k is off.
    k_kept = [k if active else vocab for k, active in zip(top_k, k_active, strict=True)]

    if use_top_k or use_top_p:
        prefix = max((k for k, a in zip(k_kept, k_active, strict=True) if a), default=1)
        if use_top_p:
            prefix = max(prefix, min(vocab, TOP_P_PREFIX))
        best = logits.topk(prefix, dim=-1).values  # sorted, best first
        row_max = best[:, 0]
    else:
        row_max = logits.max(dim=-1).values

    if use_top_k:
        k_index = device_tensor([min(k, prefix) - 1 for k in k_kept], device=device)
        kth = best.gather(1, k_index.unsqueeze(1)).squeeze(1)
        active = device_tensor(k_active, device=device)
        cutoff = torch.maximum(cutoff, kth.masked_fill(~active, _NEG_INF))

    if use_top_p:
        cutoff = torch.maximum(
            cutoff, _top_p_cutoffs(logits, best, temperatures, k_kept, top_p)
        )

    if use_min_p:
        # p_i >= min_p * p_max  <=>  x_i / T >= x_max / T + log(min_p)
        #                       <=>  x_i >= x_max + T * log(min_p)
        offsets = [
            t * math.log(m) if m > 0.0 else _NEG_INF
            for t, m in zip(temperatures, min_p, strict=True)
        ]
        cutoff = torch.maximum(cutoff, row_max + _vector(offsets, logits))
    return cutoff


def _top_p_cutoffs(
    logits: torch.Tensor,
    best: torch.Tensor,
    temperatures: Sequence[float],
    k_kept: Sequence[int],
    top_p: Sequence[float],
) -> torch.Tensor:
    """Top-p cutoffs from the ``best`` logits ``[R, K]`` (sorted, best first).

    The nucleus is the shortest prefix whose mass reaches ``top_p`` (at least
    one token). Rows whose nucleus may extend past the ``K`` known tokens are
    redone on a full sort; whether a row needs that depends on the row alone.
    """
    num_rows, vocab = logits.shape
    prefix = best.shape[1]
    device = logits.device
    temperature = _vector(temperatures, logits).unsqueeze(1)
    k = device_tensor(k_kept, device=device).unsqueeze(1)
    scaled = (best / temperature).masked_fill(
        torch.arange(prefix, device=device).unsqueeze(0) >= k, _NEG_INF
    )
    # Normalise over the top-k tokens when they all lie in the prefix, else over the row.
    in_prefix = [kk <= prefix for kk in k_kept]
    log_norm = scaled.logsumexp(dim=-1)
    if not all(in_prefix):
        outside = device_tensor([not f for f in in_prefix], device=device)
        log_norm = torch.where(outside, (logits / temperature).logsumexp(dim=-1), log_norm)
    probs = (scaled - log_norm.unsqueeze(1)).exp()
    mass = probs.cumsum(dim=-1)
    p = _vector(top_p, logits)
    keep = ((mass - probs) < p.unsqueeze(1)).sum(dim=-1).clamp(min=1, max=prefix)
    cutoff = best.gather(1, (keep - 1).unsqueeze(1)).squeeze(1)
    cutoff = cutoff.masked_fill(p >= 1.0, _NEG_INF)

    reaches = (mass[:, -1] >= p).tolist()
    redo = [
        row
        for row in range(num_rows)
        if top_p[row] < 1.0 and not in_prefix[row] and not reaches[row]
    ]
    if redo and prefix < vocab:
        index = device_tensor(redo, device=device)
        full = logits[index].sort(dim=-1, descending=True).values
        cutoff[index] = _top_p_cutoffs(
            logits[index],
            full,
            [temperatures[r] for r in redo],
            [k_kept[r] for r in redo],
            [top_p[r] for r in redo],
        )
    return cutoff


def exponential_race_scores(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    generators: Sequence[torch.Generator | None],
    default_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Scores ``[R, V]`` whose row argmax is a sample from ``softmax(logits / T)``.

    ``score = logits - T * log(q)`` with ``q = -log(u) ~ Exp(1)``. Row *i*
    draws its ``V`` uniforms from ``generators[i]``, or from
    ``default_generator`` when that is None. -inf logits stay -inf, so those
    tokens are never chosen while the row has a finite logit.
    """
    num_rows, vocab = logits.shape
    noise = torch.empty_like(logits)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == num_rows:
        noise.uniform_(generator=default_generator)
    else:
        for row, generator in enumerate(generators):
            if generator is not None:
                # A fresh contiguous tensor per row: the draw must not depend on layout.
                noise[row] = torch.empty(
                    vocab, dtype=logits.dtype, device=logits.device
                ).uniform_(generator=generator)
        if unseeded:
            index = device_tensor(unseeded, device=logits.device)
            noise[index] = torch.empty(
                len(unseeded), vocab, dtype=logits.dtype, device=logits.device
            ).uniform_(generator=default_generator)
    # In place to avoid [R, V] temporaries: u -> Exp(1) -> log. The clamp keeps a
    # u == 1 draw (possible on some devices) from producing log(0).
    noise.log_().neg_().clamp_(min=torch.finfo(noise.dtype).tiny).log_()
    if all(t == temperatures[0] for t in temperatures):
        return torch.sub(logits, noise, alpha=temperatures[0], out=noise)
    noise.mul_(_vector(temperatures, logits).unsqueeze(1))
    return torch.sub(logits, noise, out=noise)


def compute_prompt_logprobs(
    logits: torch.Tensor, target_ids: Sequence[int], k: int
) -> list[TokenLogprob]:
    """Logprob entries for prompt tokens: row *i* of ``logits`` ``[L, V]`` predicts
    ``target_ids[i]``; ``k`` alternatives per entry. The caller pairs the first
    prompt token (which has no prediction) with None.
    """
    if logits.dim() != 2 or logits.shape[0] != len(target_ids):
        raise ValueError(
            f"logits must be [L, V] with L = {len(target_ids)}, got {tuple(logits.shape)}"
        )
    if not target_ids:
        return []
    targets = device_tensor(list(target_ids), dtype=torch.long, device=logits.device)
    return _logprob_entries(logits.float(), targets, [k] * len(target_ids))


def constrained_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """``logits`` ``[R, V]`` with each row's ``logit_bias`` added and its grammar mask
    applied (a new tensor when anything applies; ``logits`` itself otherwise)."""
    bias_rows: list[int] = []
    bias_cols: list[int] = []
    bias_values: list[float] = []
    vocab = logits.shape[1]
    for row, p in enumerate(batch.params):
        if p.logit_bias:
            for token, value in p.logit_bias.items():
                if 0 <= token < vocab:
                    bias_rows.append(row)
                    bias_cols.append(token)
                    bias_values.append(value)
    masked = batch.bitmask_rows and batch.token_bitmask is not None
    if not bias_rows and not masked:
        return logits
    out = logits.clone()
    if bias_rows:
        device = out.device
        out.index_put_(
            (device_tensor(bias_rows, device=device), device_tensor(bias_cols, device=device)),
            device_tensor(bias_values, dtype=out.dtype, device=device), accumulate=True)
    if masked:
        from tokenmill.sampling.grammar import apply_bitmask

        assert batch.token_bitmask is not None
        rows = batch.bitmask_rows
        apply_bitmask(out, batch.token_bitmask,
                      None if len(rows) == out.shape[0] else rows)
    return out


def _penalised_logits(raw: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Raw logits with penalties applied to the rows that ask for any (a new tensor if so)."""
    rows = [
        i
        for i, p in enumerate(batch.params)
        if p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
    ]
    if not rows:
        return raw

    def penalise(logits: torch.Tensor, picked: Sequence[int]) -> torch.Tensor:
        chosen = [batch.params[i] for i in picked]
        return apply_penalties(
            logits,
            [batch.prompt_token_ids[i] for i in picked],
            [batch.output_token_ids[i] for i in picked],
            [p.repetition_penalty for p in chosen],
            [p.frequency_penalty for p in chosen],
            [p.presence_penalty for p in chosen],
        )

    if len(rows) == raw.shape[0]:
        return penalise(raw, rows)
    index = device_tensor(rows, device=raw.device)
    result = raw.clone()
    result[index] = penalise(raw[index], rows)
    return result


def _mask_below_min_tokens(
    x: torch.Tensor, raw: torch.Tensor, batch: SamplingBatch
) -> torch.Tensor:
    """Set EOS (unless ignore_eos) and stop_token_ids to -inf for rows below min_tokens."""
    vocab = x.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    for row, (p, output) in enumerate(zip(batch.params, batch.output_token_ids, strict=True)):
        if len(output) >= p.min_tokens:
            continue
        banned = set(p.stop_token_ids)
        if not p.ignore_eos:
            banned.update(batch.eos_token_ids)
        for token in banned:
            if 0 <= token < vocab:
                rows.append(row)
                cols.append(token)
    if not rows:
        return x
    if x is raw:
        x = x.clone()
    banned_rows = device_tensor(rows, device=x.device)
    kept = x[banned_rows, device_tensor(cols, device=x.device)].clone()
    x[banned_rows, device_tensor(cols, device=x.device)] = _NEG_INF
    constrained = set(batch.bitmask_rows)
    if constrained.intersection(rows):
        # A grammar that can only end (a complete JSON value) leaves nothing but EOS:
        # there the grammar wins over min_tokens, or the row would have no token at all.
        for row in sorted(constrained.intersection(rows)):
            if torch.isneginf(x[row]).all():
                for i, r in enumerate(rows):
                    if r == row:
                        x[row, cols[i]] = kept[i]
    return x


def _flat_positions(
    token_lists: Sequence[Sequence[int]], vocab: int, device: torch.device
) -> torch.Tensor:
    """``row * vocab + token`` for every in-vocabulary token of every row."""
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(token_lists)), lengths)
    tokens = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long)
    valid = (tokens >= 0) & (tokens < vocab)
    return (rows[valid] * vocab + tokens[valid]).to(device)


def _vector(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return device_tensor(list(values), dtype=like.dtype, device=like.device)


def device_tensor(values: Sequence[Any], dtype: torch.dtype | None = None, *,
                  device: torch.device | str) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device``; on CUDA without waiting for the device.

    A plain host-to-GPU copy from pageable memory waits for the stream, so a step
    whose sampling builds small index or parameter tensors would wait for the
    forward pass queued before it (async scheduling overlaps the two); pinned
    memory and a non-blocking copy do not.
    """
    tensor = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _logprob_entries(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: Sequence[int]
) -> list[TokenLogprob]:
    """TokenLogprob entries for chosen ids ``[R]`` under ``log_softmax(logits)`` ``[R, V]``."""
    # logprob = logit - logsumexp: avoids materialising the whole log-softmax.
    log_norm = logits.logsumexp(dim=-1)
    chosen_logit = logits.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    ranks = (logits > chosen_logit.unsqueeze(1)).sum(dim=-1) + 1
    chosen = chosen_logit - log_norm
    largest = min(max(num_top), logits.shape[1])
    if largest > 0:
        top = logits.topk(largest, dim=-1)
        top_values = (top.values - log_norm.unsqueeze(1)).tolist()
        top_ids = top.indices.tolist()
    else:
        top_values = top_ids = [[] for _ in num_top]
    entries = []
    for token, value, rank, k, ids, values in zip(
        token_ids.tolist(),
        chosen.tolist(),
        ranks.tolist(),
        num_top,
        top_ids,
        top_values,
        strict=True,
    ):
        entries.append(
            TokenLogprob(
                token_id=token,
                logprob=value,
                rank=rank,
                # Tokens a constraint forbids (-inf) are not alternatives.
                top=[(i, v) for i, v in zip(ids[:k], values[:k], strict=True) if v != _NEG_INF],
            )
        )
    return entries


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)``: on the native CPU kernel where it runs (torch's is
    single-threaded and scalar: 2.3 ms on 32 x 49,152 float32 logits on a 2-core Xeon),
    same indices."""
    if logits.device.type == "cpu":
        native = cpu_kernels.argmax_rows(logits)
        if native is not None:
            return native
    return logits.argmax(dim=-1)
