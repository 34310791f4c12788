"""Do the QC flags catch the leaks? Each flag rule of ``ConvLoRASegLib.qc`` against the real heads' masks.

    python bench/qc_flags.py CASES_DIR [CASES_DIR ...]    # -> bench/results/qc_flags/qc_flags.{json,md}

Each CASES_DIR holds masks named ``<head>.nii.gz`` (or ``<head>__<anything>.nii.gz``) made by some model on the real
heads of ``../shared/data/heads`` (e.g. ``bench/real_heads.py evaluate --masks DIR``, the earlier default model and
the fold models; ``bench/real_sites.py``'s adapted masks). A case **leaks** when its mask holds at least
:data:`LEAK_ML` ml farther than :data:`LEAK_MM` mm outside the head's silver mask (tissue past the brain's surface:
skull, scalp, eyes, neck), and it is **good** when it holds less than :data:`GOOD_ML` ml there and its Dice is at
least 0.95. The table counts, for each rule, the leaking cases it flags and the good cases it flags.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from real_heads import HEADS  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "qc_flags"
#: Mask outside the silver mask by more than this many mm counts as leaked tissue.
LEAK_MM = 4.0
#: A case with at least this much leaked tissue (ml) leaks.
LEAK_ML = 5.0
#: A case with less than this (and Dice >= 0.95) is good.
GOOD_ML = 1.0


def outside_ml(mask: np.ndarray, silver: np.ndarray, spacing_zyx) -> float:
    """Volume (ml) of ``mask`` farther than LEAK_MM from ``silver``."""
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(~silver, sampling=spacing_zyx)
    return float(np.count_nonzero(mask & (dist > LEAK_MM))) * float(np.prod(spacing_zyx)) / 1000.0


def case_rows(folders: List[Path]) -> List[dict]:
    import SimpleITK as sitk

    from ConvLoRASegLib import qc
    from ConvLoRASegLib.metrics import dice
    from ConvLoRASegLib.volumes import read_image

    rows = []
    for folder in folders:
        for f in sorted(folder.glob("*.nii.gz")):
            head = f.name.split("__")[0].split(".nii")[0]
            if not (HEADS / head / "mask_silver.nii.gz").is_file():
                continue
            mask_img = read_image(f)
            silver = sitk.GetArrayFromImage(read_image(HEADS / head / "mask_silver.nii.gz")) > 0
            mask = sitk.GetArrayFromImage(mask_img) > 0
            sp = tuple(reversed(mask_img.GetSpacing()))
            m = qc.measure(mask_img, None)
            rows.append({"case": f"{folder.name}/{f.name}", "head": head, "dice": float(dice(mask, silver)),
                         "outside_ml": round(outside_ml(mask, silver, sp), 1), **m})
    return rows


def table(rows: List[dict]) -> Dict[str, dict]:
    leaks = [r for r in rows if r["outside_ml"] >= LEAK_ML]
    good = [r for r in rows if r["outside_ml"] < GOOD_ML and r["dice"] >= 0.95]
    names = sorted({f for r in rows for f in r["flags"]})
    out = {}
    for name in names + ["any flag"]:
        hit = (lambda r: bool(r["flags"])) if name == "any flag" else (lambda r, n=name: n in r["flags"])
        out[name] = {"leaks_flagged": sum(map(hit, leaks)), "leaks": len(leaks),
                     "good_flagged": sum(map(hit, good)), "good": len(good)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    rows = case_rows(a.folders)
    t = table(rows)
    lines = [f"QC flags against leaks ({datetime.date.today().isoformat()}, {platform.machine()}, "
             f"{os.cpu_count()} CPUs; `python bench/qc_flags.py {' '.join(str(f) for f in a.folders)}`). "
             f"Leak: >= {LEAK_ML} ml of mask more than {LEAK_MM} mm outside the silver mask; good: < {GOOD_ML} ml "
             "there and Dice >= 0.95.", "", "| rule | leaking cases flagged | good cases flagged |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['leaks_flagged']} of {v['leaks']} | {v['good_flagged']} of {v['good']} |"
              for k, v in t.items()]
    lines += ["", "| case | Dice | ml outside (> 4 mm) | flags |", "|---|---:|---:|---|"]
    lines += [f"| {r['case']} | {r['dice']:.4f} | {r['outside_ml']} | {', '.join(r['flags']) or '-'} |"
              for r in sorted(rows, key=lambda r: -r["outside_ml"])]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "qc_flags.json").write_text(json.dumps({"table": t, "rows": rows}, indent=1))
    (a.out / "qc_flags.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
