"""The trainer's progress lines: the ETA arithmetic and its format."""

from __future__ import annotations

from fms_dyt import metrics
from fms_dyt.metrics import Eta, format_duration


def test_format_duration_picks_the_unit():
    assert [format_duration(s) for s in (0, 44.6, 60, 187, 3599, 3600, 7530)] == [
        "0s", "45s", "1m00s", "3m07s", "59m59s", "1h00m", "2h05m"]


def test_eta_scales_the_mean_step_time_to_the_steps_left(monkeypatch):
    clock = iter([100.0, 130.0, 160.0, 0.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    eta = Eta(start_step=40, total=200)  # a resumed run: its first 40 steps are not timed
    assert eta.left(50) == "7m30s"  # 30 s for 10 steps, 150 steps left
    assert eta.left(100) == "1m40s"  # 60 s for 60 steps, 100 left: the mean, not the last interval
    assert Eta(start_step=0, total=10).left(0) == "?"
