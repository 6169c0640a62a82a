"""Tests marked ``gpu`` need a CUDA GPU; without one they are skipped, saying so."""

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu and this machine has no CUDA GPU; on one, run bash bench/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
