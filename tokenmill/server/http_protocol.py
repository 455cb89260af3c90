"""uvicorn's h11 protocol with a deadline for request headers.

uvicorn times out idle keep-alive connections, but not a client that sends
half a request line and then nothing: such connections were held open
indefinitely (one slow-headers client per connection is enough to exhaust a
server). Here every connection that is waiting for a request's headers -
a new connection, or a kept-alive one after a response - must complete them
within ``header_timeout`` seconds or it is closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderTimeoutH11Protocol(H11Protocol):
    """H11Protocol that closes connections whose request headers stall."""

    header_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._waiting_after: Any = None
        self._arm(None)

    def _arm(self, previous_cycle: Any) -> None:
        """Wait for the headers of the request after ``previous_cycle`` (None: the first)."""
        self._disarm()
        self._waiting_after = previous_cycle
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.cycle is self._waiting_after and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._header_timer is not None and self.cycle is not self._waiting_after:
            self._disarm()  # a new request's headers are complete

    def on_response_complete(self) -> None:
        finished = self.cycle
        super().on_response_complete()
        if self.cycle is finished and not self.transport.is_closing():
            self._arm(finished)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def protocol_with_header_timeout(seconds: float) -> type[HeaderTimeoutH11Protocol]:
    """The protocol class for uvicorn's ``http=`` setting, with this deadline."""
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,),
                {"header_timeout": float(seconds)})
