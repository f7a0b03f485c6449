"""The echo service of the demo and the tests: answers with what it received, as JSON."""

from __future__ import annotations

import asyncio
import base64

from .service import Request, Response, Service

app = Service("echo")


@app.route("/")
async def echo(request: Request) -> Response:
    try:
        body: str = request.body.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError:
        body = base64.b64encode(request.body).decode()
        encoding = "base64"
    # ?sleep=SECONDS lets tests and demos make a slow backend on purpose.
    delay = request.query_params.get("sleep")
    if delay:
        await asyncio.sleep(min(float(delay), 60.0))
    return Response.json(
        {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "headers": request.headers.items_list(),
            "body": body,
            "body_encoding": encoding,
            "route": request.route,
            "client": request.client,
        }
    )
