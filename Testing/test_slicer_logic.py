"""The ConvLoRASeg module's logic against the real MRML library (PyPI slicer-core), headless.

Real nodes, real storage nodes, a real head (itk_kmeans, 128x128x62) given an oblique and flipped IJK->RAS.
Only what slicer-core lacks is stubbed (Testing/slicer_stubs.py). Models are tiny (4 filters, 64 px slices)
so the file runs in well under a minute; the comparison with the CLI uses the same model file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "Testing"), str(ROOT / "ConvLoRASeg"), str(ROOT)]

import slicer_stubs  # noqa: E402

slicer_stubs.install()

import slicer  # noqa: E402
import vtk  # noqa: E402

from ConvLoRASegModuleLib import parameters, presenters  # noqa: E402
from ConvLoRASegModuleLib import logic as module_logic  # noqa: E402
from ConvLoRASegLib.jobs import CliProcess, EtaEstimator, parseEventLine  # noqa: E402
from ConvLoRASegLib.errors import ConvLoRASegError  # noqa: E402

HEAD = Path("/work/shared/data/heads/itk_kmeans")
HAS_CLI = (ROOT / "ConvLoRASegLib" / "__main__.py").is_file() and (ROOT / "ConvLoRASegLib" / "cli.py").is_file()
needs_cli = pytest.mark.skipif(not HAS_CLI, reason="ConvLoRASegLib CLI (cli.py, __main__.py) not there yet")


# ------------------------------------------------------------------------------------------------ fixtures

def oblique_flipped_ijk_to_ras(spacing=(2.0, 2.0, 3.0)) -> np.ndarray:
    """20 deg about S, 10 deg about R, the I axis flipped (determinant < 0), some origin."""
    a, b = np.radians(20.0), np.radians(10.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = np.eye(4)
    m[:3, :3] = rz @ rx @ np.diag([-1.0, 1.0, 1.0]) @ np.diag(spacing)
    m[:3, 3] = [91.5, -120.25, -60.0]
    return m


@pytest.fixture()
def scene():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


def load_volume(scene, path: Path, labelmap: bool = False):
    """Load ``path`` through a real storage node, as Slicer's Add Data does."""
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode",
                                   path.name.split(".")[0])
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    if labelmap:
        storage.SetCenterImage(0)
    assert storage.ReadData(node), f"storage node could not read {path}"
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def set_matrix(node, m: np.ndarray) -> None:
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(m))


def get_matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def save_volume(node, path: Path) -> Path:
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(0)
    assert storage.WriteData(node), f"storage node could not write {path}"
    return path


@pytest.fixture()
def head(scene):
    node = load_volume(scene, HEAD / "image.nii.gz")
    set_matrix(node, oblique_flipped_ijk_to_ras())
    return node


def tiny_model_file(folder: Path, seed: int, name: str = "model") -> Path:
    """A small saved model (4 filters, 64 px slices at 4 mm): same code path as the real one, fast on CPU."""
    import torch
    from ConvLoRASegLib.grid import WorkingGrid
    from ConvLoRASegLib.model import ConvLoRASegModel
    from ConvLoRASegLib.store import save_model

    from ConvLoRASegLib.volumes import MASK_THRESHOLD, read_image, to_slices

    torch.manual_seed(seed)
    model = ConvLoRASegModel(grid=WorkingGrid(spacing_mm=4.0, slice_size=64), n_filters=4).eval()
    # Random weights give one logit everywhere; shift the output so that about 40% of the head's bright
    # pixels are "brain" (at the mask threshold): the mask then depends on the voxels and their orientation, like
    # a trained one's.
    slices = to_slices(read_image(HEAD / "image.nii.gz"), model.grid).slices
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(slices[:, None], dtype=np.float32)))[:, 0].numpy()
        final_bn = model.unet.out_path[-1]
        t = MASK_THRESHOLD
        final_bn.bias -= float(np.quantile(logits[slices > 0.1], 0.6)) - float(np.log(t / (1 - t)))
    path = folder / f"{name}.safetensors"
    save_model(model, path)
    return path


def adapter_file(model_path: Path, dest: Path, name: str, seed: int = 1, score: float = 0.9) -> Path:
    """A genuine adapter (ConvLoRA factors + BN statistics) of the model in ``model_path``, whose metadata holds
    ``score`` as the label-free score that selected it."""
    import torch
    from ConvLoRASegLib.convlora import adapter_state, inject_convlora, lora_layers
    from ConvLoRASegLib.store import load_model, save_adapter

    model = load_model(model_path)
    inject_convlora(model, r=2, alpha=2)
    torch.manual_seed(seed)
    for layer in lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.05)
    save_adapter(model, adapter_state(model), dest, name=name, method="convlora-adabn", mode="test",
                 rank=2, alpha=2, placement="init_path", details={"score": score})
    return dest


def older_adapter_file(model_path: Path, dest: Path, name: str, score: float, seed: int = 1) -> Path:
    """An adapter file as the library wrote it before the label-free score was called ``score``: its metadata holds
    the score under ``agreement`` and has no ``score`` key."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    new = adapter_file(model_path, dest.with_name(f"new-{dest.name}"), name, seed=seed, score=score)
    with safe_open(str(new), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta["agreement"] = meta.pop("score")
    save_file(tensors, str(dest), metadata=meta)
    new.unlink()
    return dest


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {"a": tiny_model_file(folder, 0, "model_a"), "b": tiny_model_file(folder, 1, "model_b")}


@pytest.fixture()
def logic(tmp_path, models, scene):
    lg = module_logic.ConvLoRASegLogic(scene=scene, storeRoot=tmp_path / "store")
    lg.setModelPath(models["a"])
    return lg


# --------------------------------------------------------------------------------- background process

FAKE_CLI = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    mode = sys.argv[1]
    def emit(**event):
        print(json.dumps(event), flush=True)
    if mode == "ok":
        print("a warning on stderr", file=sys.stderr, flush=True)
        print("not json on stdout", flush=True)
        for step in range(1, 6):
            time.sleep(0.05)
            emit(event="progress", stage="train", step=step, total=5, epoch=1, loss=1.0 / step, score=None)
        emit(event="done", adapter={"name": "x", "path": "/nowhere"})
    elif mode == "error":
        emit(event="error", message="target cohort is empty")
        sys.exit(2)
    else:  # "polite" exits 130 on SIGTERM; "stubborn" ignores it; both start a grandchild
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open(sys.argv[2], "w").write(str(child.pid))
        if mode == "polite":
            signal.signal(signal.SIGTERM, lambda *a: sys.exit(130))
        else:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        emit(event="progress", stage="adabn", step=0, total=10)
        time.sleep(60)
""")


@pytest.fixture()
def fake_cli(tmp_path) -> Path:
    path = tmp_path / "fake_cli.py"
    path.write_text(FAKE_CLI)
    return path


def test_event_lines_are_parsed_and_other_text_is_not():
    assert parseEventLine('{"event": "progress", "step": 1}') == {"event": "progress", "step": 1}
    assert parseEventLine("Epoch 1/3 loss 0.2") is None
    assert parseEventLine('{"no_event": 1}') is None
    assert parseEventLine("{broken json}") is None


def test_eta_follows_the_pace_of_the_current_stage():
    eta = EtaEstimator()
    eta.update("train", 1, 11, now=100.0)
    assert eta.remainingSeconds() is None  # one step: no pace yet
    eta.update("train", 3, 11, now=104.0)  # 2 s per step, 8 steps left
    assert eta.remainingSeconds() == pytest.approx(16.0)
    assert eta.text() == "train: about 16 s left"
    eta.update("select", 1, 4, now=105.0)  # new stage: estimate restarts
    assert eta.remainingSeconds() is None


def test_process_reports_progress_log_and_done(fake_cli):
    events, logs = [], []
    proc = CliProcess([sys.executable, str(fake_cli), "ok"], onProgress=events.append, onLog=logs.append).start()
    result = proc.wait(timeout=30)
    assert result.ok and result.returnCode == 0
    assert [e["step"] for e in events if e["event"] == "progress"] == [1, 2, 3, 4, 5]
    assert events[-1]["event"] == "done" and result.done["adapter"]["name"] == "x"
    assert set(logs) == {"a warning on stderr", "not json on stdout"}
    assert proc.eta.stage == "train" and proc.eta.lastStep == 5


def test_process_error_event_becomes_the_message(fake_cli):
    result = CliProcess([sys.executable, str(fake_cli), "error"]).start().wait(timeout=30)
    assert result.returnCode == 2 and not result.ok
    assert result.errorMessage == "target cohort is empty"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its dead parent's reaper) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("mode,hard", [("polite", False), ("stubborn", True)])
def test_cancel_stops_the_whole_process_tree(fake_cli, tmp_path, mode, hard):
    pid_file = tmp_path / "grandchild.pid"
    started = []
    proc = CliProcess([sys.executable, str(fake_cli), mode, str(pid_file)], onProgress=started.append).start()
    deadline = time.monotonic() + 20
    while not started and time.monotonic() < deadline:
        proc.poll()
        time.sleep(0.02)
    assert started, "the fake CLI never reported progress"
    grandchild = int(pid_file.read_text())
    t0 = time.monotonic()
    proc.cancel(graceSeconds=0.5)
    result = proc.wait(timeout=10)
    assert result.cancelled and result.killedHard == hard
    assert time.monotonic() - t0 < 5
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild), "the grandchild process survived the cancel"


# ----------------------------------------------------------------------------------------- geometry

def test_volume_node_becomes_an_image_with_the_same_voxels_and_world_geometry(head):
    import SimpleITK as sitk

    image = module_logic.ConvLoRASegLogic.imageFromVolumeNode(head)
    array = slicer.util.arrayFromVolume(head)
    m = get_matrix(head)
    assert np.linalg.det(m[:3, :3]) < 0  # the flipped axis survived SetIJKToRASMatrix
    assert image.GetSize() == tuple(reversed(array.shape))
    for ijk in [(0, 0, 0), (127, 5, 61), (40, 90, 30)]:
        ras = m @ np.array([*ijk, 1.0])
        lps = np.array(image.TransformIndexToPhysicalPoint([int(v) for v in ijk]))
        np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-4)
        assert image[ijk] == array[ijk[2], ijk[1], ijk[0]]
    assert sitk.GetArrayViewFromImage(image).sum() == array.sum()


def test_linear_parent_transform_is_included_and_nonlinear_is_refused(scene, head):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = [10.0, -5.0, 2.5]
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    head.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_allclose(module_logic.ConvLoRASegLogic.ijkToWorldMatrix(head), shift @ get_matrix(head))

    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    grid.SetAndObserveTransformToParent(vtk.vtkGridTransform())
    head.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(ConvLoRASegError, match="non-linear transform"):
        module_logic.ConvLoRASegLogic.imageFromVolumeNode(head)


# -------------------------------------------------------------------------------------------- segment

def test_segment_gives_a_labelmap_on_the_input_geometry_equal_to_the_library_on_the_saved_file(
        logic, head, tmp_path):
    from ConvLoRASegLib.segment import segment_image
    from ConvLoRASegLib.store import load_model
    from ConvLoRASegLib.volumes import array_from_image, read_image

    labelmap = logic.segment(head, device="cpu")
    assert labelmap.IsA("vtkMRMLLabelMapVolumeNode")
    assert labelmap.GetName() == f"{head.GetName()} brain mask"
    np.testing.assert_array_equal(get_matrix(labelmap), get_matrix(head))
    got = slicer.util.arrayFromVolume(labelmap)
    assert got.shape == slicer.util.arrayFromVolume(head).shape and got.dtype == np.uint8
    assert set(np.unique(got)) == {0, 1}  # a real mask: neither empty nor full

    path = save_volume(head, tmp_path / "head_oblique.nrrd")  # the same volume, as a file
    expected = array_from_image(segment_image(load_model(logic.modelPath), read_image(path), device="cpu"))
    np.testing.assert_array_equal(got, expected)

    again = logic.segment(head, outputNode=labelmap, device="cpu")  # reuses the chosen node
    assert again is labelmap and labelmap.GetScene().GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 1


@needs_cli
def test_segment_voxels_equal_the_cli_output_on_the_same_file(logic, head, tmp_path):
    import SimpleITK as sitk

    path = save_volume(head, tmp_path / "head_oblique.nrrd")
    out = tmp_path / "cli_mask.nrrd"
    run = subprocess.run([sys.executable, "-m", "ConvLoRASegLib", "segment", str(path), "-o", str(out),
                          "--model", str(logic.modelPath), "--device", "cpu"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    labelmap = logic.segment(head, device="cpu")
    cli = sitk.ReadImage(str(out))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(labelmap), sitk.GetArrayFromImage(cli))
    from ConvLoRASegLib.volumes import ijk_to_ras

    np.testing.assert_allclose(ijk_to_ras(cli), get_matrix(labelmap), atol=1e-5)


def test_node_path_equals_the_library_on_an_image_of_identical_geometry(logic, head):
    """Node -> image conversion loses nothing: same result as the library on the node's own image."""
    from ConvLoRASegLib.segment import segment_image
    from ConvLoRASegLib.store import load_model
    from ConvLoRASegLib.volumes import array_from_image, image_from_array

    got = slicer.util.arrayFromVolume(logic.segment(head, device="cpu")).copy()
    image = image_from_array(slicer.util.arrayFromVolume(head).astype(np.float32), get_matrix(head))
    expected = array_from_image(segment_image(load_model(logic.modelPath), image, device="cpu"))
    np.testing.assert_array_equal(got, expected)


def test_output_keeps_the_parent_transform_of_the_input(logic, scene, head):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    head.SetAndObserveTransformNodeID(transform.GetID())
    labelmap = logic.segment(head, device="cpu")
    assert labelmap.GetTransformNodeID() == transform.GetID()
    np.testing.assert_array_equal(get_matrix(labelmap), get_matrix(head))


def test_brain_mask_becomes_a_segmentation_with_the_brain_terminology(logic, scene):
    mask = load_volume(scene, HEAD / "mask.nii.gz", labelmap=True)
    set_matrix(mask, oblique_flipped_ijk_to_ras())
    expected_ml = np.count_nonzero(slicer.util.arrayFromVolume(mask)) * 2 * 2 * 3 / 1000.0
    assert logic.brainVolumeMl(mask) == pytest.approx(expected_ml)
    assert 900 < expected_ml < 2000
    segmentation_node = logic.createSegmentation(mask, show3D=True)
    segmentation = segmentation_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    segment = segmentation.GetNthSegment(0)
    assert segment.GetName() == "Brain"
    tag = vtk.mutable("")
    assert segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag)
    assert "SCT^12738006^Brain" in str(tag)
    assert segmentation.ContainsRepresentation("Closed surface")


# ------------------------------------------------------------------------------------------- adapters

def test_adapter_import_list_export_rename_delete(logic, models, tmp_path):
    src = adapter_file(models["a"], tmp_path / "site_b.safetensors", "site_b")
    assert logic.adapters() == []
    info = logic.importAdapter(src)
    assert info.name == "site_b" and info.base_sha256 == logic.modelSha256()
    assert [a.name for a in logic.adapters()] == ["site_b"]

    exported = logic.exportAdapter("site_b", tmp_path / "b_shared.safetensors")
    assert exported.read_bytes() == logic.adapters()[0].path.read_bytes()

    renamed = logic.renameAdapter("site_b", "scanner B")
    assert renamed.name == "scanner B" and [a.name for a in logic.adapters()] == ["scanner B"]
    assert logic.resolveAdapter("scanner B").path == renamed.path
    logic.deleteAdapter("scanner B")
    assert logic.adapters() == []
    with pytest.raises(ConvLoRASegError, match="no adapter named"):
        logic.resolveAdapter("scanner B")


def test_adapter_of_another_base_model_is_refused(logic, models, head, tmp_path):
    foreign = adapter_file(models["b"], tmp_path / "foreign.safetensors", "foreign")
    with pytest.raises(ConvLoRASegError, match="another base model"):
        logic.importAdapter(foreign)
    with pytest.raises(ConvLoRASegError, match="another base model"):
        logic.segment(head, adapter=str(foreign), device="cpu")
    assert logic.adapters() == []
    assert head.GetScene().GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0


def test_segment_with_a_stored_adapter_changes_the_result_and_is_recorded(logic, models, head, tmp_path):
    logic.importAdapter(adapter_file(models["a"], tmp_path / "b.safetensors", "site_b", seed=3))
    source = slicer.util.arrayFromVolume(logic.segment(head, device="cpu")).copy()
    adapted_node = logic.segment(head, adapter="site_b", device="cpu", checkAdapter=False)
    assert adapted_node.GetAttribute("ConvLoRASeg.adapter") == "site_b"
    assert logic.labelFreeScores(adapted_node) == {}  # nothing was compared on the scan
    best, scores = logic.chooseAdapter(head, device="cpu")
    assert set(scores) == {"source", "site_b"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert (best.name if best else "source") == max(scores, key=scores.get)
    adapted = slicer.util.arrayFromVolume(adapted_node)
    assert source.shape == adapted.shape and np.count_nonzero(source != adapted) > 0


def test_segment_uses_an_adapter_only_where_it_beats_the_source_on_the_scan(logic, models, head, tmp_path,
                                                                            monkeypatch):
    """The per-scan check of ``convlora-seg segment --adapter``: the labelmap records which adapter was used and
    which one was asked for but did not beat the unadapted model on this scan."""
    from ConvLoRASegLib import selection

    logic.importAdapter(adapter_file(models["a"], tmp_path / "b.safetensors", "site_b", seed=3))
    best, _ = logic.chooseAdapter(head, device="cpu")  # the same rule, among {source, site_b}
    node = logic.segment(head, adapter="site_b", device="cpu")
    assert node.GetAttribute("ConvLoRASeg.adapter") == (best.name if best else "")
    # the check's label-free scores of both are kept on the mask (the warning of a refused adapter quotes them)
    scores = logic.labelFreeScores(node)
    assert set(scores) == {"source", "site_b"} and all(0.0 <= v <= 1.0 for v in scores.values())
    assert node.GetAttribute(module_logic.ADAPTER_NOT_USED_ATTRIBUTE) == ("" if best else "site_b")
    for winner in ("source", "site_b"):
        monkeypatch.setattr(selection, "choose_volume_scores", lambda scores, order=(), w=winner: w)
        node = logic.segment(head, adapter="site_b", device="cpu", outputNode=node)
        assert node.GetAttribute("ConvLoRASeg.adapter") == ("" if winner == "source" else "site_b")
        assert node.GetAttribute(module_logic.ADAPTER_NOT_USED_ATTRIBUTE) == ("site_b" if winner == "source" else "")


# -------------------------------------------------------------------------------- adapt (background)

@needs_cli
def test_adapt_in_the_background_reports_progress_and_stores_the_adapter(logic, scene, head):
    events = []
    info = logic.adapt([head], name="siteX", method="convlora-adabn", device="cpu", epochs=1,
                       progress=events.append, timeout=120)
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and {"stage", "step", "total"} <= set(progress[-1])
    assert events[-1]["event"] == "done"
    # the selection's progress and the done event carry the label-free score as "score", which the module shows
    assert any(isinstance(e.get("score"), float) for e in progress if e.get("stage") == "select")
    assert events[-1]["adapter"]["score"] == pytest.approx(info.score)
    assert events[-1]["summary"]["score_source"] == pytest.approx(events[-1]["summary"]["candidates"]["source"])
    text, _ = presenters.adaptationMessage(events[-1])
    assert "label-free score" in text and "?" not in text
    assert info.name == "siteX" and info.base_sha256 == logic.modelSha256()
    assert [a.name for a in logic.adapters()] == ["siteX"]
    assert info.path.is_relative_to(logic.adapterStore().root)


@needs_cli
def test_cancelled_adapt_leaves_nothing_behind(logic, head, tmp_path):
    events = []

    def on_event(event):
        events.append(event)
        if event["event"] == "progress" and event.get("stage") in ("adabn", "train"):
            logic.cancel()

    before_tmp = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("ConvLoRASeg-*"))
    result = logic.adapt([head], name="never", device="cpu", epochs=50, progress=on_event, timeout=120)
    assert result is None
    assert not logic.isRunning()
    store_files = [p for p in logic.adapterStore().root.rglob("*") if p.is_file()]
    assert store_files == [], f"left behind: {store_files}"
    assert logic.lastCleanup == [], f"the CLI left partial files that the module had to remove: {logic.lastCleanup}"
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("ConvLoRASeg-*")) == before_tmp
    assert not any(e["event"] == "done" for e in events)


def test_module_choices_match_the_library():
    from ConvLoRASegLib import cohorts, selftrain

    assert set(parameters.METHODS) == set(selftrain.METHODS)
    assert parameters.METHODS[0] == "convlora-adabn"  # the default in the GUI
    assert set(parameters.CC359_SITES) == set(cohorts.cc359_domains())


def test_adapt_refuses_bad_names_and_missing_targets_before_starting(logic, tmp_path):
    with pytest.raises(ConvLoRASegError, match="invalid adapter name"):
        logic.adapt(str(tmp_path), name="../escape")
    with pytest.raises(ConvLoRASegError, match="not found"):
        logic.adapt(str(tmp_path / "missing"), name="ok")
    with pytest.raises(ConvLoRASegError, match="empty"):
        logic.adapt([], name="ok")
    assert not logic.isRunning()


# ------------------------------------------------------------------------- adapt with a labelled check

@pytest.fixture()
def head_mask(scene):
    """The head's trusted brain mask as a labelmap node on the head's (oblique, flipped) grid."""
    node = load_volume(scene, HEAD / "mask.nii.gz", labelmap=True)
    set_matrix(node, oblique_flipped_ijk_to_ras())
    return node


@needs_cli
def test_adapt_with_a_labelled_check_given_as_nodes_passes_check_and_records_it(logic, head, head_mask,
                                                                                 monkeypatch):
    """A (volume node, labelmap node) check pair reaches the CLI as ``--check IMAGE MASK`` (written to the job's
    temporary folder, on the same grid, else the CLI refuses the mask), and the check comes back in the ``done``
    summary and in the stored adapter's details."""
    commands = []
    real = module_logic.libraryCommand
    monkeypatch.setattr(module_logic, "libraryCommand", lambda *args: commands.append(args) or real(*args))
    events = []
    info = logic.adapt([head], name="siteX", device="cpu", epochs=1, progress=events.append, timeout=180,
                       checkScans=[(head, head_mask)])
    (command,) = commands
    assert command[0] == "adapt" and command.count("--check") == 1
    at = command.index("--check")
    image_path, mask_path = Path(command[at + 1]), Path(command[at + 2])
    assert image_path.name == f"{head.GetName()}.nrrd" and mask_path.name == f"{head_mask.GetName()}_mask.nrrd"
    assert not image_path.exists() and not mask_path.exists()  # the job's temporary folder is gone

    assert any(e["event"] == "progress" and e.get("stage") == "check" for e in events)
    done = events[-1]
    assert done["event"] == "done"
    summary = done["summary"]
    check = summary["labelled_check"]
    assert check is not None and check["scans"] == [image_path.name]
    assert set(check["surface_dice"]) >= {"source", "adabn"}
    assert all(len(v) == 1 and 0.0 <= v[0] <= 1.0 for v in check["surface_dice"].values())
    assert summary["selected"] == check["selected"] and summary["adapted"] == (check["selected"] != "source")
    assert summary["label_free_selected"] == check["label_free_selected"]
    assert info.name == "siteX" and info.details["labelled_check"] == check
    text, warn = presenters.adaptationMessage(done)
    assert "1 labelled check scan" in text and "surface Dice" in text
    assert warn == (summary["adapted"] is False)


def test_a_segmentation_node_as_check_mask_is_exported_on_the_scan_grid(logic, scene, head, head_mask, tmp_path):
    """A segmentation node is exported with Slicer's own API onto the check scan's grid: the file written for the
    CLI equals the one written from the labelmap it was made of, and no temporary node stays in the scene."""
    import SimpleITK as sitk

    segmentation = logic.createSegmentation(head_mask, show3D=False)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")  # the pair under one linear transform
    shift = np.eye(4)
    shift[:3, 3] = [4.0, -2.0, 1.0]
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    for node in (head, head_mask, segmentation):
        node.SetAndObserveTransformNodeID(transform.GetID())
    # the first export adds the scene's subject hierarchy (a singleton every Slicer scene has); nothing else stays
    logic._checkArguments([(head, segmentation)], tmp_path / "first")
    before = scene.GetNumberOfNodes()
    from_labelmap = logic._checkArguments([(head, head_mask)], tmp_path / "a")
    from_segmentation = logic._checkArguments([(head, segmentation)], tmp_path / "b")
    assert scene.GetNumberOfNodes() == before
    assert from_labelmap[0] == from_segmentation[0] == "--check"
    image = sitk.ReadImage(from_segmentation[1])
    a, b = sitk.ReadImage(from_labelmap[2]), sitk.ReadImage(from_segmentation[2])
    for mask in (a, b):
        assert mask.GetSize() == image.GetSize()
        np.testing.assert_allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(mask.GetDirection(), image.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(mask.GetSpacing(), image.GetSpacing(), atol=1e-6)
    assert np.count_nonzero(sitk.GetArrayFromImage(a)) > 1000
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), (slicer.util.arrayFromVolume(head_mask) > 0))

    # a segmentation smaller than the scan (a box drawn on part of its grid) is padded onto the whole scan grid
    box = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "box")
    slicer.util.updateVolumeFromArray(box, np.ones((8, 12, 10), dtype=np.uint8))
    m = get_matrix(head)
    m[:3, 3] = (m @ np.array([10.0, 20.0, 5.0, 1.0]))[:3]  # voxel (i, j, k) = (10, 20, 5) of the scan
    set_matrix(box, m)
    box.SetAndObserveTransformNodeID(transform.GetID())
    written = sitk.GetArrayFromImage(sitk.ReadImage(
        logic._checkArguments([(head, logic.createSegmentation(box, show3D=False))], tmp_path / "box")[2]))
    expected = np.zeros(slicer.util.arrayFromVolume(head).shape, dtype=np.uint8)
    expected[5:13, 20:32, 10:20] = 1
    np.testing.assert_array_equal(written, expected)

    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing")
    with pytest.raises(ConvLoRASegError, match="no segments"):
        logic._checkArguments([(head, empty)], tmp_path / "c")


def test_bad_check_scans_fail_in_one_line_before_anything_starts(logic, head, head_mask, tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(module_logic, "libraryCommand", lambda *args: started.append(args))
    image = save_volume(head, tmp_path / "scan.nrrd")
    temp_root = Path(os.environ.get("TMPDIR", "/tmp"))
    before_tmp = set(temp_root.glob("ConvLoRASeg-*"))
    cases = [
        ([(tmp_path / "missing.nii.gz", tmp_path / "missing_mask.nii.gz")], "check image not found: .*missing.nii.gz"),
        ([(image, str(tmp_path / "no_mask.nrrd"))], "check mask not found: .*no_mask.nrrd"),
        ([(head, "")], "check mask not found"),
        ([(head, None)], "check scan 1: its mask is not chosen"),
        ([(head,)], "check scan 1: give a pair"),
        ([(head, head)], "check scan 1: the mask must be a labelmap or segmentation node"),
        ([(image, head_mask.GetScene().AddNewNodeByClass("vtkMRMLSegmentationNode"))],
         "needs its image as a volume node"),
    ]
    for checkScans, message in cases:
        with pytest.raises(ConvLoRASegError, match=message) as raised:
            logic.adapt([head], name="siteX", device="cpu", checkScans=checkScans)
        assert "\n" not in str(raised.value)
    assert started == [] and not logic.isRunning()
    assert set(temp_root.glob("ConvLoRASeg-*")) == before_tmp
