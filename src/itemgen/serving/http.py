"""uvicorn's h11 connection protocol with what the server needs beyond it (`itemgen serve` passes
``protocol(client_timeout_s)`` as uvicorn's ``http``):

* **A deadline for clients.** uvicorn's ``timeout_keep_alive`` only closes connections that send
  nothing at all between requests: one byte of a request head cancels it, and a client that then
  stalls (slowloris) holds the connection forever. Here a request head must be complete within
  ``client_timeout_s`` of the moment the server starts waiting for it (the connection opened, or
  the previous response ended), however slowly its bytes trickle in; likewise a request body
  must be complete within ``client_timeout_s`` of the end of its head (a deadline per chunk let
  a byte every few seconds hold a connection forever). A client past its deadline gets a JSON
  408 (when part of a head had arrived) or just has its connection closed (mid-body); the server
  keeps serving the others all along (one event loop, no thread per connection).
* **A head limit that holds.** h11 bounds only a head still incomplete in its buffer: a 100 KB
  head arriving in one read was accepted. Here every head over ``MAX_HEAD_BYTES`` (16 KiB) is a
  431, however it arrives.
* **JSON for malformed HTTP.** Framing errors (a bad request line, an illegal header, a head
  over 16 KiB) are answered before the app sees a request; uvicorn answers them in plain text,
  here they are ``{"error": "malformed HTTP request: <reason>"}`` with h11's status (400, or 431
  for an oversized head).
"""

from __future__ import annotations

import asyncio
import functools
import json

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

DEFAULT_CLIENT_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = DEFAULT_MAX_INCOMPLETE_EVENT_SIZE  # 16 KiB: request line + headers (docs/serve.md)


class _Connection(h11.Connection):
    """An h11 connection that remembers why it rejected the client's bytes (uvicorn keeps only a
    fixed message)."""

    last_error: h11.RemoteProtocolError | None = None

    def next_event(self):
        try:
            event = super().next_event()
            if isinstance(event, h11.Request) and head_bytes(event) > MAX_HEAD_BYTES:
                raise h11.RemoteProtocolError(f"request head of {head_bytes(event)} bytes is over the limit "
                                              f"of {MAX_HEAD_BYTES} bytes", error_status_hint=431)
            return event
        except h11.RemoteProtocolError as e:
            if getattr(e, "error_status_hint", 400) == 431 and "over the limit" not in str(e):
                # h11's own 431 (a head still incomplete past the limit in its buffer: it arrived
                # in several reads) says "Receive buffer too long": the same limit, said the same way
                e = h11.RemoteProtocolError(f"request head is over the limit of {MAX_HEAD_BYTES} bytes",
                                            error_status_hint=431)
            self.last_error = e
            raise e


def head_bytes(request: h11.Request) -> int:
    """The size of a parsed request head: request line and header lines with their CRLFs (less
    the optional whitespace h11 strips around values)."""
    line = len(request.method) + len(request.target) + len(b"HTTP/") + len(request.http_version) + 4
    return line + sum(len(k) + len(v) + 4 for k, v in request.headers.raw_items()) + 2


def _raw_response(status: int, body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = (f"HTTP/1.1 {status} {STATUS_PHRASES[status].decode()}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\nconnection: close\r\n\r\n")
    return head.encode() + data


class GuardedH11Protocol(H11Protocol):
    def __init__(self, *args, client_timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S, **kwargs):
        super().__init__(*args, **kwargs)
        size = self.config.h11_max_incomplete_event_size
        self.conn = _Connection(h11.SERVER, DEFAULT_MAX_INCOMPLETE_EVENT_SIZE if size is None else size)
        self.client_timeout_s = client_timeout_s
        self._deadline: asyncio.TimerHandle | None = None
        self._body_deadline = False  # the deadline armed is the current body's

    # ---- the client's deadline ----------------------------------------------------------------
    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.client_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _follow_client(self) -> None:
        """After each change: waiting for a head keeps the deadline it started with; a body
        gets one deadline from the end of its head (not one per chunk: a byte every few seconds
        would hold the connection forever); otherwise it is the server's turn (no deadline)."""
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._deadline is None:
                self._arm()
            self._body_deadline = False
        elif state is h11.SEND_BODY:
            if not self._body_deadline:
                self._arm()
                self._body_deadline = True
        else:
            self._disarm()
            self._body_deadline = False

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport is None or self.transport.is_closing():
            return
        waiting_for_head = self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE
        if waiting_for_head and self.conn.trailing_data[0]:  # part of a head came: say why before closing
            self.transport.write(_raw_response(408, {"error": f"request head not complete within "
                                                              f"{self.client_timeout_s:g} s"}))
        self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_client()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._disarm()  # the wait for the next head starts now
            self._follow_client()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    # ---- malformed HTTP -----------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        e = self.conn.last_error
        status = getattr(e, "error_status_hint", 400) if e is not None else 400
        status = status if status in STATUS_PHRASES and 400 <= status < 500 else 400
        data = json.dumps({"error": f"malformed HTTP request: {e or msg}"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=status, headers=headers, reason=STATUS_PHRASES[status]),
                      h11.Data(data=data), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def protocol(client_timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S):
    """What to pass as uvicorn's ``http``: the guarded protocol with this deadline (a partial of
    a module-level class, so ``--workers N`` can hand it to its worker processes)."""
    if not client_timeout_s > 0:
        raise ValueError(f"client timeout must be > 0 seconds, got {client_timeout_s}")
    return functools.partial(GuardedH11Protocol, client_timeout_s=client_timeout_s)
