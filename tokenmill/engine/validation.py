"""Whether a request can ever be served, decided from the engine's fixed limits.

The rules depend only on :class:`EngineLimits` (known once the engine is
built), so a front end in another process can apply them before it sends a
request, and answer the client at once instead of after a queue wait. The
engine core applies the same function again on arrival.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill.engine.errors import RequestRejected
from tokenmill.sampling.params import SamplingParams


@dataclass(frozen=True)
class EngineLimits:
    """What bounds a single request: context, vocabulary and the whole KV cache."""

    max_model_len: int
    vocab_size: int
    num_kv_blocks: int
    block_size: int

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size


def validate_request(
    limits: EngineLimits, token_ids: Sequence[int], params: SamplingParams
) -> SamplingParams:
    """Check a tokenized request; return its params with ``max_tokens`` filled in.

    ``max_tokens=None`` means "up to the end of the context". Raises
    :class:`RequestRejected` with a stable ``code`` when the request can never run.
    """
    if not token_ids:
        raise RequestRejected("the prompt is empty", code="invalid_prompt", param="prompt")
    vocab = limits.vocab_size
    bad = next((t for t in token_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise RequestRejected(f"token id {bad} is out of range [0, {vocab})",
                              code="invalid_prompt", param="prompt")
    if params.logit_bias:
        bad = next((t for t in params.logit_bias if t >= vocab), None)
        if bad is not None:
            raise RequestRejected(f"logit_bias names token id {bad}, outside the vocabulary "
                                  f"[0, {vocab})", code="invalid_value", param="logit_bias")
    n_prompt = len(token_ids)
    if n_prompt >= limits.max_model_len:
        _too_long(limits, n_prompt, params.max_tokens or 1, "prompt")
    if params.max_tokens is None:
        params = params.clone(max_tokens=limits.max_model_len - n_prompt)
    max_tokens = params.max_tokens or 1
    if n_prompt + max_tokens > limits.max_model_len:
        _too_long(limits, n_prompt, max_tokens, "max_tokens")
    need = -(-(n_prompt + max_tokens) // limits.block_size)
    if need > limits.num_kv_blocks:
        raise RequestRejected(
            f"the request needs {n_prompt + max_tokens} tokens of KV cache but the whole "
            f"cache holds {limits.kv_capacity_tokens}; raise kv_cache_memory or shorten the "
            "request",
            code="kv_cache_capacity_exceeded", param="max_tokens",
            prompt_tokens=n_prompt, max_tokens=max_tokens,
        )
    return params


def _too_long(limits: EngineLimits, n_prompt: int, max_tokens: int, param: str) -> None:
    raise RequestRejected(
        f"This model's maximum context length is {limits.max_model_len} tokens. "
        f"However, you requested {n_prompt + max_tokens} tokens ({n_prompt} in the "
        f"prompt, {max_tokens} for the completion). Please reduce the prompt or "
        "max_tokens.",
        code="context_length_exceeded", param=param,
        prompt_tokens=n_prompt, max_tokens=max_tokens, max_model_len=limits.max_model_len,
    )
