"""A scripted engine client for in-process tests of the HTTP layer: no model, no process.

``FakeEngine`` implements ``tokenmill.engine.client.EngineClient``. Every request
"generates" the tokens of a fixed reply, one token per sample per ``interval``
seconds, and its deltas go through the real ``OutputProcessor`` (so detokenization,
stop strings and finish reasons behave as with the real engine). Tests steer it:
``hold()`` keeps new requests queued (not started), ``running_limit`` caps how many
run at once, ``die()`` simulates the engine process dying.

``running_app`` serves an app built around it on a real loopback port, with the same
uvicorn settings as ``tokenmill serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from tokenmill.engine.client import RequestStream
from tokenmill.engine.errors import EngineDeadError
from tokenmill.engine.messages import EngineCoreOutput, SeqDelta
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.validation import EngineLimits, validate_request
from tokenmill.outputs import EngineStats
from tokenmill.sampling import SamplingParams
from tokenmill.server.app import build_app
from tokenmill.server.cli import uvicorn_config
from tokenmill.server.config import ServerConfig
from tokenmill.tokenizer import Tokenizer

SPECIALS = ["<|im_start|>", "<|im_end|>"]


def byte_tokenizer() -> Tokenizer:
    """One token per byte (ids 0-255), then <|im_start|> = 256 and <|im_end|> = 257 (EOS)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    return Tokenizer(backend, bos_token_id=256, eos_token_ids=[257])


@dataclasses.dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    task: asyncio.Task[None] | None = None
    started: bool = False


class FakeEngine:
    """A stand-in for ``MPEngineClient``; create it inside the server's event loop."""

    def __init__(self, reply: str = "Hello from the fake engine.", interval: float = 0.0,
                 max_model_len: int = 512, num_kv_blocks: int = 64, block_size: int = 16,
                 stop_after_reply: bool = False) -> None:
        self.tokenizer = byte_tokenizer()
        self.reply_ids = self.tokenizer.encode(reply, add_special_tokens=False)
        # True: the reply is followed by EOS (finish "stop"), like a model that is done.
        self.stop_after_reply = stop_after_reply
        self.received: list[tuple[list[int], SamplingParams]] = []  # (prompt, params) per add
        self.interval = interval
        self.limits = EngineLimits(max_model_len, self.tokenizer.vocab_size, num_kv_blocks,
                                   block_size)
        self.model_name = "fake-model"
        self.processor = OutputProcessor(self.tokenizer)
        self.requests: dict[str, _Request] = {}
        self.aborted: list[str] = []
        self.submitted: list[str] = []
        self.running_limit: int | None = None
        self.on_dead: Any = None
        self.dead = False
        self.shut_down = False
        self._gate = asyncio.Event()
        self._gate.set()
        self._steps = 0

    # ----- steering ------------------------------------------------------------------
    def hold(self) -> None:
        """New and queued requests wait (are not started) until ``release()``."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def die(self) -> None:
        """Act as if the engine process died."""
        self.dead = True
        for req in list(self.requests.values()):
            req.stream.put(EngineDeadError("the engine core process died (exit code -9)"))
            if req.task is not None:
                req.task.cancel()
        self.requests.clear()
        if self.on_dead is not None:
            self.on_dead()

    @property
    def num_running(self) -> int:
        return sum(1 for r in self.requests.values() if r.started)

    # ----- EngineClient ----------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.limits.max_model_len

    @property
    def is_running(self) -> bool:
        return not self.dead and not self.shut_down

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        return validate_request(self.limits, prompt_token_ids, params)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt_text: str | None = None, priority: int = 0) -> RequestStream:
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        params = self.validate(prompt_token_ids, params)
        self.received.append((list(prompt_token_ids), params))
        stream = RequestStream(request_id)
        self.processor.add_request(request_id, prompt_text, prompt_token_ids, params, 0.0)
        req = _Request(request_id, list(prompt_token_ids), params, stream)
        self.requests[request_id] = req
        self.submitted.append(request_id)
        req.task = asyncio.get_running_loop().create_task(self._run(req))
        return stream

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        self.aborted.append(request_id)
        self.processor.abort_request(request_id)
        if req.task is not None:
            req.task.cancel()

    def num_queued(self) -> int:
        return sum(1 for r in self.requests.values() if not r.started)

    def stats(self) -> EngineStats:
        running = self.num_running
        return EngineStats(
            num_running=running, num_waiting=self.num_queued(),
            kv_cache_usage=min(1.0, running / self.limits.num_kv_blocks),
            num_total_blocks=self.limits.num_kv_blocks,
            num_free_blocks=self.limits.num_kv_blocks - running,
            prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0,
            prompt_tokens_total=0, generation_tokens_total=0, steps_total=self._steps)

    async def shutdown(self) -> None:
        self.shut_down = True
        for req in list(self.requests.values()):
            if req.task is not None:
                req.task.cancel()

    # ----- generation ---------------------------------------------------------------------
    async def _run(self, req: _Request) -> None:
        while True:
            await self._gate.wait()
            if self.running_limit is None or self.num_running < self.running_limit:
                break
            await asyncio.sleep(0.005)
        req.started = True
        n, max_tokens = req.params.n, req.params.max_tokens or 1
        live = set(range(n))
        for step in range(max_tokens):
            await asyncio.sleep(self.interval)
            self._steps += 1
            token = self.reply_ids[step % len(self.reply_ids)]
            last = step + 1 == max_tokens
            reason = "length" if last else None
            if self.stop_after_reply and step == len(self.reply_ids):
                token, last, reason = 257, True, "stop"  # <|im_end|>
            deltas = [SeqDelta(i, [token], None, reason) for i in live]
            core_out = EngineCoreOutput(req.request_id, deltas, finished=last,
                                        first_token_time=0.0 if step == 0 else None)
            processed = self.processor.process([core_out])
            for abort in processed.aborts:  # a stop string ended this sample
                live.discard(abort.index)
            for output in processed.request_outputs:
                req.stream.put(output)
                if output.finished:
                    self.requests.pop(req.request_id, None)
                    return
        self.requests.pop(req.request_id, None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def running_app(
    config: ServerConfig, engine: FakeEngine
) -> AsyncIterator[tuple[str, Any]]:
    """Serve ``build_app(config)`` around ``engine`` on a loopback port: (base url, app)."""

    async def factory(host: Any) -> FakeEngine:
        engine.on_dead = host.engine_dead
        return engine

    app = build_app(config, engine_factory=factory)
    config = dataclasses.replace(config, port=free_port())
    server = uvicorn.Server(uvicorn_config(app, config))
    fatal = asyncio.Event()
    app.state.host.on_fatal = fatal.set
    task = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    while not app.state.host.ready and not app.state.host.load_error:
        await asyncio.sleep(0.01)
    app.state.fatal = fatal
    try:
        yield f"http://127.0.0.1:{config.port}", app
    finally:
        server.should_exit = True
        await task
