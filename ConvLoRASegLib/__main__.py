"""``python -m ConvLoRASegLib ...`` runs the ``convlora-seg`` command line (the Slicer module starts it so)."""

from .cli import run

if __name__ == "__main__":
    run()
