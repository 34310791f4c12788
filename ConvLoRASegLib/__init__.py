"""ConvLoRASegLib: adapt a brain-MRI segmentation U-Net to a new scanner without labels (ConvLoRA + AdaBN + UDAS).

The paper's stages, one module each: :mod:`.unet` (the DART20 U-Net), :mod:`.esh` (early segmentation head),
:mod:`.train` (source training), :mod:`.convlora`, :mod:`.adabn` and :mod:`.selftrain` (adaptation). Around them:
:mod:`.volumes` (geometry), :mod:`.segment` (inference), :mod:`.selection` (the label-free score, above
inference), :mod:`.store` (files), :mod:`.batch` (a cohort run; :mod:`.cluster` on Dask), :mod:`.metrics`,
:mod:`.cohorts`, :mod:`.sites` (scanner-site simulator) and :mod:`.cli` (on top; nothing imports it).

Names are imported lazily: ``import ConvLoRASegLib`` (and ``ConvLoRASegLib.errors``) works before torch is
installed, which the Slicer module relies on to offer the install.
"""

from importlib import import_module
from typing import Any, Dict

__version__ = "0.1.0"
#: Oldest torch the library supports; keep equal to the ``torch>=`` floor in pyproject.toml (a test checks). The
#: Slicer module reads it to offer an upgrade of an older torch through PyTorchUtils.
TORCH_MIN = "2.1"

_EXPORTS: Dict[str, str] = {
    # errors, grid
    "ConvLoRASegError": "errors", "Cancelled": "errors", "WorkingGrid": "grid",
    # the paper's stages
    "UNet2D": "unet", "import_reference_checkpoint": "unet", "EarlySegmentationHead": "esh",
    "ConvLoRASegModel": "model", "ConvLoRA": "convlora", "inject_convlora": "convlora", "AdapterSet": "convlora",
    "adapter_state": "convlora", "PLACEMENTS": "convlora", "lora_parameter_count": "convlora",
    "merge_convlora": "convlora", "unmerge_convlora": "convlora", "adabn": "adabn",
    "set_bn_momentum_mode": "adabn", "adapt": "selftrain", "AdaptResult": "selftrain", "METHODS": "selftrain",
    "MODES": "selftrain", "train_source": "train",
    # files
    "save_model": "store", "load_model": "store", "save_adapter": "store", "load_adapter": "store",
    "read_adapter_info": "store", "AdapterInfo": "store", "AdapterStore": "store", "default_model_path": "store",
    "user_store_dir": "store",
    # inference
    "segment_image": "segment", "predict_slices": "segment", "choose_adapter": "selection",
    "segment_checked": "selection", "resolve_device": "segment", "available_devices": "segment",
    # cohorts of volumes: the CLI, Dask and the Slicer module's folder runs
    "segment_cohort": "batch", "CohortResult": "batch", "adapt_cohort": "batch", "evaluate_cohort": "batch",
    # volumes, cohorts, sites, metrics
    "read_image": "volumes", "write_image": "volumes", "to_slices": "volumes", "mask_to_slices": "volumes",
    "to_native": "volumes", "to_mask": "volumes", "brain_mask": "volumes", "VolumeSlices": "volumes",
    "check_intensities": "volumes",
    "check_memory": "volumes", "image_info": "volumes", "canonical": "volumes", "ijk_to_ras": "volumes",
    "image_from_array": "volumes", "array_from_image": "volumes",
    "Case": "cohorts", "find_volumes": "cohorts", "folder_cohort": "cohorts", "cc359_cases": "cohorts",
    "cc359_domains": "cohorts", "split_cases": "cohorts", "split_from_csv": "cohorts",
    "SITES": "sites", "SiteProfile": "sites", "simulate_site": "sites", "random_subject": "sites",
    "demo_heads": "sites",
    "dice": "metrics", "surface_dice": "metrics", "hd95": "metrics", "volume_difference": "metrics",
}
_SUBMODULES = ("metrics", "store", "volumes", "segment", "selection", "selftrain", "convlora", "adabn", "cohorts",
               "sites", "train", "unet", "esh", "model", "errors", "grid", "batch", "cluster", "qc", "cli")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES) + ["__version__", "TORCH_MIN"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__
