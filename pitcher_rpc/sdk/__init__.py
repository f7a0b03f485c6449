"""Write a split service in a few lines::

    from pitcher_rpc.sdk import Service, Request

    app = Service("hello")

    @app.route("/hello")
    async def hello(request: Request) -> dict:
        return {"hello": request.query_params.get("name", "world")}

    if __name__ == "__main__":
        app.run("unix:///tmp/hello.sock")   # or tcp://127.0.0.1:7001

Or from the shell: ``pitcher backend mymodule:app --listen tcp://127.0.0.1:7001``.
A service can register itself with a proxy's cluster at start and be drained
at stop: ``app.run(uri, register=Registration(admin_url, "cluster"))`` or
``pitcher backend ... --register http://127.0.0.1:9180 --cluster NAME``.
"""

from .registration import Registration, RegistrationError
from .service import Context, Headers, InvalidResponse, Request, Response, Service

__all__ = [
    "Context",
    "Headers",
    "InvalidResponse",
    "Registration",
    "RegistrationError",
    "Request",
    "Response",
    "Service",
]
