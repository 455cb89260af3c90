"""The in-process engine: add requests, call ``step()``, get output deltas.

``LLMEngine`` runs the same :class:`~tokenmill.engine.core.EngineCore` that the
HTTP server runs in its own process, here in the caller's process, with the
tokenizer and the :class:`~tokenmill.engine.output_processor.OutputProcessor`
beside it. The offline ``LLM`` API and the ``generate``/``chat`` commands use
it; there is no inter-process hop.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from typing import Any

from tokenmill.engine.args import EngineArgs
from tokenmill.engine.builder import BuiltEngine, build_engine
from tokenmill.engine.errors import RequestFailed
from tokenmill.engine.messages import EngineCoreRequest
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.validation import validate_request
from tokenmill.outputs import EngineStats, RequestOutput
from tokenmill.sampling import SamplingParams


class LLMEngine:
    """Continuous-batching inference engine over a paged KV cache, in this process."""

    def __init__(self, args: EngineArgs | BuiltEngine):
        built = args if isinstance(args, BuiltEngine) else build_engine(args)
        self.args = args if isinstance(args, EngineArgs) else None
        self.core = built.core
        self.info = built.info
        self.config = built.config
        self.model_config = built.model_config
        self.tokenizer = built.tokenizer
        self.model_path = built.model_path
        self.gguf_file = built.gguf_file
        self.processor = OutputProcessor(self.tokenizer)
        # With tensor parallelism the executor owns worker processes: stop them when this
        # engine is collected or the interpreter exits.
        self._finalizer = weakref.finalize(self, self.core.shutdown)

    def shutdown(self) -> None:
        """Stop what the engine started (tensor-parallel worker processes, the KV offload
        writer after its queued writes). Idempotent."""
        self._finalizer()

    @classmethod
    def from_engine_args(cls, **kwargs: Any) -> LLMEngine:
        return cls(EngineArgs.from_kwargs(**kwargs))

    @property
    def model_name(self) -> str:
        return self.info.model_name

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    # --------------------------------------------------------------- requests
    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request. Raises ``RequestRejected`` if it can never be served."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids, not text")
            text: str | None = prompt
            token_ids = self.tokenizer.encode(prompt)
        else:
            text = None
            token_ids = [int(t) for t in prompt]
        params = validate_request(self.info.limits, token_ids, params)
        if params.structured_outputs is not None:
            from tokenmill.sampling.grammar import check_structured_outputs

            # An invalid schema fails here, naming the field, rather than in the core.
            check_structured_outputs(params.structured_outputs)
        if request_id in self.processor:
            raise ValueError(f"request id {request_id!r} is already in use")
        now = time.time() if arrival_time is None else arrival_time
        self.core.add_request(EngineCoreRequest(request_id, token_ids, params, now, priority))
        self.processor.add_request(request_id, text, token_ids, params, now)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request wherever it is; frees all its blocks. Unknown ids are ignored."""
        known = request_id in self.processor
        self.processor.abort_request(request_id)
        return self.core.abort_request(request_id) or known

    def has_unfinished_requests(self) -> bool:
        return len(self.processor) > 0

    @property
    def num_requests(self) -> int:
        return len(self.processor)

    # ------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one step; return what is new for each request it touched."""
        processed = self.processor.process(self.core.step())
        for abort in processed.aborts:
            self.core.abort_request(abort.request_id, abort.index)
        if processed.errors:
            rid, error = next(iter(processed.errors.items()))
            raise RequestFailed(f"request {rid} failed: {error}")
        return processed.request_outputs

    def stats(self) -> EngineStats:
        return self.core.stats()
