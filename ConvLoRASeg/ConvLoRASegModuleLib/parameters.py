"""The module's parameter node: what the GUI binds (through ``SlicerParameterName`` in the .ui) and saves with
the scene, and the choices it offers."""

from __future__ import annotations

import ast
import enum
import importlib
import importlib.util
import pathlib
from typing import Optional, Union

from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, Default, WithinRange, parameterNodeWrapper

try:
    from typing import Annotated
except ImportError:  # Python < 3.9
    from typing_extensions import Annotated

# Same names as ConvLoRASegLib.cohorts (CC359 domains) and ConvLoRASegLib.selftrain.METHODS (kept literal so the
# module loads without torch; Testing/test_slicer_logic.py checks they agree).
CC359_SITES = ("ge15", "ge3", "philips15", "philips3", "siemens15", "siemens3")
METHODS = ("convlora-adabn", "adabn", "udas", "udas-convlora", "self-training")


class TargetType(enum.Enum):
    """Where the unlabelled scans of the target scanner come from."""

    FOLDER = "folder"
    SCENE = "scene"
    CC359 = "cc359"

    def label(self) -> str:
        return {"folder": "Folder of volumes", "scene": "Volumes checked in the scene",
                "cc359": "CC359 site"}[self.value]


# Paths are plain strings ("" = not chosen), not pathlib.Path: a Path parameter defaults to Path() = "." (Slicer's
# working folder) and the path line edit shows ".". Their ctkPathLineEdits are therefore bound by the widget
# (PATH_WIDGETS), not through SlicerParameterName (parameterNodeWrapper binds a ctkPathLineEdit to Path only).
@parameterNodeWrapper
class ConvLoRASegParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    modelPath: str
    device: Annotated[str, Default("auto")]
    targetType: TargetType
    cohortFolder: str
    cc359Root: str
    cc359Site: Annotated[str, Choice(list(CC359_SITES)), Default("ge15")]
    newAdapterName: str
    method: Annotated[str, Choice(list(METHODS)), Default("convlora-adabn")]
    epochs: Annotated[int, WithinRange(0, 1000), Default(0)]
    # optional labelled check of an adaptation (adapt --check): a scan of the target site and its trusted brain
    # mask; None is part of the union so that the selector can be cleared (parameterNodeWrapper needs it there)
    checkScan: vtkMRMLScalarVolumeNode
    checkMask: Optional[Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode]]
    selectedAdapter: str
    autoAdapter: bool
    outputLabelmap: vtkMRMLLabelMapVolumeNode
    createSegmentation: bool
    show3D: Annotated[bool, Default(True)]
    segmentInputFolder: str
    segmentOutputFolder: str


#: ctkPathLineEdit (in the .ui) -> str field of the parameter node, bound by the widget.
PATH_WIDGETS = {
    "modelPathLineEdit": "modelPath",
    "cohortFolderPathLineEdit": "cohortFolder",
    "cc359RootPathLineEdit": "cc359Root",
    "segmentInputPathLineEdit": "segmentInputFolder",
    "segmentOutputPathLineEdit": "segmentOutputFolder",
}


def pathOrNone(path: Optional[Union[str, pathlib.Path]]) -> Optional[pathlib.Path]:
    """A parameter-node path, or None when it is empty ('' or '.', which an old scene may hold)."""
    if path is None or str(path).strip() in ("", "."):
        return None
    return pathlib.Path(str(path).strip())


def libraryDefaultEpochs() -> Optional[int]:
    """The number of self-training epochs the library runs when none is given (``epochs`` = 0 here), or None when
    it cannot be read.

    It is the default of ``epochs`` in ``ConvLoRASegLib.selftrain.adapt`` on several scans (one scan in fast mode:
    :func:`libraryOneScanEpochs`), which the library keeps as ``ConvLoRASegLib.constants.ADAPT_EPOCHS``
    (torch-free). A library without that constant: the default is read from selftrain's source (a literal, or a
    module-level constant it names), as selftrain imports torch, which the module must not need to show its GUI.
    """
    value = _libraryIntConstant("ADAPT_EPOCHS")
    return value if value is not None else _selftrainSourceDefaultEpochs()


def libraryOneScanEpochs() -> Optional[int]:
    """The epochs the library's fast mode runs on one scan when none are given
    (``ConvLoRASegLib.constants.ONE_SCAN_EPOCHS``), or None for a library without that constant."""
    return _libraryIntConstant("ONE_SCAN_EPOCHS")


def _libraryIntConstant(name: str) -> Optional[int]:
    """An integer of the library's torch-free ``ConvLoRASegLib.constants``, or None when it is not there."""
    try:
        value = getattr(importlib.import_module("ConvLoRASegLib.constants"), name, None)
    except ImportError:
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _selftrainSourceDefaultEpochs() -> Optional[int]:
    """The default of ``epochs`` in ``ConvLoRASegLib.selftrain.adapt``, read from its source without importing it."""
    try:
        spec = importlib.util.find_spec("ConvLoRASegLib.selftrain")
        tree = ast.parse(pathlib.Path(spec.origin).read_text(encoding="utf-8"))
    except (ImportError, AttributeError, TypeError, OSError, SyntaxError, ValueError):
        return None
    constants = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                if isinstance(target, ast.Name):
                    constants[target.id] = node.value.value
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "adapt":
            arguments = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + list(node.args.defaults) + \
                list(node.args.kw_defaults)
            for argument, default in zip(arguments, defaults):
                if argument.arg != "epochs" or default is None:
                    continue
                value = default.value if isinstance(default, ast.Constant) else \
                    constants.get(default.id) if isinstance(default, ast.Name) else None
                return value if isinstance(value, int) and not isinstance(value, bool) else None
    return None
