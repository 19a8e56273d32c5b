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
# There, with .gpu-data carried, as one `run` call with timeout_s 600:
#     bash benchmarks/gpu_session.sh            # results in $OUT (or bench-out/gpu)
# A CPU smoke of the plumbing: GPU_SESSION_SMOKE=1 bash benchmarks/gpu_session.sh
#
# The whole script stays inside GPU_SESSION_BUDGET seconds (default 420): a device call may run
# 600 s, and the session's 15 device minutes include the machine's start (a minute or two), so
# one whole run leaves about five minutes for a shorter rerun (a smaller budget). Each step's
# limit is cut to what is left of the budget; a step with under 20 s left is skipped (and the
# script exits 1). Three files come back (the device returns at most 8):
# log.txt, results.json (every step's JSON under its name, merged after each step, so a cut-off
# run keeps what finished) and tables.md (the two recipes' tables).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-bench-out/gpu}"
work="$(mktemp -d)"
mkdir -p "$out"
rm -f "$out/log.txt" "$out/results.json" "$out/tables.md"  # this run's files only
budget="${GPU_SESSION_BUDGET:-420}"
data="${GPU_SESSION_DATA:-.gpu-data}"  # the re-split root written above
status=0
. benchmarks/_session.sh  # step and merge

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

# In order of worth: the limits add up to more than the budget, so the last steps get what the
# first ones leave (each step usually ends well inside its limit).
step "throughput" 60 python benchmarks/train_throughput.py ${tt[@]+"${tt[@]}"} \
    --out "$work/train_throughput.json"
# 4-NN on CUDA at KMNIST size, the exact product alone: identical predictions to
# scikit-learn's (on the machine's CPUs) or the step fails.
step "4-NN on CUDA" 60 python benchmarks/knn_speed.py "${kn[@]}" \
    --out "$work/knn_cuda.json"
# The same rows, data and seed under both recipes: accuracy and device seconds side by side.
step "fast recipe" 90 python -m kmnist_torch.reproduce --resplit --root "$data" \
    --rows knn preact18 preact18-manifold --recipe fast --out "$work/fast" ${rs[@]+"${rs[@]}"}
step "paper recipe" 150 python -m kmnist_torch.reproduce --resplit --root "$data" \
    --rows preact18-manifold --recipe paper --out "$work/paper" ${rs[@]+"${rs[@]}"}
step "throughput, compiled" 120 python benchmarks/train_throughput.py ${tt[@]+"${tt[@]}"} \
    --compile --out "$work/train_throughput_compile.json"
step "4-NN on CUDA, screened" 45 python benchmarks/knn_speed.py "${kn[@]}" --candidates 256 \
    --out "$work/knn_cuda_screen.json"
for r in fast paper; do  # only the tables come back: the runs' checkpoints stay there
    { echo "## $r recipe"; echo; cat "$work/$r/table.md" 2>/dev/null || echo "(no table)"; echo; } \
        >>"$out/tables.md"
done
find "$work" -name '*.pt' -delete  # results.json keeps the runs' JSON, not their weights
merge
rm -rf "$work"
echo "=== done in $SECONDS s of the ${budget}s budget, exit $status" | tee -a "$out/log.txt"
exit $status
