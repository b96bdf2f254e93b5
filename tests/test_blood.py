"""The red-blood-cell segmenter behind ``blood_fraction``: its shipped weights read the generator's ground
truth on fields it never saw, load without unpickling, and training them again works."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def test_blood_fraction_follows_the_generators_truth_on_unseen_fields() -> None:
    from roseprior.blood import blood_fraction, visible_red_cells
    from roseprior.synth import DOMAIN_PRESETS, render_field

    truth, read = [], []
    for index in range(24):  # seed 5: fields the segmenter was not trained on (it trains on seed 1015)
        defect = "blood" if index % 3 == 0 else "none"
        image, _, scene = render_field("NP"[index % 2], index % 2, index, 256, 5, list(DOMAIN_PRESETS), 0.0, 1.0,
                                       defect)
        truth.append(float(visible_red_cells(scene).mean()))
        read.append(blood_fraction(np.asarray(image)))
    truth, read = np.array(truth), np.array(read)
    print(np.round(np.c_[truth, read], 2).tolist())
    assert np.abs(read - truth).mean() < 0.1
    assert np.corrcoef(truth, read)[0, 1] > 0.9


def test_the_shipped_weights_are_safetensors_and_a_field_of_any_size_is_read() -> None:
    from safetensors import safe_open

    from roseprior.blood import WEIGHTS, WORKING_SIDE, blood_probability

    with safe_open(str(WEIGHTS), framework="pt") as weights:  # a pickle would fail to open here
        assert any(key.startswith("stem.") for key in weights.keys())
    wide = np.full((1038, 1390, 3), 235, dtype=np.uint8)  # empty glass at a camera's full size
    probability = blood_probability(wide)
    assert probability.shape == (WORKING_SIDE, round(1390 * WORKING_SIDE / 1038))
    assert probability.mean() < 0.05


def test_training_writes_weights_that_tell_blood_from_clean_fields(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from roseprior.blood import BloodSegmenter, blood_fraction, train
    from roseprior.synth import DOMAIN_PRESETS, render_field

    torch.set_num_threads(1)
    out = train(tmp_path / "blood.safetensors", n_fields=40, steps=150, log_every=0)
    model = BloodSegmenter()
    model.load_state_dict(load_file(out))
    model.eval()
    reads = {}
    for defect in ("blood", "none"):
        reads[defect] = [blood_fraction(np.asarray(render_field("N", 0, i, 256, 5, list(DOMAIN_PRESETS), 0.0, 1.0,
                                                                   defect)[0]), model) for i in range(6)]
    print(reads)
    assert np.mean(reads["blood"]) > np.mean(reads["none"]) + 0.3
