"""``convlora-seg demo``: the whole product in a few minutes, offline, on the shipped demo heads.

1. A target-site cohort: new "subjects" (:func:`~ConvLoRASegLib.sites.random_subject`) of all demo heads but one,
   as a non-source scanner stores them (:func:`~ConvLoRASegLib.sites.simulate_site`, default ``philips3``).
   The remaining head, simulated at the same site, is held out as the test scan (its brain mask is the truth).
2. The test scan is segmented with the source model, an adapter is learnt from the unlabelled cohort
   (``convlora-adabn``, fast mode), and the test scan is segmented again with it.
3. A table (Dice and surface Dice at 1 mm before/after, adapter vs model size, times) is printed, and the masks,
   the adapter, the test scan and a PNG with the overlays before/after are written into the output folder.

The PNG is drawn with matplotlib when it is installed, otherwise by :func:`write_png` (numpy + zlib) with the
titles, scores and colour legend in a small built-in bitmap font (:func:`draw_text`), so that it reads the same.
"""

from __future__ import annotations

import struct
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_output
from .errors import ConvLoRASegError

Progress = Optional[Callable[[dict], None]]
#: Subjects per training head and adaptation epochs: (normal, quick). Adaptation time grows with their product;
#: measured for (1, 2) with a 16-filter 128 x 128 model: about 2.6 CPU-minutes in all, single-threaded.
SUBJECTS_PER_HEAD = (1, 1)
EPOCHS = (2, 1)


@dataclass
class DemoResult:
    """What the demo measured (Dice and surface Dice on the held-out head) and where it wrote its files."""

    site: str
    test_head: str
    n_target_volumes: int
    epochs: int
    #: candidates the adaptation scored (the unadapted model, AdaBN alone and the trained ones)
    n_candidates: int
    dice_before: float
    dice_after: float
    surface_dice_before: float
    surface_dice_after: float
    score_source: float  #: label-free score of the unadapted model on the cohort
    score_selected: float  #: the same for the selected candidate
    selected: str  #: which candidate the label-free selection kept ("source" = no adaptation)
    #: which candidate was kept and why, in words (:meth:`~ConvLoRASegLib.selftrain.AdaptResult.verdict`)
    verdict: str
    adapter_bytes: int
    model_bytes: int
    seconds: Dict[str, float]
    files: Dict[str, str] = field(default_factory=dict)
    #: the per-scan check of ``segment --adapter`` on the test scan: True if the adapter beat the unadapted model
    #: there and was used (else "adapted" is the unadapted model's mask)
    adapter_used: bool = True

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """The before/after table the demo prints."""
        from .selection import SCAN_CHECK_MARGIN

        s = self.seconds
        rows = [
            f"ConvLoRASeg demo: {self.n_target_volumes} unlabelled volumes from site {self.site}, held-out head "
            f"{self.test_head}",
            f"{'':30} {'source model':>13} {'adapted':>9}",
            f"{'Dice':30} {self.dice_before:>13.4f} {self.dice_after:>9.4f}",
            f"{'surface Dice (1 mm)':30} {self.surface_dice_before:>13.4f} {self.surface_dice_after:>9.4f}",
            f"{'segmentation time (s)':30} {s['segment_before']:>13.1f} {s['segment_after']:>9.1f}",
            "  (with the adapter a scan takes longer: the per-scan check segments it with and without the adapter "
            "and scores both, label-free, as segment --adapter does)",
            f"adapter {self.adapter_bytes / 1e3:.1f} kB vs model {self.model_bytes / 1e6:.2f} MB "
            f"({100.0 * self.adapter_bytes / max(self.model_bytes, 1):.1f} %); adaptation {s['adapt']:.1f} s "
            f"({self.epochs} epochs); simulation {s['simulate']:.1f} s; total {s['total']:.1f} s",
            f"the adaptation (convlora-adabn) made {self.n_candidates} candidates, the unadapted model included, and "
            f"{self.verdict} (label-free score: ESH agreement + gamma consistency, on the cohort)",
            "per-scan check on the test scan (as segment --adapter): " + (
                f"the adapter beats no adapter's label-free score by more than {SCAN_CHECK_MARGIN:g}: used"
                if self.adapter_used else
                f"the adapter does not beat no adapter's label-free score by more than {SCAN_CHECK_MARGIN:g}: "
                "not used"),
        ]
        return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------------
# PNG without matplotlib
# ---------------------------------------------------------------------------------------------------------------
def png_bytes(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG (H x W x 3 uint8) encoded with zlib: signature, IHDR, one IDAT, IEND."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 array, got {rgb.shape}")
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()  # filter 0

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def write_png(rgb: np.ndarray, path: Path) -> Path:
    """Write an RGB array as PNG atomically (replacing an existing file)."""
    with atomic_output(path, overwrite=True) as tmp:
        Path(tmp).write_bytes(png_bytes(rgb))
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# text without matplotlib: a 5 x 7 bitmap font (upper case, digits, punctuation)
# ---------------------------------------------------------------------------------------------------------------
_GLYPHS = """
A .###.|#...#|#...#|#####|#...#|#...#|#...#  B ####.|#...#|#...#|####.|#...#|#...#|####.
C .###.|#...#|#....|#....|#....|#...#|.###.  D ####.|#...#|#...#|#...#|#...#|#...#|####.
E #####|#....|#....|####.|#....|#....|#####  F #####|#....|#....|####.|#....|#....|#....
G .###.|#...#|#....|#.###|#...#|#...#|.####  H #...#|#...#|#...#|#####|#...#|#...#|#...#
I .###.|..#..|..#..|..#..|..#..|..#..|.###.  J ..###|...#.|...#.|...#.|...#.|#..#.|.##..
K #...#|#..#.|#.#..|##...|#.#..|#..#.|#...#  L #....|#....|#....|#....|#....|#....|#####
M #...#|##.##|#.#.#|#.#.#|#...#|#...#|#...#  N #...#|#...#|##..#|#.#.#|#..##|#...#|#...#
O .###.|#...#|#...#|#...#|#...#|#...#|.###.  P ####.|#...#|#...#|####.|#....|#....|#....
Q .###.|#...#|#...#|#...#|#.#.#|#..#.|.##.#  R ####.|#...#|#...#|####.|#.#..|#..#.|#...#
S .####|#....|#....|.###.|....#|....#|####.  T #####|..#..|..#..|..#..|..#..|..#..|..#..
U #...#|#...#|#...#|#...#|#...#|#...#|.###.  V #...#|#...#|#...#|#...#|#...#|.#.#.|..#..
W #...#|#...#|#...#|#.#.#|#.#.#|#.#.#|.#.#.  X #...#|#...#|.#.#.|..#..|.#.#.|#...#|#...#
Y #...#|#...#|.#.#.|..#..|..#..|..#..|..#..  Z #####|....#|...#.|..#..|.#...|#....|#####
0 .###.|#...#|#..##|#.#.#|##..#|#...#|.###.  1 ..#..|.##..|..#..|..#..|..#..|..#..|.###.
2 .###.|#...#|....#|...#.|..#..|.#...|#####  3 #####|...#.|..#..|...#.|....#|#...#|.###.
4 ...#.|..##.|.#.#.|#..#.|#####|...#.|...#.  5 #####|#....|####.|....#|....#|#...#|.###.
6 ..##.|.#...|#....|####.|#...#|#...#|.###.  7 #####|....#|...#.|..#..|.#...|.#...|.#...
8 .###.|#...#|#...#|.###.|#...#|#...#|.###.  9 .###.|#...#|#...#|.####|....#|...#.|.##..
. .....|.....|.....|.....|.....|.##..|.##..  , .....|.....|.....|.....|.##..|..#..|.#...
: .....|.##..|.##..|.....|.##..|.##..|.....  % ##...|##..#|...#.|..#..|.#...|#..##|...##
( ...#.|..#..|.#...|.#...|.#...|..#..|...#.  ) .#...|..#..|...#.|...#.|...#.|..#..|.#...
- .....|.....|.....|#####|.....|.....|.....  + .....|..#..|..#..|#####|..#..|..#..|.....
/ .....|....#|...#.|..#..|.#...|#....|.....  = .....|.....|#####|.....|#####|.....|.....
? .###.|#...#|....#|...#.|..#..|.....|..#..  ' ..#..|..#..|.#...|.....|.....|.....|.....
"""
#: character -> 7 x 5 bool array
FONT: Dict[str, np.ndarray] = {
    entry[0]: np.array([[c == "#" for c in row] for row in entry[2:].split("|")], bool)
    for entry in (e.strip() for e in _GLYPHS.replace("  ", "\n").splitlines()) if len(entry) > 2}
FONT[" "] = np.zeros((7, 5), bool)


def text_width(text: str, scale: int = 1) -> int:
    """Pixels the text takes (6 font pixels per character: 5 and a gap)."""
    return 6 * scale * len(text)


def draw_text(rgb: np.ndarray, text: str, x: int, y: int, colour=(0, 0, 0), scale: int = 1) -> None:
    """Draw ``text`` (upper-cased; unknown characters as '?') into an RGB uint8 array in place, its top left corner
    at (``x``, ``y``), each font pixel ``scale`` x ``scale``; clipped at the array's edges."""
    for i, ch in enumerate(text.upper()):
        glyph = np.kron(FONT.get(ch, FONT["?"]), np.ones((scale, scale), bool))
        x0 = x + i * 6 * scale
        h, w = glyph.shape
        sub = rgb[max(y, 0):y + h, max(x0, 0):x0 + w]
        g = glyph[max(-y, 0):max(-y, 0) + sub.shape[0], max(-x0, 0):max(-x0, 0) + sub.shape[1]]
        sub[g] = colour


def _wrap(lines: Sequence[str], chars: int) -> List[str]:
    """``lines`` broken at spaces into lines of at most ``chars`` characters (a longer word is cut)."""
    out: List[str] = []
    for line in lines:
        cur = ""
        for word in line.split(" "):
            if cur and len(cur) + 1 + len(word) > chars:
                out.append(cur)
                cur = ""
            cur = f"{cur} {word}" if cur else word
            while len(cur) > chars:
                out.append(cur[:chars])
                cur = cur[chars:]
        out.append(cur)
    return out


def _band(width: int, lines: Sequence[str], scale: int, n_lines: Optional[int] = None) -> np.ndarray:
    """A white band of ``width`` pixels holding ``lines`` of text (black), one below the other (room for
    ``n_lines``)."""
    line_h = 9 * scale
    band = np.full((line_h * max(len(lines), n_lines or 0) + 2 * scale, width, 3), 255, np.uint8)
    for k, line in enumerate(lines):
        draw_text(band, line, 2 * scale, scale + k * line_h, scale=scale)
    return band


# ---------------------------------------------------------------------------------------------------------------
# overlays
# ---------------------------------------------------------------------------------------------------------------
def sagittal_view(image: sitk.Image, *masks: sitk.Image) -> Tuple[np.ndarray, List[np.ndarray]]:
    """The sagittal slice through the centre of the first mask, superior up, anterior left, square pixels:
    (grey image in [0, 1], [mask slices as bool])."""
    from .volumes import canonical

    arrays = [sitk.GetArrayFromImage(canonical(im)) for im in (image, *masks)]  # [S, P, L] = numpy (z, y, x)
    spacing = canonical(image).GetSpacing()
    ref = arrays[1] if len(arrays) > 1 and arrays[1].any() else arrays[0] > 0
    x = int(round(np.argwhere(ref)[:, 2].mean())) if np.any(ref) else arrays[0].shape[2] // 2
    rows = np.round(np.arange(0, arrays[0].shape[0] * spacing[2] / spacing[1]) * spacing[1] / spacing[2])
    rows = np.clip(rows.astype(int), 0, arrays[0].shape[0] - 1)[::-1]
    views = [a[rows, :, x] for a in arrays]
    grey = views[0].astype(np.float32)
    lo, hi = np.percentile(grey, [1, 99.5])
    grey = np.clip((grey - lo) / max(hi - lo, 1e-6), 0, 1)
    return grey, [v > 0 for v in views[1:]]


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


#: The overlay's colours (RGB in [0, 1]): the predicted brain (filled, 35 %) and the true outline.
PREDICTED_RGB, TRUTH_RGB = (1.0, 0.1, 0.1), (0.1, 1.0, 0.2)


def overlay(grey: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """RGB uint8: the prediction filled in red (35 %), the truth's outline in green."""
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rgb[pred] = 0.65 * rgb[pred] + 0.35 * np.array(PREDICTED_RGB)
    rgb[_outline(truth)] = TRUTH_RGB
    return (rgb * 255).round().astype(np.uint8)


def _without_matplotlib(panels: Sequence[np.ndarray], texts: Sequence[Sequence[str]]) -> np.ndarray:
    """The two panels side by side, each under its title and scores, above a colour legend (small panels are
    doubled so that the text can be two font pixels per pixel)."""
    if panels[0].shape[1] < 320:
        panels = [p.repeat(2, axis=0).repeat(2, axis=1) for p in panels]
    width = panels[0].shape[1]
    scale = 2 if width >= text_width("surface Dice 0.000", 2) + 8 else 1
    wrapped = [_wrap(lines, (width - 4 * scale) // (6 * scale)) for lines in texts]
    heads = [_band(width, lines, scale, max(map(len, wrapped))) for lines in wrapped]
    gap = np.full((heads[0].shape[0] + panels[0].shape[0], 8, 3), 255, np.uint8)
    top = np.concatenate([np.concatenate([heads[0], panels[0]]), gap, np.concatenate([heads[1], panels[1]])], axis=1)
    legend = _band(top.shape[1], [""], scale)
    x, box = 2 * scale, 7 * scale
    for rgb, label in ((PREDICTED_RGB, "predicted brain"), (TRUTH_RGB, "true outline")):
        legend[scale:scale + box, x:x + box] = (np.array(rgb) * 255).round().astype(np.uint8)
        draw_text(legend, label, x + box + 3 * scale, scale, scale=scale)
        x += box + 3 * scale + text_width(label, scale) + 12 * scale
    return np.concatenate([top, legend])


def write_overlay_png(path: Path, image: sitk.Image, truth: sitk.Image, before: sitk.Image, after: sitk.Image,
                      titles: Tuple[str, str], scores: Sequence[Tuple[float, float]] = ()) -> Path:
    """Two panels (before | after) of the central sagittal slice, each with its title and (Dice, surface Dice)
    from ``scores``, and the colours' legend; matplotlib if installed, else the built-in font."""
    grey, (t, b, a) = sagittal_view(image, truth, before, after)
    panels = [overlay(grey, b, t), overlay(grey, a, t)]
    texts = ([[title, f"Dice {d:.3f}", f"surface Dice {sd:.3f}"] for title, (d, sd) in zip(titles, scores)]
             if scores else [[title] for title in titles])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return write_png(_without_matplotlib(panels, texts), path)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.9), dpi=110)
    for ax, panel, lines in zip(axes, panels, texts):
        ax.imshow(panel)
        ax.set_title("\n".join([lines[0], ", ".join(lines[1:])] if len(lines) > 1 else lines), fontsize=9)
        ax.axis("off")
    fig.legend(handles=[Patch(color=PREDICTED_RGB, alpha=0.6, label="predicted brain"),
                        Patch(color=TRUTH_RGB, label="true outline")], loc="lower center", ncol=2, fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    with atomic_output(path, overwrite=True) as tmp:
        fig.savefig(str(tmp), format="png")
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# the demo
# ---------------------------------------------------------------------------------------------------------------
def _scores(mask: sitk.Image, truth: sitk.Image) -> Tuple[float, float]:
    from .metrics import dice, surface_dice

    p = sitk.GetArrayViewFromImage(mask) > 0
    t = sitk.GetArrayViewFromImage(truth) > 0
    spacing = tuple(reversed(truth.GetSpacing()))
    return dice(p, t), surface_dice(p, t, spacing, 1.0)


def _compact(scan: sitk.Image) -> sitk.Image:
    """A float scan rounded to uint16 for the demo folder (a float32 noisy head compresses to ~37 MB)."""
    if scan.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return scan
    return sitk.Cast(sitk.Round(sitk.Clamp(scan, lowerBound=0.0, upperBound=65535.0)), sitk.sitkUInt16)


def _prepare_output(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConvLoRASegError(f"demo output {out_dir} exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConvLoRASegError(f"cannot create the demo folder {out_dir}: {exc.strerror}") from None
    import os

    if not os.access(out_dir, os.W_OK):
        raise ConvLoRASegError(f"demo folder is not writable: {out_dir}")


def run_demo(out_dir: Path = Path("convlora-demo"), quick: bool = False, model: Optional[Path] = None,
             site: str = "philips3", subjects_per_head: Optional[int] = None, epochs: Optional[int] = None,
             seed: int = 0, device: str = "auto", progress: Progress = None,
             log: Callable[[str], None] = print) -> DemoResult:
    """Run the demo (see the module docstring) and return its numbers; files go into ``out_dir`` (created;
    the demo's own files in it are replaced on a rerun).

    Args:
        quick: one adaptation epoch instead of two (one subject per training head either way).
        model: source model file (default: the bundled model).
        site: simulated target site, a name in :data:`~ConvLoRASegLib.sites.SITES` (not the source ``ge3``).
        subjects_per_head, epochs: override the quick/normal choice.
    """
    from .segment import resolve_device, segment_image
    from .selection import segment_checked
    from .selftrain import adapt
    from .sites import SITES, demo_heads, random_subject, simulate_site
    from .store import default_model_path, load_model, save_adapter
    from .volumes import read_image, to_slices, write_image

    t_total = time.perf_counter()
    emit = progress or (lambda e: None)
    if site not in SITES:
        raise ConvLoRASegError(f"unknown site {site!r}; choose one of {', '.join(SITES)}")
    model_path = Path(model) if model is not None else default_model_path()
    if model is None and not model_path.is_file():
        raise ConvLoRASegError(f"the bundled default model is not installed ({model_path}); pass --model")
    base = load_model(model_path)
    dev = resolve_device(device)
    heads = demo_heads()
    if len(heads) < 2:
        raise ConvLoRASegError("the demo needs at least two demo heads in ConvLoRASegLib/data/demo")
    _prepare_output(out_dir)
    n_sub = subjects_per_head if subjects_per_head is not None else SUBJECTS_PER_HEAD[int(quick)]
    n_epochs = epochs if epochs is not None else EPOCHS[int(quick)]
    names = sorted(heads)
    test_name, train_names = names[0], names[1:]

    # 1. the target-site cohort (unlabelled) and the held-out test scan -----------------------------------------
    t0 = time.perf_counter()
    log(f"simulating site {site}: {n_sub * len(train_names)} subjects from {', '.join(train_names)}; "
        f"held-out head {test_name}")
    stacks = []
    total = n_sub * len(train_names) + 1
    for h, name in enumerate(train_names):
        image, truth = read_image(heads[name][0]), sitk.ReadImage(str(heads[name][1]))
        for k in range(n_sub):
            emit({"event": "progress", "stage": "simulate", "step": len(stacks), "total": total})
            subject, subject_mask = random_subject(image, truth, seed=seed + 100 * h + k)
            scan, _ = simulate_site(subject, subject_mask, site, seed=seed + 1000 + 100 * h + k)
            stacks.append(to_slices(sitk.Cast(scan, sitk.sitkFloat32), base.grid).slices)
    test_scan, test_truth = simulate_site(read_image(heads[test_name][0]), sitk.ReadImage(str(heads[test_name][1])),
                                          site, seed=seed + 999)
    emit({"event": "progress", "stage": "simulate", "step": total, "total": total})
    t_sim = time.perf_counter() - t0

    # 2. before, adapt, after -----------------------------------------------------------------------------------
    test_float = sitk.Cast(test_scan, sitk.sitkFloat32)
    t0 = time.perf_counter()
    before = segment_image(base, test_float, device=dev, progress=progress)
    t_before = time.perf_counter() - t0
    log("adapting (convlora-adabn, fast mode) ...")
    result = adapt(base, stacks, method="convlora-adabn", mode="fast", epochs=n_epochs, seed=seed, device=dev,
                   progress=progress)
    adapter_path = out_dir / f"adapter_{site}.safetensors"
    info = save_adapter(base, result.state, adapter_path, name=f"demo-{site}", method=result.method,
                        mode=result.mode, rank=result.rank, alpha=result.alpha, placement=result.placement,
                        details={**result.summary(), "target": {"n_volumes": len(stacks),
                                                                "simulated_site": site}}, overwrite=True)
    t0 = time.perf_counter()
    # as segment --adapter does: the adapter is used only if it beats no adapter on this scan (label-free)
    after, used, _ = segment_checked(base, test_float, adapter_path, device=dev)
    t_after = time.perf_counter() - t0

    # 3. numbers and files --------------------------------------------------------------------------------------
    (d0, s0), (d1, s1) = _scores(before, test_truth), _scores(after, test_truth)
    stem = f"{test_name}_{site}"
    files = {
        "test_scan": write_image(_compact(test_scan), out_dir / f"{stem}.nii.gz", overwrite=True),
        "truth": write_image(test_truth, out_dir / f"{stem}_truth.nii.gz", overwrite=True),
        "mask_before": write_image(before, out_dir / f"{stem}_source_brainmask.nii.gz", overwrite=True),
        "mask_after": write_image(after, out_dir / f"{stem}_adapted_brainmask.nii.gz", overwrite=True),
        "adapter": adapter_path,
    }
    files["overlay_png"] = write_overlay_png(
        out_dir / "before_after.png", test_scan, test_truth, before, after,
        ("before: source model", "after: with the adapter" if used is not None else
         "after: adapter not used (per-scan check)"), [(d0, s0), (d1, s1)])
    demo = DemoResult(
        site=site, test_head=test_name, n_target_volumes=len(stacks), epochs=result.epochs,
        n_candidates=len(result.candidates), dice_before=d0,
        dice_after=d1, surface_dice_before=s0, surface_dice_after=s1, score_source=result.agreement_source,
        score_selected=result.best_agreement, selected=result.selected, verdict=result.verdict(),
        adapter_bytes=info.bytes, model_bytes=model_path.stat().st_size,
        adapter_used=used is not None,
        seconds={"simulate": round(t_sim, 1), "segment_before": round(t_before, 1),
                 "adapt": round(result.seconds, 1), "segment_after": round(t_after, 1),
                 "total": round(time.perf_counter() - t_total, 1)},
        files={k: str(v) for k, v in files.items()})
    log(demo.table())
    log(f"written to {out_dir}: masks, adapter, test scan, before_after.png")
    return demo
