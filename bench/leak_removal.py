"""Leaks into scalp, muscle and neck joined to the brain by thin bridges: does cutting them on the working grid
(erode, keep the largest core, grow it back) help the leave-one-head-out models on their held-out heads?

    python bench/leak_removal.py --radii 0 2 4 6 8      # -> bench/results/leak_removal.{json,md}

For every ``loho_<head>.safetensors`` in ``--models``: the held-out head's ge3 subjects 0-3 and its real image
(tools/train_default_model.py's evaluation volumes), the working-grid probabilities once, then each radius
(0 = today's pipeline: threshold, largest component, holes filled) scored on the native grid against the silver and
the shipped masks. Radii are chosen before looking at any result and every one is reported.
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
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))

from ConvLoRASegLib import store  # noqa: E402
from ConvLoRASegLib.segment import predict_slices  # noqa: E402
from ConvLoRASegLib.volumes import brain_mask, read_image, to_slices  # noqa: E402
from peers import scores  # noqa: E402
from train_default_model import MODELS, _volumes  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/work/cache/wt11"))
    ap.add_argument("--models", type=Path, default=MODELS)
    ap.add_argument("--radii", type=float, nargs="+", default=[0, 2, 4, 6, 8])
    ap.add_argument("--heads", nargs="*")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "leak_removal.json")
    ap.add_argument("--merge", type=Path, nargs="*", help="only combine the rows of earlier runs (one per head)")
    a = ap.parse_args()
    rows = []
    heads = a.heads or sorted(p.stem[5:] for p in a.models.glob("loho_*.safetensors"))
    if a.merge:
        rows = [r for f in a.merge for r in json.loads(f.read_text())["rows"]]
        heads = sorted({r["head"] for r in rows})
        a.radii = sorted({r["radius_mm"] for r in rows})
    for head in ([] if a.merge else heads):
        model = store.load_model(a.models / f"loho_{head}.safetensors")
        for name, img_p, silver_p, shipped_p in _volumes(a.work / "ge3", head):
            img = read_image(img_p)
            vs = to_slices(img, model.grid)
            probs = predict_slices(model, vs.slices, "cpu")
            sp = tuple(reversed(img.GetSpacing()))
            refs = {k: sitk.GetArrayFromImage(read_image(p)) > 0 for k, p in (("silver", silver_p),
                                                                                ("shipped", shipped_p))}
            for r in a.radii:
                t = time.perf_counter()
                mask = sitk.GetArrayFromImage(brain_mask(probs, vs, leak_radius_mm=r)) > 0
                secs = time.perf_counter() - t
                row = {"head": head, "volume": name, "real": name.endswith("_real"), "radius_mm": r,
                       "seconds": round(secs, 2), **{k: scores(mask, ref, sp) for k, ref in refs.items()}}
                rows.append(row)
                print(f"{name:26} r={r:3.0f} Dice {row['silver']['dice']:.4f} sD1 {row['silver']['surface_dice_1mm']:.4f}"
                      f" sD2 {row['silver']['surface_dice_2mm']:.4f} ({secs:.1f} s)", flush=True)
    summary = {}
    for r in a.radii:
        per_head = {}
        for head in heads:
            rs = [x for x in rows if x["head"] == head and x["radius_mm"] == r]
            per_head[head] = {ref: {m: round(float(np.mean([x[ref][m] for x in rs])), 4)
                                    for m in ("dice", "surface_dice_1mm", "surface_dice_2mm")}
                              for ref in ("silver", "shipped")}
            per_head[head]["real_silver_dice"] = round(float(np.mean([x["silver"]["dice"] for x in rs if x["real"]])), 4)
        summary[str(r)] = {"per_head": per_head, **{
            f"mean_{ref}_{m}": round(float(np.mean([v[ref][m] for v in per_head.values()])), 4)
            for ref in ("silver", "shipped") for m in ("dice", "surface_dice_1mm")},
            "min_silver_dice": min(v["silver"]["dice"] for v in per_head.values())}
    # the radius is chosen on the other heads (mean silver Dice), then scored on this one: no head chooses its own
    nested = {}
    for head in heads:
        others = [h for h in heads if h != head]
        if not others:
            continue
        best = max(summary, key=lambda r: np.mean([summary[r]["per_head"][h]["silver"]["dice"] for h in others]))
        nested[head] = {"radius_mm": float(best), **summary[best]["per_head"][head]["silver"],
                        "radius_0": summary[str(a.radii[0])]["per_head"][head]["silver"]}
    out = {"date": time.strftime("%Y-%m-%d"), "nested": nested, "command": "python bench/leak_removal.py " + " ".join(sys.argv[1:]),
           "heads": heads, "summary": summary, "rows": rows}
    a.out.write_text(json.dumps(out, indent=1))
    lines = ["| radius (mm) | " + " | ".join(f"{h} Dice / sD1" for h in heads) + " | mean Dice silver | min | "
             "mean sD1 silver | mean Dice shipped | mean sD1 shipped |", "|---|" + "---:|" * (len(heads) + 5)]
    for r, s in summary.items():
        cells = " | ".join(f"{s['per_head'][h]['silver']['dice']:.4f} / {s['per_head'][h]['silver']['surface_dice_1mm']:.4f}"
                           for h in heads)
        lines.append(f"| {r} | {cells} | {s['mean_silver_dice']:.4f} | {s['min_silver_dice']:.4f} | "
                     f"{s['mean_silver_surface_dice_1mm']:.4f} | {s['mean_shipped_dice']:.4f} | "
                     f"{s['mean_shipped_surface_dice_1mm']:.4f} |")
    if nested:
        lines += ["", "Radius chosen on the other heads (best mean silver Dice there), scored on the held-out one:", "",
                  "| head | radius (mm) | Dice silver | sD1 silver | at radius 0 |", "|---|---:|---:|---:|---|"]
        lines += [f"| {h} | {v['radius_mm']:g} | {v['dice']:.4f} | {v['surface_dice_1mm']:.4f} | "
                  f"{v['radius_0']['dice']:.4f} / {v['radius_0']['surface_dice_1mm']:.4f} |" for h, v in nested.items()]
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
