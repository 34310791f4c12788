"""ConvLoRA: loralib's parametrisation, exact merge/unmerge, placements, named adapters."""

import copy

import pytest
import torch
from torch import nn

from ConvLoRASegLib import UNet2D
from ConvLoRASegLib.convlora import (AdapterSet, ConvLoRA, adapter_state, inject_convlora, lora_layers,
                                     lora_parameter_count, merge_convlora, placement_modules, remove_convlora,
                                     unmerge_convlora)


def _nonzero_b(model, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in lora_layers(model).values():
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


@pytest.mark.parametrize("cin,cout,k,stride,pad,bias", [(16, 16, 3, 1, 1, False), (1, 16, 3, 1, 1, False),
                                                       (16, 32, 2, 2, 0, False), (8, 4, 1, 1, 0, True)])
def test_equals_loralib_conv2d_for_equal_factors(cin, cout, k, stride, pad, bias):
    import loralib

    torch.manual_seed(0)
    ref = loralib.Conv2d(cin, cout, k, r=2, lora_alpha=2, stride=stride, padding=pad, bias=bias)
    nn.init.normal_(ref.lora_B, std=0.1)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=bias)
    conv.load_state_dict(ref.conv.state_dict())
    ours = ConvLoRA(conv, r=2, alpha=2)
    assert ours.lora_A.shape == ref.lora_A.shape == (2 * k, cin * k)
    assert ours.lora_B.shape == ref.lora_B.shape == (cout * k, 2 * k)
    with torch.no_grad():
        ours.lora_A.copy_(ref.lora_A)
        ours.lora_B.copy_(ref.lora_B)
    x = torch.randn(2, cin, 12, 12)
    ref.train()  # loralib's unmerged path
    assert torch.allclose(ours(x), ref(x), atol=1e-5)
    ref.eval()  # loralib merges on eval
    ours.eval().merge()
    assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_injection_changes_no_output_and_freezes_base():
    net = UNet2D().eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        before = net(x)
    inject_convlora(net, "init_path")
    with torch.no_grad():
        assert torch.equal(net(x), before)  # B starts at zero
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    m = net.init_path[0]
    assert isinstance(m, ConvLoRA) and not m.weight.requires_grad
    assert float(m.lora_A.detach().abs().mean()) > 0  # kaiming-uniform A
    assert float(m.lora_B.abs().max()) == 0


@pytest.mark.parametrize("placement,count", [("init_path", 3762), ("init_path+down1", 11058),
                                             ("all", 74034)])
def test_placement_parameter_counts(placement, count):
    net = UNet2D()
    inject_convlora(net, placement, r=2)
    assert lora_parameter_count(net) == count
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == count
    assert not any(isinstance(m, ConvLoRA) for n, m in net.named_modules() if n.startswith(("shortcut", "out_path")))


def test_custom_placement_and_keys_as_in_paper():
    net = UNet2D()
    paths = inject_convlora(net, ["init_path.0", "down2.1"])
    assert paths == ["init_path.0", "down2.1"]
    sd = net.state_dict()
    assert {"init_path.0.weight", "init_path.0.lora_A", "init_path.0.lora_B", "down2.1.lora_A"} <= set(sd)
    with pytest.raises(ValueError):
        placement_modules(net, "nowhere")


def test_one_convolution_per_forward():
    net = UNet2D().eval()
    inject_convlora(net, "init_path")
    calls = []
    layer = net.init_path[0]
    orig = layer._conv_forward
    layer._conv_forward = lambda *a: calls.append(1) or orig(*a)
    layer(torch.randn(1, 1, 8, 8))
    assert len(calls) == 1


def test_merge_unmerge_exact():
    net = UNet2D().eval()
    inject_convlora(net, "all")
    _nonzero_b(net)
    weights = {n: m.weight.detach().clone() for n, m in lora_layers(net).items()}
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        unmerged = net(x)
        merge_convlora(net)
        merged = net(x)
        assert torch.allclose(unmerged, merged, atol=1e-5)
        unmerge_convlora(net)
    for n, m in lora_layers(net).items():
        assert torch.equal(m.weight, weights[n])  # bit-exact restore


def test_train_mode_unmerges():
    net = UNet2D()
    inject_convlora(net)
    _nonzero_b(net)
    merge_convlora(net)
    net.train()
    assert not any(m.merged for m in lora_layers(net).values())


def test_refuses_grouped_and_non_conv():
    with pytest.raises(ValueError, match="groups"):
        ConvLoRA(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TypeError):
        ConvLoRA(nn.Linear(3, 3))
    with pytest.raises(TypeError):
        ConvLoRA(nn.ConvTranspose2d(3, 3, 2))


def test_conv3d_reshape_fits_cubic_kernel():
    conv = nn.Conv3d(4, 6, 3, padding=1)
    lora = ConvLoRA(conv, r=2)
    assert lora.lora_A.shape == (6, 4 * 3 * 3) and lora.lora_B.shape == (18, 6)
    nn.init.normal_(lora.lora_B)
    assert lora.delta_weight().shape == conv.weight.shape
    x = torch.randn(1, 4, 5, 5, 5)
    expected = nn.functional.conv3d(x, conv.weight + lora.delta_weight(), conv.bias, padding=1)
    assert torch.allclose(lora(x), expected, atol=1e-5)


def test_gradients_reach_only_lora():
    net = UNet2D()
    inject_convlora(net)
    net(torch.randn(2, 1, 16, 16)).sum().backward()
    m = net.init_path[0]
    assert m.lora_A.grad is not None and float(m.lora_A.grad.abs().max()) == 0  # dL/dA = B^T(...) = 0 while B = 0
    assert m.lora_B.grad is not None and float(m.lora_B.grad.abs().sum()) > 0
    assert m.weight.grad is None


def test_named_adapters_switch_and_disable_exactly():
    net = UNet2D().eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        source_out = net(x)
    site_a, site_b = copy.deepcopy(net), copy.deepcopy(net)
    outs = {}
    for seed, (name, site) in enumerate([("a", site_a), ("b", site_b)]):
        inject_convlora(site, "init_path")
        _nonzero_b(site, seed=seed)
        for bn in site.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.add_(0.1 * (seed + 1))
        with torch.no_grad():
            outs[name] = site(x)
    adapters = AdapterSet(net)
    adapters.add("a", adapter_state(site_a))
    adapters.add("b", adapter_state(site_b))
    with torch.no_grad():
        adapters.set_adapter("a")
        assert torch.allclose(net(x), outs["a"], atol=1e-6)
        adapters.set_adapter("b")
        assert torch.allclose(net(x), outs["b"], atol=1e-6)
        adapters.disable()
        assert torch.allclose(net(x), source_out, atol=1e-6)
    assert adapters.active is None and adapters.names == ["a", "b"]


def test_remove_convlora_keeps_merged_kernel():
    net = UNet2D().eval()
    inject_convlora(net)
    _nonzero_b(net)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        expected = net(x)
        merge_convlora(net)
        remove_convlora(net)
        assert not lora_layers(net)
        assert torch.allclose(net(x), expected, atol=1e-5)
