"""Quality rows for every case (qc.py) and the cohort behaviour of ``segment`` in this process: a bad volume in
the middle, the manifest and its contract (``qc.load_manifest``), ``--qc`` pictures, ``--resume``,
``--adapter-map``, and ``adapt --sites`` (one adapter per site). No dask needed here (see test_cluster.py)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ConvLoRASegLib import qc
from test_cli import head_files, run_cli, synthetic_head, tiny_adapter, tiny_model  # noqa: F401 - fixtures

CONTRACT = ("input", "output", "adapter", "seconds", "brain_ml", "agreement", "flags")


# ---------------------------------------------------------------------------------------------------------------
# measures, flags, manifest
# ---------------------------------------------------------------------------------------------------------------
def test_brain_volume_and_field_of_view_contact():
    m = np.zeros((10, 20, 30), np.uint8)
    m[2:5, 3:6, 4:8] = 1  # 36 voxels inside, off every face
    spacing = (1.0, 2.0, 3.0)  # x, y, z mm: voxel 6 mm3
    assert qc.brain_ml(m, spacing) == pytest.approx(36 * 6 / 1000)
    assert qc.fov_contact_mm2(m, spacing, margin_mm=1.0) == 0.0
    m[0, 3:6, 4:8] = 1  # 12 voxels on the z = 0 face: each x*y = 2 mm2
    m[5, 3:6, 29] = 1  # 3 voxels on the last x face: each y*z = 6 mm2
    assert qc.fov_contact_mm2(m, spacing, margin_mm=1.0) == pytest.approx(12 * 2 + 3 * 6)
    one = np.zeros((10, 20, 30), np.uint8)
    one[5, 10, 25] = 1  # 5 mm from the last x face (x spacing 1 mm), far from the others
    assert qc.fov_contact_mm2(one, spacing, margin_mm=1.0) == 0.0
    assert qc.fov_contact_mm2(one, spacing, margin_mm=10.0) == pytest.approx(6.0)  # one y*z pixel


def test_flags_follow_the_named_thresholds(monkeypatch):
    lo, hi = qc.BRAIN_ML_RANGE
    ok = ((lo + hi) / 2, qc.LOW_AGREEMENT + 0.01, 0.0)
    assert qc.flags_for(*ok) == []
    assert qc.flags_for(ok[0], qc.LOW_AGREEMENT - 0.01, 0.0) == ["low_agreement"]
    assert qc.flags_for(lo - 1, ok[1], 0.0) == ["implausible_volume"]
    assert qc.flags_for(ok[0], ok[1], qc.FOV_CONTACT_MM2 + 1) == ["touches_field_of_view"]
    assert qc.flags_for(None, None, None) == []
    monkeypatch.setattr(qc, "LOW_AGREEMENT", 0.99)  # one named constant: re-derivable
    assert qc.flags_for(*ok) == ["low_agreement"]


def test_manifest_round_trip_worst_first(tmp_path):
    rows = [{"input": "/a/good.nii.gz", "output": "/o/good.nii.gz", "adapter": None, "status": "ok", "seconds": 1.0,
             "brain_ml": 1400.0, "agreement": 0.8, "fov_contact_mm2": 0.0, "warnings": [], "flags": []},
            {"input": "/a/low.nii.gz", "output": "/o/low.nii.gz", "adapter": "siteA", "status": "ok", "seconds": 1.0,
             "brain_ml": 1400.0, "agreement": 0.1, "fov_contact_mm2": 0.0, "warnings": [], "flags": ["low_agreement"]},
            qc.failed_row("/a/bad.nii.gz", "/o/bad.nii.gz", None, "not an image")]
    csv_path, json_path = qc.write_manifest(tmp_path, rows)
    loaded = qc.load_manifest(tmp_path)
    assert [Path(r["input"]).name for r in loaded] == ["bad.nii.gz", "low.nii.gz", "good.nii.gz"]
    for r in loaded:
        assert all(k in r for k in CONTRACT) and isinstance(r["flags"], list)
    assert loaded[0]["flags"] == ["failed: not an image"] and loaded[0]["agreement"] is None
    with csv_path.open() as f:
        table = list(csv.DictReader(f))
    assert [Path(r["input"]).name for r in table] == ["bad.nii.gz", "low.nii.gz", "good.nii.gz"]
    assert json.loads(json_path.read_text(encoding="utf-8"))["thresholds"]["low_agreement"] == qc.LOW_AGREEMENT
    assert not list(tmp_path.glob(".*partial*"))
    with pytest.raises(qc_error()):
        qc.load_manifest(tmp_path / "nowhere")


def qc_error():
    from ConvLoRASegLib.errors import ConvLoRASegError

    return ConvLoRASegError


# ---------------------------------------------------------------------------------------------------------------
# segment a cohort in this process
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def cohort(tmp_path, head_files):  # noqa: F811
    folder = tmp_path / "cohort"
    folder.mkdir()
    shutil.copy(head_files[0], folder / "a.nii.gz")
    (folder / "b_broken.nii.gz").write_text("not an image")  # in the middle (sorted by name)
    shutil.copy(head_files[1], folder / "c.nii.gz")
    return folder


def seg(model, src, out, *extra):
    return ("segment", src, "-o", out, "--model", model, "--device", "cpu", *extra)


def test_bad_case_in_the_middle_the_others_are_written(capsys, tiny_model, cohort, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, *seg(tiny_model, cohort, out))
    assert code == 2
    assert "skipped b_broken.nii.gz" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "convlora-seg: error: 1 of 3 volumes failed (see the warnings above); 2 written"
    assert sorted(p.name for p in out.iterdir()) == ["a_brainmask.nii.gz", "c_brainmask.nii.gz", "manifest.csv",
                                                     "manifest.json"]
    rows = qc.load_manifest(out)
    assert Path(rows[0]["input"]).name == "b_broken.nii.gz" and rows[0]["flags"][0].startswith("failed: ")
    assert "not an image file" in rows[0]["flags"][0]
    for r in rows[1:]:
        assert r["status"] == "ok" and Path(r["output"]).is_file() and 0.0 <= r["agreement"] <= 1.0
        assert r["brain_ml"] >= 0 and r["seconds"] >= 0 and isinstance(r["flags"], list)


def test_qc_pictures_and_index_worst_first(capsys, tiny_model, cohort, tmp_path):  # noqa: F811
    pytest.importorskip("matplotlib")
    out, report = tmp_path / "out", tmp_path / "report"
    code, _, err = run_cli(capsys, *seg(tiny_model, cohort, out, "--qc", report))
    assert code == 2, err
    assert sorted(p.name for p in report.iterdir()) == ["a.png", "c.png", "index.html"]
    assert (report / "a.png").read_bytes()[:4] == b"\x89PNG"
    page = (report / "index.html").read_text(encoding="utf-8")  # written as UTF-8 whatever the locale
    assert page.index("b_broken.nii.gz") < page.index("a.nii.gz")  # worst (failed) first
    assert "<img src='a.png'" in page
    assert all(r.get("qc_png") for r in qc.load_manifest(out) if r["status"] == "ok")


def test_resume_keeps_complete_outputs(capsys, tiny_model, head_files, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "segment", *head_files, "-o", out, "--model", tiny_model)
    assert code == 0, err
    kept = out / "head0_brainmask.nii.gz"
    stamp = kept.stat().st_mtime_ns
    (out / "head1_brainmask.nii.gz").unlink()
    refused = run_cli(capsys, "segment", *head_files, "-o", out, "--model", tiny_model)
    assert refused[0] == 2 and "--overwrite" in refused[2]
    code, stdout, err = run_cli(capsys, "segment", *head_files, "-o", out, "--model", tiny_model, "--resume")
    assert code == 0, err
    assert "1 of 2 outputs are complete and kept" in stdout
    assert kept.stat().st_mtime_ns == stamp and (out / "head1_brainmask.nii.gz").is_file()
    status = {Path(r["input"]).name: r["status"] for r in qc.load_manifest(out)}
    assert status == {"head0.nii.gz": "resumed", "head1.nii.gz": "ok"}
    assert next(r for r in qc.load_manifest(out) if r["status"] == "resumed")["agreement"] is not None


def test_adapter_map_per_input(capsys, tiny_model, tiny_adapter, head_files, tmp_path):  # noqa: F811
    table = tmp_path / "map.csv"
    table.write_text(f"input,adapter\n{head_files[0].name},{tiny_adapter}\nhead1,none\n")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "segment", *head_files, "-o", out, "--model", tiny_model, "--adapter-map", table,
                           "--no-scan-check")
    assert code == 0, err
    used = {Path(r["input"]).name: r["adapter"] for r in qc.load_manifest(out)}
    assert used == {"head0.nii.gz": "siteA", "head1.nii.gz": None}
    # with the per-scan check (the default) a mapped adapter file is checked too: this one scores as the source
    # model does (an AdaBN adapter that kept the source statistics), so head0 is segmented without it, and says so
    code, _, err = run_cli(capsys, "segment", *head_files, "-o", tmp_path / "checked", "--model", tiny_model,
                           "--adapter-map", table)
    assert code == 0, err
    used = {Path(r["input"]).name: r["adapter"] for r in qc.load_manifest(tmp_path / "checked")}
    assert used == {"head0.nii.gz": None, "head1.nii.gz": None}
    assert err.count("did not beat the unadapted model") == 1 and "head0.nii.gz" in err


@pytest.mark.slow
def test_adapt_several_sites_one_adapter_each(capsys, tiny_model, tmp_path):  # noqa: F811
    from test_cli import json_lines

    sites = tmp_path / "sites"
    for k, site in enumerate(("scannerA", "scannerB")):
        (sites / site).mkdir(parents=True)
        sitk.WriteImage(synthetic_head(seed=10 + k, scale=100.0 * (k + 1)), str(sites / site / "s.nii.gz"))
    store = tmp_path / "store"
    code, stdout, err = run_cli(capsys, "adapt", "--sites", sites, "--model", tiny_model, "--method", "adabn",
                                "--epochs", "0", "--adapters", store, "--json")
    assert code == 0, err
    events = json_lines(stdout)
    assert {e.get("site") for e in events if e["event"] == "progress"} == {"scannerA", "scannerB"}
    assert sorted(s["site"] for s in events[-1]["sites"]) == ["scannerA", "scannerB"]
    assert sorted(p.stem for p in store.rglob("*.safetensors")) == ["scannerA", "scannerB"]
    again = run_cli(capsys, "adapt", "--sites", sites, "--model", tiny_model, "--adapters", store)
    assert again[0] == 2 and "--overwrite" in again[2]  # refused before any site starts
    csv_sites = tmp_path / "sites.csv"
    csv_sites.write_text("site,path\nscannerC,sites/scannerA\n")
    code, _, err = run_cli(capsys, "adapt", "--sites", csv_sites, "--model", tiny_model, "--method", "adabn",
                           "--epochs", "0", "--adapters", store)
    assert code == 0, err
    assert "scannerC" in {p.stem for p in store.rglob("*.safetensors")}
    usage = run_cli(capsys, "adapt", "--model", tiny_model)
    assert usage[0] == 2 and "TARGET" in usage[2]
