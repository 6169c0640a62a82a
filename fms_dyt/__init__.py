"""fms-dyt: LLaMA pretraining with RMSNorm or Dynamic Tanh (DyT), sharded with FSDP2."""

import logging

__version__ = "0.1.0"


class _TorchaoEnums(logging.Filter):
    """Drop torch's deprecation notice for the enums torchao registers with pytree when it is
    imported: by parallel.float8, and by transformers whenever torchao is installed (the fp8 and
    dev extras install it), so that even the quickstart, which trains without FP8, would print it.
    Nothing a user of fms-dyt can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is an Enum subclass and is now natively supported by torch.compile" not in record.getMessage()


logging.getLogger("torch.utils._pytree").addFilter(_TorchaoEnums())
