"""Evaluation shifts nobody tuned for: does adaptation ever make a mask worse than no adaptation?

    python bench/shifts.py make --work /work/cache/shifts                       # the fixed cohorts (once)
    python bench/shifts.py run --work /work/cache/shifts --models /work/cache/models
    python bench/shifts.py report --work /work/cache/shifts --out DIR           # tables of all rows cached so far

Five shift families, defined (and their seeds fixed) before anything was tuned on them; each is applied to new
"subjects" (``sites.random_subject``) of a *held-out* head (one the source model never saw) as the source site
(``ge3``) would have scanned them, so each family is the only shift:

``fov``      the field of view: 256 mm cube off-centre by up to 30 mm front-back / 15 mm left-right and 30-60 mm
             towards the feet (more neck, the crown near the top edge), or cut to 200 mm
``thick``    thick slices: 4-5 mm along one random axis (Gaussian slice profile, then stored on that grid)
``bias``     a strong bias field (TorchIO ``RandomBiasField``, coefficients 0.8, order 3)
``motion``   motion and ghosting (TorchIO ``RandomMotion`` 2 movements of <= 4 deg / 4 mm, ``RandomGhosting``)
``scanner``  a scanner profile that is not one of ``sites.SITES`` (darker mid-tones, more contrast, 1.2 mm slices)

Per (held-out head, family, seed): subjects 2-6 are the unlabeled adaptation volumes; subject 1 and the real head
itself (subject 0, undeformed) are the test volumes. ``run`` scores, on the test volumes' native grid against
their silver masks: the source model, AdaBN variants, ConvLoRA + AdaBN (fast and paper) and the label-free
selection's result; and deepbet (method ``deepbet``, PyPI deepbet: a peer, never part of the product). Every result row is
cached in ``<work>/rows.jsonl`` so that an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

HEADS_DIR = ROOT.parent / "shared" / "data" / "heads"
FAMILIES = ("fov", "thick", "bias", "motion", "scanner")
SEEDS = (0, 1)
ADAPT_SUBJECTS = (2, 3, 4, 5, 6)
TEST_SUBJECTS = (0, 1)


def _unseen_profile():
    from ConvLoRASegLib.sites import SiteProfile

    return SiteProfile("unseen", "a scanner not among sites.SITES", (1.2, 1.0, 1.0), "RAS", (190.0, 256.0, 256.0),
                       1.15, gamma=1.5, gm_wm_contrast=0.25, bias=0.35, noise=0.05, storage_max=2000.0,
                       dtype="int16")


def _to_tio(image: sitk.Image):
    import torchio as tio

    return tio.ScalarImage.from_sitk(image)


def _from_tio(timg, like: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(timg.numpy()[0].transpose(2, 1, 0).astype(np.float32))
    out.CopyInformation(like)
    return out


def _fov(image: sitk.Image, mask: sitk.Image, rng: np.random.Generator) -> Tuple[sitk.Image, sitk.Image]:
    from ConvLoRASegLib.sites import _brain_centre
    from ConvLoRASegLib.volumes import canonical_direction, orientation_matrix

    crop = rng.random() < 0.3
    fov = np.array([200.0, 200.0, 200.0]) if crop else np.array([256.0, 256.0, 256.0])
    offset = np.array([rng.uniform(-15, 15), rng.uniform(-30, 30), -rng.uniform(30, 60)])
    if crop:
        offset[2] = -rng.uniform(0, 20)
    direction = canonical_direction(image) @ orientation_matrix("RAS")
    size = fov.astype(int)
    centre = _brain_centre(mask) + offset
    origin = centre - direction @ ((size - 1) / 2.0)
    ref = sitk.Image(size.tolist(), sitk.sitkUInt8)
    ref.SetOrigin(origin.tolist())
    ref.SetDirection(direction.ravel().tolist())
    img = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    m = sitk.Resample(sitk.Cast(mask, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, 0.0)
    return img, sitk.Cast(m >= 0.5, sitk.sitkUInt8)


def _thick(image: sitk.Image, mask: sitk.Image, rng: np.random.Generator) -> Tuple[sitk.Image, sitk.Image]:
    axis = int(rng.integers(0, 3))
    thick = float(rng.uniform(4.0, 5.0))
    spacing = np.array(image.GetSpacing(), dtype=float)
    sigma = np.zeros(3)
    sigma[axis] = thick / 2.355  # a Gaussian slice profile of FWHM = the thickness (mm)
    smooth = sitk.SmoothingRecursiveGaussian(image, [max(s, 1e-3) for s in sigma]) if sigma.any() else image
    new_spacing = spacing.copy()
    new_spacing[axis] = thick
    size = np.maximum(np.round(np.array(image.GetSize()) * spacing / new_spacing).astype(int), 2)
    ref = sitk.Image(size.tolist(), sitk.sitkUInt8)
    ref.SetSpacing(new_spacing.tolist())
    ref.SetDirection(image.GetDirection())
    start = np.array(image.TransformContinuousIndexToPhysicalPoint([-0.5] * 3))
    d = np.array(image.GetDirection()).reshape(3, 3)
    ref.SetOrigin((start + d @ (new_spacing / 2.0)).tolist())
    img = sitk.Resample(smooth, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    m = sitk.Resample(sitk.Cast(mask, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, 0.0)
    return img, sitk.Cast(m >= 0.5, sitk.sitkUInt8)


def _torchio(image: sitk.Image, transform, seed: int) -> sitk.Image:
    import torch

    torch.manual_seed(seed)
    return _from_tio(transform(_to_tio(image)), image)


def make_volume(head: str, family: str, seed: int, subject: int) -> Tuple[sitk.Image, sitk.Image]:
    """One volume of a shift cohort (deterministic) and its silver mask on the same grid."""
    import torchio as tio

    from ConvLoRASegLib.sites import random_subject, simulate_site

    img = sitk.ReadImage(str(HEADS_DIR / head / "image.nii.gz"), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(HEADS_DIR / head / "mask_silver.nii.gz"), sitk.sitkUInt8)
    k = 1000 * seed + subject
    if subject:
        img, mask = random_subject(img, mask, seed=k)
    rng = np.random.default_rng(10_000 + 100 * FAMILIES.index(family) + k)
    if family == "scanner":
        return simulate_site(img, mask, _unseen_profile(), seed=k)
    img, mask = simulate_site(img, mask, "ge3", seed=k)
    img = sitk.Cast(img, sitk.sitkFloat32)
    if family == "fov":
        img, mask = _fov(img, mask, rng)
    elif family == "thick":
        img, mask = _thick(img, mask, rng)
    elif family == "bias":
        img = _torchio(img, tio.RandomBiasField(coefficients=0.8, order=3), k)
    elif family == "motion":
        img = _torchio(img, tio.Compose([tio.RandomMotion(degrees=4, translation=4, num_transforms=2),
                                         tio.RandomGhosting(num_ghosts=(4, 10), intensity=(0.3, 0.6))]), k)
    arr = np.clip(sitk.GetArrayFromImage(img), 0, None)
    out = sitk.GetImageFromArray(np.round(arr).astype(np.int16))
    out.CopyInformation(img)
    return out, mask


def cohort_dir(work: Path, head: str, family: str, seed: int) -> Path:
    return work / head / family / f"s{seed}"


def cmd_make(a: argparse.Namespace) -> int:
    for head in a.heads:
        for family in a.families:
            for seed in a.seeds:
                d = cohort_dir(a.work, head, family, seed)
                for sub in ("images", "masks"):
                    (d / sub).mkdir(parents=True, exist_ok=True)
                for subject in (*TEST_SUBJECTS, *ADAPT_SUBJECTS):
                    name = f"{head}_{family}_s{seed}_sub{subject}.nii.gz"
                    if (d / "masks" / name).exists():
                        continue
                    t = time.perf_counter()
                    img, mask = make_volume(head, family, seed, subject)
                    sitk.WriteImage(img, str(d / "images" / name), True)
                    sitk.WriteImage(mask, str(d / "masks" / name), True)
                    print(f"{name} {img.GetSize()} {time.perf_counter() - t:.1f} s", flush=True)
    return 0


# --------------------------------------------------------------------------------------------------------- run

#: Methods of ``run``, in table order. ``-img`` variants use the image-centred working grid of before (a suspect
#: of AdaBN's losses, answered: BENCHMARKS.md); ``adabn-all`` re-estimates every BatchNorm, the output
#: BatchNorm(1) included (another suspect); ``convlora-adabn-fast`` is the product's default (``adapt``: AdaBN,
#: ConvLoRA, the label-free selection), and from the same run ``convlora-adabn-fast-trained`` is its best-scoring
#: epoch without the selection (what ConvLoRA adds on top of AdaBN), and ``cand:<name>`` every candidate the
#: selection saw (for the Spearman correlation).
#: ``deepbet`` is the peer a user would run instead (PyPI deepbet, bench/peers.py; never part of the product), on
#: the test volumes' own files, its masks cached in ``<work>/peers/deepbet``.
RUN_METHODS = ("source", "adabn", "convlora-adabn-fast-trained", "convlora-adabn-fast", "adabn-all",
               "convlora-adabn-paper-trained", "convlora-adabn-paper", "source-img", "adabn-all-img", "deepbet")
PAPER_SEEDS = (0,)
#: Methods whose rows also record the label-free scores of the per-scan check (``segment --adapter FILE``'s default:
#: the adapter is used on a scan only if it beats the source model there): the source and the product's results.
SCAN_CHECKED = ("source", "adabn", "convlora-adabn-fast", "convlora-adabn-paper")
IMAGE_CENTRE_FAMILIES = ("fov",)


def _score(pred: np.ndarray, truth: np.ndarray, spacing_zyx) -> Tuple[float, float, float]:
    from ConvLoRASegLib.metrics import dice, surface_dice

    return (float(dice(pred, truth)), float(surface_dice(pred, truth, spacing_zyx, 1.0)),
            float(surface_dice(pred, truth, spacing_zyx, 2.0)))


def _image_centred():
    """Context: the working grid centred on the image's centre, as before the head-centred grid (commit a0d3ade)."""
    import contextlib

    from ConvLoRASegLib import volumes

    @contextlib.contextmanager
    def ctx():
        orig = volumes.head_centre
        volumes.head_centre = volumes.physical_centre
        try:
            yield
        finally:
            volumes.head_centre = orig
    return ctx()


def run_task(head: str, family: str, seed: int, models: Path, work: Path, rows, methods: Sequence[str]):
    import contextlib

    from ConvLoRASegLib import store
    from ConvLoRASegLib.adabn import adabn_volumes
    from ConvLoRASegLib.segment import predict_slices
    from ConvLoRASegLib.selection import agreement, score_model, score_volume
    from ConvLoRASegLib.selftrain import adapt, source_copy
    from ConvLoRASegLib.volumes import brain_mask, read_image, to_slices
    from table1 import boundary_contrast

    d = cohort_dir(work, head, family, seed)
    base = store.load_model(models / f"loho_{head}.safetensors")
    todo = [m for m in methods if not (m == "convlora-adabn-paper" and seed not in PAPER_SEEDS)
            and not (m.endswith("-img") and family not in IMAGE_CENTRE_FAMILIES)]
    todo = [m for m in todo if rows.get(f"{base.sha256[:12]}|{head}|{family}|{seed}|{m}|sub0") is None]
    if not todo:
        return
    names = {k: f"{head}_{family}_s{seed}_sub{k}.nii.gz" for k in (*TEST_SUBJECTS, *ADAPT_SUBJECTS)}

    def load(grid_ctx):
        with grid_ctx:
            tests = []
            for k in TEST_SUBJECTS:
                img = read_image(d / "images" / names[k])
                truth = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "masks" / names[k]))) > 0
                tests.append((k, img, truth, tuple(reversed(img.GetSpacing())), to_slices(img, base.grid)))
            stacks = [to_slices(read_image(d / "images" / names[k]), base.grid).slices for k in ADAPT_SUBJECTS]
        return tests, stacks

    def _key(method: str, k: int) -> str:
        return f"{base.sha256[:12]}|{head}|{family}|{seed}|{method}|sub{k}"

    def evaluate(method: str, model, tests, seconds: float, extra: dict) -> None:
        for k, img, truth, sp, vs in tests:
            final, early = predict_slices(model, vs.slices, "cpu", with_esh=True)
            pred = sitk.GetArrayFromImage(brain_mask(final, vs)) > 0
            dsc, sd1, sd2 = _score(pred, truth, sp)
            lf = score_volume(final, early, base.grid.spacing_mm)
            contrast = boundary_contrast(final, vs.slices)  # label-free (table1.boundary_contrast)
            check = {}
            if method in SCAN_CHECKED:  # the scores segment --adapter's per-scan check compares on this scan
                check = {"scan_check": {**score_model(model, vs.slices, "cpu", predicted=(final, early)).to_dict(),
                                        "contrast": contrast}}
            # an alternative label-free score, recorded for the comparison: the final mask's consistency under an
            # intensity (gamma) perturbation of the input, surface Dice at one working voxel
            tta = float(np.mean([agreement(final, predict_slices(model, np.clip(vs.slices, 0, 1) ** g, "cpu"),
                                           base.grid.spacing_mm) for g in (0.7, 1.4)]))
            rows.put({"key": _key(method, k), "head": head,
                      "family": family, "seed": seed, "method": method, "volume": names[k], "dice": dsc,
                      "surface_dice": sd1, "surface_dice_2mm": sd2, "label_free": lf.value,
                      "agreement": lf.agreement, "brain_ml": lf.brain_ml, "tta": tta if lf.plausible else 0.0, "contrast": contrast, "seconds": round(seconds, 1), **extra, **check})
        print(f"{head} {family} s{seed} {method}: " + ", ".join(
            f"{r['surface_dice']:.3f}/{r['dice']:.4f}" for r in rows.rows.values()
            if r["head"] == head and r["family"] == family and r["seed"] == seed and r["method"] == method),
            flush=True)

    def peer(method: str, tests, cache: Path) -> None:
        from peers import cached_mask

        for k, img, truth, sp, vs in tests:
            pred, seconds = cached_mask(method, d / "images" / names[k], cache)
            dsc, sd1, sd2 = _score(pred, truth, sp)
            rows.put({"key": _key(method, k), "head": head, "family": family, "seed": seed, "method": method,
                      "volume": names[k], "dice": dsc, "surface_dice": sd1, "surface_dice_2mm": sd2,
                      "seconds": round(seconds, 1)})
        print(f"{head} {family} s{seed} {method}: " + ", ".join(
            f"{r['surface_dice']:.3f}/{r['dice']:.4f}" for r in rows.rows.values()
            if r["head"] == head and r["family"] == family and r["seed"] == seed and r["method"] == method),
            flush=True)

    for centred, grid_ctx in ((True, contextlib.nullcontext()), (False, None)):
        wanted = [m for m in todo if m.endswith("-img") != centred]
        if not wanted:
            continue
        tests, stacks = load(grid_ctx if centred else _image_centred())
        ctx = contextlib.nullcontext() if centred else _image_centred()
        with ctx:
            for method in wanted:
                t = time.perf_counter()
                plain = method.removesuffix("-img")
                if plain.endswith("-trained"):
                    continue  # made with its adaptation run
                if plain == "deepbet":
                    peer(method, tests, work / "peers")
                elif plain == "source":
                    evaluate(method, base, tests, 0.0, {})
                elif plain in ("adabn", "adabn-all"):
                    model = source_copy(base)
                    if plain == "adabn":
                        adabn_volumes(model, stacks)
                    else:
                        adabn_volumes(model, stacks, keep_source=())
                    evaluate(method, model, tests, time.perf_counter() - t, {})
                else:
                    mode = "paper" if plain.endswith("paper") else "fast"
                    res = adapt(base, stacks, method="convlora-adabn", mode=mode, seed=seed, device="cpu")
                    extra = {"selected": res.selected, "candidates": res.candidates,
                             "candidate_scores": res.details.get("candidate_scores"),
                             "adapt_seconds": round(res.seconds, 1)}
                    evaluate(method, res.model, tests, res.seconds, extra)
                    epochs = [n for n in res.candidates if n.startswith("epoch")]
                    best = max(epochs, key=lambda n: res.candidates[n])
                    for name, state in res.candidate_states.items():
                        twin = {"source": "source", "adabn": "adabn"}.get(name)
                        if twin and mode == "fast" and all(rows.get(_key(twin, k)) for k in TEST_SUBJECTS):
                            for k in TEST_SUBJECTS:  # the same model as that method's: its rows, relabelled
                                rows.put({**rows.get(_key(twin, k)), "key": _key(f"cand:{mode}:{name}", k),
                                          "method": f"cand:{mode}:{name}", "candidate": name})
                            continue
                        if name.startswith("epoch") and name not in (best, "epoch 1"):
                            continue  # the first and the best epoch only (CPU time)
                        cand = source_copy(base)
                        cand.adapters.add(name, state, alpha_over_r=res.alpha / res.rank)
                        cand.adapters.set_adapter(name)
                        evaluate(f"cand:{mode}:{name}", cand, tests, 0.0, {"candidate": name})
                        if name == best:
                            evaluate(f"{plain}-trained", cand, tests, res.seconds, {"candidate": name})


def per_scan_selection(cand_rows: Sequence[dict]) -> Dict[str, object]:
    """What each selection rule picks per test scan among the fast run's candidates, from label-free scores on that
    scan alone (as ``segment --adapter auto`` chooses), and the true surface Dice it gets vs the source model's."""
    from ConvLoRASegLib.selection import SOURCE, choose

    out: Dict[str, object] = {}
    scans = sorted({(r["head"], r["family"], r["seed"], r["volume"]) for r in cand_rows
                    if r["method"].startswith("cand:fast:")})
    for rule in ("agreement", "agreement+consistency", "agreement+consistency+volume"):
        deltas, picks = [], {}
        for scan in scans:
            rs = {r["candidate"]: r for r in cand_rows if r["method"].startswith("cand:fast:")
                  and (r["head"], r["family"], r["seed"], r["volume"]) == scan}
            if SOURCE not in rs:
                continue
            if rule == "agreement":
                pick = choose({n: r["label_free"] for n, r in rs.items()}, order=[SOURCE, "adabn"])
            else:
                pick = choose({n: 0.5 * (r["label_free"] + r["tta"]) for n, r in rs.items()}, order=[SOURCE, "adabn"],
                              consistency={n: r["tta"] for n, r in rs.items()},
                              brain_ml={n: r.get("brain_ml", 0.0) for n, r in rs.items()} if rule.endswith("volume") else None)
            picks[pick.split()[0]] = picks.get(pick.split()[0], 0) + 1
            deltas.append(rs[pick]["surface_dice"] - rs[SOURCE]["surface_dice"])
        out[rule] = {"n": len(deltas), "mean_delta": float(np.mean(deltas)) if deltas else None,
                     "worst_delta": float(min(deltas)) if deltas else None, "picks": picks}
    return out


def user_gets(rows: Sequence[dict]) -> Dict[str, Dict[str, object]]:
    """Per method of :data:`SCAN_CHECKED` (not the source): what a user gets with ``segment --adapter FILE``'s
    per-scan check on each test scan (``table1.checked_pick``: the adapted result if it beats the source model's
    label-free score on that scan, else the source model), against the source model; per (head, family, seed) task,
    the mean over its test scans. "below": tasks more than 0.005 surface Dice under the source (the never-worse
    goal)."""
    from table1 import checked_pick

    out: Dict[str, Dict[str, object]] = {}
    src = {(r["head"], r["family"], r["seed"], r["volume"]): r for r in rows
           if r["method"] == "source" and r.get("scan_check")}
    for method in SCAN_CHECKED[1:]:
        per_task: Dict[Tuple, Dict[str, list]] = {}
        kept = 0
        for r in rows:
            key = (r["head"], r["family"], r["seed"], r["volume"])
            if r["method"] != method or not r.get("scan_check") or key not in src:
                continue
            s = src[key]
            got = checked_pick({"source": s["scan_check"], "selected": r["scan_check"]})
            kept += got == "source"
            t = per_task.setdefault(key[:3], {"source": [], "plain": [], "checked": []})
            t["source"].append(s["surface_dice"])
            t["plain"].append(r["surface_dice"])
            t["checked"].append(s["surface_dice"] if got == "source" else r["surface_dice"])
        if not per_task:
            continue
        rows_out = []
        for task, t in sorted(per_task.items()):
            sv, pv, cv = (float(np.mean(t[x])) for x in ("source", "plain", "checked"))
            rows_out.append({"task": "/".join(map(str, task)), "source": sv, "selected": pv, "checked": cv})
        d_plain = [x["selected"] - x["source"] for x in rows_out]
        d_checked = [x["checked"] - x["source"] for x in rows_out]
        out[method] = {"tasks": rows_out, "n_tasks": len(rows_out), "scans": sum(len(t["source"]) for t in per_task.values()),
                       "kept_source": kept,
                       "selected_mean_delta": float(np.mean(d_plain)), "selected_below": sum(d < -0.005 for d in d_plain),
                       "selected_worst": float(min(d_plain)),
                       "checked_mean_delta": float(np.mean(d_checked)), "checked_below": sum(d < -0.005 for d in d_checked),
                       "checked_worst": float(min(d_checked))}
    return out


def per_task(rows: Sequence[dict], gets: Dict[str, Dict[str, object]]) -> list:
    """One row per (head, family, seed) task: mean surface Dice @ 1 mm over its test scans of the source model,
    AdaBN alone, the best trained epoch without selection, the selected result (and which candidate), what the
    per-scan check gives on top of it (``segment --adapter FILE``'s default) and deepbet."""
    checked = {t["task"]: t["checked"] for t in gets.get("convlora-adabn-fast", {}).get("tasks", [])}
    out = []
    for key in sorted({(r["head"], r["family"], r["seed"]) for r in rows}):
        task = "/".join(map(str, key))
        rs = [r for r in rows if (r["head"], r["family"], r["seed"]) == key]

        def mean(m):
            v = [r["surface_dice"] for r in rs if r["method"] == m]
            return float(np.mean(v)) if v else None
        picked = sorted({r.get("selected") for r in rs if r["method"] == "convlora-adabn-fast" and r.get("selected")})
        out.append({"task": task, "source": mean("source"), "adabn": mean("adabn"),
                    "trained": mean("convlora-adabn-fast-trained"), "selected": mean("convlora-adabn-fast"),
                    "picked": ", ".join(picked), "checked": checked.get(task), "deepbet": mean("deepbet")})
    return out


def summarise(rows: Sequence[dict]) -> Dict[str, object]:
    from ConvLoRASegLib.selection import spearman

    out: Dict[str, object] = {"methods": {}, "per_family": {}}
    methods = [m for m in RUN_METHODS if any(r["method"] == m for r in rows)]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        out["methods"][m] = {"n": len(rs), "surface_dice": float(np.mean([r["surface_dice"] for r in rs])),
                             "dice": float(np.mean([r["dice"] for r in rs]))}
    for fam in FAMILIES:
        out["per_family"][fam] = {
            m: float(np.mean([r["surface_dice"] for r in rows if r["method"] == m and r["family"] == fam]))
            for m in methods if any(r["method"] == m and r["family"] == fam for r in rows)}
    # the goal: selected >= source - 0.005 surface Dice on every (head, family, seed)
    out["user_gets"] = user_gets(rows)
    out["per_task"] = per_task(rows, out["user_gets"])
    out["tasks"] = [{"task": t["task"], "source": t["source"], "selected": t["selected"],
                     "delta": t["selected"] - t["source"]}
                    for t in out["per_task"] if t["source"] is not None and t["selected"] is not None]
    out["worst_delta"] = min((w["delta"] for w in out["tasks"]), default=None)
    lf = [r for r in rows if r["method"].startswith("cand:")]
    out["spearman_pooled"] = spearman([r["label_free"] for r in lf], [r["surface_dice"] for r in lf])
    per_vol = []
    for vol in sorted({r["volume"] for r in lf}):
        vs = [r for r in lf if r["volume"] == vol]
        if len(vs) >= 3:
            per_vol.append(spearman([r["label_free"] for r in vs], [r["surface_dice"] for r in vs]))
    per_vol = [v for v in per_vol if np.isfinite(v)]
    out["spearman_within_volume_mean"] = float(np.mean(per_vol)) if per_vol else None
    out["n_pairs"] = len(lf)
    out["spearman_tta_pooled"] = spearman([r["tta"] for r in lf], [r["surface_dice"] for r in lf])
    within = [spearman([r["tta"] for r in lf if r["volume"] == v], [r["surface_dice"] for r in lf if r["volume"] == v])
              for v in sorted({r["volume"] for r in lf})]
    within = [w for w in within if np.isfinite(w)]
    out["spearman_tta_within"] = float(np.mean(within)) if within else None
    combined = [0.5 * (r["label_free"] + r["tta"]) for r in lf]
    out["spearman_combined_pooled"] = spearman(combined, [r["surface_dice"] for r in lf])
    out["per_scan"] = per_scan_selection(lf)
    return out


def markdown(summary: Dict[str, object]) -> str:
    """The tables of BENCHMARKS.md: surface Dice @ 1 mm per family and method, the worst task, the Spearman."""
    fams = [f for f in FAMILIES if summary["per_family"].get(f)]
    methods = [m for m in RUN_METHODS if m in summary["methods"]]
    lines = ["| method | " + " | ".join(fams) + " | mean SD@1mm | mean Dice | n |",
             "|---|" + "---|" * (len(fams) + 3)]
    for m in methods:
        cells = [f"{summary['per_family'][f][m]:.3f}" if m in summary["per_family"][f] else "-" for f in fams]
        mm = summary["methods"][m]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {mm['surface_dice']:.3f} | {mm['dice']:.4f} | {mm['n']} |")
    lines.append("")
    lines.append("| task (head/family/seed) | source | selected | selected - source |")
    lines.append("|---|---|---|---|")
    for t in summary["tasks"]:
        lines.append(f"| {t['task']} | {t['source']:.3f} | {t['selected']:.3f} | {t['delta']:+.3f} |")
    lines.append("")
    lines.append(f"Spearman (label-free score vs true surface Dice, every candidate x test volume, n = "
                 f"{summary['n_pairs']}): pooled {summary['spearman_pooled']:.3f}, within a volume (mean) "
                 f"{summary['spearman_within_volume_mean']:.3f}; the gamma-consistency alternative: pooled "
                 f"{summary.get('spearman_tta_pooled', float('nan')):.3f}, within {summary.get('spearman_tta_within', float('nan')):.3f}")
    lines.append("")
    if summary.get("user_gets"):
        lines.append("| what a user gets, per task (mean of its test scans) | tasks | mean SD - source | tasks below "
                     "source - 0.005 | worst | scans where the check kept the source |")
        lines.append("|---|---|---|---|---|---|")
        for m, v in summary["user_gets"].items():
            name = "adabn alone (no selection)" if m == "adabn" else f"{m}, selected"  # shifts' adabn: adabn_volumes
            lines.append(f"| {name} | {v['n_tasks']} | {v['selected_mean_delta']:+.4f} | {v['selected_below']} | "
                         f"{v['selected_worst']:+.4f} | - |")
            lines.append(f"| {name} + per-scan check | {v['n_tasks']} | {v['checked_mean_delta']:+.4f} | "
                         f"{v['checked_below']} | {v['checked_worst']:+.4f} | {v['kept_source']} of {v['scans']} |")
        lines.append("")
    if summary.get("per_task"):
        def cell(v, src=None):
            if v is None:
                return "-"
            return f"{v:.3f}" if src is None else f"{v:.3f} ({v - src:+.3f})"
        lines.append("| task (head/family/seed) | source | AdaBN alone | best epoch, no selection | selected (as `adapt` "
                     "runs) | picked | + per-scan check (what a user gets) | deepbet |")
        lines.append("|---|---:|---:|---:|---:|---|---:|---:|")
        for t in summary["per_task"]:
            src = t["source"]
            lines.append(f"| {t['task']} | {cell(src)} | {cell(t['adabn'])} | {cell(t['trained'])} | "
                         f"{cell(t['selected'], src)} | {t['picked'] or '-'} | {cell(t['checked'], src)} | {cell(t['deepbet'])} |")
        lines.append("")
    lines.append("| per-scan choice (label-free, on the scan) | scans | mean SD - source | worst SD - source | picks |")
    lines.append("|---|---|---|---|---|")
    for rule, v in summary.get("per_scan", {}).items():
        if v["n"]:
            lines.append(f"| {rule} | {v['n']} | {v['mean_delta']:+.4f} | {v['worst_delta']:+.4f} | {v['picks']} |")
    return "\n".join(lines) + "\n"


def cmd_run(a: argparse.Namespace) -> int:
    from table1 import RowCache  # bench/: the same JSON-lines row cache as Table 1

    rows = RowCache(a.work / "rows.jsonl")
    if a.cmd == "run":
        methods = a.methods or list(RUN_METHODS)
        for seed in a.seeds:
            for family in a.families:
                for head in a.heads:
                    run_task(head, family, seed, a.models, a.work, rows, methods)
    if not rows.rows:
        raise SystemExit(f"no result rows in {a.work / 'rows.jsonl'}: run `shifts.py run` first")
    summary = summarise(list(rows.rows.values()))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "shifts.json").write_text(json.dumps({"summary": summary, "rows": list(rows.rows.values())},
                                                  indent=1))
    (a.out / "shifts.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("make", "run", "report"):
        p = sub.add_parser(name)
        p.add_argument("--work", type=Path, default=Path("/tmp/convlora-shifts"))
        if name == "report":  # the tables of every row cached so far (runs of several processes), nothing computed
            p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "shifts")
            continue
        p.add_argument("--heads", nargs="+", default=["colin27", "mni152_nlin6asym"])
        p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
        p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
        if name == "run":
            p.add_argument("--models", type=Path, required=True, help="folder with loho_<head>.safetensors")
            p.add_argument("--methods", nargs="+", default=None)
            p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "shifts")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.cmd == "make":
        return cmd_make(a)
    return cmd_run(a)


if __name__ == "__main__":
    sys.exit(main())
