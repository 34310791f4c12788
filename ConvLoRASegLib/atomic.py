"""Atomic file writing: a crash, Ctrl-C or a full disk never leaves a half-written output file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

from .errors import ConvLoRASegError


def check_output_path(path: Union[str, Path], overwrite: bool = False) -> Path:
    """Refuse, with one line, an output that exists (unless ``overwrite``) or whose folder is not writable."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConvLoRASegError(f"output exists: {path} (use --overwrite to replace it)")
    if path.is_dir():
        raise ConvLoRASegError(f"output is a folder, expected a file: {path}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ConvLoRASegError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise ConvLoRASegError(f"output folder is not writable: {folder}")
    return path


@contextlib.contextmanager
def atomic_output(path: Union[str, Path], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffixes); on success it is renamed onto ``path``.

    On any exception (including KeyboardInterrupt) the temporary file is removed and ``path`` is untouched.
    """
    path = check_output_path(path, overwrite)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".partial" + suffix, dir=path.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        if path.exists() and not overwrite:  # appeared meanwhile
            raise ConvLoRASegError(f"output exists: {path} (use --overwrite to replace it)")
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
