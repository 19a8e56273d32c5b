#!/usr/bin/env bash
# The prepared GPU check, run as ONE call on a lent CUDA machine (see CONTRIBUTING.md, "The GPU
# session"; the figures go to docs/results.md).
# It measures what the CPU development machine cannot: training throughput on CUDA (reference
# loop vs ours, with and without torch.compile), and the `fast` recipe against the `paper` recipe
# on real images (the KMNIST test split re-split 8,000/2,000), accuracy and device seconds.
#
# Here, first (the GPU machine has no ../shared), write the re-split root (.gpu-data is ignored):
#     python -m kmnist_torch.reproduce --resplit ../shared/data/real/kmnist --write-only \
#         --root .gpu-data
# There, with .gpu-data carried:
#     bash benchmarks/gpu_session.sh            # results in $OUT (or bench-out/gpu)
# A CPU smoke of the plumbing: GPU_SESSION_SMOKE=1 bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-bench-out/gpu}"
work="$(mktemp -d)"
mkdir -p "$out"
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$out/log.txt"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/log.txt"
    [ "$rc" -eq 0 ] || status=1
}

if [ "${GPU_SESSION_SMOKE:-0}" = 1 ]; then
    tt=(--device cpu --steps 2 --warmup 1 --batch-size 16 --images 256)
    rs=(--device cpu --epochs 1 --limit-train 600 --limit-test 64)
    kn=(--device cpu --train 2000 --test 200 --synthetic)
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/log.txt"
    tt=()
    rs=()
    kn=(--train 60000 --test 10000 --synthetic)
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    | tee -a "$out/log.txt"

step "throughput" 90 python benchmarks/train_throughput.py "${tt[@]}" \
    --out "$out/train_throughput.json"
step "throughput, compiled" 150 python benchmarks/train_throughput.py "${tt[@]}" --compile \
    --out "$out/train_throughput_compile.json"
# 4-NN on CUDA at KMNIST size, the exact product alone and with the screen (shortlist 256):
# identical predictions to scikit-learn's (on the machine's CPUs) or the step fails.
step "4-NN on CUDA" 150 python benchmarks/knn_speed.py "${kn[@]}" \
    --out "$out/knn_cuda.json"
step "4-NN on CUDA, screened" 150 python benchmarks/knn_speed.py "${kn[@]}" --candidates 256 \
    --out "$out/knn_cuda_screen.json"
# The same rows, data and seed under both recipes: accuracy and device seconds side by side.
step "fast recipe" 100 python -m kmnist_torch.reproduce --resplit --root .gpu-data \
    --rows knn preact18 preact18-manifold --recipe fast --out "$work/fast" "${rs[@]}"
step "paper recipe" 200 python -m kmnist_torch.reproduce --resplit --root .gpu-data \
    --rows preact18-manifold --recipe paper --out "$work/paper" "${rs[@]}"
for r in fast paper; do  # only the tables come back: the runs' checkpoints stay there
    cp "$work/$r/table.md" "$out/table_$r.md" 2>/dev/null
    cp "$work/$r/results.json" "$out/results_$r.json" 2>/dev/null
done
rm -rf "$work"
exit $status
