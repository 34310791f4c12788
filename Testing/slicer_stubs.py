"""The few pieces of 3D Slicer that PyPI ``slicer-core`` lacks, so the ConvLoRASeg module imports in pytest.

``slicer-core`` gives the real MRML library (scene, volume and segmentation nodes, storage nodes, module
logics) and ``slicer.util``'s array helpers, but no application: no ``slicer.app``, ``slicer.mrmlScene``,
``slicer.ScriptedLoadableModule`` or ``slicer.parameterNodeWrapper`` (these need Qt). This helper adds
exactly those, as small stand-ins:

- ``slicer.mrmlScene``: a real ``vtkMRMLScene``;
- ``slicer.app``: reports "testing, no main window" (the batch-mode path of the module), and the
  labelmap -> closed-surface conversion rule the application registers at startup;
- ``slicer.ScriptedLoadableModule``: the four base classes, with the logic's parameter node made from a real
  ``vtkMRMLScriptedModuleNode``;
- ``slicer.parameterNodeWrapper``: the decorator and annotations as no-ops (GUI binding needs Qt).

No ``qt`` or ``ctk`` module is faked: the module imports them only inside GUI code, and the logic then
follows its "no event loop" path (callers poll the background process themselves).
"""

from __future__ import annotations

import sys
import types
import unittest
from dataclasses import dataclass
from typing import Any, Sequence

import slicer


class _App:
    """Stand-in for ``slicer.app`` in a headless test run."""

    def testingEnabled(self) -> bool:
        return True

    def commandOptions(self) -> Any:
        return types.SimpleNamespace(noMainWindow=True)


class ScriptedLoadableModule:
    def __init__(self, parent: Any = None):
        self.parent = parent if parent is not None else types.SimpleNamespace()


class ScriptedLoadableModuleWidget:
    def __init__(self, parent: Any = None):
        self.parent = parent


class ScriptedLoadableModuleLogic:
    """Like Slicer's: one singleton parameter node per module in ``slicer.mrmlScene``."""

    def __init__(self, parent: Any = None):
        self.moduleName = type(self).__name__[: -len("Logic")] if type(self).__name__.endswith("Logic") else ""

    def getParameterNode(self):
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetModuleName(self.moduleName)
            node.SetName(self.moduleName)
            scene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message: str, msec: int = 0) -> None:
        print(message)


def parameterNodeWrapper(classtype=None):
    """No-op decorator: the wrapped class takes the raw parameter node and ignores it."""

    def wrap(cls):
        def __init__(self, parameterNode=None):
            self.parameterNode = parameterNode

        cls.__init__ = __init__
        return cls

    return wrap if classtype is None else wrap(classtype)


@dataclass
class Choice:
    choices: Sequence[Any]


@dataclass
class Default:
    value: Any


@dataclass
class WithinRange:
    minimum: Any
    maximum: Any


def install() -> None:
    """Add the stand-ins to the ``slicer`` package (idempotent)."""
    if getattr(slicer, "_convloraseg_stubs", False):
        return
    slicer.mrmlScene = slicer.vtkMRMLScene()
    slicer.app = _App()
    # Slicer's Segmentations module registers the labelmap -> closed surface rule at application startup.
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())

    sl = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(sl, cls.__name__, cls)
    sys.modules[sl.__name__] = sl
    slicer.ScriptedLoadableModule = sl

    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    for obj in (parameterNodeWrapper, Choice, Default, WithinRange):
        setattr(pnw, obj.__name__, obj)
    sys.modules[pnw.__name__] = pnw
    slicer.parameterNodeWrapper = pnw
    slicer._convloraseg_stubs = True
