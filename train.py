"""Pretrain a LLaMA with RMSNorm or DyT: ``python train.py [hydra overrides]``, or under torchrun.

Examples:
    python train.py experiment=quickstart
    torchrun --nproc_per_node=8 train.py experiment=llama7b_dyt run_dir=runs/7b_dyt
"""

import hydra

from fms_dyt.trainer import main


@hydra.main(version_base=None, config_path="configs", config_name="train")
def run(cfg) -> None:
    main(cfg)


if __name__ == "__main__":
    run()
