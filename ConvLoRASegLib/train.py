"""Source training (the paper's stages 1 and 2): the U-Net on labelled source slices, then the ESH on its frozen
early features.

U-Net: BCE-with-logits, Adam (lr 1e-3), batch 32, the epoch with the best validation surface Dice (1 mm) kept.
ESH: the frozen U-Net's level-``esh_level`` features (computed once and cached), BCE-with-logits against the same
labels, Adam (lr 1e-3).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import Cancelled, ConvLoRASegError
from .grid import WorkingGrid
from .model import ConvLoRASegModel
from .segment import EMPTY_SLICE_MAX, autocast_dtype, predict_slices, resolve_device

Progress = Optional[Callable[[dict], None]]
StopFlag = Optional[Callable[[], bool]]


def _stack(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], empty_fraction: float, rng) -> tuple:
    if len(images) != len(masks):
        raise ConvLoRASegError(f"{len(images)} images but {len(masks)} masks")
    xs, ys = [], []
    for img, msk in zip(images, masks):
        if img.shape != msk.shape:
            raise ConvLoRASegError(f"image slices {img.shape} and mask slices {msk.shape} differ")
        busy = img.reshape(len(img), -1).max(1) >= EMPTY_SLICE_MAX
        empty = np.flatnonzero(~busy)
        take = np.concatenate([np.flatnonzero(busy),
                               rng.choice(empty, int(len(empty) * empty_fraction), replace=False)]).astype(int)
        xs.append(img[take])
        ys.append(msk[take])
    if not xs or sum(len(x) for x in xs) == 0:
        raise ConvLoRASegError("no training slices with signal")
    return (torch.from_numpy(np.concatenate(xs).astype(np.float32)[:, None]),
            torch.from_numpy(np.concatenate(ys).astype(np.float32)[:, None]))


def augment_batch(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple:
    """Random in-plane affine (rotation +-10 deg, scale +-10 %, shift +-5 %) and intensity gamma 0.8-1.25."""
    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen)  # noqa: E731
    ang, sc = u(-math.pi / 18, math.pi / 18), u(0.9, 1.1)
    tx, ty = u(-0.05, 0.05), u(-0.05, 0.05)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = torch.cos(ang) / sc, -torch.sin(ang) / sc, tx
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = torch.sin(ang) / sc, torch.cos(ang) / sc, ty
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = (F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False) >= 0.5).float()
    gamma = torch.exp(u(math.log(0.8), math.log(1.25))).to(x).view(n, 1, 1, 1)
    return x.clamp_min(0).pow(gamma), y


def _val_score(model: ConvLoRASegModel, images, masks, dev) -> float:
    from .metrics import surface_dice

    s = model.grid.spacing_mm
    vals = [surface_dice(predict_slices(model, img, dev, precision="fp32") >= 0.5, msk > 0, (s, s, s), 1.0)
            for img, msk in zip(images, masks)]
    return float(np.mean(vals))


def train_source(train_images: Sequence[np.ndarray], train_masks: Sequence[np.ndarray],
                 val_images: Sequence[np.ndarray] = (), val_masks: Sequence[np.ndarray] = (),
                 grid: Optional[WorkingGrid] = None, epochs: int = 20, esh_epochs: int = 10, batch_size: int = 32,
                 lr: float = 1e-3, esh_level: int = 3, n_filters: int = 16, augment: bool = True,
                 precision: str = "auto", seed: int = 0, device="auto", info: Optional[Dict[str, Any]] = None,
                 lr_schedule: str = "constant", init: Optional[ConvLoRASegModel] = None,
                 progress: Progress = None, should_stop: StopFlag = None) -> ConvLoRASegModel:
    """Train a source model from labelled volumes (each an N x H x W stack of working-grid slices, masks 0/1).

    ``precision="auto"`` trains under bf16 autocast on CPUs/GPUs with native bf16 (fp32 master weights), fp32
    elsewhere. ``lr_schedule``: ``"constant"`` (the paper) or ``"cosine"`` (decays to 0 over the epochs).
    ``init``: continue from this model's U-Net weights (e.g. a second, cosine-decayed round of training); its
    grid must equal ``grid``. Returns the model (eval mode) with ``info`` completed by the training record.
    """
    emit = progress or (lambda e: None)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    dev = resolve_device(device)
    grid = grid or WorkingGrid()
    x_all, y_all = _stack(train_images, train_masks, empty_fraction=0.1, rng=rng)
    model = ConvLoRASegModel(grid=grid, n_filters=n_filters, esh_level=esh_level, info=info).to(dev)
    if init is not None:
        if init.grid != grid or init.n_filters != n_filters:
            raise ConvLoRASegError(f"--init model has grid {init.grid} / {init.n_filters} filters, not {grid}")
        model.unet.load_state_dict(init.unet.state_dict())
        model.info["initialised_from"] = {"sha256": init.sha256, "training": init.info.get("training")}
    dtype = autocast_dtype(dev, precision)
    record: Dict[str, Any] = {"epochs": epochs, "esh_epochs": esh_epochs, "batch_size": batch_size, "lr": lr,
                              "augment": augment, "precision": str(dtype or "fp32"), "seed": seed,
                              "lr_schedule": lr_schedule,
                              "n_train_volumes": len(train_images), "n_train_slices": int(len(x_all)),
                              "n_val_volumes": len(val_images), "val_surface_dice": []}

    def stop() -> None:
        if should_stop is not None and should_stop():
            raise Cancelled("training cancelled")

    # stage 1: the U-Net --------------------------------------------------------------------------------------
    opt = torch.optim.Adam(model.unet.parameters(), lr=lr)
    steps = (len(x_all) + batch_size - 1) // batch_size
    if lr_schedule not in ("constant", "cosine"):
        raise ConvLoRASegError(f"unknown lr schedule {lr_schedule!r}: constant or cosine")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps)) \
        if lr_schedule == "cosine" else None
    best = (-1.0, copy.deepcopy(model.unet.state_dict()), 0)
    for epoch in range(1, epochs + 1):
        model.unet.train()
        order = torch.randperm(len(x_all), generator=gen)
        total = 0.0
        for step in range(steps):
            stop()
            idx = order[step * batch_size:(step + 1) * batch_size]
            x, y = x_all[idx], y_all[idx]
            if augment:
                x, y = augment_batch(x, y, gen)
            x, y = x.to(dev), y.to(dev)
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                logits = model.unet(x)
            loss = F.binary_cross_entropy_with_logits(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.item()
            emit({"event": "progress", "stage": "train", "step": step + 1, "total": steps, "epoch": epoch,
                  "epochs": epochs, "loss": loss.item()})
        model.eval()
        score = _val_score(model, val_images, val_masks, dev) if len(val_images) else float(epoch)
        record["val_surface_dice"].append(round(score, 4) if len(val_images) else None)
        emit({"event": "progress", "stage": "select", "step": epoch, "total": epochs, "epoch": epoch,
              "loss": total / steps, "agreement": score if len(val_images) else None})
        if score >= best[0]:
            best = (score, copy.deepcopy(model.unet.state_dict()), epoch)
    model.unet.load_state_dict(best[1])
    record["best_epoch"] = best[2]
    if len(val_images):
        record["best_val_surface_dice"] = round(best[0], 4)

    # stage 2: the ESH on frozen early features ---------------------------------------------------------------
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
        order = torch.randperm(len(x_all), generator=gen)
        for step in range(steps):
            stop()
            idx = order[step * batch_size:(step + 1) * batch_size]
            loss = F.binary_cross_entropy_with_logits(model.esh(feats_t[idx].to(dev)), y_all[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        emit({"event": "progress", "stage": "esh", "step": epoch, "total": esh_epochs, "epoch": epoch,
              "loss": loss.item()})
    model.eval()
    record["seconds"] = round(time.perf_counter() - t0, 1)
    model.info.setdefault("training", {}).update(record)
    return model.cpu()

