#!/usr/bin/env bash
# Creates the virtual environment and installs roseprior with its dev tools.
# On x86_64, torch/torchvision are pinned to the builds these machines serve from local disk;
# an unpinned `torch` would pull a multi-GB CUDA build from the registry.
set -euo pipefail
venv=${1:-.venv}
py=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
case "$(uname -m)" in
  x86_64)  "${pip[@]}" "torch==2.14.1" "torchvision==0.29.1" ;;
  aarch64) "${pip[@]}" "torch==2.9.1" "torchvision==0.24.1" ;;
  *)       "${pip[@]}" torch torchvision ;;
esac
"${pip[@]}" -e ".[dev]"
echo "roseprior installed into $venv"
