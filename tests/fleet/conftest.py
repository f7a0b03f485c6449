"""One etcd per test module, started on a free loopback port and stopped by its pid."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import Server, etcd_server


@pytest.fixture(scope="module")
def etcd() -> Iterator[Server]:
    server = etcd_server()
    try:
        server.start()
        yield server
    finally:
        server.close()
