"""bench/table1.py plumbing: a fake CC359 tree (real naming, tiny volumes) and a tiny model, end to end; the
aggregation over seeds; the semi-synthetic smoke mode on one real head when the shared heads are present."""

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]


def _load_table1():
    spec = importlib.util.spec_from_file_location("table1", ROOT / "bench" / "table1.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["table1"] = mod
    spec.loader.exec_module(mod)
    return mod


table1 = _load_table1()


def _tiny_model(path: Path) -> Path:
    """An untrained but saved (SHA-bound) model on a coarse grid: 8 mm voxels, 16 x 16 slices."""
    import torch

    from ConvLoRASegLib.grid import WorkingGrid
    from ConvLoRASegLib.model import ConvLoRASegModel
    from ConvLoRASegLib.store import save_model

    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = ConvLoRASegModel(grid=WorkingGrid(spacing_mm=8.0, slice_size=16), n_filters=4)
    save_model(model, path, overwrite=True)
    return path


def _fake_head(seed: int, scale: float) -> tuple:
    """A 28^3 volume (4 mm voxels): a bright ellipsoid 'brain' in a dimmer 'skull' shell, and its mask."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:28, :28, :28].astype(np.float32) - 13.5
    r = np.sqrt((z / 9) ** 2 + (y / 11) ** 2 + (x / 10) ** 2)
    brain = r < 1.0
    img = np.where(brain, 800.0, np.where(r < 1.25, 300.0, 0.0)) * scale + rng.normal(0, 20, brain.shape)
    out = []
    for a in (np.clip(img, 0, None).astype(np.int16), brain.astype(np.uint8)):
        im = sitk.GetImageFromArray(a)
        im.SetSpacing((4.0, 4.0, 4.0))
        out.append(im)
    return out


def _fake_cc359(root: Path) -> Path:
    """Official layout: Original/<Vendor_Field>/CCxxxx_<vendor>_<field>_<age>_<sex>.nii.gz, Silver-standard/..._ss."""
    subject = 1
    for folder, vendor, field, scale in (("GE_3", "ge", "3", 1.0), ("Philips_3", "philips", "3", 1.6)):
        for k in range(5):
            name = f"CC{subject:04d}_{vendor}_{field}_{50 + k}_{'MF'[k % 2]}"
            img, mask = _fake_head(subject, scale)
            for sub, im, suffix in (("Original", img, ""), ("Silver-standard", mask, "_ss")):
                (root / sub / folder).mkdir(parents=True, exist_ok=True)
                sitk.WriteImage(im, str(root / sub / folder / f"{name}{suffix}.nii.gz"))
            subject += 1
    return root


def _read_csv(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cc359_plumbing_end_to_end_and_resume(tmp_path):
    root = _fake_cc359(tmp_path / "CC359")
    work, out = tmp_path / "work", tmp_path / "results"
    _tiny_model(work / "cc359_ge3.safetensors")
    args = ["--cc359", str(root), "--work", str(work), "--out", str(out), "--no-robex", "--seeds", "0", "1",
            "--methods", "source", "convlora-adabn-fast", "oracle", "--epochs", "1",
            "--steps-per-epoch", "1", "--batch-size", "4", "--device", "cpu"]
    assert table1.main(args) == 0

    rows = _read_csv(out / "table1.csv")
    assert list(rows[0]) == list(table1.CSV_COLUMNS)
    assert {r["site"] for r in rows} == {"philips3"}  # the only target domain in the tree
    assert {(r["method"], r["seed"]) for r in rows} == {(m, s) for m in ("source", "convlora-adabn-fast", "oracle")
                                                        for s in ("0", "1")}
    by = {(r["method"], r["seed"]): r for r in rows}
    for r in rows:
        assert 0.0 <= float(r["surface_dice"]) <= 1.0 and 0.0 <= float(r["dice"]) <= 1.0
    assert int(by[("source", "0")]["trainable_params"]) == 0 and int(by[("source", "0")]["adapter_bytes"]) == 0
    lora, oracle = by[("convlora-adabn-fast", "0")], by[("oracle", "0")]
    assert 0 < int(lora["trainable_params"]) < int(oracle["trainable_params"])
    assert 0 < int(lora["adapter_bytes"]) < int(oracle["adapter_bytes"])
    assert by[("source", "0")]["surface_dice"] == by[("source", "1")]["surface_dice"]  # seedless: repeated

    from ConvLoRASegLib.cohorts import cc359_cases, split_cases

    train, _, test = split_cases([c for c in cc359_cases(root) if c.domain == "philips3"], seed=0)
    volumes = _read_csv(out / "table1_volumes.csv")
    assert {r["volume"] for r in volumes} == {c.subject for c in test}  # evaluation: the test split only
    meta = json.loads((out / "table1.json").read_text())
    assert meta["tasks"][0]["adapt"] == [c.subject for c in train] and not set(meta["tasks"][0]["adapt"]) & {
        c.subject for c in test}
    md = (out / "table1.md").read_text()
    assert "Surface Dice at 1 mm" in md and "| convlora-adabn-fast |" in md
    assert meta["tasks"][0]["site"] == "philips3"
    # every candidate of every adaptation is scored against the labels beside its label-free score
    rank = meta["label_free_ranking"]
    assert rank["runs"] == 2 * len(test) and rank["pairs"] == 3 * rank["runs"]  # source, adabn, epoch 1
    assert "label-free score vs true surface Dice" in md
    cached_rows = [json.loads(line) for line in (work / "table1" / "rows.jsonl").read_text().splitlines()]
    adapted = [r for r in cached_rows if r["method"] == "convlora-adabn-fast"]
    for r in adapted:
        assert set(r["candidates"]) == {"source", "adabn", "epoch 1"}
        assert r["candidates"][r["selected"]]["surface_dice"] == pytest.approx(r["surface_dice"], abs=1e-4)
        src = [x for x in cached_rows if x["method"] == "source" and x["volume"] == r["volume"]][0]
        assert r["candidates"]["source"]["surface_dice"] == pytest.approx(src["surface_dice"], abs=1e-4)

    # a rerun with the same settings reads every row from the cache and adapts nothing
    cache = work / "table1" / "rows.jsonl"
    n_lines = len(cache.read_text().splitlines())
    assert table1.main(args) == 0
    assert len(cache.read_text().splitlines()) == n_lines
    assert _read_csv(out / "table1.csv") == rows


def test_aggregate_means_over_rotations_and_repeats_seedless_methods():
    rows = [{"site": "ge15", "rotation": h, "volume": h, "method": m, "seed": s, "surface_dice": v, "dice": v,
             "trainable_params": p, "adapter_bytes": p, "adapt_seconds": 1.0}
            for h, v0 in (("a", 0.6), ("b", 0.8))
            for m, s, v, p in (("source", -1, v0, 0), ("udas", 0, v0 + 0.1, 10), ("udas", 1, v0 + 0.2, 10))]
    table = table1.aggregate(rows, seeds=(0, 1))
    got = {(r["method"], r["seed"]): r["surface_dice"] for r in table}
    assert got == {("source", 0): 0.7, ("source", 1): 0.7, ("udas", 0): 0.8, ("udas", 1): 0.9}
    s = table1.summarise(table, "surface_dice")
    assert s["udas"]["ge15"] == pytest.approx((0.85, 0.05))
    assert s["source"]["mean"] == pytest.approx((0.7, 0.0))


def test_ranking_of_the_label_free_score():
    def row(sel, lf, sd):
        return {"selected": sel, "candidates": {n: {"label_free": a, "surface_dice": b}
                                                for n, a, b in zip(("source", "adabn", "epoch 1"), lf, sd)}}

    rank = table1.ranking([row("epoch 1", (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)),
                           row("adabn", (0.3, 0.2, 0.1), (0.6, 0.5, 0.4)), {"method": "source"}])
    assert rank["runs"] == 2 and rank["pairs"] == 6
    assert rank["spearman_within_run_mean"] == pytest.approx(1.0)
    assert rank["selected_worse_than_source"] == 1  # the second run chose 0.5 over the source's 0.6


def _head(shift: int = 0):
    """A synthetic T1-like head on a 2 mm grid: grey-matter ball (0.45) in CSF (0.1), a dark skull shell (0.05)
    and bright scalp (0.8); and the ball's mask grown or shrunk by ``shift`` voxels."""
    z, y, x = np.mgrid[:40, :40, :40]
    r = np.sqrt((z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2)
    img = np.select([r < 10, r < 12, r < 14, r < 17], [0.45, 0.1, 0.05, 0.8], 0.0).astype(np.float32)
    return img, (r < 10 + shift).astype(np.float32)


def test_boundary_contrast_peaks_at_the_true_boundary():
    img, truth = _head()
    right = table1.boundary_contrast(truth, img)
    assert right > 0.3  # grey matter in, CSF out
    for shift in (-2, -1, 1, 2, 3):
        assert table1.boundary_contrast(_head(shift)[1], img) < right - 0.05
    assert np.isnan(table1.boundary_contrast(np.zeros_like(img), img))
    assert np.isnan(table1.boundary_contrast(np.ones_like(img), img))


def test_the_per_scan_check_keeps_the_source_where_it_scores_better_on_the_scan():
    def score(value, ml=1400.0):
        return {"value": value, "agreement": value, "consistency": value, "brain_ml": ml, "plausible": True}

    def row(sd_source, sd_selected, check):
        return {"selected": "adabn", "candidates": {"source": {"label_free": 0.5, "surface_dice": sd_source},
                                                    "adabn": {"label_free": 0.6, "surface_dice": sd_selected}},
                "scan_check": check}

    assert table1.checked_pick({"source": score(0.8), "selected": score(0.7)}) == "source"
    assert table1.checked_pick({"source": score(0.7), "selected": score(0.8)}) == "selected"
    assert table1.checked_pick({"source": score(0.7), "selected": score(0.8, ml=1000.0)}) == "source"  # shrank
    rank = table1.ranking([row(0.6, 0.5, {"source": score(0.8), "selected": score(0.7)}),   # check saves it
                           row(0.5, 0.7, {"source": score(0.7), "selected": score(0.8)})])  # check keeps the gain
    c = rank["scan_check"]
    assert rank["selected_worse_than_source"] == 1 and c["worse_than_source_checked"] == 0
    assert c["kept_source"] == 1 and c["mean_minus_source_checked"] == pytest.approx(0.1)
    assert c["mean_minus_source_selected"] == pytest.approx(0.05)


def test_synthetic_smoke_on_one_real_head(tmp_path, heads_dir):
    names = sorted(p.name for p in heads_dir.iterdir() if p.is_dir())
    if "colin27" not in names:
        pytest.skip("colin27 is not among the shared heads")
    work, out = tmp_path / "work", tmp_path / "results"
    _tiny_model(work / "loho_colin27.safetensors")
    args = ["--smoke", "--work", str(work), "--out", str(out), "--methods", "source", "adabn", "--device", "cpu"]
    assert table1.main(args) == 0
    rows = _read_csv(out / "table1_smoke.csv")
    assert {(r["site"], r["method"]) for r in rows} == {("philips3", "source"), ("philips3", "adabn")}
    assert all(0.0 <= float(r["surface_dice"]) <= 1.0 for r in rows)
    meta = json.loads((out / "table1_smoke.json").read_text())
    task = meta["tasks"][0]
    assert task["rotation"] == "colin27" and task["evaluate"] == ["colin27_s0_philips3"]
    assert task["adapt"] == ["colin27_s4_philips3"]  # another subject of the held-out head, never the evaluated one


def test_an_evaluation_volume_never_adapts(tmp_path):
    with pytest.raises(table1.ConvLoRASegError, match="overlap"):
        table1.main(["--smoke", "--work", str(tmp_path), "--out", str(tmp_path), "--adapt-subjects", "0"])


def test_deepbet_column_scores_like_ours_and_caches(tmp_path, monkeypatch):
    """The deepbet column: its native-grid mask scored as ours is, cached by file name (deepbet itself stubbed)."""
    import peers

    assert "deepbet" in table1.METHOD_COLUMNS and "deepbet" in table1.NO_ADAPTATION
    truth = np.zeros((8, 16, 16), bool)
    truth[2:6, 4:12, 4:12] = True
    calls = []

    def fake(path, threshold=0.5):
        calls.append(path)
        return truth.copy(), 1.5
    monkeypatch.setattr(peers, "deepbet_mask", fake)
    ev = table1.EvalVolume("v", tmp_path / "v.nii.gz", None, truth, (1.0, 1.0, 1.0))
    r = table1.deepbet_scores(ev, tmp_path / "deepbet")
    assert r["dice"] == 1.0 and r["surface_dice"] == 1.0 and r["seconds"] == 1.5
    assert table1.deepbet_scores(ev, tmp_path / "deepbet") == r and len(calls) == 1
