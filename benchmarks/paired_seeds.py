"""Two pretraining recipes compared seed by seed: what the README's "multi-crop minus 2-view" figures are.

One 30-minute run of ``benchmarks/pretrain_quality.py`` scores a recipe on one split of CRIC, and two recipes
differ from one seed to the next by more than a test interval says (per seed, ±2 to 4 points). So each seed
(one split, one initialisation) is run for both recipes, and the difference is read per seed: its mean over the
seeds, the standard error of that mean, and on how many seeds the first recipe led.

    cd docs/results && python ../../benchmarks/paired_seeds.py \\
        --recipe pretrain_quality_cric_multicrop.json "pretrain_quality_cric_multicrop_seed?.json" \\
        --baseline pretrain_quality_cric.json "pretrain_quality_cric_seed?.json"

``--recipe`` and ``--baseline`` take files or globs (quote them). A file's seed is the split seed it records;
seeds that only one side has are named and left out.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as `python benchmarks/paired_seeds.py` from anywhere
    sys.path.insert(0, str(REPO))

# The six test numbers of a run: (name, path into quality.json's "pretrained").
NUMBERS = (("kNN", ("knn_balanced_accuracy",)), ("linear", ("linear_balanced_accuracy",)),
           ("kNN 0.5x", ("zoom", "0.5", "knn")), ("linear 0.5x", ("zoom", "0.5", "linear")),
           ("kNN 2x", ("zoom", "2", "knn")), ("linear 2x", ("zoom", "2", "linear")))


def seed_of(result: dict, path: str) -> int:
    """The split seed a ``pretrain_quality`` result was run with (``seed``, or as its split's source names it)."""
    if "seed" in result:
        return int(result["seed"])
    found = re.search(r"split_seed (\d+)", result.get("split", {}).get("source", ""))
    if found is None:
        raise SystemExit(f"paired_seeds: {path} names no split seed; give pretrain_quality.py results")
    return int(found.group(1))


def numbers(result: dict) -> np.ndarray:
    """The six test numbers of the pretrained backbone, in ``NUMBERS``' order."""
    values = []
    for _, keys in NUMBERS:
        value = result["pretrained"]
        for key in keys:
            value = value[key]
        values.append(value)
    return np.array(values, dtype=float)


def load(patterns: list[str]) -> dict[int, tuple[str, dict]]:
    """Seed -> (file, result) of every file the globs match; two files of one seed are refused."""
    runs: dict[int, tuple[str, dict]] = {}
    for path in sorted({p for pattern in patterns for p in glob.glob(pattern)}):
        result = json.loads(Path(path).read_text())
        seed = seed_of(result, path)
        if seed in runs:
            raise SystemExit(f"paired_seeds: {path} and {runs[seed][0]} are both seed {seed}; narrow the glob")
        runs[seed] = (path, result)
    return runs


BUDGET_GAP = 0.15  # a pair whose runs used their budgets this differently did not run in the same time


def budget_used(result: dict) -> float | None:
    """The fraction of its CPU budget a run spent pretraining (calibration included), None if not recorded."""
    seconds, minutes = result.get("pretrain_seconds"), result.get("minutes_budget")
    return seconds / (60.0 * minutes) if seconds is not None and minutes else None


def compare(recipe: dict[int, tuple[str, dict]], baseline: dict[int, tuple[str, dict]]) -> dict:
    """Per seed both sides have: the recipe minus the baseline in points; then mean, standard error of the mean
    (None for one seed) and the seeds where the recipe led, per number."""
    seeds = sorted(set(recipe) & set(baseline))
    if not seeds:
        raise SystemExit("paired_seeds: no seed has a result on both sides")
    diffs = np.array([100 * (numbers(recipe[s][1]) - numbers(baseline[s][1])) for s in seeds])
    summary = {}
    for column, (name, _) in enumerate(NUMBERS):
        d = diffs[:, column]
        summary[name] = {"mean": float(d.mean()),
                         "standard_error": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None,
                         "seeds_led": int((d > 0).sum())}
    return {"seeds": seeds, "unpaired": sorted(set(recipe) ^ set(baseline)),
            "steps": {s: [recipe[s][1].get("steps"), baseline[s][1].get("steps")] for s in seeds},
            "budget_used": {s: [budget_used(recipe[s][1]), budget_used(baseline[s][1])] for s in seeds},
            "per_seed": {s: dict(zip([n for n, _ in NUMBERS], diffs[i].round(2).tolist(), strict=True))
                         for i, s in enumerate(seeds)},
            "summary": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", nargs="+", required=True, help="the recipe's pretrain_quality results (globs)")
    parser.add_argument("--baseline", nargs="+", required=True, help="the baseline's results (globs)")
    parser.add_argument("--json", type=Path, default=None, help="write the comparison here too")
    args = parser.parse_args(argv)
    result = compare(load(args.recipe), load(args.baseline))
    n = len(result["seeds"])
    print(f"paired_seeds: recipe minus baseline in points, seeds {', '.join(map(str, result['seeds']))}"
          + (f" (no pair: {', '.join(map(str, result['unpaired']))})" if result["unpaired"] else ""))
    for seed, row in result["per_seed"].items():
        steps, used = result["steps"][seed], result["budget_used"][seed]
        budget = f", {used[0]:.0%} / {used[1]:.0%} of the budget" if None not in used else ""
        print(f"  seed {seed} ({steps[0]} / {steps[1]} steps{budget}): "
              + ", ".join(f"{k} {v:+.1f}" for k, v in row.items()))
    for name, s in result["summary"].items():
        error = f" ± {s['standard_error']:.1f}" if s["standard_error"] is not None else ""
        print(f"  {name:12s} {s['mean']:+.1f}{error} (led on {s['seeds_led']} of {n})")
    if n < 5:
        print(f"  warning: {n} seed(s): a recipe's lead moves by 2 to 4 points from one seed to the next", file=sys.stderr)
    for seed, used in result["budget_used"].items():
        if None not in used and abs(used[0] - used[1]) > BUDGET_GAP:
            print(f"  warning: seed {seed}: the recipe's run used {used[0]:.0%} of its budget and the baseline's "
                  f"{used[1]:.0%}; that pair did not run in the same time", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
