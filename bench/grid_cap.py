"""How much of the surface Dice @ 1 mm can a working grid keep at all?

    python bench/grid_cap.py --spacings 2.0 1.5 1.0      # -> bench/results/grid_cap.{json,md}

A perfect network on the working grid would output the reference mask itself, resampled onto that grid. This
script feeds exactly that to the product's own back end (``volumes.brain_mask``: leak cut, linear resampling to
the native grid, threshold 0.5, largest component, holes filled) and scores the result against the same reference
on the native grid. Two "perfect" inputs bound it: ``binary`` (the mask resampled linearly and thresholded, what a
confident network outputs) and ``soft`` (the resampled mask's fraction itself, what an ideally calibrated network
outputs). Whatever a model loses beyond these numbers is the model's; what these numbers lose is the grid's.
Every real head image, silver and shipped masks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ConvLoRASegLib.grid import WorkingGrid  # noqa: E402
from ConvLoRASegLib.volumes import _resample, brain_mask, read_image, to_slices  # noqa: E402
from peers import scores  # noqa: E402

HEADS = ROOT.parent / "shared" / "data" / "heads"


def perfect_inputs(mask: sitk.Image, vs) -> dict:
    """The reference mask on the working grid: its linear fraction (soft) and that fraction >= 0.5 (binary)."""
    frac = _resample(sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkFloat32), vs.working, sitk.sitkLinear, 0.0)
    soft = sitk.GetArrayFromImage(frac).astype(np.float32)
    return {"soft": soft, "binary": (soft >= 0.5).astype(np.float32)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spacings", type=float, nargs="+", default=[2.0, 1.5, 1.0])
    ap.add_argument("--heads", nargs="*", default=sorted(p.name for p in HEADS.iterdir() if p.is_dir()))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "grid_cap")
    args = ap.parse_args()
    rows = []
    for head in args.heads:
        image = read_image(HEADS / head / "image.nii.gz")
        for ref_name in ("mask_silver", "mask"):
            ref = read_image(HEADS / head / f"{ref_name}.nii.gz")
            truth = sitk.GetArrayFromImage(ref) != 0
            spacing = tuple(reversed(ref.GetSpacing()))
            for h in args.spacings:
                grid = WorkingGrid(spacing_mm=h, slice_size=int(8 * np.ceil(256 / h / 8)))
                vs = to_slices(image, grid)
                for kind, probs in perfect_inputs(ref, vs).items():
                    t = time.perf_counter()
                    pred = sitk.GetArrayFromImage(brain_mask(probs, vs)) != 0
                    row = {"head": head, "reference": ref_name, "spacing_mm": h, "input": kind,
                           "native_spacing": list(ref.GetSpacing()), **scores(pred, truth, spacing),
                           "seconds": round(time.perf_counter() - t, 2)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=1))
    lines = ["| reference | input | grid (mm) | " + " | ".join(args.heads) + " | mean Dice | mean sD 1 mm |",
             "|---|---|---|" + "---:|" * (len(args.heads) + 2)]
    for ref_name in ("mask_silver", "mask"):
        for kind in ("binary", "soft"):
            for h in args.spacings:
                sel = [r for r in rows if r["reference"] == ref_name and r["input"] == kind and r["spacing_mm"] == h]
                cells = [f"{r['dice']:.4f} / {r['surface_dice_1mm']:.3f}" for r in sel]
                lines.append(f"| {ref_name} | {kind} | {h:g} | " + " | ".join(cells)
                             + f" | {np.mean([r['dice'] for r in sel]):.4f}"
                             + f" | {np.mean([r['surface_dice_1mm'] for r in sel]):.3f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
