"""The label-free criterion: how good is a model (or an adapted candidate) on a target scan, without labels?

One owner for the score that picks the adaptation epoch, decides whether an adapter beats no adapter at all, and
chooses among a user's adapters for a scan (``segment --adapter auto``):

* **agreement** — surface Dice between the early segmentation head's mask and the final mask (the paper's
  self-training signal turned into a score), at a tolerance of one working-grid voxel: on the 2 mm grid a 1 mm
  tolerance would count only coinciding surfels (a degenerate score);
* **plausibility** — a candidate whose brain is empty or outside :data:`PLAUSIBLE_BRAIN_ML` is refused (scores 0):
  two empty masks agree perfectly, and a collapsed model must never win.

A candidate must beat the unadapted model by more than :data:`SELECT_MARGIN` to be chosen: in doubt, no adapter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

#: Brain volumes (ml, brain + cerebellum + brainstem as in the reference masks) a mask may have. Adult brains are
#: 900-1900 ml; the project's heads' silver masks are 1100-1930 ml. Outside this range a candidate is refused.
PLAUSIBLE_BRAIN_ML = (700.0, 2600.0)
#: The agreement's surface tolerance in working-grid voxels (1 voxel = 2 mm on the default grid).
AGREEMENT_TOLERANCE_VOXELS = 1.0
#: How much an adapted candidate's mean score must exceed the unadapted model's to be selected.
SELECT_MARGIN = 0.0
#: Name of the unadapted candidate in every score table.
SOURCE = "source"


@dataclass(frozen=True)
class VolumeScore:
    """The label-free score of one candidate on one volume."""

    agreement: float  #: ESH vs final surface Dice at one working voxel
    brain_ml: float  #: volume of the final mask
    plausible: bool  #: a brain of plausible size (not empty, not the whole head)

    @property
    def value(self) -> float:
        return self.agreement if self.plausible else 0.0

    def to_dict(self) -> Dict[str, float]:
        return {**asdict(self), "value": self.value}


def brain_ml(probs: np.ndarray, spacing_mm: float) -> float:
    """Volume (ml) of ``probs >= 0.5`` on an isotropic grid of ``spacing_mm``."""
    return float(np.count_nonzero(probs >= 0.5)) * spacing_mm ** 3 / 1000.0


def agreement(final_probs: np.ndarray, esh_probs: np.ndarray, spacing_mm: float,
              tolerance_mm: Optional[float] = None) -> float:
    """Surface Dice between the ESH's mask and the final mask at ``tolerance_mm`` (default: one grid voxel);
    0 when either mask is empty (nothing to agree on)."""
    from .metrics import surface_dice

    final, early = final_probs >= 0.5, esh_probs >= 0.5
    if not final.any() or not early.any():
        return 0.0
    tol = spacing_mm * AGREEMENT_TOLERANCE_VOXELS if tolerance_mm is None else tolerance_mm
    return float(surface_dice(early, final, (spacing_mm,) * 3, tol))


def score_volume(final_probs: np.ndarray, esh_probs: np.ndarray, spacing_mm: float) -> VolumeScore:
    ml = brain_ml(final_probs, spacing_mm)
    lo, hi = PLAUSIBLE_BRAIN_ML
    return VolumeScore(agreement(final_probs, esh_probs, spacing_mm), ml, bool(lo <= ml <= hi))


def mean_score(scores: Sequence[VolumeScore]) -> float:
    return float(np.mean([s.value for s in scores])) if scores else 0.0


def choose(table: Dict[str, float], order: Sequence[str] = ()) -> str:
    """The selected candidate of ``{name: mean score}``: the best, unless it does not beat :data:`SOURCE` by more
    than :data:`SELECT_MARGIN`; ties go to the earlier name in ``order`` (then to the table's order)."""
    names = list(order) + [n for n in table if n not in order]
    names = [n for n in names if n in table]
    best = max(names, key=lambda n: (table[n], -names.index(n)))
    if SOURCE in table and best != SOURCE and table[best] <= table[SOURCE] + SELECT_MARGIN:
        return SOURCE
    return best


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN for fewer than 3 pairs or a constant input."""
    from scipy.stats import spearmanr

    if len(x) < 3:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def per_volume_table(scores: Dict[str, List[VolumeScore]]) -> Dict[str, List[Dict[str, float]]]:
    return {name: [s.to_dict() for s in vs] for name, vs in scores.items()}


__all__ = ["PLAUSIBLE_BRAIN_ML", "AGREEMENT_TOLERANCE_VOXELS", "SELECT_MARGIN", "SOURCE", "VolumeScore", "brain_ml",
           "agreement", "score_volume", "mean_score", "choose", "spearman", "per_volume_table"]

