"""The Slicer module (its file and its package) read against its .ui and against Slicer's own APIs, without Slicer.

The headless stubs store parameters but do not bind widgets (``connectGui`` needs Qt), so a binding Slicer would
refuse or a widget missing from the .ui would pass every other test and fail on the user's first day. These checks
read the module's source (AST), the .ui (XML) and the parameter node's type hints.

Facts about Slicer used here come from its sources (github.com/Slicer/Slicer):
- Base/Python/slicer/parameterNodeWrapper/guiConnectors.py: which widget class binds which type (the
  connectors compare ``type(widget)`` exactly, so a subclass such as qMRMLCheckableNodeComboBox does not bind);
- Base/QTGUI/qSlicerScriptedLoadableModuleFactory.cxx: every ``*.py`` at the top of a module folder is registered
  as a module, and the module folder is appended to ``sys.path`` (so the package beside the module file imports);
- Base/Python/slicer/util.py ``reloadScriptedModule``: *Reload* re-executes the module file only.
"""

from __future__ import annotations

import ast
import enum
import pathlib
import re
import sys
import typing
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "ConvLoRASeg"
MODULE_FILE = MODULE_DIR / "ConvLoRASeg.py"
PACKAGE_DIR = MODULE_DIR / "ConvLoRASegModuleLib"
#: the module file and the package beside it: everything Slicer runs of the module
SOURCES = [MODULE_FILE] + sorted(PACKAGE_DIR.glob("*.py"))
UI_FILE = MODULE_DIR / "Resources" / "UI" / "ConvLoRASeg.ui"
sys.path[:0] = [str(ROOT / "Testing"), str(MODULE_DIR), str(ROOT)]

import slicer_stubs  # noqa: E402

slicer_stubs.install()

import ConvLoRASeg as module  # noqa: E402
from ConvLoRASegModuleLib import parameters, presenters  # noqa: E402

# Widget class -> what guiConnectors.py can bind it to ("node": an MRML node class or a union of them).
PATHS = (pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePath, pathlib.PurePosixPath,
         pathlib.PureWindowsPath)
BINDABLE = {
    "QCheckBox": (bool,), "ctkCheckBox": (bool,), "QPushButton": (bool,), "ctkCheckablePushButton": (bool,),
    "QSlider": (int,), "QSpinBox": (int,),
    "QDoubleSpinBox": (float, int), "ctkSliderWidget": (float, int), "qMRMLSliderWidget": (float, int),
    "ctkDoubleSlider": (float, int), "ctkDoubleSpinBox": (float, int), "qMRMLSpinBox": (float, int),
    "QComboBox": ("choice", "enum"), "ctkComboBox": ("choice", "enum"),
    "QLineEdit": (str,), "QLabel": (str,), "QTextEdit": (str,),
    "ctkPathLineEdit": PATHS, "ctkDirectoryButton": PATHS,
    "qMRMLNodeComboBox": ("node",),
}


def ui_widgets():
    return {w.get("name"): w for w in ET.parse(UI_FILE).iter("widget")}


def parameter_names():
    names = {}
    for widget in ET.parse(UI_FILE).iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                names[widget.get("name")] = (widget.get("class"), prop.find("string").text)
    return names


def field_types():
    return typing.get_type_hints(parameters.ConvLoRASegParameterNode, include_extras=True)


def split(annotation):
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        return base, extras
    return annotation, []


def is_node_type(datatype) -> bool:
    members = typing.get_args(datatype) if typing.get_origin(datatype) is typing.Union else (datatype,)
    return all(isinstance(m, type) and m.__name__.startswith("vtkMRML") for m in members if m is not type(None))


def binds(widget_class: str, annotation) -> bool:
    base, extras = split(annotation)
    for kind in BINDABLE.get(widget_class, ()):
        if kind == "choice" and base in (int, float, str, bool) and any(
                type(e).__name__ == "Choice" for e in extras):
            return True
        if kind == "enum" and isinstance(base, type) and issubclass(base, enum.Enum):
            return True
        if kind == "node" and is_node_type(base):
            return True
        if isinstance(kind, type) and base is kind:
            return True
    return False


def test_only_the_module_file_sits_at_the_top_of_the_module_folder():
    """Slicer registers every top-level *.py of a module folder as a module ("Fail to instantiate module")."""
    assert sorted(p.name for p in MODULE_DIR.glob("*.py")) == ["ConvLoRASeg.py"]


def test_every_slicer_parameter_name_is_a_field_of_a_type_its_widget_binds():
    fields = field_types()
    names = parameter_names()
    assert names, "the .ui binds nothing"
    for widget, (widget_class, name) in names.items():
        assert name in fields, f"{widget}: SlicerParameterName {name!r} is not a parameter node field"
        assert binds(widget_class, fields[name]), \
            f"{widget} ({widget_class}) cannot bind {name}: {fields[name]!r} (see parameterNodeWrapper/guiConnectors.py)"


def test_no_parameter_is_a_path_that_defaults_to_the_working_folder():
    """A pathlib.Path parameter defaults to Path() == '.', shown as '.' and used as Slicer's working folder."""
    for name, annotation in field_types().items():
        base, _ = split(annotation)
        assert base not in PATHS, f"{name} is a Path parameter; optional paths are str ('' = not chosen)"


def test_path_widgets_bound_by_the_widget_exist_and_hold_str_fields():
    widgets, fields = ui_widgets(), field_types()
    for widget, name in parameters.PATH_WIDGETS.items():
        assert widgets[widget].get("class") == "ctkPathLineEdit", widget
        assert split(fields[name])[0] is str, name
        assert widget not in parameter_names(), f"{widget} is bound twice (SlicerParameterName and PATH_WIDGETS)"


def test_every_widget_the_module_names_exists_in_the_ui():
    source = "\n".join(path.read_text() for path in SOURCES)
    used = set(re.findall(r"self\.ui\.([A-Za-z_][A-Za-z0-9_]*)", source))
    # names the module reaches through tables: getattr(self.ui, name)
    used |= set(parameters.PATH_WIDGETS) | set(presenters.JOB_BUTTONS) | set(presenters.targetWidgetStates(None))
    missing = sorted(used - set(ui_widgets()))
    assert not missing, f"used by the module but absent from the .ui: {missing}"


def test_the_labelled_check_selectors_are_optional_and_offer_the_node_types_the_logic_takes():
    """The check (adapt --check) is optional: its group starts collapsed, both selectors offer "none", and they
    list exactly the node classes of their parameters (a scalar volume; a labelmap or a segmentation)."""
    widgets, fields = ui_widgets(), field_types()
    group = widgets["checkCollapsibleButton"]
    collapsed = [p for p in group.findall("property") if p.get("name") == "collapsed"]
    assert collapsed and collapsed[0].find("bool").text == "true"
    assert "optional" in group.find("property[@name='text']/string").text.lower()
    for widget, name in (("checkScanSelector", "checkScan"), ("checkMaskSelector", "checkMask")):
        assert parameter_names()[widget] == ("qMRMLNodeComboBox", name)
        assert group.find(f".//widget[@name='{widget}']") is not None, f"{widget} is outside the check group"
        props = {p.get("name"): p for p in widgets[widget].findall("property")}
        assert props["noneEnabled"].find("bool").text == "true"
        listed = {s.text for s in props["nodeTypes"].iter("string")}
        base, _ = split(fields[name])
        members = typing.get_args(base) if typing.get_origin(base) is typing.Union else (base,)
        assert listed == {m.__name__ for m in members if m is not type(None)}
    # a Union of node types can only be cleared when None is part of it (parameterNodeWrapper's UnionSerializer)
    assert type(None) in typing.get_args(split(fields["checkMask"])[0])
    # the selectors get the scene like the module's other node selectors
    receivers = {c.findtext("receiver") for c in ET.parse(UI_FILE).iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert {"checkScanSelector", "checkMaskSelector"} <= receivers


def _calls(name: str):
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    yield node


def test_the_module_needs_no_torch_at_import():
    assert "torch" not in {n.split(".")[0] for n in _top_level_imports()}


def _top_level_imports(paths=SOURCES):
    """Modules imported at the top level of ``paths`` (relative imports as ``ConvLoRASegModuleLib.<name>``)."""
    for path in paths:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                yield from (a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # from . import X / from .X import Y
                    base = "ConvLoRASegModuleLib" + (f".{node.module}" if node.module else "")
                    yield from ([base] if node.module else [f"{base}.{a.name}" for a in node.names])
                elif node.module:
                    yield node.module


# ------------------------------------------------------------------------ a thin module file over a package

def test_the_module_file_keeps_only_the_module_the_widget_and_the_test():
    tree = ast.parse(MODULE_FILE.read_text())
    classes = [node.name for node in tree.body if isinstance(node, ast.ClassDef)]
    assert classes == ["ConvLoRASeg", "ConvLoRASegWidget", "ConvLoRASegTest"]
    assert len(MODULE_FILE.read_text().splitlines()) <= 900
    assert (PACKAGE_DIR / "__init__.py").is_file(), "ConvLoRASegModuleLib must be a package (Slicer skips folders)"


def test_the_logic_is_the_modules_logic_for_batch_mode():
    """``import ConvLoRASeg; ConvLoRASeg.ConvLoRASegLogic()`` and ``slicer.util.getModuleLogic("ConvLoRASeg")`` (the
    widget's ``logic``, made in ``setup``) give the same class."""
    from ConvLoRASegModuleLib import logic

    assert module.ConvLoRASegLogic is logic.ConvLoRASegLogic
    assert module.ensureDependencies.__module__ == "ConvLoRASegModuleLib.dependencies"
    setup = next(node for node in ast.walk(ast.parse(MODULE_FILE.read_text()))
                 if isinstance(node, ast.FunctionDef) and node.name == "setup")
    assert "self.logic = ConvLoRASegLogic()" in ast.unparse(setup)


def test_the_package_never_imports_the_module_file_and_has_no_import_cycle():
    """Lower rooms never import higher ones: the package does not import ConvLoRASeg.py, and its files import each
    other without a cycle."""
    graph = {}
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        name = "ConvLoRASegModuleLib" + ("" if path.stem == "__init__" else f".{path.stem}")
        imported = set(_top_level_imports([path]))
        assert "ConvLoRASeg" not in imported, f"{path.name} imports the module file"
        graph[name] = {m for m in imported if m.startswith("ConvLoRASegModuleLib.")}
    seen, stack = set(), []

    def visit(node):
        assert node not in stack, f"import cycle: {' -> '.join(stack + [node])}"
        if node in seen:
            return
        stack.append(node)
        for other in graph.get(node, ()):
            visit(other)
        stack.pop()
        seen.add(node)

    for node in graph:
        visit(node)


def test_reload_drops_the_package_so_that_edits_there_take_effect(monkeypatch):
    """Slicer's *Reload* re-executes only ConvLoRASeg.py; the widget's onReload makes the package reload too."""
    reloaded = []
    monkeypatch.setattr(module.ScriptedLoadableModuleWidget, "onReload", lambda self: reloaded.append(self),
                        raising=False)
    saved = {n: m for n, m in sys.modules.items() if n.split(".")[0] == "ConvLoRASegModuleLib"}
    assert "ConvLoRASegModuleLib.logic" in saved
    try:
        module.ConvLoRASegWidget.onReload("widget")
        assert reloaded == ["widget"]
        assert not [n for n in sys.modules if n.split(".")[0] == "ConvLoRASegModuleLib"]
    finally:
        sys.modules.update(saved)
