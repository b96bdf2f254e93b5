#!/usr/bin/env bash
# Which pretraining, in the issue's own chain? Pretrain on the unlabelled fields of all four synthetic sites with
# the 2-view CPU recipe (configs/pretrain/simclr_msht_tiny_cpu.yaml) and with the multi-crop recipe plus batches
# drawn within one site (configs/pretrain/simclr_multicrop_msht_tiny_cpu.yaml, train.batch_by_domain=true), in
# about the same CPU time (300 against 240 steps of 128 fields: a multi-crop step costs 1.25-1.4x); fine-tune each
# on the labelled fields of sites a and b; predict held-out sites c (about 0.6x the training magnification) and d
# (1.6x) at the estimated training scale and squeezed; and the probes' balanced robustness index of each
# backbone. Three pretraining seeds (PRETRAIN_SEEDS) x three fine-tuning seeds (SEEDS); about 25 minutes per
# pretraining seed on 2 cores (two jobs side by side).
#   bash benchmarks/heldout_recipes.sh [OUT]      # results: OUT/heldout/heldout_recipes.json, OUT/probes
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:-runs/bench/heldout_recipes}
py=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1  # two jobs side by side, one core each
out=$base/heldout
mkdir -p "$out"
[ -f "$base/data/manifest.csv" ] || "$py" -m roseprior synth --out "$base/data" --n-per-class 600 --size 128 --seed 11
"$py" benchmarks/heldout.py prepare "$base/data" "$out"
pretrain() {  # name, seed, config, steps, epochs (the cosine schedule ends with the run), overrides...
  local run=$base/pt_$1 seed=$2 config=$3 steps=$4 epochs=$5
  shift 5
  [ -f "$run/backbone.safetensors" ] || "$py" -m pretrain --config "configs/pretrain/$config" seed="$seed" \
    data.root="$out/unlabelled_all.csv" out_dir="$run" train.batch_size=128 train.max_steps="$steps" \
    train.epochs="$epochs" monitor.progress=false checkpoint.every_steps=100000 "$@" > "$run.log" 2>&1
}
for pt_seed in ${PRETRAIN_SEEDS:-0 1 2}; do
  pretrain "twoview$pt_seed" "$pt_seed" simclr_msht_tiny_cpu.yaml 300 34 &
  pretrain "multicrop$pt_seed" "$pt_seed" simclr_multicrop_msht_tiny_cpu.yaml 240 27 train.batch_by_domain=true &
  wait
  for seed in ${SEEDS:-0 1 2}; do  # fine-tuning seeds
    for arm in "twoview$pt_seed" "multicrop$pt_seed"; do
      run=$out/${arm}_s$seed
      [ -f "$run/best.safetensors" ] || "$py" -m finetune --config configs/finetune/msht_tiny_cpu.yaml \
        data.root="$out/labelled_ab.csv" data.image_size=128 init="$base/pt_$arm" out_dir="$run" train.epochs=10 \
        train.batch_size=32 sam=off cam.enabled=false seed="$seed" > "$run.log" 2>&1 &
    done
    wait
    for arm in "twoview$pt_seed" "multicrop$pt_seed"; do
      for site in site_c site_d; do
        for scale in auto none; do
          preds=$out/preds_${arm}_s${seed}_${site}_${scale}.csv
          [ -f "$preds" ] || "$py" -m finetune.predict --ckpt "$out/${arm}_s$seed" --images "$out/$site" \
            --scale $scale --judge-all --out "$preds" > /dev/null 2>&1
        done
      done
    done
  done
done
"$py" benchmarks/heldout.py summarise "$out" --json heldout_recipes.json
backbones=$(printf ", %s" "$base"/pt_*[0-9])
"$py" -m eval_probes --config configs/probes/robustness_cpu.yaml out_dir="$base/probes" data.root="$base/data/manifest.csv" \
  "checkpoints=[msht_tiny$backbones]" umap=false "zooms=[]" "stain.hed_strengths=[]" stain.restain=false \
  "stain.white_balance=[]" "stain.brightness=[]" "robustness_k=[5, 10, 20]"
