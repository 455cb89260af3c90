"""The engine: scheduling, KV-cache bookkeeping, the step loop, and its front ends.

- ``core``: :class:`EngineCore` (schedule -> execute -> sample -> update) on token ids;
- ``scheduler`` / ``block_manager`` / ``sequence``: who computes what, which KV blocks;
- ``executor``: runs the model runners, applies block copies;
- ``output_processor``: token deltas -> text, stop strings, logprobs;
- ``llm_engine``: the core in-process (offline API);
- ``core_process`` / ``client``: the core in its own process behind a typed client
  (the HTTP server);
- ``builder``: the composition root; ``messages``: what crosses the process boundary.
"""
