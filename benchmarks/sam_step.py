"""SAM step time against a plain step: the price of sharpness-aware training, printed as a ratio.

SAM does two forward-backward passes per step, so the ratio should sit a little under 2 (the
optimizer update and data handling are shared). Both steps are finetune's own step functions on
the same model, batch and base optimizer, timed alternately so machine load hits both alike.

    python benchmarks/sam_step.py                          # CPU: msht_tiny, 128 px, batch 8
    python benchmarks/sam_step.py --model msht --size 384 --batch 8 --iters 20   # a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

import backbones  # noqa: E402
from finetune.model import Classifier  # noqa: E402
from finetune.sam import build_optimizer, step_for  # noqa: E402


def measure(argv: list[str] | None = None) -> dict[str, Any]:
    """Median plain and SAM step times for the command line ``argv`` (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="msht_tiny")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (ignored on GPU)")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU present")
    args = parser.parse_args(argv)

    from accelerate import Accelerator

    torch.set_num_threads(args.threads)
    use_cpu = args.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=use_cpu, mixed_precision="no" if use_cpu else "bf16")
    kwargs = {} if args.model.startswith(backbones.TIMM_PREFIX) else {"img_size": args.size}
    images = torch.rand(args.batch, 3, args.size, args.size, device=accelerator.device)
    targets = torch.randint(0, 2, (args.batch,), device=accelerator.device)

    runs = {}
    for sam in ("off", "sam"):
        torch.manual_seed(0)
        model = Classifier(backbones.create(args.model, **kwargs))
        opt = build_optimizer([{"params": list(model.parameters())}], "adam", sam, rho=0.05, lr=1e-5)
        model, opt = accelerator.prepare(model, opt)
        model.train()
        runs[sam] = (model, opt, step_for(sam))

    def timed(sam: str) -> float:
        model, opt, step = runs[sam]
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(model, images, targets, nn.functional.cross_entropy, opt, accelerator)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        timed("off"), timed("sam")
    times: dict[str, list[float]] = {"off": [], "sam": []}
    for _ in range(args.iters):  # alternate, so a busy machine slows both alike
        for sam in ("off", "sam"):
            times[sam].append(timed(sam))
    plain, sharp = statistics.median(times["off"]), statistics.median(times["sam"])
    device = torch.cuda.get_device_name() if accelerator.device.type == "cuda" else f"CPU, {args.threads} threads"
    return {
        "model": args.model, "size": args.size, "batch": args.batch, "iters": args.iters, "device": device,
        "cuda": accelerator.device.type == "cuda", "threads": args.threads,
        "plain_s": plain, "sam_s": sharp, "ratio": sharp / plain,
    }


def main(argv: list[str] | None = None) -> int:
    r = measure(argv)
    print(f"model {r['model']}, {r['size']} px, batch {r['batch']}, {r['device']}, median of {r['iters']} steps")
    print(f"plain step: {r['plain_s'] * 1000:8.1f} ms")
    print(f"SAM step:   {r['sam_s'] * 1000:8.1f} ms")
    print(f"SAM / plain step time: {r['ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
