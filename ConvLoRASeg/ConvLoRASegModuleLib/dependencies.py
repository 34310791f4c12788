"""What the module needs besides Slicer: torch (from the PyTorch extension) and a few pip packages.

torch is imported only when a model is needed, so the module loads (and the GUI shows) before PyTorch is
installed; :func:`ensureDependencies` installs what is missing when *Adapt* or *Segment* first needs it.
"""

from __future__ import annotations

import importlib
import sys
from typing import Mapping, Optional, Sequence, Tuple

import slicer

from ConvLoRASegLib import TORCH_MIN
from ConvLoRASegLib.errors import ConvLoRASegError

# Installed with pip when missing (import name, requirement). None of them pulls torch; Slicer's own numpy and
# SimpleITK are not listed, so pip never replaces them; torch comes from the PyTorch extension.
PIP_REQUIREMENTS = (("safetensors", "safetensors>=0.4"), ("scipy", "scipy>=1.9"), ("tqdm", "tqdm>=4.60"))
TORCH_REQUIREMENT = f">={TORCH_MIN}"
# CONVLORASEG_SELFTEST=full runs the self-test's heavy part (installs torch if needed; minutes on a CPU),
# =light never runs it; unset: only where torch is already installed.
SELFTEST_ENV = "CONVLORASEG_SELFTEST"


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
        askConfirmation = not isBatchOrTesting()
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


def isBatchOrTesting() -> bool:
    app = getattr(slicer, "app", None)
    if app is None:
        return True
    try:
        return bool(app.testingEnabled()) or bool(app.commandOptions().noMainWindow)
    except AttributeError:
        return True


def hasMainWindow() -> bool:
    """True in the GUI application (long work then goes to a background process), False in batch mode."""
    app = getattr(slicer, "app", None)
    if app is None:
        return False
    try:
        return not bool(app.commandOptions().noMainWindow)
    except AttributeError:
        return False

