"""The ConvLoRASeg Slicer module's own code, beside its module file ``ConvLoRASeg.py``.

A package, not a module: Slicer registers every top-level ``*.py`` of a module folder as a module, so the module
folder holds only ``ConvLoRASeg.py`` (module class, widget, self-test) and this folder holds the rest:

- :mod:`.parameters`: the parameter node (what the GUI binds) and the choices it offers;
- :mod:`.dependencies`: torch and the pip packages, installed in background processes with steps reported;
- :mod:`.logic`: :class:`~.logic.ConvLoRASegLogic`, the batch-mode API over MRML nodes (no widget references);
- :mod:`.presenters`: what the GUI shows, as plain functions (the widget applies them, tests drive them);
- :mod:`.manifest`: a cohort run's per-case rows, worst first, for the QC table.

Importing this package makes ``import ConvLoRASegLib`` work first: the library is installed next to the module
(a built extension), or sits one folder above the module folder (a source tree).
"""

import pathlib
import sys

#: The extension's repository: one URL, set in the top-level CMakeLists.txt (EXTENSION_REPOSITORY) and repeated here
#: for the help text (Testing/test_packaging.py checks that they agree).
REPOSITORY_URL = "https://github.com/convloraseg/SlicerConvLoRA"
HOMEPAGE_URL = REPOSITORY_URL + "#readme"

#: The module folder (``ConvLoRASeg/`` in a source tree, ``qt-scripted-modules/`` in a built extension).
MODULE_DIR = pathlib.Path(__file__).resolve().parent.parent


def _ensureLibraryImportable() -> None:
    """Make ``import ConvLoRASegLib`` work: installed next to the module, or one folder up in a source tree."""
    for folder in (MODULE_DIR, MODULE_DIR.parent):
        if (folder / "ConvLoRASegLib" / "__init__.py").is_file():
            if str(folder) not in sys.path:
                sys.path.insert(0, str(folder))
            return


_ensureLibraryImportable()
