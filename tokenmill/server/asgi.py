"""ASGI plumbing for completions: streamed responses that always clean up, and
handlers that stop when their client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

# Status logged for a request whose client went away before the answer (nginx's).
CLIENT_CLOSED_REQUEST = 499


class SSEResponse(StreamingResponse):
    """A streaming response that runs ``on_close`` however the stream ends.

    Starlette cancels the stream when the client disconnects, possibly before the body
    iterator ever started; ``on_close`` (synchronous) releases what the request holds.
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def run_until_disconnect(receive: Receive, work: Coroutine[Any, Any, T]) -> T | None:
    """Run ``work`` unless the client disconnects first; then cancel it and return None.

    Only for handlers that have read the whole body: after that, the next ASGI message
    is ``http.disconnect`` when the client goes away.
    """
    task: asyncio.Task[T] = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        listener.cancel()
        raise
    if task.done():
        listener.cancel()
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001 - the client is gone; nothing to report to
        pass
    return None


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
