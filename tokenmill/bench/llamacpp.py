"""llama.cpp as a peer in ``tokenmill bench offline``.

Two comparisons, both on the same GGUF file:

* ``llama-bench`` (``--llama-bench PATH``): llama.cpp's own micro-benchmark of
  prompt processing (``ppP``: one prompt of P tokens) and text generation
  (``tgN``: N tokens, one at a time, batch 1). tokenmill runs the same two
  tests through its engine in the same invocation and the table shows both
  rates and their ratio.
* ``llama-server`` (``--llama-server URL``): the offline throughput workload
  (same token-id prompts, same output lengths, EOS ignored) sent to a running
  llama.cpp server through its native ``/completion`` endpoint, so its row sits
  in the same table as tokenmill and HF transformers.

Request fields for llama-server were checked in its sources
(``tools/server/server-schema.cpp``, ``server-common.cpp``, ``server-task.cpp``
of the llama.cpp vendored in llama-cpp-python 0.3.36): ``prompt`` may be a list
of token ids (used as is, no BOS added); ``n_predict`` (alias ``max_tokens``);
``ignore_eos``; ``cache_prompt`` (default true); ``temperature`` (<= 0 is
greedy). The non-streamed reply carries ``tokens_predicted`` and
``tokens_evaluated``. ``GET /props`` reports ``total_slots`` and ``model_path``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# ----------------------------------------------------------------- llama-bench


@dataclass
class LlamaBenchTest:
    """One test of a ``llama-bench -o json`` run (a pp or a tg test)."""

    n_prompt: int
    n_gen: int
    n_depth: int
    n_threads: int
    avg_ts: float  # llama-bench's mean tokens/s over the repetitions
    stddev_ts: float
    samples_ts: list[float]  # tokens/s of each repetition
    model_type: str = ""
    build_commit: str = ""
    cpu_info: str = ""

    @property
    def name(self) -> str:
        """llama-bench's own label: pp512, tg128, pp512+tg128, with "@ dD" for a depth."""
        if self.n_gen == 0:
            name = f"pp{self.n_prompt}"
        elif self.n_prompt == 0:
            name = f"tg{self.n_gen}"
        else:
            name = f"pp{self.n_prompt}+tg{self.n_gen}"
        return f"{name} @ d{self.n_depth}" if self.n_depth else name

    @property
    def median_ts(self) -> float:
        """Median tokens/s over the repetitions (what tokenmill reports too)."""
        return statistics.median(self.samples_ts) if self.samples_ts else self.avg_ts


def parse_llama_bench_json(text: str) -> list[LlamaBenchTest]:
    """Tests from the stdout of ``llama-bench -o json`` (a JSON array of objects).

    Anything printed before the array (a stray log line) is skipped.
    """
    start = text.find("[")
    if start < 0:
        raise ValueError("no JSON array in the llama-bench output")
    data = json.loads(text[start:])
    if not isinstance(data, list):
        raise ValueError("llama-bench JSON output is not an array")
    tests = []
    for item in data:
        try:
            tests.append(LlamaBenchTest(
                n_prompt=int(item["n_prompt"]), n_gen=int(item["n_gen"]),
                n_depth=int(item.get("n_depth", 0)), n_threads=int(item.get("n_threads", 0)),
                avg_ts=float(item["avg_ts"]), stddev_ts=float(item.get("stddev_ts", 0.0)),
                samples_ts=[float(x) for x in item.get("samples_ts", [])],
                model_type=str(item.get("model_type", "")),
                build_commit=str(item.get("build_commit", "")),
                cpu_info=str(item.get("cpu_info", "")),
            ))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"unexpected llama-bench test entry: {exc!r}") from exc
    return tests


def llama_bench_command(binary: str, gguf: str, n_prompt: int, n_gen: int, threads: int,
                        reps: int) -> list[str]:
    """The ``llama-bench`` command line for one pp and one tg test."""
    return [binary, "-m", gguf, "-p", str(n_prompt), "-n", str(n_gen), "-t", str(threads),
            "-r", str(reps), "-o", "json"]


def run_llama_bench(binary: str, gguf: str, n_prompt: int, n_gen: int, threads: int,
                    reps: int, timeout: float | None = None) -> list[LlamaBenchTest]:
    """Run llama-bench and parse its tests; raise RuntimeError with its stderr on failure."""
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        raise FileNotFoundError(f"llama-bench not found or not executable: {binary}")
    cmd = llama_bench_command(binary, gguf, n_prompt, n_gen, threads, reps)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"llama-bench exited with {proc.returncode}:\n{tail}")
    return parse_llama_bench_json(proc.stdout)


# ---------------------------------------------- tokenmill's pp and tg tests


@dataclass
class TokenmillMicroTest:
    """tokenmill's counterpart of one llama-bench test: tokens/s per repetition."""

    n_prompt: int
    n_gen: int
    samples_ts: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"pp{self.n_prompt}" if self.n_gen == 0 else f"tg{self.n_gen}"

    @property
    def median_ts(self) -> float:
        return statistics.median(self.samples_ts)


def _timed_request(engine: Any, request_id: str, prompt: list[int],
                   max_tokens: int) -> tuple[float, float, float, int]:
    """Run one request alone; (send, first token, last token) perf_counter times, tokens."""
    from tokenmill.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t_send = time.perf_counter()
    engine.add_request(request_id, prompt, params)
    t_first = t_last = None
    produced = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            if out.request_id != request_id:
                continue
            n = sum(len(c.token_ids) for c in out.outputs)  # new tokens (a delta)
            if n and t_first is None:
                t_first = now
            if n:
                produced, t_last = produced + n, now
    if t_first is None or t_last is None:
        raise RuntimeError(f"request {request_id} produced no token")
    return t_send, t_first, t_last, produced


def run_tokenmill_micro(engine: Any, n_prompt: int, n_gen: int, reps: int,
                        seed: int = 0, warmup: bool = True) -> list[TokenmillMicroTest]:
    """tokenmill's pp and tg tests, one request at a time on an otherwise idle engine.

    * ``ppP``: a fresh prompt of P random token ids (no prefix-cache hit possible),
      one output token; rate = P / time to first token (the whole prefill).
    * ``tgN``: a one-token prompt, N + 1 output tokens, EOS ignored; rate = N /
      (last token time - first token time), i.e. N batch-1 decode steps without the
      prefill — like llama-bench's tg, which decodes N tokens from an empty context.

    A test with P or N of 0 is skipped. Like llama-bench, one untimed warm-up of each
    test runs first.
    """
    vocab = engine.model_config.vocab_size
    rng = random.Random(seed)
    low = min(100, vocab - 1)  # the first ids are special tokens in most vocabularies

    def prompt(n: int) -> list[int]:
        return [rng.randint(low, vocab - 1) for _ in range(n)]

    tests: list[TokenmillMicroTest] = []
    counter = iter(range(10**9))
    if n_prompt > 0:
        pp = TokenmillMicroTest(n_prompt, 0)
        for rep in range(reps + int(warmup)):
            t_send, t_first, _, _ = _timed_request(
                engine, f"micro-pp-{next(counter)}", prompt(n_prompt), 1)
            if rep >= int(warmup):
                pp.samples_ts.append(n_prompt / (t_first - t_send))
        tests.append(pp)
    if n_gen > 0:
        tg = TokenmillMicroTest(0, n_gen)
        for rep in range(reps + int(warmup)):
            _, t_first, t_last, produced = _timed_request(
                engine, f"micro-tg-{next(counter)}", prompt(1), n_gen + 1)
            if rep >= int(warmup):
                tg.samples_ts.append((produced - 1) / (t_last - t_first))
        tests.append(tg)
    return tests


@dataclass
class MicroRow:
    """One row of the side-by-side table."""

    test: str
    llama_cpp_ts: float | None
    tokenmill_ts: float | None

    @property
    def ratio(self) -> float | None:
        """tokenmill tok/s divided by llama.cpp tok/s (> 1 = tokenmill faster)."""
        if not self.llama_cpp_ts or self.tokenmill_ts is None:
            return None
        return self.tokenmill_ts / self.llama_cpp_ts


def pair_micro_results(llama: Sequence[LlamaBenchTest],
                       ours: Sequence[TokenmillMicroTest]) -> list[MicroRow]:
    """Match tests by name (pp512 with pp512, tg128 with tg128), llama-bench order first."""
    mine = {t.name: t for t in ours}
    rows = []
    for t in llama:
        m = mine.pop(t.name, None)
        rows.append(MicroRow(t.name, t.median_ts, m.median_ts if m else None))
    rows.extend(MicroRow(name, None, m.median_ts) for name, m in mine.items())
    return rows


def format_micro_table(rows: Sequence[MicroRow]) -> str:
    """``test | llama.cpp tok/s | tokenmill tok/s | tokenmill/llama.cpp``; medians."""

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:,.1f}"

    lines = [f"{'test':<12}{'llama.cpp tok/s':>17}{'tokenmill tok/s':>17}"
             f"{'tokenmill/llama.cpp':>21}"]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(f"{r.test:<12}{num(r.llama_cpp_ts):>17}{num(r.tokenmill_ts):>17}"
                     f"{ratio:>21}")
    return "\n".join(lines)


# ------------------------------------------------------------- llama-server


def completion_body(prompt: Sequence[int], n_predict: int) -> dict[str, Any]:
    """The native ``/completion`` request for one workload prompt.

    ``cache_prompt: false`` so a repeated run cannot reuse a slot's KV cache;
    ``ignore_eos`` so exactly ``n_predict`` tokens are generated; temperature 0 is greedy.
    """
    return {"prompt": list(prompt), "n_predict": int(n_predict), "ignore_eos": True,
            "cache_prompt": False, "temperature": 0.0, "stream": False}


@dataclass
class ServerRun:
    """What the llama-server run measured (token counts from the server's replies)."""

    seconds: float
    requests: int
    prompt_tokens: int
    output_tokens: int
    concurrency: int
    total_slots: int | None = None
    model_path: str | None = None


async def _server_props(client: Any, url: str) -> dict[str, Any]:
    try:
        r = await client.get(f"{url}/props")
        return r.json() if r.status_code == 200 else {}
    except Exception:  # /props is informative only: an old or proxied server may lack it
        return {}


async def _post_completion(client: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await client.post(f"{url}/completion", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"llama-server answered {r.status_code}: {r.text[:300]}")
    data = r.json()
    if "tokens_predicted" not in data:
        raise RuntimeError(f"unexpected llama-server reply (no tokens_predicted): "
                           f"{str(data)[:300]}")
    return data


async def _run_server(url: str, prompts: Sequence[Sequence[int]], output_lens: Sequence[int],
                      concurrency: int | None, timeout: float, warmup: bool) -> ServerRun:
    import httpx

    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]  # the native endpoint lives at the root
    limit = max(1, min(concurrency or len(prompts), len(prompts)))
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        props = await _server_props(client, url)
        if warmup:
            await _post_completion(client, url, completion_body(prompts[0][:16], 4))
        sem = asyncio.Semaphore(limit)

        async def one(prompt: Sequence[int], n: int) -> dict[str, Any]:
            async with sem:
                return await _post_completion(client, url, completion_body(prompt, n))

        t0 = time.perf_counter()
        replies = await asyncio.gather(*(one(p, n) for p, n in zip(prompts, output_lens)))
        seconds = time.perf_counter() - t0
    slots = props.get("total_slots")
    return ServerRun(
        seconds=seconds, requests=len(replies),
        prompt_tokens=sum(int(r.get("tokens_evaluated", 0)) for r in replies),
        output_tokens=sum(int(r["tokens_predicted"]) for r in replies),
        concurrency=limit, total_slots=int(slots) if isinstance(slots, int) else None,
        model_path=props.get("model_path"),
    )


def run_llama_server(url: str, prompts: Sequence[Sequence[int]], output_lens: Sequence[int],
                     concurrency: int | None = None, timeout: float = 3600.0,
                     warmup: bool = True) -> ServerRun:
    """Send every prompt to llama-server's ``/completion``, at most ``concurrency`` at once.

    ``concurrency=None`` sends all requests at once, like the offline engine gets them;
    the server then batches over its ``--parallel`` slots and queues the rest. The clock
    runs from the first request to the last reply; an untimed warm-up request goes first.
    """
    if len(prompts) != len(output_lens) or not prompts:
        raise ValueError("need one output length per prompt and at least one prompt")
    return asyncio.run(_run_server(url, prompts, output_lens, concurrency, timeout, warmup))
