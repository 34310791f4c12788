"""Recalibrated copies of trained models: their U-Net BatchNorm statistics recomputed from their own plain training
volumes with the adaptation's AdaBN recipe (``adabn.adabn_volumes``), for the comparison of issue 10 (does AdaBN
stop hurting on the shifts that are not scanner shifts when source and target statistics are computed alike?).

    python bench/source_statistics.py --models M --images W/loho_HEAD_train/images ... -o M_recal

For each ``loho_<head>.safetensors`` in ``--models`` whose training folder is given (``--images``, in the same order
as ``--heads``), the files named in the model's own record (``info["train_images"]``) are read onto its working
grid, the statistics recomputed, and the model written under the same name into ``-o``. The ESH is not retrained
(``train --bn-statistics recalibrated`` does it in the right order for new models). The copies are then benchmarked
with the same scripts as the originals (``bench/leak_removal.py``, ``bench/shifts.py``: ``--models`` the new folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ConvLoRASegLib import store  # noqa: E402
from ConvLoRASegLib.adabn import adabn_volumes  # noqa: E402
from ConvLoRASegLib.volumes import read_image, to_slices  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--heads", nargs="+", required=True)
    ap.add_argument("--images", type=Path, nargs="+", required=True, help="each head's training image folder")
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args()
    if len(a.images) != len(a.heads):
        ap.error("one --images folder per head")
    a.out.mkdir(parents=True, exist_ok=True)
    for head, folder in zip(a.heads, a.images):
        src = a.models / f"loho_{head}.safetensors"
        model = store.load_model(src)
        names = model.info.get("train_images") or []
        t = time.perf_counter()
        volumes = [to_slices(read_image(folder / n), model.grid).slices for n in names]
        n = adabn_volumes(model, volumes)
        model.info.setdefault("training", {})["bn_statistics"] = "recalibrated (bench/source_statistics.py)"
        model.info["training"]["bn_statistics_slices"] = n
        store.save_model(model, a.out / src.name, dtype=torch.float16, overwrite=True)  # as tools/ saves them
        print(json.dumps({"head": head, "volumes": len(volumes), "slices": n,
                          "seconds": round(time.perf_counter() - t, 1), "out": str(a.out / src.name)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
