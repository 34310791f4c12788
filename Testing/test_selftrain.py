"""Adaptation: every method of Table 1 runs, trains only what it should, is seeded, cancellable and reports."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ConvLoRASegLib import store
from ConvLoRASegLib.convlora import AdapterSet
from ConvLoRASegLib.errors import Cancelled, ConvLoRASegError
from ConvLoRASegLib.grid import WorkingGrid
from ConvLoRASegLib.model import ConvLoRASegModel
from ConvLoRASegLib.selftrain import METHODS, adapt


def _volumes(n=2, slices=10, size=32, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    vols = []
    for _ in range(n):
        v = np.zeros((slices, size, size), np.float32)
        for k in range(slices):
            r = size * (0.2 + 0.15 * np.sin(np.pi * (k + 1) / (slices + 1)))
            v[k] = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r * r) * (0.6 + 0.2 * rng.random())
        vols.append(np.clip(v + rng.normal(0, 0.03, v.shape), 0, 1).astype(np.float32))
    return vols


@pytest.fixture
def force_adapted(monkeypatch):
    """The tiny random test model's masks are not brains: let the selection take the best *adapted* candidate,
    so that tests can see what each method trains."""
    from ConvLoRASegLib import selftrain

    monkeypatch.setattr(selftrain, "choose", lambda table, order=(), consistency=None, brain_ml=None: max(
        (n for n in table if n != "source"), key=lambda n: (n.startswith("epoch"), table[n], n)))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    m = ConvLoRASegModel(grid=WorkingGrid(4.0, 32)).eval()
    path = tmp_path_factory.mktemp("m") / "m.safetensors"
    store.save_model(m, path)
    m.info["path"] = str(path)
    return m


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["fast", pytest.param("paper", marks=pytest.mark.slow)])
def test_methods_run_and_train_what_they_should(model, method, mode, force_adapted):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    events = []
    r = adapt(model, _volumes(), method=method, mode=mode, epochs=1, batch_size=8, device="cpu",
              progress=events.append)
    for k, v in model.state_dict().items():  # the source model is left alone
        assert torch.equal(v, before[k]), k
    assert len(r.agreement) == (1 if method == "adabn" else 2)
    expected = {"source"} | ({"adabn"} if method in ("adabn", "convlora-adabn") else set()) | (
        set() if method == "adabn" else {"epoch 1"})
    assert set(r.candidates) == expected and r.selected in expected - {"source"}
    assert all(0.0 <= a <= 1.0 for a in r.agreement)
    keys = set(r.state)
    if method == "convlora-adabn":
        assert r.trainable_params == 3762 + 192  # LoRA + the 6 init_path BN affines (16 channels x 2)
        assert "init_path.0.lora_A" in keys and "down3.0.running_mean" in keys
        assert "init_path.2.conv_path.0.bn.weight" in keys
    elif method == "udas-convlora":
        assert r.trainable_params == 3762 and not any(k.endswith("running_mean") for k in keys)
    elif method == "adabn":
        assert r.trainable_params == 0 and all(k.endswith(("running_mean", "running_var")) for k in keys)
    elif method == "udas":
        assert "init_path.0.weight" in keys and not any(k.startswith("down1") for k in keys)
    elif method == "self-training":
        assert r.trainable_params == sum(p.numel() for p in model.unet.parameters())
    # one estimate of the whole duration, timed on the first scoring pass, before any adaptation stage
    estimates = [i for i, e in enumerate(events) if e["event"] == "estimate"]
    assert len(estimates) == 1 and events[estimates[0]]["seconds"] > events[estimates[0]]["elapsed"] > 0
    assert not any(e.get("stage") in ("adabn", "pseudo-labels", "train") for e in events[:estimates[0]])
    progress = [e for e in events if e["event"] != "estimate"]
    stages = {e["stage"] for e in progress}
    assert "select" in stages and (method == "adabn" or "train" in stages)
    # computed once: in fast mode, and for self-training (its teacher is the frozen source model)
    assert ("pseudo-labels" in stages) == ((mode == "fast" and method != "adabn") or method == "self-training")
    for e in progress:
        assert e["event"] == "progress" and {"stage", "step", "total"} <= set(e)


@pytest.mark.slow
def test_adapter_under_one_percent_and_applies_exactly(model, tmp_path, force_adapted):
    r = adapt(model, _volumes(), epochs=1, batch_size=8, device="cpu")
    n_base = sum(p.numel() for p in model.parameters())
    n_adapter = sum(v.numel() for k, v in r.state.items() if not k.endswith(("running_mean", "running_var")))
    assert n_adapter / n_base < 0.01
    info = store.save_adapter(model, r.state, tmp_path / "a.safetensors", name="t", method=r.method, mode=r.mode,
                              rank=r.rank, alpha=r.alpha, placement=r.placement, details=r.summary())
    assert info.score == pytest.approx(r.best_agreement) and info.trainable_params == r.trainable_params
    # the source model + the adapter reproduces the adapted model
    _, tensors = store.load_adapter(model, info.path)
    target = store.load_model(model.info["path"])
    aset = AdapterSet(target)
    aset.add("t", tensors)
    aset.set_adapter("t")
    x = torch.from_numpy(_volumes(1)[0][:, None])
    with torch.no_grad():
        for name, buf in r.model.named_buffers():  # the file keeps BN statistics in float16
            if name.endswith(("running_mean", "running_var")):
                buf.copy_(buf.half().float())
        assert torch.allclose(target.eval()(x), r.model.eval()(x), atol=1e-5)
    assert info.bytes < 0.01 * Path(model.info["path"]).stat().st_size


@pytest.mark.slow
def test_adapt_starts_from_the_source_model_even_with_an_active_adapter(model, tmp_path):
    from ConvLoRASegLib.segment import activate_adapter

    r = adapt(model, _volumes(), epochs=1, batch_size=8, device="cpu")
    info = store.save_adapter(model, r.state, tmp_path / "a.safetensors", name="t", method=r.method, mode=r.mode,
                              rank=r.rank, alpha=r.alpha, placement=r.placement)
    m = store.load_model(model.info["path"])
    activate_adapter(m, info)
    a = adapt(m, _volumes(), epochs=0, device="cpu", seed=5)
    b = adapt(store.load_model(model.info["path"]), _volumes(), epochs=0, device="cpu", seed=5)
    for k in b.state:
        assert torch.equal(a.state[k], b.state[k]), k


@pytest.mark.slow
def test_same_seed_same_adapter_and_seed_matters(model, force_adapted):
    a = adapt(model, _volumes(), epochs=2, batch_size=8, seed=3, device="cpu")
    b = adapt(model, _volumes(), epochs=2, batch_size=8, seed=3, device="cpu")
    c = adapt(model, _volumes(), epochs=2, batch_size=8, seed=4, device="cpu")
    assert a.agreement == b.agreement
    for k in a.state:
        assert torch.equal(a.state[k], b.state[k]), k
    assert not torch.equal(a.state["init_path.0.lora_A"], c.state["init_path.0.lora_A"])


def test_cancel_and_bad_arguments(model):
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled):
        adapt(model, _volumes(), epochs=2, batch_size=4, device="cpu", should_stop=stop)
    with pytest.raises(ConvLoRASegError, match="unknown method"):
        adapt(model, _volumes(), method="magic")
    with pytest.raises(ConvLoRASegError, match="must be >= 0"):
        adapt(model, _volumes(), steps_per_epoch=-1)
    with pytest.raises(ConvLoRASegError, match="unknown precision"):
        adapt(model, _volumes(), precision="fp8")
    with pytest.raises(ConvLoRASegError, match="no readable volumes"):
        adapt(model, [])
    with pytest.raises(ConvLoRASegError, match="empty"):
        adapt(model, [np.zeros((4, 32, 32), np.float32)], epochs=1)


@pytest.mark.slow
def test_fast_mode_backpropagates_only_up_to_the_esh(model, monkeypatch):
    """In fast mode the decoder runs only for the cached pseudo-labels and the per-epoch scoring, never per step."""
    from ConvLoRASegLib.unet import UNet2D

    calls = {"decode": 0}
    orig = UNet2D.decode

    def counting(self, feats):
        calls["decode"] += int(torch.is_grad_enabled())
        return orig(self, feats)

    monkeypatch.setattr(UNet2D, "decode", counting)
    adapt(model, _volumes(), mode="fast", epochs=2, batch_size=4, device="cpu")
    assert calls["decode"] == 0
    adapt(model, _volumes(), mode="paper", epochs=1, batch_size=4, device="cpu")
    assert calls["decode"] > 0


@pytest.mark.slow
def test_adapt_inside_an_outer_autocast(model, force_adapted):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = adapt(model, _volumes(), epochs=1, batch_size=8, device="cpu")
    assert r.state["init_path.0.lora_A"].dtype == torch.float32


@pytest.mark.slow
def test_mode_defaults_for_steps_and_precision(model):
    """Fast mode caps the steps per epoch and uses the hardware's bf16; paper mode runs every step in fp32."""
    from ConvLoRASegLib.segment import autocast_dtype
    from ConvLoRASegLib.selftrain import FAST_STEPS_PER_EPOCH

    vols = _volumes(n=4, slices=20)  # 80 slices = 20 steps of 4
    kw = dict(epochs=1, batch_size=4, device="cpu", selection_volumes=1)
    fast = adapt(model, vols, mode="fast", **kw)
    paper = adapt(model, vols, mode="paper", **kw)
    every = adapt(model, vols, mode="fast", steps_per_epoch=0, precision="fp32", **kw)
    auto = autocast_dtype(torch.device("cpu"), "auto")
    assert fast.details["steps_per_epoch"] == FAST_STEPS_PER_EPOCH < 20
    assert fast.details["precision"] == (str(auto).replace("torch.", "") if auto else "fp32")
    assert paper.details["steps_per_epoch"] == 20 and paper.details["precision"] == "fp32"
    assert every.details["steps_per_epoch"] == 20 and every.details["precision"] == "fp32"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_fast_mode_scores_the_adabn_model_in_its_pseudo_label_pass(model, precision):
    """The post-AdaBN agreement taken from the pseudo-label pass equals a separate scoring of the AdaBN model."""
    merged = adapt(model, _volumes(n=3), mode="fast", epochs=1, batch_size=8, device="cpu", precision=precision,
                   selection_volumes=2)
    alone = adapt(model, _volumes(n=3), mode="fast", epochs=0, batch_size=8, device="cpu", precision=precision,
                  selection_volumes=2)
    assert merged.agreement[0] == alone.agreement[0] == alone.candidates["adabn"]
    assert merged.agreement_source == alone.agreement_source


# ------------------------------------------------------------------------------------ a selector that can say no

@pytest.mark.slow
def test_source_is_a_candidate_and_wins_when_nothing_beats_it(model, tmp_path):
    """The random test model's masks are no brains: every candidate is refused, so the source model is kept, the
    adapter is empty and applying it changes nothing."""
    from ConvLoRASegLib.segment import activate_adapter, predict_slices

    r = adapt(model, _volumes(), epochs=1, batch_size=8, device="cpu")
    assert set(r.candidates) == {"source", "adabn", "epoch 1"}
    assert r.selected == "source" and not r.adapted and r.state == {}
    info = store.save_adapter(model, r.state, tmp_path / "a.safetensors", name="t", method=r.method, mode=r.mode,
                              rank=r.rank, alpha=r.alpha, placement=r.placement, details=r.summary())
    assert info.details["adapted"] is False and info.details["candidates"] == r.candidates
    m = store.load_model(model.info["path"])
    v = _volumes(1)[0]
    plain = predict_slices(m, v, "cpu", precision="fp32")
    activate_adapter(m, info)
    assert np.array_equal(predict_slices(m, v, "cpu", precision="fp32"), plain)


@pytest.mark.slow
def test_the_selection_takes_the_best_candidate_and_prefers_no_adapter_on_ties(model, monkeypatch):
    from ConvLoRASegLib import selection

    monkeypatch.setattr(selection, "PLAUSIBLE_BRAIN_ML", (0.0, 1e9))
    r = adapt(model, _volumes(), epochs=2, batch_size=8, device="cpu")
    best = max(r.candidates.values())
    winners = [n for n, v in r.candidates.items() if v == best]
    assert r.selected == ("source" if r.candidates["source"] == best else winners[0])
    assert selection.choose({"source": 0.5, "adabn": 0.5, "epoch 1": 0.4}, ["source", "adabn"]) == "source"
    assert selection.choose({"source": 0.5, "adabn": 0.6, "epoch 1": 0.7}, ["source", "adabn"]) == "epoch 1"


@pytest.mark.slow
def test_the_adapted_model_keeps_its_lora_when_segmented(model, force_adapted):
    """segment_image(result.model) used to zero every lora_B (AdapterSet.disable on a model it never adapted)."""
    from ConvLoRASegLib.convlora import lora_layers
    from ConvLoRASegLib.segment import activate_adapter, predict_slices

    r = adapt(model, _volumes(), epochs=1, batch_size=8, device="cpu", precision="fp32")
    assert r.selected == "epoch 1"
    v = _volumes(1)[0]
    before = predict_slices(r.model, v, "cpu", precision="fp32")
    activate_adapter(r.model, None)
    assert any(layer.lora_B.abs().sum() > 0 for layer in lora_layers(r.model).values())
    assert np.array_equal(predict_slices(r.model, v, "cpu", precision="fp32"), before)


@pytest.mark.slow
def test_self_training_learns_hard_pseudo_labels(model, monkeypatch, force_adapted):
    """Soft targets equal to the student's own output at the start give a zero gradient: a no-op."""
    import torch.nn.functional as F

    targets = []
    orig = F.binary_cross_entropy_with_logits

    def spy(logits, target, *a, **k):
        targets.append(target.detach())
        return orig(logits, target, *a, **k)

    monkeypatch.setattr(F, "binary_cross_entropy_with_logits", spy)
    adapt(model, _volumes(), method="self-training", mode="paper", epochs=1, batch_size=8, device="cpu")
    assert targets and all(set(torch.unique(t).tolist()) <= {0.0, 1.0} for t in targets)


@pytest.mark.slow
def test_fp16_training_uses_a_gradient_scaler(model, scaled_steps, force_adapted):
    adapt(model, _volumes(), epochs=1, batch_size=8, device="cpu", precision="fp16", steps_per_epoch=1)
    assert scaled_steps == [True]


@pytest.mark.slow
def test_fast_mode_refuses_layers_after_the_esh(model):
    with pytest.raises(ConvLoRASegError, match="after the ESH"):
        adapt(model, _volumes(), placement="all", mode="fast", epochs=1, device="cpu")
    r = adapt(model, _volumes(), placement="all", mode="paper", epochs=1, batch_size=8, steps_per_epoch=1,
              device="cpu")
    assert r.trainable_params > 3762


def test_no_reference_to_torch_out_of_memory_error_that_older_torch_lacks():
    import ConvLoRASegLib
    from ConvLoRASegLib import segment

    root = Path(ConvLoRASegLib.__file__).parent
    assert not [p.name for p in root.rglob("*.py") if "torch.OutOfMemoryError" in p.read_text(encoding="utf-8")]
    assert issubclass(segment.OutOfMemoryError, torch.cuda.OutOfMemoryError)


def test_scoring_volumes_are_spread_over_the_cohort():
    """Files sorted by name come grouped by subject or session: the first N would score one subject only."""
    from ConvLoRASegLib.selftrain import selection_indices

    assert selection_indices(10, 4) == [0, 3, 6, 9]
    assert selection_indices(12, 4) == [0, 4, 7, 11]
    assert selection_indices(3, 4) == [0, 1, 2] and selection_indices(5, 1) == [0] and selection_indices(1, 0) == [0]


@pytest.mark.slow
def test_the_result_says_which_candidate_it_kept_and_why(model, force_adapted, monkeypatch):
    r = adapt(model, _volumes(), epochs=1, batch_size=8, device="cpu")
    text = r.verdict()
    s = r.candidates
    assert text.startswith(f"kept {r.selected} of training (ConvLoRA A and B + BatchNorm scale and shift of the "
                           f"placement + AdaBN statistics): label-free score {s[r.selected]:.3f}, the unadapted "
                           f"model {s['source']:.3f}")
    r.selected = "adabn"
    assert r.verdict().startswith("kept AdaBN alone (the target's BatchNorm statistics, no trained ConvLoRA)")
    r.selected = "source"
    assert r.verdict().startswith(f"kept the unadapted model (label-free score {s['source']:.3f})")
    r.candidates = {"source": 0.5, "adabn": 0.6, "epoch 1": 0.4}
    r.details["candidate_scores"] = {"source": {"consistency": 0.5, "brain_ml": 1000.0},
                                     "adabn": {"consistency": 0.6, "brain_ml": 900.0}}
    assert r.verdict() == ("kept the unadapted model (label-free score 0.500); adabn scored higher (0.600) but its "
                           "brain was more than 2% smaller than the unadapted model's")


def test_fast_mode_scores_its_last_epoch_and_paper_mode_every_epoch(model):
    """Fast mode's candidates: the source model, AdaBN alone and the model after its last epoch (its pseudo-labels are
    fixed, and on real scans the score and the accuracy rose with every epoch); paper mode scores every epoch."""
    from ConvLoRASegLib.constants import ADAPT_EPOCHS, ONE_SCAN_EPOCHS
    from ConvLoRASegLib.selftrain import default_epochs, scored_epochs

    vols = _volumes(1)
    fast = adapt(model, vols, mode="fast", epochs=3, steps_per_epoch=1, batch_size=4, device="cpu")
    assert set(fast.candidates) == {"source", "adabn", "epoch 3"} and len(fast.losses) == 3
    assert len(fast.agreement) == 2 and set(fast.candidate_states) == {"source", "adabn", "epoch 3"}
    every = adapt(model, vols, mode="fast", epochs=3, steps_per_epoch=1, batch_size=4, device="cpu", scored="every")
    assert set(every.candidates) == {"source", "adabn", "epoch 1", "epoch 2", "epoch 3"}
    # the same training: the last epoch's adapter is the same whichever epochs are scored
    for k, v in fast.candidate_states["epoch 3"].items():
        assert torch.equal(v, every.candidate_states["epoch 3"][k]), k
    assert scored_epochs("paper", 3) == [1, 2, 3] and scored_epochs("fast", 3) == [3] and scored_epochs("fast", 0) == []
    with pytest.raises(ConvLoRASegError, match="scored epochs"):
        scored_epochs("fast", 3, "some")
    # the default training length: shorter for one scan in fast mode (its time budget), the same otherwise
    assert default_epochs("fast", 1) == ONE_SCAN_EPOCHS < ADAPT_EPOCHS == default_epochs("fast", 2)
    assert default_epochs("paper", 1) == ADAPT_EPOCHS
    one = adapt(model, vols, steps_per_epoch=1, batch_size=4, device="cpu")
    assert one.epochs == len(one.losses) == ONE_SCAN_EPOCHS
