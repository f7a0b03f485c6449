"""Write a split service in a few lines::

    from pitcher_rpc.sdk import Service, Request

    app = Service("hello")

    @app.route("/hello")
    async def hello(request: Request) -> dict:
        return {"hello": request.query_params.get("name", "world")}

    if __name__ == "__main__":
        app.run("unix:///tmp/hello.sock")   # or tcp://127.0.0.1:7001

A handler may read the body as it comes (``async for chunk in
request.stream()``, on a route made with ``stream=True``) and answer with a
``StreamingResponse`` or an ``EventSourceResponse`` (server-sent events):
see docs/sdk.md.

Or from the shell: ``pitcher backend mymodule:app --listen tcp://127.0.0.1:7001``.
A service can register itself with a proxy's cluster at start and be drained
at stop: ``app.run(uri, register=Registration(admin_url, "cluster"))`` or
``pitcher backend ... --register http://127.0.0.1:9180 --cluster NAME``.
"""

from .registration import Registration, RegistrationError
from .service import Context, Headers, InvalidResponse, Request, Response, Service
from .streams import BodyTooLarge, EventSourceResponse, ServerSentEvent, StreamingResponse

__all__ = [
    "BodyTooLarge",
    "Context",
    "EventSourceResponse",
    "Headers",
    "InvalidResponse",
    "Registration",
    "RegistrationError",
    "Request",
    "Response",
    "ServerSentEvent",
    "Service",
    "StreamingResponse",
]
