"""Cohorts and sites mapped onto Dask: one task per case (segment) or per site (adapt).

The same per-case code runs in-process (``convlora-seg segment`` without ``--workers``) and on a Dask cluster:
:class:`~ConvLoRASegLib.batch.Segmenter` (:mod:`.batch`, the cohort run) holds the model and its adapters,
:meth:`~ConvLoRASegLib.batch.Segmenter.run` reads one volume, segments it, scores it (:mod:`.qc`), writes the mask
atomically and returns the case's manifest row; any failure of that case (bad file, out of memory) becomes a
``failed: reason`` row and the others go on. :func:`run_on_dask` (or :func:`dask_runner`) is the ``runner`` a
:func:`~ConvLoRASegLib.batch.segment_cohort` takes.

On a cluster (``--workers N``: a ``LocalCluster`` of N processes; ``--scheduler ADDRESS|FILE``: any running
one, e.g. from ``dask-jobqueue``) a worker plugin (:class:`SegmenterPlugin`) loads the model once per worker
and sets its torch threads so that the workers do not oversubscribe the cores; GPU workers take one device each.
A worker that dies takes its task with it; the scheduler retries the task once elsewhere (``allowed-failures``
= 1 on the clusters made here), a second death makes it a failed row. Temporary files a killed worker leaves are
removed at the end. dask and distributed (``pip install ConvLoRASegLib[cluster]``) are imported only here and
only when a cluster is asked for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .batch import CaseJob, Segmenter, SegmentSettings, adapt_cohort, csv_rows, failed_case, run_in_process
from .errors import ConvLoRASegError

#: Name the worker plugin is registered under.
PLUGIN_NAME = "convloraseg-segmenter"
#: Topic of the progress events adaptations on workers send to the client.
PROGRESS_TOPIC = "convloraseg-progress"
#: How many times a task may lose its worker and be started again (the scheduler's ``allowed-failures``).
WORKER_DEATHS_RETRIED = 1

Row = Dict[str, Any]
PathLike = Union[str, Path]

# the per-case pieces live in .batch; they are named here too, for scripts that map cases themselves
__all__ = ["CaseJob", "Segmenter", "SegmentSettings", "run_in_process", "SiteJob", "adapt_site",
           "adapt_sites", "adapt_sites_on_dask", "dask_client", "dask_runner", "remove_partials", "run_on_dask", "site_cohorts", "site_jobs",
           "PLUGIN_NAME", "PROGRESS_TOPIC", "WORKER_DEATHS_RETRIED"]


# ---------------------------------------------------------------------------------------------------------------
# Dask: clusters, the worker plugin, tasks
# ---------------------------------------------------------------------------------------------------------------
def _distributed():
    try:
        import distributed
    except ImportError:
        raise ConvLoRASegError("--workers and --scheduler need Dask: pip install 'ConvLoRASegLib[cluster]' "
                               "(dask and distributed)") from None
    return distributed


def _make_plugin_class():
    from distributed.diagnostics.plugin import WorkerPlugin

    class SegmenterPlugin(WorkerPlugin):
        """Loads the model once when a worker starts (or when registered) and sets its torch threads."""

        def __init__(self, settings: SegmentSettings):
            self.settings = settings
            self.segmenter: Optional[Segmenter] = None

        def setup(self, worker):
            import torch

            threads = self.settings.torch_threads
            if threads is None:
                threads = max(1, (os.cpu_count() or 1) // max(1, int(getattr(worker.state, "nthreads", 1))))
            torch.set_num_threads(threads)
            settings = self.settings
            if settings.device in ("auto", "cuda") and torch.cuda.device_count() > 1:
                settings = replace(settings, device=f"cuda:{_worker_number(worker) % torch.cuda.device_count()}")
            self.segmenter = Segmenter(settings)

    SegmenterPlugin.__module__ = __name__
    SegmenterPlugin.__qualname__ = "SegmenterPlugin"
    return SegmenterPlugin


def __getattr__(name: str):
    # the plugin class subclasses distributed's WorkerPlugin, so it exists only once distributed is imported;
    # defined here on first use it pickles by reference (ConvLoRASegLib.cluster.SegmenterPlugin) like any class
    if name == "SegmenterPlugin":
        _distributed()
        cls = _make_plugin_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _worker_number(worker) -> int:
    try:
        return int(worker.name)
    except (TypeError, ValueError):
        return abs(hash(str(worker.name)))


def _segment_task(job: CaseJob) -> Row:
    from distributed import get_worker

    worker = get_worker()
    plugin = worker.plugins[PLUGIN_NAME]
    row = plugin.segmenter.run(job)
    row["worker"] = str(worker.name)
    return row


def _worker_load_seconds(dask_worker) -> Optional[float]:
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    return None if plugin is None or plugin.segmenter is None else plugin.segmenter.load_seconds


@contextlib.contextmanager
def dask_client(workers: Optional[int] = None, scheduler: Optional[str] = None,
                threads_per_worker: int = 1) -> Iterator[Any]:
    """A ``distributed.Client``: on a new ``LocalCluster`` of ``workers`` processes (each ``threads_per_worker``
    task threads, torch threads = cores / workers), or on the running cluster at ``scheduler`` (an address such
    as ``tcp://host:8786``, or a scheduler file). Closed (and the local cluster shut down) on exit."""
    distributed = _distributed()
    import dask

    cluster = None
    if scheduler:
        if Path(scheduler).expanduser().is_file():
            client = distributed.Client(scheduler_file=str(Path(scheduler).expanduser()), timeout="30s")
        else:
            try:
                client = distributed.Client(scheduler, timeout="30s")
            except (OSError, TimeoutError, ValueError) as exc:
                raise ConvLoRASegError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
    else:
        if workers is None or workers < 1:
            raise ConvLoRASegError(f"--workers must be at least 1, got {workers}")
        per_worker = str(max(1, (os.cpu_count() or 1) // workers))
        env = {"OMP_NUM_THREADS": per_worker, "MKL_NUM_THREADS": per_worker}
        with dask.config.set({"distributed.scheduler.allowed-failures": WORKER_DEATHS_RETRIED}):
            cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker,
                                               processes=True, dashboard_address=None,
                                               silence_logs=logging.CRITICAL, env=env)
        client = distributed.Client(cluster)
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.close(timeout=10)
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close(timeout=10)


def remove_partials(outputs: Sequence[str]) -> int:
    """Remove the temporary files (:func:`~ConvLoRASegLib.atomic.atomic_output`) of these outputs that a killed
    process left behind; returns how many."""
    removed = 0
    for folder, stems in _by_folder(outputs).items():
        if not folder.is_dir():
            continue
        for p in folder.glob(".*.partial*"):
            if any(p.name.startswith(f".{stem}.") for stem in stems):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed += 1
    return removed


def _by_folder(outputs: Sequence[str]) -> Dict[Path, List[str]]:
    groups: Dict[Path, List[str]] = {}
    for o in outputs:
        p = Path(o)
        groups.setdefault(p.parent, []).append(p.stem)
    return groups


def run_on_dask(client, settings: SegmentSettings, jobs: Sequence[CaseJob], on_row: Callable[[Row], None],
                ) -> Tuple[List[Row], Dict[str, Optional[float]]]:
    """Every job as one task on ``client``'s cluster; ``on_row`` gets each row as it finishes (in the order the
    cases finish). Returns the rows in input order and each worker's model-loading seconds."""
    distributed = _distributed()
    plugin_cls = __getattr__("SegmenterPlugin") if "SegmenterPlugin" not in globals() else globals()["SegmenterPlugin"]
    outputs = [j.output for j in jobs]
    rows: Dict[int, Row] = {}
    try:
        client.register_plugin(plugin_cls(settings), name=PLUGIN_NAME)
        load_seconds = client.run(_worker_load_seconds)
        token = f"{os.getpid()}-{time.time_ns()}"
        started = time.time() - 1.0  # file times may be rounded to the second
        futures = {}
        for i, job in enumerate(jobs):
            fut = client.submit(_segment_task, replace(job, run_started=started),
                                key=f"convloraseg-segment-{token}-{i}", pure=False,
                                priority=len(jobs) - i)
            futures[fut] = i
        for fut in distributed.as_completed(list(futures)):
            i = futures[fut]
            try:
                row = fut.result()
            except distributed.KilledWorker:
                row = failed_case(jobs[i], ConvLoRASegError(
                    f"its worker died {WORKER_DEATHS_RETRIED + 1} times running it (out of memory?)"), 0.0)
            except Exception as exc:  # noqa: BLE001 - a bug on a worker still must not stop the cohort
                row = failed_case(jobs[i], ConvLoRASegError(f"{type(exc).__name__}: {exc}"), 0.0)
            rows[i] = row
            on_row(row)
    finally:
        remove_partials(outputs)
    return [rows[i] for i in sorted(rows)], load_seconds



def dask_runner(workers: Optional[int] = None, scheduler: Optional[str] = None):
    """A ``runner`` for :func:`~ConvLoRASegLib.batch.segment_cohort`: the cases as tasks on a new local cluster of
    ``workers`` processes or on the running cluster at ``scheduler`` (:func:`dask_client`)."""
    def run(settings: SegmentSettings, jobs: Sequence[CaseJob], on_row: Callable[[Row], None]) -> None:
        with dask_client(workers=workers, scheduler=scheduler) as client:
            run_on_dask(client, settings, jobs, on_row)

    return run

# ---------------------------------------------------------------------------------------------------------------
# several sites: one adaptation each
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteJob:
    """One site's adaptation: its volumes and where its adapter goes."""

    site: str
    paths: Tuple[str, ...]
    dest: str
    model: str
    device: str = "auto"
    kwargs: Dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    torch_threads: Optional[int] = None


def site_cohorts(spec: str) -> Dict[str, List[Path]]:
    """Site -> volumes, from a CSV with columns ``site,path`` (path: a file, folder or glob; relative to the
    CSV) or from a folder holding one sub-folder of volumes per site."""
    from .cohorts import find_volumes

    src = Path(spec).expanduser()
    sites: Dict[str, List[Path]] = {}
    if src.is_dir():
        for sub in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
            sites[sub.name] = find_volumes([sub])
        if not sites:
            raise ConvLoRASegError(f"--sites {src}: no site folders in it (one sub-folder of volumes per site)")
        return sites
    if not src.is_file():
        raise ConvLoRASegError(f"--sites: no such file or folder: {src}")
    rows = csv_rows(src, "--sites", ("site", "path"))
    try:
        for row in rows:
            if not row.get("site") or not row.get("path"):
                continue
            p = Path(row["path"]).expanduser()
            p = p if p.is_absolute() else src.parent / p
            sites.setdefault(row["site"], []).extend(find_volumes([str(p)]))
    except OSError as exc:
        raise ConvLoRASegError(f"cannot read --sites {src}: {exc}") from None
    if not sites:
        raise ConvLoRASegError(f"--sites {src.name}: no rows")
    return {k: list(dict.fromkeys(v)) for k, v in sites.items()}


def adapt_site(job: SiteJob, progress: Optional[Callable[[dict], None]] = None) -> Dict[str, Any]:
    """Read one site's volumes, adapt (the public :func:`~ConvLoRASegLib.selftrain.adapt`), save its adapter."""
    import torch

    from .store import load_model

    if job.torch_threads:
        torch.set_num_threads(job.torch_threads)
    run = adapt_cohort(load_model(Path(job.model)), job.paths, job.dest, job.site, device=job.device,
                       overwrite=job.overwrite, progress=progress, what=f"site {job.site}",
                       details={"site": job.site}, **job.kwargs)
    return {"site": job.site, "adapter": run.info.to_dict(), "n_volumes": len(run.used),
            "n_skipped": len(run.skipped), "skipped": run.skipped, "score_before": run.result.agreement[0],
            "score_after": run.result.best_agreement, "seconds": round(run.result.seconds, 1)}


def site_jobs(sites: PathLike, model: PathLike, adapters_dir: Optional[PathLike] = None, device: str = "auto",
              kwargs: Optional[Dict[str, Any]] = None, overwrite: bool = False) -> List[SiteJob]:
    """One adaptation job per site of ``sites`` (:func:`site_cohorts`), its adapter stored under the site's name in
    the store at ``adapters_dir`` (default: the user store); every destination is checked before any site starts."""
    from .atomic import check_output_path
    from .store import AdapterStore, check_adapter_name, read_model_metadata

    sha = read_model_metadata(model)["weights_sha256"]
    cohorts = site_cohorts(str(sites))
    store = AdapterStore(adapters_dir)
    jobs = []
    for site, paths in cohorts.items():
        dest = store.path_for(sha, check_adapter_name(site))
        dest.parent.mkdir(parents=True, exist_ok=True)
        check_output_path(dest, overwrite)
        jobs.append(SiteJob(site=site, paths=tuple(str(p) for p in paths), dest=str(dest), model=str(model),
                            device=device, kwargs=dict(kwargs or {}), overwrite=overwrite))
    return jobs


def adapt_sites(jobs: Sequence[SiteJob], progress: Callable[[dict], None],
                on_result: Callable[[Dict[str, Any]], None], workers: Optional[int] = None,
                scheduler: Optional[str] = None) -> None:
    """Every site's adaptation: in this process one after the other, or (``workers``/``scheduler``) as tasks on a
    Dask cluster. ``on_result`` gets each site's result, or ``{"site", "failed": reason}``; progress events carry
    ``site``."""
    if workers or scheduler:
        with dask_client(workers=workers, scheduler=scheduler) as client:
            adapt_sites_on_dask(client, jobs, progress, on_result)
        return
    for job in jobs:
        try:
            res = adapt_site(job, lambda e, _s=job.site: progress({**e, "site": _s}))
        except ConvLoRASegError as exc:
            res = {"site": job.site, "failed": str(exc)}
        on_result(res)


def _adapt_task(job: SiteJob) -> Dict[str, Any]:
    from distributed import get_worker

    worker = get_worker()

    def progress(event: Dict[str, Any]) -> None:
        worker.log_event(PROGRESS_TOPIC, {**event, "site": job.site})

    return adapt_site(job, progress)


def adapt_sites_on_dask(client, jobs: Sequence[SiteJob], progress: Callable[[dict], None],
                        on_result: Callable[[Dict[str, Any]], None]) -> List[Dict[str, Any]]:
    """One adaptation per site as tasks on ``client``'s cluster; progress events carry ``site``."""
    distributed = _distributed()
    client.subscribe_topic(PROGRESS_TOPIC, lambda event: progress(event[1]))
    futures = {client.submit(_adapt_task, job, pure=False, key=f"convloraseg-adapt-{job.site}-{time.time_ns()}"): job
               for job in jobs}
    results = []
    try:
        for fut in distributed.as_completed(list(futures)):
            job = futures[fut]
            try:
                res = fut.result()
            except ConvLoRASegError as exc:
                res = {"site": job.site, "failed": str(exc)}
            except distributed.KilledWorker:
                res = {"site": job.site, "failed": "its worker died twice (out of memory?)"}
            results.append(res)
            on_result(res)
    finally:
        with contextlib.suppress(Exception):
            client.unsubscribe_topic(PROGRESS_TOPIC)
        remove_partials([j.dest for j in jobs])
    return results
