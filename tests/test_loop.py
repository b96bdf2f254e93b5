"""The shared training loop (``roseprior.loop``): checkpoints that never unpickle, exact resume of a
killed finetune, a non-finite loss agreed across real processes, and run folders that refuse to be
taken over by another run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import kill_at_first_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CONFIG = str(REPO / "configs" / "finetune" / "msht_tiny_cpu.yaml")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from roseprior.synth import generate

    return generate(tmp_path_factory.mktemp("loop_data") / "set", n_per_class=10, size=64, seed=2, progress=False)


def finetune_args(data: Path, out: Path, **extra: object) -> list[str]:
    values: dict[str, object] = {
        "data.root": data, "out_dir": out, "data.image_size": 64, "train.batch_size": 4, "train.epochs": 4,
        "train.lr": 1e-3, "checkpoint.every_steps": 2, "cam.enabled": "false", "augment.hed": 0.05,
        "train.log_every": 1,
    }
    values.update(extra)
    return ["--config", CONFIG, *(f"{k}={v}" for k, v in values.items())]


def finetune_in_process(args: list[str]) -> int:
    from finetune.__main__ import main

    torch.set_num_threads(1)
    return main(args)


def newest_model(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(sorted((out / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# State on disk: safetensors + JSON, never a pickle
# ---------------------------------------------------------------------------------------------


def test_state_round_trips_without_pickle(tmp_path: Path) -> None:
    from pytorch_optimizer import SAM

    from roseprior.checkpoint import load_state, save_state

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = SAM([{"params": list(model.parameters()), "names": ["a", "b", "c", "d"], "part": "all"}],
                    torch.optim.Adam, rho=0.05, lr=1e-2, betas=(0.8, 0.95))
    for _ in range(2):
        model(torch.randn(8, 4)).square().mean().backward()
        optimizer.first_step(zero_grad=True)
        model(torch.randn(8, 4)).square().mean().backward()
        optimizer.second_step(zero_grad=True)
    state = {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "pair": (1, "x"), "none": None}
    save_state(state, tmp_path, "state")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    loaded = load_state(tmp_path, "state")
    assert loaded["pair"] == (1, "x") and loaded["none"] is None and torch.equal(loaded["rng"], state["rng"])
    restored = SAM(list(model.parameters()), torch.optim.Adam, rho=0.05, lr=1e-2)
    restored.load_state_dict(loaded["optimizer"])
    assert restored.param_groups[0]["betas"] == (0.8, 0.95) and restored.param_groups[0]["names"] == ["a", "b", "c", "d"]
    for p in model.parameters():  # the base optimizer's moments, through SAM's shared state
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(restored.base_optimizer.state[p][key], optimizer.state[p][key])


# ---------------------------------------------------------------------------------------------
# finetune resumes exactly after SIGKILL
# ---------------------------------------------------------------------------------------------


def test_finetune_resumes_after_sigkill_to_the_same_weights(tiny_data: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert finetune_in_process(finetune_args(tiny_data, reference)) == 0

    killed = tmp_path / "killed"
    kill_at_first_checkpoint([sys.executable, "-m", "finetune", *finetune_args(tiny_data, killed)], killed, ENV, REPO)
    assert not (killed / "metrics.json").exists()

    assert finetune_in_process(finetune_args(tiny_data, killed)) == 0  # the same command resumes
    a, b = newest_model(reference), newest_model(killed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    ref_metrics, resumed = (json.loads((d / "metrics.json").read_text()) for d in (reference, killed))
    assert resumed["steps"] == ref_metrics["steps"] == 12
    assert resumed["test"] == ref_metrics["test"] and resumed["best_epoch"] == ref_metrics["best_epoch"]
    assert not list(killed.rglob("*.pkl")) and not list(killed.rglob("*.bin"))  # nothing pickled anywhere


def test_a_run_folder_refuses_another_run_and_is_left_untouched(tiny_data: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from roseprior.synth import generate

    out = tmp_path / "run"
    assert finetune_in_process(finetune_args(tiny_data, out, **{"train.epochs": 1})) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    other = generate(tmp_path / "other", n_per_class=10, size=64, seed=9, progress=False)
    capsys.readouterr()
    assert finetune_in_process(finetune_args(other, out, **{"train.epochs": 1})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds another run (data:" in err[0] and "checkpoint.resume=never" in err[0]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # config.yaml included
    # The explicit way out starts over in the same folder.
    first = json.loads((out / "run.json").read_text())["identity"]["data"]
    assert finetune_in_process(finetune_args(other, out, **{"train.epochs": 1, "checkpoint.resume": "never"})) == 0
    assert json.loads((out / "run.json").read_text())["identity"]["data"] != first


# ---------------------------------------------------------------------------------------------
# A non-finite loss on one process stops every process
# ---------------------------------------------------------------------------------------------

NAN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from accelerate import Accelerator
    from roseprior.loop import NonFiniteLoss, check_finite
    from roseprior.stage import close_process_group

    def main():
        accelerator = Accelerator(cpu=True)
        model = accelerator.prepare(torch.nn.Linear(3, 1))
        outcome = "trained"
        try:
            for step in range(3):
                x = torch.ones(2, 3) * (float("nan") if step == 1 and accelerator.process_index == 1 else 1.0)
                loss = model(x).square().mean()
                check_finite(accelerator, loss)
                accelerator.backward(loss)  # an all-reduce: a process that stopped alone would leave this one waiting
        except NonFiniteLoss as err:
            outcome = f"stopped at step {step}: {err}"
        with open(f"{sys.argv[1]}/rank{accelerator.process_index}.json", "w") as fh:
            json.dump(outcome, fh)
        accelerator.wait_for_everyone()

    main()
    close_process_group()  # as every stage's entry does: a group left to the exit can abort the process
    """
)


def test_a_non_finite_loss_on_one_process_stops_all_of_them(tmp_path: Path) -> None:
    script = tmp_path / "nan.py"
    script.write_text(NAN_SCRIPT)
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)],
                          env=ENV, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert outcomes == ["stopped at step 1: loss is not finite on another process", "stopped at step 1: loss is nan"]


def test_domain_batches_hold_one_domain_each_and_cover_every_image_once() -> None:
    import numpy as np

    from roseprior.loop import domain_batches

    domains = ["a"] * 37 + ["b"] * 50 + [None] * 13
    order = domain_batches(seed=3, domains=domains, batch_size=8)
    first = order(len(domains), 0)
    assert sorted(first.tolist()) == list(range(len(domains)))  # a permutation
    full = [first[i : i + 8] for i in range(0, 8 * (4 + 6 + 1), 8)]  # 4 + 6 + 1 whole batches come first
    assert all(len({domains[j] for j in batch}) == 1 for batch in full)
    assert {domains[int(b[0])] for b in full} == {"a", "b", None}
    assert np.array_equal(first, order(len(domains), 0)) and not np.array_equal(first, order(len(domains), 1))


_PAGE_FAULTS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from roseprior.loop import keep_freed_memory
    keep_freed_memory()
faults = []
for _ in range(24):  # a step's fresh 48 MiB tensor, written, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(12 << 20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[1:]), max(faults[-4:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator is what keep_freed_memory tunes")
def test_kept_memory_is_not_page_faulted_in_again_at_every_step() -> None:
    def faults(mode: str) -> tuple[int, int]:
        """(fewest faults of any step after the first, most of the last four steps)."""
        result = subprocess.run([sys.executable, "-c", _PAGE_FAULTS, mode], capture_output=True, text=True,
                                check=True, cwd=Path(__file__).resolve().parents[1])
        fewest, last = map(int, result.stdout.split()[-2:])
        return fewest, last

    pages = (48 << 20) // 4096
    assert faults("default")[0] > pages // 2  # glibc maps a block this large afresh at every step
    assert faults("keep")[1] < pages // 20  # kept in the heap: once its free blocks have merged, steps reuse them
