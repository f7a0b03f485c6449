"""A service's own key in etcd, under a lease it keeps alive: how it joins every proxy at once.

``etcd://HOST:PORT[,HOST:PORT...]/CLUSTER[?prefix=/pitcher/nodes/CLUSTER/]``
names the etcd members and the cluster. The key is the prefix followed by
the node's URI (percent-encoded, so a restarted service overwrites its own
key); the value is ``{"uri": ..., "weight": ..., "metadata": {...}}``. The
lease's TTL bounds how long proxies keep sending to a service that died
without a word; a clean stop revokes the lease, which deletes the key at
once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from collections.abc import Mapping
from typing import Any

from ..config.discovery import default_prefix
from .etcd import EtcdClient, EtcdError

log = logging.getLogger("pitcher.sdk")

SCHEME = "etcd://"


def parse_etcd_url(url: str) -> tuple[list[str], str, str]:
    """``etcd://h:p[,h:p]/CLUSTER[?prefix=P]`` -> (endpoints, cluster, prefix); ValueError."""
    if not url.startswith(SCHEME):
        raise ValueError(f"not an etcd:// URL: {url!r}")
    rest = url[len(SCHEME) :]
    hosts, _, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    cluster = urllib.parse.unquote(path.strip("/"))
    if not hosts or not cluster or "/" in cluster:
        raise ValueError(f"expected etcd://HOST:PORT/CLUSTER, got {url!r}")
    endpoints = []
    for host in hosts.split(","):
        name, colon, port = host.rpartition(":")
        if not colon or not name or not port.isdigit():
            raise ValueError(f"an etcd member is HOST:PORT, got {host!r} in {url!r}")
        endpoints.append(f"http://{host}")
    prefix = urllib.parse.parse_qs(query).get("prefix", [default_prefix(cluster)])[0]
    if not prefix.startswith("/") or not prefix.endswith("/"):
        raise ValueError(f"the prefix must start and end with '/', got {prefix!r}")
    return endpoints, cluster, prefix


class EtcdRegistrar:
    """Put, keep and delete one node's key; the SDK's Registration drives it."""

    def __init__(
        self,
        url: str,
        ttl: int,
        weight: int,
        metadata: Mapping[str, Any] | None = None,
        propagation: float = 0.5,
    ) -> None:
        endpoints, self.cluster, self.prefix = parse_etcd_url(url)
        self.url = url
        self.ttl = ttl
        self.weight = weight
        self.metadata = dict(metadata or {})
        # After the key is gone, how long proxies may take to hear of it.
        self.propagation = propagation
        self.client = EtcdClient(endpoints)
        self.lease = 0
        self.key = ""

    def _value(self, node: str) -> bytes:
        item: dict[str, Any] = {"uri": node, "weight": self.weight}
        if self.metadata:
            item["metadata"] = self.metadata
        return json.dumps(item, separators=(",", ":")).encode()

    async def _put(self, node: str) -> None:
        self.key = self.prefix + urllib.parse.quote(node, safe="")
        lease = await self.client.grant(self.ttl)
        await self.client.put(self.key, self._value(node), lease)
        self.lease = lease

    async def register(self, node: str, patience: float) -> None:
        """Put the key under a new lease, retrying while etcd cannot be reached."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        delay = 0.1
        while True:
            try:
                await self._put(node)
            except EtcdError as exc:
                if loop.time() + delay > deadline:
                    message = f"cannot register in etcd at {self.url}: {exc}"
                    raise RegistrationFailed(message) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            log.info(
                "registered %s in cluster %s at %s (key %s, lease %x, ttl %ds)",
                node,
                self.cluster,
                self.url,
                self.key,
                self.lease,
                self.ttl,
            )
            return

    async def keep_alive(self, node: str) -> None:
        """Renew the lease every third of its TTL until cancelled; take a new one if it lapsed."""
        failing = False
        while True:
            await asyncio.sleep(max(0.2, self.ttl / 3))
            try:
                if not self.lease or await self.client.keep_alive(self.lease) <= 0:
                    # Gone: etcd was away longer than the TTL, or lost it.
                    log.warning("the lease of %s had expired; registering again", node)
                    await self._put(node)
                if failing:
                    log.warning("etcd at %s is back; %s is registered", self.url, node)
                failing = False
            except EtcdError as exc:
                if not failing:
                    log.warning(
                        "cannot renew the lease of %s at %s (%s): proxies drop it after %ds",
                        node,
                        self.url,
                        exc,
                        self.ttl,
                    )
                failing = True

    @property
    def registered(self) -> bool:
        return bool(self.lease or self.key)

    async def leave(self, wait: bool = True) -> bool:
        """Revoke the lease (its key goes with it) and wait for the proxies to hear of it."""
        try:
            if self.lease:
                await self.client.revoke(self.lease)
            elif self.key:
                await self.client.delete(self.key)
        except EtcdError as exc:
            log.warning(
                "cannot remove %s from etcd at %s (%s): proxies drop it when its lease ends",
                self.key,
                self.url,
                exc,
            )
            return False
        log.info("left cluster %s (key %s deleted)", self.cluster, self.key)
        self.lease, self.key = 0, ""
        if wait:
            await asyncio.sleep(self.propagation)
        return True

    async def close(self) -> None:
        await self.client.close()


class RegistrationFailed(Exception):
    """etcd could not be reached within the patience given."""
