"""The module's widget driven headless: a new user's first hour (the adapter they chose, the first install, where
the results appear).

The widget's methods run against real MRML (slicer-core: the parameter node is a real ``vtkMRMLScriptedModuleNode``
in a real scene, the logic reads a real adapter store) and the widgets of the real .ui file, each a small stand-in
(``slicer_stubs.FakeUi``: only the names the .ui defines, and the Qt behaviour the widget relies on, e.g. emptying
a table with a selected row emits ``itemSelectionChanged``). Dependency installs run real background processes
(a Python one-liner in place of pip), polled here as Slicer's timer polls them.
"""

from __future__ import annotations

import contextlib
import sys
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "Testing"), str(ROOT / "ConvLoRASeg"), str(ROOT)]

import slicer_stubs  # noqa: E402

slicer_stubs.install()

import slicer  # noqa: E402

import ConvLoRASeg as module  # noqa: E402
from ConvLoRASegModuleLib import dependencies, parameters, presenters  # noqa: E402
from ConvLoRASegModuleLib import logic as module_logic  # noqa: E402
from ConvLoRASegLib import TORCH_MIN  # noqa: E402
from ConvLoRASegLib.jobs import ProcessResult  # noqa: E402
from test_slicer_logic import adapter_file, older_adapter_file, tiny_model_file  # noqa: E402

UI_FILE = ROOT / "ConvLoRASeg" / "Resources" / "UI" / "ConvLoRASeg.ui"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return tiny_model_file(tmp_path_factory.mktemp("models"), 0, "model_a")


@pytest.fixture()
def scene():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


@pytest.fixture()
def dialogs(monkeypatch):
    """Slicer's message boxes and wait cursor (they need Qt): recorded; every question is answered OK."""
    shown = {"error": [], "warning": [], "question": []}
    monkeypatch.setattr(slicer.util, "WaitCursor", contextlib.nullcontext, raising=False)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: shown["error"].append(text), raising=False)
    monkeypatch.setattr(slicer.util, "warningDisplay", lambda text, **kw: shown["warning"].append(text),
                        raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay",
                        lambda text, *args, **kw: shown["question"].append(text) or True, raising=False)
    monkeypatch.setitem(sys.modules, "qt", slicer_stubs.FAKE_QT)
    return shown


@pytest.fixture()
def widget(scene, tmp_path, model_file, dialogs):
    """The module's widget as ``setup`` leaves it, over a real parameter node and a real adapter store."""
    w = module.ConvLoRASegWidget()
    w.ui = slicer_stubs.FakeUi(UI_FILE)
    w.logic = module.ConvLoRASegLogic(scene=scene, storeRoot=tmp_path / "store")
    w.logic.setModelPath(model_file)
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "ConvLoRASeg")
    w._parameterNode = parameters.ConvLoRASegParameterNode(node)
    w._parameterNode.modelPath = str(model_file)
    w.ui.adaptersTableWidget.connect("itemSelectionChanged()", w.onAdapterSelectionChanged)
    w._fillDeviceList()
    yield w
    w._teardown()


def _store_adapters(w, model_file, tmp_path, *names):
    for seed, name in enumerate(names, start=1):
        w.logic.importAdapter(adapter_file(model_file, tmp_path / f"{name}.safetensors", name, seed=seed))


def _click_row(w, name):
    table = w.ui.adaptersTableWidget
    row = next(r for r in range(table.rowCount) if table.item(r, 0).text() == name)
    table.selectRow(row)  # what a click does: itemSelectionChanged -> onAdapterSelectionChanged


# ------------------------------------------------------------------------------------- the chosen adapter

def test_the_selected_adapter_survives_a_refresh(widget, model_file, tmp_path):
    """Every module enter and every Adapt refreshes the table; the chosen adapter stays chosen."""
    _store_adapters(widget, model_file, tmp_path, "siteA", "siteB")
    widget.refreshAdapters()
    _click_row(widget, "siteB")
    assert widget._parameterNode.selectedAdapter == "siteB"
    widget.refreshAdapters()  # the user leaves the module and comes back
    assert widget._parameterNode.selectedAdapter == "siteB"
    assert widget._selectedAdapterName() == "siteB"
    # the choice is in the scene's parameter node, as a scene saves it
    assert widget._parameterNode.parameterNode.GetParameter("selectedAdapter") == "siteB"


def test_a_new_adapter_becomes_the_one_segment_uses(widget, model_file, tmp_path):
    _store_adapters(widget, model_file, tmp_path, "siteA")
    widget.refreshAdapters()
    _click_row(widget, "siteA")
    _store_adapters(widget, model_file, tmp_path, "siteB")  # what the adaptation process wrote
    info = widget.logic.adapterStore().find(widget.logic.modelSha256(), "siteB")
    done = {"event": "done", "adapter": {"name": "siteB", "score": 0.8, "path": str(info.path)},
            "summary": {"adapted": True, "selected": "epoch 2", "score_source": 0.7, "score_selected": 0.8}}
    widget.onAdaptFinished(ProcessResult(returnCode=0, done=done, value=info))
    assert widget._parameterNode.selectedAdapter == "siteB" and widget._selectedAdapterName() == "siteB"
    widget.updateGuiFromParameterNode()
    assert "siteB" in widget.ui.segmentAdapterLabel.text


def test_an_adapter_that_changes_nothing_is_not_chosen_for_segment(widget, model_file, tmp_path):
    _store_adapters(widget, model_file, tmp_path, "siteA", "siteB")
    widget.refreshAdapters()
    _click_row(widget, "siteA")
    info = widget.logic.adapterStore().find(widget.logic.modelSha256(), "siteB")
    done = {"adapter": {"name": "siteB", "score": 0.6}, "summary": {"adapted": False, "score_source": 0.6,
                                                                    "candidates": {"source": 0.6, "adabn": 0.5}}}
    widget.onAdaptFinished(ProcessResult(returnCode=0, done=done, value=info))
    assert widget._parameterNode.selectedAdapter == "siteA"
    assert "changes nothing" in widget.ui.adaptStatusLabel.text


def test_a_deleted_adapter_is_no_longer_chosen(widget, model_file, tmp_path):
    _store_adapters(widget, model_file, tmp_path, "siteA")
    widget.refreshAdapters()
    _click_row(widget, "siteA")
    widget.logic.deleteAdapter("siteA")
    widget.refreshAdapters()
    assert widget._parameterNode.selectedAdapter == ""
    widget.updateGuiFromParameterNode()
    assert widget.ui.segmentAdapterLabel.text.startswith("Adapter: none")


def test_the_segment_section_says_which_adapter_segment_uses(widget):
    p = widget._parameterNode
    for auto, selected, expected in ((False, "", "Adapter: none"), (False, "siteB", "Adapter: siteB"),
                                     (True, "siteB", "Adapter: automatic")):
        p.autoAdapter, p.selectedAdapter = auto, selected
        widget.updateGuiFromParameterNode()
        assert widget.ui.segmentAdapterLabel.text.startswith(expected)
        assert widget.ui.segmentAdapterLabel.text == presenters.segmentAdapterText(auto, selected)
    # the label sits in the Segment section of the .ui, before the Segment button
    section = next(w for w in ET.parse(UI_FILE).iter("widget") if w.get("name") == "segmentCollapsibleButton")
    names = [w.get("name") for w in section.iter("widget")]
    assert names.index("segmentAdapterLabel") < names.index("segmentButton")


def test_the_adapters_table_shows_each_adapters_label_free_score(widget, model_file, tmp_path):
    """The fourth column is the label-free score (ESH agreement + gamma consistency) that selected the adapter: the
    file's ``score``, or an older file's ``agreement`` (the same score under its former name)."""
    widget.logic.importAdapter(adapter_file(model_file, tmp_path / "siteA.safetensors", "siteA", seed=1, score=0.8125))
    widget.logic.importAdapter(older_adapter_file(model_file, tmp_path / "siteOld.safetensors", "siteOld",
                                                  score=0.6875, seed=2))
    widget.refreshAdapters()
    table = widget.ui.adaptersTableWidget
    shown = {table.item(r, 0).text(): table.item(r, 3).text() for r in range(table.rowCount)}
    assert shown == {"siteA": "0.812", "siteOld": "0.688"}
    header = [c.find("property/string").text for c in ET.parse(UI_FILE).iter("column")][:4]
    assert header == ["Name", "Created", "Method", "Label-free score"]


def test_the_adapter_row_to_select_again():
    assert presenters.adapterRowToSelect(["a", "b"], "b") == 1
    assert presenters.adapterRowToSelect(["a", "b"], "gone") is None
    assert presenters.adapterRowToSelect(["a"], "") is None


# ------------------------------------------------------------------------- installing without freezing Slicer

def _step(what, code):
    return dependencies.InstallStep(what, [sys.executable, "-c", code])


def _plan(*steps):
    return dependencies.InstallPlan(steps=list(steps))


def test_the_installer_runs_each_step_in_the_background_and_reports_it():
    steps, lines, ended = [], [], []
    plan = _plan(_step("Python packages: tqdm", "import time; print('Collecting tqdm', flush=True); time.sleep(1.0)"),
                 _step("PyTorch", "print('Successfully installed torch-2.9')"))
    started = time.monotonic()
    installer = dependencies.DependencyInstaller(plan, onStep=lambda i, n, s: steps.append((i, n, s.what)),
                                                 onLog=lines.append, onFinished=ended.append).start()
    assert time.monotonic() - started < 0.9  # start() returned while the first step still runs
    assert installer.isRunning() and installer.step.what == "Python packages: tqdm" and not ended
    assert installer.wait() is None
    assert steps == [(0, 2, "Python packages: tqdm"), (1, 2, "PyTorch")]
    assert lines == ["Collecting tqdm", "Successfully installed torch-2.9"] and ended == [None]


def test_a_failed_step_is_one_line_and_stops_the_rest(monkeypatch):
    steps = []
    plan = _plan(_step("Python packages: scipy", "import sys; print('ERROR: No matching distribution found for "
                       "scipy>=99', file=sys.stderr); sys.exit(1)"),
                 _step("PyTorch", "raise SystemExit('never runs')"))
    installer = dependencies.DependencyInstaller(plan, onStep=lambda i, n, s: steps.append(s.what))
    error = installer.start().wait()
    assert steps == ["Python packages: scipy"]
    assert "\n" not in error and error.startswith("installing Python packages: scipy failed (exit code 1")
    assert "No matching distribution found for scipy>=99" in error


def test_the_plan_installs_the_small_packages_then_torch_with_light_the_torch(monkeypatch):
    monkeypatch.setattr(dependencies, "installedTorchVersion", lambda: None)
    monkeypatch.setattr(dependencies, "missingPipRequirements", lambda: ["scipy>=1.9"])
    monkeypatch.setattr(dependencies.importlib.util, "find_spec",
                        lambda name, *a: None if name == "light_the_torch" else object())
    plan = dependencies.installPlan()
    pip, torch = plan.steps
    assert pip.command[1:] == ["-m", "pip", "install", "scipy>=1.9", dependencies.LIGHT_THE_TORCH_REQUIREMENT]
    assert torch.command[1:] == ["-m", "light_the_torch", "install", f"torch>={TORCH_MIN}"] and torch.torch
    assert not plan.restartNeeded and "PyTorch" in plan.question() and "scipy" in plan.question()


def test_an_old_torch_already_loaded_is_upgraded_and_asks_for_a_restart(monkeypatch):
    monkeypatch.setattr(dependencies, "installedTorchVersion", lambda: "1.13.1")
    monkeypatch.setattr(dependencies, "missingPipRequirements", lambda: [])
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__version__="1.13.1"))
    plan = dependencies.installPlan()
    assert [s.torch for s in plan.steps][-1] and plan.restartNeeded and "restarted" in plan.question()
    assert "replaces the installed 1.13.1" in plan.steps[-1].what
    plan.steps = [dependencies.InstallStep(plan.steps[-1].what, [sys.executable, "-c", "pass"], torch=True)]
    assert "restart Slicer" in dependencies.DependencyInstaller(plan).start().wait()


def test_nothing_missing_means_nothing_to_install():
    plan = dependencies.installPlan()  # this test environment has torch and the pip packages
    assert not plan and plan.steps == []
    dependencies.ensureDependencies(askConfirmation=False)


def test_the_module_never_calls_a_blocking_installer():
    """PyTorchUtils.installTorch and Slicer's pip helpers block the GUI thread (minutes for PyTorch)."""
    sources = [ROOT / "ConvLoRASeg" / "ConvLoRASeg.py"] + sorted((ROOT / "ConvLoRASeg" / "ConvLoRASegModuleLib")
                                                                  .glob("*.py"))
    for path in sources:
        text = path.read_text()
        for blocking in ("installTorch(", "pip_install(", "pip_ensure(", "executePythonModule("):
            assert blocking not in text, f"{path.name} calls {blocking}"


def test_adapt_on_first_use_installs_in_the_background_then_starts(widget, dialogs, monkeypatch):
    """Pressing Adapt with dependencies missing asks once, returns at once (Slicer stays responsive), shows the
    step beside the Adapt button, keeps the run buttons disabled meanwhile, and starts the adaptation after."""
    plan = _plan(_step("Python packages: tqdm", "import time; print('Collecting tqdm', flush=True); time.sleep(1.0)"))
    monkeypatch.setattr(module, "installPlan", lambda: plan)
    started = []
    began = time.monotonic()
    widget._prepare("adapt", lambda: started.append("adapt"))
    assert time.monotonic() - began < 0.9 and started == []
    assert len(dialogs["question"]) == 1 and "tqdm" in dialogs["question"][0]
    assert widget.ui.adaptStatusLabel.text == "Installing Python packages: tqdm (step 1 of 1)..."
    assert widget.ui.adaptProgressBar.format == widget.ui.adaptStatusLabel.text
    assert (widget.ui.adaptButton.text, widget.ui.adaptButton.enabled) == ("Installing dependencies...", False)
    assert not widget.ui.segmentButton.enabled and not widget.ui.segmentCohortButton.enabled
    widget._prepare("adapt", lambda: started.append("twice"))  # a second press while installing: nothing
    assert widget._installer.wait() is None
    assert started == ["adapt"] and widget._installer is None
    assert widget.ui.adaptStatusLabel.text == "Dependencies installed." and widget.ui.adaptButton.enabled
    assert widget.ui.logTextEdit.lines == ["Collecting tqdm"]


def test_a_failed_install_says_so_beside_the_button_and_starts_nothing(widget, dialogs, monkeypatch):
    plan = _plan(_step("PyTorch", "import sys; sys.exit(3)"))
    monkeypatch.setattr(module, "installPlan", lambda: plan)
    started = []
    widget._prepare("segment", lambda: started.append("segment"))
    widget._installer.wait()
    assert started == [] and widget.ui.statusLabel.text.startswith("Installing the dependencies failed: installing "
                                                                   "PyTorch failed (exit code 3)")
    assert dialogs["error"] and widget.ui.segmentButton.text == "Segment"


def test_nothing_missing_starts_the_job_at_once(widget, dialogs, monkeypatch):
    monkeypatch.setattr(module, "installPlan", lambda: _plan())
    started = []
    widget._prepare("cohort", lambda: started.append("cohort"))
    assert started == ["cohort"] and not dialogs["question"]


# ------------------------------------------------------------------------- results beside the buttons

def test_adaptation_progress_and_result_appear_beside_the_adapt_button(widget):
    widget.logic.runningJob = "adapt"
    widget.onProcessEvent({"event": "progress", "stage": "train", "step": 3, "total": 10, "epoch": 1, "loss": 0.25})
    for bar in (widget.ui.adaptProgressBar, widget.ui.progressBar):
        assert (bar.value, bar.maximum) == (3, 10) and bar.format.startswith("train %v/%m")
    widget.logic.runningJob = None
    widget.onAdaptFinished(ProcessResult(returnCode=130, cancelled=True))
    assert widget.ui.adaptStatusLabel.text == "Adaptation cancelled; nothing was saved."
    assert widget.ui.statusLabel.text == ""  # the Segment section's label is left alone


def test_the_adaptation_progress_shows_the_label_free_score(widget):
    """The library's progress events carry a candidate's label-free score as ``score``."""
    widget.logic.runningJob = "adapt"
    widget.onProcessEvent({"event": "progress", "stage": "select", "step": 2, "total": 5, "epoch": 2,
                           "candidate": "epoch 2", "score": 0.6543})
    assert widget.ui.adaptProgressBar.format == "select %v/%m epoch 2 score 0.6543"
    widget.logic.runningJob = None


def test_a_refused_adapter_is_a_warning_with_both_label_free_scores(widget, scene, monkeypatch):
    """Segment with a chosen adapter that the per-scan check refused (no main window: in this process): the
    warning quotes the check's label-free scores of the adapter and the unadapted model, as the CLI's does, and
    the status shows them."""
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")

    def segment(volumeNode, adapter=None, outputNode=None, device="auto", checkAdapter=True):
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "scan brain mask")
        labelmap.SetAttribute(module_logic.ADAPTER_NOT_USED_ATTRIBUTE, "siteB" if checkAdapter else "")
        widget.logic.setLabelFreeScores(labelmap, {"source": 0.7, "siteB": 0.65} if checkAdapter else None)
        return labelmap

    monkeypatch.setattr(widget.logic, "segment", segment)
    outcome = widget._segmentHere(volume, "siteB", None, "cpu")
    assert outcome.adapter is None and outcome.scores == {"source": 0.7, "siteB": 0.65}
    assert len(outcome.warnings) == 1 and "'siteB' did not beat the unadapted model" in outcome.warnings[0]
    assert "label-free scores: source 0.700, siteB 0.650" in outcome.warnings[0]
    monkeypatch.setattr(widget.logic, "brainVolumeMl", lambda node: 1234.0)
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **kw: None, raising=False)
    widget._parameterNode.createSegmentation = False
    widget._showSegmentation(volume, None, outcome)
    lines = widget.ui.statusLabel.text.split("\n")
    assert lines[0] == "Label-free score (ESH agreement + gamma consistency): source 0.700, siteB 0.650"
    assert lines[-1].startswith("Warning: adapter 'siteB' did not beat")
    # used without the check (as --no-scan-check): no scores compared, no warning
    monkeypatch.setattr(widget.logic, "segment", lambda *a, **kw: segment(*a, **{**kw, "checkAdapter": False}))
    method = {"name": "convlora-adabn"}
    monkeypatch.setattr(widget.logic, "resolveAdapter", lambda name: types.SimpleNamespace(
        name=name, method=method["name"], details={}))
    forced = widget._segmentHere(volume, "siteB", None, "cpu")
    assert forced.adapter.name == "siteB" and not forced.warnings and not forced.scores
    # an adapter of a method the label-free checks do not guard says so, as the command line's does
    method["name"] = "self-training"
    unguarded = widget._segmentHere(volume, "siteB", None, "cpu")
    assert len(unguarded.warnings) == 1 and "'siteB' was made with self-training" in unguarded.warnings[0]


def test_segment_progress_leaves_the_adapt_bar_alone(widget):
    widget.logic.runningJob = "segment"
    widget.onProcessEvent({"event": "progress", "stage": "segment", "step": 1, "total": 4})
    assert widget.ui.progressBar.value == 1 and widget.ui.adaptProgressBar.value == 0


def test_the_adapt_progress_bar_and_status_sit_right_after_the_adapt_button():
    section = next(w for w in ET.parse(UI_FILE).iter("widget") if w.get("name") == "adaptCollapsibleButton")
    rows = {item.find("widget").get("name"): int(item.get("row")) for item in section.find("layout").findall("item")
            if item.find("widget") is not None}
    assert rows["adaptProgressBar"] == rows["adaptButton"] + 1 and rows["adaptStatusLabel"] == rows["adaptButton"] + 2


def test_the_epochs_field_shows_the_librarys_default_number(widget):
    from ConvLoRASegLib import selftrain

    default, one = selftrain.default_epochs("fast", 2), selftrain.default_epochs("fast", 1)
    assert parameters.libraryDefaultEpochs() == default and parameters.libraryOneScanEpochs() == one
    widget._showEpochsDefault()
    spin = widget.ui.epochsSpinBox
    assert spin.displayedText() == f"{default}, {one} on one scan (default)"
    assert f"{default}, or {one} when adapting to one scan" in spin.toolTip
    spin.value = 3
    assert spin.displayedText() == "3"


def test_the_default_epochs_come_from_the_torch_free_constants(monkeypatch):
    from ConvLoRASegLib import constants

    if not hasattr(constants, "ADAPT_EPOCHS"):
        pytest.skip("this library keeps the default epochs in selftrain only")
    monkeypatch.setattr(constants, "ADAPT_EPOCHS", 9)
    assert parameters.libraryDefaultEpochs() == 9


def test_the_default_epochs_are_read_without_importing_torch(tmp_path, monkeypatch):
    """A literal default, or a module constant it names; None (the field then says "default") otherwise."""
    package = tmp_path / "ConvLoRASegLib"
    package.mkdir()
    (package / "__init__.py").write_text("")
    # a library whose constants module has no ADAPT_EPOCHS: selftrain's source is read
    monkeypatch.setitem(sys.modules, "ConvLoRASegLib.constants", types.ModuleType("ConvLoRASegLib.constants"))
    for source, expected in (("import torch\ndef adapt(model, volumes, *, mode='fast', epochs: int = 7): pass\n", 7),
                             ("import torch\nEPOCHS = 4\ndef adapt(model, epochs=EPOCHS): pass\n", 4),
                             ("import torch\ndef adapt(model, epochs=None): pass\n", None)):
        (package / "selftrain.py").write_text(source)
        monkeypatch.setattr(parameters.importlib.util, "find_spec",
                            lambda name: types.SimpleNamespace(origin=str(package / "selftrain.py")))
        assert parameters.libraryDefaultEpochs() == expected
    assert presenters.epochsDefaultText(None)[0] == "default"


def test_a_job_that_cannot_start_says_so_beside_its_button(widget, tmp_path):
    widget._parameterNode.newAdapterName = "siteB"
    widget._parameterNode.targetType = parameters.TargetType.FOLDER
    widget._parameterNode.cohortFolder = str(tmp_path / "missing")
    widget.onAdaptButton()  # nothing to install here: it starts at once, and the missing folder stops it
    assert widget.ui.adaptStatusLabel.text == "Starting the adaptation failed (see the message)."
    assert not widget.logic.isRunning()


def test_module_logic_is_the_widgets_logic_class():
    assert module.ConvLoRASegLogic is module_logic.ConvLoRASegLogic
