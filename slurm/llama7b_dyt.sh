#!/bin/bash
# The paper's LLaMA 7B DyT run: 64 nodes x 8 GPUs. Usage: sbatch slurm/llama7b_dyt.sh [hydra overrides]
#SBATCH --job-name=llama7b_dyt
#SBATCH --nodes=64
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
[ -n "${SLURM_JOB_ID:-}" ] || { echo "submit this script with: sbatch $0 [hydra overrides]" >&2; exit 1; }
# sbatch runs a copy of this file: the launcher is found beside the submitted original
exec bash "$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")/launch.sh" experiment=llama7b_dyt "$@"
