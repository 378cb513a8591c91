#!/bin/bash
# A Hydra multirun where each point is its own SLURM job, via hydra-submitit-launcher
# (pip install -e ".[cluster]"; settings in conf/hydra/launcher/slurm.yaml).
#   bash jobs/submitit.sh /data/in/ +job=evalset sampling.n=1,4,16
set -euo pipefail

INPUT="$1"; shift
python -m pipeline -m hydra/launcher=slurm input.path="$INPUT" "$@"
