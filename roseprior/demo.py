"""``roseprior demo``: the whole chain (data -> pretrain -> finetune x2 -> probes) in one command.

The stages meet only through files on disk, so the demo runs each one as its own process with
the same command a user would type; what it prints is what each stage prints.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from roseprior.errors import DataError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class Recipe:
    """Configs and budgets for one run of the chain (CPU minutes or a GPU)."""

    pretrain: str
    finetune: str
    probes: str
    pretrain_overrides: list[str] = field(default_factory=list)
    finetune_overrides: list[str] = field(default_factory=list)
    probe_overrides: list[str] = field(default_factory=list)
    # Step budgets (at `batch_size` images a step) turned into whole epochs for the data at hand,
    # so a larger data set gets fewer epochs, not a longer run; None keeps the config's epochs.
    pretrain_steps: int | None = None
    finetune_steps: int | None = None
    batch_size: int = 16

    def epochs(self, steps: int | None, n_train: int) -> list[str]:
        if steps is None:
            return []
        return [f"train.epochs={max(1, round(steps * self.batch_size / max(n_train, 1)))}",
                f"train.batch_size={self.batch_size}"]


# Budgets sized so the whole chain, install included, stays under 15 minutes on 2 CPU cores.
CPU_RECIPE = Recipe(
    pretrain="pretrain/dino_msht_tiny_cpu.yaml",
    finetune="finetune/msht_tiny_cpu.yaml",
    probes="probes/robustness_cpu.yaml",
    finetune_overrides=["data.image_size=160"],
    pretrain_steps=380,  # 18 epochs of the 336 synthetic training images
    finetune_steps=110,  # 5 epochs of them
    # 48 test images leave as few as 2 per class and site, and the balanced index takes k up to a quarter of its
    # subsample (4 here): with the config's k of 5-50 alone every checkpoint's index read n/a.
    probe_overrides=["data.image_size=128", "robustness_k=[4, 5, 10, 20, 50]"],
)
GPU_RECIPE = Recipe(
    pretrain="pretrain/dino_msht.yaml",
    finetune="finetune/msht_sam.yaml",
    probes="probes/robustness.yaml",
)


def _gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _run(step: str, cmd: list[str]) -> None:
    print(f"\n=== [{step}] {shlex.join(cmd)}", flush=True)
    start = time.time()
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise SystemExit(f"roseprior demo: step '{step}' failed (exit {result.returncode}); see its output above")
    print(f"=== [{step}] done in {time.time() - start:.0f} s", flush=True)


def _stage(module: str, config: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", module, "--config", str(CONFIG_DIR / config), *overrides]


def summarize(report_path: Path) -> list[str]:
    """One line per checkpoint: clean and worst-shift balanced accuracy (linear probe)."""
    report = json.loads(report_path.read_text())
    lines = []
    for name, entry in report.get("checkpoints", {}).items():
        conditions = entry.get("conditions", {})
        clean = conditions.get("clean", {}).get("scores", {}).get("linear", {}).get("balanced_accuracy")
        shifted = [(cond, result["scores"]["linear"]["balanced_accuracy"]) for cond, result in conditions.items()
                   if result["shift"] and (result.get("scores") or {}).get("linear", {}).get("balanced_accuracy")
                   is not None]
        worst = min(shifted, key=lambda item: item[1]) if shifted else ("-", float("nan"))
        clean_text = f"{clean:.3f}" if clean is not None else "n/a"
        lines.append(f"{name:<28} clean {clean_text}   worst {worst[1]:.3f} ({worst[0]})")
    return lines


def run_demo(out: Path, data: Path | None, group_by: str | None, gpu: bool | None, quick: bool) -> Path:
    gpu = _gpu_available() if gpu is None else gpu
    recipe = GPU_RECIPE if gpu else CPU_RECIPE
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    quick_pre = ["train.max_steps=3"] if quick else []
    quick_fine = ["train.max_steps=3"] if quick else []
    quick_probe = ["umap=false"] if quick else []

    if data is None:
        data = out / "data"
        if not (data / "manifest.csv").exists():
            n = "24" if quick else "240"
            _run("data", [py, "-m", "roseprior", "synth", "--out", str(data), "--n-per-class", n,
                          "--size", "192" if quick else "256", "--seed", "0", "--preview"])
    elif not Path(data).exists():
        raise DataError(f"--data {data}: folder not found")
    split_dir = out / "split"
    split_cmd = [py, "-m", "roseprior", "split", "--src", str(data), "--out", str(split_dir),
                 "--ratios", "7:2:1", "--seed", "0", "--overwrite"]  # the demo's own split: rerunning replaces it
    if group_by:
        split_cmd += ["--group-by", group_by]
    _run("split", split_cmd)
    data_args = [f"data.root={data}", f"data.split_dir={split_dir}"]
    with open(split_dir / "train.csv") as fh:
        n_train = sum(1 for _ in fh) - 1
    pre_budget = recipe.epochs(recipe.pretrain_steps, n_train)
    fine_budget = recipe.epochs(recipe.finetune_steps, n_train)

    pretrain_dir = out / "pretrain"
    _run("pretrain", _stage("pretrain", recipe.pretrain,
                            [*data_args, f"out_dir={pretrain_dir}", *pre_budget, *recipe.pretrain_overrides,
                             *quick_pre]))
    finetune_dir, random_dir = out / "finetune", out / "finetune_random"
    _run("finetune", _stage("finetune", recipe.finetune,
                            [*data_args, f"init={pretrain_dir}", f"out_dir={finetune_dir}", *fine_budget,
                             *recipe.finetune_overrides, *quick_fine]))
    _run("finetune_random", _stage("finetune", recipe.finetune,
                                   [*data_args, f"out_dir={random_dir}", *fine_budget,
                                    *recipe.finetune_overrides, *quick_fine]))
    probes_dir = out / "probes"
    model_name = json.loads((pretrain_dir / "backbone.json").read_text())["name"]
    checkpoints = [model_name, str(pretrain_dir), str(finetune_dir), str(random_dir)]
    names = ["random_init", "pretrained", "finetuned", "finetuned_random"]
    _run("probes", _stage("eval_probes", recipe.probes,
                          [*data_args, f"out_dir={probes_dir}", f"checkpoints=[{', '.join(checkpoints)}]",
                           f"names=[{', '.join(names)}]", *recipe.probe_overrides, *quick_probe]))
    report = probes_dir / "report.html"
    print("\nSummary (linear probe balanced accuracy, clean vs worst shift):")
    for line in summarize(probes_dir / "report.json"):
        print("  " + line)
    print(f"\nReport: {report.resolve()}")
    return report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole chain: data, pretrain, finetune (pretrained and random init), probes",
        description=(
            "Runs synth (or your --data) -> split 7:2:1 -> pretrain (DINO) -> finetune with SAM from the "
            "pretrained backbone and from random init -> robustness probes on all four checkpoints, "
            "writing OUT/{data,split,pretrain,finetune,finetune_random,probes}. CPU recipes by default; "
            "the GPU recipes when a GPU is present."
        ),
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (runs/demo)")
    parser.add_argument("--data", type=Path, default=None,
                        help="your ImageFolder (N/, P/) or folder with manifest.csv; default: synthetic ROSE")
    parser.add_argument("--group-by", default=None,
                        help="manifest column whose groups never straddle splits (e.g. source_image)")
    device = parser.add_mutually_exclusive_group()
    device.add_argument("--gpu", dest="gpu", action="store_true", default=None, help="force the GPU recipes")
    device.add_argument("--cpu", dest="gpu", action="store_false", help="force the CPU recipes")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    parser.set_defaults(func=lambda args: run_demo(args.out, args.data, args.group_by, args.gpu, args.quick) and 0)
