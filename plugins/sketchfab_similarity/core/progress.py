"""Progress lines for long work (done/total, rate, time left, at most every few seconds) and phase timings."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field


@dataclass
class Progress:
    stage: str
    total: int | None = None
    unit: str = "items"
    log: logging.Logger = field(default_factory=lambda: logging.getLogger(__name__))
    every_s: float = 5.0
    done: int = 0
    _start: float = field(default_factory=time.monotonic)
    _last: float = 0.0

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self.log.info("%s: %s", self.stage, self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = self.done / elapsed
        text = f"{self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}, {rate:.1f}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ~{(self.total - self.done) / rate:.0f}s left"
        return text

    def finish(self, summary: str) -> None:
        elapsed = time.monotonic() - self._start
        self.log.info("%s done in %.1fs: %s", self.stage, elapsed, summary)


def lap(seconds: dict[str, float], phase: str, since: float) -> float:
    """Record the time since `since` under `phase`; returns now, the start of the next phase."""
    now = time.perf_counter()
    seconds[phase] = round(now - since, 3)
    return now
