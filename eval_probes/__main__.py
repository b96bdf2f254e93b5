"""``python -m eval_probes --config configs/probes/X.yaml [--print-config] [key=value ...]``."""

from __future__ import annotations

import logging
import sys

from roseprior.stage import stage_main

from .config import ProbeConfig


def run(cfg: ProbeConfig) -> None:
    from eval_probes.report import summary_rows
    from eval_probes.run import run as probe

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs each CPU-feature fallback at INFO
    report = probe(cfg)
    print(f"eval_probes: wrote {cfg.out_dir}/report.json and report.html")
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for rank, row in enumerate(summary_rows(report), start=1):
        print(f"  {rank}. {row['name']}: clean kNN {fmt(row['clean_knn'])} linear {fmt(row['clean_linear'])} | "
              f"stain {fmt(row['stain_linear'])} | scale {fmt(row['scale_linear'])} | RI {fmt(row['ri'])} "
              f"(k {row['ri_k']}; same architecture at random init {fmt(row['ri_random_init'])})"
              + (f" | trained on {row['test_overlap']} test images" if row["test_overlap"] else ""))


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, prog="eval_probes", schema=ProbeConfig, run=run, description=(
        "Compare frozen checkpoints with kNN and linear probes under stain, scale and domain shift; "
        "writes OUT_DIR/report.json, report.html, config.yaml and tb/. Example: python -m eval_probes "
        "--config configs/probes/robustness_cpu.yaml 'checkpoints=[runs/pretrain, timm:resnet18]'"))


if __name__ == "__main__":
    sys.exit(main())
