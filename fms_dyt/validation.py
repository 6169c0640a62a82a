"""Validation loss (``val/loss``): the mean token cross-entropy on a fixed set of held-out windows.

Which documents: with ``data.validation_path`` the rows of those files (for ``data=pile`` the
Pile's own validation split, ``val.jsonl.zst``), otherwise the ``data.holdout`` slice of the
training files that training skips (``fms_dyt/data/holdout.py``). They are read in file order
and row order, wrapped ``BOS doc EOS`` like training, packed into windows of ``train.seq_len + 1``
tokens, and the first ``validation.tokens // (seq_len + 1)`` windows are kept: the same windows
for every seed and every world size. Rank 0 reads and tokenizes them and broadcasts the tensor:
one reader, not 1,024 ranks streaming the same file from the hub at start-up.

The same number for any world size: the windows are cut into fixed groups of
``train.micro_batch_size``; group ``g`` runs on rank ``g % world``, every rank runs the same
number of forwards (a padding group repeats group 0 and is not counted), each group's summed loss
goes into its own slot of a vector that one all-reduce adds up (adding zeros is exact), and every
rank sums the slots in group order in float64.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Iterator

import torch
import torch.distributed as dist

from fms_dyt.data.config import DataConfig, TokenizerConfig, as_config
from fms_dyt.data.holdout import HeldOut
from fms_dyt.data.sources import HubSource, LocalSource, ShardError, Source, make_source
from fms_dyt.data.tokenizer import TextEncoder
from fms_dyt.errors import ConfigError
from fms_dyt.loss import cross_entropy
from fms_dyt.parallel import on_rank0

log = logging.getLogger(__name__)

_ENCODE_BATCH = 64  # documents per tokenizer call


def validation_source(data: DataConfig) -> tuple[Source, HeldOut | None]:
    """Where the validation documents are: (source, rows to take) — None takes every row."""
    if data.validation_path:
        if data.name == "pile":  # a file of the hub dataset, e.g. val.jsonl.zst
            return HubSource(dataclasses.replace(data, hub_data_files=data.validation_path, hub_split="train")), None
        try:
            return LocalSource(data.validation_path, key="data.validation_path"), None
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
    if not data.holdout:
        raise ConfigError("validation needs documents: data.holdout=0 and no data.validation_path; set "
                          "data.holdout (e.g. 0.01) or data.validation_path, or validation.interval=null")
    source = make_source(data)
    return source, HeldOut(source.names, data.holdout)


def validation_documents(data) -> Iterator[str]:
    """The validation documents' texts in file order and row order (bad rows left out)."""
    source, held_out = validation_source(as_config(data, DataConfig))
    for f in range(len(source.names)):
        want = (lambda row, f=f: held_out(f, row)) if held_out else (lambda row: True)
        try:
            for _, text, _ in source.read(f, 0, want):
                if text is not None:
                    yield text
        except ShardError as e:  # training skips the rest of such a file too
            log.warning("validation documents: %s; the rest of this file is left out", e)


def heldout_windows(data, tokenizer, seq_len: int, tokens: int) -> torch.Tensor:
    """The validation windows, LongTensor ``[tokens // (seq_len + 1), seq_len + 1]``."""
    encoder = TextEncoder(as_config(tokenizer, TokenizerConfig))
    prefix = [encoder.bos_id] if encoder.cfg.add_bos else []
    suffix = [encoder.eos_id] if encoder.cfg.add_eos else []
    width = seq_len + 1
    need = (tokens // width) * width
    stream: list[int] = []
    documents = validation_documents(data)
    while len(stream) < need:
        texts = list(itertools.islice(documents, _ENCODE_BATCH))
        if not texts:
            break
        for ids in encoder.encode(texts):
            stream += prefix + ids + suffix
    if len(stream) < need:
        raise ConfigError(f"validation.tokens={tokens} asks for {need // width} windows of {width} tokens, but the "
                          f"validation documents hold {len(stream)} tokens; lower validation.tokens or give more "
                          "validation data (data.holdout, data.validation_path)")
    return torch.tensor(stream[:need], dtype=torch.long).view(-1, width)


class Validation:
    """``val/loss`` every ``validation.interval`` steps and at the last step, on every rank alike."""

    def __init__(self, windows: torch.Tensor, interval: int, micro_batch_size: int, rank: int, world_size: int,
                 device: torch.device):
        self.interval, self.rank, self.world = interval, rank, world_size
        self.groups = list(windows.to(device).split(micro_batch_size))
        self.tokens = windows.shape[0] * (windows.shape[1] - 1)
        self.device = device

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.interval == 0 or step == total_steps

    @torch.no_grad()
    def loss(self, model: torch.nn.Module) -> float:
        n = len(self.groups)
        padded = -(-n // self.world) * self.world  # every rank runs padded / world forwards
        sums = torch.zeros(n, dtype=torch.float64, device=self.device)
        for g in range(self.rank, padded, self.world):
            group = self.groups[g if g < n else 0]
            inputs, targets = group[:, :-1], group[:, 1:]
            mean = cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
            if g < n:
                sums[g] = mean.double() * targets.numel()
        if self.world > 1:
            dist.all_reduce(sums)
        return sum(sums.cpu().tolist()) / self.tokens


def build_validation(cfg, rank: int, world_size: int, device: torch.device) -> Validation | None:
    """The run's validation (None when ``validation.interval`` is null), windows read and tokenized now."""
    v = cfg.validation
    if v.interval is None:
        return None
    windows = on_rank0(lambda: heldout_windows(cfg.data, cfg.tokenizer, cfg.train.seq_len, v.tokens), device)
    return Validation(windows, v.interval, cfg.train.micro_batch_size, rank, world_size, device)
