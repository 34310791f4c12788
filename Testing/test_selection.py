"""The label-free criterion: not degenerate on the working grid, refuses collapsed candidates, ranks."""

import numpy as np
import pytest

from ConvLoRASegLib import selection
from ConvLoRASegLib.selection import agreement


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


def test_a_candidate_that_shrinks_the_brain_is_refused():
    """AdaBN without a scanner shift shrinks the mask while its scores rise (BENCHMARKS.md, "Never worse"): more than
    VOLUME_SHRINK_MAX below the source's brain volume is refused, however well it scores; growing is allowed."""
    table = {"source": 0.60, "adabn": 0.70, "epoch 1": 0.65}
    ml = {"source": 1500.0, "adabn": 1500.0 * (1 - 1.5 * selection.VOLUME_SHRINK_MAX), "epoch 1": 1499.0}
    assert selection.choose(table, ["source", "adabn"]) == "adabn"
    assert selection.choose(table, ["source", "adabn"], brain_ml=ml) == "epoch 1"
    assert selection.choose(table, ["source", "adabn"], brain_ml={**ml, "epoch 1": 1400.0}) == "source"
    assert selection.choose(table, ["source", "adabn"], brain_ml={**ml, "adabn": 1900.0}) == "adabn"
    scores = [selection.score_volume(_ball(80, 34), _ball(80, 34), 2.0)] * 2
    assert selection.CandidateScore.of(scores).brain_ml == pytest.approx(scores[0].brain_ml)


def test_the_per_scan_check_asks_for_a_margin_and_lets_a_growing_brain_through():
    """On real heads every adapter that lost accuracy had beaten the source's score by 0.02 or less, the large gains
    came with larger margins, some growing a too-small brain by 8-10 % (BENCHMARKS.md, "Real scanner shifts"): the
    check refuses a win of SCAN_CHECK_MARGIN or less, keeps a larger one whatever the growth, and the cohort
    selection (choose without a margin) keeps the small win."""
    def score(value, ml):
        return selection.VolumeScore(agreement=value, consistency=value, brain_ml=ml, plausible=True)

    m = selection.SCAN_CHECK_MARGIN
    scores = {"source": score(0.74, 1500.0), "site": score(0.74 + 0.8 * m, 1500.0)}
    assert selection.choose_volume_scores(scores) == "source"
    assert selection.choose({"source": 0.74, "site": 0.74 + 0.8 * m}, ["source"]) == "site"
    assert selection.choose_volume_scores({**scores, "site": score(0.74 + 1.5 * m, 1500.0 * 1.10)}) == "site"
    assert selection.choose_volume_scores({**scores, "site": score(0.74 + 1.5 * m, 1500.0 * 0.95)}) == "source"
    # the warning says why: a win too small, a guard, or no win at all
    small = selection.adapter_not_used("site", {"source": 0.74, "site": 0.74 + 0.5 * m})
    assert "by only" in small and "did not beat" not in small
    guarded = selection.adapter_not_used("site", {"source": 0.74, "site": 0.74 + 2 * m})
    assert "scored higher" in guarded and "shrank" in guarded
    assert "did not beat" in selection.adapter_not_used("site", {"source": 0.74, "site": 0.70})


def test_consistency_comes_from_perturbed_passes():
    brain = _ball(40, 14)
    shifted = _ball(40, 14, shift=3)
    k = len(selection.CONSISTENCY_GAMMAS)
    # each perturbed pass covers its share of the slices: every k-th one, starting at its index
    s = selection.score_volume(brain, brain, 2.0, perturbed=[shifted[j::k] for j in range(k)])
    assert s.agreement == pytest.approx(1.0) and s.consistency < 1.0
    assert s.value == pytest.approx(0.5 * (s.agreement + s.consistency)) or not s.plausible
    same = selection.score_volume(brain, brain, 2.0, perturbed=[brain[j::k] for j in range(k)])
    assert same.consistency == pytest.approx(1.0)


def test_each_gamma_runs_on_its_own_interleaved_share_of_the_slices():
    """Together the perturbed inputs are one pass over the volume: every slice once, each under one gamma."""
    x = np.linspace(0.1, 0.9, 7, dtype=np.float32)[:, None, None] * np.ones((7, 3, 3), np.float32)
    xs = selection.perturbed_inputs(x)
    k = len(selection.CONSISTENCY_GAMMAS)
    assert len(xs) == k and sum(len(p) for p in xs) == len(x)
    for j, (p, g) in enumerate(zip(xs, selection.CONSISTENCY_GAMMAS)):
        np.testing.assert_allclose(p, x[j::k] ** g, rtol=1e-6)


def test_a_share_of_the_slices_measures_the_same_disagreement_as_the_whole_stack():
    """A mask that moved scores about the same on every k-th slice (slice axis k times coarser) as on all of them
    (within 0.08 on this toy ball), and ranks the moves the same way: the share estimates the whole."""
    k = len(selection.CONSISTENCY_GAMMAS)
    brain = _ball(60, 22)
    for axis in (0, 2):
        whole, shares = [], []
        for shift in (1, 2, 3):
            moved = np.roll(brain, shift, axis=axis)
            whole.append(selection.agreement(brain, moved, 2.0))
            shares.append(selection.score_volume(brain, brain, 2.0,
                                                 perturbed=[moved[j::k] for j in range(k)]).consistency)
        assert shares == pytest.approx(whole, abs=0.08)
        assert shares == sorted(shares, reverse=True) and shares[-1] < 0.7


def test_scoring_every_other_slice_estimates_the_whole_volume():
    """The adaptation scores on every SCORE_SLICE_STEP-th slice: the brain volume counts each kept slice for the
    ones left out (without it the volume halves, the brain looks implausible); the agreement of a mask that moved
    is about the same as on every slice, along and across the slice axis; the consistency (shares of a stack that
    is already halved: a slice axis 4x coarser) reads large moves as smaller on this toy ball but ranks them the
    same. Real candidates: BENCHMARKS.md, "Answered once", "every other slice"."""
    step = 2
    brain = _ball(80, 34)
    full = selection.score_volume(brain, brain, 2.0)
    sub = selection.score_volume(brain[::step], brain[::step], 2.0, slice_step=step)
    assert sub.brain_ml == pytest.approx(full.brain_ml, rel=0.03)
    assert selection.score_volume(brain[::step], brain[::step], 2.0).brain_ml < 0.55 * full.brain_ml
    k = len(selection.CONSISTENCY_GAMMAS)
    for axis in (0, 1):
        parts = []
        for shift in (1, 2, 3):
            moved = np.roll(brain, shift, axis=axis)
            whole = selection.score_volume(brain, moved, 2.0, perturbed=[moved[j::k] for j in range(k)])
            half, mh = brain[::step], moved[::step]
            part = selection.score_volume(half, mh, 2.0, perturbed=[mh[j::k] for j in range(k)], slice_step=step)
            assert part.agreement == pytest.approx(whole.agreement, abs=0.08)
            assert part.consistency == pytest.approx(whole.consistency, abs=0.15)
            parts.append(part.consistency)
        assert parts == sorted(parts, reverse=True) and parts[-1] < 0.75


@pytest.mark.slow
def test_the_adaptation_scores_with_the_slice_step(monkeypatch):
    """adapt() hands score_model the scoring volumes with SCORE_SLICE_STEP (1 by default; 2 halves the passes)."""
    from ConvLoRASegLib import selftrain

    monkeypatch.setattr(selftrain, "SCORE_SLICE_STEP", 2)
    seen = []
    real = selftrain.score_model

    def spy(model, slices, device, precision="auto", predicted=None, slice_step=1):
        seen.append((len(slices), slice_step))
        return real(model, slices, device, precision, predicted=predicted, slice_step=slice_step)

    monkeypatch.setattr(selftrain, "score_model", spy)
    from ConvLoRASegLib.model import ConvLoRASegModel
    from ConvLoRASegLib.grid import WorkingGrid

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = ConvLoRASegModel(grid=WorkingGrid(8.0, 32))
    vols = [np.clip(np.random.default_rng(i).random((12, 32, 32), dtype=np.float32), 0, 1) for i in range(2)]
    selftrain.adapt(model, vols, epochs=1, steps_per_epoch=1, batch_size=4, device="cpu")
    assert seen and all(step == 2 for _, step in seen)
    assert selection.SCORE_SLICE_STEP == 1  # the default: every slice (BENCHMARKS.md, "Answered once")
