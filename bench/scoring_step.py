"""Does scoring the candidates on every other slice (``selection.SCORE_SLICE_STEP`` = 2) choose as well as scoring
every slice? Compares two runs of the same benchmark on the same source models (training is deterministic: the same
candidates), one made before the change and one after:

    python bench/scoring_step.py shifts OLD/shifts.json NEW/shifts.json [--out F.json]
    python bench/scoring_step.py table1 OLD/table1_volumes.csv NEW/table1_volumes.csv [--out F.json]

``shifts``: per task (head, family, seed) of ``convlora-adabn-fast`` the candidates' label-free scores (Spearman
pooled and within a task, largest difference), the selected candidate and its surface Dice on the test volumes,
against the source model's. ``table1``: per adaptation (site, held-out head, seed) of ``convlora-adabn-fast`` the
selected candidate and surface Dice. Rows are matched by task; tasks in one run only are left out and counted.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHOD = "convlora-adabn-fast"
#: A selected result this far below the source model counts as "worse" (issue 10's goal).
WORSE = 0.005


def _shift_tasks(path: Path) -> Dict[Tuple, dict]:
    """(head, family, seed) -> {"candidates": {name: score}, "selected": name, "sd": mean surface Dice of the
    selected model on the test volumes, "source": the source model's}."""
    rows = json.loads(path.read_text())["rows"]
    out: Dict[Tuple, dict] = {}
    for r in rows:
        task = (r["head"], r["family"], r["seed"])
        if r["method"] == METHOD:
            t = out.setdefault(task, {"sd": [], "source": []})
            t["candidates"], t["selected"] = r["candidates"], r["selected"]
            t["sd"].append(r["surface_dice"])
    for r in rows:
        task = (r["head"], r["family"], r["seed"])
        if r["method"] == "source" and task in out:
            out[task]["source"].append(r["surface_dice"])
    return {k: {**v, "sd": float(np.mean(v["sd"])), "source": float(np.mean(v["source"])) if v["source"] else None}
            for k, v in out.items()}


def _table1_tasks(path: Path) -> Dict[Tuple, dict]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    source = {(r["site"], r["rotation"], r["volume"]): float(r["surface_dice"]) for r in rows if r["method"] == "source"}
    out: Dict[Tuple, dict] = {}
    for r in rows:
        if r["method"] == METHOD:
            out[(r["site"], r["rotation"], r["seed"], r["volume"])] = {
                "selected": r["selected"], "sd": float(r["surface_dice"]),
                "source": source.get((r["site"], r["rotation"], r["volume"]))}
    return out


def compare(old: Dict[Tuple, dict], new: Dict[Tuple, dict]) -> Dict[str, object]:
    from ConvLoRASegLib.selection import spearman

    both = sorted(set(old) & set(new))
    per_task: List[dict] = []
    pooled_old, pooled_new, within, diffs = [], [], [], []
    for k in both:
        o, n = old[k], new[k]
        row = {"task": "/".join(str(x) for x in k), "old_pick": o["selected"], "new_pick": n["selected"],
               "old_sd": round(o["sd"], 4), "new_sd": round(n["sd"], 4),
               "source": None if o["source"] is None else round(o["source"], 4)}
        if "candidates" in o and "candidates" in n:
            names = [c for c in o["candidates"] if c in n["candidates"]]
            a, b = [o["candidates"][c] for c in names], [n["candidates"][c] for c in names]
            pooled_old += a
            pooled_new += b
            within.append(spearman(a, b))
            diffs += [abs(x - y) for x, y in zip(a, b)]
            row["rank_within"] = round(within[-1], 3)
        per_task.append(row)

    def worse(key: str) -> int:
        return sum(1 for r in per_task if r["source"] is not None and r[key] < r["source"] - WORSE)

    has_source = [r for r in per_task if r["source"] is not None]
    out: Dict[str, object] = {
        "tasks": len(both), "only_old": len(set(old) - set(new)), "only_new": len(set(new) - set(old)),
        "same_pick": sum(r["old_pick"] == r["new_pick"] for r in per_task),
        "mean_sd_old": float(np.mean([r["old_sd"] for r in per_task])) if per_task else None,
        "mean_sd_new": float(np.mean([r["new_sd"] for r in per_task])) if per_task else None,
        "mean_minus_source_old": float(np.mean([r["old_sd"] - r["source"] for r in has_source])) if has_source else None,
        "mean_minus_source_new": float(np.mean([r["new_sd"] - r["source"] for r in has_source])) if has_source else None,
        "worse_than_source_old": worse("old_sd"), "worse_than_source_new": worse("new_sd"),
        "per_task": per_task}
    if pooled_old:
        out.update(score_spearman_pooled=spearman(pooled_old, pooled_new),
                   score_spearman_within_mean=float(np.nanmean(within)),
                   score_abs_diff_mean=float(np.mean(diffs)), score_abs_diff_max=float(np.max(diffs)))
    return out


def main(argv: Sequence[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("shifts", "table1"))
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    load = _shift_tasks if a.kind == "shifts" else _table1_tasks
    res = compare(load(a.old), load(a.new))
    text = json.dumps(res, indent=1)
    if a.out:
        a.out.write_text(text + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "per_task"}, indent=1))
    for r in res["per_task"]:
        if r["old_pick"] != r["new_pick"]:
            print("changed:", r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
