"""Per-case quality without labels: brain volume, the ESH agreement, field-of-view contact, flags,
the cohort manifest (``manifest.csv`` / ``manifest.json``) and the overlay pictures of ``--qc DIR``.

Nothing here needs dask; matplotlib is used for the pictures when it is installed (else they are skipped).

Flags (a case may carry several; ``failed: <reason>`` replaces the others):

* ``low_agreement``: the ESH's mask and the final mask agree less than :data:`LOW_AGREEMENT` (the ESH agreement,
  :func:`ConvLoRASegLib.selection.agreement`: surface Dice at one working voxel; one half of the label-free score
  that ``--adapter auto`` ranks adapters by, the other being the gamma consistency).
* ``implausible_volume``: brain volume outside :data:`BRAIN_ML_RANGE` (ml).
* ``touches_field_of_view``: more than :data:`FOV_CONTACT_MM2` of the mask lies within :data:`FOV_MARGIN_MM`
  of the image's faces, the inferior one excepted (the brain runs out of the scan, or the mask leaks into the
  border).

The three thresholds were chosen from the benchmark cohort of ``bench/qc_thresholds.py`` (demo heads, the real
heads, and their simulated scanner sites); the distributions and the rule behind each number are in
``BENCHMARKS.md`` ("Quality flags") and ``bench/results/qc_thresholds.json``. Rerun that script to re-derive them.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, Path]

#: Below this ESH agreement a case is flagged ``low_agreement``. Re-derived when the agreement moved to a
#: tolerance of one working-grid voxel (BENCHMARKS.md, "Never worse"), from the fixed shift benchmark (``bench/shifts.py``: 83 test
#: volumes of held-out heads, leave-one-head-out models, source/AdaBN/adapted masks): the lowest agreement of a good
#: case (Dice >= 0.93, 49 cases) was 0.324, rounded down to 0.30; it flags 13 of the 18 cases with Dice < 0.9 and
#: none of the good ones.
LOW_AGREEMENT = 0.30
#: Brain volumes (ml) outside this range are flagged ``implausible_volume``. Rule: the reference masks of the
#: uncut benchmark cohort span 1227-1926 ml; the range is 0.75 x the smallest to 1.25 x the largest, rounded to
#: 50 ml (adult brains with atrophy, children and large heads stay inside; a mask on the skull, half a brain or a
#: background blob does not).
BRAIN_ML_RANGE = (900.0, 2400.0)
#: Mask area (mm², projected) within FOV_MARGIN_MM of the image's faces (the inferior face excepted) above which
#: a case is flagged ``touches_field_of_view``. Rule: between the uncut heads whose brain keeps its distance from
#: the border (0 mm²) and the least-touching cut-vertex case (251 mm²), near the low end so that a cut brain fires.
#: Known false positive: the real colin27 (tight MNI field of view; 2117 mm² predicted, 0 in its reference).
FOV_CONTACT_MM2 = 100.0
#: Depth (mm) of the border band :func:`fov_contact_mm2` looks in.
FOV_MARGIN_MM = 10.0

MANIFEST_CSV, MANIFEST_JSON = "manifest.csv", "manifest.json"
#: Columns of manifest.csv, in order (the JSON rows hold the same keys, lists as lists).
CSV_COLUMNS = ("input", "output", "adapter", "status", "seconds", "brain_ml", "agreement", "fov_contact_mm2",
               "warnings", "flags")


# ---------------------------------------------------------------------------------------------------------------
# measures and flags
# ---------------------------------------------------------------------------------------------------------------
def brain_ml(mask_array: np.ndarray, spacing_xyz: Sequence[float]) -> float:
    """Volume (ml) of the non-zero voxels of a mask (numpy z, y, x) with voxel spacing (x, y, z) in mm."""
    return float(np.count_nonzero(mask_array)) * float(np.prod(spacing_xyz)) / 1000.0


def fov_contact_mm2(mask_array: np.ndarray, spacing_xyz: Sequence[float], margin_mm: Optional[float] = None,
                    skip_first_z: bool = False) -> float:
    """Area (mm²) of the mask within ``margin_mm`` (default :data:`FOV_MARGIN_MM`) of the six outer faces of the
    image grid, projected onto each face (numpy z, y, x; spacing x, y, z). The network's mask stops a few mm short
    of an edge that cuts through the brain (measured: 4 voxels of 1.75 mm below a cut vertex), hence the band.
    ``skip_first_z``: leave out the face at z index 0 (the inferior face of a canonical LPS array, where the
    brainstem leaves every head scan: it always touches)."""
    m = np.asarray(mask_array) != 0
    if m.ndim != 3 or not m.any():
        return 0.0
    margin = FOV_MARGIN_MM if margin_mm is None else margin_mm
    sx, sy, sz = (float(s) for s in spacing_xyz)
    step = {0: sz, 1: sy, 2: sx}  # voxel size along numpy axis k
    area = {0: sx * sy, 1: sx * sz, 2: sy * sz}  # a face normal to numpy axis k has pixels of this area
    total = 0.0
    for axis in range(3):
        depth = max(1, min(m.shape[axis], int(math.ceil(margin / step[axis] - 1e-9))))
        bands = [np.take(m, range(m.shape[axis] - depth, m.shape[axis]), axis=axis)]
        if not (skip_first_z and axis == 0):
            bands.append(np.take(m, range(depth), axis=axis))
        for band in bands:
            total += float(np.count_nonzero(band.any(axis=axis))) * area[axis]
    return total


def flags_for(brain: Optional[float], agreement: Optional[float], fov_mm2: Optional[float]) -> List[str]:
    """The quality flags of a segmented case (see the module docstring); None measures raise no flag."""
    flags = []
    if agreement is not None and math.isfinite(agreement) and agreement < LOW_AGREEMENT:
        flags.append("low_agreement")
    if brain is not None and not BRAIN_ML_RANGE[0] <= brain <= BRAIN_ML_RANGE[1]:
        flags.append("implausible_volume")
    if fov_mm2 is not None and fov_mm2 > FOV_CONTACT_MM2:
        flags.append("touches_field_of_view")
    return flags


def measure(mask_image, agreement: Optional[float]) -> Dict[str, Any]:
    """``brain_ml``, ``fov_contact_mm2``, ``agreement`` and ``flags`` of a mask image (SimpleITK, native grid)."""
    import SimpleITK as sitk

    from .volumes import canonical

    c = canonical(mask_image)  # LPS: numpy axis 0 runs inferior -> superior
    a = sitk.GetArrayViewFromImage(c)
    spacing = c.GetSpacing()
    brain = round(brain_ml(a, spacing), 1)
    fov = round(fov_contact_mm2(a, spacing, skip_first_z=True), 1)
    score = None if agreement is None else round(float(agreement), 4)
    return {"brain_ml": brain, "agreement": score, "fov_contact_mm2": fov, "flags": flags_for(brain, score, fov)}


def failed_row(input_path: PathLike, output: Optional[PathLike], adapter: Optional[str], reason: str,
               seconds: float = 0.0) -> Dict[str, Any]:
    """The manifest row of a case that could not be segmented."""
    reason = " ".join(str(reason).split())
    return {"input": str(input_path), "output": None if output is None else str(output), "adapter": adapter,
            "status": "failed", "seconds": round(seconds, 2), "brain_ml": None, "agreement": None,
            "fov_contact_mm2": None, "warnings": [], "flags": [f"failed: {reason}"]}


def severity(row: Dict[str, Any]) -> Tuple:
    """Sort key, worst first: failed, then more flags, then lower agreement (unknown last), then the name."""
    flags = row.get("flags") or []
    failed = any(str(f).startswith("failed") for f in flags)
    agreement = row.get("agreement")
    score = agreement if isinstance(agreement, (int, float)) and math.isfinite(agreement) else 2.0
    return (0 if failed else 1, -len(flags), -len(row.get("warnings") or []), score, str(row.get("input")))


# ---------------------------------------------------------------------------------------------------------------
# the manifest
# ---------------------------------------------------------------------------------------------------------------
def _atomic_text(path: Path, text: str) -> None:
    from .atomic import atomic_output

    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_manifest(outdir: PathLike, rows: Iterable[Dict[str, Any]]) -> Tuple[Path, Path]:
    """Write ``manifest.csv`` and ``manifest.json`` into ``outdir`` (atomically), rows worst first."""
    from .progress import jsonable

    outdir = Path(outdir)
    ordered = sorted(rows, key=severity)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in ordered:
        cells = []
        for key in CSV_COLUMNS:
            v = r.get(key)
            if isinstance(v, (list, tuple)):
                v = " | ".join(str(x) for x in v)
            cells.append("" if v is None else v)
        writer.writerow(cells)
    doc = {"format": "convloraseg-manifest/1",
           "thresholds": {"low_agreement": LOW_AGREEMENT, "brain_ml_range": list(BRAIN_ML_RANGE),
                          "fov_contact_mm2": FOV_CONTACT_MM2},
           "cases": jsonable(ordered)}
    csv_path, json_path = outdir / MANIFEST_CSV, outdir / MANIFEST_JSON
    _atomic_text(json_path, json.dumps(doc, indent=1, allow_nan=False) + "\n")
    _atomic_text(csv_path, buf.getvalue())
    return csv_path, json_path


def load_manifest(outdir: PathLike) -> List[Dict[str, Any]]:
    """The rows of ``outdir/manifest.json``, worst first. Each has at least ``input``, ``output``, ``adapter``,
    ``seconds``, ``brain_ml``, ``agreement`` (float or None) and ``flags`` (list of str); also ``status``
    (``ok``, ``failed`` or ``resumed``), ``warnings``, ``fov_contact_mm2`` and, when written, ``qc_png``.

    Raises:
        ConvLoRASegError: no manifest there, or not one this library wrote.
    """
    from .errors import ConvLoRASegError

    path = Path(outdir) / MANIFEST_JSON
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvLoRASegError(f"no {MANIFEST_JSON} in {outdir} (segment a cohort into that folder first)") from None
    except (OSError, ValueError) as exc:
        raise ConvLoRASegError(f"cannot read {path}: {exc}") from None
    cases = doc.get("cases") if isinstance(doc, dict) else None
    if not isinstance(cases, list):
        raise ConvLoRASegError(f"{path} is not a ConvLoRASeg manifest")
    rows = []
    for c in cases:
        if not isinstance(c, dict):
            continue
        row = {"input": None, "output": None, "adapter": None, "seconds": None, "brain_ml": None,
               "agreement": None, **c}
        row["flags"] = [str(f) for f in (c.get("flags") or [])]
        rows.append(row)
    return sorted(rows, key=severity)


# ---------------------------------------------------------------------------------------------------------------
# pictures and the HTML index
# ---------------------------------------------------------------------------------------------------------------
def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def overlay_png(image, mask, dest: PathLike, title: str = "") -> Optional[Path]:
    """Three orthogonal slices (through the mask's centre) of ``image`` with the outline of ``mask``, as a PNG
    written atomically to ``dest``. Returns None (nothing written) without matplotlib."""
    if not have_matplotlib():
        return None
    import SimpleITK as sitk
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .volumes import canonical

    img = sitk.GetArrayFromImage(canonical(sitk.Cast(image, sitk.sitkFloat32)))  # z, y, x in LPS
    m = sitk.GetArrayFromImage(canonical(mask)) > 0
    sx, sy, sz = canonical(mask).GetSpacing()
    centre = [int(round(c.mean())) for c in np.nonzero(m)] if m.any() else [s // 2 for s in m.shape]
    lo, hi = np.percentile(img, (1, 99.5)) if img.size else (0.0, 1.0)
    views = [("axial", img[centre[0]], m[centre[0]], sy / sx, False),
             ("coronal", img[:, centre[1], :], m[:, centre[1], :], sz / sx, True),
             ("sagittal", img[:, :, centre[2]], m[:, :, centre[2]], sz / sy, True)]
    fig = Figure(figsize=(7.5, 2.8), dpi=72)
    FigureCanvasAgg(fig)
    for k, (name, a, b, aspect, flip) in enumerate(views):
        ax = fig.add_subplot(1, 3, k + 1)
        origin = "lower" if flip else "upper"
        ax.imshow(a, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect, origin=origin,
                  interpolation="nearest")
        if b.any() and not b.all():
            ax.contour(b.astype(np.float32), levels=[0.5], colors="#ff3030", linewidths=0.8, origin=origin)
        ax.set_axis_off()
        ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.85, wspace=0.03)
    from .atomic import atomic_output

    dest = Path(dest)
    with atomic_output(dest, overwrite=True) as tmp:
        fig.savefig(str(tmp), format="png")
    return dest


def write_index(qc_dir: PathLike, rows: Iterable[Dict[str, Any]]) -> Path:
    """``qc_dir/index.html``: the cases worst first, each with its flags, measures and thumbnail."""
    qc_dir = Path(qc_dir)
    ordered = sorted(rows, key=severity)
    n_flagged = sum(1 for r in ordered if r.get("flags"))

    def cell(v: Any, fmt: str = "{}") -> str:
        return "" if v is None else html.escape(fmt.format(v))

    lines = ["<!doctype html>", "<meta charset='utf-8'>", "<title>ConvLoRASeg quality report</title>",
             "<style>body{font-family:sans-serif;font-size:13px} td,th{padding:3px 8px;border-bottom:1px solid #ddd;"
             "vertical-align:top;text-align:left} .flag{color:#b00;font-weight:bold} img{height:150px}</style>",
             f"<h1>ConvLoRASeg quality report</h1><p>{len(ordered)} cases, {n_flagged} flagged; worst first. "
             f"Thresholds: ESH agreement &lt; {LOW_AGREEMENT}, brain volume outside {BRAIN_ML_RANGE[0]:g}-"
             f"{BRAIN_ML_RANGE[1]:g} ml, more than {FOV_CONTACT_MM2:g} mm² of mask on the image border.</p>",
             "<table><tr><th>case</th><th>flags</th><th>ESH agreement</th><th>brain ml</th><th>adapter</th>"
             "<th>seconds</th><th>overlay</th></tr>"]
    for r in ordered:
        name = Path(str(r.get("input"))).name
        flags = "<br>".join(f"<span class='flag'>{html.escape(str(f))}</span>" for f in r.get("flags") or [])
        warnings = "<br>".join(html.escape(str(w)) for w in r.get("warnings") or [])
        png = r.get("qc_png")
        thumb = ""
        if png:
            rel = os.path.relpath(str(png), str(qc_dir))
            thumb = f"<a href='{html.escape(rel)}'><img src='{html.escape(rel)}' alt='{html.escape(name)}'></a>"
        out = r.get("output")
        lines.append(f"<tr><td>{html.escape(name)}<br><small>{cell(out)}</small></td><td>{flags}"
                     f"{'<br>' if flags and warnings else ''}{warnings}</td><td>{cell(r.get('agreement'), '{:.3f}')}"
                     f"</td><td>{cell(r.get('brain_ml'), '{:.0f}')}</td><td>{cell(r.get('adapter'))}</td>"
                     f"<td>{cell(r.get('seconds'), '{:.1f}')}</td><td>{thumb}</td></tr>")
    lines.append("</table>")
    dest = qc_dir / "index.html"
    _atomic_text(dest, "\n".join(lines) + "\n")
    return dest
