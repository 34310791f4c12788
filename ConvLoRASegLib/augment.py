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

With ``synth`` > 0, that share of the copies has its intensities *synthesised* (SynthStrip's idea, Hoopes et al.
2022, after Billot et al.'s SynthSeg): a tissue label map is made from the volume itself (:func:`tissue_labels`:
k-means classes of the intensities inside the brain mask and, separately, of the head outside it), moved with
the image by the spatial steps, and ``tio.RandomLabelsToImage`` draws a new mean and spread for every class
before the scanner steps. Scalp, muscle and neck then take any brightness, also the brain's, so the network has
to find the brain by its shape and place rather than by its grey level: the leaks into scalp and neck that the
default model makes on unseen heads are what this is for.

The mask follows every spatial step (nearest neighbour; partial-volume fractions: linear, and no intensity step).
Random numbers come from torch's global generator, which :func:`augment_volume` seeds inside a forked RNG scope: the
same ``seed`` gives the same volume, and the caller's random stream is untouched.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

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

#: Tissue classes of a synthesised copy: k-means classes inside the brain mask and in the head around it (label 0
#: is the air outside the head), and the ranges TorchIO draws each class's mean and standard deviation from.
SYNTH: Dict[str, Any] = {"brain_classes": 3, "head_classes": 3, "air_below": 0.06,
                         "mean": [0.0, 1.0], "std": [0.0, 0.08], "air_mean": [0.0, 0.15], "air_std": [0.0, 0.03],
                         "partial_volume_blur_mm": [0.3, 1.0]}


def check_bias_field(bias_field: Optional[float]) -> None:
    """A bias-field coefficient is a finite number >= 0 (None: the recipe's)."""
    if bias_field is not None and not (math.isfinite(bias_field) and bias_field >= 0):
        raise ConvLoRASegError(f"bias field coefficient must be a number >= 0, got {bias_field}")


def recipe(bias_field: Optional[float] = None) -> Dict[str, Any]:
    """The 3D augmentation recipe as used: :data:`RECIPE`, with ``bias_field``'s coefficient where one is given."""
    if bias_field is None:
        return RECIPE
    return dict(RECIPE, bias_field=dict(RECIPE["bias_field"], coefficients=float(bias_field)))


def _torchio():
    try:
        import torchio as tio
    except ImportError:
        raise ConvLoRASegError("3D augmentation needs TorchIO: pip install 'ConvLoRASegLib[train]' "
                               "(or train with --augment-3d 0)") from None
    return tio


def _spatial(tio):
    r = RECIPE
    return tio.Compose([
        tio.RandomAffine(scales=tuple(r["affine"]["scales"]), degrees=r["affine"]["degrees"],
                         translation=r["affine"]["translation_mm"], default_pad_value=0, p=r["affine"]["p"]),
        tio.RandomElasticDeformation(num_control_points=r["elastic"]["control_points"],
                                     max_displacement=r["elastic"]["max_displacement_mm"], p=r["elastic"]["p"]),
    ])


def _synthesis(tio, partial_volume: bool = False):
    """New intensities for every tissue class of the subject's ``tissue`` label map, then a partial-volume blur
    (of the image only: ``partial_volume`` fractions stay as they are)."""
    n = 1 + SYNTH["brain_classes"] + SYNTH["head_classes"]
    mean = [tuple(SYNTH["air_mean"])] + [tuple(SYNTH["mean"])] * (n - 1)
    std = [tuple(SYNTH["air_std"])] + [tuple(SYNTH["std"])] * (n - 1)
    return tio.Compose([
        tio.RandomLabelsToImage(label_key="tissue", image_key="image", used_labels=list(range(n)),
                                mean=mean, std=std),
        tio.RandomBlur(std=tuple(SYNTH["partial_volume_blur_mm"]), **_image_only(partial_volume)),
    ])


def _image_only(partial_volume: bool) -> Dict[str, Any]:
    """Keyword arguments that keep an intensity transform off the mask when the mask is a scalar image (fractions)."""
    return {"exclude": ["mask"]} if partial_volume else {}


def _kmeans_1d(values: np.ndarray, k: int, iterations: int = 12) -> np.ndarray:
    """Sorted centres of a 1D k-means (quantile start, Lloyd iterations on at most 200k values)."""
    v = values[:: max(1, values.size // 200_000)].astype(np.float64)
    centres = np.quantile(v, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        near = np.argmin(np.abs(v[:, None] - centres[None, :]), axis=1)
        centres = np.array([v[near == j].mean() if np.any(near == j) else centres[j] for j in range(k)])
    return np.sort(centres)


def _classes(values: np.ndarray, centres: np.ndarray) -> np.ndarray:
    edges = 0.5 * (centres[1:] + centres[:-1])
    return np.searchsorted(edges, values).astype(np.uint8)


def tissue_labels(slices: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A tissue label map of a working-grid volume: 0 air, 1..B brain classes (k-means of the intensities inside
    ``mask``, darkest first), B+1..B+H the head's other tissues (k-means outside it). The head is the largest
    connected piece of the lightly smoothed volume at or above ``SYNTH["air_below"]``, holes filled, so noise in
    the air stays air. uint8, the shape of ``slices``."""
    from scipy import ndimage

    b, h = SYNTH["brain_classes"], SYNTH["head_classes"]
    brain = np.asarray(mask) != 0
    lit, n = ndimage.label(ndimage.gaussian_filter(slices, 1.0) >= SYNTH["air_below"])
    head = np.zeros_like(brain)
    if n:
        head = ndimage.binary_fill_holes(lit == int(np.argmax(np.bincount(lit.ravel())[1:])) + 1)
    head &= ~brain
    labels = np.zeros(slices.shape, dtype=np.uint8)
    for region, k, first in ((brain, b, 1), (head, h, 1 + b)):
        if np.count_nonzero(region) >= k:
            vals = slices[region]
            labels[region] = first + _classes(vals, _kmeans_1d(vals, k))
    return labels


def _transform(tio, shape: Tuple[int, int, int], spacing_mm: float, partial_volume: bool = False,
               bias_field: Optional[float] = None):
    r, only = recipe(bias_field), _image_only(partial_volume)
    return tio.Compose([
        tio.RandomBiasField(coefficients=r["bias_field"]["coefficients"], p=r["bias_field"]["p"], **only),
        tio.RandomGamma(log_gamma=tuple(r["gamma"]["log_gamma"]), p=r["gamma"]["p"], **only),
        tio.RandomBlur(std=tuple(r["blur"]["std_mm"]), p=r["blur"]["p"], **only),
        tio.RandomAnisotropy(downsampling=tuple(r["anisotropy"]["downsampling"]), p=r["anisotropy"]["p"], **only),
        tio.RandomMotion(degrees=5, translation=5, num_transforms=2, p=r["motion"]["p"], **only),
        tio.RandomGhosting(num_ghosts=(2, 6), intensity=(0.2, 0.6), p=r["ghosting"]["p"], **only),
        tio.RandomNoise(std=tuple(r["noise"]["std"]), p=r["noise"]["p"], **only),
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


def augment_volume(slices: np.ndarray, mask: np.ndarray, spacing_mm: float, seed: int,
                   synth: float = 0.0, partial_volume: bool = False,
                   bias_field: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]:
    """One augmented copy of a working-grid volume ``slices`` (float32 N x H x W, [0, 1]) and its 0/1 ``mask``;
    with probability ``synth`` its intensities are synthesised from its tissue classes (module docstring).
    ``partial_volume``: ``mask`` holds partial-volume fractions in [0, 1]; it moves with the image under linear
    interpolation (a label map moves under nearest neighbour), the intensity transforms leave it alone, and the
    copy's mask is returned as float32 fractions. ``bias_field``: the largest coefficient of TorchIO's polynomial
    bias field (log scale; default the recipe's, ``RECIPE["bias_field"]``)."""
    tio = _torchio()
    if slices.shape != mask.shape or slices.ndim != 3:
        raise ConvLoRASegError(f"volume {slices.shape} and mask {mask.shape} must be the same 3D shape")
    if not 0.0 <= synth <= 1.0:
        raise ConvLoRASegError(f"synth must be a probability in [0, 1], got {synth}")
    check_bias_field(bias_field)
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        synthesise = synth > 0 and float(torch.rand(1, generator=gen)) < synth
        images = {"image": tio.ScalarImage(tensor=torch.from_numpy(np.ascontiguousarray(slices))[None],
                                           affine=affine),
                  "mask": (tio.ScalarImage(tensor=torch.from_numpy(np.ascontiguousarray(mask, np.float32))[None],
                                           affine=affine) if partial_volume else
                           tio.LabelMap(tensor=torch.from_numpy(mask.astype(np.uint8))[None], affine=affine))}
        if synthesise:
            images["tissue"] = tio.LabelMap(tensor=torch.from_numpy(tissue_labels(slices, mask >= 0.5))[None],
                                            affine=affine)
        subject = tio.Subject(**images)
        fov = _fov_crop(tio, slices.shape, spacing_mm, gen)
        if fov is not None:
            subject = fov(subject)
        subject = _spatial(tio)(subject)
        if synthesise:
            subject = _synthesis(tio, partial_volume)(subject)
        subject = _transform(tio, slices.shape, spacing_mm, partial_volume, bias_field)(subject)
        x = subject["image"].data[0].numpy().astype(np.float32)
        y = subject["mask"].data[0].numpy()
    y = np.clip(y, 0.0, 1.0).astype(np.float32) if partial_volume else (y > 0).astype(np.uint8)
    np.clip(x, 0.0, None, out=x)
    nz = x[x > 0]
    if nz.size:
        lo, hi = np.percentile(nz[:: max(1, nz.size // 500_000)], [0.5, 99.5])
        x = np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)
    return x, y
