"""Train the bundled default model and measure its model-card accuracy leave-one-head-out.

    python tools/train_default_model.py --work /tmp/convlora-work            # default model + LOHO
    python tools/train_default_model.py --work /tmp/convlora-work --loho-only

1. Simulates the source site (ge3) from the four real heads (tools/make_cohort.py): subjects 0-2 of each head for
   training (a quarter of them, drawn by `convlora-seg train`, choose the best epoch), subject 3 never trained on.
2. Default model: `convlora-seg train` on all four heads (round 1: constant learning rate), then a second
   `convlora-seg train --init ROUND1 --lr-schedule cosine` -> ConvLoRASegLib/data/default_model.safetensors (fp16).
3. Leave one head out (round-1 recipe, for CPU time): train on three heads, test on every subject of the fourth (Dice and surface Dice at 1 mm on
   the native 1 mm grid), all four rotations; writes bench/results/model_card.json. The LOHO models are kept in
   the work folder: bench/table1.py uses them as its source models.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from make_cohort import available_heads, make_site_cohort  # noqa: E402

TRAIN_SUBJECTS, TEST_SUBJECTS = (0, 1, 2), (0, 1, 2, 3)
TRAIN_ARGS = ["--spacing", "2", "--slice-size", "128", "--epochs", "6", "--esh-epochs", "6", "--val-fraction", "0.25",
              "--fp16"]


def split_folder(cohort: Path, heads, subjects, dest: Path) -> Path:
    """Link the chosen heads' subjects of a cohort folder into dest/images + dest/masks."""
    for sub in ("images", "masks"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
        for f in sorted((cohort / sub).glob("*.nii.gz")):
            head, k = f.name.split("_s")[0], int(f.name.split("_s")[1].split("_")[0])
            if head in heads and k in subjects and not (dest / sub / f.name).exists():
                (dest / sub / f.name).symlink_to(f)
    return dest


#: The shipped default model gets a second round: the same data, cosine-decayed learning rate, from round 1.
ROUND2_ARGS = ["--epochs", "6", "--lr-schedule", "cosine"]


def cli_train(images: Path, masks: Path, out: Path, extra=()) -> None:
    args = list(TRAIN_ARGS)
    for i in range(0, len(extra), 2):  # later values override TRAIN_ARGS
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += [extra[i], extra[i + 1]]
    cmd = [sys.executable, "-m", "ConvLoRASegLib", "train", "--images", str(images), "--masks", str(masks),
           "-o", str(out), "--overwrite", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def evaluate(model_path: Path, cohort: Path, head: str) -> dict:
    from ConvLoRASegLib import store
    from ConvLoRASegLib.metrics import dice, surface_dice
    from ConvLoRASegLib.segment import segment_image
    from ConvLoRASegLib.volumes import read_image
    import SimpleITK as sitk

    model = store.load_model(model_path)
    rows = []
    for k in TEST_SUBJECTS:
        name = f"{head}_s{k}_ge3.nii.gz"
        img, truth = read_image(cohort / "images" / name), read_image(cohort / "masks" / name)
        t = time.perf_counter()
        pred = segment_image(model, img, device="cpu")
        secs = time.perf_counter() - t
        p, g = sitk.GetArrayFromImage(pred) > 0, sitk.GetArrayFromImage(truth) > 0
        sp = tuple(reversed(img.GetSpacing()))
        rows.append({"volume": name, "dice": dice(p, g), "surface_dice": surface_dice(p, g, sp, 1.0),
                     "seconds": round(secs, 2)})
    return {"head": head, "volumes": rows,
            "dice": sum(r["dice"] for r in rows) / len(rows),
            "surface_dice": sum(r["surface_dice"] for r in rows) / len(rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/convlora-work"))
    ap.add_argument("--loho-only", action="store_true")
    ap.add_argument("--default-only", action="store_true")
    a = ap.parse_args()
    heads = list(available_heads())
    cohort = a.work / "ge3"
    make_site_cohort("ge3", 4, heads, cohort)
    if not a.loho_only:
        t = time.perf_counter()
        tr = split_folder(cohort, heads, TRAIN_SUBJECTS, a.work / "default_train")
        round1 = a.work / "default_model_round1.safetensors"
        if not round1.exists():
            cli_train(tr / "images", tr / "masks", round1)
        out = a.work / "default_model.safetensors"
        cli_train(tr / "images", tr / "masks", out, ROUND2_ARGS + ["--init", str(round1)])
        dest = ROOT / "ConvLoRASegLib" / "data" / "default_model.safetensors"
        shutil.copyfile(out, dest)
        print(f"default model -> {dest} ({time.perf_counter() - t:.0f} s)", flush=True)
    if a.default_only:
        return 0
    card = {"site": "ge3", "rotations": []}
    for held in heads:
        others = [h for h in heads if h != held]
        tr = split_folder(cohort, others, TRAIN_SUBJECTS, a.work / f"loho_{held}_train")
        model = a.work / f"loho_{held}.safetensors"
        if not model.exists():
            cli_train(tr / "images", tr / "masks", model)
        card["rotations"].append(evaluate(model, cohort, held))
        print(json.dumps(card["rotations"][-1], indent=1), flush=True)
    card["mean_dice"] = sum(r["dice"] for r in card["rotations"]) / len(card["rotations"])
    card["mean_surface_dice"] = sum(r["surface_dice"] for r in card["rotations"]) / len(card["rotations"])
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "model_card.json").write_text(json.dumps(card, indent=1))
    print(f"LOHO mean Dice {card['mean_dice']:.4f}, surface Dice {card['mean_surface_dice']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
