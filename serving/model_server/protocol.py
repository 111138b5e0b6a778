"""uvicorn's httptools protocol with the limits a server exposed to any client needs before a request reaches the app.

httptools buffers a request's line and headers whole, with no limit (a 50 MiB header was taken), and uvicorn gives a
client all the time it wants to send them. Here a request's head (its line and headers) may take at most
MAX_HEAD_BYTES and HEAD_SECONDS: beyond either, the client gets a 431 or a 408 in the API's JSON and the connection
is closed, once what the client still sends (up to DISCARD_BYTES) is read and dropped. Only the head's bytes count
(up to the blank line that ends it: a read holds whatever the socket has, body bytes too). The body's limits are
the app's (--max-body-bytes, BODY_SECONDS in app.py).
"""

import asyncio
from typing import Any, Optional

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.core import contract

MAX_HEAD_BYTES = 64 << 10
HEAD_SECONDS = 30.0
DISCARD_BYTES = 1 << 20
DISCARD_SECONDS = 1.0


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._in_head = True  # reading a request's line and headers (or waiting for the next request)
        self._head_bytes = 0
        self._head_timer: Optional[asyncio.TimerHandle] = None
        self._discard_left: Optional[int] = None
        self._tail = b""  # the last bytes of the head read so far: the blank line may span two reads

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        # A connection that sends nothing holds a place of --max-connections too: its first head has HEAD_SECONDS.
        self._head_timer = self.loop.call_later(HEAD_SECONDS, self._refuse, 408, "request head")

    def data_received(self, data: bytes) -> None:
        if self._discard_left is not None:  # refused: what the client still sends is read and dropped, briefly
            self._discard_left -= len(data)
            if self._discard_left <= 0:
                self.transport.close()
            return
        if self._in_head:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(HEAD_SECONDS, self._refuse, 408, "request head")
            self._head_bytes += self._head_part(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, "request head")
                return
        super().data_received(data)

    def _head_part(self, data: bytes) -> int:
        """How many of `data`'s bytes are the request's head: up to the blank line that ends it, else all (a read
        takes what the socket holds, the head and body bytes after it alike)."""
        across = (self._tail + data[:3]).find(b"\r\n\r\n")  # the blank line split between two reads
        if across >= 0:
            end = across + 4 - len(self._tail)
        else:
            found = data.find(b"\r\n\r\n")
            end = found + 4 if found >= 0 else -1
        self._tail = (self._tail + data)[-3:] if end < 0 else b""
        return len(data) if end < 0 else end

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes, self._tail = False, 0, b""
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # the next request's head, if the connection is kept

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _refuse(self, status: int, what: str) -> None:
        """The API's JSON error, then the connection closed (what the client still sends is not read)."""
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # An earlier request's answer is still to come (pipelined requests): it goes out whole, then the
            # connection closes; this head is read no further.
            self.cycle.keep_alive = False
            self.transport.pause_reading()
            return
        message = (
            f"the {what} is longer than {MAX_HEAD_BYTES} bytes"
            if status == 431
            else f"the {what} took longer than {HEAD_SECONDS:g} s"
        )
        body = contract.error_body(message)
        reason = b"Request Header Fields Too Large" if status == 431 else b"Request Timeout"
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, reason, len(body), body)
        )
        # Closed at once, a client still sending would meet a reset before it reads the answer: up to DISCARD_BYTES
        # more are read and dropped, for at most DISCARD_SECONDS.
        self._discard_left = DISCARD_BYTES
        self.loop.call_later(DISCARD_SECONDS, self.transport.close)
