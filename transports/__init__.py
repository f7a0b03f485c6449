"""Pluggable transports that carry the frame protocol between proxy and services."""

from .native import choose

# Compiled or pure Python: decided before any module of the request path loads.
choose()
