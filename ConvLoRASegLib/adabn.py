"""AdaBN (Li et al. 2016): replace BatchNorm statistics by the target domain's.

:func:`adabn` computes them in one pass over all target slices: each BatchNorm layer's per-batch mean and
variance are merged per channel in float64 and its ``running_mean``/``running_var`` become the mean and the
unbiased variance of that input over *all* target slices (not PyTorch's average of per-batch values, which ignores
the spread between batches). Which statistics: those of the inputs as AdaBN's original recipe produces them, i.e. with the upstream
layers normalising each batch with its own statistics — not the inputs the eval-mode network will see, which would
need one pass per layer (measured: no better, and 40 passes; BENCHMARKS.md, "Answered once"). The layers of
:data:`ADABN_KEEP_SOURCE` keep the source statistics. Weights are untouched; no gradients.

:func:`adabn_volumes` is the one recipe that turns working-grid volumes into such statistics (their non-empty
slices, in order, in batches of :data:`ADABN_BATCH`): the adaptation uses it on the target cohort, and
``train --bn-statistics recalibrated`` on the source model's own training volumes at the end of training. The
running statistics a training leaves behind are momentum averages over *augmented* batches (crops, bias fields,
gamma, synthetic contrasts), which no real scan resembles; recalibrated, the source statistics are computed the
way the target statistics will be, from plain scans, so that the difference AdaBN applies is the scanner's and
not the augmentation's ("precise BN", Wu & Johnson 2021).

:func:`set_bn_momentum_mode` is the paper's variant: BatchNorm layers left in train mode with momentum 0.1 while
self-training, so the statistics drift towards the target as batches go by.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


#: BatchNorm layers (U-Net paths) that keep their source statistics under AdaBN: the output ``BatchNorm2d(1)``
#: normalises the logits themselves, so target statistics there move the decision threshold with the
#: brain/background ratio of the field of view rather than with the scanner (bench/shifts.py, BENCHMARKS.md).
ADABN_KEEP_SOURCE: Tuple[str, ...] = ("out_path.2",)
#: Consecutive slices per batch of :func:`adabn_volumes` (the upstream layers normalise each batch by itself).
ADABN_BATCH = 64


def batchnorm_layers(module: nn.Module) -> Dict[str, _BatchNorm]:
    return {n: m for n, m in module.named_modules() if isinstance(m, _BatchNorm)}


class _Moments:
    """Per-channel mean and sum of squared deviations of a BatchNorm's input over all batches, in float64.

    Read after each batch from the layer's own batch statistics (the layer runs with momentum 1, so its running
    statistics are that batch's mean and unbiased variance: no second pass over the activations, which cost
    about as much as the forward pass itself on this thin network) and merged across batches exactly (Chan et al.:
    the spread between batches is kept)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None

    def __call__(self, module: _BatchNorm, inputs, output) -> None:
        x = inputs[0]
        nb = x.numel() // x.shape[1]
        mean_b = module.running_mean.detach().double()
        m2_b = module.running_var.detach().double() * max(nb - 1, 0)
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mean_b, m2_b
            return
        n = self.n + nb
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2_b + delta * delta * (self.n * nb / n)
        self.n = n


@torch.no_grad()
def adabn(model: nn.Module, batches: Iterable[torch.Tensor], modules: Optional[nn.Module] = None,
          forward: Optional[Callable[[torch.Tensor], object]] = None,
          should_stop: Optional[Callable[[], bool]] = None, keep_source: Sequence[str] = ()) -> int:
    """Set every BatchNorm of ``modules`` (default: all of ``model``) to the target statistics.

    Args:
        model: the network; its mode (train/eval) is restored afterwards.
        batches: target inputs (N x 1 x H x W slices), already on the model's device.
        modules: the part whose BatchNorm layers are re-estimated (e.g. ``model.unet`` to leave the ESH alone).
        forward: how to run a batch (default ``model(batch)``).
        should_stop: polled between batches; when it returns True the statistics are left unchanged.
        keep_source: names (relative to ``modules``) of BatchNorm layers left at their current statistics.

    Returns:
        The number of slices seen. Raises ``ValueError`` when ``batches`` is empty.
    """
    bns = {n: m for n, m in batchnorm_layers(modules if modules is not None else model).items()
           if n not in keep_source}
    if not bns:
        return 0
    was_training = {m: m.training for m in model.modules()}
    moments = {name: _Moments() for name in bns}
    hooks = [bn.register_forward_hook(moments[name]) for name, bn in bns.items()]
    saved = {name: (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
             for name, bn in bns.items()}
    momentum = {name: bn.momentum for name, bn in bns.items()}
    n_seen = 0
    try:
        model.eval()
        for bn in bns.values():
            bn.train()  # batch statistics upstream, as AdaBN does
            bn.momentum = 1.0  # running statistics = this batch's (read by _Moments after each batch)
        run = forward or model
        for batch in batches:
            if should_stop is not None and should_stop():
                raise _Stopped
            run(batch)
            n_seen += batch.shape[0]
    except _Stopped:
        n_seen = 0
    finally:
        for h in hooks:
            h.remove()
        for m, mode in was_training.items():
            m.train(mode)
        for name, bn in bns.items():
            bn.momentum = momentum[name]
    for name, bn in bns.items():
        mom = moments[name]
        if n_seen == 0 or mom.n < 2:
            bn.running_mean.copy_(saved[name][0])
            bn.running_var.copy_(saved[name][1])
            bn.num_batches_tracked.copy_(saved[name][2])
            continue
        mean = mom.mean
        var = (mom.m2 / (mom.n - 1)).clamp_min(0)
        bn.running_mean.copy_(mean.to(bn.running_mean))
        bn.running_var.copy_(var.to(bn.running_var))
        bn.num_batches_tracked.fill_(1)
    if n_seen == 0 and should_stop is None:
        raise ValueError("adabn() needs at least one batch of target slices")
    return n_seen


def adabn_volumes(model: nn.Module, volumes: Sequence[np.ndarray],
                  should_stop: Optional[Callable[[], bool]] = None,
                  keep_source: Sequence[str] = ADABN_KEEP_SOURCE, autocast: Optional[torch.dtype] = None) -> int:
    """:func:`adabn` of a :class:`~ConvLoRASegLib.model.ConvLoRASegModel`'s U-Net over working-grid volumes
    (N x H x W stacks): their non-empty slices in order, :data:`ADABN_BATCH` at a time, on the model's device; the
    layers of :data:`ADABN_KEEP_SOURCE` and the ESH keep their statistics. Returns the number of slices seen.

    The pass runs channels-last (except on MPS), as segmentation does: on a CPU the train-mode convolutions and
    BatchNorms are much faster so (bench/speed.py, the adaptation stages); the model's weights are put back in their own
    layout afterwards. ``autocast``: a reduced precision for the pass (the statistics are still merged in float64), as
    fast-mode adaptation runs its other passes. Measured on a 2 mm head of 88 slices (torch 2.13, AMD EPYC with bf16):
    bf16 1.6 s vs fp32 4.4 s; running statistics within 0.4 % (median) of fp32's, masks differing in 0.08 % of the
    brain's voxels. None: fp32 (paper mode, ``train --bn-statistics recalibrated``)."""
    from .segment import nonempty_slices

    stack = np.concatenate([np.asarray(v, np.float32) for v in volumes if v is not None and len(v)])
    x = torch.from_numpy(np.ascontiguousarray(stack[nonempty_slices(stack)][:, None]))
    dev = next(model.parameters()).device
    fmt = torch.contiguous_format if dev.type == "mps" else torch.channels_last
    batches = (x[i:i + ADABN_BATCH].to(dev).contiguous(memory_format=fmt) for i in range(0, len(x), ADABN_BATCH))
    with _memory_format(model, fmt), torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
        return adabn(model, batches, modules=model.unet, forward=model.unet, keep_source=keep_source,
                     should_stop=should_stop)


@contextlib.contextmanager
def _memory_format(model: nn.Module, fmt: torch.memory_format) -> Iterator[None]:
    """``model``'s 4-D weights in ``fmt`` for the duration, then back in their previous layout (parameters stay
    the same objects: an optimiser or a caller holding them sees the same tensors)."""
    before = {p: p.data for p in model.parameters() if p.dim() == 4 and not p.is_contiguous(memory_format=fmt)}
    for p in before:
        p.data = p.data.contiguous(memory_format=fmt)
    try:
        yield
    finally:
        for p, data in before.items():
            p.data = data


class _Stopped(Exception):
    pass


def set_bn_momentum_mode(module: nn.Module, momentum: float = 0.1) -> List[_BatchNorm]:
    """The paper's variant: put the BatchNorm layers of ``module`` in train mode with ``momentum``.

    Call after ``model.eval()`` at the start of every epoch; returns the layers it changed.
    """
    layers = list(batchnorm_layers(module).values())
    for bn in layers:
        bn.momentum = momentum
        bn.train()
    return layers
