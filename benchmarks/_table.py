"""Result rows of the benchmarks and the one table they print as.

A row compares two numbers measured in the same run on the same device: ``ours`` against
``reference``, with their ratio and what the ratio should be. Rows are plain dicts so that they
go through ``--json`` and between processes unchanged.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

Row = dict[str, Any]

COLUMNS = ("benchmark", "compared", "ours", "reference", "ratio", "expected", "device")


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), or what ``platform`` knows elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_device(cuda: bool, threads: int | None = None) -> str:
    """``cuda: <GPU name>`` or ``cpu: <model>, N threads``: what a row's numbers were measured on."""
    if cuda:
        import torch

        return f"cuda: {torch.cuda.get_device_name()}"
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    return f"cpu: {cpu_model()}, {threads} thread{'s' if threads != 1 else ''}"


def row(benchmark: str, compared: str, ours: float, reference: float, unit: str, ratio: float, ratio_of: str,
        expected: str, device: str, detail: str = "") -> Row:
    """One comparison; ``ratio_of`` says which way it was taken (e.g. ``ours / lightly``)."""
    return {"benchmark": benchmark, "compared": compared, "ours": ours, "reference": reference, "unit": unit,
            "ratio": ratio, "ratio_of": ratio_of, "expected": expected, "device": device, "detail": detail,
            "error": None}


def error_row(benchmark: str, error: str) -> Row:
    return {"benchmark": benchmark, "compared": "", "ours": None, "reference": None, "unit": "", "ratio": None,
            "ratio_of": "", "expected": "", "device": "", "detail": "", "error": error}


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value < 1 else f"{value:.2f}"


def _cells(r: Row) -> list[str]:
    if r.get("error"):
        return [r["benchmark"], f"FAILED: {r['error']}", "", "", "", "", r.get("device", "")]
    unit = f" {r['unit']}" if r["unit"] else ""
    return [r["benchmark"], r["compared"], _number(r["ours"]) + unit, _number(r["reference"]) + unit,
            f"{r['ratio']:.2f} ({r['ratio_of']})", r["expected"], r["device"]]


def format_table(rows: list[Row]) -> str:
    """Fixed-width text columns; a failed row keeps its place with the error in the 'compared' column."""
    cells = [list(COLUMNS), *(_cells(r) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS) - 1)]
    lines = []
    for i, c in enumerate(cells):
        lines.append("  ".join(v.ljust(w) for v, w in zip(c[:-1], widths, strict=True)) + "  " + c[-1])
        if i == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(line.rstrip() for line in lines)
