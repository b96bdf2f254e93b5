"""Peak memory of pretraining does not grow with the largest image in the folder.

Two pretrain runs of the CPU recipe (``configs/pretrain/simclr_msht_tiny_cpu.yaml``, batch 256),
each in a fresh process that reports its own peak resident set size: on a folder of small fields,
and on the same folder plus one 8000x6000 JPEG. Images are cut into views one by one, never padded
into one batch tensor of the largest size, so the large image costs about its own decoded size.

    python benchmarks/memory.py                    # the CPU recipe's batch 256 (aim: ratio <= 1.5)
    python benchmarks/memory.py --batch 32 --images 64 --steps 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RUN = """
import resource, sys
from pretrain.__main__ import main
code = main(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def write_images(folder: Path, n: int, size: int, big: tuple[int, int] | None) -> Path:
    """``n`` random ``size``-px JPEGs (and one ``big`` one) in an unlabelled folder."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"field_{i:04d}.jpg")
    if big is not None:
        w, h = big
        gradient = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
        Image.fromarray(gradient.astype(np.uint8)).save(folder / "huge_field.jpg", quality=80)
    return folder


def peak_rss_mb(data: Path, out: Path, args: argparse.Namespace) -> float:
    """Peak RSS (MB) of a pretrain run on ``data``, measured in its own process."""
    cmd = [sys.executable, "-c", RUN, "--config", args.config, f"data.root={data}", f"out_dir={out}",
           f"train.batch_size={args.batch}", f"train.max_steps={args.steps}", "monitor.progress=false",
           "monitor.tensorboard=false", "checkpoint.resume=never", f"views.cpu_threads={args.threads}"]
    env = {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**__import__("os").environ, **env})
    if proc.returncode != 0:
        raise RuntimeError(f"pretrain failed on {data}: {proc.stderr.strip().splitlines()[-1:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PEAK_RSS_KB"))
    return int(line.split()[1]) / 1024.0


def measure(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "pretrain" / "simclr_msht_tiny_cpu.yaml"))
    parser.add_argument("--batch", type=int, default=256, help="the recipe's batch size")
    parser.add_argument("--images", type=int, default=300, help="small fields in the folder (>= batch)")
    parser.add_argument("--size", type=int, default=128, help="side of the small fields (px)")
    parser.add_argument("--big", default="8000x6000", help="WIDTHxHEIGHT of the one large field")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    big = tuple(int(v) for v in args.big.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="memory_bench_") as tmp:
        tmp = Path(tmp)
        small = write_images(tmp / "small", args.images, args.size, None)
        mixed = write_images(tmp / "mixed", args.images, args.size, big)
        without = peak_rss_mb(small, tmp / "run_small", args)
        with_big = peak_rss_mb(mixed, tmp / "run_mixed", args)
    return {"batch": args.batch, "images": args.images, "size": args.size, "big": args.big, "steps": args.steps,
            "threads": args.threads, "without_mb": without, "with_mb": with_big, "ratio": with_big / without}


def main(argv: list[str] | None = None) -> int:
    r = measure(argv)
    print(f"memory: pretrain peak RSS, batch {r['batch']}, {r['images']} fields of {r['size']} px, {r['steps']} steps")
    print(f"  without a large field      : {r['without_mb']:8.0f} MB")
    print(f"  with one {r['big']:>9} field: {r['with_mb']:8.0f} MB")
    print(f"  ratio                      : {r['ratio']:.2f}  (aim <= 1.5)")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
