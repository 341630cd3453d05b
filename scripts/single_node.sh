#!/bin/bash
# fastkd on every GPU of one machine (torchrun's standalone rendezvous, no SLURM needed):
#   scripts/single_node.sh configs/imagenet/dkd/resnet34-resnet18.yaml [key=value ...]
#   scripts/single_node.sh --resume RUN_DIR
# A failed worker group is restarted up to FASTKD_MAX_RESTARTS times (default 3); the restart
# resumes the run from its last checkpoint.
set -euo pipefail
if [[ $# -eq 0 ]]; then
    echo "usage: $0 CONFIG.yaml [key=value ...] | --resume RUN_DIR" >&2
    exit 2
fi
NPROC=${NPROC:-$(nvidia-smi --list-gpus | wc -l)}
# A store of its own for each rendezvous round, so that a restarted group never meets the
# failed round's keys (fastkd.distributed.restart_store_warning).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec torchrun --standalone --nproc_per_node="$NPROC" --max-restarts="${FASTKD_MAX_RESTARTS:-3}" \
    -m fastkd train "$@"
