"""bench/shifts.py plumbing: the summary's goal check (selected vs source per task) and the Spearman tables."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
shifts = pytest.importorskip("shifts")


def _rows():
    rows = []
    for fam, (src, sel) in {"fov": (0.60, 0.59), "bias": (0.50, 0.58)}.items():
        for k, bump in ((0, 0.0), (1, 0.02)):
            base = {"head": "h", "family": fam, "seed": 0, "volume": f"h_{fam}_sub{k}", "dice": 0.95}
            rows.append({**base, "method": "source", "surface_dice": src + bump})
            rows.append({**base, "method": "convlora-adabn-fast", "surface_dice": sel + bump})
            for i, (name, sd) in enumerate((("source", src), ("adabn", src - 0.05), ("epoch 1", sel))):
                rows.append({**base, "method": f"cand:fast:{name}", "candidate": name, "surface_dice": sd + bump,
                             "label_free": 0.3 + sd, "tta": 0.9 - i * 0.1})
    return rows


def test_summary_checks_every_task_and_ranks():
    s = shifts.summarise(_rows())
    deltas = {t["task"]: round(t["delta"], 3) for t in s["tasks"]}
    assert deltas == {"h/bias/0": 0.08, "h/fov/0": -0.01}
    assert s["worst_delta"] == pytest.approx(-0.01)
    assert s["spearman_within_volume_mean"] == pytest.approx(1.0)  # the label-free score is the truth + 0.3
    assert s["n_pairs"] == 12
    md = shifts.markdown(s)
    assert "| h/fov/0 | 0.610 | 0.600 | -0.010 |" in md and "Spearman" in md
    assert np.isfinite(s["spearman_tta_pooled"])


def test_per_scan_choice_by_each_rule():
    s = shifts.summarise(_rows())["per_scan"]
    # agreement (= truth + 0.3 here) takes the best candidate of each scan; the consistency rule refuses every
    # candidate less consistent than the source (tta falls by 0.1 per candidate), so it keeps the source
    assert s["agreement"]["n"] == 4 and s["agreement"]["mean_delta"] == pytest.approx(0.04)
    assert s["agreement+consistency"]["picks"] == {"source": 4}


def _check(agreement, consistency, brain_ml=1400.0):
    return {"agreement": agreement, "consistency": consistency, "brain_ml": brain_ml, "plausible": True}


def test_what_a_user_gets_applies_the_per_scan_check_per_scan():
    # fov: the adapter is worse (0.59 vs 0.60) and scores worse on the scan -> the check keeps the source;
    # bias: better and scores better on sub0, but on sub1 its brain shrinks by 5 % -> refused there
    rows = _rows()
    for r in rows:
        if r["method"] == "source":
            r["scan_check"] = _check(0.8, 0.8)
        elif r["method"] == "convlora-adabn-fast":
            shrink = r["family"] == "bias" and r["volume"].endswith("sub1")
            better = r["family"] == "bias"
            r["scan_check"] = _check(0.9 if better else 0.7, 0.9 if better else 0.7, 1330.0 if shrink else 1400.0)
    got = shifts.summarise(rows)["user_gets"]["convlora-adabn-fast"]
    assert got["n_tasks"] == 2 and got["scans"] == 4 and got["kept_source"] == 3
    by_task = {t["task"]: t for t in got["tasks"]}
    assert by_task["h/fov/0"]["checked"] == pytest.approx(by_task["h/fov/0"]["source"])
    assert by_task["h/bias/0"]["checked"] == pytest.approx(np.mean([0.58, 0.52]))  # sub0 adapted, sub1 source
    assert got["selected_below"] == 1 and got["checked_below"] == 0
    assert got["checked_worst"] == pytest.approx(0.0)
    assert "selected + per-scan check" in shifts.markdown(shifts.summarise(rows))


def test_per_task_row_has_each_method_and_what_the_check_gives():
    rows = _rows()
    for r in rows:
        if r["method"] == "source":
            r["scan_check"] = _check(0.8, 0.8)
        elif r["method"] == "convlora-adabn-fast":
            r["selected"] = "epoch 1" if r["family"] == "bias" else "adabn"
            r["scan_check"] = _check(0.9, 0.9) if r["family"] == "bias" else _check(0.7, 0.7)
    rows += [{"head": "h", "family": f, "seed": 0, "volume": f"h_{f}_sub{k}", "method": m, "dice": 0.9,
              "surface_dice": v} for f in ("fov", "bias") for k in (0, 1)
             for m, v in (("adabn", 0.4), ("convlora-adabn-fast-trained", 0.7), ("deepbet", 0.8))]
    s = shifts.summarise(rows)
    t = {x["task"]: x for x in s["per_task"]}
    assert t["h/fov/0"]["picked"] == "adabn" and t["h/bias/0"]["picked"] == "epoch 1"
    assert t["h/fov/0"]["checked"] == pytest.approx(t["h/fov/0"]["source"])  # the check keeps the source
    assert t["h/bias/0"]["checked"] == pytest.approx(t["h/bias/0"]["selected"])  # and the adapter where it wins
    assert t["h/bias/0"]["adabn"] == pytest.approx(0.4) and t["h/bias/0"]["deepbet"] == pytest.approx(0.8)
    md = shifts.markdown(s)
    assert "| h/fov/0 | 0.610 | 0.400 | 0.700 | 0.600 (-0.010) | adabn | 0.610 (+0.000) | 0.800 |" in md


def test_deepbet_is_a_row_of_the_method_table_and_not_a_candidate():
    rows = _rows() + [{"head": "h", "family": f, "seed": 0, "volume": f"h_{f}_sub{k}", "method": "deepbet",
                       "dice": 0.97, "surface_dice": 0.8} for f in ("fov", "bias") for k in (0, 1)]
    s = shifts.summarise(rows)
    assert s["methods"]["deepbet"]["n"] == 4 and s["per_family"]["fov"]["deepbet"] == pytest.approx(0.8)
    assert s["n_pairs"] == 12  # the Spearman pairs are the adaptation's candidates only
    assert "| deepbet | 0.800 | 0.800 | 0.800 | 0.9700 | 4 |" in shifts.markdown(s)


def test_report_writes_the_tables_of_the_cached_rows_without_running(tmp_path):
    import json

    work = tmp_path / "work"
    with pytest.raises(SystemExit, match="no result rows"):
        shifts.main(["report", "--work", str(work), "--out", str(tmp_path / "out")])
    work.mkdir()
    (work / "rows.jsonl").write_text("".join(json.dumps({**r, "key": str(i)}) + "\n" for i, r in enumerate(_rows())))
    assert shifts.main(["report", "--work", str(work), "--out", str(tmp_path / "out")]) == 0
    assert "| h/fov/0 | 0.610 | 0.600 | -0.010 |" in (tmp_path / "out" / "shifts.md").read_text()
    assert len(json.loads((tmp_path / "out" / "shifts.json").read_text())["rows"]) == len(_rows())
