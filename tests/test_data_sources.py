"""fms-dyt's data sources: bad input skipped, counted and logged; jsonl/parquet; the hub source
through datasets on local files; clear errors; the offline sample corpus."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from fms_dyt.data import DataConfig, TokenizerConfig, build_dataloader
from fms_dyt.data.config import as_config
from fms_dyt.data.pipeline import PackedLoader
from fms_dyt.data.sample import MAX_DOCUMENT_CHARS, _pieces, ensure_sample
from fms_dyt.data.scan import scan
from fms_dyt.data.synthetic import BAD_ROWS, write_shards

ROOT = Path(__file__).resolve().parent.parent
KW = dict(seq_len=63, micro_batch_size=2, seed=1)


def test_bad_rows_and_corrupt_shard_are_skipped_counted_and_logged(tmp_path, caplog):
    info = write_shards(tmp_path, files=3, rows=80, bad_rows=True, corrupt=True)
    cfg = DataConfig(name="local", path=str(tmp_path), num_workers=0, shuffle_buffer=4, num_logical_shards=16)
    loader = build_dataloader(cfg, TokenizerConfig(), rank=0, world_size=1, **KW)
    with caplog.at_level(logging.WARNING, logger="fms_dyt.data"):
        for _ in zip(range(10_000), loader):
            if loader.stats()["epoch"] >= 1:
                break
    loader.close()
    stats = loader.stats()
    assert stats["epoch"] == 1, "one epoch must finish despite the bad input"
    assert stats["skipped_rows"] == info["bad_rows"] == 3 * len(BAD_ROWS)
    assert stats["skipped_files"] == 1
    log = caplog.text
    assert f"{tmp_path / 'shard-000.jsonl.zst'} line " in log and "broken JSON" in log
    for reason in ("no text field", "empty document", "blank line", "not a JSON object"):
        assert reason in log
    assert "corrupt-003.jsonl.zst" in log and "truncated" in log


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_other_formats(tmp_path, fmt):
    info = write_shards(tmp_path, files=2, rows=90, bad_rows=True, fmt=fmt)
    report = scan(DataConfig(name="local", path=str(tmp_path / f"*.{fmt}"), num_workers=2, num_logical_shards=32,
                             holdout=0),
                  TokenizerConfig(), world_size=2, **KW)
    assert report["documents_seen"] == report["documents_present"] == info["documents"] > 0
    assert report["duplicates"] == report["missing"] == 0
    assert report["skipped_rows"] == info["bad_rows"] > 0


def test_hub_source_through_datasets_on_local_files(tmp_path):
    info = write_shards(tmp_path, files=3, rows=70, corrupt=True)
    cfg = DataConfig(name="pile", hub_name="json", hub_data_files=str(tmp_path / "*.jsonl.zst"), num_workers=2,
                     num_logical_shards=32, holdout=0)
    loader = PackedLoader(cfg, TokenizerConfig(), rank=0, world_size=1, **KW)
    assert loader.plan.source.kind == "hub" and len(loader.plan.source.names) == 4
    report = scan(cfg, TokenizerConfig(), world_size=2, **KW)
    assert report["documents_seen"] == report["documents_present"] == info["documents"]
    assert report["duplicates"] == report["missing"] == 0
    assert report["skipped_files"] == 1 and "corrupt-003" in report["skipped_files_names"][0]


def test_hub_unreachable_names_the_dataset_and_the_fixes():
    code = "from fms_dyt.data.sources import make_source; from fms_dyt.data import DataConfig; make_source(DataConfig('pile'))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
    assert run.returncode != 0
    message = run.stderr.strip().splitlines()[-1]
    for needed in ("monology/pile-uncopyrighted", "data=local data.path=", "HF_HUB_OFFLINE=1"):
        assert needed in message


def test_missing_paths_and_bad_settings(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.path='/no/such/dir' does not exist"):
        build_dataloader(DataConfig(name="local", path="/no/such/dir"), TokenizerConfig(), rank=0, world_size=1, **KW)
    with pytest.raises(FileNotFoundError, match="contains no .jsonl"):
        build_dataloader(DataConfig(name="local", path=str(tmp_path)), TokenizerConfig(), rank=0, world_size=1, **KW)
    with pytest.raises(ValueError, match="data=local needs data.path"):
        as_config(DataConfig(name="local"), DataConfig)
    with pytest.raises(ValueError, match="data.name='hub'"):
        as_config({"name": "hub"}, DataConfig)
    with pytest.raises(ValueError, match="data.shufle_buffer"):
        as_config({"shufle_buffer": 3}, DataConfig)
    with pytest.raises(ValueError, match=r"data.weights\['Github'\]"):
        as_config({"weights": {"Github": -1}}, DataConfig)


def test_sample_corpus_is_built_offline_deterministic_and_in_pile_schema(tmp_path):
    first, second = ensure_sample(str(tmp_path / "a")), ensure_sample(str(tmp_path / "b"))
    manifest = json.loads((first / "manifest.json").read_text())
    shards = sorted(p.name for p in first.glob("*.jsonl.zst"))
    assert shards == manifest["shards"] and len(shards) == 8
    assert all((first / s).read_bytes() == (second / s).read_bytes() for s in shards)
    assert len(manifest["documents"]) >= 4  # several pile_set_names even without /usr/share
    assert 10 << 20 < sum(manifest["text_bytes"].values()) < 100 << 20
    stamp = (first / shards[0]).stat().st_mtime_ns
    assert ensure_sample(str(tmp_path / "a")) == first and (first / shards[0]).stat().st_mtime_ns == stamp
    cfg = DataConfig(name="sample", path=str(first), num_workers=0)
    loader = PackedLoader(cfg, TokenizerConfig(), rank=0, world_size=1, trace=True, **KW)
    subsets = set()
    for f in range(len(loader.plan.source.names)):
        for row, text, subset in loader.plan.source.read(f, 0, lambda r: r < 40):
            assert text and subset in manifest["documents"]
            subsets.add(subset)
    assert len(subsets) >= 4
    inputs, _ = next(iter(loader))
    assert inputs.shape == (2, 63)
    loader.close()
    longest = max(len(json.loads(line)["text"]) for line in zstandard.ZstdDecompressor().decompress(
        (first / shards[0]).read_bytes(), max_output_size=1 << 30).decode().splitlines())
    assert longest <= MAX_DOCUMENT_CHARS


@pytest.mark.parametrize("text", ["", "short", "a\n\nb" * 400, "line\n" * 700, "x" * 2500, "p\n\n" + "y" * 1900 + "\nz"])
def test_sample_sources_are_cut_into_short_pieces_that_join_back(text):
    pieces = _pieces(text, limit=600)
    assert "".join(pieces) == text
    assert all(0 < len(p) <= 600 for p in pieces)
    # cut at a blank line, else a line break, when the piece has one
    assert all(p.endswith("\n\n") for p in pieces[:-1] if "\n\n" in p)
