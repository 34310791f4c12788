"""ConvLoRASeg: brain masks on T1 MRI that adapt to a new scanner without labels (3D Slicer module).

Three parts, as in Slicer's scripted-module template:

- :class:`ConvLoRASegWidget` is thin: it binds the .ui to :class:`ConvLoRASegParameterNode` (widgets carry a
  ``SlicerParameterName`` property) and calls the logic. No ML code.
- :class:`ConvLoRASegLogic` is the batch-mode API (no widget references): ``segment`` a volume node into a
  labelmap node with exactly the input's geometry, ``adapt`` to a target cohort in a background process,
  manage ``adapters``. It works in ``Slicer --no-main-window --python-script`` and in plain Python with
  the PyPI ``slicer-core`` MRML library.
- :class:`ConvLoRASegTest` runs inside Slicer on SampleData MRHead.

The ML lives in the pure-Python library ``ConvLoRASegLib`` (installed next to this file); torch is imported
only when a model is needed, so the module loads (and the GUI shows) before PyTorch is installed.
"""

from __future__ import annotations

import enum
import logging
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

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

from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode

_MODULE_DIR = pathlib.Path(__file__).resolve().parent


def _ensureLibraryImportable() -> None:
    """Make ``import ConvLoRASegLib`` work: installed next to this file, or one folder up in a source tree."""
    for folder in (_MODULE_DIR, _MODULE_DIR.parent):
        if (folder / "ConvLoRASegLib" / "__init__.py").is_file():
            if str(folder) not in sys.path:
                sys.path.insert(0, str(folder))
            return


_ensureLibraryImportable()

from ConvLoRASegLib.jobs import CliProcess, ProcessResult, childEnvironment, libraryCommand  # noqa: E402


def _loadErrorsModuleAlone() -> type:
    import importlib.util

    for folder in (_MODULE_DIR, _MODULE_DIR.parent):
        path = folder / "ConvLoRASegLib" / "errors.py"
        if path.is_file():
            spec = importlib.util.spec_from_file_location("ConvLoRASegLib.errors", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules["ConvLoRASegLib.errors"] = module
            spec.loader.exec_module(module)
            return module.ConvLoRASegError
    raise ImportError("ConvLoRASegLib is not installed next to the ConvLoRASeg module")


try:
    from ConvLoRASegLib.errors import ConvLoRASegError  # noqa: E402
except ImportError:  # the package's __init__ needs torch, which PyTorchUtils installs later
    ConvLoRASegError = getattr(sys.modules.get("ConvLoRASegLib.errors"), "ConvLoRASegError", None) \
        or _loadErrorsModuleAlone()

# Same names as ConvLoRASegLib.cohorts (CC359 domains) and ConvLoRASegLib.selftrain.METHODS (kept literal so the
# module loads without torch; Testing/test_slicer_logic.py checks they agree).
CC359_SITES = ("ge15", "ge3", "philips15", "philips3", "siemens15", "siemens3")
METHODS = ("convlora-adabn", "adabn", "udas", "udas-convlora", "self-training")
# Installed with pip when missing; Slicer's own numpy and SimpleITK are never replaced, torch comes
# from the PyTorch extension.
PIP_REQUIREMENTS = (("safetensors", "safetensors>=0.4"), ("scipy", "scipy>=1.9"), ("tqdm", "tqdm>=4.60"))
NEVER_REPLACE = ("numpy", "SimpleITK", "torch")
TORCH_REQUIREMENT = ">=2.1"
# SNOMED CT code for Brain, in Slicer's terminology-entry format (category: Anatomical Structure).
BRAIN_TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list"
                     "~SCT^123037004^Anatomical Structure~SCT^12738006^Brain~^^"
                     "~Anatomic codes - DICOM master list~^^~^^")
BRAIN_COLOR = (0.88, 0.63, 0.65)


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


@parameterNodeWrapper
class ConvLoRASegParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    modelPath: pathlib.Path
    device: Annotated[str, Default("auto")]
    targetType: TargetType
    cohortFolder: pathlib.Path
    cc359Root: pathlib.Path
    cc359Site: Annotated[str, Choice(list(CC359_SITES)), Default("ge15")]
    newAdapterName: str
    method: Annotated[str, Choice(list(METHODS)), Default("convlora-adabn")]
    epochs: Annotated[int, WithinRange(0, 1000), Default(0)]
    selectedAdapter: str
    autoAdapter: bool
    outputLabelmap: vtkMRMLLabelMapVolumeNode
    createSegmentation: bool
    show3D: Annotated[bool, Default(True)]


def _pathOrNone(path: Optional[Union[str, pathlib.Path]]) -> Optional[pathlib.Path]:
    """A parameter-node path, or None when it is empty ('' or '.')."""
    if path is None or str(path).strip() in ("", "."):
        return None
    return pathlib.Path(path)


#
# Dependencies
#


def ensureDependencies(askConfirmation: Optional[bool] = None) -> None:
    """Install what ConvLoRASegLib needs and Slicer lacks; raise ConvLoRASegError with a clear line if it fails.

    torch comes from the PyTorch extension (``PyTorchUtils``), which picks the build for the GPU and asks
    before downloading; the question is skipped when Slicer runs tests or without a main window (batch
    mode). Other packages go through ``slicer.pydeps.pip_ensure`` (Slicer >= 5.11; ``slicer.packaging`` where
    that is its name) or ``slicer.util.pip_install``; numpy and SimpleITK are never replaced.
    """
    import importlib.util

    if askConfirmation is None:
        askConfirmation = not _isBatchOrTesting()
    if importlib.util.find_spec("torch") is None:
        try:
            import PyTorchUtils
        except ImportError:
            raise ConvLoRASegError("PyTorch is needed: install the 'PyTorch' extension from the Extensions Manager, "
                                   "restart Slicer and try again") from None
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation,
                                                             torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            raise ConvLoRASegError("PyTorch was not installed (cancelled or failed); see the Python console")
    missing = [req for importName, req in PIP_REQUIREMENTS if importlib.util.find_spec(importName) is None]
    if not missing:
        return
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            f"ConvLoRASeg needs these Python packages: {', '.join(missing)}. Install them now?"):
        raise ConvLoRASegError(f"missing Python packages: {', '.join(missing)}")
    try:
        _pipEnsure(missing)
    except Exception as exc:  # pip's own errors are many types; users need one line
        raise ConvLoRASegError(f"installing {', '.join(missing)} failed ({exc}); check the network and the "
                               "Python console") from None


def _pipEnsure(requirements: Sequence[str]) -> None:
    pydeps = getattr(slicer, "pydeps", None) or getattr(slicer, "packaging", None)
    if pydeps is None:
        for name in ("slicer.pydeps", "slicer.packaging"):
            try:
                pydeps = __import__(name, fromlist=["pip_ensure"])
                break
            except ImportError:
                pass
    if pydeps is not None and hasattr(pydeps, "pip_ensure"):
        from packaging.requirements import Requirement

        pydeps.pip_ensure([Requirement(r) for r in requirements], skip_packages=list(NEVER_REPLACE),
                          requester="ConvLoRASeg")
    else:
        slicer.util.pip_install(" ".join(requirements))


def _isBatchOrTesting() -> bool:
    app = getattr(slicer, "app", None)
    if app is None:
        return True
    try:
        return bool(app.testingEnabled()) or bool(app.commandOptions().noMainWindow)
    except AttributeError:
        return True


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
        self._timer = None
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

    # -- segmenting one volume (in-process; seconds) ----------------------------------------------------

    def segment(self, volumeNode, adapter: Any = None, outputNode=None, device: str = "auto",
                postprocess: bool = True):
        """Brain mask of ``volumeNode`` as a labelmap node (1 = brain) with exactly the input's geometry.

        Args:
            volumeNode: ``vtkMRMLScalarVolumeNode`` (any orientation, incl. oblique and flipped axes; a
                linear parent transform is taken into account and copied to the output).
            adapter: None (source model), an adapter name in the store, an adapter file, or an AdapterInfo.
            outputNode: labelmap node to overwrite; None creates "<volume name> brain mask".
            device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        Returns:
            The ``vtkMRMLLabelMapVolumeNode``.
        """
        from ConvLoRASegLib.segment import segment_image
        from ConvLoRASegLib.volumes import array_from_image

        image = self.imageFromVolumeNode(volumeNode)
        info = self.resolveAdapter(adapter)
        try:
            mask = segment_image(self.model(), image, adapter=info, device=device, postprocess=postprocess)
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                raise ConvLoRASegError(f"the {device} device ran out of memory while segmenting; choose the CPU "
                                       "or close other programs using the GPU") from None
            raise
        maskArray = array_from_image(mask).astype("uint8", copy=False)
        return self._writeLabelmap(volumeNode, maskArray, outputNode, info)

    def _writeLabelmap(self, volumeNode, maskArray, outputNode, info):
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
        outputNode.SetAttribute("ConvLoRASeg.adapter", info.name if info is not None else "")
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

    # -- background process: adapt, cohort segmentation, cancel -----------------------------------------

    def isRunning(self) -> bool:
        return self._process is not None and self._process.isRunning()

    def cancel(self) -> None:
        """Stop the running background process (and its children); nothing partial is left in the store."""
        if self._process is not None:
            self._process.cancel()

    def _targetArguments(self, target: Any, tempDir: pathlib.Path) -> List[str]:
        """CLI arguments for a target cohort: folder, files, volume nodes, or "cc359:<root>:<site>"."""
        if isinstance(target, (str, pathlib.Path)):
            text = str(target)
            if text.startswith("cc359:"):
                return [text]
            if not os.path.exists(text):
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

    def _storeEnvironment(self) -> Dict[str, str]:
        libraryParent = str(pathlib.Path(sys.modules["ConvLoRASegLib"].__file__).resolve().parent.parent) \
            if "ConvLoRASegLib" in sys.modules else str(_MODULE_DIR)
        extra = {"CONVLORASEG_HOME": str(self.storeRoot)} if self.storeRoot is not None else None
        return childEnvironment(libraryParent, extra)

    def _storeFiles(self) -> set:
        root = self.adapterStore().root
        return {p for p in root.rglob("*") if p.is_file()} if root.is_dir() else set()

    def adapt(self, target: Any, name: str, method: str = "convlora-adabn",
              progress: Optional[Callable[[Dict[str, Any]], None]] = None, waitForCompletion: bool = True,
              device: str = "auto", epochs: Optional[int] = None, log: Optional[Callable[[str], None]] = None,
              finished: Optional[Callable[[ProcessResult], None]] = None, extraArgs: Sequence[str] = (),
              timeout: Optional[float] = None):
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
            log: called with the process's other output lines; finished: called with the ProcessResult.
            timeout: seconds before a blocking run is cancelled (None: no limit).
        Raises:
            ConvLoRASegError: bad target or name, another run in progress, or the process reported an error.
        """
        from ConvLoRASegLib.store import check_adapter_name

        name = check_adapter_name(name)
        arguments = ["--name", name, "--json", "--method", method, "--device", device]
        if epochs:
            arguments += ["--epochs", str(int(epochs))]
        if self.modelPath is not None:
            arguments += ["--model", str(self.modelPath)]
        return self._runBackground("adapt", target, arguments + list(extraArgs), progress, log, finished,
                                   waitForCompletion, timeout, self._adaptResult)

    def _adaptResult(self, result: ProcessResult):
        from ConvLoRASegLib.store import read_adapter_info

        adapter = (result.done or {}).get("adapter") or {}
        if not adapter.get("path"):
            raise ConvLoRASegError("the adaptation process finished without naming its adapter file")
        return read_adapter_info(adapter["path"])

    def segmentCohort(self, inputs: Any, outputDir: Union[str, pathlib.Path], adapter: Any = None,
                      device: str = "auto", progress: Optional[Callable[[Dict[str, Any]], None]] = None,
                      waitForCompletion: bool = True, log: Optional[Callable[[str], None]] = None,
                      finished: Optional[Callable[[ProcessResult], None]] = None, timeout: Optional[float] = None):
        """Segment many volumes (folder, files or volume nodes) into ``outputDir`` in a background process.

        Returns the ``done`` event's dict when ``waitForCompletion`` (None if cancelled), else the CliProcess.
        """
        outputDir = pathlib.Path(outputDir)
        outputDir.mkdir(parents=True, exist_ok=True)
        arguments = ["-o", str(outputDir), "--json", "--device", device]
        info = self.resolveAdapter(adapter)
        if info is not None:
            arguments += ["--adapter", str(info.path)]
        if self.modelPath is not None:
            arguments += ["--model", str(self.modelPath)]
        return self._runBackground("segment", inputs, arguments, progress, log, finished, waitForCompletion,
                                   timeout, lambda result: result.done)

    def _runBackground(self, command: str, target: Any, arguments: List[str], progress, log, finished,
                       waitForCompletion: bool, timeout: Optional[float], onSuccess: Callable[[ProcessResult], Any]):
        if self.isRunning():
            raise ConvLoRASegError("another ConvLoRASeg process is running; wait for it or cancel it")
        tempDir = pathlib.Path(tempfile.mkdtemp(prefix="ConvLoRASeg-"))
        try:
            targetArguments = self._targetArguments(target, tempDir)
        except Exception:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        before = self._storeFiles()
        outcome: Dict[str, Any] = {}

        def onFinished(result: ProcessResult) -> None:
            shutil.rmtree(tempDir, ignore_errors=True)
            self._stopTimer()
            if result.cancelled:
                self._removeLeftovers(before)
            if finished:
                finished(result)

        process = CliProcess(libraryCommand(command, *targetArguments, *arguments), env=self._storeEnvironment(),
                             onProgress=progress, onLog=log or (lambda line: logging.info("ConvLoRASeg: %s", line)),
                             onFinished=onFinished)
        self._process = process.start()
        if not waitForCompletion:
            self._startTimer()
            return process
        result = process.wait(timeout=timeout)
        if result.cancelled:
            return None
        if not result.ok:
            raise ConvLoRASegError(result.errorMessage or f"{command} failed")
        return onSuccess(result)

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
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._poll)
        self._timer.start()

    def _poll(self) -> None:
        if self._process is not None:
            self._process.poll()

    def _stopTimer(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None


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

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ConvLoRASeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ConvLoRASegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.adaptButton.connect("clicked(bool)", self.onAdaptButton)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.refreshAdaptersButton.connect("clicked(bool)", self.refreshAdapters)
        self.ui.renameAdapterButton.connect("clicked(bool)", self.onRenameAdapter)
        self.ui.deleteAdapterButton.connect("clicked(bool)", self.onDeleteAdapter)
        self.ui.importAdapterButton.connect("clicked(bool)", self.onImportAdapter)
        self.ui.exportAdapterButton.connect("clicked(bool)", self.onExportAdapter)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.adaptersTableWidget.connect("itemSelectionChanged()", self.onAdapterSelectionChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.targetTypeComboBox.connect("currentIndexChanged(int)", self.updateTargetWidgets)

        self.initializeParameterNode()
        self.ui.deviceComboBox.addItem("auto", "auto")

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.refreshDevices()
        self.refreshAdapters()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
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
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.updateTargetWidgets()

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

    def updateTargetWidgets(self, *args) -> None:
        if not self._parameterNode:
            return
        kind = self._parameterNode.targetType
        self.ui.cohortFolderPathLineEdit.setEnabled(kind == TargetType.FOLDER)
        self.ui.targetVolumesCheckableComboBox.setEnabled(kind == TargetType.SCENE)
        self.ui.cc359RootPathLineEdit.setEnabled(kind == TargetType.CC359)
        self.ui.cc359SiteComboBox.setEnabled(kind == TargetType.CC359)

    def refreshDevices(self) -> None:
        """Fill the device list with what torch detects (auto first); show the detected devices."""
        try:
            from ConvLoRASegLib.segment import available_devices

            devices = available_devices()
        except ImportError:
            self.ui.deviceInfoLabel.text = "Detected: (PyTorch not installed yet)"
            return
        current = self._parameterNode.device if self._parameterNode else "auto"
        self.ui.deviceComboBox.blockSignals(True)
        self.ui.deviceComboBox.clear()
        self.ui.deviceComboBox.addItem("auto", "auto")
        for spec, description in devices:
            self.ui.deviceComboBox.addItem(f"{spec}: {description}", spec)
        index = max(0, self.ui.deviceComboBox.findData(current))
        self.ui.deviceComboBox.setCurrentIndex(index)
        self.ui.deviceComboBox.blockSignals(False)
        self.ui.deviceInfoLabel.text = "Detected: " + "; ".join(description for _, description in devices)

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index) or "auto"

    def onModelPathChanged(self, path: str) -> None:
        self.logic.setModelPath(path)
        self.ui.modelInfoLabel.text = f"Model: {path}" if _pathOrNone(path) else "Model: bundled default"
        self.refreshAdapters()

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

    # -- adapt ------------------------------------------------------------------------------------------

    def _target(self) -> Any:
        p = self._parameterNode
        if p.targetType == TargetType.FOLDER:
            return str(p.cohortFolder)
        if p.targetType == TargetType.CC359:
            return f"cc359:{p.cc359Root}:{p.cc359Site}"
        return list(self.ui.targetVolumesCheckableComboBox.checkedNodes())

    def onAdaptButton(self) -> None:
        if self.logic.isRunning():
            self.ui.adaptButton.text = "Cancelling..."
            self.logic.cancel()
            return
        if not self._prepare():
            return
        p = self._parameterNode
        self.ui.logTextEdit.clear()
        self.ui.adaptProgressBar.value = 0
        process = self._run("Starting the adaptation", lambda: self.logic.adapt(
            self._target(), p.newAdapterName, method=p.method, device=p.device, epochs=p.epochs or None,
            progress=self.onProcessEvent, log=self.ui.logTextEdit.appendPlainText,
            finished=self.onAdaptFinished, waitForCompletion=False))
        if process is not None:
            self.ui.adaptButton.text = "Cancel"

    def onProcessEvent(self, event: Dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "progress":
            total = int(event.get("total") or 0)
            if total > 0:
                self.ui.adaptProgressBar.maximum = total
                self.ui.adaptProgressBar.value = int(event.get("step") or 0)
            details = [f"{key} {event[key]:.4g}" if isinstance(event[key], float) else f"{key} {event[key]}"
                       for key in ("epoch", "loss", "agreement") if event.get(key) is not None]
            self.ui.adaptProgressBar.setFormat(f"{event.get('stage', '')} %v/%m " + " ".join(details))
            process = self.logic._process
            self.ui.etaLabel.text = process.eta.text() if process is not None else ""
        elif kind == "error":
            self.ui.logTextEdit.appendPlainText(f"Error: {event.get('message')}")

    def onAdaptFinished(self, result: ProcessResult) -> None:
        self.ui.adaptButton.text = "Adapt"
        self.ui.etaLabel.text = ""
        if result.cancelled:
            self.ui.statusLabel.text = "Adaptation cancelled; nothing was saved."
        elif result.ok:
            adapter = result.done.get("adapter", {})
            self.ui.statusLabel.text = f"Adapter '{adapter.get('name')}' saved (agreement {adapter.get('agreement')})."
        else:
            logging.error("ConvLoRASeg: adaptation failed: %s", result.errorMessage)
            slicer.util.errorDisplay(f"Adaptation failed: {result.errorMessage}")
        self.refreshAdapters()

    # -- segment ----------------------------------------------------------------------------------------

    def onSegmentButton(self) -> None:
        if not self._prepare():
            return
        p = self._parameterNode
        volume = p.inputVolume
        if volume is None:
            slicer.util.errorDisplay("Select an input volume first.")
            return
        adapter = p.selectedAdapter or None
        if p.autoAdapter:
            chosen = self._run("Choosing the adapter", lambda: self.logic.chooseAdapter(volume, device=p.device))
            if chosen is None:
                return
            adapter, scores = chosen
            self.ui.statusLabel.text = "Agreement: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
        labelmap = self._run("Segmenting", lambda: self.logic.segment(volume, adapter=adapter,
                                                                      outputNode=p.outputLabelmap, device=p.device))
        if labelmap is None:
            return
        p.outputLabelmap = labelmap
        slicer.util.setSliceViewerLayers(background=volume, label=labelmap)
        volumeMl = self.logic.brainVolumeMl(labelmap)
        adapterName = getattr(adapter, "name", adapter) or "none (source model)"
        self.ui.statusLabel.text = (self.ui.statusLabel.text + "\n" if p.autoAdapter else "") + \
            f"Brain volume {volumeMl:.0f} ml; adapter: {adapterName}."
        if p.createSegmentation:
            self._run("Creating the segmentation",
                      lambda: self.logic.createSegmentation(labelmap, show3D=p.show3D))
            if p.show3D:
                slicer.util.resetThreeDViews()


def _traceback() -> str:
    import traceback

    return traceback.format_exc()


#
# ConvLoRASegTest
#


class ConvLoRASegTest(ScriptedLoadableModuleTest):
    """In-Slicer test on SampleData MRHead: segment (plausible brain volume) and a short CPU adaptation."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_SegmentMRHead()
        self.setUp()
        self.test_AdaptOnSmallCohort()

    def _mrHead(self):
        import SampleData

        return SampleData.SampleDataLogic().downloadMRHead()

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
