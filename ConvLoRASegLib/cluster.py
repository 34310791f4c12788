"""Cohorts and sites mapped onto Dask: one task per case (segment) or per site (adapt).

The same per-case code runs in-process (``convlora-seg segment`` without ``--workers``) and on a Dask cluster:
:class:`Segmenter` holds the model and its adapters, :meth:`Segmenter.run` reads one volume, segments it, scores
it (:mod:`.qc`), writes the mask atomically and returns the case's manifest row; any failure of that case (bad
file, out of memory) becomes a ``failed: reason`` row and the others go on.

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
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .errors import ConvLoRASegError

#: Name the worker plugin is registered under.
PLUGIN_NAME = "convloraseg-segmenter"
#: Topic of the progress events adaptations on workers send to the client.
PROGRESS_TOPIC = "convloraseg-progress"
#: How many times a task may lose its worker and be started again (the scheduler's ``allowed-failures``).
WORKER_DEATHS_RETRIED = 1

Row = Dict[str, Any]


@dataclass(frozen=True)
class SegmentSettings:
    """What every case of a ``segment`` run shares (sent once to each worker)."""

    model: str
    device: str = "auto"
    postprocess: bool = True
    probabilities: bool = False
    first_volume: bool = False
    overwrite: bool = False
    qc_dir: Optional[str] = None
    #: torch threads per worker process; None: the cores divided by the worker's task threads.
    torch_threads: Optional[int] = None


@dataclass(frozen=True)
class CaseJob:
    """One volume to segment: where from, where to, with which adapter.

    ``adapter``: an adapter file, or None for the source model; ``candidates`` (a list, possibly empty) means
    ``--adapter auto`` among these adapter files; ``check``: the adapter is used only if it beats the unadapted
    model on this scan (label-free, :func:`~ConvLoRASegLib.segment.choose_adapter`), else the case says so."""

    input: str
    output: str
    adapter: Optional[str] = None
    candidates: Optional[Tuple[str, ...]] = None
    check: bool = False
    index: int = 0
    total: int = 1
    #: when the run that submitted it started (epoch seconds): an output newer than this was written by this run
    #: (a worker that died after its write, before its answer), so a retry may replace it
    run_started: float = 0.0

    @property
    def adapter_label(self) -> Optional[str]:
        if self.candidates is not None:
            return "auto"
        return None if self.adapter is None else Path(self.adapter).stem


# ---------------------------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------------------------
class Segmenter:
    """The model (loaded once) and the per-case pipeline: read -> segment + score -> write -> manifest row."""

    def __init__(self, settings: SegmentSettings, model=None):
        from .segment import resolve_device
        from .store import load_model

        t0 = time.perf_counter()
        self.settings = settings
        self.model = model if model is not None else load_model(Path(settings.model))
        self.device = resolve_device(settings.device)
        self.load_seconds = time.perf_counter() - t0

    def read(self, job: CaseJob):
        """``(image, intensity warnings)``; header checks (memory) first. Raises ConvLoRASegError."""
        from .volumes import check_intensities, check_memory, image_info, read_image

        path = Path(job.input)
        check_memory(image_info(path), self.model.grid)
        image = read_image(path, first_volume=self.settings.first_volume)
        return image, check_intensities(image)

    def segment(self, job: CaseJob, image, warnings: Sequence[str], t0: Optional[float] = None,
                progress: Optional[Callable[[dict], None]] = None, log: Optional[Callable[[str], None]] = None,
                ) -> Row:
        """Segment a read volume, write its output atomically, return its manifest row."""
        from . import volumes
        from .qc import measure, overlay_png
        from .segment import activate_adapter, adapter_not_used, agreement, choose_adapter, predict_slices
        from .selection import SOURCE

        t0 = time.perf_counter() if t0 is None else t0
        s, model = self.settings, self.model
        vs = volumes.to_slices(image, model.grid)
        chosen, scores = job.adapter, {}
        warnings = list(warnings)
        predicted: Dict[str, Any] = {}
        choices = job.candidates if job.candidates is not None else (
            (job.adapter,) if job.check and job.adapter is not None else None)
        if choices is not None:
            chosen = None
            if choices:
                info, scores = choose_adapter(model, image, list(choices), self.device, working=vs,
                                              predictions=predicted)
                chosen = info
                if log is not None:
                    name = info.name if info is not None else "source model (no adapter)"
                    others = ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
                    log(f"{Path(job.input).name}: chose {name}, score "
                        f"{scores[SOURCE if info is None else info.name]:.3f} (scores: {others})")
                if job.candidates is None and info is None:
                    requested = next(k for k in scores if k != SOURCE)
                    warnings.append(adapter_not_used(requested, scores))
        info = activate_adapter(model, chosen)
        # one pass gives the final and the ESH probabilities: the mask and its label-free score (the scoring of the
        # candidates above already made that pass for the winner)
        final, early = predicted.get(SOURCE if info is None else info.name) or predict_slices(
            model, vs.slices, self.device, with_esh=True, progress=progress)
        score = agreement(final, early, model.grid.spacing_mm)
        mask = volumes.brain_mask(final, vs, 0.5, postprocess=s.postprocess)
        result = volumes.to_native(final, vs) if s.probabilities else mask
        out = Path(job.output)
        ours = bool(job.run_started) and out.is_file() and out.stat().st_mtime >= job.run_started
        dest = volumes.write_image(result, job.output, overwrite=s.overwrite or ours)
        row: Row = {"input": job.input, "output": str(dest), "adapter": None if info is None else info.name,
                    "status": "ok", "seconds": 0.0, "warnings": warnings, **measure(mask, score)}
        if scores:
            row["adapter_scores"] = {k: round(v, 4) for k, v in scores.items()}
        if s.qc_dir:
            try:
                png = overlay_png(image, mask, Path(s.qc_dir) / f"{_stem(job.input)}.png",
                                  title=f"{Path(job.input).name}  {', '.join(row['flags']) or 'no flags'}")
            except (OSError, ConvLoRASegError, ValueError, RuntimeError) as exc:  # a picture never fails a case
                row["warnings"].append(f"no QC picture: {exc}")
                png = None
            if png is not None:
                row["qc_png"] = str(png)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        return row

    def run(self, job: CaseJob, progress=None, log=None) -> Row:
        """:meth:`read` + :meth:`segment`; a failure of this case becomes a ``failed`` row."""
        t0 = time.perf_counter()
        try:
            image, warnings = self.read(job)
            return self.segment(job, image, warnings, t0, progress=progress, log=log)
        except Exception as exc:  # noqa: BLE001 - narrowed just below
            if not _is_case_failure(exc):
                raise
            return _failed(job, exc, time.perf_counter() - t0)


def _is_case_failure(exc: BaseException) -> bool:
    """Errors that belong to one case (its file, its size), not to the program."""
    from .segment import OutOfMemoryError

    return isinstance(exc, (ConvLoRASegError, MemoryError, OutOfMemoryError, OSError))


def _failed(job: CaseJob, exc: BaseException, seconds: float) -> Row:
    from .qc import failed_row

    if isinstance(exc, ConvLoRASegError):
        reason = str(exc)
    elif isinstance(exc, (MemoryError,)) or type(exc).__name__ == "OutOfMemoryError":
        reason = "out of memory"
    else:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    return failed_row(job.input, job.output, job.adapter_label, reason, seconds)


def _stem(path: str) -> str:
    from .cli import volume_stem

    return volume_stem(Path(path))


def run_in_process(segmenter: Segmenter, jobs: Sequence[CaseJob], on_row: Callable[[Row], None],
                   progress: Optional[Callable[[dict], None]] = None, log=None) -> List[Row]:
    """Every job in this process, in order, the next volume read in a background thread while one is segmented."""
    from .cli import prefetched

    rows: List[Row] = []

    def load(job: CaseJob):
        t0 = time.perf_counter()
        try:
            return segmenter.read(job), None, t0
        except Exception as exc:  # noqa: BLE001
            if not _is_case_failure(exc):
                raise
            return None, exc, t0

    for job, loaded, _ in prefetched(list(jobs), load):
        (read, error, t0) = loaded
        if error is not None:
            row = _failed(job, error, time.perf_counter() - t0)
        else:
            def case_progress(event: Dict[str, Any], _job: CaseJob = job) -> None:
                if progress is not None:
                    progress({**event, "volume": _job.index + 1, "volumes": _job.total})
            try:
                row = segmenter.segment(job, *read, progress=case_progress, log=log)
            except Exception as exc:  # noqa: BLE001
                if not _is_case_failure(exc):
                    raise
                row = _failed(job, exc, time.perf_counter() - t0)
        rows.append(row)
        on_row(row)
    return rows


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
                row = _failed(jobs[i], ConvLoRASegError(
                    f"its worker died {WORKER_DEATHS_RETRIED + 1} times running it (out of memory?)"), 0.0)
            except Exception as exc:  # noqa: BLE001 - a bug on a worker still must not stop the cohort
                row = _failed(jobs[i], ConvLoRASegError(f"{type(exc).__name__}: {exc}"), 0.0)
            rows[i] = row
            on_row(row)
    finally:
        remove_partials(outputs)
    return [rows[i] for i in sorted(rows)], load_seconds


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
    import csv

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
    try:
        with src.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip().lower() for c in (reader.fieldnames or [])]
            if "site" not in fields or "path" not in fields:
                raise ConvLoRASegError(f"--sites {src.name}: a CSV needs the columns site,path")
            for line in reader:
                row = {k.strip().lower(): (v or "").strip() for k, v in line.items() if k}
                if not row.get("site") or not row.get("path"):
                    continue
                p = Path(row["path"]).expanduser()
                p = p if p.is_absolute() else src.parent / p
                sites.setdefault(row["site"], []).extend(find_volumes([str(p)]))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConvLoRASegError(f"cannot read --sites {src}: {exc}") from None
    if not sites:
        raise ConvLoRASegError(f"--sites {src.name}: no rows")
    return {k: list(dict.fromkeys(v)) for k, v in sites.items()}


def adapt_site(job: SiteJob, progress: Optional[Callable[[dict], None]] = None) -> Dict[str, Any]:
    """Read one site's volumes, adapt (the public :func:`~ConvLoRASegLib.selftrain.adapt`), save its adapter."""
    import torch

    from .segment import resolve_device
    from .selftrain import adapt
    from .store import load_model, save_adapter
    from .volumes import to_slices

    if job.torch_threads:
        torch.set_num_threads(job.torch_threads)
    report = progress or (lambda e: None)
    model = load_model(Path(job.model))
    stacks, used, skipped = [], [], []
    for i, p in enumerate(job.paths):
        report({"event": "progress", "stage": "read", "step": i + 1, "total": len(job.paths)})
        try:
            from .volumes import check_memory, image_info, read_image

            check_memory(image_info(p), model.grid)
            stacks.append(to_slices(read_image(p), model.grid).slices)
            used.append(p)
        except ConvLoRASegError as exc:
            skipped.append({"input": p, "message": str(exc)})
    if not stacks:
        raise ConvLoRASegError(f"site {job.site}: no readable volumes ({len(skipped)} skipped)")
    result = adapt(model, stacks, device=resolve_device(job.device), progress=report, **job.kwargs)
    report({"event": "progress", "stage": "save", "step": 0, "total": 1})
    details = {**result.summary(), "site": job.site,
               "target": {"n_volumes": len(used), "files": [Path(p).name for p in used],
                          "skipped": [Path(s["input"]).name for s in skipped]}}
    info = save_adapter(model, result.state, job.dest, name=job.site, method=result.method, mode=result.mode,
                        rank=result.rank, alpha=result.alpha, placement=result.placement, details=details,
                        overwrite=job.overwrite)
    report({"event": "progress", "stage": "save", "step": 1, "total": 1})
    return {"site": job.site, "adapter": info.to_dict(), "n_volumes": len(used), "n_skipped": len(skipped),
            "skipped": skipped, "agreement_before": result.agreement[0], "agreement_after": result.best_agreement,
            "seconds": round(result.seconds, 1)}


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
