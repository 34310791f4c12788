"""ConvLoRASegLib: adapt a brain-MRI segmentation U-Net to a new scanner without labels (ConvLoRA + AdaBN + UDAS)."""

__version__ = "0.1.0"

from .errors import ConvLoRASegError
from .grid import WorkingGrid
from .unet import UNet2D, import_reference_checkpoint
from .esh import EarlySegmentationHead
from .model import ConvLoRASegModel
