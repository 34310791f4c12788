"""Cohort throughput: ``convlora-seg segment`` in one process vs ``--workers 2`` (a Dask LocalCluster), side by
side in one run on the same cohort, plus each worker's model-loading cost and the cluster's start-up.

Cohort: the bundled demo heads as simulated scanner sites (``sites.simulate_site``), ``--n`` volumes.
Both CLI runs are real subprocesses (what a user types, Python start-up and model loading included); a third,
library-level run on one cluster separates start-up, model loading and steady-state throughput.
Writes ``bench/results/cohort/cohort.json`` and ``cohort.md`` (``--out`` names another folder).

    OMP_NUM_THREADS=1 python bench/cohort.py --n 12

SLURM (not run here): start workers as SLURM jobs with dask-jobqueue, then point ``--scheduler`` at them::

    pip install 'ConvLoRASegLib[cluster]' dask-jobqueue
    python - <<'EOF'
    from dask_jobqueue import SLURMCluster
    cluster = SLURMCluster(cores=4, processes=1, memory="8GB", walltime="02:00:00",
                           job_extra_directives=["--gres=gpu:1"])      # drop for CPU nodes
    cluster.scale(jobs=16)                                                # 16 workers, one GPU each
    cluster.scheduler.write_scheduler_file("scheduler.json")  # or print(cluster.scheduler_address)
    input("workers running; press Enter to stop them")
    EOF
    convlora-seg segment /data/cohort/ -o /data/masks/ --adapter auto --scheduler scheduler.json --qc /data/qc
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ConvLoRASegLib.sites import SITES, demo_heads, simulate_site  # noqa: E402


def make_cohort(folder: Path, n: int) -> None:
    heads = list(demo_heads().items())
    sites = list(SITES)
    for i in range(n):
        name, (img, mask) = heads[i % len(heads)]
        site = sites[(i // len(heads)) % len(sites)]
        image, _ = simulate_site(sitk.ReadImage(str(img)), sitk.ReadImage(str(mask)), site, seed=i)
        sitk.WriteImage(image, str(folder / f"{i:03d}_{name}_{site}.nii.gz"))


def cli_run(args, env) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ConvLoRASegLib", "segment", *args], env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"segment failed: {proc.stderr}")
    return seconds


def library_run(src: Path, out: Path, workers: int) -> dict:
    from ConvLoRASegLib.cli import output_paths
    from ConvLoRASegLib.cluster import CaseJob, SegmentSettings, dask_client, run_on_dask
    from ConvLoRASegLib.cohorts import find_volumes
    from ConvLoRASegLib.store import default_model_path

    inputs = find_volumes([src])
    mapping, _ = output_paths(inputs, out, False)
    out.mkdir()
    jobs = [CaseJob(input=str(p), output=str(mapping[p]), index=i) for i, p in enumerate(inputs)]
    t0 = time.perf_counter()
    with dask_client(workers=workers) as client:
        t1 = time.perf_counter()
        rows, load = run_on_dask(client, SegmentSettings(model=str(default_model_path()), device="cpu"), jobs,
                                 lambda r: None)
        t2 = time.perf_counter()
    return {"cluster_start_s": round(t1 - t0, 2), "run_s": round(t2 - t1, 2), "close_s": round(time.perf_counter() - t2, 2),
            "model_load_s_per_worker": {k: round(v, 3) for k, v in load.items()},
            "case_seconds_mean": round(sum(r["seconds"] for r in rows) / len(rows), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12, help="volumes in the cohort (default 12)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cohort"), help="folder for cohort.json/.md")
    args = ap.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        make_cohort(tmp / "in", args.n)
        single = cli_run([str(tmp / "in"), "-o", str(tmp / "single"), "--device", "cpu"], env)
        multi = cli_run([str(tmp / "in"), "-o", str(tmp / "multi"), "--device", "cpu", "--workers", str(args.workers)],
                        env)
        lib = library_run(tmp / "in", tmp / "lib", args.workers)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                                                            f"{platform.system()} {platform.release()}",
        "python": platform.python_version(), "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()], "n_volumes": args.n,
        "command_in_process": "convlora-seg segment IN -o OUT --device cpu",
        "command_workers": f"convlora-seg segment IN -o OUT --device cpu --workers {args.workers}",
        "in_process_s": round(single, 2), "workers_s": round(multi, 2),
        "in_process_volumes_per_hour": round(3600 * args.n / single), "workers_volumes_per_hour": round(3600 * args.n / multi),
        "speedup": round(single / multi, 2), "library_run_on_cluster": lib,
        "steady_state_volumes_per_hour": round(3600 * args.n / lib["run_s"]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cohort.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"# Cohort throughput ({result['date']}, {result['machine']})", "",
          f"{args.n} volumes (demo heads as simulated sites), default model, CPU; load average before "
          f"{result['load_average_before']}, after {result['load_average_after']}", "",
          "| run | wall time (s) | volumes / hour | ratio |", "|---|---|---|---|",
          f"| in-process | {single:.1f} | {result['in_process_volumes_per_hour']} | 1.00 |",
          f"| --workers {args.workers} | {multi:.1f} | {result['workers_volumes_per_hour']} | {result['speedup']:.2f} |",
          f"| --workers {args.workers}, steady state (cluster already up) | {lib['run_s']:.1f} | "
          f"{result['steady_state_volumes_per_hour']} | {single / lib['run_s']:.2f} |", "",
          f"cluster start-up {lib['cluster_start_s']} s, close {lib['close_s']} s; model loading per worker "
          f"{lib['model_load_s_per_worker']} s; mean seconds per case on a worker {lib['case_seconds_mean']}", ""]
    (out / "cohort.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
