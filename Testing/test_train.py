"""Source training: the output-scale initialisation, validation tolerance, checkpoints and --resume, 3D augmentation.

Tiny nets (4 filters) on 32 x 32 slices: each test runs in seconds on one CPU thread.
"""

import numpy as np
import pytest
import torch

from ConvLoRASegLib import train as train_mod
from ConvLoRASegLib.errors import Cancelled, ConvLoRASegError
from ConvLoRASegLib.grid import WorkingGrid
from ConvLoRASegLib.model import ConvLoRASegModel
from ConvLoRASegLib.train import OUT_SCALE, train_source

GRID = WorkingGrid(spacing_mm=4.0, slice_size=32)


def _volume(seed, n=10, size=32):
    rng = np.random.default_rng(seed)
    k, j, i = np.mgrid[:n, :size, :size]
    c = np.array([n / 2, size / 2, size / 2]) + rng.uniform(-2, 2, 3)
    r = np.sqrt(((k - c[0]) * 3.0) ** 2 + (j - c[1]) ** 2 + (i - c[2]) ** 2)
    mask = (r < 9).astype(np.uint8)
    img = np.clip(0.3 * (r < 13) + 0.5 * mask + rng.normal(0, 0.05, mask.shape), 0, 1).astype(np.float32)
    return img, mask


def _data():
    vols = [_volume(s) for s in range(3)]
    return [v[0] for v in vols[:2]], [v[1] for v in vols[:2]], [vols[2][0]], [vols[2][1]]


KW = dict(grid=GRID, n_filters=4, epochs=2, esh_epochs=1, batch_size=4, steps_per_epoch=3, precision="fp32",
          device="cpu", seed=1)


def test_new_training_starts_with_sharp_output_scale():
    xi, yi, xv, yv = _data()
    model = train_source(xi, yi, xv, yv, **KW)
    w = float(model.unet.out_path[2].weight.detach())
    assert OUT_SCALE >= 4 and abs(w - OUT_SCALE) < 0.1  # moved by ~lr per step from its start, not from 1
    assert model.info["training"]["output_scale"] == pytest.approx(w, abs=1e-3)
    assert model.info["training"]["out_scale"] == OUT_SCALE
    # the layout is unchanged: a fresh model loads the weights strictly
    ConvLoRASegModel(grid=GRID, n_filters=4).load_state_dict(model.state_dict(), strict=True)
    soft = train_source(xi, yi, xv, yv, out_scale=1.0, **KW)
    assert abs(float(soft.unet.out_path[2].weight.detach()) - 1.0) < 0.1


def test_output_lr_multiplier_moves_the_scale_faster():
    xi, yi, xv, yv = _data()
    slow = train_source(xi, yi, xv, yv, out_scale=1.0, **KW)
    fast = train_source(xi, yi, xv, yv, out_scale=1.0, out_lr_mult=20.0, **KW)
    d_slow = abs(float(slow.unet.out_path[2].weight.detach()) - 1.0)
    d_fast = abs(float(fast.unet.out_path[2].weight.detach()) - 1.0)
    assert d_fast > 5 * d_slow


def test_validation_tolerance_is_the_grid_spacing(monkeypatch):
    img, mask = _volume(0)
    shifted = np.roll(mask, 1, axis=2)  # one working voxel off
    monkeypatch.setattr(train_mod, "predict_slices", lambda model, x, dev, precision: shifted.astype(np.float32))
    model = ConvLoRASegModel(grid=GRID, n_filters=4)
    assert train_mod._val_score(model, [img], [mask], torch.device("cpu")) == pytest.approx(1.0)
    assert train_mod._val_score(model, [img], [mask], torch.device("cpu"), tolerance_mm=1.0) < 0.9


def _stop_after(n):
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > n
    return should_stop


@pytest.mark.parametrize("stop_after", [2, 4])  # mid-epoch 1; right after epoch 1's checkpoint + 1 step
def test_resumed_training_equals_uninterrupted(tmp_path, stop_after):
    xi, yi, xv, yv = _data()
    whole = train_source(xi, yi, xv, yv, lr_schedule="cosine", checkpoint=tmp_path / "a.safetensors",
                         checkpoint_every=1, **KW)
    ckpt = tmp_path / "b.safetensors"
    with pytest.raises(Cancelled):
        train_source(xi, yi, xv, yv, lr_schedule="cosine", checkpoint=ckpt, checkpoint_every=1,
                     should_stop=_stop_after(stop_after), **KW)
    assert ckpt.is_file()
    resumed = train_source(xi, yi, xv, yv, lr_schedule="cosine", checkpoint=ckpt, checkpoint_every=1, resume=True,
                           **KW)
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    rec = resumed.info["training"]
    assert rec["resumed_at_steps"] and rec["val_surface_dice"] == whole.info["training"]["val_surface_dice"]


def test_resume_refuses_other_settings(tmp_path):
    xi, yi, xv, yv = _data()
    ckpt = tmp_path / "c.safetensors"
    with pytest.raises(Cancelled):
        train_source(xi, yi, xv, yv, checkpoint=ckpt, checkpoint_every=1, should_stop=_stop_after(2), **KW)
    with pytest.raises(ConvLoRASegError, match="other settings.*lr"):
        train_source(xi, yi, xv, yv, checkpoint=ckpt, resume=True, lr=5e-4, **KW)


def test_checkpoint_is_not_a_model(tmp_path):
    from ConvLoRASegLib.store import load_model

    xi, yi, xv, yv = _data()
    ckpt = tmp_path / "d.safetensors"
    train_source(xi, yi, xv, yv, checkpoint=ckpt, **KW)
    with pytest.raises(ConvLoRASegError, match="training checkpoint"):
        load_model(ckpt)


def test_augment_volume_is_seeded_and_keeps_shape():
    pytest.importorskip("torchio")
    from ConvLoRASegLib.augment import augment_volume

    img, mask = _volume(0, n=24, size=32)
    torch.manual_seed(5)
    a1, m1 = augment_volume(img, mask, 4.0, seed=3)
    after_a = torch.rand(1)
    torch.manual_seed(5)
    a2, m2 = augment_volume(img, mask, 4.0, seed=3)
    after_b = torch.rand(1)
    assert np.array_equal(a1, a2) and np.array_equal(m1, m2)
    assert torch.equal(after_a, after_b)  # the caller's random stream is untouched
    assert a1.shape == img.shape and m1.dtype == np.uint8 and set(np.unique(m1)) <= {0, 1}
    assert a1.min() >= 0 and a1.max() <= 1 and m1.sum() > 0.3 * mask.sum()


def _head(seed=0, n=24, size=32):
    """A sphere of brain (0.5) inside a shell of scalp (0.9), air with noise around it."""
    rng = np.random.default_rng(seed)
    k, j, i = np.mgrid[:n, :size, :size]
    r = np.sqrt(((k - n / 2) * 1.3) ** 2 + (j - size / 2) ** 2 + (i - size / 2) ** 2)
    mask = (r < 9).astype(np.uint8)
    img = np.where(mask, 0.5, np.where(r < 13, 0.9, 0.0)) + rng.normal(0, 0.02, mask.shape)
    return np.clip(img, 0, 1).astype(np.float32), mask, r


def test_tissue_labels_split_brain_head_and_air():
    from ConvLoRASegLib.augment import SYNTH, tissue_labels

    img, mask, r = _head()
    img[(r > 15) & (np.random.default_rng(1).random(img.shape) < 0.02)] = 0.3  # specks of noise in the air
    lab = tissue_labels(img, mask)
    b = SYNTH["brain_classes"]
    assert lab.dtype == np.uint8 and lab.shape == img.shape
    assert np.all((lab[mask == 1] >= 1) & (lab[mask == 1] <= b))
    shell = (r > 10) & (r < 12)
    assert np.all(lab[shell] > b)
    assert np.all(lab[r > 16] == 0)  # the specks stay air: only the head's connected piece is head


def _scalp_brighter(a, m):
    """Is the ring 1-3 voxels outside the mask (the scalp shell) brighter than the mask's core?"""
    from scipy import ndimage

    core = ndimage.binary_erosion(m, iterations=2)
    ring = ndimage.binary_dilation(m, iterations=3) & ~ndimage.binary_dilation(m, iterations=1)
    return float(np.median(a[ring])) > float(np.median(a[core]))


def test_synthesis_gives_scalp_any_brightness_and_keeps_the_mask():
    """With synth=1 the scalp is sometimes darker, sometimes brighter than the brain (in the input and in plain
    augmented copies it is always brighter); the mask still follows the geometry. Fails if synthesis is a no-op."""
    pytest.importorskip("torchio")
    from ConvLoRASegLib.augment import augment_volume

    img, mask, _ = _head()
    brighter = []
    for seed in range(8):
        a, m = augment_volume(img, mask, 4.0, seed=seed, synth=1.0)
        assert m.sum() > 0.3 * mask.sum()
        brighter.append(_scalp_brighter(a, m))
    assert any(brighter) and not all(brighter)
    assert all(_scalp_brighter(*augment_volume(img, mask, 4.0, seed=s)) for s in range(4))
    a1, _ = augment_volume(img, mask, 4.0, seed=2, synth=1.0)
    a2, _ = augment_volume(img, mask, 4.0, seed=2, synth=1.0)
    assert np.array_equal(a1, a2)
    with pytest.raises(ConvLoRASegError, match="synth"):
        augment_volume(img, mask, 4.0, seed=0, synth=1.5)


def test_synth_needs_3d_augmentation_and_is_recorded():
    pytest.importorskip("torchio")
    xi, yi, xv, yv = _data()
    with pytest.raises(ConvLoRASegError, match="augment_3d"):
        train_source(xi, yi, xv, yv, synth=0.5, **KW)
    model = train_source(xi, yi, xv, yv, augment_3d=1, synth=0.5, **{**KW, "epochs": 1})
    rec = model.info["training"]
    assert rec["synth"] == 0.5 and rec["augment_3d_recipe"]["synth"]["brain_classes"] >= 2


def test_bias_field_coefficient_scales_only_the_field():
    """The same seed with coefficient 0 and 1.5: every other draw is the same, so the two copies differ by a smooth
    multiplicative field alone; it is strong (the real scan it is for spans 1.57 in log intensity) on the copies
    where the field is drawn, and absent with coefficient 0. Fails if the option is not passed to TorchIO."""
    pytest.importorskip("torchio")
    from ConvLoRASegLib.augment import augment_volume, recipe, RECIPE

    img, mask, _ = _head()
    spans = []
    for seed in range(6):
        flat, m0 = augment_volume(img, mask, 4.0, seed=seed, bias_field=0.0)
        strong, m1 = augment_volume(img, mask, 4.0, seed=seed, bias_field=1.5)
        assert np.array_equal(m0, m1)
        inside = (m0 > 0) & (flat > 0.05) & (strong > 0.05)
        ratio = np.log(strong[inside] / flat[inside])
        spans.append(float(np.percentile(ratio, 95) - np.percentile(ratio, 5)))
    assert max(spans) > 0.5 and min(spans) < 0.05  # drawn on some copies (p 0.6), not on others
    default, _ = augment_volume(img, mask, 4.0, seed=3)
    same, _ = augment_volume(img, mask, 4.0, seed=3, bias_field=RECIPE["bias_field"]["coefficients"])
    assert np.array_equal(default, same)
    assert recipe(1.5)["bias_field"] == {"coefficients": 1.5, "p": RECIPE["bias_field"]["p"]}
    assert recipe() is RECIPE and RECIPE["bias_field"]["coefficients"] == 0.6
    with pytest.raises(ConvLoRASegError, match="bias field"):
        augment_volume(img, mask, 4.0, seed=0, bias_field=-1.0)


def test_bias_field_needs_3d_augmentation_and_is_recorded():
    pytest.importorskip("torchio")
    xi, yi, xv, yv = _data()
    with pytest.raises(ConvLoRASegError, match="augment_3d"):
        train_source(xi, yi, xv, yv, bias_field=1.2, **KW)
    with pytest.raises(ConvLoRASegError, match="bias field"):
        train_source(xi, yi, xv, yv, augment_3d=1, bias_field=float("nan"), **KW)
    model = train_source(xi, yi, xv, yv, augment_3d=1, bias_field=1.2, **{**KW, "epochs": 1})
    rec = model.info["training"]
    assert rec["bias_field"] == 1.2 and rec["augment_3d_recipe"]["bias_field"]["coefficients"] == 1.2
    plain = train_source(xi, yi, xv, yv, augment_3d=1, **{**KW, "epochs": 1})
    assert "bias_field" not in plain.info["training"]  # earlier records stay as they were
    assert plain.info["training"]["augment_3d_recipe"]["bias_field"]["coefficients"] == 0.6


def test_training_with_3d_augmentation_records_the_recipe():
    pytest.importorskip("torchio")
    xi, yi, xv, yv = _data()
    model = train_source(xi, yi, xv, yv, augment_3d=1, **KW)
    rec = model.info["training"]
    assert rec["augment_3d"] == 1 and rec["augment_3d_recipe"]["library"] == "torchio"
    assert rec["steps_per_epoch"] == 3 and rec["total_steps"] == 6


def test_cli_default_out_scale_matches_the_library():
    from ConvLoRASegLib import cli

    assert cli.OUT_SCALE_DEFAULT == OUT_SCALE


def test_fp16_training_uses_a_gradient_scaler(scaled_steps):
    """fp16 autocast without a scaler lets small gradients underflow to zero."""
    xi, yi, xv, yv = _data()
    train_source(xi, yi, xv, yv, **{**KW, "precision": "fp16", "epochs": 1})
    assert scaled_steps and all(scaled_steps)


# ------------------------------------------------------------------------------------- partial-volume targets

def _fractions(mask: np.ndarray) -> np.ndarray:
    """A 0/1 mask's surface softened: fractions in (0, 1) on a one-voxel band, 0 and 1 elsewhere."""
    from scipy import ndimage

    return np.clip(ndimage.uniform_filter(mask.astype(np.float32), 3), 0.0, 1.0).astype(np.float32)


def test_augment_volume_moves_fractions_like_the_label_and_leaves_their_values_alone():
    """Partial-volume targets follow the same spatial draw as a label map (same seed), keep fractions, and get no
    intensity transform (no noise, bias field or gamma: the core stays exactly 1 and the far air exactly 0)."""
    pytest.importorskip("torchio")
    from ConvLoRASegLib.augment import augment_volume

    img, mask, _ = _head()
    for seed in range(3):
        a_bin, m_bin = augment_volume(img, mask, 4.0, seed=seed)
        a_pv, m_pv = augment_volume(img, _fractions(mask), 4.0, seed=seed, partial_volume=True)
        assert m_pv.dtype == np.float32 and m_pv.min() >= 0.0 and m_pv.max() <= 1.0
        assert np.count_nonzero((m_pv > 0.05) & (m_pv < 0.95)) > 0.1 * np.count_nonzero(m_pv >= 0.5)
        inter = np.count_nonzero((m_pv >= 0.5) & (m_bin > 0))
        assert 2 * inter / (np.count_nonzero(m_pv >= 0.5) + np.count_nonzero(m_bin)) > 0.9
        assert np.count_nonzero(m_pv == 1.0) > 0.3 * np.count_nonzero(m_bin)  # no noise or gamma on the core
        assert np.allclose(a_pv, a_bin, atol=1e-5)  # the image gets the same draw as with a label map


def test_augment_batch_keeps_partial_volume_fractions():
    x = torch.rand(4, 1, 32, 32)
    y = torch.from_numpy(_fractions(_volume(0, n=4)[1]))[:, None]
    _, y_bin = train_mod.augment_batch(x, y, torch.Generator().manual_seed(0))
    _, y_pv = train_mod.augment_batch(x, y, torch.Generator().manual_seed(0), partial_volume=True)
    assert set(torch.unique(y_bin).tolist()) <= {0.0, 1.0}
    assert float(((y_pv > 0.05) & (y_pv < 0.95)).float().mean()) > 0.01
    assert float(y_pv.min()) >= 0.0 and float(y_pv.max()) <= 1.0
    assert torch.equal(y_bin, (y_pv >= 0.5).float())


def test_partial_volume_training_is_recorded_and_checked():
    pytest.importorskip("torchio")
    xi, yi, xv, yv = _data()
    with pytest.raises(ConvLoRASegError, match="targets"):
        train_source(xi, yi, xv, yv, targets="soft", **KW)
    binary = train_source(xi, yi, xv, yv, **{**KW, "epochs": 1})
    assert "targets" not in binary.info["training"]  # binary records stay as they were
    pv = train_source(xi, [_fractions(m) for m in yi], xv, yv, augment_3d=1, targets="partial_volume",
                      **{**KW, "epochs": 1})
    assert pv.info["training"]["targets"] == "partial_volume"
