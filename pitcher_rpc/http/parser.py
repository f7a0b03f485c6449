"""Sans-IO HTTP/1.1 request parser: bytes in, requests out.

httptools (llhttp in its strict mode) does the parsing; this module adds the
checks llhttp leaves to the application and turns every refusal into an
:class:`HttpError` that carries the status to answer with.

What llhttp already refuses, so that the hot path does not check it again:
methods it does
not know, bytes outside the request-target alphabet, malformed versions, bare
CR or LF, invalid header names (a space before the colon included), CTLs and
NUL in values, obs-fold, a Content-Length that is not a number, duplicated,
a list or over 2**64-1, Content-Length together with Transfer-Encoding,
"chunked" followed by another coding or given twice, bad chunk framing.

What is added here: only HTTP/1.0 and HTTP/1.1 (llhttp also takes 0.9 and 2.0),
CONNECT refused, fragments and malformed percent-escapes refused, asterisk-form
only as ``OPTIONS *``, transfer codings other than a final "chunked" refused,
Transfer-Encoding on HTTP/1.0 refused, unknown expectations refused, size
limits enforced while bytes arrive, trailing whitespace stripped from values,
and an ``Upgrade`` request treated as an ordinary one.

Host (RFC 9112 §3.2): required on HTTP/1.1, at most one field on any version,
and its value a non-empty authority (reg-name or IP literal, optional port, no
userinfo; RFC 9110 §4.2.1 makes an http URI with an empty host invalid), else
400; an HTTP/1.0 request may leave it out. An absolute-form target (RFC 9112
§3.2.2) must be http(s) with a valid, non-empty authority and no userinfo;
that authority replaces Host: it is the request's ``host`` and the value of
its Host field (added if the request had none), so that routing and whatever
the request is forwarded to see one and the same host. ``OPTIONS`` with an
absolute-form target with an empty path and no query is ``OPTIONS *``
(RFC 9112 §3.2.4).

Streamed bodies (``stream_over`` >= 0): a request whose body is chunked or
longer than ``stream_over`` bytes is handed out at its head, with a
:class:`BodyStream` that its body arrives on piece by piece (``max_body_size``
still bounds the total), unless the whole body came in the same ``feed`` as
the head: nobody has seen the request yet, so it is handed out whole as any
other. A violation inside a streamed body raises as any other; the stream is
``stream`` until its body ends, for the caller to tell its consumer.

A violation raises :class:`HttpError`; the complete requests that came before
it in the same ``feed`` are on the exception as ``requests``. After an error
the parser is dead and raises the same error again: the caller answers it and
closes the connection. After a request that ends the connection (``keep_alive``
false) later bytes are ignored, as RFC 9112 §9.6 requires.
"""

from __future__ import annotations

import ipaddress
import re
from types import SimpleNamespace
from typing import Final, NoReturn

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserInvalidMethodError,
    HttpParserInvalidURLError,
    HttpParserUpgrade,
    HttpRequestParser,
)

from .request import BodyStream, HttpError, HttpLimits, HttpRequest

__all__ = ["BodyStream", "HttpError", "HttpLimits", "HttpRequest", "RequestParser"]

# The two spaces and "HTTP/1.1", added to the method and target lengths to get
# the request-line length before the version has arrived.
_REQUEST_LINE_OVERHEAD: Final = len(b"  HTTP/1.1")
_SUPPORTED_VERSIONS: Final = frozenset(("1.0", "1.1"))
# llhttp accepts "RTSP/1.0" and "ICE/1.0" in place of "HTTP/x.y" and does not
# say which it saw; a method that only RTSP defines gives such a request away.
_RTSP_ONLY_METHODS: Final = frozenset(
    b"DESCRIBE ANNOUNCE SETUP PLAY PAUSE TEARDOWN GET_PARAMETER SET_PARAMETER REDIRECT RECORD "
    b"FLUSH".split()
)
# RFC 3986 host (an IPv6 literal or a reg-name, IPvFuture left out) and port;
# what is inside the brackets is checked as an IPv6 address besides.
_AUTHORITY: Final = re.compile(
    rb"(?:\[([0-9A-Fa-f:.]+)\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+)(?::[0-9]{0,5})?"
)
# RFC 3986 appendix B, with the fragment left out: llhttp has vetted the
# characters, so the split is all that is left to do.
_ABSOLUTE_FORM: Final = re.compile(rb"([A-Za-z][A-Za-z0-9+\-.]*)://([^/?#]*)([^?#]*)(?:\?([^#]*))?")
_HTTP_SCHEMES: Final = frozenset((b"http", b"https"))
# Fields besides Host that decide how a request is framed or answered.
_FRAMING_HEADERS: Final = frozenset((b"content-length", b"transfer-encoding", b"expect"))
_BAD_PERCENT_ESCAPE: Final = re.compile(rb"%(?![0-9A-Fa-f]{2})")
# llhttp's texts for the two version errors that deserve 505 rather than 400;
# httptools gives no error number, only the text.
_UNSUPPORTED_VERSION_REASON: Final = "Invalid HTTP version"
_HTTP2_PREFACE_REASON: Final = "Pause on PRI/Upgrade"


_DEFAULT_LIMITS: Final = HttpLimits()


def valid_authority(authority: bytes) -> bool:
    """Whether ``authority`` is ``host[:port]`` as Host (and an http URI) must carry it.

    Not empty, no userinfo, an IPv6 literal only if it is a real address.
    """
    match = _AUTHORITY.fullmatch(authority)
    if match is None:
        return False
    literal = match.group(1)
    if literal is not None:
        try:
            ipaddress.IPv6Address(literal.decode("ascii"))
        except ValueError:
            return False
    return True


# What a closed parser holds instead of its httptools parser (never fed).
_DETACHED: Final = HttpRequestParser(SimpleNamespace())


class RequestParser:
    """Turns the bytes of one connection into :class:`HttpRequest` objects.

    httptools calls the ``_on_*`` methods while ``feed_data`` runs; they build
    the request in scratch attributes and append it to ``_done`` when complete.
    Scratch state is reset per request in ``_on_message_begin`` rather than
    kept in a separate object: one attribute store is cheaper than an extra
    object and its lookups on every callback.
    """

    __slots__ = (
        "_body_parts",
        "_body_size",
        "_chunk_mark",
        "_closed",
        "_done",
        "_error",
        "_feeds",
        "_headers_done",
        "_last_host",
        "_limits",
        "_max_body_size",
        "_max_header_size",
        "_max_headers",
        "_max_target",
        "_messages",
        "_method",
        "_names",
        "_parser",
        "_pending_error",
        "_request",
        "_stream_feed",
        "_stream_over",
        "_synthetic",
        "_target",
        "_transfer_encoding",
        "_unreported",
        "_upgrading",
        "_values",
        "_watch",
        "in_request",
        "stream",
    )

    def __init__(
        self,
        limits: HttpLimits | None = None,
        watch: frozenset[bytes] = frozenset(),
        stream_over: int = -1,
    ) -> None:
        limits = limits or _DEFAULT_LIMITS
        self._limits = limits
        # Lower-case names the caller wants flagged (HttpRequest.watched), so it
        # can skip its own scan of the headers when none of them is present.
        self._watch = watch
        # Copied out of the dataclass: callbacks read them on every header.
        self._max_target = limits.max_request_line - _REQUEST_LINE_OVERHEAD
        self._max_header_size = limits.max_header_size
        self._max_headers = limits.max_headers
        self._max_body_size = limits.max_body_size
        self._parser = self._new_httptools_parser()
        self._done: list[HttpRequest] = []
        self._error: HttpError | None = None
        self._pending_error: HttpError | None = None
        self._closed = False
        # True once any byte of a request not yet complete has been received:
        # tells a slow request (408) from an idle keep-alive connection. Empty
        # lines between requests, which RFC 9112 §2.2 lets a server skip, do
        # not count. A plain attribute: read once per read from the client.
        self.in_request = False
        self._headers_done = False
        self._upgrading = False
        self._synthetic = False
        self._messages = 0
        self._unreported = 0
        self._last_host: bytes | None = None
        self._request: HttpRequest | None = None
        # Scratch state of the request being parsed, reset by _on_message_begin.
        self._target = b""
        self._method: bytes | None = None
        # Field names and values as llhttp reports them, checked and lowered
        # in bulk once the head is complete (a Python call per field is the
        # cost: see _on_headers_complete); then the trailer fields, if any.
        self._names: list[bytes] = []
        self._values: list[bytes] = []
        self._transfer_encoding: bytes | None = None
        self._body_parts: list[bytes] = []
        self._body_size = 0
        self._chunk_mark = -1
        # Bodies chunked or longer than this are streamed; negative: none is.
        self._stream_over = stream_over
        # The body of the request being parsed, when it is streamed.
        self.stream: BodyStream | None = None
        # feed() calls so far, and the one that ended the streamed head: a
        # body complete in that same call is handed out whole after all.
        self._feeds = 0
        self._stream_feed = -1

    @property
    def limits(self) -> HttpLimits:
        return self._limits

    @property
    def headers_complete(self) -> bool:
        """True when the current (incomplete) request's head is fully received."""
        return self.in_request and self._headers_done

    @property
    def pending_expect_continue(self) -> bool:
        """True when the current request asked for 100-continue and no body byte came yet."""
        request = self._request
        return (
            self.in_request
            and self._headers_done
            and request is not None
            and request.expect_continue
            and self._body_size == 0
        )

    def close(self) -> None:
        """The connection is gone: later feeds are ignored.

        Drops the httptools parser, and with it the reference cycle through
        its callbacks, so reference counting frees both at once rather than
        the cyclic collector later (short connections would feed it).
        """
        self._closed = True
        self._parser = _DETACHED

    def feed(self, data: bytes) -> list[HttpRequest]:
        """Feed bytes; return the requests they completed, in order.

        Raises HttpError on a request that must be refused; the requests
        completed before it in the same call are on the exception's
        ``requests``. After an error every later call raises the same error.
        """
        error = self._error
        if error is not None:
            raise HttpError(error.status, error.reason)
        if self._closed:
            return []
        done: list[HttpRequest] = []
        self._done = done
        self._feeds += 1
        continuing = self.in_request
        mark = self._progress_mark() if continuing else None
        try:
            try:
                self._parser.feed_data(data)
            except (HttpParserUpgrade, HttpParserError) as exc:
                self._recover(data, exc)
            if self.in_request and not self._closed:
                if self._names:
                    # A head (or trailer) still arriving: its fields so far
                    # are held to the limits after every read.
                    self._check_fields()
                if continuing and self._progress_mark() == mark:
                    # httptools buffers a header line internally until it ends
                    # and reports nothing meanwhile, so its size is bounded here.
                    self._unreported += len(data)
                    self._check_unreported()
                else:
                    self._unreported = 0
        except HttpError as exc:
            exc.requests = done
            self._error = exc
            raise
        return done

    # -- driving httptools -------------------------------------------------

    def _recover(self, data: bytes, exc: HttpParserUpgrade | HttpParserError) -> None:
        """Handle what feed_data() raised, feeding the rest of `data` as needed."""
        while isinstance(exc, HttpParserUpgrade):
            # Raised after the head of an Upgrade request; args[0] is where
            # the bytes after that head start in `data`.
            data = data[exc.args[0] :]
            self._resume_after_upgrade()
            if not data or self._closed:
                return
            try:
                self._parser.feed_data(data)
                return
            except (HttpParserUpgrade, HttpParserError) as again:
                exc = again
        pending = self._pending_error
        if pending is not None:
            raise pending from None
        if self._closed:
            return  # bytes after a connection-ending request are ignored
        if isinstance(exc, HttpParserCallbackError) and exc.__context__ is not None:
            # A bug in a callback, not a bad request: let it show.
            raise exc.__context__ from None
        raise self._translate(exc) from None

    def _translate(self, exc: HttpParserError) -> HttpError:
        reason = str(exc)
        if reason == _UNSUPPORTED_VERSION_REASON:
            # llhttp has stored the digits before refusing them. RFC 9110 §2.5
            # would have 1.2 treated as 1.1, but llhttp only takes it with
            # set_dangerous_leniencies(), which this parser never calls.
            return HttpError(505, f"HTTP/{self._parser.get_http_version()} is not supported")
        if reason == _HTTP2_PREFACE_REASON:
            return HttpError(505, "HTTP/2 is not supported")
        if isinstance(exc, HttpParserInvalidMethodError):
            return HttpError(400, "invalid method")
        if isinstance(exc, HttpParserInvalidURLError):
            return HttpError(400, "invalid request-target")
        return HttpError(400, reason[:1].lower() + reason[1:])

    def _resume_after_upgrade(self) -> None:
        """Carry on after httptools stopped at an Upgrade request's head.

        RFC 9110 §7.8 lets a server ignore Upgrade, so the request is an
        ordinary one. llhttp, though, has skipped its body and stays paused;
        a fresh parser is given a made-up head with the same framing so that
        it frames the body and whatever follows. The made-up head's callbacks
        leave the real request alone (see ``_synthetic``).
        """
        request = self._request
        assert request is not None
        self._upgrading = False
        self._parser = self._new_httptools_parser()
        content_length = request.content_length
        if self._transfer_encoding is not None:
            framing = b"transfer-encoding: chunked\r\n"
        elif content_length:
            framing = b"content-length: %d\r\n" % content_length
        else:
            self._finish(request)
            return
        head = [b"PUT / HTTP/1.1\r\n", framing]
        if not request.keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        self._synthetic = True
        self._parser.feed_data(b"".join(head))

    def _new_httptools_parser(self) -> HttpRequestParser:
        # httptools looks callbacks up by name on the object it is given; a
        # namespace keeps them off this class's public surface.
        callbacks = SimpleNamespace(
            on_message_begin=self._on_message_begin,
            on_url=self._on_url,
            on_header=self._on_header,
            on_headers_complete=self._on_headers_complete,
            on_body=self._on_body,
            on_chunk_header=self._on_chunk_header,
            on_message_complete=self._on_message_complete,
        )
        return HttpRequestParser(callbacks)

    def _progress_mark(self) -> tuple[int, bool, int, int, int]:
        """Changes whenever httptools reports anything about the current request."""
        return (
            self._messages,
            self._headers_done,
            len(self._target),
            len(self._names),
            self._body_size,
        )

    def _fields_size(self) -> int:
        """Bytes of the fields received so far, as ``name: value CRLF`` each."""
        return sum(map(len, self._names)) + sum(map(len, self._values)) + 4 * len(self._names)

    def _check_fields(self) -> None:
        """The field limits, on the head's fields or the trailer's received so far."""
        names = self._names
        if len(names) > self._max_headers:
            self._fail(431, "too many header fields")
        if self._fields_size() > self._max_header_size:
            self._fail(
                431,
                "trailer section too large" if self._headers_done else "header section too large",
            )

    def _check_unreported(self) -> None:
        unreported = self._unreported
        if not self._headers_done:
            if self._fields_size() + unreported > self._max_header_size:
                self._fail(431, "header section too large")
        elif self._body_size == self._chunk_mark:
            # Nothing since the last chunk header: that was the last chunk and
            # the bytes are trailer fields, buffered like header lines.
            if self._fields_size() + unreported > self._max_header_size:
                self._fail(431, "trailer section too large")
        elif unreported > self._max_header_size:
            self._fail(400, "chunk size line too long")

    def _fail(self, status: int, reason: str) -> NoReturn:
        # httptools swallows what a callback raises and reports a generic
        # callback error, so the real one is kept here for _recover.
        error = HttpError(status, reason)
        self._pending_error = error
        raise error

    def _finish(self, request: HttpRequest, hand_out: bool = True) -> None:
        self.in_request = False
        self._headers_done = False
        self._request = None
        if hand_out:
            self._done.append(request)
        if not request.keep_alive:
            self._closed = True

    # -- httptools callbacks -----------------------------------------------

    def _on_message_begin(self) -> None:
        self.in_request = True
        self._headers_done = False
        self._messages += 1
        # Inlined rather than shared with __init__: a call costs more than
        # these stores on a path taken for every request.
        self._target = b""
        self._method = None
        self._names = []
        self._values = []
        self._body_size = 0
        self._chunk_mark = -1

    def _on_url(self, url: bytes) -> None:
        target = self._target + url
        self._target = target
        method = self._method
        if method is None:
            method = self._parser.get_method()
            if method == b"CONNECT":
                # 501, not 405: 405 says this resource forbids the method and
                # must list the allowed ones, while no resource behind this
                # proxy can be tunnelled to (RFC 9110 §15.6.2).
                self._fail(501, "CONNECT is not supported")
            if method in _RTSP_ONLY_METHODS:
                self._fail(400, "not an HTTP request")
            self._method = method
        if len(target) + len(method) > self._max_target:
            self._fail(414, "request-line too long")

    def _on_header(self, name: bytes, value: bytes) -> None:
        # Called once per field: two appends and nothing more. The limits,
        # lower-casing and the fields that matter are dealt with for all
        # fields at once (after each read, and when the head ends). llhttp
        # strips the whitespace before a value but keeps the one after;
        # rstrip() returns the very object when there is none, at C speed.
        self._names.append(name)
        self._values.append(value.rstrip(b" \t"))

    def _on_headers_complete(self) -> None:
        if self._synthetic:
            # The made-up head of _resume_after_upgrade: the real request,
            # already built, is still in self._request.
            self._synthetic = False
            self._headers_done = True
            self._names = []
            self._values = []
            return
        parser = self._parser
        version = parser.get_http_version()
        if version not in _SUPPORTED_VERSIONS:
            self._fail(505, f"HTTP/{version} is not supported")
        method = self._method
        target = self._target
        assert method is not None
        # The fields, dealt with all at once: a Python call per field is the
        # cost here. Names cannot contain a newline (llhttp refuses it), so
        # joining with one lowers them all in C.
        names = self._names
        values = self._values
        count = len(names)
        host = None
        content_length = None
        transfer_encoding = None
        expect = None
        fields_size = 0
        if count:
            if count > self._max_headers:
                self._fail(431, "too many header fields")
            joined = b"\n".join(names)
            # name + ": " + value + CRLF each; the join holds count - 1 newlines.
            fields_size = len(joined) + sum(map(len, values)) + 3 * count + 1
            if fields_size > self._max_header_size:
                self._fail(431, "header section too large")
            names = joined.lower().split(b"\n")
            hosts = names.count(b"host")
            if hosts == 1:
                host = values[names.index(b"host")]
            elif hosts:
                self._fail(400, "more than one Host header")
            if not _FRAMING_HEADERS.isdisjoint(names):
                for name, value in zip(names, values, strict=True):
                    if name == b"content-length":
                        # llhttp refuses these already; checked again because the
                        # body framing must never rest on a single line of defence.
                        if content_length is not None:
                            self._fail(400, "more than one Content-Length header")
                        if not value.isdigit():
                            self._fail(400, "invalid Content-Length")
                        content_length = int(value)
                    elif name == b"transfer-encoding":
                        transfer_encoding = (
                            value if transfer_encoding is None else transfer_encoding + b"," + value
                        )
                    elif name == b"expect":
                        expect = value if expect is None else expect + b"," + value
        self._transfer_encoding = transfer_encoding
        if host is None:
            if version == "1.1":
                self._fail(400, "missing Host header")
            host = b""
        elif host != self._last_host:
            # A keep-alive client repeats one Host; validating it once is enough.
            if not host:
                self._fail(400, "empty Host header")
            if not valid_authority(host):
                self._fail(400, "invalid Host header")
            self._last_host = host
        if target[:1] == b"/":
            # find(), not `in`: CPython 3.11's bytes `in` first tries its
            # operand as an integer and makes and drops a TypeError (some
            # 1,800 instructions each; four such tests per request, here and
            # in routing.normalize_path, were 7% of the compiled proxy's).
            if target.find(b"#") >= 0:
                self._fail(400, "fragment in request-target")
            path, _, query = target.partition(b"?")
            if path.find(b"%") >= 0 and _BAD_PERCENT_ESCAPE.search(path):
                self._fail(400, "malformed percent-encoding in path")
        elif target == b"*":
            if method != b"OPTIONS":
                self._fail(400, "asterisk-form is only for OPTIONS")
            path, query = target, b""
        else:
            # RFC 9112 §3.2.2: the target's authority wins over Host, for
            # routing and for the Host field forwarded alike.
            path, query, host = self._split_absolute_form(target, method)
            if b"host" in names:
                values[names.index(b"host")] = host
            else:
                names.append(b"host")
                values.append(host)

        if transfer_encoding is not None:
            if content_length is not None:
                self._fail(400, "both Content-Length and Transfer-Encoding")
            if version == "1.0":
                self._fail(400, "Transfer-Encoding in an HTTP/1.0 request")
            if transfer_encoding.lower() != b"chunked":
                self._check_transfer_codings(transfer_encoding)
        elif content_length is not None and content_length > self._max_body_size:
            self._fail(413, "body too large")

        expect_continue = False
        # RFC 9110 §10.1.1: an expectation in an HTTP/1.0 request is ignored.
        if expect is not None and version == "1.1":
            expect_continue = self._check_expect(expect)

        if parser.should_upgrade():
            self._upgrading = True
        request = HttpRequest(
            method,
            path,
            query,
            target,
            version,
            names,
            values,
            host,
            b"",
            parser.should_keep_alive(),
            expect_continue,
            content_length,
            bool(self._watch) and not self._watch.isdisjoint(names),
            fields_size=fields_size,
        )
        self._request = request
        stream_over = self._stream_over
        if stream_over >= 0 and (
            transfer_encoding is not None
            or (content_length is not None and content_length > stream_over)
        ):
            # Handed out now; its body follows on the stream.
            self.stream = request.body_stream = BodyStream()
            self._stream_feed = self._feeds
            self._done.append(request)
        self._headers_done = True
        # Trailer fields get a budget and lists of their own; they are
        # dropped, which RFC 9110 §6.5.1 allows.
        self._names = []
        self._values = []

    def _split_absolute_form(self, target: bytes, method: bytes) -> tuple[bytes, bytes, bytes]:
        match = _ABSOLUTE_FORM.fullmatch(target)
        if match is None:
            self._fail(400, "invalid request-target")
        scheme, authority, path, query = match.groups()
        if scheme.lower() not in _HTTP_SCHEMES:
            self._fail(400, "absolute-form target must be http or https")
        # RFC 9110 §4.2.4: userinfo in an http(s) URI is an error; "@" also
        # fails the authority pattern. §4.2.1: so is an empty host.
        if b"@" in authority:
            self._fail(400, "userinfo in request-target")
        if not authority or not valid_authority(authority):
            self._fail(400, "invalid authority in request-target")
        if b"%" in path and _BAD_PERCENT_ESCAPE.search(path):
            self._fail(400, "malformed percent-encoding in path")
        if not path:
            if query is None and method == b"OPTIONS":
                return b"*", b"", authority  # RFC 9112 §3.2.4: the server as a whole
            path = b"/"
        return path, query or b"", authority

    def _check_transfer_codings(self, transfer_encoding: bytes) -> None:
        # RFC 9110 §5.6.1: empty list elements are ignored.
        codings = [c.strip(b" \t") for c in transfer_encoding.lower().split(b",")]
        codings = [c for c in codings if c]
        if not codings:
            self._fail(400, "empty Transfer-Encoding")
        names = [c.split(b";", 1)[0].rstrip(b" \t") for c in codings]
        if b"chunked" in names[:-1]:
            self._fail(400, "chunked is not the final transfer coding")
        for name in names:
            if name != b"chunked":
                self._fail(501, "transfer coding not implemented")
        if codings[-1] != b"chunked":
            self._fail(400, "chunked takes no parameters")

    def _check_expect(self, expect: bytes) -> bool:
        lowered = expect.lower()
        if lowered == b"100-continue":
            return True
        members = [m.strip(b" \t") for m in lowered.split(b",")]
        members = [m for m in members if m]
        for member in members:
            if member != b"100-continue":
                self._fail(417, "unsupported expectation")
        return bool(members)

    def _on_body(self, body: bytes) -> None:
        size = self._body_size + len(body)
        if size > self._max_body_size:
            self._fail(413, "body too large")
        self._body_size = size
        stream = self.stream
        if stream is None:
            self._body_parts.append(body)
        else:
            stream.pieces.append(body)
            stream.buffered += len(body)
            stream.received = size

    def _on_chunk_header(self) -> None:
        self._chunk_mark = self._body_size

    def _on_message_complete(self) -> None:
        if self._upgrading:
            return  # the body, if any, is still to come: see _resume_after_upgrade
        request = self._request
        assert request is not None
        if self._names:
            self._check_fields()  # the trailer's
        stream = self.stream
        if stream is not None:
            self.stream = None
            if self._stream_feed == self._feeds:
                # The whole body came with its head: the request, not returned
                # from feed() yet, is handed out whole after all.
                pieces = stream.take()
                request.body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                request.body_stream = None
            else:
                stream.ended = True
            self._finish(request, False)
            return
        parts = self._body_parts
        if parts:
            request.body = parts[0] if len(parts) == 1 else b"".join(parts)
            # Emptied rather than replaced per request; an idle keep-alive
            # connection then holds no body bytes.
            parts.clear()
        self._finish(request)
