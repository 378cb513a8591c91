#!/usr/bin/env bash
# One short GPU check (about 5-6 minutes on an H100), for a session that is lent a CUDA machine:
#   1. the kernel tests, the Triton backend tests and the engine's parity and behaviour
#      tests, all on CUDA (Triton attention, captured decode graphs; HF oracle on the CPU)
#   2. the engine benchmark on a random Llama 3.2 1B-shape model built on the GPU (bf16):
#      greedy on 512 prompts, n=4 and beam 4 on 256, 128 new tokens each, beside
#      transformers.generate in the same run; the decode step against its memory floor; the
#      prefill rate against the matmul peak
#   3. quantized weights (bitsandbytes int8 and nf4, needs `.whl` fetched with --bnb): greedy on
#      the same model with none/int8/nf4, weight bytes and the KV blocks each leaves room for
# Results go to $OUT (or outputs/gpu_check/): results.md (card, date, commit, numbers),
# bench.jsonl, tests.txt. Append results.md to jobs/gpu_check_results.md and commit it.
#
# Missing packages (hydra, dask; see the README's GPU section) are installed from .whl/ when
# it was carried along. Pass the commit as COMMIT=... when the tree has no .git.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-outputs/gpu_check}"
mkdir -p "$out"
if [ -d .whl ] && ! python3 -c "import hydra, dask" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
commit="${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
card="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
versions="$(python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)')"

PIPELINE_TEST_DEVICE=cuda timeout 180 python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_kernels.py tests/test_attention_backends.py tests/test_engine_parity.py \
    tests/test_engine_behaviour.py tests/test_quant.py tests/test_oom.py 2>&1 | tail -n 25 | tee "$out/tests.txt"
tests_line="$(grep -E '(passed|failed|error)' "$out/tests.txt" | tail -n 1)"

timeout 330 python3 -m pipeline.bench --device cuda --dtype bfloat16 --size 1B \
    --num-prompts 512 --fanout-prompts 256 --new-tokens 128 \
    --hf-batch greedy=256,n4=64,beam4=64 --model-dir /tmp/pipeline-bench-1B \
    --json "$out/bench.jsonl" 2>&1 | grep -v -E 'Loading|Writing' | tee "$out/bench.txt"

# "room for" KV blocks: the memory budget after the weights, before the max_num_seqs cap.
timeout 120 python3 -m pipeline.bench --device cuda --dtype bfloat16 --size 1B \
    --num-prompts 256 --new-tokens 64 --modes greedy --no-baseline --quant none,int8,nf4 \
    --model-dir /tmp/pipeline-bench-1B --json "$out/bench.jsonl" 2>&1 \
    | grep -v -E 'Loading|Writing' | tee "$out/quant.txt"

{
    echo "## $(date -u +%Y-%m-%d) · ${card} · commit ${commit}"
    echo
    echo "${versions}; tests on CUDA: ${tests_line:-none ran}"
    echo
    echo '```'
    cat "$out/bench.txt"
    echo '```'
    echo
    echo '```'
    cat "$out/quant.txt"
    echo '```'
} > "$out/results.md"
cat "$out/results.md"
