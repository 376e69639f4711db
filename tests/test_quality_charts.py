"""The Quality page's chart geometry (pure functions; the browser test renders it)."""

from __future__ import annotations

import pytest
from sketchfab_similarity.gallery import charts


def test_line_chart_maps_values_to_the_plot_and_skips_gaps():
    chart = charts.line_chart(
        "t", ["k=1", "k=5", "k=10"], {"published": ("published", [1.0, 0.5, None]), "x": ("other", [0.0, 0.0, 0.0])},
        "k", "p",
    )  # fmt: skip
    left, top, right, bottom = chart.plot
    published, other = chart.series
    assert [(p.x, p.y) for p in published.points] == [(left, top), ((left + right) / 2, (top + bottom) / 2)]
    assert published.colour == charts.COLOURS["published"] and other.colour == charts.FALLBACK_COLOURS[1]
    assert [p.y for p in other.points] == [bottom] * 3
    assert published.points[1].title == "published, k=5: 0.500"
    assert [label for _, label in chart.y_ticks] == ["0.00", "0.25", "0.50", "0.75", "1.00"]
    assert charts.line_chart("t", ["a"], {"published": ("p", [None])}, "x", "y").series == []


def test_histogram_bins_counts_and_keeps_every_model():
    histogram = [5, 0, 3] + [1] * 97  # 100 distinct counts -> bins of 3
    chart = charts.histogram_chart("h", histogram, max_bars=40)
    assert len(chart.bars) == 34
    assert chart.bars[0].title == "8 models recommended 0-2 times"
    assert chart.bars[-1].title == "1 models recommended 99 times"
    tallest = min(chart.bars, key=lambda b: b.y)
    assert tallest is chart.bars[0] and tallest.y == pytest.approx(chart.plot[1])
    small = charts.histogram_chart("h", [2, 1])
    assert [b.title for b in small.bars] == ["2 models recommended 0 times", "1 models recommended 1 times"]
    assert charts.histogram_chart("h", []).bars == []
