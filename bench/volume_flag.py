"""Would a warning on the brain-volume change have told the user where the per-scan check let a worse adapter
through? (issue 10: "when in doubt the product says so"). Analysis only: the product does not warn on this yet.

    python bench/volume_flag.py --table1 W/table1/rows.jsonl --shifts S/rows.jsonl

The rule was written down (commit of this file) after Table 1's seed 0 of 2026-12-05 had shown three adaptations
that the check let through while worse, and *before* seed 1 was run (the shift rows existed; of them only colin27/scanner's candidate volumes on its
scoring volumes had been read, where the trained epochs grew the brain by 27-42 % and were right to):

    flag a scan where the check uses the adapter and the adapted mask's brain volume differs from the unadapted
    model's by more than :data:`MAX_CHANGE` (10 %) either way.

Why 10 %: a scanner changes measured brain volume by a few percent, not by a tenth; a larger change means the
adapter changed *what* is labelled (scalp, neck, a collapsed source mask), which only a look can judge.
For each benchmark: scans where the check used the adapter, how many of those were worse than the source by more
than 0.005 surface Dice (the failures), and how many failures and non-failures the flag marks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Iterable, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MAX_CHANGE = 0.10


def flagged(source: dict, adapted: dict) -> bool:
    """The rule: the adapted mask's brain volume differs from the source model's by more than MAX_CHANGE."""
    return source["brain_ml"] > 0 and abs(adapted["brain_ml"] / source["brain_ml"] - 1.0) > MAX_CHANGE


def tally(cases: Iterable[tuple]) -> Dict[str, object]:
    """cases: (label, source surface Dice, adapted surface Dice, source check scores, adapted check scores)."""
    from table1 import checked_pick

    out = {"used": 0, "failures": 0, "failures_flagged": 0, "others_flagged": 0, "flagged_failures": []}
    for label, sd_src, sd_ad, check_src, check_ad in cases:
        if checked_pick({"source": check_src, "selected": check_ad}) == "source":
            continue  # the check kept the unadapted model: nothing to warn about
        out["used"] += 1
        fail, flag = sd_ad < sd_src - 0.005, flagged(check_src, check_ad)
        out["failures"] += fail
        out["failures_flagged"] += fail and flag
        out["others_flagged"] += flag and not fail
        if fail:
            out["flagged_failures"].append(f"{label} {sd_ad - sd_src:+.3f} volume "
                                           f"{check_ad['brain_ml'] / check_src['brain_ml'] - 1:+.1%}"
                                           f"{' FLAGGED' if flag else ''}")
    return out


def _rows(path: Path) -> List[dict]:
    from table1 import RowCache  # the row cache both benchmarks write

    return list(RowCache(path).rows.values())


def table1_cases(path: Path) -> List[tuple]:
    rows = _rows(path)
    out = []
    for r in rows:
        c = r.get("candidates") or {}
        if r.get("scan_check") and "source" in c and r.get("selected") in c:
            label = f"{r.get('site')}/{r.get('rotation')}/{r['method']}/seed {r.get('seed')}"
            out.append((label, c["source"]["surface_dice"], c[r["selected"]]["surface_dice"],
                        r["scan_check"]["source"], r["scan_check"]["selected"]))
    return out


def shifts_cases(path: Path, method: str = "convlora-adabn-fast") -> List[tuple]:
    rows = _rows(path)
    src = {(r["head"], r["family"], r["seed"], r["volume"]): r for r in rows
           if r["method"] == "source" and r.get("scan_check")}
    out = []
    for r in rows:
        key = (r["head"], r["family"], r["seed"], r["volume"])
        if r["method"] == method and r.get("scan_check") and key in src:
            out.append(("/".join(map(str, key)), src[key]["surface_dice"], r["surface_dice"],
                        src[key]["scan_check"], r["scan_check"]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table1", type=Path, help="Table 1's row cache (<work>/table1/rows.jsonl)")
    ap.add_argument("--shifts", type=Path, help="shifts.py's row cache (<work>/rows.jsonl)")
    a = ap.parse_args(argv)
    if a.table1:
        print("Table 1:", json.dumps(tally(table1_cases(a.table1)), indent=1))
    if a.shifts:
        print("shifts:", json.dumps(tally(shifts_cases(a.shifts)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
