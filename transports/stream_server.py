"""The server side of the stream carriers (TCP, Unix sockets).

Each connection decodes frames, runs the handler once per request as its own
task (so a slow request never holds up the others), and writes answers in
whatever order they finish. Limits are enforced per connection; any violation
is answered with an ERROR frame and closes that connection only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from typing import Any, cast

from .base import Handler, ServerOptions, StreamedAnswer
from .control import ErrorInfo, GoAwayInfo, Settings, decode_window_update
from .decoder import FrameDecoder
from .errors import ConnectError, ConnectionLost, ErrorCode, ProtocolError
from .frame import (
    DEFAULT_MAX_FRAME_SIZE,
    FLAG_MORE,
    FLAG_STREAM_OK,
    HEADER,
    HEADER_SIZE,
    PREFACE,
    VERSION,
    FrameType,
    encode_data,
    encode_frame,
    encode_window_update,
)
from .handlers import HandlerRunner
from .registry import parse_address
from .server_bodies import AnswerCredit, RequestBody, gather_answer, send_streamed_answer
from .stream_io import Batcher, remove_stale_socket, set_nodelay

log = logging.getLogger("pitcher.transports")

_REQUEST = int(FrameType.REQUEST)
_ERROR = FrameType.ERROR
_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from


class _ServerConnection(asyncio.Protocol):
    __slots__ = (
        "_answer_limit",
        "_batcher",
        "_decoder",
        "_direct",
        "_loop",
        "_max_in_flight",
        "_server",
        "_stream_ok",
        "_window",
        "answers",
        "bodies",
        "closed",
        "goaway_sent",
        "last_request_id",
        "peer_done",
        "peer_max_frame_size",
        "peer_window",
        "tasks",
        "transport",
    )

    def __init__(self, server: StreamServer, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._loop = loop
        options = server.options
        self._decoder = FrameDecoder(options.max_frame_size)
        # True once the preface is read and while the decoder keeps no bytes:
        # data_received may then read REQUEST frames itself.
        self._direct = False
        self._batcher = Batcher(loop)
        # The requests whose handlers are still waiting, keyed by request id.
        self.tasks = HandlerRunner(server.handler, loop, self._answer, self._maybe_finish)
        self._max_in_flight = options.max_in_flight
        self.transport: asyncio.Transport | None = None
        self.last_request_id = 0
        self.goaway_sent = False
        self.peer_done = False
        self.peer_max_frame_size = DEFAULT_MAX_FRAME_SIZE
        # Our window toward the client: a WithStreams handler takes streamed requests.
        self._window = options.initial_window if self.tasks.takes_streams else 0
        # The client's window (SETTINGS field 3): 0, it takes whole responses only.
        self.peer_window = 0
        # STREAM_OK as it reaches the handler: only if the client announced a window.
        self._stream_ok = 0
        # Streamed request bodies being received, and streamed answers' credit, by id.
        self.bodies: dict[int, RequestBody] = {}
        self.answers: dict[int, AnswerCredit] = {}
        # The largest response payload both sides accept.
        self._answer_limit = min(options.max_frame_size, DEFAULT_MAX_FRAME_SIZE)
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        self._batcher.transport = transport
        set_nodelay(transport)
        options = self._server.options
        transport.write(
            PREFACE
            + encode_frame(
                FrameType.SETTINGS,
                0,
                Settings(options.max_frame_size, options.max_in_flight, self._window).encode(),
            )
        )
        self._server._connections.add(self)
        if self._server.closing:
            self.send_goaway("server is shutting down")

    def data_received(self, data: bytes) -> None:
        batcher = self._batcher
        # Answers made while these bytes are handled leave together when they
        # are (the first at once, then every BATCH_FRAMES), with no callback.
        batcher.hold()
        try:
            if self._direct:
                self._read_requests(data)
            else:
                self._feed(data)
        finally:
            batcher.release()

    def _read_requests(self, data: bytes) -> None:
        """The common case, inline: whole REQUEST frames in order, within the limits.

        No Frame and no list per read; the first frame that is anything else
        (another type, cut in two, out of order, over a limit, or the
        connection going away) and all after it go through the decoder.
        """
        runner = self.tasks
        max_frame_size = self._decoder.max_frame_size
        stream_ok = self._stream_ok
        pos = 0
        end = len(data)
        while end - pos >= HEADER_SIZE:
            version, kind, flags, length, request_id, deadline_ms = _unpack_header(data, pos)
            start = pos + HEADER_SIZE
            stop = start + length
            if (
                kind != 1  # FrameType.REQUEST
                or flags & 1  # FLAG_MORE: a streamed request's head
                or stop > end
                or version != VERSION
                or length > max_frame_size
                or request_id <= self.last_request_id
                or len(runner.tasks) >= self._max_in_flight
                or self.goaway_sent
                or self.closed
            ):
                break
            pos = stop
            self.last_request_id = request_id
            runner.start(request_id, data[start:stop], deadline_ms, flags & stream_ok)
        if pos < end:
            self._feed(data[pos:] if pos else data)

    def _feed(self, data: bytes) -> None:
        """Bytes through the decoder: the preface, control frames, frames cut in two, errors."""
        decoder = self._decoder
        try:
            frames = decoder.feed(data)
        except ProtocolError as exc:
            self._direct = False
            error = exc
            try:
                for frame in exc.frames:  # type: ignore[attr-defined]
                    self._on_frame(*frame)
            except ProtocolError as earlier:  # a control payload before the bad frame
                error = earlier
            self.fail(error.code, str(error))
            return
        runner = self.tasks
        try:
            for kind, request_id, payload, deadline_ms, flags in frames:
                if (
                    kind == 1  # FrameType.REQUEST
                    and not flags & FLAG_MORE
                    and request_id > self.last_request_id
                    and len(runner.tasks) < self._max_in_flight
                    and not self.goaway_sent
                    and not self.closed
                ):
                    self.last_request_id = request_id
                    runner.start(request_id, payload, deadline_ms, flags & self._stream_ok)
                else:
                    self._on_frame(kind, request_id, payload, deadline_ms, flags)
        except ProtocolError as exc:  # a control payload that does not decode
            self._direct = False
            self.fail(exc.code, str(exc))
            return
        # Past the preface with no bytes kept: the next read may start inline.
        self._direct = not decoder.buffered and not decoder.in_preface and not self.closed

    def _on_frame(
        self, kind: int, request_id: int, payload: bytes, deadline_ms: int, flags: int = 0
    ) -> None:
        if self.closed:
            return
        if kind == FrameType.DATA:
            body = self.bodies.get(request_id)
            if body is None:
                if request_id > self.last_request_id:
                    raise ProtocolError(f"DATA for request id {request_id}, never started")
                return  # the call was answered or cancelled: dropped
            # FlowControlError beyond the window: the connection fails.
            if body.receive(payload, flags & FLAG_MORE != 0):
                del self.bodies[request_id]
                # The call's deadline counts from its body's end (docs/wire.md).
                self.tasks.body_ended(request_id, body.deadline_ms)
        elif kind == FrameType.WINDOW_UPDATE:
            credit = self.answers.get(request_id)
            if credit is not None:
                credit.grant(decode_window_update(payload))
        elif kind == _REQUEST:
            if self.goaway_sent and request_id > self.last_request_id:
                self._batcher.write(
                    encode_frame(
                        _ERROR,
                        request_id,
                        ErrorInfo(ErrorCode.UNAVAILABLE, "server is shutting down").encode(),
                    )
                )
                return
            if request_id <= self.last_request_id:
                # Ids only grow, so this also refuses the id of a request still running.
                self.fail(ErrorCode.PROTOCOL_ERROR, f"request id {request_id} reused")
                return
            if len(self.tasks.tasks) >= self._max_in_flight:
                self.fail(
                    ErrorCode.TOO_MANY_IN_FLIGHT,
                    f"more than {self._max_in_flight} requests in flight",
                )
                return
            self.last_request_id = request_id
            if flags & FLAG_MORE:
                if not self._window:
                    raise ProtocolError(
                        f"request {request_id} streams its body, but this server"
                        " announced no window"
                    )
                body = RequestBody(
                    self,
                    self._loop,
                    request_id,
                    self._window,
                    self._server.options.stream_idle_timeout,
                    deadline_ms,
                )
                self.bodies[request_id] = body
                self.tasks.start(request_id, payload, deadline_ms, flags & self._stream_ok, body)
            else:
                self.tasks.start(request_id, payload, deadline_ms, flags & self._stream_ok)
        elif kind == FrameType.CANCEL:
            body = self.bodies.pop(request_id, None)
            if body is not None:
                body.fail(ConnectionLost("the caller cancelled the call"))
            if self.tasks.cancel(request_id):
                self._maybe_finish()
        elif kind == FrameType.PING:
            self._batcher.write(encode_frame(FrameType.PONG, 0, payload))
        elif kind == FrameType.GOAWAY:
            self.peer_done = True
            self._maybe_finish()
        elif kind == _ERROR:
            if request_id == 0:
                log.warning("peer closed the connection: %s", ErrorInfo.decode(payload).describe())
                self.close()
        elif kind == FrameType.SETTINGS:
            settings = Settings.decode(payload)
            if settings.max_frame_size:
                self.peer_max_frame_size = settings.max_frame_size
                self._answer_limit = min(
                    self._server.options.max_frame_size, settings.max_frame_size
                )
            self.peer_window = settings.initial_window
            self._stream_ok = FLAG_STREAM_OK if settings.initial_window else 0
        elif kind == FrameType.PONG:
            pass
        else:
            self.fail(ErrorCode.PROTOCOL_ERROR, f"a server does not accept {kind} frames")

    def _answer(
        self, request_id: Any, result: bytes | StreamedAnswer | None, error: ErrorInfo | None
    ) -> None:
        if self.bodies:
            # Answered before its request body ended: later DATA is dropped.
            body = self.bodies.pop(request_id, None)
            if body is not None:
                body.fail(ConnectionLost("the call was answered"))
        if result is not None:
            # The class test first: bytes are the rule, and it is cheaper.
            if result.__class__ is not bytes and isinstance(result, StreamedAnswer):
                self._start_answer(request_id, result)
                return
            size = len(result)
            if size <= self._answer_limit:
                self._batcher.write(_pack_header(VERSION, 2, 0, size, request_id, 0) + result)
                return
            limit = self._answer_limit
            log.error("response to request %d is over the frame limit", request_id)
            error = ErrorInfo(
                ErrorCode.INTERNAL,
                f"ValueError: response of {size} bytes exceeds the frame limit of {limit}",
            )
        assert error is not None
        self._batcher.write(encode_frame(_ERROR, request_id, error.encode()))

    def _start_answer(self, request_id: int, answer: StreamedAnswer) -> None:
        """A StreamedAnswer: sent by a task of its own, counted in flight until it ends."""
        if self.closed:
            return  # nobody to send it to; its chunks are never started
        if len(answer.head) > self._answer_limit:
            self._answer(
                request_id,
                None,
                ErrorInfo(
                    ErrorCode.INTERNAL,
                    f"ValueError: response head of {len(answer.head)} bytes exceeds the frame"
                    f" limit of {self._answer_limit}",
                ),
            )
            return
        if not self.peer_window:
            # The client takes whole responses only: a handler that ignored
            # may_stream is answered whole, within the frame limit.
            credit = AnswerCredit(self._loop, 0)
        else:
            credit = AnswerCredit(self._loop, self.peer_window)
            self.answers[request_id] = credit
        task = self._loop.create_task(
            self._run_answer(request_id, answer, credit),
            name=f"pitcher-answer {request_id}",
        )
        self.tasks.adopt(request_id, task)

    async def _run_answer(
        self, request_id: int, answer: StreamedAnswer, credit: AnswerCredit
    ) -> None:
        task = asyncio.current_task()
        try:
            if self.peer_window:
                await send_streamed_answer(
                    self, request_id, answer, credit, min(self._answer_limit, 1 << 20)
                )
            else:
                await self._gather_answer(request_id, answer)
        finally:
            self.answers.pop(request_id, None)
            if task is not None:
                self.tasks.release(request_id, task)

    async def _gather_answer(self, request_id: int, answer: StreamedAnswer) -> None:
        try:
            whole = await gather_answer(answer, self._answer_limit)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("streamed answer to request %d failed", request_id, exc_info=exc)
            self.send_error(
                request_id, ErrorInfo(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            )
            return
        self._answer(request_id, whole, None)

    # the bodies' ServerLink ---------------------------------------------------------------

    def send_data(self, request_id: int, data: bytes, more: bool) -> None:
        if not self.closed:
            self._batcher.write(encode_data(request_id, data, more))

    def send_credit(self, request_id: int, increment: int) -> None:
        if not self.closed:
            self._batcher.write(encode_window_update(request_id, increment))

    def send_head(self, request_id: int, payload: bytes, more: bool) -> None:
        if not self.closed:
            self._batcher.write(
                _pack_header(VERSION, 2, FLAG_MORE if more else 0, len(payload), request_id, 0)
                + payload
            )

    def send_error(self, request_id: int, info: ErrorInfo) -> None:
        if not self.closed:
            self._batcher.write(encode_frame(_ERROR, request_id, info.encode()))

    def send_goaway(self, reason: str) -> None:
        if self.goaway_sent or self.closed:
            return
        self.goaway_sent = True
        self._batcher.write(
            encode_frame(FrameType.GOAWAY, 0, GoAwayInfo(self.last_request_id, reason).encode())
        )
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        # After a GOAWAY the connection lives until its calls are done and the
        # client has hung up (or said GOAWAY itself), so a request that crossed
        # our GOAWAY on the wire still gets its UNAVAILABLE answer.
        if self.peer_done and not self.tasks:
            self.close()

    def fail(self, code: int, message: str) -> None:
        log.warning("closing connection from a client: %s", message)
        if self.transport is not None and not self.transport.is_closing():
            self._batcher.flush()
            self.transport.write(encode_frame(_ERROR, 0, ErrorInfo(code, message).encode()))
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        bodies, self.bodies = self.bodies, {}
        for body in bodies.values():
            body.fail(ConnectionLost("the connection closed"))
        self.tasks.cancel_all()
        if self.transport is not None:
            self._batcher.flush()
            self.transport.close()

    def eof_received(self) -> bool:
        self.peer_done = True
        if not self.tasks:
            self.close()
        return True  # keep our write side open to answer what is still running

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()
        self._server._connections.discard(self)


class StreamServer:
    """Serves a handler on a TCP or Unix-socket address."""

    def __init__(self, address: str, handler: Handler, options: ServerOptions | None = None):
        self.address = address
        self._parsed = parse_address(address)
        self.handler = handler
        self.options = options or ServerOptions()
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_ServerConnection] = set()
        # Identity of the socket file we bound, so we never unlink a successor's.
        self._socket_file: tuple[int, int] | None = None
        self.closing = False
        # TLS for every connection (transports/tls.py sets it); None: plain TCP.
        self.ssl: ssl.SSLContext | None = None

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def in_flight(self) -> int:
        return sum(len(c.tasks) for c in self._connections)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        address = self._parsed

        def factory() -> _ServerConnection:
            return _ServerConnection(self, loop)

        try:
            if address.scheme == "unix":
                remove_stale_socket(address.path)
                self._server = await loop.create_unix_server(
                    factory, address.path, backlog=self.options.backlog
                )
                info = os.stat(address.path)
                self._socket_file = (info.st_dev, info.st_ino)
            else:
                self._server = await loop.create_server(
                    factory,
                    address.host,
                    address.port,
                    backlog=self.options.backlog,
                    reuse_address=True,
                    ssl=self.ssl,
                )
        except OSError as exc:
            raise ConnectError(f"cannot listen on {self.address}: {exc.strerror or exc}") from exc
        if address.scheme != "unix" and address.port == 0:
            # Report the port the kernel picked.
            # Untyped on purpose: uvloop's sockets are a list where asyncio's
            # are a tuple, and the compiled build checks declared types.
            server: Any = self._server
            name = server.sockets[0].getsockname()
            host, port = name[0], name[1]
            self.address = f"{address.scheme}://{_format_host(host)}:{port}"

    async def close(self, grace: float = 5.0) -> None:
        self.closing = True
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.send_goaway("server is shutting down")
        # Clients close a connection once it has no calls left after GOAWAY.
        deadline = time.monotonic() + grace
        while self._connections and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        self.abort()

    def abort(self) -> None:
        self.closing = True
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.close()
        if self._socket_file is not None:
            bound = self._socket_file
            path, self._socket_file = self._parsed.path, None
            with contextlib.suppress(OSError):
                info = os.stat(path)
                if (info.st_dev, info.st_ino) == bound:
                    os.unlink(path)


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
