"""CPU latency of one 384-px field: the exported ONNX graph in onnxruntime vs the eager PyTorch classifier.

Both run the same calibrated classifier (``finetune.export.CalibratedClassifier``) on batches of
one field, with the same number of threads, alternated, median of ``--iters``. The classifier is
a run's (``--run``) or a random-init one of ``--model`` (the latency does not depend on the weights).

    python benchmarks/export_latency.py                      # msht at 384 px, every core (aim: >= 1.5x)
    python benchmarks/export_latency.py --model msht_tiny --iters 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _random_run(model: str, size: int, out: Path) -> Path:
    """A finetune-like run folder holding a random-init classifier (best.safetensors + best.json)."""
    import backbones
    from finetune.model import Classifier, save_classifier

    torch.manual_seed(0)
    classifier = Classifier(backbones.create(model, img_size=size))
    save_classifier(classifier, out, {"classes": ["N", "P"], "positive_class": "P", "image_size": size})
    return out


def measure(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None, help="a finetune out_dir (default: a random-init --model)")
    parser.add_argument("--model", default="msht")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads for both (default: every core, as the computer beside the microscope would)")
    args = parser.parse_args(argv)
    import onnxruntime as ort

    from finetune.export import CalibratedClassifier, export
    from finetune.model import load_classifier
    from roseprior.imageops import dihedral_views

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="export_latency_") as tmp:
        run = Path(args.run) if args.run else _random_run(args.model, args.size, Path(tmp) / "run")
        start = time.perf_counter()
        path = export(run, "onnx", Path(tmp) / "model.onnx", args.size)
        export_s = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        classifier, meta = load_classifier(run)
        eager = CalibratedClassifier(classifier, meta.get("temperature", 1.0)).eval()
        x = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        feed = {session.get_inputs()[0].name: x.numpy()}

        def run_eager() -> None:
            with torch.inference_mode():
                eager(x)

        def run_onnx() -> None:
            session.run(None, feed)

        for fn in (run_eager, run_onnx):  # warm-up
            fn()
        times: dict[str, list[float]] = {"eager": [], "onnx": []}
        for _ in range(args.iters):
            for name, fn in (("eager", run_eager), ("onnx", run_onnx)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    eager_s, onnx_s = statistics.median(times["eager"]), statistics.median(times["onnx"])
    views = len(dihedral_views(x)) if classifier.dihedral_mean else 1  # decision.dihedral_mean: 8 readings a field
    return {"model": meta.get("backbone"), "size": args.size, "iters": args.iters, "threads": args.threads,
            "views": views, "eager_s": eager_s, "onnx_s": onnx_s, "ratio": eager_s / onnx_s, "export_s": export_s}


def main(argv: list[str] | None = None) -> int:
    r = measure(argv)
    print(f"export_latency: {r['model']} at {r['size']} px, batch 1, {r['views']} view(s) of each field, "
          f"{r['threads']} thread(s), median of {r['iters']}")
    print(f"  eager PyTorch      : {1000 * r['eager_s']:8.1f} ms per field")
    print(f"  onnxruntime (ONNX) : {1000 * r['onnx_s']:8.1f} ms per field")
    print(f"  speed-up           : {r['ratio']:.2f}x  (aim >= 1.5x); export took {r['export_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
