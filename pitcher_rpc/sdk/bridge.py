"""A split service that forwards each frame to an existing HTTP/1.1 origin.

``pitcher bridge --listen unix:///run/orders.sock --to http://127.0.0.1:8000``
runs beside a service written in any language: the proxy sends it frames as
to any split service, and it asks the origin over a pool of keep-alive
connections, then answers with the origin's response.

The client is aiohttp's: the fleet extra already brings it (etcd), its
response parser is llhttp in C, its pool keeps connections per origin (TCP
or a Unix socket) and retries an idempotent request once when a kept-alive
connection turns out closed (RFC 9112, 9.3.1), and cancelling a request
closes its connection. httpx parses in Python (h11), several times the CPU
per response; httptools on raw connections would save a little more but
means writing the pool, the retries and the edge cases again.

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
import signal
import sys
from collections.abc import Awaitable
from typing import Any
from urllib.parse import urlsplit

import click

from transports.base import Server, ServerOptions, WithDeadline
from transports.frame import DEFAULT_MAX_FRAME_SIZE
from transports.native import describe as describe_build
from transports.registry import transport_for

from ..codec import decode_request, encode_response
from .commands import check_listen, make_registration, registration_options
from .registration import Registration, RegistrationError
from .service import _valid_headers

log = logging.getLogger("pitcher.bridge")

# RFC 9110 7.6.1 and the fields every proxy treats as hop-by-hop.
HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    )
)
_DROPPED_REQUEST = HOP_BY_HOP | {"content-length", "expect"}
_DROPPED_RESPONSE = HOP_BY_HOP | {"content-length"}


def bridge_installed() -> bool:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return False
    return True


class OriginError(Exception):
    """The origin could not be asked, or answered what cannot be relayed."""


class BridgeSettings:
    """Where the origin is and how long it may take."""

    __slots__ = ("base", "connect_timeout", "connections", "origin", "timeout", "unix_path")

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
        if origin.startswith("unix://"):
            # unix:///run/app.sock, or unix:///run/app.sock:/prefix
            path, colon, prefix = origin[len("unix://") :].partition(":")
            if not path.startswith("/"):
                raise ValueError(f"{origin}: a unix origin is unix:///absolute/path.sock")
            if colon and not prefix.startswith("/"):
                raise ValueError(f"{origin}: the prefix after the socket path starts with /")
            self.unix_path = path
            self.base = "http://localhost" + prefix.rstrip("/")
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
            parts.port  # noqa: B018 - validates the port
        except ValueError as exc:
            raise ValueError(f"{origin}: {exc}") from None
        self.base = f"http://{parts.netloc}{parts.path.rstrip('/')}"


class Bridge:
    """Serves frames by asking an HTTP/1.1 origin; one client session for the process."""

    def __init__(self, settings: BridgeSettings, name: str = "bridge") -> None:
        self.settings = settings
        self.name = name
        self._frame_limit = DEFAULT_MAX_FRAME_SIZE
        self._session: Any = None
        self._url_class: Any = None

    async def open(self) -> None:
        """Make the connection pool (in the running loop)."""
        import aiohttp
        from yarl import URL

        settings = self.settings
        connector: aiohttp.BaseConnector
        if settings.unix_path is not None:
            connector = aiohttp.UnixConnector(
                path=settings.unix_path, limit=settings.connections, limit_per_host=0
            )
        else:
            connector = aiohttp.TCPConnector(
                limit=settings.connections, limit_per_host=0, use_dns_cache=True
            )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            # Nothing the client did not send: no User-Agent, Accept or Accept-Encoding.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        self._url_class = URL

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def respond(self, payload: bytes, deadline_ms: int = 0) -> Awaitable[bytes]:
        """The transport handler: a Request payload in, an awaitable of the Response payload."""
        return self._forward(payload, deadline_ms)

    async def _forward(self, payload: bytes, deadline_ms: int) -> bytes:
        import aiohttp

        message = decode_request(payload)
        # The server steps a handler by hand until it first waits, outside any
        # task; aiohttp's timeouts need one. Waiting once here makes the
        # server carry the rest on in its task (one task, no wrapper).
        await asyncio.sleep(0)
        settings = self.settings
        target = settings.base + message.path.decode("latin-1")
        if message.query:
            target += "?" + message.query.decode("latin-1")
        headers: list[tuple[str, str]] = []
        for name, value in zip(message.header_names, message.header_values, strict=True):
            text = name.decode("latin-1")
            if text not in _DROPPED_REQUEST:
                headers.append((text, value.decode("latin-1")))
        body = message.body
        method = message.method.decode("latin-1")
        # The frame's deadline bounds the whole call (its timer cancels this,
        # and the proxy answers 504); without one, the bridge's own timeout.
        budget = deadline_ms / 1000 if deadline_ms else settings.timeout
        timeout = aiohttp.ClientTimeout(
            total=None if deadline_ms else budget,
            connect=min(settings.connect_timeout, budget),
        )
        limit = self._frame_limit
        url = self._url_class(target, encoded=True)
        try:
            async with self._session.request(
                method,
                url,
                headers=headers,
                data=body if body else None,
                allow_redirects=False,
                timeout=timeout,
            ) as response:
                status = response.status
                length = response.content_length
                if length is not None and length > limit:
                    raise OriginError(
                        f"origin answered {length} bytes, over the frame limit of {limit} bytes"
                    )
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(65536):
                    size += len(chunk)
                    if size > limit:
                        raise OriginError(
                            f"origin answered more than {limit} bytes, over the frame limit"
                        )
                    chunks.append(chunk)
                raw_headers = response.raw_headers
        except OriginError as exc:
            log.error("%s %s: %s", method, target, exc)
            raise
        except aiohttp.ConnectionTimeoutError:
            raise self._failed(
                method, target, f"origin did not accept a connection within {timeout.connect:g} s"
            ) from None
        except TimeoutError:
            raise self._failed(
                method, target, f"origin did not answer within {budget:g} s"
            ) from None
        except aiohttp.ClientPayloadError as exc:
            raise self._failed(
                method, target, f"origin closed the connection mid-response: {exc}"
            ) from None
        except aiohttp.ServerDisconnectedError:
            raise self._failed(
                method, target, "origin closed the connection without an answer"
            ) from None
        except aiohttp.ClientResponseError as exc:
            raise self._failed(
                method, target, f"origin sent an invalid response: {exc.message}"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise self._failed(method, target, f"origin unreachable: {exc.os_error}") from None
        except aiohttp.ClientError as exc:
            raise self._failed(
                method, target, f"origin failed: {type(exc).__name__}: {exc}"
            ) from None
        if not 200 <= status <= 599:
            raise self._failed(method, target, f"origin answered status {status} (not relayed)")
        return self._answer(method, target, status, raw_headers, chunks)

    def _answer(
        self,
        method: str,
        target: str,
        status: int,
        raw_headers: Any,
        chunks: list[bytes],
    ) -> bytes:
        names: list[bytes] = []
        values: list[bytes] = []
        named: set[str] = set()
        for name, value in raw_headers:
            lowered = name.lower()
            if lowered == b"connection":
                named.update(token.strip().lower() for token in value.decode("latin-1").split(","))
            names.append(name)
            values.append(value)
        if named or any(name.lower().decode("latin-1") in _DROPPED_RESPONSE for name in names):
            kept = [
                (name, value)
                for name, value in zip(names, values, strict=True)
                if (text := name.lower().decode("latin-1")) not in _DROPPED_RESPONSE
                and text not in named
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
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        answer = encode_response(status, names, values, body)
        if len(answer) > self._frame_limit:
            raise self._failed(
                method,
                target,
                f"origin answered {len(answer)} bytes, over the frame limit of"
                f" {self._frame_limit} bytes",
            )
        return answer

    def _failed(self, method: str, target: str, reason: str) -> OriginError:
        log.error("%s %s: %s", method, target, reason)
        return OriginError(f"{reason} ({self.settings.origin})")

    async def serve(self, address: str, options: ServerOptions | None = None) -> Server:
        """Open the pool and start serving on ``address``; returns the server."""
        settings = options if options is not None else ServerOptions()
        limit = settings.max_frame_size
        if address.startswith("udp"):
            limit = min(limit, settings.max_datagram - 24)
        self._frame_limit = limit
        if self._session is None:
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
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        server = await self.serve(address)
        refresher: asyncio.Task[None] | None = None
        try:
            if register is not None:
                await register.register(server.address)
                refresher = loop.create_task(
                    register.keep_registered(server.address), name="pitcher-registration"
                )
            await stop.wait()
            if refresher is not None:
                refresher.cancel()
            if register is not None and await register.drain(server.address):
                await asyncio.sleep(register.settle)
        finally:
            if refresher is not None:
                refresher.cancel()
            await server.close(grace)
            await self.close()
        if register is not None:
            await register.deregister(server.address)


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
) -> None:
    """Forward each frame to an HTTP/1.1 origin: an existing service joins a cluster as it is."""
    if not bridge_installed():
        raise click.UsageError("pitcher bridge needs aiohttp: pip install 'pitcher-rpc[bridge]'")
    registration = make_registration(register, cluster, advertise, weight, ttl, metadata)
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
