"""The label-free criterion: not degenerate on the working grid, refuses collapsed candidates, ranks."""

import numpy as np
import pytest

from ConvLoRASegLib import selection
from ConvLoRASegLib.segment import agreement


def _ball(n=40, r=12.0, shift=0):
    z, y, x = np.mgrid[:n, :n, :n]
    return (((z - n / 2 - shift) ** 2 + (y - n / 2) ** 2 + (x - n / 2) ** 2) <= r * r).astype(np.float32)


def test_one_voxel_offset_is_agreement_on_a_2mm_grid():
    """At 1 mm tolerance on a 2 mm grid only coinciding surfels count: a one-voxel shift lost a quarter."""
    a, b = _ball(), _ball(shift=1)
    assert agreement(a, b, 2.0) > 0.95
    assert agreement(a, b, 2.0, tolerance_mm=1.0) < 0.8  # the old, degenerate tolerance


def test_empty_masks_do_not_agree():
    empty = np.zeros((20, 20, 20), np.float32)
    assert agreement(empty, empty, 2.0) == 0.0
    assert agreement(_ball(20, 5), empty, 2.0) == 0.0


def test_collapsed_or_exploded_candidates_are_refused():
    spacing = 2.0
    brain = _ball(80, 34)  # ~ 1320 ml at 2 mm
    s = selection.score_volume(brain, brain, spacing)
    assert s.plausible and s.value == pytest.approx(1.0) and 1000 < s.brain_ml < 1600
    tiny = _ball(80, 6)
    assert not selection.score_volume(tiny, tiny, spacing).plausible
    assert selection.score_volume(tiny, tiny, spacing).value == 0.0
    whole = np.ones((80, 80, 80), np.float32)  # 4096 ml: the whole field of view
    assert selection.score_volume(whole, whole, spacing).value == 0.0


def test_choose_says_no_unless_a_candidate_beats_the_source():
    assert selection.choose({"source": 0.8, "adabn": 0.8}, ["source", "adabn"]) == "source"
    assert selection.choose({"source": 0.8, "adabn": 0.7, "epoch 2": 0.79}) == "source"
    assert selection.choose({"source": 0.8, "adabn": 0.81, "epoch 2": 0.79}) == "adabn"
    assert selection.choose({"adabn": 0.2, "epoch 1": 0.3}) == "epoch 1"


def test_spearman():
    assert selection.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert selection.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(selection.spearman([1, 2], [1, 2]))


def test_a_candidate_less_consistent_than_the_source_is_refused():
    """Training pushes the ESH towards the final output, so agreement alone rises with every epoch; a candidate
    whose final mask became less stable under intensity perturbations than the source's is not taken."""
    table = {"source": 0.60, "adabn": 0.62, "epoch 3": 0.66}
    cons = {"source": 0.80, "adabn": 0.81, "epoch 3": 0.75}
    assert selection.choose(table, ["source", "adabn"]) == "epoch 3"
    assert selection.choose(table, ["source", "adabn"], consistency=cons) == "adabn"
    assert selection.choose(table, ["source"], consistency={**cons, "adabn": 0.7}) == "source"


def test_consistency_comes_from_perturbed_passes():
    brain = _ball(40, 14)
    shifted = _ball(40, 14, shift=3)
    s = selection.score_volume(brain, brain, 2.0, perturbed=[shifted, brain])
    assert s.agreement == pytest.approx(1.0) and s.consistency < 1.0
    assert s.value == pytest.approx(0.5 * (s.agreement + s.consistency)) or not s.plausible
    xs = selection.perturbed_inputs(np.full((2, 4, 4), 0.5, np.float32))
    assert [float(x.max()) for x in xs] == pytest.approx([0.5 ** g for g in selection.CONSISTENCY_GAMMAS])
