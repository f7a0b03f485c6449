"""Pitcher RPC: an HTTP/1.1 traffic entry for split services."""

# Importing transports first chooses the build (compiled or pure Python) for
# both packages before any module of the request path loads.
import transports  # noqa: F401
