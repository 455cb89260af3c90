"""A real server with async scheduling (the CUDA default; forced on here, on a CPU).

Concurrent streams, stop strings (detected by the front end, which then aborts the
sample while the core already planned its next step) and clients that disconnect
mid-stream: the greedy text equals the offline engine run one step at a time, and
every KV block comes back.
"""

from __future__ import annotations

import asyncio

from server_utils import start_server, stream_then_disconnect

from tokenmill.llm import LLM
from tokenmill.sampling import SamplingParams

MODEL = "smollm2"


def test_async_scheduling_server_matches_one_step_at_a_time():
    prompts = [f"Question {i}: what is {i} times {i + 1}? Answer:" for i in range(12)]
    stop_prompts = ["List three colours, separated by commas:", "Count from one to ten:"]
    offline = LLM(max_model_len=512, kv_cache_memory="64MiB", async_scheduling=False)
    expected = [o.outputs[0].text for o in offline.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)]
    stop_expected = [o.outputs[0].text for o in offline.generate(
        stop_prompts, SamplingParams(temperature=0.0, max_tokens=40, stop=[","]),
        use_tqdm=False)]
    del offline

    server = start_server(["--max-model-len", "512", "--kv-cache-memory", "64MiB",
                           "--served-model-name", MODEL, "--async-scheduling"])
    try:
        async def stream_one(client, prompt, max_tokens, stop=None):
            text = ""
            stream = await client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                stream=True, stop=stop)
            async for chunk in stream:
                text += "".join(c.text for c in chunk.choices)
            return text

        def disconnect_one(client, i):
            return stream_then_disconnect(client, MODEL, f"Write a very long story number {i}.",
                                          chunks=3, max_tokens=300)

        async def main():
            async with server.async_openai() as client:
                return await asyncio.gather(
                    *[stream_one(client, p, 12) for p in prompts],
                    *[stream_one(client, p, 40, [","]) for p in stop_prompts],
                    *[disconnect_one(client, i) for i in range(4)],
                )

        results = asyncio.run(main())
        assert results[:12] == expected
        assert results[12:14] == stop_expected
        metrics = server.wait_idle()
        assert metrics["tokenmill_kv_cache_usage_ratio"] == 0
        assert metrics["tokenmill_num_requests_running"] == 0
        assert metrics['tokenmill_requests_finished_total{finish_reason="abort"}'] >= 4
    finally:
        server.cleanup()
