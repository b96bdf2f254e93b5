"""pretrain: views keyed per sample, the CNN-aware teacher, configs, outputs, DDP equivalence, resume.

Runs are tiny (timm's ``test_vit``/``test_resnet``, 64 px global and 32 px local views, 18 synthetic
images, a few steps). Multi-process runs are real: ``accelerate launch --multi_gpu --num_processes 2``
on CPU (gloo), as a user would launch them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kill_at_first_checkpoint

from roseprior.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from roseprior.synth import generate

    return generate(tmp_path_factory.mktemp("pretrain_data") / "set", n_per_class=12, size=96, progress=False)


def tiny_overrides(data: Path, out: Path, method: str = "dino", **extra: object) -> list[str]:
    values: dict[str, object] = {
        "data.root": str(data), "out_dir": str(out), "model.name": "timm:test_vit",
        "method.name": method, "method.dino.out_dim": 256, "method.dino.hidden_dim": 64,
        "method.dino.bottleneck_dim": 32, "method.simclr.hidden_dim": 64, "method.simclr.out_dim": 32,
        "method.simclr.batch_norm": False, "views.global_size": 64, "views.local_size": 32,
        "views.n_local": 2 if method == "dino" else 0, "train.epochs": 3, "train.batch_size": 8,
        "train.warmup_epochs": 0.5, "train.log_every": 1, "monitor.progress": False,
        "checkpoint.every_steps": 2, "checkpoint.keep": 3, "train.lr": 0.02,  # large steps: differences show
    }
    values.update(extra)
    values.setdefault("monitor.knn_image_size", 64)
    return [f"{k}={v}" for k, v in values.items()]


def run_in_process(overrides: list[str]) -> int:
    """``python -m pretrain`` in this process (saves a Python start-up per run)."""
    from pretrain.__main__ import main

    torch.set_num_threads(1)
    return main(overrides)


def final_state(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    newest = sorted((out / "checkpoints").glob("step_*"))[-1]
    return load_file(str(newest / "model.safetensors"))


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||a|| over every floating-point tensor (student, teacher, loss centre) together."""
    assert a.keys() == b.keys()
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a if a[k].is_floating_point())
    den = sum(float((a[k].double() ** 2).sum()) for k in a if a[k].is_floating_point())
    return (num / den) ** 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------------


def _batch(n: int, h: int = 80, w: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)
    return images, torch.tensor([[h, w]] * n)


def test_views_depend_only_on_seed_epoch_and_index():
    from pretrain.config import ViewsConfig
    from pretrain.views import MultiCropViews

    views = MultiCropViews(ViewsConfig(global_size=32, local_size=16, n_local=3), seed=7)
    images, sizes = _batch(3)
    together = views(images, sizes, torch.tensor([10, 11, 12]), epoch=0)
    # Sample 11 alone, as another process or worker would see it, in a batch of one.
    alone = views(images[1:2], sizes[1:2], torch.tensor([11]), epoch=0)
    assert [v.shape for v in together["global"]] == [torch.Size([3, 3, 32, 32])] * 2
    assert [v.shape for v in together["local"]] == [torch.Size([3, 3, 16, 16])] * 3
    for name in ("global", "local"):
        for v_together, v_alone in zip(together[name], alone[name], strict=True):
            torch.testing.assert_close(v_together[1:2], v_alone, atol=1e-5, rtol=0)
    next_epoch = views(images, sizes, torch.tensor([10, 11, 12]), epoch=1)
    assert not torch.allclose(together["global"][0], next_epoch["global"][0])
    assert all(torch.isfinite(v).all() for v in together["global"] + together["local"])


def test_views_made_in_two_threads_at_once_are_the_views_made_alone():
    """The CPU chunk buffers are reused per thread, never shared: concurrent callers cannot overwrite each other."""
    from concurrent.futures import ThreadPoolExecutor

    from pretrain.config import ViewsConfig
    from pretrain.views import MultiCropViews

    views = MultiCropViews(ViewsConfig(global_size=64, local_size=32, n_local=4), seed=3)
    batches = [(*_batch(6, 160, 160, seed), torch.arange(6) + 10 * seed) for seed in range(4)]
    alone = [views(images, sizes, indices, epoch=0) for images, sizes, indices in batches]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda b: views(*b, epoch=0), batches * 3))
    for i, out in enumerate(together):
        for name in ("global", "local"):
            for a, b in zip(out[name], alone[i % 4][name], strict=True):
                assert torch.equal(a, b), (i, name)


def _stained(strength: float, seed: int) -> torch.Tensor:
    """A (3, 64, 64) uint8 field: cells of haematoxylin and eosin at ``strength`` times a base concentration,
    on white glass."""
    from roseprior.imageops import _RGB_FROM_HED

    g = torch.Generator().manual_seed(seed)
    hed = torch.zeros(64, 64, 3, dtype=torch.float64)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    for cy, cx in torch.randint(10, 54, (4, 2), generator=g).tolist():
        r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        hed[..., 1] += 0.25 * (r2 < 100)  # cytoplasm
        hed[..., 0] += 0.5 * (r2 < 25)  # nucleus
    rgb = torch.exp(-(strength * hed) @ _RGB_FROM_HED)
    return rgb.permute(2, 0, 1).mul(255).round().clamp(0, 255).to(torch.uint8)


def test_a_swapped_view_takes_the_stain_strength_of_another_domain(tmp_path: Path) -> None:
    from PIL import Image

    from pretrain.config import ViewsConfig
    from pretrain.views import MultiCropViews, StainBank
    from roseprior.data import DecodedImages, Sample
    from roseprior.imageops import stain_strength

    samples = []
    for i, (domain, strength) in enumerate([("weak", 1.0)] * 3 + [("strong", 2.0)] * 3):
        path = tmp_path / f"{domain}{i}.png"
        Image.fromarray(_stained(strength, i).permute(1, 2, 0).numpy()).save(path)
        samples.append(Sample(str(path), domain=domain))
    dataset = DecodedImages(samples)
    bank = StainBank.build(dataset)
    images = [dataset[i][0] for i in range(6)]
    sizes, indices = torch.tensor([[64, 64]] * 6), torch.arange(6)
    plain = dict(global_size=32, n_local=0, hed_strength=0.0, white_balance=0.0, brightness=0.0,
                 blur_prob=[0.0, 0.0, 0.0], scale_mode="area", global_area=[0.6, 1.0])

    def strengths(views: MultiCropViews, which: slice = slice(None)) -> torch.Tensor:
        out = views(images[which], sizes[which], indices[which], epoch=0)["global"]
        as_uint8 = [(v * 0.25 + 0.5).mul(255).round().clamp(0, 255).byte() for view in out for v in view]
        return stain_strength(as_uint8)[:, :2].view(len(out), -1, 2)

    own = stain_strength(images)[:, :2]
    kept = strengths(MultiCropViews(ViewsConfig(**plain), seed=1, stain_bank=bank))
    swapped = strengths(MultiCropViews(ViewsConfig(**plain, stain_swap=1.0), seed=1, stain_bank=bank))
    ratio = (swapped / kept).mean(dim=(0, 2))
    print("stain strength of swapped / kept views, per image:", ratio.round(decimals=2).tolist())
    assert torch.allclose(kept.mean(0), own, rtol=0.15)
    assert (ratio[:3] > 1.3).all() and (ratio[3:] < 0.77).all()  # always another domain's (2x, 0.5x)
    # A sample's swapped views do not depend on the rest of its batch.
    views = MultiCropViews(ViewsConfig(**plain, stain_swap=0.5), seed=1, stain_bank=bank)
    torch.testing.assert_close(strengths(views)[:, 4:5], strengths(views, slice(4, 5)))


def test_views_local_magnification_puts_globals_below_locals():
    from pretrain.config import ViewsConfig
    from pretrain.views import MultiCropViews

    cfg = ViewsConfig(global_size=32, local_size=16, n_local=4, magnification=[0.5, 1.0],
                      local_magnification=[1.0, 2.0])
    views = MultiCropViews(cfg, seed=0)
    sizes = torch.tensor([[400, 400]] * 16)  # large enough that no crop is shrunk to fit
    u = views.draws(torch.arange(16), epoch=0)
    g = views.boxes(u[:, :2], sizes, 32, is_global=True)
    loc = views.boxes(u[:, 2:], sizes, 16, is_global=False)
    mag_g = 32 / ((g[:, 3] - g[:, 1]) * (g[:, 4] - g[:, 2])).sqrt()
    mag_l = 16 / ((loc[:, 3] - loc[:, 1]) * (loc[:, 4] - loc[:, 2])).sqrt()
    assert mag_g.min() >= 0.5 - 1e-6 and mag_g.max() <= 1.0 + 1e-6
    assert mag_l.min() >= 1.0 - 1e-6 and mag_l.max() <= 2.0 + 1e-6
    assert mag_g.max() - mag_g.min() > 0.1  # drawn from a continuous range, not one scale
    same = MultiCropViews(ViewsConfig(global_size=32, local_size=16, n_local=4, magnification=[0.5, 1.0]), seed=0)
    loc = same.boxes(u[:, 2:], sizes, 16, is_global=False)  # no local range: the locals take the globals'
    assert (16 / ((loc[:, 3] - loc[:, 1]) * (loc[:, 4] - loc[:, 2])).sqrt()).max() <= 1.0 + 1e-6
    with pytest.raises(ConfigError, match="views.local_magnification"):
        ViewsConfig(local_magnification=[2.0, 1.0])


def test_local_views_focused_on_nuclei_are_cut_around_the_dark_parts_of_each_image():
    """``views.local_focus: nuclei``: glass and pale cytoplasm hold no diagnosis, so the locals are centred where
    the image is darkest; the globals, and a flat image's locals, are placed as before, and inside the image."""
    from pretrain.config import ViewsConfig
    from pretrain.views import MultiCropViews, darkness_cdf

    images = torch.full((12, 3, 160, 200), 235, dtype=torch.uint8)  # pale glass and cytoplasm
    yy, xx = torch.meshgrid(torch.arange(160), torch.arange(200), indexing="ij")
    centres = [(30 + 9 * i, 40 + 11 * i) for i in range(11)]  # one dark nucleus per image, a flat 12th image
    for image, (cy, cx) in zip(images[:11], centres, strict=True):
        image[:, (yy - cy) ** 2 + (xx - cx) ** 2 < 12 ** 2] = 60
    sizes = torch.tensor([[160, 200]] * 12)
    kwargs = dict(global_size=32, local_size=16, n_local=6, magnification=[0.5, 1.0], local_magnification=[0.8, 1.0])
    focused = MultiCropViews(ViewsConfig(**kwargs, local_focus="nuclei"), seed=0)
    anywhere = MultiCropViews(ViewsConfig(**kwargs), seed=0)
    focus = darkness_cdf(images, sizes)

    def local_boxes(views: MultiCropViews) -> torch.Tensor:
        out = views(images, sizes, torch.arange(12), epoch=0)
        assert len(out["local"]) == 6 and out["local"][0].shape == (12, 3, 16, 16)
        return views.boxes(views.draws(torch.arange(12), 0)[:, 2:], sizes, 16, False,
                           focus if views is focused else None).view(6, 12, 5)

    for views, least, most in ((focused, 0.95, 1.0), (anywhere, 0.0, 0.3)):
        boxes = local_boxes(views)
        box_x, box_y = (boxes[..., 1] + boxes[..., 3]) / 2, (boxes[..., 2] + boxes[..., 4]) / 2
        on_nucleus = torch.stack([(box_x[:, i] - cx) ** 2 + (box_y[:, i] - cy) ** 2 < 20 ** 2  # radius 12, a map cell
                                  for i, (cy, cx) in enumerate(centres)])
        assert least <= on_nucleus.double().mean() <= most, (views.cfg.local_focus, on_nucleus.double().mean())
        assert (boxes[..., 1:3] >= 0).all() and (boxes[..., 3] <= 200 + 1e-6).all() and (boxes[..., 4] <= 160 + 1e-6).all()
    flat = local_boxes(focused)[:, 11]
    assert flat[:, 1].std() > 10 and flat[:, 2].std() > 10  # nothing dark to aim at: anywhere, as before
    u = focused.draws(torch.arange(12), 0)[:, :2]
    assert torch.equal(focused.boxes(u, sizes, 32, True), anywhere.boxes(u, sizes, 32, True))  # globals unchanged


def test_simclr_local_pairs_carry_local_weight_of_the_loss():
    """The global pair keeps its own share of the loss however many local views there are."""
    import backbones
    from pretrain.config import SimCLRConfig
    from pretrain.methods.simclr import SimCLR

    torch.manual_seed(0)
    views = {"global": [torch.rand(6, 3, 64, 64) for _ in range(2)], "local": [torch.rand(6, 3, 32, 32)] * 3}
    losses = {}
    for weight in (0.0, 0.5, 0.9):
        torch.manual_seed(1)
        method = SimCLR(backbones.create("msht_tiny", norm="bn"), SimCLRConfig(hidden_dim=32, out_dim=16,
                                                                              local_weight=weight)).eval()
        losses[weight] = method(views, 0)[0].item()
        if weight == 0.0:
            global_only = method({"global": views["global"], "local": []}, 0)[0].item()
    assert losses[0.0] == pytest.approx(global_only, rel=1e-5)  # weight 0: the two-view SimCLR loss
    local_only = (losses[0.5] - 0.5 * losses[0.0]) / 0.5
    assert losses[0.9] == pytest.approx(0.1 * losses[0.0] + 0.9 * local_only, rel=1e-4)
    assert abs(local_only - losses[0.0]) > 1e-3  # the local pairs do contribute something else
    with pytest.raises(ConfigError, match="method.simclr.local_weight"):
        SimCLRConfig(local_weight=1.0)


def test_views_of_small_images_stay_inside_the_image():
    """A crop larger than its image shrinks to fit: no box leaves the image (no fill borders)."""
    from pretrain.config import ViewsConfig
    from pretrain.views import MultiCropViews

    views = MultiCropViews(ViewsConfig(global_size=64, local_size=32, magnification=[0.25, 0.5]), seed=0)
    sizes = torch.tensor([[40, 90], [90, 40]])
    boxes = views.boxes(views.draws(torch.arange(2), 0)[:, :2], sizes, 64, is_global=True)
    h = sizes[boxes[:, 0].long(), 0].double()
    w = sizes[boxes[:, 0].long(), 1].double()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 2] >= 0).all()
    assert (boxes[:, 3] <= w + 1e-6).all() and (boxes[:, 4] <= h + 1e-6).all()


def test_each_view_is_its_crop_flip_colour_and_blur_from_the_shared_ops():
    """The batched, sorted, table-driven fast path makes exactly the views a plain per-view
    composition of the shared ops makes (crop, flip/rotate, HED/white balance/brightness, blur)."""
    from pretrain import views as V
    from pretrain.config import ViewsConfig
    from roseprior import imageops

    cfg = ViewsConfig(global_size=32, local_size=16, n_local=2, hed_strength=0.2, white_balance=0.2,
                      brightness=0.2, color_prob=0.7, blur_prob=[1.0, 0.5, 0.5])
    views = V.MultiCropViews(cfg, seed=3)
    images, sizes = _batch(6)
    indices = torch.arange(6) + 100
    out = views(images, sizes, indices, epoch=2)
    u = views.draws(indices, epoch=2).float()
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    h, wb, b = cfg.hed_strength, cfg.white_balance, cfg.brightness
    for group, first, size, is_global in (("global", 0, 32, True), ("local", 2, 16, False)):
        n = len(out[group])
        boxes = views.boxes(views.draws(indices, epoch=2)[:, first : first + n], sizes, size, is_global)
        for v in range(n):
            blur_prob = (cfg.blur_prob[0] if v == 0 else cfg.blur_prob[1]) if is_global else cfg.blur_prob[2]
            for i in range(6):
                r = u[i, first + v]
                x = V.crop_resize_cpu(images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
                                      boxes[v * 6 + i][None], size)[0]
                x = x.flip(-1) if r[V._HFLIP] < 0.5 else x
                x = torch.rot90(x, min(int(r[V._ROT] * 4), 3), (-2, -1)).float()[None] / 255.0
                if r[V._COLOR] < cfg.color_prob:
                    x = imageops.hed_shift(x, 1 - h + 2 * h * r[V._HED][None, :3], -h + 2 * h * r[V._HED][None, 3:])
                    x = imageops.white_balance_shift(x, 1 - wb + 2 * wb * r[V._WB][None])
                    x = imageops.brightness_shift(x, (-b + 2 * b * r[V._BRIGHT])[None])
                if r[V._BLUR] < blur_prob:
                    low, high = cfg.blur_sigma
                    x = imageops.gaussian_blur(x, float(low + (high - low) * r[V._SIGMA]))
                expected = (x[0] - mean) / std
                torch.testing.assert_close(out[group][v][i], expected, atol=2e-4, rtol=0, msg=f"{group} {v} {i}")


def test_fused_colour_shift_equals_the_shared_image_ops():
    """The views' one-pass stain/acquisition shift is imageops' hed -> white balance -> brightness."""
    from pretrain.views import stain_and_acquisition_shift
    from roseprior import imageops

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 20, 24, generator=g)
    x[0, :, :3] = 0.0  # black and saturated pixels hit every clipping branch
    x[1, :, :2] = 1.0
    alpha = 1 + 0.2 * (2 * torch.rand(6, 3, generator=g) - 1)
    beta = 0.2 * (2 * torch.rand(6, 3, generator=g) - 1)
    gains = 1 + 0.5 * (2 * torch.rand(6, 3, generator=g) - 1)
    delta = 0.3 * (2 * torch.rand(6, generator=g) - 1)
    expected = imageops.brightness_shift(
        imageops.white_balance_shift(imageops.hed_shift(x, alpha, beta), gains), delta)
    torch.testing.assert_close(stain_and_acquisition_shift(x.clone(), alpha, beta, gains, delta), expected,
                               atol=2e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Teacher
# ---------------------------------------------------------------------------------------------


def test_teacher_batchnorm_buffers_follow_the_student():
    import backbones
    from pretrain.config import DINOConfig
    from pretrain.methods.dino import DINO

    torch.manual_seed(0)
    method = DINO(backbones.create("timm:test_resnet"), DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16))
    method.train()
    bn_buffers = [n for n, _ in method.teacher.named_buffers() if n.endswith("running_mean")]
    assert bn_buffers, "test_resnet should have BatchNorm layers"
    x = {"global": [torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)], "local": []}
    teacher_before = {n: b.clone() for n, b in method.teacher.named_buffers()}
    loss, _ = method(x, epoch=0)  # student BN statistics move; the teacher's own pass must not write its own
    for name, buf in method.teacher.named_buffers():
        if buf.is_floating_point():  # running statistics (num_batches_tracked counts, harmlessly)
            torch.testing.assert_close(buf, teacher_before[name], msg=f"teacher forward changed {name}")
    student = dict(method.student.named_buffers())
    assert not torch.allclose(student[bn_buffers[0]], teacher_before[bn_buffers[0]])

    momentum = 0.9
    method.after_step(momentum)
    for name, buf in method.teacher.named_buffers():
        if buf.is_floating_point():
            expected = momentum * teacher_before[name] + (1 - momentum) * student[name]
            torch.testing.assert_close(buf, expected, msg=f"{name} is not the EMA of the student's")
        else:
            assert torch.equal(buf, student[name])
    method.after_step(0.0)  # momentum 0: the teacher becomes the student, statistics included
    for name, buf in method.teacher.named_buffers():
        torch.testing.assert_close(buf, student[name].to(buf.dtype))


# ---------------------------------------------------------------------------------------------
# Config and command line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("views.bogus=1", "valid keys under 'views'"),
        ("method.name=swav", "must be one of"),
        ("views.n_global=0", "views.n_global"),
        ("views.magnification=[2.0,0.5]", "views.magnification"),
        ("train.batch_size=many", "train.batch_size"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(override: str, expected: str, tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "--config", str(REPO / "configs/pretrain/dino_msht_tiny_cpu.yaml"),
         f"out_dir={tmp_path / 'out'}", override],
        capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("pretrain: error:") and expected in lines[0]
    assert not (tmp_path / "out").exists()


def test_shipped_configs_load():
    from pretrain.config import PretrainConfig
    from roseprior.config import load_config

    for path in sorted((REPO / "configs" / "pretrain").glob("*.yaml")):
        load_config(PretrainConfig, path)


def test_empty_data_folder_is_a_data_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    (tmp_path / "empty").mkdir()
    rc = run_in_process(tiny_overrides(tmp_path / "empty", tmp_path / "out"))
    assert rc == 2
    assert "no images under" in capsys.readouterr().err


def test_run_writes_the_stage_outputs(tiny_data: Path, tmp_path: Path):
    import backbones

    out = tmp_path / "run"
    assert run_in_process(tiny_overrides(tiny_data, out, **{"train.max_steps": 2, "monitor.knn_root": str(tiny_data),
                                                            "train.epochs": 1})) == 0
    for name in ("backbone.safetensors", "backbone.json", "config.yaml", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    import json

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("train/loss", "lr/all", "train/momentum", "train/teacher_temp", "train/teacher_entropy",
                "train/images_per_second"):
        assert key in steps[-1], key
    assert any("knn/balanced_accuracy" in r for r in records)  # one epoch of 2 steps ended: the kNN monitor ran
    model = backbones.load(out)
    assert model.forward_embedding(torch.rand(2, 3, 64, 64)).shape == (2, model.embed_dim)
    meta = json.loads((out / "backbone.json").read_text())
    assert meta["provenance"]["method"] == "dino" and meta["provenance"]["exported"] == "teacher"
    views = meta["provenance"]["config"]["views"]
    assert model.default_cfg["mean"] == tuple(views["mean"]) and model.default_cfg["std"] == tuple(views["std"])


def test_with_a_split_only_training_images_are_pretrained_on(tiny_data: Path, tmp_path: Path) -> None:
    """Given `data.split_dir`, val/test images stay unseen by SSL, so the probes' test split is honest."""
    from roseprior.data import load_labelled
    from roseprior.splits import split_samples, write_split_csvs

    split_dir = tmp_path / "split"
    splits = split_samples(load_labelled(tiny_data, ["N", "P"]), (0.5, 0.25, 0.25), seed=0)
    write_split_csvs(splits, split_dir, ["N", "P"])
    out = tmp_path / "run"
    assert run_in_process(tiny_overrides(tiny_data, out, **{"data.split_dir": str(split_dir),
                                                            "train.max_steps": 1})) == 0
    meta = json.loads((out / "backbone.json").read_text())
    assert meta["provenance"]["images"] == len(splits["train"]) < 18


# ---------------------------------------------------------------------------------------------
# Distributed equivalence and resume
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dino", "simclr"])
def test_two_processes_match_one_process_with_the_global_batch(method: str, tiny_data: Path, tmp_path: Path):
    one, two = tmp_path / "one", tmp_path / "two"
    extra = {"views.n_local": 2, "views.stain_swap": 0.5} if method == "simclr" else {}  # multi-crop, swapped stains
    assert run_in_process(tiny_overrides(tiny_data, one, method, **extra, **{"train.batch_size": 8,
                                                                              "train.max_steps": 3})) == 0
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "pretrain",
           *tiny_overrides(tiny_data, two, method, **extra, **{"train.batch_size": 4, "train.max_steps": 3})]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) x batch 4" in proc.stdout + proc.stderr
    diff = relative_difference(final_state(one), final_state(two))
    print(f"{method}: 2 processes x 4 vs 1 process x 8, relative difference {diff:.1e}")
    assert diff < 1e-4, f"{method}: 2 x 4 differs from 1 x 8 by {diff:.2e}"


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_data: Path, tmp_path: Path):
    steps = {"train.max_steps": 6, "checkpoint.every_steps": 2}
    reference = tmp_path / "reference"
    assert run_in_process(tiny_overrides(tiny_data, reference, **steps)) == 0

    killed = tmp_path / "killed"
    kill_at_first_checkpoint([sys.executable, "-m", "pretrain", *tiny_overrides(tiny_data, killed, **steps)], killed,
                             ENV, REPO)
    assert not (killed / "backbone.safetensors").exists()

    # Resume with the same command: ends with the same weights as the uninterrupted run.
    assert run_in_process(tiny_overrides(tiny_data, killed, **steps)) == 0
    diff = relative_difference(final_state(reference), final_state(killed))
    print(f"killed at a checkpoint and resumed vs uninterrupted: relative difference {diff:.1e}")
    assert diff < 1e-6


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tiny_data: Path, tmp_path: Path):
    steps = {"train.max_steps": 4, "checkpoint.every_steps": 2, "train.epochs": 3}
    reference = tmp_path / "reference"
    assert run_in_process(tiny_overrides(tiny_data, reference, **steps)) == 0
    # A second run stopped at step 4 of 6 wrote step_2 and step_4; break step_4, then resume to 6.
    partial = tmp_path / "partial"
    assert run_in_process(tiny_overrides(tiny_data, partial, **steps)) == 0
    newest = sorted((partial / "checkpoints").glob("step_*"))[-1]
    assert newest.name == "step_00000004"
    (newest / "model.safetensors").write_bytes(b"not a safetensors file")
    longer = {**steps, "train.max_steps": 6}
    with pytest.warns(RuntimeWarning, match="cannot be loaded"):
        assert run_in_process(tiny_overrides(tiny_data, partial, **longer)) == 0
    assert run_in_process(tiny_overrides(tiny_data, reference, **longer)) == 0  # resumes the intact run
    assert relative_difference(final_state(reference), final_state(partial)) < 1e-6


# ---------------------------------------------------------------------------------------------
# Stopping: non-finite loss, collapse
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["nan", "collapse"])
def test_a_failing_run_stops_with_a_clear_message_and_keeps_its_checkpoint(
    failure: str, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    from pretrain import methods
    from pretrain.methods.dino import DINO

    class FailingDINO(DINO):
        """DINO whose third step goes wrong: a NaN loss, or a collapsed teacher from then on."""

        calls = 0

        def forward(self, views, epoch):
            loss, metrics = super().forward(views, epoch)
            FailingDINO.calls += 1
            if FailingDINO.calls > 2 and failure == "nan":
                loss = loss * float("nan")
            if FailingDINO.calls > 2 and failure == "collapse":
                metrics["collapsed"] = torch.ones(())
            return loss, metrics

    monkeypatch.setitem(methods.METHODS, "dino", FailingDINO)
    out = tmp_path / "run"
    rc = run_in_process(tiny_overrides(tiny_data, out, **{
        "train.max_steps": 6, "monitor.collapse_after_steps": 0, "monitor.collapse_patience": 2}))
    err = capsys.readouterr().err
    assert rc == 2
    assert "step_00000002" in err  # names the last good checkpoint
    if failure == "nan":
        assert "loss is nan at step 2" in err
    else:
        assert "collapsed" in err and "at step 4" in err
    assert (out / "checkpoints" / "step_00000002" / "meta.json").is_file()
    assert not (out / "backbone.safetensors").exists()


@pytest.mark.parametrize("method", ["byol", "mocov2"])
def test_baseline_methods_train_and_export_their_momentum_encoder(method: str, tiny_data: Path, tmp_path: Path):
    import json

    import backbones

    out = tmp_path / method
    overrides = tiny_overrides(tiny_data, out, method, **{
        "train.max_steps": 2, "method.byol.hidden_dim": 64, "method.byol.out_dim": 32,
        "method.mocov2.hidden_dim": 64, "method.mocov2.out_dim": 32, "method.mocov2.memory_bank_size": 64})
    assert run_in_process(overrides) == 0
    losses = [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    meta = json.loads((out / "backbone.json").read_text())
    assert meta["provenance"]["method"] == method and meta["provenance"]["exported"] == "teacher"
    assert backbones.load(out).forward_embedding(torch.rand(1, 3, 64, 64)).shape[0] == 1


def test_time_budget_stops_early_and_still_exports(tiny_data: Path, tmp_path: Path):
    out = tmp_path / "budget"
    assert run_in_process(tiny_overrides(tiny_data, out, **{"train.max_minutes": 1e-6})) == 0
    assert (out / "backbone.safetensors").is_file()
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == ["step_00000001"]


def test_resume_with_another_global_batch_is_refused(tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "run"
    assert run_in_process(tiny_overrides(tiny_data, out, **{"train.max_steps": 2})) == 0
    capsys.readouterr()
    assert run_in_process(tiny_overrides(tiny_data, out, **{"train.max_steps": 4, "train.batch_size": 4})) == 2
    err = capsys.readouterr().err
    assert "global_batch: 8 there, 4 now" in err and "checkpoint.resume=never" in err


def test_batches_by_domain_with_stain_swaps_and_locals_train(tiny_data: Path, tmp_path: Path) -> None:
    """The site-invariant settings together (one domain per batch, swapped stains, multi-crop SimCLR)."""
    out = tmp_path / "invariant"
    assert run_in_process(tiny_overrides(tiny_data, out, "simclr", **{
        "train.batch_by_domain": True, "views.stain_swap": 0.5, "views.n_local": 2, "train.max_steps": 2})) == 0
    assert (out / "backbone.safetensors").is_file()


def test_pseudo_domains_recover_the_sites_of_data_that_names_none(tmp_path: Path) -> None:
    """No domain column, no site folders: ``train.pseudo_domains`` clusters images by colour into sites that
    batch_by_domain and stain swaps use; the clusters follow the acquisition, not the class."""
    import csv

    from sklearn.metrics import adjusted_rand_score

    from roseprior.synth import generate

    data = generate(tmp_path / "set", n_per_class=40, size=64, seed=5, progress=False)
    truth = {os.path.realpath(data / r["path"]): r for r in csv.DictReader((data / "manifest.csv").open())}
    (data / "manifest.csv").unlink()  # an ImageFolder that names no site
    out = tmp_path / "run"
    assert run_in_process(tiny_overrides(data, out, "simclr", **{
        "train.max_steps": 2, "train.pseudo_domains": 4, "train.batch_by_domain": True, "views.stain_swap": 0.5})) == 0
    rows = list(csv.DictReader((out / "pseudo_domains.csv").open()))
    assert len(rows) >= 40 and {r["domain"] for r in rows} == {"pseudo0", "pseudo1", "pseudo2", "pseudo3"}  # training split
    found = [r["domain"] for r in rows]
    site = [truth[os.path.realpath(r["path"])]["domain"] for r in rows]
    label = [truth[os.path.realpath(r["path"])]["label"] for r in rows]
    print("adjusted Rand index: sites", adjusted_rand_score(site, found), "classes", adjusted_rand_score(label, found))
    assert adjusted_rand_score(site, found) >= 0.5
    assert adjusted_rand_score(label, found) < 0.1
    assert (out / "backbone.safetensors").is_file()
