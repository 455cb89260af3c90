"""The engine's life inside the server: loading, admission, in-flight tracking, draining.

``EngineHost`` is the one place that knows whether the server can take work:

* ``loading``  the model loads in a worker thread; ``/health`` answers 503;
* ``ready``    requests are admitted while the engine's queue has room;
* ``draining`` after SIGTERM/SIGINT: new requests get 503, running ones may finish
  until the shutdown timeout, then the rest are aborted;
* ``failed``   the model could not be loaded; the server exits non-zero.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tokenmill.server.errors import unavailable

if TYPE_CHECKING:
    from tokenmill.engine.outputs import EngineStats

logger = logging.getLogger("tokenmill.server")

# After aborting what the shutdown timeout left running, how long the handlers get to
# send their final error event / response before the HTTP server closes connections.
ABORT_GRACE_SECONDS = 5.0


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
        # Set by the request's handler: ends the request now (used when a drain times out).
        self.interrupt: Callable[[], None] | None = None

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._host._release(self)


class EngineHost:
    """Owns the engine object and the server's state machine."""

    def __init__(self, engine_factory: Callable[[], Any]) -> None:
        self._factory = engine_factory
        self.state = ServerState.LOADING
        self.engine: Any = None
        self.load_error: BaseException | None = None
        self.on_fatal: Callable[[], None] | None = None  # set by the process runner
        self._admissions: set[Admission] = set()
        self._active_engine_ids: set[str] = set()
        self._idle: asyncio.Event | None = None
        self._drain_task: asyncio.Task[None] | None = None

    # ----- loading -------------------------------------------------------------------

    async def load(self) -> None:
        """Build the engine in a daemon thread (blocking, seconds) and start it."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()

        def build() -> None:
            try:
                engine = self._factory()
            except BaseException as exc:  # noqa: BLE001 - reported to the event loop
                loop.call_soon_threadsafe(_set_exception, done, exc)
            else:
                loop.call_soon_threadsafe(_set_result, done, engine)

        # A daemon thread, so a SIGTERM during loading does not wait for the load.
        threading.Thread(target=build, name="tokenmill-engine-load", daemon=True).start()
        try:
            engine = await done
            if self.state is ServerState.DRAINING:  # a signal came while loading
                return
            engine.start()
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
        raise unavailable("The model failed to load.", "model_load_failed", 60)

    def num_queued(self) -> int:
        """Admitted engine requests the engine is not running yet (queued or in transit)."""
        stats = self.stats()
        running = stats.num_running if stats is not None else 0
        return max(0, len(self._active_engine_ids) - running)

    @property
    def num_in_flight(self) -> int:
        return len(self._admissions)

    def admit(self, engine_request_ids: list[str], max_queued: int) -> Admission:
        """Take a place for a request, or raise 503 if not ready or the queue is full.

        Runs without awaiting, so concurrent handlers on the event loop cannot both
        see the last free place.
        """
        self.require_ready()
        queued = self.num_queued()
        if queued > 0 and queued >= max_queued:
            raise unavailable(
                f"The server is overloaded ({queued} requests waiting); retry later.",
                "server_overloaded", 1,
            )
        admission = Admission(self, engine_request_ids)
        self._admissions.add(admission)
        self._active_engine_ids.update(engine_request_ids)
        return admission

    def _release(self, admission: Admission) -> None:
        self._admissions.discard(admission)
        self._active_engine_ids.difference_update(admission.engine_request_ids)
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


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
