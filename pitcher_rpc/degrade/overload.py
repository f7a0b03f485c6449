"""Shedding non-essential modules while a worker is overloaded, and taking them back.

Fed a sample every 50 ms (event-loop lag averaged over the last four, requests
in flight), :class:`Shedder` decides, with hysteresis:

* overloaded (lag above ``lag_high``, or in flight above ``in_flight_high``
  when that is set): shed one more non-essential module, the lowest priority
  first, at most one per ``step`` seconds, so each step's effect is seen
  before the next;
* calm (lag below ``lag_low`` and in flight at most ``in_flight_low``) for
  ``recover_after`` seconds: take back the module shed last; then wait as long
  again before the next;
* in between: nothing changes, and the calm clock starts again.

Each worker decides for itself: lag is a property of one event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config import OverloadConfig


@dataclass(frozen=True, slots=True)
class Step:
    action: str  # "shed" or "restore"
    module: str
    lag: float
    in_flight: int


class Shedder:
    def __init__(self, config: OverloadConfig) -> None:
        # Shed now (in detect mode: what would be), in the order shed.
        self.shed: list[str] = []
        self.overloaded = False
        self._last_step = float("-inf")
        self._calm_since: float | None = None
        self.config = config
        self.configure(config)

    def configure(self, config: OverloadConfig) -> None:
        """New thresholds (a reload); what is shed stays shed until calm returns.

        A new mode starts afresh: what detect mode only would have shed must
        not all go at once under enforce, and leaving enforce gives back
        everything shed.
        """
        if config.mode != self.config.mode:
            self.shed = []
            self._calm_since = None
            self._last_step = float("-inf")
        self.config = config
        # Without its own low mark, in flight is calm at half the high one.
        self._in_flight_low = config.in_flight_low or config.in_flight_high // 2

    def sample(
        self, now: float, lag: float, in_flight: int, sheddable: Sequence[str]
    ) -> Step | None:
        """One tick; ``sheddable``: modules that may be shed now, lowest priority first."""
        config = self.config
        high = config.in_flight_high
        self.overloaded = lag > config.lag_high or (high > 0 and in_flight > high)
        if self.overloaded:
            self._calm_since = None
            candidates = [name for name in sheddable if name not in self.shed]
            if candidates and now - self._last_step >= config.step:
                self._last_step = now
                self.shed.append(candidates[0])
                return Step("shed", candidates[0], lag, in_flight)
            return None
        calm = lag < config.lag_low and (high == 0 or in_flight <= self._in_flight_low)
        if not calm:
            self._calm_since = None
            return None
        if self._calm_since is None:
            self._calm_since = now
        if (
            self.shed
            and now - self._calm_since >= config.recover_after
            and now - self._last_step >= config.recover_after
        ):
            self._last_step = now
            self._calm_since = now
            return Step("restore", self.shed.pop(), lag, in_flight)
        return None

    def forget(self, module: str) -> None:
        """An operator switched ``module`` on or off: it is theirs again, not shed."""
        if module in self.shed:
            self.shed.remove(module)
