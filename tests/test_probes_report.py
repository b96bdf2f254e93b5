"""eval_probes end to end on a small synthetic set with domains: report.json, the cache on a rerun,
TensorBoard, and report.html rendered in headless Chromium."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from eval_probes.config import ProbeConfig
from eval_probes.run import run
from roseprior.probes import ProbeProtocol
from roseprior.synth import generate

pytestmark = pytest.mark.slow  # two full runs (one with UMAP) on a small synthetic set



@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("probes")
    os.environ.setdefault("NUMBA_CACHE_DIR", str(tmp / "numba"))
    data = generate(tmp / "data", n_per_class=20, size=64, domains=["site_a", "site_c"], seed=3, progress=False,
                    defects=0.4)  # fields a pathologist would reject, for the adequacy split
    cfg = ProbeConfig(
        checkpoints=["timm:test_vit", "timm:test_convnext"],
        out_dir=str(tmp / "out"),
        cache_dir=str(tmp / "cache"),
        progress=False,
        zooms=[0.5, 2.0],
        protocol=ProbeProtocol(knn_k=[1, 5, 10], linear_c=[0.1, 1.0]),
        robustness_k=[1, 2],  # a tiny test split: larger k would span the whole balanced subsample
        umap=True,  # the one test that pays for umap's numba compile
    )
    cfg.data.root = str(data)
    cfg.data.image_size = 64
    cfg.data.split_ratios = "2:1:1"
    cfg.stain.hed_strengths = [0.05, 0.2]
    cfg.stain.white_balance = [[1.1, 1.0, 0.9]]
    cfg.stain.brightness = [0.1]
    report = run(cfg)
    # A second run with the same checkpoints and data: every feature comes from the cache.
    cfg.umap = False
    cfg.out_dir = str(tmp / "out_again")
    again = run(cfg)
    assert again["cache"]["misses"] == 0 and again["cache"]["hits"] == report["cache"]["misses"]
    assert _same_scores(again, report), "cached features must give the same report"
    return tmp / "out"


def _same_scores(a: dict, b: dict) -> bool:
    strip = lambda r: {n: {k: v for k, v in c.items() if k != "seconds"} for n, c in r["checkpoints"].items()}  # noqa: E731
    return strip(a) == strip(b)


def test_report_json_has_every_condition_probe_and_metric(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    assert set(report["checkpoints"]) == {"timm:test_vit", "timm:test_convnext"}
    assert report["data"]["domains"] == ["site_a", "site_c"]
    expected = {"clean", "stain/hed_0.05", "stain/hed_0.2", "stain/wb_1.1_1_0.9", "stain/brightness_+0.1",
                "stain/macenko->site_a", "stain/macenko->site_c", "scale/0.5", "scale/2",
                "domain/site_a->site_a", "domain/site_a->site_c", "domain/site_c->site_a", "domain/site_c->site_c",
                "domain/typical", "domain/atypical", "adequacy/assessable", "adequacy/flagged"}
    for name, result in report["checkpoints"].items():
        assert set(result["conditions"]) == expected, name
        assert result["probes"]["knn"]["k"] in (1, 5, 10) and result["probes"]["linear"]["C"] in (0.1, 1.0)
        for cond, entry in result["conditions"].items():
            assert entry["name"] == cond and entry["skipped"] is None
            shift = {"clean": False, "stain": True, "scale": True, "adequacy": False}.get(entry["family"])
            if entry["family"] == "domain":
                shift = entry["subset"] == "atypical" if entry["subset"] else entry["source_domain"] != entry["target_domain"]
            assert entry["shift"] is shift, cond
            for probe in ("knn", "knn_majority", "linear"):
                metrics = entry["scores"][probe]
                assert 0.0 <= metrics["balanced_accuracy"] <= 1.0 and 0.0 <= metrics["ece"] <= 1.0, (cond, probe)
                if entry["family"] in ("stain", "scale") or entry["subset"]:  # drops are against clean
                    base = result["conditions"]["clean"]["scores"][probe]
                    assert metrics["drop"]["balanced_accuracy"] == pytest.approx(
                        base["balanced_accuracy"] - metrics["balanced_accuracy"])
                if entry["source_domain"]:  # drops are against the in-domain a->a score
                    own = result["conditions"][f"domain/{entry['source_domain']}->{entry['source_domain']}"]
                    assert metrics["drop"]["balanced_accuracy"] == pytest.approx(
                        own["scores"][probe]["balanced_accuracy"] - metrics["balanced_accuracy"])
        ri = result["robustness_index"]
        assert set(ri) == {"1", "2"} and all(v is None or 0.0 <= v <= 1.0 for v in ri.values())
        balanced = result["robustness_index_balanced"]
        assert balanced["per_cell"] >= 1 and balanced["chance"] == 0.5 and balanced["mean"]["1"] is not None
        assert set(result["robustness_index_random_init"]["mean"]) == {"1", "2"}
        parts = [result["conditions"][f"adequacy/{s}"]["scores"]["linear"]["n"] for s in ("assessable", "flagged")]
        assert parts == [report["data"]["adequacy"]["assessable"], report["data"]["adequacy"]["flagged"]]
    assert (report_dir / "config.yaml").is_file()


def test_the_adequacy_split_flags_defective_test_images_and_no_clean_one(report_dir):
    import csv

    report = json.loads((report_dir / "report.json").read_text())
    root = Path(report["data"]["root"])
    defect = {os.path.realpath(root / r["path"]): r["defect"] for r in csv.DictReader((root / "manifest.csv").open())}
    adequacy = report["data"]["adequacy"]
    flagged = [os.path.realpath(p) for p in adequacy["flagged_images"]]
    assert adequacy["assessable"] + adequacy["flagged"] == report["data"]["splits"]["test"]
    assert len(flagged) == adequacy["flagged"] >= 1
    assert all(defect[p] != "none" for p in flagged), [defect[p] for p in flagged]  # no clean field is flagged
    assert sum(adequacy["reasons"].values()) >= len(flagged) and "stain too faint" in adequacy["reasons"]
    page = (report_dir / "report.html").read_text()
    assert "<h2>Adequacy</h2>" in page and f"flags {adequacy['flagged']} of" in page


def test_tensorboard_has_scalars_and_projector(report_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = report_dir / "tb"
    for name in ("timm_test_vit", "timm_test_convnext"):  # one TensorBoard run per checkpoint, same tags
        events = EventAccumulator(str(tb / name))
        events.Reload()
        scalars = events.Tags()["scalars"]
        assert {"summary/clean_linear", "scale/linear_balanced_accuracy", "stain/knn_balanced_accuracy",
                "robustness_index"} <= set(scalars), scalars
        assert [e.step for e in events.Scalars("scale/linear_balanced_accuracy")] == [50, 200]  # zoom x 100
    config = (tb / "projector_config.pbtxt").read_text()
    assert "timm_test_vit" in config and "timm_test_convnext" in config and "sprite" in config


@pytest.mark.browser
def test_report_html_renders_in_headless_chromium(report_dir, chromium):
    driver = chromium
    driver.get((report_dir / "report.html").resolve().as_uri())
    widths = driver.execute_script(
        "return Array.from(document.images).map(img => img.complete ? img.naturalWidth : 0)")
    rows = driver.execute_script("return document.querySelectorAll('#summary tbody tr.checkpoint').length")
    text = driver.execute_script("return document.body.innerText")
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1300, min(height + 100, 12000))
    driver.save_screenshot(str(report_dir / "report_screenshot.png"))
    # Curves (stain, scale), domain matrix, reliability diagrams, UMAP: every one decoded.
    assert len(widths) == 5 and all(w > 0 for w in widths), widths
    assert rows == 2
    assert "timm:test_convnext" in text and "robustness index" in text.lower() and "UMAP failed" not in text
    assert (report_dir / "report_screenshot.png").stat().st_size > 10_000
