"""An optional check of an adaptation on a few *labelled* scans of the target site (``adapt --check IMAGE MASK``).

The method needs no labels, and its label-free selection (:mod:`~ConvLoRASegLib.selection`) can say "no adapter".
But no label-free score seen so far ranks candidates reliably (BENCHMARKS.md, "Never worse"): on the semi-synthetic
Table 1 a few adapters still end worse than the source model, silently. A site that has even one scan with a
trusted mask can close that gap: every candidate of the adaptation (the source model, AdaBN, each epoch) segments
each labelled scan *as ``segment --adapter`` would deliver it* (with the per-scan check against the unadapted
model), and its surface Dice at :data:`TOLERANCE_MM` is compared with the unadapted model's.

Two rules decide what the adapter file holds (:func:`decide`):

* ``"veto"`` -- the label-free selection stands unless, on some labelled scan, it ends more than :data:`MARGIN`
  below the unadapted model (or its mean is below the unadapted model's): then the adapter changes nothing;
* ``"pick"`` -- the labels choose: the candidate with the best mean surface Dice among those that are nowhere more
  than :data:`MARGIN` below the unadapted model; the unadapted model when none beats it.

Either way, on the labelled scans themselves the adapter is never worse than no adapter by more than
:data:`MARGIN`; on other scans of the site that is an expectation, not a guarantee.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch

from .errors import ConvLoRASegError
from .constants import SOURCE

PathLike = Union[str, Path]

#: Surface Dice tolerance (mm) of the check: the paper's.
TOLERANCE_MM = 1.0
#: An adapter more than this below the unadapted model's surface Dice on a labelled scan is worse (the bar of
#: BENCHMARKS.md, "Never worse").
MARGIN = 0.005
RULES = ("veto", "pick")
#: The rule ``adapt --check`` applies, chosen by the comparison written down before it ran (BENCHMARKS.md, "With one
#: labelled scan of the site", 2026-12-05): on Table 1's 60 adaptations, with one labelled scan of another head per
#: site, ``pick`` left 1 below the source by more than 0.005 (worst -0.020), ``veto`` 7 (worst -0.073; it never
#: fired), mean gain +0.045 vs +0.044.
DEFAULT_RULE = "pick"


@dataclass
class LabelledScan:
    """A labelled scan of the target site: its image and the trusted brain mask on the same grid."""

    name: str
    image: sitk.Image
    mask: sitk.Image


@dataclass
class LabelledCheck:
    """Every candidate's surface Dice and Dice on every labelled scan (as the user gets it: per-scan check
    included; ``unchecked``: the candidate's own mask), and the decision."""

    scans: List[str]
    surface_dice: Dict[str, List[float]]
    dice: Dict[str, List[float]]
    unchecked: Dict[str, List[float]]
    label_free: str
    rule: str = DEFAULT_RULE
    selected: str = ""
    reason: str = ""
    extra: Dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, object]:
        r4 = lambda t: {k: [round(float(x), 4) for x in v] for k, v in t.items()}  # noqa: E731
        return {"scans": self.scans, "tolerance_mm": TOLERANCE_MM, "margin": MARGIN, "rule": self.rule,
                "label_free_selected": self.label_free, "selected": self.selected, "reason": self.reason,
                "surface_dice": r4(self.surface_dice), "dice": r4(self.dice),
                "surface_dice_unchecked": r4(self.unchecked)}


def check_geometry(image: sitk.Image, mask: sitk.Image, name: str) -> None:
    """A labelled scan's mask must lie on its image's grid (one clear line otherwise)."""
    from .volumes import same_grid

    if not same_grid(image, mask):
        raise ConvLoRASegError(f"{name}: the check mask is not on its image's grid (size, spacing, origin or "
                               "direction differ); resample it onto the image first")
    if not (sitk.GetArrayViewFromImage(mask) > 0).any():
        raise ConvLoRASegError(f"{name}: the check mask is empty")


def score_candidates(candidates: Dict[str, torch.nn.Module], scan: LabelledScan, device,
                     ) -> Tuple[Dict[str, float], Dict[str, float], Dict[str, float]]:
    """Surface Dice and Dice of every candidate on one labelled scan, each as ``segment --adapter`` delivers it (the
    per-scan check between the unadapted model ``candidates["source"]`` and the candidate), and the surface Dice of
    the candidate's own mask. Returns (surface Dice, Dice, unchecked surface Dice), keyed by candidate."""
    from .metrics import dice, surface_dice
    from .selection import choose_volume_scores, scan_scores
    from .volumes import brain_mask, to_slices

    source = candidates[SOURCE]
    vs = to_slices(scan.image, source.grid)
    predicted: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    scores = scan_scores(candidates.items(), vs.slices, device, predictions=predicted)
    truth = sitk.GetArrayFromImage(scan.mask) > 0
    spacing = tuple(reversed(scan.image.GetSpacing()))
    masks: Dict[str, np.ndarray] = {}

    def measured(name: str) -> Tuple[float, float]:
        if name not in masks:
            masks[name] = sitk.GetArrayFromImage(brain_mask(predicted[name][0], vs)) > 0
        return float(surface_dice(masks[name], truth, spacing, TOLERANCE_MM)), float(dice(masks[name], truth))

    sd, d, own = {}, {}, {}
    for name in candidates:
        kept = choose_volume_scores({SOURCE: scores[SOURCE], name: scores[name]})
        sd[name], d[name] = measured(kept)
        own[name] = measured(name)[0]
    return sd, d, own


def decide(surface_dice: Dict[str, List[float]], label_free: str, rule: str = DEFAULT_RULE) -> Tuple[str, str]:
    """The candidate the adapter should hold, by ``rule`` (module docstring), and why, in words."""
    if rule not in RULES:
        raise ConvLoRASegError(f"unknown check rule {rule!r}; one of {', '.join(RULES)}")
    src = np.asarray(surface_dice[SOURCE])

    def safe(name: str) -> bool:
        got = np.asarray(surface_dice[name])
        return bool(np.all(got >= src - MARGIN) and got.mean() >= src.mean())

    if rule == "veto":
        if label_free == SOURCE or safe(label_free):
            return label_free, "the label-free selection is not worse than the unadapted model on the labelled scans"
        return SOURCE, (f"the label-free selection ({label_free}) is worse than the unadapted model on the labelled "
                        "scans")
    ok = [n for n in surface_dice if n != SOURCE and safe(n)]
    best = max(ok, key=lambda n: (float(np.mean(surface_dice[n])), n == label_free), default=SOURCE)
    if best == SOURCE or np.mean(surface_dice[best]) <= src.mean():
        return SOURCE, "no adapted candidate beats the unadapted model on the labelled scans"
    return best, "the best adapted candidate on the labelled scans"


def check_adaptation(model, result, scans: Sequence[LabelledScan], device="auto", rule: str = DEFAULT_RULE,
                     progress: Optional[Callable[[dict], None]] = None) -> LabelledCheck:
    """Score every candidate of ``result`` (:func:`~ConvLoRASegLib.selftrain.adapt`, from the source ``model``) on
    the labelled ``scans`` and decide by ``rule``."""
    from .segment import resolve_device
    from .selftrain import candidate_model

    if not scans:
        raise ConvLoRASegError("the labelled check needs at least one scan with its mask")
    for s in scans:
        check_geometry(s.image, s.mask, s.name)
    dev = resolve_device(device)
    names = [SOURCE] + [n for n in result.candidate_states if n != SOURCE]
    stored = _as_stored(result)
    candidates = {n: candidate_model(model, stored, n) for n in names}
    out = LabelledCheck([s.name for s in scans], {n: [] for n in names}, {n: [] for n in names},
                        {n: [] for n in names}, result.selected, rule)
    for i, scan in enumerate(scans):
        if progress is not None:
            progress({"event": "progress", "stage": "check", "step": i, "total": len(scans)})
        for table, got in zip((out.surface_dice, out.dice, out.unchecked), score_candidates(candidates, scan, dev)):
            for n, v in got.items():
                table[n].append(v)
    if progress is not None:
        progress({"event": "progress", "stage": "check", "step": len(scans), "total": len(scans)})
    out.selected, out.reason = decide(out.surface_dice, result.selected, rule)
    return out


def _as_stored(result):
    """``result`` with every candidate's tensors as its adapter file would hold them (the check measures what the
    user will load)."""
    from .store import stored_form

    return dataclasses.replace(result, candidate_states={n: stored_form(s) for n, s in result.candidate_states.items()})


def apply_check(model, result, check: LabelledCheck):
    """``result`` with the candidate the check chose as its selection (model and adapter state as the adapter file
    holds them), the check recorded in its details."""
    from .selftrain import candidate_model

    stored = _as_stored(result)
    return dataclasses.replace(stored, selected=check.selected, state=stored.candidate_states[check.selected],
                               model=candidate_model(model, stored, check.selected),
                               details={**result.details, "labelled_check": check.to_dict()})


def read_labelled_scans(pairs: Sequence[Tuple[PathLike, PathLike]]) -> List[LabelledScan]:
    """``adapt --check IMAGE MASK`` pairs read from disk (the readers' one-line errors for bad files; a MASK that
    is not a label image, e.g. the two swapped, is refused)."""
    from .volumes import read_image, read_label_image

    out = []
    for image_path, mask_path in pairs:
        image = read_image(Path(image_path).expanduser())
        mask = read_label_image(Path(mask_path).expanduser())
        name = Path(image_path).name
        check_geometry(image, mask, name)
        out.append(LabelledScan(name, image, mask))
    return out
