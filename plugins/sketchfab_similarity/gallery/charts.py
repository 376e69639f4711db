"""Chart geometry for the Quality page, drawn as inline SVG by `templates/charts.html`.

The gallery's Content-Security-Policy allows no scripts, so charts are computed here (plain
numbers in SVG coordinates) and the template writes SVG elements with presentation
attributes; every label goes through the template's escaping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

WIDTH, HEIGHT = 560, 260
LEFT, RIGHT, TOP, BOTTOM = 48, 16, 12, 40

COLOURS = {
    "published": "#1caad9",
    "random": "#8c959f",
    "colour": "#d4731c",
    "embedding_sample": "#6f42c1",
    "csls": "#1a7f37",
}
FALLBACK_COLOURS = ("#bf3989", "#0b5e7a", "#9a6700")


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    title: str


@dataclass(frozen=True)
class Series:
    key: str
    label: str
    colour: str
    points: list[Point]

    @property
    def path(self) -> str:
        return " ".join(f"{p.x:.1f},{p.y:.1f}" for p in self.points)


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    title: str


@dataclass(frozen=True)
class Chart:
    title: str
    x_label: str
    y_label: str
    x_ticks: list[tuple[float, str]]
    y_ticks: list[tuple[float, str]]
    series: list[Series] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    width: int = WIDTH
    height: int = HEIGHT

    @property
    def plot(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the plotting area."""
        return LEFT, TOP, self.width - RIGHT, self.height - BOTTOM


def _x(i: int, count: int) -> float:
    span = WIDTH - LEFT - RIGHT
    return LEFT + (span * i / (count - 1) if count > 1 else span / 2)


def _y(value: float, top: float) -> float:
    span = HEIGHT - TOP - BOTTOM
    return HEIGHT - BOTTOM - span * (value / top if top else 0.0)


def _y_ticks(top: float, steps: int = 4, digits: int = 2) -> list[tuple[float, str]]:
    return [(_y(top * i / steps, top), f"{top * i / steps:.{digits}f}") for i in range(steps + 1)]


def line_chart(
    title: str,
    x_labels: Sequence[str],
    series: Mapping[str, tuple[str, Sequence[float | None]]],
    x_label: str,
    y_label: str,
    top: float = 1.0,
) -> Chart:
    """Lines over categorical x positions; `series` maps key -> (label, values), None values are gaps."""
    count = len(x_labels)
    lines = []
    for n, (key, (label, values)) in enumerate(series.items()):
        colour = COLOURS.get(key, FALLBACK_COLOURS[n % len(FALLBACK_COLOURS)])
        points = [
            Point(_x(i, count), _y(v, top), f"{label}, {x_labels[i]}: {v:.3f}")
            for i, v in enumerate(values)
            if v is not None
        ]
        if points:
            lines.append(Series(key, label, colour, points))
    ticks = [(_x(i, count), label) for i, label in enumerate(x_labels)]
    return Chart(title, x_label, y_label, ticks, _y_ticks(top), series=lines)


def histogram_chart(title: str, histogram: Sequence[int], max_bars: int = 40) -> Chart:
    """Bars of h[c] = models recommended c times, with counts grouped into at most `max_bars` bins."""
    if not histogram:
        return Chart(title, "times recommended", "models", [], _y_ticks(1.0, digits=0))
    width = max(1, -(-len(histogram) // max_bars))  # counts per bin, rounded up
    bins = [
        (c, min(c + width, len(histogram)) - 1, sum(histogram[c : c + width]))
        for c in range(0, len(histogram), width)
    ]
    top = max(max(b[2] for b in bins), 1)
    span = WIDTH - LEFT - RIGHT
    slot = span / len(bins)
    bars = []
    for i, (lo, hi, models) in enumerate(bins):
        y = _y(models, top)
        times = f"{lo}" if lo == hi else f"{lo}-{hi}"
        bars.append(
            Bar(
                LEFT + i * slot + 1,
                y,
                max(slot - 2, 1),
                HEIGHT - BOTTOM - y,
                f"{models} models recommended {times} times",
            )
        )
    every = max(1, len(bins) // 8)
    ticks = [(LEFT + (i + 0.5) * slot, str(lo)) for i, (lo, _, _) in enumerate(bins) if i % every == 0]
    return Chart(title, "times recommended (in the first 10 of every list)", "models", ticks,
                 _y_ticks(float(top), digits=0), bars=bars)  # fmt: skip
