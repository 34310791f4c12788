"""The working grid: where, in millimetres and voxels, the 2D network sees a volume.

It is part of every model file: a model trained on 2 mm sagittal slices of 128 x 128 must be fed exactly that.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Union

#: Intensity normalisations a model may ask for.
NORMALISATIONS = ("minmax", "percentile")
#: Slicing axes (anatomical names; the canonical orientation is fixed in :mod:`ConvLoRASegLib.volumes`).
AXES = ("sagittal", "coronal", "axial")


@dataclass(frozen=True)
class WorkingGrid:
    """Isotropic working grid of a 2D slice model.

    Attributes:
        spacing_mm: voxel size of the working grid in mm, the same along all three axes.
        slice_size: in-plane size of a slice in voxels (height = width); a multiple of 8.
        axis: anatomical axis the volume is sliced along (the paper: ``"sagittal"``).
        normalisation: ``"minmax"`` (the paper: min-max per volume to [0, 1]) or ``"percentile"`` (robust:
            the 0.5th and 99.5th percentiles of the volume map to 0 and 1, values clipped).
    """

    spacing_mm: float = 2.0
    slice_size: int = 128
    axis: str = "sagittal"
    normalisation: str = "percentile"

    def __post_init__(self) -> None:
        if not self.spacing_mm > 0:
            raise ValueError(f"spacing_mm must be positive, got {self.spacing_mm}")
        if self.slice_size <= 0 or self.slice_size % 8:
            raise ValueError(f"slice_size must be a positive multiple of 8, got {self.slice_size}")
        if self.axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {self.axis!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}")

    @property
    def field_of_view_mm(self) -> float:
        return self.spacing_mm * self.slice_size

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "WorkingGrid":
        return cls(**{k: d[k] for k in ("spacing_mm", "slice_size", "axis", "normalisation") if k in d})


def recorded_grid(model_file: Union[str, os.PathLike]) -> Optional[WorkingGrid]:
    """The working grid a model file records in its safetensors metadata, read without torch and without its
    weights (a command reads its first volume onto this grid while torch loads); None when the file does not say
    (:func:`ConvLoRASegLib.store.load_model` then says why)."""
    try:
        from safetensors import safe_open

        with safe_open(os.fspath(model_file), framework="numpy") as f:
            return WorkingGrid.from_dict(json.loads((f.metadata() or {})["grid"]))
    except Exception:  # noqa: BLE001 - any unreadable file: the model's loader reports it
        return None
