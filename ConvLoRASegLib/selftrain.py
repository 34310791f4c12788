"""Adaptation to a target site without labels: UDAS self-training with ConvLoRA and AdaBN (the paper's stage 3).

The early segmentation head (ESH, frozen) reads the early U-Net features; the adapted early layers are trained so
that the ESH's prediction matches the full network's prediction (BCE-with-logits(ESH logits, sigmoid(final
logits)), the paper's UDAS loss). Every state the adaptation passes through is a *candidate* — the unadapted
source model, the model after AdaBN, the model after each epoch — and the label-free criterion of
:mod:`~ConvLoRASegLib.selection` picks one; an adapted candidate must beat the source model, so the result can be
"no adaptation" (:attr:`AdaptResult.selected` = ``"source"``, an empty adapter state), and says so.

Methods (the columns of the paper's Table 1), each a :class:`Method`: what trains, which BatchNorm statistics,
where the pseudo-labels come from and which output learns them:

=================  ======================================================================================
``adabn``          AdaBN only: target BatchNorm statistics, no training.
``self-training``  every U-Net weight, on the frozen source model's hard (thresholded) pseudo-labels.
``udas``           every ``init_path`` weight trainable (no LoRA), ESH consistency, source BN statistics.
``udas-convlora``  ConvLoRA in the placement, ESH consistency, source BN statistics.
``convlora-adabn`` ConvLoRA + AdaBN + the BN affine parameters of the adapted stages (default).
=================  ======================================================================================

Modes: ``paper`` does what the paper's code does (UDAS pseudo-labels recomputed at every step and not detached;
BatchNorm in train mode, momentum 0.1, for ``convlora-adabn``; fp32; every slice each epoch). ``fast`` runs AdaBN
first, computes the pseudo-labels once without gradients (in the pass that scores the AdaBN candidate),
back-propagates only through the layers up to the ESH, caps the optimiser steps per epoch
(:data:`FAST_STEPS_PER_EPOCH`), runs its forward passes in bf16 where the hardware has it and scores the adapted
model after its last epoch only (:data:`FAST_SCORED_EPOCHS`; 3 epochs on one scan by default, 5 on several:
:func:`default_epochs`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .adabn import adabn_volumes, batchnorm_layers, set_bn_momentum_mode
from .convlora import PLACEMENTS, adapter_state, inject_convlora, load_adapter_state, remove_convlora
from .constants import ADAPT_EPOCHS, ONE_SCAN_EPOCHS
from .constants import MODES as _MODES
from .errors import Cancelled, ConvLoRASegError
from .model import ConvLoRASegModel
from .segment import autocast_dtype, grad_scaler, nonempty_slices, predict_slices, resolve_device
from .selection import SCORE_SLICE_STEP, SOURCE, CandidateScore, VolumeScore, choose, per_volume_table, score_model
from .unet import LEVELS

MODES = _MODES
#: Fast mode's default cap on optimiser steps per epoch (256 slices per epoch at batch 32; a new random subset each
#: epoch). Measured on a 10-volume cohort (BENCHMARKS.md, Speed): within 0.01 surface Dice of paper mode.
FAST_STEPS_PER_EPOCH = 8
#: Which trained candidates fast mode scores: ``"last"``, the model after its last epoch only (with the source model
#: and AdaBN alone), or ``"every"`` epoch (paper mode always: the paper picks the epoch label-free). In fast mode the
#: pseudo-labels are fixed and the label-free score mostly rises epoch by epoch; on real scans of unseen scanners,
#: scoring every epoch or the last one only delivered the same masks at every epoch count (bench/one_scan_epochs.py):
#: the earlier epochs' scoring passes cost time and chose nothing.
FAST_SCORED_EPOCHS = "last"
SCORED_EPOCHS = ("every", "last")
#: Self-training ignores pixels whose teacher probability is within this distance of 0.5 (not confident).
SELF_TRAINING_CONFIDENCE = 0.3
Progress = Optional[Callable[[dict], None]]
StopFlag = Optional[Callable[[], bool]]


@dataclass(frozen=True)
class Method:
    """One adaptation method of the paper's Table 1."""

    name: str
    #: target BatchNorm statistics (AdaBN)
    adabn: bool
    #: what trains: ``"nothing"``, ``"lora"``, ``"lora+bn"`` (LoRA + BN affine of the placement), ``"init_path"``
    #: (every weight of the first stage), ``"unet"`` (every U-Net weight)
    trains: str
    #: ``"esh"``: the ESH learns the model's own final prediction (UDAS); ``"final"``: the final output learns the
    #: frozen source model's hard pseudo-labels (self-training)
    learner: str

    @property
    def uses_lora(self) -> bool:
        return self.trains.startswith("lora")

    @property
    def trained(self) -> str:
        """What its trainable parameters are, in words."""
        return TRAINED[self.trains]


#: What each kind of method trains, in words: the "trainable parameters" of ``adapt`` and ``info``. An adapter file
#: stores more values: these and the BatchNorm statistics (running mean and variance) of every layer for AdaBN.
TRAINED = {"nothing": "none: AdaBN statistics only", "lora": "ConvLoRA A and B", "lora+bn":
           "ConvLoRA A and B + BatchNorm scale and shift of the placement", "init_path": "every init_path weight",
           "unet": "every U-Net weight"}


METHOD_SPECS: Dict[str, Method] = {m.name: m for m in (
    Method("convlora-adabn", adabn=True, trains="lora+bn", learner="esh"),
    Method("adabn", adabn=True, trains="nothing", learner="esh"),
    Method("udas", adabn=False, trains="init_path", learner="esh"),
    Method("udas-convlora", adabn=False, trains="lora", learner="esh"),
    Method("self-training", adabn=False, trains="unet", learner="final"),
)}
METHODS = tuple(METHOD_SPECS)


@dataclass
class AdaptResult:
    """The selected candidate as an adapted copy of the model, what its adapter file stores, and every score."""

    model: ConvLoRASegModel
    #: the selected candidate's adapter tensors (empty when the source model was selected)
    state: Dict[str, torch.Tensor]
    method: str
    mode: str
    placement: str
    rank: int
    alpha: float
    epochs: int
    #: the selected candidate: ``"source"``, ``"adabn"`` or ``"epoch N"``
    selected: str
    #: label-free score of every candidate, in the order they were made
    candidates: Dict[str, float]
    #: the label-free score (:mod:`~ConvLoRASegLib.selection`: ESH agreement + gamma consistency) of the model the
    #: training started from (after AdaBN in fast mode, else the source model), then after each scored epoch (every
    #: epoch in paper mode, the last in fast mode; JSON ``score_per_epoch``; the attribute keeps its first name for
    #: the benchmarks)
    agreement: List[float]
    losses: List[float]
    trainable_params: int
    seconds: float
    n_volumes: int
    n_slices: int
    seed: int
    #: every candidate's adapter tensors (a few tens of kB each), for benchmarks that score them all
    candidate_states: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    details: Dict[str, object] = field(default_factory=dict)

    @property
    def adapted(self) -> bool:
        """False when no adapted candidate beat the unadapted model: the adapter changes nothing."""
        return self.selected != SOURCE

    @property
    def best_epoch(self) -> int:
        return int(self.selected.split()[1]) if self.selected.startswith("epoch ") else 0

    @property
    def best_agreement(self) -> float:
        """The selected candidate's label-free score (JSON ``score``)."""
        return self.candidates[self.selected]

    @property
    def agreement_source(self) -> float:
        """The unadapted model's label-free score (JSON ``score_source``)."""
        return self.candidates[SOURCE]

    def candidate_words(self, name: str) -> str:
        """What candidate ``name`` is, in words (``"adabn"`` -> ``"AdaBN alone (...)"``)."""
        spec = METHOD_SPECS.get(self.method)
        if name == SOURCE:
            return "the unadapted model (no adapter)"
        if name == "adabn":
            return "AdaBN alone (the target's BatchNorm statistics" + (", no trained ConvLoRA)" if spec and
                                                                         spec.uses_lora else ")")
        trained = spec.trained if spec else self.method
        return f"{name} of training ({trained}{' + AdaBN statistics' if spec and spec.adabn else ''})"

    def verdict(self) -> str:
        """Which candidate was kept and why, in one sentence (label-free scores: ESH agreement + gamma consistency;
        a higher-scoring candidate may have been refused by :func:`~ConvLoRASegLib.selection.choose`'s guards)."""
        from .selection import CONSISTENCY_DROP_MAX, VOLUME_SHRINK_MAX

        s, kept = self.candidates, self.selected
        per = self.details.get("candidate_scores") or {}
        src = per.get(SOURCE) or {}

        def refused(name: str) -> str:
            c = per.get(name) or {}
            if src and c.get("consistency", 1.0) < src.get("consistency", 0.0) - CONSISTENCY_DROP_MAX:
                return "its gamma consistency fell below the unadapted model's"
            if src and c.get("brain_ml", 1e9) < src.get("brain_ml", 0.0) * (1.0 - VOLUME_SHRINK_MAX):
                return f"its brain was more than {VOLUME_SHRINK_MAX:.0%} smaller than the unadapted model's"
            return "a guard refused it"

        higher = [n for n in s if n not in (kept, SOURCE) and s[n] > s[kept]]
        if kept == SOURCE:
            others = ", ".join(f"{n} {v:.3f}" for n, v in s.items() if n != SOURCE)
            text = f"kept the unadapted model (label-free score {s[SOURCE]:.3f})" + (
                "" if higher else f": no adapted candidate beat it ({others or 'none made'})")
        else:
            text = (f"kept {self.candidate_words(kept)}: label-free score {s[kept]:.3f}, the unadapted model "
                    f"{s[SOURCE]:.3f}")
            beaten = [n for n in s if n not in (kept, SOURCE) and n not in higher]
            if beaten:
                text += ", " + ", ".join(f"{n} {s[n]:.3f}" for n in beaten)
        if higher:
            text += "; " + "; ".join(f"{n} scored higher ({s[n]:.3f}) but {refused(n)}" for n in higher)
        return text

    def summary(self) -> Dict[str, object]:
        return {"method": self.method, "mode": self.mode, "placement": self.placement, "rank": self.rank,
                "alpha": self.alpha, "epochs": self.epochs, "selected": self.selected, "adapted": self.adapted,
                "best_epoch": self.best_epoch, "score": self.best_agreement,
                "score_source": self.agreement_source, "candidates": self.candidates,
                "score_per_epoch": self.agreement, "loss_per_epoch": self.losses,
                "trainable_params": self.trainable_params, "seconds": round(self.seconds, 2),
                "n_volumes": self.n_volumes, "n_slices": self.n_slices, "seed": self.seed, **self.details}


def default_epochs(mode: str, n_volumes: int) -> int:
    """The training epochs of an adaptation when none are given: :data:`~ConvLoRASegLib.constants.ONE_SCAN_EPOCHS`
    in fast mode on one scan, else :data:`~ConvLoRASegLib.constants.ADAPT_EPOCHS`."""
    return ONE_SCAN_EPOCHS if mode == "fast" and n_volumes == 1 else ADAPT_EPOCHS


def scored_epochs(mode: str, epochs: int, scored: Optional[str] = None) -> List[int]:
    """The epochs after which the adapted model becomes a scored candidate: every epoch in paper mode (or with
    ``scored="every"``), the last one in fast mode (:data:`FAST_SCORED_EPOCHS`)."""
    scored = scored or ("every" if mode == "paper" else FAST_SCORED_EPOCHS)
    if scored not in SCORED_EPOCHS:
        raise ConvLoRASegError(f"unknown scored epochs {scored!r}; choose every or last")
    return list(range(1, epochs + 1)) if scored == "every" else ([epochs] if epochs else [])


def source_copy(model: ConvLoRASegModel) -> ConvLoRASegModel:
    """A deep copy of ``model`` as the source model: any active adapter switched off, ConvLoRA layers removed."""
    m = copy.deepcopy(model)
    m.drop_adapters()
    remove_convlora(m)
    m.sha256 = model.sha256
    return m


def selection_indices(n_volumes: int, n_selected: int) -> List[int]:
    """Which of ``n_volumes`` target volumes score the candidates: ``n_selected`` (at least 1) spread evenly from
    the first to the last, in order."""
    k = min(n_volumes, max(1, n_selected))
    return sorted({int(round(x)) for x in np.linspace(0, n_volumes - 1, k)})


def _check_stop(should_stop: StopFlag) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled("adaptation cancelled")


def _open_trainable(model: ConvLoRASegModel, method: Method, placement: str, rank: int, alpha: float) -> int:
    """Freeze everything, then open what ``method`` trains; returns the number of trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    net = model.unet
    if method.uses_lora:
        inject_convlora(net, placement, r=rank, alpha=alpha)
        if method.trains == "lora+bn":
            for stage in PLACEMENTS[placement]:
                for bn in batchnorm_layers(net.get_submodule(stage)).values():
                    bn.weight.requires_grad_(True)
                    bn.bias.requires_grad_(True)
    elif method.trains == "init_path":
        for p in net.init_path.parameters():
            p.requires_grad_(True)
    elif method.trains == "unet":
        for p in net.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def _check_fast_placement(model: ConvLoRASegModel, method: Method, mode: str, placement: str) -> None:
    """Fast mode back-propagates through the encoder up to the ESH only: layers after it would get no gradient."""
    if mode != "fast" or method.learner != "esh" or not method.uses_lora:
        return
    reached = set(LEVELS[:model.esh_level + 1])
    beyond = [s for s in PLACEMENTS[placement] if s not in reached]
    if beyond:
        raise ConvLoRASegError(f"placement {placement!r} puts ConvLoRA in {', '.join(beyond)}, after the ESH "
                               f"(level {model.esh_level}); fast mode trains only up to the ESH, so those layers "
                               "would never learn: use --mode paper or a placement within the encoder")


class _Scorer:
    """Scores candidates on the selection volumes with the label-free criterion; emits progress."""

    def __init__(self, volumes: Sequence[np.ndarray], dev: torch.device, precision: str, spacing: float,
                 emit: Callable[[dict], None], total_epochs: int, should_stop: StopFlag):
        self.volumes, self.dev, self.precision, self.spacing = volumes, dev, precision, spacing
        self.emit, self.total, self.should_stop = emit, total_epochs, should_stop
        self.slice_step = SCORE_SLICE_STEP
        self.scores: Dict[str, CandidateScore] = {}
        self.per_volume: Dict[str, List[VolumeScore]] = {}

    @property
    def table(self) -> Dict[str, float]:
        return {n: c.value for n, c in self.scores.items()}

    @property
    def consistency(self) -> Dict[str, float]:
        return {n: c.consistency for n, c in self.scores.items()}

    @property
    def brain_ml(self) -> Dict[str, float]:
        return {n: c.brain_ml for n, c in self.scores.items()}

    def record(self, name: str, scores: List[VolumeScore], epoch: int) -> float:
        self.per_volume[name] = scores
        self.scores[name] = CandidateScore.of(scores)
        self.emit({"event": "progress", "stage": "select", "step": epoch, "total": self.total, "epoch": epoch,
                   "candidate": name, "score": self.scores[name].value})
        return self.scores[name].value

    def predict(self, model: ConvLoRASegModel, v: np.ndarray, with_esh: bool):
        _check_stop(self.should_stop)
        return predict_slices(model, v, self.dev, precision=self.precision, with_esh=with_esh)

    def score_volume(self, model: ConvLoRASegModel, v: np.ndarray, predicted=None) -> VolumeScore:
        _check_stop(self.should_stop)
        return score_model(model, v, self.dev, self.precision, predicted=predicted, slice_step=self.slice_step)

    def score(self, name: str, model: ConvLoRASegModel, epoch: int) -> float:
        return self.record(name, [self.score_volume(model, v) for v in self.volumes], epoch)


def adapt(model: ConvLoRASegModel, target: Sequence[np.ndarray], method: str = "convlora-adabn",
          mode: str = "fast", epochs: Optional[int] = None, lr: float = 1e-4, batch_size: int = 32, rank: int = 2,
          alpha: float = 2.0, placement: str = "init_path", seed: int = 0, device="auto",
          selection_volumes: int = 4, steps_per_epoch: Optional[int] = None, precision: Optional[str] = None,
          progress: Progress = None, should_stop: StopFlag = None, scored: Optional[str] = None) -> AdaptResult:
    """Adapt a copy of ``model`` to the target volumes (each an N x H x W stack of working-grid slices).

    Args:
        model: the source model (left unchanged).
        target: unlabeled target volumes as produced by :func:`~ConvLoRASegLib.volumes.to_slices` (``.slices``).
        method, mode: see the module docstring. ``epochs``: training epochs (0 allowed: AdaBN only); None:
            :func:`default_epochs` (3 in fast mode on one scan, else 5).
        lr, batch_size: Adam learning rate and slices per step (the paper: 1e-4, 32).
        rank, alpha, placement: ConvLoRA settings (the paper: 2, 2, ``init_path``).
        seed: fixes initialisation and batch order: the same seed gives the same adapter.
        selection_volumes: how many target volumes score the candidates (label-free), spread evenly over the
            cohort's order (:func:`selection_indices`: files sorted by name often come grouped by subject).
        steps_per_epoch: cap on optimiser steps per epoch (a random subset of slices each epoch); 0 = all.
            None = the mode's default: all in paper mode, :data:`FAST_STEPS_PER_EPOCH` in fast mode.
        precision: ``fp32``, or ``auto``/``bf16``/``fp16``: autocast for the training forward passes (fp32 master
            weights and loss; fp16 with a gradient scaler) and, in fast mode, for the pseudo-label and scoring
            passes. None = the mode's default: ``fp32`` in paper mode, ``auto`` (bf16 where the CPU/GPU has it
            natively, else fp16 on GPUs) in fast mode.
        progress: called with dicts ``{"event": "progress", "stage": ..., "step": ..., "total": ..., ...}``.
        should_stop: polled between steps; when True, :class:`~ConvLoRASegLib.errors.Cancelled` is raised.
        scored: ``"every"`` or ``"last"``: which trained epochs become scored candidates (:func:`scored_epochs`);
            None = the mode's default (paper: every epoch; fast: :data:`FAST_SCORED_EPOCHS`).
    """
    if method not in METHOD_SPECS:
        raise ConvLoRASegError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if mode not in MODES:
        raise ConvLoRASegError(f"unknown mode {mode!r}; choose paper or fast")
    if placement not in PLACEMENTS:
        raise ConvLoRASegError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    volumes = [np.asarray(v, np.float32) for v in target if v is not None and len(v)]
    if epochs is None:
        epochs = default_epochs(mode, len(volumes))
    if epochs < 0 or (steps_per_epoch is not None and steps_per_epoch < 0) or batch_size < 1:
        raise ConvLoRASegError(f"epochs and steps per epoch must be >= 0 and the batch size >= 1 "
                               f"(got {epochs}, {steps_per_epoch}, {batch_size})")
    if precision not in (None, "auto", "fp32", "bf16", "fp16"):
        raise ConvLoRASegError(f"unknown precision {precision!r}; choose auto, fp32, bf16 or fp16")
    spec = METHOD_SPECS[method]
    _check_fast_placement(model, spec, mode, placement)
    if not volumes:
        raise ConvLoRASegError("the target cohort has no readable volumes")
    emit = progress or (lambda event: None)
    t0 = time.perf_counter()
    dev = resolve_device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    fast = mode == "fast"
    precision = precision or ("auto" if fast else "fp32")
    steps_cap = (FAST_STEPS_PER_EPOCH if fast else 0) if steps_per_epoch is None else steps_per_epoch
    if spec.trains == "nothing":
        epochs = 0
    scored_after = scored_epochs(mode, epochs, scored)

    m = source_copy(model).to(dev)
    n_trainable = _open_trainable(m, spec, placement, rank, alpha)
    stack = np.concatenate(volumes)
    keep = nonempty_slices(stack)
    train_x = torch.from_numpy(stack[keep][:, None])
    if len(train_x) == 0:
        raise ConvLoRASegError("every target slice is empty (no signal above background)")
    chosen = selection_indices(len(volumes), selection_volumes)
    # fast mode: the no-gradient passes (scores, pseudo-labels) run like segmentation, in the training precision
    scorer = _Scorer([volumes[i] for i in chosen], dev, precision if fast else "fp32", m.grid.spacing_mm, emit, epochs,
                     should_stop)
    states: Dict[str, Dict[str, torch.Tensor]] = {SOURCE: {}}
    full_steps = (len(train_x) + batch_size - 1) // batch_size
    n_steps = min(full_steps, steps_cap) if steps_cap else full_steps

    t_first = time.perf_counter()
    scorer.score(SOURCE, m, 0)
    n_scored = sum(int(nonempty_slices(v).sum()) for v in scorer.volumes)
    per_slice = (time.perf_counter() - t_first) / max(2 * n_scored, 1)  # a pass with the ESH + the perturbed shares
    expected = _expected_seconds(per_slice, spec, fast, len(train_x), n_scored, epochs, n_steps * batch_size,
                                 len(scored_after))
    emit({"event": "estimate", "seconds": expected + (t_first - t0), "elapsed": time.perf_counter() - t0})
    source_stats = adapter_state(m, bn_stats=True, trained_only=True) if spec.adabn else {}
    cached: Optional[torch.Tensor] = None
    if spec.adabn:
        emit({"event": "progress", "stage": "adabn", "step": 0, "total": len(train_x)})
        adabn_volumes(m, volumes, should_stop=should_stop, autocast=autocast_dtype(dev, precision) if fast else None)
        _check_stop(should_stop)
        emit({"event": "progress", "stage": "adabn", "step": len(train_x), "total": len(train_x)})
        states["adabn"] = adapter_state(m, bn_stats=True, trained_only=True)
        if fast and epochs and spec.learner == "esh":
            # one pass gives the pseudo-labels of every volume and the AdaBN candidate's score
            cached = _pseudo_labels(m, volumes, keep, scorer, emit, score_as="adabn", scored=chosen)
        else:
            scorer.score("adabn", m, 0)
        if not fast:  # the paper's variant starts from source statistics and lets them drift (momentum)
            load_adapter_state(m, {k: v for k, v in source_stats.items() if "running_" in k})
    if epochs and cached is None:
        if spec.learner == "final":  # self-training: the frozen source model is the teacher
            cached = _pseudo_labels(source_copy(model).to(dev).eval(), volumes, keep, scorer, emit)
        elif fast:
            cached = _pseudo_labels(m, volumes, keep, scorer, emit)
    start_name = "adabn" if spec.adabn and fast else SOURCE  # paper mode trains from the source statistics
    trajectory = [scorer.table[start_name]]

    losses: List[float] = []
    if epochs:
        params = [p for p in m.unet.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        amp = autocast_dtype(dev, precision)
        scaler = grad_scaler(dev, amp)
        for epoch in range(1, epochs + 1):
            m.eval()  # frozen parts and the ESH: eval; the paper's convlora-adabn: BN in momentum mode
            if spec.adabn and not fast:
                set_bn_momentum_mode(m.unet, momentum=0.1)
            order = torch.randperm(len(train_x), generator=gen)
            total = 0.0
            for step in range(n_steps):
                _check_stop(should_stop)
                idx = order[step * batch_size:(step + 1) * batch_size]
                loss = _loss(m, spec, fast, train_x[idx].to(dev), None if cached is None else cached[idx], amp)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                total += loss.item()
                emit({"event": "progress", "stage": "train", "step": step + 1, "total": n_steps, "epoch": epoch,
                      "epochs": epochs, "loss": loss.item()})
            losses.append(total / n_steps)
            m.eval()
            if epoch in scored_after:
                name = f"epoch {epoch}"
                trajectory.append(scorer.score(name, m, epoch))
                states[name] = adapter_state(m, bn_stats=spec.adabn, trained_only=True)

    selected = choose(scorer.table, order=[SOURCE, "adabn"], consistency=scorer.consistency,
                      brain_ml=scorer.brain_ml)
    result_model = _with_state(model, spec, placement, rank, alpha, states[selected]).to(dev)
    result = AdaptResult(
        model=result_model, state=states[selected], method=method, mode=mode,
        placement=placement if spec.uses_lora else "-", rank=rank, alpha=alpha, epochs=epochs, selected=selected,
        candidates=scorer.table, agreement=trajectory, losses=losses, trainable_params=n_trainable,
        seconds=time.perf_counter() - t0, n_volumes=len(volumes), n_slices=int(len(train_x)), seed=seed,
        candidate_states=states,
        details={"steps_per_epoch": n_steps,
                 "precision": str(autocast_dtype(dev, precision) or "fp32").replace("torch.", ""),
                 "candidate_scores": {n: vars(c) for n, c in scorer.scores.items()},
                 "candidate_volumes": per_volume_table(scorer.per_volume)})
    emit({"event": "progress", "stage": "select", "step": epochs, "total": epochs, "epoch": result.best_epoch,
          "candidate": selected, "score": result.best_agreement})
    return result


#: Cost of one slice of a training step (forward and backward; fast mode runs the encoder up to the ESH only) and of one
#: AdaBN slice (train-mode BatchNorm), in inference passes of one slice at the same precision, for
#: :func:`_expected_seconds`. Measured on a 2 mm head of 88 slices (torch 2.13, 2 Zen 4 cores): fast mode's step 0.66 s
#: for 32 slices and its bf16 AdaBN pass 1.6 s, against 0.93 s for an inference pass over the 88 slices.
TRAIN_SLICE_PASSES = {"fast": 2.0, "paper": 3.0}
ADABN_SLICE_PASSES = 2.0


def _expected_seconds(per_slice: float, spec: Method, fast: bool, n_slices: int, n_scored: int, epochs: int,
                      slices_per_epoch: int, scored_epochs: int) -> float:
    """A rough duration (seconds) of :func:`adapt`, given the time of one inference pass of one slice (``per_slice``;
    :func:`adapt` measures it on its first scoring pass and reports the result as an ``"estimate"`` event): the
    adaptation's passes counted in slices. ``n_slices``: the target's non-empty slices; ``n_scored``: those of the
    selection volumes, scored once per candidate (a pass with the ESH, one over the perturbed shares);
    ``slices_per_epoch``: trained per epoch, at :data:`TRAIN_SLICE_PASSES`; ``scored_epochs``: trained candidates."""
    passes = 2.0 * n_scored  # the source model
    if spec.adabn:
        passes += ADABN_SLICE_PASSES * n_slices + 2.0 * n_scored
    if epochs:
        passes += n_slices if (fast or spec.learner == "final") else 0.0  # pseudo-labels
        passes += epochs * slices_per_epoch * TRAIN_SLICE_PASSES["fast" if fast else "paper"]
        passes += scored_epochs * 2.0 * n_scored
    return passes * per_slice


def _with_state(model: ConvLoRASegModel, spec: Method, placement: str, rank: int, alpha: float,
                state: Dict[str, torch.Tensor]) -> ConvLoRASegModel:
    """A frozen eval-mode copy of the source ``model`` with one candidate's adapter tensors (none: the source)."""
    m = source_copy(model)
    if state:
        _open_trainable(m, spec, placement, rank, alpha)
        load_adapter_state(m, state)
    for p in m.parameters():
        p.requires_grad_(False)
    return m.eval()


def candidate_model(model: ConvLoRASegModel, result: AdaptResult, name: str) -> ConvLoRASegModel:
    """Candidate ``name`` of ``result`` (``"source"``, ``"adabn"``, ``"epoch N"``) applied to a copy of the source
    ``model`` the adaptation started from: for benchmarks that score every candidate against labels."""
    if name not in result.candidate_states:
        raise ConvLoRASegError(f"no candidate {name!r}; the adaptation made {', '.join(result.candidate_states)}")
    placement = result.placement if result.placement != "-" else "init_path"  # "-": a method without LoRA
    return _with_state(model, METHOD_SPECS[result.method], placement, result.rank, result.alpha,
                       result.candidate_states[name])


def _pseudo_labels(teacher: ConvLoRASegModel, volumes: Sequence[np.ndarray], keep: np.ndarray, scorer: _Scorer,
                   emit: Callable[[dict], None], score_as: Optional[str] = None,
                   scored: Sequence[int] = ()) -> torch.Tensor:
    """The teacher's final probabilities on every slice of ``train_x`` (float16, N x 1 x H x W); with ``score_as``
    the same pass scores the teacher as that candidate on the selection volumes (indices ``scored``, in order)."""
    outs, scores = [], []
    for i, v in enumerate(volumes):
        emit({"event": "progress", "stage": "pseudo-labels", "step": i, "total": len(volumes)})
        with_esh = score_as is not None and i in scored
        got = scorer.predict(teacher, v, with_esh)
        probs = got[0] if with_esh else got
        if with_esh:
            scores.append(scorer.score_volume(teacher, v, predicted=got))
        outs.append(probs.astype(np.float16))
    emit({"event": "progress", "stage": "pseudo-labels", "step": len(volumes), "total": len(volumes)})
    if score_as is not None:
        scorer.record(score_as, scores, 0)
    p = np.concatenate(outs)[keep][:, None]  # numpy: no autocast a caller may have around
    return torch.from_numpy(p)


def _loss(m: ConvLoRASegModel, spec: Method, fast: bool, x: torch.Tensor, cached: Optional[torch.Tensor],
          amp: Optional[torch.dtype]) -> torch.Tensor:
    """The method's loss on one batch: UDAS (the ESH learns the final prediction) or self-training (the final
    output learns the frozen source model's confident hard labels)."""
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        if spec.learner == "final":
            logits = m(x)
        elif fast:
            logits = m.forward_esh(x)
        else:
            final, logits = m.forward_both(x)
    if spec.learner == "final":
        p = cached.to(x.device, torch.float32)
        weight = ((p - 0.5).abs() >= SELF_TRAINING_CONFIDENCE).float()
        return F.binary_cross_entropy_with_logits(logits.float(), (p >= 0.5).float(), weight=weight,
                                                  reduction="sum") / weight.sum().clamp_min(1.0)
    if fast:
        return F.binary_cross_entropy_with_logits(logits.float(), cached.to(x.device, torch.float32))
    return F.binary_cross_entropy_with_logits(logits.float(), torch.sigmoid(final.float()))  # the paper: not detached
