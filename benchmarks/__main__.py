"""Run every benchmark and print one table of ratios, each measured against its reference in the same run.

    python -m benchmarks                     # real sizes (a GPU's when there is one)
    python -m benchmarks --quick             # small sizes, 1 CPU thread: a few minutes on a 2-core CPU
    python -m benchmarks --only views,knn --json runs/bench/rows.json

``--quick`` runs everything on one CPU thread (torch, faiss, BLAS): on a small machine shared with other work, two
threads oversubscribe the cores and step times swing tenfold (seen on the 2-core dev box).

Each benchmark runs in its own process (``--worker``), so one that fails or crashes, or changes
torch's thread count, leaves the others alone; its error takes its row and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from benchmarks._table import Row, describe_device, error_row, format_table, row

REPO = Path(__file__).resolve().parents[1]


# ====== the benchmarks: arguments for the script's ``measure``, and its rows ======


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def bench_views(quick: bool, data: str | None) -> list[Row]:
    from benchmarks import views

    argv = ["--images", "32", "--batch", "32", "--repeats", "3"] if quick else []
    argv += ["--root", data] if data else []
    r = views.measure(argv)
    return [row("views", f"multi-crop views (2 x {r['global_size']} + {r['n_local']} x {r['local_size']} px, "
                f"decode included): pretrain MultiCropViews vs lightly DINOTransform",
                r["ours_views_per_s"], r["lightly_views_per_s"], "views/s", r["ratio"], "ours / lightly",
                "> 1 (faster)", describe_device(False, r["threads"]), f"{r['images']} images, batch {r['batch']}")]


def _pretrain_row(r: dict, recipe: str, cuda: bool) -> Row:
    return row("pretrain", f"pretrain step, {recipe} ({r['method']}, {r['model']}, batch {r['batch']}, {r['views']}): "
               "end to end from disk vs views already in memory", r["end_to_end_images_per_s"],
               r["ceiling_images_per_s"], "img/s", r["ratio"], "end to end / in memory", ">= 0.9",
               describe_device(cuda, r["threads"]), f"median of {r['steps']} steps after {r['warmup']}; one batch of "
               f"views alone {r['views_s_per_batch']:.3f} s; {r['num_workers']} loader workers")


def bench_pretrain(quick: bool, data: str | None) -> list[Row]:
    """Quick: a tiny DINO step. Full, on a GPU: the GPU recipe. Full, on a CPU: the CPU recipe (on the CRIC cells
    when ../shared has them) and the GPU recipe's views (2 x 384 + 8 x 128 px from 1024-px fields, cut in a
    loader worker) on ``msht_tiny``, the CPU's stand-in for the GPU's model."""
    from benchmarks import pretrain_throughput

    cuda = _cuda()
    if quick:
        argv = ["--steps", "6", "--warmup", "2", "--threads", "1", "train.batch_size=8"]
        return [_pretrain_row(pretrain_throughput.measure(argv + ([f"data.root={data}"] if data else [])), "quick", cuda)]
    if cuda:
        argv = ["--config", str(REPO / "configs/pretrain/dino_msht.yaml"), "--steps", "20", "--warmup", "3",
                f"data.root={data}" if data else "data.root=null"]
        return [_pretrain_row(pretrain_throughput.measure(argv), "GPU recipe", cuda)]
    from roseprior.synth import generate

    cric = REPO.parent / "shared" / "data" / "cric_cells"
    cells = data or (str(cric) if cric.is_dir() else None)
    cpu_recipe = ["--config", str(REPO / "configs/pretrain/simclr_msht_tiny_cpu.yaml"), "--steps", "6", "--warmup",
                  "2", "--threads", "1", f"data.root={cells}" if cells else "train.batch_size=128"]
    rows = [_pretrain_row(pretrain_throughput.measure(cpu_recipe), "CPU recipe", cuda)]
    with tempfile.TemporaryDirectory(prefix="bench_fields_") as tmp:
        fields = data or str(generate(Path(tmp) / "fields", n_per_class=32, size=1024, progress=False))
        gpu_views = ["--config", str(REPO / "configs/pretrain/dino_msht.yaml"), "--steps", "4", "--warmup", "2",
                     "--threads", "1", f"data.root={fields}", "model.name=msht_tiny", "model.sync_batchnorm=false",
                     "train.batch_size=8", "train.precision=no", "views.device=loader", "data.num_workers=1"]
        rows.append(_pretrain_row(pretrain_throughput.measure(gpu_views), "GPU recipe's views on CPU", cuda))
    return rows


def bench_sam(quick: bool, data: str | None) -> list[Row]:
    from benchmarks import sam_step

    cuda = _cuda()
    if quick:
        argv = ["--size", "128", "--batch", "8", "--iters", "5", "--warmup", "2", "--threads", "1"]
    elif cuda:
        argv = ["--model", "msht", "--size", "384", "--batch", "8", "--iters", "20"]
    else:
        argv = []
    r = sam_step.measure(argv)
    return [row("sam", f"finetune step time ({r['model']}, {r['size']} px, batch {r['batch']}): SAM vs plain",
                r["sam_s"] * 1000, r["plain_s"] * 1000, "ms", r["ratio"], "SAM / plain",
                "~2 (well above: defect)", describe_device(r["cuda"], r["threads"]),
                f"median of {r['iters']} steps each, alternated")]


def bench_knn(quick: bool, data: str | None) -> list[Row]:
    from benchmarks import knn

    r = knn.measure(["--quick"] if quick else [])
    if not r["agree"]:
        raise RuntimeError(f"faiss and scikit-learn disagree: identical top-k sets {r['same_sets']:.2%}, "
                           f"max probability difference {r['max_prob_diff']:.2e}")
    device = "cuda (faiss GPU)" if r["faiss_gpu"] else describe_device(False, r["threads"])
    return [row("knn", f"exact cosine kNN + vote ({r['n']:,} x {r['dim']}, {r['queries']:,} queries, k={r['k']}): "
                f"roseprior.knn (engine measured: {r['engine']}) vs scikit-learn brute force", r["faiss_s"],
                r["sklearn_s"], "s", r["ratio"], "sklearn time / ours", ">= 1", device, "identical top-k and votes")]


def bench_backbones(quick: bool, data: str | None) -> list[Row]:
    from benchmarks import backbones as bench

    cuda = _cuda()
    if quick:
        argv = ["--models", "msht_tiny", "msht", "--size", "128", "--batch", "2", "--iters", "2", "--warmup", "1",
                "--threads", "1"]
    elif cuda:
        argv = ["--size", "384", "--batch", "32", "--iters", "10", "--no-compile"]
    else:
        argv = []
    r = bench.measure(argv)
    results, ref = r["results"], r["reference"]
    rows = []
    for variant in ("fp32", "bf16"):
        if variant not in results[ref]:
            continue
        for name, rates in results.items():
            if name == ref:
                continue
            rows.append(row("backbones", f"forward+backward {variant} ({r['size']} px, batch {r['batch']}): "
                            f"{name} vs {ref}", rates[variant], results[ref][variant], "img/s",
                            rates[variant] / results[ref][variant], f"{name} / {ref}", "reported",
                            describe_device(cuda), f"{r['iters']} timed iterations"))
    return rows


def bench_memory(quick: bool, data: str | None) -> list[Row]:
    from benchmarks import memory

    r = memory.measure(["--batch", "32", "--images", "64", "--steps", "1"] if quick else [])
    return [row("memory", f"pretrain peak RSS (CPU recipe, batch {r['batch']}): with one {r['big']} field vs "
                f"without", r["with_mb"], r["without_mb"], "MB", r["ratio"], "with / without", "<= 1.5",
                describe_device(False, r["threads"]), f"{r['images']} fields of {r['size']} px, {r['steps']} steps")]


def bench_export(quick: bool, data: str | None) -> list[Row]:
    from benchmarks import export_latency

    r = export_latency.measure(["--model", "msht_tiny", "--iters", "5", "--threads", "1"] if quick else [])
    return [row("export", f"classifier latency per {r['size']} px field ({r['model']}, batch 1): onnxruntime vs "
                "eager PyTorch", r["onnx_s"] * 1000, r["eager_s"] * 1000, "ms", r["ratio"], "eager / onnxruntime",
                ">= 1.5", describe_device(False, r["threads"]), f"median of {r['iters']}, alternated")]


# Each takes (quick, image folder or None) and returns its rows; views and pretrain read images.
BENCHMARKS: dict[str, Callable[[bool, str | None], list[Row]]] = {
    "views": bench_views,
    "pretrain": bench_pretrain,
    "sam": bench_sam,
    "knn": bench_knn,
    "backbones": bench_backbones,
    "memory": bench_memory,
    "export": bench_export,
}


# ====== running them ======


def run_worker(name: str, quick: bool, rows_out: Path, data: str | None = None) -> int:
    """Run one benchmark in this process; its rows (or its error) go to ``rows_out`` as JSON."""
    try:
        rows = BENCHMARKS[name](quick, data)
        code = 0
    except Exception as err:  # noqa: BLE001 - any failure becomes this benchmark's row, not the run's end
        traceback.print_exc()
        rows, code = [error_row(name, f"{type(err).__name__}: {err}")], 1
    rows_out.write_text(json.dumps(rows))
    return code


def run_in_subprocess(name: str, quick: bool, timeout: float | None, data: str | None = None) -> list[Row]:
    """The benchmark's rows from a fresh interpreter; its own output goes to our stderr as progress."""
    with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as tmp:
        rows_out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "benchmarks", "--worker", name, "--rows-out", str(rows_out)]
        if quick:
            cmd.append("--quick")
        if data:
            cmd += ["--data", data]
        # quick: one thread for faiss, BLAS and torch alike (see the module docstring)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if quick else None
        try:
            proc = subprocess.run(cmd, cwd=REPO, stdout=sys.stderr, timeout=timeout, check=False, env=env)
        except subprocess.TimeoutExpired:
            return [error_row(name, f"did not finish within --timeout {timeout:.0f} s")]
        if rows_out.is_file():
            return json.loads(rows_out.read_text())
        return [error_row(name, f"its process exited with code {proc.returncode} before writing a result "
                                "(see its output above)")]


def parse_only(parser: argparse.ArgumentParser, text: str | None) -> list[str]:
    if not text:
        return list(BENCHMARKS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        parser.error(f"--only: unknown benchmark {', '.join(map(repr, unknown)) or repr(text)}; "
                     f"choose from {', '.join(BENCHMARKS)} (comma-separated)")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (well under 5 minutes on a 2-core CPU)")
    parser.add_argument("--only", metavar="NAMES", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the rows as JSON to OUT")
    parser.add_argument("--data", metavar="DIR", help="image folder for views and pretrain (default: the synthetic "
                        "default set, generated once into the cache)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="give up on a benchmark after this long (its row then says so)")
    parser.add_argument("--worker", choices=list(BENCHMARKS), help=argparse.SUPPRESS)
    parser.add_argument("--rows-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        if args.rows_out is None:
            parser.error("--worker needs --rows-out")
        return run_worker(args.worker, args.quick, args.rows_out, args.data)

    names = parse_only(parser, args.only)
    rows: list[Row] = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        new = run_in_subprocess(name, args.quick, args.timeout, args.data)
        status = "FAILED" if any(r.get("error") for r in new) else "done"
        print(f"[{i}/{len(names)}] {name} {status} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        rows.extend(new)
    print(f"\nbenchmarks ({'quick' if args.quick else 'full'} sizes); ratio as named in brackets:")
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"quick": args.quick, "rows": rows}, indent=2) + "\n")
        print(f"rows written to {args.json}")
    failed = [r["benchmark"] for r in rows if r.get("error")]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
