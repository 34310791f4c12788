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
- ``slicer.parameterNodeWrapper``: the decorator stores each annotated field in the real parameter node as the
  real wrapper does (``SetParameter`` for str, bool, int, float and enums; a node reference for MRML nodes), with
  the defaults of ``Default(...)`` or of the type; GUI binding (``connectGui``) needs Qt and is not there.

No ``qt`` or ``ctk`` module is installed: the module imports them only inside GUI code, and the logic then
follows its "no event loop" path (callers poll the background process themselves). For driving widget methods
headless, :class:`FakeUi` stands in for the widgets of the module's .ui (only the names the .ui defines, so a
widget the code names but the .ui lacks fails), with the few Qt behaviours the widget relies on.
"""

from __future__ import annotations

import enum
import sys
import types
import typing
import unittest
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

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


def _fieldDefault(base, extras):
    for extra in extras:
        if isinstance(extra, Default):
            return extra.value
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return next(iter(base))  # as the real EnumSerializer
    return {str: "", bool: False, int: 0, float: 0.0}.get(base)


def _isNodeType(base) -> bool:
    members = typing.get_args(base) if typing.get_origin(base) is typing.Union else (base,)
    return all(isinstance(m, type) and m.__name__.startswith("vtkMRML") for m in members if m is not type(None))


def _fieldProperty(name: str, annotation):
    base, extras = annotation, []
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extras = typing.get_args(annotation)
    default = _fieldDefault(base, extras)

    def getter(self):
        node = self.parameterNode
        if _isNodeType(base):
            return node.GetNodeReference(name)
        if not node.HasParameter(name):
            return default
        text = node.GetParameter(name)
        if isinstance(base, type) and issubclass(base, enum.Enum):
            return base[text]
        if base is bool:
            return text == "True"
        return base(text) if base in (int, float) else text

    def setter(self, value):
        node = self.parameterNode
        if _isNodeType(base):
            node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        elif isinstance(value, enum.Enum):
            node.SetParameter(name, value.name)
        elif isinstance(value, bool):
            node.SetParameter(name, "True" if value else "False")
        else:
            node.SetParameter(name, str(value))

    return property(getter, setter)


def parameterNodeWrapper(classtype=None):
    """The wrapped class takes the real parameter node and stores its annotated fields there (see the docstring)."""

    def wrap(cls):
        def __init__(self, parameterNode=None):
            self.parameterNode = parameterNode

        cls.__init__ = __init__
        for name, annotation in typing.get_type_hints(cls, include_extras=True).items():
            setattr(cls, name, _fieldProperty(name, annotation))
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


# ------------------------------------------------------------------------------------------------------------------
# The module's widgets, for driving the widget's methods headless
# ------------------------------------------------------------------------------------------------------------------

class FakeWidget:
    """Any widget of the .ui: the properties the module sets (text, enabled, toolTip...) are plain attributes."""

    def __init__(self, name: str, className: str):
        self.objectName, self.className = name, className
        self.text, self.toolTip, self.enabled = "", "", True
        self._signalsBlocked = False

    def setEnabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)

    def blockSignals(self, block: bool) -> bool:
        previous, self._signalsBlocked = self._signalsBlocked, bool(block)
        return previous


class FakeProgressBar(FakeWidget):
    def __init__(self, name: str, className: str):
        super().__init__(name, className)
        self.value, self.maximum, self.format = 0, 100, "%p%"

    def setFormat(self, text: str) -> None:
        self.format = text


class FakeSpinBox(FakeWidget):
    def __init__(self, name: str, className: str):
        super().__init__(name, className)
        self.value, self.minimum, self.specialValueText = 0, 0, ""

    def displayedText(self) -> str:
        """What Qt shows: ``specialValueText`` at the minimum, else the number."""
        return self.specialValueText if self.value == self.minimum and self.specialValueText else str(self.value)


class FakePathLineEdit(FakeWidget):
    def __init__(self, name: str, className: str):
        super().__init__(name, className)
        self.currentPath = ""


class FakeComboBox(FakeWidget):
    def __init__(self, name: str, className: str):
        super().__init__(name, className)
        self.entries: List[tuple] = []
        self.currentIndex = -1

    def clear(self) -> None:
        self.entries, self.currentIndex = [], -1

    def addItem(self, text: str, data: Any = None) -> None:
        self.entries.append((text, data))
        if self.currentIndex < 0:
            self.currentIndex = 0

    def findData(self, data: Any) -> int:
        return next((i for i, (_, d) in enumerate(self.entries) if d == data), -1)

    def itemData(self, index: int) -> Any:
        return self.entries[index][1]

    def setCurrentIndex(self, index: int) -> None:
        self.currentIndex = index


class FakeCheckableNodeComboBox(FakeWidget):
    def __init__(self, name: str, className: str):
        super().__init__(name, className)
        self.checked: List[Any] = []

    def checkedNodes(self) -> List[Any]:
        return list(self.checked)


class FakePlainTextEdit(FakeWidget):
    def __init__(self, name: str, className: str):
        super().__init__(name, className)
        self.lines: List[str] = []

    def appendPlainText(self, text: str) -> None:
        self.lines.append(text)

    def clear(self) -> None:
        self.lines = []


class _Index:
    def __init__(self, row: int):
        self._row = row

    def row(self) -> int:
        return self._row


class FakeTableWidget(FakeWidget):
    """QTableWidget as the module uses it, with Qt's signal behaviour: changing the selection -- also by removing
    the selected row, e.g. ``setRowCount(0)`` -- emits ``itemSelectionChanged`` unless signals are blocked."""

    def __init__(self, name: str, className: str):
        super().__init__(name, className)
        self.items: Dict[tuple, Any] = {}
        self.rowCount = 0
        self.selected: Optional[int] = None
        self.slots: Dict[str, List[Callable]] = {}

    def connect(self, signal: str, slot: Callable) -> None:
        self.slots.setdefault(signal, []).append(slot)

    def _emit(self, signal: str) -> None:
        if not self._signalsBlocked:
            for slot in self.slots.get(signal, []):
                slot()

    def setRowCount(self, count: int) -> None:
        self.rowCount = count
        self.items = {k: v for k, v in self.items.items() if k[0] < count}
        if self.selected is not None and self.selected >= count:
            self.selected = None
            self._emit("itemSelectionChanged()")

    def setItem(self, row: int, column: int, item: Any) -> None:
        self.items[(row, column)] = item

    def item(self, row: int, column: int) -> Any:
        return self.items.get((row, column))

    def selectRow(self, row: int) -> None:
        if row != self.selected:
            self.selected = row
            self._emit("itemSelectionChanged()")

    def clearSelection(self) -> None:
        if self.selected is not None:
            self.selected = None
            self._emit("itemSelectionChanged()")

    def selectionModel(self):
        return types.SimpleNamespace(selectedRows=lambda: [] if self.selected is None else [_Index(self.selected)])

    def resizeColumnsToContents(self) -> None:
        pass


class FakeTableWidgetItem:
    def __init__(self, text: str = ""):
        self._text = text

    def text(self) -> str:
        return self._text


class FakeTimer:
    """A QTimer that never fires: the test polls the job itself."""

    def __init__(self):
        self.timeout = types.SimpleNamespace(connect=lambda slot: None)
        self.active = False

    def setInterval(self, msec: int) -> None:
        pass

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def deleteLater(self) -> None:
        pass


#: the few ``qt`` names the widget uses outside the .ui (put it in sys.modules["qt"] for a test)
FAKE_QT = types.SimpleNamespace(QTableWidgetItem=FakeTableWidgetItem, QTimer=FakeTimer)

_WIDGET_CLASSES = {"QProgressBar": FakeProgressBar, "QSpinBox": FakeSpinBox, "QPlainTextEdit": FakePlainTextEdit,
                   "QTableWidget": FakeTableWidget, "QComboBox": FakeComboBox, "ctkPathLineEdit": FakePathLineEdit,
                   "qMRMLCheckableNodeComboBox": FakeCheckableNodeComboBox}


class FakeUi:
    """``self.ui`` of the widget: one fake per widget of the .ui file, by name; any other name fails."""

    def __init__(self, uiFile: Path):
        for widget in ET.parse(uiFile).iter("widget"):
            name, className = widget.get("name"), widget.get("class")
            setattr(self, name, _WIDGET_CLASSES.get(className, FakeWidget)(name, className))
