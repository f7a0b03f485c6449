"""The listen backlog the kernel really uses, for the start-up line."""

from __future__ import annotations

SOMAXCONN_PATH = "/proc/sys/net/core/somaxconn"


def listen_backlog(requested: int) -> tuple[int, int | None]:
    """The backlog the kernel will use for ``requested``, and its somaxconn cap (None if unknown).

    Linux silently lowers a listen() backlog above net.core.somaxconn; this
    says so, so the log can report it.
    """
    try:
        with open(SOMAXCONN_PATH, encoding="ascii") as file:
            cap = int(file.read().strip())
    except (OSError, ValueError):
        return requested, None
    return min(requested, cap), cap


def describe_backlog(requested: int) -> str:
    effective, cap = listen_backlog(requested)
    if cap is None:
        return f"backlog {requested}"
    if effective < requested:
        return (
            f"backlog {effective}: server.backlog {requested} is capped by the kernel's"
            f" net.core.somaxconn {cap}"
        )
    return f"backlog {effective}, kernel somaxconn {cap}"
