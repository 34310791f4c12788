"""Adaptation to a target site without labels: UDAS self-training with ConvLoRA and AdaBN (the paper's stage 3).

The early segmentation head (ESH, frozen) reads the early U-Net features; the adapted early layers are trained so
that the ESH's prediction matches the full network's prediction used as a soft pseudo-label
(BCE-with-logits(ESH logits, sigmoid(final logits))). After every epoch (and before the first) the label-free
agreement — surface Dice at 1 mm between the ESH's mask and the final mask on target volumes — is scored, and the
best epoch is kept.

Methods (the columns of the paper's Table 1):

=================  ======================================================================================
``adabn``          AdaBN only: target BatchNorm statistics, no training.
``self-training``  every U-Net weight fine-tuned on the frozen source model's pseudo-labels (final output).
``udas``           every ``init_path`` weight trainable (no LoRA), ESH consistency, source BN statistics.
``udas-convlora``  ConvLoRA in the placement, ESH consistency, source BN statistics.
``convlora-adabn`` ConvLoRA + AdaBN + the BN affine parameters of the adapted stages (default).
=================  ======================================================================================

Modes: ``paper`` does what the paper's code does (pseudo-labels recomputed at every step and not detached;
BatchNorm in train mode, momentum 0.1, for ``convlora-adabn``; fp32 throughout). ``fast`` runs exact AdaBN first,
computes the pseudo-labels once without gradients and caches them (in the same pass that scores the post-AdaBN
agreement), back-propagates only through the layers up to the ESH, caps the optimiser steps per epoch
(:data:`FAST_STEPS_PER_EPOCH`) and runs its forward passes in bf16 where the hardware has it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .adabn import adabn, batchnorm_layers, set_bn_momentum_mode
from .convlora import PLACEMENTS, ConvLoRA, inject_convlora, remove_convlora
from .errors import Cancelled, ConvLoRASegError
from .model import ConvLoRASegModel
from .segment import EMPTY_SLICE_MAX, agreement, autocast_dtype, predict_slices, resolve_device

METHODS = ("convlora-adabn", "adabn", "udas", "udas-convlora", "self-training")
MODES = ("paper", "fast")
#: Fast mode's default cap on optimiser steps per epoch (256 slices per epoch at batch 32; a new random subset each
#: epoch). Measured on a 10-volume cohort (BENCHMARKS.md, Speed): within 0.01 surface Dice of paper mode.
FAST_STEPS_PER_EPOCH = 8
Progress = Optional[Callable[[dict], None]]
StopFlag = Optional[Callable[[], bool]]


@dataclass
class AdaptResult:
    """An adapted copy of the model and what a target adapter file stores."""

    model: ConvLoRASegModel
    state: Dict[str, torch.Tensor]
    method: str
    mode: str
    placement: str
    rank: int
    alpha: float
    epochs: int
    best_epoch: int
    #: label-free agreement before the first epoch (index 0: after AdaBN where the method runs it first) and
    #: after each epoch; ``details["agreement_source"]`` is the untouched source model's
    agreement: List[float]
    losses: List[float]
    trainable_params: int
    seconds: float
    n_volumes: int
    n_slices: int
    seed: int
    details: Dict[str, object] = field(default_factory=dict)

    @property
    def best_agreement(self) -> float:
        return self.agreement[self.best_epoch]

    def summary(self) -> Dict[str, object]:
        return {"method": self.method, "mode": self.mode, "placement": self.placement, "rank": self.rank,
                "alpha": self.alpha, "epochs": self.epochs, "best_epoch": self.best_epoch,
                "agreement": self.best_agreement, "agreement_per_epoch": self.agreement,
                "loss_per_epoch": self.losses, "trainable_params": self.trainable_params,
                "seconds": round(self.seconds, 2), "n_volumes": self.n_volumes, "n_slices": self.n_slices,
                "seed": self.seed, **self.details}


def source_copy(model: ConvLoRASegModel) -> ConvLoRASegModel:
    """A deep copy of ``model`` as the source model: any active adapter switched off, ConvLoRA layers removed."""
    m = copy.deepcopy(model)
    aset = getattr(m, "_adapter_set", None)
    if aset is not None:
        aset.disable()
        del m._adapter_set
    m.__dict__.pop("_adapter_infos", None)
    remove_convlora(m)
    m.sha256 = model.sha256
    return m


def _check_stop(should_stop: StopFlag) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled("adaptation cancelled")


def _prepare(model: ConvLoRASegModel, method: str, placement: str, rank: int, alpha: float) -> List[str]:
    """Freeze everything, then open what ``method`` trains. Returns the names of the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    net = model.unet
    if method in ("convlora-adabn", "udas-convlora"):
        inject_convlora(net, placement, r=rank, alpha=alpha)
        if method == "convlora-adabn":
            for stage in PLACEMENTS.get(placement, ()):
                for bn in batchnorm_layers(net.get_submodule(stage)).values():
                    bn.weight.requires_grad_(True)
                    bn.bias.requires_grad_(True)
    elif method == "udas":
        for p in net.init_path.parameters():
            p.requires_grad_(True)
    elif method == "self-training":
        for p in net.parameters():
            p.requires_grad_(True)
    return [n for n, p in net.named_parameters() if p.requires_grad]


def _changed_state(model: ConvLoRASegModel, trainable: Sequence[str], bn_stats: bool) -> Dict[str, torch.Tensor]:
    net = model.unet
    params = dict(net.named_parameters())
    state = {n: params[n].detach().cpu().clone() for n in trainable}
    for path, m in net.named_modules():
        if isinstance(m, ConvLoRA):
            state[f"{path}.lora_A"] = m.lora_A.detach().cpu().clone()
            state[f"{path}.lora_B"] = m.lora_B.detach().cpu().clone()
    if bn_stats:
        for path, bn in batchnorm_layers(net).items():
            state[f"{path}.running_mean"] = bn.running_mean.detach().cpu().clone()
            state[f"{path}.running_var"] = bn.running_var.detach().cpu().clone()
    return state


@torch.no_grad()
def _load_state(model: ConvLoRASegModel, state: Dict[str, torch.Tensor]) -> None:
    live = dict(model.unet.named_parameters())
    live.update(model.unet.named_buffers())
    for k, v in state.items():
        live[k].copy_(v.to(live[k]))


def _set_modes(model: ConvLoRASegModel, method: str, mode: str) -> None:
    model.eval()  # ESH and frozen parts: eval; source statistics unless said otherwise
    if method == "convlora-adabn" and mode == "paper":
        set_bn_momentum_mode(model.unet, momentum=0.1)


def adapt(model: ConvLoRASegModel, target: Sequence[np.ndarray], method: str = "convlora-adabn",
          mode: str = "fast", epochs: int = 5, lr: float = 1e-4, batch_size: int = 32, rank: int = 2,
          alpha: float = 2.0, placement: str = "init_path", seed: int = 0, device="auto",
          selection_volumes: int = 4, steps_per_epoch: Optional[int] = None, precision: Optional[str] = None,
          progress: Progress = None, should_stop: StopFlag = None) -> AdaptResult:
    """Adapt a copy of ``model`` to the target volumes (each an N x H x W stack of working-grid slices).

    Args:
        model: the source model (left unchanged).
        target: unlabeled target volumes as produced by :func:`~ConvLoRASegLib.volumes.to_slices` (``.slices``).
        method, mode: see the module docstring. ``epochs``: training epochs (0 allowed: AdaBN only).
        lr, batch_size: Adam learning rate and slices per step (the paper: 1e-4, 32).
        rank, alpha, placement: ConvLoRA settings (the paper: 2, 2, ``init_path``).
        seed: fixes initialisation and batch order: the same seed gives the same adapter.
        selection_volumes: how many target volumes score the label-free agreement after each epoch.
        steps_per_epoch: cap on optimiser steps per epoch (a random subset of slices each epoch); 0 = all.
            None = the mode's default: all in paper mode, :data:`FAST_STEPS_PER_EPOCH` in fast mode.
        precision: ``fp32``, or ``auto``/``bf16``/``fp16``: autocast for the training forward passes (fp32 master
            weights and loss) and, in fast mode, for the pseudo-label and agreement passes. None = the mode's
            default: ``fp32`` in paper mode, ``auto`` (bf16 where the CPU/GPU has it natively) in fast mode.
        progress: called with dicts ``{"event": "progress", "stage": ..., "step": ..., "total": ..., ...}``.
        should_stop: polled between steps; when True, :class:`~ConvLoRASegLib.errors.Cancelled` is raised.
    """
    if method not in METHODS:
        raise ConvLoRASegError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if mode not in MODES:
        raise ConvLoRASegError(f"unknown mode {mode!r}; choose paper or fast")
    if placement not in PLACEMENTS:
        raise ConvLoRASegError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    if epochs < 0 or (steps_per_epoch is not None and steps_per_epoch < 0) or batch_size < 1:
        raise ConvLoRASegError(f"epochs and steps per epoch must be >= 0 and the batch size >= 1 "
                               f"(got {epochs}, {steps_per_epoch}, {batch_size})")
    if precision not in (None, "auto", "fp32", "bf16", "fp16"):
        raise ConvLoRASegError(f"unknown precision {precision!r}; choose auto, fp32, bf16 or fp16")
    volumes = [np.asarray(v, np.float32) for v in target if v is not None and len(v)]
    if not volumes:
        raise ConvLoRASegError("the target cohort has no readable volumes")
    emit = progress or (lambda event: None)
    t0 = time.perf_counter()
    dev = resolve_device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    m = source_copy(model).to(dev)
    source = source_copy(model).to(dev).eval() if method == "self-training" else None
    trainable = _prepare(m, method, placement, rank, alpha)
    params = [p for p in m.unet.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)

    stack = np.concatenate(volumes)
    keep = stack.reshape(len(stack), -1).max(1) >= EMPTY_SLICE_MAX
    train_x = torch.from_numpy(stack[keep][:, None])
    if len(train_x) == 0:
        raise ConvLoRASegError("every target slice is empty (no signal above background)")
    select = volumes[:max(1, selection_volumes)]
    spacing = m.grid.spacing_mm
    fast = mode == "fast"
    if precision is None:
        precision = "auto" if fast else "fp32"
    if steps_per_epoch is None:
        steps_per_epoch = FAST_STEPS_PER_EPOCH if fast else 0
    # fast mode: the no-gradient passes (agreement, pseudo-labels) run like segmentation, in the training precision
    infer_precision = precision if fast else "fp32"

    def batches(x: torch.Tensor, bs: int):
        for i in range(0, len(x), bs):
            _check_stop(should_stop)
            yield x[i:i + bs].to(dev)

    def infer(net: ConvLoRASegModel, v: np.ndarray, with_esh: bool):
        _check_stop(should_stop)
        return predict_slices(net, v, dev, precision=infer_precision, with_esh=with_esh)

    def report(epoch: int, vals: List[float]) -> float:
        a = float(np.mean(vals))
        emit({"event": "progress", "stage": "select", "step": epoch, "total": epochs, "epoch": epoch,
              "agreement": a})
        return a

    def score(epoch: int) -> float:
        return report(epoch, [agreement(*infer(m, v, True), spacing) for v in select])

    uses_adabn = method in ("adabn", "convlora-adabn")
    ran_adabn = uses_adabn and (fast or method == "adabn")
    agreement_source = score(0)  # the source model, before anything is adapted
    if ran_adabn:
        emit({"event": "progress", "stage": "adabn", "step": 0, "total": len(train_x)})
        adabn(m, batches(train_x, 64), modules=m.unet, forward=m.unet)
        emit({"event": "progress", "stage": "adabn", "step": len(train_x), "total": len(train_x)})
    if method == "adabn":
        epochs = 0

    # pseudo-labels computed once (fast mode, and always for self-training, whose teacher is frozen)
    cached: Optional[torch.Tensor] = None
    first_score: Optional[float] = None if ran_adabn else agreement_source
    if epochs and fast:
        # one segmentation-style pass over every target volume gives the pseudo-labels and, for the selection
        # volumes, the post-AdaBN agreement (the teacher is the model being adapted, before its first step)
        teacher = source if source is not None else m
        outs, vals = [], []
        for i, v in enumerate(volumes):
            emit({"event": "progress", "stage": "pseudo-labels", "step": i, "total": len(volumes)})
            with_esh = first_score is None and teacher is m and i < len(select)
            got = infer(teacher, v, with_esh)
            probs = got[0] if with_esh else got
            if with_esh:
                vals.append(agreement(probs, got[1], spacing))
            outs.append(probs.astype(np.float16))
        # the slices of train_x (``keep``), in numpy: no autocast a caller may have around
        cached = torch.from_numpy(np.concatenate(outs)[keep][:, None])
        emit({"event": "progress", "stage": "pseudo-labels", "step": len(volumes), "total": len(volumes)})
        if vals:
            first_score = report(0, vals)
    elif epochs and method == "self-training":
        source.eval()
        outs = []
        # fp32 teacher, whatever autocast a caller wraps adapt() in (CPU autocast cannot cat float16 tensors)
        with torch.no_grad(), torch.autocast(dev.type, enabled=False):
            for xb in batches(train_x, 64):
                outs.append(torch.sigmoid(source(xb)).to(torch.float16).cpu())
            cached = torch.cat(outs)
    del source

    bn_stats = uses_adabn
    scores = [score(0) if first_score is None else first_score]
    best_state = _changed_state(m, trainable, bn_stats)
    best_epoch = 0
    losses: List[float] = []

    opt = torch.optim.Adam(params, lr=lr) if epochs else None
    full_steps = (len(train_x) + batch_size - 1) // batch_size
    steps_per_epoch = min(full_steps, steps_per_epoch) if steps_per_epoch else full_steps
    amp = autocast_dtype(dev, precision)
    for epoch in range(1, epochs + 1):
        _set_modes(m, method, mode)
        order = torch.randperm(len(train_x), generator=gen)
        total = 0.0
        for step in range(steps_per_epoch):
            _check_stop(should_stop)
            idx = order[step * batch_size:(step + 1) * batch_size]
            x = train_x[idx].to(dev)
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                if method == "self-training":
                    logits = m(x)
                    target_p = cached[idx].to(dev, torch.float32)
                elif mode == "fast":
                    logits = m.forward_esh(x)
                    target_p = cached[idx].to(dev, torch.float32)
                else:
                    final, logits = m.forward_both(x)
                    target_p = torch.sigmoid(final.float())  # the paper's code: not detached
            loss = F.binary_cross_entropy_with_logits(logits.float(), target_p)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            emit({"event": "progress", "stage": "train", "step": step + 1, "total": steps_per_epoch,
                  "epoch": epoch, "epochs": epochs, "loss": loss.item()})
        losses.append(total / steps_per_epoch)
        m.eval()
        scores.append(score(epoch))
        if scores[-1] > scores[best_epoch]:
            best_epoch = epoch
            best_state = _changed_state(m, trainable, bn_stats)

    _load_state(m, best_state)
    m.eval()
    result = AdaptResult(
        model=m, state=best_state, method=method, mode=mode,
        placement=placement if method in ("convlora-adabn", "udas-convlora") else "-",
        rank=rank, alpha=alpha, epochs=epochs, best_epoch=best_epoch, agreement=scores, losses=losses,
        trainable_params=n_trainable, seconds=time.perf_counter() - t0, n_volumes=len(volumes),
        n_slices=int(len(train_x)), seed=seed,
        details={"agreement_source": agreement_source, "steps_per_epoch": steps_per_epoch,
                 "precision": str(amp or "fp32").replace("torch.", "")})
    emit({"event": "progress", "stage": "select", "step": epochs, "total": epochs, "epoch": best_epoch,
          "agreement": result.best_agreement})
    return result
