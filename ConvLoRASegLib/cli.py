"""``convlora-seg``: brain masks for whole volumes, scanner adapters, training, evaluation — from the shell.

Every subcommand is a thin layer over the library: parse arguments, check inputs and outputs *before* heavy
work, call the library with one progress callback (:class:`~ConvLoRASegLib.progress.Reporter`), print a result.

Exit status: 0 done; 2 a user error (``ConvLoRASegError``: one line on stderr, and ``{"event": "error"}`` with
``--json``; nothing written); 130 cancelled by Ctrl-C or SIGTERM (no partial output file: every writer is
atomic). Run ``convlora-seg <command> --help`` for each command's options.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

from . import __version__
from .errors import Cancelled, ConvLoRASegError
from .progress import Reporter

EXIT_OK, EXIT_USER_ERROR, EXIT_CANCELLED = 0, 2, 130
#: = train.OUT_SCALE (not imported: the parser must not import torch; a test keeps the two equal).
OUT_SCALE_DEFAULT = 6.0
#: Name endings of the files ``segment`` writes into an output folder.
MASK_SUFFIX, PROB_SUFFIX = "_brainmask.nii.gz", "_brainprob.nii.gz"
_IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
T = TypeVar("T")
R = TypeVar("R")


# ---------------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------------
def volume_stem(path: Path) -> str:
    """File name without its image extension (``sub-01.nii.gz`` -> ``sub-01``); a DICOM folder's own name."""
    name = path.name
    for ending in _IMAGE_ENDINGS:
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return name


def _is_image_file_name(path: Path) -> bool:
    return path.name.lower().endswith((".nii.gz", ".nii", ".nrrd", ".mha"))


def model_path(arg: Optional[str]) -> Path:
    """``--model`` or the bundled default model; a clear error when the default is not installed."""
    from .store import default_model_path

    if arg:
        return Path(arg).expanduser()
    path = default_model_path()
    if not path.is_file():
        raise ConvLoRASegError(f"no --model given and the bundled default model is not installed ({path}); "
                               "pass --model MODEL.safetensors")
    return path


def prefetched(items: Sequence[T], load: Callable[[T], R]) -> Iterator[Tuple[T, Optional[R], Optional[Exception]]]:
    """Yield ``(item, load(item), None)`` in order — or ``(item, None, error)`` for a ConvLoRASegError — while
    the next item loads in a background thread (reading a volume overlaps the network's work on the last)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convloraseg-read")
    try:
        upcoming = pool.submit(load, items[0]) if items else None
        for i, item in enumerate(items):
            current = upcoming
            upcoming = pool.submit(load, items[i + 1]) if i + 1 < len(items) else None
            try:
                yield item, current.result(), None
            except ConvLoRASegError as exc:
                yield item, None, exc
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def readable(items: Sequence[Path], load: Callable[[Path], Tuple[Any, List[str]]], rep: Reporter,
             failed: List[Dict[str, str]], raise_single: bool = False) -> Iterator[Tuple[int, Path, Any]]:
    """:func:`prefetched` for volumes: yields ``(index, path, value)`` for each volume that loads; its intensity
    warnings go to ``rep``. A volume that fails is warned about and recorded in ``failed`` (or, with
    ``raise_single`` and a single input, its error is raised)."""
    for i, (path, loaded, error) in enumerate(prefetched(items, load)):
        if error is not None:
            if raise_single and len(items) == 1:
                raise error
            rep.warn(f"skipped {path.name}: {error}")
            failed.append({"input": str(path), "message": str(error)})
            continue
        value, warnings = loaded
        for w in warnings:
            rep.warn(f"{path.name} {w}")
        yield i, path, value


#: Set when SIGTERM or the cancel file asked this run to stop. The interrupt can land inside a library's C code,
#: which may turn it into an error of its own (safetensors reading a model raised "could not determine the shape
#: of object type 'torch.storage.UntypedStorage'"): :func:`main` then still reports a cancellation, not that error.
CANCEL_REQUESTED = threading.Event()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While active, SIGTERM raises KeyboardInterrupt in the main thread, like Ctrl-C (restored afterwards)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        CANCEL_REQUESTED.set()
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


#: Seconds after which the cancel-file watcher interrupts again if the run has not stopped.
REINTERRUPT_S = 3.0


@contextlib.contextmanager
def cancel_file_as_interrupt(path: Optional[str], interval: float = 0.2) -> Iterator[None]:
    """While active, the appearance of the file ``path`` raises KeyboardInterrupt in the main thread.

    The Slicer module's way to cancel a background run that works on every OS: on Windows no signal reaches a
    child started without a console. The path comes from ``$CONVLORASEG_CANCEL_FILE``; None or empty: no-op.
    """
    if not path or threading.current_thread() is not threading.main_thread():
        yield
        return
    import _thread

    # interrupt_main() does nothing while SIGINT is ignored, and a child started in the background by a shell or
    # another program often inherits it ignored (Python then never installs its Ctrl-C handler): install it here
    old_sigint = signal.getsignal(signal.SIGINT)
    if old_sigint in (signal.SIG_IGN, signal.SIG_DFL, None):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if os.path.exists(path):
                CANCEL_REQUESTED.set()
                _thread.interrupt_main()
                # an interrupt that lands in code that swallows it (a library's bare except) is lost: if the run
                # is still going a while later, interrupt again
                stop.wait(REINTERRUPT_S)
                continue
            stop.wait(interval)

    watcher = threading.Thread(target=watch, name="convlora-cancel-file", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        if old_sigint in (signal.SIG_IGN, signal.SIG_DFL):
            signal.signal(signal.SIGINT, old_sigint)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"


def _base_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# segment
# ---------------------------------------------------------------------------------------------------------------
def output_paths(inputs: Sequence[Path], out: Path, probabilities: bool) -> Tuple[Dict[Path, Path], bool]:
    """Map inputs to outputs. ``OUT`` is a file for one input (when it has an image ending and is not an existing
    folder), else a folder holding ``<stem>_brainmask.nii.gz`` per input. Returns (mapping, is_folder)."""
    as_folder = len(inputs) > 1 or out.is_dir() or str(out).endswith(("/", os.sep)) or not _is_image_file_name(out)
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
    """Refuse existing outputs (unless ``overwrite``) and unwritable folders before any work is done."""
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


def resolve_adapter(spec: Optional[str], model, adapters_dir: Optional[str]):
    """``--adapter``: None/``none`` -> source model; ``auto`` -> "auto"; an existing file -> its path (checked
    against the model); otherwise a name in the store. Returns None, "auto" or an AdapterInfo."""
    from .segment import activate_adapter
    from .store import AdapterStore

    if spec is None or spec.lower() in ("none", "source"):
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


def candidate_adapters(model, adapters_dir: Optional[str]) -> List[Any]:
    """Adapters of ``model``: the store at ``adapters_dir`` (default: the user store) plus the adapter files
    lying directly in ``adapters_dir``."""
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


def _load_volume(path: Path, grid, first_volume: bool):
    """Header checks (memory), then the image itself and its intensity warnings."""
    from .volumes import check_intensities, check_memory, image_info, read_image

    check_memory(image_info(path), grid)
    image = read_image(path, first_volume=first_volume)
    return image, check_intensities(image)


def adapter_map(path: str, inputs: Sequence[Path]) -> Dict[Path, str]:
    """``--adapter-map CSV``: columns ``input,adapter`` (an adapter file, a store name, ``auto`` or ``none``);
    an input is matched by its path, file name or name without extension. Returns input -> adapter spec."""
    import csv

    src = Path(path).expanduser()
    try:
        with src.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip().lower() for c in (reader.fieldnames or [])]
            if "input" not in fields or "adapter" not in fields:
                raise ConvLoRASegError(f"--adapter-map {src.name}: a CSV needs the columns input,adapter")
            entries = [{k.strip().lower(): (v or "").strip() for k, v in line.items() if k} for line in reader]
    except FileNotFoundError:
        raise ConvLoRASegError(f"--adapter-map: no such file: {src}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConvLoRASegError(f"cannot read --adapter-map {src}: {exc}") from None
    by_key: Dict[str, str] = {}
    for e in entries:
        if e.get("input") and e.get("adapter"):
            spec = e["adapter"]
            if spec.lower() not in ("auto", "none", "source") and not Path(spec).is_absolute() and (
                    (src.parent / spec).is_file()):
                spec = str(src.parent / spec)  # adapter files relative to the CSV
            key = Path(e["input"]).expanduser()
            by_key[str((key if key.is_absolute() else src.parent / key).resolve())] = spec
            by_key[key.name] = by_key[volume_stem(key)] = spec
    return {p: by_key.get(str(p.resolve()), by_key.get(p.name, by_key.get(volume_stem(p))))
            for p in inputs if any(k in by_key for k in (str(p.resolve()), p.name, volume_stem(p)))}


def _complete_output(src: Path, dest: Path) -> bool:
    """Whether ``dest`` is a readable image on ``src``'s grid size (writes are atomic: then it is complete)."""
    import SimpleITK as sitk

    from .volumes import image_info

    try:
        out = sitk.ReadImage(str(dest))
        return tuple(out.GetSize()) == tuple(image_info(src).size[:3])
    except (RuntimeError, ConvLoRASegError):
        return False


def _resumed_row(src: Path, dest: Path, previous: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    import SimpleITK as sitk

    from .qc import measure

    old = previous.get(str(src))
    if old is not None and old.get("status") in ("ok", "resumed"):
        return {**old, "status": "resumed"}
    row = {"input": str(src), "output": str(dest), "adapter": None, "status": "resumed", "seconds": 0.0,
           "warnings": []}
    mask = sitk.ReadImage(str(dest))
    if mask.GetPixelID() == sitk.sitkFloat32:  # --probabilities output
        mask = sitk.Cast(mask >= 0.5, sitk.sitkUInt8)
    return {**row, **measure(mask, None)}


def cmd_segment(args: argparse.Namespace, rep: Reporter) -> int:
    from .cluster import CaseJob, Segmenter, SegmentSettings, dask_client, run_in_process, run_on_dask
    from .cohorts import find_volumes
    from .qc import load_manifest, write_index, write_manifest
    from .segment import resolve_device
    from .store import load_model

    inputs = find_volumes(args.inputs)
    device = resolve_device(args.device)
    mpath = model_path(args.model)
    model = load_model(mpath)
    out = Path(args.output).expanduser()
    mapping, as_folder = output_paths(inputs, out, args.probabilities)
    use_cluster = bool(args.workers or args.scheduler)
    if args.workers is not None and args.workers < 1:
        raise ConvLoRASegError(f"--workers must be at least 1, got {args.workers}")

    # --resume: complete outputs are kept (their old manifest rows too); the rest is checked as usual
    resumed: List[Dict[str, Any]] = []
    todo = list(inputs)
    if args.resume:
        previous: Dict[str, Dict[str, Any]] = {}
        if as_folder and (out / "manifest.json").is_file():
            with contextlib.suppress(ConvLoRASegError):
                previous = {str(r["input"]): r for r in load_manifest(out)}
        todo = []
        for src in inputs:
            if mapping[src].is_file() and _complete_output(src, mapping[src]):
                resumed.append(_resumed_row(src, mapping[src], previous))
            else:
                todo.append(src)
        if resumed:
            rep.info(f"--resume: {len(resumed)} of {len(inputs)} outputs are complete and kept")
    check_outputs({p: mapping[p] for p in todo}, out if as_folder and not out.is_dir() else None, args.overwrite)

    # adapters: --adapter for every input, or per input from --adapter-map; each spec resolved (and checked) once
    specs = {p: args.adapter for p in todo}
    if args.adapter_map:
        specs.update({p: s for p, s in adapter_map(args.adapter_map, inputs).items() if p in specs})
    resolved: Dict[Optional[str], Any] = {}
    for spec in dict.fromkeys(specs.values()):
        resolved[spec] = resolve_adapter(spec, model, args.adapters)
    candidates: Optional[Tuple[str, ...]] = None
    if "auto" in resolved.values():
        candidates = tuple(str(i.path) for i in candidate_adapters(model, args.adapters))
        if not candidates:
            rep.warn("--adapter auto: no adapters of this model in the store; using the source model")
    jobs = []
    for i, src in enumerate(todo):
        a = resolved[specs[src]]
        jobs.append(CaseJob(input=str(src), output=str(mapping[src]), index=i, total=len(todo),
                            adapter=None if a in (None, "auto") else str(a.path),
                            candidates=candidates if a == "auto" else None,
                            check=a not in (None, "auto") and not args.no_scan_check))

    qc_dir = Path(args.qc).expanduser() if args.qc else None
    if qc_dir is not None:
        from .qc import have_matplotlib

        if qc_dir.exists() and not qc_dir.is_dir():
            raise ConvLoRASegError(f"--qc {qc_dir} exists and is not a folder")
        if not have_matplotlib():
            rep.warn("--qc: matplotlib is not installed; index.html is written without pictures "
                     "(pip install matplotlib)")
    settings = SegmentSettings(model=str(mpath), device=str(device) if not use_cluster else args.device,
                               postprocess=not args.no_postprocess, probabilities=args.probabilities,
                               first_volume=args.first_volume, overwrite=args.overwrite,
                               qc_dir=str(qc_dir) if qc_dir is not None else None)

    created = as_folder and not out.is_dir() and bool(todo)
    if created:
        out.mkdir(parents=True, exist_ok=True)
    if qc_dir is not None:
        qc_dir.mkdir(parents=True, exist_ok=True)
    rows: List[Dict[str, Any]] = []

    def on_row(row: Dict[str, Any]) -> None:
        rows.append(row)
        name = Path(row["input"]).name
        if row["status"] == "failed":
            if len(inputs) > 1:
                rep.warn(f"skipped {name}: {row['flags'][0][len('failed: '):]}")
        else:
            for w in row.get("warnings") or []:
                rep.warn(f"{name} {w}")
            extra = "" if args.probabilities else f", brain {row['brain_ml']:.0f} ml"
            score = "" if row.get("agreement") is None else f", agreement {row['agreement']:.3f}"
            flags = f", flags: {', '.join(row['flags'])}" if row.get("flags") else ""
            rep.info(f"{name} -> {row['output']} ({row['seconds']:.1f} s{extra}{score}{flags})")
        if use_cluster:
            rep({"event": "progress", "stage": "cohort", "step": len(rows), "total": len(jobs)})

    def finish_reports() -> Optional[Path]:
        every = resumed + rows
        if qc_dir is not None and every:
            write_index(qc_dir, every)
        if as_folder and every and not (len(inputs) == 1 and rows and rows[0]["status"] == "failed"):
            return write_manifest(out, every)[0]
        return None

    try:
        if not jobs:
            pass
        elif use_cluster:
            with dask_client(workers=args.workers, scheduler=args.scheduler) as client:
                run_on_dask(client, settings, jobs, on_row)
        else:
            run_in_process(Segmenter(settings, model=model), jobs, on_row, progress=rep, log=rep.info)
    except KeyboardInterrupt:
        finish_reports()  # the cases finished before the interrupt are complete files: say so
        raise
    failed = [r for r in rows if r["status"] == "failed"]
    if len(inputs) == 1 and failed:  # a single input: its error is the command's error, nothing written
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise ConvLoRASegError(failed[0]["flags"][0][len("failed: "):])
    manifest = finish_reports()
    if manifest is not None:
        rep.info(f"manifest: {manifest} ({sum(1 for r in resumed + rows if r.get('flags'))} of "
                 f"{len(resumed) + len(rows)} cases flagged)" + (f"; QC report: {qc_dir / 'index.html'}"
                                                                  if qc_dir is not None else ""))
    if failed:
        raise ConvLoRASegError(f"{len(failed)} of {len(inputs)} volumes failed (see the warnings above); "
                               f"{len(rows) - len(failed) + len(resumed)} written")
    rep.done({"command": "segment", "outputs": [r for r in rows if r["status"] != "failed"],
              "resumed": resumed, "manifest": None if manifest is None else str(manifest)})
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------
# adapt
# ---------------------------------------------------------------------------------------------------------------
def target_paths(targets: Sequence[str]) -> List[Path]:
    """Volumes of the target cohort: files, folders, globs, or ``cc359:ROOT:DOMAIN`` (e.g. ``cc359:/data:ge15``)."""
    from .cohorts import cc359_cases, find_volumes

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


def _load_target(path: Path, grid):
    from .volumes import to_slices

    image, warnings = _load_volume(path, grid, first_volume=False)
    return to_slices(image, grid).slices, warnings


def read_target(paths: Sequence[Path], grid, rep: Reporter) -> Tuple[List[Any], List[Path], List[Dict[str, str]]]:
    """Working-grid slices of every readable target volume; unreadable ones are skipped with a warning."""
    stacks, used, skipped = [], [], []
    for i, path, slices in readable(list(paths), lambda p: _load_target(p, grid), rep, skipped):
        rep({"event": "progress", "stage": "read", "step": i + 1, "total": len(paths)})
        stacks.append(slices)
        used.append(path)
    if not stacks:
        raise ConvLoRASegError(f"the target cohort has no readable volumes ({len(skipped)} skipped)")
    return stacks, used, skipped


def cmd_adapt(args: argparse.Namespace, rep: Reporter) -> int:
    from .atomic import check_output_path
    from .labelled_check import apply_check, check_adaptation, read_labelled_scans
    from .selftrain import adapt
    from .segment import resolve_device
    from .store import AdapterStore, check_adapter_name, load_model, save_adapter

    mpath = model_path(args.model)
    model = load_model(mpath)
    device = resolve_device(args.device)
    if args.output:
        dest = Path(args.output).expanduser()
        if not dest.name.endswith(".safetensors"):
            raise ConvLoRASegError(f"an adapter file ends with .safetensors: {dest}")
        name = check_adapter_name(args.name or volume_stem(dest).replace(".safetensors", ""))
    else:
        name = check_adapter_name(args.name)
        dest = AdapterStore(args.adapters).path_for(model.sha256, name)
        dest.parent.mkdir(parents=True, exist_ok=True)
    check_output_path(dest, args.overwrite)
    labelled = read_labelled_scans(args.check) if args.check else []  # bad check files fail before the work
    paths = target_paths(args.targets)
    stacks, used, skipped = read_target(paths, model.grid, rep)

    kwargs: Dict[str, Any] = {k: getattr(args, k) for k in ("method", "mode", "rank", "placement", "seed")}
    for k in ("epochs", "steps_per_epoch", "precision"):
        if getattr(args, k) is not None:
            kwargs[k] = getattr(args, k)
    result = adapt(model, stacks, device=device, progress=rep, **kwargs)
    label_free = result.selected
    check = None
    if labelled:
        check = check_adaptation(model, result, labelled, device, progress=rep)
        result = apply_check(model, result, check)
    rep({"event": "progress", "stage": "save", "step": 0, "total": 1})
    details = {**result.summary(),
               "target": {"n_volumes": len(used), "files": [p.name for p in used],
                          "skipped": [Path(s["input"]).name for s in skipped]}}
    info = save_adapter(model, result.state, dest, name=name, method=result.method, mode=result.mode,
                        rank=result.rank, alpha=result.alpha, placement=result.placement, details=details,
                        overwrite=args.overwrite)
    rep({"event": "progress", "stage": "save", "step": 1, "total": 1})
    base_params, model_bytes = _base_parameters(model), mpath.stat().st_size
    summary = {
        "selected": result.selected, "adapted": result.adapted, "candidates": result.candidates,
        "agreement_source": result.agreement_source, "agreement_selected": result.best_agreement,
        "best_epoch": result.best_epoch, "epochs": result.epochs, "trainable_params": result.trainable_params,
        "trainable_percent": 100.0 * result.trainable_params / base_params, "adapter_bytes": info.bytes,
        "model_bytes": model_bytes, "seconds": round(result.seconds, 1), "n_volumes": len(used),
        "n_skipped": len(skipped), "label_free_selected": label_free,
        "labelled_check": check.to_dict() if check else None}
    scores = ", ".join(f"{k} {v:.3f}" for k, v in result.candidates.items())
    checked = [] if check is None else [
        f"  labelled check on {len(check.scans)} scan(s), surface Dice at 1 mm as segment --adapter delivers it: "
        + ", ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in check.surface_dice.items()),
        f"  label-free selection {label_free}; after the labelled check: {check.selected} ({check.reason})"]
    rep.info("\n".join([
        f"adapter {info.name!r} written to {info.path}",
        f"  target: {len(used)} volumes ({result.n_slices} slices), {len(skipped)} skipped",
        f"  method {result.method} ({result.mode}), rank {result.rank}, placement {result.placement}",
        f"  label-free score of each candidate (ESH agreement + gamma consistency): {scores}",
        *checked,
        f"  selected: {result.selected}",
        f"  trainable parameters: {result.trainable_params:,} = {summary['trainable_percent']:.2f} % of the "
        f"base model's {base_params:,}",
        f"  adapter file {_fmt_bytes(info.bytes)} vs model file {_fmt_bytes(model_bytes)}",
        f"  time {result.seconds:.1f} s"]))
    if check is not None and not result.adapted and label_free != "source":
        rep.warn(f"the adapted model was worse than the unadapted one on the labelled check scans "
                 f"({check.reason}): the adapter {info.name!r} changes nothing; segmenting without it gives the "
                 "same masks")
    elif not result.adapted:
        best = max((v for k, v in result.candidates.items() if k != "source"), default=float("nan"))
        rep.warn(f"adaptation did not beat the unadapted model on the label-free score (source "
                 f"{result.agreement_source:.3f}, best adapted candidate {best:.3f}): the adapter {info.name!r} "
                 "changes nothing; segmenting without it gives the same masks")
    rep.done({"command": "adapt", "adapter": info.to_dict(), "summary": summary})
    return EXIT_OK


def cmd_adapt_dispatch(args: argparse.Namespace, rep: Reporter) -> int:
    """``adapt``: several sites (``--sites``) -> :func:`cmd_adapt_sites`; else the single-site :func:`cmd_adapt`."""
    if args.sites:
        if args.targets or args.output or args.name:
            raise ConvLoRASegError("--sites names the targets and the adapters (one per site, named after it): "
                                   "give no TARGET, -o or --name with it")
        if args.check:
            raise ConvLoRASegError("--check scans belong to one site: adapt that site on its own (TARGET... -o) "
                                   "to check it")
        return cmd_adapt_sites(args, rep)
    if not args.targets:
        raise ConvLoRASegError("adapt needs TARGET volumes (or --sites CSV|DIR for several sites)")
    if not (args.output or args.name):
        raise ConvLoRASegError("adapt needs -o ADAPTER.safetensors or --name NAME")
    if args.workers or args.scheduler:
        raise ConvLoRASegError("--workers/--scheduler spread several sites (--sites); one site adapts in this "
                               "process")
    return cmd_adapt(args, rep)


def cmd_adapt_sites(args: argparse.Namespace, rep: Reporter) -> int:
    """One adaptation per site (in this process one after the other, or as tasks on a Dask cluster); each adapter
    is stored under its site's name. Progress events carry ``site``."""
    from .atomic import check_output_path
    from .cluster import SiteJob, adapt_site, adapt_sites_on_dask, dask_client, site_cohorts
    from .segment import resolve_device
    from .store import AdapterStore, check_adapter_name, read_model_metadata

    mpath = model_path(args.model)
    sha = read_model_metadata(mpath)["weights_sha256"]
    resolve_device(args.device)
    cohorts = site_cohorts(args.sites)
    store = AdapterStore(args.adapters)
    kwargs: Dict[str, Any] = {k: getattr(args, k) for k in ("method", "mode", "rank", "placement", "seed")}
    for k in ("epochs", "steps_per_epoch", "precision"):
        if getattr(args, k) is not None:
            kwargs[k] = getattr(args, k)
    jobs = []
    for site, paths in cohorts.items():
        dest = store.path_for(sha, check_adapter_name(site))
        dest.parent.mkdir(parents=True, exist_ok=True)
        check_output_path(dest, args.overwrite)  # every site checked before the first one starts
        jobs.append(SiteJob(site=site, paths=tuple(str(p) for p in paths), dest=str(dest), model=str(mpath),
                            device=args.device, kwargs=kwargs, overwrite=args.overwrite))
    rep.info(f"adapting {len(jobs)} sites: " + ", ".join(f"{j.site} ({len(j.paths)} volumes)" for j in jobs))
    results: List[Dict[str, Any]] = []

    def on_result(res: Dict[str, Any]) -> None:
        results.append(res)
        if "failed" in res:
            rep.warn(f"site {res['site']}: {res['failed']}")
        else:
            rep.info(f"site {res['site']}: adapter {res['adapter']['name']!r} written to {res['adapter']['path']} "
                     f"({res['n_volumes']} volumes, {res['n_skipped']} skipped; agreement "
                     f"{res['agreement_before']:.3f} -> {res['agreement_after']:.3f}, {res['seconds']:.0f} s)")

    if args.workers or args.scheduler:
        if args.workers is not None and args.workers < 1:
            raise ConvLoRASegError(f"--workers must be at least 1, got {args.workers}")
        with dask_client(workers=args.workers, scheduler=args.scheduler) as client:
            adapt_sites_on_dask(client, jobs, rep, on_result)
    else:
        for job in jobs:
            try:
                res = adapt_site(job, lambda e, _s=job.site: rep({**e, "site": _s}))
            except ConvLoRASegError as exc:
                res = {"site": job.site, "failed": str(exc)}
            on_result(res)
    failed = [r for r in results if "failed" in r]
    if failed:
        raise ConvLoRASegError(f"{len(failed)} of {len(jobs)} sites failed (see the warnings above); "
                               f"{len(jobs) - len(failed)} adapters written")
    rep.done({"command": "adapt", "sites": results})
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace, rep: Reporter) -> int:
    import numpy as np
    import torch

    from .atomic import check_output_path
    from .cohorts import folder_cohort
    from .grid import WorkingGrid
    from .segment import resolve_device
    from .store import load_model, save_model
    from .train import train_source
    from .volumes import check_memory, image_info, mask_to_slices, read_image, to_slices

    out = check_output_path(Path(args.output).expanduser(), args.overwrite)
    device = resolve_device(args.device)
    try:
        grid = WorkingGrid(spacing_mm=args.spacing, slice_size=args.slice_size)
    except ValueError as exc:
        raise ConvLoRASegError(str(exc)) from None
    cases = folder_cohort(args.images, args.masks)
    unlabelled = [c.image.name for c in cases if c.mask is None]
    if unlabelled:
        raise ConvLoRASegError(f"{len(unlabelled)} images have no mask in {args.masks} (e.g. {unlabelled[0]})")
    if not 0.0 <= args.val_fraction < 1.0:
        raise ConvLoRASegError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    for c in cases:
        check_memory(image_info(c.image), grid)
    images, masks = [], []
    for i, c in enumerate(cases):
        rep({"event": "progress", "stage": "read", "step": i, "total": len(cases)})
        vs = to_slices(read_image(c.image), grid)
        images.append(vs.slices)
        masks.append(mask_to_slices(read_image(c.mask), vs))
    order = np.random.default_rng(args.seed).permutation(len(cases))
    n_val = int(round(len(cases) * args.val_fraction))
    if args.val_fraction > 0 and len(cases) >= 2:
        n_val = min(max(n_val, 1), len(cases) - 1)
    val, train = order[:n_val], order[n_val:]
    info = {"trained_with": f"convlora-seg train (ConvLoRASegLib {__version__})",
            "train_images": [cases[i].image.name for i in train], "val_images": [cases[i].image.name for i in val]}
    ckpt = Path(args.checkpoint).expanduser() if args.checkpoint else out.with_name(
        out.name[: -len(".safetensors")] + ".checkpoint.safetensors" if out.name.endswith(".safetensors")
        else out.name + ".checkpoint.safetensors")
    if args.resume and not ckpt.is_file():
        rep.info(f"no checkpoint at {ckpt} yet: starting from step 0")
    model = train_source([images[i] for i in train], [masks[i] for i in train], [images[i] for i in val],
                         [masks[i] for i in val], grid=grid, epochs=args.epochs, esh_epochs=args.esh_epochs,
                         seed=args.seed, device=device, info=info, lr_schedule=args.lr_schedule,
                         init=load_model(Path(args.init).expanduser()) if args.init else None, progress=rep,
                         batch_size=args.batch_size, lr=args.lr, precision=args.precision,
                         out_scale=args.out_scale, out_lr_mult=args.out_lr_mult, augment_3d=args.augment_3d,
                         synth=args.synth, bn_statistics=args.bn_statistics, steps_per_epoch=args.steps_per_epoch, checkpoint=ckpt,
                         checkpoint_every=args.checkpoint_every, resume=args.resume)
    sha = save_model(model, out, dtype=torch.float16 if args.fp16 else torch.float32, overwrite=args.overwrite)
    record = model.info.get("training", {})
    rep.info(f"model written to {out} ({_fmt_bytes(out.stat().st_size)}, sha256 {sha[:12]}…): "
             f"{len(train)} training / {len(val)} validation volumes, best epoch {record.get('best_epoch')}, "
             f"validation surface Dice {record.get('best_val_surface_dice', 'n/a')}, {record.get('seconds')} s")
    rep.done({"command": "train", "model": str(out), "sha256": sha, "training": record})
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------------
def _match_key(path: Path) -> str:
    from .cohorts import MASK_SUFFIXES

    stem = volume_stem(path).lower()
    for suffix in sorted(MASK_SUFFIXES + ("_brainprob",), key=len, reverse=True):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def evaluation_pairs(pred: Path, truth: Path) -> List[Tuple[Path, Path]]:
    """(prediction, truth) pairs: two files, or two folders matched by name (mask suffixes ignored)."""
    from .cohorts import find_volumes

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


def _read_mask(path: Path):
    import SimpleITK as sitk

    from .volumes import image_info

    info = image_info(path)
    if info.dimension != 3 or info.n_components != 1:
        raise ConvLoRASegError(f"{path.name} is not a 3D label image")
    return sitk.ReadImage(str(path))


def evaluate_pair(pred_path: Path, truth_path: Path, tolerance_mm: float) -> Dict[str, Any]:
    """Dice, surface Dice at ``tolerance_mm``, HD95 (mm) and volumes (ml); a prediction on another grid is
    resampled (nearest neighbour) onto the truth's."""
    import numpy as np
    import SimpleITK as sitk

    from .metrics import dice, hd95, surface_dice, volume_difference
    from .volumes import same_grid

    pred, truth = _read_mask(pred_path), _read_mask(truth_path)
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


def cmd_evaluate(args: argparse.Namespace, rep: Reporter) -> int:
    import numpy as np

    pairs = evaluation_pairs(Path(args.pred).expanduser(), Path(args.truth).expanduser())
    rows = []
    for i, (p, t) in enumerate(pairs):
        rep({"event": "progress", "stage": "evaluate", "step": i, "total": len(pairs)})
        rows.append(evaluate_pair(p, t, args.tolerance))
    keys = ("dice", "surface_dice", "hd95_mm", "volume_diff_ml")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    rep.info(f"{'prediction':<32} {'Dice':>7} {'SDice@' + format(args.tolerance, 'g') + 'mm':>11} "
             f"{'HD95 mm':>8} {'dVol ml':>8}")
    for r in rows + ([{"pred": "mean", **mean}] if len(rows) > 1 else []):
        rep.info(f"{Path(r['pred']).name[:32]:<32} {r['dice']:>7.4f} {r['surface_dice']:>11.4f} "
                 f"{r['hd95_mm']:>8.2f} {r['volume_diff_ml']:>8.1f}")
    rep.done({"command": "evaluate", "tolerance_mm": args.tolerance, "cases": rows, "mean": mean})
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------
# info, adapters, import-checkpoint
# ---------------------------------------------------------------------------------------------------------------
def _file_format(path: Path) -> Optional[str]:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:  # noqa: BLE001 - unreadable files get the store's own message below
        return None


def cmd_info(args: argparse.Namespace, rep: Reporter) -> int:
    from .store import ADAPTER_FORMAT, load_adapter, load_model, read_adapter_info, read_model_metadata

    path = Path(args.file).expanduser()
    if _file_format(path) != ADAPTER_FORMAT:
        meta = read_model_metadata(path)
        lines = [f"model {path}", f"  weights sha256 {meta.get('weights_sha256')}",
                 f"  file sha256    {meta['file_sha256']}", f"  size {_fmt_bytes(meta['bytes'])}, "
                 f"{meta['n_parameters']:,} parameters", f"  architecture {meta.get('architecture')}",
                 f"  working grid {meta.get('grid')}", f"  library {meta.get('library_version')}"]
        training = (meta.get("info") or {}).get("training")
        if training:
            lines.append(f"  training {training}")
        rep.info("\n".join(lines))
        rep.done({"command": "info", "kind": "model", "path": str(path), **meta})
        return EXIT_OK
    info = read_adapter_info(path)
    result: Dict[str, Any] = {"command": "info", "kind": "adapter", **info.to_dict()}
    lines = [f"adapter {info.name!r} ({path})", f"  base model sha256 {info.base_sha256}",
             f"  method {info.method} ({info.mode}), rank {info.rank}, placement {info.placement}",
             f"  created {info.created}, agreement {info.agreement}",
             f"  {info.n_params:,} parameters, {_fmt_bytes(info.bytes)}"]
    with contextlib.suppress(ConvLoRASegError):
        base = load_model(model_path(args.model))
        if base.sha256 == info.base_sha256:
            load_adapter(base, path)  # verifies the adapter's checksum too
            base_params = _base_parameters(base)
            result["percent_of_base_model"] = 100.0 * info.n_params / base_params
            lines.append(f"  = {result['percent_of_base_model']:.2f} % of its base model's {base_params:,} parameters")
    rep.info("\n".join(lines))
    rep.done(result)
    return EXIT_OK


def cmd_adapters(args: argparse.Namespace, rep: Reporter) -> int:
    from .store import AdapterStore, read_model_metadata

    store = AdapterStore(args.adapters)
    action = args.action

    def sha() -> str:
        return read_model_metadata(model_path(args.model))["weights_sha256"]

    if action == "list":
        infos = store.list(sha())
        if not infos:
            rep.info(f"no adapters for this model in {store.root}")
        for i in infos:
            agreement = "-" if i.agreement is None else f"{i.agreement:.3f}"
            rep.info(f"{i.name:<24} {i.method:<15} agreement {agreement:>6}  {_fmt_bytes(i.bytes):>9}  {i.created}")
        rep.done({"command": "adapters", "store": str(store.root), "adapters": [i.to_dict() for i in infos]})
        return EXIT_OK
    if action == "import":
        _need(args.args, 1, "adapters import FILE")
        info = store.add(Path(args.args[0]).expanduser(), name=args.name, overwrite=args.overwrite)
        rep.info(f"imported {info.name!r} into {info.path}")
        rep.done({"command": "adapters", "adapter": info.to_dict()})
    elif action == "export":
        _need(args.args, 2, "adapters export NAME DEST")
        dest = store.export(sha(), args.args[0], Path(args.args[1]).expanduser(), overwrite=args.overwrite)
        rep.info(f"exported {args.args[0]!r} to {dest}")
        rep.done({"command": "adapters", "exported": str(dest)})
    elif action == "rename":
        _need(args.args, 2, "adapters rename NAME NEW")
        info = store.rename(sha(), args.args[0], args.args[1])
        rep.info(f"renamed {args.args[0]!r} to {info.name!r}")
        rep.done({"command": "adapters", "adapter": info.to_dict()})
    elif action == "delete":
        _need(args.args, 1, "adapters delete NAME")
        store.delete(sha(), args.args[0])
        rep.info(f"deleted {args.args[0]!r}")
        rep.done({"command": "adapters", "deleted": args.args[0]})
    return EXIT_OK


def _need(values: Sequence[str], n: int, usage: str) -> None:
    if len(values) != n:
        raise ConvLoRASegError(f"usage: convlora-seg {usage}")


def cmd_import_checkpoint(args: argparse.Namespace, rep: Reporter) -> int:
    import torch

    from .atomic import check_output_path
    from .convlora import lora_layers
    from .grid import WorkingGrid
    from .model import ConvLoRASegModel
    from .store import save_model
    from .unet import import_reference_checkpoint

    out = check_output_path(Path(args.output).expanduser(), args.overwrite)
    try:
        grid = WorkingGrid(spacing_mm=args.spacing, slice_size=args.slice_size, normalisation=args.normalisation)
    except ValueError as exc:
        raise ConvLoRASegError(str(exc)) from None
    unet = import_reference_checkpoint(args.checkpoint, n_filters=args.n_filters)
    if lora_layers(unet):
        raise ConvLoRASegError(f"{Path(args.checkpoint).name} holds ConvLoRA factors (an adapted model); "
                               "import the source model's checkpoint")
    model = ConvLoRASegModel(grid=grid, n_filters=args.n_filters, esh_level=args.esh_level,
                             info={"imported_from": Path(args.checkpoint).name})
    model.unet.load_state_dict(unet.state_dict())
    if args.esh:
        try:
            state = torch.load(args.esh, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure here is the file's fault
            raise ConvLoRASegError(f"cannot read {Path(args.esh).name} as a state dict without pickle: "
                                   f"{str(exc).splitlines()[0]}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        try:
            model.esh.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        except (RuntimeError, AttributeError) as exc:
            raise ConvLoRASegError(f"{Path(args.esh).name} does not match the ESH at level {args.esh_level}: "
                                   f"{str(exc).splitlines()[0]}") from None
        model.info["esh_imported_from"] = Path(args.esh).name
    else:
        rep.warn("no --esh given: the early segmentation head is untrained, so this model can segment but "
                 "its label-free agreement and adaptation are meaningless")
    sha = save_model(model, out, overwrite=args.overwrite)
    rep.info(f"model written to {out} (sha256 {sha[:12]}…)")
    rep.info("note: the paper's code slices the native grid (sagittal array axis 0, rotated, edge-padded to a "
             "square); this model resamples every scan to an isotropic "
             f"{grid.spacing_mm:g} mm grid of {grid.slice_size} px centred on the head, so give --spacing and "
             "--slice-size of the scans it was trained on")
    rep.done({"command": "import-checkpoint", "model": str(out), "sha256": sha})
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, rep: Reporter) -> int:
    from .demo import run_demo

    result = run_demo(Path(args.output).expanduser(), quick=args.quick,
                      model=Path(args.model).expanduser() if args.model else None, site=args.site,
                      progress=rep, log=rep.info)
    rep.done({"command": "demo", **result.to_dict()})
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, device: bool = True, model: bool = True) -> None:
    if model:
        p.add_argument("--model", metavar="M", help="model file (.safetensors); default: the bundled model")
    if device:
        p.add_argument("--device", default="auto", metavar="D",
                       help="auto (GPU if present, else CPU), cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--json", action="store_true", help="one JSON object per line on stdout (progress, result)")


def _cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, metavar="N", help="run on a local Dask cluster of N processes (needs "
                                                            "the [cluster] extra); default: in this process")
    p.add_argument("--scheduler", metavar="ADDRESS|FILE", help="run on a running Dask cluster: its scheduler "
                                                               "address (tcp://host:8786) or scheduler file")


def build_parser() -> argparse.ArgumentParser:
    """The ``convlora-seg`` argument parser."""
    from .selftrain import METHODS, MODES

    parser = argparse.ArgumentParser(
        prog="convlora-seg", description="Brain masks for MRI volumes, and label-free adapters for new scanners "
                                         "(ConvLoRA + AdaBN + self-training).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("segment", help="brain masks for volumes (same grid as the input)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, glob patterns, DICOM folders")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output file for one input, or a folder (created) for several")
    p.add_argument("--adapter", metavar="A", help="adapter file, a name in the store, or 'auto' (best label-free "
                                                  "agreement on each scan); default: none")
    p.add_argument("--adapters", metavar="DIR", help="where 'auto' and names look (default: the user store)")
    p.add_argument("--no-scan-check", action="store_true",
                   help="use the given adapter on every scan; by default each scan is also segmented without it and "
                        "the adapter is used only where it scores better (label-free), with a warning where not")
    p.add_argument("--no-postprocess", action="store_true",
                   help="skip the leak cut, largest component and hole filling")
    p.add_argument("--probabilities", action="store_true", help="write float32 probabilities, not a mask")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--first-volume", action="store_true", help="for a 4D input, segment its first volume")
    p.add_argument("--adapter-map", metavar="CSV", help="per-input adapters: a CSV with columns input,adapter "
                                                        "(file, store name, auto or none); others use --adapter")
    p.add_argument("--resume", action="store_true", help="keep the outputs that exist and are complete; do the rest")
    p.add_argument("--qc", metavar="DIR", help="write a picture per case and DIR/index.html, worst case first")
    _cluster_options(p)
    _common(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("adapt", help="learn an adapter for a new scanner from unlabelled volumes")
    p.add_argument("targets", nargs="*", metavar="TARGET", help="files, folders, globs or cc359:ROOT:DOMAIN")
    p.add_argument("--sites", metavar="CSV|DIR", help="several sites at once: a CSV with columns site,path or a "
                                                      "folder with one sub-folder per site; one adapter per site, "
                                                      "stored under the site's name")
    dest = p.add_mutually_exclusive_group()
    dest.add_argument("-o", "--output", metavar="ADAPTER", help="adapter file to write (.safetensors)")
    dest.add_argument("--name", help="store the adapter under this name in the user store")
    p.add_argument("--adapters", metavar="DIR", help="store folder for --name (default: the user store)")
    p.add_argument("--method", default="convlora-adabn", choices=METHODS)
    p.add_argument("--mode", default="fast", choices=MODES, help="fast (default) or the paper's exact recipe")
    p.add_argument("--epochs", type=int, metavar="N", help="training epochs (default: the library's)")
    p.add_argument("--steps-per-epoch", type=int, metavar="N",
                   help="optimiser steps per epoch, 0 = every slice (default: 8 in fast mode, all in paper mode)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast of the forward passes (default: auto = bf16 where native in fast mode, fp32 in "
                        "paper mode)")
    p.add_argument("--rank", type=int, default=2, metavar="R", help="ConvLoRA rank (default 2)")
    p.add_argument("--placement", default="init_path", metavar="P", help="where ConvLoRA goes (default init_path)")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--check", nargs=2, action="append", metavar=("IMAGE", "MASK"),
                   help="a labelled scan of the target site and its brain mask (repeatable): every candidate is "
                        "checked on it and the adapter never ends worse than no adapter there (optional; the "
                        "adaptation itself needs no labels)")
    p.add_argument("--overwrite", action="store_true")
    _cluster_options(p)
    _common(p)
    p.set_defaults(func=cmd_adapt_dispatch)

    p = sub.add_parser("train", help="train a source model from images and brain masks")
    p.add_argument("--images", required=True, metavar="DIR")
    p.add_argument("--masks", required=True, metavar="DIR", help="masks named like the images (+ _mask etc.)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL")
    p.add_argument("--spacing", type=float, default=2.0, metavar="MM", help="working-grid spacing (default 2)")
    p.add_argument("--slice-size", type=int, default=128, metavar="N", help="slice size in voxels (default 128)")
    p.add_argument("--epochs", type=int, default=20, metavar="N")
    p.add_argument("--esh-epochs", type=int, default=10, metavar="N")
    p.add_argument("--val-fraction", type=float, default=0.2, metavar="F")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="constant learning rate (the paper) or cosine decay to 0")
    p.add_argument("--init", metavar="MODEL", help="continue training from this model's weights")
    p.add_argument("--batch-size", type=int, default=32, metavar="N")
    p.add_argument("--lr", type=float, default=1e-3, metavar="LR")
    p.add_argument("--steps-per-epoch", type=int, metavar="N",
                   help="optimiser steps per epoch (default: one pass over the epoch's slices)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="autocast of training (auto: bf16 where the CPU/GPU has it natively)")
    p.add_argument("--augment-3d", type=int, default=0, metavar="K",
                   help="TorchIO-augmented copies of each volume per epoch (needs the train extra; default 0)")
    p.add_argument("--synth", type=float, default=0.0, metavar="P",
                   help="share of those copies whose intensities are synthesised from tissue classes "
                        "(SynthStrip-style: scalp and neck take any brightness; default 0)")
    p.add_argument("--bn-statistics", choices=("momentum", "recalibrated"), default="momentum",
                   help="BatchNorm statistics of the model: training's running averages over augmented batches, "
                        "or recalibrated on the plain training volumes the way AdaBN computes a target's "
                        "(default momentum)")
    p.add_argument("--out-scale", type=float, default=OUT_SCALE_DEFAULT, metavar="S",
                   help=f"initial weight of the final BatchNorm, the logits' scale (default {OUT_SCALE_DEFAULT})")
    p.add_argument("--out-lr-mult", type=float, default=1.0, metavar="M",
                   help="learning-rate multiplier of the final BatchNorm (default 1)")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="training checkpoint (default: OUTPUT with .checkpoint.safetensors)")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                   help="write the checkpoint every N steps and after every epoch (default 50; 0: epochs only)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint if there is one")
    p.add_argument("--fp16", action="store_true", help="store weights in float16 (half the file size)")
    p.add_argument("--overwrite", action="store_true")
    _common(p, model=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="Dice, surface Dice, HD95 and volume difference")
    p.add_argument("pred", metavar="PRED", help="predicted mask file, or folder")
    p.add_argument("truth", metavar="TRUTH", help="true mask file, or folder (matched by name)")
    p.add_argument("--tolerance", type=float, default=1.0, metavar="MM", help="surface Dice tolerance (1 mm)")
    _common(p, device=False, model=False)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("info", help="what a model or adapter file holds")
    p.add_argument("file", metavar="FILE")
    _common(p, device=False)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("adapters", help="list/import/export/rename/delete adapters in the user store")
    p.add_argument("action", nargs="?", default="list", choices=("list", "import", "export", "rename", "delete"))
    p.add_argument("args", nargs="*", metavar="ARG")
    p.add_argument("--name", help="name for 'import' (default: the adapter's own)")
    p.add_argument("--adapters", metavar="DIR", help="store folder (default: the user store)")
    p.add_argument("--overwrite", action="store_true")
    _common(p, device=False)
    p.set_defaults(func=cmd_adapters)

    p = sub.add_parser("import-checkpoint", help="convert the paper's U-Net .pth (no pickle execution)")
    p.add_argument("checkpoint", metavar="UNET.pth")
    p.add_argument("--esh", metavar="ESH.pth", help="the early segmentation head's .pth")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.safetensors")
    p.add_argument("--spacing", type=float, required=True, metavar="MM", help="working-grid spacing it expects")
    p.add_argument("--slice-size", type=int, required=True, metavar="N", help="slice size it expects")
    p.add_argument("--n-filters", type=int, default=16, metavar="N")
    p.add_argument("--esh-level", type=int, default=3, metavar="L")
    p.add_argument("--normalisation", choices=("minmax", "percentile"), default="minmax",
                   help="intensity scaling it was trained with (default minmax: the paper's code scales each "
                        "volume to [0, 1] by its minimum and maximum)")
    p.add_argument("--overwrite", action="store_true")
    _common(p, device=False, model=False)
    p.set_defaults(func=cmd_import_checkpoint)

    p = sub.add_parser("demo", help="simulate a new scanner, adapt to it, show before/after (a few minutes)")
    p.add_argument("-o", "--output", default="convlora-demo", metavar="DIR", help="default ./convlora-demo")
    p.add_argument("--quick", action="store_true", help="one adaptation epoch instead of two")
    p.add_argument("--site", default="philips3", help="simulated target site (default philips3)")
    _common(p, device=False)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``convlora-seg`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rep = Reporter.for_cli("--json" in argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors (argparse printed them)
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USER_ERROR
    CANCEL_REQUESTED.clear()
    try:
        with sigterm_as_interrupt(), cancel_file_as_interrupt(os.environ.get("CONVLORASEG_CANCEL_FILE")):
            return int(args.func(args, rep))
    except ConvLoRASegError as exc:
        if CANCEL_REQUESTED.is_set():  # the interrupt surfaced as a library's error (see CANCEL_REQUESTED)
            rep.cancelled()
            return EXIT_CANCELLED
        rep.error(str(exc))
        return EXIT_USER_ERROR
    except (KeyboardInterrupt, Cancelled):
        rep.cancelled()
        return EXIT_CANCELLED
    except Exception:
        if not CANCEL_REQUESTED.is_set():
            raise
        rep.cancelled()
        return EXIT_CANCELLED
    finally:
        rep.close_bar()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
