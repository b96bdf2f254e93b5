"""Views per second: pretrain's batched multi-crop views against lightly's ``DINOTransform``.

Both make the same number and sizes of crops (2 global + K local) from the same image files in
the same run, decoding included, on the same threads:

- lightly: PIL open, then ``DINOTransform`` image by image (PIL crops and colour ops per crop);
- ours: ``read_image`` per image, one padded batch, then ``MultiCropViews`` (one ``roi_align`` call
  per crop size, stain/acquisition jitter on whole batches of views).

    python benchmarks/views.py [--root DIR] [--images 64] [--batch 32] [--global-size 224] ...

Prints views/s for both and the ratio (ours / lightly).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as `python benchmarks/views.py` from anywhere
    sys.path.insert(0, str(REPO))


def lightly_views(paths: list[Path], args: argparse.Namespace) -> float:
    """Seconds for lightly's DINOTransform on every image (PIL decode included)."""
    from lightly.transforms import DINOTransform
    from PIL import Image

    transform = DINOTransform(
        global_crop_size=args.global_size, local_crop_size=args.local_size, n_local_views=args.n_local,
        global_crop_scale=(0.4, 1.0), local_crop_scale=(0.05, 0.4),
    )
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as img:
            views = transform(img.convert("RGB"))
        assert len(views) == 2 + args.n_local
    return time.perf_counter() - start


def our_views(paths: list[Path], args: argparse.Namespace) -> float:
    """Seconds for pretrain's views on every image, in batches (decode included)."""
    from pretrain.config import ViewsConfig
    from pretrain.views import DecodedImages, MultiCropViews, collate_decoded

    cfg = ViewsConfig(global_size=args.global_size, local_size=args.local_size, n_local=args.n_local,
                      scale_mode="area", global_area=[0.4, 1.0], local_area=[0.05, 0.4])
    views = MultiCropViews(cfg, seed=0)
    dataset = DecodedImages(paths)
    start = time.perf_counter()
    for lo in range(0, len(paths), args.batch):
        images, sizes, indices = collate_decoded([dataset[i] for i in range(lo, min(lo + args.batch, len(paths)))])
        out = views(images, sizes, indices, epoch=0)
        assert len(out["global"]) + len(out["local"]) == 2 + args.n_local
    return time.perf_counter() - start


def measure(argv: list[str] | None = None) -> dict[str, Any]:
    """Both rates (views/s, best of ``--repeats``) for the command line ``argv`` (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None, help="image folder (default: the synthetic default set)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--n-local", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both pipelines (1: PIL is single-threaded; on a few shared cores "
                        "more threads slow small tensor ops down, lightly's ToTensor/Normalize included)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings each")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from roseprior.data import find_images
    from roseprior.loop import keep_freed_memory

    keep_freed_memory()  # as pretrain's loader does (for both pipelines: lightly's allocations alike)
    from roseprior.errors import DataError

    if args.root is None:
        from roseprior.synth import default_dataset

        root = default_dataset()
    else:
        root = Path(args.root)
    paths = sorted(find_images(root))[: args.images]
    if not paths:
        raise DataError(f"benchmarks/views.py: no images under {root}")
    our_views(paths[:2], args)  # warm-up (imports, allocator)
    lightly_views(paths[:2], args)
    n_views = len(paths) * (2 + args.n_local)
    ours_times, theirs_times = [], []
    for _ in range(args.repeats):  # interleaved, so a change in machine load hits both alike
        ours_times.append(our_views(paths, args))
        theirs_times.append(lightly_views(paths, args))
    ours, theirs = min(ours_times), min(theirs_times)
    return {
        "images": len(paths), "root": str(root), "global_size": args.global_size, "local_size": args.local_size,
        "n_local": args.n_local, "batch": args.batch, "threads": args.threads, "repeats": args.repeats,
        "ours_views_per_s": n_views / ours, "lightly_views_per_s": n_views / theirs, "ratio": theirs / ours,
    }


def main(argv: list[str] | None = None) -> int:
    from roseprior.errors import DataError

    try:
        r = measure(argv)
    except DataError as err:
        print(err, file=sys.stderr)
        return 2
    print(f"views: {r['images']} images from {r['root']}, 2 x {r['global_size']} px + {r['n_local']} x "
          f"{r['local_size']} px per image, {r['threads']} threads, best of {r['repeats']}")
    print(f"  lightly DINOTransform : {r['lightly_views_per_s']:8.1f} views/s")
    print(f"  pretrain MultiCropViews: {r['ours_views_per_s']:8.1f} views/s (batch {r['batch']})")
    print(f"  ratio (ours / lightly): {r['ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
