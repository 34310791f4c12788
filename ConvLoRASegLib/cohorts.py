"""Cohorts: which volumes (and masks) to read, from CC359's layout, a folder, files or glob patterns.

Nothing here reads image data; functions return paths. Domains are the scanner sites of the simulator:
``ge15, ge3, philips15, philips3, siemens15, siemens3`` (vendor + field strength, 15 meaning 1.5 T).

Calgary-Campinas-359 (Souza et al., NeuroImage 2018) names its files
``CCxxxx_<vendor>_<15|3>_<age>_<M|F>.nii.gz`` and its brain masks ``..._ss.nii.gz``; the official layout is
``Original/<Vendor>_<15|3>/`` with masks in ``Silver-standard/<Vendor>_<15|3>/``.
"""

from __future__ import annotations

import csv
import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import ConvLoRASegError

PathLike = Union[str, Path]

__all__ = ["Case", "DomainFacts", "IMAGE_EXTENSIONS", "MASK_SUFFIXES", "cc359_domains", "cc359_cases",
           "find_volumes", "folder_cohort", "is_dicom_folder", "split_cases", "split_from_csv", "volume_stem"]

#: File endings read as one volume each (longest first, so ``.nii.gz`` wins over ``.gz``).
IMAGE_EXTENSIONS: Tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Name endings (before the extension) that mark a mask of the image with the rest of the name.
MASK_SUFFIXES: Tuple[str, ...] = ("_mask", "_ss", "_seg", "_brainmask")
SPLITS: Tuple[str, ...] = ("train", "val", "test")

_CC359_NAME = re.compile(r"^(CC\d{4})_(ge|philips|siemens)_(15|3)_(\d+)_([MF])(_ss)?\.nii(\.gz)?$", re.IGNORECASE)
_SILVER_FOLDERS = ("silver-standard", "silver-standard-machine-learning", "silver_standard",
                   "silver_standard_machine_learning")


@dataclass(frozen=True)
class Case:
    """One volume of a cohort: the image, its mask if known, the subject id and the scanner domain if known."""

    image: Path
    mask: Optional[Path]
    subject: str
    domain: Optional[str]


class DomainFacts(NamedTuple):
    """Facts about one CC359 domain.

    ``subjects`` is the inclusive range of subject numbers (CC0001 -> 1); ``slices`` the inclusive range of
    sagittal slices (first array axis) the paper's code keeps for this domain.
    """

    vendor: str
    field_t: float
    subjects: Tuple[int, int]
    slices: Tuple[int, int]


def cc359_domains() -> Dict[str, DomainFacts]:
    """The six CC359 domains by our site name (facts from Souza et al. 2018 and the paper's code)."""
    return {
        "philips15": DomainFacts("Philips", 1.5, (1, 59), (10, 150)),
        "philips3": DomainFacts("Philips", 3.0, (60, 119), (20, 155)),
        "siemens15": DomainFacts("Siemens", 1.5, (120, 179), (25, 165)),
        "siemens3": DomainFacts("Siemens", 3.0, (180, 239), (60, 165)),
        "ge15": DomainFacts("GE", 1.5, (240, 299), (60, 195)),
        "ge3": DomainFacts("GE", 3.0, (300, 359), (25, 175)),
    }


# ----------------------------------------------------------------------------------------------------------
# Finding volumes
# ----------------------------------------------------------------------------------------------------------

def _image_extension(path: Path) -> Optional[str]:
    """The image extension ``path`` ends with (lower case), or None."""
    name = path.name.lower()
    return next((ext for ext in IMAGE_EXTENSIONS if name.endswith(ext)), None)


def volume_stem(path: PathLike) -> str:
    """The file name without its image extension (``sub-01.nii.gz`` -> ``sub-01``; a DICOM folder keeps its
    name)."""
    path = Path(path)
    ext = _image_extension(path)
    return path.name[: -len(ext)] if ext else path.name


def _looks_like_dicom(path: Path) -> bool:
    """Whether ``path`` is a file with the DICOM preamble magic ``DICM`` at byte 128."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _visible_files(folder: Path) -> List[Path]:
    """Regular, non-hidden files directly inside ``folder``."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def is_dicom_folder(folder: Path) -> bool:
    """Whether ``folder`` holds one DICOM series: any ``.dcm`` file, or only files that look like DICOM."""
    files = _visible_files(folder)
    if any(p.suffix.lower() == ".dcm" for p in files):
        return True
    candidates = [p for p in files if _image_extension(p) is None]
    return bool(candidates) and len(candidates) == len(files) and all(_looks_like_dicom(p) for p in candidates)


def _volumes_in_folder(folder: Path) -> List[Path]:
    """Image files directly in ``folder``, plus the folder itself if it is a DICOM series."""
    found = [p for p in _visible_files(folder) if _image_extension(p)]
    if is_dicom_folder(folder):
        found.append(folder)
    return found


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def find_volumes(inputs: Sequence[PathLike]) -> List[Path]:
    """Volumes named by files, folders (not recursive) and glob patterns, sorted and without duplicates.

    A folder contributes its image files (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) and,
    if it holds a DICOM series (``.dcm`` files, or only files with the DICOM magic), itself as one volume.
    A glob pattern contributes the image files and folders it matches; other matches are skipped.

    Raises:
        ConvLoRASegError: a named path that does not exist, a named file that is not a volume, or no volume at all.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    found: Dict[Path, None] = {}
    for item in inputs:
        text = os.path.expanduser(str(item))
        path = Path(text)
        if path.is_dir():
            found.update(dict.fromkeys(_volumes_in_folder(path)))
        elif path.is_file():
            if _image_extension(path) is None:
                raise ConvLoRASegError(f"{path} is not a volume file (expected one of {', '.join(IMAGE_EXTENSIONS)},"
                                       " or a folder of DICOM files)")
            found[path] = None
        elif _is_glob(text):
            for match in sorted(Path(m) for m in glob.glob(text)):
                if match.is_dir():
                    found.update(dict.fromkeys(_volumes_in_folder(match)))
                elif match.is_file() and _image_extension(match):
                    found[match] = None
        else:
            raise ConvLoRASegError(f"{path}: no such file or folder")
    unique = sorted({p.resolve(): p for p in found}.values(), key=lambda p: str(p.resolve()))
    if not unique:
        searched = ", ".join(str(i) for i in inputs) or "(nothing)"
        raise ConvLoRASegError(f"found no readable volumes ({', '.join(IMAGE_EXTENSIONS)} files or DICOM folders)"
                               f" in: {searched}")
    return unique


# ----------------------------------------------------------------------------------------------------------
# Cohorts
# ----------------------------------------------------------------------------------------------------------

def _child(folder: Optional[Path], names: Iterable[str]) -> Optional[Path]:
    """The sub-folder of ``folder`` whose name equals one of ``names`` ignoring case, or None."""
    wanted = [n.lower() for n in names]
    if folder is None or not folder.is_dir():
        return None
    matches = {p.name.lower(): p for p in folder.iterdir() if p.is_dir()}
    return next((matches[n] for n in wanted if n in matches), None)


def _parse_cc359(path: Path) -> Optional[Tuple[str, str, bool]]:
    """(subject, domain, is_mask) from a CC359 file name, or None when the name does not follow it."""
    match = _CC359_NAME.match(path.name)
    if match is None:
        return None
    subject, vendor, field = match.group(1).upper(), match.group(2).lower(), match.group(3)
    return subject, f"{vendor}{field}", match.group(6) is not None


def _cc359_files(folder: Optional[Path]) -> Tuple[Dict[str, Path], Dict[str, Path], Dict[str, str]]:
    """Images and masks in one folder keyed by subject, and each subject's domain."""
    images, masks, domains = {}, {}, {}
    if folder is None or not folder.is_dir():
        return images, masks, domains
    for path in _visible_files(folder):
        parsed = _parse_cc359(path)
        if parsed is None:
            continue
        subject, domain, is_mask = parsed
        (masks if is_mask else images)[subject] = path
        domains[subject] = domain
    return images, masks, domains


def cc359_cases(root: PathLike) -> List[Case]:
    """CC359 cases under ``root``, sorted by subject.

    Two layouts are read: the official one (``Original/<Vendor>_<15|3>/`` images, masks in
    ``Silver-standard/<Vendor>_<15|3>/``; the mask folder may also be spelled ``Silver-standard-machine-learning``
    and any of these in any case) and a flat folder holding images and ``_ss`` masks together. Files whose names
    do not follow CC359's pattern are ignored; a case without a mask has ``mask=None``.

    Raises:
        ConvLoRASegError: ``root`` is not a folder, or no CC359 image is found in it.
    """
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise ConvLoRASegError(f"No such CC359 folder: {root}")
    original = _child(root, ["Original"])
    pairs: List[Tuple[Dict[str, Path], Dict[str, Path], Dict[str, str]]] = []
    if original is not None:
        silver = _child(root, _SILVER_FOLDERS)
        loose_masks = _cc359_files(silver)[1]  # masks put directly in the silver-standard folder
        for site in [original] + sorted(p for p in original.iterdir() if p.is_dir()):
            images, _, domains = _cc359_files(site)
            mask_folder = silver if site == original else _child(silver, [site.name])
            pairs.append((images, {**loose_masks, **_cc359_files(mask_folder)[1]}, domains))
    else:
        pairs.append(_cc359_files(root))
    cases = [Case(image=image, mask=masks.get(subject), subject=subject, domain=domains[subject])
             for images, masks, domains in pairs for subject, image in images.items()]
    if not cases:
        raise ConvLoRASegError(f"Found no CC359 images (CCxxxx_<vendor>_<15|3>_<age>_<M|F>.nii.gz) in {root}"
                               " or its Original/<Vendor>_<field>/ folders.")
    return sorted(cases, key=lambda c: (c.subject, str(c.image)))


def _mask_for(image: Path, masks_dir: Path, same_folder: bool) -> Optional[Path]:
    """The mask of ``image`` in ``masks_dir``: same name (other folder only) or name + a mask suffix."""
    stem = volume_stem(image)
    wanted = [stem + suffix for suffix in MASK_SUFFIXES]
    if not same_folder:
        wanted.insert(0, stem)
    by_stem: Dict[str, Path] = {}
    for path in _visible_files(masks_dir):
        if _image_extension(path):
            by_stem.setdefault(volume_stem(path).lower(), path)
    return next((by_stem[w.lower()] for w in wanted if w.lower() in by_stem), None)


def folder_cohort(images_dir: PathLike, masks_dir: Optional[PathLike] = None) -> List[Case]:
    """Cases from a folder of images, with masks matched by name.

    A mask has the image's name (when ``masks_dir`` is another folder) or the name plus ``_mask``, ``_ss``,
    ``_seg`` or ``_brainmask`` before the extension. Without ``masks_dir`` masks are looked for next to the
    images, and files recognised as masks of another image are not cases themselves. The subject is the file
    name without extension; the domain is parsed from CC359 names and None otherwise.

    Raises:
        ConvLoRASegError: a folder does not exist, or the images folder holds no volume.
    """
    images_dir = Path(os.path.expanduser(str(images_dir)))
    if not images_dir.is_dir():
        raise ConvLoRASegError(f"No such images folder: {images_dir}")
    masks_path = Path(os.path.expanduser(str(masks_dir))) if masks_dir is not None else images_dir
    if not masks_path.is_dir():
        raise ConvLoRASegError(f"No such masks folder: {masks_path}")
    same_folder = masks_path.resolve() == images_dir.resolve()
    volumes = find_volumes([images_dir])
    pairs = {image: _mask_for(image, masks_path, same_folder) if image.is_file() else None for image in volumes}
    if same_folder:
        used = {mask.resolve() for mask in pairs.values() if mask is not None}
        pairs = {image: mask for image, mask in pairs.items() if image.resolve() not in used}
    cases = []
    for image, mask in pairs.items():
        parsed = _parse_cc359(image)
        cases.append(Case(image=image, mask=mask, subject=volume_stem(image), domain=parsed[1] if parsed else None))
    return cases


# ----------------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------------

def _by_split(cases: Sequence[Case], split_of: Dict[str, str]) -> Tuple[List[Case], List[Case], List[Case]]:
    """Cases grouped into (train, val, test) by their subject's split, keeping the input order."""
    groups = {name: [] for name in SPLITS}
    for case in cases:
        if case.subject in split_of:
            groups[split_of[case.subject]].append(case)
    return groups["train"], groups["val"], groups["test"]


def split_cases(cases: Sequence[Case], fractions: Sequence[float] = (0.6, 0.2, 0.2),
                seed: int = 0) -> Tuple[List[Case], List[Case], List[Case]]:
    """Random (train, val, test) split by subject: all volumes of a subject land in one part.

    ``fractions`` are relative sizes (normalised to sum 1); part sizes are rounded, the test part takes the
    rest. The same cases, fractions and seed always give the same split.
    """
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ConvLoRASegError(f"Split fractions must be three non-negative numbers, got {tuple(fractions)}.")
    subjects = sorted({case.subject for case in cases})
    order = np.random.default_rng(seed).permutation(len(subjects))
    total = sum(fractions)
    n_train = int(round(len(subjects) * fractions[0] / total))
    n_val = min(int(round(len(subjects) * fractions[1] / total)), len(subjects) - n_train)
    split_of = {}
    for rank, index in enumerate(order):
        split_of[subjects[index]] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    return _by_split(cases, split_of)


def split_from_csv(cases: Sequence[Case], csv_path: PathLike) -> Tuple[List[Case], List[Case], List[Case]]:
    """(train, val, test) from a CSV with columns ``subject,split`` (split: train, val or test).

    Cases whose subject has no row are left out; subjects in the CSV without a case are ignored.

    Raises:
        ConvLoRASegError: a missing file or column, an unknown split name, a subject given two splits, or no
            case named in the CSV.
    """
    csv_path = Path(os.path.expanduser(str(csv_path)))
    if not csv_path.is_file():
        raise ConvLoRASegError(f"No such split file: {csv_path}")
    split_of: Dict[str, str] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = {name.strip().lower(): name for name in (reader.fieldnames or [])}
        if "subject" not in columns or "split" not in columns:
            raise ConvLoRASegError(f"{csv_path} needs the columns 'subject' and 'split', found {reader.fieldnames}.")
        for line, row in enumerate(reader, start=2):
            subject = (row[columns["subject"]] or "").strip()
            split = (row[columns["split"]] or "").strip().lower()
            if not subject:
                continue
            if split not in SPLITS:
                raise ConvLoRASegError(f"{csv_path} line {line}: split '{split}' is not one of train, val, test.")
            if split_of.setdefault(subject, split) != split:
                raise ConvLoRASegError(f"{csv_path} line {line}: subject {subject} is in two splits.")
    if not any(case.subject in split_of for case in cases):
        raise ConvLoRASegError(f"None of the {len(cases)} cases has a row in {csv_path}.")
    return _by_split(cases, split_of)
