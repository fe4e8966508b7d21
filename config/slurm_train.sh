#!/usr/bin/env bash
# cogfun train on several SLURM nodes: one `accelerate launch` per node, which starts one process per GPU.
# Submit from the repo root (the job runs cli.py from there; activate the environment with cogfun first).
#
#   sbatch --nodes 4 config/slurm_train.sh                  # DDP
#   BACKEND=deepspeed sbatch --nodes 4 config/slurm_train.sh # DeepSpeed ZeRO-2 (config/zero_stage2_config.json)
#   BACKEND=fsdp sbatch --nodes 4 config/slurm_train.sh      # FSDP (the seed's flags)
#
# Shared by all nodes: OUTPUT_DIR (checkpoints: every rank writes its part; resume reads them all).
# Not shared: SHARD_DIR may be a URL (s3://, gs://, http(s)://; each node caches what it reads in
# SHARD_CACHE, a local disk) or a copy at the same path on every node; MODEL at the same path on every node.
#SBATCH --job-name=cogfun-train
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
set -euo pipefail

MODEL=${MODEL:-models/Diffusion_Transformer/CogVideoX-Fun-V1.1-2b-InP}
SHARD_DIR=${SHARD_DIR:-s3://my-bucket/cogfun/shards}
SHARD_CACHE=${SHARD_CACHE:-/tmp/cogfun-shard-cache}
OUTPUT_DIR=${OUTPUT_DIR:-/shared/cogfun/output_dir}
BACKEND=${BACKEND:-ddp}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

MAIN=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}
NPROC=$((GPUS_PER_NODE * SLURM_NNODES))
# NCCL_IB_DISABLE=1 and NCCL_P2P_DISABLE=1 are used in multi nodes without RDMA (as in CogVideoX-Fun's doc).

case "$BACKEND" in
  ddp) LAUNCH=(--multi_gpu --mixed_precision bf16) ;;
  deepspeed) LAUNCH=(--use_deepspeed --deepspeed_config_file config/zero_stage2_config.json
                     --deepspeed_multinode_launcher standard) ;;
  fsdp) LAUNCH=(--mixed_precision bf16 --use_fsdp --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP
                --fsdp_transformer_layer_cls_to_wrap CogVideoXBlock --fsdp_sharding_strategy FULL_SHARD
                --fsdp_state_dict_type SHARDED_STATE_DICT --fsdp_backward_prefetch BACKWARD_PRE
                --fsdp_cpu_ram_efficient_loading False) ;;
  *) echo "BACKEND must be ddp, deepspeed or fsdp" >&2; exit 2 ;;
esac

# $SLURM_NODEID is only known inside the step: single quotes keep it for the srun'd shell.
srun --kill-on-bad-exit=1 bash -c 'accelerate launch "$@" --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
    --main_process_ip '"$MAIN"' --main_process_port '"$PORT"' --num_processes '"$NPROC"' \
    cli.py train \
    --pretrained_model_name_or_path='"$MODEL"' \
    --shard_dir='"$SHARD_DIR"' \
    --shard_cache_dir='"$SHARD_CACHE"' \
    --output_dir='"$OUTPUT_DIR"' \
    --train_batch_size=1 --gradient_accumulation_steps=1 --dataloader_num_workers=2 \
    --num_train_epochs=100 --checkpointing_steps=50 --learning_rate=1e-04 --seed=42 \
    --gradient_checkpointing --mixed_precision=bf16 --adam_weight_decay=3e-2 --adam_epsilon=1e-10 \
    --max_grad_norm=0.05 --rank=64 --network_alpha=32 --target_name=to_q,to_k,to_v,ff.0,ff.2 \
    --use_peft_lora --train_mode=inpaint --resume_from_checkpoint=latest' _ "${LAUNCH[@]}"
