"""The etcd v3 JSON gateway client against a real etcd: keys, leases, watches, failover."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.request

import pytest

from pitcher_rpc.fleet.etcd import (
    EtcdClient,
    EtcdCompacted,
    EtcdUnavailable,
    WatchEvent,
    prefix_end,
)
from tests.proxy.conftest import free_port
from tests.servers import Server


def test_prefix_end() -> None:
    assert prefix_end("/a/") == b"/a0"
    assert prefix_end("a\xff") == b"a\xc3\xc0"  # UTF-8 c3 bf: the last byte goes up
    assert prefix_end("") == b"\0"


def test_keys_leases_and_a_watch(etcd: Server) -> None:
    async def scenario() -> tuple[list[WatchEvent], int]:
        client = EtcdClient([etcd.url])
        try:
            await client.put("/t1/a", b"1")
            await client.put("/t1x", b"outside the prefix")
            kvs, revision = await client.range_prefix("/t1/")
            assert [(kv.key, kv.value) for kv in kvs] == [("/t1/a", b"1")]
            events: list[WatchEvent] = []

            async def watch() -> None:
                async for event in client.watch_prefix("/t1/", revision + 1):
                    events.append(event)

            watcher = asyncio.create_task(watch())
            while not events:  # "created" first
                await asyncio.sleep(0.01)
            lease = await client.grant(5)
            assert 0 < await client.keep_alive(lease) <= 5
            await client.put("/t1/b", b"2", lease)
            assert await client.delete("/t1/a") == 1
            await client.revoke(lease)  # deletes /t1/b with it
            assert await client.keep_alive(lease) == 0
            while len(events) < 4:
                await asyncio.sleep(0.01)
            watcher.cancel()
            return events, revision
        finally:
            await client.close()

    events, revision = asyncio.run(scenario())
    assert [(e.kind, e.key, e.value) for e in events] == [
        ("created", "", b""),
        ("put", "/t1/b", b"2"),
        ("delete", "/t1/a", b""),
        ("delete", "/t1/b", b""),
    ]
    assert all(e.revision > revision for e in events[1:])


def test_a_watch_takes_a_message_over_64_kib(etcd: Server) -> None:
    big = b"x" * 150_000  # base64 in JSON: about 200 KB on one line

    async def scenario() -> list[tuple[str, int]]:
        client = EtcdClient([etcd.url])
        events: list[tuple[str, int]] = []
        try:
            _, revision = await client.range_prefix("/t4/")

            async def watch() -> None:
                async for event in client.watch_prefix("/t4/", revision + 1):
                    events.append((event.key, len(event.value)))

            watcher = asyncio.create_task(watch())
            await client.put("/t4/big", big)
            await client.put("/t4/small", b"1")
            for _ in range(500):
                if len(events) == 3 or watcher.done():
                    break
                await asyncio.sleep(0.01)
            watcher.cancel()
            return events
        finally:
            await client.close()

    assert asyncio.run(scenario()) == [("", 0), ("/t4/big", len(big)), ("/t4/small", 1)]


def test_a_watch_from_a_compacted_revision_says_so(etcd: Server) -> None:
    async def scenario() -> None:
        client = EtcdClient([etcd.url])
        try:
            first = await client.put("/t2/a", b"1")
            last = await client.put("/t2/a", b"2")
            body = json.dumps({"revision": str(last)}).encode()
            request = urllib.request.Request(f"{etcd.url}/v3/kv/compaction", body, method="POST")
            await asyncio.to_thread(urllib.request.urlopen, request, timeout=5)
            with pytest.raises(EtcdCompacted) as caught:
                async for _ in client.watch_prefix("/t2/", first):
                    pass
            assert caught.value.compact_revision == last
        finally:
            await client.close()

    asyncio.run(scenario())


def test_an_unreachable_member_is_skipped_and_the_one_that_answers_goes_first(
    etcd: Server,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"

    async def scenario() -> list[str]:
        client = EtcdClient([dead, etcd.url])
        try:
            await client.put("/t3/a", base64.b64encode(b"x"))
            return client.endpoints
        finally:
            await client.close()

    assert asyncio.run(scenario()) == [etcd.url, dead]

    async def nobody() -> None:
        client = EtcdClient([dead])
        try:
            with pytest.raises(EtcdUnavailable, match=dead):
                await client.range_prefix("/t3/")
            with pytest.raises(EtcdUnavailable):
                async for _ in client.watch_prefix("/t3/", 1):
                    pass
        finally:
            await client.close()

    asyncio.run(nobody())
