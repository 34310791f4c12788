"""One cohort run: inputs -> outputs, the next volume read while one is segmented, one manifest row per case.

:func:`segment_cohort` is the entry point the command line (``convlora-seg segment``) and the Slicer module's
folder run call; :mod:`.cluster` maps the same per-case function (:meth:`Segmenter.run`) on Dask. A run:

1. finds the volumes (files, folders, globs, DICOM folders) and maps each to its output
   (:func:`output_paths`: a file for one input, else ``OUT/<stem>_brainmask.nii.gz``);
2. with ``resume``, keeps the outputs that are complete (and their old manifest rows);
3. refuses existing outputs (unless ``overwrite``) and unwritable folders, resolves every adapter spec once
   (``adapter`` for all inputs, or per input from an ``adapter_map`` CSV) -- all before any heavy work;
4. segments every case: read -> segment + label-free score -> write atomically -> a manifest row
   (:mod:`.qc`); a case that fails (bad file, out of memory) becomes a ``failed`` row and the others go on;
5. writes ``manifest.csv``/``manifest.json`` (an output folder) and the QC pages (``qc_dir``).

The other cohort work lives here too: a site's adaptation from its readable volumes to its adapter file
(:func:`adapt_cohort`; :mod:`.cluster` runs one per site on Dask), the labelled cases of a training run
(:func:`read_training_cohort`), and evaluation (:func:`evaluate_cohort`).
"""

from __future__ import annotations

import contextlib
import csv
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

from .cohorts import MASK_SUFFIXES, cc359_cases, find_volumes, folder_cohort, volume_stem
from .constants import SOURCE
from .errors import ConvLoRASegError

PathLike = Union[str, Path]
Row = Dict[str, Any]
Progress = Optional[Callable[[dict], None]]
Log = Optional[Callable[[str], None]]
T = TypeVar("T")
R = TypeVar("R")

#: Name endings of the files a cohort run writes into an output folder.
MASK_SUFFIX, PROB_SUFFIX = "_brainmask.nii.gz", "_brainprob.nii.gz"
#: Endings that make ``OUT`` an output file rather than a folder (one input).
_OUTPUT_FILE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")


# ---------------------------------------------------------------------------------------------------------------
# reading volumes: one reader, the next volume in a background thread
# ---------------------------------------------------------------------------------------------------------------
def load_volume(path: PathLike, grid, first_volume: bool = False):
    """``(image, intensity warnings)`` of one volume; the header is checked first (memory on ``grid``).
    Raises ConvLoRASegError."""
    from .volumes import check_intensities, check_memory, image_info, read_image

    check_memory(image_info(path), grid)
    image = read_image(path, first_volume=first_volume)
    return image, check_intensities(image)


def read_case(path: PathLike, grid, first_volume: bool = False):
    """:func:`load_volume` and the volume on ``grid`` (:func:`~ConvLoRASegLib.volumes.to_slices`): everything a
    case needs before the network, ``(image, intensity warnings, working slices)``. Raises ConvLoRASegError."""
    from .volumes import to_slices

    image, warnings = load_volume(path, grid, first_volume)
    return image, warnings, to_slices(image, grid)


def _timed_read_case(path: PathLike, grid, first_volume: bool) -> Tuple[Any, Optional[BaseException], float]:
    """``(read_case(...), None, start)``, or ``(None, the exception, start)``: the caller decides what it means."""
    t0 = time.perf_counter()
    try:
        return read_case(path, grid, first_volume), None, t0
    except Exception as exc:  # noqa: BLE001 - handed to the caller, which re-raises what is not a case failure
        return None, exc, t0


#: Name of the thread :func:`read_ahead` starts.
READ_AHEAD_THREAD = "convloraseg-read-ahead"


@dataclass
class ReadAhead:
    """A case read and prepared (:func:`read_case`) in a background thread for ``grid``, started before the model
    was loaded: :func:`run_in_process` takes it for its first case when the path, grid and options match."""

    path: str
    grid: Any
    first_volume: bool
    future: "Future[Tuple[Any, Optional[BaseException], float]]"

    def matches(self, path: str, grid, first_volume: bool) -> bool:
        return self.path == str(path) and self.grid == grid and self.first_volume == first_volume


def read_ahead(path: PathLike, model: Union[PathLike, Any, None], first_volume: bool = False) -> Optional[ReadAhead]:
    """Start :func:`read_case` of ``path`` in a background thread before torch is imported: reading, decompressing
    and resampling release the GIL, so they run beside the imports and the model's loading (about a second of
    a one-volume command). The grid is the one the model file records (:func:`~ConvLoRASegLib.grid.recorded_grid`);
    None when it cannot be known so cheaply (the run then reads as usual)."""
    from .constants import DEFAULT_MODEL_FILE
    from .grid import recorded_grid

    if model is None or isinstance(model, (str, os.PathLike)):
        grid = recorded_grid(Path(model).expanduser() if model else DEFAULT_MODEL_FILE)
    else:
        grid = getattr(model, "grid", None)
    if grid is None:
        return None
    future: "Future[Tuple[Any, Optional[BaseException], float]]" = Future()

    def work() -> None:
        if future.set_running_or_notify_cancel():
            future.set_result(_timed_read_case(path, grid, first_volume))  # it returns its exceptions

    # A daemon thread, not an executor's: the interpreter joins executor threads before it exits, so a command
    # refused before it took the read (an existing output, an unknown adapter) would wait for the read to end.
    threading.Thread(target=work, name=READ_AHEAD_THREAD, daemon=True).start()
    return ReadAhead(str(path), grid, first_volume, future)


def prefetched(items: Sequence[T], load: Callable[[T], R], first: Optional["Future[R]"] = None,
               ) -> Iterator[Tuple[T, Optional[R], Optional[Exception]]]:
    """Yield ``(item, load(item), None)`` in order — or ``(item, None, error)`` for a ConvLoRASegError — while
    the next item loads in a background thread (reading a volume overlaps the network's work on the last).
    ``first``: ``load(items[0])`` already under way (:func:`read_ahead`)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convloraseg-read")
    try:
        upcoming = first if first is not None else (pool.submit(load, items[0]) if items else None)
        for i, item in enumerate(items):
            current = upcoming
            upcoming = pool.submit(load, items[i + 1]) if i + 1 < len(items) else None
            try:
                yield item, current.result(), None
            except ConvLoRASegError as exc:
                yield item, None, exc
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def readable(items: Sequence[Path], load: Callable[[Path], Tuple[Any, List[str]]], failed: List[Dict[str, str]],
             warn: Log = None) -> Iterator[Tuple[int, Path, Any]]:
    """:func:`prefetched` for volumes: yields ``(index, path, value)`` for each volume that loads (``load`` returns
    the value and its intensity warnings, which go to ``warn``). A volume that fails is recorded in ``failed``
    (``{"input", "message"}``) and warned about."""
    for i, (path, loaded, error) in enumerate(prefetched(items, load)):
        if error is not None:
            if warn is not None:
                warn(f"skipped {path.name}: {error}")
            failed.append({"input": str(path), "message": str(error)})
            continue
        value, warnings = loaded
        for w in warnings:
            if warn is not None:
                warn(f"{path.name} {w}")
        yield i, path, value


def target_paths(targets: Sequence[str]) -> List[Path]:
    """Volumes of a target cohort: files, folders, globs, or ``cc359:ROOT:DOMAIN`` (e.g. ``cc359:/data:ge15``)."""
    paths: List[Path] = []
    for t in targets:
        if t.lower().startswith("cc359:"):
            root, _, domain = t[len("cc359:"):].rpartition(":")
            if not root or not domain:
                raise ConvLoRASegError(f"{t!r}: write a CC359 target as cc359:ROOT:DOMAIN, e.g. cc359:/data/CC359:ge15")
            cases = cc359_cases(root)
            chosen = [c.image for c in cases if (c.domain or "").lower() == domain.lower()]
            if not chosen:
                domains = ", ".join(sorted({c.domain or "?" for c in cases}))
                raise ConvLoRASegError(f"no CC359 images of domain {domain!r} under {root} (found: {domains})")
            paths += chosen
        else:
            paths += find_volumes([t])
    return list(dict.fromkeys(paths))


def read_slices(paths: Sequence[PathLike], grid, progress: Progress = None, warn: Log = None,
                what: str = "the target cohort") -> Tuple[List[Any], List[Path], List[Dict[str, str]]]:
    """Working-grid slices of every readable volume of an adaptation target: ``(stacks, used paths, skipped)``;
    an unreadable volume is skipped (``{"input", "message"}``, warned about). Raises ConvLoRASegError when none
    is readable."""
    from .volumes import to_slices

    def load(p: Path):
        image, warnings = load_volume(p, grid)
        return to_slices(image, grid).slices, warnings

    items = [Path(p) for p in paths]
    stacks, used, skipped = [], [], []
    for i, path, slices in readable(items, load, skipped, warn):
        if progress is not None:
            progress({"event": "progress", "stage": "read", "step": i + 1, "total": len(items)})
        stacks.append(slices)
        used.append(path)
    if not stacks:
        raise ConvLoRASegError(f"{what} has no readable volumes ({len(skipped)} skipped)")
    return stacks, used, skipped


@dataclass
class AdaptRun:
    """What :func:`adapt_cohort` did: the adapter written, the adaptation's result (after the labelled check, if
    any), the volumes used and skipped, the label-free selection before the check."""

    info: Any
    result: Any
    used: List[Path]
    skipped: List[Dict[str, str]]
    label_free_selected: str
    check: Any = None
    #: parameters of the base model (U-Net and ESH)
    base_params: int = 0

    def report(self, model_bytes: Optional[int] = None) -> Tuple[List[str], Optional[str]]:
        """The run in words: the lines ``adapt`` prints, and a warning when the adapter changes nothing or was made by
        a method the label-free checks do not guard (:func:`~ConvLoRASegLib.selection.unguarded_adapter`)."""
        from .selection import unguarded_adapter

        r, info, check, label_free = self.result, self.info, self.check, self.label_free_selected
        scores = ", ".join(f"{k} {v:.3f}" for k, v in r.candidates.items())
        checked = [] if check is None else [
            f"  labelled check on {len(check.scans)} scan(s), surface Dice at 1 mm as segment --adapter delivers it: "
            + ", ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in check.surface_dice.items()),
            f"  label-free selection {label_free}; after the labelled check: {check.selected} ({check.reason})"]
        lines = [f"adapter {info.name!r} written to {info.path}",
                 f"  target: {len(self.used)} volumes ({r.n_slices} slices), {len(self.skipped)} skipped",
                 f"  method {r.method} ({r.mode}), rank {r.rank}, placement {r.placement}",
                 f"  label-free score of each candidate (ESH agreement + gamma consistency): {scores}",
                 *checked, f"  {r.verdict() if check is None else 'selected: ' + r.selected}",
                 *parameter_lines(r.method, r.trainable_params, info.stored_values, self.base_params, info.bytes,
                                  model_bytes),
                 f"  time {r.seconds:.1f} s"]
        warning = None
        if check is not None and not r.adapted and label_free != SOURCE:
            warning = (f"the adapted model was worse than the unadapted one on the labelled check scans "
                       f"({check.reason}): the adapter {info.name!r} changes nothing; segmenting without it gives "
                       "the same masks")
        elif not r.adapted:
            best = max((v for k, v in r.candidates.items() if k != SOURCE), default=float("nan"))
            warning = (f"adaptation did not beat the unadapted model on the label-free score (source "
                       f"{r.agreement_source:.3f}, best adapted candidate {best:.3f}): the adapter {info.name!r} "
                       "changes nothing; segmenting without it gives the same masks")
        else:
            warning = unguarded_adapter(info)
        return lines, warning

    def summary(self, model_bytes: Optional[int] = None) -> Dict[str, Any]:
        """The run in numbers (the CLI's JSON ``summary``)."""
        r = self.result
        return {
            "selected": r.selected, "adapted": r.adapted, "verdict": r.verdict(), "candidates": r.candidates,
            "score_source": r.agreement_source, "score_selected": r.best_agreement,
            "best_epoch": r.best_epoch, "epochs": r.epochs, "trainable_params": r.trainable_params,
            "trainable_percent": 100.0 * r.trainable_params / max(self.base_params, 1),
            "stored_values": self.info.stored_values, "base_params": self.base_params,
            "adapter_bytes": self.info.bytes, "model_bytes": model_bytes, "seconds": round(r.seconds, 1),
            "n_volumes": len(self.used), "n_skipped": len(self.skipped),
            "label_free_selected": self.label_free_selected,
            "labelled_check": self.check.to_dict() if self.check else None}


def parameter_lines(method: str, trainable: int, stored: int, base_params: Optional[int], nbytes: int,
                    model_bytes: Optional[int] = None) -> List[str]:
    """An adapter's two counts, each saying what it counts (``adapt`` and ``info`` print these)."""
    from .progress import byte_size
    from .selftrain import METHOD_SPECS

    what = METHOD_SPECS[method].trained if method in METHOD_SPECS else method
    share = f" = {100.0 * trainable / base_params:.2f} % of the base model's {base_params:,}" if base_params else ""
    return [f"  trainable parameters ({what}): {trainable:,}{share}",
            f"  stored in the adapter file: {stored:,} values (the trainable parameters + BatchNorm statistics), "
            f"{byte_size(nbytes)}" + (f" vs the model file's {byte_size(model_bytes)}" if model_bytes else "")]


def adapt_cohort(model, paths: Sequence[PathLike], dest: PathLike, name: str, *, labelled: Sequence[Any] = (),
                 device="auto", overwrite: bool = False, progress: Progress = None, warn: Log = None,
                 log: Log = None, what: str = "the target cohort", details: Optional[Dict[str, Any]] = None,
                 **kwargs: Any) -> AdaptRun:
    """Adapt ``model`` to a site's unlabelled volumes and write the adapter: read every readable volume
    (:func:`read_slices`), :func:`~ConvLoRASegLib.selftrain.adapt` (``kwargs``: method, mode, epochs, ...), with
    ``labelled`` scans (:func:`~ConvLoRASegLib.labelled_check.read_labelled_scans`) the labelled check, then save
    the adapter to ``dest`` under ``name`` (``details`` added to its metadata). With ``log``, the expected
    duration is said once the adaptation's first scoring pass has timed the network (its ``"estimate"`` event,
    :func:`~ConvLoRASegLib.selftrain.adapt`)."""
    from .labelled_check import apply_check, check_adaptation
    from .progress import duration
    from .segment import resolve_device
    from .selftrain import adapt
    from .store import save_adapter

    report = progress or (lambda e: None)
    dev = resolve_device(device)
    stacks, used, skipped = read_slices(paths, model.grid, progress, warn, what=what)

    def adapt_progress(event: Dict[str, Any]) -> None:
        if log is not None and event.get("event") == "estimate":
            log(f"adapting to {len(used)} volumes ({sum(len(v) for v in stacks)} slices) on {dev}: expected about "
                f"{duration(event['seconds'])} (a rough estimate from its first scoring pass)")
        report(event)

    result = adapt(model, stacks, device=dev, progress=adapt_progress, **kwargs)
    label_free, check = result.selected, None
    if labelled:
        check = check_adaptation(model, result, list(labelled), dev, progress=progress)
        result = apply_check(model, result, check)
    report({"event": "progress", "stage": "save", "step": 0, "total": 1})
    meta = {**result.summary(), **(details or {}),
            "target": {"n_volumes": len(used), "files": [p.name for p in used],
                       "skipped": [Path(s["input"]).name for s in skipped]}}
    info = save_adapter(model, result.state, dest, name=name, method=result.method, mode=result.mode,
                        rank=result.rank, alpha=result.alpha, placement=result.placement, details=meta,
                        overwrite=overwrite)
    report({"event": "progress", "stage": "save", "step": 1, "total": 1})
    return AdaptRun(info, result, used, skipped, label_free, check, sum(p.numel() for p in model.parameters()))


# ---------------------------------------------------------------------------------------------------------------
# one case: read -> segment + score -> write -> manifest row
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentSettings:
    """What every case of a cohort run shares (sent once to each Dask worker)."""

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
    model on this scan (label-free, :func:`~ConvLoRASegLib.selection.choose_adapter`), else the case says so."""

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
        """``(image, intensity warnings, working slices)`` (:func:`read_case`); header checks (memory) first.
        Raises ConvLoRASegError."""
        return read_case(job.input, self.model.grid, self.settings.first_volume)

    def segment(self, job: CaseJob, image, warnings: Sequence[str], working, t0: Optional[float] = None,
                progress: Progress = None, log: Log = None) -> Row:
        """Segment a volume as :meth:`read` gives it (``working``: the volume on the model's grid), write its output
        atomically, return its manifest row."""
        from . import volumes
        from .qc import measure, overlay_png
        from .segment import activate_adapter, predict_slices
        from .selection import adapter_not_used, agreement, choose_adapter, unguarded_adapter

        t0 = time.perf_counter() if t0 is None else t0
        s, model = self.settings, self.model
        chosen, scores = job.adapter, {}
        warnings = list(warnings)
        predicted: Dict[str, Any] = {}
        choices = job.candidates if job.candidates is not None else (
            (job.adapter,) if job.check and job.adapter is not None else None)
        if choices is not None:
            chosen = None
            if choices:
                info, scores = choose_adapter(model, image, list(choices), self.device, working=working,
                                              predictions=predicted)
                chosen = info
                if log is not None:
                    name = info.name if info is not None else "source model (no adapter)"
                    others = ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
                    log(f"{Path(job.input).name}: chose {name}, label-free score "
                        f"{scores[SOURCE if info is None else info.name]:.3f} (label-free scores: {others})")
                if job.candidates is None and info is None:
                    requested = next(k for k in scores if k != SOURCE)
                    warnings.append(adapter_not_used(requested, scores))
        info = activate_adapter(model, chosen)
        unguarded = unguarded_adapter(info)
        if unguarded:
            warnings.append(unguarded)
        # one pass gives the final and the ESH probabilities: the mask and its label-free score (the scoring of the
        # candidates above already made that pass for the winner)
        final, early = predicted.get(SOURCE if info is None else info.name) or predict_slices(
            model, working.slices, self.device, with_esh=True, progress=progress)
        score = agreement(final, early, model.grid.spacing_mm)
        mask = volumes.brain_mask(final, working, postprocess=s.postprocess)
        result = volumes.to_native(final, working) if s.probabilities else mask
        out = Path(job.output)
        ours = bool(job.run_started) and out.is_file() and out.stat().st_mtime >= job.run_started
        dest = volumes.write_image(result, job.output, overwrite=s.overwrite or ours)
        row: Row = {"input": job.input, "output": str(dest), "adapter": None if info is None else info.name,
                    "status": "ok", "seconds": 0.0, "warnings": warnings, **measure(mask, score)}
        if scores:
            row["adapter_scores"] = {k: round(v, 4) for k, v in scores.items()}
        if s.qc_dir:
            try:
                png = overlay_png(image, mask, Path(s.qc_dir) / f"{volume_stem(job.input)}.png",
                                  title=f"{Path(job.input).name}  {', '.join(row['flags']) or 'no flags'}")
            except (OSError, ConvLoRASegError, ValueError, RuntimeError) as exc:  # a picture never fails a case
                row["warnings"].append(f"no QC picture: {exc}")
                png = None
            if png is not None:
                row["qc_png"] = str(png)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        return row

    def run(self, job: CaseJob, progress: Progress = None, log: Log = None) -> Row:
        """:meth:`read` + :meth:`segment`; a failure of this case becomes a ``failed`` row."""
        t0 = time.perf_counter()
        try:
            image, warnings, working = self.read(job)
            return self.segment(job, image, warnings, working, t0, progress=progress, log=log)
        except Exception as exc:  # noqa: BLE001 - narrowed just below
            if not is_case_failure(exc):
                raise
            return failed_case(job, exc, time.perf_counter() - t0)


def is_case_failure(exc: BaseException) -> bool:
    """Errors that belong to one case (its file, its size), not to the program."""
    from .segment import OutOfMemoryError

    return isinstance(exc, (ConvLoRASegError, MemoryError, OutOfMemoryError, OSError))


def failed_case(job: CaseJob, exc: BaseException, seconds: float) -> Row:
    """The manifest row of a case that failed with ``exc``: status ``failed``, the reason in its flags."""
    from .qc import failed_row

    if isinstance(exc, ConvLoRASegError):
        reason = str(exc)
    elif isinstance(exc, (MemoryError,)) or type(exc).__name__ == "OutOfMemoryError":
        reason = "out of memory"
    else:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    return failed_row(job.input, job.output, job.adapter_label, reason, seconds)


def failure_reason(row: Row) -> str:
    """The reason a ``failed`` row gives (its first flag without ``failed: ``)."""
    return row["flags"][0][len("failed: "):]


def run_in_process(segmenter: Segmenter, jobs: Sequence[CaseJob], on_row: Callable[[Row], None],
                   progress: Progress = None, log: Log = None, ahead: Optional[ReadAhead] = None) -> List[Row]:
    """Every job in this process, in order, the next volume read and put on the model's grid in a background
    thread while one is segmented. ``ahead``: the first volume's read, if :func:`read_ahead` started it."""
    rows: List[Row] = []
    grid, first_volume = segmenter.model.grid, segmenter.settings.first_volume

    def load(job: CaseJob):
        return _timed_read_case(job.input, grid, first_volume)

    first = None
    if ahead is not None and jobs and ahead.matches(jobs[0].input, grid, first_volume):
        first = ahead.future
    for job, loaded, _ in prefetched(list(jobs), load, first):
        (read, error, t0) = loaded
        if error is not None and not is_case_failure(error):
            raise error
        if error is not None:
            row = failed_case(job, error, time.perf_counter() - t0)
        else:
            def case_progress(event: Dict[str, Any], _job: CaseJob = job) -> None:
                if progress is not None:
                    progress({**event, "volume": _job.index + 1, "volumes": _job.total})
            image, warnings, working = read
            try:
                row = segmenter.segment(job, image, warnings, working, progress=case_progress, log=log)
            except Exception as exc:  # noqa: BLE001
                if not is_case_failure(exc):
                    raise
                row = failed_case(job, exc, time.perf_counter() - t0)
        rows.append(row)
        on_row(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# a cohort: outputs, adapters, resume
# ---------------------------------------------------------------------------------------------------------------
def output_paths(inputs: Sequence[Path], out: Path, probabilities: bool) -> Tuple[Dict[Path, Path], bool]:
    """Map inputs to outputs. ``OUT`` is a file for one input (when it has an image ending and is not an existing
    folder), else a folder holding ``<stem>_brainmask.nii.gz`` per input. Returns (mapping, is_folder)."""
    as_folder = (len(inputs) > 1 or out.is_dir() or str(out).endswith(("/", os.sep))
                 or not out.name.lower().endswith(_OUTPUT_FILE_ENDINGS))
    if not as_folder:
        return {inputs[0]: out}, False
    suffix = PROB_SUFFIX if probabilities else MASK_SUFFIX
    mapping: Dict[Path, Path] = {}
    seen: Dict[str, Path] = {}
    for p in inputs:
        stem = volume_stem(p)
        if stem in seen:
            raise ConvLoRASegError(f"two inputs would both write {stem}{suffix}: {seen[stem]} and {p}")
        seen[stem] = p
        mapping[p] = out / f"{stem}{suffix}"
    return mapping, True


def check_outputs(mapping: Dict[Path, Path], folder: Optional[Path], overwrite: bool) -> None:
    """Refuse existing outputs (unless ``overwrite``) and unwritable folders before any work is done; ``folder``:
    an output folder that does not exist yet (its parent must be writable)."""
    from .atomic import check_output_path

    if folder is not None and not folder.is_dir():
        parent = folder.parent if str(folder.parent) else Path(".")
        if folder.exists():
            raise ConvLoRASegError(f"output {folder} exists and is not a folder")
        if not parent.is_dir():
            raise ConvLoRASegError(f"output folder does not exist: {parent}")
        if not os.access(parent, os.W_OK):
            raise ConvLoRASegError(f"output folder is not writable: {parent}")
        return  # the folder will be created: nothing in it can exist yet
    for dest in mapping.values():
        check_output_path(dest, overwrite)


def resolve_adapter(spec: Optional[str], model, adapters_dir: Optional[PathLike]):
    """An adapter spec: None/``none`` -> None (source model); ``auto`` -> ``"auto"``; an existing file -> its
    :class:`~ConvLoRASegLib.store.AdapterInfo` (read and checked against the model); otherwise a name in the store
    at ``adapters_dir`` (default: the user store)."""
    from .segment import activate_adapter
    from .store import AdapterStore

    if spec is None or spec.lower() in ("none", SOURCE):
        return None
    if spec.lower() == "auto":
        return "auto"
    path = Path(spec).expanduser()
    if not path.is_file():
        if path.suffix == ".safetensors" or os.sep in spec or "/" in spec:
            raise ConvLoRASegError(f"adapter file not found: {path}")
        path = AdapterStore(adapters_dir).find(model.sha256, spec).path
    # read and checked once here (another base model, a corrupt file); segmenting later reuses what was read
    info = activate_adapter(model, path)
    activate_adapter(model, None)
    return info


def candidate_adapters(model, adapters_dir: Optional[PathLike]) -> List[Any]:
    """Adapters of ``model`` for ``auto``: the store at ``adapters_dir`` (default: the user store) plus the adapter
    files lying directly in ``adapters_dir``."""
    from .store import AdapterStore, read_adapter_info

    if adapters_dir is not None and not Path(adapters_dir).is_dir():
        raise ConvLoRASegError(f"--adapters folder does not exist: {adapters_dir}")
    found = {info.path.resolve(): info for info in AdapterStore(adapters_dir).list(model.sha256)}
    if adapters_dir is not None:
        for p in sorted(Path(adapters_dir).glob("*.safetensors")):
            try:
                info = read_adapter_info(p)
            except ConvLoRASegError:
                continue
            if info.base_sha256 == model.sha256:
                found.setdefault(p.resolve(), info)
    return list(found.values())


def csv_rows(src: Path, option: str, columns: Sequence[str]) -> List[Dict[str, str]]:
    """The rows of a user's CSV given with ``option`` (``--adapter-map``, ``--sites``): column names stripped and
    lower-cased, values stripped; one-line errors for a missing file, a file without ``columns`` and an unreadable
    one."""
    try:
        with src.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip().lower() for c in (reader.fieldnames or [])]
            if any(c not in fields for c in columns):
                raise ConvLoRASegError(f"{option} {src.name}: a CSV needs the columns {','.join(columns)}")
            return [{k.strip().lower(): (v or "").strip() for k, v in line.items() if k} for line in reader]
    except FileNotFoundError:
        raise ConvLoRASegError(f"{option}: no such file: {src}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConvLoRASegError(f"cannot read {option} {src}: {exc}") from None


def adapter_map(path: PathLike, inputs: Sequence[Path]) -> Dict[Path, str]:
    """An adapter map CSV: columns ``input,adapter`` (an adapter file, a store name, ``auto`` or ``none``); an
    input is matched by its path, file name or name without extension. Returns input -> adapter spec."""
    src = Path(path).expanduser()
    entries = csv_rows(src, "--adapter-map", ("input", "adapter"))
    by_key: Dict[str, str] = {}
    for e in entries:
        if e.get("input") and e.get("adapter"):
            spec = e["adapter"]
            if spec.lower() not in ("auto", "none", SOURCE) and not Path(spec).is_absolute() and (
                    (src.parent / spec).is_file()):
                spec = str(src.parent / spec)  # adapter files relative to the CSV
            key = Path(e["input"]).expanduser()
            by_key[str((key if key.is_absolute() else src.parent / key).resolve())] = spec
            by_key[key.name] = by_key[volume_stem(key)] = spec
    return {p: by_key.get(str(p.resolve()), by_key.get(p.name, by_key.get(volume_stem(p))))
            for p in inputs if any(k in by_key for k in (str(p.resolve()), p.name, volume_stem(p)))}


def complete_output(src: Path, dest: Path) -> bool:
    """Whether ``dest`` is a whole, readable image on ``src``'s grid size (this library writes atomically; a file
    copied in part is caught by :func:`~ConvLoRASegLib.integrity.check_image_file`)."""
    import SimpleITK as sitk

    from .integrity import check_image_file
    from .volumes import image_info

    try:
        check_image_file(dest, image_info(dest).data_bytes)
        out = sitk.ReadImage(str(dest))
        return tuple(out.GetSize()) == tuple(image_info(src).size[:3])
    except (RuntimeError, ConvLoRASegError):
        return False


def resumed_row(src: Path, dest: Path, previous: Dict[str, Row]) -> Row:
    """The manifest row of a complete output kept by ``resume``: its old row if there is one, else measured."""
    import SimpleITK as sitk

    from .qc import measure
    from .volumes import MASK_THRESHOLD

    old = previous.get(str(src))
    if old is not None and old.get("status") in ("ok", "resumed"):
        return {**old, "status": "resumed"}
    row = {"input": str(src), "output": str(dest), "adapter": None, "status": "resumed", "seconds": 0.0,
           "warnings": []}
    mask = sitk.ReadImage(str(dest))
    if mask.GetPixelID() == sitk.sitkFloat32:  # probabilities output
        mask = sitk.Cast(mask >= MASK_THRESHOLD, sitk.sitkUInt8)
    return {**row, **measure(mask, None)}


#: How a cohort's cases are run elsewhere: ``runner(settings, jobs, on_row)`` calls ``on_row`` with every case's
#: row (e.g. :func:`ConvLoRASegLib.cluster.run_on_dask` on a client).
Runner = Callable[[SegmentSettings, List[CaseJob], Callable[[Row], None]], Any]


@dataclass
class CohortResult:
    """What a cohort run did: this run's rows (done and failed, in the order they finished), the rows of the
    outputs ``resume`` kept, and the reports written."""

    n_inputs: int
    rows: List[Row] = field(default_factory=list)
    resumed: List[Row] = field(default_factory=list)
    manifest: Optional[Path] = None
    qc_index: Optional[Path] = None

    @property
    def failed(self) -> List[Row]:
        return [r for r in self.rows if r["status"] == "failed"]

    @property
    def done(self) -> List[Row]:
        return [r for r in self.rows if r["status"] != "failed"]

    @property
    def all_rows(self) -> List[Row]:
        return self.resumed + self.rows


def segment_cohort(inputs: Sequence[PathLike], output: PathLike, *, model: Union[PathLike, Any, None] = None,
                   adapter: Optional[str] = None, adapter_map_csv: Optional[PathLike] = None,
                   adapters_dir: Optional[PathLike] = None, scan_check: bool = True, postprocess: bool = True,
                   probabilities: bool = False, first_volume: bool = False, overwrite: bool = False,
                   resume: bool = False, qc_dir: Optional[PathLike] = None, device: str = "auto",
                   runner: Optional[Runner] = None, progress: Progress = None,
                   on_row: Optional[Callable[[Row], None]] = None, log: Log = None, warn: Log = None) -> CohortResult:
    """Segment a cohort: brain masks (or probabilities) of ``inputs``, a manifest row per case.

    Args:
        inputs: image files, folders (not recursive), glob patterns, DICOM series folders.
        output: an output file for one input (with an image ending), else a folder (created) that receives
            ``<stem>_brainmask.nii.gz`` per input and ``manifest.csv``/``manifest.json``.
        model: a model file, a loaded :class:`~ConvLoRASegLib.model.ConvLoRASegModel` (in this process only),
            or None for the bundled default model.
        adapter: for every input: an adapter file, a name in the store, ``"auto"`` (the best label-free score per
            scan among the model's adapters) or None/``"none"``; ``adapter_map_csv`` overrides it per input
            (columns ``input,adapter``).
        adapters_dir: where names and ``"auto"`` look (default: the user store).
        scan_check: use a given adapter on a scan only where it beats no adapter there (label-free; a warning in
            the row where not).
        resume: keep the outputs that exist and are complete, segment the rest.
        qc_dir: a folder for an overlay picture per case and ``index.html``, worst case first.
        device: ``"auto"``, ``"cpu"``, ``"cuda[:N]"`` or ``"mps"``.
        runner: run the cases elsewhere (``runner(settings, jobs, on_row)``, e.g. on Dask); default: in this
            process, the next volume read while one is segmented.
        progress: the library's progress callback (per case: ``volume``/``volumes`` keys; with a runner one
            ``"cohort"`` event per finished case).
        on_row: called with every case's row as it finishes (``status`` ``"ok"`` or ``"failed"``, ``flags``,
            ``brain_ml``, ``agreement`` (the ESH agreement), ``output``, ...).
        log, warn: one line of information / of warning for the user (a failed case of several is warned about:
            ``skipped NAME: reason``).

    Returns:
        a :class:`CohortResult`; failed cases are rows (``status == "failed"``), never exceptions.

    Raises:
        ConvLoRASegError: before any work, for bad inputs, existing outputs (without ``overwrite``), unknown
            adapters or models; and when the only input fails (then nothing is written).
        KeyboardInterrupt: after the manifest of the cases finished so far is written.
    """
    found = find_volumes(list(inputs))
    # the first volume is read and put on the model's grid while torch is imported and the model loaded
    ahead = read_ahead(found[0], model, first_volume) if found and runner is None and not resume else None

    from .qc import have_matplotlib, load_manifest, write_index, write_manifest

    out = Path(output).expanduser()
    mapping, as_folder = output_paths(found, out, probabilities)

    # resume: complete outputs are kept (their old manifest rows too); the rest is checked as usual
    result = CohortResult(n_inputs=len(found))
    todo = list(found)
    if resume:
        previous: Dict[str, Row] = {}
        if as_folder and (out / "manifest.json").is_file():
            with contextlib.suppress(ConvLoRASegError):
                previous = {str(r["input"]): r for r in load_manifest(out)}
        todo = []
        for src in found:
            if mapping[src].is_file() and complete_output(src, mapping[src]):
                result.resumed.append(resumed_row(src, mapping[src], previous))
            else:
                todo.append(src)
        if result.resumed and log is not None:
            log(f"--resume: {len(result.resumed)} of {len(found)} outputs are complete and kept")
    # before torch is imported and the model loaded: a rerun into existing outputs is refused at once
    check_outputs({p: mapping[p] for p in todo}, out if as_folder and not out.is_dir() else None, overwrite)

    from .model import ConvLoRASegModel
    from .segment import resolve_device
    from .store import load_model, model_file

    dev = resolve_device(device)
    if isinstance(model, ConvLoRASegModel):
        if runner is not None:
            raise ConvLoRASegError("a cohort run elsewhere (Dask) needs the model's file, not a loaded model")
        loaded, mpath = model, ""
    else:
        mpath = str(model_file(model))
        loaded = load_model(Path(mpath))

    # adapters: one spec for every input, or per input from the map; each spec resolved (and checked) once
    specs = {p: adapter for p in todo}
    if adapter_map_csv:
        specs.update({p: s for p, s in adapter_map(adapter_map_csv, found).items() if p in specs})
    resolved: Dict[Optional[str], Any] = {spec: resolve_adapter(spec, loaded, adapters_dir)
                                          for spec in dict.fromkeys(specs.values())}
    candidates: Optional[Tuple[str, ...]] = None
    if "auto" in resolved.values():
        candidates = tuple(str(i.path) for i in candidate_adapters(loaded, adapters_dir))
        if not candidates and warn is not None:
            warn("--adapter auto: no adapters of this model in the store; using the source model")
    jobs = []
    for i, src in enumerate(todo):
        a = resolved[specs[src]]
        jobs.append(CaseJob(input=str(src), output=str(mapping[src]), index=i, total=len(todo),
                            adapter=None if a in (None, "auto") else str(a.path),
                            candidates=candidates if a == "auto" else None,
                            check=a not in (None, "auto") and scan_check))

    qc = Path(qc_dir).expanduser() if qc_dir else None
    if qc is not None:
        if qc.exists() and not qc.is_dir():
            raise ConvLoRASegError(f"--qc {qc} exists and is not a folder")
        if not have_matplotlib() and warn is not None:
            warn("--qc: matplotlib is not installed; index.html is written without pictures (pip install matplotlib)")
    settings = SegmentSettings(model=mpath, device=str(dev) if runner is None else device, postprocess=postprocess,
                               probabilities=probabilities, first_volume=first_volume, overwrite=overwrite,
                               qc_dir=str(qc) if qc is not None else None)

    created = as_folder and not out.is_dir() and bool(todo)
    if created:
        out.mkdir(parents=True, exist_ok=True)
    if qc is not None:
        qc.mkdir(parents=True, exist_ok=True)

    def take(row: Row) -> None:
        result.rows.append(row)
        if row["status"] == "failed" and len(found) > 1 and warn is not None:
            warn(f"skipped {Path(row['input']).name}: {failure_reason(row)}")
        if on_row is not None:
            on_row(row)
        if runner is not None and progress is not None:
            progress({"event": "progress", "stage": "cohort", "step": len(result.rows), "total": len(jobs)})

    def finish_reports() -> None:
        every = result.all_rows
        if qc is not None and every:
            result.qc_index = write_index(qc, every)
        if as_folder and every and not (len(found) == 1 and result.failed):
            result.manifest = write_manifest(out, every)[0]

    try:
        if not jobs:
            pass
        elif runner is not None:
            runner(settings, jobs, take)
        else:
            run_in_process(Segmenter(settings, model=loaded), jobs, take, progress=progress, log=log, ahead=ahead)
    except KeyboardInterrupt:
        finish_reports()  # the cases finished before the interrupt are complete files: say so
        raise
    if len(found) == 1 and result.failed:  # a single input: its error is the run's error, nothing written
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise ConvLoRASegError(failure_reason(result.failed[0]))
    finish_reports()
    return result


# ---------------------------------------------------------------------------------------------------------------
# training cohort
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TrainingCohort:
    """Working-grid slices of labelled volumes, split into training and validation volumes (indices)."""

    names: List[str]
    images: List[Any]
    masks: List[Any]
    train: List[int]
    val: List[int]


def read_training_cohort(images_dir: PathLike, masks_dir: PathLike, grid, val_fraction: float, seed: int,
                         progress: Progress = None, partial_volume: bool = False) -> TrainingCohort:
    """Every image of ``images_dir`` with its mask from ``masks_dir`` (named like the image, plus ``_mask`` etc.),
    as working-grid slices, and a seeded split (at least one volume of each side when there are two or more).
    ``partial_volume``: the masks as partial-volume fractions (:func:`~ConvLoRASegLib.volumes.mask_to_slices`)."""
    import numpy as np

    from .volumes import check_memory, image_info, mask_to_slices, read_image, to_slices

    cases = folder_cohort(images_dir, masks_dir)
    unlabelled = [c.image.name for c in cases if c.mask is None]
    if unlabelled:
        raise ConvLoRASegError(f"{len(unlabelled)} images have no mask in {masks_dir} (e.g. {unlabelled[0]})")
    if not 0.0 <= val_fraction < 1.0:
        raise ConvLoRASegError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    for c in cases:
        check_memory(image_info(c.image), grid)
    images, masks = [], []
    for i, c in enumerate(cases):
        if progress is not None:
            progress({"event": "progress", "stage": "read", "step": i, "total": len(cases)})
        vs = to_slices(read_image(c.image), grid)
        images.append(vs.slices)
        masks.append(mask_to_slices(read_image(c.mask), vs, partial_volume))
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = int(round(len(cases) * val_fraction))
    if val_fraction > 0 and len(cases) >= 2:
        n_val = min(max(n_val, 1), len(cases) - 1)
    return TrainingCohort([c.image.name for c in cases], images, masks, [int(i) for i in order[n_val:]],
                          [int(i) for i in order[:n_val]])


# ---------------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------------
def _match_key(path: Path) -> str:
    stem = volume_stem(path).lower()
    for suffix in sorted(MASK_SUFFIXES + ("_brainprob",), key=len, reverse=True):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def evaluation_pairs(pred: Path, truth: Path) -> List[Tuple[Path, Path]]:
    """(prediction, truth) pairs: two files, or two folders matched by name (mask suffixes ignored)."""
    if pred.is_file() and truth.is_file():
        return [(pred, truth)]
    if not (pred.is_dir() and truth.is_dir()):
        for p in (pred, truth):
            if not p.exists():
                raise ConvLoRASegError(f"{p}: no such file or folder")
        raise ConvLoRASegError("PRED and TRUTH must both be files or both be folders")
    truths = {_match_key(t): t for t in find_volumes([truth])}
    pairs = [(p, truths[_match_key(p)]) for p in find_volumes([pred]) if _match_key(p) in truths]
    if not pairs:
        raise ConvLoRASegError(f"no prediction in {pred} has a truth of the same name in {truth}")
    return pairs


def evaluate_pair(pred_path: Path, truth_path: Path, tolerance_mm: float) -> Dict[str, Any]:
    """Dice, surface Dice at ``tolerance_mm``, HD95 (mm) and volumes (ml) of two label images (non-zero = brain;
    anything else, e.g. a scan given as a prediction, is refused); a prediction on another grid is resampled
    (nearest neighbour) onto the truth's."""
    import SimpleITK as sitk

    from .metrics import dice, hd95, surface_dice, volume_difference
    from .volumes import read_label_image, same_grid

    pred, truth = read_label_image(pred_path), read_label_image(truth_path)
    same = same_grid(pred, truth)
    if not same:
        pred = sitk.Resample(pred, truth, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    p = sitk.GetArrayViewFromImage(pred) > 0
    t = sitk.GetArrayViewFromImage(truth) > 0
    spacing = tuple(reversed(truth.GetSpacing()))  # numpy axis order (z, y, x)
    vol = volume_difference(p, t, spacing)
    return {"pred": str(pred_path), "truth": str(truth_path), "dice": dice(p, t),
            "surface_dice": surface_dice(p, t, spacing, tolerance_mm), "hd95_mm": hd95(p, t, spacing),
            "pred_ml": vol["pred_ml"], "truth_ml": vol["truth_ml"], "volume_diff_ml": vol["diff_ml"],
            "volume_diff_relative": vol["relative"], "resampled": not same}


#: The per-case measures :func:`evaluate_cohort` averages.
EVALUATION_MEANS = ("dice", "surface_dice", "hd95_mm", "volume_diff_ml")


def evaluate_cohort(pred: PathLike, truth: PathLike, tolerance_mm: float = 1.0,
                    progress: Progress = None) -> Tuple[List[Dict[str, Any]], Dict[str, float]]:
    """:func:`evaluate_pair` on every pair of :func:`evaluation_pairs`: (rows, mean of :data:`EVALUATION_MEANS`)."""
    import numpy as np

    pairs = evaluation_pairs(Path(pred).expanduser(), Path(truth).expanduser())
    rows = []
    for i, (p, t) in enumerate(pairs):
        if progress is not None:
            progress({"event": "progress", "stage": "evaluate", "step": i, "total": len(pairs)})
        rows.append(evaluate_pair(p, t, tolerance_mm))
    return rows, {k: float(np.mean([r[k] for r in rows])) for k in EVALUATION_MEANS}
