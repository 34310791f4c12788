"""Run the ConvLoRASegLib command line in a background process and follow its JSON progress lines.

Long work (adaptation, segmentation) must not freeze Slicer, and a crash in torch must not take Slicer down, so
the Slicer module starts ``PythonSlicer -m ConvLoRASegLib <command> ... --json`` as a child process. The CLI
prints one JSON object per line on stdout::

    {"event": "progress", "stage": "train", "step": 3, "total": 40, "epoch": 1, "loss": 0.21, "agreement": 0.93}
    {"event": "done", "adapter": {...}}      or      {"event": "error", "message": "one line"}

and exits with 0 (ok), 2 (user error) or 130 (cancelled, nothing written).

:class:`CliProcess` owns one such child. It never blocks the caller: two reader threads move the lines of
stdout and stderr into a queue, and :meth:`CliProcess.poll` (called by a ``qt.QTimer`` every 100 ms inside
Slicer, or in a loop by :meth:`CliProcess.wait` in batch mode and tests) drains the queue and calls the
callbacks in the caller's thread. :meth:`CliProcess.cancel` does not wait either: it asks the child to stop
(a cancel file the CLI watches -- the one request that reaches a windowless child on Windows too -- and
SIGTERM to its process group on POSIX), and :meth:`poll` kills the whole process tree once the grace period
is over. The child's side of the same protocol is here too: :func:`cancel_file_as_interrupt` and
:func:`sigterm_as_interrupt` turn both requests into Ctrl-C in the CLI. Nothing here imports Qt or Slicer (this
file lives in the library, not beside the module: Slicer registers every ``*.py`` in a module folder as a
module), so it is tested with plain Python.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_CANCELLED = 130
#: Environment variable naming the file whose appearance makes the CLI stop as on Ctrl-C (:func:`cancel_file_as_interrupt`).
CANCEL_FILE_ENV = "CONVLORASEG_CANCEL_FILE"
#: Seconds between a cancel request and killing the process tree, by default.
CANCEL_GRACE_SECONDS = 5.0

ProgressCallback = Callable[[Dict[str, Any]], None]
LogCallback = Callable[[str], None]


@dataclass
class EtaEstimator:
    """Remaining time of the current stage from the pace of its steps so far.

    The estimate restarts whenever the stage changes (AdaBN, training and selection run at different
    speeds). Times are in seconds, from ``time.monotonic``.
    """

    stage: Optional[str] = None
    firstStep: int = 0
    firstTime: float = 0.0
    lastStep: int = 0
    lastTime: float = 0.0
    total: int = 0

    def update(self, stage: str, step: int, total: int, now: Optional[float] = None) -> None:
        """Record that ``step`` of ``total`` steps of ``stage`` is done at time ``now`` (s)."""
        now = time.monotonic() if now is None else now
        if stage != self.stage or step < self.lastStep:
            self.stage, self.firstStep, self.firstTime = stage, step, now
        self.lastStep, self.lastTime, self.total = step, now, total

    def remainingSeconds(self) -> Optional[float]:
        """Seconds left in the current stage, or None while fewer than two steps have been seen."""
        doneSteps = self.lastStep - self.firstStep
        if self.stage is None or doneSteps <= 0 or self.total <= 0:
            return None
        secondsPerStep = (self.lastTime - self.firstTime) / doneSteps
        return max(0.0, secondsPerStep * (self.total - self.lastStep))

    def text(self) -> str:
        """Human-readable ETA, e.g. ``"train: about 2 min 05 s left"``; empty when unknown."""
        seconds = self.remainingSeconds()
        if seconds is None:
            return ""
        minutes, secs = divmod(int(round(seconds)), 60)
        span = f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
        return f"{self.stage}: about {span} left"


def parseEventLine(line: str) -> Optional[Dict[str, Any]]:
    """The JSON event of one stdout line, or None for any other text (a warning, a stray print)."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        event = json.loads(text)
    except ValueError:
        return None
    if not isinstance(event, dict) or "event" not in event:
        return None
    return event


def requestStop(proc: "subprocess.Popen") -> None:
    """Ask ``proc`` to stop without waiting: SIGTERM to its process group on POSIX.

    On Windows there is no such signal for a ``CREATE_NO_WINDOW`` child (CTRL_BREAK needs a shared console);
    there the cancel file of :class:`CliProcess` is the polite request, and :func:`killTree` the hard stop.
    """
    if proc.poll() is not None or os.name == "nt":
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def killTree(proc: "subprocess.Popen") -> None:
    """Kill ``proc`` and every process it started (SIGKILL to the group, ``taskkill /T /F`` on Windows)."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, check=False)
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            pass


def killProcessTree(proc: "subprocess.Popen", graceSeconds: float = CANCEL_GRACE_SECONDS) -> bool:
    """Blocking stop for scripts: ask politely, wait ``graceSeconds``, then kill the tree; True if killed hard."""
    if proc.poll() is not None:
        return False
    requestStop(proc)
    try:
        proc.wait(timeout=graceSeconds)
        return False
    except subprocess.TimeoutExpired:
        pass
    killTree(proc)
    proc.wait()
    return True


@dataclass
class ProcessResult:
    """How a finished process ended: exit code, the ``done`` event (if any), the error line (if any)."""

    returnCode: int
    done: Optional[Dict[str, Any]] = None
    errorMessage: Optional[str] = None
    cancelled: bool = False
    killedHard: bool = False
    log: List[str] = field(default_factory=list)
    #: what the caller made of a successful run (e.g. the Slicer module's labelmap node); None otherwise
    value: Any = None

    @property
    def ok(self) -> bool:
        """True when the process exited with 0 and reported ``done``."""
        return self.returnCode == EXIT_OK and self.done is not None and not self.cancelled


class CliProcess:
    """One background run of the ConvLoRASegLib CLI, followed through its ``--json`` lines.

    Args:
        args: full command line, e.g. ``[python, "-m", "ConvLoRASegLib", "adapt", folder, "--json", ...]``.
        env: environment of the child (None: inherit).
        cwd: working folder of the child (None: inherit).
        onProgress: called with every parsed event (progress, done, error, or any other event).
        onLog: called with every other line of stdout and every line of stderr.
        onFinished: called once with the :class:`ProcessResult` after the process has exited and all of
            its output has been handled.
        clock: seconds, monotonic (default ``time.monotonic``); tests pass their own to drive the grace period.

    The child's environment gets :data:`CANCEL_FILE_ENV` = :attr:`cancelFile`, a path that does not exist yet;
    :meth:`cancel` creates it.
    """

    def __init__(self, args: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
                 onProgress: Optional[ProgressCallback] = None, onLog: Optional[LogCallback] = None,
                 onFinished: Optional[Callable[[ProcessResult], None]] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.args = [str(a) for a in args]
        self.cancelFile = os.path.join(tempfile.gettempdir(), f"convlora-cancel-{os.getpid()}-{uuid.uuid4().hex}")
        self.env = dict(os.environ if env is None else env)
        self.env[CANCEL_FILE_ENV] = self.cancelFile
        self.clock = clock
        self.cwd = cwd
        self.onProgress = onProgress
        self.onLog = onLog
        self.onFinished = onFinished
        self.eta = EtaEstimator()
        self.lastProgress: Optional[Dict[str, Any]] = None
        self.result: Optional[ProcessResult] = None
        self._proc: Optional[subprocess.Popen] = None
        self._lines: "queue.Queue[tuple]" = queue.Queue()
        self._readers: List[threading.Thread] = []
        self._done: Optional[Dict[str, Any]] = None
        self._errorMessage: Optional[str] = None
        self._log: List[str] = []
        self._cancelled = False
        self._killedHard = False
        self._killDeadline: Optional[float] = None

    # -- starting ---------------------------------------------------------------------------------------

    def start(self) -> "CliProcess":
        """Start the child process and its two reader threads; returns self."""
        if self._proc is not None:
            raise RuntimeError("CliProcess.start() called twice")
        kwargs: Dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # own process group: cancel reaches data-loader workers too
        logging.debug("ConvLoRASeg: starting %s", " ".join(self.args))
        self._proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd,
                                      text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        for name, stream in (("stdout", self._proc.stdout), ("stderr", self._proc.stderr)):
            reader = threading.Thread(target=self._readLines, args=(name, stream), daemon=True,
                                      name=f"ConvLoRASeg-{name}")
            reader.start()
            self._readers.append(reader)
        return self

    def _readLines(self, name: str, stream) -> None:
        for line in iter(stream.readline, ""):
            self._lines.put((name, line.rstrip("\r\n")))
        stream.close()

    # -- state ------------------------------------------------------------------------------------------

    @property
    def pid(self) -> Optional[int]:
        """Process id of the child, None before start."""
        return self._proc.pid if self._proc is not None else None

    def isRunning(self) -> bool:
        """True from start until :attr:`result` is set (process exited and output handled)."""
        return self._proc is not None and self.result is None

    # -- reading ----------------------------------------------------------------------------------------

    def poll(self) -> bool:
        """Handle all lines read so far (never blocks); return True while the run is not finished."""
        if self._proc is None or self.result is not None:
            return False
        while True:
            try:
                streamName, line = self._lines.get_nowait()
            except queue.Empty:
                break
            self._handleLine(streamName, line)
        if self._proc.poll() is None:
            if self._killDeadline is not None and self.clock() >= self._killDeadline:
                self._killedHard = True
                self._killDeadline = None
                killTree(self._proc)
            return True
        if any(reader.is_alive() for reader in self._readers):
            return True
        while not self._lines.empty():  # lines queued between the drain and the exit check
            self._handleLine(*self._lines.get_nowait())
        self._finish()
        return False

    def _handleLine(self, streamName: str, line: str) -> None:
        event = parseEventLine(line) if streamName == "stdout" else None
        if event is None:
            if line.strip():
                self._log.append(line)
                if self.onLog:
                    self.onLog(line)
            return
        kind = event.get("event")
        if kind == "progress":
            self.lastProgress = event
            if isinstance(event.get("step"), (int, float)) and isinstance(event.get("total"), (int, float)):
                self.eta.update(str(event.get("stage", "")), int(event["step"]), int(event["total"]))
        elif kind == "done":
            self._done = event
        elif kind == "error":
            self._errorMessage = str(event.get("message", "unknown error"))
        if self.onProgress:
            self.onProgress(event)

    def _finish(self) -> None:
        self._removeCancelFile()
        returnCode = self._proc.returncode
        cancelled = self._cancelled or returnCode == EXIT_CANCELLED
        errorMessage = self._errorMessage
        if errorMessage is None and returnCode not in (EXIT_OK,) and not cancelled:
            tail = [line for line in self._log if line.strip()][-1:]
            errorMessage = f"process exited with code {returnCode}" + (f": {tail[0]}" if tail else "")
        self.result = ProcessResult(returnCode=returnCode, done=self._done, errorMessage=errorMessage,
                                    cancelled=cancelled, killedHard=self._killedHard, log=list(self._log))
        if self.onFinished:
            self.onFinished(self.result)

    def wait(self, timeout: Optional[float] = None, interval: float = 0.1) -> ProcessResult:
        """Poll every ``interval`` seconds until the run finishes; cancel it after ``timeout`` seconds."""
        started = time.monotonic()
        while self.poll():
            if timeout is not None and time.monotonic() - started > timeout:
                self.cancel()
            time.sleep(interval)
        assert self.result is not None
        return self.result

    # -- cancelling -------------------------------------------------------------------------------------

    def cancel(self, graceSeconds: float = CANCEL_GRACE_SECONDS) -> None:
        """Ask the run to stop and return at once; safe to call twice.

        Creates :attr:`cancelFile` (the CLI stops as on Ctrl-C, also on Windows) and sends SIGTERM to the
        process group on POSIX. If the process is still alive ``graceSeconds`` later, the next :meth:`poll`
        kills it and everything it started. The result then reports ``cancelled``.
        """
        if self._proc is None or self._proc.poll() is not None or self._cancelled:
            return  # not started, already ended by itself, or already cancelling
        self._cancelled = True
        try:
            with open(self.cancelFile, "w", encoding="utf-8") as stream:
                stream.write("cancel\n")
        except OSError:
            logging.warning("ConvLoRASeg: could not write the cancel file %s", self.cancelFile)
        requestStop(self._proc)
        self._killDeadline = self.clock() + max(0.0, graceSeconds)

    @property
    def cancelling(self) -> bool:
        """True after :meth:`cancel` until the run has finished."""
        return self._cancelled and self.result is None

    def kill(self) -> None:
        """Kill the process tree now (teardown: Slicer quits or the module is reloaded) and reap it."""
        if self._proc is None or self._proc.poll() is not None:
            self._removeCancelFile()
            return
        self._cancelled = True
        self._killedHard = True
        killTree(self._proc)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - the OS did not kill it
            logging.warning("ConvLoRASeg: process %s did not exit after being killed", self._proc.pid)
        self._removeCancelFile()

    def _removeCancelFile(self) -> None:
        try:
            os.remove(self.cancelFile)
        except OSError:
            pass


def libraryCommand(command: str, *arguments: str, python: Optional[str] = None) -> List[str]:
    """Command line running ``python -m ConvLoRASegLib <command> <arguments...>``.

    ``python`` defaults to the interpreter running this code (inside Slicer: PythonSlicer).
    """
    return [python or pythonExecutable(), "-m", "ConvLoRASegLib", command, *arguments]


def pythonExecutable() -> str:
    """The Python interpreter for child processes: PythonSlicer inside Slicer, else ``sys.executable``."""
    import shutil

    for candidate in ("PythonSlicer", "PythonSlicer.exe"):
        found = shutil.which(candidate)
        if found:
            return found
    return sys.executable


def childEnvironment(libraryParent: str, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for the child: ours, plus ``libraryParent`` first on PYTHONPATH, unbuffered output."""
    env = dict(os.environ)
    paths = [libraryParent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    if extra:
        env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------------------------
# the child's side: the command line turns SIGTERM and the cancel file into Ctrl-C
# ---------------------------------------------------------------------------------------------------------------
#: Set when SIGTERM or the cancel file asked this run to stop. The interrupt can land inside a library's C code,
#: which may turn it into an error of its own (safetensors reading a model raised "could not determine the shape
#: of object type 'torch.storage.UntypedStorage'"): :func:`main` then still reports a cancellation, not that error.
CANCEL_REQUESTED = threading.Event()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While active, SIGTERM raises KeyboardInterrupt in the main thread, like Ctrl-C (restored afterwards)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        CANCEL_REQUESTED.set()
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


#: Seconds after which the cancel-file watcher interrupts again if the run has not stopped.
REINTERRUPT_S = 3.0


@contextlib.contextmanager
def cancel_file_as_interrupt(path: Optional[str], interval: float = 0.2) -> Iterator[None]:
    """While active, the appearance of the file ``path`` raises KeyboardInterrupt in the main thread.

    The Slicer module's way to cancel a background run that works on every OS: on Windows no signal reaches a
    child started without a console. The path comes from ``$CONVLORASEG_CANCEL_FILE``; None or empty: no-op.
    """
    if not path or threading.current_thread() is not threading.main_thread():
        yield
        return
    import _thread

    # interrupt_main() does nothing while SIGINT is ignored, and a child started in the background by a shell or
    # another program often inherits it ignored (Python then never installs its Ctrl-C handler): install it here
    old_sigint = signal.getsignal(signal.SIGINT)
    if old_sigint in (signal.SIG_IGN, signal.SIG_DFL, None):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if os.path.exists(path):
                CANCEL_REQUESTED.set()
                _thread.interrupt_main()
                # an interrupt that lands in code that swallows it (a library's bare except) is lost: if the run
                # is still going a while later, interrupt again
                stop.wait(REINTERRUPT_S)
                continue
            stop.wait(interval)

    watcher = threading.Thread(target=watch, name="convlora-cancel-file", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        if old_sigint in (signal.SIG_IGN, signal.SIG_DFL):
            signal.signal(signal.SIGINT, old_sigint)
