"""Progress events -> what the user sees: a tqdm bar on a terminal, JSON lines with ``--json``, or nothing.

The library reports progress through one callback taking a dict (see ``DESIGN.md``)::

    {"event": "progress", "stage": "adabn|pseudo-labels|train|select|save|segment|...", "step": i, "total": n,
     "epoch": e, "loss": x, "agreement": a}

A :class:`Reporter` is that callback. With ``--json`` every event becomes one JSON object per line on stdout,
followed by exactly one ``{"event": "done", ...}``, ``{"event": "error", "message": ...}`` or
``{"event": "cancelled"}``; human-readable text then goes to stderr so stdout stays machine-readable.
Without ``--json`` progress is a bar on stderr when stderr is a terminal, and silent otherwise.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Dict, Optional, TextIO

#: Event keys shown next to the bar (in this order) when present.
_POSTFIX_KEYS = ("epoch", "loss", "agreement")


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
        mode: ``"json"`` (JSON lines on ``stdout``), ``"bar"`` (tqdm on ``stderr``) or ``"silent"``.
        stdout, stderr: streams (default: ``sys.stdout`` / ``sys.stderr`` at call time).
    """

    def __init__(self, mode: str = "silent", stdout: Optional[TextIO] = None, stderr: Optional[TextIO] = None):
        if mode not in ("json", "bar", "silent"):
            raise ValueError(f"unknown reporter mode {mode!r}")
        self.mode = mode
        self._stdout = stdout
        self._stderr = stderr
        self._bar = None
        self._bar_stage: Optional[str] = None

    @classmethod
    def for_cli(cls, json_lines: bool) -> "Reporter":
        """JSON lines when asked, else a bar when stderr is a terminal, else silent."""
        if json_lines:
            return cls("json")
        return cls("bar" if getattr(sys.stderr, "isatty", lambda: False)() else "silent")

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
