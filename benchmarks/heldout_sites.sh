#!/usr/bin/env bash
# Another site, as the issue's first table: fine-tune on the labelled images of two synthetic sites, predict the
# images of the two others (in class folders: predict scores its own calls; no label reaches the model), with and
# without stain swaps in fine-tuning, and with the swaps taking the held-out sites' own stains
# (augment.stain_targets: their unlabelled images). The backbone is benchmarks/invariance.sh's multi-crop arm
# (swaps + batches by domain), pretrained on every site's unlabelled images. The default arm is also adapted to
# each held-out site (roseprior adapt: BatchNorm statistics of its unlabelled images, at its estimated scale or
# squeezed). Prints each arm's balanced accuracy per held-out site,
# mean ± sd over 3 fine-tuning seeds; about 50 minutes on one core (SEEDS="0" for one seed).
#   bash benchmarks/heldout_sites.sh [BASE]      # BASE: benchmarks/invariance.sh's output (runs/bench/invariance)
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:-runs/bench/invariance}
py=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
out=$base/heldout
[ -f "$base/swap_0.5_by_domain/backbone.safetensors" ] || { echo "run bash benchmarks/invariance.sh $base first"; exit 2; }
mkdir -p "$out/adapted_runs"
"$py" benchmarks/heldout.py prepare "$base/data" "$out"  # labelled sites a, b; held-out c, d (a folder each)
finetune() {  # name, overrides...
  local run=$out/$1; shift
  [ -f "$run/best.safetensors" ] || "$py" -m finetune --config configs/finetune/msht_tiny_cpu.yaml \
    data.root="$out/labelled_ab.csv" data.image_size=128 init="$base/swap_0.5_by_domain" out_dir="$run" train.epochs=10 \
    train.batch_size=32 sam=off cam.enabled=false "$@" > "$run.log" 2>&1
}
for seed in ${SEEDS:-0 1 2}; do  # fine-tuning seeds: the held-out sites move more from seed to seed than a test interval says
  finetune plain_s$seed seed=$seed
  finetune swap_s$seed seed=$seed augment.stain_swap=0.3
  finetune swap_to_heldout_s$seed seed=$seed augment.stain_swap=0.3 "augment.stain_targets=$out/heldout_unlabelled.csv"
  for arm in plain swap swap_to_heldout; do
    for site in site_c site_d; do
      for scale in auto none; do  # auto: at the training scale, estimated per folder (the README's chain); none: squeezed
        preds=$out/preds_${arm}_s${seed}_${site}_${scale}.csv
        [ -f "$preds" ] || "$py" -m finetune.predict --ckpt "$out/${arm}_s$seed" --images "$out/$site" --scale $scale \
          --judge-all --out "$preds" > /dev/null 2>&1
      done
    done
  done
  # roseprior adapt on each held-out site's unlabelled images (BatchNorm statistics): at the site's estimated scale,
  # which predict then takes unasked (plain_adapted), or on its fields squeezed whole, the chain before adapt knew
  # the scale (plain_adapted_squeezed), predicted at the estimated scale or squeezed.
  for site in site_c site_d; do
    for scale in auto none; do
      adapted=$out/adapted_runs/plain_s${seed}_${site}_$scale
      [ -f "$adapted/best.safetensors" ] || "$py" -m roseprior adapt --run "$out/plain_s$seed" --images "$out/$site" \
        --scale $scale --out "$adapted" > "$adapted.log" 2>&1
    done
    preds=$out/preds_plain_adapted_s${seed}_${site}_auto.csv
    [ -f "$preds" ] || "$py" -m finetune.predict --ckpt "$out/adapted_runs/plain_s${seed}_${site}_auto" \
      --images "$out/$site" --judge-all --out "$preds" > /dev/null 2>&1
    for scale in auto none; do
      preds=$out/preds_plain_adapted_squeezed_s${seed}_${site}_$scale.csv
      [ -f "$preds" ] || "$py" -m finetune.predict --ckpt "$out/adapted_runs/plain_s${seed}_${site}_none" \
        --images "$out/$site" --scale $scale --judge-all --out "$preds" > /dev/null 2>&1
    done
  done
done
"$py" benchmarks/heldout.py summarise "$out"
