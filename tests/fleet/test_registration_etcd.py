"""The SDK's Registration with an etcd URL, against a real etcd: key, lease, renewal, leaving."""

from __future__ import annotations

import asyncio
import json

from pitcher_rpc.fleet.etcd import EtcdClient
from pitcher_rpc.sdk import Registration
from tests.servers import Server


def test_register_keep_alive_take_a_new_lease_and_leave(etcd: Server) -> None:
    registration = Registration(
        f"etcd://127.0.0.1:{etcd.port}/users?prefix=/t/reg/",
        ttl=2,
        weight=3,
        metadata={"zone": "b"},
        propagation=0.0,
    )
    assert registration.cluster == "users"
    uri = "tcp://127.0.0.1:7001"
    key = "/t/reg/tcp%3A%2F%2F127.0.0.1%3A7001"

    async def scenario() -> None:
        client = EtcdClient([etcd.url])
        try:
            assert await registration.register(uri) is True
            kvs, _ = await client.range_prefix("/t/reg/")
            assert [kv.key for kv in kvs] == [key]
            assert json.loads(kvs[0].value) == {
                "uri": uri,
                "weight": 3,
                "metadata": {"zone": "b"},
            }
            keeper = asyncio.create_task(registration.keep_registered(uri))
            try:
                await asyncio.sleep(2.5)  # past the TTL: renewed, so still there
                assert len((await client.range_prefix("/t/reg/"))[0]) == 1
                # The lease lost (etcd away longer than the TTL): a new one, the key again.
                assert registration._etcd is not None
                await client.revoke(registration._etcd.lease)
                assert (await client.range_prefix("/t/reg/"))[0] == []
                await asyncio.sleep(1.0)
                assert len((await client.range_prefix("/t/reg/"))[0]) == 1
            finally:
                keeper.cancel()
            assert await registration.drain(uri) is True
            assert (await client.range_prefix("/t/reg/"))[0] == []
            assert await registration.deregister(uri) is True
        finally:
            await client.close()

    asyncio.run(scenario())
