"""Source training (the paper's stages 1 and 2): the U-Net on labelled source slices, then the ESH on its frozen
early features.

U-Net: BCE-with-logits, Adam (lr 1e-3), the epoch with the best validation surface Dice kept (tolerance: the
working grid's spacing; 1 mm on a 2 mm grid counts only coinciding surfels). ESH: the frozen U-Net's
level-``esh_level`` features (computed once and cached), BCE-with-logits against the same labels, Adam (lr 1e-3).

Recipe additions over the paper (see the README's model card for what each measured):

* **Output scale.** The DART20 net ends in ``BatchNorm2d(1)`` whose affine weight is the logits' scale. PyTorch
  starts it at 1 and Adam moves it by about lr per step, so after a few hundred steps the logits are still soft
  and the 0.5 contour wanders. New trainings start it at ``out_scale`` (default :data:`OUT_SCALE`) and may give
  it its own learning rate (``out_lr_mult``); the state-dict layout is unchanged.
* **3D augmentation** (``augment_3d`` > 0, TorchIO, :mod:`ConvLoRASegLib.augment`): every epoch, that many fresh
  augmented copies of each training volume join the original slices (scanner artefacts, field of view, pose).
* **Checkpoints**: with ``checkpoint``, the whole training state (weights, best weights, Adam moments, RNG states,
  the epoch's sample order; store.save_checkpoint, atomic) is written every ``checkpoint_every`` steps and after
  every epoch; ``resume=True`` continues from it and gives the same model as an uninterrupted run.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import Cancelled, ConvLoRASegError
from .grid import WorkingGrid
from .model import ConvLoRASegModel
from .segment import autocast_dtype, grad_scaler, nonempty_slices, predict_slices, resolve_device

#: Initial weight of the final BatchNorm2d(1) (the logits' scale) for new trainings (PyTorch's default: 1).
OUT_SCALE = 6.0
#: Learning-rate multiplier of that BatchNorm's weight and bias.
OUT_LR_MULT = 1.0

Progress = Optional[Callable[[dict], None]]
StopFlag = Optional[Callable[[], bool]]


def _stack(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], empty_fraction: float, rng) -> tuple:
    if len(images) != len(masks):
        raise ConvLoRASegError(f"{len(images)} images but {len(masks)} masks")
    xs, ys = [], []
    for img, msk in zip(images, masks):
        if img.shape != msk.shape:
            raise ConvLoRASegError(f"image slices {img.shape} and mask slices {msk.shape} differ")
        busy = nonempty_slices(img)
        empty = np.flatnonzero(~busy)
        take = np.concatenate([np.flatnonzero(busy),
                               rng.choice(empty, int(len(empty) * empty_fraction), replace=False)]).astype(int)
        xs.append(img[take])
        ys.append(msk[take])
    if not xs or sum(len(x) for x in xs) == 0:
        raise ConvLoRASegError("no training slices with signal")
    return (torch.from_numpy(np.concatenate(xs).astype(np.float32)[:, None]),
            torch.from_numpy(np.concatenate(ys).astype(np.float32)[:, None]))


def augment_batch(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, partial_volume: bool = False) -> tuple:
    """Random in-plane affine (rotation +-10 deg, scale +-10 %, shift +-5 %) and intensity gamma 0.8-1.25. The
    targets ``y`` are resampled bilinearly: then >= 0.5 (0/1 targets), or kept as fractions (``partial_volume``)."""
    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen)  # noqa: E731
    ang, sc = u(-math.pi / 18, math.pi / 18), u(0.9, 1.1)
    tx, ty = u(-0.05, 0.05), u(-0.05, 0.05)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = torch.cos(ang) / sc, -torch.sin(ang) / sc, tx
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = torch.sin(ang) / sc, torch.cos(ang) / sc, ty
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = y.clamp(0.0, 1.0) if partial_volume else (y >= 0.5).float()
    gamma = torch.exp(u(math.log(0.8), math.log(1.25))).to(x).view(n, 1, 1, 1)
    return x.clamp_min(0).pow(gamma), y



def _val_score(model: ConvLoRASegModel, images, masks, dev, tolerance_mm: Optional[float] = None) -> float:
    """Mean surface Dice of the model's 0.5 masks on the validation volumes, on the working grid, at
    ``tolerance_mm`` (default: the grid's spacing, the smallest tolerance that is not degenerate there)."""
    from .metrics import surface_dice

    s = model.grid.spacing_mm
    tol = s if tolerance_mm is None else tolerance_mm
    vals = [surface_dice(predict_slices(model, img, dev, precision="fp32") >= 0.5, msk >= 0.5, (s, s, s), tol)
            for img, msk in zip(images, masks)]
    return float(np.mean(vals))


def set_output_scale(model: ConvLoRASegModel, scale: float) -> None:
    """Set the initial weight of the U-Net's final ``BatchNorm2d(1)`` (``unet.out_path[2]``): the logits' scale."""
    with torch.no_grad():
        model.unet.out_path[2].weight.fill_(float(scale))


def _lr_factor(schedule: str, step: int, total: int) -> float:
    """Learning-rate factor before optimiser step ``step`` (0-based) of ``total``."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))
    return 1.0


#: How the U-Net's BatchNorm statistics of a trained model are made (see :func:`train_source`).
BN_STATISTICS = ("momentum", "recalibrated")
#: What the network learns to predict (see :func:`train_source`).
TARGETS = ("binary", "partial_volume")


def _epoch_pool(x_all, y_all, train_images, train_masks, augment_3d: int, spacing_mm: float, seed: int,
                epoch: int, stop: Callable[[], None], emit, synth: float = 0.0,
                partial_volume: bool = False, bias_field: Optional[float] = None) -> tuple:
    """The epoch's training slices: the originals plus ``augment_3d`` fresh 3D-augmented copies of each volume
    (deterministic in (seed, epoch), so a resumed run rebuilds the same pool); ``synth``: the share of copies
    whose intensities are synthesised from tissue classes (:mod:`ConvLoRASegLib.augment`)."""
    if augment_3d <= 0:
        return x_all, y_all
    from .augment import augment_volume

    images, masks = [], []
    n = len(train_images) * augment_3d
    for i, (img, msk) in enumerate(zip(train_images, train_masks)):
        for k in range(augment_3d):
            stop()
            emit({"event": "progress", "stage": "augment", "step": i * augment_3d + k, "total": n, "epoch": epoch})
            a, b = augment_volume(img, msk, spacing_mm, seed=(seed * 1_000_003 + epoch * 10_007 + i * 101 + k),
                                  synth=synth, partial_volume=partial_volume, bias_field=bias_field)
            images.append(a)
            masks.append(b)
    xa, ya = _stack(images, masks, empty_fraction=0.1, rng=np.random.default_rng([seed, epoch]))
    return torch.cat([x_all, xa]), torch.cat([y_all, ya])


def _config(**kw) -> Dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}


def train_source(train_images: Sequence[np.ndarray], train_masks: Sequence[np.ndarray],
                 val_images: Sequence[np.ndarray] = (), val_masks: Sequence[np.ndarray] = (),
                 grid: Optional[WorkingGrid] = None, epochs: int = 20, esh_epochs: int = 10, batch_size: int = 32,
                 lr: float = 1e-3, esh_level: int = 3, n_filters: int = 16, augment: bool = True,
                 precision: str = "auto", seed: int = 0, device="auto", info: Optional[Dict[str, Any]] = None,
                 lr_schedule: str = "constant", init: Optional[ConvLoRASegModel] = None,
                 progress: Progress = None, should_stop: StopFlag = None, *,
                 out_scale: float = OUT_SCALE, out_lr_mult: float = OUT_LR_MULT, augment_3d: int = 0,
                 synth: float = 0.0, bn_statistics: str = "momentum", steps_per_epoch: Optional[int] = None,
                 checkpoint: Optional[Union[str, Path]] = None, checkpoint_every: int = 50, resume: bool = False,
                 targets: str = "binary", bias_field: Optional[float] = None) -> ConvLoRASegModel:
    """Train a source model from labelled volumes (each an N x H x W stack of working-grid slices, masks 0/1, or
    partial-volume fractions in [0, 1] with ``targets="partial_volume"``).

    ``precision="auto"`` trains under bf16 autocast on CPUs/GPUs with native bf16 (fp32 master weights), fp32
    elsewhere. ``lr_schedule``: ``"constant"`` (the paper) or ``"cosine"`` (decays to 0 over all steps).
    ``init``: continue from this model's U-Net weights (e.g. a second, cosine-decayed round of training); its
    grid must equal ``grid``. ``out_scale`` / ``out_lr_mult``: initial weight and learning-rate multiplier of the
    final BatchNorm (not applied to the weights of ``init``, only its learning rate). ``augment_3d``: TorchIO
    copies per volume and epoch; ``synth``: the share of them with synthesised intensities (SynthStrip-style, see
    :mod:`ConvLoRASegLib.augment`). ``bn_statistics``: ``"momentum"`` keeps the running statistics of training
    (averages over augmented batches); ``"recalibrated"`` recomputes them, after the U-Net stage and before the
    ESH's, from the plain training volumes with the adaptation's own AdaBN recipe
    (:func:`~ConvLoRASegLib.adabn.adabn_volumes`), so that source and target statistics are computed alike.
    ``targets``: ``"binary"`` learns 0/1 masks; ``"partial_volume"`` learns each working voxel's share of brain
    (:func:`~ConvLoRASegLib.volumes.mask_to_slices` with ``partial_volume``; the binary cross-entropy takes soft
    targets as they are, and the augmentations resample them linearly), so that the 0.5 level of the prediction,
    interpolated to the input grid, can fall between working voxels where the true surface does.
    ``bias_field``: the 3D augmentation's largest bias-field coefficient (TorchIO's polynomial, log scale; default
    the recipe's 0.6, :data:`ConvLoRASegLib.augment.RECIPE`): larger for scans whose receive-coil field was not
    normalised (the Prisma scan of ``../shared/data/heads`` without prescan normalise spans 1.57 in log intensity
    over its brain, 5th to 95th percentile; coefficient 0.6 makes spans of 0.57 typically, 0.89 at the 99th).
    ``steps_per_epoch``: optimiser steps per epoch (default: one pass over the
    epoch's slices). ``checkpoint`` / ``checkpoint_every`` / ``resume``: see the module docstring.
    Returns the model (eval mode) with ``info["training"]`` completed by the training record.
    """
    emit = progress or (lambda e: None)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    dev = resolve_device(device)
    grid = grid or WorkingGrid()
    if lr_schedule not in ("constant", "cosine"):
        raise ConvLoRASegError(f"unknown lr schedule {lr_schedule!r}: constant or cosine")
    if augment_3d < 0:
        raise ConvLoRASegError(f"augment_3d must be >= 0, got {augment_3d}")
    if not 0.0 <= synth <= 1.0:
        raise ConvLoRASegError(f"synth must be a share in [0, 1], got {synth}")
    if bn_statistics not in BN_STATISTICS:
        raise ConvLoRASegError(f"unknown bn statistics {bn_statistics!r}: {' or '.join(BN_STATISTICS)}")
    if synth and not augment_3d:
        raise ConvLoRASegError("synth is a share of the 3D-augmented copies: it needs augment_3d >= 1")
    if targets not in TARGETS:
        raise ConvLoRASegError(f"unknown targets {targets!r}: {' or '.join(TARGETS)}")
    if bias_field is not None:
        from .augment import check_bias_field

        check_bias_field(bias_field)
        if not augment_3d:
            raise ConvLoRASegError("the bias field is part of the 3D augmentation: it needs augment_3d >= 1")
    partial_volume = targets == "partial_volume"
    x_all, y_all = _stack(train_images, train_masks, empty_fraction=0.1, rng=rng)
    model = ConvLoRASegModel(grid=grid, n_filters=n_filters, esh_level=esh_level, info=info).to(dev)
    if init is not None:
        if init.grid != grid or init.n_filters != n_filters:
            raise ConvLoRASegError(f"--init model has grid {init.grid} / {init.n_filters} filters, not {grid}")
        model.unet.load_state_dict(init.unet.state_dict())
        model.info["initialised_from"] = {"sha256": init.sha256, "training": init.info.get("training")}
    else:
        set_output_scale(model, out_scale)
    dtype = autocast_dtype(dev, precision)
    scaler = grad_scaler(dev, dtype)
    if steps_per_epoch is not None and steps_per_epoch <= 0:
        steps_per_epoch = None
    steps = steps_per_epoch or (len(x_all) * (1 + augment_3d) + batch_size - 1) // batch_size
    total_steps = epochs * steps
    config = _config(epochs=epochs, esh_epochs=esh_epochs, batch_size=batch_size, lr=lr, augment=augment,
                     precision=str(dtype or "fp32"), seed=seed, lr_schedule=lr_schedule, out_scale=out_scale,
                     out_lr_mult=out_lr_mult, augment_3d=augment_3d, synth=synth, bn_statistics=bn_statistics,
                     steps_per_epoch=steps,
                     n_train_volumes=len(train_images), n_train_slices=int(len(x_all)),
                     n_val_volumes=len(val_images), grid=grid.to_dict(), n_filters=n_filters,
                     init=init.sha256 if init is not None else None)
    if partial_volume:  # absent: binary targets (the records of earlier models stay as they were)
        config["targets"] = targets
    if bias_field is not None:  # absent: the recipe's coefficient
        config["bias_field"] = float(bias_field)
    record: Dict[str, Any] = dict(config, total_steps=total_steps, val_surface_dice=[], train_loss=[],
                                  val_tolerance_mm=grid.spacing_mm)
    if augment_3d:
        from .augment import SYNTH, recipe

        used = recipe(bias_field)
        record["augment_3d_recipe"] = dict(used, synth=SYNTH) if synth else used

    def stop() -> None:
        if should_stop is not None and should_stop():
            raise Cancelled("training cancelled")

    # stage 1: the U-Net --------------------------------------------------------------------------------------
    out_params = list(model.unet.out_path[2].parameters())
    out_ids = {id(p) for p in out_params}
    opt = torch.optim.Adam([{"params": [p for p in model.unet.parameters() if id(p) not in out_ids], "lr": lr},
                            {"params": out_params, "lr": lr * out_lr_mult}])
    base_lrs = [g["lr"] for g in opt.param_groups]
    best = (-1.0, copy.deepcopy(model.unet.state_dict()), 0)
    start_epoch, start_step, order, seconds_before, unet_done = 1, 0, None, 0.0, False
    ckpt = Path(checkpoint) if checkpoint is not None else None

    def save_ckpt(epoch: int, step: int, order_t: Optional[torch.Tensor], done: bool) -> None:
        from .store import save_checkpoint

        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update({f"best.{k}": v for k, v in best[1].items()})
        for i, st in opt.state_dict()["state"].items():
            for name, t in st.items():
                tensors[f"opt.{i}.{name}"] = torch.as_tensor(t)
        tensors["rng.gen"] = gen.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        if order_t is not None:
            tensors["order"] = order_t
        state = {"config": config, "epoch": epoch, "step": step, "best_score": best[0], "best_epoch": best[2],
                 "record": record, "seconds": seconds_before + time.perf_counter() - t0, "unet_done": done}
        save_checkpoint(ckpt, tensors, state)

    if resume and ckpt is not None and ckpt.exists():
        from .store import load_checkpoint

        tensors, state = load_checkpoint(ckpt)
        old = state["config"]
        changed = ", ".join(f"{k}={old.get(k)!r}" for k in config if old.get(k) != config[k])
        if changed:
            raise ConvLoRASegError(f"cannot resume from {ckpt.name}: it was made with other settings ({changed})")
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        best = (state["best_score"], {k[5:]: v.clone() for k, v in tensors.items() if k.startswith("best.")},
                state["best_epoch"])
        sd = opt.state_dict()
        for key, t in tensors.items():
            if key.startswith("opt."):
                _, i, name = key.split(".", 2)
                sd["state"].setdefault(int(i), {})[name] = t.clone()
        opt.load_state_dict(sd)
        gen.set_state(tensors["rng.gen"])
        torch.set_rng_state(tensors["rng.torch"])
        record = state["record"]
        record.setdefault("resumed_at_steps", []).append((state["epoch"] - 1) * steps + state["step"])
        seconds_before = float(state["seconds"])
        start_epoch, start_step, unet_done = state["epoch"], state["step"], state["unet_done"]
        order = tensors.get("order")
        if start_step >= steps:
            start_epoch, start_step, order = start_epoch + 1, 0, None
        emit({"event": "progress", "stage": "resume", "step": (start_epoch - 1) * steps + start_step,
              "total": total_steps, "epoch": start_epoch})

    for epoch in range(start_epoch, epochs + 1):
        if unet_done:
            break
        model.unet.train()
        x_pool, y_pool = _epoch_pool(x_all, y_all, train_images, train_masks, augment_3d, grid.spacing_mm, seed,
                                     epoch, stop, emit, synth=synth, partial_volume=partial_volume,
                                     bias_field=bias_field)
        if order is None:
            reps = (steps * batch_size + len(x_pool) - 1) // len(x_pool)
            order = torch.cat([torch.randperm(len(x_pool), generator=gen) for _ in range(reps)])
        total = 0.0
        for step in range(start_step, steps):
            stop()
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * _lr_factor(lr_schedule, (epoch - 1) * steps + step, total_steps)
            idx = order[step * batch_size:(step + 1) * batch_size]
            x, y = x_pool[idx], y_pool[idx]
            if augment:
                x, y = augment_batch(x, y, gen, partial_volume)
            x, y = x.to(dev), y.to(dev)
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                logits = model.unet(x)
            loss = F.binary_cross_entropy_with_logits(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # fp16 autocast: scaled, so that small gradients do not underflow
            scaler.step(opt)
            scaler.update()
            total += loss.item()
            emit({"event": "progress", "stage": "train", "step": step + 1, "total": steps, "epoch": epoch,
                  "epochs": epochs, "loss": loss.item()})
            if ckpt is not None and checkpoint_every > 0 and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                save_ckpt(epoch, step + 1, order, False)
        model.eval()
        score = _val_score(model, val_images, val_masks, dev) if len(val_images) else float(epoch)
        record["val_surface_dice"].append(round(score, 4) if len(val_images) else None)
        record["train_loss"].append(round(total / max(1, steps - start_step), 4))
        emit({"event": "progress", "stage": "select", "step": epoch, "total": epochs, "epoch": epoch,
              "loss": total / max(1, steps - start_step), "agreement": score if len(val_images) else None})
        if score >= best[0]:
            best = (score, copy.deepcopy(model.unet.state_dict()), epoch)
        order, start_step = None, 0
        if ckpt is not None:
            save_ckpt(epoch, steps, None, epoch == epochs)
    model.unet.load_state_dict(best[1])
    record["best_epoch"] = best[2]
    if len(val_images):
        record["best_val_surface_dice"] = round(best[0], 4)
    record["output_scale"] = round(float(model.unet.out_path[2].weight.item()), 4)
    if bn_statistics == "recalibrated":
        from .adabn import adabn_volumes

        stop()
        record["bn_statistics_slices"] = adabn_volumes(model, train_images)
        if len(val_images):
            record["val_surface_dice_recalibrated"] = round(_val_score(model, val_images, val_masks, dev), 4)

    # stage 2: the ESH on frozen early features ---------------------------------------------------------------
    steps_esh = (len(x_all) + batch_size - 1) // batch_size
    model.eval()
    feats = []
    with torch.no_grad():
        for i in range(0, len(x_all), 64):
            stop()
            feats.append(model.unet.encode(x_all[i:i + 64].to(dev), upto=esh_level)[-1].cpu())
    feats_t = torch.cat(feats)
    opt = torch.optim.Adam(model.esh.parameters(), lr=lr)
    model.esh.train()
    for epoch in range(1, esh_epochs + 1):
        order_e = torch.randperm(len(x_all), generator=gen)
        for step in range(steps_esh):
            stop()
            idx = order_e[step * batch_size:(step + 1) * batch_size]
            loss = F.binary_cross_entropy_with_logits(model.esh(feats_t[idx].to(dev)), y_all[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        emit({"event": "progress", "stage": "esh", "step": epoch, "total": esh_epochs, "epoch": epoch,
              "loss": loss.item()})
    model.eval()
    record["seconds"] = round(seconds_before + time.perf_counter() - t0, 1)
    model.info.setdefault("training", {}).update(record)
    return model.cpu()
