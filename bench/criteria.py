"""Candidate label-free criteria for issue 10, recorded beside the product's score so that they can be judged on
runs they were not designed on (BENCHMARKS.md, issue 10, "2026-12-02 (fourth session)").

The product's score (``ConvLoRASegLib.selection``) ranks tasks well and the candidates of one adaptation hardly
(Spearman within one adaptation 0.09 in the Table 1 rerun of 2026-12-02): AdaBN raises it while the mask gets worse.
Both of its halves (ESH agreement, consistency under gamma) are intensity-side checks that target BatchNorm
statistics can satisfy by construction. The criteria here were written down before any run that records them:

* ``rotation`` -- consistency of the final mask under an in-plane rotation of the input by +-10 degrees
  (interleaved shares of the slices, predictions rotated back): a geometric perturbation, not an intensity one;
* ``noise`` -- consistency under additive Gaussian noise (sigma 0.05 of the [0, 1] range, interleaved shares);
* ``source_agreement`` -- surface Dice (one working voxel) between the candidate's final mask and the unadapted
  model's: how far the candidate moved (a trust-region signal, not a quality signal on its own);
* ``uncertain_share`` -- voxels with 0.1 < p < 0.9 per voxel of the mask (p >= 0.5): lower = more decided;
* ``brain_ml`` -- the mask's volume.

Every value is computed on one unlabelled adaptation volume (the one the selection scored), never on an evaluation
volume. Bench code only: nothing in the product imports it.

**Boundary contrast** (:func:`boundary_contrast`, written down on 2026-12-05, eighth session, before any run recorded
it). Every criterion above asks the *network* again (under another input) and can be satisfied by a network that is
consistently wrong; the failures the per-scan check still lets through on Table 1 (2026-12-05: 7 of 60, mostly
robex_atlas, a head with its neck) are adapted masks 15-18 % larger than the source's -- on the 2 mm working grid
about one voxel of growth over the whole surface. This criterion asks the *image* instead: the mean working-grid
intensity of the mask's inner one-voxel shell minus that of its outer one-voxel shell (6-connected erosion and
dilation). On a T1 scan a brain mask that ends at the pial surface has grey matter inside and CSF, dura and bone
(dark) outside, so the difference is large; a mask one voxel too large has CSF inside and bone or scalp outside,
one voxel too small has grey matter on both sides -- both lower. It is computed on the scan being segmented (no
labels) from the candidate's final mask, the same working-grid slices the product scores, and costs no network pass.

The rules judged with it, fixed here before the runs (``table1.py`` and ``shifts.py`` record ``contrast`` for every
candidate and in the per-scan check's scores; ``selection_probe.py`` prints it on the speed cohort):

* **C1, contrast veto** -- the per-scan check as the product runs it, and the adapter is also refused on a scan where
  its mask's contrast is lower than the source model's;
* **C2, contrast decides** -- on each scan the adapter's mask is used if and only if its contrast is higher than the
  source model's (the product's scores not consulted).

Also measured: Spearman of the contrast with the true surface Dice within one scan's candidates, beside the product
score's. Adoption rule, fixed now: a rule goes into the product only if on the fixed shifts (20 tasks), Table 1
(seeds 0 and 1, fast) and the speed cohort it leaves **no** result more than 0.005 surface Dice below the source and
gains over the source on average on the shifts and Table 1; if both qualify, the one with the larger mean gain.
Otherwise it stays here, reported.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ConvLoRASegLib import selection  # noqa: E402
from ConvLoRASegLib.segment import predict_slices  # noqa: E402

ROTATION_DEG = (10.0, -10.0)
NOISE_SIGMA = 0.05
NOISE_SHARES = 2
NOISE_SEED = 1234


def _rotate(stack: np.ndarray, deg: float, order: int = 1) -> np.ndarray:
    """Rotate every slice (axes 1, 2) of ``stack`` by ``deg`` degrees about its centre, zero outside."""
    return ndimage.rotate(stack, deg, axes=(2, 1), reshape=False, order=order, mode="constant", cval=0.0,
                          prefilter=False).astype(np.float32)


def boundary_contrast(probs: np.ndarray, slices: np.ndarray) -> float:
    """Mean intensity (working grid, clipped to [0, 1]) of the one-voxel inner shell of the mask ``probs >= 0.5``
    minus that of its one-voxel outer shell (6-connected); NaN for an empty mask or one that fills the grid."""
    m = probs >= 0.5
    if not m.any() or m.all():
        return float("nan")
    x = np.clip(slices, 0.0, 1.0)
    inner = m & ~ndimage.binary_erosion(m)
    outer = ndimage.binary_dilation(m) & ~m
    return float(x[inner].mean() - x[outer].mean())


def contrast_pick(source: Dict[str, float], adapted: Dict[str, float], product_pick: str, rule: str) -> str:
    """What rule C1 or C2 (module docstring) keeps on one scan, from the source model's and the adapter's per-scan
    scores (each with ``contrast``) and the product's per-scan choice (``"source"`` or ``"selected"``)."""
    better = np.isfinite(adapted["contrast"]) and (not np.isfinite(source["contrast"])
                                                   or adapted["contrast"] > source["contrast"])
    if rule == "C1":
        return product_pick if better or product_pick == "source" else "source"
    if rule == "C2":
        return "selected" if better else "source"
    raise ValueError(rule)


def criteria(model, slices: np.ndarray, device, source_final: Optional[np.ndarray] = None) -> Dict[str, float]:
    """The criteria of this module for ``model`` on one volume of working-grid ``slices``."""
    sp = float(model.grid.spacing_mm)
    x = np.clip(slices, 0.0, 1.0).astype(np.float32)
    final = predict_slices(model, x, device)
    k = len(ROTATION_DEG)
    rotated = []
    for j, deg in enumerate(ROTATION_DEG):
        p = predict_slices(model, np.ascontiguousarray(_rotate(x[selection.share(j, k)], deg)), device)
        rotated.append(_rotate(p, -deg))
    rng = np.random.default_rng(NOISE_SEED)
    noisy = []
    for j in range(NOISE_SHARES):
        part = x[selection.share(j, NOISE_SHARES)]
        # zero voxels (the padding outside the scan's field of view) stay zero; the working grid's background is
        # otherwise rarely exactly 0, so the noise covers nearly every slice pixel
        n = np.where(part > 0, part + rng.normal(0.0, NOISE_SIGMA, part.shape).astype(np.float32), 0.0)
        noisy.append(predict_slices(model, np.ascontiguousarray(np.clip(n, 0.0, 1.0), dtype=np.float32), device))
    out = {"rotation": selection.share_consistency(final, rotated, sp),
           "noise": selection.share_consistency(final, noisy, sp),
           "uncertain_share": float(np.count_nonzero((final > 0.1) & (final < 0.9))
                                    / max(1, np.count_nonzero(final >= 0.5))),
           "brain_ml": selection.brain_ml(final, sp)}
    if source_final is not None:
        out["source_agreement"] = selection.agreement(final, source_final, sp)
    return {k: round(v, 4) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------------
# judging the criteria on a Table 1 row cache (rules fixed with the criteria, before any run recorded them)
# ---------------------------------------------------------------------------------------------------------------
#: Vetoes on top of the product's choice: the selected adapted candidate falls back to the source when the
#: criterion is lower than the source's (consistency-like criteria) -- "in doubt, no adapter".
VETOES = ("rotation", "noise")


def _rules(c: Dict[str, dict], selected: str) -> Dict[str, str]:
    """The candidate each rule picks from one adaptation's ``candidates``."""
    src = c["source"]["criteria"]
    out = {"as run": selected}
    for v in VETOES:
        ok = selected == "source" or c[selected]["criteria"][v] >= src[v]
        out[f"as run, {v} veto"] = selected if ok else "source"
    ok = selected == "source" or all(c[selected]["criteria"][v] >= src[v] for v in VETOES)
    out["as run, both vetoes"] = selected if ok else "source"
    for v in VETOES:
        out[f"{v} alone"] = max(c, key=lambda n: (c[n]["criteria"][v], n == "source"))
    return out


def rank_correlation(groups) -> Dict[str, object]:
    """Spearman of x with y over ``groups`` = [(xs, ys), ...] (one group per adaptation): pooled over every pair,
    and the mean of the within-group correlations (groups of >= 3 pairs with a defined correlation)."""
    from ConvLoRASegLib.selection import spearman

    xs = [v for x, _ in groups for v in x]
    ys = [v for _, y in groups for v in y]
    within = [rho for x, y in groups if len(x) >= 3 for rho in [spearman(x, y)] if np.isfinite(rho)]
    return {"pooled": round(spearman(xs, ys), 3) if xs else None,
            "within": round(float(np.mean(within)), 3) if within else None, "pairs": len(xs)}


def report(rows) -> Dict[str, object]:
    """Spearman of every criterion with the true surface Dice (pooled; mean within one adaptation) and the outcome
    of each rule of :func:`_rules` against the source model, over the adapted rows of a Table 1 row cache."""
    runs = [r for r in rows if r.get("candidates") and all("criteria" in v for v in r["candidates"].values())]
    names = ["label_free"] + sorted({k for r in runs for v in r["candidates"].values() for k in v["criteria"]})
    rank = {}
    for k in names:
        groups = []
        for r in runs:
            c = [v for v in r["candidates"].values() if k == "label_free" or k in v["criteria"]]
            groups.append(([v["label_free"] if k == "label_free" else v["criteria"][k] for v in c],
                           [v["surface_dice"] for v in c]))
        rank[k] = rank_correlation(groups)
    outcome: Dict[str, list] = {}
    for r in runs:
        c = r["candidates"]
        for rule, pick in _rules(c, r["selected"]).items():
            d = c[pick]["surface_dice"] - c["source"]["surface_dice"]
            outcome.setdefault(rule, []).append(d)
    table = {rule: {"runs": len(g), "mean_gain": round(float(np.mean(g)), 4), "worst": round(float(np.min(g)), 4),
                    "below_source_0.005": int(np.sum(np.asarray(g) < -0.005))}
             for rule, g in outcome.items()}
    return {"runs": len(runs), "spearman": rank, "rules": table}


def _outcome(deltas: List[float]) -> Dict[str, object]:
    g = np.asarray(deltas, float)
    return {"n": int(g.size), "mean_gain": round(float(g.mean()), 4), "worst": round(float(g.min()), 4),
            "below_source_0.005": int(np.sum(g < -0.005))}


def _contrast_rule(rule: str, source: Dict[str, float], adapted: Dict[str, float]) -> str:
    """:func:`contrast_pick` on top of the product's per-scan check, from the two per-scan score dicts."""
    from table1 import checked_pick

    return contrast_pick(source, adapted, checked_pick({"source": source, "selected": adapted}), rule)


def contrast_report(table1_rows: Sequence[dict] = (), shifts_rows: Sequence[dict] = ()) -> Dict[str, object]:
    """Rules C1 and C2 (module docstring) against the product's per-scan check, and the Spearman of the boundary
    contrast with the true surface Dice within one scan's candidates beside the product score's.

    Table 1: one result per adapted row (its evaluation scan), candidates source, AdaBN and each epoch (their
    ``label_free`` is the adaptation's score on its scoring volumes). Shifts: the fast run's per-scan rules are
    compared per (head, family, seed) task, the mean over its test scans, as ``shifts.user_gets`` does; the
    candidates of one scan (``cand:fast:*`` rows) carry the product's score on that scan (``label_free``, the ESH
    agreement, and ``tta``, the consistency)."""
    from table1 import checked_pick

    out: Dict[str, object] = {}
    runs = [r for r in table1_rows if r.get("candidates") and "contrast" in (r.get("scan_check") or {}).get(
        "source", {}) and all("contrast" in v for v in r["candidates"].values())]
    if runs:
        deltas: Dict[str, list] = {}
        for r in runs:
            c, chk = r["candidates"], r["scan_check"]
            prod = checked_pick(chk)
            picks = {"product check": prod, **{rule: contrast_pick(chk["source"], chk["selected"], prod, rule)
                                               for rule in ("C1", "C2")}}
            for rule, pick in picks.items():
                sd = c["source" if pick == "source" else r["selected"]]["surface_dice"]
                deltas.setdefault(rule, []).append(sd - c["source"]["surface_dice"])
        groups = lambda k: [([v[k] for v in r["candidates"].values()],  # noqa: E731
                             [v["surface_dice"] for v in r["candidates"].values()]) for r in runs]
        out["table1"] = {"runs": len(runs), "rules": {k: _outcome(v) for k, v in deltas.items()},
                         "spearman": {"label_free (scoring volumes)": rank_correlation(groups("label_free")),
                                      "contrast (evaluation scan)": rank_correlation(groups("contrast"))}}
    if shifts_rows:
        from shifts import user_gets  # the per-task pairing of source and adapted scans the shift report uses

        checked = [r for r in shifts_rows if "contrast" in (r.get("scan_check") or {})]
        rules = {"product check": None, **{rule: functools.partial(_contrast_rule, rule) for rule in ("C1", "C2")}}
        gets = {rule: user_gets(checked, pick=p).get("convlora-adabn-fast") for rule, p in rules.items()}
        scans: Dict[tuple, List[dict]] = {}
        for r in shifts_rows:
            if r["method"].startswith("cand:fast:") and "contrast" in r:
                scans.setdefault((r["head"], r["family"], r["seed"], r["volume"]), []).append(r)
        groups = lambda f: [([f(v) for v in g], [v["surface_dice"] for v in g])  # noqa: E731
                            for g in scans.values()]
        out["shifts"] = {
            "tasks": gets["product check"]["n_tasks"] if gets["product check"] else 0,
            "rules": {rule: {"n": g["n_tasks"], "mean_gain": round(g["checked_mean_delta"], 4),
                             "worst": round(g["checked_worst"], 4), "below_source_0.005": g["checked_below"]}
                      for rule, g in gets.items() if g},
            "spearman": {"product score (on the scan)": rank_correlation(
                             groups(lambda v: 0.5 * (v["label_free"] + v["tta"]))),
                         "contrast (on the scan)": rank_correlation(groups(lambda v: v["contrast"]))}}
    return out


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="judge the criteria on a Table 1 row cache (rows.jsonl)")
    ap.add_argument("rows", nargs="*", help="Table 1 row caches (rows.jsonl)")
    ap.add_argument("--methods", nargs="*", help="only these methods' rows (default: every adapted method)")
    ap.add_argument("--out", help="write the report as JSON here")
    ap.add_argument("--contrast", action="store_true",
                    help="judge the boundary-contrast rules C1 and C2 instead (the rows: Table 1's; see --shifts)")
    ap.add_argument("--shifts", nargs="*", default=[], help="with --contrast: shifts.py row caches too")
    a = ap.parse_args(argv)
    load = lambda paths: list({r["key"]: r for p in paths for line in open(p) if line.strip()  # noqa: E731
                               for r in [json.loads(line)]}.values())
    rows = load(a.rows)
    if a.methods:
        rows = [r for r in rows if r["method"] in a.methods]
    if a.contrast:
        rep = contrast_report(rows, load(a.shifts))
    elif not rows:
        ap.error("give at least one Table 1 row cache")
    else:
        rep = report(rows)
    print(json.dumps(rep, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rep, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
