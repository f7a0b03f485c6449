"""The server side of the ZeroMQ carrier: one ROUTER socket.

Every message arrives as ``[identity, frame]``; the identity stands for one
client connection, and what the stream server keeps per connection (running
requests, the limit on them, the last request id) is kept per identity here.
One task reads the socket; handlers run through :class:`HandlerRunner`,
keyed by ``(identity, request id)``, and answers go back with a non-blocking
send.

ZeroMQ gives a ROUTER no way to drop one peer, so a malformed message is
dropped and counted, and the sender gets one connection-level ERROR frame
(request id 0) the first time, so that a peer speaking another version or
with a bug can tell why nothing answers; never more, so a flood of garbage
does not make the server a reflector. Its well-formed messages are still
served: ignoring a real client would leave its calls hanging until their
deadlines with no way to recover.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from .base import Handler, ServerOptions, StreamedAnswer
from .control import ErrorInfo, GoAwayInfo, Settings, decode_window_update
from .errors import ConnectError, ConnectionLost, ErrorCode, FlowControlError, ProtocolError
from .frame import (
    FLAG_MORE,
    FLAG_STREAM_OK,
    HEADER,
    HEADER_SIZE,
    VERSION,
    FrameType,
    encode_data,
    encode_frame,
    encode_response,
    encode_window_update,
)
from .handlers import HandlerRunner
from .server_bodies import AnswerCredit, RequestBody, gather_answer, send_streamed_answer
from .stream_io import remove_stale_socket
from .zeromq_io import endpoint_of, new_socket, parse_zmq_address, read_header, shared_context
from .zeromq_io import should_log as _should_log

log = logging.getLogger("pitcher.transports")

# Plain ints: pyzmq's constants are enums, whose operators run in Python.
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_SNDMORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_REQUEST = FrameType.REQUEST
_ERROR = FrameType.ERROR
_unpack_header = HEADER.unpack_from
# A peer with nothing running that has been silent this long is forgotten:
# ZeroMQ does not tell a ROUTER when a peer goes, and the table must not grow
# with every client that ever connected.
PEER_IDLE = 60.0
# On a graceful close, after every handler has answered: how long ZeroMQ may
# keep trying to deliver the last answers and GOAWAYs. Bounded, because a
# peer that stopped reading must not hold up the close.
CLOSE_LINGER_MS = 100
# How long close() waits for ZeroMQ to report its listening socket closed
# (it takes well under a millisecond).
LISTENER_CLOSE_WAIT = 0.5
# While closing, when GOAWAY is repeated to peers that have not answered it:
# after this, then twice as long each time, up to the maximum.
REMIND_INTERVAL = 0.05
REMIND_INTERVAL_MAX = 1.0
_UNAVAILABLE = ErrorInfo(ErrorCode.UNAVAILABLE, "server is shutting down").encode()


def _no_events(option: int) -> int:
    return 0


class _Peer:
    """What the server knows of one identity (one client connection)."""

    __slots__ = (
        "answers",
        "bodies",
        "draining",
        "error_sent",
        "greeted",
        "last_request_id",
        "last_seen",
        "link",
        "running",
        "stream_ok",
        "window",
    )

    def __init__(self, now: float, link: _PeerLink) -> None:
        self.last_seen = now
        self.last_request_id = 0
        # Requests started and not yet answered or cancelled.
        self.running = 0
        self.error_sent = False
        # Sent our GOAWAY and has not answered with its own yet.
        self.draining = False
        # Streamed bodies (docs/wire.md, "ZeroMQ"): the client's SETTINGS came
        # (it knows our window), its window, STREAM_OK as a handler may see it.
        self.greeted = False
        self.window = 0
        self.stream_ok = 0
        self.link = link
        self.bodies: dict[int, RequestBody] = {}
        self.answers: dict[int, AnswerCredit] = {}


class _PeerLink:
    """The ServerLink of one identity's streamed bodies: frames to that identity."""

    __slots__ = ("_server", "identity")

    def __init__(self, server: ZmqServer, identity: bytes) -> None:
        self._server = server
        self.identity = identity

    def send_data(self, request_id: int, data: bytes, more: bool) -> None:
        self._server._send_to(self.identity, encode_data(request_id, data, more))

    def send_credit(self, request_id: int, increment: int) -> None:
        self._server._send_to(self.identity, encode_window_update(request_id, increment))

    def send_head(self, request_id: int, payload: bytes, more: bool) -> None:
        self._server._send_to(
            self.identity, encode_response(request_id, payload, FLAG_MORE if more else 0)
        )

    def send_error(self, request_id: int, info: ErrorInfo) -> None:
        self._server._send_to(self.identity, encode_frame(_ERROR, request_id, info.encode()))


class ZmqServer:
    """Serves a handler on a ``zmq+tcp`` or ``zmq+ipc`` address."""

    def __init__(self, address: str, handler: Handler, options: ServerOptions | None = None):
        self.address = address
        self._parsed = parse_zmq_address(address)
        self.handler = handler
        self.options = options or ServerOptions()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._shadow: zmq.Socket[Any] | None = None
        self._events: Callable[[int], Any] = _no_events
        self._reader: asyncio.Task[None] | None = None
        # Reports EVENT_CLOSED when ZeroMQ has closed the listening socket.
        self._monitor: zmq.asyncio.Socket | None = None
        # True while the reader handles messages: answers sent then need no
        # re-check of the socket's events (see _send_to).
        self._handling = False
        self._runner: HandlerRunner | None = None
        # Our window (a WithStreams handler) and the SETTINGS a new identity gets.
        self._window = 0
        self._settings = b""
        self._peers: dict[bytes, _Peer] = {}
        self._next_prune = 0.0
        self._idle: asyncio.Event | None = None
        # Identity of the socket file we bound, so we never unlink a successor's.
        self._socket_file: tuple[int, int] | None = None
        self.closing = False
        # Malformed messages received and dropped.
        self.dropped = 0
        # Answers ZeroMQ could not take: the peer had gone or stopped reading.
        self.undeliverable = 0
        # Requests refused unstarted because their peer had max_in_flight running.
        self.overloaded = 0

    @property
    def in_flight(self) -> int:
        return len(self._runner) if self._runner is not None else 0

    @property
    def connection_count(self) -> int:
        """Peers heard from in the last PEER_IDLE seconds, or with requests running."""
        if self._loop is None:
            return 0
        since = self._loop.time() - PEER_IDLE
        return sum(1 for peer in self._peers.values() if peer.running or peer.last_seen > since)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        parsed = self._parsed
        endpoint, ipv6 = endpoint_of(parsed, any_port=True)
        if parsed.scheme == "zmq+ipc":
            # ZeroMQ unlinks whatever is at the path before binding, even a
            # live server's socket: refuse that, remove only a dead one.
            remove_stale_socket(parsed.path)
        context = shared_context.acquire()
        try:
            socket = new_socket(
                context,
                zmq.ROUTER,
                max_frame_size=self.options.max_frame_size,
                high_water_mark=self.options.high_water_mark,
                ipv6=ipv6,
            )
        except zmq.ZMQError as exc:
            shared_context.release(context)
            raise ConnectError(f"cannot listen on {self.address}: {exc}") from exc
        try:
            # A reply to a peer that has gone, or whose queue is full, raises
            # (EHOSTUNREACH, EAGAIN) instead of vanishing silently, so it is
            # counted; with NOBLOCK it never blocks the event loop.
            socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
            monitor = socket.get_monitor_socket(zmq.EVENT_CLOSED)
        except zmq.ZMQError as exc:
            socket.close(linger=0)
            shared_context.release(context)
            raise ConnectError(f"cannot listen on {self.address}: {exc}") from exc
        try:
            socket.bind(endpoint)
            bound = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            socket.close(linger=0)
            monitor.close(linger=0)
            shared_context.release(context)
            raise ConnectError(f"cannot listen on {self.address}: {exc}") from exc
        if parsed.scheme == "zmq+ipc":
            with contextlib.suppress(OSError):
                info = os.stat(parsed.path)
                self._socket_file = (info.st_dev, info.st_ino)
        elif parsed.port == 0:
            # Report the port the kernel picked.
            self.address = f"zmq+{bound}"
        self._loop = loop
        self._context = context
        self._socket = socket
        self._monitor = monitor
        shadow: zmq.Socket[Any] = zmq.Socket.shadow(socket.underlying)
        self._shadow = shadow
        self._events = shadow.get
        self._runner = HandlerRunner(self.handler, loop, self._answer, self._on_settled)
        options = self.options
        self._window = options.initial_window if self._runner.takes_streams else 0
        self._settings = encode_frame(
            FrameType.SETTINGS,
            0,
            Settings(options.max_frame_size, options.max_in_flight, self._window).encode(),
        )
        self._reader = loop.create_task(
            self._receive_loop(socket, shadow), name=f"pitcher-zmq-server {self.address}"
        )

    async def close(self, grace: float = 5.0) -> None:
        """GOAWAY to every peer, refuse new requests, finish running ones (at most ``grace``).

        The socket is closed once no handler runs and every peer told has
        answered with its own GOAWAY (or is gone). A ZeroMQ client with
        IMMEDIATE set drops answers it has received but not yet read when
        the connection ends, so closing as soon as the last answer is sent
        could lose it; a client's GOAWAY says it has read them all.
        """
        self.closing = True
        runner = self._runner
        if self._socket is None or runner is None or self._loop is None:
            self.abort()
            return
        now = self._loop.time()
        since = now - PEER_IDLE
        for identity, peer in list(self._peers.items()):
            if peer.running or peer.last_seen > since:
                self._send_goaway(identity, peer)
        give_up_at = now + grace
        interval = REMIND_INTERVAL
        while not self._drained():
            left = give_up_at - self._loop.time()
            if left <= 0:
                break
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), min(left, interval))
            interval = min(interval * 2, REMIND_INTERVAL_MAX)
            self._remind_draining_peers()
        reader = self._reader
        self._shutdown(CLOSE_LINGER_MS)
        try:
            if self._monitor is not None:
                # ZeroMQ closes the listening socket in its own thread: wait
                # for it, so that the address can be bound again (by a
                # restarted server) as soon as close() returns.
                with contextlib.suppress(TimeoutError, zmq.ZMQError):
                    await asyncio.wait_for(self._monitor.recv_multipart(), LISTENER_CLOSE_WAIT)
        finally:
            self._release()
        if reader is not None:
            # wait() rather than awaiting the task: its CancelledError is not ours.
            await asyncio.wait((reader,))

    def abort(self) -> None:
        """Close now: running handlers are cancelled and their answers not sent."""
        self._shutdown(0)
        self._release()

    # socket ---------------------------------------------------------------------------

    def _shutdown(self, linger_ms: int) -> None:
        self.closing = True
        if self._runner is not None:
            self._runner.cancel_all()
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        socket = self._socket
        self._socket = self._shadow = None
        self._events = _no_events
        self._peers.clear()
        if socket is not None and not socket.closed:
            socket.close(linger=linger_ms)

    def _release(self) -> None:
        """After the socket is closed: the monitor, the context, the socket file."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None and not monitor.closed:
            monitor.close(linger=0)
        context, self._context = self._context, None
        if context is not None:
            shared_context.release(context)
        if self._socket_file is not None:
            path, bound, self._socket_file = self._parsed.path, self._socket_file, None
            with contextlib.suppress(OSError):
                info = os.stat(path)
                if (info.st_dev, info.st_ino) == bound:
                    os.unlink(path)

    async def _receive_loop(self, socket: zmq.asyncio.Socket, shadow: zmq.Socket[Any]) -> None:
        recv_multipart = shadow.recv_multipart
        events: Callable[[int], Any] = shadow.get
        on_message = self._on_message
        assert self._loop is not None
        time = self._loop.time
        # Whether the last message was there without waiting: then the next
        # one probably is too, and trying costs one exception per burst; after
        # a wait an EVENTS check is cheaper than that exception.
        busy = False
        while True:
            try:
                if busy or events(_EVENTS) & _POLLIN:
                    try:
                        parts = recv_multipart(_NOBLOCK)
                    except zmq.Again:
                        parts = None
                else:
                    parts = None
                busy = parts is not None
                if parts is None:
                    parts = await socket.recv_multipart()
                self._handling = True
                try:
                    on_message(parts, time())
                finally:
                    self._handling = False
            except zmq.ZMQError as exc:
                if self.closing:
                    return
                log.error("receiving on %s failed: %s", self.address, exc)
                return
            except Exception:
                log.exception("handling a message on %s failed", self.address)

    def _send_to(self, identity: bytes, frame: bytes) -> bool:
        """Hand a message to ZeroMQ; False if the peer has gone."""
        shadow = self._shadow
        if shadow is None:
            self.undeliverable += 1
            return False
        there = True
        try:
            shadow.send(identity, _NOBLOCK_SNDMORE)
            shadow.send(frame, _NOBLOCK)
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the peer has gone; EAGAIN: it stopped reading and
            # its queue is full. Either way nobody will read this answer.
            self.undeliverable += 1
            there = exc.errno != zmq.EHOSTUNREACH
        if not self._handling and self._socket is not None and self._events(_EVENTS) & _POLLIN:
            # A send may consume the wake-up ZeroMQ's (edge-triggered) file
            # descriptor had pending for a message that arrived meanwhile;
            # zmq.asyncio re-checks the events on get() and wakes the reader.
            self._socket.get(_EVENTS)
        return there

    # messages -------------------------------------------------------------------------

    def _on_message(self, parts: list[bytes], now: float) -> None:
        identity = parts[0]
        peer = self._peers.get(identity)
        if peer is None:
            peer = self._peers[identity] = _Peer(now, _PeerLink(self, identity))
            if self._window:
                # A new connection behind this identity: tell it our window; the
                # client answers with its own SETTINGS (docs/wire.md, "ZeroMQ").
                self._send_to(identity, self._settings)
            if now >= self._next_prune:
                self._prune(now)
        else:
            peer.last_seen = now
        if len(parts) != 2:
            self._refuse(identity, peer, ProtocolError("a message of several parts"))
            return
        data = parts[1]
        size = len(data)
        if size >= HEADER_SIZE:
            version, frame_type, _flags, length, request_id, deadline_ms = _unpack_header(data)
            # Fast path for the frame that makes up nearly all traffic; the
            # exact length also bounds it, since ZeroMQ enforces MAXMSGSIZE.
            if (
                frame_type == _REQUEST
                and version == VERSION
                and request_id
                and length == size - HEADER_SIZE
                and not _flags & 1  # FLAG_MORE: a streamed request's head
            ):
                self._on_request(
                    identity, peer, request_id, data[HEADER_SIZE:], deadline_ms, _flags
                )
                return
        try:
            frame_type, request_id, deadline_ms = read_header(data, self.options.max_frame_size)
            payload = data[HEADER_SIZE:]
            flags = (data[2] << 8) | data[3]
            if frame_type == _REQUEST:
                self._on_request(identity, peer, request_id, payload, deadline_ms, flags)
            elif frame_type == FrameType.DATA:
                self._on_data(identity, peer, request_id, payload, flags)
            elif frame_type == FrameType.WINDOW_UPDATE:
                credit = peer.answers.get(request_id)
                if credit is not None:
                    try:
                        credit.grant(decode_window_update(payload))
                    except FlowControlError as exc:
                        self._fail_call(identity, peer, request_id, exc)
            elif frame_type == FrameType.SETTINGS:
                settings = Settings.decode(payload)
                peer.greeted = True
                peer.window = settings.initial_window
                peer.stream_ok = FLAG_STREAM_OK if settings.initial_window else 0
            elif frame_type == FrameType.CANCEL:
                assert self._runner is not None
                body = peer.bodies.pop(request_id, None)
                if body is not None:
                    body.fail(ConnectionLost("the caller cancelled the call"))
                if self._runner.cancel((identity, request_id)):
                    peer.running -= 1
            elif frame_type == FrameType.PING:
                self._send_to(identity, encode_frame(FrameType.PONG, 0, payload))
            elif frame_type == _ERROR:
                error = ErrorInfo.decode(payload)
                if request_id == 0:
                    log.warning("a client of %s reported: %s", self.address, error.describe())
            elif frame_type == FrameType.GOAWAY:
                # The client has read every answer it was waiting for.
                peer.draining = False
                self._check_drained()
            elif frame_type == FrameType.PONG:
                pass
            else:
                raise ProtocolError(f"a server does not accept {FrameType(frame_type).name} frames")
        except ProtocolError as exc:
            self._refuse(identity, peer, exc)

    def _on_request(
        self,
        identity: bytes,
        peer: _Peer,
        request_id: int,
        payload: bytes,
        deadline_ms: int,
        flags: int,
    ) -> None:
        if self.closing:
            self._send_to(identity, encode_frame(_ERROR, request_id, _UNAVAILABLE))
            if not peer.draining:
                # A new peer, or one that had answered our GOAWAY: it must
                # read this answer before the socket closes, so ask again.
                self._send_goaway(identity, peer)
            return
        runner = self._runner
        assert runner is not None
        key = (identity, request_id)
        if key in runner:
            # Answering would also answer the running call: drop it. Ids are
            # not required to increase for the life of an identity, because a
            # client that sets its own ZMQ_ROUTING_ID keeps it across restarts.
            self._refuse(identity, peer, ProtocolError(f"request id {request_id} reused"))
            return
        limit = self.options.max_in_flight
        if peer.running >= limit:
            # No connection to close: refuse this request alone, unstarted.
            self.overloaded += 1
            info = ErrorInfo(ErrorCode.TOO_MANY_IN_FLIGHT, f"more than {limit} requests in flight")
            self._send_to(identity, encode_frame(_ERROR, request_id, info.encode()))
            return
        if flags & FLAG_MORE:
            if not self._window or not peer.greeted:
                # This identity never learnt our window: a client that streamed
                # to an earlier connection (we restarted) or a server without
                # streams. Not started: safe to send again, whole or after SETTINGS.
                info = ErrorInfo(
                    ErrorCode.UNAVAILABLE,
                    "no streamed request body before SETTINGS"
                    if self._window
                    else "this server takes whole requests only",
                )
                self._send_to(identity, encode_frame(_ERROR, request_id, info.encode()))
                return
            peer.running += 1
            if request_id > peer.last_request_id:
                peer.last_request_id = request_id
            assert self._loop is not None
            body = RequestBody(
                peer.link,
                self._loop,
                request_id,
                self._window,
                self.options.stream_idle_timeout,
                deadline_ms,
            )
            peer.bodies[request_id] = body
            runner.start(key, payload, deadline_ms, flags & peer.stream_ok, body)
            return
        peer.running += 1
        if request_id > peer.last_request_id:
            peer.last_request_id = request_id
        runner.start(key, payload, deadline_ms, flags & peer.stream_ok)

    def _on_data(
        self, identity: bytes, peer: _Peer, request_id: int, payload: bytes, flags: int
    ) -> None:
        body = peer.bodies.get(request_id)
        if body is None:
            return  # answered, cancelled, or refused: dropped
        try:
            ended = body.receive(payload, flags & FLAG_MORE != 0)
        except FlowControlError as exc:
            self._fail_call(identity, peer, request_id, exc)
            return
        if ended:
            del peer.bodies[request_id]
            # The call's deadline counts from its body's end (docs/wire.md).
            if self._runner is not None:
                self._runner.body_ended((identity, request_id), body.deadline_ms)

    def _fail_call(
        self, identity: bytes, peer: _Peer, request_id: int, error: FlowControlError
    ) -> None:
        """A flow-control violation: no connection to close, so that call ends (ERROR)."""
        self.dropped += 1
        if _should_log(self.dropped):
            log.warning("a client of %s broke flow control: %s", self.address, error)
        body = peer.bodies.pop(request_id, None)
        if body is not None:
            body.fail(ConnectionLost(str(error)))
        assert self._runner is not None
        if self._runner.cancel((identity, request_id)):
            peer.running -= 1
        info = ErrorInfo(ErrorCode.FLOW_CONTROL, str(error))
        self._send_to(identity, encode_frame(_ERROR, request_id, info.encode()))

    def _answer(
        self, key: Any, result: bytes | StreamedAnswer | None, error: ErrorInfo | None
    ) -> None:
        identity, request_id = key
        peer = self._peers.get(identity)
        if peer is not None:
            if peer.bodies:
                # Answered before its request body ended: later DATA is dropped.
                body = peer.bodies.pop(request_id, None)
                if body is not None:
                    body.fail(ConnectionLost("the call was answered"))
            if result is not None and not isinstance(result, bytes):
                self._start_answer(key, peer, result)
                return
            peer.running -= 1
        if result is not None and not isinstance(result, bytes):
            return  # its peer is gone
        if result is not None:
            limit = self.options.max_frame_size
            if len(result) <= limit:
                self._send_to(identity, encode_response(request_id, result))
                return
            log.error("response to request %d is over the frame limit", request_id)
            error = ErrorInfo(
                ErrorCode.INTERNAL,
                f"ValueError: response of {len(result)} bytes exceeds the frame limit of {limit}",
            )
        assert error is not None
        self._send_to(identity, encode_frame(_ERROR, request_id, error.encode()))

    def _start_answer(self, key: Any, peer: _Peer, answer: StreamedAnswer) -> None:
        """A StreamedAnswer: in flight (and counted running) until its task ends."""
        if self._loop is None or self._runner is None or self._socket is None:
            return  # closed: nobody to send it to
        credit = AnswerCredit(self._loop, peer.window)
        if peer.window:
            peer.answers[key[1]] = credit
        task = self._loop.create_task(
            self._run_answer(key, peer, answer, credit), name=f"pitcher-answer {key[1]}"
        )
        self._runner.adopt(key, task)

    async def _run_answer(
        self, key: Any, peer: _Peer, answer: StreamedAnswer, credit: AnswerCredit
    ) -> None:
        identity, request_id = key
        task = asyncio.current_task()
        limit = self.options.max_frame_size
        whole: bytes | None = None
        error: ErrorInfo | None = None
        try:
            if peer.window:
                await send_streamed_answer(
                    peer.link, request_id, answer, credit, min(limit, 1 << 20)
                )
            else:
                # The client announced no window: gathered, within the frame limit.
                try:
                    whole = await gather_answer(answer, limit)
                except Exception as exc:
                    log.error("streamed answer to request %d failed", request_id, exc_info=exc)
                    error = ErrorInfo(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        finally:
            peer.answers.pop(request_id, None)
            assert self._runner is not None and task is not None
            if self._runner.tasks.get(key) is task:
                # Not cancelled (a CANCEL counts itself): this call stops running now.
                peer.running -= 1
            self._runner.release(key, task)
        if whole is not None:
            self._send_to(identity, encode_response(request_id, whole))
        elif error is not None:
            self._send_to(identity, encode_frame(_ERROR, request_id, error.encode()))

    def _on_settled(self) -> None:
        if self.closing:
            self._check_drained()

    # graceful close -----------------------------------------------------------------

    def _send_goaway(self, identity: bytes, peer: _Peer) -> None:
        info = GoAwayInfo(peer.last_request_id, "server is shutting down")
        peer.draining = self._send_to(identity, encode_frame(FrameType.GOAWAY, 0, info.encode()))

    def _drained(self) -> bool:
        if self._runner:
            return False
        return not any(peer.draining for peer in self._peers.values())

    def _check_drained(self) -> None:
        if self._idle is not None and self._drained():
            self._idle.set()

    def _remind_draining_peers(self) -> None:
        # ZeroMQ does not tell a ROUTER that a peer went away, but with
        # ROUTER_MANDATORY a message to it fails: repeating the GOAWAY finds
        # the gone (not waited for) and reminds a client whose answer was lost.
        for identity, peer in self._peers.items():
            if peer.draining:
                self._send_goaway(identity, peer)

    def _refuse(self, identity: bytes, peer: _Peer, error: ProtocolError) -> None:
        self.dropped += 1
        if _should_log(self.dropped):
            log.warning(
                "%s dropped a malformed message (%d so far): %s", self.address, self.dropped, error
            )
        if not peer.error_sent:
            peer.error_sent = True
            self._send_to(
                identity, encode_frame(_ERROR, 0, ErrorInfo(error.code, str(error)).encode())
            )

    def _prune(self, now: float) -> None:
        self._next_prune = now + PEER_IDLE / 4
        since = now - PEER_IDLE
        idle = [
            identity
            for identity, peer in self._peers.items()
            if not peer.running and not peer.draining and peer.last_seen <= since
        ]
        for identity in idle:
            del self._peers[identity]
