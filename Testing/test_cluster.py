"""``segment`` and ``adapt --sites`` on a real Dask LocalCluster of 2 worker processes: voxel for voxel the
in-process result, a bad case in the middle, a worker killed mid-run (its task is retried once), ``--resume``,
and SIGTERM leaving no partial file. One cluster (made by the library's own ``cluster.dask_client``) serves the
tests that pass ``--scheduler ADDRESS``; the cancel test starts ``--workers 2`` in a real subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("distributed")
pytestmark = pytest.mark.slow  # a real Dask cluster of worker processes: end to end

from ConvLoRASegLib import cluster, qc  # noqa: E402
from test_cli import json_lines, run_cli, subprocess_env, synthetic_head, tiny_model  # noqa: E402,F401


@pytest.fixture(scope="module")
def client():
    with cluster.dask_client(workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Five small heads with an unreadable file in the middle (names sort: c_broken is third)."""
    folder = tmp_path_factory.mktemp("cohort")
    for k, name in enumerate(("a", "b", "d", "e", "f")):
        sitk.WriteImage(synthetic_head(seed=20 + k, shape=(48, 56, 52), spacing=(2.5, 2.5, 2.5)),
                        str(folder / f"{name}.nii.gz"))
    (folder / "c_broken.nii.gz").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, cohort):  # noqa: F811
    """The in-process result of the cohort."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert cluster_cli(tiny_model, cohort, out) == 2
    return out


def cluster_cli(model, src, out, *extra) -> int:
    from ConvLoRASegLib import cli

    return cli.main([str(a) for a in ("segment", src, "-o", out, "--model", model, "--device", "cpu", *extra)])


def arrays(folder: Path):
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*_brainmask.nii.gz"))}


def no_partials(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".partial" in p.name]


def test_cluster_equals_in_process_with_a_bad_case(capsys, client, tiny_model, cohort, reference, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    code = cluster_cli(tiny_model, cohort, out, "--scheduler", client.scheduler.address)
    err = capsys.readouterr().err
    assert code == 2 and "skipped c_broken.nii.gz" in err
    assert err.strip().splitlines()[-1].endswith("1 of 6 volumes failed (see the warnings above); 5 written")
    ref, got = arrays(reference), arrays(out)
    assert sorted(got) == sorted(ref) and len(got) == 5
    for name in ref:
        assert np.array_equal(ref[name], got[name]), name  # voxel for voxel
    rows, ref_rows = qc.load_manifest(out), qc.load_manifest(reference)
    assert [r["input"] for r in rows] == [r["input"] for r in ref_rows]
    assert [r["agreement"] for r in rows] == [r["agreement"] for r in ref_rows]
    assert rows[0]["status"] == "failed" and {r.get("worker") for r in rows[1:]} <= {"0", "1"}
    assert no_partials(out)


def test_resume_on_the_cluster(capsys, client, tiny_model, cohort, reference, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "e_brainmask.nii.gz").unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*_brainmask.nii.gz")}
    code = cluster_cli(tiny_model, cohort, out, "--scheduler", client.scheduler.address, "--resume")
    assert code == 2  # the broken file is still broken
    assert "4 of 6 outputs are complete and kept" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*_brainmask.nii.gz") if p.name in stamps} == stamps
    assert np.array_equal(arrays(out)["e_brainmask.nii.gz"], arrays(reference)["e_brainmask.nii.gz"])
    status = sorted(r["status"] for r in qc.load_manifest(out))
    assert status == ["failed", "ok", "resumed", "resumed", "resumed", "resumed"]


def test_model_is_loaded_once_per_worker(client, tiny_model, cohort, tmp_path):  # noqa: F811
    settings = cluster.SegmentSettings(model=str(tiny_model), device="cpu")
    jobs = [cluster.CaseJob(input=str(p), output=str(tmp_path / f"{p.name}"), index=i)
            for i, p in enumerate(sorted(cohort.glob("[abd].nii.gz")))]
    rows, load_seconds = cluster.run_on_dask(client, settings, jobs, lambda r: None)
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert len(load_seconds) == 2 and all(s is not None and s >= 0 for s in load_seconds.values())
    ids = client.run(lambda dask_worker: id(dask_worker.plugins[cluster.PLUGIN_NAME].segmenter.model))
    rows, _ = cluster.run_on_dask(client, settings, [cluster.CaseJob(input=j.input, output=j.output + "2.nii.gz")
                                                     for j in jobs], lambda r: None)
    # registering again replaces the plugin (a new run may bring a new model): one load per worker per run
    assert all(r["status"] == "ok" for r in rows) and len(ids) == 2


def test_adapt_sites_on_the_cluster(capsys, client, tiny_model, tmp_path):  # noqa: F811
    from ConvLoRASegLib import cli

    sites = tmp_path / "sites"
    for k, site in enumerate(("north", "south")):
        (sites / site).mkdir(parents=True)
        sitk.WriteImage(synthetic_head(seed=30 + k, scale=150.0 * (k + 1)), str(sites / site / "s.nii.gz"))
    store = tmp_path / "store"
    code = cli.main(["adapt", "--sites", str(sites), "--model", str(tiny_model), "--method", "adabn", "--epochs",
                     "0", "--adapters", str(store), "--scheduler", client.scheduler.address, "--device", "cpu",
                     "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(p.stem for p in store.rglob("*.safetensors")) == ["north", "south"]
    done = json_lines(out)[-1]
    assert done["event"] == "done" and sorted(s["site"] for s in done["sites"]) == ["north", "south"]


def test_a_killed_worker_loses_its_task_and_it_is_retried(client, tiny_model, cohort, reference, tmp_path):  # noqa: F811
    # last in this module: the nanny restarts the worker, the cluster is not the same afterwards
    settings = cluster.SegmentSettings(model=str(tiny_model), device="cpu")
    names = ["a", "b", "d", "e", "f"] * 2
    jobs = [cluster.CaseJob(input=str(cohort / f"{n}.nii.gz"), output=str(tmp_path / f"{n}{i}_brainmask.nii.gz"),
                            index=i) for i, n in enumerate(names)]
    pids = client.run(os.getpid)
    killed = []

    def on_row(row):
        if killed:
            return
        for addr, tasks in client.processing().items():
            if tasks and addr in pids:
                os.kill(pids[addr], signal.SIGKILL)
                killed.append(addr)
                return

    rows, _ = cluster.run_on_dask(client, settings, jobs, on_row)
    assert killed, "no worker was busy to be killed"
    assert [r["status"] for r in rows] == ["ok"] * len(jobs), [r.get("flags") for r in rows]  # the lost one retried
    ref = arrays(reference)
    for job, name in zip(jobs, names):
        got = sitk.GetArrayFromImage(sitk.ReadImage(job.output))
        assert np.array_equal(got, ref[f"{name}_brainmask.nii.gz"])
    assert no_partials(tmp_path)


def test_sigterm_on_workers_leaves_no_partial_file(tiny_model, tmp_path):  # noqa: F811
    src = tmp_path / "in"
    src.mkdir()
    for k in range(6):  # 1 mm grids: slow enough to be interrupted in the middle
        sitk.WriteImage(synthetic_head(seed=k, shape=(110, 120, 115), spacing=(1.0, 1.0, 1.0)), str(src / f"h{k}.nii.gz"))
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    out = tmp_path / "out"
    env = subprocess_env(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "ConvLoRASegLib", "segment", str(src), "-o", str(out), "--model",
                             str(tiny_model), "--workers", "2", "--device", "cpu", "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    for line in proc.stdout:
        if '"stage": "cohort"' in line:
            break
        assert time.time() - t0 < 50, "no case finished"
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=40)
    assert proc.returncode == 130, err
    assert '{"event": "cancelled"}' in rest
    assert no_partials(out)
    masks = list(out.glob("*_brainmask.nii.gz"))
    assert 1 <= len(masks) < 6
    for m in masks:  # what is there is complete
        assert sitk.ReadImage(str(m)).GetSize() == (115, 120, 110)
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before
