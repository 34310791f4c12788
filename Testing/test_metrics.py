"""ConvLoRASegLib.metrics against DeepMind's surface-distance package and analytic cases."""

import numpy as np
import pytest
from scipy import ndimage

import surface_distance as deepmind
from surface_distance import lookup_tables as deepmind_tables

from ConvLoRASegLib import metrics
from ConvLoRASegLib.errors import ConvLoRASegError

SPACINGS = [(1.0, 0.889, 1.33), (2.0, 2.0, 3.0)]


def smooth_blob(shape, seed, sigma=3.0, quantile=0.6):
    """A random smooth 3D shape: thresholded gaussian-blurred noise."""
    noise = np.random.default_rng(seed).standard_normal(shape)
    field = ndimage.gaussian_filter(noise, sigma)
    return field > np.quantile(field, quantile)


def mask_pair(seed):
    truth = smooth_blob((28, 32, 26), seed)
    pred = smooth_blob((28, 32, 26), seed + 1000) | ndimage.binary_erosion(truth)
    return pred, truth


@pytest.mark.parametrize("spacing", SPACINGS + [(0.5, 1.7, 2.9)])
def test_area_table_matches_deepmind(spacing):
    mine = metrics._surfel_area_table(spacing)
    theirs = deepmind_tables.create_table_neighbour_code_to_surface_area(spacing)
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-12)


def test_contour_table_matches_deepmind_2d():
    mine = metrics._surfel_area_table((0.7, 1.3))
    theirs = deepmind_tables.create_table_neighbour_code_to_contour_length((0.7, 1.3))
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_surface_metrics_match_deepmind(seed, spacing):
    pred, truth = mask_pair(seed)
    reference = deepmind.compute_surface_distances(truth, pred, spacing)
    for tolerance in (1.0, 2.0):
        expected = deepmind.compute_surface_dice_at_tolerance(reference, tolerance)
        got = metrics.surface_dice(pred, truth, spacing, tolerance)
        assert 0.0 < got < 1.0
        assert got == pytest.approx(expected, abs=1e-3)
        assert got == pytest.approx(expected, abs=1e-9)  # in practice identical
    expected_hd = deepmind.compute_robust_hausdorff(reference, 95)
    assert metrics.hd95(pred, truth, spacing) == pytest.approx(expected_hd, abs=1e-6)


def test_surface_metrics_match_deepmind_2d():
    truth = ndimage.gaussian_filter(np.random.default_rng(5).standard_normal((50, 60)), 3) > 0
    pred = ndimage.binary_dilation(truth, iterations=2)
    reference = deepmind.compute_surface_distances(truth, pred, (1.0, 1.5))
    assert metrics.surface_dice(pred, truth, (1.0, 1.5), 1.0) == pytest.approx(
        deepmind.compute_surface_dice_at_tolerance(reference, 1.0), abs=1e-9)
    assert metrics.hd95(pred, truth, (1.0, 1.5)) == pytest.approx(
        deepmind.compute_robust_hausdorff(reference, 95), abs=1e-9)


def test_dice_exact():
    pred, truth = mask_pair(3)
    expected = deepmind.compute_dice_coefficient(truth, pred)
    assert metrics.dice(pred, truth) == expected
    assert metrics.dice(pred.astype(np.uint8) * 7, truth.astype(np.int16)) == expected
    a = np.zeros((4, 4, 4), bool); a[:2] = True
    b = np.zeros((4, 4, 4), bool); b[1:3] = True
    assert metrics.dice(a, b) == 0.5


def test_identical_masks():
    _, truth = mask_pair(4)
    assert metrics.surface_dice(truth, truth, (1.0, 0.889, 1.33), 0.0) == 1.0
    assert metrics.hd95(truth, truth, (2, 2, 3)) == 0.0
    assert metrics.dice(truth, truth) == 1.0


def test_disjoint_far_apart():
    a = np.zeros((40, 12, 12), bool); a[2:8, 3:9, 3:9] = True
    b = np.zeros((40, 12, 12), bool); b[30:36, 3:9, 3:9] = True
    assert metrics.dice(a, b) == 0.0
    assert metrics.surface_dice(a, b, (1, 1, 1), 2.0) == 0.0
    # Boxes 22 voxels apart along axis 0 with 2 mm slices: the nearest faces are 44 mm apart.
    assert metrics.hd95(a, b, (2, 1, 1)) >= 44.0


def test_shifted_cube_tolerance():
    a = np.zeros((20, 20, 20), bool); a[5:15, 5:15, 5:15] = True
    b = np.roll(a, 1, axis=0)
    # Shifted one 2 mm slice: every surfel is within 2 mm of the other surface, but not all within 1 mm.
    assert metrics.surface_dice(a, b, (2, 1, 1), 2.0) == 1.0
    assert metrics.surface_dice(a, b, (2, 1, 1), 1.0) < 1.0
    assert metrics.hd95(a, b, (2, 1, 1)) == pytest.approx(2.0)


def test_empty_masks():
    empty = np.zeros((6, 6, 6), bool)
    cube = empty.copy(); cube[2:4, 2:4, 2:4] = True
    assert metrics.surface_dice(empty, empty, (1, 1, 1)) == 1.0
    assert metrics.surface_dice(cube, empty, (1, 1, 1)) == 0.0
    assert metrics.surface_dice(empty, cube, (1, 1, 1)) == 0.0
    assert metrics.hd95(cube, empty, (1, 1, 1)) == float("inf")
    assert metrics.hd95(empty, empty, (1, 1, 1)) == 0.0
    assert metrics.dice(empty, empty) == 1.0


def test_volume_difference():
    a = np.zeros((10, 10, 10), bool); a[:5] = True      # 500 voxels
    b = np.zeros((10, 10, 10), bool); b[:4] = True      # 400 voxels
    result = metrics.volume_difference(a, b, (2.0, 1.0, 1.0))
    assert result["pred_ml"] == pytest.approx(1.0)
    assert result["truth_ml"] == pytest.approx(0.8)
    assert result["diff_ml"] == pytest.approx(0.2)
    assert result["relative"] == pytest.approx(0.25)
    assert metrics.volume_difference(a, np.zeros_like(a), (1, 1, 1))["relative"] == float("inf")


def test_bad_inputs():
    a = np.zeros((4, 4, 4), bool)
    with pytest.raises(ConvLoRASegError, match="shape"):
        metrics.dice(a, np.zeros((4, 4, 5), bool))
    with pytest.raises(ConvLoRASegError, match="Spacing"):
        metrics.surface_dice(a, a, (1.0, 1.0))
    with pytest.raises(ConvLoRASegError, match="Spacing"):
        metrics.hd95(a, a, (1.0, 0.0, 1.0))


def _tree_surface_dice(pred, truth, spacing, tolerance):
    """Surface Dice through the k-d tree whatever the tolerance (the path beyond LATTICE_OFFSETS_MAX offsets)."""
    cap = metrics.LATTICE_OFFSETS_MAX
    metrics._lattice_offsets.cache_clear()
    try:
        metrics.LATTICE_OFFSETS_MAX = 0
        return metrics.surface_dice(pred, truth, spacing, tolerance)
    finally:
        metrics.LATTICE_OFFSETS_MAX = cap
        metrics._lattice_offsets.cache_clear()


@pytest.mark.parametrize("spacing", [(1, 1, 1), (2, 2, 2), (1.0, 0.889, 1.33), (2, 2, 6), (1.2, 1.2, 1.2),
                                     (0.9375, 0.9375, 1.2)])
def test_lattice_offsets_and_tree_agree(spacing):
    """The shifted-surfel path and the k-d tree give the same number, also where the tolerance equals a spacing
    that binary floats cannot hold (1.2 mm): a neighbour exactly one voxel away counts as within it."""
    pred, truth = mask_pair(7)
    for tolerance in (0.0, 0.5, 1.0, min(spacing), 2.0):
        assert metrics._lattice_offsets(tuple(float(s) for s in spacing), float(tolerance)) is not None
        fast = metrics.surface_dice(pred, truth, spacing, tolerance)
        assert fast == _tree_surface_dice(pred, truth, spacing, tolerance)
    # one voxel at 1.2 mm: the same score wherever the pair sits in the array (no rounding of index x spacing)
    moved = [np.pad(m, ((5, 0), (0, 3), (11, 0))) for m in (pred, truth)]
    assert metrics.surface_dice(*moved, (1.2, 1.2, 1.2), 1.2) == metrics.surface_dice(pred, truth, (1.2,) * 3, 1.2)
    assert metrics.surface_dice(pred, truth, (1.2,) * 3, 1.2) > metrics.surface_dice(pred, truth, (1.2,) * 3, 1.19)


def test_lattice_offsets():
    assert len(metrics._lattice_offsets((1.0, 1.0, 1.0), 1.0)) == 7          # itself and its 6 face neighbours
    assert len(metrics._lattice_offsets((2.0, 2.0, 2.0), 1.0)) == 1
    assert len(metrics._lattice_offsets((1.0, 1.0, 1.0), 1.5)) == 19         # + the 12 edge neighbours (1.41)
    assert metrics._lattice_offsets((0.5, 0.5, 0.5), 3.0) is None             # too many: the k-d tree
