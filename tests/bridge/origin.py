"""An HTTP/1.1 origin for the bridge's tests, run as its own process.

    python origin.py tcp://127.0.0.1:PORT MARK_DIR
    python origin.py unix:///path/origin.sock MARK_DIR

Written on raw asyncio streams so that it can also misbehave on purpose.
Keep-alive; each connection is numbered so a test can see reuse. Paths:

- ``/slow`` or ``/long`` ``?s=SECONDS&name=N``: writes MARK_DIR/N.arrived,
  answers after SECONDS unless the connection closes first; then it writes
  MARK_DIR/N.closed.
- ``/cut``: promises 1000 bytes, sends 10 and closes.
- ``/garbage``: answers bytes that are not HTTP.
- ``/badheader``: a header value with a control byte.
- ``/hop``: hop-by-hop fields and one its Connection names.
- ``/big?size=N``: N bytes.
- ``/chunked``: a chunked body; ``/eof``: a body that ends with the connection.
- ``/drop``: answered only as a connection's first request; later ones close it.
- ``/status/N``: that status.
- anything else: a JSON echo of the request.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from urllib.parse import parse_qsl

connections = 0
MARKS = sys.argv[2] if len(sys.argv) > 2 else ""


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    global connections
    connections += 1
    number = connections
    served = 0
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            line, *lines = head[:-4].decode("latin-1").split("\r\n")
            method, target, _version = line.split(" ")
            headers = [tuple(item.split(": ", 1)) for item in lines]
            length = int(next((v for n, v in headers if n.lower() == "content-length"), "0"))
            body = await reader.readexactly(length) if length else b""
            path, _, query = target.partition("?")
            params = dict(parse_qsl(query))
            served += 1
            if path == "/drop" and served > 1:
                return  # as if it had closed the idle connection just before
            if not await answer(reader, writer, method, path, query, params, headers, body, number):
                return
    finally:
        writer.close()


async def answer(reader, writer, method, path, query, params, headers, body, number) -> bool:
    def send(status: int, payload: bytes, extra: list[tuple[str, str]] | None = None) -> None:
        lines = [f"HTTP/1.1 {status} Whatever", f"Content-Length: {len(payload)}"]
        lines += [f"{n}: {v}" for n, v in extra or ()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload)

    if path in ("/slow", "/long"):
        if MARKS:
            open(os.path.join(MARKS, params["name"] + ".arrived"), "w").close()
        try:
            data = await asyncio.wait_for(reader.read(1), float(params["s"]))
        except TimeoutError:
            send(200, b"slow but done\n")
            return True
        if not data and MARKS:
            open(os.path.join(MARKS, params["name"] + ".closed"), "w").close()
        return False
    if path == "/cut":
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
        await writer.drain()
        return False
    if path == "/garbage":
        writer.write(b"SURPRISE, NOT HTTP\r\n\r\n")
        await writer.drain()
        return False
    if path == "/badheader":
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Bad: a\x01b\r\n\r\nok")
        await writer.drain()
        return True
    if path == "/hop":
        send(
            200,
            b"hop\n",
            [
                ("Connection", "keep-alive, X-Private"),
                ("Keep-Alive", "timeout=5"),
                ("X-Private", "secret"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
                ("X-Kept", "yes"),
            ],
        )
        return True
    if path == "/chunked":
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        return True
    if path == "/eof":
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
        await writer.drain()
        return False
    if path == "/big":
        send(200, b"z" * int(params["size"]), [("Content-Type", "application/octet-stream")])
        return True
    if path.startswith("/status/"):
        send(int(path.rsplit("/", 1)[1]), b"as you wish\n")
        return True
    echo = {
        "method": method,
        "path": path,
        "query": query,
        "headers": headers,
        "body_length": len(body),
        "body_head": body[:64].decode("latin-1"),
        "connection": number,
    }
    send(200, json.dumps(echo).encode(), [("Content-Type", "application/json")])
    return True


async def main(uri: str) -> None:
    if uri.startswith("unix://"):
        server = await asyncio.start_unix_server(handle, uri[len("unix://") :])
    else:
        host, port = uri[len("tcp://") :].rsplit(":", 1)
        server = await asyncio.start_server(handle, host, int(port), limit=1 << 20)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
