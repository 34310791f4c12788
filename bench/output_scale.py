"""Short measurement of the output-scale fix (the final BatchNorm2d(1)'s initial weight and learning rate).

    python bench/output_scale.py --steps 120          # writes bench/results/output_scale.json

A coarse grid (4 mm, 64 px) keeps it short on a CPU: train on three real heads (silver masks), test on the
fourth (held out), for each (out_scale, out_lr_mult); report the final scale, Dice and surface Dice at the grid's
spacing on the held-out head's working grid, and how soft the output is (fraction of brain-box voxels with
0.1 < p < 0.9).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ConvLoRASegLib.grid import WorkingGrid  # noqa: E402
from ConvLoRASegLib.metrics import dice, surface_dice  # noqa: E402
from ConvLoRASegLib.segment import predict_slices  # noqa: E402
from ConvLoRASegLib.train import train_source  # noqa: E402
from ConvLoRASegLib.volumes import mask_to_slices, read_image, to_slices  # noqa: E402

HEADS = ROOT.parent / "shared" / "data" / "heads"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--held-out", default="colin27")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", nargs="+", default=["1:1", "6:1", "1:10"], metavar="SCALE:LR_MULT")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    grid = WorkingGrid(spacing_mm=4.0, slice_size=64)
    data = {}
    for h in sorted(p.name for p in HEADS.iterdir() if (p / "mask_silver.nii.gz").is_file()):
        vs = to_slices(read_image(HEADS / h / "image.nii.gz"), grid)
        data[h] = (vs.slices, mask_to_slices(read_image(HEADS / h / "mask_silver.nii.gz"), vs))
    train = [h for h in data if h != a.held_out]
    rows = []
    for scale, mult in (tuple(float(v) for v in c.split(":")) for c in a.configs):
        t = time.perf_counter()
        model = train_source([data[h][0] for h in train], [data[h][1] for h in train], grid=grid, epochs=1,
                             esh_epochs=0, batch_size=16, steps_per_epoch=a.steps, precision="fp32", device="cpu",
                             lr_schedule="cosine", out_scale=scale, out_lr_mult=mult, seed=0)
        x, y = data[a.held_out]
        p = predict_slices(model, x, torch.device("cpu"), precision="fp32")
        box = y.any((1, 2))
        rows.append({"out_scale": scale, "out_lr_mult": mult, "final_scale": model.info["training"]["output_scale"],
                     "dice": round(dice(p >= 0.5, y > 0), 4),
                     "surface_dice_4mm": round(surface_dice(p >= 0.5, y > 0, (4.0,) * 3, 4.0), 4),
                     "soft_fraction": round(float(((p[box] > 0.1) & (p[box] < 0.9)).mean()), 4),
                     "seconds": round(time.perf_counter() - t, 1)})
        print(json.dumps(rows[-1]), flush=True)
        out = {"held_out": a.held_out, "train": train, "grid": grid.to_dict(), "steps": a.steps, "batch_size": 16,
               "rows": rows}
        (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
        (ROOT / "bench" / "results" / "output_scale.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
