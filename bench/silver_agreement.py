"""How close can any tool come to the silver masks? The raters behind them, scored against each other.

    python bench/silver_agreement.py --ours DIR     # DIR: our cross-validation masks (real_heads.py evaluate --masks)

Every head's silver mask (``../shared/data/heads``) is a STAPLE over ROBEX, deepbet and the shipped mask where one
ships. For every head this scores, on its native grid (Dice, surface Dice at 1 and 2 mm, bench/peers.py's
``scores``):

* deepbet against ROBEX: two standard tools, the raters of every silver mask, against each other;
* the shipped mask against the silver mask, where one ships (the third rater);
* deepbet, ROBEX and ours against the silver mask (ours: the fold model that held the head out);
* ours against deepbet and against ROBEX.

deepbet's and ROBEX's masks come from their cache (``real_heads.py peers``; never run here). The means are given
over the 27 heads, the 18 NiChart heads and the 12 heads of groups no fold model saw (every group but nichart_a).
Results: ``bench/results/real_heads/silver_agreement.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from real_heads import HEADS, index, peer_mask  # noqa: E402

OUT = ROOT / "bench" / "results" / "real_heads"
PAIRS = (("deepbet vs ROBEX", "deepbet", "robex"), ("shipped vs silver", "shipped", "silver"),
         ("deepbet vs silver", "deepbet", "silver"), ("ROBEX vs silver", "robex", "silver"),
         ("ours vs silver", "ours", "silver"), ("ours vs deepbet", "ours", "deepbet"),
         ("ours vs ROBEX", "ours", "robex"))
METRICS = ("dice", "surface_dice_1mm", "surface_dice_2mm")


def masks_of(name: str, cache: Path, ours: Path) -> Tuple[Dict[str, object], Tuple[float, ...]]:
    """The head's masks as boolean arrays (numpy k, j, i), by rater (a rater without a mask is left out), and the
    grid's spacing in that axis order."""
    import SimpleITK as sitk

    def read(p: Path):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(p))) > 0

    silver = sitk.ReadImage(str(HEADS / name / "mask_silver.nii.gz"))
    out = {"silver": sitk.GetArrayFromImage(silver) > 0}
    if (HEADS / name / "mask.nii.gz").is_file():
        out["shipped"] = read(HEADS / name / "mask.nii.gz")
    for tool in ("deepbet", "robex"):
        got = peer_mask(tool, HEADS / name / "image.nii.gz", cache, compute=False)
        if got is not None:
            out[tool] = got[0]
    if (ours / f"{name}.nii.gz").is_file():
        out["ours"] = read(ours / f"{name}.nii.gz")
    return out, tuple(reversed(silver.GetSpacing()))


def run(cache: Path, ours: Path) -> dict:
    from peers import scores

    rows: List[dict] = []
    for r in index():
        name = r["name"]
        m, spacing = masks_of(name, cache, ours)
        row = {"volume": name, "group": r["group"]}
        for label, a, b in PAIRS:
            if a in m and b in m:
                row[label] = {k: round(float(v), 4) for k, v in scores(m[a], m[b], spacing).items()}
        rows.append(row)
        print(name, {k: v["surface_dice_1mm"] for k, v in row.items() if isinstance(v, dict)}, flush=True)
    sets = {"all": rows, "nichart": [x for x in rows if x["group"].startswith("nichart")],
            "unseen groups": [x for x in rows if x["group"] != "nichart_a"]}
    summary = {}
    for set_name, rs in sets.items():
        summary[set_name] = {}
        for label, _, _ in PAIRS:
            have = [x[label] for x in rs if label in x]
            if have:
                summary[set_name][label] = {"heads": len(have), **{k: round(sum(h[k] for h in have) / len(have), 4)
                                                                  for k in METRICS}}
    return {"date": datetime.date.today().isoformat(), "command": " ".join(["python"] + sys.argv),
            "rows": rows, "summary": summary}


def markdown(res: dict) -> str:
    lines = [f"Agreement with the silver masks and between their raters ({res['date']}; `{res['command']}`). "
             "Native grid; mean Dice / surface Dice 1 mm / 2 mm.", "",
             "| pair | " + " | ".join(res["summary"]) + " |", "|---|" + "---:|" * len(res["summary"])]
    for label, _, _ in PAIRS:
        cells = []
        for set_name in res["summary"]:
            s = res["summary"][set_name].get(label)
            cells.append("-" if s is None else f"{s['dice']:.3f} / {s['surface_dice_1mm']:.3f} / "
                                                f"{s['surface_dice_2mm']:.3f} ({s['heads']})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| volume | group | " + " | ".join(f"{p} sD 1 mm" for p, _, _ in PAIRS) + " |",
              "|---|---|" + "---:|" * len(PAIRS)]
    for x in res["rows"]:
        lines.append(f"| {x['volume']} | {x['group']} | " + " | ".join(
            f"{x[p]['surface_dice_1mm']:.4f}" if p in x else "-" for p, _, _ in PAIRS) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours", type=Path, required=True, help="our cross-validation masks, <volume>.nii.gz")
    ap.add_argument("--cache", type=Path, default=Path("/work/cache/peers"), help="deepbet's and ROBEX's masks")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    res = run(a.cache, a.ours)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "silver_agreement.json").write_text(json.dumps(res, indent=1))
    text = markdown(res)
    (a.out / "silver_agreement.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
