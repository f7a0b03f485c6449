"""The stream carrier inside TLS: ``tls://host:port``.

The bytes are exactly the TCP carrier's (docs/wire.md: preface, then frames),
encrypted: the client is a :class:`~transports.stream_client.StreamClient`
with its ``ssl`` and ``server_hostname`` set, the server a
:class:`~transports.stream_server.StreamServer` with its ``ssl`` set. Both are
the compiled classes, configured, never subclassed.

What each side uses comes through the options' ``extra`` dict, so that a
caller that knows nothing of TLS passes nothing:

- client: ``extra["tls_context"]`` (an ``ssl.SSLContext``; default: the
  system's trust store, ``ssl.create_default_context()``) and
  ``extra["server_name"]`` (the name the node's certificate must carry and
  the SNI sent; default: the URI's host);
- server: ``extra["tls_context"]`` (pitcher_rpc.config.tls.server_context
  makes one as the proxy's listener has it), or the
  process's default (:func:`set_default_server_context`, what ``pitcher
  backend --tls-certificate`` sets). A server with neither cannot start.
"""

from __future__ import annotations

import ssl
from typing import Any

from .base import CarrierTransport, ClientOptions, Handler, ServerOptions
from .errors import ConnectError
from .registry import parse_address
from .stream_client import StreamClient
from .stream_server import StreamServer

__all__ = ["TlsTransport", "set_default_server_context"]

_default_server_context: ssl.SSLContext | None = None


def set_default_server_context(context: ssl.SSLContext | None) -> None:
    """The context a tls:// server of this process uses when its options name none."""
    global _default_server_context
    _default_server_context = context


class TlsTransport(CarrierTransport):
    schemes = ("tls",)
    client_class = StreamClient
    server_class = StreamServer

    @classmethod
    def client(cls, address: str, options: ClientOptions | None = None) -> Any:
        cls.check(address)
        extra = options.extra if options is not None else {}
        context = extra.get("tls_context")
        client = StreamClient(address, options)
        # Default: the system's trust store, host names checked.
        client.ssl = context if context is not None else ssl.create_default_context()
        client.server_hostname = extra.get("server_name") or parse_address(address).host
        return client

    @classmethod
    async def serve(
        cls, address: str, handler: Handler, options: ServerOptions | None = None
    ) -> Any:
        cls.check(address)
        context = options.extra.get("tls_context") if options is not None else None
        if context is None:
            context = _default_server_context
        if context is None:
            raise ConnectError(
                f"cannot listen on {address}: a tls:// server needs a certificate and its key"
                " (pitcher backend --tls-certificate FILE --tls-key FILE)"
            )
        server = StreamServer(address, handler, options)
        server.ssl = context
        await server.start()
        return server
