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


def test_a_data_tool_loads_its_own_module_and_the_help_lists_every_tool():
    """`roseprior split` and `synth` run without torch (3-6 s to import, and the demo and the tests run them as
    processes); `roseprior --help` still lists every subcommand, adapt's too."""
    import subprocess
    import sys

    code = ("import sys\nfrom roseprior.cli import main\nfor argv in {argv!r}:\n    try:\n        main(argv)\n"
            "    except SystemExit:\n        pass\nprint('torch' in sys.modules)")
    for argv, loads_torch in (([["split", "--help"], ["synth", "--help"], ["scale", "--help"]], False),
                              ([["--help"]], True)):
        proc = subprocess.run([sys.executable, "-c", code.format(argv=argv)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split()[-1] == str(loads_torch), (argv, proc.stdout[-500:])
    for command in ("synth", "split", "scale", "adequacy", "adapt", "demo"):
        assert command in proc.stdout  # the full help


def test_demo_on_a_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["demo", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err


def test_step_budgets_become_epochs_for_the_data_at_hand():
    from roseprior.demo import CPU_RECIPE

    assert CPU_RECIPE.epochs(380, 336) == ["train.epochs=18", "train.batch_size=16"]
    assert CPU_RECIPE.epochs(110, 3543)[0] == "train.epochs=1"  # never zero epochs
    assert CPU_RECIPE.epochs(None, 100) == []


def test_the_quick_demo_runs_the_whole_chain_as_a_user_types_it(tmp_path):
    """`roseprior demo --quick` (the README's first command, a few steps a stage): every stage's process runs
    with the demo's own overrides, writes what the next stage reads, and the summary names all four checkpoints.
    Each stage is tested alone elsewhere; this is the wiring between them."""
    import subprocess
    import sys

    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "roseprior", "demo", "--quick", "--cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for written in ("data/manifest.csv", "split/train.csv", "pretrain/backbone.safetensors",
                    "finetune/best.safetensors", "finetune_random/best.safetensors", "probes/report.json",
                    "probes/report.html"):
        assert (out / written).is_file(), written
    summary = proc.stdout.split("Summary (linear probe balanced accuracy, clean vs worst shift):")[1]
    for name in ("random_init", "pretrained", "finetuned", "finetuned_random"):
        assert any(line.split()[:1] == [name] and " clean " in line and " worst " in line
                   for line in summary.splitlines()), summary
    assert str((out / "probes" / "report.html").resolve()) in proc.stdout


def test_the_gpu_recipe_is_a_valid_config_for_every_stage():
    """The chain a GPU runs cannot run here; its configs and overrides are still checked as each stage would."""
    from eval_probes.config import ProbeConfig
    from finetune.config import FinetuneConfig
    from pretrain.config import PretrainConfig
    from roseprior.config import load_config
    from roseprior.demo import CONFIG_DIR, GPU_RECIPE

    for schema, config, overrides in ((PretrainConfig, GPU_RECIPE.pretrain, GPU_RECIPE.pretrain_overrides),
                                      (FinetuneConfig, GPU_RECIPE.finetune, GPU_RECIPE.finetune_overrides),
                                      (ProbeConfig, GPU_RECIPE.probes, GPU_RECIPE.probe_overrides)):
        assert isinstance(load_config(schema, CONFIG_DIR / config, overrides), schema)
