"""Is an image file whole? Its voxel data checked against its header before SimpleITK's reading of it is used.

SimpleITK reads a NIfTI file whose gzip stream was cut short (an interrupted copy or download) without a word and
fills the missing voxels with zeros: the brain mask of such a scan is garbage (a third of a head gave a 586 ml
mask). A compressed MetaImage whose zlib data is damaged reads as noise, with a message on stderr only. So
:func:`check_image_file` (called by :func:`ConvLoRASegLib.volumes.read_image`, the library's one volume reader, and
so by ``segment``, ``adapt``, ``train``, ``evaluate``, the Dask workers and the Slicer module's folder runs) checks:

* **compressed data** (NIfTI ``.nii.gz``, NRRD ``encoding: gzip``/``bzip2``, MetaImage ``CompressedData = True``,
  attached or in a detached data file): decompressed to its end, so that a stream that ends early or fails its
  checksum (gzip CRC-32, zlib Adler-32) is refused, and the decompressed bytes counted against the header's size;
* **uncompressed data** (``.nii``, raw NRRD/MetaImage): the file holds at least the bytes the header announces.

Decompressing costs about a quarter of a second for a 1 mm T1 scan (about 60 MB of voxels); nothing is kept. For
NIfTI, :func:`~ConvLoRASegLib.volumes.read_image` runs it beside SimpleITK's read (both inflate without the GIL) and
takes its verdict first; other formats are checked before SimpleITK opens them.
Layouts this does not understand (DICOM, NRRD with several data files or line skips, MetaImage file lists) are
left to SimpleITK's own checks.
"""

from __future__ import annotations

import bz2
import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Optional, Tuple, Union

from .errors import ConvLoRASegError

PathLike = Union[str, os.PathLike]

#: Compressed bytes read at a time (and the most decompressed bytes held at once: 16 MiB).
_CHUNK = 1 << 16
_OUT_MAX = 1 << 24
#: The most header text of a NRRD or MetaImage file read to find where its data is.
_HEADER_MAX = 1 << 16


def check_image_file(path: PathLike, expected_bytes: Optional[int] = None) -> None:
    """Raise ConvLoRASegError (one line) if the voxel data of the image file ``path`` is cut short or its compressed
    stream is damaged. ``expected_bytes``: the size of the voxel data as SimpleITK's header reader sees it (NRRD,
    MetaImage; NIfTI headers are parsed here, since a scaled NIfTI reads as float but is stored smaller)."""
    p = Path(path)
    if p.is_dir():
        return  # a DICOM series: one file per slice, each read whole or refused by GDCM
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _check_nifti(p, name.endswith(".gz"))
    elif name.endswith((".nrrd", ".nhdr")):
        _check_nrrd(p, expected_bytes)
    elif name.endswith((".mha", ".mhd")):
        _check_metaimage(p, expected_bytes)


# ---------------------------------------------------------------------------------------------------------------
# streams
# ---------------------------------------------------------------------------------------------------------------
def _truncated(name: str, what: str) -> ConvLoRASegError:
    return ConvLoRASegError(f"{name} is truncated: {what} (an interrupted copy or download?)")


def _corrupt(name: str, what: str) -> ConvLoRASegError:
    return ConvLoRASegError(f"{name} is corrupt: {what} (damaged on disk or in transfer?)")


def _inflated_size(f: BinaryIO, name: str, limit: Optional[int] = None) -> int:
    """Bytes of the compressed stream at ``f``'s position: gzip (every member, each checked against its CRC-32 and
    length) or zlib (checked against its Adler-32); at most ``limit`` compressed bytes are read. Bytes after the
    last member that do not start another gzip member are ignored, as zlib's own readers do."""
    total, left = 0, limit

    def read(n: int) -> bytes:
        nonlocal left
        block = f.read(n if left is None else min(n, left))
        if left is not None:
            left -= len(block)
        return block

    d = zlib.decompressobj(zlib.MAX_WBITS | 32)  # the zlib or gzip header, detected
    data = read(_CHUNK)
    try:
        while True:
            if not data:
                raise _truncated(name, f"its compressed data ends after {total:,} bytes, before its end marker")
            while data and not d.eof:
                total += len(d.decompress(data, _OUT_MAX))
                data = d.unconsumed_tail
            if not d.eof:
                data = read(_CHUNK)
                continue
            rest = d.unused_data
            if len(rest) < 2:
                rest += read(2 - len(rest))
            if not rest.startswith(b"\x1f\x8b"):
                return total
            d, data = zlib.decompressobj(zlib.MAX_WBITS | 16), rest  # the next gzip member
    except zlib.error as exc:  # "incorrect data check" (the checksum), "invalid distance too far back", ...
        reason = str(exc).rpartition(": ")[2]
        raise _corrupt(name, f"its compressed data fails after {total:,} bytes: {reason}") from None


def _bzip2_size(f: BinaryIO, name: str) -> int:
    total = 0
    try:
        with bz2.BZ2File(f, mode="rb") as b:
            while True:
                block = b.read(_OUT_MAX)
                if not block:
                    return total
                total += len(block)
    except EOFError:
        raise _truncated(name, f"its bzip2 stream ends after {total:,} bytes, before its end marker") from None
    except OSError as exc:
        raise _corrupt(name, f"its bzip2 stream fails after {total:,} bytes ({exc})") from None


def _need(name: str, have: int, need: int, compressed: bool) -> None:
    if have < need:
        where = "decompressed data holds" if compressed else "file holds"
        raise _truncated(name, f"its {where} {have:,} of the {need:,} bytes of voxels its header announces")


# ---------------------------------------------------------------------------------------------------------------
# NIfTI
# ---------------------------------------------------------------------------------------------------------------
def _nifti_layout(header: bytes) -> Optional[Tuple[int, int]]:
    """(offset of the voxels, bytes of voxels) from a NIfTI-1 or NIfTI-2 header; None if it is neither."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            return max(offset, 348), _voxel_bytes(dims, bitpix)
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            return max(offset, 540), _voxel_bytes(dims, bitpix)
    return None


def _voxel_bytes(dims, bitpix: int) -> int:
    n = max(0, min(int(dims[0]), 7))
    count = 1
    for d in dims[1:1 + n]:
        count *= max(int(d), 1)
    return count * max(int(bitpix), 0) // 8


def _check_nifti(path: Path, compressed: bool) -> None:
    name = path.name
    with open(path, "rb") as f:
        compressed = compressed and f.read(2) == b"\x1f\x8b"  # a plain NIfTI named .nii.gz reads as one
        f.seek(0)
        if not compressed:
            layout = _nifti_layout(f.read(540))
            if layout is not None:
                _need(name, path.stat().st_size - layout[0], layout[1], False)
            return
        try:
            with gzip.GzipFile(fileobj=f, mode="rb") as g:
                header = g.read(540)
        except EOFError:
            raise _truncated(name, "its gzip stream ends inside the NIfTI header") from None
        except (OSError, zlib.error) as exc:
            raise _corrupt(name, f"its gzip stream fails in the NIfTI header ({exc})") from None
        f.seek(0)
        size = _inflated_size(f, name)
    layout = _nifti_layout(header)
    if layout is not None:
        _need(name, size - layout[0], layout[1], True)


# ---------------------------------------------------------------------------------------------------------------
# NRRD and MetaImage: a text header, data attached or in another file
# ---------------------------------------------------------------------------------------------------------------
def _text_header(path: Path, end: Callable[[bytes], Optional[int]]) -> Tuple[bytes, Optional[int]]:
    """The first bytes of ``path`` and where its attached data starts (``end(head)``), if found."""
    with open(path, "rb") as f:
        head = f.read(_HEADER_MAX)
    return head, end(head)


def _fields(text: bytes, sep: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for line in text.decode("latin-1").splitlines():
        if sep in line and not line.startswith("#"):
            key, _, value = line.partition(sep)
            out[key.strip().lower()] = value.strip()
    return out


def _check_nrrd(path: Path, expected: Optional[int]) -> None:
    name = path.name

    def end(head: bytes) -> Optional[int]:
        for marker in (b"\r\n\r\n", b"\n\n"):
            i = head.find(marker)
            if i >= 0:
                return i + len(marker)
        return None

    head, start = _text_header(path, end)
    if not head.startswith(b"NRRD"):
        return
    fields = _fields(head[:start] if start else head, ":")
    encoding = fields.get("encoding", "raw").lower()
    datafile = fields.get("data file") or fields.get("datafile")
    if fields.get("line skip", "0") not in ("0", "") or (datafile and (" " in datafile or datafile.upper()
                                                                       .startswith("LIST"))):
        return  # layouts left to SimpleITK
    skip = int(fields.get("byte skip", "0") or 0)
    if datafile:
        source, offset = path.parent / datafile, 0
        if not source.is_file():
            raise ConvLoRASegError(f"{name}: its data file {datafile} is missing")
    elif start is not None:
        source, offset = path, start
    else:
        return
    _check_data(source, name, offset, skip, encoding, expected)


def _check_metaimage(path: Path, expected: Optional[int]) -> None:
    name = path.name

    def end(head: bytes) -> Optional[int]:
        i = head.find(b"ElementDataFile")
        if i < 0:
            return None
        j = head.find(b"\n", i)
        return None if j < 0 else j + 1

    head, start = _text_header(path, end)
    if start is None:
        return
    fields = _fields(head[:start], "=")
    datafile = fields.get("elementdatafile", "")
    compressed = fields.get("compresseddata", "false").lower() == "true"
    size = fields.get("compresseddatasize")
    if datafile.upper() == "LOCAL":
        source, offset = path, start
    elif datafile and "%" not in datafile and not datafile.upper().startswith("LIST") and " " not in datafile:
        source, offset = path.parent / datafile, 0
        if not source.is_file():
            raise ConvLoRASegError(f"{name}: its data file {datafile} is missing")
    else:
        return  # a list of slice files: left to SimpleITK
    header_size = int(fields.get("headersize", "0") or 0)
    if compressed:
        with open(source, "rb") as f:
            f.seek(offset)
            got = _inflated_size(f, name, int(size) if size and size.isdigit() else None)
        if expected is not None:
            _need(name, got, expected, True)
    elif expected is not None and header_size >= 0:
        _need(name, source.stat().st_size - offset - header_size, expected, False)


def _check_data(source: Path, name: str, offset: int, skip: int, encoding: str, expected: Optional[int]) -> None:
    """Voxel data of a NRRD file at ``offset`` of ``source`` in ``encoding``."""
    if encoding in ("gzip", "gz"):
        with open(source, "rb") as f:
            f.seek(offset)
            got = _inflated_size(f, name)
    elif encoding in ("bzip2", "bz2"):
        with open(source, "rb") as f:
            f.seek(offset)
            got = _bzip2_size(f, name)
    elif encoding == "raw":
        if skip < 0:
            return  # "byte skip: -1": the data is the end of the file, whatever came before
        got = source.stat().st_size - offset
    else:
        return  # text encodings: SimpleITK counts the values itself
    if expected is not None:
        _need(name, got - max(skip, 0), expected, encoding != "raw")
