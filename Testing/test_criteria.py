"""bench/criteria.py: the experimental label-free criteria on a tiny model, and the rules judged on rows."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import criteria  # noqa: E402


def test_criteria_of_a_model_on_a_volume():
    import torch

    from ConvLoRASegLib.grid import WorkingGrid
    from ConvLoRASegLib.model import ConvLoRASegModel

    torch.manual_seed(0)
    model = ConvLoRASegModel(grid=WorkingGrid(spacing_mm=8.0, slice_size=16), n_filters=4).eval()
    z, y, x = np.mgrid[:12, :16, :16]
    ball = ((z - 6) ** 2 + (y - 8) ** 2 + (x - 8) ** 2 < 25).astype(np.float32)
    got = criteria.criteria(model, 0.2 + 0.6 * ball, "cpu", source_final=ball)
    assert set(got) == {"rotation", "noise", "uncertain_share", "brain_ml", "source_agreement"}
    assert all(np.isfinite(v) for v in got.values())
    assert 0.0 <= got["rotation"] <= 1.0 and 0.0 <= got["noise"] <= 1.0


def test_rotation_round_trip_keeps_a_centred_disc():
    yy, xx = np.mgrid[:32, :32]
    disc = (((yy - 15.5) ** 2 + (xx - 15.5) ** 2) < 64).astype(np.float32)[None]
    back = criteria._rotate(criteria._rotate(disc, 10.0), -10.0)
    assert np.mean((back >= 0.5) == (disc >= 0.5)) > 0.99


def _cand(sd, lf, rot, noise):
    return {"surface_dice": sd, "label_free": lf, "dice": 0.9,
            "criteria": {"rotation": rot, "noise": noise, "brain_ml": 1500.0, "uncertain_share": 0.1}}


def test_vetoes_fall_back_to_the_source_and_are_counted():
    # adabn was selected (higher label-free) but is worse and less rotation-consistent: the rotation veto refuses it
    bad = {"key": "a", "method": "convlora-adabn-fast", "selected": "adabn",
           "candidates": {"source": _cand(0.60, 0.5, 0.90, 0.9), "adabn": _cand(0.50, 0.7, 0.80, 0.95),
                          "epoch 1": _cand(0.55, 0.6, 0.85, 0.9)}}
    # epoch 1 was selected, better and at least as consistent under both: kept by every veto
    good = {"key": "b", "method": "convlora-adabn-fast", "selected": "epoch 1",
            "candidates": {"source": _cand(0.40, 0.5, 0.80, 0.8), "adabn": _cand(0.45, 0.6, 0.82, 0.8),
                           "epoch 1": _cand(0.50, 0.7, 0.85, 0.85)}}
    rep = criteria.report([bad, good])
    rules = rep["rules"]
    assert rules["as run"]["below_source_0.005"] == 1 and rules["as run"]["worst"] == -0.1
    assert rules["as run, rotation veto"]["below_source_0.005"] == 0
    assert rules["as run, rotation veto"]["mean_gain"] == 0.05  # (0 + 0.1) / 2
    assert rules["as run, noise veto"]["below_source_0.005"] == 1  # adabn's noise consistency is higher
    assert rules["rotation alone"]["worst"] == 0.0  # the source is the most rotation-consistent in "bad"
    assert rep["spearman"]["rotation"]["pairs"] == 6
