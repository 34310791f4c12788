"""The U-Net and the ESH: the paper's layout, state-dict compatible with a network built from deep-pipe blocks."""

import pytest
import torch
from torch import nn

from ConvLoRASegLib import EarlySegmentationHead, UNet2D, import_reference_checkpoint
from ConvLoRASegLib.errors import ConvLoRASegError
from ConvLoRASegLib.model import ConvLoRASegModel


def dpipe_unet(n: int = 16) -> nn.Module:
    """The DART20 U-Net assembled independently from PyPI deep-pipe's blocks, as the paper's code does."""
    from dpipe.layers.conv import PreActivation2d
    from dpipe.layers.resblock import ResBlock2d

    def res(c, k=3, p=1):
        return ResBlock2d(c, c, kernel_size=k, padding=p)

    def down(a, b, extra=False):
        layers = [nn.BatchNorm2d(a), nn.Conv2d(a, b, 2, 2, bias=False), nn.ReLU(), nn.Identity(), res(b), res(b), res(b)]
        return nn.Sequential(*(layers + [nn.Identity()] if extra else layers))

    def up(a, b):
        return nn.Sequential(res(a), res(a), res(a), nn.BatchNorm2d(a), nn.ConvTranspose2d(a, b, 2, 2, bias=False),
                             nn.ReLU(), nn.Identity())

    class Ref(nn.Module):
        def __init__(self):
            super().__init__()
            self.init_path = nn.Sequential(nn.Conv2d(1, n, 3, padding=1, bias=False), nn.ReLU(), res(n), res(n), res(n))
            self.shortcut0 = nn.Conv2d(n, n, 1)
            self.down1, self.shortcut1 = down(n, 2 * n), nn.Conv2d(2 * n, 2 * n, 1)
            self.down2, self.shortcut2 = down(2 * n, 4 * n), nn.Conv2d(4 * n, 4 * n, 1)
            self.down3 = down(4 * n, 8 * n, extra=True)
            self.up3, self.up2, self.up1 = up(8 * n, 4 * n), up(4 * n, 2 * n), up(2 * n, n)
            self.out_path = nn.Sequential(ResBlock2d(n, n, kernel_size=1, padding=0), PreActivation2d(n, 1, kernel_size=1),
                                          nn.BatchNorm2d(1))

        def forward(self, x):
            x0 = self.init_path(x)
            x1 = self.down1(x0)
            x2 = self.down2(x1)
            x3 = self.down3(x2)
            y = self.up2(self.up3(x3) + self.shortcut2(x2))
            y = self.up1(y + self.shortcut1(x1))
            return self.out_path(y + self.shortcut0(x0))

    return Ref()


def _randomise_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def test_counts_and_keys():
    net = UNet2D(16)
    sd = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == 2_434_771
    assert len(sd) == 319
    for key in ("init_path.2.conv_path.0.bn.weight", "init_path.2.conv_path.0.layer.weight", "down1.0.running_mean",
                "down1.1.weight", "out_path.1.layer.bias"):
        assert key in sd
    assert "init_path.0.bias" not in sd and "init_path.2.conv_path.0.layer.bias" not in sd
    assert "shortcut0.bias" in sd


def test_matches_deep_pipe_reference_strict_and_same_logits():
    ref = dpipe_unet()
    _randomise_bn(ref)
    ref.eval()
    ours = UNet2D(16).eval()
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 1, 64, 48)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_import_reference_checkpoint(tmp_path):
    ref = dpipe_unet()
    _randomise_bn(ref)
    path = tmp_path / "unet.pth"
    torch.save(ref.state_dict(), path)
    net = import_reference_checkpoint(path).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), ref.eval()(x), atol=1e-5)


def test_import_reference_checkpoint_with_lora_keys(tmp_path):
    from ConvLoRASegLib.convlora import inject_convlora, lora_layers

    src = UNet2D()
    inject_convlora(src, "init_path")
    for m in lora_layers(src).values():
        torch.nn.init.normal_(m.lora_B, std=0.01)
    torch.save(src.state_dict(), tmp_path / "adapted.pth")
    net = import_reference_checkpoint(tmp_path / "adapted.pth")
    assert set(lora_layers(net)) == set(lora_layers(src))
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), src.eval()(x), atol=1e-6)


def test_import_refuses_pickled_objects_and_wrong_shapes(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module, not a state dict
    with pytest.raises(ConvLoRASegError):
        import_reference_checkpoint(tmp_path / "module.pth")
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ConvLoRASegError, match="does not match"):
        import_reference_checkpoint(tmp_path / "other.pth")


@pytest.mark.parametrize("level,channels,scale", [(0, 16, 1), (1, 32, 2), (2, 64, 4), (3, 128, 8)])
def test_esh_levels(level, channels, scale):
    esh = EarlySegmentationHead(level)
    assert esh.conv1.in_channels == channels
    feats = torch.randn(2, channels, 64 // scale, 64 // scale)
    assert esh(feats).shape == (2, 1, 64, 64)


def test_esh_parameter_count_and_model_forward_both():
    assert sum(p.numel() for p in EarlySegmentationHead(3).parameters()) == 14_821
    model = ConvLoRASegModel().eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        final, early = model.forward_both(x)
        assert torch.equal(final, model(x))
        assert torch.allclose(early, model.forward_esh(x))
        feats = model.unet.init_path(x)
        for stage in ("down1", "down2", "down3"):
            feats = getattr(model.unet, stage)(feats)
        assert torch.allclose(early, model.esh(feats))
