"""Regenerate the demo heads in ConvLoRASegLib/data/demo/ from the four real heads in /work/shared/data/heads.

For every head: crop to the head (intensity above 5 % of the 99th percentile, largest component, 4 mm
margin), resample to isotropic ``max(1.75 mm, finest input spacing)`` on the SAME direction matrix as the
source (so the orientations stay as shipped: LPS-like, RAS-like, permuted axes), rescale intensities to uint8
(0 to the 99.9th percentile of the head -> 0..255) and write ``<name>_t1.nii.gz``; the brain mask goes through
the same grid (linear of the 0/1 mask, >= 0.5, largest component, holes filled) as ``<name>_mask.nii.gz``.

Usage: python tools/make_demo_data.py [--heads /work/shared/data/heads] [--out ConvLoRASegLib/data/demo]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ConvLoRASegLib.volumes import postprocess, write_image  # noqa: E402

NAMES = ("colin27", "itk_kmeans", "mni152_nlin6asym", "robex_atlas")
MARGIN_MM = 4.0
MIN_SPACING_MM = 1.75  # 1.5 mm makes the four heads 4.7 MB together; 1.75 mm about 3 MB


def head_box(image: sitk.Image) -> Tuple[np.ndarray, np.ndarray]:
    """Index bounds (lo, hi inclusive, x/y/z order) of the head plus ``MARGIN_MM``."""
    a = sitk.GetArrayViewFromImage(image)
    fg = a > 0.05 * np.percentile(a, 99)
    labels, n = ndimage.label(fg)
    fg = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    kji = np.argwhere(fg)
    margin = np.ceil(MARGIN_MM / np.array(image.GetSpacing())).astype(int)
    size = np.array(image.GetSize())
    lo = np.maximum(kji.min(0)[::-1] - margin, 0)
    hi = np.minimum(kji.max(0)[::-1] + margin, size - 1)
    return lo, hi


def demo_grid(image: sitk.Image, lo: np.ndarray, hi: np.ndarray) -> sitk.Image:
    """Isotropic reference grid covering index box [lo, hi] of ``image`` with the image's direction."""
    h = max(MIN_SPACING_MM, min(image.GetSpacing()))
    spacing = np.array(image.GetSpacing())
    extent = (hi - lo + 1) * spacing
    size = np.maximum(np.round(extent / h).astype(int), 1)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    start = np.array(image.TransformContinuousIndexToPhysicalPoint((lo - 0.5).tolist()))
    origin = start + direction @ (np.full(3, h / 2.0))
    ref = sitk.Image(size.tolist(), sitk.sitkUInt8)
    ref.SetSpacing([h] * 3)
    ref.SetOrigin(origin.tolist())
    ref.SetDirection(image.GetDirection())
    return ref


def make_one(src: Path, out: Path, name: str) -> Tuple[Path, Path]:
    image = sitk.Cast(sitk.ReadImage(str(src / "image.nii.gz")), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(src / "mask.nii.gz"))
    ref = demo_grid(image, *head_box(image))
    h = ref.GetSpacing()[0]
    sigma = [0.4 * np.sqrt(max(h * h - s * s, 0.0)) + 1e-3 for s in image.GetSpacing()]
    smooth = sitk.SmoothingRecursiveGaussian(image, sigma)
    img = sitk.GetArrayFromImage(sitk.Resample(smooth, ref, sitk.Transform(), sitk.sitkLinear, 0.0,
                                               sitk.sitkFloat32))
    top = np.percentile(img[img > 0], 99.9)
    u8 = np.clip(np.round(np.clip(img, 0, None) / top * 255.0), 0, 255).astype(np.uint8)
    m = sitk.Resample(sitk.Cast(mask != 0, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, 0.0,
                      sitk.sitkFloat32)
    m8 = postprocess(sitk.GetArrayViewFromImage(m) >= 0.5)
    paths = []
    for arr, suffix in ((u8, "t1"), (m8, "mask")):
        im = sitk.GetImageFromArray(arr)
        im.CopyInformation(ref)
        paths.append(write_image(im, out / f"{name}_{suffix}.nii.gz", overwrite=True))
    return paths[0], paths[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=Path, default=Path("/work/shared/data/heads"))
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "ConvLoRASegLib" / "data" / "demo")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    for name in NAMES:
        ip, mp = make_one(args.heads / name, args.out, name)
        im, mk = sitk.ReadImage(str(ip)), sitk.ReadImage(str(mp))
        ml = float(sitk.GetArrayViewFromImage(mk).sum()) * np.prod(mk.GetSpacing()) / 1000.0
        size = ip.stat().st_size + mp.stat().st_size
        total += size
        print(f"{name}: {im.GetSize()} at {im.GetSpacing()[0]} mm, "
              f"orientation {sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(im.GetDirection())}, "
              f"brain {ml:.0f} ml, {size / 1e6:.2f} MB")
    print(f"total {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
