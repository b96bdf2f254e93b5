"""`roseprior demo`: its summary of the probe report, and its command-line front."""

from __future__ import annotations

import json

from roseprior.cli import main
from roseprior.demo import summarize


def _result(name: str, family: str, shift: bool, bacc: float) -> dict:
    from eval_probes.results import ConditionResult, ProbeScore

    scores = {p: ProbeScore(bacc, None, None, None, 10) for p in ("knn", "linear")}
    return ConditionResult(name, family, shift, scores).to_json()


def test_summary_reports_clean_and_the_worst_real_shift(tmp_path):
    conditions = [("clean", "clean", False, 0.9), ("stain/hed_0.2", "stain", True, 0.7),
                  ("scale/0.5", "scale", True, 0.6),
                  ("domain/site_a->site_a", "domain", False, 0.1),  # in-domain reference: not a shift
                  ("domain/site_a->site_b", "domain", True, 0.65)]
    report = {"checkpoints": {"pretrained": {"conditions": {c[0]: _result(*c) for c in conditions}}}}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    (line,) = summarize(path)
    assert line.split()[0] == "pretrained"
    assert "clean 0.900" in line and "worst 0.600 (scale/0.5)" in line


def test_demo_help_names_the_chain(capsys):
    try:
        main(["demo", "--help"])
    except SystemExit as stop:
        assert stop.code == 0
    out = capsys.readouterr().out
    for word in ("pretrain", "finetune", "probes", "--data", "--group-by"):
        assert word in out


def test_demo_on_a_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["demo", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err


def test_step_budgets_become_epochs_for_the_data_at_hand():
    from roseprior.demo import CPU_RECIPE

    assert CPU_RECIPE.epochs(380, 336) == ["train.epochs=18", "train.batch_size=16"]
    assert CPU_RECIPE.epochs(110, 3543)[0] == "train.epochs=1"  # never zero epochs
    assert CPU_RECIPE.epochs(None, 100) == []
