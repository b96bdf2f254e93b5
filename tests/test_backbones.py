"""The model zoo: shapes at many input sizes, gradients, save/load, ResNet-50 key mapping, ablations.

Big models (msht, hybrid_vit) are checked on the meta device for shapes and parameter counts, and
run for real once at 96 px with batch 1; msht_tiny carries the numerical checks.
"""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

import backbones
from backbones.layers import SimAM
from backbones.msht import GuidedAttention
from roseprior.errors import CheckpointError, ConfigError, DataError


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: on 2 shared cores, two OpenMP threads per process spin-wait and run several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


REGISTERED = ["msht", "msht_small", "msht_tiny", "hybrid_vit"]
SIZES = [(96, 96), (224, 224), (384, 384), (128, 192)]


def _tokens(h: int, w: int, prefix: int = 1) -> int:
    return prefix + (h // 32) * (w // 32)


def _tiny(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return backbones.create("msht_tiny", **kwargs)


# ====== registry ======


def test_registry_lists_the_family_and_registers_it_with_timm():
    import timm

    assert set(REGISTERED) <= set(backbones.list_models())
    assert backbones.list_models("msht*") == ["msht", "msht_small", "msht_tiny"]
    model = timm.create_model("msht_tiny", num_classes=3)
    assert model.registry_name == "msht_tiny" and model.registry_kwargs == {"num_classes": 3}
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_create_rejects_unknown_names_kwargs_and_downloads():
    with pytest.raises(ConfigError, match="registered"):
        backbones.create("msht_huge")
    with pytest.raises(ConfigError, match="timm has no model"):
        backbones.create("timm:not_a_model_xyz")
    with pytest.raises(ConfigError, match="attn_module"):
        backbones.create("msht_tiny", attn_module="eca")
    with pytest.raises(ConfigError, match="norm"):
        backbones.create("msht_tiny", norm="ln")
    with pytest.raises(ConfigError, match="download"):
        backbones.create("msht_tiny", pretrained=True)


def test_create_drops_none_kwargs():
    model = backbones.create("msht_tiny", num_classes=None, attn_module=None)
    assert model.num_classes == 0 and isinstance(model.head, nn.Identity)


# ====== shapes ======


@pytest.mark.parametrize("name", REGISTERED)
def test_output_shapes_at_many_sizes(name):
    """Shapes on the meta device (no compute), so the 88 M-parameter models stay cheap."""
    with torch.device("meta"):
        model = backbones.create(name, num_classes=3)
        for h, w in SIZES:
            x = torch.empty(2, 3, h, w)
            assert model.forward_features(x).shape == (2, _tokens(h, w), model.embed_dim)
            assert model.forward_embedding(x).shape == (2, model.embed_dim)
            assert model(x).shape == (2, 3)
    cfg = model.default_cfg
    assert cfg["input_size"] == ((3, 384, 384) if name in ("msht", "hybrid_vit") else (3, 224, 224))
    assert len(cfg["mean"]) == len(cfg["std"]) == 3


@pytest.mark.parametrize("size", SIZES)
def test_msht_tiny_runs_at_many_sizes(size):
    model = _tiny().eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, *size))
        emb = model.forward_head(feats, pre_logits=True)
    assert feats.shape == (1, _tokens(*size), 192) and torch.isfinite(feats).all()
    assert emb.shape == (1, model.embed_dim)


@pytest.mark.parametrize("name", ["msht", "hybrid_vit"])
def test_full_size_models_run_one_small_forward(name):
    torch.manual_seed(0)
    model = backbones.create(name).eval()
    with torch.no_grad():
        emb = model.forward_embedding(torch.randn(1, 3, 96, 96))
    assert emb.shape == (1, 768) and torch.isfinite(emb).all()


def test_inputs_that_are_not_multiples_of_32_are_refused():
    model = _tiny()
    with pytest.raises(DataError, match="multiples of 32"):
        model(torch.randn(1, 3, 100, 96))
    with pytest.raises(ConfigError, match="multiple of 32"):
        backbones.create("msht_tiny", img_size=200)


def test_position_embedding_is_resampled_only_off_the_native_grid():
    model = _tiny(img_size=128)
    assert torch.equal(model._resampled_pos_embed(model.grid_size), model.pos_embed)
    resized = model._resampled_pos_embed((3, 5))
    assert resized.shape == (1, 1 + 15, 192)
    assert torch.equal(resized[:, 0], model.pos_embed[:, 0])  # the cls position is kept, not interpolated


@pytest.mark.parametrize("name", ["timm:resnet18", "timm:vit_tiny_patch16_224"])
def test_timm_models_follow_the_feature_api_at_many_sizes(name):
    torch.manual_seed(0)
    model = backbones.create(name).eval()
    for size in [(96, 96), (224, 224), (128, 192)]:
        with torch.no_grad():
            emb = model.forward_embedding(torch.randn(2, 3, *size))
        assert emb.shape == (2, model.embed_dim)
    assert model.embed_dim == (512 if "resnet" in name else 192)


# ====== gradients ======


def _undo_zero_init(model: nn.Module) -> None:
    """timm zero-inits the last norm of each residual branch, which zeroes its conv's gradient at step 0."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"class_token": False, "attn_module": "se"},
        {"attn_module": "cbam", "norm": "gn"},
        {"pos_embed": False},
    ],
)
def test_gradients_reach_every_parameter(kwargs):
    """A loss on the logits and on every token (as SSL token losses and Grad-CAM use them)."""
    model = _tiny(num_classes=2, **kwargs).train()
    _undo_zero_init(model)
    tokens = model.forward_features(torch.randn(4, 3, 64, 96))
    logits = model.forward_head(tokens)
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1])) + tokens.pow(2).mean()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"no gradient reached {no_grad}"


def test_with_a_cls_classifier_only_the_last_gaze_path_is_idle():
    """A property of the paper's design, not a wiring bug: the cls row of the last guided attention
    uses the cls query, never the stage-4 gaze queries, and nothing mixes tokens after it; so a loss
    on the cls logits alone sends no gradient into the last focus module's gaze path."""
    model = _tiny(num_classes=2).train()
    _undo_zero_init(model)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    idle = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    assert idle == {f"focus.3.gaze_{part}.{t}" for part in ("proj", "norm") for t in ("weight", "bias")}


# ====== save / load ======


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = _tiny(num_classes=2, attn_module="se", focus_stages=(2, 3, 4), norm="gn").train()
    model(torch.randn(4, 3, 64, 64))  # move BN/GN state away from init
    provenance = {"stage": "pretrain", "epoch": 3, "data_root": tmp_path, "loss": torch.tensor(0.5)}
    backbones.save(model.eval(), tmp_path, provenance=provenance)
    meta = json.loads((tmp_path / "backbone.json").read_text())
    assert meta["name"] == "msht_tiny" and meta["embed_dim"] == 192
    assert meta["kwargs"]["focus_stages"] == [2, 3, 4] and meta["provenance"]["epoch"] == 3
    assert meta["provenance"]["data_root"] == str(tmp_path) and meta["provenance"]["loss"] == 0.5
    restored = backbones.load(tmp_path).eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))
        assert torch.equal(model.forward_embedding(x), restored.forward_embedding(x))


def test_save_load_round_trip_of_a_timm_model_keeps_bn_statistics(tmp_path):
    model = backbones.create("timm:resnet18").train()
    model(torch.randn(4, 3, 64, 64))
    backbones.save(model.eval(), tmp_path)
    restored = backbones.load(tmp_path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.forward_embedding(x), restored.forward_embedding(x))


@pytest.mark.parametrize("name", ["msht_tiny", "timm:resnet18"])
def test_a_reset_classifier_is_saved_and_restored(tmp_path, name):
    model = backbones.create(name)
    model.reset_classifier(3)
    backbones.save(model.eval(), tmp_path)
    restored = backbones.load(tmp_path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert restored(x).shape == (1, 3) and torch.equal(model(x), restored(x))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="backbone.json"):
        backbones.load(tmp_path)
    backbones.save(_tiny(), tmp_path)
    meta = json.loads((tmp_path / "backbone.json").read_text())
    meta["kwargs"]["embed_dim"] = 96  # json and weights disagree
    (tmp_path / "backbone.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match"):
        backbones.load(tmp_path)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": SimAM()}, path)
    with pytest.raises(CheckpointError, match="run code"):
        backbones.load_state_dict_file(path)


# ====== ResNet-50 key mapping / load_init ======


@pytest.fixture(scope="module")
def resnet50_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet50().state_dict()


def test_resnet50_state_dict_loads_all_of_msht_cnn(tmp_path, resnet50_state):
    path = tmp_path / "r50.pth"
    torch.save({f"module.{k}": v for k, v in resnet50_state.items()}, path)  # as DDP would save it
    model = backbones.load_init(path, model="msht")
    report = model.load_report
    cnn_keys = {k for k in model.state_dict() if k.startswith("cnn.")}
    assert set(report.loaded) == cnn_keys
    assert sorted(report.unexpected) == ["cnn.fc.bias", "cnn.fc.weight"]
    assert set(report.missing) == set(model.state_dict()) - cnn_keys
    for key in ("conv1.weight", "layer3.5.conv2.weight", "layer4.2.bn3.running_var"):
        assert torch.equal(model.state_dict()[f"cnn.{key}"], resnet50_state[key])
    hybrid = backbones.load_init(path, model="hybrid_vit", depth=1)  # the same body, under patch_embed
    prefix = "patch_embed.backbone."
    assert set(hybrid.load_report.loaded) == {k for k in hybrid.state_dict() if k.startswith(prefix)}


def test_resnet50_into_groupnorm_msht_reports_the_bn_statistics(tmp_path, resnet50_state):
    path = tmp_path / "r50.safetensors"
    from safetensors.torch import save_file

    save_file(resnet50_state, str(path))
    report = backbones.load_init(path, model="msht", norm="gn").load_report
    assert any(k.endswith("running_mean") for k in report.unexpected)
    assert "cnn.layer1.0.bn1.weight" in report.loaded


def test_weights_for_another_architecture_are_an_error(tmp_path, resnet50_state):
    path = tmp_path / "r50.pth"
    torch.save(resnet50_state, path)
    with pytest.raises(CheckpointError, match="another architecture"):
        backbones.load_init(path, model="msht_tiny")  # only the 7x7 stem would fit
    torch.save({"foo.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="no tensor matches"):
        backbones.load_init(path, model="msht_tiny")


def test_load_init_resolves_every_kind_of_spec(tmp_path):
    assert backbones.load_init("msht_tiny").registry_name == "msht_tiny"
    assert backbones.load_init("timm:resnet18").embed_dim == 512
    saved = _tiny()
    backbones.save(saved, tmp_path / "run")
    with_head = backbones.load_init(tmp_path / "run", num_classes=2)
    assert with_head.num_classes == 2 and set(with_head.load_report.missing) == {"head.weight", "head.bias"}
    assert torch.equal(with_head.cnn.conv1.weight, saved.cnn.conv1.weight)
    torch.save(saved.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ConfigError, match="arch=msht"):
        backbones.load_init(tmp_path / "sd.pt")
    assert backbones.load_init(tmp_path / "sd.pt", model="msht_tiny").load_report.missing == []
    with pytest.raises(ConfigError, match="neither"):
        backbones.load_init("no_such_thing")


def test_a_backbone_saved_at_one_native_size_loads_at_another(tmp_path):
    small = _tiny(img_size=128)
    backbones.save(small, tmp_path)
    large = backbones.load_init(tmp_path, img_size=256)
    assert large.pos_embed.shape == (1, 1 + 8 * 8, 192)
    assert large.load_report.missing == [] and large.load_report.mismatched == []
    resampled = small._resampled_pos_embed((8, 8))
    assert torch.allclose(large.pos_embed, resampled)


# ====== ablation switches ======


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_msht_parameter_count_matches_the_paper():
    with torch.device("meta"):
        model = backbones.create("msht")
    parts = {
        "cnn": _count(model.cnn),
        "decoders": _count(model.decoders),
        "focus": _count(model.focus),
    }
    assert abs(_count(model) / 1e6 - 87.8) < 0.05
    assert abs(parts["cnn"] / 1e6 - 23.5) < 0.05
    assert abs(parts["decoders"] / 1e6 - 56.7) < 0.05
    assert abs(parts["focus"] / 1e6 - 5.9) < 0.05


def test_attention_module_switch():
    simam, se, cbam, none = (_tiny(attn_module=k) for k in ("simam", "se", "cbam", "none"))
    assert sum(isinstance(m, SimAM) for m in simam.modules()) == 5  # stream + four focus modules
    assert _count(simam) == _count(none)  # SimAM is parameter-free
    assert _count(se) > _count(none) and _count(cbam) > _count(none)
    assert type(se.focus[0].attn).__name__ == "SEModule" and type(cbam.focus[0].attn).__name__ == "CbamModule"
    assert isinstance(none.stream_attn, nn.Identity)


def test_simam_weights_outliers_up_and_leaves_flat_maps_at_sigmoid_half():
    flat = torch.full((1, 2, 4, 4), 3.0)
    assert torch.allclose(SimAM()(flat), flat * torch.sigmoid(torch.tensor(0.5)))
    x = torch.zeros(1, 1, 4, 4)
    x[..., 1, 2] = 1.0
    weights = SimAM()(x + 1) / (x + 1)
    assert weights[..., 1, 2] > weights[..., 0, 0]


def test_class_token_off_mean_pools():
    model = _tiny(class_token=False).eval()
    assert model.cls_token is None and model.num_prefix_tokens == 0
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 6, 192)
        assert torch.allclose(model.forward_embedding(x), tokens.mean(dim=1))
    assert _count(_tiny()) - _count(model) == 192 + 192  # the cls token and its position


def test_position_embedding_off_removes_it():
    model = _tiny(pos_embed=False)
    assert model.pos_embed is None
    assert _count(_tiny()) - _count(model) == (1 + 7 * 7) * 192


def test_three_stages_drop_one_decoder_and_focus_module():
    three = _tiny(focus_stages=(2, 3, 4))
    assert len(three.decoders) == 3 and len(three.focus) == 3
    assert "decoder1" not in three.cam_target_layers()
    with torch.no_grad():
        assert three(torch.randn(1, 3, 64, 64)).shape == (1, 192)
    with pytest.raises(ConfigError, match="focus_stages"):
        _tiny(focus_stages=(3, 5))


def test_groupnorm_cnn_does_not_couple_the_samples_of_a_batch():
    x = torch.randn(4, 3, 64, 64)
    for norm, coupled in (("bn", True), ("gn", False)):
        model = _tiny(norm=norm).train()
        kinds = {type(m) for m in model.cnn.modules()}
        assert (nn.BatchNorm2d in kinds) == coupled and (nn.GroupNorm in kinds) != coupled
        with torch.no_grad():
            alone, in_batch = model.forward_embedding(x[:2]), model.forward_embedding(x)[:2]
        assert torch.allclose(alone, in_batch, atol=1e-5) != coupled


# ====== guided attention and explainability ======


def test_guided_attention_map_comes_from_the_stage_and_values_from_the_stream():
    attn = GuidedAttention(16, num_heads=2)
    attn.keep_attn = True
    q, k, v = torch.randn(3, 1, 5, 16).unbind(0)
    out = attn(q, k, v)
    first = attn.attn_map.clone()
    attn(q, k, torch.randn(1, 5, 16))
    assert torch.equal(attn.attn_map, first)  # new values, same map
    attn(torch.randn(1, 5, 16), k, v)
    assert not torch.allclose(attn.attn_map, first)  # new queries, new map
    attn.keep_attn = False
    assert torch.allclose(attn(q, k, v), out, atol=1e-6)  # fused and explicit paths agree


def test_attention_maps_and_grad_cam_targets():
    from pytorch_grad_cam import GradCAM

    model = _tiny(num_classes=2).eval()
    x = torch.randn(2, 3, 64, 96)
    maps = model.attention_maps(x)
    assert list(maps) == ["decoder1", "decoder2", "decoder3", "decoder4"]
    assert maps["decoder4"].shape == (2, 3, 7, 7)
    assert torch.allclose(maps["decoder1"].sum(-1), torch.ones(2, 3, 7))
    assert all(m.attn_map is None for m in (d.guided_attn for d in model.decoders))  # flag is reset

    targets = backbones.cam_target_layers(model)
    assert set(targets) == {f"cnn.stage{i}" for i in range(1, 5)} | {f"decoder{i}" for i in range(1, 5)}
    for layer in ("decoder4", "cnn.stage4"):
        cam = GradCAM(model, [targets[layer]], reshape_transform=backbones.reshape_transform(model))
        heat = cam(x, targets=None)
        assert heat.shape == (2, 64, 96)


# ====== parameter groups ======


def _parts(model) -> dict[str, set[str]]:
    """Parameter names per part, as the optimizer groups give them."""
    groups = backbones.param_groups(model, {"cnn": 1.0, "transformer": 2.0, "head": 3.0}, 0.1,
                                    part_of=lambda name: backbones.group_of(model, name))
    parts: dict[str, set[str]] = {}
    for g in groups:
        parts.setdefault(g["part"], set()).update(g["names"])
        assert g["lr"] == {"cnn": 1.0, "transformer": 2.0, "head": 3.0}[g["part"]]
    return parts


def test_param_groups_split_cnn_transformer_head():
    model = _tiny(num_classes=2)
    names = _parts(model)
    assert set(names) == {"cnn", "transformer", "head"}
    assert names["head"] == {"head.weight", "head.bias"}
    assert all(n.startswith("cnn.") for n in names["cnn"])
    assert "pos_embed" in names["transformer"] and "focus.0.gaze_proj.weight" in names["transformer"]
    assert sum(len(v) for v in names.values()) == len(list(model.parameters()))
    no_decay = {n for g in backbones.param_groups(model, 1.0, 0.1) if g["weight_decay"] == 0 for n in g["names"]}
    assert "pos_embed" in no_decay and "head.bias" in no_decay and "head.weight" not in no_decay  # timm's convention
    assert set(_parts(backbones.create("timm:resnet18", num_classes=2))) == {"cnn", "head"}
    assert set(_parts(backbones.create("timm:vit_tiny_patch16_224", num_classes=2))) == {"transformer", "head"}
    hybrid_groups = {
        backbones.group_of(backbones.create("hybrid_vit", depth=1), "patch_embed.backbone.conv1.weight")
    }
    assert hybrid_groups == {"cnn"}


def test_timm_features_only_works_for_the_msht_family():
    import timm

    for name in ("msht_tiny", "msht_small"):
        features = timm.create_model(name, features_only=True, out_indices=(0, 2, 4))
        out = features(torch.rand(1, 3, 96, 128))
        assert [tuple(o.shape[-2:]) for o in out] == [(24, 32), (6, 8), (3, 4)]
        assert [o.shape[1] for o in out] == features.feature_info.channels()
        assert features.feature_info.reduction() == [4, 16, 32]


def test_set_input_size_resamples_the_position_embedding_once():
    model = backbones.create("msht_tiny", img_size=64).eval()
    x = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        before = model.forward_embedding(x)
        model.set_input_size(160)
        after = model.forward_embedding(x)
    assert model.pos_embed.shape[1] == 1 + 5 * 5 and model.registry_kwargs["img_size"] == 160
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)  # the same numbers, now without resampling
