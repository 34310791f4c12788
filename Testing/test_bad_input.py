"""The bad-input list, through the CLI: each one refused with one line on stderr, exit status 2, nothing written,
the input untouched (or, for warnings, a warning and a result)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

# fixtures shared with test_cli (imported fixtures are registered here; _one_torch_thread is autouse)
from test_cli import (_one_torch_thread, head_files, make_adapter, other_model, run_cli, sha,  # noqa: F401
                      synthetic_head, tiny_model)

ERROR = "convlora-seg: error: "


def refused(capsys, *argv, keyword: str, absent: Path = None) -> str:
    """Run the CLI; assert exit 2, exactly one stderr line naming ``keyword``, no traceback, nothing written."""
    code, _, err = run_cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert lines and lines[-1].startswith(ERROR) and keyword.lower() in lines[-1].lower(), err
    assert all(not line.startswith(ERROR) for line in lines[:-1]) and "Traceback" not in err
    if absent is not None:
        assert not absent.exists()
        leftovers = [p for p in absent.parent.iterdir() if p.name.startswith(".")] if absent.parent.is_dir() else []
        assert leftovers == []  # no temporary file either
    return lines[-1]


def write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def array_image(a: np.ndarray, spacing=(3.0, 3.0, 3.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(a.astype(np.float32))
    img.SetSpacing(spacing[: img.GetDimension()])
    return img


def segment(tiny_model, src, out, *extra):
    return ("segment", src, "-o", out, "--model", tiny_model, "--device", "cpu", *extra)


# ---------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------
def test_missing_file(capsys, tiny_model, tmp_path):
    out = tmp_path / "m.nii.gz"
    line = refused(capsys, *segment(tiny_model, tmp_path / "nope.nii.gz", out), keyword="no such file", absent=out)
    assert line.endswith("nope.nii.gz: no such file or folder")  # as the README shows it, lower case


def test_not_an_image(capsys, tiny_model, tmp_path):
    fake = tmp_path / "scan.nii.gz"
    fake.write_text("this is not an image\n")
    before = sha(fake)
    out = tmp_path / "m.nii.gz"
    refused(capsys, *segment(tiny_model, fake, out), keyword="not an image", absent=out)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    refused(capsys, *segment(tiny_model, text, out), keyword="not a volume file", absent=out)
    assert sha(fake) == before


def test_2d_image(capsys, tiny_model, tmp_path):
    src = write(array_image(np.random.default_rng(0).random((40, 40)) * 100), tmp_path / "slice.nrrd")
    out = tmp_path / "m.nii.gz"
    refused(capsys, *segment(tiny_model, src, out), keyword="not a 3D volume", absent=out)


def test_4d_image_refused_unless_first_volume(capsys, tiny_model, tmp_path):
    vols = [synthetic_head(seed=s, shape=(20, 24, 22)) for s in range(3)]
    four = sitk.JoinSeries(vols)
    src = write(four, tmp_path / "fmri.nii.gz")
    before = sha(src)
    out = tmp_path / "m.nii.gz"
    line = refused(capsys, *segment(tiny_model, src, out), keyword="4D with 3 volumes", absent=out)
    assert "pass --first-volume to take volume 0" in line
    code, _, err = run_cli(capsys, *segment(tiny_model, src, out, "--first-volume"))
    assert code == 0, err
    assert sitk.ReadImage(str(out)).GetSize() == vols[0].GetSize()
    assert sha(src) == before


@pytest.mark.parametrize("value,word", [(0.0, "empty"), (7.0, "constant")])
def test_empty_or_constant_volume(capsys, tiny_model, tmp_path, value, word):
    src = write(array_image(np.full((20, 24, 22), value)), tmp_path / "flat.nii.gz")
    out = tmp_path / "m.nii.gz"
    refused(capsys, *segment(tiny_model, src, out), keyword=word, absent=out)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_voxels(capsys, tiny_model, tmp_path, bad):
    a = sitk.GetArrayFromImage(synthetic_head(shape=(20, 24, 22)))
    a[5, 5, 5] = bad
    src = write(array_image(a), tmp_path / "bad.nrrd")
    out = tmp_path / "m.nii.gz"
    refused(capsys, *segment(tiny_model, src, out), keyword="NaN or infinite", absent=out)


def test_ct_like_range_warns_and_still_works(capsys, tiny_model, tmp_path):
    ct = synthetic_head(shape=(20, 24, 22), scale=3000.0, offset=-1024.0)
    src = write(sitk.Cast(ct, sitk.sitkInt16), tmp_path / "ct.nii.gz")
    out = tmp_path / "m.nii.gz"
    code, _, err = run_cli(capsys, *segment(tiny_model, src, out))
    assert code == 0 and "warning" in err and "CT" in err and out.is_file()


def test_volume_larger_than_memory_refused_early(capsys, tiny_model, tmp_path):
    # A header-only MetaImage: its raw file does not exist, so reading the pixels would fail; only the header
    # is read, and the 4000^3 float estimate (> 1 TB) is refused before anything else happens.
    header = tmp_path / "huge.mhd"
    header.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4000 4000 4000\nElementSpacing = 0.1 0.1 0.1\n"
                      "ElementType = MET_FLOAT\nElementDataFile = huge.raw\n")
    out = tmp_path / "m.nii.gz"
    line = refused(capsys, *segment(tiny_model, header, out), keyword="needs about", absent=out)
    assert "GB" in line and "available" in line


def test_small_volume_refused_when_memory_is_short(capsys, tiny_model, head_files, tmp_path, monkeypatch):
    monkeypatch.setattr("ConvLoRASegLib.volumes.available_memory_bytes", lambda: 1_000_000)
    out = tmp_path / "m.nii.gz"
    refused(capsys, *segment(tiny_model, head_files[0], out), keyword="only 0.0 GB available", absent=out)


# ---------------------------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------------------------
def test_output_folder_missing_or_not_writable(capsys, tiny_model, head_files, tmp_path, monkeypatch):
    import os

    out = tmp_path / "no" / "such" / "m.nii.gz"
    refused(capsys, *segment(tiny_model, head_files[0], out), keyword="does not exist")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):  # root may write anywhere: make the folder read-only for access() too
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: Path(p) != locked and real_access(p, mode))
    try:
        refused(capsys, *segment(tiny_model, head_files[0], locked / "m.nii.gz"), keyword="not writable")
        refused(capsys, "segment", *head_files, "-o", locked / "masks", "--model", tiny_model,
                keyword="not writable")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_output_exists_refused_unless_overwrite(capsys, tiny_model, head_files, tmp_path):
    out = tmp_path / "m.nii.gz"
    out.write_bytes(b"keep me")
    refused(capsys, *segment(tiny_model, head_files[0], out), keyword="--overwrite")
    assert out.read_bytes() == b"keep me"
    code, _, err = run_cli(capsys, *segment(tiny_model, head_files[0], out, "--overwrite"))
    assert code == 0, err
    assert sitk.ReadImage(str(out)).GetSize() == sitk.ReadImage(str(head_files[0])).GetSize()
    dest = tmp_path / "a.safetensors"
    dest.write_bytes(b"old adapter")
    refused(capsys, "adapt", head_files[0], "-o", dest, "--model", tiny_model, keyword="--overwrite")
    assert dest.read_bytes() == b"old adapter"


# ---------------------------------------------------------------------------------------------------------------
# models and adapters
# ---------------------------------------------------------------------------------------------------------------
def test_corrupt_model_file(capsys, tiny_model, head_files, tmp_path):
    flipped = tmp_path / "flipped.safetensors"
    data = bytearray(tiny_model.read_bytes())
    data[-100] ^= 0xFF  # a weight byte: the SHA-256 in the metadata no longer matches
    flipped.write_bytes(bytes(data))
    out = tmp_path / "m.nii.gz"
    refused(capsys, "segment", head_files[0], "-o", out, "--model", flipped, keyword="corrupt", absent=out)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_model.read_bytes()[:500])
    refused(capsys, "segment", head_files[0], "-o", out, "--model", truncated, keyword="not a readable",
            absent=out)


def test_pth_model_points_to_import_checkpoint(capsys, head_files, tmp_path):
    from ConvLoRASegLib.unet import UNet2D

    pth = tmp_path / "unet.pth"
    torch.save(UNet2D(4).state_dict(), pth)
    out = tmp_path / "m.nii.gz"
    line = refused(capsys, "segment", head_files[0], "-o", out, "--model", pth, keyword="import-checkpoint",
                   absent=out)
    assert "pickle" in line


def test_adapter_of_another_base_model(capsys, tiny_model, other_model, head_files, tmp_path):
    foreign = make_adapter(other_model, tmp_path / "foreign.safetensors", name="foreign")
    out = tmp_path / "m.nii.gz"
    refused(capsys, "segment", head_files[0], "-o", out, "--model", tiny_model, "--adapter", foreign,
            keyword="another base model", absent=out)


def test_missing_adapter_name_and_file(capsys, tiny_model, head_files, tmp_path):
    out = tmp_path / "m.nii.gz"
    refused(capsys, *segment(tiny_model, head_files[0], out, "--adapter", "nosuch"), keyword="no adapter named")
    refused(capsys, *segment(tiny_model, head_files[0], out, "--adapter", tmp_path / "x.safetensors"),
            keyword="not found", absent=out)


def test_target_cohort_without_readable_volumes(capsys, tiny_model, tmp_path):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    (cohort / "a.nii.gz").write_text("broken")
    write(array_image(np.zeros((10, 12, 11))), cohort / "b.nii.gz")
    dest = tmp_path / "a.safetensors"
    code, _, err = run_cli(capsys, "adapt", cohort, "-o", dest, "--model", tiny_model)
    assert code == 2 and err.count("warning: skipped") == 2
    assert err.strip().splitlines()[-1] == f"{ERROR}the target cohort has no readable volumes (2 skipped)"
    assert not dest.exists()


def test_cohort_skips_unreadable_volumes(capsys, tiny_model, head_files, tmp_path):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    shutil.copy(head_files[0], cohort / "good.nii.gz")
    (cohort / "bad.nii.gz").write_text("broken")
    dest = tmp_path / "a.safetensors"
    code, _, err = run_cli(capsys, "adapt", cohort, "-o", dest, "--model", tiny_model, "--method", "adabn")
    assert code == 0 and "skipped bad.nii.gz" in err and dest.is_file()


# ---------------------------------------------------------------------------------------------------------------
# files cut short (an interrupted copy): SimpleITK reads a cut .nii.gz as zeros, the library refuses it
# ---------------------------------------------------------------------------------------------------------------
def cut_copy(src: Path, dest: Path, fraction: float = 1 / 3) -> Path:
    data = Path(src).read_bytes()
    dest.write_bytes(data[: int(len(data) * fraction)])
    return dest


def test_truncated_nifti_on_segment(capsys, tiny_model, head_files, tmp_path):
    bad = cut_copy(head_files[0], tmp_path / "trunc.nii.gz")
    before = sha(bad)
    out = tmp_path / "m.nii.gz"
    line = refused(capsys, *segment(tiny_model, bad, out), keyword="trunc.nii.gz is truncated", absent=out)
    assert "interrupted copy" in line
    folder = tmp_path / "out"
    refused(capsys, *segment(tiny_model, bad, folder), keyword="truncated", absent=folder)
    assert sha(bad) == before


def test_truncated_case_of_a_folder_is_a_failed_row(capsys, tiny_model, head_files, tmp_path):
    import json

    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for p in head_files:
        shutil.copy(p, cohort / p.name)
    cut_copy(head_files[0], cohort / "trunc.nii.gz")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *segment(tiny_model, cohort, out))
    assert code == 2 and "warning: skipped trunc.nii.gz: trunc.nii.gz is truncated" in err
    assert err.strip().splitlines()[-1] == f"{ERROR}1 of 3 volumes failed (see the warnings above); 2 written"
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    rows = {Path(r["input"]).name: r for r in manifest["cases"]}
    assert rows["trunc.nii.gz"]["status"] == "failed" and "truncated" in rows["trunc.nii.gz"]["flags"][0]
    assert all(rows[p.name]["status"] == "ok" for p in head_files)
    assert sorted(p.name for p in out.glob("*_brainmask.nii.gz")) == ["head0_brainmask.nii.gz",
                                                                       "head1_brainmask.nii.gz"]


def test_truncated_mask_on_evaluate(capsys, tmp_path):
    mask = sitk.GetImageFromArray((np.random.default_rng(0).random((30, 32, 34)) > 0.5).astype(np.uint8))
    write(mask, tmp_path / "truth.nii.gz")
    cut_copy(tmp_path / "truth.nii.gz", tmp_path / "pred.nii.gz")
    refused(capsys, "evaluate", tmp_path / "pred.nii.gz", tmp_path / "truth.nii.gz", keyword="pred.nii.gz is truncated")


def test_truncated_target_on_adapt(capsys, tiny_model, head_files, tmp_path):
    dest = tmp_path / "a.safetensors"
    bad = cut_copy(head_files[0], tmp_path / "trunc.nii.gz")
    line = refused(capsys, "adapt", bad, "-o", dest, "--model", tiny_model, "--method", "adabn",
                   keyword="no readable volumes", absent=dest)
    assert line.endswith("the target cohort has no readable volumes (1 skipped)")
    code, _, err = run_cli(capsys, "adapt", bad, head_files[1], "-o", dest, "--model", tiny_model, "--method",
                           "adabn", "--device", "cpu")
    assert code == 0 and "skipped trunc.nii.gz: trunc.nii.gz is truncated" in err and dest.is_file()
    from ConvLoRASegLib.store import read_adapter_info

    assert read_adapter_info(dest).details["target"]["skipped"] == ["trunc.nii.gz"]


# ---------------------------------------------------------------------------------------------------------------
# evaluate: a prediction or reference must be a label image
# ---------------------------------------------------------------------------------------------------------------
def test_evaluate_refuses_a_scan_given_as_a_mask(capsys, head_files, tmp_path):
    """``evaluate IMAGE MASK`` once scored a T1 scan as a prediction (Dice 0.46, exit 0)."""
    head = sitk.ReadImage(str(head_files[0]))
    mask = write(sitk.Cast(head > 50, sitk.sitkUInt8), tmp_path / "mask.nii.gz")
    code, out, err = run_cli(capsys, "evaluate", mask, mask)
    assert code == 0 and "1.0000" in out, err
    line = refused(capsys, "evaluate", head_files[0], mask, keyword="head0.nii.gz is not a label image")
    assert "non-integer values" in line
    t1 = write(sitk.Cast(head * 10, sitk.sitkInt16), tmp_path / "t1.nii.gz")  # a scan stored as integers
    line = refused(capsys, "evaluate", mask, t1, keyword="t1.nii.gz is not a label image")
    assert "distinct values" in line


def test_adapt_check_refuses_image_and_mask_swapped(capsys, tiny_model, head_files, tmp_path):
    head = sitk.ReadImage(str(head_files[0]))
    mask = write(sitk.Cast(head > 50, sitk.sitkUInt8), tmp_path / "mask.nii.gz")
    dest = tmp_path / "a.safetensors"
    refused(capsys, "adapt", head_files[1], "-o", dest, "--model", tiny_model, "--check", mask, head_files[0],
            keyword="head0.nii.gz is not a label image", absent=dest)


# ---------------------------------------------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(capsys, tiny_model, head_files, tmp_path):
    out = tmp_path / "m.nii.gz"
    refused(capsys, "segment", head_files[0], "-o", out, "--model", tiny_model, "--device", "cuda",
            keyword="no CUDA GPU", absent=out)
    refused(capsys, "adapt", head_files[0], "-o", tmp_path / "a.safetensors", "--model", tiny_model,
            "--device", "cuda:0", keyword="no CUDA GPU")
    code, _, err = run_cli(capsys, "segment", head_files[0], "-o", out, "--model", tiny_model, "--device", "auto")
    assert code == 0 and out.is_file()


def test_out_of_memory_retries_with_smaller_batches(capsys, tiny_model, head_files, tmp_path, simulated_oom):
    seen = simulated_oom
    out = tmp_path / "m.nii.gz"
    code, _, err = run_cli(capsys, *segment(tiny_model, head_files[0], out))
    assert code == 0, err
    assert seen[0] > 2 and max(seen[seen.index(2):]) == 2  # halved until it fits, then kept small
    assert out.is_file()


def test_unknown_device(capsys, tiny_model, head_files, tmp_path):
    refused(capsys, *segment(tiny_model, head_files[0], tmp_path / "m.nii.gz")[:-2], "--device", "tpu",
            keyword="device")


@pytest.mark.parametrize("extra, keyword", [(["--bias-field", "1.2"], "augment_3d"),
                                            (["--bias-field", "-1", "--augment-3d", "1"], "bias field")])
def test_train_bias_field_refused_without_3d_augmentation_or_below_zero(capsys, tmp_path, extra, keyword):
    for sub in ("img", "msk"):
        (tmp_path / sub).mkdir()
    for i in range(2):
        img = synthetic_head(seed=i)
        write(img, tmp_path / "img" / f"s{i}.nii.gz")
        write(sitk.Cast(img > 50, sitk.sitkUInt8), tmp_path / "msk" / f"s{i}_mask.nii.gz")
    out = tmp_path / "m.safetensors"
    refused(capsys, "train", "--images", tmp_path / "img", "--masks", tmp_path / "msk", "-o", out, "--spacing", "4",
            "--slice-size", "64", "--epochs", "1", "--val-fraction", "0", "--device", "cpu", *extra,
            keyword=keyword, absent=out)
