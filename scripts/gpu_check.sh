#!/usr/bin/env bash
# One command for a GPU machine (one H100/H200, ~8 minutes at most): what a CPU
# cannot check about the GPU path, with every result written under $OUT.
#
#   OUT=/some/dir scripts/gpu_check.sh          # from a checkout; no install needed
#
# Runs with the machine's own Python as it is (torch + CUDA, triton, transformers,
# pytest, optionally pytest-xdist; no package index, nothing installed): the
# checkout is put on PYTHONPATH. Nothing it runs imports gguf, fastapi, uvicorn,
# redis, openai, msgpack, zmq or xgrammar (tests/test_gpu_check_imports.py).
#
# Phases, each under its own time limit (seconds), each logged to $OUT/<phase>.log:
#   env      versions, the GPU (nvidia-smi)
#   tests    Triton kernels and backend, the engine on Triton with CUDA graphs,
#            graph padding, padded-replay agreement, the benchmark's helpers
#            (pytest, JUnit XML in $OUT/pytest.xml)
#   graphs   CUDA-graph (async scheduling and one step at a time) vs eager-Triton
#            vs eager-torch greedy tokens, float32, padded buckets and long
#            contexts ($OUT/graph_agreement.json)
#   bench    benchmarks/gpu.py with bounded HF phases and 128 offline prompts
#            ($OUT/gpu_bench.json; its table is printed last, and still printed,
#            with what finished, if the time limit hits). The full benchmark is
#            `PYTHONPATH=. python3 benchmarks/gpu.py` (up to ten minutes on its own).
# $OUT/summary.txt lists each phase's exit status and time. Exit status: 0 when
# every phase passed.
set -u
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the real GPU kernels, not the interpreter

# Test files of the "tests" phase (tests/test_gpu_check_imports.py reads this line).
GPU_TESTS="tests/test_triton_kernels.py tests/test_triton_backend.py tests/test_triton_compile.py tests/test_triton_engine.py tests/test_cuda_graph_padding.py tests/test_cuda_graph_replay.py tests/test_bench_gpu.py"

# Time limits (override with LIMIT_*=seconds): 20 + 140 + 70 + 190 = 420 s, 480 s
# (8 minutes) with every SIGKILL grace.
LIMIT_ENV=${LIMIT_ENV:-20}
LIMIT_TESTS=${LIMIT_TESTS:-140}
LIMIT_GRAPHS=${LIMIT_GRAPHS:-70}
LIMIT_BENCH=${LIMIT_BENCH:-190}

status=0
: > "$OUT/summary.txt"

phase() {  # phase NAME LIMIT COMMAND... : run with a time limit, log, record
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
    local t0=$SECONDS
    # SIGINT first (Python reports what it has), SIGKILL 15 s later.
    timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local verdict=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 130 ] || [ "$rc" -eq 137 ]; then
        verdict="TIME LIMIT"
    elif [ "$rc" -ne 0 ]; then
        verdict=FAILED
    fi
    [ "$rc" -eq 0 ] || status=1
    echo "   $name: $verdict (rc $rc, $((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.log"
}

phase env "$LIMIT_ENV" bash -c "nvidia-smi; $PY -c 'import sys, torch, triton, transformers
print(sys.version)
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__,
      \"transformers\", transformers.__version__)
print(torch.cuda.get_device_name(0), torch.cuda.mem_get_info())'"

XDIST=()
if $PY -c "import xdist" 2>/dev/null; then
    XDIST=(-n 4)  # Triton compiles on the host: spread it over a few workers
fi
# shellcheck disable=SC2086  # GPU_TESTS is a list of paths without spaces
phase tests "$LIMIT_TESTS" "$PY" -m pytest -q -rs -p no:cacheprovider "${XDIST[@]}" \
    --junitxml="$OUT/pytest.xml" $GPU_TESTS

phase graphs "$LIMIT_GRAPHS" "$PY" benchmarks/graph_agreement.py --out "$OUT"

phase bench "$LIMIT_BENCH" "$PY" benchmarks/gpu.py --budget-seconds 175 \
    --reserve-seconds 20 --hf-seconds 30 --num-prompts 128 \
    --json "$OUT/gpu_bench.json"

echo "== summary ($OUT/summary.txt)"
cat "$OUT/summary.txt"
exit "$status"
