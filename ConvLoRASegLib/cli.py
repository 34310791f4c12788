"""``convlora-seg``: brain masks for whole volumes, scanner adapters, training, evaluation — from the shell.

Every subcommand is a thin layer over the library: parse arguments, call the library with one progress callback
(:class:`~ConvLoRASegLib.progress.Reporter`), print the result. The library checks inputs and outputs *before*
heavy work; a cohort run is :func:`ConvLoRASegLib.batch.segment_cohort`. Nothing in the library imports this file.

Exit status: 0 done; 2 a user error (``ConvLoRASegError``: one line on stderr, and ``{"event": "error"}`` with
``--json``; nothing written); 130 cancelled by Ctrl-C or SIGTERM (no partial output file: every writer is
atomic). Run ``convlora-seg <command> --help`` for each command's options.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from . import __version__
from .batch import output_paths  # noqa: F401 - named here for scripts (bench/cohort.py)
from .cohorts import volume_stem
from .errors import Cancelled, ConvLoRASegError
from .jobs import CANCEL_FILE_ENV, CANCEL_REQUESTED, cancel_file_as_interrupt, sigterm_as_interrupt
from .progress import Reporter, byte_size

EXIT_OK, EXIT_USER_ERROR, EXIT_CANCELLED = 0, 2, 130
#: = train.OUT_SCALE (not imported: the parser must not import torch; a test keeps the two equal).
OUT_SCALE_DEFAULT = 6.0


def model_path(arg: Optional[str]) -> Path:
    """``--model`` or the bundled default model (:func:`ConvLoRASegLib.store.model_file`)."""
    from .store import model_file

    return model_file(arg)


def _adapt_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    kwargs: Dict[str, Any] = {k: getattr(args, k) for k in ("method", "mode", "rank", "placement", "seed")}
    kwargs.update({k: getattr(args, k) for k in ("epochs", "steps_per_epoch", "precision")
                   if getattr(args, k) is not None})
    return kwargs


def _base_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# segment
# ---------------------------------------------------------------------------------------------------------------
def cmd_segment(args: argparse.Namespace, rep: Reporter) -> int:
    from .batch import segment_cohort

    if args.workers is not None and args.workers < 1:
        raise ConvLoRASegError(f"--workers must be at least 1, got {args.workers}")
    runner = None
    if args.workers or args.scheduler:
        from .cluster import dask_runner

        runner = dask_runner(workers=args.workers, scheduler=args.scheduler)

    def on_row(row: Dict[str, Any]) -> None:
        name = Path(row["input"]).name
        if row["status"] == "failed":
            return  # the library warned (or, for a single input, raises its error)
        for w in row.get("warnings") or []:
            rep.warn(f"{name} {w}")
        extra = "" if args.probabilities else f", brain {row['brain_ml']:.0f} ml"
        score = "" if row.get("agreement") is None else f", ESH agreement {row['agreement']:.3f}"
        flags = f", flags: {', '.join(row['flags'])}" if row.get("flags") else ""
        rep.info(f"{name} -> {row['output']} ({row['seconds']:.1f} s{extra}{score}{flags})")

    result = segment_cohort(
        args.inputs, args.output, model=args.model, adapter=args.adapter, adapter_map_csv=args.adapter_map,
        adapters_dir=args.adapters, scan_check=not args.no_scan_check, postprocess=not args.no_postprocess,
        probabilities=args.probabilities, first_volume=args.first_volume, overwrite=args.overwrite,
        resume=args.resume, qc_dir=args.qc, device=args.device, runner=runner, progress=rep, on_row=on_row,
        log=rep.info, warn=rep.warn)
    every = result.all_rows
    if result.manifest is not None:
        rep.info(f"manifest: {result.manifest} ({sum(1 for r in every if r.get('flags'))} of {len(every)} cases "
                 "flagged)" + (f"; QC report: {result.qc_index}" if result.qc_index is not None else ""))
    if result.failed:
        raise ConvLoRASegError(f"{len(result.failed)} of {result.n_inputs} volumes failed (see the warnings above); "
                               f"{len(result.done) + len(result.resumed)} written")
    rep.done({"command": "segment", "outputs": result.done, "resumed": result.resumed,
              "manifest": None if result.manifest is None else str(result.manifest)})
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------
# adapt
# ---------------------------------------------------------------------------------------------------------------
def cmd_adapt(args: argparse.Namespace, rep: Reporter) -> int:
    from .atomic import check_output_path

    if args.output:  # before torch is imported and the model loaded: an existing adapter file is refused at once
        dest = Path(args.output).expanduser()
        if not dest.name.endswith(".safetensors"):
            raise ConvLoRASegError(f"an adapter file ends with .safetensors: {dest}")
        check_output_path(dest, args.overwrite)
    from .batch import adapt_cohort, target_paths
    from .labelled_check import read_labelled_scans
    from .segment import resolve_device
    from .store import AdapterStore, check_adapter_name, load_model

    mpath = model_path(args.model)
    model = load_model(mpath)
    device = resolve_device(args.device)
    if args.output:
        name = check_adapter_name(args.name or volume_stem(dest).replace(".safetensors", ""))
    else:  # the store's path depends on the model
        name = check_adapter_name(args.name)
        dest = AdapterStore(args.adapters).path_for(model.sha256, name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        check_output_path(dest, args.overwrite)
    labelled = read_labelled_scans(args.check) if args.check else []  # bad check files fail before the work
    run = adapt_cohort(model, target_paths(args.targets), dest, name, labelled=labelled, device=device,
                       overwrite=args.overwrite, progress=rep, warn=rep.warn, log=rep.info, **_adapt_kwargs(args))
    info, model_bytes = run.info, mpath.stat().st_size
    summary = run.summary(model_bytes)
    lines, warning = run.report(model_bytes)
    rep.info("\n".join(lines))
    if warning:
        rep.warn(warning)
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
    from .cluster import adapt_sites, site_jobs
    from .segment import resolve_device

    resolve_device(args.device)
    if args.workers is not None and args.workers < 1:
        raise ConvLoRASegError(f"--workers must be at least 1, got {args.workers}")
    jobs = site_jobs(args.sites, model_path(args.model), args.adapters, args.device, _adapt_kwargs(args),
                     args.overwrite)
    rep.info(f"adapting {len(jobs)} sites: " + ", ".join(f"{j.site} ({len(j.paths)} volumes)" for j in jobs))
    results: List[Dict[str, Any]] = []

    def on_result(res: Dict[str, Any]) -> None:
        results.append(res)
        if "failed" in res:
            rep.warn(f"site {res['site']}: {res['failed']}")
        else:
            rep.info(f"site {res['site']}: adapter {res['adapter']['name']!r} written to {res['adapter']['path']} "
                     f"({res['n_volumes']} volumes, {res['n_skipped']} skipped; label-free score "
                     f"{res['score_before']:.3f} -> {res['score_after']:.3f}, {res['seconds']:.0f} s)")

    adapt_sites(jobs, rep, on_result, workers=args.workers, scheduler=args.scheduler)
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
    import torch

    from .atomic import check_output_path
    from .batch import read_training_cohort
    from .grid import WorkingGrid
    from .segment import resolve_device
    from .store import load_model, save_model
    from .train import train_source

    out = check_output_path(Path(args.output).expanduser(), args.overwrite)
    device = resolve_device(args.device)
    try:
        grid = WorkingGrid(spacing_mm=args.spacing, slice_size=args.slice_size)
    except ValueError as exc:
        raise ConvLoRASegError(str(exc)) from None
    targets = args.targets.replace("-", "_")
    cohort = read_training_cohort(args.images, args.masks, grid, args.val_fraction, args.seed, progress=rep,
                                  partial_volume=targets == "partial_volume")
    images, masks, train, val = cohort.images, cohort.masks, cohort.train, cohort.val
    info = {"trained_with": f"convlora-seg train (ConvLoRASegLib {__version__})",
            "train_images": [cohort.names[i] for i in train], "val_images": [cohort.names[i] for i in val]}
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
                         synth=args.synth, bn_statistics=args.bn_statistics, steps_per_epoch=args.steps_per_epoch,
                         checkpoint=ckpt, checkpoint_every=args.checkpoint_every, resume=args.resume, targets=targets,
                         bias_field=args.bias_field)
    sha = save_model(model, out, dtype=torch.float16 if args.fp16 else torch.float32, overwrite=args.overwrite)
    record = model.info.get("training", {})
    rep.info(f"model written to {out} ({byte_size(out.stat().st_size)}, sha256 {sha[:12]}…): "
             f"{len(train)} training / {len(val)} validation volumes, best epoch {record.get('best_epoch')}, "
             f"validation surface Dice {record.get('best_val_surface_dice', 'n/a')}, {record.get('seconds')} s")
    rep.done({"command": "train", "model": str(out), "sha256": sha, "training": record})
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------------
def cmd_evaluate(args: argparse.Namespace, rep: Reporter) -> int:
    from .batch import evaluate_cohort

    rows, mean = evaluate_cohort(args.pred, args.truth, args.tolerance, progress=rep)
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
def cmd_info(args: argparse.Namespace, rep: Reporter) -> int:
    from .batch import parameter_lines
    from .store import ADAPTER_FORMAT, file_format, load_adapter, load_model, read_adapter_info, read_model_metadata

    bundled = (args.file or "bundled").lower() in ("bundled", "default")
    path = model_path(None) if bundled else Path(args.file).expanduser()
    if not path.exists():
        raise ConvLoRASegError(f"{path}: no such file")
    kind = file_format(path)
    if kind is None:
        raise ConvLoRASegError(f"{path.name} is not a .safetensors file: info describes a model or adapter "
                               ".safetensors file (no FILE or 'bundled': the bundled default model)")
    if kind != ADAPTER_FORMAT:
        meta = read_model_metadata(path)
        lines = [f"model {path}" + (" (the bundled default model)" if bundled else ""), f"  weights sha256 {meta.get('weights_sha256')}",
                 f"  file sha256    {meta['file_sha256']}", f"  size {byte_size(meta['bytes'])}, "
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
             f"  created {info.created}, label-free score (ESH agreement + gamma consistency) "
             + ("-" if info.score is None else f"{info.score:.3f}")]
    base_params = None
    with contextlib.suppress(ConvLoRASegError):
        base = load_model(model_path(args.model))
        if base.sha256 == info.base_sha256:
            load_adapter(base, path)  # verifies the adapter's checksum too
            base_params = result["base_params"] = _base_parameters(base)
            result["trainable_percent"] = 100.0 * info.trainable_params / base_params
    lines += parameter_lines(info.method, info.trainable_params, info.stored_values, base_params, info.bytes)
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
            score = "-" if i.score is None else f"{i.score:.3f}"
            rep.info(f"{i.name:<24} {i.method:<15} label-free score {score:>6}  {byte_size(i.bytes):>9}  {i.created}")
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
    from .atomic import check_output_path
    from .grid import WorkingGrid
    from .model import import_reference_model
    from .store import save_model

    out = check_output_path(Path(args.output).expanduser(), args.overwrite)
    try:
        grid = WorkingGrid(spacing_mm=args.spacing, slice_size=args.slice_size, normalisation=args.normalisation)
    except ValueError as exc:
        raise ConvLoRASegError(str(exc)) from None
    model = import_reference_model(args.checkpoint, grid, n_filters=args.n_filters, esh_level=args.esh_level,
                                   esh=args.esh)
    if not args.esh:
        rep.warn("no --esh given: the early segmentation head is untrained, so this model can segment but "
                 "its label-free score and adaptation are meaningless")
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
    from .constants import ADAPT_EPOCHS, METHODS, MODES, ONE_SCAN_EPOCHS, PLACEMENTS

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
                                                  "score on each scan); default: none")
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
    p.add_argument("--method", default="convlora-adabn", choices=METHODS,
                   help="convlora-adabn (default: the target's BatchNorm statistics, AdaBN, then ConvLoRA trained "
                        "label-free through the early segmentation head, UDAS), adabn (the statistics only), or the "
                        "other methods of the paper's Table 1")
    p.add_argument("--mode", default="fast", choices=MODES, help="fast (default) or the paper's exact recipe")
    p.add_argument("--epochs", type=int, metavar="N",
                   help=f"training epochs (default {ADAPT_EPOCHS}; {ONE_SCAN_EPOCHS} in fast mode on one scan; "
                        "0: AdaBN only)")
    p.add_argument("--steps-per-epoch", type=int, metavar="N",
                   help="optimiser steps per epoch, 0 = every slice (default: 8 in fast mode, all in paper mode)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast of the forward passes (default: auto = bf16 where native in fast mode, fp32 in "
                        "paper mode)")
    p.add_argument("--rank", type=int, default=2, metavar="R", help="ConvLoRA rank (default 2)")
    p.add_argument("--placement", default="init_path", choices=PLACEMENTS,
                   help=f"where ConvLoRA goes: {', '.join(PLACEMENTS)} (default init_path, the paper's)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the initialisation and batch order: the same seed, the same adapter (default 0)")
    p.add_argument("--check", nargs=2, action="append", metavar=("IMAGE", "MASK"),
                   help="a labelled scan of the target site and its brain mask (repeatable): every candidate is "
                        "checked on it and the adapter never ends worse than no adapter there (optional; the "
                        "adaptation itself needs no labels)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing adapter file or store entry")
    _cluster_options(p)
    _common(p)
    p.set_defaults(func=cmd_adapt_dispatch)

    p = sub.add_parser("train", help="train a source model from images and brain masks")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of training images")
    p.add_argument("--masks", required=True, metavar="DIR", help="masks named like the images (+ _mask etc.)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write (.safetensors)")
    p.add_argument("--spacing", type=float, default=2.0, metavar="MM", help="working-grid spacing (default 2)")
    p.add_argument("--slice-size", type=int, default=128, metavar="N", help="slice size in voxels (default 128)")
    p.add_argument("--epochs", type=int, default=20, metavar="N", help="U-Net training epochs (default 20)")
    p.add_argument("--esh-epochs", type=int, default=10, metavar="N", help="ESH training epochs (default 10)")
    p.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                   help="share of the volumes held out to pick the best epoch (default 0.2)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the split and training (default 0)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="constant learning rate (the paper) or cosine decay to 0")
    p.add_argument("--init", metavar="MODEL", help="continue training from this model's weights")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="slices per step (default 32)")
    p.add_argument("--lr", type=float, default=1e-3, metavar="LR", help="Adam learning rate (default 1e-3)")
    p.add_argument("--steps-per-epoch", type=int, metavar="N",
                   help="optimiser steps per epoch (default: one pass over the epoch's slices)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="autocast of training (auto: bf16 where the CPU/GPU has it natively)")
    p.add_argument("--augment-3d", type=int, default=0, metavar="K",
                   help="TorchIO-augmented copies of each volume per epoch (needs the train extra; default 0)")
    p.add_argument("--synth", type=float, default=0.0, metavar="P",
                   help="share of those copies whose intensities are synthesised from tissue classes "
                        "(SynthStrip-style: scalp and neck take any brightness; default 0)")
    p.add_argument("--bias-field", type=float, metavar="C",
                   help="largest bias-field coefficient of those copies (TorchIO, log intensity; default 0.6, "
                        "the recipe's): larger for scanners that leave the receive-coil field in the image")
    p.add_argument("--bn-statistics", choices=("momentum", "recalibrated"), default="momentum",
                   help="BatchNorm statistics of the model: training's running averages over augmented batches, "
                        "or recalibrated on the plain training volumes the way AdaBN computes a target's "
                        "(default momentum)")
    p.add_argument("--targets", choices=("binary", "partial-volume"), default="binary",
                   help="what the network learns: the masks as 0/1 on the working grid, or each working voxel's "
                        "share of brain (its surface then lies between working voxels; default binary)")
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
    p.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    _common(p, model=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="Dice, surface Dice, HD95 and volume difference")
    p.add_argument("pred", metavar="PRED", help="predicted mask file, or folder")
    p.add_argument("truth", metavar="TRUTH", help="true mask file, or folder (matched by name)")
    p.add_argument("--tolerance", type=float, default=1.0, metavar="MM", help="surface Dice tolerance (1 mm)")
    _common(p, device=False, model=False)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("info", help="what a model or adapter file holds")
    p.add_argument("file", metavar="FILE", nargs="?", help="a model or adapter .safetensors file; none or 'bundled': "
                                                          "the bundled default model")
    _common(p, device=False)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("adapters", help="list/import/export/rename/delete adapters in the user store")
    p.add_argument("action", nargs="?", default="list", choices=("list", "import", "export", "rename", "delete"),
                   help="list (default); import FILE; export NAME DEST; rename NAME NEW; delete NAME")
    p.add_argument("args", nargs="*", metavar="ARG", help="the action's arguments")
    p.add_argument("--name", help="name for 'import' (default: the adapter's own)")
    p.add_argument("--adapters", metavar="DIR", help="store folder (default: the user store)")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter of the same name")
    _common(p, device=False)
    p.set_defaults(func=cmd_adapters)

    p = sub.add_parser("import-checkpoint", help="convert the paper's U-Net .pth (no pickle execution)")
    p.add_argument("checkpoint", metavar="UNET.pth", help="the paper's source U-Net state dict")
    p.add_argument("--esh", metavar="ESH.pth", help="the early segmentation head's .pth")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.safetensors", help="model file to write")
    p.add_argument("--spacing", type=float, required=True, metavar="MM", help="working-grid spacing it expects")
    p.add_argument("--slice-size", type=int, required=True, metavar="N", help="slice size it expects")
    p.add_argument("--n-filters", type=int, default=16, metavar="N", help="U-Net width (default 16, the paper's)")
    p.add_argument("--esh-level", type=int, default=3, metavar="L", help="the ESH's U-Net level (default 3)")
    p.add_argument("--normalisation", choices=("minmax", "percentile"), default="minmax",
                   help="intensity scaling it was trained with (default minmax: the paper's code scales each "
                        "volume to [0, 1] by its minimum and maximum)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model file")
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
        with sigterm_as_interrupt(), cancel_file_as_interrupt(os.environ.get(CANCEL_FILE_ENV)):
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
        rep.close()


#: The exit status :func:`run` leaves with once its command has returned (None until then: a normal exit).
_EXIT_STATUS: List[Optional[int]] = [None]


def _exit_without_teardown() -> None:
    """The command's last exit handler. Every other one has run by now (threads joined, Dask closed, temporary
    files removed, each registered later and so called earlier); what is left is the interpreter freeing every
    module and object one by one, 0.25-0.45 s once torch is imported (``python -c "import torch"`` against the
    same ending in ``os._exit``, BENCHMARKS.md "Speed"). Skipped: logs and streams are flushed, then the process
    leaves with the command's status. A command that ended in a traceback exits normally."""
    status = _EXIT_STATUS[0]
    if status is None:
        return
    import logging

    logging.shutdown()  # registered before this handler (at logging's import), so it would run after it
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def run() -> None:
    """The ``convlora-seg`` program (its console script and ``python -m ConvLoRASegLib``): :func:`main`, then an
    exit without the interpreter's teardown (:func:`_exit_without_teardown`). Library code and tests call
    :func:`main`, which returns."""
    atexit.register(_exit_without_teardown)  # before the command registers anything: exit handlers run last-first
    status = main()
    _EXIT_STATUS[0] = status
    sys.exit(status)


if __name__ == "__main__":  # pragma: no cover
    run()
