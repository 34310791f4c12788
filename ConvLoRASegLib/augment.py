"""3D training augmentation for scanners and fields of view (TorchIO), applied to working-grid volumes before slicing.

Only ``convlora-seg train`` uses it; segmentation and adaptation never import TorchIO (install it with the
``train`` extra: ``pip install ConvLoRASegLib[train]``).

A training volume is the working grid's slice stack ``(N, H, W)`` (isotropic ``spacing_mm``, axes L, I, P: see
:mod:`ConvLoRASegLib.volumes`) with its 0/1 mask. :func:`augment_volume` returns a new volume of the same shape:

1. field of view: a random crop (up to ``FOV_CUT_MM`` from each in-plane side, most below: the neck cut or kept),
   padded back with background at the same place (``tio.Crop`` + ``tio.Pad``): the working grid is placed from
   the vertex (:func:`~ConvLoRASegLib.volumes.head_centre`), so a scan whose field of view stops higher or
   lower shows the head where it was, with less or more below it;
2. geometry: ``tio.RandomAffine`` (scales 0.8-1.2 per axis, +-15 degrees, +-16 mm), ``tio.RandomElasticDeformation``;
3. scanner: ``tio.RandomBiasField``, ``tio.RandomGamma``, ``tio.RandomBlur``, ``tio.RandomAnisotropy``,
   ``tio.RandomMotion``, ``tio.RandomGhosting``, ``tio.RandomNoise`` (each with its own probability);
4. intensities clipped at 0 and normalised again like a scan (0.5th / 99.5th percentile of non-zero voxels).

The mask follows every spatial step (nearest neighbour). Random numbers come from torch's global generator,
which :func:`augment_volume` seeds inside a forked RNG scope: the same ``seed`` gives the same volume, and the
caller's random stream is untouched.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as np
import torch

from .errors import ConvLoRASegError

#: Largest crop of the field of view per in-plane side (mm): superior/anterior/posterior, and inferior (neck).
FOV_CUT_MM = (20.0, 60.0)

#: The recipe as recorded in the model file's training record.
RECIPE: Dict[str, Any] = {
    "library": "torchio",
    "fov_cut_mm": FOV_CUT_MM,
    "affine": {"scales": [0.8, 1.2], "degrees": 15, "translation_mm": 16, "p": 0.9},
    "elastic": {"control_points": 7, "max_displacement_mm": 8, "p": 0.3},
    "bias_field": {"coefficients": 0.6, "p": 0.6},
    "gamma": {"log_gamma": [-0.4, 0.4], "p": 0.7},
    "blur": {"std_mm": [0, 1.5], "p": 0.3},
    "anisotropy": {"downsampling": [1.5, 3.0], "p": 0.2},
    "motion": {"p": 0.15},
    "ghosting": {"p": 0.15},
    "noise": {"std": [0, 0.06], "p": 0.5},
}


def _torchio():
    try:
        import torchio as tio
    except ImportError:
        raise ConvLoRASegError("3D augmentation needs TorchIO: pip install 'ConvLoRASegLib[train]' "
                               "(or train with --augment-3d 0)") from None
    return tio


def _transform(tio, shape: Tuple[int, int, int], spacing_mm: float):
    r = RECIPE
    return tio.Compose([
        tio.RandomAffine(scales=tuple(r["affine"]["scales"]), degrees=r["affine"]["degrees"],
                         translation=r["affine"]["translation_mm"], default_pad_value=0, p=r["affine"]["p"]),
        tio.RandomElasticDeformation(num_control_points=r["elastic"]["control_points"],
                                     max_displacement=r["elastic"]["max_displacement_mm"], p=r["elastic"]["p"]),
        tio.RandomBiasField(coefficients=r["bias_field"]["coefficients"], p=r["bias_field"]["p"]),
        tio.RandomGamma(log_gamma=tuple(r["gamma"]["log_gamma"]), p=r["gamma"]["p"]),
        tio.RandomBlur(std=tuple(r["blur"]["std_mm"]), p=r["blur"]["p"]),
        tio.RandomAnisotropy(downsampling=tuple(r["anisotropy"]["downsampling"]), p=r["anisotropy"]["p"]),
        tio.RandomMotion(degrees=5, translation=5, num_transforms=2, p=r["motion"]["p"]),
        tio.RandomGhosting(num_ghosts=(2, 6), intensity=(0.2, 0.6), p=r["ghosting"]["p"]),
        tio.RandomNoise(std=tuple(r["noise"]["std"]), p=r["noise"]["p"]),
    ])


def _fov_crop(tio, shape: Tuple[int, int, int], spacing_mm: float, gen: torch.Generator):
    """A crop of the in-plane field of view (axes 1 = I and 2 = P of the (N, H, W) stack), padded back in place."""
    n, h, w = shape
    top, neck = (int(round(c / spacing_mm)) for c in FOV_CUT_MM)

    def draw(hi: int) -> int:
        return int(torch.randint(0, max(hi, 0) + 1, (1,), generator=gen)) if torch.rand(1, generator=gen) < 0.5 \
            else 0

    # torchio's spatial axes are (N, H, W) here; Crop takes (n_lo, n_hi, h_lo, h_hi, w_lo, w_hi).
    # H grows towards inferior: h_hi is the neck side.
    crop = (0, 0, draw(top), draw(neck), draw(top), draw(top))
    if not any(crop):
        return None
    return tio.Compose([tio.Crop(crop), tio.Pad(crop, padding_mode=0)])


def augment_volume(slices: np.ndarray, mask: np.ndarray, spacing_mm: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """One augmented copy of a working-grid volume ``slices`` (float32 N x H x W, [0, 1]) and its 0/1 ``mask``."""
    tio = _torchio()
    if slices.shape != mask.shape or slices.ndim != 3:
        raise ConvLoRASegError(f"volume {slices.shape} and mask {mask.shape} must be the same 3D shape")
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        subject = tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(np.ascontiguousarray(slices))[None],
                                                    affine=affine),
                              mask=tio.LabelMap(tensor=torch.from_numpy(mask.astype(np.uint8))[None], affine=affine))
        fov = _fov_crop(tio, slices.shape, spacing_mm, gen)
        if fov is not None:
            subject = fov(subject)
        subject = _transform(tio, slices.shape, spacing_mm)(subject)
        x = subject["image"].data[0].numpy().astype(np.float32)
        y = subject["mask"].data[0].numpy().astype(np.uint8)
    np.clip(x, 0.0, None, out=x)
    nz = x[x > 0]
    if nz.size:
        lo, hi = np.percentile(nz[:: max(1, nz.size // 500_000)], [0.5, 99.5])
        x = np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)
    return x, (y > 0).astype(np.uint8)
