"""What the module needs besides Slicer: torch and a few pip packages, installed without freezing Slicer.

torch is imported only when a model is needed, so the module loads (and the GUI shows) before PyTorch is
installed. :func:`installPlan` lists what is missing as :class:`InstallStep` s (a pip install of the small
packages, then PyTorch through light-the-torch, the installer the PyTorch extension's PyTorchUtils uses: it picks
the build for this computer's GPU). :class:`DependencyInstaller` runs the steps one after the other, each in a
background process (``PythonSlicer -m pip ...``, followed with ConvLoRASegLib's job runner as *Adapt* is), and
reports each step and every output line to callbacks: the widget shows them beside the button that asked while
Slicer stays responsive (a first PyTorch install takes minutes). :func:`ensureDependencies` is the same for batch
mode and the self-test: it waits.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import slicer

from ConvLoRASegLib import TORCH_MIN
from ConvLoRASegLib.errors import ConvLoRASegError
from ConvLoRASegLib.jobs import CliProcess, ProcessResult, pythonExecutable

# Installed with pip when missing (import name, requirement). None of them pulls torch; Slicer's own numpy and
# SimpleITK are not listed, so pip never replaces them.
PIP_REQUIREMENTS = (("safetensors", "safetensors>=0.4"), ("scipy", "scipy>=1.9"), ("tqdm", "tqdm>=4.60"))
TORCH_REQUIREMENT = f">={TORCH_MIN}"
# What PyTorchUtils installs before it runs light-the-torch (SlicerPyTorch, PyTorchUtils._installLightTheTorch).
LIGHT_THE_TORCH_REQUIREMENT = "light-the-torch>=0.5"
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

def _satisfied(importName: str, requirement: str) -> bool:
    """Is ``requirement`` (e.g. "scipy>=1.9") installed? Importable, and of a version it accepts where the
    version can be read."""
    if importlib.util.find_spec(importName) is None:
        return False
    try:
        from packaging.requirements import Requirement

        wanted = Requirement(requirement)
        return wanted.specifier.contains(importlib.metadata.version(wanted.name), prereleases=True)
    except Exception:  # packaging missing, or no metadata: importable is enough
        return True


def missingPipRequirements() -> List[str]:
    """The pip requirements of :data:`PIP_REQUIREMENTS` that are not installed (or too old)."""
    return [requirement for importName, requirement in PIP_REQUIREMENTS if not _satisfied(importName, requirement)]


def pythonModuleCommand(module: str, arguments: Sequence[str]) -> List[str]:
    """``PythonSlicer -m module arguments...`` (``sys.executable`` outside Slicer), as Slicer's
    ``slicer.util.executePythonModule`` runs pip."""
    return [pythonExecutable(), "-m", module, *arguments]


@dataclass
class InstallStep:
    """One background install: what it installs, in words for the user, and the command that does it."""

    what: str
    command: List[str]
    #: the requirements it installs
    requirements: List[str] = field(default_factory=list)
    #: it installs PyTorch (checked afterwards, and it may need a restart)
    torch: bool = False


@dataclass
class InstallPlan:
    """What is missing, as steps to run in order; empty when nothing is."""

    steps: List[InstallStep] = field(default_factory=list)
    #: torch as found before installing: None (absent) or its version
    torchInstalled: Optional[str] = None
    #: an old torch is already imported: the upgraded one is used only after Slicer restarts
    restartNeeded: bool = False

    def __bool__(self) -> bool:
        return bool(self.steps)

    def question(self) -> str:
        """The one confirmation asked before anything is installed."""
        lines = [f"- {step.what}" for step in self.steps]
        restart = " Slicer must be restarted afterwards (the old PyTorch is loaded)." if self.restartNeeded else ""
        return ("ConvLoRASeg needs to install:\n" + "\n".join(lines) + "\n\nThey are installed in the background "
                f"(progress beside the button; PyTorch can take several minutes); Slicer stays usable.{restart} "
                "Install them now?")


def installPlan() -> InstallPlan:
    """What ConvLoRASegLib needs and this Python lacks, as steps: first the pip packages (and light-the-torch when
    PyTorch is to be installed), then PyTorch through light-the-torch (as PyTorchUtils does: the build for this
    computer's GPU, else the CPU build)."""
    installed = installedTorchVersion()
    problem = torchVersionProblem(installed)
    plan = InstallPlan(torchInstalled=installed, restartNeeded=problem == "old" and "torch" in sys.modules)
    requirements = missingPipRequirements()
    if problem is not None and importlib.util.find_spec("light_the_torch") is None:
        requirements.append(LIGHT_THE_TORCH_REQUIREMENT)
    if requirements:
        names = ", ".join(r.split(">")[0].split("=")[0].split("<")[0] for r in requirements)
        plan.steps.append(InstallStep(f"Python packages: {names}",
                                      pythonModuleCommand("pip", ["install", *requirements]), requirements))
    if problem is not None:
        what = (f"PyTorch {TORCH_REQUIREMENT}" if problem == "missing"
                else f"PyTorch {TORCH_REQUIREMENT} (replaces the installed {installed})")
        torch = f"torch{TORCH_REQUIREMENT}"
        plan.steps.append(InstallStep(f"{what}, the build for this computer's GPU (light-the-torch)",
                                      pythonModuleCommand("light_the_torch", ["install", torch]), [torch], torch=True))
    return plan


#: onStep(index, count, step): step ``index`` (0-based) of ``count`` starts
StepCallback = Callable[[int, int, InstallStep], None]


class DependencyInstaller:
    """Runs the steps of an :class:`InstallPlan` one after the other, each in a background process; never blocks.

    :meth:`start` returns at once. Call :meth:`poll` often (the widget: a ``qt.QTimer``; batch mode: :meth:`wait`):
    it hands the processes' output lines to ``onLog``, starts the next step when one ends and calls ``onFinished``
    once with None (all installed) or a one-line error (the first step that failed; later steps do not run).

    Args:
        plan: what to install.
        onStep: called as each step starts (index, count, step).
        onLog: called with every output line of the steps.
        onFinished: called once at the end with None or the error line.
    """

    def __init__(self, plan: InstallPlan, onStep: Optional[StepCallback] = None,
                 onLog: Optional[Callable[[str], None]] = None,
                 onFinished: Optional[Callable[[Optional[str]], None]] = None):
        self.plan = plan
        self.onStep, self.onLog, self.onFinished = onStep, onLog, onFinished
        self.index = -1
        self.lastLine = ""
        self.finished = False
        self.error: Optional[str] = None
        self._process: Optional[CliProcess] = None

    @property
    def step(self) -> Optional[InstallStep]:
        """The step running now (None before start and after the end)."""
        return self.plan.steps[self.index] if 0 <= self.index < len(self.plan.steps) and not self.finished else None

    def start(self) -> "DependencyInstaller":
        """Start the first step (or finish at once when there is none); returns self."""
        self._next()
        return self

    def isRunning(self) -> bool:
        return self.index >= 0 and not self.finished

    def poll(self) -> bool:
        """Handle the output so far, go on to the next step when one ended; True while not finished."""
        if self._process is not None:
            self._process.poll()
        return self.isRunning()

    def wait(self, interval: float = 0.1) -> Optional[str]:
        """Poll until finished (batch mode); returns :attr:`error`."""
        import time

        if self.index < 0:
            self.start()
        while self.poll():
            time.sleep(interval)
        return self.error

    def kill(self) -> None:
        """Teardown (Slicer quits, the module reloads): stop the running step's process tree; no callback."""
        process, self._process = self._process, None
        self.finished = True
        if process is not None:
            process.kill()

    def _next(self) -> None:
        self.index += 1
        if self.index >= len(self.plan.steps):
            self._finish(self._checkInstalled())
            return
        step = self.plan.steps[self.index]
        if self.onStep is not None:
            self.onStep(self.index, len(self.plan.steps), step)
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # the lines as they come, not at the end
        self._process = CliProcess(step.command, env=env, onLog=self._line, onFinished=self._stepEnded)
        try:
            self._process.start()
        except OSError as exc:
            self._process = None
            self._finish(f"could not start the installation of {step.what} ({exc})")

    def _line(self, line: str) -> None:
        self.lastLine = line
        if self.onLog is not None:
            self.onLog(line)

    def _stepEnded(self, result: ProcessResult) -> None:
        self._process = None
        if self.finished:
            return
        if result.returnCode != 0:
            step = self.plan.steps[self.index]
            tail = [line for line in result.log if line.strip()][-1:]
            detail = f": {tail[0].strip()}" if tail else ""
            self._finish(f"installing {step.what} failed (exit code {result.returnCode}{detail}); check the network "
                         "and the log")
            return
        self._next()

    def _checkInstalled(self) -> Optional[str]:
        """After the last step: is everything there now? (A pip that exits 0 may still have installed nothing.)"""
        importlib.invalidate_caches()
        missing = missingPipRequirements()
        if missing:
            return f"still missing after the installation: {', '.join(missing)}; see the log"
        if any(step.torch for step in self.plan.steps):
            if self.plan.restartNeeded:
                return f"PyTorch was upgraded (the old {self.plan.torchInstalled} is still loaded): restart Slicer"
            if torchVersionProblem(installedTorchVersion()) is not None:
                return f"PyTorch {TORCH_REQUIREMENT} is still not installed; see the log"
        return None

    def _finish(self, error: Optional[str]) -> None:
        if self.finished:
            return
        self.finished, self.error = True, error
        if self.onFinished is not None:
            self.onFinished(error)


def ensureDependencies(askConfirmation: Optional[bool] = None) -> None:
    """Install what ConvLoRASegLib needs and Slicer lacks, and wait (batch mode, the self-test); raise
    ConvLoRASegError with one clear line if it fails or the user declines.

    The same steps as the GUI's (:func:`installPlan`), each in a background process. ``askConfirmation`` defaults
    to False when Slicer runs tests or has no main window (batch mode): nothing then waits for a click.
    """
    if askConfirmation is None:
        askConfirmation = not isBatchOrTesting()
    plan = installPlan()
    if not plan:
        return
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(plan.question()):
        raise ConvLoRASegError("the dependencies were not installed: " + "; ".join(s.what for s in plan.steps))
    error = DependencyInstaller(plan, onLog=lambda line: print(line, flush=True)).start().wait()
    if error is not None:
        raise ConvLoRASegError(error)


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

