"""Does one labelled scan of the target site stop the adapters that make masks worse? (pre-registered)

Seven label-free criteria could not tell, on the semi-synthetic Table 1, the adaptations that end below the source
model from those that gain (BENCHMARKS.md, "Answered once"). ``ConvLoRASegLib/labelled_check.py`` lets a site with one or
more trusted masks check an adaptation (``convlora-seg adapt --check IMAGE MASK``). This benchmark measures what that
buys on Table 1, and chooses the product's rule. Written down, with the adoption rule, before the first run:

* **Tasks**: Table 1's (5 target sites x 4 held-out heads, its full budget, the same leave-one-head-out models and
  cached cohorts); methods ``adabn`` and ``convlora-adabn-fast``, seeds 0 and 1 of the latter: the 60 adaptations
  where the per-scan check left 7 more than 0.005 below the source (2026-12-05).
* **Check scan**: subject 3 (a deformation no model or adaptation saw) of the *next* head in name order at the same
  target site, with its mask: never the evaluated head, so a failure tied to the evaluated head's anatomy or field of
  view (robex_atlas' neck) is not seen by the check. The conservative case.
* **Evaluation**: the held-out head's subject 0 as the user gets it (``segment --adapter``: the per-scan check against
  the unadapted model), surface Dice at 1 mm, against the source model on the same scan.
* **Rules** (``labelled_check.decide``): ``none`` (today: the label-free selection), ``veto`` and ``pick``.
* **Adoption**: ``adapt --check`` uses ``pick`` if it leaves no more results below source - 0.005 than ``veto`` and
  its mean gain over the source is at least ``veto``'s; else ``veto``. A rule "closes" never-worse on Table 1 only
  with 0 of 60 below source - 0.005.

    CONVLORASEG_THREADS=1 python bench/labelled_check.py --work W --models M [--seeds 0 1] [--rotations ...]

**Speed cohort** (``--speed-cohort W/full``, written down before its run, after the Table 1 result): the bundled model
adapted (``adapt`` defaults) on the 10-volume siemens3 cohort of ``bench/speed.py``, where the label-free selection and
the per-scan check lose 0.029 on the 4 held-out scans. Leave one out: each held-out scan in turn is the labelled check
scan (rule ``pick``, the adopted one) and the other three are evaluated as the user gets them; reported: the mean
over the 4 folds against the source and against the label-free selection.

Rows are cached in ``W/labelled_check/rows.jsonl`` (an interrupted run resumes); ``--out`` gets
``labelled_check.json`` and ``labelled_check.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import table1  # noqa: E402  (sets the paths and the thread count)

import numpy as np  # noqa: E402

RULES = ("none", "veto", "pick")
CHECK_SUBJECT = 3


def next_head(head: str, heads: Sequence[str]) -> str:
    """The check scan's head: the next one after ``head`` in name order (cyclic)."""
    order = sorted(heads)
    return order[(order.index(head) + 1) % len(order)]


def run_task(task, budget, seeds: Sequence[int], methods: Sequence[str], work: Path, cache: table1.RowCache,
             device) -> List[dict]:
    from make_cohort import make_site_cohort

    from ConvLoRASegLib.labelled_check import LabelledScan, decide, score_candidates
    from ConvLoRASegLib.selftrain import adapt, candidate_model
    from ConvLoRASegLib.store import load_model
    from ConvLoRASegLib.volumes import read_image, to_slices

    base = load_model(task.model_path)
    other = next_head(task.rotation, table1.table_heads())
    out = work / "table1" / "cohorts" / "sev1" / task.site
    check_image, check_mask = make_site_cohort(task.site, 1, [other], out, first_subject=CHECK_SUBJECT)[0]
    ev = task.evaluate[0]
    scans = {"check": LabelledScan(check_image.name, read_image(check_image), read_image(check_mask)),
             "eval": LabelledScan(ev.name, read_image(ev.image), read_image(ev.mask))}
    slices = [to_slices(read_image(v.image), base.grid).slices for v in task.adapt]
    rows = []
    for method in methods:
        algo, mode = table1.ADAPT_METHODS[method]
        for seed in ([-1] if method in table1.SEEDLESS else seeds):
            key = f"{task.site}|{task.rotation}|{method}|{seed}|{other}:{CHECK_SUBJECT}|{budget.key()}"
            hit = cache.get(key)
            if hit:
                rows.append(hit)
                continue
            t = time.perf_counter()
            res = adapt(base, slices, method=algo, mode=mode, epochs=budget.epochs, lr=budget.lr,
                        batch_size=budget.batch_size, seed=max(seed, 0), device=device,
                        selection_volumes=budget.selection_volumes, steps_per_epoch=budget.steps_per_epoch,
                        precision=budget.precision)
            names = ["source"] + [n for n in res.candidate_states if n != "source"]
            candidates = {n: candidate_model(base, res, n).to(device) for n in names}
            got = {k: score_candidates(candidates, s, device) for k, s in scans.items()}
            check_sd = {n: [v] for n, v in got["check"][0].items()}
            decided = {"none": res.selected, **{r: decide(check_sd, res.selected, r)[0] for r in ("veto", "pick")}}
            row = {"key": key, "site": task.site, "rotation": task.rotation, "method": method, "seed": seed,
                   "check_scan": check_image.name, "label_free": res.selected, "decided": decided,
                   "check_surface_dice": {n: round(v, 4) for n, v in got["check"][0].items()},
                   "eval_surface_dice": {n: round(v, 4) for n, v in got["eval"][0].items()},
                   "eval_unchecked": {n: round(v, 4) for n, v in got["eval"][2].items()},
                   "seconds": round(time.perf_counter() - t, 1)}
            cache.put(row)
            rows.append(row)
            e = row["eval_surface_dice"]
            print(f"  {task.site:9} {task.rotation:16} {method:20} seed {seed:2d}: source {e['source']:.4f}  "
                  + "  ".join(f"{r} {e[decided[r]]:.4f} ({decided[r]})" for r in RULES)
                  + f"  ({row['seconds']:.0f} s)", flush=True)
    return rows


def summarise(rows: Sequence[dict]) -> Dict[str, dict]:
    """Per rule: mean gain over the source on the evaluation scans, the worst, how many below source - 0.005."""
    out = {}
    for rule in RULES:
        diff = [r["eval_surface_dice"][r["decided"][rule]] - r["eval_surface_dice"]["source"] for r in rows]
        out[rule] = {"runs": len(diff), "mean_gain": round(float(np.mean(diff)), 4),
                     "worst": round(float(np.min(diff)), 4), "below": int(sum(d < -0.005 for d in diff)),
                     "kept_source": int(sum(r["decided"][rule] == "source" for r in rows))}
    return out


def adopted(summary: Dict[str, dict]) -> str:
    """The pre-registered adoption rule (module docstring)."""
    p, v = summary["pick"], summary["veto"]
    return "pick" if p["below"] <= v["below"] and p["mean_gain"] >= v["mean_gain"] else "veto"


def report(rows: Sequence[dict], out: Path) -> str:
    summary = summarise(rows)
    by_method = {m: summarise([r for r in rows if r["method"] == m]) for m in sorted({r["method"] for r in rows})}
    lines = ["| rule | runs | mean gain over source | worst | below source - 0.005 | kept the source |",
             "|---|---|---|---|---|---|"]
    for rule, s in summary.items():
        lines.append(f"| {rule} | {s['runs']} | {s['mean_gain']:+.4f} | {s['worst']:+.4f} | {s['below']} | "
                     f"{s['kept_source']} |")
    for m, per in by_method.items():
        lines.append(f"\n{m}: " + "; ".join(f"{r} {s['mean_gain']:+.4f} / {s['worst']:+.4f} / {s['below']} below"
                                            for r, s in per.items()))
    lines.append(f"\nadopted by the pre-registered rule: **{adopted(summary)}**")
    out.mkdir(parents=True, exist_ok=True)
    (out / "labelled_check.json").write_text(json.dumps({"summary": summary, "by_method": by_method,
                                                         "adopted": adopted(summary), "rows": list(rows)}, indent=1))
    text = "\n".join(lines) + "\n"
    (out / "labelled_check.md").write_text(text)
    return text


def speed_cohort(folder: Path, out: Path, site: str = "siemens3", n_volumes: int = 10) -> str:
    """The leave-one-out labelled check on the speed cohort (module docstring)."""
    from ConvLoRASegLib.labelled_check import LabelledScan, decide, score_candidates
    from ConvLoRASegLib.selftrain import adapt, candidate_model
    from ConvLoRASegLib.store import load_model
    from ConvLoRASegLib.volumes import read_image

    model = load_model()
    target = sorted((folder / f"cohort_{site}" / "images").glob("*.nii.gz"))[:n_volumes]
    held = sorted((folder / f"heldout_{site}" / "images").glob("*.nii.gz"))
    res = adapt(model, [to_slices_of(model, p) for p in target], device="cpu")
    names = ["source"] + [n for n in res.candidate_states if n != "source"]
    candidates = {n: candidate_model(model, res, n) for n in names}
    per_scan = {}
    for p in held:
        scan = LabelledScan(p.name, read_image(p), read_image(p.parent.parent / "masks" / p.name))
        per_scan[p.name] = score_candidates(candidates, scan, "cpu")[0]
        print(f"  {p.name}: " + ", ".join(f"{n} {v:.4f}" for n, v in per_scan[p.name].items()), flush=True)
    folds = []
    for check in per_scan:
        others = [s for s in per_scan if s != check]
        picked = decide({n: [per_scan[check][n]] for n in names}, res.selected, "pick")[0]
        mean = lambda n: float(np.mean([per_scan[s][n] for s in others]))  # noqa: E731
        folds.append({"check_scan": check, "picked": picked, "source": mean("source"),
                      "label_free": mean(res.selected), "checked": mean(picked)})
    summary = {k: round(float(np.mean([f[k] for f in folds])), 4) for k in ("source", "label_free", "checked")}
    text = "\n".join([f"speed cohort ({site}, {len(target)} volumes): label-free selection {res.selected}",
                      *(f"  check on {f['check_scan']}: picked {f['picked']}; others: source {f['source']:.4f}, "
                        f"label-free {f['label_free']:.4f}, checked {f['checked']:.4f}" for f in folds),
                      f"mean over folds: {summary}"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed_cohort.json").write_text(json.dumps({"label_free": res.selected, "per_scan": per_scan,
                                                       "folds": folds, "summary": summary}, indent=1))
    (out / "speed_cohort.md").write_text(text + "\n")
    return text


def to_slices_of(model, path: Path):
    from ConvLoRASegLib.volumes import read_image, to_slices

    return to_slices(read_image(path), model.grid).slices


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path)
    ap.add_argument("--models", type=Path)
    ap.add_argument("--out", type=Path, default=table1.ROOT / "bench" / "results" / "labelled_check")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--methods", nargs="+", default=["adabn", "convlora-adabn-fast"])
    ap.add_argument("--rotations", nargs="+", default=None)
    ap.add_argument("--sites", nargs="+", default=list(table1.TARGET_SITES))
    ap.add_argument("--report-only", action="store_true", help="summarise the cached rows only")
    ap.add_argument("--speed-cohort", type=Path, default=None, metavar="W/full",
                    help="instead: the leave-one-out check on bench/speed.py's prepared cohort folder")
    a = ap.parse_args(argv)
    if a.speed_cohort is not None:
        print(speed_cohort(a.speed_cohort, a.out))
        return 0
    if a.work is None or (a.models is None and not a.report_only):
        ap.error("--work and --models are needed (unless --speed-cohort)")
    cache = table1.RowCache(a.work / "labelled_check" / "rows.jsonl")
    if not a.report_only:
        from ConvLoRASegLib.segment import resolve_device

        full = table1.settings(table1.parse_args(["--work", str(a.work)]))
        budget = table1.Budget(epochs=full["epochs"], steps_per_epoch=full["steps_per_epoch"],
                               batch_size=full["batch_size"], seeds=tuple(a.seeds))
        tasks = table1.synthetic_tasks(a.sites, a.rotations or table1.table_heads(), full["eval_subjects"],
                                       full["adapt_subjects"], full["adapt_heads"], 1.0, a.models, a.work, False,
                                       table1.Timer())
        device = resolve_device("auto")
        for task in tasks:
            run_task(task, budget, a.seeds, a.methods, a.work, cache, device)
    print(report(list(cache.rows.values()), a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
