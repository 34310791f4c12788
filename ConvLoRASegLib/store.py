"""The one way weights are saved and loaded: safetensors files with JSON metadata, and the per-user store.

* A **model file** holds the U-Net and the ESH (``unet.*``, ``esh.*``), the working grid, the architecture and
  provenance, and the SHA-256 of its weights. Float weights may be stored in fp16; BatchNorm statistics stay fp32.
* An **adapter file** holds only what adaptation to one target site changed (LoRA factors, BatchNorm statistics,
  trained BN affine parameters; keys as in the U-Net state dict, e.g. ``init_path.0.lora_A``) and is bound to the
  SHA-256 of its base model: loading it on another model is refused.
* Nothing is ever unpickled. Writes are atomic.
* The **user store** (``$CONVLORASEG_HOME`` or the platform's per-user data folder) keeps adapters grouped by base
  model: ``<store>/adapters/<base sha256[:16]>/<name>.safetensors``. The CLI and the Slicer module share it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .atomic import atomic_output
from .errors import ConvLoRASegError
from .grid import WorkingGrid
from .model import ConvLoRASegModel
from .constants import DEFAULT_MODEL_FILE, SOURCE

MODEL_FORMAT = "convlora-seg-model"
ADAPTER_FORMAT = "convlora-seg-adapter"
#: A training checkpoint (``convlora-seg train --resume``): model, optimiser and RNG tensors, JSON state.
CHECKPOINT_FORMAT = "convlora-seg-train-checkpoint"
FORMAT_VERSION = "1"
PathLike = Union[str, Path]

_PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".pkl", ".pickle", ".bin")


# ---------------------------------------------------------------------------------------------------------------
# hashing and raw IO
# ---------------------------------------------------------------------------------------------------------------
def tensors_sha256(tensors: Dict[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, in sorted name order: independent of file layout."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_safetensors(path: PathLike) -> bool:
    """Whether ``path`` starts like a .safetensors file (an 8-byte header length, then a JSON header): a file cut
    short still does, and is then refused as unreadable by the reader itself."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and 2 <= int.from_bytes(head[:8], "little") < (1 << 27) and head[8:9] == b"{"


def file_format(path: PathLike) -> Optional[str]:
    """The ConvLoRASeg format of a file: :data:`MODEL_FORMAT`, :data:`ADAPTER_FORMAT`, :data:`CHECKPOINT_FORMAT`,
    ``""`` for another .safetensors file, None for a file that is not .safetensors (or not there)."""
    if not is_safetensors(path):
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format", "")
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None


def _refuse_pickle(path: Path, what: str) -> None:
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ConvLoRASegError(
            f"{path.name} looks like a PyTorch pickle checkpoint; {what} files must be .safetensors. Convert a "
            f"checkpoint of the paper's code with: convlora-seg import-checkpoint {path.name} -o model.safetensors")


def _read(path: PathLike, expected_format: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    path = Path(path)
    what = {MODEL_FORMAT: "model", CHECKPOINT_FORMAT: "checkpoint"}.get(expected_format, "adapter")
    if not path.exists():
        raise ConvLoRASegError(f"{what} file not found: {path}")
    if path.is_dir():
        raise ConvLoRASegError(f"{what} path is a folder, expected a .safetensors file: {path}")
    _refuse_pickle(path, what)
    if not is_safetensors(path):
        raise ConvLoRASegError(f"{path.name} is not a .safetensors file: a {what} file written by convlora-seg "
                               "(.safetensors) is expected")
    try:
        with safe_open(str(path), framework="pt") as f:  # one read: metadata and tensors
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ConvLoRASegError(f"{path.name} is not a readable .safetensors file ({str(exc).splitlines()[0]})") from None
    fmt = meta.get("format")
    if fmt != expected_format:
        other = {MODEL_FORMAT: "a model", ADAPTER_FORMAT: "an adapter",
                 CHECKPOINT_FORMAT: "a training checkpoint"}.get(fmt or "", "not a ConvLoRASeg file")
        raise ConvLoRASegError(f"{path.name} is {other}; expected {what} file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConvLoRASegError(f"{path.name} has format version {meta.get('format_version')}, this library reads "
                               f"version {FORMAT_VERSION}; update ConvLoRASegLib")
    return tensors, meta


def _write(path: PathLike, tensors: Dict[str, torch.Tensor], meta: Dict[str, str], overwrite: bool) -> Path:
    with atomic_output(path, overwrite=overwrite) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------
def default_model_path() -> Path:
    """The model bundled with the package (trained on real heads; see the README's model card)."""
    return DEFAULT_MODEL_FILE


def model_file(path: Optional[PathLike] = None) -> Path:
    """``path`` (a model file the user named), or the bundled default model; a clear error when no model is named
    and the default is not installed."""
    if path:
        return Path(path).expanduser()
    default = default_model_path()
    if not default.is_file():
        raise ConvLoRASegError(f"no --model given and the bundled default model is not installed ({default}); "
                               "pass --model MODEL.safetensors")
    return default


def save_model(model: ConvLoRASegModel, path: PathLike, dtype: torch.dtype = torch.float32,
               overwrite: bool = False) -> str:
    """Write ``model`` (U-Net + ESH, base weights only: no ConvLoRA) and return the SHA-256 of its weights.

    ``dtype`` applies to weights; BatchNorm statistics are kept in float32. Sets ``model.sha256``.
    """
    tensors: Dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if key.endswith(("lora_A", "lora_B", "num_batches_tracked")):
            continue
        if t.is_floating_point() and not key.endswith(("running_mean", "running_var")):
            t = t.to(dtype)
        tensors[key] = t
    sha = tensors_sha256(tensors)
    meta = {
        "format": MODEL_FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": json.dumps({"name": "UNet2D-DART20", "n_filters": model.n_filters,
                                    "esh_level": model.esh_level}),
        "grid": json.dumps(model.grid.to_dict()),
        "info": json.dumps(model.info, default=str),
        "library_version": __version__,
        "weights_sha256": sha,
    }
    _write(path, tensors, meta, overwrite)
    model.sha256 = sha
    return sha


def load_model(path: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu") -> ConvLoRASegModel:
    """Load a model file (``None``: the bundled default model), verifying its SHA-256. Returns it in eval mode."""
    path = Path(path) if path is not None else default_model_path()
    tensors, meta = _read(path, MODEL_FORMAT)
    sha = tensors_sha256(tensors)
    if sha != meta.get("weights_sha256"):
        raise ConvLoRASegError(f"{path.name} is corrupt: its weights do not match the SHA-256 in its metadata")
    try:
        arch = json.loads(meta["architecture"])
        grid = WorkingGrid.from_dict(json.loads(meta["grid"]))
        info = json.loads(meta.get("info", "{}"))
    except (KeyError, ValueError, TypeError) as exc:
        raise ConvLoRASegError(f"{path.name} has invalid metadata ({exc})") from None
    model = ConvLoRASegModel(grid=grid, n_filters=int(arch.get("n_filters", 16)),
                             esh_level=int(arch.get("esh_level", 3)), info=info)
    state = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ConvLoRASegError(f"{path.name} does not match the {arch.get('name')} architecture "
                               f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    model.sha256 = sha
    model.info.setdefault("path", str(path))
    return model.to(device).eval()


def save_checkpoint(path: PathLike, tensors: Dict[str, torch.Tensor], state: Dict[str, Any]) -> Path:
    """Write a training checkpoint atomically (replacing the previous one): tensors as they are (fp32 master
    weights, optimiser moments, RNG states as uint8 tensors) and ``state`` (JSON) as metadata."""
    meta = {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__,
            "state": json.dumps(state)}
    return _write(path, tensors, meta, overwrite=True)


def load_checkpoint(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(tensors, state) of a checkpoint written by :func:`save_checkpoint`."""
    tensors, meta = _read(path, CHECKPOINT_FORMAT)
    try:
        state = json.loads(meta["state"])
    except (KeyError, ValueError) as exc:
        raise ConvLoRASegError(f"{Path(path).name} has invalid checkpoint metadata ({exc})") from None
    return tensors, state


def model_sha256(model: ConvLoRASegModel) -> str:
    if not model.sha256:
        raise ConvLoRASegError("this model has not been saved yet; save it (store.save_model) before adapting it")
    return model.sha256


def read_model_metadata(path: PathLike) -> Dict[str, Any]:
    tensors, meta = _read(path, MODEL_FORMAT)
    out: Dict[str, Any] = {k: (json.loads(v) if k in ("architecture", "grid", "info") else v) for k, v in meta.items()}
    out["n_parameters"] = sum(t.numel() for k, t in tensors.items() if not k.endswith(("running_mean", "running_var")))
    out["file_sha256"] = file_sha256(path)
    out["bytes"] = Path(path).stat().st_size
    return out


# ---------------------------------------------------------------------------------------------------------------
# adapters
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class AdapterInfo:
    """What an adapter file says about itself (metadata only; cheap to read)."""

    path: Path
    name: str
    base_sha256: str
    method: str
    mode: str
    rank: int
    placement: str
    created: str
    #: the label-free score (ESH agreement + gamma consistency) of the selected candidate on its target
    score: Optional[float]
    #: its trainable parameters: what the adaptation trained (LoRA factors, BN scale/shift, weights), as the
    #: adaptation counted them (in the file when a trained candidate was selected)
    trainable_params: int
    #: every value the file stores: the trainable parameters and the BatchNorm statistics (running mean, variance)
    stored_values: int
    bytes: int
    details: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def agreement(self) -> Optional[float]:
        """The former name of :attr:`score` (the Slicer module reads it until it moves to ``score``)."""
        return self.score

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def save_adapter(model: ConvLoRASegModel, state: Dict[str, torch.Tensor], path: PathLike, *, name: str,
                 method: str, mode: str, rank: int, alpha: float, placement: str,
                 details: Optional[Dict[str, Any]] = None, overwrite: bool = False) -> AdapterInfo:
    """Write an adapter (``state`` from :func:`~ConvLoRASegLib.convlora.adapter_state`) bound to ``model``."""
    details = dict(details or {})
    score = details.get("score", details.get("agreement"))  # "agreement": the former name, in callers' details
    state = stored_form(state)
    meta = {
        "format": ADAPTER_FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "base_sha256": model_sha256(model),
        "method": method,
        "mode": mode,
        "rank": str(rank),
        "alpha": str(alpha),
        "placement": placement,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "score": "" if score is None else repr(float(score)),
        "details": json.dumps(details, default=str),
        "library_version": __version__,
        "adapter_sha256": tensors_sha256(state),
    }
    _write(path, state, meta, overwrite)
    return read_adapter_info(path)


def stored_form(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Adapter tensors as an adapter file holds them. BatchNorm statistics are stored in float16 (estimates from the
    target's slices: their sampling noise is far above fp16's 1e-3 relative precision; this halves the file to
    ~0.7 % of the fp16 model); trained tensors (LoRA factors, BN affine) stay float32."""
    return {k: v.detach().to(torch.float16) if k.endswith(("running_mean", "running_var")) else v.detach().float()
            for k, v in state.items()}


_BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _adapter_info(path: Path, tensors: Dict[str, torch.Tensor], meta: Dict[str, str]) -> AdapterInfo:
    try:
        details = json.loads(meta.get("details", "{}"))
    except ValueError:
        details = {}
    details["alpha"] = float(meta.get("alpha", "2"))
    score = meta.get("score") or meta.get("agreement")  # "agreement": the key of older files
    # what the adaptation trained, as it counted it (an adapter that keeps the unadapted model stores none of it)
    trained = sum(t.numel() for k, t in tensors.items() if not k.endswith(_BN_STATISTICS))
    return AdapterInfo(
        path=path, name=meta.get("name", path.stem), base_sha256=meta.get("base_sha256", ""),
        method=meta.get("method", "?"), mode=meta.get("mode", "?"), rank=int(meta.get("rank", "0")),
        placement=meta.get("placement", "?"), created=meta.get("created", ""),
        score=float(score) if score else None,
        trainable_params=int(details.get("trainable_params", trained)),
        stored_values=sum(t.numel() for t in tensors.values()),
        bytes=path.stat().st_size, details=details)


def read_adapter_info(path: PathLike) -> AdapterInfo:
    path = Path(path)
    tensors, meta = _read(path, ADAPTER_FORMAT)
    return _adapter_info(path, tensors, meta)


def load_adapter(model: ConvLoRASegModel, path: PathLike) -> Tuple[AdapterInfo, Dict[str, torch.Tensor]]:
    """Read an adapter for ``model``: refuses an adapter of another base model or a corrupt file."""
    path = Path(path)
    tensors, meta = _read(path, ADAPTER_FORMAT)
    if tensors_sha256(tensors) != meta.get("adapter_sha256"):
        raise ConvLoRASegError(f"{path.name} is corrupt: its tensors do not match the SHA-256 in its metadata")
    base = meta.get("base_sha256", "")
    if base != model_sha256(model):
        raise ConvLoRASegError(f"adapter {path.name} was made for another base model (sha256 {base[:12]}…), "
                               f"not this one ({model.sha256[:12]}…)")
    return _adapter_info(path, tensors, meta), tensors


# ---------------------------------------------------------------------------------------------------------------
# the per-user store
# ---------------------------------------------------------------------------------------------------------------
def user_store_dir() -> Path:
    """``$CONVLORASEG_HOME``, else the platform's per-user data folder + ``ConvLoRASeg``."""
    env = os.environ.get("CONVLORASEG_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "ConvLoRASeg"


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\- ]{0,63}$")


def check_adapter_name(name: str) -> str:
    name = name.strip()
    if not _NAME_RE.match(name) or name.endswith("."):
        raise ConvLoRASegError(f"invalid adapter name {name!r}: use 1-64 letters, digits, spaces, '.', '_' or '-'")
    if name.lower() == SOURCE:  # the key of the unadapted model in every score table (constants.SOURCE)
        raise ConvLoRASegError(f"the adapter name {name!r} is reserved for the model without an adapter: choose another")
    return name


class AdapterStore:
    """Adapters grouped by base model in the user store (or in ``root``)."""

    def __init__(self, root: Optional[PathLike] = None):
        self.root = Path(root) if root is not None else user_store_dir()

    def dir_for(self, model_sha: str) -> Path:
        return self.root / "adapters" / model_sha[:16]

    def path_for(self, model_sha: str, name: str) -> Path:
        return self.dir_for(model_sha) / f"{check_adapter_name(name)}.safetensors"

    def list(self, model_sha: str) -> List[AdapterInfo]:
        """Adapters of this base model, newest first; unreadable files are skipped."""
        folder = self.dir_for(model_sha)
        infos = []
        for p in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            try:
                info = read_adapter_info(p)
            except ConvLoRASegError:
                continue
            if info.base_sha256 == model_sha:
                infos.append(info)
        return sorted(infos, key=lambda i: i.created, reverse=True)

    def find(self, model_sha: str, name: str) -> AdapterInfo:
        p = self.path_for(model_sha, name)
        if not p.is_file():
            known = ", ".join(i.name for i in self.list(model_sha)) or "none"
            raise ConvLoRASegError(f"no adapter named {name!r} for this model (known: {known})")
        return read_adapter_info(p)

    def add(self, path: PathLike, name: Optional[str] = None, overwrite: bool = False) -> AdapterInfo:
        """Import an adapter file into the store (verified; renamed to ``name`` if given)."""
        path = Path(path)
        tensors, meta = _read(path, ADAPTER_FORMAT)
        if tensors_sha256(tensors) != meta.get("adapter_sha256"):
            raise ConvLoRASegError(f"{path.name} is corrupt: its tensors do not match the SHA-256 in its metadata")
        base = meta.get("base_sha256", "")
        if not re.fullmatch(r"[0-9a-f]{64}", base):
            raise ConvLoRASegError(f"{path.name} does not name its base model")
        name = check_adapter_name(name or meta.get("name") or path.stem)
        meta["name"] = name
        dest = self.path_for(base, name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        _write(dest, tensors, meta, overwrite)
        return read_adapter_info(dest)

    def export(self, model_sha: str, name: str, dest: PathLike, overwrite: bool = False) -> Path:
        src = self.find(model_sha, name).path
        with atomic_output(dest, overwrite=overwrite) as tmp:
            shutil.copyfile(src, tmp)
        return Path(dest)

    def rename(self, model_sha: str, name: str, new_name: str) -> AdapterInfo:
        info = self.find(model_sha, name)
        tensors, meta = _read(info.path, ADAPTER_FORMAT)
        meta["name"] = check_adapter_name(new_name)
        dest = self.path_for(model_sha, new_name)
        _write(dest, tensors, meta, overwrite=False)
        info.path.unlink()
        return read_adapter_info(dest)

    def delete(self, model_sha: str, name: str) -> None:
        self.find(model_sha, name).path.unlink()
