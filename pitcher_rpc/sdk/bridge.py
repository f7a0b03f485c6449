"""A split service that forwards each frame to an existing HTTP/1.1 origin.

``pitcher bridge --listen unix:///run/orders.sock --to http://127.0.0.1:8000``
runs beside a service written in any language: the proxy sends it frames as
to any split service, and it asks the origin over a pool of keep-alive
connections, then answers with the origin's response.

The client is the bridge's own, over httptools (a dependency already: the
proxy parses requests with it), in :mod:`pitcher_rpc.sdk.origin`. aiohttp's
client was tried first and measured: 150-180 µs of CPU per request in the
bridge against about 30 for the protocol over httptools (same loop, same
origin), which made the bridge the slowest hop; httpx parses in Python (h11)
and costs more still. A sidecar needs little of a general client: one origin,
no redirects, no cookies, no decompression, no TLS.

What the origin gets and what comes back (docs/asgi.md):

- The request as the proxy sent it: method, path and query untouched (no
  re-quoting), the headers in order with the client's Host, the body with
  its length. Hop-by-hop fields are not sent (the proxy sent none anyway).
- Timeouts from the frame: a request with a deadline gets at most that
  long, connecting included (the deadline cancels it, and the proxy answers
  504); one without gets ``timeout``. A CANCEL stops the request and closes
  its connection to the origin.
- The response's hop-by-hop fields, those its Connection names, and
  Content-Length are dropped (the proxy frames the answer itself).
- An origin that cannot be reached, closes the connection before its answer
  is whole, answers something that is not HTTP/1.1, a status the proxy does
  not relay, a header it would refuse, or more than the frame limit: the
  call fails with a message that says so (the proxy answers 502 and counts
  the node's failure), and the log says it too.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable
from urllib.parse import urlsplit

import click

from transports.base import Server, ServerOptions, WithDeadline
from transports.frame import DEFAULT_MAX_FRAME_SIZE
from transports.native import describe as describe_build
from transports.registry import transport_for

from ..codec import decode_request, encode_response
from ..http.headers import HOP_BY_HOP
from .commands import check_listen, make_registration, registration_options
from .origin import OriginError, OriginPool
from .registration import Registration, RegistrationError, serve_until_signal
from .service import _valid_headers

__all__ = ["Bridge", "BridgeSettings", "OriginError", "bridge_command"]

log = logging.getLogger("pitcher.bridge")

_DROPPED_REQUEST = HOP_BY_HOP | {b"content-length", b"expect"}
_DROPPED_RESPONSE = HOP_BY_HOP | {b"content-length"}
# Methods whose requests carry a length even when it is 0, as clients send them.
_BODY_METHODS = frozenset((b"POST", b"PUT", b"PATCH"))


class BridgeSettings:
    """Where the origin is and how long it may take."""

    __slots__ = (
        "connect_timeout",
        "connections",
        "host",
        "host_header",
        "origin",
        "port",
        "prefix",
        "timeout",
        "unix_path",
    )

    def __init__(
        self,
        origin: str,
        *,
        connections: int = 100,
        connect_timeout: float = 1.0,
        timeout: float = 60.0,
    ) -> None:
        self.origin = origin
        self.connections = connections
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.unix_path: str | None = None
        self.host = ""
        self.port = 0
        if origin.startswith("unix://"):
            # unix:///run/app.sock, or unix:///run/app.sock:/prefix
            path, colon, prefix = origin[len("unix://") :].partition(":")
            if not path.startswith("/"):
                raise ValueError(f"{origin}: a unix origin is unix:///absolute/path.sock")
            if colon and not prefix.startswith("/"):
                raise ValueError(f"{origin}: the prefix after the socket path starts with /")
            self.unix_path = path
            self.host_header = b"localhost"
            self.prefix = prefix.rstrip("/").encode("latin-1")
            return
        parts = urlsplit(origin)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(
                f"{origin}: the origin is http://HOST:PORT[/PREFIX] or unix:///PATH"
                " (https origins are not bridged)"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"{origin}: an origin has no query or fragment")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"{origin}: {exc}") from None
        self.host = parts.hostname
        self.port = port or 80
        # For a request that came without Host (the proxy always sends one).
        self.host_header = parts.netloc.encode("latin-1")
        self.prefix = parts.path.rstrip("/").encode("latin-1")


class Bridge:
    """Serves frames by asking an HTTP/1.1 origin over one pool of connections."""

    def __init__(self, settings: BridgeSettings, name: str = "bridge") -> None:
        self.settings = settings
        self.name = name
        self._frame_limit = DEFAULT_MAX_FRAME_SIZE
        self._pool: OriginPool | None = None

    async def open(self) -> None:
        """Make the connection pool (connections are opened when first needed)."""
        settings = self.settings
        self._pool = OriginPool(
            settings.host,
            settings.port,
            settings.unix_path,
            settings.connections,
            settings.connect_timeout,
        )

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def respond(self, payload: bytes, deadline_ms: int = 0) -> Awaitable[bytes]:
        """The transport handler: a Request payload in, an awaitable of the Response payload."""
        return self._forward(payload, deadline_ms)

    async def _forward(self, payload: bytes, deadline_ms: int) -> bytes:
        message = decode_request(payload)
        settings = self.settings
        method = message.method
        target = settings.prefix + message.path
        if message.query:
            target += b"?" + message.query
        parts = [method, b" ", target, b" HTTP/1.1\r\n"]
        has_host = False
        for name, value in zip(message.header_names, message.header_values, strict=True):
            if name in _DROPPED_REQUEST:
                continue
            if name == b"host":
                has_host = True
            parts += (name, b": ", value, b"\r\n")
        if not has_host:
            parts += (b"host: ", settings.host_header, b"\r\n")
        body = message.body
        if body or method in _BODY_METHODS:
            parts.append(b"content-length: %d\r\n" % len(body))
        parts.append(b"\r\n")
        if body:
            parts.append(body)
        if deadline_ms:
            # The frame's deadline bounds the call: the server's timer cancels
            # this (the proxy answers 504), and cancelling closes the connection.
            budget = deadline_ms / 1000
            timeout = None
        else:
            budget = timeout = settings.timeout
            # The bridge's own timer cancels the task this runs in: be in it.
            await asyncio.sleep(0)
        pool = self._pool
        if pool is None:
            raise OriginError("the bridge is not open")
        try:
            response = await pool.request(
                method,
                b"".join(parts),
                self._frame_limit,
                timeout,
                min(settings.connect_timeout, budget),
            )
        except OriginError as exc:
            raise self._failed(method, target, str(exc)) from None
        status = response.status
        if not 200 <= status <= 599:
            raise self._failed(method, target, f"origin answered status {status} (not relayed)")
        return self._answer(method, target, status, response.names, response.values, response.body)

    def _answer(
        self,
        method: bytes,
        target: bytes,
        status: int,
        names: list[bytes],
        values: list[bytes],
        body: bytes,
    ) -> bytes:
        named: set[bytes] = set()
        drop = False
        for name, value in zip(names, values, strict=True):
            lowered = name.lower()
            if lowered in _DROPPED_RESPONSE:
                drop = True
                if lowered == b"connection":
                    named.update(token.strip().lower() for token in value.split(b","))
        if drop:
            kept = [
                (name, value)
                for name, value in zip(names, values, strict=True)
                if (lowered := name.lower()) not in _DROPPED_RESPONSE and lowered not in named
            ]
            names = [name for name, _ in kept]
            values = [value for _, value in kept]
        if names and not _valid_headers(names, values):
            bad = next(
                (name, value)
                for name, value in zip(names, values, strict=True)
                if not _valid_headers([name], [value])
            )
            raise self._failed(
                method,
                target,
                f"origin answered a header the proxy would refuse: {bad[0]!r}: {bad[1]!r}",
            )
        answer = encode_response(status, names, values, body)
        if len(answer) > self._frame_limit:
            raise self._failed(
                method,
                target,
                f"origin answered {len(answer)} bytes, over the frame limit of"
                f" {self._frame_limit} bytes",
            )
        return answer

    def _failed(self, method: bytes, target: bytes, reason: str) -> OriginError:
        log.error("%s %s: %s", method.decode("latin-1"), target.decode("latin-1"), reason)
        return OriginError(f"{reason} ({self.settings.origin})")

    async def serve(self, address: str, options: ServerOptions | None = None) -> Server:
        """Open the pool and start serving on ``address``; returns the server."""
        settings = options if options is not None else ServerOptions()
        limit = settings.max_frame_size
        if address.startswith("udp"):
            limit = min(limit, settings.max_datagram - 24)
        self._frame_limit = limit
        if self._pool is None:
            await self.open()
        server: Server = await transport_for(address).serve(
            address, WithDeadline(self.respond), options
        )
        log.info(
            "bridge to %s serving on %s (%s)",
            self.settings.origin,
            server.address,
            describe_build(),
        )
        return server

    def run(
        self, address: str, *, grace: float = 5.0, register: Registration | None = None
    ) -> None:
        """Serve until SIGINT or SIGTERM, then drain (as an SDK Service does)."""
        import uvloop

        uvloop.run(self._run_until_signal(address, grace, register))

    async def _run_until_signal(
        self, address: str, grace: float, register: Registration | None
    ) -> None:
        async def close(server: Server) -> None:
            try:
                await server.close(grace)
            finally:
                await self.close()

        await serve_until_signal(lambda: self.serve(address), close, register)


# ----------------------------------------------------------------------------- command


@click.command("bridge")
@click.option("--listen", required=True, metavar="URI", help="Where frames arrive.")
@click.option(
    "--to",
    "origin",
    required=True,
    metavar="URL",
    help="The HTTP/1.1 origin: http://HOST:PORT[/PREFIX] or unix:///PATH[:/PREFIX].",
)
@click.option(
    "--connections",
    type=click.IntRange(1, 10000),
    default=100,
    show_default=True,
    help="Most connections kept open to the origin.",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0.001),
    default=1.0,
    show_default=True,
    help="Seconds to connect to the origin (the frame's deadline if shorter).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.001),
    default=60.0,
    show_default=True,
    help="Seconds an origin may take for a request that came without a deadline.",
)
@registration_options
def bridge_command(
    listen: str,
    origin: str,
    connections: int,
    connect_timeout: float,
    timeout: float,
    register: str | None,
    cluster: str | None,
    advertise: str | None,
    weight: int,
    ttl: int,
    metadata: tuple[str, ...],
    register_token_file: str | None,
) -> None:
    """Forward each frame to an HTTP/1.1 origin: an existing service joins a cluster as it is."""
    registration = make_registration(
        register, cluster, advertise, weight, ttl, metadata, register_token_file
    )
    check_listen(listen)
    try:
        settings = BridgeSettings(
            origin, connections=connections, connect_timeout=connect_timeout, timeout=timeout
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--to") from None
    try:
        Bridge(settings).run(listen, register=registration)
    except RegistrationError as exc:
        click.echo(f"pitcher: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    bridge_command()
