"""convlora-seg: every command in-process through ``cli.main`` (fast), and real subprocesses for the JSON line
protocol, exit codes and SIGTERM -> 130 without partial output. A tiny model (4 mm, 64 x 64, 4 filters) and
small synthetic heads keep it quick."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ConvLoRASegLib import cli
from ConvLoRASegLib.grid import WorkingGrid
from ConvLoRASegLib.model import ConvLoRASegModel
from ConvLoRASegLib.store import (AdapterStore, load_adapter, load_model, read_adapter_info, save_adapter,
                                   save_model)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# shared fixtures (test_bad_input imports them)
# ---------------------------------------------------------------------------------------------------------------
def synthetic_head(seed: int = 0, shape=(40, 48, 44), spacing=(3.0, 3.0, 3.0), scale: float = 100.0,
                   offset: float = 0.0) -> sitk.Image:
    """A blob "head" (numpy shape z, y, x) with a brighter core, on an oblique-free 3 mm grid."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    c = [s / 2 for s in shape]
    r2 = ((x - c[2]) / (shape[2] * 0.3)) ** 2 + ((y - c[1]) / (shape[1] * 0.3)) ** 2 + ((z - c[0]) / (shape[0] * 0.3)) ** 2
    a = scale * (0.6 * (r2 < 1) + 0.4 * (r2 < 0.5)) + rng.normal(0, 0.02 * scale, shape)
    img = sitk.GetImageFromArray(np.clip(a, 0, None).astype(np.float32) + np.float32(offset))
    img.SetSpacing(spacing)
    img.SetOrigin((-60.0, -70.0, -50.0))
    return img


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One torch thread: on 2 shared cores, two threads contend and run >10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = ConvLoRASegModel(grid=WorkingGrid(spacing_mm=4.0, slice_size=64), n_filters=4,
                             info={"purpose": "CLI tests"})
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_model(model, path)
    return path


@pytest.fixture(scope="session")
def other_model(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    model = ConvLoRASegModel(grid=WorkingGrid(spacing_mm=4.0, slice_size=64), n_filters=4)
    path = tmp_path_factory.mktemp("models") / "other.safetensors"
    save_model(model, path)
    return path


@pytest.fixture(scope="session")
def head_files(tmp_path_factory) -> List[Path]:
    folder = tmp_path_factory.mktemp("heads")
    paths = []
    for i in range(2):
        p = folder / f"head{i}.nii.gz"
        sitk.WriteImage(synthetic_head(seed=i), str(p))
        paths.append(p)
    return paths


def make_adapter(model_path: Path, dest: Path, name: str = "siteA") -> Path:
    """An AdaBN adapter (no training: fast) of ``model_path``."""
    from ConvLoRASegLib.selftrain import adapt
    from ConvLoRASegLib.volumes import to_slices

    model = load_model(model_path)
    slices = to_slices(synthetic_head(seed=5, scale=300.0), model.grid).slices
    result = adapt(model, [slices], method="adabn", epochs=0, device="cpu")
    save_adapter(model, result.state, dest, name=name, method=result.method, mode=result.mode, rank=result.rank,
                 alpha=result.alpha, placement=result.placement, details=result.summary())
    return dest


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model, tmp_path_factory) -> Path:
    return make_adapter(tiny_model, tmp_path_factory.mktemp("adapters") / "siteA.safetensors")


def run_cli(capsys, *argv: str) -> tuple:
    """(exit code, stdout, stderr) of ``convlora-seg argv`` run in-process."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def json_lines(text: str) -> List[Dict]:
    events = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert all("event" in e for e in events)
    return events


def subprocess_env(tmp_path: Path) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), CONVLORASEG_HOME=str(tmp_path / "store"), OMP_NUM_THREADS="1")
    return env


# ---------------------------------------------------------------------------------------------------------------
# segment
# ---------------------------------------------------------------------------------------------------------------
def test_segment_one_file_keeps_the_input_grid(capsys, tiny_model, head_files, tmp_path):
    before = sha(head_files[0])
    out = tmp_path / "mask.nii.gz"
    code, stdout, err = run_cli(capsys, "segment", head_files[0], "-o", out, "--model", tiny_model, "--device", "cpu")
    assert code == 0, err
    mask, image = sitk.ReadImage(str(out)), sitk.ReadImage(str(head_files[0]))
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert mask.GetSize() == image.GetSize() and mask.GetOrigin() == image.GetOrigin()
    assert np.allclose(mask.GetSpacing(), image.GetSpacing()) and mask.GetDirection() == image.GetDirection()
    assert set(np.unique(sitk.GetArrayViewFromImage(mask))) <= {0, 1}
    assert "mask.nii.gz" in stdout
    assert sha(head_files[0]) == before  # the input is never modified


def test_segment_several_into_a_folder_with_json(capsys, tiny_model, head_files, tmp_path):
    out = tmp_path / "masks"
    code, stdout, err = run_cli(capsys, "segment", *head_files, "-o", out, "--model", tiny_model, "--json",
                                "--probabilities")
    assert code == 0, err
    events = json_lines(stdout)
    assert events[-1]["event"] == "done" and len(events[-1]["outputs"]) == 2
    assert any(e["event"] == "progress" and e["stage"] == "segment" for e in events)
    assert sorted(p.name for p in out.iterdir()) == ["head0_brainprob.nii.gz", "head1_brainprob.nii.gz",
                                                     "manifest.csv", "manifest.json"]
    prob = sitk.ReadImage(str(out / "head0_brainprob.nii.gz"))
    assert prob.GetPixelID() == sitk.sitkFloat32


@pytest.mark.slow
def test_segment_with_adapter_file_name_and_auto(capsys, tiny_model, tiny_adapter, head_files, tmp_path,
                                                 monkeypatch):
    from ConvLoRASegLib import segment, volumes

    calls = {"read": 0, "to_slices": 0}
    real_load, real_slices = segment.load_adapter, volumes.to_slices

    def counting_load(*a):
        calls["read"] += 1
        return real_load(*a)

    def counting_slices(*a, **k):
        calls["to_slices"] += 1
        return real_slices(*a, **k)

    monkeypatch.setattr(segment, "load_adapter", counting_load)
    monkeypatch.setattr(volumes, "to_slices", counting_slices)
    code, _, err = run_cli(capsys, "segment", head_files[0], "-o", tmp_path / "a.nii.gz", "--model", tiny_model,
                           "--adapter", tiny_adapter)
    assert code == 0, err
    assert calls == {"read": 1, "to_slices": 1}  # the adapter file is read once (checked, then used)
    code, _, err = run_cli(capsys, "adapters", "import", tiny_adapter, "--name", "scannerX")
    assert code == 0, err
    code, _, err = run_cli(capsys, "segment", head_files[0], "-o", tmp_path / "b.nii.gz", "--model", tiny_model,
                           "--adapter", "scannerX")
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "segment", head_files[0], "-o", tmp_path / "c.nii.gz", "--model",
                                tiny_model, "--adapter", "auto", "--adapters", tiny_adapter.parent, "--json")
    assert code == 0, err
    assert calls["to_slices"] == 3  # auto: one working grid for the choice and the segmentation
    done = json_lines(stdout)[-1]
    scores = done["outputs"][0]["adapter_scores"]
    assert set(scores) == {"source", "siteA"} and all(0.0 <= v <= 1.0 for v in scores.values())
    assert "chose" in err  # the choice and its score are printed (stderr with --json)


def test_segment_auto_without_adapters_uses_source(capsys, tiny_model, head_files, tmp_path):
    code, _, err = run_cli(capsys, "segment", head_files[0], "-o", tmp_path / "m.nii.gz", "--model", tiny_model,
                           "--adapter", "auto")
    assert code == 0 and "no adapters" in err


def test_segment_checks_the_adapter_on_each_scan(capsys, monkeypatch, tiny_model, tiny_adapter, head_files,
                                                 tmp_path):
    """``--adapter FILE`` uses the adapter only where it beats the unadapted model on the scan (the label-free
    per-scan check), and says so where it does not; ``--no-scan-check`` uses it regardless. The check's passes
    give the winner's mask: no extra segmentation pass."""
    from ConvLoRASegLib import segment, selection

    passes = {"n": 0}
    real_predict = segment.predict_slices

    def counting_predict(*a, **k):
        passes["n"] += 1
        return real_predict(*a, **k)

    # the passes of the per-scan check (selection) and of the segmentation itself (segment)
    monkeypatch.setattr(segment, "predict_slices", counting_predict)
    monkeypatch.setattr(selection, "predict_slices", counting_predict)

    def outcome(*extra):
        code, stdout, err = run_cli(capsys, "segment", head_files[0], "-o", tmp_path / f"m{len(extra)}.nii.gz",
                                    "--model", tiny_model, "--adapter", tiny_adapter, "--json", "--overwrite",
                                    *extra)
        assert code == 0, err
        return json_lines(stdout)[-1]["outputs"][0], err

    # the tiny adapter scores exactly as the source model (ties go to no adapter): refused, with a warning
    row, err = outcome()
    assert row["adapter"] is None and set(row["adapter_scores"]) == {"source", "siteA"}
    assert any("did not beat the unadapted model" in w for w in row["warnings"]) and "--no-scan-check" in err
    assert passes["n"] == 2 * 3  # source, adapter: (final + ESH) and two perturbed shares; the mask reuses one
    # the rule prefers the adapter: used, no warning
    monkeypatch.setattr(selection, "choose_volume_scores", lambda scores, order=(): "siteA")
    row, _ = outcome()
    assert row["adapter"] == "siteA" and not row["warnings"]
    # unchecked: used, never scored against the source
    monkeypatch.setattr(selection, "choose_volume_scores", lambda scores, order=(): "source")
    passes["n"] = 0
    row, err = outcome("--no-scan-check")
    assert row["adapter"] == "siteA" and "adapter_scores" not in row and passes["n"] == 1


def test_an_adapter_of_a_method_the_checks_do_not_guard_says_so(capsys, tiny_model, head_files, tmp_path):
    """An adapter made by one of the paper's comparison methods (the label-free checks let worse ones through on
    Table 1) warns wherever it is used, checked or not, unless a labelled scan checked it when it was made; the
    product's methods do not."""
    from ConvLoRASegLib.selection import GUARDED_METHODS, unguarded_adapter

    model = load_model(tiny_model)
    info, state = load_adapter(model, make_adapter(tiny_model, tmp_path / "src.safetensors", name="siteB"))

    def relabelled(method: str, details=None) -> Path:
        """The one AdaBN adapter's tensors, stored as if ``method`` had made them."""
        dest = tmp_path / f"{method}{'_checked' if details else ''}.safetensors"
        save_adapter(model, state, dest, name="siteB", method=method, mode=info.mode, rank=info.rank, alpha=1.0,
                     placement=info.placement, details={**info.details, **(details or {})})
        return dest

    def warnings_of(adapter: Path) -> List[str]:
        code, stdout, err = run_cli(capsys, "segment", head_files[0], "-o", tmp_path / "m.nii.gz", "--model",
                                    tiny_model, "--adapter", adapter, "--no-scan-check", "--json", "--overwrite")
        assert code == 0, err
        return json_lines(stdout)[-1]["outputs"][0]["warnings"]

    assert GUARDED_METHODS == ("convlora-adabn", "adabn")
    for method in ("udas", "udas-convlora", "self-training"):
        warned = warnings_of(relabelled(method))
        assert len(warned) == 1 and f"made with {method}" in warned[0] and "adapt --check" in warned[0]
    assert warnings_of(relabelled("adabn")) == []
    assert warnings_of(relabelled("udas", {"labelled_check": {"scans": ["a.nii.gz"]}})) == []
    assert unguarded_adapter(None) is None
    # adapt says it when it writes such an adapter (and an adapter that changes nothing says that instead)
    from types import SimpleNamespace

    from ConvLoRASegLib.batch import AdaptRun
    from ConvLoRASegLib.store import read_adapter_info

    def adapt_warning(adapter: Path, adapted: bool = True):
        info = read_adapter_info(adapter)
        result = SimpleNamespace(candidates={"source": 0.7, "epoch 1": 0.8}, n_slices=10, method=info.method,
                                 mode="fast", rank=2, placement="init_path", verdict=lambda: "selected: epoch 1",
                                 trainable_params=10, seconds=1.0, adapted=adapted, agreement_source=0.7,
                                 selected="epoch 1")
        return AdaptRun(info, result, [head_files[0]], [], "epoch 1").report()[1]

    assert "made with self-training" in adapt_warning(tmp_path / "self-training.safetensors")
    assert adapt_warning(tmp_path / "adabn.safetensors") is None
    assert "changes nothing" in adapt_warning(tmp_path / "udas.safetensors", adapted=False)


# ---------------------------------------------------------------------------------------------------------------
# adapt, info, adapters
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_adapt_to_file_and_to_store(capsys, tiny_model, head_files, tmp_path):
    hashes = [sha(p) for p in head_files]
    dest = tmp_path / "site.safetensors"
    code, stdout, err = run_cli(capsys, "adapt", head_files[0].parent, "-o", dest, "--model", tiny_model,
                                "--epochs", "1", "--device", "cpu", "--json")
    assert code == 0, err
    events = json_lines(stdout)
    stages = {e.get("stage") for e in events if e["event"] == "progress"}
    assert {"read", "adabn", "train", "select", "save"} <= stages
    done = events[-1]
    assert done["event"] == "done" and Path(done["adapter"]["path"]) == dest
    info = read_adapter_info(dest)
    assert info.method == "convlora-adabn" and info.details["target"]["files"] == ["head0.nii.gz", "head1.nii.gz"]
    summary = done["summary"]
    assert 0 < summary["trainable_percent"] < 5 and summary["adapter_bytes"] < summary["model_bytes"]
    assert [sha(p) for p in head_files] == hashes
    # the selection's verdict is in the JSON and, when no candidate beat the unadapted model, a warning says so
    assert set(summary["candidates"]) == {"source", "adabn", "epoch 1"}
    assert summary["selected"] in summary["candidates"] and summary["adapted"] == (summary["selected"] != "source")
    assert summary["score_source"] == summary["candidates"]["source"]
    assert ("did not beat the unadapted model" in err) == (not summary["adapted"])
    assert info.details["selected"] == summary["selected"]

    code, stdout, err = run_cli(capsys, "adapt", *head_files, "--name", "ge-site", "--model", tiny_model,
                                "--method", "adabn")
    assert code == 0, err
    assert "label-free score" in stdout and "% of the base model" in stdout
    model = load_model(tiny_model)
    assert [i.name for i in AdapterStore().list(model.sha256)] == ["ge-site"]


def test_info_model_and_adapter(capsys, tiny_model, tiny_adapter):
    code, stdout, _ = run_cli(capsys, "info", tiny_model, "--json")
    done = json_lines(stdout)[-1]
    assert code == 0 and done["kind"] == "model" and done["grid"]["slice_size"] == 64
    assert len(done["file_sha256"]) == 64 and done["n_parameters"] > 0
    code, stdout, _ = run_cli(capsys, "info", tiny_adapter, "--model", tiny_model, "--json")
    done = json_lines(stdout)[-1]
    assert code == 0 and done["kind"] == "adapter" and 0 <= done["trainable_percent"] < 5


def test_info_describes_the_bundled_model_and_names_what_it_expects(capsys, head_files, tmp_path):
    from ConvLoRASegLib.store import default_model_path

    if not default_model_path().is_file():
        pytest.skip("the bundled default model is not installed")
    for argv in (["info"], ["info", "bundled"]):
        code, stdout, err = run_cli(capsys, *argv)
        assert code == 0 and stdout.startswith(f"model {default_model_path()} (the bundled default model)"), err
    code, _, err = run_cli(capsys, "info", head_files[0])
    assert code == 2 and err.count("\n") == 1 and "UTF-8" not in err
    assert err.startswith("convlora-seg: error: head0.nii.gz is not a .safetensors file: info describes a model or "
                          "adapter .safetensors file")
    code, _, err = run_cli(capsys, "info", tmp_path / "nope.safetensors")
    assert code == 2 and err.endswith("nope.safetensors: no such file\n")
    code, _, err = run_cli(capsys, "segment", head_files[0], "-o", tmp_path / "m.nii.gz", "--model", head_files[1])
    assert code == 2 and "head1.nii.gz is not a .safetensors file: a model file" in err


@pytest.mark.slow
def test_adapt_and_info_count_and_name_the_same_quantities(capsys, tiny_model, head_files, tmp_path,
                                                           monkeypatch):
    """adapt said "trainable parameters 3,954 = 0.16 %" and info "10,292 parameters, 0.42 %" of one adapter; segment
    said "score" and "agreement" of one scan. One name per quantity, each saying what it counts."""
    from ConvLoRASegLib import selftrain

    # the tiny random model keeps the source model; take the trained candidate so the file holds what it trained
    monkeypatch.setattr(selftrain, "choose", lambda table, **_: "epoch 1")
    dest = tmp_path / "site.safetensors"
    code, stdout, err = run_cli(capsys, "adapt", head_files[0], "-o", dest, "--model", tiny_model, "--epochs", "1",
                                "--device", "cpu", "--json")
    assert code == 0, err
    adapted = json_lines(stdout)[-1]["summary"]
    code, text, err = run_cli(capsys, "adapt", head_files[0], "-o", dest, "--model", tiny_model, "--epochs", "1",
                              "--device", "cpu", "--overwrite")
    assert code == 0, err
    code, stdout, _ = run_cli(capsys, "info", dest, "--model", tiny_model, "--json")
    info = json_lines(stdout)[-1]
    code, shown, _ = run_cli(capsys, "info", dest, "--model", tiny_model)
    for key in ("trainable_params", "trainable_percent", "stored_values", "base_params"):
        assert info[key] == adapted[key], key
    assert adapted["stored_values"] > adapted["trainable_params"] > 0 and adapted["selected"] == "epoch 1"
    line = f"trainable parameters (ConvLoRA A and B + BatchNorm scale and shift of the placement): " \
           f"{adapted['trainable_params']:,} = {adapted['trainable_percent']:.2f} % of the base model's"
    stored = f"stored in the adapter file: {adapted['stored_values']:,} values (the trainable parameters + " \
             "BatchNorm statistics)"
    assert line in text and line in shown and stored in text and stored in shown
    assert info["score"] == adapted["score_selected"]
    assert f"label-free score (ESH agreement + gamma consistency) {info['score']:.3f}\n" in shown  # rounded
    code, out, err = run_cli(capsys, "segment", head_files[0], "-o", tmp_path / "n.nii.gz", "--model", tiny_model,
                             "--adapter", "auto", "--adapters", tmp_path)
    assert code == 0 and "ESH agreement 0." in out and ": chose " in out and "label-free score 0." in out
    assert " score 0." not in out.replace("label-free score 0.", "")


def test_adapters_store_commands(capsys, tiny_model, tiny_adapter, tmp_path):
    assert run_cli(capsys, "adapters", "import", tiny_adapter)[0] == 0
    code, stdout, _ = run_cli(capsys, "adapters", "list", "--model", tiny_model, "--json")
    assert code == 0 and [a["name"] for a in json_lines(stdout)[-1]["adapters"]] == ["siteA"]
    assert run_cli(capsys, "adapters", "rename", "siteA", "siteB", "--model", tiny_model)[0] == 0
    dest = tmp_path / "exported.safetensors"
    assert run_cli(capsys, "adapters", "export", "siteB", dest, "--model", tiny_model)[0] == 0
    assert read_adapter_info(dest).name == "siteB"
    assert run_cli(capsys, "adapters", "delete", "siteB", "--model", tiny_model)[0] == 0
    code, _, err = run_cli(capsys, "adapters", "delete", "siteB", "--model", tiny_model)
    assert code == 2 and "no adapter named" in err


# ---------------------------------------------------------------------------------------------------------------
# evaluate, train, import-checkpoint
# ---------------------------------------------------------------------------------------------------------------
def _mask_of(image: sitk.Image, threshold: float) -> sitk.Image:
    return sitk.Cast(image > threshold, sitk.sitkUInt8)


def test_evaluate_files_and_folders(capsys, tmp_path):
    img = synthetic_head()
    (tmp_path / "pred").mkdir()
    (tmp_path / "truth").mkdir()
    sitk.WriteImage(_mask_of(img, 50), str(tmp_path / "pred" / "s1_brainmask.nii.gz"))
    sitk.WriteImage(_mask_of(img, 50), str(tmp_path / "truth" / "s1.nii.gz"))
    sitk.WriteImage(_mask_of(img, 80), str(tmp_path / "pred" / "s2_brainmask.nii.gz"))
    sitk.WriteImage(_mask_of(img, 50), str(tmp_path / "truth" / "s2_mask.nii.gz"))
    code, stdout, _ = run_cli(capsys, "evaluate", tmp_path / "pred" / "s1_brainmask.nii.gz",
                              tmp_path / "truth" / "s1.nii.gz", "--json")
    case = json_lines(stdout)[-1]["cases"][0]
    assert code == 0 and case["dice"] == 1.0 and case["surface_dice"] == 1.0 and case["hd95_mm"] == 0.0
    code, stdout, _ = run_cli(capsys, "evaluate", tmp_path / "pred", tmp_path / "truth", "--tolerance", "2")
    assert code == 0 and "mean" in stdout
    rows = {line.split()[0]: float(line.split()[1]) for line in stdout.splitlines()[1:]}
    assert rows["s1_brainmask.nii.gz"] == 1.0 and 0.2 < rows["s2_brainmask.nii.gz"] < 1.0


@pytest.mark.slow
def test_train_small_model(capsys, tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    for i in range(3):
        img = synthetic_head(seed=i)
        sitk.WriteImage(img, str(tmp_path / "img" / f"s{i}.nii.gz"))
        sitk.WriteImage(_mask_of(img, 50), str(tmp_path / "msk" / f"s{i}_mask.nii.gz"))
    out = tmp_path / "m.safetensors"
    code, stdout, err = run_cli(capsys, "train", "--images", tmp_path / "img", "--masks", tmp_path / "msk", "-o",
                                out, "--spacing", "4", "--slice-size", "64", "--epochs", "1", "--esh-epochs", "1",
                                "--val-fraction", "0.34", "--device", "cpu", "--targets", "partial-volume", "--json")
    assert code == 0, err
    done = json_lines(stdout)[-1]
    model = load_model(out)
    assert model.grid == WorkingGrid(spacing_mm=4.0, slice_size=64) and done["sha256"] == model.sha256
    assert len(model.info["val_images"]) == 1 and len(model.info["train_images"]) == 2
    assert model.info["training"]["targets"] == "partial_volume"


@pytest.mark.slow
def test_train_resume_from_checkpoint(capsys, tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    for i in range(2):
        img = synthetic_head(seed=i)
        sitk.WriteImage(img, str(tmp_path / "img" / f"s{i}.nii.gz"))
        sitk.WriteImage(_mask_of(img, 50), str(tmp_path / "msk" / f"s{i}_mask.nii.gz"))
    out = tmp_path / "m.safetensors"
    args = ["train", "--images", tmp_path / "img", "--masks", tmp_path / "msk", "-o", out, "--spacing", "4",
            "--slice-size", "64", "--epochs", "2", "--esh-epochs", "1", "--val-fraction", "0", "--device", "cpu",
            "--steps-per-epoch", "2", "--batch-size", "4", "--precision", "fp32", "--lr-schedule", "cosine",
            "--checkpoint-every", "1", "--json"]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    ckpt = tmp_path / "m.checkpoint.safetensors"
    assert ckpt.is_file()
    first = load_model(out)
    code, stdout, err = run_cli(capsys, *args, "--resume", "--overwrite")
    assert code == 0, err
    again = load_model(out)
    assert again.info["training"]["resumed_at_steps"] == [4]  # the finished U-Net stage is not trained again
    assert torch.equal(first.unet.init_path[0].weight, again.unet.init_path[0].weight)
    code, _, err = run_cli(capsys, *args, "--resume", "--overwrite", "--lr", "0.01")
    assert code == 2 and "other settings" in err and "Traceback" not in err


def test_import_checkpoint_without_pickle(capsys, tmp_path):
    from ConvLoRASegLib.esh import EarlySegmentationHead
    from ConvLoRASegLib.unet import UNet2D

    torch.manual_seed(3)
    unet, esh = UNet2D(16), EarlySegmentationHead(3, 16)
    torch.save(unet.state_dict(), tmp_path / "unet.pth")
    torch.save(esh.state_dict(), tmp_path / "esh.pth")
    out = tmp_path / "imported.safetensors"
    code, _, err = run_cli(capsys, "import-checkpoint", tmp_path / "unet.pth", "--esh", tmp_path / "esh.pth",
                           "-o", out, "--spacing", "1", "--slice-size", "256")
    assert code == 0, err
    model = load_model(out)
    assert torch.equal(model.unet.init_path[0].weight, unet.init_path[0].weight)
    assert torch.equal(model.esh.conv1.weight, esh.conv1.weight) and model.grid.slice_size == 256
    assert model.grid.normalisation == "minmax"  # the paper's code min-max scales each volume
    code, _, err = run_cli(capsys, "import-checkpoint", tmp_path / "unet.pth", "-o", tmp_path / "p.safetensors",
                           "--spacing", "1", "--slice-size", "256", "--normalisation", "percentile")
    assert code == 0, err
    assert load_model(tmp_path / "p.safetensors").grid.normalisation == "percentile"


# ---------------------------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------------------------
def test_png_writer_round_trip(tmp_path):
    from ConvLoRASegLib.demo import png_bytes, write_png

    rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    data = png_bytes(rgb)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    import zlib

    idat = data[data.index(b"IDAT") + 4: data.index(b"IEND") - 8]
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(7, 1 + 5 * 3)
    assert (raw[:, 0] == 0).all() and np.array_equal(raw[:, 1:].reshape(7, 5, 3), rgb)
    write_png(rgb, tmp_path / "x.png")
    assert (tmp_path / "x.png").read_bytes() == data


@pytest.mark.slow
def test_demo_end_to_end(capsys, tiny_model, tmp_path, monkeypatch):
    from ConvLoRASegLib import sites

    heads = sites.demo_heads()
    if len(heads) < 2:
        pytest.skip("demo heads not shipped")
    two = dict(sorted(heads.items())[:2])
    monkeypatch.setattr(sites, "demo_heads", lambda: two)
    monkeypatch.setattr("ConvLoRASegLib.demo.SUBJECTS_PER_HEAD", (1, 1))
    monkeypatch.setattr("ConvLoRASegLib.demo.EPOCHS", (1, 1))
    out = tmp_path / "demo"
    code, stdout, err = run_cli(capsys, "demo", "-o", out, "--quick", "--model", tiny_model)
    assert code == 0, err
    for line in ("Dice", "surface Dice (1 mm)", "adapter"):
        assert line in stdout
    names = {p.name for p in out.iterdir()}
    assert {"adapter_philips3.safetensors", "before_after.png"} <= names
    assert any(n.endswith("_source_brainmask.nii.gz") for n in names)
    assert any(n.endswith("_adapted_brainmask.nii.gz") for n in names)
    assert (out / "before_after.png").read_bytes()[:4] == b"\x89PNG"
    # it says which candidate it kept and why, and why the adapted segmentation takes longer
    assert "and kept " in stdout and "label-free score" in stdout and "selected (" not in stdout
    assert "the per-scan check segments it with and without the adapter" in stdout


def _read_png(data: bytes) -> np.ndarray:
    """The RGB array of a PNG as demo.png_bytes writes it (one IDAT, filter 0 on every row)."""
    import struct
    import zlib

    w, h = struct.unpack(">II", data[16:24])
    raw = np.frombuffer(zlib.decompress(data[data.index(b"IDAT") + 4: data.index(b"IEND") - 8]), np.uint8)
    return raw.reshape(h, 1 + 3 * w)[:, 1:].reshape(h, w, 3)


def test_demo_picture_without_matplotlib_has_titles_scores_and_legend(tmp_path, monkeypatch):
    """Without matplotlib the PNG was two unlabelled panels: now each has its title and scores, in a built-in
    font, and a legend names the colours."""
    from ConvLoRASegLib import demo

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    head = synthetic_head(shape=(40, 130, 60))
    truth = sitk.Cast(head > 50, sitk.sitkUInt8)
    path = demo.write_overlay_png(tmp_path / "p.png", head, truth, truth, sitk.BinaryErode(truth, [1, 1, 1]),
                                  ("before: source model", "after: with the adapter"), [(0.912, 0.745), (0.9, 0.8)])
    rgb = _read_png(path.read_bytes())
    grey, _ = demo.sagittal_view(head, truth)
    panel_w = grey.shape[1] * 2  # a small panel is doubled so that the text is two font pixels high
    lines = demo._wrap(["before: source model", "Dice 0.912", "surface Dice 0.745"], (panel_w - 8) // 12)
    assert lines[-2:] == ["Dice 0.912", "surface Dice 0.745"] and "".join(lines[:-2]).startswith("before:")
    expected = demo._band(panel_w, lines, 2)
    assert np.array_equal(rgb[:expected.shape[0], :panel_w], expected)
    assert (expected == 0).all(axis=2).sum() > 300  # the text is there, in black
    legend = rgb[-20:]
    red = (np.array(demo.PREDICTED_RGB) * 255).round().astype(np.uint8)
    green = (np.array(demo.TRUTH_RGB) * 255).round().astype(np.uint8)
    assert (legend == red).all(axis=2).sum() == 14 * 14 and (legend == green).all(axis=2).sum() == 14 * 14
    assert set("BEFORE: SOURCE MODEL, DICE 0.912 (PER-SCAN CHECK) PREDICTED BRAIN TRUE OUTLINE") <= set(demo.FONT)
    assert demo._wrap(["after: adapter not used (per-scan check)"], 20) == ["after: adapter not", "used (per-scan",
                                                                          "check)"]


# ---------------------------------------------------------------------------------------------------------------
# real processes: JSON lines, exit codes, SIGTERM
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_subprocess_json_protocol_and_exit_codes(tiny_model, head_files, tmp_path):
    cmd = [sys.executable, "-m", "ConvLoRASegLib"]
    env = subprocess_env(tmp_path)
    ok = subprocess.run(cmd + ["segment", str(head_files[0]), "-o", str(tmp_path / "m.nii.gz"), "--model",
                               str(tiny_model), "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    events = json_lines(ok.stdout)  # every stdout line is a JSON object
    assert events[-1]["event"] == "done" and events[-1]["outputs"][0]["output"].endswith("m.nii.gz")
    bad = subprocess.run(cmd + ["segment", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "x.nii.gz"),
                                "--model", str(tiny_model), "--json"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2
    assert json_lines(bad.stdout) == [{"event": "error", "message": bad.stderr.strip()[len("convlora-seg: error: "):]}]
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    usage = subprocess.run(cmd + ["segment"], env=env, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2


def _start_and_wait_for(cmd: List[str], env, stage: str, timeout: float = 90.0) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    for line in proc.stdout:
        if f'"stage": "{stage}"' in line:
            return proc
        assert time.time() - t0 < timeout, "the process never reached the stage"
    raise AssertionError(f"the process ended before stage {stage}: {proc.stderr.read()}")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["adapt", "segment"])
def test_sigterm_exits_130_without_partial_output(command, tiny_model, head_files, tmp_path):
    env = subprocess_env(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if command == "adapt":
        dest = out_dir / "a.safetensors"
        args = ["adapt", str(head_files[0]), "-o", str(dest), "--model", str(tiny_model), "--epochs", "200"]
        stage = "train"
    else:
        dest = out_dir / "mask.nii.gz"
        big = tmp_path / "big.nii.gz"  # fine grid: slow enough to be interrupted
        sitk.WriteImage(synthetic_head(shape=(120, 140, 130), spacing=(1.0, 1.0, 1.0)), str(big))
        args = ["segment", str(big), "-o", str(dest), "--model", str(tiny_model), "--adapter", "auto",
                "--adapters", str(tmp_path)]
        stage = "segment"
    before = sha(head_files[0])
    proc = _start_and_wait_for([sys.executable, "-m", "ConvLoRASegLib", *args, "--json"], env, stage)
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert '{"event": "cancelled"}' in rest
    # No partial output and no temporary file. On a loaded machine the signal can land after the output was
    # renamed into place (the run's last step); then that file is complete (documented: "no partial output").
    left = list(out_dir.iterdir())
    assert left in ([], [dest]), left
    if left and command == "segment":
        assert sitk.ReadImage(str(dest)).GetSize() == sitk.ReadImage(str(big)).GetSize()  # complete, readable
    elif left:
        load_adapter(load_model(tiny_model), dest)  # raises on a corrupt or partial file (its checksum)
    assert sha(head_files[0]) == before


def test_reporter_modes():
    import io

    from ConvLoRASegLib.progress import Reporter, jsonable

    out, err = io.StringIO(), io.StringIO()
    rep = Reporter("json", stdout=out, stderr=err)
    rep({"event": "progress", "stage": "train", "step": 1, "total": 4, "loss": np.float32(0.5)})
    rep.info("for humans")
    rep.done({"hd95_mm": float("inf"), "path": Path("/x")})
    events = json_lines(out.getvalue())
    assert events == [{"event": "progress", "stage": "train", "step": 1, "total": 4, "loss": 0.5},
                      {"event": "done", "hd95_mm": None, "path": "/x"}]
    assert err.getvalue() == "for humans\n"
    out, err = io.StringIO(), io.StringIO()
    bar = Reporter("bar", stdout=out, stderr=err)
    for step in range(1, 4):
        bar({"event": "progress", "stage": "segment", "step": step, "total": 3, "epoch": 1})
    bar.error("boom")
    assert "segment" in err.getvalue() and err.getvalue().endswith("convlora-seg: error: boom\n")
    assert out.getvalue() == ""
    silent = Reporter("silent", stdout=out, stderr=err)
    silent({"event": "progress", "stage": "x", "step": 1, "total": 2})
    assert out.getvalue() == "" and jsonable({"a": (1, float("nan"))}) == {"a": [1, None]}


def test_without_a_terminal_progress_is_a_plain_line_every_few_seconds():
    """``adapt`` under nohup or in CI once printed nothing for 15 minutes: without a terminal, progress is a line on
    stderr at most every interval (and at each new stage), with the stage, the epoch, the time since the start and
    what is left of the stage."""
    import io
    import sys as _sys

    from ConvLoRASegLib.progress import LINE_INTERVAL_S, Reporter

    now = [0.0]
    out, err = io.StringIO(), io.StringIO()
    rep = Reporter("lines", stdout=out, stderr=err, clock=lambda: now[0])
    rep({"event": "progress", "stage": "adabn", "step": 0, "total": 100})
    for epoch in (1, 2):
        for step in range(1, 9):
            now[0] += 2.0
            rep({"event": "progress", "stage": "train", "step": step, "total": 8, "epoch": epoch, "epochs": 4,
                 "loss": 0.25})
    rep.close()
    lines = err.getvalue().splitlines()
    assert out.getvalue() == "" and lines[0] == "convlora-seg: 0 s elapsed: adabn, step 0/100"
    assert lines[1] == "convlora-seg: 2 s elapsed: train, epoch 1 of 4, step 1/8, loss 0.250"  # a new stage
    assert lines[2].startswith("convlora-seg: 12 s elapsed: train, epoch 1 of 4, step 6/8, loss 0.250; about ")
    assert lines[2].endswith("left in train") and "about 52 s left" in lines[2]  # 26 of 32 steps at 2 s each
    assert len(lines) == 2 + int(30 // LINE_INTERVAL_S)  # 32 s of training: at most one line every interval
    assert Reporter.for_cli(False).mode == ("bar" if _sys.stderr.isatty() else "lines")


def test_a_long_step_still_gets_a_line(monkeypatch):
    import io
    import time as _time

    from ConvLoRASegLib.progress import Reporter

    err = io.StringIO()
    rep = Reporter("lines", stderr=err, interval=0.2)
    rep({"event": "progress", "stage": "select", "step": 0, "total": 1})
    _time.sleep(0.7)  # scoring a volume: no event for a while
    rep.close()
    lines = err.getvalue().splitlines()
    assert len(lines) >= 2 and lines[-1].endswith("select, step 0/1 (still working)")
    n = len(lines)
    _time.sleep(0.3)
    assert len(err.getvalue().splitlines()) == n  # closed: quiet


def test_adapt_says_how_long_it_expects_to_take(capsys, tiny_model, head_files, tmp_path):
    code, stdout, err = run_cli(capsys, "adapt", head_files[0], "-o", tmp_path / "a.safetensors", "--model",
                                tiny_model, "--method", "adabn", "--device", "cpu")
    assert code == 0, err
    assert "expected about " in stdout.splitlines()[0] and "elapsed: read" in err


def test_every_option_has_help_and_the_parser_needs_no_torch():
    """adapt --help left --method, --seed and --overwrite unexplained, hid --placement's choices and said only "the
    library's" default for --epochs; the choices come from constants.py, so --help works before torch is there."""
    import argparse
    import inspect

    from ConvLoRASegLib import constants, convlora, selftrain

    for action in cli.build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                bare = [a.option_strings or a.dest for a in sub._actions
                        if a.help is None and not isinstance(a, argparse._HelpAction)]
                assert not bare, f"{name}: {bare} without help"
    assert constants.METHODS == selftrain.METHODS and constants.MODES == selftrain.MODES
    assert constants.PLACEMENTS == tuple(convlora.PLACEMENTS)
    assert selftrain.default_epochs("paper", 1) == selftrain.default_epochs("fast", 2) == constants.ADAPT_EPOCHS
    assert selftrain.default_epochs("fast", 1) == constants.ONE_SCAN_EPOCHS
    code = ("import sys; sys.modules['torch'] = None\n"
            "from ConvLoRASegLib import cli\n"
            "sys.exit(cli.main(['adapt', '--help']))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "--placement {init_path,init_path+down1,init_path+down1+down2,all}" in text
    assert (f"training epochs (default {constants.ADAPT_EPOCHS}; {constants.ONE_SCAN_EPOCHS} in fast mode on one "
            "scan") in text
    assert "the same seed, the same adapter" in text and "replace an existing adapter file" in text


def test_program_exit_runs_every_handler_keeps_status_and_output():
    """``convlora-seg`` (:func:`cli.run`) leaves without the interpreter's teardown, but only after the exit handlers
    the command registered have run, with the command's status and its unflushed output; a command that ends in a
    traceback exits the normal way (status 1)."""
    code = ("import atexit, sys\n"
            "from ConvLoRASegLib import cli\n"
            "def command(argv=None):\n"
            "    atexit.register(lambda: print('handler ran', flush=True))\n"
            "    sys.stdout.write('unflushed line\\n')\n"
            "    return 3\n"
            "cli.main = command\n"
            "cli.run()\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr
    assert out.stdout.splitlines() == ["unflushed line", "handler ran"]
    failing = code.replace("    return 3\n", "    raise RuntimeError('boom')\n")
    out = subprocess.run([sys.executable, "-c", failing], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "RuntimeError: boom" in out.stderr and "handler ran" in out.stdout
    assert "from .cli import run" in (ROOT / "ConvLoRASegLib" / "__main__.py").read_text()
    assert 'convlora-seg = "ConvLoRASegLib.cli:run"' in (ROOT / "pyproject.toml").read_text()


def test_segment_reads_its_first_volume_ahead_on_the_model_files_grid(capsys, tiny_model, head_files, tmp_path,
                                                                       monkeypatch):
    """The first volume is read and put on the grid the model file records (safetensors metadata, without torch)
    before the model loads, and that read is the one the case uses: each volume is read once, with the same mask
    as without the read-ahead. A read-ahead made for another grid is not used."""
    from ConvLoRASegLib import batch
    from ConvLoRASegLib.grid import recorded_grid
    from ConvLoRASegLib.store import load_model

    assert recorded_grid(tiny_model) == load_model(tiny_model).grid
    assert recorded_grid(head_files[0]) is None and recorded_grid(tmp_path / "missing.safetensors") is None
    reads: List[str] = []
    started: list = []
    taken: list = []
    real_read, real_ahead, real_prefetched = batch._timed_read_case, batch.read_ahead, batch.prefetched
    monkeypatch.setattr(batch, "_timed_read_case", lambda path, *a: (reads.append(str(path)), real_read(path, *a))[1])
    monkeypatch.setattr(batch, "read_ahead", lambda *a, **k: (started.append(real_ahead(*a, **k)), started[-1])[1])
    monkeypatch.setattr(batch, "prefetched", lambda items, load, first=None: (
        taken.append(first), real_prefetched(items, load, first))[1])
    code, _, err = run_cli(capsys, "segment", *head_files, "-o", tmp_path / "ahead", "--model", tiny_model,
                           "--device", "cpu")
    assert code == 0, err
    assert len(started) == 1 and started[0].grid == load_model(tiny_model).grid
    assert taken == [started[0].future]  # the run took the read-ahead for its first case ...
    assert sorted(reads) == sorted(str(p) for p in head_files)  # ... and read no volume twice
    with_ahead = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ahead" / "head0_brainmask.nii.gz")))
    monkeypatch.setattr(batch, "read_ahead", lambda *a, **k: None)
    code, _, err = run_cli(capsys, "segment", head_files[0], "-o", tmp_path / "plain.nii.gz", "--model", tiny_model,
                           "--device", "cpu")
    assert code == 0, err
    np.testing.assert_array_equal(with_ahead, sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "plain.nii.gz"))))
    # made for another grid (or path): not taken, the case reads its volume itself
    stale = real_ahead(head_files[0], load_model(tiny_model))
    assert stale is not None and stale.matches(str(head_files[0]), load_model(tiny_model).grid, False)
    assert not stale.matches(str(head_files[0]), WorkingGrid(spacing_mm=2.0, slice_size=64), False)
    assert not stale.matches(str(head_files[1]), load_model(tiny_model).grid, False)
    assert not stale.matches(str(head_files[0]), load_model(tiny_model).grid, True)


def test_existing_outputs_are_refused_before_torch_loads(tiny_model, head_files, tmp_path):
    """A rerun of segment (or adapt -o) into outputs that exist is refused in one line before torch is imported or
    the model loaded (a fraction of a second instead of the model's start-up); the outputs are left as they were."""
    code = (
        "import sys\n"
        "from ConvLoRASegLib import cli\n"
        "status = cli.main([sys.argv[1], sys.argv[2], '-o', sys.argv[3], '--model', sys.argv[4]])\n"
        "print(status, 'torch' in sys.modules)\n")

    def refused(command: str, out: Path) -> str:
        """``command`` into the existing ``out`` in a fresh interpreter: its stderr, after the checks."""
        done = subprocess.run([sys.executable, "-c", code, command, str(head_files[0]), str(out), str(tiny_model)],
                              capture_output=True, text=True, timeout=120, cwd=str(ROOT))
        assert done.stdout.split() == ["2", "False"], done.stderr
        return done.stderr

    out = tmp_path / "exists.nii.gz"
    out.write_bytes(b"the user's file")
    err = refused("segment", out)
    assert "output exists" in err and "Traceback" not in err
    assert out.read_bytes() == b"the user's file"
    # the same for adapt -o
    adapter = tmp_path / "exists.safetensors"
    adapter.write_bytes(b"the user's adapter")
    assert "output exists" in refused("adapt", adapter) and adapter.read_bytes() == b"the user's adapter"


def test_a_read_ahead_never_holds_the_process_open(tiny_model, head_files):
    """A command refused before it takes its read-ahead (an existing output, say) exits at once: the read runs in
    a daemon thread, which the interpreter does not wait for. Here the read never ends; an executor's thread would
    keep the process alive until the timeout."""
    code = (
        "import sys, threading\n"
        "from ConvLoRASegLib import batch\n"
        "batch._timed_read_case = lambda *a: threading.Event().wait()\n"
        "ahead = batch.read_ahead(sys.argv[1], sys.argv[2])\n"
        "assert ahead is not None and not ahead.future.done()\n"
        "assert [t.daemon for t in threading.enumerate() if t.name == batch.READ_AHEAD_THREAD] == [True]\n"
        "print('refused')\n")
    done = subprocess.run([sys.executable, "-c", code, str(head_files[0]), str(tiny_model)], capture_output=True,
                          text=True, timeout=120, cwd=str(ROOT))
    assert done.returncode == 0 and done.stdout.strip() == "refused", done.stderr
