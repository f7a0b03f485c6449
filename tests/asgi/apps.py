"""A Starlette app and a FastAPI app, served by uvicorn and by ``pitcher backend`` in the tests.

Both do the same things the same way, so an answer through Pitcher can be
compared with the same app's answer under uvicorn. ``ASGI_TEST_MARKS`` names a
directory where background tasks, lifespan shutdown and disconnects leave
files the tests look for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import BackgroundTasks, FastAPI, Header, HTTPException
from fastapi import Request as FastRequest
from fastapi.responses import PlainTextResponse as FastPlainText
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

MARKS = os.environ.get("ASGI_TEST_MARKS", "")


def mark(name: str) -> None:
    if MARKS:
        with open(os.path.join(MARKS, name), "w") as file:
            file.write(name)


@contextlib.asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
    if os.environ.get("ASGI_TEST_FAIL_STARTUP"):
        raise RuntimeError("the database is not there")
    yield {"greeting": "hello from lifespan", "started": 1}
    mark("shutdown")


# ----------------------------------------------------------------------------- Starlette


async def items(request: Request) -> Response:
    item = request.path_params["item"]
    return JSONResponse(
        {
            "item": item,
            "q": request.query_params.get("q"),
            "all": request.query_params.getlist("tag"),
            "path": request.url.path,
            "raw_path": request.scope["raw_path"].decode("latin-1"),
        }
    )


async def echo_json(request: Request) -> Response:
    data = await request.json()
    return JSONResponse({"got": data, "length": request.headers.get("content-length")}, 201)


async def headers(request: Request) -> Response:
    return JSONResponse(
        {"x-custom": request.headers.get("x-custom"), "host": request.headers.get("host")},
        headers={"x-answer": "42", "set-cookie": "a=1"},
    )


async def status(request: Request) -> Response:
    code = int(request.path_params["code"])
    return PlainTextResponse(f"status {code}\n", status_code=code)


async def boom(request: Request) -> Response:
    raise ValueError("boom")


async def background(request: Request) -> Response:
    name = request.query_params["name"]

    async def later() -> None:
        await asyncio.sleep(0.2)
        mark(name)

    return PlainTextResponse("queued\n", background=BackgroundTask(later))


async def state(request: Request) -> Response:
    return JSONResponse({"greeting": request.state.greeting, "started": request.state.started})


async def wait_disconnect(request: Request) -> Response:
    # Listens for the end of the call, as a long poll does.
    name = request.query_params["name"]
    mark(f"{name}.arrived")
    message = await request.receive()  # the body
    message = await request.receive()
    mark(f"{name}.{message['type']}")
    return PlainTextResponse("too late\n")


async def big(request: Request) -> Response:
    return Response(b"x" * int(request.query_params["size"]), media_type="text/plain")


def sync_endpoint(request: Request) -> Response:
    return PlainTextResponse("from a thread\n")


starlette_app = Starlette(
    routes=[
        Route("/items/{item}", items),
        Route("/json", echo_json, methods=["POST"]),
        Route("/headers", headers),
        Route("/status/{code}", status),
        Route("/boom", boom),
        Route("/background", background),
        Route("/state", state),
        Route("/wait", wait_disconnect),
        Route("/waitlong", wait_disconnect),
        Route("/big", big),
        Route("/sync", sync_endpoint),
    ],
    lifespan=lifespan,
)


# ----------------------------------------------------------------------------- FastAPI

fastapi_app = FastAPI(lifespan=lifespan)


class Order(BaseModel):
    name: str
    quantity: int = 1


@fastapi_app.get("/items/{item_id}")
async def read_item(item_id: int, q: str | None = None) -> dict[str, Any]:
    return {"item_id": item_id, "q": q}


@fastapi_app.post("/orders", status_code=201)
async def create_order(order: Order) -> dict[str, Any]:
    return {"name": order.name, "quantity": order.quantity, "total": order.quantity * 3}


@fastapi_app.get("/headers")
async def read_headers(x_custom: str | None = Header(default=None)) -> FastPlainText:
    return FastPlainText(f"x-custom={x_custom}\n", headers={"x-answer": "42"})


@fastapi_app.get("/missing")
async def missing() -> None:
    raise HTTPException(status_code=404, detail="no such thing")


@fastapi_app.get("/boom")
async def fast_boom() -> None:
    raise ZeroDivisionError("division by zero")


@fastapi_app.get("/background")
async def fast_background(name: str, tasks: BackgroundTasks) -> dict[str, str]:
    tasks.add_task(mark, name)
    return {"queued": name}


@fastapi_app.get("/state")
async def fast_state(request: FastRequest) -> dict[str, Any]:
    return {"greeting": request.state.greeting}


@fastapi_app.get("/sync")
def fast_sync(n: int = 3) -> dict[str, int]:
    return {"square": n * n}


@fastapi_app.get("/hello")
async def hello(name: str = "world") -> dict[str, str]:
    return {"hello": name}
