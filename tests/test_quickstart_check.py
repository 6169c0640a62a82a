"""The arithmetic of bench/quickstart_check.py on synthetic metrics (no training, no checkpoint)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import quickstart_check as qc  # noqa: E402


def write_metrics(run_dir: Path, losses, skip=()):
    run_dir.mkdir()
    lines = [json.dumps({"step": s, "loss": v}) for s, v in enumerate(losses, 1) if s not in skip]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_moving_mean_starts_at_the_window():
    assert qc.moving_mean([1, 2, 3, 4], window=2) == [1.5, 2.5, 3.5]


def test_rise_is_measured_from_the_lowest_earlier_mean():
    # 100 steps, flat 5.0; steps 61-70 at 5.5: the 10-step mean climbs 0.5 above 5.0 and peaks at step 70.
    losses = [5.0] * 100
    losses[60:70] = [5.5] * 10
    assert qc.largest_rise(losses) == (pytest.approx(0.5), 70)
    # A later fall does not hide the earlier rise, and a steady decline is no rise at all.
    assert qc.largest_rise([10 - 0.01 * s for s in range(100)])[0] == 0.0


def test_rises_during_the_first_fifth_do_not_count():
    early = [5.0] * 100
    early[5:15] = [9.0] * 10  # steps 6-15: the means from step 21 on only fall
    assert qc.largest_rise(early)[0] == 0.0
    late = [5.0] * 100
    late[20:30] = [9.0] * 10  # steps 21-30: the mean climbs from step 21 to step 30
    assert qc.largest_rise(late) == (pytest.approx(3.6), 30)


def test_targets_pass_and_fail_on_their_limits():
    rms = [6.0] * 50
    good = qc.evaluate([6.05] * 50, rms, {"attn/0": 0.1, "final": 0.49})
    assert [t.ok for t in good] == [True, True, True]
    assert "final" in good[2].detail
    bad = qc.evaluate([6.2] * 50, rms, {"attn/0": 0.1, "ffn/2": 0.8})
    assert [t.ok for t in bad] == [True, False, False]
    assert bad[1].value == pytest.approx(0.2)
    assert "ffn/2" in bad[2].detail


def test_a_missing_step_is_refused_only_where_it_counts(tmp_path):
    write_metrics(tmp_path / "run", [7.0] * 30, skip={12})
    by_step = qc.step_losses(tmp_path / "run")
    with pytest.raises(SystemExit, match="lacks the loss of 1 step.*first: 12.*steps 1-30.*logging.interval=1"):
        qc.consecutive(by_step, 1, 30, tmp_path / "run")
    assert qc.consecutive(by_step, 21, 30, tmp_path / "run") == [7.0] * 10  # an RMSNorm run's final mean


def test_cli_reports_different_lengths(tmp_path, capsys):
    write_metrics(tmp_path / "dyt", [7.0] * 30)
    write_metrics(tmp_path / "rms", [7.0] * 40)
    assert qc.main([str(tmp_path / "dyt"), str(tmp_path / "rms")]) == 2
    assert "end at steps 30 and 40" in capsys.readouterr().err
