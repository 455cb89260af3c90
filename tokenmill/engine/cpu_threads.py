"""CPU thread settings of the served path: the engine core computes, the API process waits.

``tokenmill serve`` runs two processes on the same cores: the API process
(HTTP, tokenization, detokenization, streaming) and the engine core (the
forward passes, on PyTorch's OpenMP thread pool). On a small CPU they compete
for time slices, and so does a load tester on the same machine:

- The API process never runs a forward pass, so it gets one intra-op thread
  (:func:`limit_api_process_threads`): no OpenMP pool of its own that could
  spin on the compute cores.
- OpenMP workers of the engine core spin after each parallel region before
  they sleep (libgomp's default is ~300,000 spins), which keeps a batch-1
  step's ~1,000 small parallel regions cheap but can take time slices from the
  API process between steps. :func:`engine_core_environment` can set another
  spin count (``GOMP_SPINCOUNT``) for the engine core unless the user chose
  ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` themselves. libgomp reads these
  once, when it loads, so they go into the environment the core process is
  spawned with (:func:`spawn_environment`), not into the running process.
  Measured (2 cores, served int4): a short spin (1000) lost 1.06-1.21x to
  libgomp's default at 1, 8 and 32 streams, so the default is left alone.
- ``TOKENMILL_ENGINE_CPUS`` (a list such as ``0-1`` or ``1,3``) pins the engine
  core to those CPUs (:func:`pin_engine_core`); unset, the kernel schedules it.

See docs/performance.md ("Round 2") for the measurements.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping

logger = logging.getLogger(__name__)

ENGINE_CPUS_ENV = "TOKENMILL_ENGINE_CPUS"
SPIN_ENV = "TOKENMILL_ENGINE_SPINCOUNT"
# libgomp spin count for the engine core when the user set no OpenMP wait policy.
# "default" keeps libgomp's own behaviour (it beat GOMP_SPINCOUNT=1000 when served).
DEFAULT_SPINCOUNT = "default"
_USER_OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def engine_core_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """Variables to add to the engine core's environment (empty: nothing to change).

    The user's own ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` win; otherwise
    ``TOKENMILL_ENGINE_SPINCOUNT`` (a count, or ``default`` for libgomp's) or
    :data:`DEFAULT_SPINCOUNT` sets ``GOMP_SPINCOUNT``.
    """
    if any(name in environ for name in _USER_OMP_VARS):
        return {}
    spin = environ.get(SPIN_ENV, DEFAULT_SPINCOUNT).strip()
    if spin == "default":
        return {}
    if not spin.isdigit():
        raise ValueError(f"{SPIN_ENV}={spin!r}: expected a count or 'default'")
    return {"GOMP_SPINCOUNT": spin}


@contextlib.contextmanager
def spawn_environment(overrides: Mapping[str, str]) -> Iterator[None]:
    """Set ``overrides`` in ``os.environ`` for the duration (a child spawned inside
    inherits them), then restore what was there."""
    saved = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def parse_cpu_list(text: str) -> list[int]:
    """CPUs named by a list such as ``0-3,6`` (sorted, without repeats)."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"bad CPU list {text!r}: expected e.g. 0-1 or 0,2")
        first, last = int(low), int(high) if sep else int(low)
        if last < first:
            raise ValueError(f"bad CPU range {part!r} in {text!r}")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError(f"empty CPU list {text!r}")
    return sorted(cpus)


def pin_engine_core(environ: Mapping[str, str]) -> list[int] | None:
    """Pin this process to ``TOKENMILL_ENGINE_CPUS`` if set; the CPUs, or None."""
    text = environ.get(ENGINE_CPUS_ENV, "").strip()
    if not text or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = parse_cpu_list(text)
    os.sched_setaffinity(0, cpus)
    logger.info("engine core pinned to CPUs %s", cpus)
    return cpus


def limit_api_process_threads() -> None:
    """One intra-op thread for the API process: it never runs a forward pass."""
    import torch

    torch.set_num_threads(1)
