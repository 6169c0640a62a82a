"""val/loss: held-out documents that training never reads, the same windows for every seed, in
metrics.jsonl every validation.interval steps, bit-identical on 1 and 2 ranks, bad values refused."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece
import torch

from fms_dyt.analyze import analyze
from fms_dyt.config import ConfigError, load_config
from fms_dyt.data import DataConfig, TokenizerConfig
from fms_dyt.data.holdout import HeldOut
from fms_dyt.data.pipeline import PackedLoader
from fms_dyt.data.synthetic import write_shards
from fms_dyt.data.tokenizer import default_model_file
from fms_dyt.resume import defines_run
from fms_dyt.trainer import main, train
from fms_dyt.validation import build_validation, heldout_windows

ROOT = Path(__file__).resolve().parents[1]
SEQ, MB = 31, 2
TINY = ["model=tiny", "model.n_layers=2", "parallel.param_dtype=float32", f"train.seq_len={SEQ}",
        f"train.micro_batch_size={MB}", f"train.global_batch_tokens={SEQ * MB}", "data.num_workers=0",
        "logging.wandb.mode=disabled"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("shards")
    return path, write_shards(path, files=2, rows=100, bad_rows=True)


def _rows(source, f):
    return [(row, text) for row, text, _ in source.read(f, 0, lambda r: True)]


def test_training_never_reads_a_held_out_row(shards):
    path, _ = shards
    cfg = DataConfig(name="local", path=str(path), num_workers=0, shuffle_buffer=8, num_logical_shards=8, holdout=0.3)
    loader = PackedLoader(cfg, TokenizerConfig(), seq_len=SEQ, micro_batch_size=MB, seed=3, rank=0, world_size=1,
                          trace=True)
    source = loader.plan.source
    held = {(f, row) for f in range(len(source.names)) for row, _ in _rows(source, f) if loader.plan.held_out(f, row)}
    good = {(f, row) for f in range(len(source.names)) for row, text in _rows(source, f) if text is not None}
    seen, skipped, epoch = set(), set(), 0
    batches = iter(loader)
    while epoch == 0:
        next(batches)
        _, events, spans = loader.last_trace
        seen |= {(f, row) for e, f, row, *_ in spans if e == 0}
        skipped |= {(f, row) for e, f, row, _ in events if e == 0}
        epoch = max(e for e, *_ in spans)
    loader.close()
    assert 40 < len(held) < 90  # about 30% of the 2 x 106 rows
    assert not seen & held
    assert seen == good - held  # everything else is trained on, once per epoch
    bad = {(f, row) for f in range(len(source.names)) for row, text in _rows(source, f) if text is None}
    assert skipped == bad - held and bad & held  # a held-out bad row is not training's to report
    assert loader.stats()["held_out"] >= len(held)
    # a data state saved without the held-out slice belongs to other training data
    plain = PackedLoader(DataConfig(**{**cfg.__dict__, "holdout": 0.0}), TokenizerConfig(), seq_len=SEQ,
                         micro_batch_size=MB, seed=3, rank=0, world_size=1)
    with pytest.raises(ValueError, match="data.holdout"):
        loader.load_state_dict(plain.state_dict())


def test_heldout_windows_are_the_held_out_rows_in_file_order_packed_like_training(shards, tmp_path):
    path, info = shards
    cfg = DataConfig(name="local", path=str(path), holdout=0.2)
    windows = heldout_windows(cfg, TokenizerConfig(), SEQ, tokens=10 * (SEQ + 1) + 5)
    assert windows.shape == (10, SEQ + 1) and windows.dtype == torch.long
    sp = sentencepiece.SentencePieceProcessor(model_file=str(default_model_file()))
    names = sorted(info["files"])
    held_out = HeldOut(names, 0.2)  # by file name and row only: no seed, world size or shard count
    stream = []
    for f, name in enumerate(names):
        for line_no, line in enumerate(_lines(path / name)):
            if held_out(f, line_no) and _text(line):
                stream += [sp.bos_id()] + sp.encode(_text(line)) + [sp.eos_id()]
    assert windows.flatten().tolist() == stream[:windows.numel()]
    # a copy of the files elsewhere: the same windows
    shutil.copytree(path, tmp_path / "copy")
    assert torch.equal(heldout_windows(DataConfig(name="local", path=str(tmp_path / "copy"), holdout=0.2),
                                       TokenizerConfig(), SEQ, tokens=10 * (SEQ + 1)), windows)


def _lines(path):
    import zstandard

    return zstandard.ZstdDecompressor().stream_reader(path.open("rb")).read().decode().splitlines()


def _text(line):
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    text = obj.get("text") if isinstance(obj, dict) else None
    return text if isinstance(text, str) and text.strip() else None


def test_validation_path_reads_local_files_or_the_hub_dataset_file(shards, tmp_path):
    path, _ = shards
    write_shards(tmp_path, files=1, rows=40, seed=7)  # clean: datasets drops a whole block for one broken row
    val = tmp_path / "shard-000.jsonl.zst"
    local = heldout_windows(DataConfig(name="local", path=str(path), validation_path=str(val)), TokenizerConfig(),
                            SEQ, tokens=8 * (SEQ + 1))
    pile = heldout_windows(DataConfig(name="pile", hub_name="json", validation_path=str(val), holdout=0.0),
                           TokenizerConfig(), SEQ, tokens=8 * (SEQ + 1))
    assert torch.equal(local, pile)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(default_model_file()))
    first = next(t for t in map(_text, _lines(val)) if t)
    assert local[0, :5].tolist() == ([sp.bos_id()] + sp.encode(first))[:5]


def test_val_loss_every_interval_and_at_the_end_without_changing_training_and_analyzed(tmp_path, capsys):
    overrides = [*TINY, "train.max_steps=5", "logging.interval=3", "validation.tokens=160", "norm=rmsnorm"]
    train(load_config([*overrides, "validation.interval=2", f"run_dir={tmp_path / 'val'}"]))
    out = capsys.readouterr().out
    train(load_config([*overrides, "validation.interval=null", f"run_dir={tmp_path / 'plain'}"]))
    records = [json.loads(line) for line in (tmp_path / "val" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 4, 5]
    assert [r["step"] for r in records if "val/loss" in r] == [2, 4, 5]
    vals = [r["val/loss"] for r in records if "val/loss" in r]
    assert all(5 < v < 11 for v in vals) and vals[-1] < vals[0]  # it learns (vocabulary 32k: ln = 10.4)
    assert f"val {vals[0]:.4f}" in out
    plain = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in plain] == [r["loss"] for r in records if r["step"] in (3, 5)]

    # fms_dyt.analyze draws it and puts the last one in the runs table
    result = analyze([tmp_path / "val", tmp_path / "plain"], tmp_path / "report", checkpoints=False)
    top = result.figures["val_loss.png"].axes[0]
    drawn = [c.get_offsets()[:, 1].tolist() for c in top.collections if c.get_gid() == "series"]
    assert drawn == [vals]  # the run without validation has no curve
    assert f"| final val/loss (step) | {vals[-1]:.3f} (5) | — |" in result.report.read_text()


WORKER = """
import json, sys, torch
torch.set_num_threads(1)
import fms_dyt.validation as V
from fms_dyt.config import ConfigError, load_config
from fms_dyt.parallel import build_mesh, init_distributed
from fms_dyt.trainer import build_model
reads, read = [], V.heldout_windows
V.heldout_windows = lambda *args: reads.append(1) or read(*args)
out, cfg = sys.argv[1], load_config(sys.argv[2:])
d = init_distributed("cpu")
model = build_model(cfg, d, build_mesh(cfg.parallel, d))
try:
    validation = V.build_validation(cfg, d.rank, d.world_size, d.device)
    report = {"groups": len(validation.groups), "loss": repr(validation.loss(model)), "reads": len(reads)}
except ConfigError as e:
    report = {"error": str(e)}
with open(f"{out}/rank{d.rank}.json", "w") as f:  # not stdout: the ranks' prints interleave
    json.dump(report, f)
"""


def _ranks(tmp_path, nproc: int, *overrides: str) -> list[dict]:
    """WORKER's report of each of ``nproc`` ranks under torchrun."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"{nproc}_{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(script), str(out), *TINY, "validation.interval=1", "run_dir=unused", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(nproc)]


def test_val_loss_is_bit_identical_on_one_and_two_ranks_and_read_by_rank_0_alone(tmp_path):
    # 5 windows in groups of 2: 3 groups, on 2 ranks padded to 4 (the padding group is not counted)
    tokens = f"validation.tokens={5 * (SEQ + 1)}"
    one, two = _ranks(tmp_path, 1, tokens), _ranks(tmp_path, 2, tokens)
    assert {r["groups"] for r in one + two} == {3}, (one, two)
    assert [r["reads"] for r in two] == [1, 0]  # rank 1 got the windows by broadcast
    assert one[0]["loss"] == two[0]["loss"] == two[1]["loss"], (one, two)


def test_rank_0s_validation_error_reaches_every_rank(tmp_path):
    reports = _ranks(tmp_path, 2, "validation.tokens=1000000000")
    assert all("validation.tokens=1000000000" in r.get("error", "") for r in reports), reports


def test_a_resumed_run_may_change_what_it_validates_on_but_not_what_it_holds_out():
    assert not any(map(defines_run, ("validation.interval", "validation.tokens", "data.validation_path")))
    assert defines_run("data.holdout")  # the training documents


@pytest.mark.parametrize("override, key", [
    ("validation.interval=0", "validation.interval=0"), ("validation.tokens=128", "validation.tokens=128"),
    ("data.holdout=1.0", "data.holdout=1.0"),
])
def test_bad_values_are_named(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(["experiment=quickstart", override])
    assert str(e.value).startswith(key), str(e.value)


def test_training_refuses_validation_it_cannot_serve_with_exit_2_and_no_run_dir(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(load_config(["experiment=quickstart", "data.holdout=0", f"run_dir={run_dir}",
                          "logging.wandb.mode=disabled"]))
    assert e.value.code == 2
    assert "data.holdout=0 and no data.validation_path" in capsys.readouterr().err
    assert not run_dir.exists()
    too_many = load_config(["experiment=quickstart", "validation.tokens=1000000000"])
    with pytest.raises(ConfigError, match="validation.tokens=1000000000"):
        build_validation(too_many, 0, 1, torch.device("cpu"))
