"""The module's logic: the batch-mode API over MRML nodes (no widget references).

It segments a volume node into a labelmap node with exactly the input's geometry (in-process, or in a background
process), adapts to a target cohort and segments a cohort in a background process, and manages the adapters of
the user store. It works in ``Slicer --no-main-window --python-script`` and in plain Python with the PyPI
``slicer-core`` MRML library.
"""

from __future__ import annotations

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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import vtk

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

# Neither import needs torch: the package's __init__ is lazy, jobs.py and errors.py use the standard library only.
from ConvLoRASegLib.errors import ConvLoRASegError
from ConvLoRASegLib.jobs import CliProcess, ProcessResult, childEnvironment, libraryCommand

from . import MODULE_DIR
from .parameters import ConvLoRASegParameterNode, pathOrNone

# SNOMED CT code for Brain, in Slicer's terminology-entry format (category: Anatomical Structure).
BRAIN_TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list"
                     "~SCT^123037004^Anatomical Structure~SCT^12738006^Brain~^^"
                     "~Anatomic codes - DICOM master list~^^~^^")
BRAIN_COLOR = (0.88, 0.63, 0.65)
# Labelmap attributes written by the logic: which volume a mask was made from, with which adapter and model.
SOURCE_VOLUME_ATTRIBUTE = "ConvLoRASeg.sourceVolumeID"
# ... and the adapter asked for that did not beat the unadapted model on this scan (so it was not used), or "".
ADAPTER_NOT_USED_ATTRIBUTE = "ConvLoRASeg.adapterNotUsed"
# ... and the label-free scores (ESH agreement + gamma consistency) the per-scan check or the automatic choice
# compared on this scan, JSON {"source": s, adapter name: s, ...}, or "" when none were compared.
LABEL_FREE_SCORES_ATTRIBUTE = "ConvLoRASeg.labelFreeScores"


@dataclass
class SegmentOutcome:
    """What a background *Segment* produced: the labelmap, the adapter used and the label-free scores (ESH
    agreement + gamma consistency) of the candidates compared on the scan."""

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

    Example (``Slicer --no-main-window --python-script run.py``; the style of docs/slicer.md)::

        import ConvLoRASeg
        ConvLoRASeg.ensureDependencies(askConfirmation=False)
        logic = ConvLoRASeg.ConvLoRASegLogic()
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
        self.modelPath = pathOrNone(path)

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
                names an adapter that did not, and ``ConvLoRASeg.labelFreeScores`` holds the scores compared
                (:meth:`labelFreeScores`).
        Returns:
            The ``vtkMRMLLabelMapVolumeNode``.
        """
        from ConvLoRASegLib.segment import segment_image
        from ConvLoRASegLib.selection import segment_checked
        from ConvLoRASegLib.volumes import array_from_image

        image = self.imageFromVolumeNode(volumeNode)
        info = self.resolveAdapter(adapter)
        refused, scores = "", {}
        try:
            if info is not None and checkAdapter:
                mask, winner, scores = segment_checked(self.model(), image, info, device=device,
                                                       postprocess=postprocess)
                refused, info = ("" if winner is not None else info.name), winner
            else:
                mask = segment_image(self.model(), image, adapter=info, device=device, postprocess=postprocess)
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                raise ConvLoRASegError(f"the {device} device ran out of memory while segmenting; choose the CPU "
                                       "or close other programs using the GPU") from None
            raise
        maskArray = array_from_image(mask).astype("uint8", copy=False)
        return self._writeLabelmap(volumeNode, maskArray, outputNode, info, refused, scores)

    def _writeLabelmap(self, volumeNode, maskArray, outputNode, info, refused: str = "",
                       scores: Optional[Dict[str, float]] = None):
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
        self.setLabelFreeScores(outputNode, scores)
        outputNode.SetAttribute("ConvLoRASeg.modelSha256", self.modelSha256())
        if outputNode.GetDisplayNode() is None:
            outputNode.CreateDefaultDisplayNodes()
        return outputNode

    @staticmethod
    def setLabelFreeScores(labelmapNode, scores: Optional[Dict[str, float]]) -> None:
        """Record on ``labelmapNode`` the label-free scores compared on its scan (none: "")."""
        numbers = {str(k): round(float(v), 4) for k, v in (scores or {}).items()}
        labelmapNode.SetAttribute(LABEL_FREE_SCORES_ATTRIBUTE, json.dumps(numbers) if numbers else "")

    @staticmethod
    def labelFreeScores(labelmapNode) -> Dict[str, float]:
        """The label-free scores (ESH agreement + gamma consistency) by candidate that the per-scan check or the
        automatic choice compared on the scan of ``labelmapNode``; {} when none were (or it is not our mask)."""
        try:
            scores = json.loads(labelmapNode.GetAttribute(LABEL_FREE_SCORES_ATTRIBUTE) or "{}")
        except ValueError:
            return {}
        if not isinstance(scores, dict):
            return {}
        return {str(k): float(v) for k, v in scores.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def chooseAdapter(self, volumeNode, device: str = "auto") -> Tuple[Any, Dict[str, float]]:
        """Best adapter for this scan, label-free: (AdapterInfo or None for the source model, scores by name)."""
        from ConvLoRASegLib.selection import choose_adapter

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
                imagePath = str(self._saveVolumeNode(image, folder / f"{fileStem(image.GetName())}.nrrd"))
            if self._isPath(mask):
                maskPath = os.path.expanduser(str(mask))
            else:
                maskPath = str(self._saveMaskNode(mask, image, folder / f"{fileStem(mask.GetName())}_mask.nrrd"))
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
            if "ConvLoRASegLib" in sys.modules else str(MODULE_DIR)
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
            scores = outputs[0].get("adapter_scores")  # the CLI's per-candidate label-free scores
            scores = dict(scores) if isinstance(scores, dict) else {}
            labelmap = self._writeLabelmap(volumeNode, mask, target, chosen, refused, scores)
            return SegmentOutcome(labelmap, chosen, scores, [str(w) for w in outputs[0].get("warnings") or []])

        return self._runBackground("segment", arguments, progress, log, finished, waitForCompletion, timeout,
                                   onSuccess)

    def segmentCohort(self, inputs: Any, outputDir: Union[str, pathlib.Path], adapter: Any = None,
                      device: str = "auto", progress: Optional[Callable[[Dict[str, Any]], None]] = None,
                      waitForCompletion: bool = True, log: Optional[Callable[[str], None]] = None,
                      finished: Optional[Callable[[ProcessResult], None]] = None, timeout: Optional[float] = None):
        """Segment many volumes (folder, files or volume nodes) into ``outputDir`` in a background process.

        The process is ``convlora-seg segment``, i.e. the library's one cohort runner,
        :func:`ConvLoRASegLib.batch.segment_cohort` (the next volume read while one is segmented, a manifest row per
        case, a failed case a row while the others go on); this method adds no loop of its own. ``adapter``: None, a stored name, a file, an AdapterInfo or "auto" (best per scan). Returns the ``done``
        event's dict when ``waitForCompletion`` (None if cancelled), else the CliProcess. The cases, worst first:
        :func:`.manifest.loadManifest` (``outputDir``).
        """
        if pathOrNone(outputDir) is None:
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


def fileStem(name: Optional[str]) -> str:
    """A node name as a safe file name stem."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name or "")).strip("._")[:60]
    return stem or "volume"

