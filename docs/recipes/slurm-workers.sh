#!/bin/bash
# A SLURM array of ranksearch workers joining one study through a storage server.
#
# Before submitting: on a host every node can reach (here "storage-host"), serve the study database:
#   ranksearch serve-storage --storage postgresql+psycopg2://user:password@db-host/ranksearch --host 0.0.0.0 --port 13000
# and start the study once (it trains or loads the baseline and measures it):
#   ranksearch run --model resnet18 --budget 400 --storage grpc://storage-host:13000 --checkpoint /shared/baseline.pt
# Then: sbatch docs/recipes/slurm-workers.sh
#
#SBATCH --job-name=ranksearch-workers
#SBATCH --array=0-31
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=04:00:00
#SBATCH --output=ranksearch-worker-%A_%a.log

set -euo pipefail

STUDY=${STUDY:-resnet18-fashion_mnist-resnet}
STORAGE=${STORAGE:-grpc://storage-host:13000}
SHARED=${SHARED:-/shared}

# Each worker runs trials until the study's budget is complete, then exits 0. A worker killed by the scheduler
# (preemption, time limit) leaves its trial running; another worker fails it after 3 silent heartbeats and retries it.
srun ranksearch worker "$STUDY" \
    --storage "$STORAGE" \
    --threads "$SLURM_CPUS_PER_TASK" \
    --checkpoint "$SHARED/baseline.pt" \
    --data-root "$SHARED/data" \
    --space "$SHARED/resnet.yaml"
