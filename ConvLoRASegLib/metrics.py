"""Segmentation metrics: Dice, surface Dice (DeepMind's definition), HD95 and volume difference.

All functions take two masks of the same shape (any bool or integer dtype; a voxel is foreground when its
value is > 0) and, where distances matter, the voxel spacing in millimetres **in the same axis order as the
arrays** (e.g. numpy arrays from SimpleITK are z, y, x, so pass ``image.GetSpacing()[::-1]``).

Surface metrics follow Nikolov et al. (2018), "Deep learning to achieve clinically applicable segmentation of
head and neck anatomy for radiotherapy", as implemented in DeepMind's ``surface-distance`` package:

* The boundary is described on the grid of 2x2x2 cells (2x2 in 2D) between voxel centres. A cell whose 8
  corners are neither all foreground nor all background is a surface element ("surfel"); its area is the area
  of the marching-cubes surface inside the cell, scaled by the spacing.
* Distances between the two surfaces are Euclidean distances, in mm, between surfel cells (DeepMind reads them
  from an anisotropic Euclidean distance transform; a nearest-neighbour query gives the same numbers).
* surface Dice at tolerance t = (area of predicted surfels within t of the true surface + area of true surfels
  within t of the predicted surface) / (total area of both surfaces).
* HD95 = the larger of the two directed, area-weighted 95th percentiles of surfel distances.

This module computes the per-cell areas itself: the surface polygons of each of the 256 cell configurations
are traced from the cell's geometry, an ambiguous face (two diagonal corners in, two out) keeps the minority
corners apart, and each polygon is split into the triangles of largest total area, which is the triangulation
of DeepMind's marching-cubes table (checked against it in ``Testing/test_metrics.py``).

Both masks are cropped to their joint bounding box. Surfels lie on one lattice (cell index x spacing), so the
surfels within a tolerance of the other surface are those where the other surface's surfel mask, shifted by each
lattice offset no longer than the tolerance, has a surfel: surface Dice does that when the offsets are few
(:data:`LATTICE_OFFSETS_MAX`; 7 at a tolerance of one voxel) and otherwise, like HD95, queries a k-d tree between
surface cells only (stopping at the tolerance for surface Dice). Both give the same numbers; the cost follows the
surface area of the objects, not the size of the volume.
"""

from __future__ import annotations

import functools
import itertools
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import ConvLoRASegError

Point = Tuple[float, ...]

__all__ = ["dice", "surface_dice", "hd95", "volume_difference"]


# ----------------------------------------------------------------------------------------------------------
# Cell geometry: neighbourhood code -> surfel area vectors
# ----------------------------------------------------------------------------------------------------------

def _cell_corners(ndim: int) -> List[Tuple[int, ...]]:
    """Corner offsets of a 2^ndim cell, in the order of their bits: corner ``i`` has bit ``2**(2^ndim-1-i)``.

    The first corner (all zeros) is the most significant bit, as in DeepMind's encoding kernel.
    """
    return list(itertools.product((0, 1), repeat=ndim))


def _corner_is_inside(code: int, corner: Tuple[int, ...]) -> bool:
    """Whether ``corner`` (offsets in {0, 1}) is foreground in the cell with neighbourhood ``code``."""
    ndim = len(corner)
    index = int("".join(str(c) for c in corner), 2)
    return bool((code >> ((1 << ndim) - 1 - index)) & 1)


def _midpoint(p: Tuple[int, ...], q: Tuple[int, ...]) -> Point:
    """Midpoint of the cell edge between corners ``p`` and ``q`` (cell units)."""
    return tuple((a + b) / 2.0 for a, b in zip(p, q))


def _square_segments(cycle: Sequence[Tuple[int, ...]], inside: Sequence[bool],
                     separate_inside: bool) -> List[Tuple[Point, Point]]:
    """Boundary segments across one square (a 2D cell, or one face of a 3D cell).

    ``cycle`` lists the 4 corners in cyclic order, ``inside`` their labels. Each segment joins the midpoints of
    two edges whose ends differ. On an ambiguous square (labels alternate) each corner of the label chosen by
    ``separate_inside`` (foreground when True) is cut off on its own.
    """
    edges = [i for i in range(4) if inside[i] != inside[(i + 1) % 4]]
    if len(edges) == 2:
        (i, j) = edges
        return [(_midpoint(cycle[i], cycle[(i + 1) % 4]), _midpoint(cycle[j], cycle[(j + 1) % 4]))]
    segments = []
    if len(edges) == 4:
        for i in range(4):
            if inside[i] == separate_inside:
                segments.append((_midpoint(cycle[i - 1], cycle[i]), _midpoint(cycle[i], cycle[(i + 1) % 4])))
    return segments


def _cube_faces() -> List[List[Tuple[int, int, int]]]:
    """The 6 faces of the unit cube, each as its 4 corners in cyclic order."""
    faces = []
    for axis in range(3):
        others = [a for a in range(3) if a != axis]
        for value in (0, 1):
            cycle = []
            for u, w in ((0, 0), (1, 0), (1, 1), (0, 1)):
                corner = [0, 0, 0]
                corner[axis], corner[others[0]], corner[others[1]] = value, u, w
                cycle.append(tuple(corner))
            faces.append(cycle)
    return faces


def _chain_loops(segments: List[Tuple[Point, Point]]) -> List[List[Point]]:
    """Join segments into closed polygons (every midpoint is shared by exactly two segments)."""
    neighbours: Dict[Point, List[Point]] = {}
    for a, b in segments:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    loops, seen = [], set()
    for start in sorted(neighbours):
        if start in seen:
            continue
        loop, previous, current = [start], None, start
        seen.add(start)
        while True:
            following = [n for n in sorted(neighbours[current]) if n != previous and n not in seen]
            if not following:
                break
            previous, current = current, following[0]
            loop.append(current)
            seen.add(current)
        loops.append(loop)
    return loops


@functools.lru_cache(maxsize=None)
def _triangulations(n: int) -> Tuple[Tuple[Tuple[int, int, int], ...], ...]:
    """All triangulations of a convex n-gon with vertices 0..n-1 (n <= 7 here, at most 42 of them)."""
    @functools.lru_cache(maxsize=None)
    def between(i: int, j: int) -> Tuple[Tuple[Tuple[int, int, int], ...], ...]:
        if j - i < 2:
            return ((),)
        result = []
        for k in range(i + 1, j):
            for left in between(i, k):
                for right in between(k, j):
                    result.append(left + ((i, k, j),) + right)
        return tuple(result)
    return between(0, n - 1)


def _largest_triangulation(loop: List[Point]) -> np.ndarray:
    """Area vectors (normal * area, cell units) of the triangulation of ``loop`` with the largest area."""
    points = np.asarray(loop, dtype=float)
    best, best_area = None, -1.0
    for triangles in _triangulations(len(loop)):
        vectors = np.array([np.cross(points[b] - points[a], points[c] - points[a]) / 2.0
                            for a, b, c in triangles])
        area = float(np.linalg.norm(vectors, axis=1).sum())
        if area > best_area + 1e-12:
            best, best_area = vectors, area
    return best


@functools.lru_cache(maxsize=None)
def _unit_area_vectors_3d() -> Tuple[np.ndarray, ...]:
    """For each of the 256 neighbourhood codes, the area vectors (k, 3) of its surfel triangles (unit cell)."""
    faces = _cube_faces()
    table = []
    for code in range(256):
        separate_inside = bin(code).count("1") <= 4
        segments = []
        for cycle in faces:
            labels = [_corner_is_inside(code, c) for c in cycle]
            segments += _square_segments(cycle, labels, separate_inside)
        vectors = [_largest_triangulation(loop) for loop in _chain_loops(segments)]
        table.append(np.concatenate(vectors) if vectors else np.zeros((0, 3)))
    return tuple(table)


@functools.lru_cache(maxsize=None)
def _unit_segments_2d() -> Tuple[np.ndarray, ...]:
    """For each of the 16 2x2 neighbourhood codes, the contour segment vectors (k, 2) in a unit cell."""
    cycle = [(0, 0), (0, 1), (1, 1), (1, 0)]
    table = []
    for code in range(16):
        labels = [_corner_is_inside(code, c) for c in cycle]
        segments = _square_segments(cycle, labels, separate_inside=True)
        table.append(np.array([np.subtract(b, a) for a, b in segments], dtype=float).reshape(-1, 2))
    return tuple(table)


@functools.lru_cache(maxsize=64)
def _surfel_area_table(spacing_mm: Tuple[float, ...]) -> np.ndarray:
    """Surfel area (mm^2 in 3D, contour length mm in 2D) for every neighbourhood code at this spacing."""
    spacing = np.asarray(spacing_mm, dtype=float)
    if spacing.size == 3:
        # An area vector (nx, ny, nz) in cell units scales by the areas of the faces perpendicular to each axis.
        scale = np.array([spacing[1] * spacing[2], spacing[0] * spacing[2], spacing[0] * spacing[1]])
        vectors = _unit_area_vectors_3d()
    else:
        scale = spacing
        vectors = _unit_segments_2d()
    return np.array([np.linalg.norm(v * scale, axis=1).sum() for v in vectors])


# ----------------------------------------------------------------------------------------------------------
# Surfaces and distances
# ----------------------------------------------------------------------------------------------------------

def _as_mask(array: np.ndarray) -> np.ndarray:
    """``array > 0`` as a bool array."""
    array = np.asarray(array)
    if array.dtype == bool:
        return array
    return array > 0


def _check_pair(pred: np.ndarray, truth: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Both masks as bool arrays of one shape, or a ConvLoRASegError."""
    pred, truth = _as_mask(pred), _as_mask(truth)
    if pred.shape != truth.shape:
        raise ConvLoRASegError(f"The two masks differ in shape: {pred.shape} vs {truth.shape}.")
    return pred, truth


def _check_spacing(spacing_mm: Sequence[float], ndim: int) -> Tuple[float, ...]:
    """The spacing as a tuple of ``ndim`` positive floats, or a ConvLoRASegError."""
    spacing = tuple(float(s) for s in np.ravel(spacing_mm))
    if ndim not in (2, 3):
        raise ConvLoRASegError(f"Surface metrics need 2D or 3D masks, got {ndim}D.")
    if len(spacing) != ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ConvLoRASegError(f"Spacing {spacing_mm} does not give {ndim} positive sizes in mm.")
    return spacing


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """Neighbourhood code of every cell of a mask padded with one background voxel on each side.

    Cell ``i`` spans padded voxels ``i..i+1`` on each axis, so the result has ``mask.shape + 1`` cells.
    """
    padded = np.pad(mask, 1).astype(np.uint8)
    ndim = mask.ndim
    codes = np.zeros(tuple(s + 1 for s in mask.shape), dtype=np.uint8)
    for index, corner in enumerate(_cell_corners(ndim)):
        window = tuple(slice(c, c + s + 1) for c, s in zip(corner, mask.shape))
        codes |= padded[window] << np.uint8((1 << ndim) - 1 - index)
    return codes


def _joint_crop(pred: np.ndarray, truth: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Both masks cropped to the bounding box of their union (the caller ensures it is not empty)."""
    union = pred | truth
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        box.append(slice(hits[0], hits[-1] + 1))
    box = tuple(box)
    return pred[box], truth[box]


#: Surface Dice marks the surfels near the other surface with shifted surfel masks when the tolerance holds at most
#: this many lattice offsets (a ball of radius tolerance / spacing), else with k-d tree queries (same numbers).
#: Shifts cost a pass over the joint box per offset: at one voxel (7 offsets) several times faster than the tree.
LATTICE_OFFSETS_MAX = 64
#: Relative slack for "a distance equal to the tolerance": coordinates are index x spacing, whose rounding can make
#: a lattice distance a few ulps longer than the same offset's length.
_ROUNDING = 1e-9


@functools.lru_cache(maxsize=256)
def _lattice_offsets(spacing_mm: Tuple[float, ...], tolerance_mm: float) -> Optional[Tuple[Tuple[int, ...], ...]]:
    """The integer offsets ``d`` with ``|d * spacing| <= tolerance_mm`` (mm), or None if there are more than
    :data:`LATTICE_OFFSETS_MAX`."""
    reach = [int(np.floor(tolerance_mm / s)) for s in spacing_mm]
    if int(np.prod([2 * r + 1 for r in reach])) > 8 * LATTICE_OFFSETS_MAX:
        return None
    spacing = np.asarray(spacing_mm, dtype=float)
    near = tuple(d for d in itertools.product(*(range(-r, r + 1) for r in reach))
                 if float(np.sqrt(np.sum((np.asarray(d) * spacing) ** 2))) <= tolerance_mm * (1 + _ROUNDING))
    return near if len(near) <= LATTICE_OFFSETS_MAX else None


def _near(surfels: np.ndarray, offsets: Sequence[Tuple[int, ...]]) -> np.ndarray:
    """Cells that have a cell of ``surfels`` (bool) at one of ``offsets``: the surfel mask dilated by them."""
    out = np.zeros_like(surfels)
    n = surfels.shape
    for d in offsets:
        dst = tuple(slice(max(0, -k), m - max(0, k)) for k, m in zip(d, n))
        src = tuple(slice(max(0, k), m - max(0, -k)) for k, m in zip(d, n))
        out[dst] |= surfels[src]
    return out


class _SurfaceDistances:
    """Surfels of two masks (where they are, their areas) and the distances between the two surfaces.

    Distances are nearest-neighbour distances between surfel cell positions (cell index * spacing), found with
    a k-d tree; they equal those of a Euclidean distance transform with the same sampling. A k-d tree touches
    only surface cells and can stop early at a distance bound, which makes it several times faster than two full
    distance transforms of the joint bounding box. Surface Dice at a tolerance that holds few lattice offsets
    needs no distances: the shifted surfel masks (:func:`_near`) say which surfels are close, exactly.
    """

    def __init__(self, pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]):
        pred, truth = _check_pair(pred, truth)
        self.spacing = _check_spacing(spacing_mm, pred.ndim)
        self.pred_surfels = self.truth_surfels = np.zeros((0,) * pred.ndim, dtype=bool)
        self.pred_areas = self.truth_areas = np.zeros(0)
        if not (pred.any() or truth.any()):
            return
        pred, truth = _joint_crop(pred, truth)
        table = _surfel_area_table(self.spacing)
        self.pred_surfels, self.pred_areas = self._surfels(pred, table)
        self.truth_surfels, self.truth_areas = self._surfels(truth, table)

    @staticmethod
    def _surfels(mask: np.ndarray, table: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """The surface cells of ``mask`` (bool, ``mask.shape + 1``) and their areas (in C order of the cells)."""
        codes = _neighbour_codes(mask)
        full = np.uint8((1 << (1 << mask.ndim)) - 1)
        border = (codes != 0) & (codes != full)
        return border, table[codes[border]]

    def _points(self, surfels: np.ndarray) -> np.ndarray:
        """Positions (mm, cell grid) of the surface cells, in the order of their areas."""
        return np.argwhere(surfels) * np.asarray(self.spacing)

    @staticmethod
    def _distances(points: np.ndarray, to: np.ndarray, bound_mm: float) -> np.ndarray:
        """Distance (mm) from each of ``points`` to the nearest of ``to``; inf where none lies within ``bound_mm``."""
        if len(points) == 0:
            return np.zeros(0)
        if len(to) == 0:
            return np.full(len(points), np.inf)
        from scipy.spatial import cKDTree  # imported here: `segment` loads this module, rarely calls this

        distances, _ = cKDTree(to).query(points, k=1, distance_upper_bound=bound_mm)
        return distances

    def directed(self, bound_mm: float = np.inf) -> Tuple[np.ndarray, np.ndarray]:
        """Distances pred surfels -> truth surface and truth surfels -> pred surface (inf beyond ``bound_mm``)."""
        pred, truth = self._points(self.pred_surfels), self._points(self.truth_surfels)
        return self._distances(pred, truth, bound_mm), self._distances(truth, pred, bound_mm)

    @staticmethod
    def _percentile(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
        """Area-weighted percentile: the smallest distance whose cumulative area share reaches ``percent``."""
        order = np.argsort(distances, kind="stable")
        cumulative = np.cumsum(areas[order]) / np.sum(areas)
        index = min(int(np.searchsorted(cumulative, percent / 100.0)), len(distances) - 1)
        return float(distances[order][index])

    def robust_hausdorff(self, percent: float) -> float:
        """Larger of the two directed area-weighted ``percent`` percentiles of surfel distances (mm)."""
        if self.pred_areas.size == 0 and self.truth_areas.size == 0:
            return 0.0
        if self.pred_areas.size == 0 or self.truth_areas.size == 0:
            return float("inf")
        pred_to_truth, truth_to_pred = self.directed()
        return max(self._percentile(pred_to_truth, self.pred_areas, percent),
                   self._percentile(truth_to_pred, self.truth_areas, percent))

    def surface_dice(self, tolerance_mm: float) -> float:
        """Share of the total surfel area lying within ``tolerance_mm`` of the other surface."""
        total = self.pred_areas.sum() + self.truth_areas.sum()
        if total == 0:
            return 1.0
        offsets = _lattice_offsets(self.spacing, tolerance_mm)
        if offsets is not None and self.pred_areas.size and self.truth_areas.size:
            close = (self.pred_areas[_near(self.truth_surfels, offsets)[self.pred_surfels]].sum()
                     + self.truth_areas[_near(self.pred_surfels, offsets)[self.truth_surfels]].sum())
            return float(close / total)
        # The bound only lets the k-d tree stop early; it must not cut off a distance equal to the tolerance. A
        # distance equal to the tolerance counts as within it, also where the coordinates' rounding (index x
        # spacing) makes it a few ulps longer: as the lattice offsets do, the same wherever the surfels are.
        pred_to_truth, truth_to_pred = self.directed(bound_mm=tolerance_mm * (1 + 1e-6) + 1e-9)
        within = tolerance_mm * (1 + _ROUNDING)
        close = (self.pred_areas[pred_to_truth <= within].sum() + self.truth_areas[truth_to_pred <= within].sum())
        return float(close / total)


# ----------------------------------------------------------------------------------------------------------
# Public metrics
# ----------------------------------------------------------------------------------------------------------

def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Volumetric Dice coefficient 2|P∩T| / (|P|+|T|) in [0, 1]; 1.0 when both masks are empty."""
    pred, truth = _check_pair(pred, truth)
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(truth))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & truth)) / total


def surface_dice(pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float],
                 tolerance_mm: float = 1.0) -> float:
    """Surface Dice at ``tolerance_mm`` (DeepMind's definition), in [0, 1].

    Args:
        pred, truth: 2D or 3D masks of one shape (> 0 is foreground).
        spacing_mm: voxel size in mm per array axis, in the arrays' axis order.
        tolerance_mm: largest surface distance (mm) that still counts as agreement.

    Returns:
        The share of both surfaces' area lying within the tolerance of the other surface. 1.0 when both masks
        are empty (nothing to disagree on; DeepMind's code gives NaN there); 0.0 when exactly one is empty.
    """
    if tolerance_mm < 0:
        raise ConvLoRASegError(f"The surface Dice tolerance must be >= 0 mm, got {tolerance_mm}.")
    return _SurfaceDistances(pred, truth, spacing_mm).surface_dice(float(tolerance_mm))


def hd95(pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (surfel-area weighted, as DeepMind's
    ``compute_robust_hausdorff(..., 95)``).

    Returns inf when exactly one mask is empty and 0.0 when both are (DeepMind's code gives inf there too).
    """
    return _SurfaceDistances(pred, truth, spacing_mm).robust_hausdorff(95.0)


def volume_difference(pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]) -> Dict[str, float]:
    """Foreground volumes and their difference.

    Returns:
        ``pred_ml`` and ``truth_ml`` (millilitres), ``diff_ml`` = pred_ml - truth_ml and ``relative`` =
        diff_ml / truth_ml (0.0 when both are empty, inf when only the truth is empty).
    """
    pred, truth = _check_pair(pred, truth)
    spacing = tuple(float(s) for s in np.ravel(spacing_mm))
    if len(spacing) != pred.ndim or not all(s > 0 for s in spacing):
        raise ConvLoRASegError(f"Spacing {spacing_mm} does not give {pred.ndim} positive sizes in mm.")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    pred_ml = int(np.count_nonzero(pred)) * voxel_ml
    truth_ml = int(np.count_nonzero(truth)) * voxel_ml
    diff_ml = pred_ml - truth_ml
    if truth_ml > 0:
        relative = diff_ml / truth_ml
    else:
        relative = 0.0 if pred_ml == 0 else float("inf")
    return {"pred_ml": pred_ml, "truth_ml": truth_ml, "diff_ml": diff_ml, "relative": relative}
