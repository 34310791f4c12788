"""``python -m ConvLoRASegLib ...`` runs the ``convlora-seg`` command line (the Slicer module starts it so)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
