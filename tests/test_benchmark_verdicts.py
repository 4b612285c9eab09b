"""The verdicts benchmarks/LATENCY.md prints: keep_latency against keep_macs at the same measured latency."""

from __future__ import annotations

from benchmarks.latency import _judge


def _row(variant: str, eager: float, quality: float) -> dict:
    return {"variant": variant, "eager": eager, "quality": quality}


ROWS = [_row("original", 1.0, 1.0), _row("keep_macs=0.6", 0.7, 0.9), _row("keep_macs=0.3", 0.5, 0.6)]


def test_inside_the_keep_macs_range_the_curve_is_interpolated() -> None:
    assert _judge(ROWS, _row("keep_latency=0.6", 0.6, 0.76)) == ("0.75", "yes")
    assert _judge(ROWS, _row("keep_latency=0.6", 0.6, 0.74)) == ("0.75", "NO")


def test_faster_than_every_keep_macs_row_it_must_dominate_one() -> None:
    baseline, verdict = _judge(ROWS, _row("keep_latency=0.4", 0.45, 0.65))
    assert baseline == "-" and verdict.startswith("yes (faster and better than keep_macs=0.3")
    assert _judge(ROWS, _row("keep_latency=0.4", 0.45, 0.55)) == ("-", "-")
