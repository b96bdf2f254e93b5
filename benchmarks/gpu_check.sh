#!/usr/bin/env bash
# One-GPU check, one command: the GPU recipes end to end on a small synthetic set (bf16), then the
# benchmarks on the GPU, then the test suite. About 10 minutes on one H100; prints every number.
#
#   bash benchmarks/gpu_check.sh                 # writes runs/gpu_check/
#   STEPS=20 OUT=/tmp/gc bash benchmarks/gpu_check.sh
#
# The stages are the real recipes (configs/pretrain/dino_msht.yaml, configs/finetune/msht_sam.yaml,
# configs/probes/robustness.yaml) with only their budgets cut: train.max_steps, and no UMAP in the
# probes (umap-learn's numba compile alone takes ~40 s). Any failing step stops the script non-zero.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-python}
OUT=${OUT:-runs/gpu_check}
STEPS=${STEPS:-50}            # optimizer steps per training stage
N_PER_CLASS=${N_PER_CLASS:-64}
BENCH=${BENCH:-1}             # 0 skips the benchmarks
TESTS=${TESTS:-tests}         # what pytest runs at the end (e.g. "tests/test_imageops.py")
START=$SECONDS

step() { printf '\n=== [%4d s] %s\n' "$((SECONDS - START))" "$*"; }

step "GPU"
"$PY" - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check.sh: no CUDA device visible to torch; this check needs one GPU")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16 supported: {torch.cuda.is_bf16_supported()}")
PY

rm -rf "$OUT"
mkdir -p "$OUT"
DATA="$OUT/data"
SPLIT="$OUT/split"

step "data: synthetic set, $N_PER_CLASS images per class, 384 px, 4 domains"
"$PY" -m roseprior synth --out "$DATA" --n-per-class "$N_PER_CLASS" --size 384 --seed 0 --workers 8
"$PY" -m roseprior split --src "$DATA" --out "$SPLIT" --ratios 7:2:1 --seed 0
DATA_ARGS=("data.root=$DATA" "data.split_dir=$SPLIT")

step "pretrain: DINO on msht, bf16 (configs/pretrain/dino_msht.yaml), $STEPS steps"
"$PY" -m pretrain --config configs/pretrain/dino_msht.yaml "${DATA_ARGS[@]}" out_dir="$OUT/pretrain" \
    train.max_steps="$STEPS" train.precision=bf16 data.num_workers=8 monitor.progress=false
tail -n 2 "$OUT/pretrain/metrics.jsonl"

step "pretrain: multi-crop SimCLR with stain swaps and batches by domain, views cut on the GPU, bf16, $STEPS steps"
"$PY" -m pretrain --config configs/pretrain/simclr_multicrop_msht_tiny_cpu.yaml "${DATA_ARGS[@]}" \
    out_dir="$OUT/pretrain_invariant" train.max_steps="$STEPS" train.precision=bf16 train.batch_by_domain=true \
    views.stain_swap=0.5 views.device=device train.batch_size=16 monitor.progress=false
tail -n 1 "$OUT/pretrain_invariant/metrics.jsonl"

step "finetune: SAM from the pretrained backbone (configs/finetune/msht_sam.yaml), $STEPS steps"
"$PY" -m finetune --config configs/finetune/msht_sam.yaml "${DATA_ARGS[@]}" init="$OUT/pretrain" \
    out_dir="$OUT/finetune" train.max_steps="$STEPS" train.precision=bf16 data.num_workers=8

step "finetune: SAM from random init, $STEPS steps"
"$PY" -m finetune --config configs/finetune/msht_sam.yaml "${DATA_ARGS[@]}" init=msht \
    out_dir="$OUT/finetune_random" train.max_steps="$STEPS" train.precision=bf16 data.num_workers=8

step "probes: robustness protocol on the four checkpoints (configs/probes/robustness.yaml)"
"$PY" -m eval_probes --config configs/probes/robustness.yaml "${DATA_ARGS[@]}" out_dir="$OUT/probes" \
    "checkpoints=[msht, $OUT/pretrain, $OUT/finetune, $OUT/finetune_random]" umap=false progress=false
"$PY" -c "from roseprior.demo import summarize; print('\n'.join(summarize(__import__('pathlib').Path('$OUT/probes/report.json'))))"

step "predict with adequacy, and export, on the GPU-trained classifier"
"$PY" -m finetune.predict --ckpt "$OUT/finetune" --images "$DATA/P" --out "$OUT/preds.csv" --device cuda
head -n 3 "$OUT/preds.csv"

if [ "$BENCH" != 0 ]; then
  step "benchmarks (real sizes, on the GPU)"
  "$PY" -m benchmarks --data "$DATA" --json "$OUT/benchmarks.json"
fi

step "tests: $TESTS"
# shellcheck disable=SC2086
"$PY" -m pytest -q $TESTS

step "gpu_check passed: everything above ran on $("$PY" -c 'import torch; print(torch.cuda.get_device_name())') in $((SECONDS - START)) s; outputs in $OUT"
