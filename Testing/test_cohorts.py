"""ConvLoRASegLib.cohorts on fake CC359 trees and folders of tiny NIfTI volumes."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ConvLoRASegLib.cohorts import (Case, cc359_cases, cc359_domains, find_volumes, folder_cohort,
                                    is_dicom_folder, split_cases, split_from_csv)
from ConvLoRASegLib.errors import ConvLoRASegError

SITES = {"GE_15": ("ge", "15", 240), "GE_3": ("ge", "3", 300), "Philips_15": ("philips", "15", 1),
         "Philips_3": ("philips", "3", 60), "Siemens_15": ("siemens", "15", 120), "Siemens_3": ("siemens", "3", 180)}


def write_volume(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8, 8), np.uint8)), str(path))
    return path


def cc359_name(vendor, field, number, mask=False):
    return f"CC{number:04d}_{vendor}_{field}_{40 + number % 30}_{'MF'[number % 2]}{'_ss' if mask else ''}.nii.gz"


def official_tree(root: Path, per_site=2, silver="Silver-standard") -> Path:
    for folder, (vendor, field, first) in SITES.items():
        for number in range(first, first + per_site):
            write_volume(root / "Original" / folder / cc359_name(vendor, field, number))
            if number != first + per_site - 1 or folder != "GE_3":  # one image without its mask
                write_volume(root / silver / folder / cc359_name(vendor, field, number, mask=True))
    (root / "Original" / "GE_3" / "README.txt").write_text("not a volume")
    write_volume(root / "Original" / "GE_3" / "notes_scan.nii.gz")
    return root


def test_domains_facts():
    domains = cc359_domains()
    assert set(domains) == {"ge15", "ge3", "philips15", "philips3", "siemens15", "siemens3"}
    assert domains["ge3"].vendor == "GE" and domains["ge3"].field_t == 3.0
    assert domains["ge3"].subjects == (300, 359) and domains["ge3"].slices == (25, 175)
    assert domains["siemens3"].slices == (60, 165) and domains["philips15"].subjects == (1, 59)
    covered = sorted(n for d in domains.values() for n in range(d.subjects[0], d.subjects[1] + 1))
    assert covered == list(range(1, 360))


@pytest.mark.parametrize("silver", ["Silver-standard", "Silver-standard-machine-learning", "silver-standard"])
def test_official_layout(tmp_path, silver):
    cases = cc359_cases(official_tree(tmp_path, silver=silver))
    assert len(cases) == 12
    assert [c.subject for c in cases] == sorted(c.subject for c in cases)
    by_subject = {c.subject: c for c in cases}
    assert by_subject["CC0001"].domain == "philips15"
    assert by_subject["CC0180"].domain == "siemens3"
    assert by_subject["CC0241"].domain == "ge15"
    assert by_subject["CC0300"].mask.name == "CC0300_ge_3_40_M_ss.nii.gz"
    assert by_subject["CC0300"].mask.parent.parent.name == silver
    assert by_subject["CC0301"].mask is None
    for case in cases:
        facts = cc359_domains()[case.domain]
        assert facts.subjects[0] <= int(case.subject[2:]) <= facts.subjects[1]
        assert case.image.parent.parent.name == "Original"


def test_flat_layout(tmp_path):
    write_volume(tmp_path / cc359_name("siemens", "3", 181))
    write_volume(tmp_path / cc359_name("siemens", "3", 181, mask=True))
    write_volume(tmp_path / cc359_name("philips", "15", 7))
    write_volume(tmp_path / "something_else.nii.gz")
    cases = cc359_cases(tmp_path)
    assert cases == [
        Case(tmp_path / cc359_name("philips", "15", 7), None, "CC0007", "philips15"),
        Case(tmp_path / cc359_name("siemens", "3", 181), tmp_path / cc359_name("siemens", "3", 181, True),
             "CC0181", "siemens3"),
    ]
    with pytest.raises(Exception):
        cases[0].subject = "x"  # frozen


def test_cc359_errors(tmp_path):
    with pytest.raises(ConvLoRASegError, match="No such CC359 folder"):
        cc359_cases(tmp_path / "missing")
    write_volume(tmp_path / "brain.nii.gz")
    with pytest.raises(ConvLoRASegError, match="no CC359 images"):
        cc359_cases(tmp_path)


def test_split_deterministic_and_disjoint(tmp_path):
    cases = cc359_cases(official_tree(tmp_path, per_site=5))
    # a second volume of one subject (e.g. a re-scan) must follow its subject
    cases = cases + [Case(cases[0].image, None, cases[0].subject, cases[0].domain)]
    train, val, test = split_cases(cases, seed=3)
    assert (len(train), len(val), len(test)) == (19, 6, 6)
    subjects = [{c.subject for c in part} for part in (train, val, test)]
    assert not (subjects[0] & subjects[1] or subjects[0] & subjects[2] or subjects[1] & subjects[2])
    assert len(train) + len(val) + len(test) == len(cases)
    assert split_cases(cases, seed=3) == (train, val, test)
    assert split_cases(cases, seed=4) != (train, val, test)
    t, v, s = split_cases(cases, fractions=(1, 0, 0))
    assert len(t) == len(cases) and not v and not s
    with pytest.raises(ConvLoRASegError, match="fractions"):
        split_cases(cases, fractions=(0.5, 0.5))


def test_split_from_csv(tmp_path):
    cases = cc359_cases(official_tree(tmp_path / "cc"))
    csv_path = tmp_path / "split.csv"
    csv_path.write_text("subject,split\nCC0001,train\nCC0060,val\nCC0300,TEST\nCC0999,train\n")
    train, val, test = split_from_csv(cases, csv_path)
    assert [c.subject for c in train] == ["CC0001"]
    assert [c.subject for c in val] == ["CC0060"]
    assert [c.subject for c in test] == ["CC0300"]
    csv_path.write_text("subject,split\nCC0001,holdout\n")
    with pytest.raises(ConvLoRASegError, match="line 2"):
        split_from_csv(cases, csv_path)
    csv_path.write_text("subject,part\nCC0001,train\n")
    with pytest.raises(ConvLoRASegError, match="columns"):
        split_from_csv(cases, csv_path)
    csv_path.write_text("subject,split\nCC0001,train\nCC0001,test\n")
    with pytest.raises(ConvLoRASegError, match="two splits"):
        split_from_csv(cases, csv_path)
    with pytest.raises(ConvLoRASegError, match="No such split file"):
        split_from_csv(cases, tmp_path / "none.csv")


def test_find_volumes_files_folders_globs(tmp_path):
    a = write_volume(tmp_path / "a.nii.gz")
    b = write_volume(tmp_path / "b.nrrd")
    c = write_volume(tmp_path / "sub" / "c.mha")
    (tmp_path / "sub" / "c.txt").write_text("x")
    write_volume(tmp_path / "sub" / "deeper" / "d.nii")
    assert find_volumes([tmp_path]) == [a, b]                     # not recursive
    assert find_volumes([tmp_path, str(a), tmp_path / "sub"]) == [a, b, c]  # de-duplicated, sorted
    assert find_volumes([str(tmp_path / "**" / "*.m*")]) == [c]
    assert find_volumes(str(tmp_path / "*.nii.gz")) == [a]


def test_dicom_folders(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    for i in range(3):
        (series / f"IM{i}.dcm").write_bytes(b"\0" * 128 + b"DICM")
    magic = tmp_path / "magic"
    magic.mkdir()
    for i in range(3):
        (magic / f"{i:05d}").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 10)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "00001").write_bytes(b"\0" * 128 + b"DICM")
    (mixed / "notes.txt").write_text("hello")
    assert is_dicom_folder(series) and is_dicom_folder(magic) and not is_dicom_folder(mixed)
    assert find_volumes([series, magic]) == [magic, series]
    assert find_volumes([str(tmp_path / "*")]) == [magic, series]


def test_real_dicom_series(tmp_path):
    image = sitk.GetImageFromArray(np.arange(4 * 8 * 8, dtype=np.int16).reshape(4, 8, 8))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    folder = tmp_path / "ct"
    folder.mkdir()
    for z in range(4):
        writer.SetFileName(str(folder / f"slice{z:03d}"))  # no extension: found by the DICM magic
        writer.SetImageIO("GDCMImageIO")
        writer.Execute(image[:, :, z])
    assert find_volumes([folder]) == [folder]


def test_find_volumes_errors(tmp_path):
    with pytest.raises(ConvLoRASegError, match=": no such file or folder$"):
        find_volumes([tmp_path / "absent.nii.gz"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConvLoRASegError, match="no readable volumes") as info:
        find_volumes([tmp_path, str(tmp_path / "*.nrrd")])
    assert str(tmp_path) in str(info.value)
    with pytest.raises(ConvLoRASegError, match="not a volume file"):
        find_volumes([tmp_path / "notes.txt"])


def test_folder_cohort_same_folder(tmp_path):
    for name in ["s1.nii.gz", "s1_mask.nii.gz", "s2.nrrd", "s2_brainmask.nrrd", "s3.mha",
                 cc359_name("ge", "3", 301), cc359_name("ge", "3", 301, mask=True)]:
        write_volume(tmp_path / name)
    cases = folder_cohort(tmp_path)
    by_subject = {c.subject: c for c in cases}
    assert set(by_subject) == {"s1", "s2", "s3", "CC0301_ge_3_41_F"}
    assert by_subject["s1"].mask.name == "s1_mask.nii.gz"
    assert by_subject["s2"].mask.name == "s2_brainmask.nrrd"
    assert by_subject["s3"].mask is None
    assert by_subject["CC0301_ge_3_41_F"].domain == "ge3"
    assert by_subject["CC0301_ge_3_41_F"].mask.name.endswith("_ss.nii.gz")


def test_folder_cohort_mask_folder(tmp_path):
    for name in ["a.nii.gz", "b.nii.gz", "c.nii.gz"]:
        write_volume(tmp_path / "img" / name)
    write_volume(tmp_path / "lab" / "a.nii.gz")
    write_volume(tmp_path / "lab" / "b_seg.nii")
    cases = folder_cohort(tmp_path / "img", tmp_path / "lab")
    assert [(c.subject, c.mask.name if c.mask else None) for c in cases] == [
        ("a", "a.nii.gz"), ("b", "b_seg.nii"), ("c", None)]
    with pytest.raises(ConvLoRASegError, match="No such masks folder"):
        folder_cohort(tmp_path / "img", tmp_path / "nothing")
    with pytest.raises(ConvLoRASegError, match="No such images folder"):
        folder_cohort(tmp_path / "nothing")
