"""Services and ASGI apps with streamed bodies, served in the tests (also by ``pitcher backend``).

``service`` is an SDK Service; ``starlette_app`` a Starlette app with a
StreamingResponse and a request read piece by piece; ``fastapi_app`` a
FastAPI app with an EventSourceResponse. Paths name what they do.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from typing import Any

from pitcher_rpc.sdk import (
    EventSourceResponse,
    Request,
    Response,
    ServerSentEvent,
    Service,
    StreamingResponse,
)

MIB = 1024 * 1024
PIECE = 64 * 1024

service = Service("streams")
# What the slow reader saw, for a test in the same process to look at.
slow_reads: list[int] = []


@service.route("/big")
def big(request: Request) -> StreamingResponse:
    """``?mib=N``: N MiB of a repeating pattern, made 64 KiB at a time (``&size=1``: declared)."""
    params = request.query_params
    total = int(params.get("mib", "1")) * MIB
    piece = bytes(range(256)) * (PIECE // 256)

    async def pieces() -> AsyncIterator[bytes]:
        for _ in range(total // PIECE):
            yield piece

    return StreamingResponse(
        pieces(),
        media_type="application/octet-stream",
        size=total if params.get("size") else None,
    )


@service.route("/fail")
def fail(request: Request) -> StreamingResponse:
    """Two pieces, then an exception: the answer must end cut, never complete."""

    async def pieces() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        await asyncio.sleep(0)
        yield b"b" * 1000
        raise RuntimeError("the source broke midway")

    return StreamingResponse(pieces())


@service.route("/upload", stream=True)
async def upload(request: Request) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = pieces = 0
    async for chunk in request.stream():
        digest.update(chunk)
        size += len(chunk)
        pieces += 1
    return {"size": size, "pieces": pieces, "sha256": digest.hexdigest()}


@service.route("/read", stream=True)
async def read_whole(request: Request) -> dict[str, Any]:
    body = await request.read()
    return {"size": len(body), "declared": request.body_size}


@service.route("/buffered")
def buffered(request: Request) -> dict[str, Any]:
    return {"size": len(request.body), "sha256": hashlib.sha256(request.body).hexdigest()}


@service.route("/slow", stream=True)
async def slow_reader(request: Request) -> dict[str, Any]:
    """Reads one piece every 50 ms: the sender must wait for it."""
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        slow_reads.append(size)
        await asyncio.sleep(0.05)
    return {"size": size}


@service.route("/early", stream=True)
def early(request: Request) -> Response:
    """Answers without reading the body."""
    return Response(403, "no\n")


@service.route("/events")
def events(request: Request) -> EventSourceResponse:
    async def ticks() -> AsyncIterator[Any]:
        yield ServerSentEvent("hello\nworld", event="greeting", id="1")
        await asyncio.sleep(0.3)  # quiet: keep-alive comments at ping=0.1
        yield {"n": 2}
        yield ServerSentEvent(retry=2500, comment="last")
        yield "bye"

    return EventSourceResponse(ticks(), ping=0.1)


# ----------------------------------------------------------------------------- ASGI


def _starlette() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request as StarletteRequest
    from starlette.responses import JSONResponse
    from starlette.responses import StreamingResponse as StarletteStreaming
    from starlette.routing import Route

    async def numbers(request: StarletteRequest) -> StarletteStreaming:
        count = int(request.query_params.get("count", "5"))

        async def lines() -> AsyncIterator[str]:
            for n in range(count):
                yield f"{n}\n"
                await asyncio.sleep(0)

        return StarletteStreaming(lines(), media_type="text/plain")

    async def big(request: StarletteRequest) -> StarletteStreaming:
        total = int(request.query_params.get("mib", "1")) * MIB
        piece = b"z" * PIECE

        async def pieces() -> AsyncIterator[bytes]:
            for _ in range(total // PIECE):
                yield piece

        return StarletteStreaming(pieces(), media_type="application/octet-stream")

    async def broken(request: StarletteRequest) -> StarletteStreaming:
        async def pieces() -> AsyncIterator[bytes]:
            yield b"x" * 100
            await asyncio.sleep(0)
            raise RuntimeError("midway")

        return StarletteStreaming(pieces())

    async def upload(request: StarletteRequest) -> JSONResponse:
        digest = hashlib.sha256()
        size = pieces = 0
        async for chunk in request.stream():
            if chunk:
                digest.update(chunk)
                size += len(chunk)
                pieces += 1
        return JSONResponse(
            {
                "size": size,
                "pieces": pieces,
                "sha256": digest.hexdigest(),
                "content_length": request.headers.get("content-length"),
            }
        )

    async def whole(request: StarletteRequest) -> JSONResponse:
        return JSONResponse({"size": len(await request.body())})

    async def endless(request: StarletteRequest) -> StarletteStreaming:
        async def pieces() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"e" * PIECE
                    await asyncio.sleep(0)
            finally:
                ended.append("asgi answer closed")

        return StarletteStreaming(pieces())

    return Starlette(
        routes=[
            Route("/endless", endless),
            Route("/numbers", numbers),
            Route("/big", big),
            Route("/broken", broken),
            Route("/upload", upload, methods=["POST"]),
            Route("/whole", whole, methods=["POST"]),
        ]
    )


def _fastapi() -> Any:
    try:
        from fastapi import FastAPI
        from fastapi.sse import EventSourceResponse as FastEvents
        from fastapi.sse import ServerSentEvent as FastEvent
    except ImportError:  # FastAPI missing, or older than its server-sent events
        return None

    app = FastAPI()

    @app.get("/events", response_class=FastEvents)
    async def stream_events() -> AsyncIterator[Any]:
        yield FastEvent(raw_data="first", event="note", id="a1")
        yield {"n": 2}

    @app.get("/json")
    async def plain() -> dict[str, Any]:
        return {"ok": True}

    return app


starlette_app = _starlette() if os.environ.get("STREAM_APPS_NO_ASGI") is None else None
fastapi_app = _fastapi() if os.environ.get("STREAM_APPS_NO_ASGI") is None else None


@service.route("/small")
def small(request: Request) -> StreamingResponse:
    return StreamingResponse([b"one ", "two"])


@service.route("/short")
def short(request: Request) -> StreamingResponse:
    """Declares 10 bytes and makes 4."""
    return StreamingResponse([b"four"], size=10)


# What the endless answer and the endless reader saw end, for the cancel tests.
ended: list[str] = []


@service.route("/endless")
def endless(request: Request) -> StreamingResponse:
    async def pieces() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"e" * PIECE
                await asyncio.sleep(0)
        finally:
            ended.append("answer closed")

    return StreamingResponse(pieces())


@service.route("/reader", stream=True)
async def endless_reader(request: Request) -> dict[str, Any]:
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
    except asyncio.CancelledError:
        ended.append("reader cancelled")
        raise
    except Exception as exc:
        ended.append(f"reader failed: {type(exc).__name__}")
        raise
    return {"size": size}
