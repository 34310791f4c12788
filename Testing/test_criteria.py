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


def _head(shift: int = 0):
    """A synthetic T1-like head on a 2 mm grid: grey-matter ball (0.45) in CSF (0.1), a dark skull shell (0.05)
    and bright scalp (0.8); and the ball's mask grown or shrunk by ``shift`` voxels."""
    z, y, x = np.mgrid[:40, :40, :40]
    r = np.sqrt((z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2)
    img = np.select([r < 10, r < 12, r < 14, r < 17], [0.45, 0.1, 0.05, 0.8], 0.0).astype(np.float32)
    return img, (r < 10 + shift).astype(np.float32)


def test_boundary_contrast_peaks_at_the_true_boundary():
    img, truth = _head()
    right = criteria.boundary_contrast(truth, img)
    assert right > 0.3  # grey matter in, CSF out
    for shift in (-2, -1, 1, 2, 3):
        assert criteria.boundary_contrast(_head(shift)[1], img) < right - 0.05
    assert np.isnan(criteria.boundary_contrast(np.zeros_like(img), img))
    assert np.isnan(criteria.boundary_contrast(np.ones_like(img), img))


def test_contrast_rules_veto_or_decide():
    lo, hi = {"contrast": 0.1}, {"contrast": 0.3}
    # C1 only ever takes the adapter away; C2 ignores the product's scores
    assert criteria.contrast_pick(hi, lo, "selected", "C1") == "source"
    assert criteria.contrast_pick(lo, hi, "selected", "C1") == "selected"
    assert criteria.contrast_pick(lo, hi, "source", "C1") == "source"
    assert criteria.contrast_pick(lo, hi, "source", "C2") == "selected"
    assert criteria.contrast_pick(hi, lo, "selected", "C2") == "source"
    assert criteria.contrast_pick({"contrast": float("nan")}, lo, "source", "C2") == "selected"
    assert criteria.contrast_pick(lo, {"contrast": float("nan")}, "selected", "C2") == "source"


def _scan(agree, cons, ml, contrast):
    return {"agreement": agree, "consistency": cons, "brain_ml": ml, "plausible": True, "contrast": contrast}


def test_contrast_report_on_table1_and_shift_rows():
    # the product's check takes the adapter (higher scores) though it is worse; its contrast is lower: C1 and C2
    # keep the source
    bad = {"key": "a", "method": "convlora-adabn-fast", "selected": "epoch 1",
           "candidates": {"source": {"surface_dice": 0.6, "label_free": 0.5, "contrast": 0.30},
                          "adabn": {"surface_dice": 0.5, "label_free": 0.6, "contrast": 0.20},
                          "epoch 1": {"surface_dice": 0.4, "label_free": 0.7, "contrast": 0.10}},
           "scan_check": {"source": _scan(0.5, 0.8, 1500, 0.30), "selected": _scan(0.7, 0.9, 1600, 0.10)}}
    rep = criteria.contrast_report([bad])["table1"]
    assert rep["rules"]["product check"]["worst"] == -0.2
    assert rep["rules"]["C1"]["below_source_0.005"] == 0 and rep["rules"]["C2"]["mean_gain"] == 0.0
    assert rep["spearman"]["contrast (evaluation scan)"]["within"] == 1.0
    assert rep["spearman"]["label_free (scoring volumes)"]["within"] == -1.0
    # shifts: one task of two scans; the adapter is better on one (higher contrast), worse on the other (lower)
    rows = []
    for vol, sd_ad, c_ad in (("v0", 0.7, 0.35), ("v1", 0.5, 0.2)):
        base = {"head": "h", "family": "fov", "seed": 0, "volume": vol}
        rows.append({**base, "key": f"s{vol}", "method": "source", "surface_dice": 0.6,
                     "scan_check": _scan(0.5, 0.8, 1500, 0.3)})
        rows.append({**base, "key": f"a{vol}", "method": "convlora-adabn-fast", "surface_dice": sd_ad,
                     "scan_check": _scan(0.7, 0.9, 1500, c_ad)})
    rep = criteria.contrast_report(shifts_rows=rows)["shifts"]
    assert rep["tasks"] == 1
    assert rep["rules"]["product check"]["mean_gain"] == 0.0  # +0.1 and -0.1
    assert rep["rules"]["C1"]["mean_gain"] == 0.05 and rep["rules"]["C2"]["mean_gain"] == 0.05
