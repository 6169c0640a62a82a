"""``python -m fms_dyt.data scan|preview`` as users run it, with Hydra overrides."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fms_dyt.data.__main__ import main
from fms_dyt.data.synthetic import SUBSETS, write_shards

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fms_dyt.data", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_shards")
    return path, write_shards(path, files=3, rows=100, bad_rows=True, corrupt=True)


def check(report, info, world_size):
    assert report["documents_seen"] == report["documents_present"] == info["documents"]
    assert report["duplicates"] == report["missing"] == 0
    assert report["skipped"] == info["bad_rows"] + 1 and report["skipped_files"] == 1
    assert len(report["tokens_per_rank"]) == world_size and report["num_workers"] == 2


def test_scan_command_reports_every_document_once(shards):
    path, info = shards
    run = cli("scan", "data=local", f"data.path={path}", "data.num_workers=2", "data.holdout=0", "--world-size", "4", "--json")
    assert run.returncode == 0, run.stderr
    check(json.loads(run.stdout), info, 4)


@pytest.mark.parametrize("world_size", [1, 2])
def test_scan_smaller_world_sizes(shards, capsys, world_size):
    path, info = shards
    code = main(["scan", "data=local", f"data.path={path}", "data.num_workers=2", "data.holdout=0", "--world-size", str(world_size),
                 "--json", "train.seq_len=128"])
    assert code == 0
    check(json.loads(capsys.readouterr().out), info, world_size)


def test_preview_decodes_windows_and_reports_the_mix(shards, capsys):
    path, _ = shards
    assert main(["preview", "data=local", f"data.path={path}", "train.seq_len=96", "--windows", "1",
                 "--mix-windows", "8"]) == 0
    out = capsys.readouterr().out
    assert "=== window 0 (97 tokens = seq_len + 1) ===" in out and "=== window 1" not in out
    assert "subset mix over the first 8 windows" in out and "tokens per document" in out
    assert any(f"{subset}: " in out for subset in SUBSETS)
    assert "shard-000.jsonl.zst line " in out and "broken JSON" in out  # bad input met on the way


def test_bad_override_and_missing_data_fail_clearly(tmp_path, capsys):
    assert main(["scan", "data.num_wokers=2", "--world-size", "1"]) == 2
    assert "num_wokers" in capsys.readouterr().err
    assert main(["scan", "data=local", f"data.path={tmp_path / 'nothing'}", "--world-size", "1"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "data.path" in err


def test_scan_reports_the_held_out_documents(tmp_path, capsys):
    """Held-out rows are counted apart: with them, the documents seen are the whole corpus; four
    readers played by two workers see every document once."""
    info = write_shards(tmp_path, files=2, rows=80)
    assert main(["scan", "data=local", f"data.path={tmp_path}", "data.holdout=0.2", "data.readers=4",
                 "data.num_workers=2", "--world-size", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 < report["held_out"] < info["documents"] == 160
    assert report["documents_seen"] + report["held_out"] == info["documents"]
    assert report["duplicates"] == report["missing"] == 0 and report["readers_per_rank"] == 4
