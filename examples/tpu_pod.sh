#!/bin/bash
# meshnet on a Cloud TPU pod slice: the same command runs on every worker, and
# jax.distributed detects the slice by itself (no coordinator flags needed).
#
#   TPU=my-v5e-32 ZONE=us-west4-a bash examples/tpu_pod.sh
#
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"

# 1. Copy the project to every worker and install it there.
gcloud compute tpus tpu-vm scp --recurse "$(pwd)" "$TPU":meshnet --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all \
    --command 'cd meshnet && pip install -e ".[dev]" "jax[tpu]"'

# 2. Train on all workers at once; the mesh covers every chip of the slice.
#    Pipeline over 4 stages, data parallel over the rest.
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all \
    --command 'cd meshnet && meshnet train --hidden 1024,1024,1024 \
        --mesh data=-1,stage=4 --schedule 1f1b --microbatches 8 --batch-size 1024 \
        --checkpoint-dir gs://my-bucket/meshnet-run --checkpoint-every 500'
