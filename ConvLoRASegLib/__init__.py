"""ConvLoRASegLib: adapt a brain-MRI segmentation U-Net to a new scanner without labels (ConvLoRA + AdaBN + UDAS).

The paper's stages, one module each: :mod:`unet` (the DART20 U-Net), :mod:`esh` (early segmentation head),
:mod:`train` (source training), :mod:`convlora`, :mod:`adabn` and :mod:`selftrain` (adaptation). Around them:
:mod:`volumes` (geometry), :mod:`segment` (inference), :mod:`store` (files), :mod:`metrics`, :mod:`cohorts`,
:mod:`sites` (scanner-site simulator) and :mod:`cli`. Torch-free imports stay cheap: heavy modules load lazily.
"""

__version__ = "0.1.0"

from .errors import Cancelled, ConvLoRASegError
from .grid import WorkingGrid
from .unet import UNet2D, import_reference_checkpoint
from .esh import EarlySegmentationHead
from .model import ConvLoRASegModel
from .convlora import (AdapterSet, ConvLoRA, PLACEMENTS, adapter_state, inject_convlora, lora_parameter_count,
                       merge_convlora, unmerge_convlora)
from .adabn import adabn, set_bn_momentum_mode
from .selftrain import METHODS, MODES, AdaptResult, adapt
from .train import train_source
from .store import (AdapterInfo, AdapterStore, default_model_path, load_adapter, load_model, read_adapter_info,
                    save_adapter, save_model, user_store_dir)
from .segment import available_devices, choose_adapter, predict_slices, resolve_device, segment_image
from . import metrics
from .metrics import dice, hd95, surface_dice, volume_difference
from .cohorts import Case, cc359_cases, find_volumes, folder_cohort, split_cases
from .volumes import VolumeSlices, read_image, to_slices, to_native, to_mask, write_image

__all__ = [n for n in dir() if not n.startswith("_")]
