#!/usr/bin/env bash
# One short GPU check (about 5-6 minutes on an H100), for a session that is lent a CUDA machine:
#   1. the kernel tests, the Triton backend tests and the engine's parity and behaviour
#      tests, all on CUDA (Triton attention, captured decode graphs; HF oracle on the CPU)
#   2. the logits' reads alone (python -m pipeline.bench.head): greedy pick, beam ranking and
#      top-p sampling, torch ops against the one-pass kernels, fp32 against bf16 logits, flat
#      top-p rows drawn on the device against redrawn on the host, the top-p and the
#      temperature-only draws in kernels against torch's ops; one layer's decode
#      attention, split and merged against one split per row, and for n=4 rows each reading
#      its prompt against each group reading it once; and the step's matmuls (cuBLAS) at 256
#      and 1,024 rows, in ms and TFLOP/s
#   3. the engine benchmark on a random Llama 3.2 1B-shape model built on the GPU (bf16):
#      greedy on 512 prompts, n=4 and beam 4 on 256, 128 new tokens each, beside
#      transformers.generate in the same run; the decode step against its memory floor; the
#      prefill rate against the matmul peak
#      with engine.max_num_seqs auto (1,024 sequences in flight on an H100 or H200); then
#      again with 256 (the default before, and the issue's decode step at 256 sequences),
#      and greedy, n=4 and beam 4 (1,024 beams) without overlapped decode steps
#      (engine.overlap_steps=false; beams then decode in one batch, not two lanes), and n=4
#      and beam 4 with every row reading its prompt (engine.shared_prefixes=false): A/B
#   4. quantized weights (bitsandbytes int8 and nf4, needs `.whl` fetched with --bnb): greedy on
#      the same model with none/int8/nf4, weight bytes and the KV blocks each leaves room for
#      (GPU_CHECK_QUANT=0 skips it)
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

# No -x: one failing test must not hide the others. A hung test is cut at 60 s where
# pytest-timeout is installed.
per_test=""
python3 -c "import pytest_timeout" 2>/dev/null && per_test="--timeout=60"
PIPELINE_TEST_DEVICE=cuda timeout 170 python3 -m pytest -q -p no:cacheprovider $per_test \
    tests/test_kernels.py tests/test_attention_backends.py tests/test_engine_parity.py \
    tests/test_engine_behaviour.py tests/test_quant.py tests/test_oom.py > "$out/tests_full.txt" 2>&1
tail -n 25 "$out/tests_full.txt" | tee "$out/tests.txt"
tests_line="$(grep -E '(passed|failed|error)' "$out/tests.txt" | tail -n 1)"

# The step's reads of its logits alone: greedy's pick, beam ranking and top-p sampling, torch
# against the one-pass kernels, fp32 against bf16 logits (the decode graphs' buffer is bf16).
timeout 150 python3 -m pipeline.bench.head --device cuda --rows 256,1024 --vocab 128256 2>&1 \
    | tail -n 30 | tee "$out/head.txt"

# Half the free memory for our KV pool: transformers runs beside it in the same process.
bench=(python3 -m pipeline.bench --device cuda --dtype bfloat16 --size 1B
    --model-dir /tmp/pipeline-bench-1B --kv-cache-memory 0.5 --json "$out/bench.jsonl")
timeout 300 "${bench[@]}" --num-prompts 512 --fanout-prompts 256 --new-tokens 128 \
    --hf-batch greedy=256,n4=64,beam4=64 --profile-steps 10 > "$out/bench_full.txt" 2>&1
bench_rc=$?
# The profile (from "# profile:" on): its device table (the top kernels of ten greedy decode
# steps) goes to the results, the rest stays in bench_full.txt.
sed '/^# profile:/,$d' "$out/bench_full.txt" | grep -v -E 'Loading|Writing|^USDT' > "$out/bench.txt"
sed -n '/^# profile:/,$p' "$out/bench_full.txt" | grep -v '^USDT' | head -n 32 > "$out/profile.txt"
if [ "$bench_rc" != 0 ]; then
    # Which part fails: the same greedy run without overlap, without graphs, then with torch
    # attention; then n=4 and beam 4 with and without shared-prefix attention.
    tail -n 30 "$out/bench_full.txt" >> "$out/bench.txt"
    for variant in --no-overlap "--no-overlap --no-cuda-graphs" \
        "--no-overlap --attention torch --no-cuda-graphs"; do
        echo "# fallback ($variant), exit code of the full run: $bench_rc" >> "$out/bench.txt"
        timeout 60 "${bench[@]}" --num-prompts 128 --new-tokens 32 --modes greedy \
            --no-baseline $variant 2>&1 | grep -v -E 'Loading|Writing' | tail -n 12 >> "$out/bench.txt"
    done
    # Samples and beams with and without shared-prefix attention (greedy makes no groups).
    for variant in --shared-prefixes --no-shared-prefixes; do
        echo "# fallback ($variant, n=4 and beam 4)" >> "$out/bench.txt"
        timeout 60 "${bench[@]}" --num-prompts 64 --fanout-prompts 64 --new-tokens 32 \
            --modes n4,beam4 --no-baseline $variant 2>&1 | grep -v -E 'Loading|Writing' \
            | tail -n 12 >> "$out/bench.txt"
    done
fi
cat "$out/bench.txt"

# 256 sequences in flight, where auto above gave 1,024 on a large GPU (the baseline's numbers
# are those of the run above): whether auto's 1,024 pays rests on these.
echo "# engine.max_num_seqs=256 (--max-num-seqs 256):" | tee "$out/wide.txt"
timeout 90 "${bench[@]}" --num-prompts 512 --fanout-prompts 256 --new-tokens 128 \
    --modes greedy,n4,beam4 --no-baseline --max-num-seqs 256 2>&1 | grep -v -E 'Loading|Writing' \
    | tail -n 8 | tee -a "$out/wide.txt"

# The host's work not overlapped with the device's (the engine before overlapped decode).
echo "# without overlapped decode steps (--no-overlap):" | tee -a "$out/wide.txt"
timeout 90 "${bench[@]}" --num-prompts 512 --fanout-prompts 256 --new-tokens 128 --modes greedy,n4 \
    --no-baseline --no-overlap 2>&1 | grep -v -E 'Loading|Writing' | tail -n 4 | tee -a "$out/wide.txt"
timeout 60 "${bench[@]}" --num-prompts 512 --fanout-prompts 256 --new-tokens 128 --modes beam4 \
    --no-baseline --no-overlap --max-num-seqs 1024 2>&1 | grep -v -E 'Loading|Writing' | tail -n 2 \
    | tee -a "$out/wide.txt"

# Samples and beams reading their prompt's blocks each, not once per group (the engine
# before shared prefixes), at auto's width.
echo "# every row reading its whole context (--no-shared-prefixes):" | tee -a "$out/wide.txt"
timeout 60 "${bench[@]}" --num-prompts 512 --fanout-prompts 256 --new-tokens 128 \
    --modes n4,beam4 --no-baseline --no-shared-prefixes 2>&1 | grep -v -E 'Loading|Writing' \
    | tail -n 4 | tee -a "$out/wide.txt"

# "room for" KV blocks: the memory budget after the weights, before the max_num_seqs cap.
if [ "${GPU_CHECK_QUANT:-1}" != 0 ]; then
    timeout 90 "${bench[@]}" --num-prompts 256 --new-tokens 64 --modes greedy --no-baseline \
        --quant none,int8,nf4 2>&1 | grep -v -E 'Loading|Writing' | tail -n 20 | tee "$out/quant.txt"
else
    echo "skipped (GPU_CHECK_QUANT=0)" > "$out/quant.txt"
fi

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
    cat "$out/wide.txt"
    echo '```'
    echo
    echo '```'
    cat "$out/quant.txt"
    echo '```'
    echo
    echo '```'
    cat "$out/head.txt"
    echo '```'
    echo
    echo '```'
    cat "$out/profile.txt"
    echo '```'
} > "$out/results.md"
cat "$out/results.md"
