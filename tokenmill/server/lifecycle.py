"""The engine's life inside the server: loading, admission, in-flight tracking, draining.

``EngineHost`` is the one place that knows whether the server can take work:

* ``loading``  the engine core process loads the model; ``/health`` answers 503;
* ``ready``    requests are admitted while the engine's queue has room;
* ``draining`` after SIGTERM/SIGINT: new requests get 503, running ones may finish
  until the shutdown timeout, then the rest are aborted;
* ``failed``   the model could not be loaded, or the engine process died: ``/health``
  answers 503, requests in flight end with an error, the server exits non-zero.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from tokenmill.server.errors import unavailable

if TYPE_CHECKING:
    from tokenmill.outputs import EngineStats

logger = logging.getLogger("tokenmill.server")

# After aborting what the shutdown timeout left running, how long the handlers get to
# send their final error event / response before the HTTP server closes connections.
ABORT_GRACE_SECONDS = 5.0
# After the engine process died, how long handlers get to send their errors before exit.
ENGINE_DEATH_GRACE_SECONDS = 1.0


class ServerState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class Admission:
    """A request that holds a place in the server until ``release()``."""

    def __init__(self, host: EngineHost, engine_request_ids: list[str]) -> None:
        self._host = host
        self.engine_request_ids = engine_request_ids
        self._released = False
        self._submitted = False
        # Set by the request's handler: ends the request now (used when a drain times out).
        self.interrupt: Callable[[], None] | None = None

    def submitted(self) -> None:
        """Its requests reached the engine, which counts them as queued from now on."""
        if not self._submitted and not self._released:
            self._submitted = True
            self._host._pending_submission -= len(self.engine_request_ids)

    def release(self) -> None:
        if not self._released:
            self.submitted()
            self._released = True
            self._host._release(self)


class EngineHost:
    """Owns the engine object and the server's state machine."""

    def __init__(
        self,
        engine_factory: Callable[[EngineHost], Awaitable[Any]],
        on_ready: Callable[[Any], Awaitable[None]] | None = None,
    ) -> None:
        """``engine_factory(host)`` starts an engine client; ``on_ready(engine)`` runs
        once it is up, before requests are admitted."""
        self._factory = engine_factory
        self._on_ready = on_ready
        self.state = ServerState.LOADING
        self.engine: Any = None
        self.load_error: BaseException | None = None
        self.engine_died = False
        self.on_fatal: Callable[[], None] | None = None  # set by the process runner
        self._admissions: set[Admission] = set()
        self._pending_submission = 0  # admitted engine requests not handed to the engine yet
        self._idle: asyncio.Event | None = None
        self._drain_task: asyncio.Task[None] | None = None

    # ----- loading -------------------------------------------------------------------

    async def load(self) -> None:
        """Start the engine (an engine client; seconds) and become ready."""
        try:
            engine = self.engine = await self._factory(self)
            if self.state is ServerState.DRAINING:  # a signal came while loading
                return  # the lifespan's shutdown stops it
            if self._on_ready is not None:
                await self._on_ready(engine)
        except Exception as exc:  # noqa: BLE001 - any load failure is fatal for the server
            self.state = ServerState.FAILED
            self.load_error = exc
            logger.error("failed to load the engine: %s: %s", type(exc).__name__, exc,
                         exc_info=exc)
            if self.on_fatal is not None:
                self.on_fatal()
            return
        self.engine = engine
        self.state = ServerState.READY
        logger.info("engine ready: model %s, max_model_len %s",
                    getattr(engine, "model_name", "?"), getattr(engine, "max_model_len", "?"))

    def engine_dead(self) -> None:
        """The engine process died: refuse everything, then exit non-zero.

        The engine client has already failed every stream; the handlers send their
        errors during a short grace period before the server stops.
        """
        if self.state is ServerState.FAILED:
            return
        logger.error("the engine died; the server will exit")
        self.state = ServerState.FAILED
        self.engine_died = True
        self.abort_all()
        if self.on_fatal is not None:
            asyncio.get_running_loop().call_later(ENGINE_DEATH_GRACE_SECONDS, self.on_fatal)

    @property
    def ready(self) -> bool:
        return self.state is ServerState.READY

    def stats(self) -> EngineStats | None:
        if self.engine is None:
            return None
        try:
            return self.engine.stats()
        except Exception:  # noqa: BLE001 - metrics must not fail a scrape
            logger.exception("engine.stats() failed")
            return None

    # ----- admission -------------------------------------------------------------------

    def require_ready(self) -> None:
        """Raise the 503 that matches the current state unless requests are accepted."""
        if self.state is ServerState.READY:
            if getattr(self.engine, "is_running", True):
                return
            raise unavailable("The engine has stopped.", "engine_dead", 30)
        if self.state is ServerState.LOADING:
            raise unavailable("The model is still loading; retry shortly.", "model_loading", 5)
        if self.state is ServerState.DRAINING:
            raise unavailable("The server is shutting down.", "server_draining", 5)
        if self.engine_died:
            raise unavailable("The engine process died; the server is restarting.",
                              "engine_dead", 30)
        raise unavailable("The model failed to load.", "model_load_failed", 60)

    def num_queued(self) -> int:
        """Admitted engine requests the engine has not started (live, not a step old)."""
        queued = self.engine.num_queued() if self.engine is not None else 0
        return self._pending_submission + queued

    @property
    def num_in_flight(self) -> int:
        return len(self._admissions)

    def admit(self, engine_request_ids: list[str], max_queued: int) -> Admission:
        """Take places for a request's engine requests (one per prompt), or raise 503.

        Refused when not ready, or when the queue is not empty and these requests
        would take it past ``max_queued``. Runs without awaiting, so concurrent
        handlers on the event loop cannot both see the last free place.
        """
        self.require_ready()
        queued = self.num_queued()
        if queued > 0 and queued + len(engine_request_ids) > max_queued:
            raise unavailable(
                f"The server is overloaded ({queued} requests waiting); retry later.",
                "server_overloaded", 1,
            )
        admission = Admission(self, engine_request_ids)
        self._admissions.add(admission)
        self._pending_submission += len(engine_request_ids)
        return admission

    def _release(self, admission: Admission) -> None:
        self._admissions.discard(admission)
        if not self._admissions and self._idle is not None:
            self._idle.set()

    # ----- draining ----------------------------------------------------------------------

    def start_drain(self, timeout: float, then: Callable[[], None]) -> None:
        """Begin a graceful drain (idempotent); ``then`` runs when it is over."""
        if self._drain_task is not None:
            return
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(timeout, then))

    async def _drain(self, timeout: float, then: Callable[[], None]) -> None:
        previous = self.state
        self.state = ServerState.DRAINING
        logger.info("draining: %d request(s) in flight, waiting up to %gs",
                    len(self._admissions), timeout)
        try:
            if previous is ServerState.READY and self._admissions:
                if not await self._wait_idle(timeout):
                    logger.warning("shutdown timeout reached, aborting %d request(s)",
                                   len(self._admissions))
                    self.abort_all()
                    await self._wait_idle(ABORT_GRACE_SECONDS)
        finally:
            then()

    def abort_all(self) -> None:
        """End every admitted request now; each handler answers its client and cleans up."""
        for admission in list(self._admissions):
            if admission.interrupt is not None:
                admission.interrupt()
            elif self.engine is not None:
                for request_id in admission.engine_request_ids:
                    self.engine.abort(request_id)

    async def _wait_idle(self, timeout: float) -> bool:
        if not self._admissions:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def shutdown(self) -> None:
        """Stop the engine (called once the HTTP server has stopped)."""
        if self.engine is not None:
            try:
                await self.engine.shutdown()
            except Exception:  # noqa: BLE001
                logger.exception("engine shutdown failed")

