"""What the module's GUI shows, decided by plain functions: the widget applies them, tests drive them headless
(which target widgets are enabled, what each run button does, which device stays selected, which labelmap
*Segment* writes into, the status line after an adaptation)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from ConvLoRASegLib.errors import ConvLoRASegError

from .logic import SOURCE_VOLUME_ATTRIBUTE
from .parameters import TargetType, pathOrNone


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
        folder = pathOrNone(cohortFolder)
        if folder is None:
            raise ConvLoRASegError("choose the folder with the target scanner's volumes")
        return str(folder)
    if targetType == TargetType.CC359:
        root = pathOrNone(cc359Root)
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


#: Job -> the label beside its button that says how it went (started, cancelled, failed, the result).
JOB_STATUS_LABELS = {"adapt": "adaptStatusLabel", "segment": "statusLabel", "cohort": "manifestLabel"}
#: Job -> the progress bars that follow it: the one beside its button (Adapt) and the background job panel's.
JOB_PROGRESS_BARS = {"adapt": ("adaptProgressBar", "progressBar"), "segment": ("progressBar",),
                     "cohort": ("progressBar",)}


def actionButtonStates(runningJob: Optional[str], cancelling: bool, hasInputVolume: bool,
                       installingFor: Optional[str] = None) -> Dict[str, Tuple[str, bool]]:
    """Text and enabled state of the three run buttons: each starts its job, or cancels it while it runs.

    One background job at a time: while one runs, the other buttons are disabled. While the dependencies that a
    job waits for are installed (``installingFor``), every button is disabled and that job's says so.
    """
    states = {}
    for button, (job, idleText) in JOB_BUTTONS.items():
        if installingFor is not None:
            states[button] = ("Installing dependencies..." if job == installingFor else idleText, False)
        elif runningJob is None:
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
    path = pathOrNone(modelPath)
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

    The numbers are label-free scores (ESH agreement + gamma consistency, what selects the candidate): the summary's
    ``score_source`` and ``candidates``, the adapter's ``score``.
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
        source = summary.get("score_source")
        source_text = f"{source:.3f}" if isinstance(source, (int, float)) else "?"
        return (f"Adapter '{name}' saved, but adaptation did not beat the unadapted model on the label-free score "
                f"(source {source_text}{best_text}): it changes nothing; segment without it.", True)
    selected = summary.get("selected")
    score = adapter.get("score")
    scoreText = f"{score:.3f}" if isinstance(score, (int, float)) else "?"
    return f"Adapter '{name}' saved (selected: {selected or '?'}, label-free score {scoreText}).", False


def segmentAdapterText(autoAdapter: bool, selectedAdapter: Optional[str]) -> str:
    """What *Segment* (and *Segment cohort*) will use, said in the Segment section itself."""
    if autoAdapter:
        return "Adapter: automatic (the best for each scan, or none where none beats the unadapted model)"
    if selectedAdapter:
        return f"Adapter: {selectedAdapter} (used on a scan only where it beats the unadapted model)"
    return "Adapter: none (the unadapted model); select one under Adapters of this model"


def adapterRowToSelect(names: Sequence[str], selected: Optional[str]) -> Optional[int]:
    """The row of the adapter table to select again after it was refilled: the selected adapter's, or None when
    there is none or it is gone (deleted, renamed elsewhere, another model's)."""
    if not selected:
        return None
    return list(names).index(selected) if selected in names else None


def epochsDefaultText(defaultEpochs: Optional[int], oneScanEpochs: Optional[int] = None) -> Tuple[str, str]:
    """What the epochs field shows at 0 (the library's default) and its tooltip; ``oneScanEpochs``: the fast mode's
    default on one scan, where the library has one."""
    if defaultEpochs is None:
        return "default", "Self-training epochs; 0 runs the library's default."
    if oneScanEpochs is None or oneScanEpochs == defaultEpochs:
        return (f"{defaultEpochs} (default)",
                f"Self-training epochs; 0 runs the library's default, {defaultEpochs} (its fast mode).")
    return (f"{defaultEpochs}, {oneScanEpochs} on one scan (default)",
            f"Self-training epochs; 0 runs the library's default: {defaultEpochs}, or {oneScanEpochs} when adapting "
            "to one scan (its fast mode).")


def installStepText(index: int, count: int, what: str) -> str:
    """The progress text of a dependency installation step."""
    return f"Installing {what} (step {index + 1} of {count})..."
