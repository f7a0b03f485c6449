"""The echo service of the demo and the tests: answers with what it received, as JSON."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from .service import Request, Service

app = Service("echo")


@app.route("/")
async def echo(request: Request) -> dict[str, Any]:
    try:
        body: str = request.body.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError:
        body = base64.b64encode(request.body).decode()
        encoding = "base64"
    # ?sleep=SECONDS lets tests and demos make a slow backend on purpose. The
    # query is parsed only when it may name it (a "%" may hide the name).
    query = request.query
    if "sleep" in query or "%" in query:
        delay = request.query_params.get("sleep")
        if delay:
            await asyncio.sleep(min(float(delay), 60.0))
    return {
        "method": request.method,
        "path": request.path,
        "query": query,
        "headers": request.headers.items_list(),
        "body": body,
        "body_encoding": encoding,
        "route": request.route,
        "client": request.client,
    }
