"""Where the quality flags' thresholds come from (``ConvLoRASegLib/qc.py``): segment a benchmark cohort with the
default model, exactly as ``convlora-seg segment`` does (``cluster.Segmenter``), and put every case's label-free
measures next to its true quality (Dice and surface Dice at 1 mm against the reference mask).

Cohort: the 4 bundled demo heads, the 4 real heads of ``../shared/data/heads`` (full resolution), and every
simulated scanner site of ``sites.SITES`` on each demo head at severity 1 (the Table 1 setting) and 2 (a harder
shift, to get bad cases). Writes ``bench/results/qc_thresholds.json`` (every case) and ``qc_thresholds.md``
(distributions, the rule behind each threshold, how often each flag fires with the thresholds in ``qc.py``).

    OMP_NUM_THREADS=1 python bench/qc_thresholds.py            # about 5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ConvLoRASegLib import qc  # noqa: E402
from ConvLoRASegLib.cluster import CaseJob, Segmenter, SegmentSettings  # noqa: E402
from ConvLoRASegLib.metrics import dice, surface_dice  # noqa: E402
from ConvLoRASegLib.sites import SITES, demo_heads, simulate_site  # noqa: E402
from ConvLoRASegLib.store import default_model_path  # noqa: E402

HEADS = ROOT.parent / "shared" / "data" / "heads"
#: A case is "good" when its surface Dice at 1 mm is at least this fraction of its head's best score over all
#: variants (the four heads' masks follow different conventions, so absolute surface Dice varies per head).
GOOD_FRACTION = 0.8


def cases(severities):
    for name, (img, mask) in demo_heads().items():
        yield f"demo/{name}", "demo", sitk.ReadImage(str(img)), sitk.ReadImage(str(mask))
    if HEADS.is_dir():
        for d in sorted(p for p in HEADS.iterdir() if (p / "image.nii.gz").is_file()):
            yield f"real/{d.name}", "real", sitk.ReadImage(str(d / "image.nii.gz")), sitk.ReadImage(str(d / "mask.nii.gz"))
    for sev in severities:
        for name, (img, mask) in demo_heads().items():
            image, m = sitk.ReadImage(str(img)), sitk.ReadImage(str(mask))
            for site in SITES:
                si, sm = simulate_site(image, m, site, seed=0, severity=sev)
                yield f"sim{sev:g}/{name}/{site}", f"simulated severity {sev:g}", si, sm


def cropped(severities=None):
    """Each demo head with the top 10 or 25 mm of its brain cut off (a scan whose field of view misses the
    vertex): the cases ``touches_field_of_view`` must catch."""
    from ConvLoRASegLib.volumes import canonical

    for name, (img, mask) in demo_heads().items():
        image, m = canonical(sitk.ReadImage(str(img))), canonical(sitk.ReadImage(str(mask)))
        z = np.flatnonzero(sitk.GetArrayViewFromImage(m).any(axis=(1, 2)))
        for mm in (10, 25):
            top = int(z[-1] - round(mm / m.GetSpacing()[2]))
            yield f"crop{mm}/{name}", f"top {mm} mm cut off", image[:, :, :top], m[:, :, :top]


def truth_measures(pred: sitk.Image, truth: sitk.Image) -> dict:
    p = sitk.GetArrayViewFromImage(pred) > 0
    t = sitk.GetArrayViewFromImage(truth) > 0
    spacing = tuple(reversed(truth.GetSpacing()))
    return {"dice": round(float(dice(p, t)), 4), "surface_dice": round(float(surface_dice(p, t, spacing, 1.0)), 4),
            "truth_ml": round(qc.brain_ml(sitk.GetArrayViewFromImage(truth), truth.GetSpacing()), 1),
            "truth_fov_mm2": qc.measure(sitk.Cast(truth > 0, sitk.sitkUInt8), None)["fov_contact_mm2"]}


def pct(values, qs=(0, 5, 25, 50, 75, 95, 100)):
    v = np.asarray([x for x in values if x is not None], float)
    return {f"p{q}": round(float(np.percentile(v, q)), 3) for q in qs} if v.size else {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--severities", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--crops", action="store_true", help="only the cut-off-vertex cases (-> qc_thresholds_crops)")
    args = ap.parse_args(argv)
    args.out = args.out or str(ROOT / "bench" / "results" / ("qc_thresholds_crops" if args.crops else "qc_thresholds"))
    import torch

    torch.set_num_threads(1)
    seg = Segmenter(SegmentSettings(model=str(default_model_path()), device="cpu"))
    rows = []
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for i, (case, group, image, mask) in enumerate(cropped() if args.crops else cases(args.severities)):
            src = Path(tmp) / f"case{i}.nii.gz"
            sitk.WriteImage(image, str(src))
            job = CaseJob(input=str(src), output=str(Path(tmp) / f"case{i}_mask.nii.gz"))
            row = seg.run(job)
            if row["status"] != "ok":
                print(case, "FAILED", row["flags"], flush=True)
                continue
            row.update(truth_measures(sitk.ReadImage(row["output"]), mask), case=case, group=group)
            rows.append({k: row[k] for k in ("case", "group", "seconds", "brain_ml", "agreement", "fov_contact_mm2",
                                             "flags", "warnings", "dice", "surface_dice", "truth_ml",
                                             "truth_fov_mm2")})
            print(f"{case:<40} agreement {row['agreement']:.3f} brain {row['brain_ml']:7.1f} ml "
                  f"fov {row['fov_contact_mm2']:7.1f} mm2  dice {row['dice']:.3f} sdice {row['surface_dice']:.3f} "
                  f"flags {row['flags']}", flush=True)
    best = {}
    for r in rows:
        head = r["case"].split("/")[1]
        best[head] = max(best.get(head, 0.0), r["surface_dice"])
    for r in rows:
        r["good"] = r["surface_dice"] >= GOOD_FRACTION * best[r["case"].split("/")[1]] and r["dice"] >= 0.9
    good = [r for r in rows if r["good"]]
    bad = [r for r in rows if not r["good"]]
    # the rules (applied here, the rounded results are the constants in qc.py)
    agreement_rule = min(r["agreement"] for r in good) if good else None
    truth_ml = [r["truth_ml"] for r in rows]
    fov_clean = [r["fov_contact_mm2"] for r in rows if r["truth_fov_mm2"] == 0]
    fired = {f: sum(1 for r in rows if f in r["flags"]) for f in ("low_agreement", "implausible_volume",
                                                                   "touches_field_of_view")}
    fired_bad = {f: sum(1 for r in bad if f in r["flags"]) for f in fired}
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
        "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - t_start, 1), "n_cases": len(rows),
        "n_good": len(good), "n_bad": len(bad), "good_rule": f"surface Dice >= {GOOD_FRACTION} x the head's best "
                                                             "and Dice >= 0.9",
        "thresholds_in_qc_py": {"LOW_AGREEMENT": qc.LOW_AGREEMENT, "BRAIN_ML_RANGE": list(qc.BRAIN_ML_RANGE),
                                "FOV_CONTACT_MM2": qc.FOV_CONTACT_MM2},
        "rules": {"lowest agreement of a good case": agreement_rule,
                  "reference brain volumes (ml) min..max": [min(truth_ml), max(truth_ml)],
                  "largest fov contact (mm2) of a predicted mask whose reference mask does not touch the border":
                      max(fov_clean) if fov_clean else None},
        "distributions": {"agreement (good)": pct([r["agreement"] for r in good]),
                          "agreement (bad)": pct([r["agreement"] for r in bad]),
                          "brain_ml (predicted)": pct([r["brain_ml"] for r in rows]),
                          "truth_ml": pct(truth_ml),
                          "fov_contact_mm2 (predicted)": pct([r["fov_contact_mm2"] for r in rows]),
                          "fov_contact_mm2 (reference)": pct([r["truth_fov_mm2"] for r in rows]),
                          "dice": pct([r["dice"] for r in rows]), "surface_dice": pct([r["surface_dice"] for r in rows])},
        "flags_fired": fired, "flags_fired_on_bad_cases": fired_bad,
        "cases_flagged": sum(1 for r in rows if r["flags"]), "bad_cases_flagged": sum(1 for r in bad if r["flags"]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"summary": summary, "cases": rows}, indent=1) + "\n")
    lines = [f"# Quality-flag thresholds ({summary['date']}, {summary['n_cases']} cases, {summary['seconds']:.0f} s)",
             "", f"good = {summary['good_rule']}: {len(good)} good, {len(bad)} bad", "",
             "| measure | p0 | p5 | p25 | p50 | p75 | p95 | p100 |", "|---|---|---|---|---|---|---|---|"]
    for k, d in summary["distributions"].items():
        if d:
            lines.append(f"| {k} | " + " | ".join(f"{d[q]:g}" for q in ("p0", "p5", "p25", "p50", "p75", "p95", "p100"))
                         + " |")
    lines += ["", "Rules: " + "; ".join(f"{k}: {v}" for k, v in summary["rules"].items()), "",
              f"Thresholds in qc.py: {summary['thresholds_in_qc_py']}", "",
              "| flag | fired (all cases) | fired on bad cases |", "|---|---|---|"]
    lines += [f"| {f} | {fired[f]} / {len(rows)} | {fired_bad[f]} / {len(bad)} |" for f in fired]
    lines += ["", f"cases with any flag: {summary['cases_flagged']} / {len(rows)}; bad cases with any flag: "
              f"{summary['bad_cases_flagged']} / {len(bad)}", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
