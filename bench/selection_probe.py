"""Why the selection chose a worse candidate on the speed cohort: every candidate of one fast adaptation scored on
held-out scans against their masks, beside its label-free score there (BENCHMARKS.md, issue 10, 2026-12-02).

    python bench/speed.py --only adapt_fast --work W        # prepares W/full/cohort_siemens3 and heldout_siemens3
    python bench/selection_probe.py --work W/full
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ConvLoRASegLib import selection, selftrain, store  # noqa: E402
from ConvLoRASegLib.metrics import surface_dice  # noqa: E402
from ConvLoRASegLib.segment import predict_slices  # noqa: E402
from ConvLoRASegLib.volumes import mask_to_slices, read_image, to_slices  # noqa: E402
from criteria import boundary_contrast, contrast_pick  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="the speed benchmark's prepared folder (…/full)")
    ap.add_argument("--site", default="siemens3")
    ap.add_argument("--volumes", type=int, default=10)
    ap.add_argument("--criteria", action="store_true",
                    help="also bench/criteria.py's criteria of every candidate on the scoring volumes")
    a = ap.parse_args()
    model = store.load_model()
    target = sorted((a.work / f"cohort_{a.site}" / "images").glob("*.nii.gz"))[: a.volumes]
    held = sorted((a.work / f"heldout_{a.site}" / "images").glob("*.nii.gz"))
    volumes = [to_slices(read_image(p), model.grid).slices for p in target]
    res = selftrain.adapt(model, volumes, device="cpu")
    print("selected", res.selected, {k: round(v, 4) for k, v in res.candidates.items()})
    tests = []
    for p in held:
        vs = to_slices(read_image(p), model.grid)
        tests.append((vs, mask_to_slices(read_image(p.parent.parent / "masks" / p.name), vs) > 0))
    scoring = [volumes[i] for i in selftrain.selection_indices(len(volumes), 4)] if a.criteria else []
    src_finals = [predict_slices(model, x, "cpu") for x in scoring]
    held_sd, held_lf, held_contrast = {}, {}, {}
    for name in res.candidate_states:
        m = selftrain.candidate_model(model, res, name)
        if scoring:
            from criteria import criteria

            crit = [criteria(m, x, "cpu", source_final=f) for x, f in zip(scoring, src_finals)]
            print(f"{name:8} criteria on the scoring volumes (mean): "
                  f"{ {k: round(float(np.mean([c[k] for c in crit])), 4) for k in crit[0]} }", flush=True)
        sds, lfs, cts = [], [], []
        for vs, truth in tests:
            final, early = predict_slices(m, vs.slices, "cpu", with_esh=True)
            sds.append(surface_dice(final >= 0.5, truth, (m.grid.spacing_mm,) * 3, 1.0))
            lfs.append(selection.score_model(m, vs.slices, "cpu", predicted=(final, early)))
            cts.append(boundary_contrast(final, vs.slices))
        print(f"{name:8} held-out surface Dice {np.mean(sds):.4f} {[round(x, 4) for x in sds]} | label-free there "
              f"{[round(s.value, 3) for s in lfs]} consistency {[round(s.consistency, 3) for s in lfs]} "
              f"contrast {[round(c, 4) for c in cts]}", flush=True)
        held_sd[name], held_lf[name], held_contrast[name] = sds, lfs, cts
    # what a user gets with `segment --adapter FILE` (the per-scan check, its default) on each held-out scan: the
    # selected candidate where it beats the source model's label-free score on that scan, else the source model
    sel = res.selected
    picks = [selection.choose_volume_scores({selection.SOURCE: held_lf[selection.SOURCE][i], sel: held_lf[sel][i]})
             for i in range(len(tests))]
    got = [held_sd[p][i] for i, p in enumerate(picks)]
    print(f"per-scan check ({sel} vs source): kept {picks}; held-out surface Dice {np.mean(got):.4f} "
          f"(source {np.mean(held_sd[selection.SOURCE]):.4f}, {sel} unchecked {np.mean(held_sd[sel]):.4f})", flush=True)
    # the boundary-contrast rules fixed in bench/criteria.py before this probe recorded them
    for rule in ("C1", "C2"):
        ruled = [contrast_pick({"contrast": held_contrast[selection.SOURCE][i]}, {"contrast": held_contrast[sel][i]},
                               "source" if p == selection.SOURCE else "selected", rule) for i, p in enumerate(picks)]
        got = [held_sd[selection.SOURCE if r == "source" else sel][i] for i, r in enumerate(ruled)]
        print(f"rule {rule}: kept {ruled}; held-out surface Dice {np.mean(got):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
