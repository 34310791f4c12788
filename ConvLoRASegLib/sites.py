"""Scanner-site simulator: one head as six CC359-like scanners (GE, Philips, Siemens at 1.5 T and 3 T) store it.

CC359 itself cannot be downloaded here; :func:`simulate_site` makes its *kind* of domain shift from any head:
voxel grid and slice thickness, orientation of storage, field of view, a monotone intensity (tone) curve with a
gamma and a grey/white-matter contrast change, a smooth multiplicative bias field, Rician noise, and the
integer range and type the vendor stores. The anatomy is kept: the brain mask goes through the same grid.
:func:`random_subject` makes new "subjects" from one head (smooth elastic deformation + small affine).

The numbers below are plausible, not measured: voxel sizes follow the CC359 paper (see CC359_FACTS.md); the
intensity parameters are chosen so the six sites differ clearly. One knob, ``severity``, scales every
artefact magnitude (0 = only the grid changes, 1 = the profiles as written, > 1 stronger).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
from scipy.interpolate import PchipInterpolator

from .errors import ConvLoRASegError
from .volumes import canonical_direction, orientation_matrix

_DTYPES = {"uint8": np.uint8, "int16": np.int16, "uint16": np.uint16, "float32": np.float32}


@dataclass(frozen=True)
class SiteProfile:
    """How one scanner site acquires and stores a T1 head.

    Attributes:
        name: short site name, e.g. ``"ge3"``.
        description: vendor and field strength in words.
        spacing_mm: voxel size in mm along the stored axes (axis 0, 1, 2), slice thickness included.
        orientation: DICOM-style code of the stored axes (the letter each axis points towards), e.g. ``"RAS"``
            (axis 0 is left-right: "sagittal-first"), ``"PIL"`` (sagittal slices along axis 2).
        fov_mm: field of view in mm along the stored axes (content outside is cropped, missing content is 0).
        psf_fwhm: width of the point-spread function in voxels of this site (1.0: one voxel's width).
        gamma: exponent of the tone curve on [0, 1]-normalised intensities (> 1 darker mid-tones).
        gm_wm_contrast: relative change of the grey-matter level with white matter fixed (+0.15: grey matter
            15 % darker, more contrast; -0.15: less contrast).
        bias: amplitude of the smooth multiplicative bias field, as the largest |log(gain)| in the head.
        noise: Rician noise sigma as a fraction of the white-matter intensity.
        storage_max: intensity the head's 99.5th percentile is stored at / 0.85 (the top of the range).
        dtype: stored pixel type, one of ``uint8``, ``int16``, ``uint16``, ``float32``.
    """

    name: str
    description: str
    spacing_mm: Tuple[float, float, float]
    orientation: str
    fov_mm: Tuple[float, float, float]
    psf_fwhm: float
    gamma: float
    gm_wm_contrast: float
    bias: float
    noise: float
    storage_max: float
    dtype: str


SITES: Dict[str, SiteProfile] = {p.name: p for p in (
    SiteProfile("ge15", "GE 1.5 T", (1.0, 1.0, 1.0), "RAS", (190.0, 256.0, 256.0), 1.1,
                gamma=0.80, gm_wm_contrast=-0.15, bias=0.15, noise=0.045, storage_max=3000.0, dtype="int16"),
    SiteProfile("ge3", "GE 3 T (the paper's source domain)", (1.0, 1.0, 1.0), "RAS", (180.0, 256.0, 256.0), 1.0,
                gamma=1.00, gm_wm_contrast=0.0, bias=0.10, noise=0.020, storage_max=4095.0, dtype="int16"),
    SiteProfile("philips15", "Philips 1.5 T", (1.0, 0.889, 0.889), "LPS", (170.0, 240.0, 240.0), 1.2,
                gamma=1.15, gm_wm_contrast=-0.10, bias=0.20, noise=0.035, storage_max=255.0, dtype="uint8"),
    SiteProfile("philips3", "Philips 3 T", (1.0, 1.0, 1.0), "LPS", (180.0, 240.0, 240.0), 1.0,
                gamma=1.35, gm_wm_contrast=0.18, bias=0.30, noise=0.025, storage_max=1000.0, dtype="float32"),
    SiteProfile("siemens15", "Siemens 1.5 T", (1.0, 1.0, 1.0), "PIL", (256.0, 256.0, 176.0), 1.1,
                gamma=0.90, gm_wm_contrast=-0.12, bias=0.18, noise=0.040, storage_max=4095.0, dtype="uint16"),
    SiteProfile("siemens3", "Siemens 3 T", (1.33, 1.0, 1.0), "LIP", (176.0, 256.0, 256.0), 1.0,
                gamma=1.10, gm_wm_contrast=0.10, bias=0.30, noise=0.020, storage_max=65535.0, dtype="uint16"),
)}

#: Largest random shift of the field of view's centre (mm) per axis: positioning differs between scans.
FOV_JITTER_MM = 4.0


def _profile(site: Union[str, SiteProfile]) -> SiteProfile:
    if isinstance(site, SiteProfile):
        return site
    if site not in SITES:
        raise ConvLoRASegError(f"unknown site {site!r}; choose one of {', '.join(SITES)}")
    return SITES[site]


def _brain_centre(mask: sitk.Image) -> np.ndarray:
    """Physical centre (mm) of the mask's bounding box."""
    kji = np.argwhere(sitk.GetArrayViewFromImage(mask) != 0)
    if kji.size == 0:
        raise ConvLoRASegError("the brain mask is empty")
    centre = (kji.min(0) + kji.max(0))[::-1] / 2.0
    return np.array(mask.TransformContinuousIndexToPhysicalPoint(centre.tolist()))


def site_grid(image: sitk.Image, mask: sitk.Image, profile: SiteProfile, rng: np.random.Generator) -> sitk.Image:
    """Empty image with the site's stored geometry, centred (with jitter) on the brain."""
    direction = canonical_direction(image) @ orientation_matrix(profile.orientation)
    spacing = np.array(profile.spacing_mm, dtype=float)
    size = np.maximum(np.round(np.array(profile.fov_mm) / spacing).astype(int), 2)
    centre = _brain_centre(mask) + rng.uniform(-FOV_JITTER_MM, FOV_JITTER_MM, 3)
    origin = centre - direction @ ((size - 1) / 2.0 * spacing)
    ref = sitk.Image(size.tolist(), sitk.sitkUInt8)
    ref.SetSpacing(spacing.tolist())
    ref.SetOrigin(origin.tolist())
    ref.SetDirection(direction.ravel().tolist())
    return ref


def _psf_blur(image: sitk.Image, ref: sitk.Image, fwhm: float) -> sitk.Image:
    """Gaussian blur so the input's resolution becomes the site's point-spread function (per image axis)."""
    d_in = np.abs(np.array(image.GetDirection()).reshape(3, 3))
    d_ref = np.abs(np.array(ref.GetDirection()).reshape(3, 3))
    # FWHM of the site's PSF along each input axis (closest site axis), minus what the input already has.
    site_axis = np.argmax(d_ref.T @ d_in, axis=0)
    target = fwhm * np.array(ref.GetSpacing())[site_axis]
    have = np.array(image.GetSpacing())
    sigma = np.sqrt(np.maximum(target ** 2 - have ** 2, 0.0)) / 2.3548
    if np.all(sigma < 0.05 * have):
        return image
    return sitk.SmoothingRecursiveGaussian(image, np.maximum(sigma, 1e-3).tolist())


def _subsample(values: np.ndarray, n: int = 500_000) -> np.ndarray:
    return values[:: max(1, values.size // n)]


def tone_curve(x: np.ndarray, brain: np.ndarray, gamma: float, contrast: float) -> np.ndarray:
    """Smooth monotone intensity mapping of [0, 1] intensities: ``x**gamma``, then grey matter (30th percentile
    of the brain) moved by ``-contrast`` relative to white matter (85th percentile) with a monotone cubic
    (PCHIP), applied through a 4097-entry lookup table (nearest entry)."""
    xs = np.linspace(0.0, 1.0, 4097)
    ys = xs ** gamma
    gm, wm = np.percentile(_subsample(np.clip(brain, 0, 1)) ** gamma, [30, 85])
    if 0.0 < gm < wm < 1.0 and contrast != 0:
        new_gm = float(np.clip(gm * (1.0 - contrast), 0.55 * gm, gm + 0.8 * (wm - gm)))
        ys = PchipInterpolator([0.0, 0.5 * gm, gm, wm, 1.0], [0.0, 0.5 * gm, new_gm, wm, 1.0])(ys)
    index = np.multiply(np.clip(x, 0.0, 1.0), np.float32(len(xs) - 1), dtype=np.float32)
    return ys.astype(np.float32)[np.rint(index).astype(np.int32)]  # nearest of 4097 entries: error < 2.5e-4


def bias_field(shape: Tuple[int, int, int], rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Smooth multiplicative gain exp(amplitude * p) with p a random polynomial of degree 2, max |p| = 1."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    field = np.zeros(shape, dtype=np.float32)
    for a in range(3):
        for b in range(3 - a):
            for c in range(3 - a - b):
                if a + b + c == 0:
                    continue
                field += np.float32(rng.normal()) * (axes[0][:, None, None] ** a) * (axes[1][None, :, None] ** b) \
                    * (axes[2][None, None, :] ** c)
    field *= np.float32(amplitude / max(float(np.abs(field).max()), 1e-6))
    return np.exp(field)


def simulate_site(image: sitk.Image, mask: sitk.Image, site: Union[str, SiteProfile], seed: int,
                  severity: float = 1.0, also: Sequence[sitk.Image] = ()) -> Tuple[sitk.Image, ...]:
    """The head as ``site`` would have scanned and stored it, and the brain mask on the same grid.

    Args:
        image: a T1 head (any orientation, spacing, intensity range).
        mask: its brain mask on the same grid (non-zero = brain).
        site: a name in :data:`SITES` or a :class:`SiteProfile`.
        seed: makes the result deterministic (positioning jitter, bias field, noise).
        severity: scales every artefact magnitude (gamma's distance from 1, contrast change, bias, noise, PSF
            widening); 0 keeps only the new grid.

        also: more masks of the same head (e.g. a second rater's) taken through the same grid as ``mask``; the
            geometry and intensities depend on ``mask`` only.

    Returns:
        (image in the site's dtype and range, uint8 {0, 1} mask, *the masks in ``also``), all on the site's grid.
    """
    p = _profile(site)
    rng = np.random.default_rng(seed)
    ref = site_grid(image, mask, p, rng)
    blurred = _psf_blur(sitk.Cast(image, sitk.sitkFloat32), ref, 1.0 + severity * (p.psf_fwhm - 1.0))
    resampled = sitk.Resample(blurred, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    m = sitk.Resample(sitk.Cast(mask != 0, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, 0.0,
                      sitk.sitkFloat32)
    brain = sitk.GetArrayViewFromImage(m) >= 0.5
    a = sitk.GetArrayFromImage(resampled)
    a = _intensities(a, brain, p, rng, severity)
    out = sitk.GetImageFromArray(a)
    out.CopyInformation(ref)
    mask_out = sitk.GetImageFromArray(brain.astype(np.uint8))
    mask_out.CopyInformation(ref)
    extra = tuple(sitk.Cast(sitk.Resample(sitk.Cast(m2 != 0, sitk.sitkFloat32), ref, sitk.Transform(),
                                          sitk.sitkLinear, 0.0, sitk.sitkFloat32) >= 0.5, sitk.sitkUInt8)
                  for m2 in also)
    return (out, mask_out) + extra


def _intensities(a: np.ndarray, brain: np.ndarray, p: SiteProfile, rng: np.random.Generator,
                 severity: float) -> np.ndarray:
    """Tone curve, bias field, Rician noise and storage range/type, in that order, on the site's array."""
    head = a[a > 0]
    if head.size == 0 or not brain.any():
        raise ConvLoRASegError(f"the head does not overlap the field of view of site {p.name}")
    top = float(np.percentile(_subsample(head), 99.5))
    x = np.clip(a / top, 0.0, 1.0)
    gamma = float(p.gamma) ** severity
    y = tone_curve(x, x[brain], gamma, severity * p.gm_wm_contrast)
    y *= bias_field(y.shape, rng, severity * p.bias)
    wm = float(np.percentile(_subsample(y[brain]), 85))
    sigma = np.float32(severity * p.noise * wm)
    if sigma > 0:
        y = np.sqrt((y + sigma * rng.standard_normal(y.shape, dtype=np.float32)) ** 2
                    + (sigma * rng.standard_normal(y.shape, dtype=np.float32)) ** 2)
    level = float(np.percentile(_subsample(y[y > 0]), 99.5)) if np.any(y > 0) else 1.0
    y = np.clip(y * np.float32(0.85 * p.storage_max / max(level, 1e-6)), 0.0, p.storage_max)
    dtype = _DTYPES[p.dtype]
    return (np.round(y) if np.issubdtype(dtype, np.integer) else y).astype(dtype)


def random_subject(image: sitk.Image, mask: sitk.Image, seed: int,
                   strength: float = 1.0, also: Sequence[sitk.Image] = ()) -> Tuple[sitk.Image, ...]:
    """A new "subject" from one head: smooth random elastic deformation (B-spline, about 2 mm, at most 6 mm at
    ``strength`` 1) after a small random affine (scale +-8 %, rotation +-6 degrees per axis), about the brain's
    centre. The same transform moves image (linear, float32 out) and mask (linear of 0/1, >= 0.5, uint8), and
    each mask in ``also`` (returned after them); the grid is kept."""
    rng = np.random.default_rng(seed)
    centre = _brain_centre(mask)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre.tolist())
    angles = np.deg2rad(rng.uniform(-6.0, 6.0, 3) * strength)
    rot = sitk.Euler3DTransform(centre.tolist(), *angles.tolist())
    scale = 1.0 + rng.uniform(-0.08, 0.08, 3) * strength
    affine.SetMatrix((np.array(rot.GetMatrix()).reshape(3, 3) @ np.diag(scale)).ravel().tolist())
    bspline = sitk.BSplineTransformInitializer(image, [4, 4, 4], 3)
    params = np.clip(rng.normal(0.0, 2.0 * strength, len(bspline.GetParameters())), -6.0 * strength,
                     6.0 * strength)
    bspline.SetParameters(params.tolist())
    transform = _as_displacement(sitk.CompositeTransform([affine, bspline]), image)
    out = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), image, transform, sitk.sitkLinear, 0.0,
                        sitk.sitkFloat32)
    m = sitk.Resample(sitk.Cast(mask != 0, sitk.sitkFloat32), mask, transform, sitk.sitkLinear, 0.0,
                      sitk.sitkFloat32)
    mask_out = sitk.Cast(m >= 0.5, sitk.sitkUInt8)
    mask_out.CopyInformation(mask)
    extra = []
    for m2 in also:
        r = sitk.Resample(sitk.Cast(m2 != 0, sitk.sitkFloat32), mask, transform, sitk.sitkLinear, 0.0,
                          sitk.sitkFloat32)
        extra.append(sitk.Cast(r >= 0.5, sitk.sitkUInt8))
    return (out, mask_out) + tuple(extra)


def _as_displacement(transform: sitk.Transform, image: sitk.Image, spacing_mm: float = 4.0) -> sitk.Transform:
    """The transform sampled on a coarse grid over the image (linear in between): much faster to apply to a
    1 mm head than a B-spline evaluated at every voxel, and smooth at this spacing."""
    spacing = np.array(image.GetSpacing())
    size = np.ceil(np.array(image.GetSize()) * spacing / spacing_mm).astype(int) + 3
    direction = np.array(image.GetDirection()).reshape(3, 3)
    start = np.array(image.TransformContinuousIndexToPhysicalPoint([-0.5, -0.5, -0.5]))
    origin = start - direction @ np.full(3, spacing_mm)
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, size.tolist(), origin.tolist(),
                                              [spacing_mm] * 3, direction.ravel().tolist())
    return sitk.DisplacementFieldTransform(field)


def demo_heads() -> Dict[str, Tuple[Path, Path]]:
    """The shipped demo heads: name -> (T1 image path, brain mask path). See ``data/NOTICE`` for their sources."""
    folder = Path(__file__).resolve().parent / "data" / "demo"
    heads = {}
    for image in sorted(folder.glob("*_t1.nii.gz")):
        name = image.name[: -len("_t1.nii.gz")]
        mask = folder / f"{name}_mask.nii.gz"
        if mask.exists():
            heads[name] = (image, mask)
    return heads

