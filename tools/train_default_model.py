"""Train the bundled default model and the leave-one-head-out (LOHO) source models with the current recipe, and
measure them on held-out heads beside deepbet and ROBEX.

    python tools/train_default_model.py train --held-out colin27      # -> <models>/loho_colin27.safetensors
    python tools/train_default_model.py train --held-out none         # all four heads -> <models>/default_model...
    python tools/train_default_model.py evaluate                      # -> bench/results/model_card.json

Data: the simulated source site ge3 (tools/make_cohort.py, in ``<work>/ge3``): subjects 0-2 of each training head
(a quarter of them, drawn by `convlora-seg train`, choose the best epoch), with their silver-standard masks
(``masks_silver/``, STAPLE of shipped mask, ROBEX and deepbet). Subject 3 is never trained on.

Recipe (RECIPE_ARGS, `convlora-seg train`): output scale 6 at the start, TorchIO 3D augmentation (one fresh copy of
every training volume per epoch) + the in-plane batch augmentation, cosine learning rate over all steps, fp32,
checkpoint every 10 steps (``--resume`` picks an interrupted training up).

Evaluation of a LOHO model on its held-out head, native grid, against the silver and the shipped masks: Dice,
surface Dice at 1 mm and 2 mm, on every ge3 subject (0-3) and on the real, unsimulated head image itself; deepbet on
the same volumes, ROBEX on the real head images (its ~1 min per volume). A head is never in both the training and
the evaluation of one model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))

from make_cohort import SHARED_HEADS, available_heads, make_site_cohort  # noqa: E402

TRAIN_SUBJECTS, TEST_SUBJECTS = (0, 1, 2), (0, 1, 2, 3)
#: The grid and split (unchanged from the first default model).
TRAIN_ARGS = ["--spacing", "2", "--slice-size", "128", "--val-fraction", "0.25", "--fp16"]
#: The recipe; epochs x steps sized for ~12 min per model on a loaded 2-core CPU (BENCHMARKS.md has the times).
RECIPE_ARGS = ["--epochs", "6", "--steps-per-epoch", "12", "--batch-size", "16", "--lr", "2e-3",
               "--lr-schedule", "cosine", "--augment-3d", "1", "--out-scale", "6", "--precision", "fp32",
               "--esh-epochs", "2", "--checkpoint-every", "10"]
MODELS = Path(os.environ.get("CONVLORASEG_MODELS", "/work/cache/models"))


def split_folder(cohort: Path, heads, subjects, dest: Path, masks: str = "masks_silver") -> Path:
    """Link the chosen heads' subjects of a cohort folder into dest/images + dest/masks."""
    for sub, src in (("images", "images"), ("masks", masks)):
        (dest / sub).mkdir(parents=True, exist_ok=True)
        for f in sorted((cohort / src).glob("*.nii.gz")):
            head, k = f.name.split("_s")[0], int(f.name.split("_s")[1].split("_")[0])
            if head in heads and k in subjects and not (dest / sub / f.name).exists():
                (dest / sub / f.name).symlink_to(f)
    return dest


def cli_train(images: Path, masks: Path, out: Path, checkpoint: Path, extra=()) -> None:
    args = TRAIN_ARGS + RECIPE_ARGS
    for i in range(0, len(extra), 2):  # later values override
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += [extra[i], extra[i + 1]]
    cmd = [sys.executable, "-m", "ConvLoRASegLib", "train", "--images", str(images), "--masks", str(masks),
           "-o", str(out), "--overwrite", "--resume", "--checkpoint", str(checkpoint), "--device", "cpu", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def cmd_train(a) -> int:
    heads = list(available_heads())
    cohort = a.work / "ge3"
    subjects = tuple(a.train_subjects or TRAIN_SUBJECTS)
    if 3 in subjects:
        raise SystemExit("subject 3 of every head is kept for the evaluation of the all-heads model")
    make_site_cohort("ge3", max(4, max(subjects) + 1), heads, cohort)
    if a.held_out == "none":
        train_heads, name = heads, "default_model"
    else:
        if a.held_out not in heads:
            raise SystemExit(f"unknown head {a.held_out}: one of {', '.join(heads)} or none")
        train_heads, name = [h for h in heads if h != a.held_out], f"loho_{a.held_out}"
    tr = split_folder(cohort, train_heads, subjects, a.work / f"{name}_train")
    a.models.mkdir(parents=True, exist_ok=True)
    out = a.models / f"{name}.safetensors"
    t = time.perf_counter()
    cli_train(tr / "images", tr / "masks", out, a.work / f"{name}.checkpoint.safetensors", a.extra or [])
    print(f"{name} -> {out} ({time.perf_counter() - t:.0f} s wall)", flush=True)
    return 0


def _volumes(cohort: Path, head: str):
    """(name, image, silver mask, shipped mask) of the held-out head's test volumes: ge3 subjects + the real head."""
    out = [(f"{head}_s{k}_ge3", cohort / "images" / f"{head}_s{k}_ge3.nii.gz",
            cohort / "masks_silver" / f"{head}_s{k}_ge3.nii.gz", cohort / "masks" / f"{head}_s{k}_ge3.nii.gz")
           for k in TEST_SUBJECTS]
    real = SHARED_HEADS / head
    out.append((f"{head}_real", real / "image.nii.gz", real / "mask_silver.nii.gz", real / "mask.nii.gz"))
    return out


def evaluate_head(model_path: Path, cohort: Path, head: str, cache: Path, robex: bool) -> dict:
    import SimpleITK as sitk

    from ConvLoRASegLib import store
    from ConvLoRASegLib.segment import segment_image
    from ConvLoRASegLib.volumes import read_image
    from peers import cached_mask, scores

    model = store.load_model(model_path)
    rows = []
    for name, img_path, silver_path, shipped_path in _volumes(cohort, head):
        img = read_image(img_path)
        silver = sitk.GetArrayFromImage(read_image(silver_path)) > 0
        shipped = sitk.GetArrayFromImage(read_image(shipped_path)) > 0
        sp = tuple(reversed(img.GetSpacing()))
        t = time.perf_counter()
        ours = sitk.GetArrayFromImage(segment_image(model, img, device="cpu")) > 0
        preds = {"ours": (ours, time.perf_counter() - t)}
        preds["deepbet"] = cached_mask("deepbet", img_path, cache)
        if robex and name.endswith("_real"):
            preds["robex"] = cached_mask("robex", img_path, cache)
        row = {"volume": name, "real": name.endswith("_real")}
        for tool, (mask, secs) in preds.items():
            row[tool] = {"silver": scores(mask, silver, sp), "shipped": scores(mask, shipped, sp),
                         "seconds": round(secs, 2)}
        rows.append(row)
        print(f"  {name:28} ours Dice {row['ours']['silver']['dice']:.4f} sDice1 "
              f"{row['ours']['silver']['surface_dice_1mm']:.4f} | deepbet {row['deepbet']['silver']['dice']:.4f} "
              f"{row['deepbet']['silver']['surface_dice_1mm']:.4f}", flush=True)
    return {"head": head, "model": str(model_path), "model_sha256": model.sha256,
            "training": model.info.get("training", {}), "volumes": rows}


def _mean(rows, tool, ref, metric, real=None):
    vals = [r[tool][ref][metric] for r in rows if tool in r and (real is None or r["real"] == real)]
    return round(sum(vals) / len(vals), 4) if vals else None


def card_markdown(card: dict) -> str:
    """The LOHO table of BENCHMARKS.md / the README from a model card."""
    lines = ["| held-out head | volumes | tool | Dice silver | sDice 1 mm silver | sDice 2 mm silver | Dice shipped | "
             "sDice 1 mm shipped | sDice 2 mm shipped | s / volume |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in card["rotations"]:
        for subset, real in (("ge3 s0-s3", False), ("real image", True)):
            for tool in ("ours", "deepbet", "robex"):
                vs = [v for v in r["volumes"] if v["real"] == real and tool in v]
                if not vs:
                    continue
                m = lambda ref, k: sum(v[tool][ref][k] for v in vs) / len(vs)  # noqa: E731
                secs = sum(v[tool]["seconds"] for v in vs) / len(vs)
                lines.append(f"| {r['head']} | {subset} ({len(vs)}) | {tool} | {m('silver', 'dice'):.4f} | "
                             f"{m('silver', 'surface_dice_1mm'):.4f} | {m('silver', 'surface_dice_2mm'):.4f} | "
                             f"{m('shipped', 'dice'):.4f} | {m('shipped', 'surface_dice_1mm'):.4f} | "
                             f"{m('shipped', 'surface_dice_2mm'):.4f} | {secs:.1f} |")
    lines += ["", "| mean over held-out heads (all 5 volumes each) | Dice silver | min Dice silver | sDice 1 mm silver | "
              "sDice 2 mm silver | Dice shipped | sDice 1 mm shipped |", "|---|---:|---:|---:|---:|---:|---:|"]
    for tool, s in card.get("summary", {}).items():
        a, b = s["silver"]["all"], s["shipped"]["all"]
        n = len(a["per_head"])
        lines.append(f"| {tool} ({n} heads{', real images only' if tool == 'robex' else ''}) | {a['mean_dice']:.4f} | "
                     f"{a['min_dice']:.4f} | {a['mean_surface_dice_1mm']:.4f} | {a['mean_surface_dice_2mm']:.4f} | "
                     f"{b['mean_dice']:.4f} | {b['mean_surface_dice_1mm']:.4f} |")
    lines += ["", "| model | trained on | steps (epochs x steps, batch) | best epoch | val surface Dice @ grid | "
              "training seconds (CPU process, loaded machine) |", "|---|---|---|---:|---:|---:|"]
    for r in card["rotations"]:
        t = r.get("training", {})
        lines.append(f"| loho_{r['head']} | the three other heads | {t.get('total_steps')} ({t.get('epochs')} x "
                     f"{t.get('steps_per_epoch')}, {t.get('batch_size')}) | {t.get('best_epoch')} | "
                     f"{t.get('best_val_surface_dice')} | {t.get('seconds')} |")
    return "\n".join(lines) + "\n"


def cmd_evaluate(a) -> int:
    heads = list(available_heads())
    cohort = a.work / "ge3"
    make_site_cohort("ge3", 4, heads, cohort)
    card = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
            "shared with other jobs", "command": "python tools/train_default_model.py " + " ".join(sys.argv[1:]),
            "site": "ge3", "references": ["silver (STAPLE of shipped, ROBEX, deepbet)", "shipped"],
            "note": "deepbet and ROBEX are raters of the silver masks: their silver scores are biased upwards",
            "rotations": []}
    for head in a.heads or heads:
        model = a.models / f"loho_{head}.safetensors"
        if not model.is_file():
            print(f"skip {head}: no {model}", flush=True)
            continue
        print(f"held out {head}: {model}", flush=True)
        card["rotations"].append(evaluate_head(model, cohort, head, a.work / "peers", not a.no_robex))
    rot = card["rotations"]
    summary = {}
    for tool in ("ours", "deepbet", "robex"):
        for ref in ("silver", "shipped"):
            for subset, real in (("all", None), ("simulated", False), ("real", True)):
                per_head = {r["head"]: {m: _mean(r["volumes"], tool, ref, m, real)
                                        for m in ("dice", "surface_dice_1mm", "surface_dice_2mm")} for r in rot}
                per_head = {h: v for h, v in per_head.items() if v["dice"] is not None}
                if not per_head:
                    continue
                summary.setdefault(tool, {}).setdefault(ref, {})[subset] = {
                    "per_head": per_head,
                    **{f"mean_{m}": round(sum(v[m] for v in per_head.values()) / len(per_head), 4)
                       for m in ("dice", "surface_dice_1mm", "surface_dice_2mm")},
                    "min_dice": min(v["dice"] for v in per_head.values())}
    card["summary"] = summary
    if "ours" in summary:
        card["mean_dice"] = summary["ours"]["silver"]["all"]["mean_dice"]
        card["mean_surface_dice"] = summary["ours"]["silver"]["all"]["mean_surface_dice_1mm"]
    out = a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    tmp.write_text(json.dumps(card, indent=1))
    os.replace(tmp, out)
    md = card_markdown(card)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(json.dumps({t: {r: v.get("all", {}).get("mean_dice") for r, v in s.items()} for t, s in summary.items()}))
    return 0


def cmd_install(a) -> int:
    """Copy the all-heads model into the package (ConvLoRASegLib/data/default_model.safetensors)."""
    src = a.models / "default_model.safetensors"
    dest = ROOT / "ConvLoRASegLib" / "data" / "default_model.safetensors"
    shutil.copyfile(src, dest)
    print(f"{src} -> {dest} ({dest.stat().st_size / 1e6:.1f} MB)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/work/cache/wt11"))
    ap.add_argument("--models", type=Path, default=MODELS)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train")
    p.add_argument("--held-out", required=True, help="head left out, or none (the default model)")
    p.add_argument("--train-subjects", type=int, nargs="+",
                   help=f"ge3 subjects of each training head (default {' '.join(map(str, TRAIN_SUBJECTS))}; never 3)")
    p.add_argument("extra", nargs="*", help="more `convlora-seg train` options (after --), e.g. -- --epochs 8")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("evaluate")
    p.add_argument("--heads", nargs="*")
    p.add_argument("--no-robex", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "model_card.json",
                   help="the card (JSON; the table goes next to it as .md)")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("install")
    p.set_defaults(func=cmd_install)
    a = ap.parse_args()
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
