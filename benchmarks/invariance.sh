#!/usr/bin/env bash
# Does self-supervision learn the site? A synthetic set with 4 domains (stain, white balance, magnification
# differ by domain, independently of the class), the multi-crop SimCLR recipe for 150 steps with and without
# stain swaps and batches drawn within one domain, then the probes' class x domain-balanced robustness index
# beside random init; then 10 epochs of fine-tuning on the labels (from the swaps + by-domain arm with the default
# HED jitter 0.05 and with 0.1, and from random init) and the index after it. About 45 minutes on one core;
# results in README ("Results under shift").
#   bash benchmarks/invariance.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:-runs/bench/invariance}
py=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$base"
[ -f "$base/data/manifest.csv" ] || "$py" -m roseprior synth --out "$base/data" --n-per-class 600 --size 128 --seed 11
arm() {  # name, overrides...
  local out=$base/$1; shift
  [ -f "$out/backbone.safetensors" ] || "$py" -m pretrain --config configs/pretrain/simclr_multicrop_msht_tiny_cpu.yaml \
    data.root="$base/data/manifest.csv" out_dir="$out" train.batch_size=128 train.max_steps=150 train.epochs=100 \
    monitor.progress=false checkpoint.every_steps=50 "views.magnification=[0.5,1.0]" \
    "views.local_magnification=[1.0,2.0]" method.simclr.local_weight=0.8 "$@"  # as the README's table was measured
}
arm swap_0.0 views.stain_swap=0.0
arm swap_0.5 views.stain_swap=0.5
arm swap_0.5_by_domain views.stain_swap=0.5 train.batch_by_domain=true
# The same data naming no site: 4 pseudo-domains clustered by colour stand in for the sites.
"$py" -c "import csv, sys; rows = list(csv.DictReader(open(sys.argv[1]))); w = csv.writer(open(sys.argv[2], 'w', newline='')); \
w.writerow(['path', 'label']); w.writerows([(r['path'], r['label']) for r in rows])" "$base/data/manifest.csv" \
  "$base/data/manifest_nodomain.csv"
arm swap_0.5_by_pseudo views.stain_swap=0.5 train.batch_by_domain=true train.pseudo_domains=4 \
  data.root="$base/data/manifest_nodomain.csv"
"$py" -m eval_probes --config configs/probes/robustness_cpu.yaml out_dir="$base/probes" data.root="$base/data/manifest.csv" \
  "checkpoints=[msht_tiny, $base/swap_0.0, $base/swap_0.5, $base/swap_0.5_by_domain, $base/swap_0.5_by_pseudo]" \
  umap=false "zooms=[0.5, 2.0]" \
  "robustness_k=[5, 10, 20]"
finetune() {  # name, init, overrides...
  local out=$base/$1 init=$2
  shift 2
  [ -f "$out/best.safetensors" ] || "$py" -m finetune --config configs/finetune/msht_tiny_cpu.yaml \
    data.root="$base/data/manifest.csv" data.image_size=128 init="$init" out_dir="$out" train.epochs=10 \
    train.batch_size=32 sam=off cam.enabled=false "$@"
}
finetune ft_ssl_e10_hed "$base/swap_0.5_by_domain"
finetune ft_ssl_e10_hed10 "$base/swap_0.5_by_domain" augment.hed=0.1
finetune ft_rand_e10_hed msht_tiny
"$py" -m eval_probes --config configs/probes/robustness_cpu.yaml out_dir="$base/probes_finetuned" \
  data.root="$base/data/manifest.csv" \
  "checkpoints=[msht_tiny, $base/swap_0.5_by_domain, $base/ft_ssl_e10_hed, $base/ft_ssl_e10_hed10, $base/ft_rand_e10_hed]" \
  umap=false "zooms=[]" "stain.hed_strengths=[]" stain.restain=false "stain.white_balance=[]" "stain.brightness=[]" \
  "robustness_k=[5, 10, 20]"
