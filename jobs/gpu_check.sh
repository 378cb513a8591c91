#!/usr/bin/env bash
# One short GPU check, for a session that is lent a CUDA machine (see the device tool):
#   1. the engine's parity and behaviour tests with the engine on CUDA (fp32, HF oracle on CPU)
#   2. the engine benchmark on CUDA in bf16 and fp32, next to transformers.generate
# Results land in $OUT (or outputs/gpu_check/) as text and JSON lines, to be committed under
# the README's performance section with the card's name.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-outputs/gpu_check}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

PIPELINE_TEST_DEVICE=cuda python -m pytest -q -x tests/test_engine_parity.py \
    tests/test_engine_behaviour.py 2>&1 | tail -n 20 | tee "$out/tests.txt"

for dtype in bfloat16 float32; do
    python -m pipeline.bench --device cuda --dtype "$dtype" --size 58M --num-prompts 512 \
        --new-tokens 64 --json "$out/bench.jsonl" 2>&1 | grep -v Loading | tee -a "$out/bench.txt"
done
