"""A segmentation model as a user has it: the U-Net, its early segmentation head and its working grid."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from .errors import ConvLoRASegError
from .esh import EarlySegmentationHead
from .grid import WorkingGrid
from .unet import UNet2D

if TYPE_CHECKING:
    from .convlora import AdapterSet


class ConvLoRASegModel(nn.Module):
    """U-Net + ESH + working grid, the unit that :mod:`~ConvLoRASegLib.store` saves and loads.

    ``forward(x)`` gives the U-Net's logits; :meth:`forward_both` gives the U-Net's and the ESH's logits from
    one encoder pass. ``info`` carries free-form provenance (training data, epochs, scores).
    """

    def __init__(self, grid: Optional[WorkingGrid] = None, n_filters: int = 16, esh_level: int = 3,
                 info: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.grid = grid or WorkingGrid()
        self.unet = UNet2D(n_filters)
        self.esh = EarlySegmentationHead(esh_level, n_filters)
        self.info: Dict[str, Any] = dict(info or {})
        #: SHA-256 of the weights as stored in the model file (set by store.save_model/load_model); adapters are
        #: bound to it. None for a model that was never saved.
        self.sha256: Optional[str] = None

    @property
    def adapters(self) -> "AdapterSet":
        """The model's named site adapters (:class:`~ConvLoRASegLib.convlora.AdapterSet`), created on first use.
        The one owner of which adapter is active; not part of the state dict."""
        aset = self.__dict__.get("_adapters")
        if aset is None:
            from .convlora import AdapterSet

            aset = AdapterSet(self)
            self.__dict__["_adapters"] = aset
        return aset

    def drop_adapters(self) -> None:
        """Switch the active adapter off and forget every registered one (the model as it was)."""
        aset = self.__dict__.pop("_adapters", None)
        if aset is not None:
            aset.disable()

    @property
    def esh_level(self) -> int:
        return self.esh.level

    @property
    def n_filters(self) -> int:
        return self.unet.n_filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x)

    def forward_both(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(final logits, ESH logits), both N x 1 x H x W, sharing one encoder pass."""
        feats = self.unet.encode(x)
        return self.unet.decode(feats), self.esh(feats[self.esh_level])

    def forward_esh(self, x: torch.Tensor) -> torch.Tensor:
        """ESH logits; runs the encoder only up to the ESH's level."""
        return self.esh(self.unet.encode(x, upto=self.esh_level)[-1])


def import_reference_model(checkpoint: Union[str, Path], grid: WorkingGrid, n_filters: int = 16, esh_level: int = 3,
                           esh: Union[str, Path, None] = None) -> ConvLoRASegModel:
    """The paper's source U-Net ``.pth`` (and, with ``esh``, its early segmentation head's ``.pth``) as a model on
    ``grid``, read as state dicts of tensors only (``weights_only``). Raises ConvLoRASegError for an adapted
    checkpoint (ConvLoRA factors), an unreadable file or an ESH of another level."""
    from .convlora import lora_layers
    from .unet import import_reference_checkpoint

    unet = import_reference_checkpoint(checkpoint, n_filters=n_filters)
    if lora_layers(unet):
        raise ConvLoRASegError(f"{Path(checkpoint).name} holds ConvLoRA factors (an adapted model); "
                               "import the source model's checkpoint")
    model = ConvLoRASegModel(grid=grid, n_filters=n_filters, esh_level=esh_level,
                             info={"imported_from": Path(checkpoint).name})
    model.unet.load_state_dict(unet.state_dict())
    if esh:
        try:
            state = torch.load(esh, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure here is the file's fault
            raise ConvLoRASegError(f"cannot read {Path(esh).name} as a state dict without pickle: "
                                   f"{str(exc).splitlines()[0]}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        try:
            model.esh.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        except (RuntimeError, AttributeError) as exc:
            raise ConvLoRASegError(f"{Path(esh).name} does not match the ESH at level {esh_level}: "
                                   f"{str(exc).splitlines()[0]}") from None
        model.info["esh_imported_from"] = Path(esh).name
    return model
