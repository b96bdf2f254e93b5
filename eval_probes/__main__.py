"""``python -m eval_probes --config configs/probes/X.yaml [key=value ...]``."""

from __future__ import annotations

import argparse
import logging
import sys

from roseprior.config import add_config_args, load_config
from roseprior.errors import RosepriorError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval_probes",
        description=(
            "Compare frozen checkpoints with kNN and linear probes under stain, scale and domain shift; "
            "writes OUT_DIR/report.json, report.html, config.yaml and tb/. Example: python -m eval_probes "
            "--config configs/probes/robustness_cpu.yaml 'checkpoints=[runs/pretrain, timm:resnet18]'"
        ),
    )
    add_config_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from eval_probes.config import ProbeConfig

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs each CPU-feature fallback at INFO
    try:
        cfg = load_config(ProbeConfig, args.config, args.overrides)
        from eval_probes.run import run

        report = run(cfg)
    except RosepriorError as err:
        print(f"eval_probes: error: {err}", file=sys.stderr)
        return 2
    from eval_probes.report import summary_rows

    print(f"eval_probes: wrote {cfg.out_dir}/report.json and report.html")
    for rank, row in enumerate(summary_rows(report), start=1):
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"  {rank}. {row['name']}: clean kNN {fmt(row['clean_knn'])} linear {fmt(row['clean_linear'])} | "
              f"stain {fmt(row['stain_linear'])} | scale {fmt(row['scale_linear'])} | RI {fmt(row['ri'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
