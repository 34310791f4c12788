"""Volumes: reading, writing and the geometry between a scanner's grid and the network's slices, both ways.

One module does the geometry for everybody (CLI, Slicer module, training, adaptation)::

    image = read_image(path)                      # any 3D scalar image SimpleITK reads, float32
    vs = to_slices(image, grid)                   # canonical orientation -> working grid -> (N, H, W) in [0, 1]
    probs = network(vs.slices)                    # (N, H, W) probabilities, done elsewhere
    mask = brain_mask(probs, vs)                  # uint8 {0, 1} with exactly the input's geometry

Coordinates are SimpleITK's: physical points in millimetres in the LPS patient frame (x grows towards the
patient's Left, y towards Posterior, z towards Superior).

Canonical orientation
    :func:`canonical` reorients (permutes and flips axes, no interpolation) to ``CANONICAL_ORIENTATION`` =
    ``"LPS"``: image axis 0 points to the Left, 1 to Posterior, 2 to Superior (the identity direction for a
    non-oblique image). An oblique image stays oblique: its axes are only relabelled to the closest of L, P, S.

Working grid
    The network's grid shares the canonical axes (and so any obliqueness of the acquisition, which usually
    follows the head) but is isotropic with ``grid.spacing_mm`` and its axes are ordered so that the numpy
    array of the working image is the slice stack ``(N, H, W)`` directly (``WORKING_ORIENTATION``):

    ============  ======================  ========================  ================================
    grid.axis     N (slice index) towards  H (rows, top to bottom)   W (columns, left to right)
    ============  ======================  ========================  ================================
    sagittal      Left (slice 0 = right)  Inferior (top = superior)  Posterior (left column = nose)
    coronal       Posterior               Inferior                  Left (radiological view)
    axial         Superior                Posterior (top = nose)    Left (radiological view)
    ============  ======================  ========================  ================================

    Every slice is ``slice_size x slice_size`` voxels centred in-plane on the head (:func:`head_centre`: a
    model-free head box from intensities), not on the image's centre, so that a field of view with neck, an
    off-centre head or a smaller field of view shows the network (and AdaBN) the head in the same place (padded with
    background or cropped); N covers the image's whole extent along the slicing axis.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .atomic import atomic_output
from .errors import ConvLoRASegError
from .grid import WorkingGrid
from .integrity import check_image_file

PathLike = Union[str, os.PathLike]

#: Orientation code (DICOM convention: the letter each axis points towards) of :func:`canonical`.
CANONICAL_ORIENTATION = "LPS"
#: Orientation code of the working image per slicing axis: axes (W, H, N), so that the array is (N, H, W).
WORKING_ORIENTATION = {"sagittal": "PIL", "coronal": "LIP", "axial": "LPS"}
#: File endings :func:`write_image` writes.
WRITABLE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
#: Downsampling factor above which :func:`to_slices` low-pass filters first (anti-aliasing).
ANTIALIAS_FACTOR = 1.5
#: Voxel size (mm) at which :func:`head_centre` looks for the head (a coarse, fast look).
HEAD_BOX_VOXEL_MM = 4.0
#: Depth (mm) below the top of the head of the working grid's centre: on the four real heads of the project the
#: brain mask's box centre lies 78-95 mm below the vertex (its top 14-18 mm below), so a 256 mm field of view
#: centred here keeps the whole brain with >= 40 mm to spare above and below.
HEAD_CENTRE_BELOW_VERTEX_MM = 85.0
#: Height (mm) of the slab below the vertex whose box gives the left-right and front-back centre (the neck and
#: shoulders below it do not move the centre).
HEAD_SLAB_MM = 170.0

_LETTER_AXIS = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


# --------------------------------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class ImageInfo:
    """Header information of an image file, read without its pixels.

    Attributes:
        size: voxels along each axis (x, y, z[, t]).
        spacing: voxel size in mm along each axis.
        n_components: components per voxel (1 for a scalar image).
        bytes_per_component: storage size of one component in the file's pixel type.
        dimension: number of axes.
    """

    size: Tuple[int, ...]
    spacing: Tuple[float, ...]
    n_components: int
    bytes_per_component: int
    dimension: int

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.size[:3], dtype=np.int64))

    @property
    def data_bytes(self) -> int:
        """Bytes of voxel data the header announces (every volume of a 4D file, every component)."""
        return int(np.prod(self.size, dtype=np.int64)) * self.n_components * self.bytes_per_component


def _dicom_files(folder: Path) -> List[str]:
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise ConvLoRASegError(f"{folder} is a folder without a DICOM series")
    # The series with the most files is the volume; the others are usually localisers.
    series = [sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in ids]
    return list(max(series, key=len))


def _bytes_per_component(pixel_id: int) -> int:
    name = sitk.GetPixelIDValueAsString(pixel_id)
    for key, nbytes in (("64-bit", 8), ("32-bit", 4), ("16-bit", 2), ("8-bit", 1)):
        if key in name:
            return nbytes
    return 8


def _header_reader(path: PathLike) -> sitk.ImageFileReader:
    p = Path(path)
    if not p.exists():
        raise ConvLoRASegError(f"{p}: no such file")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(_dicom_files(p)[0]) if p.is_dir() else str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        check_image_file(p)  # a damaged compressed header says so
        raise ConvLoRASegError(f"{p} is not an image file SimpleITK can read") from None
    return reader


def image_info(path: PathLike) -> ImageInfo:
    """Read only the header of an image file (or of a DICOM series folder): cheap, even for huge files."""
    p = Path(path)
    reader = _header_reader(p)
    size = tuple(int(s) for s in reader.GetSize())
    if p.is_dir():
        size = size[:2] + (len(_dicom_files(p)),)
    return ImageInfo(size=size, spacing=tuple(float(s) for s in reader.GetSpacing()),
                     n_components=int(reader.GetNumberOfComponents()),
                     bytes_per_component=_bytes_per_component(reader.GetPixelID()), dimension=len(size))


def _check_shape(info: ImageInfo, name: str, first_volume: bool) -> bool:
    """Refuse images that are not 3D scalar volumes; returns True when a 4D file must be cut to volume 0."""
    if info.n_components != 1:
        raise ConvLoRASegError(f"{name} has {info.n_components} components per voxel (a vector or colour "
                               "image); a scalar 3D MRI is needed")
    size = info.size
    if info.dimension == 4 and size[3] > 1:
        if not first_volume:
            raise ConvLoRASegError(f"{name} is 4D with {size[3]} volumes; pass --first-volume to take volume 0 "
                                   "(in Python: first_volume=True)")
        return True
    if info.dimension < 3 or info.dimension > 4 or min(size[:3]) < 2:
        raise ConvLoRASegError(f"{name} is {'x'.join(map(str, size))} voxels: not a 3D volume")
    return info.dimension == 4


def _read_voxels(p: Path, info: ImageInfo, cut: bool) -> sitk.Image:
    """SimpleITK's read of the file (or DICOM series folder) ``p``; ``cut``: volume 0 of a 4D file. Raises
    ConvLoRASegError (one line) where SimpleITK fails."""
    try:
        if p.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(_dicom_files(p))
            return reader.Execute()
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        if cut:
            reader.SetExtractIndex([0, 0, 0, 0])
            reader.SetExtractSize(list(info.size[:3]) + [0])
        return reader.Execute()
    except RuntimeError as e:
        raise ConvLoRASegError(f"{p.name} could not be read: {str(e).strip().splitlines()[-1]}") from None


def read_image(path: PathLike, first_volume: bool = False) -> sitk.Image:
    """Read a 3D scalar image (NIfTI, NRRD, MHA, ... or a DICOM series folder) as float32.

    Args:
        path: an image file, or a folder holding one DICOM series.
        first_volume: for a 4D file (e.g. fMRI, multi-echo), take volume 0 instead of refusing it.

    Raises:
        ConvLoRASegError: missing file, not an image, 2D, 4D, vector pixels, a file cut short or a damaged
            compressed stream (:func:`~ConvLoRASegLib.integrity.check_image_file`), constant volume, NaN/Inf voxels.
    """
    p = Path(path)
    info = image_info(p)
    cut = _check_shape(info, p.name, first_volume)
    # The file's integrity check decompresses the voxels once more. For NIfTI, which SimpleITK reads without a word
    # whatever the damage, it runs beside the read (both release the GIL while they inflate) and its verdict comes
    # first; other formats are checked before SimpleITK sees them (a damaged MetaImage makes it print to stderr).
    if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz")):
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="convloraseg-check") as pool:
            checked = pool.submit(check_image_file, p, info.data_bytes)
            try:
                image = _read_voxels(p, info, cut)
            except ConvLoRASegError:
                checked.result()  # a damaged file says so, whatever the read made of it
                raise
            checked.result()
    else:
        check_image_file(p, info.data_bytes)
        image = _read_voxels(p, info, cut)
    if image.GetDimension() == 4:  # a 4D header with one volume
        image = image[:, :, :, 0]
    image = sitk.Cast(image, sitk.sitkFloat32)
    _check_values(image, p.name)
    return image


#: A label image (a mask, a segmentation) has at most this many distinct values; a scan has hundreds.
MAX_LABELS = 16


def read_label_image(path: PathLike) -> sitk.Image:
    """Read a 3D label image (a brain mask, a segmentation) in its stored pixel type. Refuses what is not one: a
    scan or a probability map given as a mask (non-integer values, or more than :data:`MAX_LABELS` distinct
    values), besides everything :func:`read_image` refuses except an empty mask."""
    p = Path(path)
    info = image_info(p)
    if info.dimension != 3 or info.n_components != 1:
        raise ConvLoRASegError(f"{p.name} is not a 3D label image")
    check_image_file(p, info.data_bytes)
    try:
        image = sitk.ReadImage(str(p))
    except RuntimeError as e:
        raise ConvLoRASegError(f"{p.name} could not be read: {str(e).strip().splitlines()[-1]}") from None
    check_label_image(image, p.name)
    return image


def check_label_image(image: sitk.Image, name: str) -> None:
    """Refuse (one line) an image that is not a label image: non-integer values, or more than :data:`MAX_LABELS`
    distinct values."""
    a = sitk.GetArrayViewFromImage(image)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ConvLoRASegError(f"{name} contains NaN or infinite voxels: not a label image")
        frac = a[a != np.round(a)]
        if frac.size:
            raise ConvLoRASegError(f"{name} is not a label image: it has non-integer values (e.g. {float(frac[0]):g}; "
                                   "a scan or probabilities?); give a mask")
    sample = np.unique(a.ravel()[:: max(1, a.size // 100_000)])
    sampled = sample.size > MAX_LABELS
    n = sample.size if sampled else _distinct(a)
    if n > MAX_LABELS:
        raise ConvLoRASegError(f"{name} is not a label image: {n:,}{' or more' if sampled else ''} distinct values "
                               f"where a mask has at most {MAX_LABELS} (a scan?); give a mask")


def _distinct(a: np.ndarray) -> int:
    """Number of distinct values of an integer-valued array (by counting when their range is small: fast)."""
    lo, hi = a.min(), a.max()
    if hi - lo < (1 << 20):
        return int(np.count_nonzero(np.bincount((np.asarray(a, np.int64) - int(lo)).ravel())))
    return int(np.unique(a).size)


def _check_values(image: sitk.Image, name: str) -> None:
    a = sitk.GetArrayViewFromImage(image)
    lo, hi = float(np.min(a)), float(np.max(a))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ConvLoRASegError(f"{name} contains NaN or infinite voxels")
    if lo == hi:
        raise ConvLoRASegError(f"{name} is {'empty' if hi == 0 else 'constant'} (every voxel is {lo:g})")


def check_intensities(image: sitk.Image) -> List[str]:
    """Warnings (one line each) about intensities that do not look like the T1 MRI the models were trained on."""
    a = sitk.GetArrayViewFromImage(image)
    lo, hi = float(np.min(a)), float(np.max(a))
    warnings = []
    if lo < -500 and hi > 1000:
        warnings.append("looks like CT (Hounsfield units); this model was trained on T1 MRI")
    elif lo < 0 and -lo > 0.05 * max(hi, 1e-12):
        warnings.append(f"has large negative values (min {lo:g}); MRI magnitudes are not negative")
    sample = a.ravel()[:: max(1, a.size // 200_000)]
    if np.unique(sample).size <= 2:
        warnings.append("has only two distinct values: it looks like a mask or label image, not an MRI")
    return warnings


# --------------------------------------------------------------------------------------------------- writing

def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in sorted(WRITABLE_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    raise ConvLoRASegError(f"{path.name}: cannot write this file type; use one of {', '.join(WRITABLE_SUFFIXES)}")


def write_image(image: sitk.Image, path: PathLike, overwrite: bool = False) -> Path:
    """Write an image atomically (:func:`~ConvLoRASegLib.atomic.atomic_output`: a temporary file in the same
    folder, renamed when complete); returns the path.

    Raises:
        ConvLoRASegError: unknown file type, existing file without ``overwrite``, missing or read-only folder,
            or a failed write.
    """
    p = Path(path)
    _suffix(p)  # refuse an unknown file type before anything is written
    try:
        with atomic_output(p, overwrite=overwrite) as tmp:
            sitk.WriteImage(image, str(tmp), True)
    except (RuntimeError, OSError) as e:
        raise ConvLoRASegError(f"cannot write {p}: {str(e).strip().splitlines()[-1]}") from None
    return p


# ----------------------------------------------------------------------------------------------- orientation

def _direction(image: sitk.Image) -> np.ndarray:
    return np.array(image.GetDirection(), dtype=float).reshape(3, 3)


def orientation_matrix(code: str) -> np.ndarray:
    """3x3 signed permutation P with ``new_direction = canonical_direction @ P`` for an orientation code."""
    m = np.zeros((3, 3))
    for col, letter in enumerate(code.upper()):
        axis, sign = _LETTER_AXIS[letter]
        m[axis, col] = sign
    return m


def canonical_direction(image: sitk.Image) -> np.ndarray:
    """Direction matrix (columns = axes) :func:`canonical` gives ``image``, computed without copying pixels."""
    ref = sitk.Image([2, 2, 2], sitk.sitkUInt8)
    ref.SetDirection(image.GetDirection())
    return _direction(sitk.DICOMOrient(ref, CANONICAL_ORIENTATION))


def canonical(image: sitk.Image) -> sitk.Image:
    """Reorient to ``CANONICAL_ORIENTATION`` ("LPS") by permuting/flipping axes (no interpolation)."""
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION)


def physical_centre(image: sitk.Image) -> np.ndarray:
    """Centre of the image's physical extent in mm (LPS)."""
    centre = [(s - 1) / 2.0 for s in image.GetSize()]
    return np.array(image.TransformContinuousIndexToPhysicalPoint(centre))


def _corners(image: sitk.Image) -> np.ndarray:
    """(8, 3) physical positions of the outer voxel edges (the image's extent) in mm."""
    size = np.array(image.GetSize(), dtype=float)
    idx = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=float) * size - 0.5
    m = _direction(image) * np.array(image.GetSpacing())
    return np.array(image.GetOrigin()) + idx @ m.T


def _reference(size: Sequence[int], spacing: Sequence[float], origin: Sequence[float],
               direction: np.ndarray, pixel: int = sitk.sitkUInt8) -> sitk.Image:
    ref = sitk.Image([int(s) for s in size], pixel)
    ref.SetSpacing([float(s) for s in spacing])
    ref.SetOrigin([float(o) for o in origin])
    ref.SetDirection([float(d) for d in np.asarray(direction).ravel()])
    return ref


def head_centre(image: sitk.Image) -> np.ndarray:
    """Where the brain's centre is expected (mm, LPS), from intensities alone: a cheap, model-free head box.

    The image is shrunk to about ``HEAD_BOX_VOXEL_MM`` voxels, Otsu's threshold separates head from air and the
    largest connected component is the head (neck included, if the field of view has it). Its top (the vertex) is
    found in physical space; the centre is ``HEAD_CENTRE_BELOW_VERTEX_MM`` below it (or the middle of the head's
    height, if that is higher: a field of view cut above the chin, a small phantom) and, left-right and
    front-back, the middle of the head's box within ``HEAD_SLAB_MM`` below the vertex (so that neck and shoulders
    do not pull it). Falls back to :func:`physical_centre` when no head is found (e.g. a constant image).
    """
    # float32 in the canonical voxel order, whatever the pixel type and the file's axis order: the same bins below
    image = canonical(sitk.Cast(image, sitk.sitkFloat32))
    spacing = np.array(image.GetSpacing(), dtype=float)
    # rounded: spacings that differ in the 16th digit (a file round trip) must give the same bins
    factors = [int(f) for f in np.maximum(1, np.floor(np.round(HEAD_BOX_VOXEL_MM / spacing, 6)))]
    small = sitk.BinShrink(image, factors) if max(factors) > 1 else image
    try:
        fg = sitk.OtsuThreshold(small, 0, 1)
        labels = sitk.RelabelComponent(sitk.ConnectedComponent(fg), sortByObjectSize=True)
    except RuntimeError:
        return physical_centre(image)
    kji = np.argwhere(sitk.GetArrayViewFromImage(labels) == 1)
    if len(kji) < 8:
        return physical_centre(image)
    m = _direction(small) * np.array(small.GetSpacing())
    pts = np.array(small.GetOrigin()) + kji[:, ::-1].astype(float) @ m.T
    top = pts[:, 2].max()  # LPS: +z is superior
    slab = pts[pts[:, 2] >= top - HEAD_SLAB_MM]
    centre = (slab.min(0) + slab.max(0)) / 2.0
    # never below the middle of the head's own extent (a field of view cut above the chin, a phantom)
    centre[2] = max(top - HEAD_CENTRE_BELOW_VERTEX_MM, (top + pts[:, 2].min()) / 2.0)
    return centre


def working_reference(image: sitk.Image, grid: WorkingGrid) -> sitk.Image:
    """An empty uint8 image with the working grid's geometry for ``image`` (see the module docstring)."""
    direction = canonical_direction(image) @ orientation_matrix(WORKING_ORIENTATION[grid.axis])
    h = grid.spacing_mm
    extent = _corners(image) @ direction[:, 2]
    n = max(1, int(np.ceil((extent.max() - extent.min()) / h - 1e-6)))
    size = np.array([grid.slice_size, grid.slice_size, n])
    # in-plane: centred on the head; along the slicing axis: the image's whole extent
    centre = physical_centre(image)
    offset = head_centre(image) - centre
    centre = centre + direction[:, :2] @ (direction[:, :2].T @ offset)
    origin = centre - direction @ ((size - 1) / 2.0 * h)
    return _reference(size, [h] * 3, origin, direction)


# ------------------------------------------------------------------------------------------- volume <-> slices

@dataclass
class VolumeSlices:
    """A volume as the network sees it, and the way back.

    Attributes:
        slices: float32 (N, H, W) normalised intensities; 0 outside the input.
        working: the working-grid image (isotropic ``grid.spacing_mm``, canonical axes ordered as
            ``WORKING_ORIENTATION``); its pixels are ``slices``.
        native: uint8 reference image with exactly the input's size, spacing, origin and direction.
    """

    slices: np.ndarray
    working: sitk.Image
    native: sitk.Image


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """Do two images lie on the same voxel grid (size, spacing, origin, direction, within file-rounding tolerances)?"""
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4))


def _resample(image: sitk.Image, reference: sitk.Image, interpolator: int, default: float,
              pixel: int = sitk.sitkFloat32) -> sitk.Image:
    f = sitk.ResampleImageFilter()
    f.SetReferenceImage(reference)
    f.SetInterpolator(interpolator)
    f.SetDefaultPixelValue(default)
    f.SetOutputPixelType(pixel)
    return f.Execute(image)


def antialias(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """Gaussian low-pass before resampling to ``spacing_mm`` along axes downsampled by > ``ANTIALIAS_FACTOR``.

    sigma (voxels of the input) = (factor - 1) / 2 per axis, the rule scikit-image uses; kernel truncated at
    3 sigma (scipy's separable filter: about twice as fast here as SimpleITK's recursive Gaussian).
    """
    # rounded: spacings that differ in the 16th digit (a file round trip) must give the same kernel radius
    factor = np.round(spacing_mm / np.array(image.GetSpacing()), 6)
    if not np.any(factor > ANTIALIAS_FACTOR):
        return image
    sigma_vox = np.where(factor > ANTIALIAS_FACTOR, (factor - 1) / 2.0, 0.0)
    smooth = sitk.GetImageFromArray(_gaussian_threaded(sitk.GetArrayViewFromImage(image), sigma_vox[::-1]))
    smooth.CopyInformation(image)
    return smooth


def _gaussian_threaded(a: np.ndarray, sigma: Sequence[float], truncate: float = 3.0) -> np.ndarray:
    """``ndimage.gaussian_filter(a, sigma, truncate=truncate)`` (float32 in, float32 out, bit for bit the same), on
    every core: each 1D pass runs on slabs cut along another axis (scipy releases the GIL while it filters)."""
    src = np.asarray(a, dtype=np.float32)
    workers = max(1, min(os.cpu_count() or 1, 8))
    axes = [ax for ax in range(src.ndim) if sigma[ax] > 0]
    if workers == 1 or src.ndim < 2 or src.size < 1_000_000 or not axes:
        return ndimage.gaussian_filter(src, tuple(sigma), truncate=truncate)
    out = np.empty_like(src)
    with ThreadPoolExecutor(workers) as pool:
        for ax in axes:
            cut = max((d for d in range(src.ndim) if d != ax), key=lambda d: src.shape[d])
            bounds = np.linspace(0, src.shape[cut], workers + 1).astype(int)

            def run(lo_hi, ax=ax, cut=cut, src=src):
                idx = [slice(None)] * src.ndim
                idx[cut] = slice(*lo_hi)
                ndimage.gaussian_filter1d(src[tuple(idx)], sigma[ax], axis=ax, output=out[tuple(idx)],
                                          truncate=truncate)

            list(pool.map(run, [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]))
            # the next pass reads this one's result: swap, keeping the caller's array untouched
            src, out = out, (np.empty_like(out) if src is a else src)
    return src


def intensity_range(image: sitk.Image, method: str) -> Tuple[float, float]:
    """The (lo, hi) intensities that ``method`` maps to 0 and 1, from the input's own voxels.

    ``"minmax"``: the volume's minimum and maximum. ``"percentile"``: the 0.5th and 99.5th percentiles of its
    non-zero voxels (a fixed regular subsample of at most ~2 M voxels). Computed on the native array, not on the
    resampled one, so the result does not depend on the grid geometry: a volume and its copy with a direction
    matrix that differs in the 16th digit (as after a round trip through a file or a Slicer node) normalise alike.
    """
    a = sitk.GetArrayViewFromImage(image).ravel()
    if method == "minmax":
        lo, hi = float(a.min()), float(a.max())
    else:
        if a.size > 2_000_000:
            a = a[:: a.size // 1_000_000]
        nonzero = a[a != 0]
        values = nonzero if nonzero.size else a
        lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def normalise(a: np.ndarray, inside: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` to [0, 1] in place (clipped); voxels not ``inside`` the image (padding) become 0."""
    a -= lo
    a *= 1.0 / (hi - lo)
    np.clip(a, 0.0, 1.0, out=a)
    a[~inside] = 0.0
    return a


def to_slices(image: sitk.Image, grid: WorkingGrid) -> VolumeSlices:
    """Resample ``image`` onto the working grid (linear, anti-aliased) and normalise it as ``grid`` says."""
    ref = working_reference(image, grid)
    if image.GetPixelID() != sitk.sitkFloat32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    smooth = antialias(image, grid.spacing_mm)
    work = _resample(smooth, ref, sitk.sitkLinear, float("nan"))
    a = sitk.GetArrayFromImage(work)
    inside = np.isfinite(a)
    if not inside.any():
        raise ConvLoRASegError("the image does not overlap its own working grid (broken geometry?)")
    a[~inside] = 0.0
    normalise(a, inside, *intensity_range(image, grid.normalisation))
    working = sitk.GetImageFromArray(a)
    working.CopyInformation(ref)
    native = _reference(image.GetSize(), image.GetSpacing(), image.GetOrigin(), _direction(image))
    return VolumeSlices(slices=a, working=working, native=native)


def mask_to_slices(mask: sitk.Image, vs: VolumeSlices, partial_volume: bool = False) -> np.ndarray:
    """A label image on the input grid as working slices (N, H, W): linear of the 0/1 mask, >= 0.5, uint8 {0, 1};
    or, with ``partial_volume``, the share of each working voxel inside the mask (float32 in [0, 1]): the 0/1 mask
    anti-aliased as the image is (:func:`to_slices`) and resampled linearly, so the 0.5 level of the fractions,
    interpolated back to the input grid, lies on the mask's surface even where the working grid is coarser than
    the input or offset from it (a 0/1 target moves that surface by up to half a working voxel)."""
    binary = sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkFloat32)
    if partial_volume:
        binary = antialias(binary, vs.working.GetSpacing()[0])
    work = _resample(binary, vs.working, sitk.sitkLinear, 0.0)
    a = sitk.GetArrayViewFromImage(work)  # a view: valid while ``work`` lives
    return np.clip(a, 0.0, 1.0).astype(np.float32) if partial_volume else (a >= 0.5).astype(np.uint8)


def _working_probs(probs: np.ndarray, vs: VolumeSlices) -> np.ndarray:
    """``probs`` as float32, refused unless it has the working slices' shape."""
    probs = np.asarray(probs, dtype=np.float32)
    if probs.shape != vs.slices.shape:
        raise ValueError(f"probabilities of shape {probs.shape} do not match the slices {vs.slices.shape}")
    return probs


def to_native(probs: np.ndarray, vs: VolumeSlices, reference: Optional[sitk.Image] = None) -> sitk.Image:
    """Working-grid probabilities (N, H, W) as a float32 image on the input's exact grid (linear, 0 outside), or on
    ``reference`` (a part of that grid)."""
    work = sitk.GetImageFromArray(_working_probs(probs, vs))
    work.CopyInformation(vs.working)
    return _resample(work, vs.native if reference is None else reference, sitk.sitkLinear, 0.0)


def postprocess(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 3D connected component (6-connected) and fill its enclosed holes; uint8 {0, 1}."""
    m = np.asarray(mask) != 0
    labels, n = ndimage.label(m)
    out = np.zeros(m.shape, dtype=np.uint8)
    if n == 0:
        return out
    largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    box = ndimage.find_objects(labels)[largest - 1]
    box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, d)) for s, d in zip(box, m.shape))
    out[box] = _fill_holes(labels[box] == largest)
    return out


#: Probability at and above which a voxel is brain in a delivered mask (:func:`brain_mask`). At 0.5 the masks were
#: 60-140 ml larger than the silver masks on folds 0-1 of the real heads' cross-validation, where 0.6 scored better;
#: a rule written before folds 2-4 existed (bench/real_heads.py) tested 0.6 on them and kept 0.5: on a scan with a
#: strong bias field, which the model under-segments, 0.6 lowered the worst Dice (BENCHMARKS.md, "Real heads").
MASK_THRESHOLD = 0.5
#: Radius (mm) of the erosion that cuts leaks off the brain (:func:`detach_leaks`); 0 turns it off. Chosen in
#: bench/leak_removal.py (commit 566cb1e) on the leave-one-head-out models' held-out heads (BENCHMARKS.md, "Answered once").
LEAK_RADIUS_MM = 8.0
#: The cut is applied only if what it keeps is at least this share of the mask: a leak is the smaller part.
LEAK_KEEP_MIN = 0.5


def detach_leaks(probs: np.ndarray, spacing_mm: float, radius_mm: float) -> np.ndarray:
    """Working-grid probabilities with what hangs on the brain by a thin bridge set to 0.

    A leak into scalp, temporal muscle or neck tissue touches the brain mask through a narrow neck, so the largest
    connected component keeps it. Eroding the mask (``probs >= 0.5``) by a ball of ``radius_mm`` cuts every bridge
    thinner than twice the radius; the largest piece left is the brain's core. Everything farther than the radius
    plus one voxel from that core is set to 0 (the brain's own boundary lies within the radius of its core, so it
    is kept as predicted). Erosion and growth are distance transforms (exactly a ball's, faster than a structuring
    element) on the mask's bounding box. ``spacing_mm``: the isotropic grid spacing. An empty mask, one that the
    erosion removes entirely, or one whose core would keep less than :data:`LEAK_KEEP_MIN` of it (fragments, not a
    brain with leaks) is returned unchanged.
    """
    m = np.asarray(probs) >= 0.5
    r = radius_mm / spacing_mm
    if r <= 0 or not m.any():
        return probs
    idx = np.argwhere(m)
    lo = np.maximum(idx.min(0) - int(r) - 3, 0)
    hi = np.minimum(idx.max(0) + int(r) + 4, m.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    inner = (slice(1, -1),) * m.ndim
    core = ndimage.distance_transform_edt(np.pad(m[box], 1))[inner] > r  # outside the array is background
    labels, n = ndimage.label(core)
    if n == 0:
        return probs
    core = labels == int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    keep = ndimage.distance_transform_edt(~core) <= r + 1.0
    if np.count_nonzero(keep & m[box]) < LEAK_KEEP_MIN * np.count_nonzero(m):
        return probs  # not a brain with leaks on it (fragments, a thin slab): leave it to the largest component
    out = np.zeros_like(np.asarray(probs))
    out[box] = np.where(keep, np.asarray(probs)[box], 0)
    return out


def _fill_holes(m: np.ndarray) -> np.ndarray:
    """Fill background regions not connected (6-neighbourhood) to the array's border."""
    bg, n = ndimage.label(~m)
    if n == 0:
        return m.astype(np.uint8)
    border = np.zeros(n + 1, dtype=bool)
    for axis in range(m.ndim):
        border[np.take(bg, 0, axis=axis).ravel()] = True
        border[np.take(bg, -1, axis=axis).ravel()] = True
    border[0] = True  # label 0 is the foreground itself
    return (m | ~border[bg]).astype(np.uint8)


_postprocess = postprocess


def brain_mask(probs: np.ndarray, vs: VolumeSlices, threshold: Optional[float] = None, postprocess: bool = True,
               leak_radius_mm: Optional[float] = None) -> sitk.Image:
    """The product's brain mask from working-grid probabilities, on the input's exact grid (uint8 {0, 1}): the
    voxels >= ``threshold`` (default :data:`MASK_THRESHOLD`).

    With ``postprocess``: leaks hanging on a bridge thinner than twice ``leak_radius_mm`` (default
    :data:`LEAK_RADIUS_MM`; 0: no cut) are cut on the working grid (:func:`detach_leaks`), then the native-grid mask
    keeps its largest component with its holes filled (:func:`postprocess`). Without it: the probabilities
    resampled and thresholded, nothing else."""
    if postprocess:
        radius = LEAK_RADIUS_MM if leak_radius_mm is None else leak_radius_mm
        probs = detach_leaks(probs, float(vs.working.GetSpacing()[0]), radius)
    threshold = MASK_THRESHOLD if threshold is None else threshold
    probs = _working_probs(probs, vs)
    if threshold <= 0:
        return to_mask(to_native(probs, vs), threshold, postprocess=postprocess)
    # Only the native voxels near the working voxels >= threshold can reach it (linear interpolation is a convex
    # combination of 8 neighbours): resample, threshold and post-process that box only, zeros elsewhere. The same
    # mask as the whole grid's, in a fraction of the time on a large field of view.
    full = np.zeros(tuple(reversed(vs.native.GetSize())), np.uint8)
    box = _native_box(probs >= threshold, vs)
    if box is not None:
        lo = [b.start for b in reversed(box)]  # (i, j, k)
        sub = _reference([b.stop - b.start for b in reversed(box)], vs.native.GetSpacing(),
                         vs.native.TransformIndexToPhysicalPoint(lo), _direction(vs.native))
        part = to_mask(to_native(probs, vs, sub), threshold, postprocess=postprocess)
        full[box] = sitk.GetArrayViewFromImage(part)  # `part` alive while its view is copied
    out = sitk.GetImageFromArray(full)
    out.CopyInformation(vs.native)
    return out


def _native_box(above: np.ndarray, vs: VolumeSlices) -> Optional[Tuple[slice, slice, slice]]:
    """The native numpy box (k, j, i slices) holding every native voxel whose linear interpolation of the working
    grid can involve a working voxel in ``above``, with one voxel to spare; None when ``above`` is empty."""
    if not above.any():
        return None
    kji = [np.flatnonzero(above.any(axis=tuple(d for d in range(3) if d != ax))) for ax in range(3)]
    # working continuous (i, j, k) bounds: a native point within one working voxel of a voxel above
    lo = [float(kji[ax][0]) - 1.0 for ax in (2, 1, 0)]
    hi = [float(kji[ax][-1]) + 1.0 for ax in (2, 1, 0)]
    corners = [vs.native.TransformPhysicalPointToContinuousIndex(
        vs.working.TransformContinuousIndexToPhysicalPoint((x, y, z)))
        for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    c = np.array(corners)
    size = np.array(vs.native.GetSize())
    first = np.clip(np.floor(c.min(0)).astype(int) - 1, 0, size - 1)
    last = np.clip(np.ceil(c.max(0)).astype(int) + 1, 0, size - 1)
    if np.any(c.max(0) < -1.0) or np.any(c.min(0) > size):
        return None  # the working voxels above lie outside the input's extent
    return tuple(slice(int(first[ax]), int(last[ax]) + 1) for ax in (2, 1, 0))


def to_mask(prob_image: sitk.Image, threshold: float = MASK_THRESHOLD, postprocess: bool = True) -> sitk.Image:
    """Threshold probabilities (>= ``threshold``) into a uint8 {0, 1} image of the same geometry."""
    m = (sitk.GetArrayViewFromImage(prob_image) >= threshold).astype(np.uint8)
    if postprocess:
        m = _postprocess(m)
    out = sitk.GetImageFromArray(m)
    out.CopyInformation(prob_image)
    return out


# ------------------------------------------------------------------------------------------------------ memory

def estimate_memory_bytes(image: Union[PathLike, sitk.Image, ImageInfo], grid: WorkingGrid) -> int:
    """Peak bytes of reading + segmenting one volume: input, float32 copy, smoothing, native probabilities,
    mask and component labels per input voxel, plus a few float32 working-grid arrays."""
    if isinstance(image, sitk.Image):
        n_in = int(np.prod(image.GetSize(), dtype=np.int64))
        stored = image.GetNumberOfComponentsPerPixel() * _bytes_per_component(image.GetPixelID())
    else:
        info = image if isinstance(image, ImageInfo) else image_info(image)
        n_in = info.n_voxels * (info.size[3] if info.dimension == 4 else 1)
        stored = info.n_components * info.bytes_per_component
    # A generous bound on N: the diagonal of the largest plausible extent is not known from a count alone.
    n_work = grid.slice_size ** 2 * max(grid.slice_size, 256)
    per_input_voxel = stored + 4 + 4 + 4 + 1 + 4
    return int(n_in * per_input_voxel + n_work * 4 * 4)


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo, else free physical pages from ``os.sysconf``."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def check_memory(image: Union[PathLike, sitk.Image, ImageInfo], grid: WorkingGrid,
                 limit_bytes: Optional[int] = None) -> int:
    """Refuse (ConvLoRASegError) a volume needing more memory than available; returns the estimate in bytes."""
    need = estimate_memory_bytes(image, grid)
    have = available_memory_bytes() if limit_bytes is None else int(limit_bytes)
    if need > have:
        raise ConvLoRASegError(f"this volume needs about {need / 1e9:.1f} GB, only {have / 1e9:.1f} GB available")
    return need


# --------------------------------------------------------------------------------------- Slicer (pure numpy)

_RAS_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """4x4 matrix taking (i, j, k, 1) voxel indices to RAS millimetres (Slicer's IJKToRAS)."""
    m = np.eye(4)
    m[:3, :3] = _direction(image) * np.array(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return _RAS_LPS @ m


def image_from_array(array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> sitk.Image:
    """An image from a Slicer volume: its array (``slicer.util.arrayFromVolume``, numpy [k, j, i]) and IJKToRAS.

    Raises:
        ConvLoRASegError: the matrix is not a rotation/flip times positive spacings (sheared, singular).
    """
    a = np.asarray(array_kji)
    if a.ndim != 3:
        raise ConvLoRASegError(f"a volume array must be 3D [k, j, i], got shape {a.shape}")
    m = _RAS_LPS @ np.asarray(ijk_to_ras, dtype=float)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise ConvLoRASegError("the volume's IJK-to-RAS matrix is singular")
    direction = m[:3, :3] / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise ConvLoRASegError("the volume's IJK-to-RAS matrix is sheared; resample it first")
    image = sitk.GetImageFromArray(np.ascontiguousarray(a))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in m[:3, 3]])
    image.SetDirection([float(d) for d in direction.ravel()])
    return image


def array_from_image(image: sitk.Image) -> np.ndarray:
    """The image's voxels as a numpy copy in Slicer's [k, j, i] layout (pair with :func:`ijk_to_ras`)."""
    return sitk.GetArrayFromImage(image)


# ------------------------------------------------------------------------------------------------- streaming
