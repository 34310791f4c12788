"""The label-free criterion: how good is a model (or an adapted candidate) on a target scan, without labels?

One owner for the score that picks the adaptation epoch, decides whether an adapter beats no adapter at all, and
chooses among a user's adapters for a scan (``segment --adapter auto``):

* **agreement** — surface Dice between the early segmentation head's mask and the final mask (the paper's
  self-training signal turned into a score), at a tolerance of one working-grid voxel: on the 2 mm grid a 1 mm
  tolerance would count only coinciding surfels (a degenerate score);
* **consistency** — surface Dice between the final mask and the final masks of the same scan with darker and
  brighter mid-tones (:data:`CONSISTENCY_GAMMAS`): self-training pushes the ESH towards the final output, so the
  agreement alone rises with every epoch whether the mask improves or not; the consistency is not trained for.
  The network is 2D, so each gamma runs on an interleaved share of the slices (gamma *j* on slices *j*, *j + k*,
  ... of *k* gammas) and is compared with the same slices of the final mask: the perturbations together cost one
  pass over the volume, not one each (the adaptation scores every candidate on every scoring volume);
* **plausibility** — a candidate whose brain is empty or outside :data:`PLAUSIBLE_BRAIN_ML` is refused (scores 0):
  two empty masks agree perfectly, and a collapsed model must never win.

A candidate must beat the unadapted model by more than :data:`SELECT_MARGIN` to be chosen: in doubt, no adapter.
And it must not shrink the brain: a candidate whose mean brain volume is more than :data:`VOLUME_SHRINK_MAX` below
the unadapted model's is refused. A heuristic, not a mechanism: on the first shift runs every AdaBN that shrank the
mask by 3 % or more lost accuracy while agreement and consistency rose, so the scores could not see it; on later,
retrained models a shrinking AdaBN was sometimes right (an over-segmenting source model), and the guard then
refuses a real gain. It is kept because refusing returns the unadapted model (BENCHMARKS.md, "Never worse").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .constants import SOURCE
from .metrics import surface_dice
from .model import ConvLoRASegModel
from .segment import AdapterLike, activate_adapter, predict_slices
from .store import AdapterInfo
from .volumes import brain_mask, to_slices

if TYPE_CHECKING:
    import SimpleITK as sitk
    import torch

    from .volumes import VolumeSlices

#: Brain volumes (ml, brain + cerebellum + brainstem as in the reference masks) a mask may have. Adult brains are
#: 900-1900 ml; the project's heads' silver masks are 1100-1930 ml. Outside this range a candidate is refused.
PLAUSIBLE_BRAIN_ML = (700.0, 2600.0)
#: The agreement's surface tolerance in working-grid voxels (1 voxel = 2 mm on the default grid).
AGREEMENT_TOLERANCE_VOXELS = 1.0
#: How much an adapted candidate's mean score must exceed the unadapted model's to be selected.
SELECT_MARGIN = 0.0
#: Gammas applied to the input for the consistency half of the score (darker and brighter mid-tones).
CONSISTENCY_GAMMAS = (0.7, 1.4)
#: An adapted candidate whose consistency is lower than the unadapted model's by more than this is refused.
CONSISTENCY_DROP_MAX = 0.0
#: An adapted candidate whose mean brain volume is below the unadapted model's by more than this share is refused.
VOLUME_SHRINK_MAX = 0.02
#: The per-scan check (``segment --adapter``, :func:`choose_volume_scores`) keeps an adapter on a scan only if its
#: label-free score there beats the unadapted model's by more than this. Adopted by the rule written down in
#: bench/real_sites.py before its first row, over the real-site rows of all five folds: on real heads of scanners the
#: source never saw, every adapter that lost surface Dice had beaten the source's score by 0.02 or less, while the
#: large gains (a bias field, a template) came with margins of 0.06-0.12. The growth guard adopted before it on two
#: folds ("volume 0.02") failed on the other three: it let a losing AdaBN through and refused the largest gains,
#: where the unadapted mask was too small (BENCHMARKS.md, "Real scanner shifts").
SCAN_CHECK_MARGIN = 0.05
#: The adaptation scores its candidates on every n-th slice of each scoring volume. 1 (every slice): scoring on every
#: other slice was measured on 2026-12-02 (BENCHMARKS.md, "Answered once") and saved 33 s of 202 s, but it changed 3 of 60
#: Table 1 selections, each to a worse one (one volume scores a Table 1 task): not worth it.
SCORE_SLICE_STEP = 1


@dataclass(frozen=True)
class VolumeScore:
    """The label-free score of one candidate on one volume."""

    agreement: float  #: ESH vs final surface Dice at one working voxel
    consistency: float  #: final mask vs the final masks of gamma-perturbed inputs (:data:`CONSISTENCY_GAMMAS`)
    brain_ml: float  #: volume of the final mask
    plausible: bool  #: a brain of plausible size (not empty, not the whole head)

    @property
    def value(self) -> float:
        """The mean of agreement and consistency; 0 for an implausible brain."""
        return 0.5 * (self.agreement + self.consistency) if self.plausible else 0.0

    def to_dict(self) -> Dict[str, float]:
        return {**asdict(self), "value": self.value}


@dataclass(frozen=True)
class CandidateScore:
    """A candidate's label-free score: means over the scoring volumes."""

    value: float
    agreement: float
    consistency: float
    brain_ml: float = 0.0  #: mean brain volume (ml) of the final masks

    @classmethod
    def of(cls, scores: Sequence[VolumeScore]) -> "CandidateScore":
        if not scores:
            return cls(0.0, 0.0, 0.0)
        ok = [s.plausible for s in scores]
        return cls(float(np.mean([s.value for s in scores])),
                   float(np.mean([s.agreement if p else 0.0 for s, p in zip(scores, ok)])),
                   float(np.mean([s.consistency if p else 0.0 for s, p in zip(scores, ok)])),
                   float(np.mean([s.brain_ml for s in scores])))


def brain_ml(probs: np.ndarray, spacing_mm: float, slice_step: int = 1) -> float:
    """Volume (ml) of ``probs >= 0.5`` on an isotropic grid of ``spacing_mm``; ``slice_step``: ``probs`` holds
    every n-th slice of the volume (each stands for n)."""
    return float(np.count_nonzero(probs >= 0.5)) * spacing_mm ** 3 * slice_step / 1000.0


def agreement(final_probs: np.ndarray, esh_probs: np.ndarray, spacing_mm,
              tolerance_mm: Optional[float] = None) -> float:
    """Surface Dice between the ESH's mask and the final mask at ``tolerance_mm`` (default: one grid voxel);
    0 when either mask is empty (nothing to agree on). ``spacing_mm``: the grid spacing, or one per axis (the grid
    spacing is then the smallest)."""
    final, early = final_probs >= 0.5, esh_probs >= 0.5
    if not final.any() or not early.any():
        return 0.0
    spacing = tuple(float(v) for v in np.broadcast_to(np.asarray(spacing_mm, float), (final.ndim,)))
    tol = min(spacing) * AGREEMENT_TOLERANCE_VOXELS if tolerance_mm is None else tolerance_mm
    return float(surface_dice(early, final, spacing, tol))


def share(j: int, k: int = len(CONSISTENCY_GAMMAS)) -> slice:
    """The slices of the stack that perturbation ``j`` of ``k`` (by default the gammas of
    :data:`CONSISTENCY_GAMMAS`) is applied to: every k-th slice from slice j."""
    return slice(j, None, k)


def share_consistency(final_probs: np.ndarray, perturbed: Sequence[np.ndarray], spacing_mm: float,
                      slice_step: int = 1) -> float:
    """Mean agreement (one grid voxel) of the final mask's shares (:func:`share`) with the final probabilities of
    the perturbed shares of the input, in that order; a share holds every k-th slice, so its slice axis is k times
    coarser (and ``slice_step`` times more if ``final_probs`` holds every n-th slice of the volume)."""
    k = len(perturbed)
    spacing = (spacing_mm * k * slice_step, spacing_mm, spacing_mm)
    return float(np.mean([agreement(final_probs[share(j, k)], p, spacing, tolerance_mm=spacing_mm)
                          for j, p in enumerate(perturbed)]))


def score_volume(final_probs: np.ndarray, esh_probs: np.ndarray, spacing_mm: float,
                 perturbed: Sequence[np.ndarray] = (), slice_step: int = 1) -> VolumeScore:
    """The score of one volume from the candidate's final and ESH probabilities and its final probabilities on the
    perturbed shares of the input (:func:`perturbed_inputs`, in that order); without them, consistency counts as
    agreement. ``slice_step``: the probabilities hold every n-th slice of the volume (the slice axis is n times
    coarser; the tolerance stays one grid voxel)."""
    ml = brain_ml(final_probs, spacing_mm, slice_step)
    lo, hi = PLAUSIBLE_BRAIN_ML
    a = agreement(final_probs, esh_probs, (spacing_mm * slice_step, spacing_mm, spacing_mm))
    c = share_consistency(final_probs, perturbed, spacing_mm, slice_step) if len(perturbed) else a
    return VolumeScore(a, c, ml, bool(lo <= ml <= hi))


def perturbed_inputs(slices: np.ndarray) -> List[np.ndarray]:
    """The input's interleaved shares (:func:`share`: every k-th slice), each under its gamma of
    :data:`CONSISTENCY_GAMMAS` (working-grid intensities are in [0, 1])."""
    x = np.clip(slices, 0.0, 1.0)
    return [np.ascontiguousarray(x[share(j)] ** g, dtype=np.float32) for j, g in enumerate(CONSISTENCY_GAMMAS)]


def score_model(model, slices: np.ndarray, device, precision: str = "auto",
                predicted: Optional[tuple] = None, slice_step: int = 1) -> VolumeScore:
    """Score ``model`` on one volume of working-grid slices: one pass with the ESH (or ``predicted`` = its
    (final, esh) probabilities on every slice, if the caller has them) and one pass over the perturbed shares of
    the slices; with ``slice_step`` n, on every n-th slice only (:data:`SCORE_SLICE_STEP`: the adaptation's)."""
    slices = slices[::slice_step]
    if predicted is not None:
        final, early = (p[::slice_step] for p in predicted)
    else:
        final, early = predict_slices(model, slices, device, precision=precision, with_esh=True)
    perturbed = [predict_slices(model, x, device, precision=precision) for x in perturbed_inputs(slices)]
    return score_volume(final, early, model.grid.spacing_mm, perturbed, slice_step)


def mean_score(scores: Sequence[VolumeScore]) -> float:
    return CandidateScore.of(scores).value


def choose(table: Dict[str, float], order: Sequence[str] = (),
           consistency: Optional[Dict[str, float]] = None, brain_ml: Optional[Dict[str, float]] = None,
           margin: Optional[float] = None) -> str:
    """The selected candidate of ``{name: mean score}``: the best, unless it does not beat :data:`SOURCE` by more
    than ``margin`` (default :data:`SELECT_MARGIN`); refused beforehand (with ``consistency``, ``{name: mean
    consistency}``) a candidate whose consistency falls more than :data:`CONSISTENCY_DROP_MAX` below the source's
    and (with ``brain_ml``, ``{name: mean brain volume}``) one whose brain is more than :data:`VOLUME_SHRINK_MAX`
    smaller than the source's; ties go to the earlier name in ``order``."""
    names = list(order) + [n for n in table if n not in order]
    names = [n for n in names if n in table]
    if SOURCE in table and consistency is not None:
        floor = consistency[SOURCE] - CONSISTENCY_DROP_MAX
        names = [n for n in names if n == SOURCE or consistency.get(n, 0.0) >= floor]
    if SOURCE in table and brain_ml is not None and brain_ml.get(SOURCE, 0.0) > 0:
        floor = brain_ml[SOURCE] * (1.0 - VOLUME_SHRINK_MAX)
        names = [n for n in names if n == SOURCE or brain_ml.get(n, 0.0) >= floor]
    best = max(names, key=lambda n: (table[n], -names.index(n)))
    need = SELECT_MARGIN if margin is None else margin
    if SOURCE in table and best != SOURCE and table[best] <= table[SOURCE] + need:
        return SOURCE
    return best


def choose_volume_scores(scores: Dict[str, VolumeScore], order: Sequence[str] = (SOURCE,)) -> str:
    """:func:`choose` among candidates scored on one volume (the per-scan check of ``segment --adapter`` and
    ``--adapter auto``'s rule): the score of each, its consistency (0 for an implausible brain) and its brain volume
    (no shrinking by more than :data:`VOLUME_SHRINK_MAX`); an adapter must beat the unadapted model's score by more
    than :data:`SCAN_CHECK_MARGIN`."""
    return choose({n: s.value for n, s in scores.items()}, order=order,
                  consistency={n: s.consistency if s.plausible else 0.0 for n, s in scores.items()},
                  brain_ml={n: s.brain_ml for n, s in scores.items()}, margin=SCAN_CHECK_MARGIN)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN for fewer than 3 pairs or a constant input."""
    from scipy.stats import spearmanr

    if len(x) < 3:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def per_volume_table(scores: Dict[str, List[VolumeScore]]) -> Dict[str, List[Dict[str, float]]]:
    return {name: [s.to_dict() for s in vs] for name, vs in scores.items()}


# ---------------------------------------------------------------------------------------------------------------
# one scan, several candidates: segment --adapter auto and the per-scan check of segment --adapter FILE
# ---------------------------------------------------------------------------------------------------------------
def adapter_not_used(name: str, scores: Optional[Dict[str, float]] = None) -> str:
    """The warning of a scan on which the per-scan check refused the adapter ``name``: its label-free score did not
    beat the unadapted model's, beat it by :data:`SCAN_CHECK_MARGIN` or less, or beat it but a guard refused it
    (brain more than :data:`VOLUME_SHRINK_MAX` smaller, or a lower gamma consistency)."""
    table = f" (label-free scores: {', '.join(f'{k} {v:.3f}' for k, v in scores.items())})" if scores else ""
    known = bool(scores) and name in scores and SOURCE in scores
    gain = scores[name] - scores[SOURCE] if known else 0.0
    if known and gain > SCAN_CHECK_MARGIN:
        why = (f"scored higher{table} but shrank the brain by more than {VOLUME_SHRINK_MAX:.0%} or lowered the gamma "
               "consistency, which went with worse masks")
    elif known and gain > 0:
        why = (f"beat the unadapted model's label-free score by only {gain:.3f}{table}: on real scans of unseen "
               f"scanners every adapter that lost accuracy had won by 0.02 or less, so the check asks for more than "
               f"{SCAN_CHECK_MARGIN:g}")
    else:
        why = f"did not beat the unadapted model on this scan{table}"
    return (f"adapter {name!r} {why}: segmented without it (--no-scan-check, or checkAdapter=False in Slicer, uses it "
            "anyway)")


#: Methods whose adapters the label-free checks were measured to keep from ending worse than no adapter: Table 1
#: (0 of 140 delivered below the unadapted model, three seeds) and the real scanner shifts (0 of 45). The paper's
#: comparison methods were measured on Table 1 only, where the checks let 8 of 60 self-training and 2 of 60 UDAS
#: adapters through that were worse (UDAS + ConvLoRA: 0 of 60; BENCHMARKS.md, Table 1).
GUARDED_METHODS = ("convlora-adabn", "adabn")


def unguarded_adapter(info: Optional[AdapterInfo]) -> Optional[str]:
    """The warning for an adapter made by a method the label-free checks do not guard (:data:`GUARDED_METHODS`)
    and never checked on a labelled scan (``adapt --check``); None for any other (or no) adapter."""
    if info is None or info.method in GUARDED_METHODS or info.details.get("labelled_check"):
        return None
    return (f"adapter {info.name!r} was made with {info.method}, one of the paper's comparison methods, for which the "
            "label-free checks are not validated (they let self-training and UDAS adapters through that were worse "
            "than no adapter: BENCHMARKS.md, Table 1); check it on a labelled scan of the site (adapt --check IMAGE "
            "MASK) before trusting its masks")


def segment_checked(model: ConvLoRASegModel, image: sitk.Image, adapter: AdapterLike,
                    device: Union[str, torch.device] = "auto", postprocess: bool = True,
                    working: Optional[VolumeSlices] = None,
                    ) -> Tuple[sitk.Image, Optional[AdapterInfo], Dict[str, float]]:
    """``segment --adapter``'s per-scan check: the brain mask of ``image`` with ``adapter`` if the adapter beats the
    unadapted model on this scan (:func:`choose_adapter`), else without it; the mask comes from the check's own
    pass. Returns (mask, the adapter used or None, both scores)."""
    vs = working if working is not None else to_slices(image, model.grid)
    predicted: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    used, scores = choose_adapter(model, image, [adapter], device, working=vs, predictions=predicted)
    final = predicted[SOURCE if used is None else used.name][0]
    return brain_mask(final, vs, postprocess=postprocess), used, scores


def choose_adapter(model: ConvLoRASegModel, image: sitk.Image, adapters: Sequence[AdapterLike],
                   device: Union[str, torch.device] = "auto", working: Optional[VolumeSlices] = None,
                   predictions: Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]] = None,
                   ) -> Tuple[Optional[AdapterInfo], Dict[str, float]]:
    """Pick, label-free, the adapter that scores best on this scan (:mod:`~ConvLoRASegLib.selection`: ESH agreement
    and gamma consistency, implausible brains refused, no adapter that shrinks the brain; an adapter must beat no
    adapter). With one adapter this is the per-scan check of ``segment --adapter FILE``.

    Returns the winner (None if the model without adapter is chosen) and every score, keyed by adapter name
    (``"source"`` for no adapter). ``working``: ``to_slices(image, model.grid)`` if the caller already has it.
    ``predictions``: a dict to receive each candidate's (final, ESH) probabilities on the working slices (the
    scoring computes them; the caller then needs no further pass for the winner's mask).
    The model's active adapter is the same afterwards as before.
    """
    vs = working if working is not None else to_slices(image, model.grid)
    was_active = model.adapters.active
    infos: Dict[str, Optional[AdapterInfo]] = {}

    def activated() -> Iterator[Tuple[str, ConvLoRASegModel]]:
        for candidate in [None, *adapters]:
            info = activate_adapter(model, candidate)
            name = SOURCE if info is None else info.name
            infos[name] = info
            yield name, model

    try:
        got = scan_scores(activated(), vs.slices, device, predictions)
    finally:
        model.adapters.set_adapter(was_active)
    return infos[choose_volume_scores(got)], {n: s.value for n, s in got.items()}


def scan_scores(candidates: Iterable[Tuple[str, ConvLoRASegModel]], slices: np.ndarray,
                device: Union[str, torch.device] = "auto",
                predictions: Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]] = None) -> Dict[str, VolumeScore]:
    """The label-free score (:func:`~ConvLoRASegLib.selection.score_model`) of each (name, model) on one scan's
    working ``slices``; ``predictions`` receives each one's (final, ESH) probabilities."""
    got = {}
    for name, m in candidates:
        predicted = predict_slices(m, slices, device, with_esh=True)
        got[name] = score_model(m, slices, device, predicted=predicted)
        if predictions is not None:
            predictions[name] = predicted
    return got


__all__ = ["PLAUSIBLE_BRAIN_ML", "AGREEMENT_TOLERANCE_VOXELS", "SELECT_MARGIN", "CONSISTENCY_GAMMAS",
           "CONSISTENCY_DROP_MAX", "VOLUME_SHRINK_MAX", "SCAN_CHECK_MARGIN", "GUARDED_METHODS", "SCORE_SLICE_STEP", "SOURCE", "VolumeScore", "CandidateScore",
           "brain_ml", "agreement", "share", "share_consistency", "score_volume", "perturbed_inputs", "score_model",
           "mean_score", "choose", "choose_volume_scores", "spearman", "per_volume_table", "scan_scores", "choose_adapter",
           "segment_checked", "adapter_not_used", "unguarded_adapter"]

