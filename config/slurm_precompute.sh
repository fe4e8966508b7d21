#!/usr/bin/env bash
# cogfun precompute on several SLURM nodes: one `accelerate launch` per node, one process per GPU,
# all writing into ONE shard dir on a filesystem every node sees (each rank its own tars, caption
# tables and probe-cache part; rank 0 writes index.parquet and, last, manifest.json).
# Submit from the repo root (activate the environment with cogfun first):
#
#   sbatch --nodes 8 config/slurm_precompute.sh
#   DATA_META=s3://my-bucket/dataset/metadata.json sbatch --nodes 8 config/slurm_precompute.sh
#   DATA_SHARDS='s3://my-bucket/video2dataset/{00000..09999}.tar' sbatch --nodes 8 config/slurm_precompute.sh
#
# Shared by all nodes: SHARD_DIR (the output). Not shared: MODEL at the same path on every node;
# MEDIA_CACHE, a local disk per node (media read from URLs or tars are fetched there once per node).
# Rerunning the same job is safe: a finished dir is "up to date", an interrupted one is resumed, a
# dataset with new clips is encoded incrementally (only the new clips are probed and encoded).
# Then train with config/slurm_train.sh (SHARD_DIR as is, or uploaded to object storage).
#SBATCH --job-name=cogfun-precompute
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
set -euo pipefail

MODEL=${MODEL:-models/Diffusion_Transformer/CogVideoX-Fun-V1.1-2b-InP}
DATA_META=${DATA_META:-datasets/internal_datasets/metadata.json}
DATA_DIR=${DATA_DIR:-}                       # default: the folder (or URL) of DATA_META
DATA_SHARDS=${DATA_SHARDS:-}                 # set: WebDataset tars of media instead of DATA_META
SHARD_DIR=${SHARD_DIR:-/shared/cogfun/shards}
MEDIA_CACHE=${MEDIA_CACHE:-/tmp/cogfun-media-cache}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
DECODE_WORKERS=${DECODE_WORKERS:-3}          # decoding processes per GPU (the CPU side of precompute)

MAIN=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29501}
NPROC=$((GPUS_PER_NODE * SLURM_NNODES))

if [ -n "$DATA_SHARDS" ]; then
  DATA=(--train_data_shards="$DATA_SHARDS")
else
  DATA=(--train_data_meta="$DATA_META")
  if [ -n "$DATA_DIR" ]; then DATA+=(--train_data_dir="$DATA_DIR"); fi
fi

# $SLURM_NODEID is only known inside the step: single quotes keep it for the srun'd shell.
# The data flags must be the ones training uses (they are the shards' fingerprint).
srun --kill-on-bad-exit=1 bash -c 'accelerate launch --multi_gpu --mixed_precision bf16 \
    --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
    --main_process_ip '"$MAIN"' --main_process_port '"$PORT"' --num_processes '"$NPROC"' \
    cli.py precompute "$@" \
    --pretrained_model_name_or_path='"$MODEL"' \
    --shard_dir='"$SHARD_DIR"' \
    --media_cache_dir='"$MEDIA_CACHE"' \
    --dataloader_num_workers='"$DECODE_WORKERS"' \
    --image_sample_size=512 --video_sample_size=512 --token_sample_size=512 \
    --video_sample_stride=3 --video_sample_n_frames=49 \
    --random_hw_adapt --training_with_video_token_length --enable_bucket \
    --train_mode=inpaint --mixed_precision=bf16 --seed=42' _ "${DATA[@]}"
