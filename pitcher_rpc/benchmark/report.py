"""The table and the chart of `pitcher bench`."""

from __future__ import annotations

from collections.abc import Sequence

from transports.datagram import crc_note

from .runner import Row

_PATHS = {"floor": "raw floor", "client": "pitcher client", "proxy": "HTTP via proxy"}


def table(rows: Sequence[Row]) -> str:
    """One line per measurement; client rows carry their ratio to the floor of the same run."""
    floors = {(r.carrier, r.in_flight): r.result.rate for r in rows if r.path == "floor"}
    lines = [
        f"{'transport':<9} {'path':<15} {'in flight':>9} {'req/s':>10} {'p50 µs':>9}"
        f" {'p99 µs':>9} {'p99.9 µs':>9} {'errors':>6}  vs floor",
    ]
    for row in rows:
        result = row.result
        ratio = ""
        floor = floors.get((row.carrier, row.in_flight))
        if row.path == "client" and floor:
            ratio = f"{result.rate / floor:.2f}x"
        lines.append(
            f"{row.carrier:<9} {_PATHS[row.path]:<15} {row.in_flight:>9} {result.rate:>10.0f}"
            f" {result.p50:>9.1f} {result.percentile(0.99):>9.1f}"
            f" {result.percentile(0.999):>9.1f} {result.errors:>6}  {ratio}"
        )
    lines.extend(f"note: {note}" for note in notes(rows))
    return "\n".join(lines)


def notes(rows: Sequence[Row]) -> list[str]:
    """What makes a figure of this machine slower than it should be, to read beside it."""
    found: list[str] = []
    slow_crc = crc_note()
    if slow_crc and any(row.carrier == "udp" for row in rows):
        # The echo servers run in this interpreter too, so they compute theirs alike.
        found.append(f"udp: {slow_crc}")
    return found


def chart(rows: Sequence[Row], path: str) -> bool:
    """Latency distributions (one request in flight) as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    carriers = list(dict.fromkeys(row.carrier for row in rows))
    figure, axes = plt.subplots(
        1, len(carriers), figsize=(4 * len(carriers), 4), sharey=True, squeeze=False
    )
    for axis, carrier in zip(axes[0], carriers, strict=True):
        for row in rows:
            if row.carrier != carrier or row.in_flight != 1 or not row.result.latencies:
                continue
            ordered = sorted(latency * 1e6 for latency in row.result.latencies)
            share = [(index + 1) / len(ordered) for index in range(len(ordered))]
            axis.plot(ordered, share, label=_PATHS[row.path])
        axis.set_xscale("log")
        axis.set_title(carrier)
        axis.set_xlabel("round trip, µs (log)")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("share of requests at or below")
    axes[0][0].legend(loc="lower right")
    figure.suptitle("Pitcher RPC: latency per transport, one request in flight")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
