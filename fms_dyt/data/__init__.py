"""fms-dyt's data: tokenizer loading, the sample/local/pile sources, and a tokenizing, packing,
exactly resumable and rescalable DataLoader.

    loader = build_dataloader(cfg.data, cfg.tokenizer, seq_len=4096, micro_batch_size=2,
                              seed=2023, rank=rank, world_size=world_size)
    for inputs, targets in loader: ...            # LongTensors [micro_batch_size, seq_len]
    state = loader.state_dict()                     # small, JSON-serialisable, this rank
    loader.load_state_dict(all_ranks_states)        # same or different world size

The heavy modules (torch, datasets, transformers) load on first use, so importing the config
dataclasses stays cheap.
"""

from fms_dyt.data.config import DataConfig, TokenizerConfig

__all__ = ["DataConfig", "TokenizerConfig", "build_dataloader", "load_tokenizer"]


def __getattr__(name):
    if name == "build_dataloader":
        from fms_dyt.data.pipeline import build_dataloader

        return build_dataloader
    if name == "load_tokenizer":
        from fms_dyt.data.tokenizer import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'fms_dyt.data' has no attribute {name!r}")
