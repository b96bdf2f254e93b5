"""Held-out synthetic sites, as the issue's first table: the data layout and the scoring that
``benchmarks/heldout_sites.sh`` and ``benchmarks/heldout_recipes.sh`` share.

    python benchmarks/heldout.py prepare DATA OUT     # DATA: a `roseprior synth` folder with sites a-d
    python benchmarks/heldout.py summarise OUT [--json NAME]

``prepare`` writes, from DATA's manifest:
- ``labelled_ab.csv``: the labelled fields of sites a and b, what fine-tuning sees;
- ``unlabelled_all.csv``: every field of the four sites with its site and no label, what pretraining on
  "the unlabelled images of both domains" sees;
- ``site_c/`` and ``site_d/``: one folder of links per held-out site, its fields in class folders (``N/``,
  ``P/``), as a user lays out a new site whose diagnoses are known: ``finetune.predict`` reads the site and
  scores its calls itself (``preds.metrics.json``); ``heldout_unlabelled.csv`` lists them with their site and
  no label, what ``augment.stain_targets`` reads.

``summarise`` gathers the balanced accuracy of every ``preds_<arm>_s<seed>_<site>_<auto|none>.metrics.json``
in OUT (predict's own scores of that site) and of every ``<arm>_s<seed>/metrics.json`` (the labelled sites'
test split): mean ± sd over seeds per arm and site, printed and written to ``OUT/NAME``.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as `python benchmarks/heldout.py` from anywhere
    sys.path.insert(0, str(REPO))

LABELLED = ("site_a", "site_b")
HELD_OUT = ("site_c", "site_d")
PREDS = re.compile(r"preds_(.+)_s(\d+)_(site_.)_(auto|none)\.metrics\.json")


def prepare(data: Path, out: Path) -> None:
    """The labelled, unlabelled and held-out views of ``data`` in ``out`` (paths relative, so the folder
    may be reached through another path)."""
    rows = list(csv.DictReader((data / "manifest.csv").open()))
    out.mkdir(parents=True, exist_ok=True)

    def relative(row: dict[str, str], start: Path) -> str:
        return os.path.relpath(data / row["path"], start)

    with (out / "labelled_ab.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(dict(r, path=relative(r, out)) for r in rows if r["domain"] in LABELLED)
    with (out / "unlabelled_all.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "domain"])
        writer.writerows((relative(r, out), r["domain"]) for r in rows)
    with (out / "heldout_unlabelled.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "domain"])
        for r in rows:
            if r["domain"] in HELD_OUT:
                folder = out / r["domain"] / r["label"]
                folder.mkdir(parents=True, exist_ok=True)
                link = folder / Path(r["path"]).name
                if not os.path.lexists(link):
                    os.symlink(relative(r, folder), link)
                writer.writerow([os.path.relpath(link, out), r["domain"]])


def summarise(out: Path, name: str = "heldout_sites.json") -> dict[str, dict]:
    """Each arm's balanced accuracy per held-out site (``auto``: at the estimated training scale; ``none``:
    squeezed) and on the labelled sites' test split, per seed, with mean and sd."""
    scores: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for path in sorted(out.glob("preds_*_s*_site_*_*.metrics.json")):
        arm, seed, site, scale = PREDS.fullmatch(path.name).groups()
        key = f"{arm} {site}" + ("" if scale == "auto" else ", squeezed (--scale none)")
        scores[key][seed] = json.loads(path.read_text())["all"]["balanced_accuracy"]
    for metrics in sorted(out.glob("*_s*/metrics.json")):
        arm, seed = re.fullmatch(r"(.+)_s(\d+)", metrics.parent.name).groups()
        scores[f"{arm} labelled sites' test split"][seed] = json.loads(metrics.read_text())["test"]["balanced_accuracy"]
    result = {}
    for key, per_seed in sorted(scores.items()):
        values = np.array(list(per_seed.values()))
        sd = float(values.std(ddof=1)) if len(values) > 1 else None
        result[key] = {"per_seed": per_seed, "mean": float(values.mean()), "sd": sd}
        print(f"{key:55s} balanced accuracy {values.mean():.3f} ± {sd or 0:.3f} over {len(values)} seeds: "
              + " ".join(f"{v:.3f}" for v in values))
    (out / name).write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare")
    prep.add_argument("data", type=Path)
    prep.add_argument("out", type=Path)
    summ = commands.add_parser("summarise")
    summ.add_argument("out", type=Path)
    summ.add_argument("--json", default="heldout_sites.json", help="file name in OUT")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.data, args.out)
    else:
        summarise(args.out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
