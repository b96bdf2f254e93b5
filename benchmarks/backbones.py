"""Backbone throughput (forward + backward images/s) and the model table (params, GFLOPs).

Throughput: every model at the same input size and batch, as a ratio to ``timm:resnet50`` measured
in the same run, with channels_last off and on; on a GPU also bf16 autocast and ``torch.compile``
against eager fp32. Speed is reported, never asserted.

    python benchmarks/backbones.py --quick              # CPU: 224 px, batch 4, 2 timed iterations
    python benchmarks/backbones.py --size 384 --batch 32 --iters 20   # on a GPU
    python benchmarks/backbones.py --table              # the docs/models.md table: params + GFLOPs
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

import backbones  # noqa: E402

BENCH_MODELS = ["msht_tiny", "msht_small", "msht", "timm:resnet50", "timm:vit_small_patch16_224"]
REFERENCE = "timm:resnet50"
TABLE_MODELS = [
    "msht",
    "msht_small",
    "msht_tiny",
    "hybrid_vit",
    "timm:resnet50",
    "timm:vit_small_patch16_224",
    "timm:vit_base_patch16_384",
    "timm:swin_tiny_patch4_window7_224",
]


# ====== measuring ======


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}, {torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step_rate(
    model: nn.Module,
    x: torch.Tensor,
    iters: int,
    warmup: int,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Images per second of forward + backward (gradients zeroed each step, no optimizer)."""
    device = x.device
    model.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(x).float().logsumexp(dim=1).mean()
        loss.backward()
        for p in model.parameters():
            p.grad = None

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return iters * x.shape[0] / (time.perf_counter() - start)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gflops(name: str, size: tuple[int, int]) -> float:
    """Forward GFLOPs (2 per multiply-add) at batch 1, counted on the meta device: no compute, no memory."""
    with torch.device("meta"):
        model = backbones.create(name).eval()
        x = torch.empty(1, 3, *size)
        with FlopCounterMode(display=False) as counter:
            model.forward_embedding(x)
    return counter.get_total_flops() / 1e9


def default_size(model: nn.Module) -> tuple[int, int]:
    cfg = getattr(model, "default_cfg", None) or getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))
    return int(size[-2]), int(size[-1])


# ====== the table ======


def model_table(names: list[str]) -> str:
    rows = [
        "| name | params (M) | GFLOPs | GMACs | embed_dim | default input |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    print("\n".join(rows), flush=True)
    for name in names:
        with torch.device("meta"):
            model = backbones.create(name)
        size = default_size(model)
        flops = gflops(name, size)
        rows.append(
            f"| `{name}` | {count_params(model) / 1e6:.2f} | {flops:.1f} | {flops / 2:.1f} | "
            f"{model.embed_dim} | {size[0]}x{size[1]} |"
        )
        print(rows[-1], flush=True)
    return "\n".join(rows) + "\n"


# ====== throughput ======


def run_variants(
    name: str, size: int, batch: int, iters: int, warmup: int, device: torch.device, compile: bool = True
) -> dict[str, float]:
    torch.manual_seed(0)
    model = backbones.create(name, num_classes=2).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    rates: dict[str, float] = {"fp32": train_step_rate(model, x, iters, warmup)}
    cl_model = model.to(memory_format=torch.channels_last)
    rates["fp32+channels_last"] = train_step_rate(
        cl_model, x.to(memory_format=torch.channels_last), iters, warmup
    )
    model = model.to(memory_format=torch.contiguous_format)
    if device.type == "cuda":
        rates["bf16"] = train_step_rate(model, x, iters, warmup, autocast_dtype=torch.bfloat16)
    if device.type == "cuda" and compile:
        compiled: Callable = torch.compile(model)
        rates["compile"] = train_step_rate(compiled, x, iters, warmup + 2)  # compile happens in warm-up
        rates["compile+bf16"] = train_step_rate(compiled, x, iters, warmup + 2, autocast_dtype=torch.bfloat16)
    return rates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=BENCH_MODELS)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: 224 px, batch 4, 2 iterations")
    parser.add_argument("--no-compile", action="store_true", help="on a GPU, skip the torch.compile variants")
    parser.add_argument("--table", action="store_true", help="print the model table (markdown) and exit")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.iters, args.warmup = 224, 4, 2, 1
    if REFERENCE not in args.models:
        args.models = [*args.models, REFERENCE]
    return args


def measure(argv: list[str] | None = None) -> dict:
    """Images/s of every model and variant, for the command line ``argv``; prints each model as it finishes."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)

    print(f"device: {device_name(device)}; torch {torch.__version__}")
    print(f"forward+backward, {args.size}x{args.size}, batch {args.batch}, {args.iters} timed iterations")
    results: dict[str, dict[str, float]] = {}
    for name in args.models:
        results[name] = run_variants(
            name, args.size, args.batch, args.iters, args.warmup, device, compile=not args.no_compile
        )
        print(f"  {name}: " + ", ".join(f"{k} {v:.2f} img/s" for k, v in results[name].items()), flush=True)
    return {
        "device": device_name(device), "size": args.size, "batch": args.batch, "iters": args.iters,
        "reference": REFERENCE, "results": results,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table:
        if args.threads:
            torch.set_num_threads(args.threads)
        model_table(TABLE_MODELS)
        return
    results = measure(argv)["results"]

    ref = results[REFERENCE]["fp32"]
    variants = list(results[REFERENCE])
    print(f"\nimages/s (ratio to {REFERENCE} fp32 in this run)")
    print(f"{'model':34s}" + "".join(f"{v:>24s}" for v in variants))
    for name, rates in results.items():
        cells = "".join(f"{rates[v]:>13.2f} ({rates[v] / ref:5.2f}x)".rjust(24) for v in variants)
        print(f"{name:34s}{cells}")
    print("\nspeed-up of each variant over the same model's eager fp32")
    for name, rates in results.items():
        print(f"{name:34s}" + "".join(f"{rates[v] / rates['fp32']:>23.2f}x" for v in variants))


if __name__ == "__main__":
    main()
