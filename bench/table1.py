"""The paper's Table 1: source model vs. the adaptation methods (and ROBEX, deepbet) on five target scanner sites.

    python bench/table1.py --quick --work /work/cache/work          # <= 10 min on 2 CPU cores: 1 seed, 1 rotation
    python bench/table1.py --work /work/cache/work                  # full: 3 seeds, 4 rotations
    python bench/table1.py --cc359 /data/CC359 --work /tmp/cc359    # the same table on the real Calgary-Campinas-359

Semi-synthetic mode (default). Six simulated CC359-like sites (``ConvLoRASegLib.sites``) scan the four real heads
of ``../shared/data/heads``; several "subjects" per head come from random deformations (tools/make_cohort.py).
The source site is ``ge3``; targets are the other five. Leave one head out: the rotation that holds out head ``h``
uses the source model ``loho_<h>.safetensors`` (trained on ge3 subjects 0-2 of the three other heads, silver masks,
:data:`TRAIN_ARGS`; by tools/train_default_model.py at commit 695101c for the recorded tables, here when absent), adapts it on unlabeled target-site volumes, and evaluates on
head ``h``'s target-site subject 0 (the real head itself) against its mask: surface Dice at 1 mm (primary) and
Dice, on the volume's native site grid.

By default (``--adapt-from held-out``) the adaptation volumes are other subjects (4, 5) of the held-out head at the
target site — unlabeled and never evaluated; ``--adapt-from others`` takes new subjects of the other three heads
instead (BENCHMARKS.md, Table 1, says why the default is the former).

CC359 mode. Source domain GE 3 T; per target domain a seeded subject split (``cohorts.split_cases``): the train
part adapts (labels only for the oracle), the test part evaluates. The source model is trained on GE 3 T's
train + val part when ``<models>/cc359_ge3.safetensors`` is absent.

Outputs (``--out``, default bench/results/table1): ``table1.csv`` (one row per site, method, seed; columns
``site,method,seed,surface_dice,dice,trainable_params,adapter_bytes,adapt_seconds``; the mean over rotations and
evaluation volumes), ``table1_volumes.csv`` (one row per evaluation volume), ``table1.md`` (mean +- std over seeds),
``table1.png`` and ``table1.json`` (the configuration and stage times). Every evaluated volume is cached in the
work folder (``table1/rows.jsonl``), so an interrupted run resumes where it stopped.

Set ``CONVLORASEG_THREADS=1`` to run torch on one thread (a loaded 2-core machine runs it much faster so).
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))

if os.environ.get("CONVLORASEG_THREADS"):
    os.environ.setdefault("OMP_NUM_THREADS", os.environ["CONVLORASEG_THREADS"])

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if os.environ.get("CONVLORASEG_THREADS"):
    torch.set_num_threads(int(os.environ["CONVLORASEG_THREADS"]))

from ConvLoRASegLib.errors import ConvLoRASegError  # noqa: E402

SOURCE_SITE = "ge3"
#: The four real heads the semi-synthetic table is defined on: its rotations (held-out heads) and its source models'
#: training heads. ``../shared/data/heads`` holds more real heads since (bench/real_heads.py uses them all); taking
#: whatever is there would silently change this benchmark. ``--rotations`` may name any head that is there.
HEADS = ("colin27", "itk_kmeans", "mni152_nlin6asym", "robex_atlas")
TARGET_SITES = ("ge15", "philips15", "philips3", "siemens15", "siemens3")
#: The columns of the table, in order.
METHOD_COLUMNS = ("source", "adabn", "self-training", "udas", "udas-convlora", "convlora-adabn-paper",
                  "convlora-adabn-fast", "oracle", "robex", "deepbet")
#: Table column -> (selftrain.adapt method, mode). UDAS variants and self-training run as the paper's code does.
ADAPT_METHODS: Dict[str, Tuple[str, str]] = {
    "adabn": ("adabn", "fast"), "self-training": ("self-training", "paper"), "udas": ("udas", "paper"),
    "udas-convlora": ("udas-convlora", "paper"), "convlora-adabn-paper": ("convlora-adabn", "paper"),
    "convlora-adabn-fast": ("convlora-adabn", "fast")}
#: Methods without randomness: computed once per rotation and repeated for every seed.
SEEDLESS = ("source", "adabn", "robex", "deepbet")
#: Methods whose result does not depend on the adaptation volumes or the budget.
NO_ADAPTATION = ("source", "robex", "deepbet")
#: Bumped when a method's code changes its results, so that cached rows of the old code are recomputed.
ROW_VERSIONS: Dict[str, List[str]] = {"oracle": ["adabn-after-finetune"], "adabn": ["fast-infer-precision"],
                                      "convlora-adabn-fast": ["fast-infer-precision"]}
#: The label-free selection's version (source and AdaBN candidates, consistency on interleaved shares,
#: spread scoring volumes, no candidate that shrinks the brain; every candidate is scored against the labels too;
#: AdaBN from the layers' own batch statistics; every candidate records its boundary contrast, 2026-12-05): part of
#: every adapted row's key, with the library's
#: ``selection.SCORE_SLICE_STEP`` (rows scored on every other slice, step 2, have other keys).
SELECTION_VERSION = "selection-v5-one-pass-adabn-contrast"
CSV_COLUMNS = ("site", "method", "seed", "surface_dice", "dice", "trainable_params", "adapter_bytes", "adapt_seconds")
VOLUME_COLUMNS = ("site", "rotation", "volume", "method", "seed", "surface_dice", "dice", "trainable_params",
                  "adapter_bytes", "adapt_seconds", "best_epoch", "agreement", "selected")
#: ``convlora-seg train`` arguments of the source models: the leave-one-head-out recipe that trained the models of
#: the recorded tables (tools/train_default_model.py at commit 695101c; that script trains on the real heads since).
TRAIN_ARGS = ("--spacing", "2", "--slice-size", "128", "--val-fraction", "0.25", "--fp16",
              "--epochs", "6", "--steps-per-epoch", "12", "--batch-size", "16", "--lr", "2e-3",
              "--lr-schedule", "cosine", "--augment-3d", "1", "--out-scale", "6", "--precision", "fp32",
              "--esh-epochs", "2", "--checkpoint-every", "10")
QUICK_TRAIN_ARGS = ("--spacing", "2", "--slice-size", "128", "--epochs", "2", "--esh-epochs", "2",
                    "--val-fraction", "0.25", "--fp16")


# ---------------------------------------------------------------------------------------------------------------
# configuration and tasks
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Budget:
    """What each adaptation may spend (the same for every method, the oracle included)."""

    epochs: int = 3
    steps_per_epoch: int = 8
    batch_size: int = 32
    lr: float = 1e-4
    oracle_lr: float = 1e-4
    selection_volumes: int = 1
    #: autocast of the training forward passes (adapt()'s ``precision``; the oracle the same): ``auto`` = bf16
    #: where the CPU/GPU has it natively, ``fp32`` = none. AdaBN runs in fp32; pseudo-labels and selection run in
    #: fp32 in paper mode and in this precision in fast mode (as adapt() does).
    precision: str = "auto"
    seeds: Tuple[int, ...] = (0, 1, 2)

    def key(self) -> str:
        """Short hash of the settings that change adapted results (the row cache's key)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("seeds", "oracle_lr")}  # oracle: see row_key
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class Volume:
    """One volume of a task: image file, mask file, a short name."""

    name: str
    image: Path
    mask: Optional[Path]


@dataclass
class Task:
    """One (target site, rotation): a source model, unlabeled adaptation volumes, labelled evaluation volumes."""

    site: str
    rotation: str
    model_path: Path
    adapt: List[Volume]
    evaluate: List[Volume]


@dataclass
class Timer:
    """Wall time per stage (seconds), printed as it goes."""

    stages: Dict[str, float] = field(default_factory=dict)
    log: Callable[[str], None] = print

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] = round(self.stages.get(stage, 0.0) + seconds, 2)

    def run(self, stage: str, fn: Callable, *args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self.add(stage, time.perf_counter() - t)
        return out


# ---------------------------------------------------------------------------------------------------------------
# source models
# ---------------------------------------------------------------------------------------------------------------
def cli_train(images: Path, masks: Path, out: Path, args: Sequence[str] = TRAIN_ARGS) -> Path:
    """Train a source model with ``convlora-seg train`` (a subprocess, as a user would), written to ``out``."""
    cmd = [sys.executable, "-m", "ConvLoRASegLib", "train", "--images", str(images), "--masks", str(masks),
           "-o", str(out), "--overwrite", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def link_folder(pairs: Iterable[Tuple[Path, Path]], dest: Path) -> Path:
    """dest/images + dest/masks with symbolic links, the mask under its image's file name."""
    for sub in ("images", "masks"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for image, mask in pairs:
        for src, sub in ((image, "images"), (mask, "masks")):
            link = dest / sub / image.name
            if not link.exists():
                link.symlink_to(Path(src).resolve())
    return dest


def loho_model(head: str, heads: Sequence[str], models: Path, work: Path, quick: bool) -> Path:
    """The source model that never saw ``head``: ``<models>/loho_<head>.safetensors``, trained when absent.

    Training uses ge3 subjects 0-2 of the other heads with their silver-standard masks where the cohort has them
    (as tools/train_default_model.py did at commit 695101c), else the shipped ones. In quick mode an absent model is
    trained with 2 epochs only and stored as ``loho_<head>_quick.safetensors``.
    """
    path = models / f"loho_{head}.safetensors"
    if path.is_file():
        return path
    quick_path = models / f"loho_{head}_quick.safetensors"
    if quick and quick_path.is_file():
        return quick_path
    from make_cohort import make_site_cohort

    others = [h for h in heads if h != head]
    files = make_site_cohort(SOURCE_SITE, 3, others, work / "table1" / "ge3_train")

    def best_mask(image: Path, mask: Path) -> Path:
        silver = image.parent.parent / "masks_silver" / image.name
        return silver if silver.is_file() else mask

    files = [(i, best_mask(i, m)) for i, m in files]
    dest = link_folder(files, work / "table1" / f"loho_{head}_train")
    models.mkdir(parents=True, exist_ok=True)
    print(f"source model for held-out head {head} is missing: training it"
          f"{' (quick: 2 epochs)' if quick else ''}", flush=True)
    return cli_train(dest / "images", dest / "masks", quick_path if quick else path,
                     QUICK_TRAIN_ARGS if quick else TRAIN_ARGS)


# ---------------------------------------------------------------------------------------------------------------
# tasks: semi-synthetic and CC359
# ---------------------------------------------------------------------------------------------------------------
def table_heads() -> List[str]:
    """The heads of :data:`HEADS` that are here (the shared full-resolution heads, else the bundled demo copies)."""
    from make_cohort import available_heads

    available = available_heads()
    return [h for h in HEADS if h in available]


def synthetic_tasks(sites: Sequence[str], rotations: Sequence[str], eval_subjects: Sequence[int],
                    adapt_subjects: Sequence[int], adapt_heads: int, severity: float, models: Path, work: Path,
                    quick: bool, timer: Timer, adapt_from: str = "held-out") -> List[Task]:
    """Leave-one-head-out tasks; simulated volumes are cached in ``work/table1/cohorts/sev<severity>/<site>``.

    ``adapt_from="others"``: the adaptation volumes are subjects ``adapt_subjects`` of ``adapt_heads`` other heads;
    ``"held-out"``: subjects ``adapt_subjects`` of the held-out head itself (other deformations than the evaluated
    ones, unlabeled). Evaluation volumes are never adaptation volumes.
    """
    if set(eval_subjects) & set(adapt_subjects) and adapt_from == "held-out":
        raise ConvLoRASegError("--adapt-subjects and --eval-subjects overlap: an evaluation volume would adapt")
    from make_cohort import available_heads, make_site_cohort

    available = list(available_heads())
    unknown = [h for h in rotations if h not in available]
    if unknown:
        raise ConvLoRASegError(f"unknown head(s) {', '.join(unknown)}; available: {', '.join(available)}")
    heads = table_heads()  # the source models train on these (minus the held-out head)
    tasks = []
    for head in rotations:
        model_path = timer.run("train_source_models", loho_model, head, heads, models, work, quick)
        others = [head] if adapt_from == "held-out" else [h for h in heads if h != head][:adapt_heads]
        for site in sites:
            out = work / "table1" / "cohorts" / f"sev{severity:g}" / site
            t = time.perf_counter()
            ev = [make_site_cohort(site, 1, [head], out, first_subject=k, severity=severity)[0] for k in eval_subjects]
            ad = [make_site_cohort(site, 1, [h], out, first_subject=k, severity=severity)[0]
                  for k in adapt_subjects for h in others]
            timer.add("simulate_cohorts", time.perf_counter() - t)
            tasks.append(Task(site, head, model_path, [Volume(i.name.split(".")[0], i, m) for i, m in ad],
                              [Volume(i.name.split(".")[0], i, m) for i, m in ev]))
    return tasks


def cc359_tasks(root: Path, sites: Sequence[str], models: Path, work: Path, split_seed: int, max_adapt: int,
                max_eval: int, timer: Timer) -> List[Task]:
    """One task per target domain of a CC359 tree (source: GE 3 T, trained when the model is absent)."""
    from ConvLoRASegLib.cohorts import cc359_cases, split_cases

    cases = [c for c in cc359_cases(root) if c.mask is not None]
    by_domain: Dict[str, list] = {}
    for c in cases:
        by_domain.setdefault(c.domain, []).append(c)
    if SOURCE_SITE not in by_domain:
        raise ConvLoRASegError(f"{root} has no GE 3 T case with a mask (the source domain)")
    model_path = models / "cc359_ge3.safetensors"
    if not model_path.is_file():
        train, val, _ = split_cases(by_domain[SOURCE_SITE], seed=split_seed)
        dest = link_folder([(c.image, c.mask) for c in train + val], work / "table1" / "cc359_ge3_train")
        models.mkdir(parents=True, exist_ok=True)
        timer.run("train_source_models", cli_train, dest / "images", dest / "masks", model_path)
    tasks = []
    for site in sites:
        if site not in by_domain:
            print(f"CC359: no cases of domain {site}; skipped", flush=True)
            continue
        train, _, test = split_cases(by_domain[site], seed=split_seed)
        vol = lambda c: Volume(c.subject, c.image, c.mask)  # noqa: E731
        tasks.append(Task(site, "cc359", model_path, [vol(c) for c in train[:max_adapt]],
                          [vol(c) for c in test[:max_eval]]))
    return tasks


# ---------------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class EvalVolume:
    """An evaluation volume prepared once: working slices, the truth on the native grid, its spacing (z, y, x)."""

    name: str
    image_path: Path
    vs: object
    truth: np.ndarray
    spacing: Tuple[float, float, float]


def prepare_eval(vol: Volume, grid) -> EvalVolume:
    from ConvLoRASegLib.volumes import read_image, to_slices

    image = read_image(vol.image)
    truth = sitk.GetArrayFromImage(read_image(vol.mask)) > 0
    return EvalVolume(vol.name, vol.image, to_slices(image, grid), truth, tuple(reversed(image.GetSpacing())))


def score_mask(pred: np.ndarray, ev: EvalVolume) -> Tuple[float, float]:
    """(surface Dice at 1 mm, Dice) of a native-grid mask against the truth."""
    from ConvLoRASegLib.metrics import dice, surface_dice

    return float(surface_dice(pred, ev.truth, ev.spacing, 1.0)), float(dice(pred, ev.truth))


def evaluate(model, ev: EvalVolume, device, contrast: bool = False) -> Tuple[float, ...]:
    """Segment the evaluation volume with ``model`` (as segment_image does: native grid, post-processed): (surface
    Dice, Dice), and with ``contrast`` the label-free boundary contrast of its working-grid mask
    (:func:`boundary_contrast`)."""
    from ConvLoRASegLib.segment import predict_slices
    from ConvLoRASegLib.volumes import brain_mask

    probs = predict_slices(model, ev.vs.slices, device)
    mask = sitk.GetArrayFromImage(brain_mask(probs, ev.vs)) > 0
    if not contrast:
        return score_mask(mask, ev)
    return (*score_mask(mask, ev), boundary_contrast(probs, ev.vs.slices))


def boundary_contrast(probs: np.ndarray, slices: np.ndarray) -> float:
    """Mean intensity (working grid, clipped to [0, 1]) of the one-voxel inner shell of the mask ``probs >= 0.5``
    minus that of its one-voxel outer shell (6-connected); NaN for an empty mask or one that fills the grid.

    A label-free signal that asks the image rather than the network: recorded for every candidate and in the
    per-scan check's scores of Table 1 and the shift tasks. Judged on those rows and rejected as a rule for the
    product (BENCHMARKS.md, "Answered once": boundary contrast); it costs no network pass, so the rows keep it."""
    from scipy import ndimage

    m = probs >= 0.5
    if not m.any() or m.all():
        return float("nan")
    x = np.clip(slices, 0.0, 1.0)
    inner = m & ~ndimage.binary_erosion(m)
    outer = ndimage.binary_dilation(m) & ~m
    return float(x[inner].mean() - x[outer].mean())


def rank_correlation(groups) -> Dict[str, object]:
    """Spearman of x with y over ``groups`` = [(xs, ys), ...] (one group per adaptation): pooled over every pair,
    and the mean of the within-group correlations (groups of >= 3 pairs with a defined correlation)."""
    from ConvLoRASegLib.selection import spearman

    xs = [v for x, _ in groups for v in x]
    ys = [v for _, y in groups for v in y]
    within = [rho for x, y in groups if len(x) >= 3 for rho in [spearman(x, y)] if np.isfinite(rho)]
    return {"pooled": round(spearman(xs, ys), 3) if xs else None,
            "within": round(float(np.mean(within)), 3) if within else None, "pairs": len(xs)}


def seed_free_once(shared: Dict[Tuple[str, str], object], key: Tuple[str, str], compute):
    """``compute()``, kept in ``shared`` under ``key`` = (candidate, what) for the seed-free candidates (source,
    AdaBN: the same model in every run of a task)."""
    if key[0] not in ("source", "adabn"):
        return compute()
    if key not in shared:
        shared[key] = compute()
    return shared[key]


def candidate_scores(base, res, ev: EvalVolume, selected_scores: Tuple[float, float, float], device,
                     shared: Dict[Tuple[str, str], object]) -> Dict[str, Dict[str, float]]:
    """Every candidate of an adaptation (source, AdaBN, each epoch) scored against the evaluation volume's labels,
    beside its label-free score on the adaptation volumes: how well does the label-free score rank them? Each also
    records its boundary contrast on the evaluation scan (:func:`boundary_contrast`: label-free). The source and
    AdaBN candidates do not depend on the method's training or seed: they are computed once per task."""
    from ConvLoRASegLib.selftrain import candidate_model

    def once(key: Tuple[str, str], compute):
        return seed_free_once(shared, key, compute)

    out = {}
    for name, label_free in res.candidates.items():
        model = functools.lru_cache(maxsize=None)(functools.partial(candidate_model, base, res, name))
        if name == res.selected:
            got = selected_scores
            if name in ("source", "adabn"):
                shared[(name, ev.name)] = got
        else:
            got = once((name, ev.name), lambda: evaluate(model(), ev, device, contrast=True))
        out[name] = {"label_free": round(float(label_free), 4), "surface_dice": round(float(got[0]), 4),
                     "dice": round(float(got[1]), 4), "contrast": round(float(got[2]), 4)}
    return out


def scan_check(base, res, ev: EvalVolume, device, shared: Dict[Tuple[str, str], object]) -> Dict[str, dict]:
    """The label-free scores ``segment --adapter auto`` compares on the evaluation scan itself (its working-grid
    slices, every slice): the source model's and the selected result's, for the per-scan check (:func:`ranking`),
    each with its mask's boundary contrast there (:func:`boundary_contrast`)."""
    from ConvLoRASegLib.segment import predict_slices
    from ConvLoRASegLib.selection import SOURCE, score_model

    def compute(model) -> dict:
        final, early = predict_slices(model, ev.vs.slices, device, with_esh=True)
        return {**score_model(model, ev.vs.slices, device, predicted=(final, early)).to_dict(),
                "contrast": boundary_contrast(final, ev.vs.slices)}

    def scored(name: str, model) -> dict:
        return seed_free_once(shared, (name, f"scan check {ev.name}"), lambda: compute(model))

    return {"source": scored(SOURCE, base), "selected": scored(res.selected, res.model)}


def checked_pick(check: Dict[str, dict]) -> str:
    """What the per-scan check keeps (``selection.choose`` between the source and the selected result on the
    scan, as ``segment --adapter`` does by default): ``"source"`` or ``"selected"``."""
    from ConvLoRASegLib.selection import VolumeScore, choose_volume_scores

    fields = ("agreement", "consistency", "brain_ml", "plausible")
    return choose_volume_scores({n: VolumeScore(*(v[f] for f in fields)) for n, v in check.items()})


def ranking(rows: Sequence[dict]) -> Dict[str, object]:
    """Spearman correlation of the label-free score with the true surface Dice over every (volume, candidate) of
    the adapted rows (pooled, and the mean within one adaptation run), and how often the selected candidate was
    worse than the source by more than 0.005."""
    runs = [r for r in rows if r.get("candidates")]
    rk = rank_correlation([([v["label_free"] for v in r["candidates"].values()],
                            [v["surface_dice"] for v in r["candidates"].values()]) for r in runs])
    worse = sum(1 for r in runs if "source" in r["candidates"] and r["candidates"][r["selected"]]["surface_dice"]
                < r["candidates"]["source"]["surface_dice"] - 0.005)
    out = {"pairs": rk["pairs"], "runs": len(runs), "spearman_pooled": rk["pooled"],
           "spearman_within_run_mean": rk["within"], "selected_worse_than_source": worse}
    checked = [r for r in runs if r.get("scan_check") and "source" in r["candidates"]]
    if checked:  # the per-scan check on top of the selection: keep the source where it scores better on the scan
        src = [r["candidates"]["source"]["surface_dice"] for r in checked]
        kept = [r["candidates"]["source" if checked_pick(r["scan_check"]) == "source" else r["selected"]]
                ["surface_dice"] for r in checked]
        sel = [r["candidates"][r["selected"]]["surface_dice"] for r in checked]
        out["scan_check"] = {"runs": len(checked),
                             "kept_source": sum(checked_pick(r["scan_check"]) == "source" for r in checked),
                             "mean_minus_source_selected": round(float(np.mean(sel) - np.mean(src)), 4),
                             "mean_minus_source_checked": round(float(np.mean(kept) - np.mean(src)), 4),
                             "worse_than_source_checked": sum(k < s - 0.005 for k, s in zip(kept, src)),
                             "worst_checked": round(float(min(k - s for k, s in zip(kept, src))), 4)}
    return out


# ---------------------------------------------------------------------------------------------------------------
# the oracle and sizes
# ---------------------------------------------------------------------------------------------------------------
def finetune_oracle(model, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], budget: Budget, seed: int,
                    device) -> Tuple[object, int, float]:
    """Supervised fine-tuning of every U-Net weight on the target's labelled adaptation volumes: the ceiling.

    BCE-with-logits on the labels, Adam (``budget.oracle_lr``), BatchNorm in training mode (batch statistics of
    the target), ``budget.epochs x budget.steps_per_epoch`` steps of ``budget.batch_size`` slices; the final
    weights are kept (no label-free selection). At the end the BatchNorm running statistics are set to the exact
    target statistics under the new weights (AdaBN over the same slices): a few momentum updates would leave them
    mostly the source's and break the eval-mode network. Returns (model copy, trainable parameters, seconds).
    """
    from ConvLoRASegLib.adabn import adabn

    from ConvLoRASegLib.segment import nonempty_slices
    from ConvLoRASegLib.selftrain import source_copy

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = np.concatenate([np.asarray(v, np.float32) for v in images])
    y = np.concatenate([np.asarray(m, np.float32) for m in masks])
    keep = nonempty_slices(x)
    x_t, y_t = torch.from_numpy(x[keep][:, None]), torch.from_numpy(y[keep][:, None])
    m = source_copy(model).to(device)
    for p in m.parameters():
        p.requires_grad_(False)
    params = list(m.unet.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=budget.oracle_lr)
    steps = min(budget.steps_per_epoch, (len(x_t) + budget.batch_size - 1) // budget.batch_size)
    for _ in range(budget.epochs):
        m.unet.train()
        order = torch.randperm(len(x_t), generator=gen)
        for step in range(steps):
            idx = order[step * budget.batch_size:(step + 1) * budget.batch_size]
            with autocast(device, budget.precision):
                logits = m.unet(x_t[idx].to(device))
            loss = F.binary_cross_entropy_with_logits(logits.float(), y_t[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    m.eval()
    adabn(m, (x_t[i:i + 64].to(device) for i in range(0, len(x_t), 64)), modules=m.unet, forward=m.unet)
    return m, sum(p.numel() for p in params), time.perf_counter() - t0


def autocast(device, precision: str):
    """torch.autocast with the library's choice of reduced precision for ``device`` (disabled for fp32)."""
    from ConvLoRASegLib.segment import autocast_dtype

    dtype = autocast_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def state_bytes(state: Dict[str, torch.Tensor]) -> int:
    """Size in bytes of ``state`` as a float32 safetensors file (no metadata)."""
    from safetensors.torch import save

    return len(save({k: v.detach().float().cpu().contiguous() for k, v in state.items()}))


def adapter_file_bytes(base, result) -> int:
    """Size of the adapter file ``store.save_adapter`` writes for ``result`` (tensors + metadata)."""
    from ConvLoRASegLib.store import save_adapter

    with tempfile.TemporaryDirectory() as td:
        info = save_adapter(base, result.state, Path(td) / "a.safetensors", name="table1", method=result.method,
                            mode=result.mode, rank=result.rank, alpha=result.alpha, placement=result.placement,
                            details=result.summary())
        return int(info.bytes)


# ---------------------------------------------------------------------------------------------------------------
# ROBEX
# ---------------------------------------------------------------------------------------------------------------
def robex_mask(image_path: Path) -> Tuple[np.ndarray, float]:
    """ROBEX on one volume: (mask on the image's grid, seconds); the runner of bench/peers.py."""
    from peers import robex_mask as run

    return run(image_path)


def _peer_scores(ev: EvalVolume, cache: Path, run: Callable[[Path], Tuple[np.ndarray, float]]) -> Dict[str, float]:
    """A peer tool's surface Dice, Dice and seconds on one evaluation volume, cached by the image file's name."""
    path = cache / f"{ev.image_path.name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    mask, secs = run(ev.image_path)
    sd, d = score_mask(mask, ev)
    row = {"surface_dice": sd, "dice": d, "seconds": round(secs, 1)}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row))
    os.replace(tmp, path)
    return row


def deepbet_scores(ev: EvalVolume, cache: Path) -> Dict[str, float]:
    """deepbet's scores on one evaluation volume (bench/peers.py), cached like ROBEX's."""
    from peers import deepbet_mask

    return _peer_scores(ev, cache, deepbet_mask)


def robex_scores(ev: EvalVolume, cache: Path) -> Dict[str, float]:
    """ROBEX's scores on one evaluation volume, cached by the image file's name."""
    return _peer_scores(ev, cache, robex_mask)


# ---------------------------------------------------------------------------------------------------------------
# running one task
# ---------------------------------------------------------------------------------------------------------------
class RowCache:
    """Per-volume result rows in a JSON-lines file, keyed so a rerun with the same settings skips them."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: Dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    self.rows[r["key"]] = r

    def get(self, key: str) -> Optional[dict]:
        return self.rows.get(key)

    def put(self, row: dict) -> None:
        self.rows[row["key"]] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def row_key(model_sha: str, budget: Budget, task: Task, method: str, seed: int, volume: str,
            adapt_names: Sequence[str]) -> str:
    """The row cache's key: everything that changes one volume's result."""
    from ConvLoRASegLib.segment import CROP_MARGIN_PX
    from ConvLoRASegLib.selection import SCORE_SLICE_STEP

    fixed = method in NO_ADAPTATION
    # our masks depend on the crop; the peers' do not
    inference = [] if method in ("robex", "deepbet") else [f"crop-margin-{CROP_MARGIN_PX}"]
    blob = json.dumps([model_sha, "" if fixed else budget.key(), task.site, task.rotation, method, seed, volume,
                       [] if fixed else sorted(adapt_names)] + ROW_VERSIONS.get(method, []) + inference
                      + ([SELECTION_VERSION, f"score-slice-step-{SCORE_SLICE_STEP}"] if method in ADAPT_METHODS
                         else [])
                      + ([budget.oracle_lr] if method == "oracle" else []))
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def run_task(task: Task, methods: Sequence[str], budget: Budget, cache: RowCache, robex_cache: Path,
             robex_budget: List[int], device, timer: Timer) -> List[dict]:
    """Every method x seed on one task; returns per-volume rows (also written to ``cache``)."""
    from ConvLoRASegLib.selftrain import adapt
    from ConvLoRASegLib.store import load_model
    from ConvLoRASegLib.volumes import mask_to_slices, read_image, to_slices

    base = load_model(task.model_path)
    adapt_names = [v.name for v in task.adapt]
    evs: List[EvalVolume] = []
    adapt_slices: List[np.ndarray] = []
    adapt_masks: List[np.ndarray] = []
    rows: List[dict] = []

    def prepared() -> None:
        if evs:
            return
        t = time.perf_counter()
        evs.extend(prepare_eval(v, base.grid) for v in task.evaluate)
        for v in task.adapt:
            vs = to_slices(read_image(v.image), base.grid)
            adapt_slices.append(vs.slices)
            adapt_masks.append(mask_to_slices(read_image(v.mask), vs) if v.mask is not None else None)
        timer.add("prepare_volumes", time.perf_counter() - t)

    def record(method: str, seed: int, name: str, sd: float, d: float, params: int, nbytes: int, secs: float,
               extra: Optional[dict] = None) -> None:
        row = {"key": row_key(base.sha256, budget, task, method, seed, name, adapt_names), "site": task.site,
               "rotation": task.rotation, "volume": name, "method": method, "seed": seed, "surface_dice": sd,
               "dice": d, "trainable_params": params, "adapter_bytes": nbytes, "adapt_seconds": round(secs, 2),
               "best_epoch": "", "agreement": "", **(extra or {})}
        cache.put(row)
        rows.append(row)

    shared: Dict[Tuple[str, str], object] = {}  # (seed-free candidate, volume or what) -> scores

    def cached(method: str, seed: int) -> Optional[List[dict]]:
        found = [cache.get(row_key(base.sha256, budget, task, method, seed, v.name, adapt_names))
                 for v in task.evaluate]
        return found if all(found) else None

    for method in methods:
        for seed in ([None] if method in SEEDLESS else budget.seeds):
            hit = cached(method, -1 if seed is None else seed)
            if hit:
                rows.extend(hit)
                continue
            prepared()
            s = -1 if seed is None else seed
            t = time.perf_counter()
            if method == "source":
                for ev in evs:
                    shared[("source", ev.name)] = evaluate(base, ev, device, contrast=True)  # every run's source
                    record(method, s, ev.name, *shared[("source", ev.name)][:2], 0, 0, 0.0)
            elif method == "robex":
                for ev in evs:
                    if robex_budget[0] <= 0 and not (robex_cache / f"{ev.image_path.name}.json").is_file():
                        continue
                    r = robex_scores(ev, robex_cache)
                    robex_budget[0] -= 1
                    record(method, s, ev.name, r["surface_dice"], r["dice"], 0, 0, r["seconds"])
            elif method == "deepbet":
                for ev in evs:
                    r = deepbet_scores(ev, robex_cache.parent / "deepbet")
                    record(method, s, ev.name, r["surface_dice"], r["dice"], 0, 0, r["seconds"])
            elif method == "oracle":
                if any(m is None for m in adapt_masks):
                    continue
                m, params, secs = finetune_oracle(base, adapt_slices, adapt_masks, budget, s, device)
                nbytes = state_bytes(m.unet.state_dict())
                for ev in evs:
                    record(method, s, ev.name, *evaluate(m, ev, device), params, nbytes, secs)
            else:
                algo, mode = ADAPT_METHODS[method]
                res = adapt(base, adapt_slices, method=algo, mode=mode, epochs=budget.epochs, lr=budget.lr,
                            batch_size=budget.batch_size, seed=max(s, 0), device=device,
                            selection_volumes=budget.selection_volumes, steps_per_epoch=budget.steps_per_epoch,
                            precision=budget.precision)
                nbytes = adapter_file_bytes(base, res)
                for ev in evs:
                    got = evaluate(res.model, ev, device, contrast=True)
                    extra = {"best_epoch": res.best_epoch, "agreement": round(res.best_agreement, 4),
                             "selected": res.selected,
                             "candidates": candidate_scores(base, res, ev, got, device, shared),
                             "scan_check": scan_check(base, res, ev, device, shared)}
                    record(method, s, ev.name, *got[:2], res.trainable_params, nbytes, res.seconds, extra)
            secs = time.perf_counter() - t
            timer.add(f"method:{method}", secs)
            got = [r for r in rows if r["method"] == method and r["seed"] == s]
            if got:
                print(f"  {task.site:9} hold-out {task.rotation:16} {method:21} seed {s:2d}: surface Dice "
                      f"{np.mean([r['surface_dice'] for r in got]):.4f}  Dice {np.mean([r['dice'] for r in got]):.4f}"
                      f"  ({secs:.1f} s)", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# aggregation and outputs
# ---------------------------------------------------------------------------------------------------------------
def aggregate(rows: Sequence[dict], seeds: Sequence[int]) -> List[dict]:
    """One row per (site, method, seed): means over rotations and evaluation volumes. Seedless methods (source,
    adabn, robex) are repeated for every seed with the same values."""
    out = []
    groups: Dict[Tuple[str, str, int], List[dict]] = {}
    for r in rows:
        for s in (seeds if r["seed"] == -1 else [r["seed"]]):
            groups.setdefault((r["site"], r["method"], s), []).append(r)
    order = {m: i for i, m in enumerate(METHOD_COLUMNS)}
    for (site, method, seed), g in sorted(groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99),
                                                                          kv[0][2])):
        out.append({"site": site, "method": method, "seed": seed,
                    "surface_dice": round(float(np.mean([r["surface_dice"] for r in g])), 4),
                    "dice": round(float(np.mean([r["dice"] for r in g])), 4),
                    "trainable_params": int(max(r["trainable_params"] for r in g)),
                    "adapter_bytes": int(max(r["adapter_bytes"] for r in g)),
                    "adapt_seconds": round(float(np.mean([r["adapt_seconds"] for r in g])), 2)})
    return out


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Write rows atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def summarise(table: Sequence[dict], metric: str) -> Dict[str, Dict[str, Tuple[float, float]]]:
    """method -> site -> (mean, std over seeds) of ``metric``; the site ``mean`` is the per-seed mean over sites."""
    by: Dict[str, Dict[str, Dict[int, float]]] = {}
    for r in table:
        by.setdefault(r["method"], {}).setdefault(r["site"], {})[r["seed"]] = r[metric]
    out: Dict[str, Dict[str, Tuple[float, float]]] = {}
    for method, sites in by.items():
        out[method] = {s: (float(np.mean(list(v.values()))), float(np.std(list(v.values())))) for s, v in sites.items()}
        seeds = sorted(set.intersection(*(set(v) for v in sites.values())))
        if seeds:
            per_seed = [np.mean([sites[s][k] for s in sites]) for k in seeds]
            out[method]["mean"] = (float(np.mean(per_seed)), float(np.std(per_seed)))
    return out


def markdown(table: Sequence[dict], base_params: int, title: str) -> str:
    """Two tables (surface Dice, Dice: mean +- std over seeds) and the per-method cost table."""
    sites = sorted({r["site"] for r in table}, key=lambda s: (TARGET_SITES + (s,)).index(s))
    methods = [m for m in METHOD_COLUMNS if any(r["method"] == m for r in table)]
    lines = [f"## {title}", ""]
    for metric, label in (("surface_dice", "Surface Dice at 1 mm"), ("dice", "Dice")):
        s = summarise(table, metric)
        lines += [f"**{label}** (mean +- std over seeds)", "",
                  "| method | " + " | ".join(sites) + " | mean |", "|---" * (len(sites) + 2) + "|"]
        for m in methods:
            cells = [f"{s[m][x][0]:.3f} +- {s[m][x][1]:.3f}" if x in s[m] else "-" for x in sites + ["mean"]]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["**Cost** (per adaptation, mean over sites, rotations and seeds; this machine's CPU)", "",
              "| method | trainable params | % of base | adapter bytes | adaptation seconds |", "|---|---|---|---|---|"]
    for m in methods:
        g = [r for r in table if r["method"] == m]
        p = max(r["trainable_params"] for r in g)
        lines.append(f"| {m} | {p} | {100.0 * p / base_params:.3f} | {max(r['adapter_bytes'] for r in g)} | "
                     f"{np.mean([r['adapt_seconds'] for r in g]):.1f} |")
    return "\n".join(lines) + "\n"


def plot(table: Sequence[dict], path: Path, title: str) -> Optional[Path]:
    """Grouped bars: surface Dice per site and method (mean +- std over seeds). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", flush=True)
        return None
    s = summarise(table, "surface_dice")
    sites = sorted({r["site"] for r in table}, key=lambda x: (TARGET_SITES + (x,)).index(x)) + ["mean"]
    methods = [m for m in METHOD_COLUMNS if m in s]
    fig, ax = plt.subplots(figsize=(12, 4.2), dpi=110)
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(sites))]
        ys = [s[m].get(x, (np.nan, 0))[0] for x in sites]
        es = [s[m].get(x, (np.nan, 0))[1] for x in sites]
        ax.bar(xs, ys, width, yerr=es, label=m, capsize=2)
    ax.set_xticks(range(len(sites)))
    ax.set_xticklabels(sites)
    finite = [r["surface_dice"] for r in table]
    ax.set_ylim(max(0.0, min(finite) - 0.05), 1.0)
    ax.set_ylabel("surface Dice at 1 mm")
    ax.set_title(textwrap.fill(title, 110), fontsize=10)  # a long title would run off the figure
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(str(tmp), format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def read_table(path: Path) -> List[dict]:
    """A ``table1.csv`` back as rows with numbers (for re-plotting)."""
    with open(path, newline="") as f:
        return [{**r, "seed": int(r["seed"]), "surface_dice": float(r["surface_dice"]), "dice": float(r["dice"]),
                 "trainable_params": int(r["trainable_params"]), "adapter_bytes": int(r["adapter_bytes"]),
                 "adapt_seconds": float(r["adapt_seconds"])} for r in csv.DictReader(f)]


def expectations(table: Sequence[dict]) -> List[str]:
    """The paper's three expectations on surface Dice (means over seeds: >= source per site, the mean gain, better
    than UDAS), as lines of text."""
    s = summarise(table, "surface_dice")
    if "source" not in s or "convlora-adabn-fast" not in s:
        return []
    out = []
    for col in ("convlora-adabn-paper", "convlora-adabn-fast"):
        if col not in s:
            continue
        sites = [x for x in s[col] if x != "mean" and x in s["source"]]
        ge = sum(s[col][x][0] >= s["source"][x][0] for x in sites)
        gain = np.mean([s[col][x][0] - s["source"][x][0] for x in sites])
        line = f"{col}: >= source on {ge}/{len(sites)} sites, mean gain {gain:+.4f} surface Dice"
        if "udas" in s:
            better = sum(s[col][x][0] > s["udas"][x][0] for x in sites if x in s["udas"])
            line += f", better than UDAS on {better}/{len(sites)} sites"
        out.append(line)
    return out


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="one seed, one rotation, two sites, one adaptation volume, 1 epoch x 4 steps")
    ap.add_argument("--smoke", action="store_true", help="plumbing test: one site, source + adabn, tiny budget")
    ap.add_argument("--cc359", type=Path, default=None, help="run on a real CC359 tree instead of simulated sites")
    ap.add_argument("--work", type=Path, default=Path("/tmp/convlora-work"), help="cache folder (cohorts, rows)")
    ap.add_argument("--models", type=Path, default=None, help="folder of source models (default: --work)")
    ap.add_argument("--source-name", default=SOURCE_SITE,
                    help="what the source models were trained on, for the title (default: the ge3 site)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "table1", help="where table1.* go")
    ap.add_argument("--sites", nargs="+", default=None, choices=TARGET_SITES)
    ap.add_argument("--methods", nargs="+", default=None, choices=METHOD_COLUMNS)
    ap.add_argument("--rotations", nargs="+", default=None, help="held-out heads (default: all; quick: colin27)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--steps-per-epoch", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--eval-subjects", type=int, nargs="+", default=None, help="subjects of the held-out head")
    ap.add_argument("--adapt-subjects", type=int, nargs="+", default=None, help="subjects of the other heads")
    ap.add_argument("--adapt-heads", type=int, default=None, help="how many of the other heads give adaptation volumes")
    ap.add_argument("--adapt-from", choices=("others", "held-out"), default="held-out",
                    help="adaptation volumes: new subjects of the other heads, or other subjects of the held-out head")
    ap.add_argument("--severity", type=float, default=1.0, help="the site simulator's global severity")
    ap.add_argument("--robex-volumes", type=int, default=None, help="most new ROBEX runs (cached ones are free)")
    ap.add_argument("--no-robex", action="store_true")
    ap.add_argument("--no-deepbet", action="store_true", help="leave out the deepbet column (PyPI deepbet)")
    ap.add_argument("--max-adapt", type=int, default=20, help="CC359: most adaptation volumes per domain")
    ap.add_argument("--max-eval", type=int, default=12, help="CC359: most evaluation volumes per domain")
    ap.add_argument("--plot-only", type=Path, default=None, metavar="CSV",
                    help="only redraw the chart of a table1*.csv (next to it, .png)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                    help="autocast for adaptation and the oracle (auto: bf16 where native)")
    return ap.parse_args(argv)


def settings(a: argparse.Namespace) -> Dict[str, object]:
    """Defaults by mode (full / quick / smoke), overridden by explicit options."""
    mode = "smoke" if a.smoke else "quick" if a.quick else "full"
    d = {"full": dict(seeds=[0, 1, 2], epochs=2, steps=4, batch=16, eval_subjects=[0], adapt_subjects=[4],
                      rotations=None, sites=list(TARGET_SITES), robex=10 ** 6, adapt_heads=3),
         "quick": dict(seeds=[0], epochs=1, steps=4, batch=16, eval_subjects=[0], adapt_subjects=[4],
                       rotations=["colin27"], sites=["ge15", "philips3"], robex=1, adapt_heads=1),
         "smoke": dict(seeds=[0], epochs=1, steps=1, batch=4, eval_subjects=[0], adapt_subjects=[4],
                       rotations=["colin27"], sites=["philips3"], robex=0, adapt_heads=1)}[mode]
    pick = lambda given, default: default if given is None else given  # noqa: E731
    methods = a.methods or (["source", "adabn", "convlora-adabn-fast"] if a.smoke else list(METHOD_COLUMNS))
    if a.no_robex:
        methods = [m for m in methods if m != "robex"]
    if a.no_deepbet:
        methods = [m for m in methods if m != "deepbet"]
    return {"mode": mode, "seeds": pick(a.seeds, d["seeds"]), "epochs": pick(a.epochs, d["epochs"]),
            "steps_per_epoch": pick(a.steps_per_epoch, d["steps"]), "batch_size": pick(a.batch_size, d["batch"]),
            "eval_subjects": pick(a.eval_subjects, d["eval_subjects"]),
            "adapt_subjects": pick(a.adapt_subjects, d["adapt_subjects"]),
            "rotations": pick(a.rotations, d["rotations"]), "sites": pick(a.sites, d["sites"]),
            "robex_volumes": pick(a.robex_volumes, d["robex"]), "adapt_heads": pick(a.adapt_heads, d["adapt_heads"]),
            "methods": methods}


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    if a.plot_only is not None:
        meta_path = a.plot_only.with_suffix(".json")
        title = json.loads(meta_path.read_text()).get("title", a.plot_only.stem) if meta_path.is_file() \
            else a.plot_only.stem
        print(plot(read_table(a.plot_only), a.plot_only.with_suffix(".png"), title))
        return 0
    cfg = settings(a)
    t_start = time.perf_counter()
    timer = Timer()
    from ConvLoRASegLib.segment import resolve_device

    device = resolve_device(a.device)
    models = a.models or a.work
    budget = Budget(epochs=cfg["epochs"], steps_per_epoch=cfg["steps_per_epoch"], batch_size=cfg["batch_size"],
                    precision=a.precision, seeds=tuple(cfg["seeds"]))
    if a.cc359 is not None:
        tasks = cc359_tasks(a.cc359, cfg["sites"], models, a.work, 0, a.max_adapt, a.max_eval, timer)
        title = f"Table 1 on CC359 ({a.cc359.name}), source GE 3 T"
    else:
        rotations = cfg["rotations"] or table_heads()
        tasks = synthetic_tasks(cfg["sites"], rotations, cfg["eval_subjects"], cfg["adapt_subjects"],
                                cfg["adapt_heads"], a.severity, models, a.work, cfg["mode"] != "full", timer,
                                a.adapt_from)
        title = (f"Table 1, semi-synthetic ({cfg['mode']}): source {a.source_name}, leave one head out "
                 f"({', '.join(rotations)}), adaptation from {a.adapt_from}, severity {a.severity:g}")
    if not tasks:
        raise ConvLoRASegError("nothing to evaluate (no target site found)")
    print(f"{len(tasks)} tasks, methods {', '.join(cfg['methods'])}, seeds {budget.seeds}, budget "
          f"{budget.epochs} epochs x {budget.steps_per_epoch} steps x {budget.batch_size} slices, device {device}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    cache = RowCache(a.work / "table1" / "rows.jsonl")
    robex_cache = a.work / "table1" / "robex"
    robex_budget = [int(cfg["robex_volumes"])]
    rows: List[dict] = []
    for task in tasks:
        t = time.perf_counter()
        rows += run_task(task, cfg["methods"], budget, cache, robex_cache, robex_budget, device, timer)
        done = tasks.index(task) + 1
        elapsed = time.perf_counter() - t_start
        print(f"task {task.site} / hold-out {task.rotation}: {time.perf_counter() - t:.0f} s "
              f"(total {elapsed:.0f} s, {done}/{len(tasks)} tasks, "
              f"about {elapsed / done * (len(tasks) - done) / 60:.0f} min left)", flush=True)
    table = aggregate(rows, budget.seeds)
    from ConvLoRASegLib.store import load_model

    base_params = sum(p.numel() for p in load_model(tasks[0].model_path).unet.parameters())
    stem = "table1" if cfg["mode"] == "full" or a.cc359 else f"table1_{cfg['mode']}"
    if a.cc359 is None and a.adapt_from == "others":
        stem += "_others"
    write_csv(a.out / f"{stem}.csv", table, CSV_COLUMNS)
    write_csv(a.out / f"{stem}_volumes.csv", rows, VOLUME_COLUMNS)
    md = markdown(table, base_params, title)
    checks = expectations(table)
    rank = ranking(rows)
    if rank["pairs"]:
        checks.append(f"label-free score vs true surface Dice over {rank['pairs']} (volume, candidate) pairs of "
                      f"{rank['runs']} adaptations: Spearman {rank['spearman_pooled']} pooled, "
                      f"{rank['spearman_within_run_mean']} within a run (mean); the selected candidate was worse "
                      f"than the source by > 0.005 in {rank['selected_worse_than_source']} of {rank['runs']}")
    if rank.get("scan_check"):
        c = rank["scan_check"]
        checks.append(f"per-scan check (source vs the selected result on the evaluated scan: segment --adapter's "
                      f"default since 2026-12-04) over {c['runs']} adaptations: kept the source {c['kept_source']} "
                      f"times; mean - source {c['mean_minus_source_selected']:+.4f} -> "
                      f"{c['mean_minus_source_checked']:+.4f}, "
                      f"worse by > 0.005 in {c['worse_than_source_checked']} (worst {c['worst_checked']:+.4f})")
    total = time.perf_counter() - t_start
    md += "\n" + "\n".join(f"- {c}" for c in checks) + ("\n" if checks else "")
    md += (f"\nRun: `python bench/table1.py {' '.join(sys.argv[1:] if argv is None else argv)}` in {total / 60:.1f} "
           f"min on {os.cpu_count()} CPU cores ({device}), torch threads {torch.get_num_threads()}.\n")
    (a.out / f"{stem}.md").write_text(md)
    plot(table, a.out / f"{stem}.png", title)
    meta = {"title": title, "settings": cfg, "severity": a.severity, "budget": asdict(budget),
            "stage_seconds": timer.stages, "label_free_ranking": rank,
            "total_seconds": round(total, 1), "tasks": [{"site": t.site, "rotation": t.rotation,
                                                         "model": str(t.model_path),
                                                         "adapt": [v.name for v in t.adapt],
                                                         "evaluate": [v.name for v in t.evaluate]} for t in tasks]}
    (a.out / f"{stem}.json").write_text(json.dumps(meta, indent=1, default=str))
    print(md)
    print("stage seconds:", json.dumps(timer.stages), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConvLoRASegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
