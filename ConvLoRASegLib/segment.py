"""Whole-volume inference: device choice, batched slice prediction, adapters, label-free adapter choice.

The path of a volume: :func:`~ConvLoRASegLib.volumes.to_slices` (canonical orientation, working grid,
normalisation) -> :func:`predict_slices` (the network in batches: channels-last, bf16/fp16 autocast where the
hardware has it, empty slices skipped, ConvLoRA merged into the kernels) -> :func:`~ConvLoRASegLib.volumes.to_native`
(probabilities resampled onto the input's exact grid) -> threshold 0.5 and post-processing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch

from .convlora import AdapterSet, merge_convlora, unmerge_convlora
from .errors import ConvLoRASegError
from .model import ConvLoRASegModel
from .store import AdapterInfo, load_adapter

AdapterLike = Union[None, str, Path, AdapterInfo]
Progress = Optional[Callable[[dict], None]]
StopFlag = Optional[Callable[[], bool]]

#: A slice whose normalised intensities are all below this is empty field of view: predicted as background.
EMPTY_SLICE_MAX = 0.02


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


def default_batch_size(device: torch.device, slice_size: int) -> int:
    base = 64 if device.type != "cpu" else 16
    return max(1, int(base * (128 / slice_size) ** 2))


# ---------------------------------------------------------------------------------------------------------------
# adapters on a model
# ---------------------------------------------------------------------------------------------------------------
def adapter_set(model: ConvLoRASegModel) -> AdapterSet:
    """The model's :class:`~ConvLoRASegLib.convlora.AdapterSet`, created on first use."""
    aset = getattr(model, "_adapter_set", None)
    if aset is None:
        aset = AdapterSet(model)
        model._adapter_set = aset  # plain attribute: not part of the state dict
    return aset


def activate_adapter(model: ConvLoRASegModel, adapter: AdapterLike) -> Optional[AdapterInfo]:
    """Make ``adapter`` (a file, an :class:`AdapterInfo`, or None for the source model) the active one."""
    aset = adapter_set(model)
    if adapter is None:
        aset.set_adapter(None)
        return None
    path = adapter.path if isinstance(adapter, AdapterInfo) else Path(adapter)
    key = str(Path(path).resolve())
    info, tensors = load_adapter(model, path)
    if key not in aset.names:
        aset.alpha_over_r = info.details.get("alpha", info.rank) / max(info.rank, 1)
        aset.add(key, tensors)
    aset.set_adapter(key)
    return info


@contextlib.contextmanager
def inference_mode(model: ConvLoRASegModel, device: torch.device) -> Iterator[ConvLoRASegModel]:
    """Eval mode, ConvLoRA merged into the kernels, channels-last on the device; undone afterwards."""
    was_training = model.training
    model.eval()
    merge_convlora(model)
    model.to(device)
    if device.type != "mps":
        model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        unmerge_convlora(model)
        model.to(memory_format=torch.contiguous_format)
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------------------
# prediction
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_slices(model: ConvLoRASegModel, slices: np.ndarray, device: Union[str, torch.device] = "auto",
                   batch_size: Optional[int] = None, precision: str = "auto", with_esh: bool = False,
                   progress: Progress = None, should_stop: StopFlag = None,
                   ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Brain probabilities for a stack of working-grid slices (N x H x W float32 in [0, 1]).

    Batches stream through the network, so memory holds one batch of activations, not the volume's. Empty slices
    (all intensities < ``EMPTY_SLICE_MAX``) are not run and get probability 0. On CUDA out-of-memory the batch is
    halved, then the CPU is used. With ``with_esh`` the ESH's probabilities are returned as well.
    """
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    n, h, w = slices.shape
    probs = np.zeros((n, h, w), np.float32)
    esh = np.zeros((n, h, w), np.float32) if with_esh else None
    busy = np.flatnonzero(slices.reshape(n, -1).max(1) >= EMPTY_SLICE_MAX)
    bs = batch_size or default_batch_size(dev, h)
    dtype = autocast_dtype(dev, precision)
    done = 0
    with inference_mode(model, dev):
        i = 0
        while i < len(busy):
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt
            idx = busy[i:i + bs]
            x = torch.from_numpy(np.ascontiguousarray(slices[idx, None])).to(dev)
            if dev.type != "mps":
                x = x.contiguous(memory_format=torch.channels_last)
            try:
                with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                    if with_esh:
                        final, early = model.forward_both(x)
                        esh[idx] = torch.sigmoid(early.float())[:, 0].cpu().numpy()
                    else:
                        final = model(x)
                probs[idx] = torch.sigmoid(final.float())[:, 0].cpu().numpy()
            except torch.OutOfMemoryError:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                if bs > 1:
                    bs = max(1, bs // 2)
                    continue
                if dev.type != "cpu":
                    return predict_slices(model, slices, "cpu", None, precision, with_esh, progress, should_stop)
                raise ConvLoRASegError("out of memory even with one slice per batch on the CPU") from None
            i += len(idx)
            done += len(idx)
            if progress is not None:
                progress({"event": "progress", "stage": "segment", "step": done, "total": len(busy)})
    return (probs, esh) if with_esh else probs


def agreement(final_probs: np.ndarray, esh_probs: np.ndarray, spacing_mm: float, tolerance_mm: float = 1.0) -> float:
    """Label-free quality score: surface Dice between the ESH's mask and the final mask (1 mm tolerance)."""
    from .metrics import surface_dice

    return float(surface_dice(esh_probs >= 0.5, final_probs >= 0.5, (spacing_mm,) * 3, tolerance_mm))


def segment_image(model: ConvLoRASegModel, image: sitk.Image, adapter: AdapterLike = None,
                  device: Union[str, torch.device] = "auto", postprocess: bool = True, probabilities: bool = False,
                  batch_size: Optional[int] = None, precision: str = "auto",
                  progress: Progress = None, should_stop: StopFlag = None) -> sitk.Image:
    """Brain mask (uint8 {0, 1}) of ``image`` on exactly its grid; or the float32 probabilities with
    ``probabilities=True``. ``adapter``: an adapter file / :class:`AdapterInfo` for the scan's site, or None."""
    from .volumes import to_mask, to_native, to_slices

    activate_adapter(model, adapter)
    vs = to_slices(image, model.grid)
    probs = predict_slices(model, vs.slices, device, batch_size, precision, progress=progress,
                           should_stop=should_stop)
    prob_img = to_native(probs, vs)
    if probabilities:
        return prob_img
    return to_mask(prob_img, 0.5, postprocess=postprocess)


def choose_adapter(model: ConvLoRASegModel, image: sitk.Image, adapters: Sequence[AdapterLike],
                   device: Union[str, torch.device] = "auto",
                   ) -> Tuple[Optional[AdapterInfo], Dict[str, float]]:
    """Pick, label-free, the adapter whose ESH agrees best with its final prediction on this scan.

    Returns the winner (None if the source model scores best) and every score, keyed by adapter name
    (``"source"`` for no adapter).
    """
    from .volumes import to_slices

    vs = to_slices(image, model.grid)
    scores: Dict[str, float] = {}
    best: Tuple[float, Optional[AdapterInfo]] = (-1.0, None)
    for candidate in [None, *adapters]:
        info = activate_adapter(model, candidate)
        final, early = predict_slices(model, vs.slices, device, with_esh=True)
        score = agreement(final, early, model.grid.spacing_mm)
        scores["source" if info is None else info.name] = score
        if score > best[0]:
            best = (score, info)
    activate_adapter(model, None)
    return best[1], scores
