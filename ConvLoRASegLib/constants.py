"""Names several rooms share and none of them owns, kept here so that they can import them without importing each
other (:mod:`.store` refuses an adapter named like the unadapted model; :mod:`.selection` scores it)."""

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
#: Training epochs of an adaptation unless told otherwise, in both modes.
ADAPT_EPOCHS = 5
