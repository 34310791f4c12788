"""The paper's 2D U-Net (DART20 layout, Shirokikh et al. 2020) with pre-activation residual blocks.

State-dict compatible with the ConvLoRA paper's code (which builds it from PyPI ``deep-pipe`` blocks), so its
checkpoints load with ``strict=True``: the module names below (``init_path``, ``down1`` ... ``out_path``,
``conv_path``, ``bn``/``activation``/``layer``) are part of the file format and must not change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Union

import torch
from torch import nn

from .errors import ConvLoRASegError

#: Names of the U-Net stages in forward order; ``LEVELS[i]`` is the stage whose output is "level i".
LEVELS = ("init_path", "down1", "down2", "down3")


class PreActivation(nn.Module):
    """``BatchNorm2d(c_in) -> ReLU -> Conv2d(c_in, c_out, k, padding=k//2)`` (deep-pipe's ``PreActivation2d``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.activation = nn.ReLU()
        self.layer = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.activation(self.bn(x)))


class ResBlock(nn.Module):
    """``x + conv_path(x)`` where ``conv_path`` is two bias-free :class:`PreActivation` (deep-pipe's ``ResBlock2d``)."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv_path = nn.Sequential(
            PreActivation(channels, channels, kernel_size, bias=False),
            PreActivation(channels, channels, kernel_size, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_path(x)


def _down(c_in: int, c_out: int, extra_identity: bool = False) -> nn.Sequential:
    layers: List[nn.Module] = [
        nn.BatchNorm2d(c_in),
        nn.Conv2d(c_in, c_out, kernel_size=2, stride=2, bias=False),
        nn.ReLU(),
        nn.Identity(),  # the paper's (disabled) dropout slot; kept so that indices match its checkpoints
        ResBlock(c_out), ResBlock(c_out), ResBlock(c_out),
    ]
    if extra_identity:
        layers.append(nn.Identity())
    return nn.Sequential(*layers)


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        ResBlock(c_in), ResBlock(c_in), ResBlock(c_in),
        nn.BatchNorm2d(c_in),
        nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2, bias=False),
        nn.ReLU(),
        nn.Identity(),
    )


class UNet2D(nn.Module):
    """DART20 2D U-Net: one input channel (an MRI slice), one output channel (brain logits).

    Input height and width must be multiples of 8 (three stride-2 downsamplings).
    With ``n_filters=16``: 2,434,771 parameters and 319 state-dict entries.
    """

    def __init__(self, n_filters: int = 16):
        super().__init__()
        n = n_filters
        self.n_filters = n
        self.init_path = nn.Sequential(
            nn.Conv2d(1, n, 3, padding=1, bias=False), nn.ReLU(), ResBlock(n), ResBlock(n), ResBlock(n)
        )
        self.shortcut0 = nn.Conv2d(n, n, 1)
        self.down1 = _down(n, 2 * n)
        self.shortcut1 = nn.Conv2d(2 * n, 2 * n, 1)
        self.down2 = _down(2 * n, 4 * n)
        self.shortcut2 = nn.Conv2d(4 * n, 4 * n, 1)
        self.down3 = _down(4 * n, 8 * n, extra_identity=True)
        self.up3 = _up(8 * n, 4 * n)
        self.up2 = _up(4 * n, 2 * n)
        self.up1 = _up(2 * n, n)
        self.out_path = nn.Sequential(ResBlock(n, kernel_size=1), PreActivation(n, 1, kernel_size=1), nn.BatchNorm2d(1))

    def encode(self, x: torch.Tensor, upto: int = 3) -> List[torch.Tensor]:
        """Outputs of the encoder stages ``init_path`` .. ``LEVELS[upto]`` (level 0 .. ``upto``)."""
        feats = []
        for name in LEVELS[: upto + 1]:
            x = getattr(self, name)(x)
            feats.append(x)
        return feats

    def decode(self, feats: List[torch.Tensor]) -> torch.Tensor:
        """Logits from the four encoder outputs returned by :meth:`encode`."""
        x0, x1, x2, x3 = feats
        y = self.up3(x3)
        y = self.up2(y + self.shortcut2(x2))
        y = self.up1(y + self.shortcut1(x1))
        return self.out_path(y + self.shortcut0(x0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def import_reference_checkpoint(path: Union[str, Path], n_filters: int = 16) -> UNet2D:
    """Load a U-Net ``.pth`` state dict saved by the paper's code (no pickle execution: ``weights_only=True``).

    ConvLoRA tensors (``*.lora_A``/``*.lora_B``) present in an adapted checkpoint are kept: the matching
    convolutions are wrapped with :class:`~ConvLoRASegLib.convlora.ConvLoRA` before loading.
    """
    path = Path(path)
    if not path.is_file():
        raise ConvLoRASegError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here is the file's fault
        raise ConvLoRASegError(f"cannot read {path.name} as a PyTorch state dict without pickle: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvLoRASegError(f"{path.name} is not a state dict of tensors")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    model = UNet2D(n_filters=n_filters)
    lora_paths = sorted({k[: -len(".lora_A")] for k in state if k.endswith(".lora_A")})
    if lora_paths:
        from .convlora import inject_convlora

        r = state[lora_paths[0] + ".lora_A"].shape[0] // model.get_submodule(lora_paths[0]).kernel_size[0]
        inject_convlora(model, lora_paths, r=r, alpha=r)
    missing, unexpected = model.load_state_dict(_as_float(state), strict=False)
    if missing or unexpected:
        raise ConvLoRASegError(
            f"{path.name} does not match the DART20 U-Net (n_filters={n_filters}): "
            f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    return model


def _as_float(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
