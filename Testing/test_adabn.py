"""AdaBN: running statistics become the exact statistics of each BatchNorm's input over all target slices."""

import pytest
import torch
from torch import nn

from ConvLoRASegLib import UNet2D
from ConvLoRASegLib.adabn import adabn, batchnorm_layers, set_bn_momentum_mode


def _capture_inputs(net, batches):
    """Inputs every BN sees, with upstream BNs using batch statistics (train-mode BN, eval elsewhere)."""
    seen = {n: [] for n in batchnorm_layers(net)}
    hooks = [bn.register_forward_pre_hook(lambda m, i, n=n: seen[n].append(i[0].detach().clone()))
             for n, bn in batchnorm_layers(net).items()]
    net.eval()
    for bn in batchnorm_layers(net).values():
        bn.train()
    with torch.no_grad():
        for b in batches:
            net(b)
    for h in hooks:
        h.remove()
    return seen


def test_running_stats_equal_statistics_of_all_target_inputs():
    torch.manual_seed(0)
    net = UNet2D(8)
    weights = {k: v.clone() for k, v in net.state_dict().items() if not k.endswith(("running_mean", "running_var",
                                                                                      "num_batches_tracked"))}
    # batches of unequal sizes and shifted intensities: a per-batch average would be wrong here
    batches = [torch.randn(5, 1, 16, 16) * 2 + 1, torch.randn(2, 1, 16, 16) + 3, torch.randn(9, 1, 16, 16)]
    reference = _capture_inputs(net, batches)
    n = adabn(net, batches)
    assert n == 16
    for name, bn in batchnorm_layers(net).items():
        x = torch.cat(reference[name]).double()
        dims = [0, 2, 3]
        assert torch.allclose(bn.running_mean.double(), x.mean(dims), atol=1e-5), name
        assert torch.allclose(bn.running_var.double(), x.var(dims, unbiased=True), rtol=1e-4, atol=1e-6), name
    for k, v in net.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), f"{k} changed"


def test_mode_restored_and_only_chosen_modules():
    net = UNet2D(8)
    net.eval()
    before = net.down3[0].running_mean.clone()
    adabn(net, [torch.randn(4, 1, 16, 16)], modules=net.init_path)
    assert not any(m.training for m in net.modules())
    assert torch.equal(net.down3[0].running_mean, before)
    assert not torch.equal(net.init_path[2].conv_path[0].bn.running_mean, torch.zeros(8))


def test_momentum_restored():
    """adabn() reads each batch's statistics by running the layers at momentum 1; their own momentum (a value or
    None, the cumulative average) is theirs again afterwards, also after a stop."""
    net = UNet2D(8)
    layers = list(batchnorm_layers(net).values())
    layers[0].momentum = None
    want = [bn.momentum for bn in layers]
    adabn(net, [torch.randn(4, 1, 16, 16)])
    assert [bn.momentum for bn in layers] == want
    adabn(net, [torch.randn(4, 1, 16, 16)] * 2, should_stop=lambda: True)
    assert [bn.momentum for bn in layers] == want


def test_no_gradients_and_empty_input():
    net = UNet2D(8)
    with pytest.raises(ValueError):
        adabn(net, [])
    adabn(net, [torch.randn(2, 1, 16, 16, requires_grad=True)])
    assert all(p.grad is None for p in net.parameters())


def test_stop_leaves_statistics_unchanged():
    net = UNet2D(8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    adabn(net, [torch.randn(2, 1, 16, 16)] * 3, should_stop=lambda: True)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_paper_variant_momentum_mode():
    net = UNet2D(8).eval()
    layers = set_bn_momentum_mode(net.init_path, momentum=0.1)
    assert layers and all(bn.training and bn.momentum == 0.1 for bn in layers)
    assert not net.down1[0].training
    x = torch.randn(4, 1, 16, 16) + 5
    bn = net.init_path[2].conv_path[0].bn
    net(x)
    assert float(bn.running_mean.abs().max()) > 0  # statistics drift towards the target
    assert isinstance(bn, nn.BatchNorm2d)


def test_keep_source_leaves_the_named_layers_alone():
    from ConvLoRASegLib.adabn import ADABN_KEEP_SOURCE
    from ConvLoRASegLib.unet import UNet2D

    torch.manual_seed(0)
    net = UNet2D(8).eval()
    out_bn = net.get_submodule("out_path.2")
    before = out_bn.running_mean.clone(), out_bn.running_var.clone()
    adabn(net, [torch.rand(4, 1, 32, 32) * 3 + 1], keep_source=ADABN_KEEP_SOURCE)
    assert ADABN_KEEP_SOURCE == ("out_path.2",)
    assert torch.equal(out_bn.running_mean, before[0]) and torch.equal(out_bn.running_var, before[1])
    others = [m for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and n != "out_path.2"]
    assert all(not torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in others)


def test_adabn_volumes_is_adabn_over_the_nonempty_slices_in_order():
    """The one recipe (adaptation and recalibration): non-empty slices of the volumes, in order, 64 at a time,
    U-Net only, the output BatchNorm and the ESH untouched."""
    import numpy as np

    from ConvLoRASegLib.adabn import ADABN_BATCH, adabn_volumes
    from ConvLoRASegLib.grid import WorkingGrid
    from ConvLoRASegLib.model import ConvLoRASegModel

    torch.manual_seed(0)
    model = ConvLoRASegModel(grid=WorkingGrid(spacing_mm=4.0, slice_size=32), n_filters=4).eval()
    rng = np.random.default_rng(0)
    vols = [rng.random((50, 32, 32)).astype(np.float32), rng.random((40, 32, 32)).astype(np.float32)]
    vols[0][:5] = 0.0  # empty slices: left out
    esh_before = {k: v.clone() for k, v in model.esh.state_dict().items()}
    out_before = model.unet.get_submodule("out_path.2").running_mean.clone()
    twin = ConvLoRASegModel(grid=model.grid, n_filters=4).eval()
    twin.load_state_dict(model.state_dict())
    params = {n: (p, p.data.stride()) for n, p in model.named_parameters()}
    n = adabn_volumes(model, vols)
    assert n == 85
    x = torch.from_numpy(np.concatenate([vols[0][5:], vols[1]])[:, None])
    adabn(twin, [x[i:i + ADABN_BATCH] for i in range(0, len(x), ADABN_BATCH)], modules=twin.unet,
          forward=twin.unet, keep_source=("out_path.2",))
    got, ref = model.unet.state_dict(), twin.unet.state_dict()
    for k in ref:
        if k.endswith("running_mean"):  # the pass runs channels-last: the same statistics up to fp32 summation order
            sd = ref[k.replace("mean", "var")].sqrt()
            assert ((got[k] - ref[k]).abs() <= 1e-4 * sd).all(), k
        elif k.endswith("running_var"):
            assert torch.allclose(got[k], ref[k], rtol=1e-4, atol=0), k
        else:
            assert torch.equal(got[k], ref[k]), k
    # ... and the weights are the same tensors afterwards, in their own layout again
    assert all(p is params[n][0] and p.data.stride() == params[n][1] for n, p in model.named_parameters())
    assert all(torch.equal(v, esh_before[k]) for k, v in model.esh.state_dict().items())
    assert torch.equal(model.unet.get_submodule("out_path.2").running_mean, out_before)


@pytest.mark.slow
def test_training_can_recalibrate_the_source_statistics_on_the_plain_volumes():
    """bn_statistics="recalibrated": after training, the U-Net's statistics are adabn_volumes of the training
    volumes, so AdaBN on those same volumes changes nothing (with momentum statistics it does)."""
    import numpy as np

    from ConvLoRASegLib.adabn import adabn_volumes
    from ConvLoRASegLib.errors import ConvLoRASegError
    from ConvLoRASegLib.grid import WorkingGrid
    from ConvLoRASegLib.selftrain import source_copy
    from ConvLoRASegLib.train import train_source

    rng = np.random.default_rng(0)
    k, j, i = np.mgrid[:10, :32, :32]
    vols, masks = [], []
    for s in range(3):
        r = np.sqrt(((k - 5) * 3.0) ** 2 + (j - 16 - s) ** 2 + (i - 16) ** 2)
        masks.append((r < 9).astype(np.uint8))
        vols.append(np.clip(0.3 * (r < 13) + 0.5 * masks[-1] + rng.normal(0, 0.05, r.shape), 0, 1).astype(np.float32))
    kw = dict(grid=WorkingGrid(spacing_mm=4.0, slice_size=32), n_filters=4, epochs=1, esh_epochs=1, batch_size=4,
              steps_per_epoch=3, precision="fp32", device="cpu", seed=1)
    with pytest.raises(ConvLoRASegError, match="bn statistics"):
        train_source(vols[:2], masks[:2], bn_statistics="exact", **kw)
    moved = {}
    for mode in ("momentum", "recalibrated"):
        model = train_source(vols[:2], masks[:2], vols[2:], masks[2:], bn_statistics=mode, **kw)
        again = source_copy(model)
        adabn_volumes(again, vols[:2])
        moved[mode] = max(float((a - b).abs().max()) for (n, a), b in
                          zip(model.unet.state_dict().items(), again.unet.state_dict().values())
                          if n.endswith("running_mean"))
        assert model.info["training"]["bn_statistics"] == mode
    assert moved["recalibrated"] < 1e-5 < moved["momentum"]
    assert model.info["training"]["bn_statistics_slices"] == 20
    assert "val_surface_dice_recalibrated" in model.info["training"]
