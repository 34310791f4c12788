"""The optional labelled check of an adaptation (``adapt --check IMAGE MASK``, ConvLoRASegLib/labelled_check.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from ConvLoRASegLib import cli
from ConvLoRASegLib.errors import ConvLoRASegError
from ConvLoRASegLib.labelled_check import (MARGIN, LabelledScan, apply_check, check_adaptation, decide,
                                           read_labelled_scans)
from ConvLoRASegLib.metrics import surface_dice
from ConvLoRASegLib.segment import segment_image
from ConvLoRASegLib.selection import segment_checked
from ConvLoRASegLib.selftrain import adapt
from ConvLoRASegLib.sites import demo_heads, simulate_site
from ConvLoRASegLib.store import default_model_path, load_model, read_adapter_info, save_adapter
from ConvLoRASegLib.volumes import read_image, to_slices
from test_cli import _one_torch_thread  # noqa: F401  (autouse: one torch thread)


# ---------------------------------------------------------------------------------------------------------------
# the rules, on crafted tables
# ---------------------------------------------------------------------------------------------------------------
def test_veto_keeps_a_safe_selection_and_refuses_a_worse_one():
    table = {"source": [0.60, 0.70], "adabn": [0.62, 0.71], "epoch 1": [0.80, 0.69 - 2 * MARGIN]}
    assert decide(table, "adabn", "veto")[0] == "adabn"
    # better on average, but worse than the source on one labelled scan by more than the margin
    assert decide(table, "epoch 1", "veto")[0] == "source"
    # within the margin on each scan but worse on average: refused too
    assert decide({"source": [0.60, 0.70], "adabn": [0.597, 0.698]}, "adabn", "veto")[0] == "source"
    assert decide(table, "source", "veto")[0] == "source"


def test_pick_takes_the_best_candidate_that_is_nowhere_worse():
    table = {"source": [0.60, 0.70], "adabn": [0.62, 0.71], "epoch 1": [0.90, 0.69 - 2 * MARGIN],
             "epoch 2": [0.64, 0.72]}
    # epoch 1 has the best mean but loses on the second scan: the labels pick epoch 2 whatever the label-free choice
    for label_free in ("source", "adabn", "epoch 1", "epoch 2"):
        assert decide(table, label_free, "pick")[0] == "epoch 2"
    # nothing beats the source: the source, with the reason in words
    picked, why = decide({"source": [0.6], "adabn": [0.6], "epoch 1": [0.5]}, "epoch 1", "pick")
    assert picked == "source" and "no adapted candidate beats" in why
    # a tie among the best goes to the label-free selection
    assert decide({"source": [0.5], "adabn": [0.7], "epoch 1": [0.7]}, "epoch 1", "pick")[0] == "epoch 1"
    with pytest.raises(ConvLoRASegError, match="unknown check rule"):
        decide(table, "adabn", "majority")


# ---------------------------------------------------------------------------------------------------------------
# the real model on a simulated site
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapted():
    """The bundled model, AdaBN on one colin27 scan of a simulated Philips 3 T site; the check scan is another head
    (itk_kmeans) at the same site, with its mask."""
    model = load_model(default_model_path())
    heads = {k: (read_image(i), read_image(m)) for k, (i, m) in demo_heads().items()}
    target, _ = simulate_site(*heads["colin27"], "philips3", seed=1)
    image, mask = simulate_site(*heads["itk_kmeans"], "philips3", seed=2)
    result = adapt(model, [to_slices(target, model.grid).slices], method="adabn", epochs=0, device="cpu")
    return model, result, LabelledScan("itk_kmeans_philips3", image, mask)


def _surface_dice(mask: sitk.Image, truth: sitk.Image) -> float:
    return surface_dice(sitk.GetArrayFromImage(mask) > 0, sitk.GetArrayFromImage(truth) > 0,
                        tuple(reversed(truth.GetSpacing())), 1.0)


@pytest.mark.slow
def test_the_checked_adapter_gives_the_user_what_the_check_measured(adapted, tmp_path):
    model, result, scan = adapted
    check = check_adaptation(model, result, [scan], "cpu")
    assert set(check.surface_dice) == {"source", "adabn"} and check.label_free == result.selected
    chosen = check.surface_dice[check.selected][0]
    assert chosen >= check.surface_dice["source"][0] - MARGIN
    checked = apply_check(model, result, check)
    assert checked.selected == check.selected and checked.details["labelled_check"]["selected"] == check.selected
    path = tmp_path / "site.safetensors"
    save_adapter(model, checked.state, path, name="site", method=checked.method, mode=checked.mode,
                 rank=checked.rank, alpha=checked.alpha, placement=checked.placement, details=checked.summary())
    mask, used, _ = segment_checked(model, scan.image, path, device="cpu")
    # the saved adapter, through segment --adapter's per-scan check, gives exactly the measured surface Dice
    assert _surface_dice(mask, scan.mask) == pytest.approx(chosen, abs=1e-9)
    assert read_adapter_info(path).details["labelled_check"]["surface_dice"] == check.to_dict()["surface_dice"]


@pytest.mark.slow
def test_an_adapter_worse_on_the_labelled_scan_changes_nothing(adapted):
    """With the source model's own mask as the truth every adapted candidate that changes the mask is worse there:
    whatever the label-free selection was, the check must answer "no adapter", for both rules."""
    model, result, scan = adapted
    own = segment_image(model, scan.image, device="cpu")
    assert sitk.GetArrayViewFromImage(own).any()
    truth = LabelledScan(scan.name, scan.image, own)
    check = check_adaptation(model, result, [truth], "cpu", rule="pick")
    assert check.surface_dice["source"] == [1.0] and check.selected == "source", check.to_dict()
    checked = apply_check(model, result, check)
    assert checked.selected == "source" and checked.state == {} and not checked.adapted
    # the veto rule on the same measurements (segmenting the scan again would give the same numbers)
    vetoed, _ = decide(check.surface_dice, result.selected, "veto")
    if check.surface_dice["adabn"][0] < 1.0 - MARGIN:
        assert vetoed == "source"


def test_check_scans_must_be_labelled_on_their_own_grid(tmp_path):
    image = sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 100, (20, 20, 20)).astype(np.float32))
    shifted = sitk.Image(20, 20, 20, sitk.sitkUInt8)
    shifted.SetOrigin((5.0, 0.0, 0.0))
    shifted[10, 10, 10] = 1
    sitk.WriteImage(image, str(tmp_path / "img.nii.gz"))
    sitk.WriteImage(shifted, str(tmp_path / "shifted.nii.gz"))
    with pytest.raises(ConvLoRASegError, match="not on its image's grid"):
        read_labelled_scans([(tmp_path / "img.nii.gz", tmp_path / "shifted.nii.gz")])
    shifted.SetOrigin((0.0, 0.0, 0.0))
    shifted[10, 10, 10] = 0
    with pytest.raises(ConvLoRASegError, match="empty"):
        check_adaptation(None, None, [LabelledScan("empty", image, shifted)])


@pytest.mark.slow
def test_cli_adapt_check_records_the_check_and_refuses_bad_masks(capsys, adapted, tmp_path):
    model, _, scan = adapted
    target, _ = simulate_site(*[read_image(p) for p in demo_heads()["colin27"]], "philips3", seed=1)
    files = {"target": target, "check": scan.image, "mask": scan.mask}
    for k, img in files.items():
        sitk.WriteImage(img, str(tmp_path / f"{k}.nii.gz"))
    bad = sitk.Image(scan.mask)
    bad.SetOrigin(tuple(o + 10.0 for o in bad.GetOrigin()))
    sitk.WriteImage(bad, str(tmp_path / "bad_mask.nii.gz"))
    dest = tmp_path / "site.safetensors"
    base = ["adapt", str(tmp_path / "target.nii.gz"), "-o", str(dest), "--method", "adabn", "--device", "cpu"]

    code = cli.main(base + ["--check", str(tmp_path / "check.nii.gz"), str(tmp_path / "bad_mask.nii.gz")])
    err = capsys.readouterr().err
    assert code == 2 and "not on its image's grid" in err and "Traceback" not in err and not dest.exists()
    code = cli.main(["adapt", "--sites", str(tmp_path), "--check", "a", "b"])
    assert code == 2 and "belong to one site" in capsys.readouterr().err

    code = cli.main(base + ["--check", str(tmp_path / "check.nii.gz"), str(tmp_path / "mask.nii.gz"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert "check" in {e.get("stage") for e in events if e["event"] == "progress"}
    summary = events[-1]["summary"]
    check = summary["labelled_check"]
    assert check["scans"] == ["check.nii.gz"] and summary["selected"] == check["selected"]
    assert summary["label_free_selected"] == check["label_free_selected"]
    assert read_adapter_info(dest).details["labelled_check"]["selected"] == check["selected"]
    sd = check["surface_dice"]
    assert np.mean(sd[check["selected"]]) >= np.mean(sd["source"]) - 1e-9
