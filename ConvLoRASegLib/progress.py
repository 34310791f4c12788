"""Progress events -> what the user sees: a tqdm bar on a terminal, plain lines in a log, JSON lines with ``--json``.

The library reports progress through one callback taking a dict (the protocol the Slicer module reads through
:mod:`ConvLoRASegLib.jobs`)::

    {"event": "progress", "stage": "adabn|pseudo-labels|train|select|save|segment|...", "step": i, "total": n,
     "epoch": e, "epochs": E, "loss": x, "score": s}

and, once per adaptation (after its first scoring pass has timed the network), ``{"event": "estimate", "seconds":
expected duration, "elapsed": s}``.

A :class:`Reporter` is that callback. With ``--json`` every event becomes one JSON object per line on stdout,
followed by exactly one ``{"event": "done", ...}``, ``{"event": "error", "message": ...}`` or
``{"event": "cancelled"}``; human-readable text then goes to stderr so stdout stays machine-readable.
Without ``--json`` progress is a bar on stderr when stderr is a terminal; otherwise (``nohup``, a log file, CI)
it is a plain line on stderr at most every :data:`LINE_INTERVAL_S` seconds and at each new stage: the stage, the
epoch, the time since the start and an estimate of what is left of the stage; a step that takes longer (scoring a
volume can take minutes on a busy CPU) still gets a line every :data:`LINE_INTERVAL_S` seconds, from a watcher
thread that :meth:`Reporter.close` stops.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from typing import Any, Callable, Dict, Optional, TextIO

#: Event keys shown next to the bar (in this order) when present.
_POSTFIX_KEYS = ("epoch", "loss", "score")
#: Without a terminal, the most often a progress line is printed (seconds); a new stage prints at once.
LINE_INTERVAL_S = 10.0


def duration(seconds: float) -> str:
    """``"45 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def byte_size(n: float) -> str:
    """``"512 B"``, ``"41.1 kB"``, ``"9.8 MB"`` (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"


class _StagePace:
    """Time left in the current stage from the pace of its steps so far (epochs of training count as one stage:
    ``epoch``/``epochs`` extend its total)."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.stage: Optional[str] = None
        self.first = (0, 0.0)

    def update(self, stage: str, done: Optional[int], total: Optional[int]) -> Optional[float]:
        now = self.clock()
        if stage != self.stage or done is None or done < self.first[0]:
            self.stage, self.first = stage, (done or 0, now)
            return None
        steps, seconds = done - self.first[0], now - self.first[1]
        if steps <= 0 or not total or seconds <= 0:
            return None
        return seconds / steps * max(total - done, 0)


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as None, paths and other objects as strings: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return jsonable(value.item())
    return str(value)


class Reporter:
    """The progress callback of one command, and the way its messages and final result reach the user.

    Args:
        mode: ``"json"`` (JSON lines on ``stdout``), ``"bar"`` (tqdm on ``stderr``), ``"lines"`` (a plain line on
            ``stderr`` at most every ``interval`` seconds) or ``"silent"``.
        stdout, stderr: streams (default: ``sys.stdout`` / ``sys.stderr`` at call time).
        interval, clock: for ``"lines"``: seconds between lines, and the clock (tests).
    """

    def __init__(self, mode: str = "silent", stdout: Optional[TextIO] = None, stderr: Optional[TextIO] = None,
                 interval: float = LINE_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        if mode not in ("json", "bar", "lines", "silent"):
            raise ValueError(f"unknown reporter mode {mode!r}")
        self.mode = mode
        self._stdout = stdout
        self._stderr = stderr
        self._bar = None
        self._bar_stage: Optional[str] = None
        self._clock, self._interval = clock, interval
        self._start = clock()
        self._last_line: Optional[float] = None
        self._line_stage: Optional[str] = None
        self._last_event: tuple = ("", "", None, 0.0)  # (what, stage, seconds left then, when)
        self._pace = _StagePace(clock)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: Optional[threading.Thread] = None

    @classmethod
    def for_cli(cls, json_lines: bool) -> "Reporter":
        """JSON lines when asked, else a bar when stderr is a terminal, else plain progress lines on stderr."""
        if json_lines:
            return cls("json")
        return cls("bar" if getattr(sys.stderr, "isatty", lambda: False)() else "lines")

    def elapsed(self) -> float:
        """Seconds since this reporter (the command) started."""
        return self._clock() - self._start

    @property
    def out(self) -> TextIO:
        return self._stdout or sys.stdout

    @property
    def err(self) -> TextIO:
        return self._stderr or sys.stderr

    # -- events -------------------------------------------------------------------------------------------
    def __call__(self, event: Dict[str, Any]) -> None:
        """The library's progress callback."""
        if self.mode == "json":
            self._emit(event)
        elif self.mode == "bar":
            self._update_bar(event)
        elif self.mode == "lines":
            self._line(event)

    def _line(self, event: Dict[str, Any]) -> None:
        if event.get("event", "progress") != "progress":
            return
        stage = str(event.get("stage", ""))
        step, total = event.get("step"), event.get("total")
        epoch, epochs = event.get("epoch"), event.get("epochs")
        done, whole = step, total
        if stage == "train" and isinstance(epoch, int) and isinstance(epochs, int) and total:
            done, whole = (epoch - 1) * total + (step or 0), epochs * total  # the training as one stage
        left = self._pace.update(stage, done if isinstance(done, int) else None,
                                 whole if isinstance(whole, int) else None)
        parts = [stage]
        if isinstance(epoch, int) and stage == "train":
            parts.append(f"epoch {epoch}" + (f" of {epochs}" if epochs else ""))
        if isinstance(step, (int, float)) and total:
            parts.append(f"step {int(step)}/{total}")
        if event.get("volume") and event.get("volumes"):
            parts.append(f"volume {event['volume']}/{event['volumes']}")
        if event.get("site"):
            parts.append(f"site {event['site']}")
        for key in ("loss", "score"):
            if isinstance(event.get(key), float):
                parts.append(f"{key} {event[key]:.3f}")
        with self._lock:
            now = self._clock()
            self._last_event = (", ".join(parts), stage, left, now)
            text = self._event_text()
            new_stage = stage != self._line_stage
            if self._last_line is not None and now - self._last_line < (1.0 if new_stage else self._interval):
                return
            self._line_stage = stage
            self._write_line(text)
        if self._watcher is None and self._interval > 0:
            self._watcher = threading.Thread(target=self._watch, name="convloraseg-progress", daemon=True)
            self._watcher.start()

    def _event_text(self, still: bool = False) -> str:
        what, stage, left, when = self._last_event
        text = what + (" (still working)" if still else "")
        if left is not None and left - (self._clock() - when) > 0:
            text += f"; about {duration(left - (self._clock() - when))} left in {stage}"
        return text

    def _write_line(self, text: str) -> None:
        self._last_line = self._clock()
        self.err.write(f"convlora-seg: {duration(self.elapsed())} elapsed: {text}\n")
        self.err.flush()

    def _watch(self) -> None:
        """A line every interval while a long step gives no event (the last event's, marked as still running)."""
        while not self._stop.wait(self._interval / 2):
            with self._lock:
                if self._last_line is not None and self._clock() - self._last_line >= self._interval:
                    self._write_line(self._event_text(still=True))

    def close(self) -> None:
        """End of the command: stop the line watcher, close the bar."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
            self._watcher = None
        self.close_bar()

    def _emit(self, event: Dict[str, Any]) -> None:
        self.out.write(json.dumps(jsonable(event), allow_nan=False) + "\n")
        self.out.flush()

    def _update_bar(self, event: Dict[str, Any]) -> None:
        if event.get("event", "progress") != "progress":
            return
        stage = str(event.get("stage", ""))
        total = event.get("total")
        step = event.get("step")
        if self._bar is None or stage != self._bar_stage or (total and self._bar.total != total):
            self.close_bar()
            from tqdm import tqdm

            self._bar = tqdm(total=total or None, desc=stage, file=self.err, leave=False, dynamic_ncols=True)
            self._bar_stage = stage
        if isinstance(step, (int, float)):
            self._bar.n = int(step)
        post = {k: (f"{event[k]:.4g}" if isinstance(event[k], float) else event[k])
                for k in _POSTFIX_KEYS if event.get(k) is not None}
        if post:
            self._bar.set_postfix(post, refresh=False)
        self._bar.refresh()

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._bar_stage = None

    # -- messages and results -----------------------------------------------------------------------------
    def info(self, text: str) -> None:
        """A line for humans: stdout normally, stderr with ``--json`` (stdout holds only JSON there)."""
        self.close_bar()
        stream = self.err if self.mode == "json" else self.out
        stream.write(text.rstrip("\n") + "\n")
        stream.flush()

    def warn(self, text: str) -> None:
        """A non-fatal warning on stderr (``convlora-seg: warning: ...``)."""
        self.close_bar()
        self.err.write(f"convlora-seg: warning: {text}\n")
        self.err.flush()

    def done(self, result: Dict[str, Any]) -> None:
        """The final result: ``{"event": "done", **result}`` with ``--json``; nothing otherwise."""
        self.close_bar()
        if self.mode == "json":
            self._emit({"event": "done", **result})

    def error(self, message: str) -> None:
        """A fatal one-line error: ``convlora-seg: error: ...`` on stderr (and the JSON error event)."""
        self.close_bar()
        if self.mode == "json":
            self._emit({"event": "error", "message": message})
        self.err.write(f"convlora-seg: error: {message}\n")
        self.err.flush()

    def cancelled(self) -> None:
        """The user stopped the command; nothing was written."""
        self.close_bar()
        if self.mode == "json":
            self._emit({"event": "cancelled"})
        self.err.write("convlora-seg: cancelled; no partial output was written\n")
        self.err.flush()
