"""The client side of the ZeroMQ carrier: one DEALER socket per node.

The socket carries many calls at once, matched by request id; answers may
come back in any order. ZeroMQ connects and reconnects in the background and
has no handshake, so there is no connection to pool: :meth:`ZmqClient.ping`
is how a caller learns that the node answers.

A request is handed to ZeroMQ with a non-blocking send straight from the
caller. ``IMMEDIATE`` is set, so ZeroMQ takes a message only when a node is
connected and its queue has room; otherwise (``zmq.Again``) the request
waits in zmq.asyncio's send queue, in order, at most ``connect_timeout``
(then ``ConnectError``) or until its deadline (then ``DeadlineExceeded``),
both with ``sent=False``. Once a request has waited ``connect_timeout`` in
vain, the node counts as unreachable and later ones fail at once with
``ConnectError`` until ZeroMQ takes a message again.

One task per socket reads answers and hands them to the calls' receivers.
The calls are a :class:`~transports.calls.CallTable`, whose one timer, armed
for the earliest deadline or queued request's give-up time, serves them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from .base import ClientOptions
from .bodies import IncomingBody, OutgoingBody
from .calls import (
    AwaitableCalls,
    CallTable,
    Receiver,
    deliver_error,
    deliver_response,
    error_for,
)
from .control import ErrorInfo, GoAwayInfo, Settings, decode_window_update
from .errors import (
    CallError,
    Closed,
    ConnectError,
    ConnectionLost,
    DeadlineExceeded,
    FlowControlError,
    ProtocolError,
    Rejected,
    RequestTooLarge,
)
from .frame import (
    FLAG_MORE,
    FLAG_STREAM_OK,
    HEADER,
    HEADER_SIZE,
    VERSION,
    FrameType,
    encode_data,
    encode_frame,
    encode_window_update,
)
from .zeromq_io import endpoint_of, new_socket, parse_zmq_address, read_header, shared_context
from .zeromq_io import should_log as _should_log

log = logging.getLogger("pitcher.transports")

# Plain ints: pyzmq's constants are enums, whose operators run in Python.
_NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_RESPONSE = FrameType.RESPONSE
_unpack_header = HEADER.unpack_from
# ClientOptions.backoff_max (2 s) paces the stream carrier's connect attempts,
# each of which fails calls. Here a reconnect attempt is a background SYN and
# waiting longer than needed only delays a restarted node, so keep it short.
_RECONNECT_IVL_MAX = 0.5
_NOTHING_PENDING = GoAwayInfo(0, "no call pending").encode()


class ZmqClient(AwaitableCalls):
    """Multiplexed client for one node over a ZeroMQ DEALER socket."""

    def __init__(self, address: str, options: ClientOptions | None = None) -> None:
        self.address = address
        self.options = options or ClientOptions()
        self._endpoint, self._ipv6 = endpoint_of(parse_zmq_address(address))
        self._max_request = self.options.max_frame_size
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        # The synchronous send of a plain socket sharing the DEALER: a future
        # per request (what zmq.asyncio's send returns) costs time for nothing
        # when ZeroMQ takes the message at once, as it nearly always does.
        self._send: Callable[..., Any] | None = None
        self._events: Callable[[int], Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.Task[None] | None = None
        # True while the reader awaits the socket: a send made then must
        # re-check the socket's events (see _poke_reader).
        self._reader_waiting = False
        self._calls = CallTable(self)
        # The table's own dict (it stays the same object): the reader pops from it.
        self._pending: dict[int, Receiver] = self._calls.pending
        # Requests ZeroMQ did not take at once: id -> (send future, give up at).
        self._queued: dict[int, tuple[asyncio.Future[Any], float]] = {}
        # Since when ZeroMQ has refused to take a message, if it does now.
        self._blocked_since: float | None = None
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        self._ping_count = 0
        # The node said GOAWAY and waits for ours: sent once no request that
        # left is unanswered, so that it knows we have read every answer.
        self._goaway_seen = False
        self._closed = False
        self.late_responses = 0
        # Malformed messages received and dropped.
        self.dropped = 0
        # Streamed bodies: the node's window (0 until its SETTINGS says more), its
        # frame limit, our SETTINGS, and the request bodies being sent.
        self._server_window = 0
        self._server_max_frame = self._max_request
        self._settings = encode_frame(
            FrameType.SETTINGS,
            0,
            Settings(self.options.max_frame_size, 0, self.options.initial_window).encode(),
        )
        self._outgoing: dict[int, OutgoingBody] = {}

    # public ---------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def connection_count(self) -> int:
        """1 while the socket is open: ZeroMQ hides the connection behind it."""
        return 0 if self._socket is None or self._socket.closed else 1

    def send(
        self, payload: bytes, receiver: Receiver, stream_response: bool = False, _more: int = 0
    ) -> None:
        """Send one request; its outcome goes to ``receiver`` (possibly before this returns).

        ``stream_response``: the node may stream its answer (STREAM_OK); ``receiver``
        is then a :class:`~transports.calls.StreamReceiver`.
        """
        if self._closed:
            receiver.on_error(Closed(f"client for {self.address} is closed"))
            return
        if len(payload) > self._max_request:
            receiver.on_error(
                RequestTooLarge(
                    f"request of {len(payload)} bytes exceeds the frame limit"
                    f" of {self._max_request} bytes"
                )
            )
            return
        send = self._send
        if send is None:
            try:
                send = self._open()
            except ConnectError as exc:
                receiver.on_error(exc)
                return
        loop = self._loop
        assert loop is not None
        remaining = receiver.deadline - loop.time()
        if remaining <= 0:
            receiver.on_error(DeadlineExceeded("deadline passed before sending", sent=False))
            return
        calls = self._calls
        frame = (
            calls.request_header(
                receiver,
                len(payload),
                remaining,
                (FLAG_STREAM_OK if stream_response else 0) | _more,
            )
            + payload
        )
        request_id = calls.last_id()
        error: ConnectError | None = None
        if self._queued:
            # Stay behind the requests already waiting for the node.
            error = self._enqueue(request_id, frame)
        else:
            try:
                send(frame, _NOBLOCK)
            except zmq.Again:
                error = self._enqueue(request_id, frame)
            except zmq.ZMQError as exc:
                error = self._connect_error(f"cannot send: {exc}")
            else:
                self._blocked_since = None
                if self._reader_waiting:
                    self._poke_reader()
        if error is not None:
            del self._pending[request_id]
            receiver.on_error(error)

    @property
    def supports_streaming(self) -> bool:
        return True

    @property
    def node_window(self) -> int:
        """The node's SETTINGS initial_window (0: it takes whole requests only, or has
        not spoken yet); a streamed request goes out only when it is above 0."""
        return self._server_window

    def send_stream(
        self, payload: bytes, receiver: Receiver, stream_response: bool = True
    ) -> OutgoingBody:
        """Send a request whose body follows: ``payload`` is its head (REQUEST with MORE).

        As :meth:`transports.stream_client.StreamClient.send_stream`. Only to a
        node whose SETTINGS announced a window; otherwise the body is gathered
        into one whole REQUEST at ``end()`` (RequestTooLarge over the frame limit).
        """
        flags = FLAG_STREAM_OK if stream_response else 0
        body = OutgoingBody(self, receiver, payload, flags)
        window = self._server_window
        if not window or self._closed:
            body.bind_whole(self._max_request)
            return body
        self.send(payload, receiver, stream_response, FLAG_MORE)
        request_id = self._calls.last_id()
        if self._pending.get(request_id) is not receiver:
            body.stop()  # refused at once: the receiver has its error
            return body
        self._outgoing[request_id] = body
        queued = self._queued.get(request_id)
        if queued is None:
            body.bind_stream(self, request_id, window, self._server_max_frame)
        else:
            # DATA must not overtake its head, which waits in zmq.asyncio's queue.
            queued[0].add_done_callback(
                functools.partial(self._head_sent, request_id, body, window)
            )
        return body

    def _head_sent(
        self, request_id: int, body: OutgoingBody, window: int, future: asyncio.Future[Any]
    ) -> None:
        if future.cancelled() or future.exception() is not None or request_id not in self._pending:
            self._outgoing.pop(request_id, None)
            body.stop()
            return
        body.bind_stream(self, request_id, window, self._server_max_frame)

    def send_whole(self, payload: bytes, receiver: Receiver, flags: int) -> None:
        self.send(payload, receiver, flags & FLAG_STREAM_OK != 0)

    # the bodies' BodyLink ----------------------------------------------------------------

    def send_data(self, request_id: int, data: bytes, more: bool) -> None:
        if not more:
            self._outgoing.pop(request_id, None)
        if not self._send_now(encode_data(request_id, data, more)):
            # A DATA lost would corrupt the body: the call ends instead.
            self._outgoing.pop(request_id, None)
            receiver = self._pending.pop(request_id, None)
            self.call_expired(request_id)
            if receiver is not None:
                deliver_error(
                    receiver, ConnectionLost(f"{self.address}: the request body could not be sent")
                )

    def send_credit(self, request_id: int, increment: int) -> None:
        self._send_now(encode_window_update(request_id, increment))

    def drop_call(self, request_id: int) -> None:
        self._give_up(request_id)

    def watch(self, when: float) -> None:
        self._calls.wake_at(when)

    def time(self) -> float:
        loop = self._loop
        assert loop is not None
        return loop.time()

    def _send_now(self, frame: bytes) -> bool:
        send = self._send
        if send is None:
            return False
        try:
            send(frame, _NOBLOCK)
        except zmq.ZMQError:
            return False
        if self._reader_waiting:
            self._poke_reader()
        return True

    def give_up(self, receiver: Receiver) -> None:
        self.cancel(receiver)

    def cancel(self, receiver: Receiver) -> None:
        """The caller gives up: forget the call and tell the node (CANCEL). No callback follows."""
        request_id = self._calls.cancel(receiver)
        if request_id:
            self.call_expired(request_id)

    async def ping(self, timeout: float = 1.0) -> None:
        """Wait for the node to answer a PING; ConnectError if no PONG comes within ``timeout``."""
        if self._closed:
            raise Closed(f"client for {self.address} is closed")
        if self._send is None:
            self._open()
        socket = self._socket
        assert socket is not None and self._loop is not None
        self._ping_count += 1
        token = self._ping_count.to_bytes(8, "big")
        pong: asyncio.Future[None] = self._loop.create_future()
        self._pings[token] = pong
        try:
            async with asyncio.timeout(timeout):
                # zmq.asyncio's send waits until a node is connected.
                await socket.send(encode_frame(FrameType.PING, 0, token))
                if self._reader_waiting:
                    self._poke_reader()
                await pong
        except TimeoutError:
            raise ConnectError(f"{self.address}: no answer to a ping within {timeout}s") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                # The socket was closed under the pending send, not this task cancelled.
                raise Closed(f"client for {self.address} closed") from None
            raise
        finally:
            self._pings.pop(token, None)

    async def close(self, timeout: float = 5.0) -> None:
        """Stop new calls, let in-flight ones finish (at most ``timeout``), then close."""
        self._closed = True
        give_up_at = time.monotonic() + timeout
        while self._pending and time.monotonic() < give_up_at:
            await asyncio.sleep(0.005)
        reader = self._reader
        self.abort()
        if reader is not None:
            # wait() rather than awaiting the task: its CancelledError is not ours.
            await asyncio.wait((reader,))

    def abort(self) -> None:
        """Close the socket now; calls in flight fail with ConnectionLost."""
        self._closed = True
        outgoing, self._outgoing = self._outgoing, {}
        for body in outgoing.values():
            body.stop()
        self._calls.close()
        pending = list(self._pending.items())
        self._pending.clear()
        queued, self._queued = self._queued, {}
        for future, _ in queued.values():
            future.cancel()
        lost = ConnectionLost(f"client for {self.address} closed with the call in flight")
        not_sent = Closed(f"client for {self.address} closed before the request left")
        for request_id, receiver in pending:
            deliver_error(receiver, not_sent if request_id in queued else lost)
        pings, self._pings = self._pings, {}
        for pong in pings.values():
            if not pong.done():
                pong.set_exception(Closed(f"client for {self.address} closed"))
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        socket, context = self._socket, self._context
        self._send = self._events = None
        self._context = None
        if socket is not None and not socket.closed:
            # LINGER is 0: what ZeroMQ still holds is CANCELs and requests
            # nobody waits for any more.
            socket.close(linger=0)
        if context is not None:
            shared_context.release(context)

    # socket ---------------------------------------------------------------------------

    def _open(self) -> Callable[..., Any]:
        loop = asyncio.get_running_loop()
        options = self.options
        context = shared_context.acquire()
        try:
            socket = new_socket(
                context,
                zmq.DEALER,
                max_frame_size=options.max_frame_size,
                high_water_mark=options.high_water_mark,
                ipv6=self._ipv6,
            )
        except zmq.ZMQError as exc:
            shared_context.release(context)
            raise self._connect_error(f"cannot open a socket: {exc}") from exc
        try:
            # Queue nothing for a node that is not connected: a request would
            # otherwise wait inside ZeroMQ for a restarted node and reach it
            # long after its caller gave up (deadline_ms counts from arrival).
            # With IMMEDIATE a send fails at once (zmq.Again) and we decide.
            socket.setsockopt(zmq.IMMEDIATE, 1)
            socket.setsockopt(zmq.RECONNECT_IVL, max(1, int(options.backoff_initial * 1000)))
            socket.setsockopt(
                zmq.RECONNECT_IVL_MAX,
                max(1, int(min(options.backoff_max, _RECONNECT_IVL_MAX) * 1000)),
            )
            # A SYN into a black hole is retried after this, not after the
            # kernel's minutes-long TCP timeout.
            socket.setsockopt(zmq.CONNECT_TIMEOUT, max(1, int(options.connect_timeout * 1000)))
            socket.connect(self._endpoint)
        except zmq.ZMQError as exc:
            socket.close(linger=0)
            shared_context.release(context)
            raise self._connect_error(f"cannot connect: {exc}") from exc
        shadow: zmq.Socket[Any] = zmq.Socket.shadow(socket.underlying)
        self._loop = loop
        self._calls.bind(loop)
        self._context = context
        self._socket = socket
        self._send = send = shadow.send
        self._events = shadow.get
        self._reader = loop.create_task(
            self._receive_loop(socket, shadow), name=f"pitcher-zmq-client {self.address}"
        )
        return send

    def _connect_error(self, message: str) -> ConnectError:
        return ConnectError(f"{self.address}: {message}")

    def _poke_reader(self) -> None:
        # A send may consume the wake-up that ZeroMQ's (edge-triggered) file
        # descriptor had pending for an answer that arrived meanwhile. If an
        # answer is there, zmq.asyncio's get() re-checks the events and wakes
        # the waiting reader.
        events = self._events
        if events is not None and events(_EVENTS) & _POLLIN and self._socket is not None:
            self._socket.get(_EVENTS)

    async def _receive_loop(self, socket: zmq.asyncio.Socket, shadow: zmq.Socket[Any]) -> None:
        recv = shadow.recv
        more = shadow.get
        on_message = self._on_message
        while True:
            try:
                # Take what is there without a future per message, and await
                # only when the socket is empty: an exception per idle turn
                # is cheaper than an EVENTS check per message under load.
                # With no call pending no answer is due, so wait at once.
                if self._pending:
                    try:
                        data = recv(_NOBLOCK)
                    except zmq.Again:
                        data = None
                else:
                    data = None
                if data is None:
                    self._reader_waiting = True
                    try:
                        data = await socket.recv()
                    finally:
                        self._reader_waiting = False
                if more(_RCVMORE):
                    while more(_RCVMORE):
                        recv(_NOBLOCK)
                    self._drop("a message of several parts; a frame is one part")
                    continue
                on_message(data)
            except zmq.ZMQError as exc:
                if self._closed:
                    return
                log.error("receiving from %s failed: %s", self.address, exc)
                return
            except Exception:
                log.exception("handling a message from %s failed", self.address)

    # calls ----------------------------------------------------------------------------

    def _enqueue(self, request_id: int, frame: bytes) -> ConnectError | None:
        """Let a request wait for ZeroMQ to take it; the error if it fails at once."""
        loop = self._loop
        socket = self._socket
        assert loop is not None and socket is not None
        now = loop.time()
        blocked_since = self._blocked_since
        if blocked_since is None:
            self._blocked_since = blocked_since = now
        give_up_at = blocked_since + self.options.connect_timeout
        if give_up_at <= now:
            return self._connect_error(
                "unreachable: no node connected, or its queue is full,"
                f" for {self.options.connect_timeout}s"
            )
        # zmq.asyncio queues it and sends when the socket can take it, in order.
        future = socket.send(frame)
        assert isinstance(future, asyncio.Future)
        self._queued[request_id] = (future, give_up_at)
        future.add_done_callback(functools.partial(self._on_queued_sent, request_id))
        self._calls.wake_at(give_up_at)
        return None

    def _on_queued_sent(self, request_id: int, future: asyncio.Future[Any]) -> None:
        if self._queued.pop(request_id, None) is None or future.cancelled():
            return  # given up and cancelled by us
        error = future.exception()
        if error is None:
            self._blocked_since = None
            return
        receiver = self._pending.pop(request_id, None)
        if receiver is not None:
            deliver_error(receiver, self._connect_error(f"cannot send: {error}"))

    def _give_up(self, request_id: int) -> bool | None:
        """Forget a call: True if the node may have it (a CANCEL goes out),
        False if it never left, None if it was not pending."""
        if self._pending.pop(request_id, None) is None:
            return None
        return self.call_expired(request_id)

    # the CallTable's questions ---------------------------------------------------------

    def call_expired(self, request_id: int) -> bool:
        """A call its caller stopped waiting for: unsend it if it is still queued
        (False), or CANCEL it at the node (True)."""
        if self._outgoing:
            body = self._outgoing.pop(request_id, None)
            if body is not None:
                body.stop()
        queued = self._queued.pop(request_id, None)
        if queued is not None and queued[0].cancel():
            return False
        send = self._send
        if send is not None:
            # Best effort: the node's own deadline stops the handler anyway.
            with contextlib.suppress(zmq.ZMQError):
                send(encode_frame(FrameType.CANCEL, request_id), _NOBLOCK)
            if self._reader_waiting:
                self._poke_reader()
        if self._goaway_seen:
            self._maybe_say_goaway()
        return True

    def _maybe_say_goaway(self) -> None:
        """After the node's GOAWAY: tell it once nothing that left is unanswered.

        With IMMEDIATE set, ZeroMQ drops the answers a DEALER has received but
        not yet read when the connection ends; a closing node waits for this
        GOAWAY before closing its socket, so no answer is lost that way.
        """
        queued = self._queued
        if any(request_id not in queued for request_id in self._pending):
            return
        self._goaway_seen = False
        send = self._send
        if send is not None:
            # Best effort: a node that does not get it waits until its grace ends.
            with contextlib.suppress(zmq.ZMQError):
                send(encode_frame(FrameType.GOAWAY, 0, _NOTHING_PENDING), _NOBLOCK)
            if self._reader_waiting:
                self._poke_reader()

    def timer_due(self, now: float) -> float:
        """Fail the requests that waited ``connect_timeout`` in the send queue in vain."""
        earliest = math.inf
        stalled: list[int] = []
        for request_id, (future, give_up_at) in self._queued.items():
            if give_up_at <= now and not future.done():
                stalled.append(request_id)
            elif give_up_at < earliest:
                earliest = give_up_at
        for request_id in stalled:
            waiting = self._pending.get(request_id)
            if waiting is None:
                self._queued.pop(request_id)[0].cancel()
            elif self._give_up(request_id) is False:
                deliver_error(
                    waiting,
                    self._connect_error(
                        "no node connected (or its queue stayed full)"
                        f" for {self.options.connect_timeout}s"
                    ),
                )
        return earliest

    # answers --------------------------------------------------------------------------

    def _on_message(self, data: bytes) -> None:
        size = len(data)
        if size >= HEADER_SIZE:
            version, frame_type, _flags, length, request_id, _deadline = _unpack_header(data)
            # Fast path for the frame that makes up nearly all traffic; the
            # exact length also bounds it, since ZeroMQ enforces MAXMSGSIZE.
            if (
                frame_type == _RESPONSE
                and version == VERSION
                and request_id
                and length == size - HEADER_SIZE
                and not _flags  # MORE: a streamed response's head
            ):
                receiver = self._pending.pop(request_id, None)
                if receiver is None:
                    # Its caller gave up (deadline, cancel): drop it.
                    self.late_responses += 1
                    return
                if self._outgoing:
                    self._answered_early(request_id)
                deliver_response(receiver, data[HEADER_SIZE:])
                if self._goaway_seen:
                    self._maybe_say_goaway()
                return
        try:
            frame_type, request_id, _deadline = read_header(data, self.options.max_frame_size)
            self._on_frame(frame_type, request_id, data[HEADER_SIZE:], (data[2] << 8) | data[3])
        except ProtocolError as exc:
            self._drop(str(exc))
        if self._goaway_seen:
            self._maybe_say_goaway()

    def _on_frame(self, frame_type: int, request_id: int, payload: bytes, flags: int) -> None:
        if frame_type == FrameType.DATA:
            entry = self._pending.get(request_id)
            if not isinstance(entry, IncomingBody):
                return  # crossed a CANCEL, or a node's mistake: dropped, no connection to end
            try:
                ended = entry.receive(payload, flags & FLAG_MORE != 0)
            except FlowControlError as exc:
                self._give_up(request_id)
                deliver_error(entry, ConnectionLost(f"{self.address}: {exc}"))
                return
            if ended and self._pending.get(request_id) is entry:
                del self._pending[request_id]
        elif frame_type == FrameType.WINDOW_UPDATE:
            body = self._outgoing.get(request_id)
            if body is not None:
                try:
                    body.credit(decode_window_update(payload))
                except FlowControlError as exc:
                    receiver = self._pending.pop(request_id, None)
                    self.call_expired(request_id)
                    if receiver is not None:
                        deliver_error(receiver, ConnectionLost(f"{self.address}: {exc}"))
        elif frame_type == FrameType.ERROR:
            error = ErrorInfo.decode(payload)
            if request_id == 0:
                # The node dropped something we sent; it keeps serving the rest.
                log.warning("node %s reported: %s", self.address, error.describe())
                return
            receiver = self._pending.pop(request_id, None)
            if self._outgoing:
                self._answered_early(request_id)
            if receiver is None:
                self.late_responses += 1
            elif isinstance(receiver, IncomingBody):
                deliver_error(
                    receiver, ConnectionLost(f"the node cut the response body: {error.describe()}")
                )
            else:
                deliver_error(receiver, error_for(error))
        elif frame_type == _RESPONSE:
            receiver = self._pending.pop(request_id, None)
            if self._outgoing:
                self._answered_early(request_id)
            if receiver is None:
                self.late_responses += 1
            elif flags & FLAG_MORE:
                self._on_response_head(request_id, receiver, payload)
            else:
                deliver_response(receiver, payload)
        elif frame_type == FrameType.GOAWAY:
            info = GoAwayInfo.decode(payload)
            reason = info.reason or "no reason given"
            # Requests past the node's last one crossed its GOAWAY: it will not
            # run them. Later requests still go out; a restarted node takes them.
            refused = [
                request_id
                for request_id in self._pending
                if request_id > info.last_request_id and request_id not in self._queued
            ]
            for request_id in refused:
                deliver_error(
                    self._pending.pop(request_id), Rejected(f"node is going away ({reason})")
                )
            self._goaway_seen = True
        elif frame_type == FrameType.PONG:
            pong = self._pings.pop(payload, None)
            if pong is not None and not pong.done():
                pong.set_result(None)
        elif frame_type == FrameType.PING:
            send = self._send
            if send is not None:
                # Best effort: the node asks again if it cares.
                with contextlib.suppress(zmq.ZMQError):
                    send(encode_frame(FrameType.PONG, 0, payload), _NOBLOCK)
        elif frame_type == FrameType.SETTINGS:
            # A node speaks first to a new connection when it takes streamed
            # bodies: learn its window and answer with ours (docs/wire.md, "ZeroMQ").
            settings = Settings.decode(payload)
            self._server_window = settings.initial_window
            if settings.max_frame_size:
                self._server_max_frame = min(settings.max_frame_size, self._max_request)
            self._send_now(self._settings)
        else:
            raise ProtocolError(f"a client does not accept {FrameType(frame_type).name} frames")

    def _on_response_head(self, request_id: int, receiver: Receiver, payload: bytes) -> None:
        on_head = getattr(receiver, "on_response_head", None)
        if on_head is None or not self.options.initial_window:
            self.call_expired(request_id)
            deliver_error(receiver, CallError("the node streamed a response nobody asked for"))
            return
        idle = getattr(receiver, "timeout", 0.0) or self.options.stream_idle_timeout
        body = IncomingBody(self, request_id, self.options.initial_window, idle)
        self._pending[request_id] = body
        self._calls.wake_at(body.deadline)
        try:
            on_head(payload, body)
        except Exception:
            log.exception("a receiver failed on a response head from %s", self.address)
            body.abort()

    def _answered_early(self, request_id: int) -> None:
        body = self._outgoing.pop(request_id, None)
        if body is not None:
            body.stop()

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        if _should_log(self.dropped):
            log.warning(
                "dropped a malformed message from %s (%d so far): %s",
                self.address,
                self.dropped,
                reason,
            )
