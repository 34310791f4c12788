"""ConvLoRA: a low-rank update of a frozen convolution kernel, and named per-site adapters.

For a convolution with ``in`` input channels, ``out`` output channels and a k x k kernel, ConvLoRA learns
``lora_A`` (r*k x in*k) and ``lora_B`` (out*k x r*k) and uses the kernel

    W' = W + (lora_B @ lora_A).view(W.shape) * alpha / r

This is the parametrisation of loralib's ``Conv2d`` (Hu et al. 2021) that the ConvLoRA paper uses; ``lora_B``
starts at zero, so injecting ConvLoRA changes no output. The forward pass is ONE convolution with W', never an
extra activation-sized convolution. For a k x k x k Conv3d, ``lora_A`` is (r*k x in*k*k) so that B @ A has exactly
out*in*k^3 entries (loralib's own Conv3d reshape does not fit).

Tensor names: the wrapper keeps the wrapped convolution's ``weight``/``bias`` names and adds ``lora_A``/``lora_B``,
so a wrapped ``init_path.0`` has ``init_path.0.weight`` and ``init_path.0.lora_A`` — the paper's checkpoint keys.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

#: Where the paper injects ConvLoRA (U-Net stages whose Conv2d/Conv3d layers are wrapped).
PLACEMENTS: Dict[str, Sequence[str]] = {
    "init_path": ("init_path",),
    "init_path+down1": ("init_path", "down1"),
    "init_path+down1+down2": ("init_path", "down1", "down2"),
    "all": ("init_path", "down1", "down2", "up3", "up2", "up1"),
}

Placement = Union[str, Sequence[str]]


class ConvLoRA(nn.Module):
    """A frozen ``nn.Conv2d``/``nn.Conv3d`` with a trainable rank-``r`` update of its kernel.

    Args:
        conv: the convolution to adapt (``groups == 1``, cubic kernel). Its ``weight``/``bias`` Parameters are
            shared, not copied, and frozen (``requires_grad=False``).
        r: rank (the paper: 2).
        alpha: scaling numerator; the update is multiplied by ``alpha / r`` (the paper: alpha = r = 2).
    """

    def __init__(self, conv: nn.Module, r: int = 2, alpha: float = 2):
        super().__init__()
        if not isinstance(conv, (nn.Conv2d, nn.Conv3d)) or isinstance(conv, ConvLoRA):
            raise TypeError(f"ConvLoRA wraps nn.Conv2d or nn.Conv3d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"ConvLoRA needs groups=1, this convolution has groups={conv.groups}")
        k = conv.kernel_size[0]
        if any(s != k for s in conv.kernel_size):
            raise ValueError(f"ConvLoRA needs a square/cubic kernel, got {tuple(conv.kernel_size)}")
        if r < 1:
            raise ValueError(f"rank r must be >= 1, got {r}")
        self._conv_forward = conv._conv_forward  # bound to the wrapped conv: padding mode, stride, dilation
        self.conv_type = type(conv).__name__
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, k
        self.weight = conv.weight
        self.bias = conv.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha = int(r), float(alpha)
        d = conv.weight.dim() - 2  # spatial dimensions
        self.lora_A = nn.Parameter(conv.weight.new_zeros(r * k, conv.in_channels * k ** (d - 1)))
        self.lora_B = nn.Parameter(conv.weight.new_zeros(conv.out_channels * k, r * k))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self._saved_weight: Optional[torch.Tensor] = None  # W before merge(), for an exact unmerge()

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def merged(self) -> bool:
        return self._saved_weight is not None

    def delta_weight(self) -> torch.Tensor:
        """The kernel update ``(B @ A).view(W.shape) * alpha / r``."""
        return (self.lora_B @ self.lora_A).view(self.weight.shape) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self._conv_forward(x, self.weight, self.bias)
        return self._conv_forward(x, self.weight + self.delta_weight(), self.bias)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight`` (for inference: the plain convolution's speed). Idempotent."""
        if not self.merged:
            self._saved_weight = self.weight.detach().clone()
            self.weight.add_(self.delta_weight())

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the frozen kernel exactly as it was before :meth:`merge`. Idempotent."""
        if self.merged:
            self.weight.copy_(self._saved_weight)
            self._saved_weight = None

    def train(self, mode: bool = True) -> "ConvLoRA":
        if mode:
            self.unmerge()  # training a merged layer would silently train nothing
        return super().train(mode)

    @torch.no_grad()
    def set_lora(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Load LoRA factors, changing the rank if their shapes say so (``lora_A`` is r*k x ...)."""
        if self.merged:
            raise RuntimeError("unmerge() before loading new LoRA factors")
        r = lora_A.shape[0] // self.kernel_size
        if lora_A.shape[0] != r * self.kernel_size or tuple(lora_B.shape) != (self.out_channels * self.kernel_size,
                                                                              r * self.kernel_size):
            raise ValueError(f"LoRA shapes {tuple(lora_A.shape)}, {tuple(lora_B.shape)} do not fit this layer")
        if r != self.r:
            self.alpha = self.alpha * r / self.r  # keep alpha/r as stored: the caller sets alpha explicitly if needed
            self.r = r
            self.lora_A = nn.Parameter(lora_A.detach().clone().to(self.weight))
            self.lora_B = nn.Parameter(lora_B.detach().clone().to(self.weight))
        else:
            self.lora_A.copy_(lora_A)
            self.lora_B.copy_(lora_B)

    def extra_repr(self) -> str:
        return (f"{self.conv_type}({self.in_channels}, {self.out_channels}, k={self.kernel_size}), "
                f"r={self.r}, alpha={self.alpha:g}, merged={self.merged}")


def _net(model: nn.Module) -> nn.Module:
    """The U-Net inside a :class:`~ConvLoRASegLib.model.ConvLoRASegModel`, or ``model`` itself."""
    return getattr(model, "unet", model)


def placement_modules(model: nn.Module, placement: Placement = "init_path") -> List[str]:
    """Paths (relative to the U-Net) of the convolutions a placement wraps.

    ``placement`` is a paper name (see :data:`PLACEMENTS`) or a list of module paths: a stage such as ``"down2"``
    stands for every Conv2d/Conv3d inside it; a path to a single convolution stands for itself.
    ConvTranspose layers are never wrapped.
    """
    net = _net(model)
    if isinstance(placement, str):
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)} "
                             "or give a list of module paths")
        roots: Sequence[str] = PLACEMENTS[placement]
    else:
        roots = list(placement)
    paths: List[str] = []
    for root in roots:
        try:
            sub = net.get_submodule(root)
        except AttributeError:
            raise ValueError(f"no module {root!r} in {type(net).__name__}") from None
        for name, m in sub.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, ConvLoRA)):
                p = f"{root}.{name}" if name else root
                if p not in paths:
                    paths.append(p)
    if not paths:
        raise ValueError(f"placement {placement!r} contains no convolution")
    return paths


def inject_convlora(model: nn.Module, placement: Placement = "init_path", r: int = 2, alpha: float = 2,
                    freeze_base: bool = True) -> List[str]:
    """Wrap the placement's convolutions with :class:`ConvLoRA`; returns their paths.

    With ``freeze_base`` every other parameter of the model is frozen too (``requires_grad=False``), as in the
    paper; ConvLoRA factors are the only trainable tensors afterwards. Already-wrapped layers are left alone.
    """
    net = _net(model)
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    paths = placement_modules(net, placement)
    for path in paths:
        module = net.get_submodule(path)
        if isinstance(module, ConvLoRA):
            continue
        parent_path, _, child = path.rpartition(".")
        parent = net.get_submodule(parent_path) if parent_path else net
        setattr(parent, child, ConvLoRA(module, r=r, alpha=alpha))
    return paths


def lora_layers(model: nn.Module) -> Dict[str, ConvLoRA]:
    """Every :class:`ConvLoRA` in the U-Net, by path."""
    return {n: m for n, m in _net(model).named_modules() if isinstance(m, ConvLoRA)}


def lora_parameter_count(model: nn.Module) -> int:
    return sum(m.lora_A.numel() + m.lora_B.numel() for m in lora_layers(model).values())


def merge_convlora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.merge()


def unmerge_convlora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.unmerge()


def remove_convlora(model: nn.Module) -> None:
    """Replace every ConvLoRA by a plain convolution holding its (merged or base) kernel."""
    net = _net(model)
    for path, m in lora_layers(net).items():
        conv = m._conv_forward.__self__
        conv.weight = m.weight
        conv.bias = m.bias
        parent_path, _, child = path.rpartition(".")
        setattr(net.get_submodule(parent_path) if parent_path else net, child, conv)


# --------------------------------------------------------------------------------------------------------------
# Named adapters: one model, one adapter per target site.
# --------------------------------------------------------------------------------------------------------------
#
# An adapter is what adaptation changed: the LoRA factors, the BatchNorm running statistics (AdaBN) and any BN
# affine parameters it trained, as a flat {U-Net state-dict key: tensor} dict. Switching adapters copies tensors in
# place; "no adapter" restores the source model's values, which are snapshotted the first time an adapter is set.

def adapter_state(model: nn.Module, bn_stats: bool = True, trained_only: bool = True) -> Dict[str, torch.Tensor]:
    """The tensors a target adapter holds, keyed as in the U-Net state dict (the one place that builds them).

    LoRA factors of every ConvLoRA; with ``bn_stats``, every BatchNorm's ``running_mean``/``running_var``; every
    other parameter that is trainable (BN affine parameters, or the convolutions a method fine-tunes); with
    ``trained_only=False`` also every BN affine parameter, trainable or not.
    """
    net = _net(model)
    out: Dict[str, torch.Tensor] = {}
    for path, m in net.named_modules():
        if isinstance(m, ConvLoRA):
            out[f"{path}.lora_A"] = m.lora_A.detach().clone()
            out[f"{path}.lora_B"] = m.lora_B.detach().clone()
        elif isinstance(m, _BatchNorm):
            if bn_stats and m.track_running_stats:
                out[f"{path}.running_mean"] = m.running_mean.detach().clone()
                out[f"{path}.running_var"] = m.running_var.detach().clone()
            if m.affine and not trained_only:
                out[f"{path}.weight"] = m.weight.detach().clone()
                out[f"{path}.bias"] = m.bias.detach().clone()
    for name, p in net.named_parameters():
        if p.requires_grad and not name.endswith((".lora_A", ".lora_B")):
            out[name] = p.detach().clone()
    return out


@torch.no_grad()
def load_adapter_state(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Copy an :func:`adapter_state` dict into the model's live tensors (its ConvLoRA layers must exist)."""
    net = _net(model)
    live = dict(net.named_parameters())
    live.update(net.named_buffers())
    for key, value in state.items():
        if key not in live:
            raise KeyError(f"the adapter holds {key}, which this model does not have")
        live[key].copy_(value.to(live[key]))


class AdapterSet:
    """Named adapters on one model: ``add``, ``set_adapter(name)``, ``disable()`` (= the source model).

    >>> adapters = AdapterSet(model)
    >>> adapters.add("siemens3", state)      # a dict from adapter_state() or an adapter file
    >>> adapters.set_adapter("siemens3")     # the model now predicts as adapted to siemens3
    >>> adapters.disable()                   # back to the model as it was, exactly

    ``disable()`` restores only the tensors the set itself changed (snapshotted before their first change): a model
    whose ConvLoRA layers were trained outside the set (an :func:`~ConvLoRASegLib.selftrain.adapt` result) keeps
    them. ``info`` holds what the caller attached to each adapter (e.g. the file's
    :class:`~ConvLoRASegLib.store.AdapterInfo`).
    """

    def __init__(self, model: nn.Module, alpha_over_r: float = 1.0):
        self.model = model
        self.net = _net(model)
        self.alpha_over_r = alpha_over_r
        self._adapters: Dict[str, Dict[str, torch.Tensor]] = {}
        self._scales: Dict[str, float] = {}
        self._source: Dict[str, torch.Tensor] = {}
        self._alphas: Dict[str, float] = {}
        self.info: Dict[str, object] = {}
        self.active: Optional[str] = None

    @property
    def names(self) -> List[str]:
        return list(self._adapters)

    def add(self, name: str, state: Dict[str, torch.Tensor], alpha_over_r: Optional[float] = None,
            info: object = None) -> None:
        """Register an adapter; ``alpha_over_r`` is its LoRA scale (default: the set's ``alpha_over_r``)."""
        self._adapters[name] = {k: v.detach().clone() for k, v in state.items()}
        self._scales[name] = self.alpha_over_r if alpha_over_r is None else float(alpha_over_r)
        self.info[name] = info

    def remove(self, name: str) -> None:
        if self.active == name:
            self.disable()
        del self._adapters[name]
        del self._scales[name]
        self.info.pop(name, None)

    @torch.no_grad()
    def set_adapter(self, name: Optional[str]) -> None:
        """Make ``name`` the active adapter (``None``: the model as it was before any adapter of this set)."""
        self.disable()
        if name is None:
            return
        state = self._adapters[name]
        self._ensure_lora_layers(state)
        live = self._live_tensors()
        for key, value in state.items():
            if key not in live:
                raise KeyError(f"adapter {name!r} holds {key}, which this model does not have")
            if not key.endswith((".lora_A", ".lora_B")) and live[key].shape != value.shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit the model's {tuple(live[key].shape)}")
        for path in sorted({k[: -len(".lora_A")] for k in state if k.endswith(".lora_A")}):
            layer = self.net.get_submodule(path)
            layer.unmerge()
            if path + ".lora_A" not in self._source:
                self._source[path + ".lora_A"] = layer.lora_A.detach().clone()
                self._source[path + ".lora_B"] = layer.lora_B.detach().clone()
                self._alphas[path] = layer.alpha
            layer.set_lora(state[path + ".lora_A"], state[path + ".lora_B"])
            layer.alpha = layer.r * self._scales[name]
        for key, value in state.items():
            if key.endswith((".lora_A", ".lora_B")):
                continue
            self._source.setdefault(key, live[key].detach().clone())
            live[key].copy_(value.to(live[key]))
        self.active = name

    @torch.no_grad()
    def disable(self) -> None:
        """Back to the model as it was: every tensor this set changed is restored; nothing else is touched."""
        live = None
        for key, value in self._source.items():
            if key.endswith(".lora_A"):
                path = key[: -len(".lora_A")]
                layer = self.net.get_submodule(path)
                layer.unmerge()
                layer.set_lora(value, self._source[path + ".lora_B"])
                layer.alpha = self._alphas[path]
            elif not key.endswith(".lora_B"):
                live = live if live is not None else self._live_tensors()
                live[key].copy_(value)
        self.active = None

    # internals -----------------------------------------------------------------------------------------------
    def _ensure_lora_layers(self, state: Dict[str, torch.Tensor]) -> None:
        paths = sorted({k[: -len(".lora_A")] for k in state if k.endswith(".lora_A")})
        missing = [p for p in paths if not isinstance(self.net.get_submodule(p), ConvLoRA)]
        if missing:
            trainable = {n: p.requires_grad for n, p in self.model.named_parameters()}
            inject_convlora(self.net, missing, r=2, alpha=2 * self.alpha_over_r, freeze_base=False)
            for n, p in self.model.named_parameters():
                p.requires_grad_(trainable.get(n, False))

    def _live_tensors(self) -> Dict[str, torch.Tensor]:
        live = dict(self.net.named_parameters())
        live.update(self.net.named_buffers())
        return live
