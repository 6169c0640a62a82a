"""fms-dyt: LLaMA pretraining with RMSNorm or Dynamic Tanh (DyT), sharded with FSDP2."""

__version__ = "0.1.0"
