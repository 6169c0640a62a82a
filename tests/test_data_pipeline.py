"""fms-dyt's data loader on small generated shards: packing, every document exactly once for
several world sizes, bit-identical resume with shuffling and two workers, and rescaling."""

import json
from collections import defaultdict

import pytest
import sentencepiece
import torch

from fms_dyt.data import DataConfig, TokenizerConfig, build_dataloader
from fms_dyt.data.pipeline import PackedLoader
from fms_dyt.data.scan import present_documents, scan
from fms_dyt.data.synthetic import write_shards
from fms_dyt.data.tokenizer import default_model_file

SEQ, MB, SEED = 63, 2, 5


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three shards of 120 rows, each with 6 bad rows, plus one truncated shard."""
    path = tmp_path_factory.mktemp("shards")
    return path, write_shards(path, files=3, rows=120, bad_rows=True, corrupt=True)


def data_cfg(path, **overrides):
    # holdout 0: these tests count every row of the files (tests/test_val_loss.py holds rows out)
    return DataConfig(**{"name": "local", "path": str(path), "num_workers": 2, "shuffle_buffer": 8,
                         "num_logical_shards": 64, "holdout": 0.0, **overrides})


def make_loader(path, rank=0, world_size=1, **overrides):
    return PackedLoader(data_cfg(path, **overrides), TokenizerConfig(), seq_len=SEQ, micro_batch_size=MB, seed=SEED,
                        rank=rank, world_size=world_size, trace=True)


class Coverage:
    """Tokens delivered per (epoch, file, row, copy), from the loader's trace."""

    def __init__(self):
        self.tokens, self.length = defaultdict(int), {}

    def add(self, spans):
        for epoch, f, row, c, a, b, length, _ in spans:
            self.tokens[(epoch, f, row, c)] += b - a
            self.length[(epoch, f, row, c)] = length

    def check_epoch(self, epoch, expected):
        """Every expected document of ``epoch`` delivered exactly once, nothing else."""
        got = {k[1:]: n for k, n in self.tokens.items() if k[0] == epoch}
        assert set(got) == set(expected), (len(set(got) - set(expected)), len(set(expected) - set(got)))
        wrong = [d for d, n in got.items() if n != self.length[(epoch, *d)]]
        assert not wrong, f"{len(wrong)} documents delivered partly or twice, e.g. {wrong[:3]}"


def run(loader, coverage, batches=None, until_epoch=None):
    """Take ``batches`` batches, or until every reader has delivered tokens of ``until_epoch``."""
    done, taken, it = set(), 0, iter(loader)
    try:
        while (batches is None or taken < batches) and (until_epoch is None or len(done) < loader.per_rank):
            next(it)
            taken += 1
            reader, _, spans = loader.last_trace
            coverage.add(spans)
            if until_epoch is not None and any(s[0] >= until_epoch for s in spans):
                done.add(reader)
    finally:
        loader.close()
    return taken


def test_windows_concatenate_to_the_bos_doc_eos_stream(shards):
    path, _ = shards
    loader = make_loader(path, num_workers=0)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(default_model_file()))
    texts = {}
    for f in range(len(loader.plan.source.names)):
        try:
            for row, text, _ in loader.plan.source.read(f, 0, lambda r: True):
                texts[(f, row)] = text
        except Exception:
            pass
    it = iter(loader)
    stream, order = [], []
    for _ in range(40):
        inputs, targets = next(it)
        assert inputs.shape == targets.shape == (MB, SEQ) and inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the inputs shifted by one
        for window_in, window_tg in zip(inputs, targets):
            stream += window_in.tolist() + window_tg[-1:].tolist()
        for _, f, row, c, a, b, length, _ in loader.last_trace[2]:
            if a == 0:
                order.append((f, row))
    loader.close()
    expected = []
    for f, row in order:
        expected += [sp.bos_id()] + sp.encode(texts[(f, row)]) + [sp.eos_id()]
    assert len(stream) == 40 * MB * (SEQ + 1)
    assert stream == expected[: len(stream)]
    assert len(set(order)) == len(order) > 10


@pytest.mark.parametrize("world_size,workers", [(1, 1), (2, 2), (3, 2), (4, 2)])
def test_every_document_exactly_once(shards, world_size, workers):
    path, info = shards
    report = scan(data_cfg(path, num_workers=workers), TokenizerConfig(), world_size=world_size, seq_len=SEQ,
                  micro_batch_size=MB, seed=SEED)
    assert report["documents_present"] == report["documents_seen"] == info["documents"]
    assert report["duplicates"] == report["missing"] == 0
    assert report["skipped_rows"] == info["bad_rows"] and report["skipped_files"] == 1
    assert len(report["tokens_per_rank"]) == world_size and min(report["tokens_per_rank"]) > 0


def test_fewer_files_than_readers(tmp_path):
    info = write_shards(tmp_path, files=2, rows=60)
    report = scan(data_cfg(tmp_path, num_workers=2, shuffle_buffer=4), TokenizerConfig(), world_size=3,
                  seq_len=SEQ, micro_batch_size=MB, seed=SEED)  # 6 readers share 2 files
    assert report["documents_seen"] == info["documents"] == 120
    assert report["duplicates"] == report["missing"] == 0
    assert min(report["tokens_per_rank"]) > 0


def test_resume_is_bit_identical_with_shuffle_and_two_workers(shards):
    path, _ = shards
    reference = make_loader(path)
    it = iter(reference)
    expected = []
    while reference.stats()["epoch"] < 1 or len(expected) % 50:  # both workers into epoch 1, and on
        expected.append(next(it))
    reference.close()
    for cut in (3, len(expected) * 3 // 4):
        first = make_loader(path)
        it = iter(first)
        for _ in range(cut):
            next(it)
        saved = json.loads(json.dumps(first.state_dict()))
        first.close()
        assert len(json.dumps(saved)) < 4096
        resumed = make_loader(path)
        resumed.load_state_dict([saved])
        it = iter(resumed)
        for i in range(cut, len(expected)):
            inputs, targets = next(it)
            assert torch.equal(inputs, expected[i][0]) and torch.equal(targets, expected[i][1]), f"batch {i}"
        resumed.close()


def test_readers_not_workers_make_the_order_and_resume_across_worker_counts(shards):
    """Four readers give the same batches played by two worker processes (two readers each), by
    one, or by the training process; a state saved with one count resumes exactly with another."""
    path, _ = shards
    streams = {}
    for workers in (2, 1, 0):
        loader = make_loader(path, readers=4, num_workers=workers)
        it = iter(loader)
        streams[workers] = [next(it)[0] for _ in range(13)]
        loader.close()
    for workers in (1, 0):
        assert all(torch.equal(a, b) for a, b in zip(streams[2], streams[workers])), workers
    saved = json.loads(json.dumps(loader.state_dict()))  # after 13 batches: in the middle of the readers' turn
    reference, resumed = make_loader(path, readers=4, num_workers=2), make_loader(path, readers=4, num_workers=1)
    resumed.load_state_dict([saved])
    it = iter(reference)
    expected = [next(it)[0] for _ in range(22)][13:]
    it = iter(resumed)
    assert all(torch.equal(a, next(it)[0]) for a in expected)
    reference.close()
    resumed.close()
    with pytest.raises(ValueError, match="data.readers=3 must be >= 1 and a multiple of data.num_workers=2"):
        make_loader(path, readers=3, num_workers=2)


def _with_old_names(state):
    """A rank's data state as fms-dyt wrote it before its fields were renamed (2026-12)."""
    def reader(r):
        epochs = {e: {"pieces": v["piece_runs"], "partials": v["cut_documents"]} for e, v in r["epoch_progress"].items()}
        return {"epoch": r["epoch"], "tau": r["emitted_key"], "epochs": epochs, "stats": r["stats"]}
    return {**state, "readers": [reader(r) for r in state["readers"]]}


def test_states_saved_under_the_old_field_names_resume_the_same(shards):
    path, _ = shards
    first = make_loader(path)
    it = iter(first)
    for _ in range(5):
        next(it)
    saved = json.loads(json.dumps(first.state_dict()))
    first.close()
    assert saved["readers"][0]["emitted_key"] >= 0 and any(
        r["epoch_progress"][str(r["epoch"])]["cut_documents"] for r in saved["readers"])  # cut documents to restore
    batches = []
    for state in (saved, _with_old_names(saved)):
        loader = make_loader(path)
        loader.load_state_dict([state])
        it = iter(loader)
        batches.append([next(it) for _ in range(6)])
        loader.close()
    for (a, _), (b, _) in zip(*batches):
        assert torch.equal(a, b)


@pytest.mark.parametrize("new_world", [1, 4])
def test_rescale_from_two_ranks(shards, new_world):
    path, _ = shards
    coverage, states = Coverage(), []
    for rank, batches in ((0, 7), (1, 19)):
        loader = make_loader(path, rank=rank, world_size=2)
        run(loader, coverage, batches=batches)
        states.append(json.loads(json.dumps(loader.state_dict())))
    for rank in range(new_world):
        loader = make_loader(path, rank=rank, world_size=new_world)
        loader.load_state_dict(states)
        run(loader, coverage, until_epoch=1)
    expected = present_documents(make_loader(path))[0]
    coverage.check_epoch(0, expected)


def test_rescale_while_workers_are_in_different_epochs(shards):
    path, _ = shards
    coverage, states = Coverage(), []
    for rank, batches in ((0, 150), (1, 30)):  # rank 0's workers are already in epoch 1
        loader = make_loader(path, rank=rank, world_size=2)
        run(loader, coverage, batches=batches)
        states.append(loader.state_dict())
    assert states[0]["readers"][0]["epoch"] == 1 and states[1]["readers"][0]["epoch"] == 0
    for rank in range(3):
        loader = make_loader(path, rank=rank, world_size=3)
        loader.load_state_dict(states)
        run(loader, coverage, until_epoch=2)
    for epoch in (0, 1):
        expected = present_documents(make_loader(path))[0]
        coverage.check_epoch(epoch, expected)


def test_mixture_weights(shards):
    path, info = shards
    weights = {"Github": 0.0, "ArXiv": 2.0, "Wikipedia (en)": 0.5}
    cfg = data_cfg(path, weights=weights)
    report = scan(cfg, TokenizerConfig(), world_size=2, seq_len=SEQ, micro_batch_size=MB, seed=SEED)
    assert report["duplicates"] == report["missing"] == 0
    expected = present_documents(make_loader(path, weights=weights))[0]
    by_subset = defaultdict(int)
    for subset in expected.values():
        by_subset[subset] += 1
    natural = info["documents"] // 4  # the generator cycles through four subsets
    assert by_subset["Github"] == 0 and by_subset["ArXiv"] == 2 * natural and by_subset["Pile-CC"] == natural
    assert 0.3 * natural < by_subset["Wikipedia (en)"] < 0.7 * natural


def test_states_refuse_other_data_and_build_dataloader_api(shards, tmp_path):
    path, _ = shards
    loader = build_dataloader(data_cfg(path), TokenizerConfig(), seq_len=SEQ, micro_batch_size=MB, seed=SEED,
                              rank=0, world_size=1)
    inputs, targets = next(iter(loader))
    assert inputs.shape == (MB, SEQ)
    state = loader.state_dict()
    loader.close()
    assert set(loader.stats()) >= {"documents", "tokens", "skipped_rows", "skipped_files", "epoch"}
    other = build_dataloader(data_cfg(path), TokenizerConfig(), seq_len=SEQ, micro_batch_size=MB, seed=SEED + 1,
                             rank=0, world_size=1)
    with pytest.raises(ValueError, match="saved for other data"):
        other.load_state_dict([state])
    with pytest.raises(ValueError, match="incomplete data state"):
        build_dataloader(data_cfg(path), TokenizerConfig(), seq_len=SEQ, micro_batch_size=MB, seed=SEED, rank=0,
                         world_size=2).load_state_dict([dict(state, world_size=2)])
    with pytest.raises(ValueError, match="data.num_logical_shards"):
        build_dataloader(data_cfg(path, num_logical_shards=2), TokenizerConfig(), seq_len=SEQ, micro_batch_size=MB,
                         seed=SEED, rank=0, world_size=4)
