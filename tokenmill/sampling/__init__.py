"""Sampling: per-request parameters (validated) and the batched sampler."""

from tokenmill.sampling.params import (
    MAX_LOGPROBS,
    MAX_N,
    InvalidParameterError,
    SamplingParams,
)
from tokenmill.sampling.sampler import (
    Sampler,
    SamplerOutput,
    SamplingBatch,
    compute_prompt_logprobs,
    make_generator,
)

__all__ = [
    "MAX_LOGPROBS",
    "MAX_N",
    "InvalidParameterError",
    "Sampler",
    "SamplerOutput",
    "SamplingBatch",
    "SamplingParams",
    "compute_prompt_logprobs",
    "make_generator",
]
