"""ConvLoRASeg: brain masks on T1 MRI that adapt to a new scanner without labels (3D Slicer module).

This file holds what Slicer loads as the module, as in Slicer's scripted-module template:

- :class:`ConvLoRASeg`: title, help and acknowledgement;
- :class:`ConvLoRASegWidget` is thin: it binds the .ui to the parameter node (widgets carry a
  ``SlicerParameterName`` property), observes the parameter node and calls the logic. No ML code. What the GUI
  shows is decided by the plain functions of ``ConvLoRASegModuleLib.presenters``, which tests drive headless.
- :class:`ConvLoRASegTest` runs inside Slicer on SampleData MRHead (its heavy part only where torch is
  installed, or when ``CONVLORASEG_SELFTEST=full`` asks for it).

The rest lives in the package ``ConvLoRASegModuleLib/`` beside this file: the logic (:class:`ConvLoRASegLogic`,
the batch-mode API), the parameter node, dependency installation and the GUI decisions. Batch mode (as in
docs/slicer.md), in ``Slicer --no-main-window --python-script``::

    import ConvLoRASeg
    ConvLoRASeg.ensureDependencies(askConfirmation=False)
    logic = ConvLoRASeg.ConvLoRASegLogic()

The ML lives in the pure-Python library ``ConvLoRASegLib`` (installed next to this file); torch is imported only
when a model is needed, so the module loads (and the GUI shows) before PyTorch is installed. This must be the only
``*.py`` at the top of the module folder: Slicer registers every one there as a module.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import vtk

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

# The package's __init__ makes ConvLoRASegLib importable first (installed next to this file, or one folder up).
from ConvLoRASegModuleLib import HOMEPAGE_URL
from ConvLoRASegModuleLib.dependencies import (SELFTEST_ENV, DependencyInstaller, InstallStep,  # noqa: F401
                                               ensureDependencies, hasMainWindow, heavySelfTestWanted,
                                               installedTorchVersion, installPlan)
from ConvLoRASegModuleLib.logic import (ADAPTER_NOT_USED_ATTRIBUTE, ConvLoRASegLogic,  # noqa: F401
                                        SegmentOutcome)
from ConvLoRASegModuleLib.manifest import MANIFEST_COLUMNS, loadManifest, manifestEntries, manifestRows
from ConvLoRASegModuleLib.parameters import (PATH_WIDGETS, ConvLoRASegParameterNode, TargetType,
                                             libraryDefaultEpochs, libraryOneScanEpochs, pathOrNone)
from ConvLoRASegModuleLib.presenters import (JOB_PROGRESS_BARS, JOB_STATUS_LABELS, actionButtonStates,
                                             adaptationMessage, adapterRowToSelect, checkScansFromParameters,
                                             deviceChoices, epochsDefaultText, installStepText, modelInfoText,
                                             outputNodeForSegment, segmentAdapterText, targetFromParameters,
                                             targetWidgetStates)
from ConvLoRASegLib.errors import ConvLoRASegError
from ConvLoRASegLib.jobs import ProcessResult


#
# ConvLoRASeg
#


class ConvLoRASeg(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "ConvLoRA Brain Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["ConvLoRASeg contributors"]
        self.parent.helpText = (
            "Brain mask of a T1-weighted head MRI with a 2D U-Net. When scans come from a new scanner, "
            "<b>Adapt</b> learns a small ConvLoRA adapter (plus AdaBN statistics) from unlabelled scans of that "
            "scanner; adapters are kept per user and per model, and can be chosen automatically per scan. "
            "Optionally, one scan of that scanner with a trusted brain mask checks the adaptation: the adapter then "
            "never ends worse than no adapter on it. "
            f"See the <a href=\"{HOMEPAGE_URL}\">documentation</a>.")
        self.parent.acknowledgementText = (
            "Method: Sidra Aleem et al., \"ConvLoRA and AdaBN based Domain Adaptation via Self-Training\", "
            "ISBI 2024. This is an independent implementation.")


#
# ConvLoRASegWidget
#


class ConvLoRASegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI: parameter node <-> .ui, buttons -> logic, process events -> progress bar and log."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[ConvLoRASegLogic] = None
        self._parameterNode: Optional[ConvLoRASegParameterNode] = None
        self._parameterNodeGuiTag = None
        self._updatingGui = False
        self._autoOutputID: Optional[str] = None  # the labelmap the module selected after its last Segment
        self._detectedDevices: Optional[List[Tuple[str, str]]] = None
        self._manifestEntries: List[Dict[str, Any]] = []
        self._quitConnected = False
        self._installer: Optional[DependencyInstaller] = None  # dependencies installing for a job
        self._installingFor: Optional[str] = None  # the job that waits for them
        self._installTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ConvLoRASeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ConvLoRASegLogic()

        self.ui.manifestTableWidget.setColumnCount(len(MANIFEST_COLUMNS))
        self.ui.manifestTableWidget.setHorizontalHeaderLabels(list(MANIFEST_COLUMNS))
        self._showEpochsDefault()
        # Filled before any handler is connected and before the parameter node is attached: filling it later
        # fired onDeviceChanged and overwrote the saved device with "auto".
        self._fillDeviceList()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.adaptButton.connect("clicked(bool)", self.onAdaptButton)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.segmentCohortButton.connect("clicked(bool)", self.onSegmentCohortButton)
        self.ui.showManifestButton.connect("clicked(bool)", self.onShowManifestButton)
        self.ui.loadCaseButton.connect("clicked(bool)", self.onLoadCaseButton)
        self.ui.manifestTableWidget.connect("cellDoubleClicked(int,int)", self.onManifestCellDoubleClicked)
        self.ui.refreshAdaptersButton.connect("clicked(bool)", self.refreshAdapters)
        self.ui.renameAdapterButton.connect("clicked(bool)", self.onRenameAdapter)
        self.ui.deleteAdapterButton.connect("clicked(bool)", self.onDeleteAdapter)
        self.ui.importAdapterButton.connect("clicked(bool)", self.onImportAdapter)
        self.ui.exportAdapterButton.connect("clicked(bool)", self.onExportAdapter)
        self.ui.bundledModelButton.connect("clicked(bool)", self.onBundledModelButton)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.adaptersTableWidget.connect("itemSelectionChanged()", self.onAdapterSelectionChanged)
        for widgetName, parameter in PATH_WIDGETS.items():
            getattr(self.ui, widgetName).connect(
                "currentPathChanged(QString)", lambda path, parameter=parameter: self.onPathEdited(parameter, path))
        # Target widgets follow the parameter node (ModifiedEvent, see setParameterNode), not the combo box's own
        # signal: that ran before parameterNodeWrapper had stored the new choice and showed the previous one.

        slicer.app.connect("aboutToQuit()", self.onAboutToQuit)
        self._quitConnected = True
        self.initializeParameterNode()

    def _showEpochsDefault(self) -> None:
        """0 epochs runs the library's default: the field shows that number (Qt's special value text) instead."""
        self.ui.epochsSpinBox.specialValueText, self.ui.epochsSpinBox.toolTip = \
            epochsDefaultText(libraryDefaultEpochs(), libraryOneScanEpochs())

    def onReload(self) -> None:
        """Developer *Reload*: Slicer re-executes only this file, so the package beside it is dropped from
        ``sys.modules`` first and imported afresh by the reloaded file (edits there take effect too)."""
        for name in [n for n in sys.modules if n.split(".")[0] == "ConvLoRASegModuleLib"]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def cleanup(self) -> None:
        """Module reload or application exit: stop the background job and its timer, remove its temp folder."""
        self._teardown()
        self.removeObservers()

    def onAboutToQuit(self) -> None:
        self._teardown()

    def _teardown(self) -> None:
        if self._quitConnected:
            try:
                slicer.app.disconnect("aboutToQuit()", self.onAboutToQuit)
            except (AttributeError, ValueError, RuntimeError):
                pass
            self._quitConnected = False
        self._stopInstallTimer()
        if self._installer is not None:
            self._installer.kill()
            self._installer, self._installingFor = None, None
        if self.logic is not None:
            self.logic.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.refreshDevices()
        self.refreshAdapters()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        self._autoOutputID = None
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[ConvLoRASegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)
            self.updateGuiFromParameterNode()

    # -- parameter node -> GUI ---------------------------------------------------------------------------

    def updateGuiFromParameterNode(self, caller=None, event=None) -> None:
        """Everything parameterNodeWrapper does not bind, from the parameter node's current values."""
        p = self._parameterNode
        if p is None or self._updatingGui:
            return
        self._updatingGui = True
        try:
            for widgetName, enabled in targetWidgetStates(p.targetType).items():
                getattr(self.ui, widgetName).setEnabled(enabled)
            for widgetName, parameter in PATH_WIDGETS.items():
                widget, value = getattr(self.ui, widgetName), getattr(p, parameter) or ""
                if widget.currentPath != value:
                    wasBlocked = widget.blockSignals(True)
                    widget.currentPath = value
                    widget.blockSignals(wasBlocked)
            self.ui.modelInfoLabel.text = modelInfoText(p.modelPath)
            self._selectDevice(p.device)
            if p.outputLabelmap is not None and outputNodeForSegment(p.inputVolume, p.outputLabelmap,
                                                                     self._autoOutputID) is None:
                p.outputLabelmap = None  # the mask the module made for the previous volume: a new one is made
            self.ui.segmentAdapterLabel.text = segmentAdapterText(p.autoAdapter, p.selectedAdapter)
            self._updateButtons()
        finally:
            self._updatingGui = False

    def _updateButtons(self) -> None:
        p = self._parameterNode
        states = actionButtonStates(self.logic.runningJob if self.logic.isRunning() else None,
                                    self.logic.isCancelling(), bool(p is not None and p.inputVolume),
                                    self._installingFor)
        for buttonName, (text, enabled) in states.items():
            button = getattr(self.ui, buttonName)
            button.text = text
            button.enabled = enabled

    def onPathEdited(self, parameter: str, path: str) -> None:
        if self._parameterNode is None or self._updatingGui:
            return
        text = str(pathOrNone(path) or "")
        if getattr(self._parameterNode, parameter) != text:
            setattr(self._parameterNode, parameter, text)
            if parameter == "modelPath":
                self.logic.setModelPath(text)
                self.refreshAdapters()

    def onBundledModelButton(self) -> None:
        """Back to the bundled model (a cleared ctkPathLineEdit does not report the empty path)."""
        if self._parameterNode is not None:
            self._parameterNode.modelPath = ""
        self.logic.setModelPath(None)
        self.updateGuiFromParameterNode()
        self.refreshAdapters()

    # -- small GUI helpers ------------------------------------------------------------------------------

    def _run(self, what: str, function: Callable[[], Any]) -> Any:
        """Call ``function``; show a ConvLoRASegError as one line in a message box and the log."""
        try:
            with slicer.util.WaitCursor():
                return function()
        except ConvLoRASegError as exc:
            logging.error("ConvLoRASeg: %s failed: %s", what, exc)
            slicer.util.errorDisplay(f"{what} failed: {exc}")
        except Exception as exc:
            logging.exception("ConvLoRASeg: %s failed", what)
            slicer.util.errorDisplay(f"{what} failed: {exc}", detailedText=_traceback())
        return None

    def _prepare(self, job: str, start: Callable[[], Any]) -> None:
        """Apply the chosen model, then call ``start`` now, or once the missing dependencies are installed.

        They are installed in background processes (after one question): this returns at once, Slicer stays
        responsive, and the job's status label and progress bars say which step runs (the log shows pip's lines).
        """
        self.logic.setModelPath(self._parameterNode.modelPath)
        if self._installer is not None:
            return
        plan = self._run("Checking the dependencies", installPlan)
        if plan is None:
            return
        if not plan:
            start()
            return
        if not slicer.util.confirmOkCancelDisplay(plan.question(), "ConvLoRASeg: install dependencies"):
            return
        self.ui.logTextEdit.clear()
        self._installingFor = job
        self._installer = DependencyInstaller(plan, onStep=lambda index, count, step: self._onInstallStep(
            job, index, count, step), onLog=self.ui.logTextEdit.appendPlainText,
            onFinished=lambda error: self._onInstalled(job, start, error))
        self._updateButtons()
        self._installer.start()
        self._startInstallTimer()

    def _onInstallStep(self, job: str, index: int, count: int, step: InstallStep) -> None:
        text = installStepText(index, count, step.what)
        getattr(self.ui, JOB_STATUS_LABELS[job]).text = text
        for name in JOB_PROGRESS_BARS[job]:
            bar = getattr(self.ui, name)
            bar.maximum, bar.value = count, index
            bar.setFormat(text)

    def _onInstalled(self, job: str, start: Callable[[], Any], error: Optional[str]) -> None:
        self._stopInstallTimer()
        self._installer, self._installingFor = None, None
        for name in JOB_PROGRESS_BARS[job]:
            getattr(self.ui, name).setFormat("%p%")
        label = getattr(self.ui, JOB_STATUS_LABELS[job])
        if error is not None:
            label.text = f"Installing the dependencies failed: {error}"
            logging.error("ConvLoRASeg: installing the dependencies failed: %s", error)
            slicer.util.errorDisplay(f"Installing the dependencies failed: {error}")
            self._updateButtons()
            return
        label.text = "Dependencies installed."
        self._updateButtons()
        self.refreshDevices()
        start()

    def _startInstallTimer(self) -> None:
        try:
            import qt
        except ImportError:
            return  # no event loop (tests): the caller polls the installer
        self._installTimer = qt.QTimer()
        self._installTimer.setInterval(100)
        self._installTimer.timeout.connect(lambda: self._installer is not None and self._installer.poll())
        self._installTimer.start()

    def _stopInstallTimer(self) -> None:
        timer, self._installTimer = self._installTimer, None
        if timer is not None:  # may run inside the timer's own slot: let Qt delete it later
            timer.stop()
            timer.deleteLater()

    def _fillDeviceList(self) -> None:
        saved = self._parameterNode.device if self._parameterNode else "auto"
        items, index = deviceChoices(saved, self._detectedDevices)
        combo = self.ui.deviceComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for text, device in items:
            combo.addItem(text, device)
        combo.setCurrentIndex(index)
        combo.blockSignals(wasBlocked)

    def _selectDevice(self, device: str) -> None:
        combo = self.ui.deviceComboBox
        index = combo.findData(device or "auto")
        if index < 0:
            self._fillDeviceList()
        elif index != combo.currentIndex:
            wasBlocked = combo.blockSignals(True)
            combo.setCurrentIndex(index)
            combo.blockSignals(wasBlocked)

    def refreshDevices(self) -> None:
        """Fill the device list with what torch detects (auto first); the saved choice stays selected."""
        try:
            from ConvLoRASegLib.segment import available_devices

            self._detectedDevices = list(available_devices())
        except ImportError:
            self.ui.deviceInfoLabel.text = "Detected: (PyTorch not installed yet)"
            return
        self._fillDeviceList()
        self.ui.deviceInfoLabel.text = "Detected: " + "; ".join(d for _, d in self._detectedDevices)

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0 and not self._updatingGui:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index) or "auto"

    # -- adapters ---------------------------------------------------------------------------------------

    def refreshAdapters(self, *args) -> None:
        """Refill the adapter table from the store and select the parameter node's adapter again.

        The table's signals are blocked meanwhile: emptying it reports "nothing selected", which used to clear
        the chosen adapter on every module enter and after every Adapt. An adapter that is gone (deleted,
        another model's) is unselected in the parameter node too, so Segment never asks for it.
        """
        import qt

        table = self.ui.adaptersTableWidget
        wasBlocked = table.blockSignals(True)
        try:
            table.setRowCount(0)
            try:
                adapters = self.logic.adapters()
            except (ImportError, ConvLoRASegError) as exc:  # e.g. PyTorch not installed yet: keep the choice
                self.ui.statusLabel.text = f"Adapters unavailable: {exc}"
                return
            table.setRowCount(len(adapters))
            for row, info in enumerate(adapters):
                # the label-free score (ESH agreement + gamma consistency) that selected the adapter; the library
                # reads it from an older file's "agreement" too
                score = "" if info.score is None else f"{info.score:.3f}"
                for column, text in enumerate((info.name, info.created[:10], info.method, score)):
                    table.setItem(row, column, qt.QTableWidgetItem(text))
            p = self._parameterNode
            if p is not None:
                row = adapterRowToSelect([info.name for info in adapters], p.selectedAdapter)
                if row is not None:
                    table.selectRow(row)
                elif p.selectedAdapter:
                    p.selectedAdapter = ""
        finally:
            table.blockSignals(wasBlocked)
        table.resizeColumnsToContents()

    def _selectedAdapterName(self) -> Optional[str]:
        rows = self.ui.adaptersTableWidget.selectionModel().selectedRows()
        if not rows:
            return None
        return self.ui.adaptersTableWidget.item(rows[0].row(), 0).text()

    def onAdapterSelectionChanged(self) -> None:
        if self._parameterNode:
            self._parameterNode.selectedAdapter = self._selectedAdapterName() or ""

    def onRenameAdapter(self) -> None:
        import qt

        name = self._selectedAdapterName()
        if not name:
            return
        newName = qt.QInputDialog.getText(slicer.util.mainWindow(), "Rename adapter", "New name:",
                                          qt.QLineEdit.Normal, name)
        if newName and newName != name:
            renamed = self._run("Renaming the adapter", lambda: self.logic.renameAdapter(name, newName))
            if renamed is not None and self._parameterNode and self._parameterNode.selectedAdapter == name:
                self._parameterNode.selectedAdapter = renamed.name  # the selection follows the adapter
            self.refreshAdapters()

    def onDeleteAdapter(self) -> None:
        name = self._selectedAdapterName()
        if name and slicer.util.confirmYesNoDisplay(f"Delete adapter '{name}'?"):
            self._run("Deleting the adapter", lambda: self.logic.deleteAdapter(name))
            self.refreshAdapters()

    def onImportAdapter(self) -> None:
        import qt

        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Import adapter", "",
                                              "Adapters (*.safetensors)")
        if path:
            self._run("Importing the adapter", lambda: self.logic.importAdapter(path))
            self.refreshAdapters()

    def onExportAdapter(self) -> None:
        import qt

        name = self._selectedAdapterName()
        if not name:
            return
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Export adapter",
                                              f"{name}.safetensors", "Adapters (*.safetensors)")
        if path:
            self._run("Exporting the adapter", lambda: self.logic.exportAdapter(name, path, overwrite=True))

    # -- background jobs --------------------------------------------------------------------------------

    def _cancelIfRunning(self, job: str) -> bool:
        """True if the button's own job was running (it is now being cancelled)."""
        if not self.logic.isRunning():
            return False
        if self.logic.runningJob == job:
            self.logic.cancel()
        self._updateButtons()
        return True

    def _startJob(self, job: str, what: str, start: Callable[[], Any]) -> None:
        self.ui.logTextEdit.clear()
        for name in JOB_PROGRESS_BARS[job]:
            bar = getattr(self.ui, name)
            bar.value = 0
            bar.setFormat("%p%")
        if self._run(what, start) is None:
            getattr(self.ui, JOB_STATUS_LABELS[job]).text = f"{what} failed (see the message)."
        self._updateButtons()

    def onProcessEvent(self, event: Dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "progress":
            total = int(event.get("total") or 0)
            # "score": a candidate's label-free score (ESH agreement + gamma consistency), as the CLI's bar shows it
            details = [f"{key} {event[key]:.4g}" if isinstance(event[key], float) else f"{key} {event[key]}"
                       for key in ("volume", "epoch", "loss", "score") if event.get(key) is not None]
            for name in JOB_PROGRESS_BARS.get(self.logic.runningJob, ("progressBar",)):
                bar = getattr(self.ui, name)
                if total > 0:
                    bar.maximum = total
                    bar.value = int(event.get("step") or 0)
                bar.setFormat(f"{event.get('stage', '')} %v/%m " + " ".join(details))
            process = self.logic._process
            self.ui.etaLabel.text = process.eta.text() if process is not None else ""
        elif kind == "error":
            self.ui.logTextEdit.appendPlainText(f"Error: {event.get('message')}")
        self._updateButtons()

    def _jobEnded(self, job: str, what: str, result: ProcessResult) -> bool:
        """Common end of a job: the label beside its button says how it went; True when it succeeded."""
        self.ui.etaLabel.text = ""
        self._updateButtons()
        label = getattr(self.ui, JOB_STATUS_LABELS[job])
        if result.cancelled:
            label.text = f"{what} cancelled; nothing was saved."
            return False
        if not result.ok:
            label.text = f"{what} failed: {result.errorMessage}"
            logging.error("ConvLoRASeg: %s failed: %s", what, result.errorMessage)
            slicer.util.errorDisplay(f"{what} failed: {result.errorMessage}")
            return False
        return True

    # -- adapt ------------------------------------------------------------------------------------------

    def onAdaptButton(self) -> None:
        if not self._cancelIfRunning("adapt"):
            self._prepare("adapt", self._startAdapt)

    def _startAdapt(self) -> None:
        p = self._parameterNode

        def start():
            target = targetFromParameters(p.targetType, p.cohortFolder, p.cc359Root, p.cc359Site,
                                          self.ui.targetVolumesCheckableComboBox.checkedNodes())
            checkScans = checkScansFromParameters(p.checkScan, p.checkMask)
            process = self.logic.adapt(target, p.newAdapterName, method=p.method, device=p.device,
                                       epochs=p.epochs or None, progress=self.onProcessEvent,
                                       log=self.ui.logTextEdit.appendPlainText, finished=self.onAdaptFinished,
                                       waitForCompletion=False, checkScans=checkScans)
            self.ui.adaptStatusLabel.text = f"Adapting '{p.newAdapterName}'..."
            return process

        self._startJob("adapt", "Starting the adaptation", start)

    def onAdaptFinished(self, result: ProcessResult) -> None:
        """The result beside the Adapt button; the new adapter becomes the one Segment uses, unless it changes
        nothing (the unadapted model was better: the message says to segment without it)."""
        if self._jobEnded("adapt", "Adaptation", result):
            text, warn = adaptationMessage(result.done or {})
            self.ui.adaptStatusLabel.text = text
            info = result.value
            if not warn and info is not None and self._parameterNode is not None:
                self._parameterNode.selectedAdapter = info.name
            if warn:
                slicer.util.warningDisplay(text)
        self.refreshAdapters()

    # -- segment ----------------------------------------------------------------------------------------

    def onSegmentButton(self) -> None:
        if not self._cancelIfRunning("segment"):
            self._prepare("segment", self._startSegment)

    def _startSegment(self) -> None:
        p = self._parameterNode
        volume = p.inputVolume
        if volume is None:
            slicer.util.errorDisplay("Select an input volume first.")
            return
        output = outputNodeForSegment(volume, p.outputLabelmap, self._autoOutputID)
        adapter = "auto" if p.autoAdapter else (p.selectedAdapter or None)
        if hasMainWindow():  # GUI: the model runs in the background process, one pass per adapter for "auto"
            self.ui.statusLabel.text = f"Segmenting {volume.GetName()}..."
            self._startJob("segment", "Starting the segmentation", lambda: self.logic.segmentInBackground(
                volume, adapter=adapter, outputNode=output, device=p.device, progress=self.onProcessEvent,
                log=self.ui.logTextEdit.appendPlainText, finished=lambda r: self.onSegmentFinished(volume, output, r)))
            return
        outcome = self._run("Segmenting", lambda: self._segmentHere(volume, adapter, output, p.device))
        if outcome is not None:
            self._showSegmentation(volume, output, outcome)

    def _segmentHere(self, volume, adapter, output, device) -> SegmentOutcome:
        from ConvLoRASegLib.selection import adapter_not_used, unguarded_adapter

        scores: Dict[str, float] = {}
        auto = adapter == "auto"
        if auto:
            adapter, scores = self.logic.chooseAdapter(volume, device=device)
        # the automatic choice already compared every adapter with the unadapted model on this scan
        labelmap = self.logic.segment(volume, adapter=adapter, outputNode=output, device=device,
                                      checkAdapter=not auto)
        if auto:
            self.logic.setLabelFreeScores(labelmap, scores)
        else:  # the per-scan check's label-free scores of the adapter and the unadapted model, if it ran
            scores = self.logic.labelFreeScores(labelmap)
        refused = labelmap.GetAttribute(ADAPTER_NOT_USED_ATTRIBUTE) or ""
        used = None if refused else self.logic.resolveAdapter(adapter)
        # the warnings say as the command line's do why the adapter was not used, with both label-free scores, or
        # that it was made by a method the label-free checks do not guard
        warnings = [adapter_not_used(refused, scores)] if refused else []
        unguarded = unguarded_adapter(used)
        return SegmentOutcome(labelmap, used, scores, warnings + ([unguarded] if unguarded else []))

    def onSegmentFinished(self, volume, output, result: ProcessResult) -> None:
        if self._jobEnded("segment", "Segmentation", result):
            self._showSegmentation(volume, output, result.value)

    def _showSegmentation(self, volume, output, outcome: SegmentOutcome) -> None:
        p = self._parameterNode
        labelmap = outcome.labelmap
        if output is None:
            self._autoOutputID = labelmap.GetID()
        p.outputLabelmap = labelmap
        slicer.util.setSliceViewerLayers(background=volume, label=labelmap)
        lines = []
        if outcome.scores:
            lines.append("Label-free score (ESH agreement + gamma consistency): "
                         + ", ".join(f"{k} {v:.3f}" for k, v in outcome.scores.items()))
        adapterName = getattr(outcome.adapter, "name", None) or "none (source model)"
        lines.append(f"Brain volume {self.logic.brainVolumeMl(labelmap):.0f} ml; adapter: {adapterName}.")
        lines += [f"Warning: {w}" for w in outcome.warnings]
        self.ui.statusLabel.text = "\n".join(lines)
        if p.createSegmentation:
            self._run("Creating the segmentation", lambda: self.logic.createSegmentation(labelmap, show3D=p.show3D))
            if p.show3D:
                slicer.util.resetThreeDViews()

    # -- segment a cohort, quality-control manifest -----------------------------------------------------

    def onSegmentCohortButton(self) -> None:
        if not self._cancelIfRunning("cohort"):
            self._prepare("cohort", self._startCohort)

    def _startCohort(self) -> None:
        p = self._parameterNode

        def start():
            inputs = pathOrNone(p.segmentInputFolder)
            if inputs is None:
                raise ConvLoRASegError("choose the folder of volumes to segment")
            outputDir = pathOrNone(p.segmentOutputFolder)
            if outputDir is None:
                raise ConvLoRASegError("choose the output folder for the masks")
            adapter = "auto" if p.autoAdapter else (p.selectedAdapter or None)
            return self.logic.segmentCohort(str(inputs), outputDir, adapter=adapter, device=p.device,
                                            progress=self.onProcessEvent, log=self.ui.logTextEdit.appendPlainText,
                                            finished=lambda r: self.onCohortFinished(outputDir, r),
                                            waitForCompletion=False)

        self._startJob("cohort", "Starting the cohort segmentation", start)

    def onCohortFinished(self, outputDir: pathlib.Path, result: ProcessResult) -> None:
        if self._jobEnded("cohort", "Cohort segmentation", result):
            self.showManifest(outputDir, fallback=(result.done or {}).get("outputs"))

    def onShowManifestButton(self) -> None:
        outputDir = pathOrNone(self._parameterNode.segmentOutputFolder if self._parameterNode else "")
        if outputDir is None:
            slicer.util.errorDisplay("Choose the output folder of a cohort run first.")
            return
        self.showManifest(outputDir)

    def showManifest(self, outputDir: pathlib.Path, fallback: Optional[Sequence[Dict[str, Any]]] = None) -> None:
        """Fill the QC table with the run's cases, worst first (the run's own list if it wrote no manifest)."""
        import qt

        try:
            entries = loadManifest(outputDir)
        except ConvLoRASegError as exc:
            if fallback is None:
                slicer.util.errorDisplay(f"Showing the manifest failed: {exc}")
                return
            entries = manifestEntries(fallback)
        self._manifestEntries = entries
        table = self.ui.manifestTableWidget
        table.setRowCount(len(entries))
        for row, texts in enumerate(manifestRows(entries)):
            for column, text in enumerate(texts):
                table.setItem(row, column, qt.QTableWidgetItem(text))
        table.resizeColumnsToContents()
        flagged = sum(1 for entry in entries if entry["flags"])
        self.ui.manifestLabel.text = (f"{len(entries)} cases, {flagged} flagged (worst first); double-click a row "
                                      "to load the case.")

    def onManifestCellDoubleClicked(self, row: int, column: int) -> None:
        self._loadCase(row)

    def onLoadCaseButton(self) -> None:
        rows = self.ui.manifestTableWidget.selectionModel().selectedRows()
        self._loadCase(rows[0].row() if rows else 0)

    def _loadCase(self, row: int) -> None:
        if not 0 <= row < len(self._manifestEntries):
            return
        loaded = self._run("Loading the case", lambda: self.logic.loadCase(self._manifestEntries[row]))
        if loaded is not None:
            volume, labelmap = loaded
            slicer.util.setSliceViewerLayers(background=volume, label=labelmap, fit=True)


def _traceback() -> str:
    import traceback

    return traceback.format_exc()


#
# ConvLoRASegTest
#


class ConvLoRASegTest(ScriptedLoadableModuleTest):
    """In-Slicer test. Always: the GUI decisions and a headless logic. On SampleData MRHead (segment, plausible
    brain volume, short CPU adaptation) only where torch is installed or ``CONVLORASEG_SELFTEST=full``: the
    Extensions build machines have no torch, and installing it plus training takes minutes there."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_GuiDecisions()
        if not heavySelfTestWanted(os.environ, installedTorchVersion() is not None):
            self.delayDisplay(f"Segmentation and adaptation tests skipped: PyTorch is not installed (set "
                              f"{SELFTEST_ENV}=full to install it and run them)")
            return
        self.setUp()
        self.test_SegmentMRHead()
        self.setUp()
        self.test_AdaptOnSmallCohort()

    def _mrHead(self):
        import SampleData

        return SampleData.SampleDataLogic().downloadMRHead()

    def test_GuiDecisions(self) -> None:
        self.delayDisplay("GUI decisions")
        self.assertEqual(targetWidgetStates(TargetType.CC359)["cc359SiteComboBox"], True)
        self.assertEqual(deviceChoices("cuda:1", None)[0][-1][1], "cuda:1")
        self.assertEqual(actionButtonStates("adapt", False, True)["adaptButton"], ("Cancel", True))
        logic = ConvLoRASegLogic()
        self.assertFalse(logic.isRunning())
        logic.shutdown()

    def test_SegmentMRHead(self) -> None:
        self.delayDisplay("Segmenting MRHead")
        ensureDependencies(askConfirmation=False)
        volume = self._mrHead()
        logic = ConvLoRASegLogic()
        labelmap = logic.segment(volume, device="cpu")
        m1, m2 = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(m1)
        labelmap.GetIJKToRASMatrix(m2)
        for row in range(4):
            for column in range(4):
                self.assertAlmostEqual(m1.GetElement(row, column), m2.GetElement(row, column), places=6)
        volumeMl = logic.brainVolumeMl(labelmap)
        self.assertTrue(900.0 <= volumeMl <= 2000.0, f"implausible brain volume {volumeMl:.0f} ml")
        segmentation = logic.createSegmentation(labelmap)
        self.assertEqual(segmentation.GetSegmentation().GetNthSegment(0).GetName(), "Brain")
        self.delayDisplay(f"MRHead brain volume {volumeMl:.0f} ml")

    def test_AdaptOnSmallCohort(self) -> None:
        self.delayDisplay("Adapting on MRHead (CPU, 1 epoch)")
        ensureDependencies(askConfirmation=False)
        volume = self._mrHead()
        storeRoot = pathlib.Path(tempfile.mkdtemp(prefix="ConvLoRASegTest-"))
        try:
            logic = ConvLoRASegLogic(storeRoot=storeRoot)
            events = []
            info = logic.adapt([volume], name="selftest", device="cpu", epochs=1, progress=events.append,
                               timeout=600)
            self.assertIsNotNone(info)
            self.assertTrue(any(e.get("event") == "progress" for e in events))
            self.assertEqual([a.name for a in logic.adapters()], ["selftest"])
            labelmap = logic.segment(volume, adapter="selftest", device="cpu")
            self.assertGreater(logic.brainVolumeMl(labelmap), 500.0)
        finally:
            shutil.rmtree(storeRoot, ignore_errors=True)
        self.delayDisplay("Adaptation test passed")
