"""Do the adequacy measures find the fields a pathologist would reject, and only those?

Generates a synthetic set with known defects (``roseprior synth --defects``), scores every field with
``roseprior.adequacy.measure``, and prints for each defect the AUROC of its own measure (defective vs
clean fields) and the share flagged not assessable; for clean fields, the share assessable per class
(a flag must not depend on the diagnosis); the verdicts on the real ROSE examples in ../shared; and the
speed in fields per second on one core at 1390 x 1038 px.

    python benchmarks/adequacy.py --n-per-class 300          # the README table
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The measure that should catch each defect, and its direction (+1: higher on defective fields).
MEASURE_OF = {"blur": ("in_focus_fraction", -1), "partial_blur": ("in_focus_fraction", -1),
              "sparse": ("cellularity", -1), "blood": ("blood_fraction", +1), "faint": ("stain_contrast", -1)}


def measure_set(root: Path) -> list[dict]:
    from roseprior.adequacy import measure
    from roseprior.imageio import read_image

    rows = list(csv.DictReader((root / "manifest.csv").open()))
    for row in rows:
        row.update(vars(measure(read_image(root / row["path"]))))
    return rows


def summary(rows: list[dict]) -> dict:
    from sklearn.metrics import roc_auc_score

    clean = [r for r in rows if r["defect"] == "none"]
    out: dict = {"defects": {}, "clean_assessable": {}}
    for defect, (key, sign) in MEASURE_OF.items():
        bad = [r for r in rows if r["defect"] == defect]
        if not bad:
            continue
        auroc = roc_auc_score([0] * len(clean) + [1] * len(bad), [sign * r[key] for r in clean + bad])
        out["defects"][defect] = {"measure": key, "auroc": float(auroc), "n": len(bad),
                                  "flagged": float(np.mean([not r["assessable"] for r in bad]))}
    for label in sorted({r["label"] for r in clean}):
        out["clean_assessable"][label] = float(np.mean([r["assessable"] for r in clean if r["label"] == label]))
    out["clean_assessable"]["all"] = float(np.mean([r["assessable"] for r in clean]))
    return out


def real_examples(root: Path) -> list[dict]:
    from roseprior.adequacy import measure
    from roseprior.data import find_images
    from roseprior.imageio import read_image

    if not root.is_dir():
        return []
    return [{"path": str(p.relative_to(root)), **vars(measure(read_image(p)))} for p in find_images(root)]


def speed(root: Path) -> float:
    """Fields per second at 1390 x 1038 (a ROSE camera's frame), one thread."""
    import torch
    from PIL import Image

    from roseprior.adequacy import measure
    from roseprior.data import find_images

    torch.set_num_threads(1)
    first = find_images(root)[0]
    field = np.asarray(Image.open(first).convert("RGB").resize((1390, 1038), Image.BICUBIC))
    measure(field)
    start, n = time.perf_counter(), 5
    for _ in range(n):
        measure(field)
    return n / (time.perf_counter() - start)


def figure(root: Path, rows: list[dict], out: Path, per_kind: int = 2, tile: int = 200) -> Path:
    """A contact sheet: clean fields, then each defect, each captioned with the verdict."""
    from PIL import Image, ImageDraw

    kinds = ["none", *MEASURE_OF]
    sheet = Image.new("RGB", (per_kind * len(kinds) * tile, tile + 44), "white")
    draw = ImageDraw.Draw(sheet)
    column = 0
    for kind in kinds:
        for row in [r for r in rows if r["defect"] == kind][:per_kind]:
            with Image.open(root / row["path"]) as image:
                sheet.paste(image.convert("RGB").resize((tile - 4, tile - 4)), (column * tile, 0))
            verdict = "assessable" if row["assessable"] else row["reason"].split(" (")[0]
            draw.text((column * tile + 2, tile + 2), f"{kind}\n{verdict}", fill="black")
            column += 1
    sheet.save(out)
    return out


def blood_figure(real_root: Path, out: Path, tile: int = 256) -> Path:
    """The real fields beside what the blood segmenter marks on them (green), captioned with the fraction."""
    from PIL import Image, ImageDraw

    from roseprior.blood import blood_probability
    from roseprior.data import find_images
    from roseprior.imageio import read_image

    paths = find_images(real_root)
    columns = 3
    sheet = Image.new("RGB", (2 * columns * tile, -(-len(paths) // columns) * (tile + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, path in enumerate(paths):
        image = read_image(path)
        marked = blood_probability(image) > 0.5
        field = Image.fromarray(image).resize(marked.shape[::-1])
        shown = np.asarray(field, dtype=np.float32).copy()
        shown[marked] = 0.45 * shown[marked] + 0.55 * np.array([40.0, 220.0, 60.0])
        x, y = (i % columns) * 2 * tile, (i // columns) * (tile + 16)
        sheet.paste(field.resize((tile, tile)), (x, y))
        sheet.paste(Image.fromarray(shown.astype(np.uint8)).resize((tile, tile)), (x + tile, y))
        draw.text((x + 2, y + tile + 2), f"{path.relative_to(real_root)}: blood {marked.mean():.0%}", fill="black")
    sheet.save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-per-class", type=int, default=300)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--defects", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--real", default=str(REPO.parent / "shared" / "data" / "rose_examples"))
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--figure", default=None, help="PNG contact sheet of clean and defective fields")
    parser.add_argument("--blood-figure", default=None, help="the real fields beside what the blood segmenter marks")
    args = parser.parse_args(argv)
    from roseprior.synth import generate

    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "set", n_per_class=args.n_per_class, size=args.size, seed=args.seed,
                        defects=args.defects, progress=False)
        rows = measure_set(root)
        result = summary(rows)
        result["fields_per_second_1390x1038"] = speed(root)
        if args.figure:
            figure(root, rows, Path(args.figure))
    result["real"] = real_examples(Path(args.real))
    if args.blood_figure and result["real"]:
        blood_figure(Path(args.real), Path(args.blood_figure))
    print(f"adequacy: {2 * args.n_per_class} synthetic fields of {args.size} px, {args.defects:.0%} with a defect")
    for defect, d in result["defects"].items():
        print(f"  {defect:13s} {d['measure']:18s} AUROC {d['auroc']:.3f}   flagged {d['flagged']:.0%} of {d['n']}")
    print("  clean fields assessable: " + ", ".join(f"{k} {v:.0%}" for k, v in result["clean_assessable"].items()))
    for r in result["real"]:
        print(f"  real {r['path']}: {'assessable' if r['assessable'] else 'flagged: ' + r['reason']}")
    print(f"  speed: {result['fields_per_second_1390x1038']:.1f} fields/s at 1390x1038 on one core")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
