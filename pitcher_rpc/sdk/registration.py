"""A split service that tells the proxy about itself: registered at start, drained at stop.

    app.run("tcp://127.0.0.1:0", register=Registration("http://127.0.0.1:9180", "users"))

or ``pitcher backend users:app --listen tcp://127.0.0.1:0 --register
http://127.0.0.1:9180 --cluster users``. Once serving, the service adds
itself to the cluster through the proxy's admin API (its real address, or
``advertise``), retrying while the proxy is not there yet; a 409 (it is
already a node) counts as done. The change is kept over the proxy's reloads,
and the service repeats it every ``refresh`` seconds, so it is back within
that time after the proxy restarts. At SIGTERM it asks the proxy to drain it,
waits for a moment so no new request is on its way, finishes the requests in
flight, stops, and removes itself. The proxy keeps sending to it until the
drain is in every worker, so no request is lost.

The calls are plain HTTP to the admin API, made in a thread (urllib) so the
service's event loop is never blocked.

With an etcd URL instead, ``Registration("etcd://127.0.0.1:2379/users")``
(or ``--register etcd://127.0.0.1:2379/users``), the service joins every
proxy watching that etcd at once: it puts its key under a lease of ``ttl``
seconds and renews it every third of that; at SIGTERM it revokes the lease
(the key goes with it), waits ``propagation`` seconds for the proxies to hear
of it, then drains and stops. If it dies, the lease runs out and every proxy
drops it. See docs/fleet.md and :mod:`pitcher_rpc.fleet.registrar`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..fleet.registrar import EtcdRegistrar

log = logging.getLogger("pitcher.sdk")


class RegistrationError(Exception):
    """The proxy refused the call, or could not be reached in time."""


@dataclass(frozen=True, slots=True)
class Registration:
    # The proxy's admin API, e.g. "http://127.0.0.1:9180", or an etcd URL naming the
    # cluster, e.g. "etcd://127.0.0.1:2379/users" (then ``cluster`` may be left out).
    admin: str
    cluster: str = ""
    advertise: str | None = None  # the URI the proxy should use; default: where we listen
    weight: int = 1
    # How long to keep trying to reach the proxy (or etcd) at start.
    patience: float = 30.0
    # After the drain is in the proxy, how long requests already on their way may take to arrive.
    settle: float = 0.2
    # How often the registration is repeated (a restarted proxy forgets it).
    refresh: float = 10.0
    # etcd: the lease's seconds (how long proxies keep a service that died), the
    # node's metadata, and how long proxies may take to hear that the key is gone.
    ttl: int = 5
    metadata: Mapping[str, Any] | None = None
    propagation: float = 0.5
    # The admin API's bearer token ([admin] token_file); "" for none.
    token: str = field(default="", repr=False)
    _etcd: EtcdRegistrar | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.admin.startswith("etcd://"):
            if not self.cluster:
                raise ValueError("a registration with a proxy's admin API needs a cluster")
            return
        from ..fleet.registrar import EtcdRegistrar, parse_etcd_url

        try:
            _, cluster, _ = parse_etcd_url(self.admin)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        if self.cluster and self.cluster != cluster:
            raise ValueError(f"{self.admin} names cluster {cluster!r}, not {self.cluster!r}")
        if self.ttl < 1:
            raise ValueError(f"ttl must be at least 1 second, got {self.ttl}")
        object.__setattr__(self, "cluster", cluster)
        registrar = EtcdRegistrar(
            self.admin, self.ttl, self.weight, self.metadata, self.propagation
        )
        object.__setattr__(self, "_etcd", registrar)

    def _url(self, suffix: str = "") -> str:
        cluster = urllib.parse.quote(self.cluster, safe="")
        return f"{self.admin.rstrip('/')}/admin/clusters/{cluster}/nodes{suffix}"

    async def register(self, uri: str, patience: float | None = None) -> bool:
        """Add ``uri`` (or ``advertise``) to the cluster; retried until ``patience`` runs out.

        True if the proxy added it now, False if it was a node already (409).
        """
        node = self.advertise or uri
        if self._etcd is not None:
            from ..fleet.registrar import RegistrationFailed

            try:
                await self._etcd.register(node, self.patience if patience is None else patience)
            except RegistrationFailed as exc:
                raise RegistrationError(str(exc)) from None
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.patience if patience is None else patience)
        delay = 0.1
        while True:
            try:
                status, answer = await _call(
                    "POST",
                    self._url(),
                    {"uri": node, "weight": self.weight, "keep": True},
                    self.token,
                )
            except OSError as exc:
                if loop.time() + delay > deadline:
                    raise RegistrationError(f"no admin API at {self.admin}: {exc}") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if status in (200, 201):
                log.info("registered %s in cluster %s at %s", node, self.cluster, self.admin)
                return True
            if status == 409:
                return False
            raise RegistrationError(f"the proxy refused {node}: {status} {answer.get('error')}")

    async def keep_registered(self, uri: str) -> None:
        """Repeat the registration every ``refresh`` seconds until cancelled.

        With etcd: renew the lease every third of its TTL instead.
        """
        if self._etcd is not None:
            await self._etcd.keep_alive(self.advertise or uri)
            return
        while True:
            await asyncio.sleep(self.refresh)
            try:
                if await self.register(uri, patience=0.0):
                    log.warning("the proxy had forgotten %s; registered again", uri)
            except RegistrationError as exc:
                log.warning("cannot refresh the registration: %s", exc)

    async def drain(self, uri: str) -> bool:
        """Ask the proxy to send no new request; False if it would not (logged).

        With etcd: delete the key (revoke its lease) and wait ``propagation``.
        """
        if self._etcd is not None:
            return await self._etcd.leave()
        return await self._leave("POST", "/drain", uri)

    async def deregister(self, uri: str) -> bool:
        """Remove the node from the cluster; False if the proxy would not (logged)."""
        if self._etcd is not None:
            left = True
            if self._etcd.registered:  # not drained (it failed, or it was never asked)
                left = await self._etcd.leave(wait=False)
            await self._etcd.close()
            return left
        return await self._leave("DELETE", "", uri)

    async def _leave(self, method: str, suffix: str, uri: str) -> bool:
        node = self.advertise or uri
        try:
            status, answer = await _call(
                method, self._url(suffix), {"uri": node, "keep": True}, self.token
            )
        except OSError as exc:
            log.warning(
                "cannot reach the proxy at %s to leave cluster %s: %s",
                self.admin,
                self.cluster,
                exc,
            )
            return False
        if status >= 300:
            log.warning(
                "the proxy would not %s %s: %s",
                "drain" if suffix else "remove",
                node,
                answer.get("error", status),
            )
            return False
        return True


async def serve_until_signal(
    start: Callable[[], Awaitable[Any]],
    close: Callable[[Any], Awaitable[None]],
    register: Registration | None,
) -> None:
    """Serve until SIGINT or SIGTERM: what Service, AsgiService and the bridge's run() share.

    ``start()`` gives the server (anything with an ``address``); with
    ``register`` the service joins its cluster once it serves and keeps its
    registration alive; at the signal it is drained there first (and given
    the time requests already on their way need), then ``close(server)``
    drains the server, and the registration goes last.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = await start()
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
            # Requests the proxy sent just before the drain may still be on their way.
            await asyncio.sleep(register.settle)
    finally:
        if refresher is not None:
            refresher.cancel()
        await close(server)
    if register is not None:
        await register.deregister(server.address)


async def _call(
    method: str, url: str, body: dict[str, Any], token: str = ""
) -> tuple[int, dict[str, Any]]:
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"

    def call() -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(url, json.dumps(body).encode(), headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, _json(response.read())
        except urllib.error.HTTPError as error:
            return error.code, _json(error.read())

    return await asyncio.to_thread(call)


def _json(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {"error": data.decode("utf-8", "replace")[:200]}
    return value if isinstance(value, dict) else {"error": str(value)[:200]}
