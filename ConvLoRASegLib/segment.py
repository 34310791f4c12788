"""Whole-volume inference: device choice, batched slice prediction, adapters on a model.

The path of a volume: :func:`~ConvLoRASegLib.volumes.to_slices` (canonical orientation, working grid,
normalisation) -> :func:`predict_slices` (the network in batches: channels-last, bf16/fp16 autocast where the
hardware has it, empty slices skipped, ConvLoRA merged into the kernels) -> :func:`~ConvLoRASegLib.volumes.to_native`
(probabilities resampled onto the input's exact grid) -> threshold (``volumes.MASK_THRESHOLD``) and post-processing.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from .convlora import merge_convlora, unmerge_convlora
from .errors import ConvLoRASegError
from .model import ConvLoRASegModel
from .store import AdapterInfo, load_adapter

if TYPE_CHECKING:
    from .volumes import VolumeSlices

AdapterLike = Union[None, str, Path, AdapterInfo]
Progress = Optional[Callable[[dict], None]]
StopFlag = Optional[Callable[[], bool]]

#: A slice whose normalised intensities are all below this is empty field of view: predicted as background.
EMPTY_SLICE_MAX = 0.02


def nonempty_slices(slices: np.ndarray) -> np.ndarray:
    """Which slices of an (N, H, W) stack hold signal (any intensity >= ``EMPTY_SLICE_MAX``): bool (N,)."""
    return np.asarray(slices).reshape(len(slices), -1).max(1) >= EMPTY_SLICE_MAX


#: Pixels (of the working grid) kept around the non-empty part of a batch when it is cropped for inference: outside
#: it the image is below EMPTY_SLICE_MAX, close to the network's zero padding. Measured on colin27, 1 mm / 256 px
#: (BENCHMARKS.md, Speed): the mask's surface Dice vs the uncropped fp32 mask is 0.9999 at 16 and at 8 px, 0.9995 at
#: 4 px and 0.992 at 0 px; 8 px runs the volume about 20 % faster than 16 px.
CROP_MARGIN_PX = 8
#: Crops start and end on multiples of this (the U-Net's three stride-2 levels need multiples of 8).
CROP_ALIGN_PX = 8


# ---------------------------------------------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------------------------------------------
def available_devices() -> List[Tuple[str, str]]:
    """``(spec, description)`` for every device this machine offers, CPU first."""
    out = [("cpu", f"CPU, {torch.get_num_threads()} threads")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append((f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.0f} GB"))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append(("mps", "Apple GPU (Metal)"))
    return out


def resolve_device(spec: Union[str, torch.device, None] = "auto") -> torch.device:
    """``auto`` -> the first CUDA GPU, else Apple MPS, else CPU. An explicit device that is absent is an error."""
    spec = str(spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda:0")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConvLoRASegError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConvLoRASegError("--device cuda was asked for, but PyTorch sees no CUDA GPU here "
                                   f"(torch {torch.__version__}); use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConvLoRASegError(f"no GPU cuda:{dev.index}; this machine has {torch.cuda.device_count()}")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConvLoRASegError("--device mps was asked for, but Apple's Metal backend is not available")
    elif dev.type != "cpu":
        raise ConvLoRASegError(f"unsupported device {spec!r}: use auto, cpu, cuda, cuda:N or mps")
    return dev


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device: torch.device, precision: str = "auto") -> Optional[torch.dtype]:
    """Reduced precision for inference: ``auto`` = bf16 on CPUs with native bf16 and on recent GPUs, fp16 on other
    GPUs, none elsewhere. ``fp32`` disables it."""
    if precision == "fp32":
        return None
    if precision in ("bf16", "fp16"):
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if _cpu_has_bf16() else None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def grad_scaler(device: torch.device, dtype: Optional[torch.dtype]):
    """A gradient scaler for training under ``dtype`` autocast: active for float16 (whose small gradients
    underflow without it), a pass-through otherwise (bf16 and fp32 need none)."""
    enabled = dtype == torch.float16
    amp_scaler = getattr(torch.amp, "GradScaler", None)  # torch >= 2.3; older: the CUDA one
    if amp_scaler is not None:
        return amp_scaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled and device.type == "cuda")


#: CUDA out-of-memory: torch's top-level ``OutOfMemoryError`` appeared in 2.5; the CUDA one is older, the same class.
OutOfMemoryError = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def default_batch_size(device: torch.device, slice_size: int) -> int:
    """Slices per forward pass: about 0.5 M pixels per batch on a CPU (32 slices of 128 x 128, 8 of 256 x 256; larger
    batches gain nothing there and cost memory), 64 slices of 128 x 128 on a GPU (scaled by the slice area)."""
    base = 64 if device.type != "cpu" else 32
    return max(1, int(base * (128 / slice_size) ** 2))


# ---------------------------------------------------------------------------------------------------------------
# adapters on a model
# ---------------------------------------------------------------------------------------------------------------
def activate_adapter(model: ConvLoRASegModel, adapter: AdapterLike) -> Optional[AdapterInfo]:
    """Make ``adapter`` (a file, an :class:`AdapterInfo`, or None for the model without one) the active one of
    ``model.adapters``.

    A file is read (and checked against the model) once; it is read again only when it changes on disk."""
    aset = model.adapters
    if adapter is None:
        aset.set_adapter(None)
        return None
    path = Path(adapter.path if isinstance(adapter, AdapterInfo) else adapter).expanduser()
    real = str(path.resolve())
    try:
        st = os.stat(real)
    except OSError:
        raise ConvLoRASegError(f"adapter file not found: {path}") from None
    key = f"{real}@{st.st_mtime_ns}:{st.st_size}"
    if key not in aset.names:
        info, tensors = load_adapter(model, path)
        for stale in [k for k in aset.names if k.rpartition("@")[0] == real]:
            aset.remove(stale)  # the file was replaced: drop its old tensors
        aset.add(key, tensors, alpha_over_r=info.details.get("alpha", info.rank) / max(info.rank, 1), info=info)
    aset.set_adapter(key)
    return aset.info[key]


@torch.no_grad()
def _fold_bn_after(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """``conv`` followed by eval-mode ``bn`` as ONE convolution (exact up to rounding: BN after a conv is affine)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode).to(conv.weight)
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


@torch.no_grad()
def _fold_bn_before(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """Eval-mode ``bn`` followed by an unpadded ``conv`` as ONE convolution (exact: no zero padding to shift)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0,
                      conv.dilation, conv.groups, bias=True).to(conv.weight)
    fused.weight.copy_(conv.weight * scale.view(1, -1, 1, 1))
    extra = (conv.weight * shift.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    fused.bias.copy_(extra + (conv.bias if conv.bias is not None else 0.0))
    return fused


def _fold_unet(unet: nn.Module) -> None:
    """Fold every BatchNorm that sits next to a convolution into it, in place; ReLUs become in-place.

    Per residual block the second BN follows the first convolution directly; each down stage's BN feeds an unpadded
    stride-2 convolution; the output BN follows the last 1x1 convolution. The first BN of a pre-activation block
    (it reads the residual sum) and the BN before each transposed convolution stay (not foldable exactly).
    """
    from .unet import PreActivation, ResBlock

    for module in unet.modules():
        if isinstance(module, ResBlock):
            first, second = module.conv_path
            first.layer = _fold_bn_after(first.layer, second.bn)
            second.bn = nn.Identity()
        elif isinstance(module, nn.ReLU):
            module.inplace = True
    for name in ("down1", "down2", "down3"):
        stage = getattr(unet, name)
        stage[1] = _fold_bn_before(stage[0], stage[1])
        stage[0] = nn.Identity()
    head: PreActivation = unet.out_path[1]
    head.layer = _fold_bn_after(head.layer, unet.out_path[2])
    unet.out_path[2] = nn.Identity()


def inference_copy(model: ConvLoRASegModel) -> ConvLoRASegModel:
    """A copy of ``model`` for eval-mode inference only: active adapter and ConvLoRA merged into the kernels,
    BatchNorms folded into their neighbouring convolutions (see :func:`_fold_unet`). Same outputs up to rounding
    (fp32: about 1e-5 in the logits); it cannot be trained and holds no adapters. ``model`` is not changed."""
    copy = ConvLoRASegModel(model.grid, model.n_filters, model.esh_level, model.info)
    merge_convlora(model)
    try:
        state = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}
    finally:
        unmerge_convlora(model)
    copy.load_state_dict(state)
    copy.sha256 = model.sha256
    copy.to(next(model.parameters()).device).eval()
    _fold_unet(copy.unet)
    return copy


@contextlib.contextmanager
def inference_mode(model: ConvLoRASegModel, device: torch.device) -> Iterator[ConvLoRASegModel]:
    """Yield the model to run for inference on ``device``: :func:`inference_copy` (eval, ConvLoRA merged, BN
    folded), channels-last except on MPS. ``model`` itself is left as it was."""
    fast = inference_copy(model).to(device)
    if device.type != "mps":
        fast.to(memory_format=torch.channels_last)
    yield fast


# ---------------------------------------------------------------------------------------------------------------
# prediction
# ---------------------------------------------------------------------------------------------------------------
def crop_box(nonempty: np.ndarray, margin: int = CROP_MARGIN_PX, align: int = CROP_ALIGN_PX) -> Tuple[slice, slice]:
    """Rows and columns of a slice to run the network on: the bounding box of ``nonempty`` (H x W bool, the union
    over a batch) grown by ``margin`` pixels, its ends moved outwards to multiples of ``align`` (clipped to the
    slice), so that the U-Net's stride-2 grid is the full slice's. Everything outside it is empty field of view."""
    h, w = nonempty.shape
    rows, cols = np.flatnonzero(nonempty.any(1)), np.flatnonzero(nonempty.any(0))
    if not len(rows):
        return slice(0, min(h, align)), slice(0, min(w, align))

    def span(idx: np.ndarray, n: int) -> slice:
        lo = max(0, (int(idx[0]) - margin) // align * align)
        hi = min(n, -(-(int(idx[-1]) + 1 + margin) // align) * align)
        return slice(lo, hi)

    return span(rows, h), span(cols, w)


def _run_batch(model: ConvLoRASegModel, x: torch.Tensor, dtype: Optional[torch.dtype], with_esh: bool,
               ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Sigmoid probabilities (B x h x w float32) of the final output and, with ``with_esh``, of the ESH."""
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        if with_esh:
            final, early = model.forward_both(x)
            return (torch.sigmoid(final.float())[:, 0].cpu().numpy(),
                    torch.sigmoid(early.float())[:, 0].cpu().numpy())
        return torch.sigmoid(model(x).float())[:, 0].cpu().numpy(), None


@torch.no_grad()
def predict_slices(model: ConvLoRASegModel, slices: np.ndarray, device: Union[str, torch.device] = "auto",
                   batch_size: Optional[int] = None, precision: str = "auto", with_esh: bool = False,
                   progress: Progress = None, should_stop: StopFlag = None, crop: bool = True,
                   ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Brain probabilities for a stack of working-grid slices (N x H x W float32 in [0, 1]).

    Batches of consecutive slices stream through :func:`inference_copy` of the model (BN folded, ConvLoRA merged,
    channels-last, bf16/fp16 autocast per :func:`autocast_dtype`), so memory holds one batch of activations, not
    the volume's. Empty slices (all intensities < ``EMPTY_SLICE_MAX``) are not run and get probability 0; with
    ``crop`` each batch runs on :func:`crop_box` of its non-empty pixels only (probability 0 outside). On CUDA
    out-of-memory the batch is halved, then the CPU is used. With ``with_esh`` the ESH's probabilities are returned
    as well. ``precision="fp32", crop=False`` is the reference path (the full slices in fp32).
    """
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    n, h, w = slices.shape
    probs = np.zeros((n, h, w), np.float32)
    esh = np.zeros((n, h, w), np.float32) if with_esh else None
    nonempty = slices >= EMPTY_SLICE_MAX
    busy = np.flatnonzero(nonempty_slices(slices))
    bs = batch_size or default_batch_size(dev, h)
    dtype = autocast_dtype(dev, precision)
    done = 0
    with inference_mode(model, dev) as net:
        i = 0
        while i < len(busy):
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt
            idx = busy[i:i + bs]
            rows, cols = crop_box(nonempty[idx].any(0)) if crop else (slice(0, h), slice(0, w))
            x = torch.from_numpy(np.ascontiguousarray(slices[idx, None, rows, cols])).to(dev)
            if dev.type != "mps":
                x = x.contiguous(memory_format=torch.channels_last)
            try:
                final, early = _run_batch(net, x, dtype, with_esh)
            except OutOfMemoryError:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                if bs > 1:
                    bs = max(1, bs // 2)
                    continue
                if dev.type != "cpu":
                    return predict_slices(model, slices, "cpu", None, precision, with_esh, progress, should_stop,
                                          crop)
                raise ConvLoRASegError("out of memory even with one slice per batch on the CPU") from None
            probs[idx, rows, cols] = final
            if with_esh:
                esh[idx, rows, cols] = early
            i += len(idx)
            done += len(idx)
            if progress is not None:
                progress({"event": "progress", "stage": "segment", "step": done, "total": len(busy)})
    return (probs, esh) if with_esh else probs


def segment_image(model: ConvLoRASegModel, image: sitk.Image, adapter: AdapterLike = None,
                  device: Union[str, torch.device] = "auto", postprocess: bool = True, probabilities: bool = False,
                  batch_size: Optional[int] = None, precision: str = "auto",
                  progress: Progress = None, should_stop: StopFlag = None,
                  working: Optional[VolumeSlices] = None) -> sitk.Image:
    """Brain mask (uint8 {0, 1}) of ``image`` on exactly its grid; or the float32 probabilities with
    ``probabilities=True``. ``adapter``: an adapter file / :class:`AdapterInfo` for the scan's site, or None.
    ``working``: ``to_slices(image, model.grid)`` if the caller already has it (e.g. from
    :func:`~ConvLoRASegLib.selection.choose_adapter`)."""
    from .volumes import brain_mask, to_native, to_slices

    activate_adapter(model, adapter)
    vs = working if working is not None else to_slices(image, model.grid)
    probs = predict_slices(model, vs.slices, device, batch_size, precision, progress=progress,
                           should_stop=should_stop)
    if probabilities:
        return to_native(probs, vs)
    return brain_mask(probs, vs, postprocess=postprocess)
