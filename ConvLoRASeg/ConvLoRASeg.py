"""ConvLoRASeg: brain masks on T1 MRI that adapt to a new scanner without labels (3D Slicer module).

Three parts, as in Slicer's scripted-module template:

- :class:`ConvLoRASegWidget` is thin: it binds the .ui to :class:`ConvLoRASegParameterNode` (widgets carry a
  ``SlicerParameterName`` property), observes the parameter node and calls the logic. No ML code. What the GUI
  shows is decided by the plain functions of the "GUI decisions" section, which tests drive headless.
- :class:`ConvLoRASegLogic` is the batch-mode API (no widget references): ``segment`` a volume node into a
  labelmap node with exactly the input's geometry (in-process, or ``segmentInBackground``), ``adapt`` to a
  target cohort and ``segmentCohort`` in a background process, manage ``adapters``. It works in
  ``Slicer --no-main-window --python-script`` and in plain Python with the PyPI ``slicer-core`` MRML library.
- :class:`ConvLoRASegTest` runs inside Slicer on SampleData MRHead (its heavy part only where torch is
  installed, or when ``CONVLORASEG_SELFTEST=full`` asks for it).

The ML lives in the pure-Python library ``ConvLoRASegLib`` (installed next to this file); torch is imported
only when a model is needed, so the module loads (and the GUI shows) before PyTorch is installed. This must be
the only ``*.py`` at the top of the module folder: Slicer registers every one there as a module.
"""

from __future__ import annotations

import enum
import importlib
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import vtk

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import Choice, Default, WithinRange, parameterNodeWrapper

try:
    from typing import Annotated
except ImportError:  # Python < 3.9
    from typing_extensions import Annotated

from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

_MODULE_DIR = pathlib.Path(__file__).resolve().parent


def _ensureLibraryImportable() -> None:
    """Make ``import ConvLoRASegLib`` work: installed next to this file, or one folder up in a source tree."""
    for folder in (_MODULE_DIR, _MODULE_DIR.parent):
        if (folder / "ConvLoRASegLib" / "__init__.py").is_file():
            if str(folder) not in sys.path:
                sys.path.insert(0, str(folder))
            return


_ensureLibraryImportable()

# Neither import needs torch: the package's __init__ is lazy, jobs.py and errors.py use the standard library only.
from ConvLoRASegLib import TORCH_MIN  # noqa: E402
from ConvLoRASegLib.errors import ConvLoRASegError  # noqa: E402
from ConvLoRASegLib.jobs import CliProcess, ProcessResult, childEnvironment, libraryCommand  # noqa: E402

# Same names as ConvLoRASegLib.cohorts (CC359 domains) and ConvLoRASegLib.selftrain.METHODS (kept literal so the
# module loads without torch; Testing/test_slicer_logic.py checks they agree).
CC359_SITES = ("ge15", "ge3", "philips15", "philips3", "siemens15", "siemens3")
METHODS = ("convlora-adabn", "adabn", "udas", "udas-convlora", "self-training")
# Installed with pip when missing (import name, requirement). None of them pulls torch; Slicer's own numpy and
# SimpleITK are not listed, so pip never replaces them; torch comes from the PyTorch extension.
PIP_REQUIREMENTS = (("safetensors", "safetensors>=0.4"), ("scipy", "scipy>=1.9"), ("tqdm", "tqdm>=4.60"))
TORCH_REQUIREMENT = f">={TORCH_MIN}"
# CONVLORASEG_SELFTEST=full runs the self-test's heavy part (installs torch if needed; minutes on a CPU),
# =light never runs it; unset: only where torch is already installed.
SELFTEST_ENV = "CONVLORASEG_SELFTEST"
# SNOMED CT code for Brain, in Slicer's terminology-entry format (category: Anatomical Structure).
BRAIN_TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list"
                     "~SCT^123037004^Anatomical Structure~SCT^12738006^Brain~^^"
                     "~Anatomic codes - DICOM master list~^^~^^")
BRAIN_COLOR = (0.88, 0.63, 0.65)
# Labelmap attributes written by the logic: which volume a mask was made from, with which adapter and model.
SOURCE_VOLUME_ATTRIBUTE = "ConvLoRASeg.sourceVolumeID"
# ... and the adapter asked for that did not beat the unadapted model on this scan (so it was not used), or "".
ADAPTER_NOT_USED_ATTRIBUTE = "ConvLoRASeg.adapterNotUsed"


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
            "See the <a href=\"https://github.com/convloraseg/SlicerConvLoRA#readme\">documentation</a>.")
        self.parent.acknowledgementText = (
            "Method: Sidra Aleem et al., \"ConvLoRA and AdaBN based Domain Adaptation via Self-Training\", "
            "ISBI 2024. This is an independent implementation.")


#
# Parameter node
#


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


def _pathOrNone(path: Optional[Union[str, pathlib.Path]]) -> Optional[pathlib.Path]:
    """A parameter-node path, or None when it is empty ('' or '.', which an old scene may hold)."""
    if path is None or str(path).strip() in ("", "."):
        return None
    return pathlib.Path(str(path).strip())


#
# GUI decisions (plain functions: the widget applies them, tests drive them headless)
#


def targetWidgetStates(targetType: Optional[TargetType]) -> Dict[str, bool]:
    """Which target-cohort widgets are enabled for ``targetType`` (name in the .ui -> enabled)."""
    return {
        "cohortFolderPathLineEdit": targetType == TargetType.FOLDER,
        "targetVolumesCheckableComboBox": targetType == TargetType.SCENE,
        "cc359RootPathLineEdit": targetType == TargetType.CC359,
        "cc359SiteComboBox": targetType == TargetType.CC359,
    }


def targetFromParameters(targetType: Optional[TargetType], cohortFolder: str, cc359Root: str, cc359Site: str,
                         sceneVolumes: Sequence[Any]) -> Any:
    """What ``ConvLoRASegLogic.adapt`` gets as target; ConvLoRASegError (one line) when it is not chosen."""
    if targetType == TargetType.FOLDER:
        folder = _pathOrNone(cohortFolder)
        if folder is None:
            raise ConvLoRASegError("choose the folder with the target scanner's volumes")
        return str(folder)
    if targetType == TargetType.CC359:
        root = _pathOrNone(cc359Root)
        if root is None:
            raise ConvLoRASegError("choose the CC359 root folder (it holds Original/)")
        return f"cc359:{root}:{cc359Site}"
    if targetType == TargetType.SCENE:
        volumes = list(sceneVolumes)
        if not volumes:
            raise ConvLoRASegError("check at least one volume of the scene for the target cohort")
        return volumes
    raise ConvLoRASegError("choose where the target cohort comes from")


def checkScansFromParameters(checkScan: Any, checkMask: Any) -> List[Tuple[Any, Any]]:
    """What ``ConvLoRASegLogic.adapt`` gets as ``checkScans`` from the optional check selectors: nothing when
    neither is set, the pair when both are; ConvLoRASegError (one line) when only one is (a check the user asked
    for is never dropped silently)."""
    if checkScan is None and checkMask is None:
        return []
    if checkScan is None:
        raise ConvLoRASegError("choose the check scan for the check mask (or clear the check mask)")
    if checkMask is None:
        raise ConvLoRASegError("choose the check mask of the check scan (or clear the check scan)")
    return [(checkScan, checkMask)]


#: Run button -> (the job it starts and cancels, its text when idle).
JOB_BUTTONS = {"adaptButton": ("adapt", "Adapt"), "segmentButton": ("segment", "Segment"),
               "segmentCohortButton": ("cohort", "Segment cohort")}


def actionButtonStates(runningJob: Optional[str], cancelling: bool, hasInputVolume: bool) -> Dict[str, Tuple[str, bool]]:
    """Text and enabled state of the three run buttons: each starts its job, or cancels it while it runs.

    One background job at a time: while one runs, the other buttons are disabled.
    """
    states = {}
    for button, (job, idleText) in JOB_BUTTONS.items():
        if runningJob is None:
            states[button] = (idleText, hasInputVolume if job == "segment" else True)
        elif runningJob == job:
            states[button] = ("Cancelling..." if cancelling else "Cancel", not cancelling)
        else:
            states[button] = (idleText, False)
    return states


def deviceChoices(saved: Optional[str], detected: Optional[Sequence[Tuple[str, str]]]) -> Tuple[List[Tuple[str, str]], int]:
    """Items (text, device) of the device list and the index to select: the saved choice is never dropped.

    ``detected`` is None while torch is not installed (nothing probed yet).
    """
    items = [("auto", "auto")] + [(f"{spec}: {description}", spec) for spec, description in (detected or ())]
    saved = (saved or "auto").strip() or "auto"
    devices = [device for _, device in items]
    if saved not in devices:
        items.append((f"{saved} (not detected)" if detected is not None else saved, saved))
        devices.append(saved)
    return items, devices.index(saved)


def modelInfoText(modelPath: Optional[str]) -> str:
    path = _pathOrNone(modelPath)
    return f"Model: {path}" if path is not None else "Model: bundled default"


def outputNodeForSegment(inputVolume, selectedOutput, autoOutputID: Optional[str]):
    """The labelmap node *Segment* writes into, or None to create a new one.

    The user's own choice is kept. The node the module itself selected after an earlier *Segment*
    (``autoOutputID``) is reused only for the volume it was made from: a new volume gets a new mask.
    """
    if selectedOutput is None:
        return None
    if autoOutputID is not None and selectedOutput.GetID() == autoOutputID:
        source = selectedOutput.GetAttribute(SOURCE_VOLUME_ATTRIBUTE)
        if inputVolume is None or source != inputVolume.GetID():
            return None
    return selectedOutput


def _meanScore(values: Any) -> Optional[float]:
    """Mean of a list of numbers (a candidate's per-scan surface Dice), or None when it is not one."""
    if not isinstance(values, (list, tuple)) or not values:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    return float(sum(values)) / len(values)


def _labelledCheckMessage(name: Any, summary: Dict[str, Any], check: Dict[str, Any]) -> Tuple[str, bool]:
    """:func:`adaptationMessage` when the adaptation was checked on labelled scans (``adapt --check``)."""
    scans = check.get("scans") or []
    count = len(scans) if isinstance(scans, (list, tuple)) else 0
    scansText = f"{count} labelled check scan{'' if count == 1 else 's'}"
    table = check.get("surface_dice") if isinstance(check.get("surface_dice"), dict) else {}
    tolerance = check.get("tolerance_mm")
    metric = f"surface Dice at {tolerance:g} mm" if isinstance(tolerance, (int, float)) else "surface Dice"
    labelFree = summary.get("label_free_selected") or check.get("label_free_selected")
    selected = summary.get("selected") or check.get("selected")
    source = _meanScore(table.get("source"))
    sourceText = f"{source:.3f}" if source is not None else "?"
    if summary.get("adapted") is False:
        if labelFree and labelFree != "source":
            chosen = _meanScore(table.get(labelFree))
            chosenText = f" {chosen:.3f}" if chosen is not None else ""
            return (f"Adapter '{name}' saved, but the label-free choice ({labelFree}) was worse than the unadapted "
                    f"model on the {scansText} ({metric}{chosenText} vs. unadapted {sourceText}): it changes "
                    "nothing; segment without it.", True)
        best = max((v for v in (_meanScore(s) for k, s in table.items() if k != "source") if v is not None),
                   default=None)
        bestText = f", best adapted candidate {best:.3f}" if best is not None else ""
        return (f"Adapter '{name}' saved, but no adapted candidate beat the unadapted model, neither on the "
                f"label-free score nor on the {scansText} ({metric}: unadapted {sourceText}{bestText}): it changes "
                "nothing; segment without it.", True)
    score = _meanScore(table.get(selected))
    scoreText = f"{score:.3f}" if score is not None else "?"
    changed = (f"; the check chose it over the label-free choice {labelFree}"
               if labelFree and selected and labelFree != selected else "")
    return (f"Adapter '{name}' saved (selected: {selected or '?'}; on the {scansText}, {metric} {scoreText} vs. "
            f"unadapted {sourceText}{changed}).", False)


def adaptationMessage(done: Dict[str, Any]) -> Tuple[str, bool]:
    """The status line after an adaptation job and whether it is a warning: the label-free selection may have
    kept the unadapted model (``summary.adapted`` false), and the user must see that the adapter changes nothing.

    With a labelled check (``summary.labelled_check``, ``adapt --check``) the line says what the check measured on
    the labelled scans, and warns when the check refused the label-free choice (the adapter then changes nothing).
    """
    adapter = done.get("adapter") or {}
    summary = done.get("summary") or {}
    name = adapter.get("name")
    check = summary.get("labelled_check")
    if isinstance(check, dict):
        return _labelledCheckMessage(name, summary, check)
    if summary.get("adapted") is False:
        scores = summary.get("candidates") or {}
        best = max((v for k, v in scores.items() if k != "source"), default=None)
        best_text = f", best adapted candidate {best:.3f}" if isinstance(best, (int, float)) else ""
        source = summary.get("agreement_source")
        source_text = f"{source:.3f}" if isinstance(source, (int, float)) else "?"
        return (f"Adapter '{name}' saved, but adaptation did not beat the unadapted model on the label-free score "
                f"(source {source_text}{best_text}): it changes nothing; segment without it.", True)
    selected = summary.get("selected")
    agreement = adapter.get("agreement")
    score = f"{agreement:.3f}" if isinstance(agreement, (int, float)) else "?"
    return f"Adapter '{name}' saved (selected: {selected or '?'}, label-free score {score}).", False


def heavySelfTestWanted(environ: Mapping[str, str], torchInstalled: bool) -> bool:
    """Run the self-test's segmentation and adaptation? Only where torch is there, unless the variable says."""
    value = environ.get(SELFTEST_ENV, "").strip().lower()
    if value in ("full", "1", "yes", "on"):
        return True
    if value in ("light", "0", "no", "off"):
        return False
    return torchInstalled


def _versionTuple(version: str) -> Tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit()) if not piece.isdigit() else piece
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():
            break
    return tuple(parts)


def torchVersionProblem(installed: Optional[str], minimum: str = TORCH_MIN) -> Optional[str]:
    """None when torch ``installed`` (a version string, None if absent) is new enough, else "missing"/"old"."""
    if installed is None:
        return "missing"
    try:
        from packaging.version import Version

        old = Version(installed).release < Version(minimum).release
    except Exception:  # packaging missing or an odd local version: compare the leading numbers
        old = _versionTuple(installed) < _versionTuple(minimum)
    return "old" if old else None


def installedTorchVersion() -> Optional[str]:
    """torch's version without importing it (None when it is not installed)."""
    import importlib.metadata
    import importlib.util

    if "torch" in sys.modules:
        return str(getattr(sys.modules["torch"], "__version__", "0"))
    if importlib.util.find_spec("torch") is None:
        return None
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):  # the CLI's per-adapter scores: the chosen one is the best
        numbers = [float(v) for v in value.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return max(numbers) if numbers else None
    return None


def _worstFirst(entry: Dict[str, Any]) -> Tuple:
    agreement = _number(entry.get("agreement"))
    return (-len(entry.get("flags") or ()), agreement if agreement is not None else float("inf"))


def manifestEntries(items: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Cases of a cohort run as dicts with at least input, output, adapter, seconds, brain_ml, agreement and
    flags (list of str), worst first (most flags, then lowest agreement)."""
    entries = []
    for item in items:
        entry = {"input": "", "output": "", "adapter": None, "seconds": None, "brain_ml": None, "agreement": None}
        entry.update(item)
        flags = entry.get("flags")
        entry["flags"] = [flags] if isinstance(flags, str) else list(flags or [])
        entries.append(entry)
    return sorted(entries, key=_worstFirst)


def loadManifest(outputDir: Union[str, pathlib.Path]) -> List[Dict[str, Any]]:
    """The cases of ``convlora-seg segment ... -o OUTDIR``, worst first.

    ``ConvLoRASegLib.qc.load_manifest`` where the library has it, else OUTDIR/manifest.json read here.
    Raises ConvLoRASegError (one line) when there is no readable manifest.
    """
    folder = pathlib.Path(outputDir)
    try:
        qc = importlib.import_module("ConvLoRASegLib.qc")
    except ImportError:
        qc = None
    try:
        if qc is not None and hasattr(qc, "load_manifest"):
            return manifestEntries(qc.load_manifest(folder))
        data = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except ConvLoRASegError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConvLoRASegError(f"no readable manifest in {folder} ({exc.__class__.__name__}: {exc})") from None
    if isinstance(data, dict):
        data = data.get("cases") or data.get("outputs") or []
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise ConvLoRASegError(f"{folder / 'manifest.json'} does not list cases")
    return manifestEntries(data)


MANIFEST_COLUMNS = ("Flags", "Input", "Adapter", "Brain (ml)", "Agreement", "Seconds")


def manifestRows(entries: Sequence[Dict[str, Any]]) -> List[Tuple[str, ...]]:
    """The text of each manifest table row (columns: MANIFEST_COLUMNS)."""
    rows = []
    for entry in entries:
        brain, agreement, seconds = (_number(entry.get(key)) for key in ("brain_ml", "agreement", "seconds"))
        rows.append((", ".join(entry.get("flags") or []) or "ok",
                     pathlib.Path(str(entry.get("input") or "")).name,
                     str(entry.get("adapter") or "source model"),
                     "" if brain is None else f"{brain:.0f}",
                     "" if agreement is None else f"{agreement:.3f}",
                     "" if seconds is None else f"{seconds:.1f}"))
    return rows


#
# Dependencies
#


def ensureDependencies(askConfirmation: Optional[bool] = None) -> None:
    """Install what ConvLoRASegLib needs and Slicer lacks; raise ConvLoRASegError with a clear line if it fails.

    torch comes from the PyTorch extension (``PyTorchUtils``, which picks the build for the GPU); an installed
    torch older than ``ConvLoRASegLib.TORCH_MIN`` is upgraded through it (after asking, with a GUI). The pip
    packages are installed after one confirmation of ours -- ``slicer.packaging.pip_ensure`` (Slicer >= 5.12.0)
    is told not to ask again and to install in testing mode too; ``slicer.util.pip_install`` before 5.12.
    ``askConfirmation`` defaults to False when Slicer runs tests or has no main window (batch mode).
    """
    import importlib.util

    if askConfirmation is None:
        askConfirmation = not _isBatchOrTesting()
    installed = installedTorchVersion()
    problem = torchVersionProblem(installed)
    if problem is not None:
        _installTorch(problem, installed, askConfirmation)
    missing = [req for importName, req in PIP_REQUIREMENTS if importlib.util.find_spec(importName) is None]
    if not missing:
        return
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            f"ConvLoRASeg needs these Python packages: {', '.join(missing)}. Install them now?"):
        raise ConvLoRASegError(f"missing Python packages: {', '.join(missing)}")
    try:
        _pipInstall(missing, interactive=askConfirmation)
    except Exception as exc:  # pip's own errors are many types; users need one line
        raise ConvLoRASegError(f"installing {', '.join(missing)} failed ({exc}); check the network and the "
                               "Python console") from None


def _installTorch(problem: str, installed: Optional[str], askConfirmation: bool) -> None:
    try:
        import PyTorchUtils
    except ImportError:
        what = "PyTorch is needed" if problem == "missing" else f"PyTorch {installed} is older than {TORCH_MIN}"
        raise ConvLoRASegError(f"{what}: install the 'PyTorch' extension from the Extensions Manager, restart "
                               "Slicer and try again") from None
    wasImported = "torch" in sys.modules
    if problem == "old":
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                f"ConvLoRASeg needs PyTorch {TORCH_REQUIREMENT}; PyTorch {installed} is installed (perhaps by "
                "another extension). Upgrade it now through PyTorch Utils? Slicer must be restarted afterwards."):
            raise ConvLoRASegError(f"PyTorch {installed} is older than {TORCH_MIN}; upgrade it in the PyTorch Utils "
                                   f"module (version requirement {TORCH_REQUIREMENT}) and restart Slicer")
        askConfirmation = False  # we just asked
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation,
                                                         torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        raise ConvLoRASegError("PyTorch was not installed (cancelled or failed); see the Python console")
    if problem == "old" and wasImported:
        raise ConvLoRASegError(f"PyTorch was upgraded (the old {installed} is still loaded): restart Slicer")


def _slicerPackaging():
    """``slicer.packaging`` (Slicer >= 5.12.0), or None on older Slicer."""
    try:
        return importlib.import_module("slicer.packaging")
    except ImportError:
        return None


def _pipInstall(requirements: Sequence[str], interactive: bool) -> None:
    packaging = _slicerPackaging()
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        # We asked once already: no second dialog (it would also stall batch mode), and install in testing mode
        # too (the CTest self-test needs the packages; the default skip_in_testing=True installs nothing).
        packaging.pip_ensure(list(requirements), prompt_install=False, prompt_restart=interactive,
                             requester="ConvLoRASeg", skip_in_testing=False, show_progress=interactive)
    else:  # Slicer < 5.12: pip_install(requirements) takes nothing else
        slicer.util.pip_install(" ".join(requirements))


def _isBatchOrTesting() -> bool:
    app = getattr(slicer, "app", None)
    if app is None:
        return True
    try:
        return bool(app.testingEnabled()) or bool(app.commandOptions().noMainWindow)
    except AttributeError:
        return True


def _hasMainWindow() -> bool:
    """True in the GUI application (long work then goes to a background process), False in batch mode."""
    app = getattr(slicer, "app", None)
    if app is None:
        return False
    try:
        return not bool(app.commandOptions().noMainWindow)
    except AttributeError:
        return False


@dataclass
class SegmentOutcome:
    """What a background *Segment* produced: the labelmap, the adapter used and the label-free scores."""

    labelmap: Any
    adapter: Any = None
    scores: Dict[str, float] = field(default_factory=dict)
    #: e.g. the adapter that did not beat the unadapted model on this scan and was therefore not used
    warnings: List[str] = field(default_factory=list)


#
# ConvLoRASegLogic
#


class ConvLoRASegLogic(ScriptedLoadableModuleLogic):
    """Batch-mode API: segment volume nodes, adapt to a cohort in a background process, manage adapters.

    Args:
        scene: MRML scene for new nodes; default ``slicer.mrmlScene`` (else the scene of the input node).
        storeRoot: adapter store folder; default the user store (``$CONVLORASEG_HOME`` or the per-user data
            folder), shared with the ``convlora-seg`` command line.

    Example (``Slicer --no-main-window --python-script run.py``)::

        logic = slicer.util.getModuleLogic("ConvLoRASeg")
        info = logic.adapt("/data/siteB", name="siteB", device="cuda:0")
        volume = slicer.util.loadVolume("/data/siteB/scan01.nii.gz")
        mask = logic.segment(volume, adapter="siteB")
        slicer.util.saveNode(mask, "/out/scan01_brain.nrrd")
    """

    def __init__(self, scene: Optional["slicer.vtkMRMLScene"] = None,
                 storeRoot: Optional[Union[str, pathlib.Path]] = None):
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self.storeRoot = pathlib.Path(storeRoot) if storeRoot is not None else None
        self.modelPath: Optional[pathlib.Path] = None  # None: the bundled default model
        self._model = None
        self._modelKey: Optional[str] = None
        self._process: Optional[CliProcess] = None
        self.runningJob: Optional[str] = None  # "adapt", "segment" or "cohort" while a background job runs
        self._tempDir: Optional[pathlib.Path] = None
        self._timer = None
        self._shuttingDown = False
        self.lastCleanup: List[pathlib.Path] = []

    def getParameterNode(self) -> ConvLoRASegParameterNode:
        return ConvLoRASegParameterNode(super().getParameterNode())

    # -- model and store --------------------------------------------------------------------------------

    def setModelPath(self, path: Optional[Union[str, pathlib.Path]]) -> None:
        """Use the model file ``path`` (None or empty: the bundled default model)."""
        self.modelPath = _pathOrNone(path)

    def model(self):
        """The current model (loaded once per path; SHA-256 verified by the library). Imports torch."""
        from ConvLoRASegLib import store

        key = str(self.modelPath or store.default_model_path())
        if self._model is None or self._modelKey != key:
            if self.modelPath is None and not store.default_model_path().is_file():
                raise ConvLoRASegError(f"the bundled model is missing ({store.default_model_path()}); "
                                       "reinstall the extension or choose a model file")
            self._model = store.load_model(self.modelPath)
            self._modelKey = key
        return self._model

    def modelSha256(self) -> str:
        """SHA-256 of the current model's weights: adapters are bound to it."""
        from ConvLoRASegLib import store

        return store.model_sha256(self.model())

    def adapterStore(self):
        """The :class:`ConvLoRASegLib.store.AdapterStore` this logic reads and writes."""
        from ConvLoRASegLib.store import AdapterStore

        return AdapterStore(self.storeRoot)

    def adapters(self) -> list:
        """Adapters of the current model in the store, newest first (``AdapterInfo`` list)."""
        return self.adapterStore().list(self.modelSha256())

    def resolveAdapter(self, adapter: Any):
        """An ``AdapterInfo`` for ``adapter`` (None, an AdapterInfo, a stored name or an adapter file path).

        Raises ConvLoRASegError for an unknown name or an adapter made for another base model.
        """
        from ConvLoRASegLib.store import AdapterInfo, read_adapter_info

        if adapter is None or (isinstance(adapter, str) and not adapter.strip()):
            return None
        if isinstance(adapter, AdapterInfo):
            info = adapter
        elif isinstance(adapter, pathlib.Path) or (isinstance(adapter, str) and os.path.isfile(adapter)):
            info = read_adapter_info(adapter)
        else:
            return self.adapterStore().find(self.modelSha256(), str(adapter))
        self._checkBaseModel(info)
        return info

    def _checkBaseModel(self, info) -> None:
        sha = self.modelSha256()
        if info.base_sha256 != sha:
            raise ConvLoRASegError(f"adapter '{info.name}' was made for another base model "
                                   f"(sha256 {info.base_sha256[:12]}...), not the current one ({sha[:12]}...)")

    def importAdapter(self, path: Union[str, pathlib.Path], name: Optional[str] = None):
        """Copy an adapter file into the store under ``name``; refuses one made for another base model."""
        from ConvLoRASegLib.store import read_adapter_info

        self._checkBaseModel(read_adapter_info(path))
        return self.adapterStore().add(path, name)

    def exportAdapter(self, name: str, dest: Union[str, pathlib.Path], overwrite: bool = False) -> pathlib.Path:
        """Write the stored adapter ``name`` to the file ``dest`` (to share it with another site)."""
        return self.adapterStore().export(self.modelSha256(), name, dest, overwrite=overwrite)

    def renameAdapter(self, name: str, newName: str):
        return self.adapterStore().rename(self.modelSha256(), name, newName)

    def deleteAdapter(self, name: str) -> None:
        self.adapterStore().delete(self.modelSha256(), name)

    # -- geometry: volume node <-> SimpleITK image ------------------------------------------------------

    @staticmethod
    def ijkToWorldMatrix(volumeNode) -> "numpy.ndarray":
        """4x4 IJK -> world RAS of ``volumeNode`` (mm), including a linear parent transform.

        Raises ConvLoRASegError for a non-linear parent transform (harden it first).
        """
        m = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(m)
        ijkToRas = slicer.util.arrayFromVTKMatrix(m)
        parent = volumeNode.GetParentTransformNode()
        if parent is not None:
            if not parent.IsTransformToWorldLinear():
                raise ConvLoRASegError(f"volume '{volumeNode.GetName()}' is under a non-linear transform; harden "
                                       "the transform first (Data module: right-click, Harden transform)")
            toWorld = vtk.vtkMatrix4x4()
            parent.GetMatrixTransformToWorld(toWorld)
            ijkToRas = slicer.util.arrayFromVTKMatrix(toWorld) @ ijkToRas
        return ijkToRas

    @classmethod
    def imageFromVolumeNode(cls, volumeNode):
        """The node's voxels and world geometry as a SimpleITK image (LPS, as the library expects)."""
        import numpy as np
        from ConvLoRASegLib.volumes import image_from_array

        if volumeNode is None or volumeNode.GetImageData() is None:
            raise ConvLoRASegError("the input volume has no image data")
        if volumeNode.GetImageData().GetNumberOfScalarComponents() != 1:
            raise ConvLoRASegError(f"volume '{volumeNode.GetName()}' has several components (colour or vector "
                                   "image); a single-channel T1 volume is needed")
        # float32, as ConvLoRASegLib.volumes.read_image gives for files: the same voxels then give the same
        # mask in Slicer and on the command line (resampling an integer image would round its values).
        array = np.array(slicer.util.arrayFromVolume(volumeNode), dtype=np.float32, copy=True)
        return image_from_array(array, cls.ijkToWorldMatrix(volumeNode))

    def _sceneFor(self, node=None):
        if self._scene is not None:
            return self._scene
        if node is not None and node.GetScene() is not None:
            return node.GetScene()
        return slicer.mrmlScene

    # -- segmenting one volume in-process (batch mode; the GUI uses segmentInBackground) ------------------

    def segment(self, volumeNode, adapter: Any = None, outputNode=None, device: str = "auto",
                postprocess: bool = True, checkAdapter: bool = True):
        """Brain mask of ``volumeNode`` as a labelmap node (1 = brain) with exactly the input's geometry.

        Args:
            volumeNode: ``vtkMRMLScalarVolumeNode`` (any orientation, incl. oblique and flipped axes; a
                linear parent transform is taken into account and copied to the output).
            adapter: None (source model), an adapter name in the store, an adapter file, or an AdapterInfo.
            outputNode: labelmap node to overwrite; None creates "<volume name> brain mask".
            device: "auto", "cpu", "cuda", "cuda:N" or "mps".
            checkAdapter: use the adapter only if it beats the unadapted model on this scan (label-free, as
                ``convlora-seg segment --adapter``); the labelmap's ``ConvLoRASeg.adapterNotUsed`` attribute then
                names an adapter that did not.
        Returns:
            The ``vtkMRMLLabelMapVolumeNode``.
        """
        from ConvLoRASegLib.segment import segment_checked, segment_image
        from ConvLoRASegLib.volumes import array_from_image

        image = self.imageFromVolumeNode(volumeNode)
        info = self.resolveAdapter(adapter)
        refused = ""
        try:
            if info is not None and checkAdapter:
                mask, winner, _ = segment_checked(self.model(), image, info, device=device, postprocess=postprocess)
                refused, info = ("" if winner is not None else info.name), winner
            else:
                mask = segment_image(self.model(), image, adapter=info, device=device, postprocess=postprocess)
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                raise ConvLoRASegError(f"the {device} device ran out of memory while segmenting; choose the CPU "
                                       "or close other programs using the GPU") from None
            raise
        maskArray = array_from_image(mask).astype("uint8", copy=False)
        return self._writeLabelmap(volumeNode, maskArray, outputNode, info, refused)

    def _writeLabelmap(self, volumeNode, maskArray, outputNode, info, refused: str = ""):
        inputShape = tuple(reversed(volumeNode.GetImageData().GetDimensions()))
        if maskArray.shape != inputShape:
            raise RuntimeError(f"mask shape {maskArray.shape} differs from the input's {inputShape}")
        if outputNode is None:
            outputNode = self._sceneFor(volumeNode).AddNewNodeByClass(
                "vtkMRMLLabelMapVolumeNode", f"{volumeNode.GetName()} brain mask")
        slicer.util.updateVolumeFromArray(outputNode, maskArray)
        m = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(m)
        outputNode.SetIJKToRASMatrix(m)
        outputNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        outputNode.SetAttribute(SOURCE_VOLUME_ATTRIBUTE, volumeNode.GetID() or "")
        outputNode.SetAttribute("ConvLoRASeg.adapter", info.name if info is not None else "")
        outputNode.SetAttribute(ADAPTER_NOT_USED_ATTRIBUTE, refused)
        outputNode.SetAttribute("ConvLoRASeg.modelSha256", self.modelSha256())
        if outputNode.GetDisplayNode() is None:
            outputNode.CreateDefaultDisplayNodes()
        return outputNode

    def chooseAdapter(self, volumeNode, device: str = "auto") -> Tuple[Any, Dict[str, float]]:
        """Best adapter for this scan, label-free: (AdapterInfo or None for the source model, scores by name)."""
        from ConvLoRASegLib.segment import choose_adapter

        return choose_adapter(self.model(), self.imageFromVolumeNode(volumeNode), self.adapters(), device=device)

    @staticmethod
    def brainVolumeMl(labelmapNode) -> float:
        """Volume of the voxels > 0 of ``labelmapNode`` in millilitres."""
        import numpy as np

        count = int(np.count_nonzero(slicer.util.arrayFromVolume(labelmapNode)))
        return count * float(np.prod(labelmapNode.GetSpacing())) / 1000.0

    def createSegmentation(self, labelmapNode, segmentationNode=None, show3D: bool = True):
        """A segmentation node with one segment "Brain" (SNOMED CT 12738006) from ``labelmapNode``."""
        scene = self._sceneFor(labelmapNode)
        if segmentationNode is None:
            name = labelmapNode.GetName().replace(" brain mask", "") + " brain"
            segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentationNode.CreateDefaultDisplayNodes()
        segmentation = segmentationNode.GetSegmentation()
        segmentation.RemoveAllSegments()
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmapNode,
                                                                                        segmentationNode):
            raise RuntimeError("importing the labelmap into the segmentation failed")
        if segmentation.GetNumberOfSegments() == 0:
            raise ConvLoRASegError("the brain mask is empty; nothing to put in a segmentation")
        segment = segmentation.GetNthSegment(0)
        segment.SetName("Brain")
        segment.SetColor(*BRAIN_COLOR)
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), BRAIN_TERMINOLOGY)
        if show3D and not segmentationNode.CreateClosedSurfaceRepresentation():
            logging.warning("ConvLoRASeg: could not make the 3D surface of the brain segmentation")
        return segmentationNode

    # -- background process: adapt, segment, cohort segmentation, cancel, teardown --------------------------

    def isRunning(self) -> bool:
        return self._process is not None and self._process.isRunning()

    def isCancelling(self) -> bool:
        return self._process is not None and self._process.cancelling

    def cancel(self) -> None:
        """Ask the background process to stop and return at once; the process tree is killed if it has not
        stopped after a grace period. Nothing partial is left in the store."""
        if self._process is not None:
            self._process.cancel()

    def shutdown(self, graceSeconds: float = 1.0) -> None:
        """Teardown (module reload, Slicer quits): stop the background process tree, the timer, the temp folder.

        Blocks at most about ``graceSeconds`` + 2 s; no ``finished`` callback is called.
        """
        self._shuttingDown = True
        process = self._process
        try:
            if process is not None and process.isRunning():
                process.cancel(graceSeconds=graceSeconds)
                deadline = time.monotonic() + graceSeconds + 2.0
                while process.poll() and time.monotonic() < deadline:
                    time.sleep(0.05)
                if process.isRunning():
                    process.kill()
                    while process.poll() and time.monotonic() < deadline + 2.0:
                        time.sleep(0.05)
        finally:
            self._stopTimer()
            if self._tempDir is not None:
                shutil.rmtree(self._tempDir, ignore_errors=True)
                self._tempDir = None
            self.runningJob = None
            self._shuttingDown = False

    def _targetArguments(self, target: Any, tempDir: pathlib.Path) -> List[str]:
        """CLI arguments for a target cohort: folder, files, volume nodes, or "cc359:<root>:<site>"."""
        if isinstance(target, (str, pathlib.Path)):
            text = str(target)
            if text.startswith("cc359:"):
                return [text]
            if not text.strip() or not os.path.exists(text):
                raise ConvLoRASegError(f"target cohort not found: {text}")
            return [text]
        items = list(target)
        if not items:
            raise ConvLoRASegError("the target cohort is empty")
        arguments = []
        for index, item in enumerate(items):
            if isinstance(item, (str, pathlib.Path)):
                if not os.path.isfile(str(item)):
                    raise ConvLoRASegError(f"target volume not found: {item}")
                arguments.append(str(item))
            else:
                arguments.append(str(self._saveVolumeNode(item, tempDir / f"target_{index:03d}.nrrd")))
        return arguments

    def _saveVolumeNode(self, volumeNode, path: pathlib.Path) -> pathlib.Path:
        """Write a volume node (world geometry) to ``path`` for the background process."""
        import SimpleITK as sitk

        sitk.WriteImage(self.imageFromVolumeNode(volumeNode), str(path), useCompression=False)
        return path

    @staticmethod
    def _isPath(item: Any) -> bool:
        return isinstance(item, (str, pathlib.Path))

    def _checkPairs(self, checkScans: Sequence[Tuple[Any, Any]]) -> List[Tuple[Any, Any]]:
        """The labelled check scans of :meth:`adapt`, checked before anything starts (ConvLoRASegError, one line)."""
        pairs = []
        for index, pair in enumerate(checkScans or (), start=1):
            try:
                image, mask = pair
            except (TypeError, ValueError):
                raise ConvLoRASegError(f"check scan {index}: give a pair (image, mask)") from None
            for role, item in (("image", image), ("mask", mask)):
                if item is None:
                    raise ConvLoRASegError(f"check scan {index}: its {role} is not chosen")
                if self._isPath(item) and (not str(item).strip()
                                           or not os.path.isfile(os.path.expanduser(str(item)))):
                    raise ConvLoRASegError(f"check {role} not found: {item}")
            if not self._isPath(image) and not (hasattr(image, "IsA") and image.IsA("vtkMRMLScalarVolumeNode")):
                raise ConvLoRASegError(f"check scan {index}: the image must be a scalar volume node or a file")
            if not self._isPath(mask) and not (hasattr(mask, "IsA") and (mask.IsA("vtkMRMLLabelMapVolumeNode")
                                                                          or mask.IsA("vtkMRMLSegmentationNode"))):
                raise ConvLoRASegError(f"check scan {index}: the mask must be a labelmap or segmentation node, or a "
                                       "file")
            if self._isPath(image) and not self._isPath(mask) and mask.IsA("vtkMRMLSegmentationNode"):
                raise ConvLoRASegError(f"check scan {index}: a segmentation node as mask needs its image as a volume "
                                       "node (the mask is exported on the image's grid)")
            pairs.append((image, mask))
        return pairs

    def _checkArguments(self, pairs: Sequence[Tuple[Any, Any]], tempDir: pathlib.Path) -> List[str]:
        """``--check IMAGE MASK`` per pair; nodes are written to ``tempDir`` (each pair in its own folder, so the
        check names a scan after its node)."""
        arguments = []
        for index, (image, mask) in enumerate(pairs, start=1):
            folder = tempDir / f"check_{index:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            if self._isPath(image):
                imagePath = os.path.expanduser(str(image))
            else:
                imagePath = str(self._saveVolumeNode(image, folder / f"{_fileStem(image.GetName())}.nrrd"))
            if self._isPath(mask):
                maskPath = os.path.expanduser(str(mask))
            else:
                maskPath = str(self._saveMaskNode(mask, image, folder / f"{_fileStem(mask.GetName())}_mask.nrrd"))
            arguments += ["--check", imagePath, maskPath]
        return arguments

    def _saveMaskNode(self, maskNode, imageNode, path: pathlib.Path) -> pathlib.Path:
        """Write a check mask (labelmap node, or segmentation node exported on ``imageNode``'s grid) as a 0/1
        image with its world geometry."""
        import SimpleITK as sitk

        if maskNode.IsA("vtkMRMLSegmentationNode"):
            labelmap = self._labelmapFromSegmentation(maskNode, imageNode)
            try:
                image = self._maskImage(labelmap, maskNode.GetName())
            finally:
                self._removeTemporaryLabelmap(labelmap)
        else:
            image = self._maskImage(maskNode, maskNode.GetName())
        sitk.WriteImage(image, str(path), useCompression=True)
        return path

    @classmethod
    def _maskImage(cls, labelmapNode, name: str):
        import numpy as np
        from ConvLoRASegLib.volumes import image_from_array

        if labelmapNode.GetImageData() is None:
            raise ConvLoRASegError(f"the check mask '{name}' has no image data")
        array = (slicer.util.arrayFromVolume(labelmapNode) > 0).astype(np.uint8)
        return image_from_array(array, cls.ijkToWorldMatrix(labelmapNode))

    def _labelmapFromSegmentation(self, segmentationNode, referenceVolumeNode):
        """All segments of ``segmentationNode`` in a temporary labelmap node with exactly the geometry (extent and
        parent transform) of ``referenceVolumeNode``, by Slicer's own export (as ``slicer.util
        .arrayFromSegmentBinaryLabelmap`` does); remove it with :meth:`_removeTemporaryLabelmap`."""
        name = segmentationNode.GetName()
        segmentation = segmentationNode.GetSegmentation()
        if segmentation is None or segmentation.GetNumberOfSegments() == 0:
            raise ConvLoRASegError(f"the check mask '{name}' has no segments")
        segmentIds = vtk.vtkStringArray()
        for index in range(segmentation.GetNumberOfSegments()):
            segmentIds.InsertNextValue(segmentation.GetNthSegmentID(index))
        scene = segmentationNode.GetScene() or self._sceneFor(referenceVolumeNode)
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"__{name} check mask__")
        try:
            exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentationNode, segmentIds, labelmap, referenceVolumeNode,
                slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        except Exception:
            self._removeTemporaryLabelmap(labelmap)
            raise
        if not exported or labelmap.GetImageData() is None:
            self._removeTemporaryLabelmap(labelmap)
            raise ConvLoRASegError(f"the segmentation '{name}' could not be exported on the check scan's grid")
        return labelmap

    @staticmethod
    def _removeTemporaryLabelmap(labelmap) -> None:
        scene = labelmap.GetScene()
        if scene is None:
            return
        display = labelmap.GetDisplayNode()
        color = display.GetColorNode() if display is not None else None
        if color is not None and color.GetScene() is scene and color.GetType() == color.User:
            scene.RemoveNode(color)  # the color table the export made for it
        if display is not None:
            scene.RemoveNode(display)
        scene.RemoveNode(labelmap)

    def _storeEnvironment(self) -> Dict[str, str]:
        libraryParent = str(pathlib.Path(sys.modules["ConvLoRASegLib"].__file__).resolve().parent.parent) \
            if "ConvLoRASegLib" in sys.modules else str(_MODULE_DIR)
        extra = {"CONVLORASEG_HOME": str(self.storeRoot)} if self.storeRoot is not None else None
        return childEnvironment(libraryParent, extra)

    def _storeFiles(self) -> set:
        root = self.adapterStore().root
        return {p for p in root.rglob("*") if p.is_file()} if root.is_dir() else set()

    def _modelArguments(self) -> List[str]:
        return ["--model", str(self.modelPath)] if self.modelPath is not None else []

    def adapt(self, target: Any, name: str, method: str = "convlora-adabn",
              progress: Optional[Callable[[Dict[str, Any]], None]] = None, waitForCompletion: bool = True,
              device: str = "auto", epochs: Optional[int] = None, log: Optional[Callable[[str], None]] = None,
              finished: Optional[Callable[[ProcessResult], None]] = None, extraArgs: Sequence[str] = (),
              timeout: Optional[float] = None, checkScans: Sequence[Tuple[Any, Any]] = ()):
        """Learn an adapter ``name`` for the scanner of ``target`` in a background process (no labels needed).

        Args:
            target: a folder of volumes, a list of files, a list of volume nodes (written to a temporary
                folder as .nrrd), or ``"cc359:<root>:<site>"``.
            name: adapter name in the store (letters, digits, space, ``._-``).
            method: "convlora-adabn" (the paper's best), or another method of its Table 1.
            progress: called with every JSON event of the process (``event`` = progress / done / error).
            waitForCompletion: True blocks until done and returns the ``AdapterInfo`` (None if cancelled);
                False returns the running :class:`CliProcess` at once (polled by a QTimer every 100 ms in
                Slicer; call its ``wait()`` or ``poll()`` yourself elsewhere).
            device: "auto", "cpu", "cuda:N" or "mps"; epochs: None for the library's default.
            log: called with the process's other output lines; finished: called with the ProcessResult
                (its ``value`` is the AdapterInfo).
            timeout: seconds before a blocking run is cancelled (None: no limit).
            checkScans: optional labelled scans of the target site, pairs (image, mask): each a file path or a
                node (the image a scalar volume node; the mask a labelmap node on the image's grid, or a
                segmentation node, exported on the image's grid). Every candidate is then checked on them
                (``adapt --check``) and the adapter never ends worse than no adapter there; the ``done`` event's
                ``summary.labelled_check`` and the adapter's ``details["labelled_check"]`` hold the check.
        Raises:
            ConvLoRASegError: bad target, name or check scans, another run in progress, or the process reported an
                error (e.g. a check mask that is not on its image's grid).
        """
        from ConvLoRASegLib.store import check_adapter_name

        name = check_adapter_name(name)
        checks = self._checkPairs(checkScans)  # missing files fail here, before a process or a temp folder
        arguments = ["--name", name, "--json", "--method", method, "--device", device]
        if epochs:
            arguments += ["--epochs", str(int(epochs))]
        arguments += self._modelArguments() + list(extraArgs)
        return self._runBackground("adapt", lambda tempDir: (self._targetArguments(target, tempDir)
                                                             + self._checkArguments(checks, tempDir) + arguments),
                                   progress, log, finished, waitForCompletion, timeout,
                                   lambda result, tempDir: self._adaptResult(result))

    def _adaptResult(self, result: ProcessResult):
        from ConvLoRASegLib.store import read_adapter_info

        adapter = (result.done or {}).get("adapter") or {}
        if not adapter.get("path"):
            raise ConvLoRASegError("the adaptation process finished without naming its adapter file")
        return read_adapter_info(adapter["path"])

    def segmentInBackground(self, volumeNode, adapter: Any = None, outputNode=None, device: str = "auto",
                            postprocess: bool = True, checkAdapter: bool = True,
                            progress: Optional[Callable[[Dict[str, Any]], None]] = None,
                            waitForCompletion: bool = False, log: Optional[Callable[[str], None]] = None,
                            finished: Optional[Callable[[ProcessResult], None]] = None,
                            timeout: Optional[float] = None):
        """:meth:`segment` in a background process (the GUI stays responsive); ``adapter="auto"`` chooses the
        best adapter for this scan there (one pass per adapter); a given adapter is checked against the unadapted
        model on the scan unless ``checkAdapter`` is False (the outcome's ``warnings`` say when it was not used).

        Returns the running CliProcess, or with ``waitForCompletion`` the :class:`SegmentOutcome` (None if
        cancelled); ``finished`` gets the ProcessResult whose ``value`` is the SegmentOutcome.
        """
        if volumeNode is None:
            raise ConvLoRASegError("select an input volume first")
        auto = isinstance(adapter, str) and adapter.strip().lower() == "auto"
        info = None if auto else self.resolveAdapter(adapter)
        self.imageFromVolumeNode(volumeNode)  # bad input (no image, colour volume, ...) fails here, in one line

        def arguments(tempDir: pathlib.Path) -> List[str]:
            source = self._saveVolumeNode(volumeNode, tempDir / "input.nrrd")
            args = [str(source), "-o", str(tempDir / "mask.nrrd"), "--json", "--device", device]
            if auto:
                args += ["--adapter", "auto"]
            elif info is not None:
                args += ["--adapter", str(info.path)]
                if not checkAdapter:
                    args.append("--no-scan-check")
            if not postprocess:
                args.append("--no-postprocess")
            return args + self._modelArguments()

        def onSuccess(result: ProcessResult, tempDir: pathlib.Path) -> SegmentOutcome:
            import SimpleITK as sitk
            from ConvLoRASegLib.volumes import array_from_image

            if volumeNode.GetScene() is None:
                raise ConvLoRASegError("the input volume was removed from the scene while it was segmented")
            outputs = (result.done or {}).get("outputs") or [{}]
            chosen, refused = info, ""
            if auto and outputs[0].get("adapter"):
                chosen = self.adapterStore().find(self.modelSha256(), str(outputs[0]["adapter"]))
            elif info is not None and not outputs[0].get("adapter"):  # the per-scan check kept the source model
                chosen, refused = None, info.name
            target = outputNode if outputNode is not None and outputNode.GetScene() is not None else None
            mask = array_from_image(sitk.ReadImage(str(tempDir / "mask.nrrd"))).astype("uint8", copy=False)
            labelmap = self._writeLabelmap(volumeNode, mask, target, chosen, refused)
            scores = outputs[0].get("adapter_scores")  # the CLI's per-candidate label-free scores
            return SegmentOutcome(labelmap, chosen, dict(scores) if isinstance(scores, dict) else {},
                                  [str(w) for w in outputs[0].get("warnings") or []])

        return self._runBackground("segment", arguments, progress, log, finished, waitForCompletion, timeout,
                                   onSuccess)

    def segmentCohort(self, inputs: Any, outputDir: Union[str, pathlib.Path], adapter: Any = None,
                      device: str = "auto", progress: Optional[Callable[[Dict[str, Any]], None]] = None,
                      waitForCompletion: bool = True, log: Optional[Callable[[str], None]] = None,
                      finished: Optional[Callable[[ProcessResult], None]] = None, timeout: Optional[float] = None):
        """Segment many volumes (folder, files or volume nodes) into ``outputDir`` in a background process.

        ``adapter``: None, a stored name, a file, an AdapterInfo or "auto" (best per scan). Returns the ``done``
        event's dict when ``waitForCompletion`` (None if cancelled), else the CliProcess. The cases, worst first:
        :func:`loadManifest` (``outputDir``).
        """
        if _pathOrNone(outputDir) is None:
            raise ConvLoRASegError("choose the output folder for the masks")
        outputDir = pathlib.Path(outputDir)
        arguments = ["-o", str(outputDir), "--json", "--device", device]
        if isinstance(adapter, str) and adapter.strip().lower() == "auto":
            arguments += ["--adapter", "auto"]
        else:
            info = self.resolveAdapter(adapter)
            if info is not None:
                arguments += ["--adapter", str(info.path)]
        arguments += self._modelArguments()

        def build(tempDir: pathlib.Path) -> List[str]:
            targets = self._targetArguments(inputs, tempDir)
            outputDir.mkdir(parents=True, exist_ok=True)
            return targets + arguments

        return self._runBackground("segment", build, progress, log, finished, waitForCompletion, timeout,
                                   lambda result, tempDir: result.done, job="cohort")

    def loadCase(self, entry: Dict[str, Any]):
        """Load one manifest case into the scene: (volume node of its input, labelmap node of its mask)."""
        scene = self._sceneFor()
        nodes = []
        for key, className in (("input", "vtkMRMLScalarVolumeNode"), ("output", "vtkMRMLLabelMapVolumeNode")):
            path = pathlib.Path(str(entry.get(key) or ""))
            if not str(entry.get(key) or "").strip() or not path.is_file():
                raise ConvLoRASegError(f"the case's {key} file is missing: {path}")
            name = path.name.split(".")[0] + (" brain mask" if key == "output" else "")
            node = scene.AddNewNodeByClass(className, name)
            storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
            storage.SetFileName(str(path))
            if key == "output":
                storage.SetCenterImage(0)
            if not storage.ReadData(node):
                scene.RemoveNode(storage)
                scene.RemoveNode(node)
                for other in nodes:
                    scene.RemoveNode(other)
                raise ConvLoRASegError(f"could not read {path}")
            node.SetAndObserveStorageNodeID(storage.GetID())
            node.CreateDefaultDisplayNodes()
            nodes.append(node)
        return nodes[0], nodes[1]

    def _runBackground(self, command: str, buildArguments: Callable[[pathlib.Path], List[str]], progress, log,
                       finished, waitForCompletion: bool, timeout: Optional[float],
                       onSuccess: Callable[[ProcessResult, pathlib.Path], Any], job: Optional[str] = None):
        if self.isRunning():
            raise ConvLoRASegError("another ConvLoRASeg process is running; wait for it or cancel it")
        tempDir = pathlib.Path(tempfile.mkdtemp(prefix="ConvLoRASeg-"))
        try:
            arguments = buildArguments(tempDir)
        except Exception:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        before = self._storeFiles()

        def onFinished(result: ProcessResult) -> None:
            try:
                self._stopTimer()
                if result.cancelled:
                    self._removeLeftovers(before)
                elif result.ok:
                    try:
                        result.value = onSuccess(result, tempDir)
                    except ConvLoRASegError as exc:
                        result.errorMessage, result.done = str(exc), None
                    except Exception as exc:  # reading the result back failed: one line for the user, log the rest
                        logging.exception("ConvLoRASeg: reading the %s result failed", command)
                        result.errorMessage, result.done = f"reading the result failed: {exc}", None
            finally:
                shutil.rmtree(tempDir, ignore_errors=True)
                self._tempDir = None
                self.runningJob = None
            if finished is not None and not self._shuttingDown:
                finished(result)

        process = CliProcess(libraryCommand(command, *arguments), env=self._storeEnvironment(),
                             onProgress=progress, onLog=log or (lambda line: logging.info("ConvLoRASeg: %s", line)),
                             onFinished=onFinished)
        self._tempDir = tempDir
        self.runningJob = job or command
        try:
            self._process = process.start()
        except OSError as exc:
            shutil.rmtree(tempDir, ignore_errors=True)
            self._tempDir, self.runningJob = None, None
            raise ConvLoRASegError(f"could not start the background process ({exc})") from None
        if not waitForCompletion:
            self._startTimer()
            return process
        result = process.wait(timeout=timeout)
        if result.cancelled:
            return None
        if not result.ok:
            raise ConvLoRASegError(result.errorMessage or f"{command} failed")
        return result.value

    def _removeLeftovers(self, before: set) -> None:
        """After a cancel, delete files that appeared in the store during the run (partial writes)."""
        self.lastCleanup = sorted(self._storeFiles() - before)
        for path in self.lastCleanup:
            logging.warning("ConvLoRASeg: removing %s left by the cancelled run", path)
            path.unlink(missing_ok=True)

    def _startTimer(self) -> None:
        try:
            import qt
        except ImportError:
            return  # no event loop: the caller polls the returned process
        self._stopTimer()
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._poll)
        self._timer.start()

    def _poll(self) -> None:
        if self._process is not None:
            self._process.poll()

    def _stopTimer(self) -> None:
        """Stop the QTimer; it is deleted by Qt later (this may run inside the timer's own timeout slot, where
        dropping the last Python reference would make PythonQt delete it at once)."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.stop()
            timer.deleteLater()


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

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ConvLoRASeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ConvLoRASegLogic()

        self.ui.manifestTableWidget.setColumnCount(len(MANIFEST_COLUMNS))
        self.ui.manifestTableWidget.setHorizontalHeaderLabels(list(MANIFEST_COLUMNS))
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
            self._updateButtons()
        finally:
            self._updatingGui = False

    def _updateButtons(self) -> None:
        p = self._parameterNode
        states = actionButtonStates(self.logic.runningJob if self.logic.isRunning() else None,
                                    self.logic.isCancelling(), bool(p is not None and p.inputVolume))
        for buttonName, (text, enabled) in states.items():
            button = getattr(self.ui, buttonName)
            button.text = text
            button.enabled = enabled

    def onPathEdited(self, parameter: str, path: str) -> None:
        if self._parameterNode is None or self._updatingGui:
            return
        text = str(_pathOrNone(path) or "")
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

    def _prepare(self) -> bool:
        """Install missing dependencies and apply the chosen model; False if that failed."""
        self.logic.setModelPath(self._parameterNode.modelPath)
        return self._run("Installing dependencies", lambda: ensureDependencies() or True) is True

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
        import qt

        table = self.ui.adaptersTableWidget
        table.setRowCount(0)
        try:
            adapters = self.logic.adapters()
        except (ImportError, ConvLoRASegError) as exc:
            self.ui.statusLabel.text = f"Adapters unavailable: {exc}"
            return
        table.setRowCount(len(adapters))
        for row, info in enumerate(adapters):
            agreement = "" if info.agreement is None else f"{info.agreement:.3f}"
            for column, text in enumerate((info.name, info.created[:10], info.method, agreement)):
                table.setItem(row, column, qt.QTableWidgetItem(text))
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
            self._run("Renaming the adapter", lambda: self.logic.renameAdapter(name, newName))
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

    def _startJob(self, what: str, start: Callable[[], Any]) -> None:
        self.ui.logTextEdit.clear()
        self.ui.progressBar.value = 0
        self.ui.progressBar.setFormat("%p%")
        self._run(what, start)
        self._updateButtons()

    def onProcessEvent(self, event: Dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "progress":
            total = int(event.get("total") or 0)
            if total > 0:
                self.ui.progressBar.maximum = total
                self.ui.progressBar.value = int(event.get("step") or 0)
            details = [f"{key} {event[key]:.4g}" if isinstance(event[key], float) else f"{key} {event[key]}"
                       for key in ("volume", "epoch", "loss", "agreement") if event.get(key) is not None]
            self.ui.progressBar.setFormat(f"{event.get('stage', '')} %v/%m " + " ".join(details))
            process = self.logic._process
            self.ui.etaLabel.text = process.eta.text() if process is not None else ""
        elif kind == "error":
            self.ui.logTextEdit.appendPlainText(f"Error: {event.get('message')}")
        self._updateButtons()

    def _jobEnded(self, what: str, result: ProcessResult) -> bool:
        """Common end of a job; True when it succeeded."""
        self.ui.etaLabel.text = ""
        self._updateButtons()
        if result.cancelled:
            self.ui.statusLabel.text = f"{what} cancelled; nothing was saved."
            return False
        if not result.ok:
            logging.error("ConvLoRASeg: %s failed: %s", what, result.errorMessage)
            slicer.util.errorDisplay(f"{what} failed: {result.errorMessage}")
            return False
        return True

    # -- adapt ------------------------------------------------------------------------------------------

    def onAdaptButton(self) -> None:
        if self._cancelIfRunning("adapt") or not self._prepare():
            return
        p = self._parameterNode

        def start():
            target = targetFromParameters(p.targetType, p.cohortFolder, p.cc359Root, p.cc359Site,
                                          self.ui.targetVolumesCheckableComboBox.checkedNodes())
            checkScans = checkScansFromParameters(p.checkScan, p.checkMask)
            return self.logic.adapt(target, p.newAdapterName, method=p.method, device=p.device,
                                    epochs=p.epochs or None, progress=self.onProcessEvent,
                                    log=self.ui.logTextEdit.appendPlainText, finished=self.onAdaptFinished,
                                    waitForCompletion=False, checkScans=checkScans)

        self._startJob("Starting the adaptation", start)

    def onAdaptFinished(self, result: ProcessResult) -> None:
        if self._jobEnded("Adaptation", result):
            text, warn = adaptationMessage(result.done or {})
            self.ui.statusLabel.text = text
            if warn:
                slicer.util.warningDisplay(text)
        self.refreshAdapters()

    # -- segment ----------------------------------------------------------------------------------------

    def onSegmentButton(self) -> None:
        if self._cancelIfRunning("segment") or not self._prepare():
            return
        p = self._parameterNode
        volume = p.inputVolume
        if volume is None:
            slicer.util.errorDisplay("Select an input volume first.")
            return
        output = outputNodeForSegment(volume, p.outputLabelmap, self._autoOutputID)
        adapter = "auto" if p.autoAdapter else (p.selectedAdapter or None)
        if _hasMainWindow():  # GUI: the model runs in the background process, one pass per adapter for "auto"
            self.ui.statusLabel.text = f"Segmenting {volume.GetName()}..."
            self._startJob("Starting the segmentation", lambda: self.logic.segmentInBackground(
                volume, adapter=adapter, outputNode=output, device=p.device, progress=self.onProcessEvent,
                log=self.ui.logTextEdit.appendPlainText, finished=lambda r: self.onSegmentFinished(volume, output, r)))
            return
        outcome = self._run("Segmenting", lambda: self._segmentHere(volume, adapter, output, p.device))
        if outcome is not None:
            self._showSegmentation(volume, output, outcome)

    def _segmentHere(self, volume, adapter, output, device) -> SegmentOutcome:
        from ConvLoRASegLib.segment import adapter_not_used

        scores: Dict[str, float] = {}
        auto = adapter == "auto"
        if auto:
            adapter, scores = self.logic.chooseAdapter(volume, device=device)
        # the automatic choice already compared every adapter with the unadapted model on this scan
        labelmap = self.logic.segment(volume, adapter=adapter, outputNode=output, device=device,
                                      checkAdapter=not auto)
        refused = labelmap.GetAttribute(ADAPTER_NOT_USED_ATTRIBUTE) or ""
        used = None if refused else self.logic.resolveAdapter(adapter)
        return SegmentOutcome(labelmap, used, scores, [adapter_not_used(refused)] if refused else [])

    def onSegmentFinished(self, volume, output, result: ProcessResult) -> None:
        if self._jobEnded("Segmentation", result):
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
            lines.append("Agreement: " + ", ".join(f"{k} {v:.3f}" for k, v in outcome.scores.items()))
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
        if self._cancelIfRunning("cohort") or not self._prepare():
            return
        p = self._parameterNode

        def start():
            inputs = _pathOrNone(p.segmentInputFolder)
            if inputs is None:
                raise ConvLoRASegError("choose the folder of volumes to segment")
            outputDir = _pathOrNone(p.segmentOutputFolder)
            if outputDir is None:
                raise ConvLoRASegError("choose the output folder for the masks")
            adapter = "auto" if p.autoAdapter else (p.selectedAdapter or None)
            return self.logic.segmentCohort(str(inputs), outputDir, adapter=adapter, device=p.device,
                                            progress=self.onProcessEvent, log=self.ui.logTextEdit.appendPlainText,
                                            finished=lambda r: self.onCohortFinished(outputDir, r),
                                            waitForCompletion=False)

        self._startJob("Starting the cohort segmentation", start)

    def onCohortFinished(self, outputDir: pathlib.Path, result: ProcessResult) -> None:
        if self._jobEnded("Cohort segmentation", result):
            self.showManifest(outputDir, fallback=(result.done or {}).get("outputs"))

    def onShowManifestButton(self) -> None:
        outputDir = _pathOrNone(self._parameterNode.segmentOutputFolder if self._parameterNode else "")
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


def _fileStem(name: Optional[str]) -> str:
    """A node name as a safe file name stem."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name or "")).strip("._")[:60]
    return stem or "volume"


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
