"""Names several rooms share and none of them owns, kept here so that they can import them without importing each
other (:mod:`.store` refuses an adapter named like the unadapted model; :mod:`.selection` scores it)."""

from pathlib import Path

#: The model bundled with the package (:func:`ConvLoRASegLib.store.default_model_path`), known without importing torch.
DEFAULT_MODEL_FILE = Path(__file__).resolve().parent / "data" / "default_model.safetensors"

#: Name of the unadapted candidate (the model without an adapter) in every score table, and a reserved adapter name.
SOURCE = "source"

# The command line's choices, known without importing torch (tests keep them equal to the library's own tables:
# selftrain.METHOD_SPECS and MODES, convlora.PLACEMENTS, the default of selftrain.adapt's epochs).
#: Adaptation methods (the paper's Table 1).
METHODS = ("convlora-adabn", "adabn", "udas", "udas-convlora", "self-training")
#: ``fast`` (the product's) or ``paper`` (the paper's exact recipe).
MODES = ("paper", "fast")
#: Where ConvLoRA goes in the U-Net.
PLACEMENTS = ("init_path", "init_path+down1", "init_path+down1+down2", "all")
#: Training epochs of an adaptation unless told otherwise: paper mode, and fast mode on several scans.
ADAPT_EPOCHS = 5
#: Training epochs of a fast-mode adaptation to one scan unless told otherwise (the Slicer user's case, with a budget of
#: 20 s on a 256^3 head): chosen by the rule of bench/one_scan_epochs.py, written before its rows, on real scans of
#: scanners the source model never saw (BENCHMARKS.md, "One-scan adaptation").
ONE_SCAN_EPOCHS = 3
