"""The per-case rows of a cohort run (``convlora-seg segment ... -o OUTDIR``) for the module's QC table, worst
first: most flags, then lowest ESH agreement.

``agreement`` in a row is the ESH agreement of the case's mask (how well the early segmentation head's mask agrees
with the final one; the ``low_agreement`` flag), not the label-free score that picks adapters (ESH agreement + gamma
consistency; a row's ``adapter_scores``)."""

from __future__ import annotations

import importlib
import json
import pathlib
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ConvLoRASegLib.errors import ConvLoRASegError


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _worstFirst(entry: Dict[str, Any]) -> Tuple:
    agreement = _number(entry.get("agreement"))
    return (-len(entry.get("flags") or ()), agreement if agreement is not None else float("inf"))


def manifestEntries(items: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Cases of a cohort run as dicts with at least input, output, adapter, seconds, brain_ml, agreement and
    flags (list of str), worst first (most flags, then lowest ESH agreement)."""
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


MANIFEST_COLUMNS = ("Flags", "Input", "Adapter", "Brain (ml)", "ESH agreement", "Seconds")


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
