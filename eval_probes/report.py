"""The human-facing outputs: one self-contained report.html and TensorBoard scalars + projector.

The page embeds every figure as a base64 PNG (matplotlib, Agg), so it can be mailed or archived
as a single file and opened offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from roseprior.checkpoint import atomic_write_text

if TYPE_CHECKING:
    from eval_probes.config import ProbeConfig
    from eval_probes.data import ProbeData
    from eval_probes.run import CheckpointRun

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).parent / "templates" / "report.html"
PROBE_LABELS = {"knn": "kNN (weighted)", "knn_majority": "kNN (majority)", "linear": "linear"}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DASHES = ("-", "--", "-.", ":")


# ---------------------------------------------------------------------------------------------
# Numbers the page and TensorBoard share
# ---------------------------------------------------------------------------------------------


def _ba(entry: dict[str, Any] | None, probe: str) -> float | None:
    """Balanced accuracy of ``probe`` in one condition's result (None when skipped or absent)."""
    score = ((entry or {}).get("scores") or {}).get(probe)
    return score.get("balanced_accuracy") if score else None


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def domain_cell(conds: dict[str, Any], source: str, target: str) -> dict[str, Any] | None:
    """The domain-transfer result fitted on ``source`` and scored on ``target``."""
    return next((c for c in conds.values() if c["family"] == "domain" and c.get("source_domain") == source
                 and c.get("target_domain") == target), None)


def _ri_k(by_k: dict[str, float | None]) -> str | None:
    """k = 20 (PathoROB's choice) when the test set allows it, else the largest k that has a value."""
    if by_k.get("20") is not None:
        return "20"
    usable = [k for k, v in by_k.items() if v is not None]
    return max(usable, key=int) if usable else None


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per checkpoint, ranked by mean linear-probe balanced accuracy over clean, stain and scale."""
    rows = []
    for name, result in report["checkpoints"].items():
        conds = result["conditions"].values()
        by_family = {f: [c for c in conds if c["family"] == f and c["shift"]] for f in ("stain", "scale", "domain")}
        row: dict[str, Any] = {"name": name, "test_overlap": (result.get("test_overlap") or {}).get("test_images", 0)}
        for probe in ("knn", "linear"):
            row[f"clean_{probe}"] = _ba(result["conditions"].get("clean"), probe)
            clean_score = ((result["conditions"].get("clean") or {}).get("scores") or {}).get(probe) or {}
            row[f"clean_{probe}_ci"] = (clean_score.get("ci95") or {}).get("balanced_accuracy")
            row[f"stain_{probe}"] = _mean([_ba(c, probe) for c in by_family["stain"]])
            row[f"scale_{probe}"] = _mean([_ba(c, probe) for c in by_family["scale"]])
            row[f"worst_{probe}"] = min((b for b in (_ba(c, probe) for c in by_family["stain"] + by_family["scale"])
                                         if b is not None), default=None)
            row[f"atypical_{probe}"] = _mean([_ba(c, probe) for c in by_family["domain"] if c["subset"] == "atypical"])
            row[f"cross_domain_{probe}"] = _mean([_ba(c, probe) for c in by_family["domain"] if c["source_domain"]])
        balanced = (result.get("robustness_index_balanced") or {}).get("mean") or {}
        row["ri_k"] = _ri_k(balanced)
        row["ri"] = balanced.get(row["ri_k"]) if row["ri_k"] else None
        reference = (result.get("robustness_index_random_init") or {}).get("mean") or {}
        row["ri_random_init"] = reference.get(row["ri_k"]) if row["ri_k"] else None
        row["rank_score"] = _mean([row["clean_linear"], row["stain_linear"], row["scale_linear"]])
        rows.append(row)
    rows.sort(key=lambda r: -(r["rank_score"] if r["rank_score"] is not None else -1.0))
    return rows


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def figure_png(fig: Any) -> str:
    """``fig`` as base64 PNG, closed: for a page that carries its figures (this report, the shift benchmark's)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def figure_html(b64: str, caption: str) -> str:
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _curve_points(conds: dict[str, Any], conditions: list[dict[str, Any]], family: str, probe: str,
                  clean_x: float) -> tuple[list[float], list[float]]:
    points = [(clean_x, _ba(conds.get("clean"), probe))]
    for c in conditions:
        if c["family"] == family and c["value"] is not None:
            points.append((c["value"], _ba(conds.get(c["name"]), probe)))
    points = sorted((x, y) for x, y in points if y is not None)
    return [p[0] for p in points], [p[1] for p in points]


def curves_figure(report: dict[str, Any], family: str, xlabel: str, clean_x: float, log_x: bool = False) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    names = list(report["checkpoints"])
    for ax, probe in zip(axes, ("knn", "linear"), strict=True):
        for i, name in enumerate(names):
            xs, ys = _curve_points(report["checkpoints"][name]["conditions"], report["conditions"], family, probe,
                                   clean_x)
            # Equal curves must not hide each other: each checkpoint gets its own marker and dash, and a
            # small sideways shift (a fraction of the gap between conditions; the values are unchanged).
            shift = (i - (len(names) - 1) / 2) * 0.012
            xs = [x * 2 ** shift for x in xs] if log_x else [x + shift * 0.25 for x in xs]
            ax.plot(xs, ys, marker=MARKERS[i % len(MARKERS)], linestyle=DASHES[i % len(DASHES)], label=name,
                    alpha=0.85, markersize=6)
        if log_x:
            ax.set_xscale("log", base=2)
            ax.set_xticks([0.5, 0.75, 1, 1.5, 2])
            ax.get_xaxis().set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_title(PROBE_LABELS[probe])
        ax.set_xlabel(xlabel)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("balanced accuracy (test)")
    axes[-1].legend(fontsize=8, loc="lower left")
    return figure_png(fig)


def domain_matrix_figure(report: dict[str, Any], domains: list[str], probe: str = "linear") -> str:
    import matplotlib.pyplot as plt

    names = list(report["checkpoints"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names) + 1.0, 3.4), squeeze=False)
    fig.subplots_adjust(wspace=0.35)
    for col, (ax, name) in enumerate(zip(axes[0], names, strict=True)):
        conds = report["checkpoints"][name]["conditions"]
        matrix = np.full((len(domains), len(domains)), np.nan)
        for i, a in enumerate(domains):
            for j, b in enumerate(domains):
                value = _ba(domain_cell(conds, a, b), probe)
                matrix[i, j] = np.nan if value is None else value
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="RdYlGn")
        for i in range(len(domains)):
            for j in range(len(domains)):
                text = "n/a" if np.isnan(matrix[i, j]) else f"{matrix[i, j]:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(domains)), domains, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(domains)), domains if col == 0 else [], fontsize=8)
        ax.set_xlabel("test domain")
        if col == 0:
            ax.set_ylabel("train domain")
        ax.set_title(name, fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label=f"balanced accuracy ({PROBE_LABELS[probe]})")
    return figure_png(fig)


def reliability_figure(runs: list[CheckpointRun], y_test: np.ndarray) -> str:
    import matplotlib.pyplot as plt

    from roseprior.metrics import reliability_bins

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for ax, probe in zip(axes, ("knn", "linear"), strict=True):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        for run in runs:
            bins = [b for b in reliability_bins(y_test, run.clean_probs[probe], n_bins=15) if b["count"]]
            ece = run.result["conditions"]["clean"]["scores"][probe]["ece"]
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o",
                    label=f"{run.name} (ECE {ece:.3f})" if ece is not None else run.name)
        ax.set_title(PROBE_LABELS[probe])
        ax.set_xlabel("confidence")
        ax.set_xlim(0.45, 1.01)
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("accuracy")
    return figure_png(fig)


def umap_embedding(feats: np.ndarray, seed: int) -> np.ndarray:
    """2-D UMAP of L2-normalised features (cosine geometry, as the kNN sees them)."""
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "roseprior" / "numba"))
    import umap

    from roseprior.knn import l2_normalize

    n_neighbors = max(2, min(15, len(feats) - 1))
    reducer = umap.UMAP(n_neighbors=n_neighbors, min_dist=0.1, random_state=seed, n_jobs=1)
    return reducer.fit_transform(l2_normalize(feats))


def umap_figure(runs: list[CheckpointRun], data: ProbeData, seed: int) -> str:
    import matplotlib.pyplot as plt

    y = data.labels("test")
    domains = data.domain_of("test") if data.domains else None
    cols = 2 if domains is not None else 1
    fig, axes = plt.subplots(len(runs), cols, figsize=(4.2 * cols, 3.8 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs, strict=True):
        xy = umap_embedding(run.test_feats, seed)
        for index, name in enumerate(data.classes):
            m = y == index
            row[0].scatter(xy[m, 0], xy[m, 1], s=12, label=name)
        row[0].set_title(f"{run.name}: class", fontsize=9)
        row[0].legend(fontsize=7)
        if domains is not None:
            for name in data.domains:
                m = domains == name
                row[1].scatter(xy[m, 0], xy[m, 1], s=12, label=name)
            row[1].set_title(f"{run.name}: domain", fontsize=9)
            row[1].legend(fontsize=7)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    return figure_png(fig)


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.000"


def _interval(ci: list[float] | None) -> str:
    return f"<br><span class='ci'>[{_fmt(ci[0], 2)}, {_fmt(ci[1], 2)}]</span>" if ci else ""


def summary_table(rows: list[dict[str, Any]], has_domains: bool) -> str:
    columns = [("clean", "clean"), ("stain", "stain mean"), ("scale", "scale mean"), ("worst", "worst shift")]
    if has_domains:
        columns += [("cross_domain", "cross-domain mean"), ("atypical", "atypical domain")]
    head = ["<th class='name'>rank</th><th class='name'>checkpoint</th>"]
    for _, label in columns:
        head.append(f"<th>{label}<br>kNN</th><th>{label}<br>linear</th>")
    if has_domains:
        head.append("<th>robustness index<br>(balanced; k)</th><th>same arch.<br>random init</th>")
    body = []
    for rank, row in enumerate(rows, start=1):
        seen = (f"<br><span class='bad'>trained on {row['test_overlap']} test images: not held-out</span>"
                if row["test_overlap"] else "")
        cells = [f"<td class='name'>{rank}</td><td class='name'>{html.escape(row['name'])}{seen}</td>"]
        for key, _ in columns:
            cells.append(f"<td>{_fmt(row[f'{key}_knn'])}{_interval(row.get(f'{key}_knn_ci'))}</td>"
                         f"<td>{_fmt(row[f'{key}_linear'])}{_interval(row.get(f'{key}_linear_ci'))}</td>")
        if has_domains:
            cells.append(f"<td>{_fmt(row['ri'])}<span class='ci'> k={row['ri_k'] or '–'}</span></td>"
                         f"<td>{_fmt(row['ri_random_init'])}</td>")
        body.append(f"<tr class='checkpoint'>{''.join(cells)}</tr>")
    return (f"<table id='summary'><thead><tr>{''.join(head)}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def adequacy_section(report: dict[str, Any]) -> str:
    """How many test images ``roseprior.adequacy`` flags, and each checkpoint's probes on assessable vs flagged."""
    counts = report["data"].get("adequacy")
    if not counts:
        return "<p>Adequacy split switched off (adequacy_split: false).</p>"
    total = counts["assessable"] + counts["flagged"]
    reasons = ", ".join(f"{html.escape(k)} {v}" for k, v in sorted(counts["reasons"].items(), key=lambda kv: -kv[1]))
    head = ("<tr><th class='name'>checkpoint</th><th>assessable<br>kNN</th><th>flagged<br>kNN</th>"
            "<th>assessable<br>linear</th><th>flagged<br>linear</th></tr>")
    rows = []
    for name, result in report["checkpoints"].items():
        cells = [f"<td class='name'>{html.escape(name)}</td>"]
        for probe in ("knn", "linear"):
            for subset in ("assessable", "flagged"):
                entry = result["conditions"].get(f"adequacy/{subset}") or {}
                score = (entry.get("scores") or {}).get(probe) or {}
                cells.append(f"<td>{_fmt(score.get('balanced_accuracy'))}"
                             f"{_interval((score.get('ci95') or {}).get('balanced_accuracy'))}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (f"<p><code>roseprior adequacy</code> flags {counts['flagged']} of {total} test images as not assessable"
            f"{' (' + reasons + ')' if reasons else ''}: the fields <code>finetune.predict</code> answers "
            "<i>not assessable</i> for. Balanced accuracy of the clean-fitted probes on each part; a probe that "
            "is right on flagged images reads something a pathologist would not judge from.</p>"
            f"<table>{head}{''.join(rows)}</table>")


def detail_table(name: str, result: dict[str, Any]) -> str:
    probes = ("knn", "knn_majority", "linear")
    head = "<tr><th class='name'>condition</th>" + "".join(
        f"<th>{PROBE_LABELS[p]}<br>bal. acc.</th><th>drop</th><th>AUROC</th><th>F1</th><th>ECE</th>" for p in probes
    ) + "</tr>"
    rows = []
    for cond, entry in result["conditions"].items():
        if entry["skipped"]:
            rows.append(f"<tr><td class='name'>{html.escape(cond)}</td>"
                        f"<td class='name' colspan='{5 * len(probes)}'>skipped: {html.escape(entry['skipped'])}</td></tr>")
            continue
        cells = [f"<td class='name'>{html.escape(cond)}</td>"]
        for p in probes:
            m = entry["scores"][p]
            drop = (m.get("drop") or {}).get("balanced_accuracy")
            css = "" if drop is None else (" class='bad'" if drop > 0.05 else (" class='good'" if drop < -0.05 else ""))
            ci = m.get("ci95") or {}
            cells.append(f"<td>{_fmt(m['balanced_accuracy'])}{_interval(ci.get('balanced_accuracy'))}</td>"
                         f"<td{css}>{_fmt(drop)}</td><td>{_fmt(m['auroc'])}{_interval(ci.get('auroc'))}</td>"
                         f"<td>{_fmt(m['f1'])}</td><td>{_fmt(m['ece'])}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    probes_text = json.dumps(result["probes"]["knn"]["k"]), f"{result['probes']['linear']['C']:g}"
    ri = result.get("robustness_index_balanced")
    ri_text = ("; robustness index (class x domain-balanced, mean ± sd over draws) " + ", ".join(
        f"k={k}: {_fmt(v)} ± {_fmt(ri['std'][k], 2)}" for k, v in ri["mean"].items())
        + f"; {ri['per_cell']} images per class and domain; random neighbours would give {_fmt(ri['chance'], 2)}"
    ) if ri else ""
    return (f"<h3>{html.escape(name)}</h3><p class='meta'>{html.escape(result['spec'])} · embed dim "
            f"{result['embed_dim']} · chosen k = {probes_text[0]}, C = {probes_text[1]}{ri_text}</p>"
            f"<table class='detail'>{head}{''.join(rows)}</table>")


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------


def write_html(path: Path, report: dict[str, Any], runs: list[CheckpointRun], data: ProbeData,
               cfg: ProbeConfig) -> Path:
    has_domains = len(data.domains) >= 2
    rows = summary_rows(report)
    notes = "".join(f"<div class='note'>{html.escape(n)}</div>" for n in report["notes"])
    notes += "".join(f"<div class='note warning'>warning: {html.escape(w)}</div>" for w in report.get("warnings", []))
    splits = report["data"]["splits"]
    meta = (f"data: {html.escape(str(data.root))} · classes {', '.join(data.classes)} (positive "
            f"{html.escape(report['data']['positive_class'])}) · train/val/test {splits['train']}/{splits['val']}/"
            f"{splits['test']} ({html.escape(data.split_source)}) · domains: "
            f"{html.escape(', '.join(data.domains) or 'none')} · image size {cfg.data.image_size} px")
    shifted = " Checkpoints are drawn slightly apart sideways, so equal curves stay visible."
    curves = figure_html(curves_figure(report, "stain", "HED jitter strength (0 = clean)", 0.0),
                         "Balanced accuracy against HED stain-jitter strength (Tellez et al.: light 0.05, strong 0.2)."
                         + shifted)
    curves += figure_html(curves_figure(report, "scale", "zoom (1x = clean)", 1.0, log_x=True),
                          "Balanced accuracy against zoom (same output size; reflected, never constant, borders)." + shifted)
    if has_domains and cfg.domain_transfer:
        domain = figure_html(domain_matrix_figure(report, data.domains),
                             "Linear probe fitted on one domain's clean train images (rows), scored on each domain's "
                             "test images (columns).")
        assoc = next((c["notes"].get("train_class_domain_association") for r in report["checkpoints"].values()
                      for c in r["conditions"].values() if c["family"] == "domain" and c.get("subset")
                      and not c["skipped"]), None)
        if assoc is not None:
            domain += (f"<p>Class-domain association in the train split (Cramér's V): {assoc:.2f}. "
                       "'atypical domain' scores the test images whose domain is not their class's most "
                       "frequent one in train: a representation that encodes the domain in place of the "
                       "class loses accuracy there.</p>")
    elif has_domains:
        domain = "<p>Domain transfer switched off (domain_transfer: false).</p>"
    else:
        domain = "<p>The data has no domain labels (a <code>domain</code> manifest column), so no domain analysis.</p>"
    reliability = figure_html(reliability_figure(runs, data.labels("test")),
                              "Reliability diagrams of the clean test split (15 equal-width confidence bins).")
    if cfg.umap:
        try:
            umap_html = figure_html(umap_figure(runs, data, cfg.seed),
                                    "UMAP of each checkpoint's clean test features, by class and by domain.")
        except Exception as err:  # UMAP is a view, not a result: a failure must not lose the report
            log.warning("UMAP failed: %s", err)
            umap_html = f"<p>UMAP failed: {html.escape(str(err))}</p>"
    else:
        umap_html = "<p>UMAP switched off (umap: false).</p>"
    intro = ("Balanced accuracy on the test split; checkpoints ranked by the linear probe's mean over the clean, "
             "stain and scale conditions. Probes are fitted on clean train images only; k and C are chosen on "
             "clean validation images.")
    page = Template(TEMPLATE.read_text()).substitute(
        title=html.escape(Path(cfg.out_dir).name),
        meta=meta,
        notes=notes,
        summary_intro=intro,
        summary_table=summary_table(rows, has_domains),
        curves=curves,
        domain=domain,
        adequacy=adequacy_section(report),
        reliability=reliability,
        umap=umap_html,
        details="".join(detail_table(name, result) for name, result in report["checkpoints"].items()),
        config=html.escape(yaml.safe_dump(report["config"], sort_keys=False)),
        fingerprints=html.escape(json.dumps({"data": report["data"]["fingerprints"],
                                             "checkpoints": {n: r["fingerprint"]
                                                             for n, r in report["checkpoints"].items()}},
                                            indent=2)),
    )
    return atomic_write_text(path, page)


# ---------------------------------------------------------------------------------------------
# TensorBoard
# ---------------------------------------------------------------------------------------------


def write_tensorboard(tb_dir: Path, report: dict[str, Any], runs: list[CheckpointRun], data: ProbeData,
                      projector: bool = True) -> None:
    """Headline scalars per checkpoint, and the clean test features in the embedding projector."""
    from torch.utils.tensorboard import SummaryWriter

    # One TensorBoard run per checkpoint (tb/<name>/): the same tags, so runs overlay in one chart.
    for row in summary_rows(report):
        run_writer = SummaryWriter(str(tb_dir / _tb_name(row["name"])))
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                run_writer.add_scalar(f"summary/{key}", value, 0)
        result = report["checkpoints"][row["name"]]
        for k, value in ((result.get("robustness_index_balanced") or {}).get("mean") or {}).items():
            if value is not None:
                run_writer.add_scalar("robustness_index", value, int(k))  # step = k neighbours
        for cond in report["conditions"]:  # the curves, step = the shift (HED strength x 1000, zoom x 100)
            if cond["value"] is None:
                continue
            scale = 1000 if cond["family"] == "stain" else 100
            for probe in ("knn", "linear"):
                value = _ba(result["conditions"].get(cond["name"]), probe)
                if value is not None:
                    run_writer.add_scalar(f"{cond['family']}/{probe}_balanced_accuracy", value,
                                          int(round(cond["value"] * scale)))
        run_writer.close()
    writer = SummaryWriter(str(tb_dir))
    try:
        if projector:
            labels = data.labels("test")
            domains = data.domain_of("test")
            metadata = [[data.classes[y], d or "-"] for y, d in zip(labels, domains, strict=True)]
            thumbnails = _thumbnails(data.splits["test"])
            for run in runs:
                writer.add_embedding(run.test_feats, metadata=metadata, metadata_header=["class", "domain"],
                                     label_img=thumbnails, tag=_tb_name(run.name))
    finally:
        writer.close()


def _tb_name(name: str) -> str:
    return name.replace("/", "_").replace(":", "_")


def _thumbnails(samples: list[Any], size: int = 32, max_images: int = 2000) -> Any:
    """Small copies of the test images for the projector's sprite (skipped for big test sets: the
    sprite is one image of all of them)."""
    from roseprior.data import ImageDataset

    if len(samples) > max_images:
        return None
    return ImageDataset(samples, image_size=size).stacked().float().div_(255.0)
