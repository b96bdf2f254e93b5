"""SAM under real data parallelism: 2 CPU processes (gloo), launched with torchrun.

- SAM's first backward (under ``accelerator.no_sync``) all-reduces nothing; its second does, and
  the processes end the step with identical weights.
- With ``sam: off`` the 2-process run (batch b each) matches a 1-process run on the doubled batch.

All-reduces are counted with a DDP communication hook. The backbone is msht_tiny with GroupNorm:
BatchNorm statistics are per process without SyncBatchNorm (which needs a GPU), so a BN model
could not match the 1-process run.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).parents[1]

SCRIPT = textwrap.dedent(
    '''
    import json
    import sys

    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from safetensors.torch import save_file
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    import backbones
    from finetune.model import Classifier
    from finetune.sam import build_optimizer, step_for

    PER_PROCESS = 2  # images per process and step
    STEPS = 2


    def data(step, world, rank):
        """Step ``step``'s global batch of 4 images; this process's slice of it."""
        g = torch.Generator().manual_seed(100 + step)
        images = torch.rand(2 * PER_PROCESS, 3, 64, 64, generator=g)
        targets = torch.tensor([0, 1, 1, 0])
        per = len(images) // world
        return images[rank * per : (rank + 1) * per], targets[rank * per : (rank + 1) * per]


    def build(accelerator, sam):
        torch.manual_seed(0)
        model = Classifier(backbones.create("msht_tiny", norm="gn", img_size=64))
        # SGD: Adam divides by sqrt(v), which turns float-rounding differences in near-zero
        # gradients into visible weight differences; the sync under test is the same either way.
        opt = build_optimizer([{"params": list(model.parameters())}], "sgd", sam, rho=0.05, lr=0.05)
        return accelerator.prepare(model, opt)


    def flat(model):
        return torch.cat([p.detach().flatten() for p in model.parameters()])


    def train(accelerator, sam, count=None):
        model, opt = build(accelerator, sam)
        world, rank = accelerator.num_processes, accelerator.process_index
        reduces, per_backward = {"n": 0}, []
        if world > 1:
            def counting_hook(state, bucket):
                reduces["n"] += 1
                return allreduce_hook(state, bucket)

            model.register_comm_hook(None, counting_hook)
            backward = accelerator.backward

            def recording_backward(loss, **kw):
                before = reduces["n"]
                backward(loss, **kw)
                per_backward.append(reduces["n"] - before)

            accelerator.backward = recording_backward
        for step in range(STEPS):
            images, targets = data(step, world, rank)
            step_for(sam)(model, images, targets, torch.nn.functional.cross_entropy, opt, accelerator)
        if world > 1:
            accelerator.backward = backward
        return flat(accelerator.unwrap_model(model)), per_backward


    def main(out):
        torch.set_num_threads(1)
        accelerator = Accelerator(cpu=True, mixed_precision="no")
        result = {"world": accelerator.num_processes}
        for sam in ("sam", "off"):
            params, per_backward = train(accelerator, sam)
            gathered = [torch.zeros_like(params) for _ in range(accelerator.num_processes)]
            dist.all_gather(gathered, params)
            result[sam] = {
                "per_backward": per_backward,
                "max_diff_between_processes": float((gathered[0] - gathered[-1]).abs().max()),
            }
            if accelerator.is_main_process:
                save_file({"params": params}, f"{out}/{sam}_params.safetensors")
        if accelerator.is_main_process:
            with open(f"{out}/result.json", "w") as fh:
                json.dump(result, fh)


    if __name__ == "__main__":
        from roseprior.stage import close_process_group

        main(sys.argv[1])
        close_process_group()
    '''
)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> tuple[dict, Path, Path]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found next to the Python interpreter")
    out = tmp_path_factory.mktemp("ddp")
    script = out / "ddp_script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(out)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "result.json").read_text()), out, script


def test_sam_first_backward_has_no_all_reduce_second_has(two_process_run):
    result, _, _ = two_process_run
    assert result["world"] == 2
    per_backward = result["sam"]["per_backward"]
    assert len(per_backward) == 4  # 2 steps x 2 backward passes
    first, second = per_backward[0::2], per_backward[1::2]
    assert first == [0, 0], f"the first (no_sync) backward all-reduced: {per_backward}"
    assert all(n > 0 for n in second), f"the second backward did not all-reduce: {per_backward}"
    # Synced second gradients: both processes take the same step from the same weights.
    assert result["sam"]["max_diff_between_processes"] == 0.0


def test_sam_off_is_one_synced_pass(two_process_run):
    result, _, _ = two_process_run
    per_backward = result["off"]["per_backward"]
    assert len(per_backward) == 2 and all(n > 0 for n in per_backward)
    assert result["off"]["max_diff_between_processes"] == 0.0


def test_two_processes_match_one_process_with_doubled_batch(two_process_run):
    from accelerate import Accelerator

    _, out, script = two_process_run
    namespace = runpy.run_path(str(script), run_name="ddp_script")
    torch.set_num_threads(2)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    assert accelerator.num_processes == 1
    single, _ = namespace["train"](accelerator, "off")
    double = load_file(out / "off_params.safetensors")["params"]
    start, _ = namespace["build"](accelerator, "off")
    moved = (single - namespace["flat"](start)).abs().max()
    assert moved > 1e-4  # the runs did train
    torch.testing.assert_close(double, single, rtol=1e-4, atol=2e-5)
